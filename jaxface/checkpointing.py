"""The one wrapper around orbax's ``CheckpointManager``.

Every experiment saves ``{"state": <pytree>, "config": <json dict>}`` per
step under ``<workdir>/checkpoints/<step>`` and always resumes from the latest
complete step. Orbax writes each step to a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous steps intact
and the partial one is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or from another config)."""


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring into the same layout."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Saves and restores (state, config) in ``<workdir>/checkpoints``.

  Args:
    workdir: the run directory.
    max_to_keep: how many recent steps to keep on disk.
    async_save: write in a background thread so training goes on (the
      manager waits for the previous save before the next one).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: dict, *, force: bool = False) -> bool:
    """Saves ``state`` and ``config`` as step ``step``; returns whether it saved."""
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                config=ocp.args.JsonSave(config)),
        force=force)

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config saved with ``step`` (default latest), or None when there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.directory, str(step), "config")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return dict(restored["config"])
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"checkpoint config at {path} cannot be read ({type(e).__name__}: {e}); "
          f"move that step directory away to resume from an earlier one") from e

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
    """Restores the latest (or given) step into the layout of ``abstract_state``.

    Returns:
      (step, state), or None when the workdir holds no checkpoint yet.

    Raises:
      CheckpointError: naming the step directory, when it is damaged. Nothing
        is deleted: the user decides what to do with it.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {path} cannot be restored ({type(e).__name__}: {str(e)[:500]}); "
          f"it may be truncated or from a different model. Move that directory away to resume "
          f"from an earlier step, or use a new workdir") from e
    state = restored["state"]
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(state)
           if hasattr(v, "dtype") and jax.numpy.issubdtype(v.dtype, jax.numpy.floating)
           and not bool(jax.numpy.all(jax.numpy.isfinite(v)))]
    if bad:
      raise CheckpointError(f"checkpoint {path} holds non-finite values in {bad[:5]}")
    return step, state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def check_resumable(saved: dict, current: dict, *, may_change: tuple[str, ...]) -> None:
  """Refuses to resume a run whose saved config differs in a key that matters.

  Raises:
    CheckpointError: listing the differing keys and both values.
  """
  diffs = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)
           if k not in may_change and _norm(saved.get(k)) != _norm(current.get(k))}
  if diffs:
    lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))
    raise CheckpointError(
        f"the workdir holds a run with a different config ({lines}); use a new workdir "
        f"or the same settings")


def _norm(v):
  # JSON turns tuples into lists; compare through JSON.
  return json.loads(json.dumps(v))
