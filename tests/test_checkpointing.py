"""Tests for jaxface.checkpointing."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxface import checkpointing


def _state(x=1.0):
  return {"step": jnp.asarray(3, jnp.int32), "w": jnp.full((4, 3), x, jnp.float32),
          "nested": {"b": jnp.arange(5, dtype=jnp.float32) * x}}


def test_save_restore_round_trip_with_config(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    assert ck.restore(checkpointing.abstract_like(_state())) is None
    assert ck.restore_config() is None
    ck.save(3, _state(2.0), {"a": 1, "widths": [8, 16]})
    ck.save(5, _state(3.0), {"a": 1, "widths": [8, 16]})
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    assert ck.latest_step() == 5
    step, st = ck.restore(checkpointing.abstract_like(_state()))
    assert step == 5
    np.testing.assert_array_equal(np.asarray(st["w"]), np.full((4, 3), 3.0, np.float32))
    assert ck.restore_config() == {"a": 1, "widths": [8, 16]}
    _, st3 = ck.restore(checkpointing.abstract_like(_state()), step=3)
    np.testing.assert_array_equal(np.asarray(st3["nested"]["b"]), np.arange(5) * 2.0)


def test_max_to_keep_prunes_old_steps(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    for s in (1, 2, 3):
      ck.save(s, _state(float(s)), {})
    ck.wait()
    assert ck.all_steps() == [2, 3]


def _corrupt_largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.truncate(max(os.path.getsize(target) // 3, 1))
  return target


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, _state(1.0), {"a": 1})
    ck.save(2, _state(2.0), {"a": 1})
  step_dir = os.path.join(str(tmp_path), "checkpoints", "2")
  _corrupt_largest_file(os.path.join(step_dir, "state"))
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/2"):
      ck.restore(checkpointing.abstract_like(_state()))
    # The earlier step is still there and still good.
    assert ck.all_steps() == [1, 2]
    _, st = ck.restore(checkpointing.abstract_like(_state()), step=1)
    assert float(st["w"][0, 0]) == 1.0


def test_wrong_layout_is_a_clear_error(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, _state(), {})
  other = {"step": jnp.asarray(0, jnp.int32), "w": jnp.zeros((7, 7))}
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(checkpointing.CheckpointError, match="cannot be restored"):
      ck.restore(checkpointing.abstract_like(other))


def test_non_finite_values_are_refused(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, _state(float("nan")), {})
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(checkpointing.CheckpointError, match="non-finite"):
      ck.restore(checkpointing.abstract_like(_state()))


def test_check_resumable():
  checkpointing.check_resumable({"a": [1, 2], "n": 5}, {"a": (1, 2), "n": 9}, may_change=("n",))
  with pytest.raises(checkpointing.CheckpointError, match="a: saved 1 vs now 2"):
    checkpointing.check_resumable({"a": 1}, {"a": 2}, may_change=())
