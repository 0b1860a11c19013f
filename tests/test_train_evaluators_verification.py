"""Tests for jaxface.train.evaluators.verification: held-out metrics, S-norm, Fisherfaces fusion.

The evaluator's metrics equal those of the trainer before it was split
(golden values in tests/data/verification_eval_v1.json, written by that
code's ``evaluate`` and ``evaluate_embeddings``); S-norm against NumPy brute force.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxface import metrics as metrics_lib
from jaxface.train import fisher, model as model_lib, step as step_lib, triplet
from jaxface.train.evaluators import verification
from jaxface.train.evaluators.verification import VerificationEvaluator
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
  rows = verification.cohort_indices(len(train_src), cfg.score_norm_cohort, cfg.seed)
  cohort = rng.normal(size=(len(rows), 16)).astype(np.float32)
  return cfg, train_src, holdout, emb, cohort


def _evaluator(cfg, holdout, train=None):
  return VerificationEvaluator(None, holdout, cfg.eval, seed=cfg.seed, train=train)


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
  got = _evaluator(cfg, holdout, train_src).metrics(emb, cohort)
  want = _metrics_from_matrix(_ref_snorm_matrix(emb, cohort, top_k), holdout.labels, cfg.seed)
  _assert_metrics_close(got, want)
  plain = _evaluator(dataclasses.replace(cfg, score_norm="none"), holdout).metrics(emb)
  assert got["eval/threshold"] != pytest.approx(plain["eval/threshold"])  # S-norm was applied


def test_snorm_with_fisher_weight_fuses_scores_not_features():
  cfg, train_src, holdout, emb, cohort = _setup(fisher_weight=0.6, fisher_pca=20)
  got = _evaluator(cfg, holdout, train_src).metrics(emb, cohort)
  model = fisher.fit(train_src.get(np.arange(len(train_src))), train_src.labels, num_pca=20)
  fh = fisher.project(model, holdout.get(np.arange(len(holdout))))
  rows = verification.cohort_indices(len(train_src), cfg.score_norm_cohort, cfg.seed)
  fc = fisher.project(model, train_src.get(rows))
  fused = _ref_snorm_matrix(emb, cohort) + 0.6 * _ref_snorm_matrix(fh, fc)
  _assert_metrics_close(got, _metrics_from_matrix(fused, holdout.labels, cfg.seed))
  # The evaluator is given the training split; it never reloads the data itself.
  for kw in (dict(score_norm="snorm"), dict(score_norm="none", fisher_weight=0.6)):
    name = "score_norm" if kw["score_norm"] == "snorm" else "fisher_weight"
    with pytest.raises(ValueError, match=f"^{name}=.*needs the training split"):
      _evaluator(dataclasses.replace(cfg, **kw), holdout)


def test_cohort_is_a_seeded_subset_when_capped():
  cfg = dataclasses.replace(TINY, score_norm="snorm", score_norm_cohort=10).validate()
  rows = verification.cohort_indices(48, cfg.score_norm_cohort, cfg.seed)
  assert rows.shape == (10,) and np.all(np.diff(rows) > 0) and rows.max() < 48
  np.testing.assert_array_equal(rows, verification.cohort_indices(48, 10, cfg.seed))
  other = verification.cohort_indices(48, 10, cfg.seed + 1)
  assert not np.array_equal(rows, other)
  np.testing.assert_array_equal(verification.cohort_indices(7, 10, cfg.seed), np.arange(7))


def test_snorm_bad_settings_and_missing_cohort():
  for kw, flag in ((dict(score_norm="znorm"), "score_norm"),
                   (dict(score_norm_top_k=1), "score_norm_top_k"),
                   (dict(score_norm_top_k=-2), "score_norm_top_k"),
                   (dict(score_norm_cohort=1), "score_norm_cohort"),
                   (dict(score_norm_top_k=50, score_norm_cohort=20), "score_norm_top_k")):
    with pytest.raises(ValueError, match=f"^{flag}="):
      dataclasses.replace(TINY, **kw).validate()
  cfg, train_src, holdout, emb, cohort = _setup()
  evaluator = _evaluator(cfg, holdout, train_src)
  with pytest.raises(ValueError, match="no cohort"):
    evaluator.metrics(emb)
  big = dataclasses.replace(cfg, score_norm_top_k=len(cohort) + 1)
  with pytest.raises(ValueError, match="^score_norm_top_k=.*the cohort has only"):
    _evaluator(big, holdout, train_src).metrics(emb, cohort)
  with pytest.raises(triplet.TrainingError, match="cohort"):
    evaluator.metrics(emb, cohort * np.nan)
  with pytest.raises(triplet.TrainingError, match="held-out embeddings are not finite"):
    evaluator.metrics(emb * np.nan, cohort)


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


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "verification_eval_v1.json")


def _golden():
  with open(GOLDEN) as f:
    return json.load(f)


def _assert_same_metrics(got, want, **tol):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if value is None:  # undefined (JSON null), e.g. TAR at a FAR finer than the pairs resolve
      assert got[key] is None, key
    else:
      assert got[key] == pytest.approx(value, **tol), key


@pytest.mark.parametrize("case", sorted(_golden()))
def test_evaluator_yields_the_metrics_of_the_trainer_before_the_split(case):
  """``run`` on the seeded initial weights and ``metrics`` on seeded embeddings, against the
  values the pre-split trainer's ``evaluate`` / ``evaluate_embeddings`` gave."""
  want = _golden()[case]
  cfg = dataclasses.replace(TINY, **want["config"])
  train_src, holdout, _ = triplet.prepare_data(cfg)
  graphdef, _, state = step_lib.init_state(cfg)
  evaluator = VerificationEvaluator(model_lib.make_embed_fn(graphdef, cfg), holdout, cfg.eval,
                                    seed=cfg.seed, train=train_src)
  pairs = list(evaluator.run(state["params"], state["rest"]))
  assert all(name.startswith("eval/") for name, _ in pairs)
  got = {**dict(pairs), "eval/step": int(state["step"])}
  _assert_same_metrics(got, want["network"], rel=1e-6, abs=1e-7)
  assert evaluator.roc["fpr"].shape == evaluator.roc["tpr"].shape
  rng = np.random.default_rng(5)
  emb = rng.normal(size=(len(holdout), 16)).astype(np.float32)
  cohort = rng.normal(size=(len(evaluator.cohort_rows()), 16)).astype(np.float32)
  got = {**evaluator.metrics(emb, cohort if cfg.score_norm == "snorm" else None), "eval/step": 3}
  _assert_same_metrics(got, want["random_embeddings"], rel=1e-9, abs=1e-12)


def test_format_results_is_the_line_runs_print():
  r = {**_golden()["plain"]["network"], "eval/step": 8}
  line = verification.format_results(r)
  assert line.startswith("eval (held-out identities, step 8): accuracy ") and "TAR@FAR=1e-3 n/a" in line
