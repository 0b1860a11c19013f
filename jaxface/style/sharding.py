"""Style transfer's run state on a ``("data",)`` mesh (``num_devices``).

The mesh, device checks and shardings are :mod:`jaxface.parallel.mesh`'s; this
module only says which leaves of the style state are split over the batch of
content images and which are replicated. With several processes the mesh
spans every device of every process, and values are placed and gathered with
``mesh.place`` / ``mesh.to_host`` (design notes: BUILD.md, "Style transfer
batch sharded over devices").
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding

from jaxface.parallel import mesh as mesh_lib

__all__ = ["make_mesh", "place_state", "place_consts", "jit_step", "state_shardings"]


def make_mesh(num_devices: int, batch: int) -> Mesh | None:
  """The mesh for ``num_devices`` (0 = all) and a batch of ``batch`` content images, or None
  for one device (``jaxface.parallel.mesh.split_mesh``): N devices each hold a
  contiguous block of ``batch`` / N images, so ``batch`` must be a multiple of N
  (checked before any compute). Each image's result does not depend on N beyond
  float rounding (a device convolves B / N images instead of B, which may pick
  other kernels); a run resumed with the same N is bitwise the uninterrupted one.

  Raises:
    ValueError: naming ``num_devices``: too many, a subset in a multi-process
      run, or a batch that does not split evenly.
  """
  return mesh_lib.split_mesh(num_devices, batch, what="content image(s)")


def state_shardings(mesh: Mesh) -> dict:
  """Sharding prefix tree of the run state (``transfer.new_state``'s keys)."""
  batch, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  return {"image": batch, "opt_state": batch, "step": rep, "scale_index": rep, "seed": rep,
          "bad_step": rep}


def _place_tree(tree, sharding: NamedSharding):
  return jax.tree.map(lambda x: mesh_lib.place(x, sharding), tree)


def place_state(state: dict, mesh: Mesh | None) -> dict:
  """``state`` with images and optimizer state split over the batch; unchanged when mesh is None.

  ``state["image"]`` ``[B, H, W, 3]`` and every leaf of the per-image optimizer
  state ``[B, ...]`` are sharded on "data" (B / N images per device); the
  scalar counters are replicated.
  """
  if mesh is None:
    return state
  shard = state_shardings(mesh)
  return {key: _place_tree(value, shard[key]) for key, value in state.items()}


def place_consts(consts: dict, mesh: Mesh | None) -> dict:
  """Step constants: content activations ``[B, h, w, c]`` split over the batch, the rest (VGG
  weights, their input-gradient kernels, the style Grams) replicated."""
  if mesh is None:
    return consts
  batch, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  return {key: _place_tree(value, batch if key == "content" else rep)
          for key, value in consts.items()}


def jit_step(step: Callable, mesh: Mesh) -> Callable:
  """Jits ``transfer.make_step(..., jit=False)`` for the mesh: state donated, the output
  state kept in the same layout as :func:`place_state` (so the next call reuses the
  compile), metrics replicated. The step itself is unchanged: each device runs it on its
  own images, and nothing but the batch-mean metrics and the all-finite flag crosses
  devices."""
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_shardings(mesh), mesh_lib.replicated(mesh)))
