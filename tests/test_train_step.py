"""Tests for jaxface.train.step: the pure train step, its guards, the optimizer, device checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.train import step as step_lib, triplet
from tests.test_train_triplet import TINY, _assert_trees_equal, _batch


def test_train_step_compiles_once_lowers_loss_and_donates_state():
  graphdef, tx, state = step_lib.init_state(TINY)
  step = step_lib.make_train_step(graphdef, tx, TINY)
  batch = _batch(TINY)
  old_leaf = jax.tree.leaves(state["params"])[0]
  losses = []
  for _ in range(12):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert old_leaf.is_deleted()  # donated
  assert step._cache_size() == 1  # one compile for all steps
  assert int(state["step"]) == 12 and int(state["bad_step"]) == -1
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert 0.0 <= float(m["train/active_fraction"]) <= 1.0


def test_non_finite_step_keeps_previous_state_and_records_the_step():
  graphdef, tx, state = step_lib.init_state(TINY)
  step = step_lib.make_train_step(graphdef, tx, TINY)
  state, _ = step(state, _batch(TINY))
  poisoned = jax.tree.map(lambda x: x, state)
  head = poisoned["params"]["head"]["kernel"]
  head[...] = head[...].at[0, 0].set(jnp.nan)
  before = jax.tree.map(np.asarray, poisoned["params"])
  after, m = step(poisoned, _batch(TINY))
  assert int(after["bad_step"]) == 1 and int(after["step"]) == 2
  _assert_trees_equal(jax.tree.map(np.asarray, after["params"]), before)
  with pytest.raises(step_lib.TrainingError, match="non-finite loss or gradient at step 1"):
    triplet.check_health(after, {"train/embedding_spread": 1.0}, 2)


def test_collapsed_embeddings_stop_training():
  graphdef, tx, state = step_lib.init_state(TINY)
  for name in ("kernel", "bias"):
    v = state["params"]["head"][name]
    v[...] = jnp.zeros_like(v[...])
  step = step_lib.make_train_step(graphdef, tx, TINY)
  state, m = step(state, _batch(TINY))
  host = {k: float(v) for k, v in m.items()}
  assert host["train/embedding_spread"] < 1e-6
  with pytest.raises(step_lib.TrainingError, match="collapsed"):
    triplet.check_health(state, host, 1)


def test_ema_follows_the_polyak_recurrence_and_is_what_evaluation_uses():
  cfg = dataclasses.replace(TINY, optim=dataclasses.replace(TINY.optim, ema_decay=0.5))
  graphdef, tx, state = step_lib.init_state(cfg)
  step = step_lib.make_train_step(graphdef, tx, cfg)
  expected = jax.tree.map(np.asarray, state["params"])
  for i in range(3):
    state, _ = step(state, _batch(cfg, seed=i))
    live = jax.tree.map(np.asarray, state["params"])
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, expected, live)
  ema = jax.tree.map(np.asarray, state["ema"])
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert step_lib.eval_params(state) is state["ema"]
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(live)))


def test_optimizer_decays_only_kernels():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = step_lib.make_optimizer(dataclasses.replace(TINY.optim, warmup_steps=0), 100)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # A zero gradient moves the weights by AdamW's decay alone: lr * wd * w on kernels, none on biases.
  np.testing.assert_allclose(updates["w"], -TINY.learning_rate * TINY.weight_decay, rtol=1e-5)
  assert float(jnp.abs(updates["b"]).max()) == 0


def test_check_parallel_batch_names_p_and_the_fix():
  step_lib.check_parallel_batch(TINY.data, TINY.loss, 4)  # 12 rows over 4 devices
  with pytest.raises(ValueError, match=r"^P=4: with K=3, 12 images per batch do not split evenly over 5"):
    step_lib.check_parallel_batch(TINY.data, TINY.loss, 5)
  local = dataclasses.replace(TINY.loss, mining="local")
  with pytest.raises(ValueError, match=r"^P=4: mining='local' .* multiple of 3"):
    step_lib.check_parallel_batch(TINY.data, local, 3)
  with pytest.raises(ValueError, match=r"1 identity per device, so no negatives"):
    step_lib.check_parallel_batch(TINY.data, local, 4)
  step_lib.check_parallel_batch(TINY.data, local, 2)
  step_lib.check_parallel_batch(TINY.data, local, 1)  # one device: nothing to split
