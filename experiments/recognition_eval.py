r"""Open-set 1:K recognition on real faces, and the Siamese head vs a plain distance threshold.

  python -m experiments.recognition_eval          # lfw_subset, dlib pipeline, cache in runs/lfw_eval

One-shot gallery of every identity of ``--images`` with >= 2 images, known and
unknown queries decided with thresholds fitted on the other fold's people
(best accuracy, pair FAR, open-set FAR, dlib's 0.6), one-shot galleries of K
people (DIR at FPIR, raw distance and S-norm), and Siamese heads against the
best-accuracy threshold; the protocol: BUILD.md, "Open-set 1:K protocol".

Embeddings: each image once through the dlib pipeline with the face nearest
the image centre (``experiments.lfw_eval.embed_image``), cached in
``--cache_dir`` with lfw_eval's :class:`EmbeddingCache` (same file format
and pipeline fingerprint, so ``python -m experiments.lfw_eval`` and this
script share one cache). Results go to ``<workdir>/recognition_metrics.json``,
heads to ``<workdir>/siamese_<features>_fold<k>/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from experiments import flagutil, lfw_eval
from jaxface import metrics, paths
from jaxface.recognition import calibrate, open_set

# search and siamese import JAX: imported by run(), after the flags are parsed (a bad flag exits at once).

IMAGES_DEFAULT = "$JAXFACE_DATA/faces/lfw_subset"


def open_set_split(identities: dict[str, list[str]], has_face: Callable[[str], bool]) -> dict[str, Any]:
  """The 1:K protocol on ``{identity: [relpath, ...]}`` (natural order).

  Returns:
    dict with ``gallery`` [(identity, relpath)], ``known`` [(identity, relpath)]
    queries of enrolled identities, ``unknown`` [(identity, relpath)] queries of
    identities never enrolled, and ``no_face`` relpaths left out.
  """
  gallery, known, unknown, no_face = [], [], [], []
  for name, files in identities.items():
    with_face = [f for f in files if has_face(f)]
    no_face.extend(f for f in files if not has_face(f))
    if len(files) >= 2:
      if not with_face:
        continue
      gallery.append((name, with_face[0]))
      known.extend((name, f) for f in with_face[1:])
    else:
      unknown.extend((name, f) for f in with_face)
  return {"gallery": gallery, "known": known, "unknown": unknown, "no_face": no_face}


def open_set_metrics(result: dict[str, np.ndarray], known_truth: np.ndarray, num_known: int,
                     threshold: float) -> dict[str, float]:
  """Rates from ``search.identify`` output over [known queries; unknown queries].

  Args:
    result: ``search.identify`` dict for Q = num_known + num_unknown queries.
    known_truth: [num_known] int identity id of each known query.
    num_known: how many of the first queries are known.
  """
  nearest = result["ids"][:, 0]
  best = result["best_id"]
  kn, un = slice(0, num_known), slice(num_known, None)
  rank1 = nearest[kn] == known_truth
  accepted = best[kn] >= 0
  return {
      "threshold": float(threshold),
      "rank1_accuracy": float(np.mean(rank1)) if num_known else float("nan"),
      "correct_accept_rate": float(np.mean(best[kn] == known_truth)) if num_known else float("nan"),
      "frr": float(np.mean(~accepted)) if num_known else float("nan"),
      "misidentification_rate": float(np.mean(accepted & (best[kn] != known_truth))) if num_known else float("nan"),
      "far": float(np.mean(best[un] >= 0)) if best[un].size else float("nan"),
  }


def fold_pairs(rel: list[str], labels: np.ndarray, emb: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
  """Every pair of the given images, and a balanced subsample.

  Args:
    rel: [n] image relpaths; labels: [n] int identity; emb: [n, D] embeddings.

  Returns:
    ``i, j`` [P] all pairs (i < j), ``dist`` [P] Euclidean, ``same`` [P] bool,
    ``balanced`` int indexes into those: every same pair and as many
    different pairs drawn without replacement.
  """
  i, j = np.triu_indices(len(rel), 1)
  e = emb.astype(np.float64)
  sq = (e * e).sum(1)
  d2 = np.maximum(sq[i] + sq[j] - 2 * np.einsum("pd,pd->p", e[i], e[j]), 0.0)
  same = labels[i] == labels[j]
  pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
  take = rng.choice(neg, min(pos.size, neg.size), replace=False)
  return {"i": i, "j": j, "dist": np.sqrt(d2), "same": same, "balanced": np.sort(np.concatenate([pos, take]))}


def one_shot_identification(emb: np.ndarray, labels: np.ndarray, *, sizes: tuple[int, ...] = (25, 100, 400),
                            rounds: tuple[int, ...] = (30, 30, 10), fpirs: tuple[float, ...] = (0.01, 0.001),
                            target_far: float = 1e-3, seed: int = 0, snorm_top_ks: tuple[int, ...] = (0, 100),
                            printer: Callable[[str], None] = print) -> dict[str, Any]:
  """DIR at fixed FPIR on random one-shot galleries of K people: raw distance vs S-norm.

  Background cohort (S-norm statistics): a fixed random half (``seed``) of the
  identities with exactly one image; they are never enrolled nor searched.
  Per K, ``jaxface.recognition.open_set.simulate_one_shot`` draws the
  galleries (the same ones for both scores: same seed). A FPIR is measurable
  when every round has >= 1/FPIR non-mated searches; otherwise it is
  reported as not measurable with the smallest per-round supported FPIR.
  For the raw distance, the fixed dlib 0.6 and the pair-FAR threshold
  (``calibrate.threshold_for_far`` at ``target_far`` over every image pair
  outside the cohort, in-sample) are applied too, with their measured FPIR.
  ``snorm_top_ks``: one S-norm score per value: ``"snorm"`` (0: statistics over
  the whole cohort) or ``"snorm_top<k>"`` (adaptive S-norm, each face's k
  nearest cohort rows).

  Args:
    emb: [N, D] embeddings of the images with a face; labels: [N] int identity.
  """
  if len(sizes) != len(rounds):
    raise ValueError(f"one_shot sizes {sizes} and rounds {rounds} differ in length")
  names, counts = np.unique(labels, return_counts=True)
  singles = names[counts == 1]
  rng = np.random.default_rng(seed)
  cohort_ids = rng.choice(singles, singles.size // 2, replace=False) if singles.size >= 4 else singles[:0]
  cohort = np.isin(labels, cohort_ids)
  if cohort.sum() < 2:
    raise ValueError(f"one-shot S-norm needs >= 2 single-image identities for the cohort, got {int(cohort.sum())}")
  keep = np.flatnonzero(~cohort)
  e = emb[keep].astype(np.float64)
  sq = (e * e).sum(1)
  iu = np.triu_indices(keep.size, 1)
  dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * (e @ e.T), 0.0))[iu]
  same = (labels[keep][:, None] == labels[keep][None, :])[iu]
  pair_thr = float(calibrate.threshold_for_far(dist, same, target_far))
  del iu, dist, same
  key_far = f"pair_far<={target_far:g}"
  out: dict[str, Any] = {"cohort_identities": int(cohort_ids.size), "cohort_images": int(cohort.sum()),
                         "snorm_top_ks": [int(t) for t in snorm_top_ks],
                         "pair_far_threshold": pair_thr, "pair_far_target": target_far,
                         "pair_far_pairs": int(keep.size * (keep.size - 1) // 2), "by_gallery_size": {}}
  printer(f"one-shot 1:K: cohort {out['cohort_identities']} single-image identities ({out['cohort_images']} "
          f"images, never enrolled nor searched); pair-FAR {target_far:g} threshold {pair_thr:.4f} "
          f"(all {out['pair_far_pairs']} pairs outside the cohort)")
  for k, r in zip(sizes, rounds):
    entry: dict[str, Any] = {"rounds": int(r)}
    variants = [("distance", "distance", 0)] + [("snorm" if t == 0 else f"snorm_top{t}", "snorm", int(t))
                                                for t in snorm_top_ks]
    for name, score, top_k in variants:
      sim = open_set.simulate_one_shot(emb, labels, int(k), rounds=int(r), seed=seed, score=score, cohort=cohort,
                                       top_k=top_k)
      per_round = min(sim["nonmated_per_round"])
      res: dict[str, Any] = {"rank1": float(np.mean(sim["mated_top1_ids"] == sim["mated_truth"]))}
      entry.update({"eligible_identities": sim["eligible_identities"],
                    "mated_per_round": float(np.mean(sim["mated_per_round"])),
                    "nonmated_per_round": float(np.mean(sim["nonmated_per_round"])),
                    "nonmated_per_round_min": int(per_round),
                    "min_supported_fpir": open_set.min_supported_fpir(int(per_round))})
      for fpir in fpirs:
        if per_round < open_set.nonmated_needed(fpir):
          res[f"fpir={fpir:g}"] = {"measurable": False,
                                   "min_supported_fpir": open_set.min_supported_fpir(int(per_round))}
          continue
        d = open_set.dir_at_fpir(sim["mated_top1_ids"], sim["mated_truth"], sim["mated_top1_scores"],
                                 sim["nonmated_top1_scores"], fpir)
        d["measurable"] = True
        res[f"fpir={fpir:g}"] = d
      if score == "distance":
        for key, thr in (("dlib_0.6", 0.6), (key_far, pair_thr)):
          res[key] = open_set.rates_at(sim["mated_top1_ids"], sim["mated_truth"], sim["mated_top1_scores"],
                                       sim["nonmated_top1_scores"], thr)
      entry[name] = res
    out["by_gallery_size"][str(k)] = entry
  for line in one_shot_lines(out, fpirs, key_far):
    printer(line)
  return out


def one_shot_lines(out: dict[str, Any], fpirs: tuple[float, ...], key_far: str) -> list[str]:
  """Markdown table of :func:`one_shot_identification`'s result."""
  head = ("| K | rounds | mated / non-mated per round | score | rank-1 | "
          + " | ".join(f"DIR @ FPIR {f:g} (thr)" for f in fpirs) + " | dlib 0.6: DIR / FPIR | "
          + f"{key_far}: DIR / FPIR |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for k, e in out["by_gallery_size"].items():
    for score in [key for key in e if isinstance(e[key], dict)]:
      r = e[score]
      cells = []
      for f in fpirs:
        d = r[f"fpir={f:g}"]
        cells.append(f"{d['dir']:.4f} ({d['threshold']:.3f}, measured {d['fpir_measured']:.4f})" if d["measurable"]
                     else f"n/a (min FPIR {d['min_supported_fpir']:.4f})")
      fixed = [f"{r[key]['dir']:.4f} / {r[key]['fpir_measured']:.4f}" if key in r else "-"
               for key in ("dlib_0.6", key_far)]
      lines.append(f"| {k} | {e['rounds']} | {e['mated_per_round']:.0f} / {e['nonmated_per_round']:.0f} | {score} | "
                   f"{r['rank1']:.4f} | " + " | ".join(cells + fixed) + " |")
  return lines


def run(images_dir: str, cache_dir: str, workdir: str | None, *, upsample: int = 0,
        target_far: float = 1e-3, open_set_far: float = 0.05, features: tuple[str, ...] = ("abs", "abs+chi2"),
        seed: int = 0, printer: Callable[[str], None] = print, embed_fn=None,
        one_shot_sizes: tuple[int, ...] = (25, 100, 400), one_shot_rounds: tuple[int, ...] = (30, 30, 10),
        fpirs: tuple[float, ...] = (0.01, 0.001), snorm_top_ks: tuple[int, ...] = (0, 100)) -> dict[str, Any]:
  from jaxface.recognition import search, siamese
  images_dir = paths.expand(images_dir)
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"--images: {images_dir} is not a directory")
  identities = {name: [os.path.relpath(p, images_dir) for p in files]
                for name, files in siamese.list_identities(images_dir).items()}
  all_rel = [r for files in identities.values() for r in files]
  printer(f"{images_dir}: {len(identities)} identities, {len(all_rel)} images")

  t0 = time.perf_counter()
  cache = lfw_eval.EmbeddingCache(cache_dir, upsample, lfw_eval.pipeline_fingerprint())
  if cache.stale:
    printer(f"{cache.path}: made by other pipeline code, recomputing all embeddings")
  lfw_eval.embed_all(all_rel, images_dir, upsample, cache, printer,
                     **({"embed_fn": embed_fn} if embed_fn is not None else {}))
  embed_seconds = time.perf_counter() - t0
  rel_emb = {r: cache.entries[r][0] for r in all_rel}

  # ---- two identity-disjoint folds: each fold's thresholds and heads come from the other fold
  names_all = sorted(identities)
  rng = np.random.default_rng(seed)
  fold_of = {n: int(k % 2) for k, n in zip(range(len(names_all)), rng.permutation(names_all))}
  label_of = {n: k for k, n in enumerate(names_all)}
  key_best, key_far = "best_accuracy", f"far<={target_far:g}"
  key_open = f"open_set_far<={open_set_far:g}"
  per_fold: list[dict] = []
  pooled = {"d": [], "same": [], "p": {k: [] for k in features}}
  for test_fold in (0, 1):
    cal_rel = [r for n in names_all if fold_of[n] != test_fold for r in identities[n] if rel_emb[r] is not None]
    tst_rel = [r for n in names_all if fold_of[n] == test_fold for r in identities[n] if rel_emb[r] is not None]
    cal_lab = np.asarray([label_of[r.split(os.sep)[0]] for r in cal_rel])
    tst_lab = np.asarray([label_of[r.split(os.sep)[0]] for r in tst_rel])
    cal_emb = np.stack([rel_emb[r] for r in cal_rel]).astype(np.float32)
    tst_emb = np.stack([rel_emb[r] for r in tst_rel]).astype(np.float32)
    cp = fold_pairs(cal_rel, cal_lab, cal_emb, rng)
    tp = fold_pairs(tst_rel, tst_lab, tst_emb, rng)
    b = cp["balanced"]
    thr = {key_best: float(calibrate.best_accuracy_threshold(cp["dist"][b], cp["same"][b])),
           key_far: float(calibrate.threshold_for_far(cp["dist"], cp["same"], target_far)),
           "dlib_0.6": 0.6}
    # Open-set threshold: simulate the 1:K protocol on the calibration fold itself and
    # bound the share of never-enrolled queries accepted as someone (its gallery is
    # about half the size of the full one, so the full gallery's FAR comes out higher).
    cal_split = open_set_split({n: identities[n] for n in names_all if fold_of[n] != test_fold},
                               lambda r: rel_emb[r] is not None)
    cal_index = search.SearchIndex(np.stack([rel_emb[r] for _, r in cal_split["gallery"]]).astype(np.float32),
                                   np.arange(len(cal_split["gallery"]), dtype=np.int64))
    cq = cal_split["known"] + cal_split["unknown"]
    _, cd = cal_index.search(np.stack([rel_emb[r] for _, r in cq]).astype(np.float32), 1)
    is_known = np.arange(len(cq)) < len(cal_split["known"])
    thr[key_open] = float(calibrate.threshold_for_far(cd[:, 0], is_known, open_set_far))
    fold = {"test_fold": test_fold, "calibration_images": len(cal_rel),
            "calibration_pairs_all": int(cp["same"].size), "calibration_same_pairs": int(cp["same"].sum()),
            "calibration_pairs_balanced": int(b.size), "thresholds": thr}
    # Siamese heads on the calibration fold's balanced pairs, scored on the test fold's balanced pairs.
    tb = tp["balanced"]
    pooled["d"].append(tp["dist"][tb])
    pooled["same"].append(tp["same"][tb])
    pooled.setdefault("thr_best", []).append(np.full(tb.size, thr[key_best]))
    for kind in features:
      model = siamese.train(cal_emb[cp["i"][b]], cal_emb[cp["j"][b]], cp["same"][b],
                            siamese.SiameseConfig(features=kind, seed=seed))
      pooled["p"][kind].append(model.predict(tst_emb[tp["i"][tb]], tst_emb[tp["j"][tb]]))
      fold[f"siamese_{kind}_history"] = model.history
      if workdir:
        siamese.save(model, os.path.join(workdir, f"siamese_{kind.replace('+', '_')}_fold{test_fold}"),
                     overwrite=True)
    per_fold.append(fold)
    printer(f"fold {test_fold}: thresholds from {len(cal_rel)} images of the other fold "
            f"({fold['calibration_same_pairs']} same pairs of {fold['calibration_pairs_all']}): "
            + ", ".join(f"{k} = {v:.4f}" for k, v in thr.items()))

  # ---- open-set 1:K over the whole subset, each query judged with its fold's thresholds
  split = open_set_split(identities, lambda r: rel_emb[r] is not None)
  g_names = sorted({n for n, _ in split["gallery"]})
  gid = {n: k for k, n in enumerate(g_names)}
  g_emb = np.stack([rel_emb[r] for _, r in split["gallery"]]).astype(np.float32)
  g_ids = np.asarray([gid[n] for n, _ in split["gallery"]], np.int64)
  index = search.SearchIndex(g_emb, g_ids)
  open_set = {
      "gallery_identities": len(g_names), "known_queries": len(split["known"]),
      "unknown_queries": len(split["unknown"]),
      "unknown_identities": len({n for n, _ in split["unknown"]}),
      "images_no_face": len(split["no_face"]), "by_threshold": {},
  }
  for key in (key_best, key_far, key_open, "dlib_0.6"):
    parts = []
    for test_fold in (0, 1):
      known = [(n, r) for n, r in split["known"] if fold_of[n] == test_fold]
      unknown = [(n, r) for n, r in split["unknown"] if fold_of[n] == test_fold]
      q = np.stack([rel_emb[r] for _, r in known + unknown]).astype(np.float32)
      res = index.identify(q, k=5, threshold=per_fold[test_fold]["thresholds"][key])
      truth = np.asarray([gid[n] for n, _ in known], np.int64)
      parts.append((res, truth, len(known)))
    # Pool both folds: stack known rows first, then unknown rows.
    ids = np.concatenate([p[0]["ids"][:p[2]] for p in parts] + [p[0]["ids"][p[2]:] for p in parts])
    best = np.concatenate([p[0]["best_id"][:p[2]] for p in parts] + [p[0]["best_id"][p[2]:] for p in parts])
    truth = np.concatenate([p[1] for p in parts])
    m = open_set_metrics({"ids": ids, "best_id": best}, truth, truth.size,
                         float(np.mean([f["thresholds"][key] for f in per_fold])))
    m["threshold_per_fold"] = [f["thresholds"][key] for f in per_fold]
    open_set["by_threshold"][key] = m
  printer(f"open-set 1:K: gallery {len(g_names)} identities (one image each), {open_set['known_queries']} "
          f"known queries, {open_set['unknown_queries']} unknown queries of {open_set['unknown_identities']} "
          f"never-enrolled identities, {open_set['images_no_face']} images without a face left out")
  for key, m in open_set["by_threshold"].items():
    printer(f"  threshold {key} (folds {', '.join(f'{t:.4f}' for t in m['threshold_per_fold'])}): rank-1 "
            f"{m['rank1_accuracy']:.4f}, correct accept {m['correct_accept_rate']:.4f}, FRR {m['frr']:.4f}, "
            f"misidentified {m['misidentification_rate']:.4f}, FAR {m['far']:.4f}")

  # ---- one-shot galleries of K people: DIR at FPIR, raw distance vs S-norm
  one_shot = None
  if one_shot_sizes:
    face_rel = [r for r in all_rel if rel_emb[r] is not None]
    one_shot = one_shot_identification(
        np.stack([rel_emb[r] for r in face_rel]).astype(np.float32),
        np.asarray([label_of[r.split(os.sep)[0]] for r in face_rel], np.int64), sizes=tuple(one_shot_sizes),
        rounds=tuple(one_shot_rounds), fpirs=tuple(fpirs), target_far=target_far, seed=seed,
        snorm_top_ks=tuple(snorm_top_ks), printer=printer)

  # ---- Siamese head vs the plain threshold on the same held-out pairs
  d = np.concatenate(pooled["d"])
  y = np.concatenate(pooled["same"])
  t_best = np.concatenate(pooled["thr_best"])
  verification = {"test_pairs": int(y.size), "same_pairs": int(y.sum()),
                  "threshold": {"accuracy": float(np.mean((d <= t_best) == y)), "auc": metrics.roc_auc(d, y)},
                  "threshold_0.6": {"accuracy": float(np.mean((d <= 0.6) == y))}}
  printer(f"verification on {y.size} balanced held-out pairs (both folds; heads and thresholds "
          f"fitted on the other fold):")
  printer(f"  distance threshold (best accuracy): accuracy {verification['threshold']['accuracy']:.4f}, "
          f"AUC {verification['threshold']['auc']:.4f}  (fixed 0.6: accuracy "
          f"{verification['threshold_0.6']['accuracy']:.4f})")
  for kind in features:
    p = np.concatenate(pooled["p"][kind]).astype(np.float64)
    entry = {"accuracy": float(np.mean((p >= 0.5) == y)), "auc": metrics.roc_auc(-p, y)}
    verification[f"siamese_{kind}"] = entry
    printer(f"  siamese head ({kind}): accuracy {entry['accuracy']:.4f}, AUC {entry['auc']:.4f}")

  result = {"images_dir": images_dir, "upsample": upsample, "seed": seed, "folds": per_fold,
            "open_set": open_set, "one_shot": one_shot, "verification": verification,
            "embed_seconds": round(embed_seconds, 1), "cache": cache.path}
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, "recognition_metrics.json")
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
    printer(f"wrote {out}")
  return result


def main(argv):
  FLAGS = flags.FLAGS
  flagutil.start(argv)
  flagutil.tune_cpu_xla()
  try:
    run(FLAGS.images, FLAGS.cache_dir, FLAGS.workdir or None, upsample=FLAGS.upsample,
        target_far=FLAGS.target_far, open_set_far=FLAGS.open_set_far, features=tuple(FLAGS.siamese_features),
        seed=FLAGS.seed, printer=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError) as e:
    flagutil.fail(str(e))


def _define_flags() -> None:
  flags.DEFINE_string("images", IMAGES_DEFAULT, "image root, one folder per identity")
  flags.DEFINE_integer("seed", 0, "seed of the identity folds and the pair subsampling")
  flags.DEFINE_string("cache_dir", "runs/lfw_eval", "embedding cache folder (shared with experiments.lfw_eval)")
  flags.DEFINE_string("workdir", "runs/recognition_eval", "folder for recognition_metrics.json and heads ('' = none)")
  flags.DEFINE_integer("upsample", 0, "detector upsampling steps", lower_bound=0)
  flags.DEFINE_float("target_far", 1e-3, "pair FAR target on the calibration fold's pairs")
  flags.DEFINE_float("open_set_far", 0.05, "open-set FAR target (unknown queries accepted) on the calibration fold")
  flags.DEFINE_list("siamese_features", ["abs", "abs+chi2"], "pair features of the Siamese heads to train")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
