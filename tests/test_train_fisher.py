"""Tests for jaxface.train.fisher (Fisherfaces fused with learned embeddings) and its config hook."""

import dataclasses

import numpy as np
import pytest

from jaxface import metrics as metrics_lib
from jaxface.train import fisher, triplet
from jaxface.train.evaluators.verification import VerificationEvaluator
from tests.test_train_triplet import TINY


def _faces(num_ids=5, per_id=6, hw=(6, 5), seed=0, noise=12.0):
  """Identity prototypes plus per-image noise and brightness: [N, H, W, 1] uint8, [N] labels."""
  rng = np.random.default_rng(seed)
  protos = rng.uniform(40, 215, (num_ids, *hw, 1))
  labels = np.repeat(np.arange(num_ids), per_id)
  images = (protos[labels] + rng.normal(0, noise, (labels.size, *hw, 1))
            + rng.uniform(-20, 20, (labels.size, 1, 1, 1)))
  return np.clip(images, 0, 255).astype(np.uint8), labels


def _reference_subspace(images, labels, num_pca):
  """Slow, loop-by-loop Fisherfaces: orthonormal basis [P, C-1] of the fitted subspace."""
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  rows = []
  for r in x:  # per-image standardisation
    rows.append((r - r.mean()) / r.std())
  x = np.array(rows)
  mean = x.mean(0)
  cov = (x - mean).T @ (x - mean)
  vals, vecs = np.linalg.eigh(cov)  # another route to PCA than the SVD under test
  pca = vecs[:, np.argsort(vals)[::-1][:num_pca]]
  z = (x - mean) @ pca
  classes = np.unique(labels)
  s_w = np.zeros((num_pca, num_pca))
  s_b = np.zeros((num_pca, num_pca))
  for c in classes:
    zc = z[labels == c]
    m = zc.mean(0)
    for row in zc:
      s_w += np.outer(row - m, row - m)
    s_b += len(zc) * np.outer(m, m)
  vals, vecs = np.linalg.eig(np.linalg.solve(s_w, s_b))
  top = vecs[:, np.argsort(-vals.real)[:classes.size - 1]].real
  q, _ = np.linalg.qr(pca @ top)
  return q


def test_fit_spans_the_reference_fisher_subspace():
  images, labels = _faces()
  model = fisher.fit(images, labels, num_pca=12)
  assert model.basis.shape == (30, 4) and model.mean.shape == (30,)
  q, _ = np.linalg.qr(model.basis)
  ref = _reference_subspace(images, labels, 12)
  # Same subspace <=> same orthogonal projector (bases differ by an invertible map).
  np.testing.assert_allclose(q @ q.T, ref @ ref.T, atol=1e-6)


def test_project_is_unit_norm_float32_and_separates_identities():
  images, labels = _faces(seed=1, noise=4.0)
  model = fisher.fit(images[::2], labels[::2], num_pca=10)  # fit on half the images
  f = fisher.project(model, images[1::2])
  assert f.dtype == np.float32 and f.shape == (15, 4)
  np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
  d = np.sum((f[:, None] - f[None]) ** 2, -1)
  np.fill_diagonal(d, np.inf)
  assert np.all(labels[1::2][np.argmin(d, 1)] == labels[1::2])  # nearest neighbour is the same person


def test_fuse_appends_the_weighted_projection_and_refuses_bad_input():
  images, labels = _faces(seed=2)
  emb = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
  out = fisher.fuse(emb, images[:20], labels[:20], images[20:], weight=0.7, num_pca=8)
  assert out.shape == (10, 3 + 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :3], emb)
  np.testing.assert_allclose(np.linalg.norm(out[:, 3:], axis=1), 0.7, rtol=1e-5)
  with pytest.raises(ValueError, match="weight"):
    fisher.fuse(emb, images[:20], labels[:20], images[20:], weight=0.0)
  with pytest.raises(ValueError, match="emb"):
    fisher.fuse(emb[:4], images[:20], labels[:20], images[20:], weight=1.0)
  with pytest.raises(ValueError, match="labels"):
    fisher.fit(images, labels[:3])
  with pytest.raises(ValueError, match="2 identities"):
    fisher.fit(images, np.zeros(len(images), int))
  with pytest.raises(ValueError, match="fitted on"):
    fisher.project(fisher.fit(images, labels, 8), images[:, :3])


def test_fisher_weight_in_the_trainer_evaluation_matches_a_manual_fusion():
  cfg = dataclasses.replace(TINY, fisher_weight=0.7, fisher_pca=20).validate()
  train_src, holdout, _ = triplet.prepare_data(cfg)
  emb = np.random.default_rng(3).normal(size=(len(holdout), 16)).astype(np.float32)
  got = VerificationEvaluator(None, holdout, cfg.eval, seed=cfg.seed, train=train_src).metrics(emb)
  fused = fisher.fuse(emb, train_src.get(np.arange(len(train_src))), train_src.labels,
                      holdout.get(np.arange(len(holdout))), weight=0.7, num_pca=20)
  want, _ = metrics_lib.evaluate_embeddings(fused, holdout.labels, seed=cfg.seed)
  plain = VerificationEvaluator(None, holdout, dataclasses.replace(cfg, fisher_weight=0.0).eval,
                                seed=cfg.seed).metrics(emb)
  assert got["eval/accuracy"] == pytest.approx(want["eval/accuracy"])
  assert got["eval/auc"] == pytest.approx(want["eval/auc"])
  assert got["eval/auc"] != pytest.approx(plain["eval/auc"])  # the hook did change the distances
  with pytest.raises(ValueError, match="fisher_weight"):
    dataclasses.replace(TINY, fisher_weight=-1.0).validate()
  with pytest.raises(ValueError, match="fisher_pca"):
    dataclasses.replace(TINY, fisher_pca=0).validate()
