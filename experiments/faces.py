r"""Face enrollment, verification and recognition from the command line.

  python -m experiments.faces enroll "Barack Obama" obama.jpg obama2.jpg   # one-shot or many
  python -m experiments.faces enroll biden photos/biden/                    # a folder of one person
  python -m experiments.faces verify query.jpg --name="Barack Obama"        # 1:1
  python -m experiments.faces identify group.jpg more/ --format=csv         # 1:K, every face
  python -m experiments.faces identify --known=people/ --unknown=photos/    # face_recognition style
  python -m experiments.faces calibrate --pairs=pairsDevTest.txt --target_far=1e-3
  python -m experiments.faces calibrate --folder=people/ --best --per_identity --siamese=runs/head
  python -m experiments.faces verify query.jpg --name=obama --siamese=runs/head # + the head's p(same)
  python -m experiments.faces list
  python -m experiments.faces remove biden
  python -m experiments.faces rename biden "Joe Biden"
  python -m experiments.faces cluster photos/ --out=by_person/                # group a collection by person

Gallery: ``--gallery`` (default ``$JAXFACE_GALLERY``, else
``~/.local/share/jaxface/gallery.sqlite``; ``enroll`` creates it and its
folder). It remembers the encoder (``--encoder=dlib``, default, or
``--encoder=checkpoint:RUN_DIR`` for a triplet-experiment run) and refuses
embeddings of another one.

Threshold (Euclidean distance; same person when distance <= threshold):
``--threshold`` if given (a finite distance >= 0; the default -1 means unset), else the
identity's own calibrated threshold (``calibrate --per_identity``), else the gallery's
calibrated one, else dlib's 0.6 (the dlib encoder only; a checkpoint encoder needs
``calibrate`` or ``--threshold``).

Faces: ``enroll``, ``verify`` and ``calibrate`` need one face per image and use
the largest one inside the frame (``enroll`` and ``verify`` warn when they do); with ``--strict``
several faces are an error. ``identify`` reports every face of every image.
Folders are read non-recursively (image extensions only) with progress on
stderr (a bar on a terminal, a line every ~10% in a log).

Enrollment: the same file (or the same content) given twice is enrolled once,
with a warning; a face that matches ANOTHER enrolled identity (distance within
the threshold in force) is refused, nothing written, unless
``--allow_duplicates``. Without ``--skip_bad`` every unusable image is listed
and nothing is written. Names are checked (no empty name, no surrounding
space, no control characters) and stored in Unicode NFC.

``identify --known=DIR --unknown=DIR``: no gallery file; ``DIR`` of known
people holds one subfolder per person (all images in it) or one image per
person named after them (``obama.jpg`` -> obama); every face in the unknown
images (a folder or one file) is matched against them. The known images'
faces are cached by file content, encoder and ``--upsample`` under
``$JAXFACE_CACHE/known_faces`` (default ``~/.cache/jaxface``), so a second run
embeds only new or changed files (``--noknown_cache`` turns it off).

``cluster PHOTOS... --out=DIR``: no gallery; every face of every image is
embedded and the faces are grouped by chinese whispers (dlib's
``chinese_whispers_clustering``: faces closer than ``--cluster_threshold``, default
0.5, are linked; :mod:`jaxface.recognition.cluster`). ``DIR`` gets a folder per
cluster of at least ``--min_cluster_size`` faces (``person_001`` the largest),
``unclustered/`` for the rest, each with symlinks to the images (``--copy``:
copies), and ``clusters.csv`` (path, face, box, cluster, file); the clusters are
listed on stdout. A non-empty ``DIR`` is refused; ``--overwrite`` replaces an
earlier ``cluster`` output there, and only that.

``calibrate --target_far=F`` needs at least 1/F impostor (different-person)
pairs: N of them cannot measure a FAR below 1/N, and such a target is refused.

Output: ``--format=table`` (default), ``csv`` or ``json`` on stdout; messages
on stderr. ``identify`` rows have a ``recognized`` boolean and ``identity``
(null in JSON, empty in CSV when not recognized; the table says "not
recognized"), and ``candidates`` as ``[{"name", "distance"}]`` (in CSV that
JSON in one cell). In ``verify`` and ``identify`` an image that cannot be used
(unreadable, no face, several faces with ``--strict``) is a row with an
``error`` (face and box empty, not recognized / not same), besides the warning
on stderr. ``list --format=json`` is one object: gallery, fingerprint,
threshold, calibration and identities.

Exit status: 0 on success (an unrecognized face or a failed verification is a
result, not an error); 1 when an input cannot be used (unreadable image, no
face, several faces with ``--strict``, an image already enrolled under another
name, too few calibration pairs, empty gallery, unknown identity, encoder
mismatch, a gallery that cannot be written); 2 for a wrong command line (bad
flag value such as ``--threshold=nan``, bad name, missing arguments). Problems
with the command line or the gallery are found before any image is embedded.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
from absl import app, flags, logging

from experiments import flagutil
from jaxface import paths
from jaxface.config_dict import field
from jaxface.progress import Progress
from jaxface.recognition import encoders, gallery as gallery_lib, known_cache

# Modules that import JAX (calibration, score_norm, search, siamese) are imported by the commands
# that use them: list, remove and rename start in a fraction of a second.

COMMANDS = ("enroll", "verify", "identify", "calibrate", "list", "remove", "rename", "cluster")
FORMATS = ("table", "csv", "json")
NOT_RECOGNIZED = "not recognized"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
DEFAULT_THRESHOLD_DLIB = 0.6
DEFAULT_PAIR_IMAGES = "$JAXFACE_DATA/faces/lfw_subset"  # calibrate --pairs without --images
THRESHOLD_UNSET = -1.0  # --threshold's default: use the calibrated (or dlib's) threshold


def default_gallery() -> str:
  env = os.environ.get("JAXFACE_GALLERY")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".local", "share", "jaxface", "gallery.sqlite")


@dataclasses.dataclass
class Options:
  """Every setting of the CLI (flag name = field name)."""
  gallery: str = field("", "gallery file ('' = $JAXFACE_GALLERY or ~/.local/share/jaxface/gallery.sqlite)")
  format: str = field("table", "table | csv | json")
  strict: bool = field(False, "several faces where one is needed is an error (default: largest face)")
  encoder: str = field("dlib", "dlib | checkpoint:RUN_DIR (a triplet-experiment run)")
  upsample: int = field(1, "detector upsampling steps (1: faces down to ~40 px, 3x slower than 0; 0: >= 80 px)")
  name: str = field("", "verify: the claimed identity")
  known: str = field("", "identify: folder of known people (subfolders or one file per person)")
  unknown: str = field("", "identify: image or folder to recognise against --known")
  k: int = field(3, "identify: candidates listed per face")
  threshold: float = field(-1.0, "distance threshold override, >= 0 (-1: unset, the calibrated or default one)")
  pairs: str = field("", "calibrate: LFW-format pairs file")
  images: str = field("", "calibrate: image root of --pairs ('' = $JAXFACE_DATA/faces/lfw_subset)")
  folder: str = field("", "calibrate: <folder>/<identity>/<images>, all same + sampled different pairs")
  target_far: float = field(1e-3, "calibrate: highest false-accept rate on the pairs")
  best: bool = field(False, "calibrate: best accuracy instead of --target_far")
  per_identity: bool = field(False, "calibrate: also per-identity thresholds (identities with >= 2 images)")
  max_pairs: int = field(2000, "calibrate --folder: pairs sampled (half same, half different)")
  seed: int = field(0, "calibrate --folder: pair sampling seed")
  siamese: str = field("", "calibrate: also train a Siamese head on the pairs, saved here; verify: report its p(same)")
  skip_bad: bool = field(False, "enroll: skip images without a usable face instead of failing")
  allow_duplicates: bool = field(False, "enroll: accept faces that match another enrolled identity (still warns)")
  target_fpir: float = field(
      0.0,
      "calibrate: highest share of strangers' searches that return someone, for --gallery_size people "
      "(0: use --target_far)")
  gallery_size: int = field(
      0,
      "calibrate --target_fpir: people the threshold is for (0: as many as the gallery holds now)")
  score: str = field(
      "",
      "calibrate: decide on 'distance' or 'snorm' (S-norm against a background cohort kept in the "
      "gallery; --target_fpir only); '' = snorm with --target_fpir, else distance")
  snorm_top_k: int = field(
      100,
      "calibrate --score=snorm: S-norm statistics over each face's nearest cohort faces (0: the whole "
      "cohort)")
  rounds: int = field(10, "calibrate --target_fpir: simulated one-shot galleries")
  known_cache: bool = field(True, "identify --known: reuse cached embeddings of unchanged known images")
  progress: bool = field(True, "progress bar on stderr for folders")
  out: str = field("", "cluster: output folder (one subfolder per person, clusters.csv)")
  cluster_threshold: float = field(0.5, "cluster: faces closer than this (Euclidean) are linked, as in dlib's "
                                   "chinese_whispers_clustering")
  min_cluster_size: int = field(2, "cluster: smaller groups go to unclustered/")
  copy: bool = field(False, "cluster: copy the images instead of symlinking them")
  overwrite: bool = field(False, "cluster: replace an earlier cluster output in --out (nothing else)")


class CliError(Exception):
  """A user-facing failure: printed as ``error: message``, exit status ``code``."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Decision:
  """How "same person" is decided: ``kind`` "distance" (Euclidean) or "snorm" (the
  symmetric S-norm of squared distances against ``cohort`` [C, D], the gallery's
  background faces); lower is more alike, accepted when <= the threshold."""
  kind: str = "distance"
  cohort: np.ndarray | None = None
  top_k: int = 0  # S-norm statistics over each face's top_k nearest cohort faces (0: all)

  def scores(self, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """[Q, D], [M, D] float32 -> [Q, M] float64 scores."""
    if self.kind == "snorm":
      from jaxface import score_norm
      return np.asarray(score_norm.snorm_matrix(queries, gallery, self.cohort, top_k=self.top_k), np.float64)
    return euclidean(queries, gallery)


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[Q, D], [M, D] -> [Q, M] float64 Euclidean distances (differences, not the norm expansion)."""
  d = np.asarray(a, np.float64)[:, None, :] - np.asarray(b, np.float64)[None, :, :]
  return np.sqrt(np.einsum("qmd,qmd->qm", d, d))


# --------------------------------------------------------------------------- inputs


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def expand_inputs(items: Sequence[str]) -> tuple[list[str], bool]:
  """Files and folders -> (image paths, whether a folder was given). Folders: sorted, non-recursive."""
  out, any_dir = [], False
  for item in items:
    if os.path.isdir(item):
      any_dir = True
      files = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if _is_image(f) and os.path.isfile(os.path.join(item, f)))
      if not files:
        raise CliError(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
      out.extend(files)
    elif os.path.exists(item):
      out.append(item)
    else:
      raise CliError(f"{item}: no such file or folder")
  return out, any_dir


def known_people(root: str) -> list[tuple[str, str]]:
  """``--known`` folder -> [(person, image path)]: subfolder name or file stem is the person."""
  if not os.path.isdir(root):
    raise CliError(f"--known={root}: not a folder")
  out = []
  for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if entry.startswith("."):
      continue
    if os.path.isdir(path):
      out.extend((entry, os.path.join(path, f)) for f in sorted(os.listdir(path))
                 if _is_image(f) and os.path.isfile(os.path.join(path, f)))
    elif _is_image(entry):
      out.append((os.path.splitext(entry)[0], path))
  if not out:
    raise CliError(f"--known={root}: no images (one subfolder or one image file per person)")
  return out


# --------------------------------------------------------------------------- output


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4f}"
  if v is None:
    return ""
  if isinstance(v, (list, tuple)):
    return " ".join(str(x) for x in v)
  return str(v)


def _candidates_text(cands: list[dict]) -> str:
  # S-norm galleries rank by score: show what decided.
  return " ".join(f"{c['name']}:{c.get('score', c['distance']):.3f}" for c in cands)


def shape_rows(rows: list[dict], fmt: str) -> list[dict]:
  """Structured result rows -> what ``fmt`` shows (JSON: unchanged).

  CSV: ``candidates`` as compact JSON text in one cell. Table: an unrecognized
  face's identity reads "not recognized", candidates read ``name:distance``.
  """
  if fmt == "json":
    return rows
  out = []
  for r in rows:
    r = dict(r)
    if fmt == "table" and r.get("recognized") is False and not r.get("error"):
      r["identity"] = NOT_RECOGNIZED
    if isinstance(r.get("candidates"), list):
      r["candidates"] = (json.dumps(r["candidates"], separators=(",", ":")) if fmt == "csv"
                         else _candidates_text(r["candidates"]))
    out.append(r)
  return out


def render(rows: list[dict], fmt: str, columns: Sequence[str] | None = None) -> str:
  """Rows (dicts of one key set) as an aligned table, CSV or a JSON list."""
  if fmt == "json":
    return json.dumps(rows, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n"
  cols = list(columns or (rows[0].keys() if rows else []))
  if fmt == "csv":
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
      w.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()
  if not rows:
    return "(nothing)\n"
  cells = [[_cell(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the commands


class App:
  """Runs one command; ``out``/``err`` are the output and message streams."""

  def __init__(self, opts: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
    self.opts = opts
    self.out, self.err = out, err
    self._encoder = None
    self.failures = 0  # inputs that could not be used (identify goes on; the exit status says so)

  # ----- helpers

  def warn(self, msg: str) -> None:
    print(f"warning: {msg}", file=self.err, flush=True)

  def emit(self, rows: list[dict], columns: Sequence[str] | None = None) -> None:
    fmt = self.opts.format
    if fmt == "table" and rows and "error" in rows[0] and not any(r.get("error") for r in rows):
      columns = [c for c in (columns or rows[0].keys()) if c != "error"]  # an empty column says nothing
    self.out.write(render(shape_rows(rows, fmt), fmt, columns))
    self.out.flush()

  @property
  def encoder(self):
    if self._encoder is None:
      try:
        self._encoder = encoders.get_encoder(self.opts.encoder)
      except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e), 2 if isinstance(e, ValueError) else 1) from e
    return self._encoder

  def gallery_path(self) -> str:
    return paths.expand(self.opts.gallery) if self.opts.gallery else default_gallery()

  def open_gallery(self, *, write: bool = False, create: bool = False, with_encoder: bool = True):
    """The gallery, read-only unless ``write``; ``create`` (with ``write``) makes it and its folder."""
    path = self.gallery_path()
    if not os.path.exists(path):
      if not create:
        raise CliError(f"gallery {path} does not exist: enroll someone first "
                       f"(python -m experiments.faces enroll NAME IMAGE --gallery={path})")
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if write:
      self.check_writable()
    fp = self.encoder.fingerprint if with_encoder else None
    return gallery_lib.Gallery(path, fp, readonly=not write, create=create)

  def check_writable(self) -> None:
    """CliError (exit 1) naming the gallery file and the reason when it cannot be written."""
    path = self.gallery_path()
    probe = path
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # folders enroll would create: the nearest existing one decides
      parent = os.path.dirname(folder)
      if parent == folder:
        break
      folder, probe = parent, os.path.join(parent, ".jaxface-gallery-probe")
    problem = gallery_lib.writable_problem(probe)
    if problem is not None:
      raise CliError(f"gallery {path} cannot be changed: {problem}")

  def check_gallery_for_writing(self) -> None:
    """Before any image is embedded: the gallery can be written and (when it exists) holds
    this encoder's embeddings. Nothing is created."""
    self.check_writable()
    path = self.gallery_path()
    if os.path.exists(path) and os.path.getsize(path) > 0:
      with self.open_gallery():  # read-only; an encoder mismatch raises here
        pass

  @property
  def threshold_override(self) -> float | None:
    """``--threshold`` when given (checked in :meth:`run`), else None."""
    return None if self.opts.threshold == THRESHOLD_UNSET else float(self.opts.threshold)

  def check_name(self, name: str, what: str) -> str:
    """A name from the command line in the gallery's form (NFC); a bad one is a usage error."""
    try:
      return gallery_lib.normalize_name(name, what)
    except gallery_lib.GalleryError as e:
      raise CliError(str(e), 2) from e

  def default_threshold(self, gal) -> float:
    if self.threshold_override is not None:
      return self.threshold_override
    stored = gal.threshold() if gal is not None else None
    if stored is not None:
      return stored
    if self.opts.encoder == "dlib":
      return DEFAULT_THRESHOLD_DLIB
    raise CliError(f"no threshold for --encoder={self.opts.encoder}: run "
                   "'python -m experiments.faces calibrate ...' or pass --threshold")

  def decision(self, gal) -> Decision:
    """The gallery's scoring (``--threshold`` always means a Euclidean distance)."""
    if gal is None or self.threshold_override is not None:
      return Decision()
    kind = gal.score_kind()
    if kind == "distance":
      return Decision()
    if kind != "snorm":
      raise CliError(f"gallery {self.gallery_path()}: thresholds for {kind!r} scores, which this "
                     "version does not know; pass --threshold (a distance) or calibrate again")
    cohort = gal.cohort()
    if cohort.shape[0] < 2:
      raise CliError(f"gallery {self.gallery_path()}: S-norm thresholds but {cohort.shape[0]} cohort "
                     "faces; calibrate again (calibrate --target_fpir=... --score=snorm)")
    top_k = int((gal.calibration() or {}).get("top_k", 0))
    if not (top_k == 0 or 2 <= top_k <= cohort.shape[0]):
      raise CliError(f"gallery {self.gallery_path()}: S-norm over the {top_k} nearest of "
                     f"{cohort.shape[0]} cohort faces is impossible; calibrate again")
    return Decision("snorm", cohort, top_k)

  def warn_if_outgrown(self, gal) -> None:
    """A threshold calibrated for K people lets more strangers through a larger gallery."""
    info = gal.calibration() or {}
    k_cal, now = info.get("gallery_size"), gal.num_identities()
    if info.get("method") == "fpir" and self.threshold_override is None and isinstance(k_cal, int) \
        and now > k_cal:
      self.warn(f"the threshold was calibrated for a gallery of {k_cal} people (FPIR <= "
                f"{info.get('target')}); it now holds {now}, so strangers are matched more often: "
                f"run calibrate --target_fpir={info.get('target')} again")

  def faces_of(self, path: str, cache=None):
    """Every face of the image ``path`` (:class:`encoders.Faces`), through ``cache`` when given."""
    if cache is None:
      return encoders.encode_faces(path, self.encoder, upsample=self.opts.upsample)
    sha = encoders.content_sha256(path)
    hit = cache.get(sha)
    if hit is not None:
      return encoders.Faces(path, *hit)
    found = encoders.encode_faces(path, self.encoder, upsample=self.opts.upsample)
    cache.put(sha, found.boxes, found.embeddings, found.image_hw)
    return found

  def pick(self, found, *, warn_several: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The one face an operation needs (largest, or an error with ``--strict``)."""
    try:
      box, emb = encoders.pick_one(found, strict=self.opts.strict)
    except encoders.NoFaceError as e:  # the library names its parameters; say the flags
      raise encoders.NoFaceError(f"{found.source}: no face found (try --upsample=1 for small "
                                 "faces)") from e
    except encoders.SeveralFacesError as e:
      raise encoders.SeveralFacesError(
          f"{found.source}: {len(found)} faces found where one is needed (--strict); crop the "
          "image or drop --strict to use the largest face") from e
    if warn_several and len(found) > 1:
      self.warn(f"{found.source}: {len(found)} faces found; using the largest "
                f"(box {[int(v) for v in box]}; --strict makes this an error)")
    return box, emb

  def embed_many(self, images: list[str], show: bool, label: str, *, skip_bad: bool, cache=None,
                 warn_several: bool = False) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """One face per image -> (kept paths, [N, D] embeddings, boxes).

    Unusable images are skipped with a warning (``skip_bad``) or, all of them
    listed, raise one CliError after every image was tried.
    """
    kept, embs, boxes, bad = [], [], [], []
    bar = Progress(len(images), label, self.err, show and self.opts.progress)
    try:
      for path in images:
        try:
          box, emb = self.pick(self.faces_of(path, cache), warn_several=warn_several)
        except (ValueError, OSError) as e:
          if skip_bad:
            self.warn(f"skipped {_naming(e, path)}")
          else:
            bad.append(_naming(e, path))
        else:
          kept.append(path)
          embs.append(emb)
          boxes.append(box)
        bar.step(path)
    finally:
      bar.close()
      if cache is not None:
        try:
          cache.save()
        except OSError as e:
          self.warn(f"known-faces cache {cache.path} not written ({e})")
    if bad:
      if len(bad) == 1:
        raise CliError(bad[0])
      raise CliError(f"{label}: {len(bad)} of {len(images)} images cannot be used (--skip_bad leaves "
                     "them out):\n  " + "\n  ".join(bad))
    dim = self.encoder.dim
    return kept, (np.stack(embs) if embs else np.zeros((0, dim), np.float32)), boxes

  def unique_images(self, images: list[str]) -> list[str]:
    """``images`` without repeats (same real path or same content), each repeat warned about."""
    by_path, by_sha, out = {}, {}, []
    for path in images:
      real = os.path.realpath(path)
      if real in by_path:
        self.warn(f"{path} and {by_path[real]} are the same file; enrolled once")
        continue
      by_path[real] = path
      try:
        sha = encoders.content_sha256(path)
      except OSError:
        out.append(path)  # reported when it is read
        continue
      if sha in by_sha:
        self.warn(f"{path} has the same content as {by_sha[sha]}; enrolled once")
        continue
      by_sha[sha] = path
      out.append(path)
    return out

  def duplicates(self, gal, name: str, emb: np.ndarray, paths_: list[str]) -> list[str]:
    """Warnings for new faces that match an identity other than ``name`` in ``gal``."""
    g_emb, g_ids = gal.embeddings()
    names = gal.names()
    other = np.asarray([names[int(i)] != name for i in g_ids], np.bool_)
    if not other.any():
      return []
    try:
      default = self.default_threshold(gal)
      decision = self.decision(gal)
    except CliError as e:
      self.warn(f"enroll {name}: faces not checked against the other identities ({e})")
      return []
    thr = (np.full(g_ids.shape[0], default) if self.threshold_override is not None
           else np.asarray(gal.row_thresholds(g_ids, default), np.float64))
    d = decision.scores(emb, g_emb)
    d = np.where(other[None] & (d <= thr[None]), d, np.inf)
    what = "S-norm score" if decision.kind == "snorm" else "distance"
    found = []
    for k in np.flatnonzero(np.isfinite(d).any(axis=1)):
      j = int(np.argmin(d[k]))
      found.append(f"{paths_[k]}: the face matches {names[int(g_ids[j])]!r}, already enrolled "
                   f"({what} {d[k, j]:.4f} <= threshold {thr[j]:.4f}), not {name!r}")
    return found

  # ----- enroll

  def cmd_enroll(self, args: list[str]) -> None:
    if len(args) < 2:
      raise CliError("usage: enroll NAME IMAGE... | DIR", 2)
    name, items = self.check_name(args[0], "NAME"), args[1:]
    images, any_dir = expand_inputs(items)
    images = self.unique_images(images)
    self.check_gallery_for_writing()
    kept, emb, boxes = self.embed_many(images, any_dir, f"enroll {name}", skip_bad=self.opts.skip_bad,
                                       warn_several=True)
    if not kept:
      raise CliError(f"enroll {name}: none of the {len(images)} images has a usable face")
    sources = [encoders.source_record(p, b) for p, b in zip(kept, boxes)]
    with self.open_gallery(write=True, create=True) as gal:
      dups = self.duplicates(gal, name, emb, kept)
      for message in dups:
        self.warn(message)
      if dups and not self.opts.allow_duplicates:
        raise CliError(f"enroll {name}: {len(dups)} of {len(kept)} faces are already enrolled under "
                       "another name; nothing was enrolled (--allow_duplicates enrolls them anyway)")
      identity_id = gal.enroll(name, emb, sources)
      total = next(i["num_embeddings"] for i in gal.identities() if i["id"] == identity_id)
    self.emit([{"name": name, "id": identity_id, "added": len(kept), "embeddings": total,
                "gallery": self.gallery_path()}])

  # ----- verify

  def cmd_verify(self, args: list[str]) -> None:
    from jaxface.recognition import search
    if len(args) < 1 or not self.opts.name:
      raise CliError("usage: verify IMAGE... --name=NAME", 2)
    name = self.check_name(self.opts.name, "--name")
    images, any_dir = expand_inputs(args)
    with self.open_gallery() as gal:
      if gal.num_identities() == 0:
        raise CliError(f"gallery {self.gallery_path()} is empty: enroll someone first")
      if name not in set(gal.names().values()):
        raise CliError(f"--name={name}: not enrolled in gallery {self.gallery_path()} "
                       f"(enrolled: {', '.join(sorted(gal.names().values())[:10])})")
      claimed, _ = gal.embeddings(name)
      decision = self.decision(gal)
      own = gal.threshold(name) if self.threshold_override is None else None
      thr = own if own is not None else self.default_threshold(gal)
      self.warn_if_outgrown(gal)
    head = self.load_head() if self.opts.siamese else None
    rows = []
    bar = Progress(len(images), "verify", self.err, any_dir and self.opts.progress)
    try:
      for path in images:
        row = {"image": path, "name": name, "same": False, "distance": None, "threshold": thr,
               "box": None, "faces": None}
        if decision.kind == "snorm":
          row["score"] = None
        if head is not None:
          row["p_same"] = None
        row["error"] = None
        try:
          found = self.faces_of(path)
          row["faces"] = len(found)
          box, emb = self.pick(found, warn_several=True)
        except (ValueError, OSError) as e:
          self.failures += 1
          self.warn(_naming(e, path))
          row["error"] = _short(e, path)
        else:
          if decision.kind == "snorm":
            score = float(decision.scores(emb[None], claimed).min())
            same, dist, thr_used = score <= thr, float(euclidean(emb[None], claimed).min()), float(thr)
            row["score"] = score
          else:
            same, dist, thr_used = search.verify(emb, claimed, thr)
          row.update(same=bool(same), distance=dist, threshold=thr_used, box=[int(v) for v in box])
          if head is not None:
            # The head's view: the best p(same) over the claimed identity's enrolled faces.
            row["p_same"] = float(head.predict(np.repeat(emb[None], claimed.shape[0], 0), claimed).max())
        rows.append(row)
        bar.step(path)
    finally:
      bar.close()
    self.emit(rows)

  def load_head(self):
    from jaxface.recognition import siamese
    folder = paths.expand(self.opts.siamese)
    try:
      head = siamese.load(folder)
    except (ValueError, OSError) as e:
      raise CliError(f"--siamese={self.opts.siamese}: {e}") from e
    if head.meta.get("fingerprint") != self.encoder.fingerprint:
      raise CliError(f"--siamese={self.opts.siamese}: the head was trained on embeddings of "
                     f"{head.meta.get('fingerprint')}, not of this encoder {self.encoder.fingerprint}")
    return head

  # ----- identify

  def _identify_rows(self, images: list[str], show: bool, emb_g: np.ndarray, ids_g: np.ndarray,
                     names: dict[int, str], thr: Any, decision: Decision = Decision()) -> list[dict]:
    from jaxface import score_norm
    from jaxface.recognition import search
    k_rows = min(len(ids_g), max(self.opts.k * 4, self.opts.k))  # rows, to find k distinct identities
    snorm = decision.kind == "snorm"
    if snorm:
      # The gallery rows' cohort statistics, once for every query.
      stats = score_norm.cohort_stats(emb_g, decision.cohort, top_k=decision.top_k)

      def ranked(q):
        return score_norm.snorm_identify(q, emb_g, ids_g, decision.cohort, k=k_rows, threshold=thr,
                                         top_k=decision.top_k, gallery_stats=stats)
    else:
      ranked = functools.partial(search.SearchIndex(emb_g, ids_g).identify, k=k_rows, threshold=thr)
    rows = []
    bar = Progress(len(images), "identify", self.err, show and self.opts.progress)
    try:
      for path in images:
        try:
          found = self.faces_of(path)
          if len(found) == 0:
            raise ValueError(f"{path}: no face found (try --upsample=1 for small faces)")
        except (ValueError, OSError) as e:
          self.failures += 1
          self.warn(_naming(e, path))
          rows.append({"image": path, "face": None, "box": None, "recognized": False, "identity": None,
                       "distance": None, **({"score": None} if snorm else {}), "threshold": None,
                       "candidates": [], "error": _short(e, path)})
          bar.step(path)
          continue
        res = ranked(found.embeddings)
        cand_ids, cand_d = search.distinct_candidates(res["ids"], res["distances"],
                                                      min(self.opts.k, k_rows))
        if snorm:  # also each candidate identity's plain distance (its nearest row)
          dist = euclidean(found.embeddings, emb_g)
        for f in range(len(found)):
          best = int(res["best_id"][f])
          if snorm:
            cands = [{"name": names[int(i)], "distance": float(dist[f][ids_g == i].min()), "score": float(d)}
                     for i, d in zip(cand_ids[f], cand_d[f]) if i >= 0]
            top = {"distance": float(dist[f, res["index"][f, 0]]), "score": float(res["best_score"][f])}
          else:
            cands = [{"name": names[int(i)], "distance": float(d)} for i, d in zip(cand_ids[f], cand_d[f])
                     if i >= 0]
            top = {"distance": float(res["best_distance"][f])}
          rows.append({"image": path, "face": f, "box": [int(v) for v in found.boxes[f]],
                       "recognized": best >= 0, "identity": names[best] if best >= 0 else None,
                       **top, "threshold": float(res["threshold"][f]), "candidates": cands, "error": None})
        bar.step(path)
    finally:
      bar.close()
    return rows

  def cmd_identify(self, args: list[str]) -> None:
    if self.opts.known or self.opts.unknown:
      return self._identify_known_unknown(args)
    if not args:
      raise CliError("usage: identify IMAGE... | DIR   (or identify --known=DIR --unknown=DIR)", 2)
    images, any_dir = expand_inputs(args)
    with self.open_gallery() as gal:
      emb, ids = gal.embeddings()
      if emb.shape[0] == 0:
        raise CliError(f"gallery {self.gallery_path()} is empty: enroll someone first")
      default = self.default_threshold(gal)
      thr = default if self.threshold_override is not None else gal.row_thresholds(ids, default)
      names = gal.names()
      decision = self.decision(gal)
      self.warn_if_outgrown(gal)
    self.emit(self._identify_rows(images, any_dir, emb, ids, names, thr, decision))

  def _identify_known_unknown(self, args: list[str]) -> None:
    if not (self.opts.known and self.opts.unknown) or args:
      raise CliError("usage: identify --known=DIR --unknown=DIR|IMAGE (no other arguments)", 2)
    people = known_people(self.opts.known)
    unknown, any_dir = expand_inputs([self.opts.unknown])
    thr = self.default_threshold(None)  # before any image is embedded
    cache = (known_cache.KnownFaceCache(self.encoder.fingerprint, self.opts.upsample, warn=self.warn)
             if self.opts.known_cache else None)
    kept, emb, _ = self.embed_many([p for _, p in people], True, "known", skip_bad=True, cache=cache)
    if not kept:
      raise CliError(f"--known={self.opts.known}: no usable face in any image")
    person_of = dict((p, n) for n, p in people)
    names_sorted = sorted({person_of[p] for p in kept})
    names = dict(enumerate(names_sorted))
    ids = np.asarray([names_sorted.index(person_of[p]) for p in kept], np.int64)
    self.emit(self._identify_rows(unknown, any_dir, emb, ids, names, thr))

  # ----- calibrate

  def cmd_calibrate(self, args: list[str]) -> None:
    from jaxface.recognition import calibration, siamese  # JAX: only calibrate needs it
    o = self.opts
    if args:
      raise CliError(f"calibrate takes no arguments, got {args}; use --pairs or --folder", 2)
    if bool(o.pairs) == bool(o.folder):
      raise CliError("calibrate needs exactly one of --pairs=FILE or --folder=DIR", 2)
    if o.score not in ("", "distance", "snorm"):
      raise CliError(f"--score={o.score}: expected distance or snorm", 2)
    if o.target_fpir:
      return self._calibrate_fpir()
    if o.score == "snorm":
      raise CliError("--score=snorm is calibrated for a gallery size: use it with --target_fpir", 2)
    if not o.best and not 0 < o.target_far < 1:
      raise CliError(f"--target_far={o.target_far}: expected in (0, 1)", 2)
    images_dir = None
    if o.pairs:
      images_dir = paths.expand(o.images or DEFAULT_PAIR_IMAGES)
      try:
        pairs = calibration.LabelledPairs.from_lfw(paths.expand(o.pairs), images_dir)
      except (ValueError, OSError) as e:
        raise CliError(f"--pairs={o.pairs}: {e}") from e
    else:
      try:
        pairs = calibration.LabelledPairs.from_folder(paths.expand(o.folder), max_pairs=o.max_pairs, seed=o.seed)
      except (ValueError, OSError) as e:
        raise CliError(f"--folder={o.folder}: {e}") from e
    distinct, present = pairs.images(), pairs.present()
    if images_dir is not None and len(present) < len(distinct):
      where = (f"under --images={images_dir}" if o.images
               else f"under {images_dir} (the default, {DEFAULT_PAIR_IMAGES})")
      if not present:
        raise CliError(f"none of the {len(distinct)} pair images of --pairs={o.pairs} exist "
                       f"{where}; set the folder that holds them with --images=DIR")
      self.warn(f"{len(distinct) - len(present)} of {len(distinct)} pair images are missing {where}; "
                "their pairs are left out (set the image folder with --images=DIR)")
    elif len(present) < len(distinct):
      self.warn(f"{len(distinct) - len(present)} of {len(distinct)} pair images are missing; "
                "their pairs are left out")
    self.check_far_support(pairs.impostors_within(present))
    self.check_gallery_for_writing()
    kept, emb, _ = self.embed_many(present, True, "calibrate", skip_bad=True)
    try:
      cal = calibration.calibrate_pairs(pairs, kept, emb, best=o.best, target_far=o.target_far)
    except calibration.UnsupportedFarError as e:
      raise CliError(_far_message(e)) from e
    except calibration.CalibrationError as e:
      raise CliError(str(e)) from e
    row = {"threshold": cal.threshold, "method": cal.method, "pairs": int(cal.used.sum()),
           "left_out": int((~cal.used).sum()), "accuracy": cal.accuracy, "far": cal.far, "frr": cal.frr}
    if o.siamese:
      head, head_accuracy = calibration.train_head(cal, seed=o.seed, fingerprint=self.encoder.fingerprint)
      siamese.save(head, paths.expand(o.siamese), overwrite=True)
      row["siamese"] = paths.expand(o.siamese)
      row["siamese_accuracy"] = head_accuracy
    source = f"--pairs={o.pairs} --images={images_dir}" if o.pairs else f"--folder={o.folder}"
    with self.open_gallery(write=True, create=True) as gal:
      per_id = {}
      if o.per_identity:
        per_id = calibration.identity_thresholds(*gal.embeddings(), cal.threshold,
                                                 target_far=0.0 if o.best else o.target_far)
        if per_id is None:
          self.warn("--per_identity: no identity has 2 or more enrolled images; none set")
          per_id = {}
      # One transaction: the new global threshold, the new per-identity ones, and
      # the old per-identity ones (fitted around the old global) cleared.
      gal.set_thresholds(cal.threshold, {int(k): float(v) for k, v in per_id.items()}, info=cal.record(source))
    row["per_identity"] = len(per_id)
    row["gallery"] = self.gallery_path()
    self.emit([row])

  def _labelled_images(self) -> tuple[list[str], list[str]]:
    """Calibration images and their identity names: --folder's subfolders, or the
    person folders of --pairs' images (only those on disk)."""
    from jaxface.recognition import calibration, siamese
    if self.opts.folder:
      try:
        people = siamese.list_identities(paths.expand(self.opts.folder))
      except (ValueError, OSError) as e:
        raise CliError(f"--folder={self.opts.folder}: {e}") from e
      return [p for files in people.values() for p in files], [n for n, files in people.items() for _ in files]
    images_dir = paths.expand(self.opts.images or DEFAULT_PAIR_IMAGES)
    try:
      pairs = calibration.LabelledPairs.from_lfw(paths.expand(self.opts.pairs), images_dir)
    except (ValueError, OSError) as e:
      raise CliError(f"--pairs={self.opts.pairs}: {e}") from e
    distinct, present = pairs.images(), pairs.present()
    if not present:
      raise CliError(f"none of the {len(distinct)} pair images of --pairs={self.opts.pairs} exist under "
                     f"{images_dir}; set the folder that holds them with --images=DIR")
    if len(present) < len(distinct):
      self.warn(f"{len(distinct) - len(present)} of {len(distinct)} pair images are missing under "
                f"{images_dir}; they are left out (set the image folder with --images=DIR)")
    return present, [calibration.identity_of(p) for p in present]

  def _calibrate_fpir(self) -> None:
    """calibrate --target_fpir: the threshold for a one-shot gallery of K people (see module doc)."""
    from jaxface.recognition import calibration
    o = self.opts
    if not 0 < o.target_fpir < 1:
      raise CliError(f"--target_fpir={o.target_fpir}: expected in (0, 1)", 2)
    if o.best or o.per_identity or o.siamese:
      raise CliError("--target_fpir calibrates one gallery threshold: drop --best, --per_identity and "
                     "--siamese", 2)
    if o.gallery_size < 0 or o.rounds < 1 or o.snorm_top_k < 0 or o.snorm_top_k == 1:
      raise CliError("--gallery_size must be >= 0, --rounds >= 1 and --snorm_top_k 0 or >= 2", 2)
    score = o.score or "snorm"  # measured better than raw distances (README, BUILD.md)
    images, names = self._labelled_images()
    self.check_gallery_for_writing()
    size, enrolled = o.gallery_size, set()
    if os.path.exists(self.gallery_path()) and os.path.getsize(self.gallery_path()) > 0:
      with self.open_gallery() as gal:
        enrolled = set(gal.names().values())
        size = size or gal.num_identities()
    if size == 0:
      raise CliError("--target_fpir: the gallery is empty; say how many people it will hold with "
                     "--gallery_size=K (the threshold depends on it)", 2)
    kept, emb, _ = self.embed_many(images, True, "calibrate", skip_bad=True)
    name_of = dict(zip(images, names))
    try:
      cal = calibration.calibrate_fpir(emb, [name_of[p] for p in kept], gallery_size=size,
                                       target_fpir=o.target_fpir, score=score, enrolled=enrolled,
                                       snorm_top_k=o.snorm_top_k, rounds=o.rounds, seed=o.seed)
    except calibration.CohortError as e:
      raise CliError(f"--score=snorm: {e}") from e
    except ValueError as e:
      raise CliError(f"--target_fpir={o.target_fpir:g} --gallery_size={size}: {e}") from e
    source = f"--folder={o.folder}" if o.folder else f"--pairs={o.pairs} --images={o.images or DEFAULT_PAIR_IMAGES}"
    with self.open_gallery(write=True, create=True) as gal:
      stored = calibration.store_fpir(gal, cal, emb, kept, source=source)
    self.emit([{"threshold": cal.threshold, "method": f"FPIR <= {o.target_fpir:g} for {size} people",
                "score": score, "dir": stored["dir"], "fpir": stored["fpir"],
                "nonmated_searches": stored["nonmated_searches"], "mated_searches": stored["mated_searches"],
                "rounds": o.rounds, "cohort": stored["cohort"], "gallery": self.gallery_path()}])

  def check_far_support(self, num_negatives: int) -> None:
    """Refuses a --target_far that ``num_negatives`` impostor pairs cannot measure (exit 1)."""
    from jaxface.recognition import calibration
    if self.opts.best:
      return  # no target
    try:
      calibration.check_far_support(num_negatives, self.opts.target_far)
    except calibration.UnsupportedFarError as e:
      raise CliError(_far_message(e)) from e

  # ----- list / remove / rename

  def cmd_list(self, args: list[str]) -> None:
    if args:
      raise CliError(f"list takes no arguments, got {args}", 2)
    with self.open_gallery(with_encoder=False) as gal:
      rows = [{"id": i["id"], "name": i["name"], "embeddings": i["num_embeddings"],
               "threshold": i.get("threshold"), "created": i["created"]} for i in gal.identities()]
      thr, fp = gal.threshold(), gal.fingerprint
      calibration = gal.calibration()
    if self.opts.format == "json":
      self.out.write(json.dumps({"gallery": self.gallery_path(), "fingerprint": fp, "threshold": thr,
                                 "calibration": calibration, "identities": rows}, indent=1) + "\n")
      self.out.flush()
      return
    self.emit(rows, ["id", "name", "embeddings", "threshold", "created"])
    if self.opts.format == "table":
      model = fp.get("model") if isinstance(fp, dict) else None
      print(f"gallery {self.gallery_path()}: {len(rows)} identities, encoder {model or 'none yet'}, "
            f"threshold {f'{thr:.4f}' if thr is not None else 'not calibrated'}", file=self.err)

  def cmd_remove(self, args: list[str]) -> None:
    if len(args) != 1:
      raise CliError("usage: remove NAME", 2)
    name = self.check_name(args[0], "NAME")
    with self.open_gallery(write=True, with_encoder=False) as gal:
      removed = gal.remove(name)
    self.emit([{"name": name, "removed_embeddings": removed}])

  def cmd_rename(self, args: list[str]) -> None:
    if len(args) != 2:
      raise CliError("usage: rename OLD NEW", 2)
    old, new = self.check_name(args[0], "OLD"), self.check_name(args[1], "NEW")
    with self.open_gallery(write=True, with_encoder=False) as gal:
      gal.rename(old, new)
    self.emit([{"old": old, "new": new}])

  # ----- cluster

  def cmd_cluster(self, args: list[str]) -> None:
    from jaxface.recognition import cluster  # JAX: only cluster needs it
    o = self.opts
    if not args or not o.out:
      raise CliError("usage: cluster IMAGE... | DIR --out=DIR", 2)
    if not (math.isfinite(o.cluster_threshold) and o.cluster_threshold > 0) or o.min_cluster_size < 1:
      raise CliError(f"--cluster_threshold={o.cluster_threshold}, --min_cluster_size={o.min_cluster_size}: "
                     "expected a finite distance > 0 and a size >= 1", 2)
    if o.threshold != THRESHOLD_UNSET:
      raise CliError("cluster: --threshold is the recognition threshold; use --cluster_threshold", 2)
    images, any_dir = expand_inputs(args)
    out = paths.expand(o.out)
    try:
      cluster.check_output_folder(out, overwrite=o.overwrite)
    except cluster.OutputFolderError as e:
      hint = " (--overwrite replaces an earlier cluster output there)" if not o.overwrite else ""
      raise CliError(f"--out={e}{hint}") from e
    sources, boxes, embs, no_face = [], [], [], 0
    with Progress(len(images), "cluster", self.err, any_dir and o.progress) as bar:
      for path in images:
        try:
          found = self.faces_of(path)
        except (ValueError, OSError) as e:
          self.failures += 1
          self.warn(f"skipped {_naming(e, path)}")
        else:
          no_face += len(found) == 0
          sources += [path] * len(found)
          boxes.append(found.boxes)
          embs.append(found.embeddings)
        bar.step(path)
    emb = np.concatenate(embs) if embs else np.zeros((0, self.encoder.dim), np.float32)
    result = cluster.cluster_faces(emb, threshold=o.cluster_threshold, min_cluster_size=o.min_cluster_size)
    rows = cluster.write_cluster_folders(out, sources, np.concatenate(boxes) if boxes else np.zeros((0, 4)),
                                         result, copy=o.copy, overwrite=o.overwrite)
    summary: dict[str, dict] = {}
    for r in rows:
      s = summary.setdefault(r["cluster"], {"cluster": r["cluster"], "faces": 0, "images": set()})
      s["faces"] += 1
      s["images"].add(r["path"])
    self.emit([{**s, "images": len(s["images"]), "folder": os.path.join(out, s["cluster"])}
               for s in sorted(summary.values(), key=lambda s: s["cluster"])], ["cluster", "faces", "images", "folder"])
    print(f"cluster: {len(rows)} faces in {len(images) - self.failures - no_face} of {len(images)} images "
          f"({no_face} without a face, {self.failures} unreadable): {result.num_clusters} clusters of >= "
          f"{o.min_cluster_size} faces, {result.num_unclustered} unclustered; written to {out} "
          f"({cluster.MANIFEST})", file=self.err, flush=True)

  # ----- dispatch

  def run(self, argv: Sequence[str]) -> int:
    """``argv`` = [command, args...]; returns the exit status (messages already printed)."""
    try:
      if self.opts.format not in FORMATS:
        raise CliError(f"--format={self.opts.format}: expected one of {', '.join(FORMATS)}", 2)
      if not argv or argv[0] not in COMMANDS:
        got = f" (got {argv[0]!r})" if argv else ""
        raise CliError(f"expected a command: {', '.join(COMMANDS)}{got}", 2)
      if self.opts.upsample < 0 or self.opts.k < 1:
        raise CliError("--upsample must be >= 0 and --k >= 1", 2)
      thr = self.opts.threshold
      if thr != THRESHOLD_UNSET and not (math.isfinite(thr) and thr >= 0):
        raise CliError(f"--threshold={thr}: expected a finite distance >= 0 (or leave it unset, "
                       f"{THRESHOLD_UNSET:g}, for the calibrated one)", 2)
      getattr(self, f"cmd_{argv[0]}")(list(argv[1:]))
    except CliError as e:
      print(f"error: {e}", file=self.err, flush=True)
      return e.code
    except (ValueError, OSError) as e:  # ImageError, GalleryError, FaceError, ... name their input
      print(f"error: {e}", file=self.err, flush=True)
      return 1
    except sqlite3.Error as e:  # the gallery library names its file; a stray SQLite error gets it here
      print(f"error: gallery {self.gallery_path()}: {e}", file=self.err, flush=True)
      return 1
    return 1 if self.failures else 0


def _naming(e: BaseException, path: str) -> str:
  """``e``'s message, starting with ``path`` unless it names it already."""
  msg = str(e)
  return msg if path in msg else f"{path}: {msg}"


def _far_message(e) -> str:
  """The refusal of an unmeasurable --target_far (a calibration.UnsupportedFarError), in flags."""
  return (f"--target_far={e.target_far:g}: {e.num_negatives} impostor (different-person) pairs "
          f"can measure a FAR down to 1/{e.num_negatives} = {e.smallest:.3g} only; FAR <= "
          f"{e.target_far:g} needs at least {e.needed} impostor pairs (use more pairs, a larger "
          "--target_far, or --best); nothing was stored")


def _short(e: BaseException, path: str) -> str:
  """``e``'s message for a row's ``error`` field (the row names the image)."""
  msg = str(e)
  if msg.startswith(f"{path}: "):
    msg = msg[len(path) + 2:]
  return "no face found" if msg.startswith("no face found") else msg


def run(argv: Sequence[str], opts: Options | None = None, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
  """Runs ``[command, args...]`` with ``opts``; returns the exit status."""
  return App(opts or Options(), out, err).run(argv)


# --------------------------------------------------------------------------- absl entry point


def _define_flags() -> None:
  flagutil.define_flags(Options)


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs restores at INFO
  flagutil.tune_cpu_xla()
  flagutil.use_compilation_cache()  # each command starts afresh: reuse the detector's and ResNet's kernels
  opts = flagutil.config_from_flags(Options)
  sys.exit(run(argv[1:], opts))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
