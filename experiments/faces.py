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

Gallery: ``--gallery`` (default ``$JAXFACE_GALLERY``, else
``~/.local/share/jaxface/gallery.sqlite``; ``enroll`` creates it and its
folder). It remembers the encoder (``--encoder=dlib``, default, or
``--encoder=checkpoint:RUN_DIR`` for a triplet-experiment run) and refuses
embeddings of another one.

Threshold (Euclidean distance; same person when distance <= threshold):
``--threshold`` if given, else the identity's own calibrated threshold
(``calibrate --per_identity``), else the gallery's calibrated one, else dlib's
0.6 (the dlib encoder only; a checkpoint encoder needs ``calibrate`` or
``--threshold``).

Faces: ``enroll``, ``verify`` and ``calibrate`` need one face per image and use
the largest; with ``--strict`` several faces are an error. ``identify`` reports
every face of every image. Folders are read non-recursively (image extensions
only) with a progress bar on stderr.

``identify --known=DIR --unknown=DIR``: no gallery file; ``DIR`` of known
people holds one subfolder per person (all images in it) or one image per
person named after them (``obama.jpg`` -> obama); every face in the unknown
images (a folder or one file) is matched against them.

Output: ``--format=table`` (default), ``csv`` or ``json`` on stdout; messages
on stderr. Exit status: 0 on success (an unrecognized face or a failed
verification is a result, not an error); 1 when an input cannot be used
(unreadable image, no face, several faces with ``--strict``, empty gallery,
unknown identity, encoder mismatch); 2 for a wrong command line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from typing import Any, Sequence, TextIO

import numpy as np

COMMANDS = ("enroll", "verify", "identify", "calibrate", "list", "remove", "rename")
FORMATS = ("table", "csv", "json")
NOT_RECOGNIZED = "not recognized"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
DEFAULT_THRESHOLD_DLIB = 0.6


def default_gallery() -> str:
  env = os.environ.get("JAXFACE_GALLERY")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".local", "share", "jaxface", "gallery.sqlite")


@dataclasses.dataclass
class Options:
  """Every setting of the CLI (flag name = field name)."""
  gallery: str = ""              # gallery file ('' = $JAXFACE_GALLERY or ~/.local/share/jaxface/gallery.sqlite)
  format: str = "table"          # table | csv | json
  strict: bool = False           # several faces where one is needed is an error (default: largest face)
  encoder: str = "dlib"          # dlib | checkpoint:RUN_DIR (a triplet-experiment run)
  upsample: int = 0              # detector upsampling steps (1 finds faces down to ~40 px)
  name: str = ""                 # verify: the claimed identity
  known: str = ""                # identify: folder of known people (subfolders or one file per person)
  unknown: str = ""              # identify: image or folder to recognise against --known
  k: int = 3                     # identify: candidates listed per face
  threshold: float = -1.0        # distance threshold override (< 0: calibrated or default)
  pairs: str = ""                # calibrate: LFW-format pairs file
  images: str = ""               # calibrate: image root of --pairs ('' = $JAXFACE_DATA/faces/lfw_subset)
  folder: str = ""               # calibrate: <folder>/<identity>/<images>, all same + sampled different pairs
  target_far: float = 1e-3       # calibrate: highest false-accept rate on the pairs
  best: bool = False             # calibrate: best accuracy instead of --target_far
  per_identity: bool = False     # calibrate: also per-identity thresholds (identities with >= 2 images)
  max_pairs: int = 2000          # calibrate --folder: pairs sampled (half same, half different)
  seed: int = 0                  # calibrate --folder: pair sampling seed
  siamese: str = ""              # calibrate: also train a Siamese head on the pairs, saved here; verify: report its p(same)
  skip_bad: bool = False         # enroll: skip images without a usable face instead of failing
  progress: bool = True          # progress bar on stderr for folders


class CliError(Exception):
  """A user-facing failure: printed as ``error: message``, exit status ``code``."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


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


class Progress:
  """A one-line progress bar on a stream (only when ``enabled``)."""

  def __init__(self, total: int, label: str, stream: TextIO, enabled: bool):
    self.total, self.label, self.stream, self.enabled = total, label, stream, enabled and total > 0
    self.start = time.perf_counter()
    self.done = 0

  def step(self, what: str = "") -> None:
    self.done += 1
    if not self.enabled:
      return
    width = 24
    filled = int(width * self.done / self.total)
    rate = self.done / max(time.perf_counter() - self.start, 1e-9)
    self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                      f"{rate:.1f} img/s {os.path.basename(what)[:30]:<30}")
    if self.done == self.total:
      self.stream.write("\n")
    self.stream.flush()


# --------------------------------------------------------------------------- output


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4f}"
  if v is None:
    return ""
  if isinstance(v, (list, tuple)):
    return " ".join(str(x) for x in v)
  return str(v)


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
    self.out.write(render(rows, self.opts.format, columns))
    self.out.flush()

  @property
  def encoder(self):
    if self._encoder is None:
      from jaxface.recognition import encoders
      try:
        self._encoder = encoders.get_encoder(self.opts.encoder)
      except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e), 2 if isinstance(e, ValueError) else 1) from e
    return self._encoder

  def gallery_path(self) -> str:
    from jaxface import paths
    return paths.expand(self.opts.gallery) if self.opts.gallery else default_gallery()

  def open_gallery(self, *, create: bool = False, with_encoder: bool = True):
    from jaxface.recognition import gallery as gallery_lib
    path = self.gallery_path()
    if not os.path.exists(path):
      if not create:
        raise CliError(f"gallery {path} does not exist: enroll someone first "
                       f"(python -m experiments.faces enroll NAME IMAGE --gallery={path})")
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return gallery_lib.Gallery(path, self.encoder.fingerprint if with_encoder else None)

  def default_threshold(self, gal) -> float:
    if self.opts.threshold >= 0:
      return float(self.opts.threshold)
    stored = gal.threshold() if gal is not None else None
    if stored is not None:
      return stored
    if self.opts.encoder == "dlib":
      return DEFAULT_THRESHOLD_DLIB
    raise CliError(f"no threshold for --encoder={self.opts.encoder}: run "
                   "'python -m experiments.faces calibrate ...' or pass --threshold")

  def encode_one(self, path: str):
    from jaxface.recognition import encoders
    return encoders.encode_one(path, self.encoder, upsample=self.opts.upsample, strict=self.opts.strict)

  def embed_many(self, images: list[str], show: bool, label: str, *, skip_bad: bool
                 ) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """One face per image -> (kept paths, [N, D] embeddings, boxes); errors name the image."""
    kept, embs, boxes = [], [], []
    bar = Progress(len(images), label, self.err, show and self.opts.progress)
    for path in images:
      try:
        box, emb = self.encode_one(path)
      except ValueError as e:
        if not skip_bad:
          raise CliError(str(e)) from e
        self.warn(f"skipped {e}")
      else:
        kept.append(path)
        embs.append(emb)
        boxes.append(box)
      bar.step(path)
    dim = self.encoder.dim
    return kept, (np.stack(embs) if embs else np.zeros((0, dim), np.float32)), boxes

  # ----- enroll

  def cmd_enroll(self, args: list[str]) -> None:
    from jaxface.recognition import encoders
    if len(args) < 2:
      raise CliError("usage: enroll NAME IMAGE... | DIR", 2)
    name, items = args[0], args[1:]
    images, any_dir = expand_inputs(items)
    kept, emb, boxes = self.embed_many(images, any_dir, f"enroll {name}", skip_bad=self.opts.skip_bad)
    if not kept:
      raise CliError(f"enroll {name}: none of the {len(images)} images has a usable face")
    sources = [encoders.source_record(p, b) for p, b in zip(kept, boxes)]
    with self.open_gallery(create=True) as gal:
      identity_id = gal.enroll(name, emb, sources)
      total = next(i["num_embeddings"] for i in gal.identities() if i["id"] == identity_id)
    self.emit([{"name": name, "id": identity_id, "added": len(kept), "embeddings": total,
                "gallery": self.gallery_path()}])

  # ----- verify

  def cmd_verify(self, args: list[str]) -> None:
    from jaxface.recognition import search
    if len(args) < 1 or not self.opts.name:
      raise CliError("usage: verify IMAGE... --name=NAME", 2)
    images, any_dir = expand_inputs(args)
    with self.open_gallery() as gal:
      if gal.num_identities() == 0:
        raise CliError(f"gallery {self.gallery_path()} is empty: enroll someone first")
      if self.opts.name not in set(gal.names().values()):
        raise CliError(f"--name={self.opts.name}: not enrolled in gallery {self.gallery_path()} "
                       f"(enrolled: {', '.join(sorted(gal.names().values())[:10])})")
      claimed, _ = gal.embeddings(self.opts.name)
      own = gal.threshold(self.opts.name) if self.opts.threshold < 0 else None
      thr = own if own is not None else self.default_threshold(gal)
      head = self.load_head() if self.opts.siamese else None
      rows = []
      bar = Progress(len(images), "verify", self.err, any_dir and self.opts.progress)
      for path in images:
        box, emb = self.encode_one(path)
        same, dist, thr_used = search.verify(emb, claimed, thr)
        row = {"image": path, "name": self.opts.name, "same": bool(same), "distance": dist,
               "threshold": thr_used, "box": [int(v) for v in box]}
        if head is not None:
          # The head's view: the best p(same) over the claimed identity's enrolled faces.
          row["p_same"] = float(head.predict(np.repeat(emb[None], claimed.shape[0], 0), claimed).max())
        rows.append(row)
        bar.step(path)
    self.emit(rows)

  def load_head(self):
    from jaxface import paths
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
                     names: dict[int, str], thr: Any) -> list[dict]:
    from jaxface.recognition import encoders, search
    index = search.SearchIndex(emb_g, ids_g)
    k_rows = min(len(ids_g), max(self.opts.k * 4, self.opts.k))  # rows, to find k distinct identities
    rows = []
    bar = Progress(len(images), "identify", self.err, show and self.opts.progress)
    for path in images:
      try:
        found = encoders.encode_faces(path, self.encoder, upsample=self.opts.upsample)
        if len(found) == 0:
          raise encoders.NoFaceError(f"{path}: no face found (try --upsample=1 for small faces)")
      except ValueError as e:
        self.failures += 1
        self.warn(str(e))
        bar.step(path)
        continue
      res = index.identify(found.embeddings, k=k_rows, threshold=thr)
      cand_ids, cand_d = search.distinct_candidates(res["ids"], res["distances"], min(self.opts.k, k_rows))
      for f in range(len(found)):
        best = int(res["best_id"][f])
        cands = [f"{names[int(i)]}:{d:.3f}" for i, d in zip(cand_ids[f], cand_d[f]) if i >= 0]
        rows.append({"image": path, "face": f, "box": [int(v) for v in found.boxes[f]],
                     "identity": names[best] if best >= 0 else NOT_RECOGNIZED,
                     "distance": float(res["best_distance"][f]), "threshold": float(res["threshold"][f]),
                     "candidates": cands})
      bar.step(path)
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
      thr = default if self.opts.threshold >= 0 else gal.row_thresholds(ids, default)
      names = gal.names()
    self.emit(self._identify_rows(images, any_dir, emb, ids, names, thr))

  def _identify_known_unknown(self, args: list[str]) -> None:
    if not (self.opts.known and self.opts.unknown) or args:
      raise CliError("usage: identify --known=DIR --unknown=DIR|IMAGE (no other arguments)", 2)
    people = known_people(self.opts.known)
    unknown, any_dir = expand_inputs([self.opts.unknown])
    kept, emb, _ = self.embed_many([p for _, p in people], True, "known", skip_bad=True)
    if not kept:
      raise CliError(f"--known={self.opts.known}: no usable face in any image")
    person_of = dict((p, n) for n, p in people)
    names_sorted = sorted({person_of[p] for p in kept})
    names = dict(enumerate(names_sorted))
    ids = np.asarray([names_sorted.index(person_of[p]) for p in kept], np.int64)
    thr = self.default_threshold(None)
    self.emit(self._identify_rows(unknown, any_dir, emb, ids, names, thr))

  # ----- calibrate

  def cmd_calibrate(self, args: list[str]) -> None:
    from jaxface import paths
    from jaxface.recognition import calibrate, siamese
    if args:
      raise CliError(f"calibrate takes no arguments, got {args}; use --pairs or --folder", 2)
    if bool(self.opts.pairs) == bool(self.opts.folder):
      raise CliError("calibrate needs exactly one of --pairs=FILE or --folder=DIR", 2)
    if not self.opts.best and not 0 < self.opts.target_far < 1:
      raise CliError(f"--target_far={self.opts.target_far}: expected in (0, 1)", 2)
    if self.opts.pairs:
      images_dir = paths.expand(self.opts.images or "$JAXFACE_DATA/faces/lfw_subset")
      try:
        p1, p2, same = siamese.lfw_pairs(paths.expand(self.opts.pairs), images_dir)
      except (ValueError, OSError) as e:
        raise CliError(f"--pairs={self.opts.pairs}: {e}") from e
    else:
      try:
        p1, p2, same = siamese.folder_pairs(paths.expand(self.opts.folder), max_pairs=self.opts.max_pairs,
                                            seed=self.opts.seed)
      except (ValueError, OSError) as e:
        raise CliError(f"--folder={self.opts.folder}: {e}") from e
    distinct = sorted(set(p1) | set(p2))
    present = [p for p in distinct if os.path.isfile(p)]
    if len(present) < len(distinct):
      self.warn(f"{len(distinct) - len(present)} of {len(distinct)} pair images are missing; "
                "their pairs are left out")
    kept, emb, _ = self.embed_many(present, True, "calibrate", skip_bad=True)
    row_of = {p: k for k, p in enumerate(kept)}
    use = np.asarray([a in row_of and b in row_of for a, b in zip(p1, p2)], np.bool_)
    if not (same[use].any() and (~same[use]).any()):
      raise CliError("calibration needs same and different pairs whose images both have a face")
    a = emb[[row_of[p] for p, u in zip(p1, use) if u]]
    b = emb[[row_of[p] for p, u in zip(p2, use) if u]]
    y = same[use]
    dist = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=1)
    if self.opts.best:
      thr = _as_threshold(calibrate.best_accuracy_threshold(dist, y))
      method = "best accuracy"
    else:
      thr = _as_threshold(calibrate.threshold_for_far(dist, y, self.opts.target_far))
      method = f"FAR <= {self.opts.target_far:g}"
    accepted = dist <= thr
    row = {"threshold": thr, "method": method, "pairs": int(use.sum()),
           "left_out": int((~use).sum()), "accuracy": float(np.mean(accepted == y)),
           "far": float(np.mean(accepted[~y])), "frr": float(np.mean(~accepted[y]))}
    if self.opts.siamese:
      model = siamese.train(a, b, y, siamese.SiameseConfig(seed=self.opts.seed))
      model.meta = {"fingerprint": self.encoder.fingerprint}
      siamese.save(model, paths.expand(self.opts.siamese), overwrite=True)
      row["siamese"] = paths.expand(self.opts.siamese)
      row["siamese_accuracy"] = float(np.mean((model.predict(a, b) >= 0.5) == y))
    path = self.gallery_path()
    with self.open_gallery(create=True) as gal:
      per_id = self._per_identity(gal, calibrate, thr) if self.opts.per_identity else {}
      # One transaction: the new global threshold, the new per-identity ones, and
      # the old per-identity ones (fitted around the old global) cleared.
      gal.set_thresholds(thr, {int(k): float(v) for k, v in per_id.items()})
    row["per_identity"] = len(per_id)
    row["gallery"] = path
    self.emit([row])

  def _per_identity(self, gal, calibrate, global_thr: float) -> dict:
    emb, ids = gal.embeddings()
    counts = np.bincount(ids) if ids.size else np.zeros(0, np.int64)
    if not (counts >= 2).any():
      self.warn("--per_identity: no identity has 2 or more enrolled images; none set")
      return {}
    far = 0.0 if self.opts.best else self.opts.target_far
    return calibrate.per_identity_thresholds(emb, ids, global_threshold=global_thr, target_far=far)

  # ----- list / remove / rename

  def cmd_list(self, args: list[str]) -> None:
    if args:
      raise CliError(f"list takes no arguments, got {args}", 2)
    with self.open_gallery(with_encoder=False) as gal:
      rows = [{"id": i["id"], "name": i["name"], "embeddings": i["num_embeddings"],
               "threshold": i.get("threshold"), "created": i["created"]} for i in gal.identities()]
      thr, fp = gal.threshold(), gal.fingerprint
    self.emit(rows, ["id", "name", "embeddings", "threshold", "created"])
    if self.opts.format == "table":
      model = fp.get("model") if isinstance(fp, dict) else None
      print(f"gallery {self.gallery_path()}: {len(rows)} identities, encoder {model or 'none yet'}, "
            f"threshold {'%.4f' % thr if thr is not None else 'not calibrated'}", file=self.err)

  def cmd_remove(self, args: list[str]) -> None:
    if len(args) != 1:
      raise CliError("usage: remove NAME", 2)
    with self.open_gallery(with_encoder=False) as gal:
      removed = gal.remove(args[0])
    self.emit([{"name": args[0], "removed_embeddings": removed}])

  def cmd_rename(self, args: list[str]) -> None:
    if len(args) != 2:
      raise CliError("usage: rename OLD NEW", 2)
    with self.open_gallery(with_encoder=False) as gal:
      gal.rename(args[0], args[1])
    self.emit([{"old": args[0], "new": args[1]}])

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
      getattr(self, f"cmd_{argv[0]}")(list(argv[1:]))
    except CliError as e:
      print(f"error: {e}", file=self.err, flush=True)
      return e.code
    except (ValueError, OSError) as e:  # ImageError, GalleryError, FaceError, ... name their input
      print(f"error: {e}", file=self.err, flush=True)
      return 1
    return 1 if self.failures else 0


def _as_threshold(value: Any) -> float:
  """calibrate's result (a number, or a (threshold, ...) tuple / {"threshold": ...} dict) -> float."""
  if isinstance(value, dict):
    value = value["threshold"]
  elif isinstance(value, (tuple, list)):
    value = value[0]
  return float(value)


def run(argv: Sequence[str], opts: Options | None = None, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
  """Runs ``[command, args...]`` with ``opts``; returns the exit status."""
  return App(opts or Options(), out, err).run(argv)


# --------------------------------------------------------------------------- absl entry point


def _define_flags() -> None:
  from experiments import flagutil
  flagutil.define_flags(Options)


def main(argv):
  from absl import flags
  from absl import logging
  from experiments import flagutil
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs restores at INFO
  flagutil.tune_cpu_xla()
  opts = flagutil.config_from_flags(Options)
  sys.exit(run(argv[1:], opts))


def _parse_flags(argv):
  """absl's parser, with a bad flag reported as a usage error (exit status 2)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
