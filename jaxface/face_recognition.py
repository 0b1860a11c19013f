"""Drop-in for the public API of ``face_recognition`` 1.2.3 (ageitgey), on jaxface's dlib pipeline.

Same names, signatures, defaults, return types and coordinate conventions::

  import jaxface.face_recognition as face_recognition
  img = face_recognition.load_image_file("obama.jpg")
  locs = face_recognition.face_locations(img)            # [(top, right, bottom, left), ...]
  encs = face_recognition.face_encodings(img, locs)      # [float64 (128,), ...]
  face_recognition.compare_faces(known, encs[0])         # [True/False, ...] (distance <= 0.6)

Underneath are the models of :mod:`jaxface.faces` (dlib's CC0 models, converted
once): the MMOD CNN detector (``model="cnn"``), the HOG detector
(``model="hog"``, when :func:`jaxface.faces.detect` has ``method="hog"``), the
5- and 68-point shape predictors and the 128-D ResNet. Given the same face
locations, landmarks are dlib's integer points exactly and encodings agree with
face_recognition's within 1e-5 (``tests/test_face_recognition.py``).

``num_jitters > 1`` is dlib's too: ``num_jitters`` perturbed copies of each chip
(``jitter_image``: shift up to 2% of the face, scale 0.97-0.99999, rotation up
to 3 degrees, mirror with probability 1/2) drawn from a reimplementation of
``dlib::rand`` (mt19937, seed 5489, primed by 10,000 draws), one generator per
process whose state carries from call to call as face_recognition's does; the
same sequence of calls in a fresh process gives face_recognition's encodings
(checked to 1e-5 against dlib 20.0.1).

Differences from face_recognition, all deliberate:

* ``load_image_file`` refuses unreadable, truncated and over-large files with a
  :class:`jaxface.images.ImageError` naming the file (face_recognition sets
  PIL's global ``LOAD_TRUNCATED_IMAGES`` and decodes truncated files partly).
  Like face_recognition it applies no EXIF rotation and converts with PIL's
  ``convert(mode)`` (alpha dropped, not composited).
* ``model`` arguments are checked: anything but ``"hog"``/``"cnn"`` or
  ``"small"``/``"large"`` is a ValueError (face_recognition treats unknown
  detector names as "hog" and unknown encoding models as "large").
* ``batch_face_locations`` accepts images of different sizes and trims each
  image's boxes to that image (face_recognition trims all to the first image,
  and dlib requires equal sizes).
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image

from jaxface import faces, images
from jaxface.dlib_rand import DlibRand
from jaxface.faces import _chips, _landmarks

__all__ = [
    "load_image_file", "face_locations", "batch_face_locations", "face_landmarks",
    "face_encodings", "compare_faces", "face_distance",
]

_SHAPE68: list[Any] = []  # the 68-point predictor, loaded on first use
_SHAPE68_LOCK = threading.Lock()


# --------------------------------------------------------------------------- helpers


def _shape68() -> _landmarks.ShapePredictor:
  with _SHAPE68_LOCK:
    if not _SHAPE68:
      _SHAPE68.append(_landmarks.load_shape_predictor(name="shape68"))
    return _SHAPE68[0]


def _image(face_image: Any, name: str = "face_image") -> np.ndarray:
  """An image array as the pipeline takes it (uint8 [H, W, 3]); a clear error otherwise."""
  if isinstance(face_image, (str, os.PathLike)) or hasattr(face_image, "read"):
    raise TypeError(f"{name}: expected an image array (e.g. from load_image_file), got a "
                    f"{type(face_image).__name__}")
  return images.load_image(face_image)


def _rect_to_css(box: Any) -> tuple[int, int, int, int]:
  left, top, right, bottom = (int(v) for v in box)
  return top, right, bottom, left


def _trim_css_to_bounds(css: tuple[int, int, int, int], image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
  """face_recognition's trim: note right/bottom are clipped to W/H, not W-1/H-1."""
  return max(css[0], 0), min(css[1], image_shape[1]), min(css[2], image_shape[0]), max(css[3], 0)


def _css_to_boxes(locations: Any) -> np.ndarray:
  """[(top, right, bottom, left), ...] -> int64 [N, 4] (left, top, right, bottom)."""
  arr = np.asarray(list(locations))
  if arr.size == 0:
    return np.zeros((0, 4), np.int64)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise ValueError(f"face locations: expected a list of (top, right, bottom, left) tuples, got shape {arr.shape}")
  if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
    raise ValueError("face locations: expected integer (top, right, bottom, left) tuples")
  arr = arr.astype(np.int64)
  return np.stack([arr[:, 3], arr[:, 0], arr[:, 1], arr[:, 2]], axis=1)


def _hog_available() -> bool:
  try:
    return "method" in inspect.signature(faces.detect).parameters
  except (TypeError, ValueError):  # pragma: no cover - detect is a plain function
    return False


def _raw_boxes(img: np.ndarray, upsample: int, model: str) -> np.ndarray:
  """Detections as int64 [N, 4] (left, top, right, bottom), untrimmed, best first."""
  if model == "cnn":
    return faces.detect(img, upsample=upsample)
  if model != "hog":
    raise ValueError(f"model: expected 'hog' or 'cnn', got {model!r}")
  if not _hog_available():
    raise NotImplementedError(
        "face_locations(model='hog') needs dlib's HOG face detector, jaxface.faces.detect(..., "
        "method='hog') (jaxface/faces/hog.py), which this jaxface does not have yet; pass "
        "model='cnn' (the MMOD CNN detector) or give the face locations explicitly")
  return np.asarray(faces.detect(img, upsample=upsample, method="hog"), np.int64).reshape(-1, 4)


def _check_model(model: Any) -> str:
  if model not in ("small", "large"):
    raise ValueError("Invalid landmarks model type. Supported models are ['small', 'large'].")
  return model


def _raw_landmarks(img: np.ndarray, locations: Any, model: str) -> np.ndarray:
  """int64 [N, P, 2] (x, y): P = 5 ('small') or 68 ('large')."""
  if locations is None:
    boxes = _raw_boxes(img, 1, "hog")  # face_recognition: untrimmed HOG rects, upsample 1
  else:
    boxes = _css_to_boxes(locations)
  if model == "small":
    return faces.landmarks(img, boxes)
  if boxes.shape[0] == 0:
    return np.zeros((0, 68, 2), np.int64)
  return np.asarray(_landmarks.predict(_shape68(), img, boxes), np.int64)


# --------------------------------------------------------------------------- the API


def load_image_file(file: Any, mode: str = "RGB") -> np.ndarray:
  """Loads an image file (.jpg, .png, ...) into a numpy array, as face_recognition does.

  Args:
    file: a path or a binary file object.
    mode: PIL mode to convert to: 'RGB' (uint8 [H, W, 3]) or 'L' (uint8 [H, W]),
      or any other PIL mode; a false value keeps the file's mode. No EXIF
      rotation is applied (as in face_recognition).

  Raises:
    FileNotFoundError: no such file.
    jaxface.images.ImageError: not a readable image, truncated, or larger than
      :func:`jaxface.images.default_max_pixels` (the message names the file).
  """
  name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else (
      getattr(file, "name", None) or "<file object>")
  if isinstance(file, (str, os.PathLike)):
    if not os.path.exists(name):
      raise FileNotFoundError(f"{name}: no such file")
    if os.path.isdir(name):
      raise images.ImageError(f"{name}: is a directory, not an image file")
  limit = images.default_max_pixels()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(file)
  except Image.DecompressionBombError as e:
    raise images.ImageTooLargeError(f"{name}: {e}") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise images.ImageError(f"{name}: not a readable image file: {e}") from e
  w, h = im.size
  if limit is not None and w * h > limit:
    raise images.ImageTooLargeError(
        f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} (possible decompression "
        f"bomb); set ${images.MAX_PIXELS_ENV} to allow more")
  try:
    im.load()
    if mode:
      im = im.convert(mode)
    return np.array(im)
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise images.ImageError(f"{name}: cannot decode image (truncated or corrupt file?): {e}") from e


def face_locations(img: np.ndarray, number_of_times_to_upsample: int = 1,
                   model: str = "hog") -> list[tuple[int, int, int, int]]:
  """Bounding boxes of the faces in ``img``: a list of (top, right, bottom, left), best first.

  Args:
    img: image array (uint8 [H, W, 3] RGB or [H, W] grayscale).
    number_of_times_to_upsample: doublings of the image before detecting (finds smaller faces).
    model: 'hog' (dlib's HOG detector) or 'cnn' (dlib's MMOD CNN detector).

  Returns:
    Python-int tuples trimmed to the image as face_recognition trims them
    (top, left >= 0; right <= W; bottom <= H). No face: ``[]``.
  """
  arr = _image(img, "img")
  return [_trim_css_to_bounds(_rect_to_css(b), arr.shape)
          for b in _raw_boxes(arr, number_of_times_to_upsample, model)]


def batch_face_locations(images: list, number_of_times_to_upsample: int = 1,
                         batch_size: int = 128) -> list[list[tuple[int, int, int, int]]]:
  """:func:`face_locations` with the CNN detector for each image of ``images``.

  ``batch_size`` is accepted for compatibility (the detector takes the images one
  at a time). Returns one list of (top, right, bottom, left) per image.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  return [face_locations(im, number_of_times_to_upsample, "cnn") for im in images]


def face_landmarks(face_image: np.ndarray, face_locations: list | None = None,
                   model: str = "large") -> list[dict[str, list[tuple[int, int]]]]:
  """Facial features of each face: a list of dicts of (x, y) point lists.

  Args:
    face_image: image array.
    face_locations: (top, right, bottom, left) boxes; None detects faces with
      the HOG detector (upsample 1, untrimmed boxes, as face_recognition).
    model: 'large' (68 points: chin, left_eyebrow, right_eyebrow, nose_bridge,
      nose_tip, left_eye, right_eye, top_lip, bottom_lip) or 'small' (5 points:
      nose_tip, left_eye, right_eye).
  """
  model = _check_model(model)
  img = _image(face_image)
  pts = [[(int(x), int(y)) for x, y in face] for face in _raw_landmarks(img, face_locations, model)]
  if model == "small":
    return [{"nose_tip": [p[4]], "left_eye": p[2:4], "right_eye": p[0:2]} for p in pts]
  return [{
      "chin": p[0:17],
      "left_eyebrow": p[17:22],
      "right_eyebrow": p[22:27],
      "nose_bridge": p[27:31],
      "nose_tip": p[31:36],
      "left_eye": p[36:42],
      "right_eye": p[42:48],
      "top_lip": p[48:55] + [p[64], p[63], p[62], p[61], p[60]],
      "bottom_lip": p[54:60] + [p[48], p[60], p[67], p[66], p[65], p[64]],
  } for p in pts]


# One generator per process, as face_recognition's module-level dlib.face_recognition_model_v1.
_JITTER_RAND = [DlibRand()]
_JITTER_LOCK = threading.Lock()


def _reset_jitter_rand() -> None:
  """Restarts the jitter generator (as in a fresh face_recognition process)."""
  with _JITTER_LOCK:
    _JITTER_RAND[0] = DlibRand()


def _jitter_chips(chip: np.ndarray, num_jitters: int, rnd: DlibRand) -> np.ndarray:
  """``num_jitters`` perturbed copies of one chip: dlib's ``jitter_image`` with its draws."""
  size = chip.shape[0]
  lo, hi = 3, size - 1 - 3  # shrink_rect(get_rect(chip), 3)
  side = hi - lo + 1
  centre = (lo + hi + 1) // 2  # dlib's center() of an integer rectangle
  rects, angles, flips = [], [], []
  for _ in range(num_jitters):
    # dpoint(x_draw * w, y_draw * h): GCC evaluates the two arguments right to left.
    dy = rnd.in_range(-0.02, 0.02) * side
    dx = rnd.in_range(-0.02, 0.02) * side
    scale = rnd.in_range(0.97, 0.99999)
    box = int(side / scale)
    cx, cy = centre + int(np.floor(dx + 0.5)), centre + int(np.floor(dy + 0.5))
    left, top = cx - box // 2, cy - box // 2  # centered_rect
    rects.append((left, top, left + box - 1, top + box - 1))
    angles.append(rnd.in_range(-3.0, 3.0) * np.pi / 180)
    flips.append(rnd.double() > 0.5)
  out = _chips.extract_rotated(chip, np.array(rects, np.float64), np.array(angles), size)
  flips = np.array(flips)
  out[flips] = out[flips, :, ::-1]
  return out


def face_encodings(face_image: np.ndarray, known_face_locations: list | None = None,
                   num_jitters: int = 1, model: str = "small") -> list[np.ndarray]:
  """128-D encoding of each face: a list of float64 (128,) arrays.

  Args:
    face_image: image array (uint8 [H, W, 3] RGB).
    known_face_locations: (top, right, bottom, left) boxes; None detects faces
      with the HOG detector (upsample 1).
    num_jitters: >1 averages the encodings of that many randomly perturbed chips,
      with dlib's random draws (see the module docstring).
    model: landmarks used to align the chip: 'small' (5 points) or 'large' (68 points).
  """
  model = _check_model(model)
  if isinstance(num_jitters, bool) or not isinstance(num_jitters, (int, np.integer)):
    raise ValueError(f"num_jitters: expected an int, got {num_jitters!r}")
  img = _image(face_image)
  lm = _raw_landmarks(img, known_face_locations, model)
  if lm.shape[0] == 0:
    return []
  chips = faces.chips(img, lm) if model == "small" else _chips.extract(img, lm)
  if num_jitters <= 1:
    return list(np.asarray(faces.embed(chips), np.float64))
  out = []
  with _JITTER_LOCK:
    for chip in chips:
      emb = faces.embed(_jitter_chips(chip, int(num_jitters), _JITTER_RAND[0]))
      out.append((np.sum(emb, axis=0, dtype=np.float32) / np.float32(len(emb))).astype(np.float64))
  return out


def face_distance(face_encodings: Any, face_to_compare: Any) -> np.ndarray:
  """Euclidean distance of each encoding in ``face_encodings`` to ``face_to_compare`` (float64 [N])."""
  if len(face_encodings) == 0:
    return np.empty(0)
  return np.linalg.norm(np.asarray(face_encodings) - np.asarray(face_to_compare), axis=1)


def compare_faces(known_face_encodings: Any, face_encoding_to_check: Any, tolerance: float = 0.6) -> list:
  """Which known encodings match the candidate: a list of bools (distance <= ``tolerance``)."""
  return list(face_distance(known_face_encodings, face_encoding_to_check) <= tolerance)
