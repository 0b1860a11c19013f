"""The triplet trainer's S-norm evaluation (--score_norm) against NumPy brute force."""

import dataclasses
import json

import numpy as np
import pytest

from jaxface import metrics as metrics_lib
from jaxface.train import fisher
from jaxface.train import triplet

from tests.test_train_triplet import TINY


def _ref_snorm_matrix(x, cohort, top_k=0):
  """[N, N] float64 S-normed squared distances, by loops."""
  x, cohort = x.astype(np.float64), cohort.astype(np.float64)
  n = len(x)
  mu, sd = np.empty(n), np.empty(n)
  for r in range(n):
    d = np.sort([np.sum((x[r] - c) ** 2) for c in cohort])
    d = d[:top_k] if top_k else d
    mu[r], sd[r] = np.mean(d), np.std(d)
  out = np.empty((n, n))
  for a in range(n):
    for b in range(n):
      d = np.sum((x[a] - x[b]) ** 2)
      out[a, b] = 0.5 * ((d - mu[a]) / sd[a] + (d - mu[b]) / sd[b])
  return out


def _setup(**overrides):
  cfg = dataclasses.replace(TINY, score_norm="snorm", **overrides).validate()
  train_src, holdout, _ = triplet.prepare_data(cfg)
  rng = np.random.default_rng(5)
  emb = rng.normal(size=(len(holdout), 16)).astype(np.float32)
  rows = triplet.cohort_indices(len(train_src), cfg)
  cohort = rng.normal(size=(len(rows), 16)).astype(np.float32)
  return cfg, train_src, holdout, emb, cohort


def _metrics_from_matrix(s, labels, seed):
  return metrics_lib.evaluate_embeddings(np.zeros((len(labels), 1), np.float32), labels,
                                         seed=seed, pair_distance=lambda i, j: s[i, j])[0]


def _assert_metrics_close(got, want):
  for key in ("eval/accuracy", "eval/auc", "eval/threshold", "eval/rank1", "eval/top5",
              "eval/open_set/far", "eval/open_set/dir"):
    assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.parametrize("top_k", [0, 9])
def test_snorm_evaluation_matches_brute_force(top_k):
  cfg, train_src, holdout, emb, cohort = _setup(score_norm_top_k=top_k)
  got = triplet.evaluate_embeddings(emb, holdout, cfg, 0, None, cohort=cohort, train=train_src)
  want = _metrics_from_matrix(_ref_snorm_matrix(emb, cohort, top_k), holdout.labels, cfg.seed)
  _assert_metrics_close(got, want)
  plain = triplet.evaluate_embeddings(emb, holdout, dataclasses.replace(cfg, score_norm="none"),
                                      0, None)
  assert got["eval/threshold"] != pytest.approx(plain["eval/threshold"])  # S-norm was applied


def test_snorm_with_fisher_weight_fuses_scores_not_features():
  cfg, train_src, holdout, emb, cohort = _setup(fisher_weight=0.6, fisher_pca=20)
  got = triplet.evaluate_embeddings(emb, holdout, cfg, 0, None, cohort=cohort, train=train_src)
  model = fisher.fit(train_src.get(np.arange(len(train_src))), train_src.labels, num_pca=20)
  fh = fisher.project(model, holdout.get(np.arange(len(holdout))))
  fc = fisher.project(model, train_src.get(triplet.cohort_indices(len(train_src), cfg)))
  fused = _ref_snorm_matrix(emb, cohort) + 0.6 * _ref_snorm_matrix(fh, fc)
  _assert_metrics_close(got, _metrics_from_matrix(fused, holdout.labels, cfg.seed))
  # Without train= the split is reloaded from the config: same result.
  again = triplet.evaluate_embeddings(emb, holdout, cfg, 0, None, cohort=cohort)
  assert again == pytest.approx(got)


def test_cohort_is_a_seeded_subset_when_capped():
  cfg = dataclasses.replace(TINY, score_norm="snorm", score_norm_cohort=10).validate()
  rows = triplet.cohort_indices(48, cfg)
  assert rows.shape == (10,) and np.all(np.diff(rows) > 0) and rows.max() < 48
  np.testing.assert_array_equal(rows, triplet.cohort_indices(48, cfg))
  other = triplet.cohort_indices(48, dataclasses.replace(cfg, seed=cfg.seed + 1))
  assert not np.array_equal(rows, other)
  np.testing.assert_array_equal(triplet.cohort_indices(7, cfg), np.arange(7))


def test_snorm_bad_settings_and_missing_cohort():
  for kw, flag in ((dict(score_norm="znorm"), "score_norm"),
                   (dict(score_norm_top_k=1), "score_norm_top_k"),
                   (dict(score_norm_top_k=-2), "score_norm_top_k"),
                   (dict(score_norm_cohort=1), "score_norm_cohort"),
                   (dict(score_norm_top_k=50, score_norm_cohort=20), "score_norm_top_k")):
    with pytest.raises(ValueError, match=f"--{flag}="):
      dataclasses.replace(TINY, **kw).validate()
  cfg, train_src, holdout, emb, cohort = _setup()
  with pytest.raises(ValueError, match="no cohort"):
    triplet.evaluate_embeddings(emb, holdout, cfg, 0, None)
  big = dataclasses.replace(cfg, score_norm_top_k=len(cohort) + 1)
  with pytest.raises(ValueError, match="score_norm_top_k"):
    triplet.evaluate_embeddings(emb, holdout, big, 0, None, cohort=cohort, train=train_src)
  with pytest.raises(triplet.TrainingError, match="cohort"):
    triplet.evaluate_embeddings(emb, holdout, cfg, 0, None, cohort=cohort * np.nan)


def test_training_run_with_snorm_writes_its_metrics(tmp_path):
  cfg = dataclasses.replace(TINY, score_norm="snorm", fisher_weight=0.5, fisher_pca=20)
  res = triplet.run(cfg, str(tmp_path))
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["eval/accuracy"] == pytest.approx(res["eval/accuracy"])
  assert 0.0 <= saved["eval/accuracy"] <= 1.0 and saved["eval/num_identities"] == 4
  # The evaluation can be switched off on the finished run without retraining
  # (an evaluation-only setting): same weights, plain distances.
  plain = triplet.run(dataclasses.replace(cfg, score_norm="none", fisher_weight=0.0),
                      str(tmp_path))
  assert plain["eval/threshold"] != pytest.approx(res["eval/threshold"])
