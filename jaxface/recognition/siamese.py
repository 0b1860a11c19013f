"""Siamese verification head: logistic regression on pair features of two embeddings.

The lecture's alternative to a distance threshold: for embeddings f1, f2 of two
faces, ``p(same) = sigmoid(sum_k w_k * x_k + b)`` with pair features ``x``
(:func:`pair_features`). Trained by :func:`train`, saved and restored with orbax
(:func:`save`, :func:`load`; the config stored with the weights). Pairs come from
an image folder (:func:`folder_pairs`) or an LFW-format pair list (:func:`lfw_pairs`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxface import checkpointing
from jaxface.data import lfw

FEATURES = ("abs", "chi2", "abs+chi2")
CHI2_EPS = 1e-6
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


@dataclasses.dataclass(frozen=True)
class SiameseConfig:
  features: str = "abs"        # abs | chi2 | abs+chi2
  learning_rate: float = 0.05  # Adam step size
  l2: float = 1e-4             # weight decay on w (not b)
  steps: int = 2000            # full-batch steps (upper bound with early stopping)
  val_fraction: float = 0.2    # share of pairs held out for early stopping (0 = none)
  patience: int = 100          # steps without validation improvement before stopping
  seed: int = 0

  def validate(self) -> SiameseConfig:
    if self.features not in FEATURES:
      raise ValueError(f"features: expected one of {FEATURES}, got {self.features!r}")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
    if not (math.isfinite(self.l2) and self.l2 >= 0):
      raise ValueError(f"l2: expected >= 0, got {self.l2}")
    if self.steps < 1:
      raise ValueError(f"steps: expected >= 1, got {self.steps}")
    if not 0 <= self.val_fraction < 1:
      raise ValueError(f"val_fraction: expected in [0, 1), got {self.val_fraction}")
    if self.patience < 1:
      raise ValueError(f"patience: expected >= 1, got {self.patience}")
    return self

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def num_features(kind: str, dim: int) -> int:
  if kind not in FEATURES:
    raise ValueError(f"features: expected one of {FEATURES}, got {kind!r}")
  return 2 * dim if kind == "abs+chi2" else dim


def pair_features(e1, e2, kind: str = "abs"):
  """Pair features of embeddings ``e1, e2`` float32 [N, D] -> float32 [N, F] (jnp, jittable).

  * ``abs``:  ``|f1_k - f2_k|`` (D features);
  * ``chi2``: ``(f1_k - f2_k)^2 / (|f1_k| + |f2_k| + eps)`` (D features). The
    lecture writes the denominator ``f1_k + f2_k`` for non-negative features;
    dlib's descriptors take both signs, so the absolute values keep it positive
    (identical to the lecture's form when both are >= 0);
  * ``abs+chi2``: both (2D features).
  """
  if kind not in FEATURES:
    raise ValueError(f"features: expected one of {FEATURES}, got {kind!r}")
  a, b = jnp.asarray(e1, jnp.float32), jnp.asarray(e2, jnp.float32)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"e1, e2: expected two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
  parts = []
  if kind in ("abs", "abs+chi2"):
    parts.append(jnp.abs(a - b))
  if kind in ("chi2", "abs+chi2"):
    parts.append((a - b) ** 2 / (jnp.abs(a) + jnp.abs(b) + CHI2_EPS))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


class SiameseHead(nnx.Module):
  """``logit = x @ w + b`` on pair features x [N, F]; p(same) = sigmoid(logit)."""

  def __init__(self, num_features: int):
    # Zeros: the convex problem needs no random start, and zeros make runs reproducible.
    # jax arrays (not numpy): the jitted step then sees one input signature from the first call on.
    self.w = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.b = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, x):
    return x @ self.w[...] + self.b[...]


def build_head(num_features: int) -> SiameseHead:
  return SiameseHead(num_features)


def loss_fn(graphdef, params, x, y, l2: float):
  """Mean binary cross-entropy of logits vs labels y (float 0/1 [N]) + l2 * |w|^2."""
  logits = nnx.merge(graphdef, params)(x)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
  return bce + l2 * jnp.sum(params["w"][...] ** 2)


@dataclasses.dataclass
class Siamese:
  """A trained head: ``predict(e1, e2) -> p(same) float32 [N]``."""
  config: SiameseConfig
  dim: int
  graphdef: Any
  params: Any
  history: dict = dataclasses.field(default_factory=dict)
  meta: dict = dataclasses.field(default_factory=dict)  # e.g. the encoder fingerprint, saved with the head

  def __post_init__(self):
    kind = self.config.features

    @jax.jit
    def _prob(params, e1, e2):
      return jax.nn.sigmoid(nnx.merge(self.graphdef, params)(pair_features(e1, e2, kind)))

    self._prob = _prob

  def predict(self, e1, e2) -> np.ndarray:
    """Probability that each pair shows one person: e1, e2 float32 [N, D] -> float32 [N]."""
    a, b = np.asarray(e1, np.float32), np.asarray(e2, np.float32)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != self.dim:
      raise ValueError(f"e1, e2: expected [N, {self.dim}] each, got {a.shape} and {b.shape}")
    return np.asarray(self._prob(self.params, a, b), np.float32)

  @property
  def weights(self) -> tuple[np.ndarray, float]:
    return np.asarray(self.params["w"][...]), float(self.params["b"][...])


def make_train_step(graphdef, tx, l2: float) -> Callable:
  """Jitted pure ``step(params, opt_state, x, y, xv, yv) -> (params, opt_state, loss, val_loss)``."""

  def step(params, opt_state, x, y, xv, yv):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, x, y, l2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Validation loss without the penalty: what early stopping should watch.
    val = loss_fn(graphdef, params, xv, yv, 0.0)
    return params, opt_state, loss, val

  return jax.jit(step)


def train(e1: np.ndarray, e2: np.ndarray, same: np.ndarray,
          config: SiameseConfig = SiameseConfig()) -> Siamese:
  """Fits the head on labeled pairs: full-batch Adam on the mean binary cross-entropy plus
  ``l2 * |w|^2`` (the bias is not decayed), one jitted pure step; optional early stopping
  on a held-out validation split.

  Args:
    e1, e2: float32 [N, D] embeddings of the two faces of each pair.
    same: bool [N], True when the pair shows one person (both classes needed).
    config: settings; ``val_fraction > 0`` holds out a stratified random share
      of the pairs and keeps the parameters of the best validation loss.

  Returns:
    The trained :class:`Siamese` (``history``: steps run, best step, losses).
  """
  config.validate()
  a, b = np.asarray(e1, np.float32), np.asarray(e2, np.float32)
  y = np.asarray(same)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"e1, e2: expected two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
  if y.shape != (a.shape[0],) or y.dtype != np.bool_:
    raise ValueError(f"same: expected bool [{a.shape[0]}], got {y.dtype} {y.shape}")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ValueError("e1, e2: contain NaN or inf")
  if not (y.any() and (~y).any()):
    raise ValueError("same: training needs both same and different pairs")
  n, dim = a.shape
  rng = np.random.default_rng(config.seed)
  val = np.zeros(n, np.bool_)
  if config.val_fraction > 0:
    for cls in (True, False):  # stratified: both classes in both splits
      idx = np.flatnonzero(y == cls)
      k = int(round(config.val_fraction * idx.size))
      if 0 < k < idx.size:
        val[rng.choice(idx, k, replace=False)] = True
  if not val.any():
    val[:] = False
  x = np.asarray(pair_features(a, b, config.features))
  yf = y.astype(np.float32)
  tr = ~val
  # Without a validation split the training loss (without penalty) is watched instead.
  xv, yv = (x[val], yf[val]) if val.any() else (x[tr], yf[tr])
  head = build_head(x.shape[1])
  graphdef, params = nnx.split(head)
  tx = optax.adam(config.learning_rate)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx, config.l2)
  xt, yt, xv, yv = (jnp.asarray(v) for v in (x[tr], yf[tr], xv, yv))
  best, best_params, best_step, k = math.inf, params, 0, 0
  losses = []
  for k in range(1, config.steps + 1):
    params, opt_state, loss, vloss = step(params, opt_state, xt, yt, xv, yv)
    vloss = float(vloss)
    losses.append(float(loss))
    if vloss < best - 1e-7:
      best, best_params, best_step = vloss, params, k
    elif config.val_fraction > 0 and k - best_step >= config.patience:
      break
  if not math.isfinite(best):
    raise FloatingPointError("siamese training diverged (non-finite loss); lower learning_rate")
  final = best_params if config.val_fraction > 0 else params
  history = {"steps": k, "best_step": best_step if config.val_fraction > 0 else k,
             "train_loss": losses[-1], "val_loss": best, "num_train": int(tr.sum()),
             "num_val": int(val.sum())}
  return Siamese(config, dim, graphdef, jax.tree.map(jnp.asarray, final), history)


# --------------------------------------------------------------------------- persistence


def save(model: Siamese, workdir: str, *, overwrite: bool = False) -> str:
  """Writes the head with orbax to ``<workdir>/checkpoints`` (config and dim stored with it).

  Raises:
    FileExistsError: a head is already saved there and not ``overwrite``.
  """
  os.makedirs(workdir, exist_ok=True)
  folder = os.path.join(workdir, "checkpoints")
  if os.path.exists(folder):
    if not overwrite:
      raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it")
    shutil.rmtree(folder)
  config = {"kind": "siamese_head", "dim": model.dim, "config": model.config.to_dict(),
            "history": model.history, "meta": model.meta}
  state = jax.tree.map(np.asarray, {"w": model.params["w"][...], "b": model.params["b"][...]})
  with checkpointing.Checkpointer(workdir, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(0, state, config, force=True)
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def load(workdir: str) -> Siamese:
  """Restores a head saved by :func:`save`; ValueError when the folder holds none."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir}: no siamese head saved there (expected {workdir}/checkpoints)")
  with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
    saved = ckpt.restore_config()
    if not saved or saved.get("kind") != "siamese_head":
      raise ValueError(f"{workdir}: the checkpoint is not a siamese head")
    config = SiameseConfig(**saved["config"]).validate()
    dim = int(saved["dim"])
    f = num_features(config.features, dim)
    target = {"w": jax.ShapeDtypeStruct((f,), jnp.float32), "b": jax.ShapeDtypeStruct((), jnp.float32)}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)
    _, state = ckpt.restore(target)
  head = build_head(f)
  head.w[...] = jnp.asarray(state["w"]).reshape(f)
  head.b[...] = jnp.asarray(state["b"]).reshape(())
  graphdef, params = nnx.split(head)
  return Siamese(config, dim, graphdef, params, dict(saved.get("history") or {}),
                 dict(saved.get("meta") or {}))


# --------------------------------------------------------------------------- pairs


def list_identities(root: str) -> dict[str, list[str]]:
  """``root/<identity>/<image>`` -> {identity: sorted image paths}; identities sorted by name."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not a directory")
  out: dict[str, list[str]] = {}
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder) or name.startswith("."):
      continue
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if files:
      out[name] = files
  return out


def folder_pairs(root: str, *, max_pairs: int = 2000, seed: int = 0
                 ) -> tuple[list[str], list[str], np.ndarray]:
  """Balanced labeled pairs from ``root/<identity>/<images>``.

  Every same-identity pair (i < j) is a candidate; ``n = min(#same, max_pairs // 2)``
  of them are sampled, and as many distinct different-identity pairs.

  Returns:
    (paths1, paths2, same bool [2n]), same pairs first.
  """
  ids = list_identities(root)
  if len(ids) < 2:
    raise ValueError(f"{root}: pairs need at least 2 identity subfolders with images, found {len(ids)}")
  same_pairs = [(p, q) for files in ids.values() for p, q in itertools.combinations(files, 2)]
  if not same_pairs:
    raise ValueError(f"{root}: no identity has 2 or more images, so there are no same-person pairs")
  rng = np.random.default_rng(seed)
  n = min(len(same_pairs), max(1, max_pairs // 2))
  chosen = [same_pairs[i] for i in sorted(rng.choice(len(same_pairs), n, replace=False))]
  names = list(ids)
  diff: set[tuple[str, str]] = set()
  attempts = 0
  while len(diff) < n and attempts < 50 * n:
    attempts += 1
    i, j = rng.choice(len(names), 2, replace=False)
    p = ids[names[i]][rng.integers(len(ids[names[i]]))]
    q = ids[names[j]][rng.integers(len(ids[names[j]]))]
    diff.add((min(p, q), max(p, q)))
  diff_list = sorted(diff)
  p1 = [p for p, _ in chosen] + [p for p, _ in diff_list]
  p2 = [q for _, q in chosen] + [q for _, q in diff_list]
  same = np.concatenate([np.ones(len(chosen), np.bool_), np.zeros(len(diff_list), np.bool_)])
  return p1, p2, same


def lfw_pairs(pairs_file: str, images_dir: str) -> tuple[list[str], list[str], np.ndarray]:
  """An LFW pairs file -> (paths1, paths2, same bool [M]) under ``images_dir`` (:func:`lfw.pair_paths`)."""
  return lfw.pair_paths(pairs_file, images_dir)
