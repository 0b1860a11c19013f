"""Which network turns a face into an embedding, and the image -> faces -> embeddings rules.

Two encoders share one interface (:class:`FaceEmbedder`), chosen by
:func:`get_encoder`: dlib's pretrained pipeline (``"dlib"``, default) or a
triplet-experiment run (``"checkpoint:PATH"``). For one image,
:func:`encode_faces` gives every face and :func:`encode_one` the one an
operation needs; an unreadable image is a :class:`jaxface.images.ImageError`,
a missing or ambiguous face a :class:`FaceError`, each naming the image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
from PIL import Image

from jaxface import faces, paths

# JAX, the pretrained-weight cache (orbax) and the triplet trainer are imported where an encoder is
# built: the recognition CLI imports this module for every command, most of which never embed.

DLIB_MODEL = "dlib_face_recognition_resnet_model_v1"
DLIB_PREPROCESSING = "mmod detector, shape_predictor_5, chip 150x150 padding 0.25, RGB uint8"
CHECKPOINT_PREFIX = "checkpoint:"


class FaceError(ValueError):
  """An image does not hold the face(s) the operation needs; the message names the image."""


class NoFaceError(FaceError):
  pass


class SeveralFacesError(FaceError):
  pass


@dataclasses.dataclass(frozen=True)
class Faces:
  """All faces of one image, largest detection score first.

  boxes: int64 [N, 4] (left, top, right, bottom); embeddings: float32 [N, D];
  image_hw: the image's (height, width), which :func:`pick_one` uses to pass
  over faces cut by the image border (None: unknown).
  """
  source: str
  boxes: np.ndarray
  embeddings: np.ndarray
  image_hw: tuple[int, int] | None = None

  def __len__(self) -> int:
    return int(self.boxes.shape[0])


def content_sha256(image: Any) -> str:
  """Hex sha256 of a file's bytes (a path) or of an array's bytes, shape and dtype."""
  if isinstance(image, (str, os.PathLike)):
    h = hashlib.sha256()
    with open(image, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()
  arr = np.ascontiguousarray(np.asarray(image))
  h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
  h.update(arr.tobytes())
  return h.hexdigest()


def _label(image: Any) -> str:
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__} image>"


class FaceEmbedder:
  """Aligned 150x150 uint8 RGB chips -> embeddings; subclasses set ``fingerprint``.

  The ``fingerprint`` dict (model name, sha256 of the weights, preprocessing,
  dimension; for a checkpoint also the architecture, never the run's path) is
  what a gallery stores, so embeddings of different encoders are never
  compared, while a copied or moved run still opens its galleries.
  """

  fingerprint: dict
  dim: int

  def embed_chips(self, chips: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
    """uint8 [N, 150, 150, 3] -> float32 [N, dim]."""
    raise NotImplementedError


class DlibEmbedder(FaceEmbedder):
  """dlib's ResNet via :func:`jaxface.faces.embed` (the model loads lazily on first embed)."""

  dim = 128

  def __init__(self):
    from jaxface import pretrained
    path = pretrained.model_file("resnet")
    self.fingerprint = {"model": DLIB_MODEL, "weights_sha256": pretrained.file_sha256(path),
                        "preprocessing": DLIB_PREPROCESSING, "dim": self.dim}

  def embed_chips(self, chips: np.ndarray) -> np.ndarray:
    return faces.embed(chips)


def params_sha256(tree: Any) -> str:
  """sha256 over every array leaf of ``tree`` (path, dtype, shape and bytes), in path order."""
  import jax
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def checkpoint_architecture(cfg: Any) -> dict:
  """The config fields that shape a triplet run's network (JSON-ready; no paths, no training knobs)."""
  if cfg.init == "dlib":
    spec = cfg.dlib_spec().to_dict()
  else:
    spec = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg.encoder_spec()).items()}
  return {"init": cfg.init, "spec": spec, "standardize": bool(cfg.standardize)}


def checkpoint_fingerprint(cfg: Any, weights_sha256: str) -> dict:
  """What determines a triplet run's embeddings: weights, architecture, preprocessing, dimension.

  Where the run lives is left out, so a copied or moved run directory keeps
  the fingerprint (and its galleries stay usable).
  """
  h, w = cfg.image_size
  return {
      "model": "triplet",
      "architecture": checkpoint_architecture(cfg),
      "weights_sha256": weights_sha256,
      "preprocessing": (f"{DLIB_PREPROCESSING}; resize {h}x{w} bilinear, "
                        f"{'gray' if cfg.channels == 1 else 'RGB'}, centre crop "
                        f"{cfg.crop_size[0]}x{cfg.crop_size[1]}, mirror TTA {bool(cfg.eval_flip)}, "
                        f"crops {int(cfg.eval_crops)}"),
      "dim": int(cfg.embedding_dim),
  }


class CheckpointEmbedder(FaceEmbedder):
  """The encoder of a triplet run's latest checkpoint (``python -m experiments.triplet
  --workdir=PATH``).

  Faces are found and aligned by the same dlib detector/landmarks as
  :class:`DlibEmbedder`; the aligned 150x150 chip is resized to the run's
  ``image_size`` (and made grayscale for a 1-channel run), then embedded exactly
  as the run evaluated (centre crop, optional mirror test-time augmentation).
  """

  def __init__(self, workdir: str):
    from flax import nnx

    from jaxface.train import triplet
    self.workdir = os.path.abspath(paths.expand(workdir))
    if not os.path.isdir(os.path.join(self.workdir, "checkpoints")):
      raise FileNotFoundError(f"encoder='checkpoint:{workdir}': no triplet checkpoint in "
                              f"{self.workdir} (expected {self.workdir}/checkpoints)")
    model, cfg = triplet.load_params(self.workdir)
    if cfg.spatial_rank != 2:
      raise ValueError(f"encoder='checkpoint:{workdir}': the run embeds spatial_rank={cfg.spatial_rank} "
                       "data, not images")
    if getattr(cfg, "ensemble", 1) != 1:
      raise ValueError(f"encoder='checkpoint:{workdir}': ensemble runs are not supported")
    self.cfg = cfg
    graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
    self._embed = triplet.make_embed_fn(graphdef, cfg)
    self.dim = int(cfg.embedding_dim)
    self.fingerprint = checkpoint_fingerprint(cfg, params_sha256((self._params, self._rest)))

  def resize_chips(self, chips: np.ndarray) -> np.ndarray:
    """uint8 [N, 150, 150, 3] -> uint8 [N, H, W, C] as the run's images were loaded."""
    h, w = self.cfg.image_size
    out = np.empty((chips.shape[0], h, w, self.cfg.channels), np.uint8)
    for k, chip in enumerate(chips):  # PIL resizes one image at a time; N is a handful of faces
      im = Image.fromarray(chip).resize((w, h), Image.BILINEAR)
      if self.cfg.channels == 1:
        im = im.convert("L")
      out[k] = np.asarray(im).reshape(h, w, self.cfg.channels)
    return out

  def embed_chips(self, chips: np.ndarray) -> np.ndarray:
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[-1] != 3 or chips.dtype != np.uint8:
      raise ValueError(f"chips: expected uint8 [N, 150, 150, 3], got {chips.dtype} {chips.shape}")
    if chips.shape[0] == 0:
      return np.zeros((0, self.dim), np.float32)
    x = self.resize_chips(chips)
    # Pad to a power of two so a few compiled shapes serve any number of faces.
    n = x.shape[0]
    bucket = 1 << max(0, (n - 1).bit_length())
    if bucket > n:
      x = np.concatenate([x, np.zeros((bucket - n,) + x.shape[1:], np.uint8)])
    return np.asarray(self._embed(self._params, self._rest, x), np.float32)[:n]


_EMBEDDERS: dict[str, FaceEmbedder] = {}


def get_encoder(spec: str = "dlib") -> FaceEmbedder:
  """``"dlib"`` or ``"checkpoint:PATH"`` -> a :class:`FaceEmbedder` (one per spec per process).

  ``"dlib"`` (default): dlib's pretrained pipeline through :mod:`jaxface.faces` (MMOD
  detector -> 5-point landmarks -> 150x150 aligned chip -> ResNet), 128-D descriptors,
  not L2-normalized (same person when distance <= 0.6). ``"checkpoint:PATH"``: the
  encoder of a triplet-experiment run, latest checkpoint (:class:`CheckpointEmbedder`).
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"encoder: expected 'dlib' or 'checkpoint:PATH', got {spec!r}")
  if spec not in _EMBEDDERS:
    if spec == "dlib":
      _EMBEDDERS[spec] = DlibEmbedder()
    elif spec.startswith(CHECKPOINT_PREFIX) and len(spec) > len(CHECKPOINT_PREFIX):
      _EMBEDDERS[spec] = CheckpointEmbedder(spec[len(CHECKPOINT_PREFIX):])
    else:
      raise ValueError(f"encoder: expected 'dlib' or 'checkpoint:PATH', got {spec!r}")
  return _EMBEDDERS[spec]


def encode_faces(image: Any, encoder: FaceEmbedder, *, upsample: int = 1) -> Faces:
  """Every face of ``image`` (a path or an array): boxes int64 [N, 4], embeddings float32 [N, D].

  No face is an empty result (N = 0), not an error.

  Raises:
    jaxface.images.ImageError: the image cannot be read (message names it).
  """
  label = _label(image)
  img = faces.load_image(image)
  boxes = faces.detect(img, upsample=upsample)
  hw = (int(img.shape[0]), int(img.shape[1]))
  if boxes.shape[0] == 0:
    return Faces(label, boxes, np.zeros((0, encoder.dim), np.float32), hw)
  chips = faces.chips(img, faces.landmarks(img, boxes))
  return Faces(label, boxes, np.asarray(encoder.embed_chips(chips), np.float32), hw)


def largest(boxes: np.ndarray, image_hw: tuple[int, int] | None = None) -> int:
  """Index of the main face: the largest box lying wholly inside the image; when none
  does (or ``image_hw`` is None), the largest visible area. Ties: the first, i.e. the
  higher detection score.

  Why not simply the largest box: a person half out of the frame gets a box that
  runs past the border and is often as large as the subject's (measured on LFW
  pairs in BUILD.md, "Which face a one-face command uses").
  """
  b = np.asarray(boxes, np.int64)
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  if image_hw is None:
    return int(np.argmax(area))
  h, w = image_hw
  visible = ((np.minimum(b[:, 2], w) - np.maximum(b[:, 0], 0)).clip(0)
             * (np.minimum(b[:, 3], h) - np.maximum(b[:, 1], 0)).clip(0))
  inside = (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)
  return int(np.argmax(np.where(inside, area, -1))) if inside.any() else int(np.argmax(visible))


def pick_one(found: Faces, *, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(box int64 [4], embedding float32 [D]) of the one face an operation needs: with
  several faces the main one (:func:`largest`), unless ``strict``.

  Raises:
    NoFaceError: no face in the image.
    SeveralFacesError: several faces and ``strict``.
  """
  n = len(found)
  if n == 0:
    raise NoFaceError(f"{found.source}: no face found (try upsample=1 for small faces)")
  if n > 1 and strict:
    raise SeveralFacesError(f"{found.source}: {n} faces found where one is needed (strict=True); "
                            "crop the image or pass strict=False to use the largest face")
  k = largest(found.boxes, found.image_hw) if n > 1 else 0
  return found.boxes[k], found.embeddings[k]


def encode_one(image: Any, encoder: FaceEmbedder, *, upsample: int = 1,
               strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The single (or largest) face of ``image``: (box int64 [4], embedding float32 [D])."""
  return pick_one(encode_faces(image, encoder, upsample=upsample), strict=strict)


def source_record(path: Any, box: np.ndarray) -> dict:
  """``{"path", "sha256", "box"}`` for a gallery source (absolute path for files)."""
  label = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else _label(path)
  return {"path": label, "sha256": content_sha256(path), "box": [int(v) for v in np.asarray(box)]}
