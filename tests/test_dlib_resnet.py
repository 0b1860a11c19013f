"""Tests for jaxface.models.dlib_resnet: NumPy references, conversion checks, golden parity."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxface import paths, pretrained
from jaxface.formats import dlib as dlib_format, dlib_resnet as dlib_resnet_format
from jaxface.models import dlib_resnet as dr

# Small enough for a loop-based NumPy reference, yet it has every case: a 7x7
# stride-2 stem, identity blocks, a down block that adds channels (4 -> 8)
# and one whose 1x1 conv output is zero-filled into a 2x2 pooled shortcut.
TINY = dr.DlibResNetSpec(input_size=40, stem_width=4, widths=(4, 8, 8), depths=(2, 1, 1),
                         embedding_dim=6)


# --------------------------------------------------------------------------- NumPy reference


def np_conv(x, w, b, stride, pad):
  """x [N,H,W,C], w [kh,kw,C,O] -> [N,OH,OW,O], float64, one kernel tap at a time."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ w[i, j]
  return out + b


def np_pool(x, k, stride, op):
  oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = op(x[:, i * stride:i * stride + k, j * stride:j * stride + k], axis=(1, 2))
  return out


def np_zero_fill_add(a, b):
  shape = np.maximum(a.shape, b.shape)
  out = np.zeros(shape)
  out[:a.shape[0], :a.shape[1], :a.shape[2], :a.shape[3]] += a
  out[:b.shape[0], :b.shape[1], :b.shape[2], :b.shape[3]] += b
  return out


def np_forward(p, spec, chips_u8):
  """dlib's network from the spec's description, float64, on a pure param dict."""
  relu = lambda t: np.maximum(t, 0)
  x = (chips_u8.astype(np.float64) - np.array(spec.mean_rgb)) / 256
  conv = lambda c, t, s, pad: np_conv(t, c["kernel"], c["bias"], s, pad)
  aff = lambda a, t: t * a["scale"] + a["bias"]
  x = relu(aff(p["stem_affine"], conv(p["stem"], x, 2, 0)))
  x = np_pool(x, 3, 2, np.max)
  i = 0
  for stage, depth in enumerate(spec.depths):
    for k in range(depth):
      blk = p["blocks"][i]
      down = stage > 0 and k == 0
      y = relu(aff(blk["affine1"], conv(blk["conv1"], x, 2 if down else 1, 0 if down else 1)))
      y = aff(blk["affine2"], conv(blk["conv2"], y, 1, 1))
      x = relu(np_zero_fill_add(y, np_pool(x, 2, 2, np.mean)) if down else y + x)
      i += 1
  return x.mean(axis=(1, 2)) @ p["fc"]


def random_model(spec, seed=0):
  """A model whose every parameter (affines included) is random, and its pure dict in float64."""
  # eval_shape: no random-init programs to compile; the values come from NumPy.
  abstract = nnx.eval_shape(lambda: dr.DlibResNet(spec, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  pure = nnx.to_pure_dict(state)
  pure = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3 + (1.0 if a.ndim == 1 else 0))
                      .astype(np.float32), pure)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  ref = jax.tree.map(lambda a: a.astype(np.float64), pure)
  ref["blocks"] = [ref["blocks"][i] for i in range(len(ref["blocks"]))]
  return nnx.merge(graphdef, state), ref


# --------------------------------------------------------------------------- pieces


def test_preprocess_is_exact_and_checks_input():
  chips = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  ref = ((chips.astype(np.float64) - np.array(dr.DLIB_MEAN_RGB)) / 256).astype(np.float32)
  out = dr.preprocess(chips)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), ref)
  np.testing.assert_array_equal(np.asarray(jax.jit(dr.preprocess)(chips)), ref)
  unit = dr.preprocess_unit(jnp.asarray(chips, jnp.float32) / 255)
  np.testing.assert_allclose(np.asarray(unit), ref, atol=1e-6)
  with pytest.raises(ValueError, match="chips must be uint8"):
    dr.preprocess(chips.astype(np.float32))
  with pytest.raises(ValueError, match=r"chips must be \[N, H, W, 3\]"):
    dr.preprocess(chips[..., :2])


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7), (3, 2)])
def test_pool_helpers_match_numpy(h, w):
  x = np.random.default_rng(h * w).normal(size=(2, h, w, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(dr._avg_pool_2x2(jnp.asarray(x))), np_pool(x, 2, 2, np.mean),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(dr._max_pool_3x3_s2(jnp.asarray(x))),
                                np_pool(x, 3, 2, np.max).astype(np.float32))


def test_zero_fill_add_matches_numpy():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
  b = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
  out = np.asarray(dr._zero_fill_add(jnp.asarray(a), jnp.asarray(b)))
  assert out.shape == (2, 4, 4, 8)
  np.testing.assert_allclose(out, np_zero_fill_add(a, b), rtol=1e-6)
  # the conv output lands top-left: the last row/column and channels 5.. come from one side only
  np.testing.assert_array_equal(out[:, 3, :, :5], b[:, 3, :, :])
  np.testing.assert_array_equal(out[:, :3, :3, 5:], a[:, :, :, 5:])


def test_spec_feature_size_round_trip_and_validation():
  spec = dr.DlibResNetSpec()
  assert spec.feature_size(150) == 2 and TINY.feature_size(40) == 2
  assert spec.feature_size(20) == 0
  d = json.loads(json.dumps(spec.to_dict()))
  assert dr.DlibResNetSpec.from_dict(d) == spec
  with pytest.raises(ValueError, match="unknown DlibResNetSpec fields"):
    dr.DlibResNetSpec.from_dict({**d, "bogus": 1})
  for bad in (dict(widths=(1, 2), depths=(1,)), dict(precision="tf32"), dict(embedding_dim=0),
              dict(mean_rgb=(1.0, 2.0))):
    with pytest.raises(ValueError):
      dataclasses.replace(spec, **bad)


# --------------------------------------------------------------------------- whole network, random weights


def test_tiny_random_network_matches_numpy_reference_eager_jit_and_folded():
  model, ref_params = random_model(TINY, seed=3)
  chips = np.random.default_rng(4).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
  ref = np_forward(ref_params, TINY, chips)
  eager = np.asarray(model(dr.preprocess(chips)))
  assert eager.shape == (3, 6) and eager.dtype == np.float32
  scale = np.abs(ref).max()
  np.testing.assert_allclose(eager, ref, atol=2e-6 * scale)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  jitted, new_rest = jax.jit(dr.apply, static_argnums=0)(graphdef, params, rest, chips)
  np.testing.assert_allclose(np.asarray(jitted), ref, atol=2e-6 * scale)
  assert jax.tree.leaves(new_rest) == []
  folded = np.asarray(dr.fold_affine(model)(dr.preprocess(chips)))
  np.testing.assert_allclose(folded, ref, atol=2e-6 * scale)
  # folding copied: the original still has its affine layers and output
  assert model.stem_affine is not None
  np.testing.assert_array_equal(np.asarray(model(dr.preprocess(chips))), eager)


def test_apply_has_the_encoder_signature_and_gives_gradients():
  model, _ = random_model(TINY, seed=5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = dr.preprocess(np.random.default_rng(6).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
  e_eval, _ = dr.apply(graphdef, params, rest, x, train=False)
  e_train, _ = dr.apply(graphdef, params, rest, x, train=True)
  np.testing.assert_array_equal(np.asarray(e_eval), np.asarray(e_train))

  @jax.jit
  def grad(p):
    return jax.grad(lambda q: jnp.sum(dr.apply(graphdef, q, rest, x, True)[0] ** 2))(p)

  grads = grad(params)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  for path, g in leaves:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
  # affine scales/shifts are trainable parameters, not constants
  assert any("affine" in jax.tree_util.keystr(p) and np.abs(g).max() > 0 for p, g in leaves)


def test_l2_normalize_uint8_input_and_bad_inputs():
  model, _ = random_model(dataclasses.replace(TINY, l2_normalize=True), seed=7)
  chips = np.random.default_rng(8).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  e = np.asarray(model(jnp.asarray(chips)))
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(e, np.asarray(model(dr.preprocess(chips))), atol=1e-6)
  with pytest.raises(ValueError, match="too small"):
    model(jnp.zeros((1, 20, 20, 3)))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    model(jnp.zeros((1, 40, 40, 1)))
  with pytest.raises(ValueError, match="float32"):
    model(jnp.zeros((1, 40, 40, 3), jnp.float16))


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def converted():
  try:
    path = pretrained.model_file("resnet")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")
  return dlib_resnet_format.convert(path)


@pytest.fixture(scope="module")
def golden():
  path = os.path.join(paths.data_root(), "dlib_golden", "golden.npz")
  if not os.path.isfile(path):
    pytest.skip(f"golden data not found at {path}")
  g = np.load(path)
  return {k: g[k] for k in ("names", "chips", "descriptors")}


def test_convert_reads_the_architecture_from_the_file(converted):
  spec = dr.DlibResNetSpec.from_dict(converted["spec"])
  assert spec == dr.DlibResNetSpec()  # the file says exactly what the defaults say
  p = converted["params"]
  assert p["stem"]["kernel"].shape == (7, 7, 3, 32) and p["fc"].shape == (256, 128)
  assert len(p["blocks"]) == 14
  n = sum(a.size for a in jax.tree.leaves(p))
  assert n == 5_614_592


def _real_network():
  return dlib_format.read_network(pretrained.model_file("resnet"))


@pytest.mark.parametrize("break_it,match", [
    (lambda ls: ls.__delitem__(3), "expected max_pool"),
    (lambda ls: ls[4].attrs.__setitem__("padding", (0, 0)), "does not fit"),
    (lambda ls: ls.append(ls[2]), "unexpected layer"),
    (lambda ls: ls.pop(), "ends where a fc"),
])
def test_convert_refuses_a_different_network(converted, monkeypatch, break_it, match):
  net = _real_network()
  break_it(net.layers)
  monkeypatch.setattr(dlib_format, "read_network", lambda *a, **k: net)
  with pytest.raises(dlib_format.DlibFormatError, match=match) as e:
    dlib_resnet_format.convert(net.path)
  assert net.path in str(e.value) and "byte offset" in str(e.value)


def test_golden_parity_all_82_chips_batched_jitted_float32(converted, golden):
  chips, want = golden["chips"], golden["descriptors"]
  assert chips.shape == (82, 150, 150, 3)
  # FaceEncoder: affine folded into the convs, chunks of 32 (32 + 32 + 18 padded to 32).
  enc = dr.FaceEncoder.from_converted(converted, fold_affine=True, max_batch=32)
  got = enc(chips)
  assert got.shape == (82, 128) and got.dtype == np.float32
  err_folded = np.abs(got - want).max()
  # Unfolded network through the functional apply, one jitted batch of 82.
  model = dr.from_converted(converted)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  run = jax.jit(lambda p, x: dr.apply(graphdef, p, rest, dr.preprocess(x))[0])
  got2 = np.asarray(run(params, chips))
  err_apply = np.abs(got2 - want).max()
  print(f"golden parity: max abs diff folded {err_folded:.2e}, unfolded apply {err_apply:.2e}")
  assert err_folded <= 1e-5 and err_apply <= 1e-5
  # descriptors are dlib's: not unit-norm
  norms = np.linalg.norm(got, axis=1)
  assert 1.2 < norms.min() and norms.max() < 1.6


def test_face_encoder_any_batch_size_no_recompile_and_eager_equal(converted, golden):
  chips = golden["chips"][:9]
  enc = dr.FaceEncoder.from_converted(converted, max_batch=4)
  full = enc(chips)  # chunks 4 + 4 + 1
  before = dr._infer._cache_size()
  np.testing.assert_array_equal(enc(chips[:3]), full[:3])  # padded to bucket 4, compiled already
  np.testing.assert_array_equal(enc(chips[8:9]), full[8:9])  # bucket 1, compiled already
  assert dr._infer._cache_size() == before, "a repeated bucket recompiled"
  # a second encoder of the same architecture reuses the compiled programs
  enc2 = dr.FaceEncoder.from_converted(converted, max_batch=4)
  enc2(chips[:4])
  assert dr._infer._cache_size() == before
  assert enc(chips[:0]).shape == (0, 128)
  # jit == eager (same folded weights, op by op)
  eager = np.asarray(nnx.merge(enc._infer_graphdef, enc._infer_state)(dr.preprocess(chips[:2])))
  np.testing.assert_allclose(full[:2], eager, atol=1e-6)
  np.testing.assert_allclose(full, golden["descriptors"][:9], atol=1e-5)
  for bad, match in [(chips.astype(np.float32), "uint8"), (chips[:, :100], r"\[N, 150, 150, 3\]"),
                     (chips[0], r"\[N, 150, 150, 3\]")]:
    with pytest.raises(ValueError, match=match):
      enc(bad)
