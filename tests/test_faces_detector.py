"""Tests for jaxface.faces.detector (dlib's MMOD CNN face detector) and jaxface.faces.nms."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxface import paths
from jaxface.faces import detector as D, nms
from jaxface.formats import dlib_mmod

GOLDEN = os.path.join(paths.data_root(), "dlib_golden")
MULTI = os.path.join(paths.data_root(), "faces_multi", "face_recognition_examples")


def _mmod_path() -> str:
  from jaxface import pretrained
  try:
    return pretrained.model_file("mmod")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def det() -> D.FaceDetector:
  return D.FaceDetector.from_converted(dlib_mmod.convert(_mmod_path()))


def _load(path: str) -> np.ndarray:
  from PIL import Image, ImageOps
  with Image.open(path) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _golden(name: str):
  if not os.path.isdir(GOLDEN):
    pytest.skip(f"golden data not found at {GOLDEN} (set JAXFACE_DATA)")
  g = np.load(os.path.join(GOLDEN, "golden.npz"))
  return _load(os.path.join(GOLDEN, "images", name)), g["rects"][g["names"] == name]


def _match(golden: np.ndarray, boxes: np.ndarray, min_iou: float = 0.5):
  """Greedy one-to-one matching by IoU -> (missed golden indices, extra box indices, IoUs)."""
  m = nms.iou_matrix(golden, boxes) if len(boxes) else np.zeros((len(golden), 0))
  used_g, used_b, ious = set(), set(), []
  for flat in np.argsort(-m, axis=None, kind="stable"):
    i, j = np.unravel_index(flat, m.shape)
    if m[i, j] >= min_iou and i not in used_g and j not in used_b:
      used_g.add(i), used_b.add(j), ious.append(m[i, j])
  return ([i for i in range(len(golden)) if i not in used_g],
          [j for j in range(len(boxes)) if j not in used_b], ious)


# --------------------------------------------------------------------------- NMS


def _overlap_ref(a, b, iou_t, cov_t) -> bool:
  """dlib's test_box_overlap on inclusive integer rectangles, scalar."""
  iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
  ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
  inner = iw * ih if iw > 0 and ih > 0 else 0
  if inner == 0:
    return False
  outer = (max(a[2], b[2]) - min(a[0], b[0]) + 1) * (max(a[3], b[3]) - min(a[1], b[1]) + 1)
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
  return inner / outer > iou_t or inner / area(a) > cov_t or inner / area(b) > cov_t


def _nms_ref(boxes, scores, iou_t, cov_t):
  order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
  kept = []
  for i in order:
    if not any(_overlap_ref(boxes[k], boxes[i], iou_t, cov_t) for k in kept):
      kept.append(i)
  return kept


def _random_boxes(rng, n):
  tl = rng.integers(0, 60, (n, 2))
  wh = rng.integers(1, 40, (n, 2))
  return np.concatenate([tl, tl + wh - 1], axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_nms_matches_brute_force_dlib_scan(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(0, 60))
  boxes = _random_boxes(rng, n)
  scores = np.round(rng.normal(size=n), 1)  # rounding makes ties, which must keep input order
  iou_t, cov_t = [(0.3382761351109955, 1.0), (0.5, 0.8), (0.1, 0.5)][seed % 3]
  got = nms.nms(boxes, scores, iou_t, cov_t)
  assert got.tolist() == _nms_ref(boxes.tolist(), scores.tolist(), iou_t, cov_t)
  m = nms.overlap_matrix(boxes, boxes, iou_t, cov_t)
  ref = np.array([[_overlap_ref(a, b, iou_t, cov_t) for b in boxes.tolist()] for a in boxes.tolist()],
                 bool).reshape(n, n)
  np.testing.assert_array_equal(m, ref)


def test_iou_matrix_against_scalar_reference():
  rng = np.random.default_rng(7)
  a, b = _random_boxes(rng, 9), _random_boxes(rng, 7)

  def ref(p, q):
    iw = min(p[2], q[2]) - max(p[0], q[0]) + 1
    ih = min(p[3], q[3]) - max(p[1], q[1]) + 1
    inner = iw * ih if iw > 0 and ih > 0 else 0
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inner / (area(p) + area(q) - inner) if inner else 0.0

  want = np.array([[ref(p, q) for q in b.tolist()] for p in a.tolist()])
  np.testing.assert_allclose(nms.iou_matrix(a, b), want, rtol=1e-12)
  assert nms.iou_matrix(a[:1], a[:1])[0, 0] == 1.0


def test_nms_uses_dlibs_bounding_box_denominator():
  # Two 10x10 boxes offset diagonally by 5: intersection 25, union 175 (IoU 0.14),
  # bounding box of both 225 (0.11). Threshold 0.12 separates the two definitions.
  a, b = [0, 0, 9, 9], [5, 5, 14, 14]
  assert nms.nms([a, b], [1.0, 0.5], 0.12).tolist() == [0, 1]
  # Side by side, offset 2: intersection 80, bounding box 120 (0.667) -> suppressed at 0.3383.
  assert nms.nms([[0, 0, 9, 9], [2, 0, 11, 9]], [0.5, 1.0], 0.3383).tolist() == [1]
  # Full containment only counts when covered_threshold < 1.
  big, small = [0, 0, 99, 99], [10, 10, 19, 19]
  assert nms.nms([big, small], [1.0, 0.9], 0.3383, 1.0).tolist() == [0, 1]
  assert nms.nms([big, small], [1.0, 0.9], 0.3383, 0.99).tolist() == [0]


def test_nms_bad_input():
  with pytest.raises(ValueError, match="boxes"):
    nms.nms(np.zeros((3, 3)), np.zeros(3), 0.3)
  with pytest.raises(ValueError, match="scores"):
    nms.nms(np.zeros((3, 4)), np.zeros(2), 0.3)
  with pytest.raises(ValueError, match="thresholds"):
    nms.nms(np.zeros((3, 4)), np.zeros(3), 1.5)
  assert nms.nms(np.zeros((0, 4)), np.zeros(0), 0.3).shape == (0,)


# --------------------------------------------------------------------------- pyramid and mapping


@pytest.mark.parametrize("rows,cols", [(512, 512), (375, 500), (700, 501), (80, 80), (41, 300), (6, 6)])
def test_pyramid_layout_invariants(rows, cols):
  rects, tr, tc = D.pyramid_layout(rows, cols)
  sizes = np.stack([rects[:, 3] - rects[:, 1] + 1, rects[:, 2] - rects[:, 0] + 1], axis=1)
  # Level sizes: floor(5/6 * previous), stopping before a level under 5 rows.
  want = [(rows, cols)]
  while True:
    r, c = math.floor(5 / 6 * want[-1][0]), math.floor(5 / 6 * want[-1][1])
    if r * c == 0 or r < 5:
      break
    want.append((r, c))
  assert sizes.tolist() == [list(s) for s in want[:len(sizes)]]
  assert len(sizes) >= min(len(want), 2)
  assert tc == cols + 22 and tuple(rects[0, :2]) == (11, 11)
  assert (rects[:, :2] >= 11).all() and (rects[:, 2] <= tc - 12).all() and (rects[:, 3] <= tr - 12).all()
  for i in range(len(rects)):  # levels never overlap
    for j in range(i + 1, len(rects)):
      a, b = rects[i], rects[j]
      assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 1, (i, j, a, b)
  # The first column stacks levels 10 px apart at the left; the rest climb up the right edge.
  col1 = rects[rects[:, 0] == 11]
  assert (col1[1:, 1] - col1[:-1, 3] - 1 == 10).all()
  col2 = rects[len(col1):]
  assert (col2[:, 2] == tc - 12).all() and (np.diff(col2[:, 1]) < 0).all()


def test_pyramid_layout_of_empty_image():
  rects, tr, tc = D.pyramid_layout(0, 10)
  assert rects.shape == (0, 4) and tr == tc == 0


def test_box_mapping_round_trip():
  # dlib's image_to_tiled_pyramid (p -> tl_level + (p - 0.3) * 5/6 per level) followed by
  # tiled_to_image must give back the image box, on every level.
  rects, _, _ = D.pyramid_layout(600, 451)
  rng = np.random.default_rng(0)
  for level in range(len(rects)):
    lw, lh = rects[level, 2] - rects[level, 0] + 1, rects[level, 3] - rects[level, 1] + 1
    scale = (6 / 5) ** level
    cx, cy = rng.uniform(0.3, 0.7, 2) * [lw, lh]
    half = rng.uniform(0.5, 0.25 * min(lw, lh), 2)
    tiled = np.array([[cx - half[0], cy - half[1], cx + half[0], cy + half[1]]]) \
        + rects[level, [0, 1, 0, 1]]
    image_box = (tiled - rects[level, [0, 1, 0, 1]])
    for _ in range(level):  # point_up, applied level times: what the image box must be
      image_box = image_box * 1.2 + 0.3
    back = image_box.copy()
    for _ in range(level):  # and dlib's point_down must invert it
      back = (back - 0.3) * (5 / 6)
    np.testing.assert_allclose(back + rects[level, [0, 1, 0, 1]], tiled, atol=1e-9)
    np.testing.assert_allclose(D.tiled_to_image(rects, tiled), image_box, rtol=1e-12, atol=1e-9)
    assert image_box[0, 2] - image_box[0, 0] == pytest.approx(2 * half[0] * scale)


def test_tiled_to_image_assigns_padding_to_the_nearest_level():
  rects, _, _ = D.pyramid_layout(300, 300)
  # A box centred in the outer padding left of level 0 maps through level 0 (no scaling).
  box = np.array([[-30.0, 100.0, 10.0, 140.0]])
  np.testing.assert_allclose(D.tiled_to_image(rects, box), box - [11, 11, 11, 11])


def test_lround_is_half_away_from_zero():
  np.testing.assert_array_equal(D.lround([-2.5, -1.5, -0.4, 0.5, 1.5, 2.5, 2.49]),
                                [-3, -2, 0, 1, 2, 3, 2])


def _resize_ref(src, out_rows, out_cols):
  h, w, _ = src.shape
  xs = (w - 1) / max(out_cols - 1, 1)
  ys = (h - 1) / max(out_rows - 1, 1)
  out = np.zeros((out_rows, out_cols, src.shape[2]))
  for r in range(out_rows):
    y = r * ys
    t = int(math.floor(y))
    b, ty = min(t + 1, h - 1), y - t
    for c in range(out_cols):
      x = c * xs
      l = int(math.floor(x))
      rr, tx = min(l + 1, w - 1), x - l
      out[r, c] = ((1 - ty) * ((1 - tx) * src[t, l] + tx * src[t, rr])
                   + ty * ((1 - tx) * src[b, l] + tx * src[b, rr]))
  return out


@pytest.mark.parametrize("shape,out", [((37, 41, 3), (30, 34)), ((12, 9, 2), (10, 7)),
                                       ((5, 6, 1), (11, 14)), ((1, 7, 1), (1, 5))])
def test_resize_bilinear_against_reference(shape, out):
  src = np.random.default_rng(1).uniform(-0.5, 0.5, shape).astype(np.float32)
  got = D.resize_bilinear(src, *out)
  assert got.shape == out + (shape[2],) and got.dtype == np.float32
  # dlib accumulates SIMD column positions in float32: ~1e-6 relative position error.
  np.testing.assert_allclose(got, _resize_ref(src.astype(np.float64), *out), atol=1e-5)


def test_tiled_pyramid_level0_and_padding():
  img = np.random.default_rng(2).integers(0, 256, (50, 61, 3), dtype=np.uint8)
  mean = np.array([122.782, 117.001, 104.298], np.float32)
  rects, tr, tc = D.pyramid_layout(50, 61)
  x = D.tiled_pyramid(img, mean, rects, (tr + 5, tc + 3))
  assert x.shape == (tr + 5, tc + 3, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[11:61, 11:72], (img.astype(np.float64) - mean) / 256, atol=1e-6)
  np.testing.assert_allclose(x[11:61, 11:72, 0].mean(), ((img[..., 0] - 122.782) / 256).mean(), atol=1e-5)
  l, t, r, b = rects[1]
  np.testing.assert_allclose(x[t:b + 1, l:r + 1],
                             _resize_ref(x[11:61, 11:72].astype(np.float64), b - t + 1, r - l + 1),
                             atol=1e-5)
  mask = np.ones(x.shape[:2], bool)
  for l, t, r, b in rects:
    mask[t:b + 1, l:r + 1] = False
  assert not x[mask].any()


def test_pyramid_up_and_rect_down():
  img = np.random.default_rng(3).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  up = D.pyramid_up(img)
  assert up.shape == (15, 20, 3) and up.dtype == np.uint8
  assert up[0, 0].tolist() == img[0, 0].tolist() and up[-1, -1].tolist() == img[-1, -1].tolist()
  # An image-sized box upsampled by dlib's point_up ((p + (1.25, 0.75)) * 2) comes back.
  box = np.array([[10, 20, 50, 60]])
  upb = (box + [1.25, 0.75, 1.25, 0.75]) * 2
  np.testing.assert_array_equal(D.rect_down2(upb, 1), box)


def test_bucket():
  assert [D.bucket(n) for n in (1, 64, 65, 534, 1895, 4096, 4097)] == [64, 64, 72, 576, 1920, 4096, 4608]
  for n in range(1, 5000, 37):
    assert n <= D.bucket(n) <= max(64, n * 1.125 + 8)


# --------------------------------------------------------------------------- the network


def _synthetic_convs(rng, positive=False):
  spec = [(3, 16, 5, 2, 0, True), (16, 32, 5, 2, 0, True), (32, 32, 5, 2, 0, True),
          (32, 45, 5, 1, 2, True), (45, 45, 5, 1, 2, True), (45, 45, 5, 1, 2, True),
          (45, 1, 9, 1, 4, False)]
  convs = []
  for cin, cout, k, s, p, relu in spec:
    if positive:
      f = np.full((cout, cin, k, k), 1.0 / (cin * k * k), np.float32)
    else:
      f = rng.normal(0, 1 / math.sqrt(cin * k * k), (cout, cin, k, k)).astype(np.float32)
    convs.append({"filters": f, "bias": rng.normal(0, 0.1, cout).astype(np.float32),
                  "scale": rng.uniform(0.5, 1.5, cout).astype(np.float32),
                  "shift": rng.normal(0, 0.1, cout).astype(np.float32),
                  "stride": [s, s], "padding": [p, p], "relu": relu})
  if positive:
    for c in convs:
      c["bias"][:] = 0.01
      c["shift"][:] = 0.0
  return convs


def _conv_ref(x, c):
  """Slow float64 conv + bias + affine + relu, NHWC, by summing shifted slices."""
  f = c["filters"].astype(np.float64)  # OIHW
  s, p = c["stride"][0], c["padding"][0]
  k = f.shape[2]
  xp = np.pad(x, ((p, p), (p, p), (0, 0)))
  ho, wo = (xp.shape[0] - k) // s + 1, (xp.shape[1] - k) // s + 1
  out = np.zeros((ho, wo, f.shape[0]))
  for i in range(k):
    for j in range(k):
      out += xp[i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] @ f[:, :, i, j].T
  out = (out + c["bias"]) * c["scale"] + c["shift"]
  return np.maximum(out, 0) if c["relu"] else out


def test_network_matches_numpy_reference_and_jit_equals_eager():
  rng = np.random.default_rng(4)
  convs = _synthetic_convs(rng)
  net = D.MMODNet(convs)
  x = rng.normal(0, 0.5, (72, 88, 3)).astype(np.float32)
  ref = x.astype(np.float64)
  for c in convs:
    ref = _conv_ref(ref, c)
  valid = net.valid_sizes(72, 88)
  assert tuple(valid[-1]) == ref.shape[:2] == (6, 8)
  eager = np.asarray(net(jnp.asarray(x)[None], jnp.asarray(valid)))[0]
  np.testing.assert_allclose(eager, ref[..., 0], rtol=1e-4, atol=1e-4)
  graphdef, state = nnx.split(net)
  jitted = np.asarray(D._scores_jit(graphdef, state, jnp.asarray(x)[None], jnp.asarray(valid)))[0]
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_bucket_padding_does_not_change_valid_scores():
  rng = np.random.default_rng(5)
  net = D.MMODNet(_synthetic_convs(rng))
  x = rng.normal(0, 0.5, (75, 93, 3)).astype(np.float32)
  valid = net.valid_sizes(75, 93)
  graphdef, state = nnx.split(net)
  run = lambda x: np.asarray(D._scores_jit(graphdef, state, jnp.asarray(x)[None], jnp.asarray(valid)))[0]  # noqa: E731
  exact = run(x)
  padded = rng.normal(0, 3.0, (104, 120, 3)).astype(np.float32)  # garbage outside the image
  padded[:75, :93] = x
  out = run(padded)
  h, w = valid[-1]
  np.testing.assert_allclose(out[:h, :w], exact, rtol=1e-5, atol=1e-5)
  assert np.isneginf(out[h:]).all() and np.isneginf(out[:, w:]).all()


def test_receptive_field_centre_is_8p_plus_14():
  rng = np.random.default_rng(6)
  net = D.MMODNet(_synthetic_convs(rng, positive=True))
  assert D.receptive_field_map(net.geometry()) == (8, 14, 8, 14)
  size = 8 * 21 + 29  # room for the whole field of positions 10 and 11
  valid = jnp.asarray(net.valid_sizes(size, size))
  r, c = 11, 10
  graphdef, state = nnx.split(net)
  score = lambda x: D._scores_jit(graphdef, state, x, valid)[0, r, c]  # noqa: E731
  g = jax.jit(jax.grad(score))(jnp.ones((1, size, size, 3)))
  ys, xs = np.nonzero(np.asarray(g[0]).sum(-1))
  assert (ys.min() + ys.max()) / 2 == 8 * r + 14 and (xs.min() + xs.max()) / 2 == 8 * c + 14
  assert ys.max() - ys.min() + 1 == 28 + 2 * 8 * 10 + 1  # 3 strided convs, then +-10 at 1/8


# --------------------------------------------------------------------------- real weights


def test_convert_folds_batch_norm():
  from jaxface.formats.dlib import read_network
  path = _mmod_path()
  tree = dlib_mmod.convert(path)
  net = read_network(path)
  bn = net.layers[1].params
  scale = bn["gamma"] / np.sqrt(bn["running_var"] + 1e-4)
  np.testing.assert_allclose(tree["convs"]["00"]["scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(tree["convs"]["00"]["shift"], bn["beta"] - scale * bn["running_mean"],
                             rtol=1e-5, atol=1e-6)
  assert len(tree["convs"]) == 7 and tree["window"] == [80, 80]
  assert tree["nms_iou_threshold"] == pytest.approx(0.3383, abs=1e-4)
  assert [c["relu"] for c in tree["convs"].values()] == [True] * 6 + [False]
  n = sum(c["filters"].size + c["bias"].size for c in tree["convs"].values())
  assert n == 180_711  # conv weights and biases (the spec's parameter count)


def test_convert_rejects_other_dlib_networks():
  from jaxface import pretrained
  from jaxface.formats.dlib import DlibFormatError
  try:
    path = pretrained.model_file("resnet")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(str(e))
  with pytest.raises(DlibFormatError, match="loss_mmod_"):
    dlib_mmod.convert(path)


@pytest.mark.parametrize("name", ["dlib_2008_001322.jpg", "dlib_2008_001009.jpg"])
def test_detects_golden_faces(det, name):
  img, golden = _golden(name)
  boxes, scores = det.detect(img)
  missed, extra, ious = _match(golden, boxes)
  assert not missed and not extra, (boxes, golden)
  assert min(ious) > 0.6
  assert boxes.dtype == np.int64 and scores.dtype == np.float32
  assert (np.diff(scores) <= 0).all() and (scores > 0).all()
  # An 80x80 window (79 between its corner centres) at pyramid level L spans 79 * 1.2**L
  # image pixels, +1 inclusive, +-1 for rounding each side.
  widths = boxes[:, 2] - boxes[:, 0] + 1
  expected = 79 * 1.2 ** np.arange(30) + 1
  assert (np.abs(widths[:, None] - expected[None]).min(axis=1) <= 1).all(), widths


def test_upsample_finds_small_faces(det):
  img, golden = _golden("dlib_2008_007676.jpg")  # 7 faces of ~45 px: below the 80 px window
  boxes0, _ = det.detect(img)
  assert len(boxes0) == 0
  boxes1, scores1 = det.detect(img, upsample=1)
  missed, extra, _ = _match(golden, boxes1)
  assert not missed and not extra
  # Lowering the threshold only adds boxes.
  boxes_low, _ = det.detect(img, upsample=1, threshold=-0.5)
  assert len(boxes_low) >= len(boxes1)


def test_two_face_photo(det):
  path = os.path.join(MULTI, "kit_with_rose.jpg")
  if not os.path.isfile(path):
    pytest.skip(f"{path} not found (set JAXFACE_DATA)")
  boxes, scores = det.detect(_load(path))
  assert len(boxes) == 2 and (scores > 0.5).all()
  left, right = boxes[np.argsort(boxes[:, 0])]
  assert left[2] < right[0]  # side by side, not overlapping


def test_no_recompile_within_a_bucket(det):
  rng = np.random.default_rng(8)
  a = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (118, 146, 3), dtype=np.uint8)
  sa, sb = D.pyramid_layout(120, 150)[1:], D.pyramid_layout(118, 146)[1:]
  assert tuple(map(D.bucket, sa)) == tuple(map(D.bucket, sb))
  det.detect(a, threshold=-10)
  n = D._scores_planes_jit._cache_size()
  boxes, scores = det.detect(b, threshold=-10)
  assert D._scores_planes_jit._cache_size() == n
  assert len(boxes) > 0 and (np.diff(scores) <= 0).all()  # a low threshold keeps windows


def test_grayscale_equals_replicated_rgb(det):
  gray = np.random.default_rng(9).integers(0, 256, (90, 100), dtype=np.uint8)
  a = det.detect(gray, threshold=-5)
  b = det.detect(np.repeat(gray[:, :, None], 3, axis=2), threshold=-5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_tiny_image_gives_empty_result(det):
  # Too small for even one score-map position (tiled pyramid under 29 px): nothing at any threshold.
  for shape, threshold in [((1, 1, 3), -100), ((6, 6, 3), -100), ((3, 400, 3), -100),
                           ((20, 20, 3), 0.0), ((30, 500, 3), 0.0)]:
    boxes, scores = det.detect(np.zeros(shape, np.uint8), threshold=threshold)
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    assert boxes.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("image,kwargs,match", [
    (np.zeros((50, 50, 3), np.float32), {}, "uint8"),
    (np.zeros((50, 50, 4), np.uint8), {}, r"\[H, W, 3\]"),
    (np.zeros((2, 50, 50, 3), np.uint8), {}, r"\[H, W, 3\]"),
    (np.zeros((0, 50, 3), np.uint8), {}, "empty"),
    ([[1, 2], [3, 4]], {}, "numpy"),
    (np.zeros((50, 50, 3), np.uint8), {"upsample": -1}, "upsample"),
    (np.zeros((50, 50, 3), np.uint8), {"upsample": 1.0}, "upsample"),
    (np.zeros((50, 50, 3), np.uint8), {"upsample": 9}, "upsample"),
    (np.zeros((50, 50, 3), np.uint8), {"threshold": float("nan")}, "NaN"),
    (np.zeros((50, 50, 3), np.uint8), {"threshold": "high"}, "threshold"),
])
def test_bad_input_is_a_clear_error(det, image, kwargs, match):
  with pytest.raises(ValueError, match=match):
    det.detect(image, **kwargs)


def test_load_face_detector_caches_the_conversion(tmp_path, monkeypatch):
  _mmod_path()
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path))
  calls = []
  real = dlib_mmod.convert
  monkeypatch.setattr(dlib_mmod, "convert", lambda p: calls.append(p) or real(p))
  first = D.load_face_detector()
  second = D.load_face_detector()
  assert len(calls) == 1 and any(n.startswith("mmod-") for n in os.listdir(tmp_path))
  for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(second.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  img = np.random.default_rng(10).integers(0, 256, (100, 100, 3), dtype=np.uint8)
  np.testing.assert_array_equal(first.detect(img, threshold=-5)[1], second.detect(img, threshold=-5)[1])


def test_xla_options_respect_opt_out(monkeypatch):
  monkeypatch.setenv("JAXFACE_NO_XLA_TUNING", "1")
  assert D._xla_options() is None
  monkeypatch.delenv("JAXFACE_NO_XLA_TUNING")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert D._xla_options() is None
  monkeypatch.setenv("XLA_FLAGS", "")
  if jax.default_backend() == "cpu" and jax.__version__.startswith("0.10."):
    assert D._xla_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_too_large_is_refused_before_allocating(det, monkeypatch):
  monkeypatch.setattr(D, "MAX_TILED_PIXELS", 200_000)
  img = np.zeros((120, 160, 3), np.uint8)  # tiled ~ 0.07 Mpx: fine
  det.detect(img)
  monkeypatch.setattr(D, "pyramid_up", lambda im: pytest.fail("upsampled before the size check"))
  with pytest.raises(ValueError, match="too large"):
    det.detect(img, upsample=1)
