r"""LFW verification accuracy of the pretrained dlib pipeline on full photos.

  python -m experiments.lfw_eval                      # pairsDevTest over lfw_subset
  python -m experiments.lfw_eval --upsample=1 --workdir=runs/lfw_up1

Each image a pair needs is embedded once, through the whole pipeline on the
full 250x250 photo: ``faces.detect`` -> ``faces.landmarks`` -> ``faces.chips``
-> ``faces.embed``. When several faces are found, the one whose box centre is
nearest the image centre is used (LFW photos are centred on the named person;
ties go to the larger box); ``--face=largest`` takes the largest box instead,
and ``--face=main`` the one-face rule of the library and the faces CLI (the
largest box wholly inside the photo, ``jaxface.recognition.encoders.largest``).
Embeddings are cached in ``--workdir`` (one file
per detector setting and face choice), so a rerun or a resumed run only embeds what is new.

Reported (printed and written to ``<workdir>/lfw_metrics.json``):

* coverage: pairs in the file, pairs whose two image files exist in
  ``--images``, images needed / present / with no face found;
* ``faces_found`` protocol: accuracy over the pairs where both images have a
  face, at dlib's fixed Euclidean threshold 0.6 and with a 10-fold tuned
  threshold (``jaxface.metrics.kfold_verification``; the file's own folds for
  ``pairs.txt``, seeded stratified folds otherwise), plus ROC AUC;
* ``all_pairs`` protocol: every pair of the file, a pair with a missing image
  or an image without a face predicted "different" (as a face-matching
  application would), same metrics.

The pairs file is in LFW's format (:mod:`jaxface.data.lfw` describes and parses it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from experiments import flagutil
from jaxface import faces, metrics, paths
from jaxface.data import lfw
from jaxface.recognition import encoders

PAIRS_DEFAULT = "$JAXFACE_DATA/faces/lfw_protocol/pairsDevTest.txt"
IMAGES_DEFAULT = "$JAXFACE_DATA/faces/lfw_subset"
FIXED_THRESHOLD = 0.6
# Distance given to pairs that cannot be compared in the all_pairs protocol:
# larger than any descriptor distance (norms are < 2, so distances are < 4),
# finite so the threshold search stays well defined.
NO_MATCH_DISTANCE = 100.0


# --------------------------------------------------------------------------
# Embedding images (cached)
# --------------------------------------------------------------------------


FACE_CHOICES = ("centre", "largest", "main")
_FACE_WORDS = {"centre": "nearest the centre", "largest": "the largest box",
               "main": "the largest box inside the photo"}


def pick_face(boxes: np.ndarray, height: int, width: int, how: str = "centre") -> int:
  """Index of the face to use among several boxes.

  ``how="centre"``: the box whose centre is nearest the image centre (ties:
  larger box); ``"largest"``: the largest box (ties: nearer the centre);
  ``"main"``: :func:`jaxface.recognition.encoders.largest`, what one-face
  commands use (the largest box wholly inside the image).
  """
  if how not in FACE_CHOICES:
    raise ValueError(f"--face: expected one of {FACE_CHOICES}, got {how!r}")
  if how == "main":
    return encoders.largest(boxes, (height, width))
  b = np.asarray(boxes, np.float64)
  cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
  d2 = (cx - (width - 1) / 2) ** 2 + (cy - (height - 1) / 2) ** 2
  area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
  return int(np.lexsort((-area, d2) if how == "centre" else (d2, -area))[0])


def embed_image(path: str, upsample: int, face: str = "centre"):
  """(embedding float32 [128] or None, box int [4] or None, faces found) for one photo.

  ``face``: which of several faces to use (:func:`pick_face`).
  """
  img = faces.load_image(path)
  boxes = faces.detect(img, upsample=upsample)
  if boxes.shape[0] == 0:
    return None, None, 0
  k = pick_face(boxes, img.shape[0], img.shape[1], face)
  box = boxes[k:k + 1]
  emb = faces.embed(faces.chips(img, faces.landmarks(img, box)))
  return emb[0], box[0], int(boxes.shape[0])


PIPELINE_MODULES = ("jaxface.images", "jaxface.faces", "jaxface.faces.detector", "jaxface.faces.nms",
                    "jaxface.faces._landmarks", "jaxface.faces._chips", "jaxface.models.dlib_resnet")


def pipeline_fingerprint() -> str:
  """sha256 (16 hex) of the pipeline's source files: cached embeddings from other code are stale."""
  h = hashlib.sha256()
  for mod in PIPELINE_MODULES:
    spec = importlib.util.find_spec(mod)
    origin = spec.origin if spec is not None else None
    h.update(mod.encode() + b"\0")
    if origin and os.path.isfile(origin):
      with open(origin, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


class EmbeddingCache:
  """``<workdir>/lfw_embeddings_up<U>.npz``: relpath -> embedding / box / faces found.

  ``lfw_embeddings_up<U>_largest.npz`` for ``face="largest"`` (the default
  ``"centre"`` keeps the plain name). Entries computed by other pipeline code
  (``fingerprint`` differs) are dropped.
  """

  def __init__(self, workdir: str | None, upsample: int, fingerprint: str = "", face: str = "centre"):
    suffix = "" if face == "centre" else f"_{face}"
    self.path = None if not workdir else os.path.join(workdir, f"lfw_embeddings_up{upsample}{suffix}.npz")
    self.fingerprint = fingerprint
    self.entries: dict[str, tuple[np.ndarray | None, np.ndarray | None, int]] = {}
    self.stale = False
    if self.path and os.path.exists(self.path):
      try:
        with np.load(self.path) as z:
          if "fingerprint" not in z.files or str(z["fingerprint"]) != fingerprint:
            self.stale = True
            return
          for key, emb, box, n in zip(z["keys"].tolist(), z["embeddings"], z["boxes"], z["num_faces"].tolist()):
            self.entries[key] = (emb if n else None, box if n else None, int(n))
      except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{self.path}: damaged embedding cache ({e}); delete it to recompute") from e

  def save(self) -> None:
    if not self.path:
      return
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    keys = sorted(self.entries)
    emb = np.zeros((len(keys), 128), np.float32)
    box = np.zeros((len(keys), 4), np.int64)
    n = np.zeros((len(keys),), np.int64)
    for k, key in enumerate(keys):
      e, b, c = self.entries[key]
      n[k] = c
      if c:
        emb[k], box[k] = e, b
    tmp = self.path + ".tmp.npz"
    np.savez(tmp, keys=np.asarray(keys, dtype=str), embeddings=emb, boxes=box, num_faces=n,
             fingerprint=np.asarray(self.fingerprint))
    os.replace(tmp, self.path)  # atomic: an interrupted run never leaves a half-written cache


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def embed_all(relpaths: list[str], images_dir: str, upsample: int, cache: EmbeddingCache,
              printer: Callable[[str], None] = print,
              embed_fn: Callable[[str, int], Any] = embed_image,
              save_every: int = 50) -> None:
  """Fills `cache` for every relpath (skipping cached ones); prints progress with ETA."""
  todo = [r for r in relpaths if r not in cache.entries]
  if len(todo) < len(relpaths):
    printer(f"{len(relpaths) - len(todo)} of {len(relpaths)} images already embedded ({cache.path})")
  start = last_print = time.perf_counter()
  for k, rel in enumerate(todo, 1):
    cache.entries[rel] = embed_fn(os.path.join(images_dir, rel), upsample)
    now = time.perf_counter()
    if k % save_every == 0:
      cache.save()
    if k == len(todo) or now - last_print >= 5.0 or k == 1:
      rate = k / max(now - start, 1e-9)
      no_face = sum(1 for r in todo[:k] if cache.entries[r][2] == 0)
      printer(f"[{k}/{len(todo)}] {rate:.2f} img/s, elapsed {_fmt_seconds(now - start)}, "
              f"ETA {_fmt_seconds((len(todo) - k) / rate)}, no face so far: {no_face}")
      last_print = now
  if todo:
    cache.save()


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def verification_metrics(dist: np.ndarray, same: np.ndarray, folds: np.ndarray | None,
                         num_folds: int = 10, seed: int = 0) -> dict[str, Any]:
  """Accuracy at 0.6, k-fold tuned accuracy and AUC for Euclidean distances."""
  dist = np.asarray(dist, np.float64)
  same = np.asarray(same, np.bool_)
  out: dict[str, Any] = {
      "pairs": int(same.size), "matched": int(same.sum()), "mismatched": int((~same).sum()),
      "accuracy_at_0.6": float(np.mean((dist <= FIXED_THRESHOLD) == same)) if same.size else float("nan"),
  }
  if not (same.any() and (~same).any()):
    return out
  out["auc"] = metrics.roc_auc(dist, same)
  # Tiny pair sets (tests, a sparse subset) cannot fill 10 folds with both classes.
  k = min(num_folds, int(same.sum()), int((~same).sum()))
  try:
    if folds is not None and np.unique(folds).size >= 2:
      kf = metrics.kfold_verification(dist, same, folds=folds)
      out["folds"] = "file"
    elif k >= 2:
      kf = metrics.kfold_verification(dist, same, num_folds=k, seed=seed)
      out["folds"] = f"stratified, {k} folds, seed {seed}"
    else:
      return out
  except ValueError as e:  # a fold whose complement lacks a class
    out["kfold_error"] = str(e)
    return out
  out.update({"kfold_accuracy": kf["accuracy"], "kfold_accuracy_std": kf["accuracy_std"],
              "kfold_threshold": kf["threshold"]})
  return out


def evaluate(pairs: lfw.Pairs, images_dir: str, cache: EmbeddingCache, upsample: int,
             printer: Callable[[str], None] = print,
             embed_fn: Callable[[str, int], Any] = embed_image, face: str = "centre") -> dict[str, Any]:
  """Embeds what the pairs need, then computes coverage and both protocols' metrics."""
  imgs = pairs.images()
  rel = {im: lfw.image_relpath(*im) for im in imgs}
  exists = {im: os.path.isfile(os.path.join(images_dir, rel[im])) for im in imgs}
  present = [rel[im] for im in imgs if exists[im]]
  printer(f"{len(pairs)} pairs, {len(imgs)} distinct images, {len(present)} present in {images_dir}")
  embed_all(present, images_dir, upsample, cache, printer, embed_fn)

  m = len(pairs)
  dist = np.full((m,), np.nan)
  both_exist = np.zeros((m,), np.bool_)
  both_faces = np.zeros((m,), np.bool_)
  for k in range(m):
    a, b = (pairs.name1[k], int(pairs.index1[k])), (pairs.name2[k], int(pairs.index2[k]))
    both_exist[k] = exists[a] and exists[b]
    if not both_exist[k]:
      continue
    ea, eb = cache.entries[rel[a]][0], cache.entries[rel[b]][0]
    if ea is not None and eb is not None:
      both_faces[k] = True
      dist[k] = float(np.linalg.norm(ea.astype(np.float64) - eb.astype(np.float64)))
  no_face = sorted(r for r in present if cache.entries[r][2] == 0)
  multi = sum(1 for r in present if cache.entries[r][2] > 1)
  folds_found = None if pairs.folds is None else pairs.folds[both_faces]
  all_dist = np.where(both_faces, dist, NO_MATCH_DISTANCE)
  result = {
      "upsample": upsample,
      "coverage": {
          "pairs": m, "pairs_with_both_images": int(both_exist.sum()),
          "pairs_with_both_faces": int(both_faces.sum()),
          "images_needed": len(imgs), "images_present": len(present),
          "images_missing": len(imgs) - len(present), "images_no_face": len(no_face),
          "images_several_faces": multi,
      },
      "face": face,
      "faces_found": verification_metrics(dist[both_faces], pairs.same[both_faces], folds_found),
      "all_pairs": verification_metrics(all_dist, pairs.same, pairs.folds),
      "no_face_images": no_face,
  }
  return result


def report_lines(result: dict[str, Any]) -> list[str]:
  c = result["coverage"]
  lines = [
      f"coverage: {c['pairs_with_both_images']}/{c['pairs']} pairs have both images; "
      f"{c['images_present']}/{c['images_needed']} images present; "
      f"{c['images_no_face']} images with no face found (upsample {result['upsample']}); "
      f"{c['images_several_faces']} with several faces "
      f"({_FACE_WORDS.get(result.get('face'), 'nearest the centre')} used)",
  ]
  for key, title in (("faces_found", "pairs where both images have a face"),
                     ("all_pairs", "all pairs, no face / missing image = 'different'")):
    r = result[key]
    line = f"{title}: {r['pairs']} pairs, accuracy at 0.6 = {r['accuracy_at_0.6']:.4f}"
    if "kfold_accuracy" in r:
      line += (f", k-fold tuned ({r['folds']}) = {r['kfold_accuracy']:.4f} +- "
               f"{r['kfold_accuracy_std']:.4f} (mean threshold {r['kfold_threshold']:.3f})")
    if "auc" in r:
      line += f", AUC = {r['auc']:.4f}"
    lines.append(line)
  if result["no_face_images"]:
    lines.append("no face: " + ", ".join(result["no_face_images"][:20])
                 + (" ..." if len(result["no_face_images"]) > 20 else ""))
  return lines


def run(pairs_path: str, images_dir: str, upsample: int, workdir: str | None,
        printer: Callable[[str], None] = print,
        embed_fn: Callable[[str, int], Any] = embed_image, face: str = "centre") -> dict[str, Any]:
  """Whole evaluation; writes ``<workdir>/lfw_metrics.json`` when `workdir` is set.

  ``face``: which of several detected faces is embedded (:func:`pick_face`);
  each choice has its own cache file.
  """
  pairs_path, images_dir = paths.expand(pairs_path), paths.expand(images_dir)
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"--images: {images_dir} is not a directory")
  if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0:
    raise ValueError(f"--upsample: expected an int >= 0, got {upsample!r}")
  if face not in FACE_CHOICES:
    raise ValueError(f"--face: expected one of {FACE_CHOICES}, got {face!r}")
  if embed_fn is embed_image and face != "centre":
    embed_fn = functools.partial(embed_image, face=face)
  pairs = lfw.read_pairs(pairs_path)
  cache = EmbeddingCache(workdir, upsample, pipeline_fingerprint(), face)
  if cache.stale:
    printer(f"{cache.path}: made by other pipeline code, recomputing all embeddings")
  t0 = time.perf_counter()
  result = evaluate(pairs, images_dir, cache, upsample, printer, embed_fn, face)
  result.update({"pairs_file": pairs_path, "images_dir": images_dir,
                 "seconds": round(time.perf_counter() - t0, 1)})
  for line in report_lines(result):
    printer(line)
  if workdir:
    out = os.path.join(workdir, "lfw_metrics.json")
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
    printer(f"wrote {out}")
  return result


def main(argv):
  FLAGS = flags.FLAGS
  flagutil.start(argv)
  flagutil.tune_cpu_xla()
  try:
    run(FLAGS.pairs, FLAGS.images, FLAGS.upsample, FLAGS.workdir or None,
        printer=lambda s: print(s, flush=True), face=FLAGS.face)
  except (ValueError, FileNotFoundError) as e:
    flagutil.fail(str(e))


def _define_flags() -> None:
  # Defined only when run as a script, so that importing this module (tests) never
  # collides with other entry points' flags (e.g. experiments.triplet's --workdir).
  flags.DEFINE_string("pairs", PAIRS_DEFAULT, "LFW pairs file (header 'N' or 'FOLDS N')")
  flags.DEFINE_string("images", IMAGES_DEFAULT, "LFW image root (<name>/<name>_%04d.jpg)")
  flags.DEFINE_integer("upsample", 0, "detector upsampling steps (0 = image as is)", lower_bound=0)
  flags.DEFINE_enum("face", "centre", list(FACE_CHOICES),
                    "which of several faces to embed: nearest the image centre, the largest box, or "
                    "main (the largest box wholly inside the photo, as the faces CLI)")
  flags.DEFINE_string("workdir", "runs/lfw_eval", "folder for the embedding cache and lfw_metrics.json ('' = none)")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
