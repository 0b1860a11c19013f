"""Tests for jaxface.models.vgg19 against a NumPy VGG19."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxface.models import vgg19


def _np_conv_same(x, k, b):
  # x [H, W, Cin], k [3, 3, Cin, Cout]: cross-correlation with zero padding 1.
  h, w, _ = x.shape
  xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, k.shape[-1]), np.float64)
  for dy in range(3):
    for dx in range(3):
      out += xp[dy:dy + h, dx:dx + w] @ k[dy, dx]
  return out + b


def _np_pool(x, kind):
  h, w, c = x.shape
  out = np.zeros((h // 2, w // 2, c))
  for i in range(h // 2):
    for j in range(w // 2):
      win = x[2 * i:2 * i + 2, 2 * j:2 * j + 2]
      out[i, j] = win.max(axis=(0, 1)) if kind == "max" else win.mean(axis=(0, 1))
  return out


def _np_vgg(x, params, kind):
  out = {}
  for name in vgg19.LAYER_NAMES:
    if name.startswith("conv"):
      x = _np_conv_same(x, *params[name])
    elif name.startswith("relu"):
      x = np.maximum(x, 0)
    else:
      x = _np_pool(x, kind)
    out[name] = x
  return out


def _weights(model):
  return {n: (np.asarray(getattr(model, n).kernel[...], np.float64),
              np.asarray(getattr(model, n).bias[...], np.float64)) for n in vgg19.CONV_NAMES}


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_all_named_activations_match_numpy(pooling):
  model = vgg19.build_vgg19(pooling=pooling, seed=1)
  # Non-zero biases so a bias bug shows.
  fake = types.SimpleNamespace(source="test", params={
      n: (k, np.random.default_rng(i).normal(0, 0.1, b.shape).astype(np.float32))
      for i, (n, (k, b)) in enumerate(_weights(model).items())})
  vgg19.set_weights(model, fake)
  x = np.random.default_rng(0).normal(size=(1, 34, 36, 3)).astype(np.float32)
  got = model(jnp.asarray(x), "pool5")
  want = _np_vgg(x[0].astype(np.float64), _weights(model), pooling)
  assert list(got) == list(vgg19.LAYER_NAMES)
  for name in vgg19.LAYER_NAMES:
    assert got[name].shape[1:] == want[name].shape, name
    scale = np.abs(want[name]).max() + 1e-6
    np.testing.assert_allclose(np.asarray(got[name][0]) / scale, want[name] / scale, atol=2e-5,
                               err_msg=name)


def test_last_layer_stops_early_and_functional_form_jits_once():
  model = vgg19.build_vgg19(seed=0)
  graphdef, params = nnx.split(model)
  f = jax.jit(vgg19.features, static_argnums=(0, 3))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  out = f(graphdef, params, x, "relu2_1")
  assert list(out)[-1] == "relu2_1" and out["relu2_1"].shape == (2, 8, 8, 128)
  eager = model(x, "relu2_1")
  np.testing.assert_allclose(np.asarray(out["relu2_1"]), np.asarray(eager["relu2_1"]), rtol=1e-5,
                             atol=1e-5)
  f(graphdef, params, x + 1, "relu2_1")
  assert f._cache_size() == 1
  # He init keeps activations alive through the random network.
  deep = model(x, "relu5_1")["relu5_1"]
  assert 1e-3 < float(jnp.std(deep)) < 1e3


def test_preprocess_matches_formula_and_inverts():
  rgb = np.random.default_rng(0).uniform(size=(2, 4, 5, 3)).astype(np.float32)
  caffe = np.asarray(vgg19.preprocess(jnp.asarray(rgb), vgg19.CAFFE))
  want = rgb[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68])
  np.testing.assert_allclose(caffe, want, rtol=1e-5, atol=1e-3)
  torch_style = np.asarray(vgg19.preprocess(jnp.asarray(rgb), vgg19.TORCH))
  np.testing.assert_allclose(torch_style, (rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                             rtol=1e-5, atol=1e-5)
  for prep in (vgg19.CAFFE, vgg19.TORCH):
    back = np.asarray(vgg19.deprocess(vgg19.preprocess(jnp.asarray(rgb), prep), prep))
    np.testing.assert_allclose(back, rgb, atol=1e-5)


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="unknown VGG19 layer 'relu9_9'"):
    vgg19.layer_index("relu9_9")
  with pytest.raises(ValueError, match="pooling"):
    vgg19.VGG19(pooling="median", rngs=nnx.Rngs(0))
  model = vgg19.build_vgg19()
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model(jnp.zeros((1, 8, 8, 1)), "conv1_1")
  params = dict(_weights(model))
  del params["conv3_2"]
  with pytest.raises(ValueError, match="conv3_2"):
    vgg19.set_weights(model, types.SimpleNamespace(params=params, source="x"))
  params = dict(_weights(model))
  params["conv1_1"] = (np.zeros((3, 3, 3, 32)), np.zeros(32))
  with pytest.raises(ValueError, match="conv1_1"):
    vgg19.set_weights(model, types.SimpleNamespace(params=params, source="x"))
  assert vgg19.downsampling("relu1_1") == 1 and vgg19.downsampling("relu4_2") == 8
  assert vgg19.downsampling("pool5") == 32 and vgg19.deepest(["relu4_2", "relu1_1"]) == "relu4_2"


@pytest.mark.parametrize("conv_impl,tol", [("xla", 1e-5), ("winograd", 5e-5), ("auto", 5e-5)])
def test_input_grad_kernels_give_the_same_values_and_gradient(conv_impl, tol):
  # tol: Winograd F(4x4, 3x3) rounds to ~1e-5 of each layer's output scale
  # (see tests/test_winograd.py); XLA's convolution with the precomputed
  # flipped kernel to ~1e-6.
  model = vgg19.build_vgg19(pooling="avg", seed=2)
  graphdef, params = nnx.split(model)
  kernels = vgg19.input_grad_kernels(params, conv_impl)
  impls = vgg19.conv_impls(conv_impl)
  assert set(kernels) == set(vgg19.CONV_NAMES) == set(impls)
  assert impls["conv1_1"] == ("winograd" if conv_impl == "winograd" else "xla")
  assert impls["conv2_1"] == ("xla" if conv_impl == "xla" else "winograd")
  k = np.asarray(params["conv2_1"]["kernel"][...])
  if impls["conv2_1"] == "xla":
    kt = np.asarray(kernels["conv2_1"][vgg19.KERNEL_T])
    assert kt.shape == (3, 3, 128, 64)
    for i in range(3):
      for j in range(3):
        np.testing.assert_array_equal(kt[i, j], k[2 - i, 2 - j].T)
  else:
    assert kernels["conv2_1"][vgg19.WINOGRAD].shape == (6, 6, 64, 128)
    assert kernels["conv2_1"][vgg19.WINOGRAD_T].shape == (6, 6, 128, 64)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12, 10, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 5, 128)), jnp.float32)
  loss = lambda x, gk: jnp.sum(vgg19.features(graphdef, params, x, "relu2_1", gk)["relu2_1"] * w)
  # Same values; input gradient equal to XLA's own VJP; jitted once.
  f = jax.jit(jax.value_and_grad(loss))
  v_ref, g_ref = jax.value_and_grad(loss)(x, None)
  v, g = f(x, kernels)
  f(x + 1, kernels)
  assert f._cache_size() == 1
  np.testing.assert_allclose(float(v), float(v_ref), rtol=tol / 10)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=tol, atol=tol * float(jnp.abs(g_ref).max()))
  with pytest.raises(ValueError, match="grad_kernels\\['conv2_1'\\]"):
    model(x, "relu2_1", {n: v for n, v in kernels.items() if n != "conv2_1"})
  bad = {key: a[:, :, :32] for key, a in kernels["conv1_2"].items()}
  with pytest.raises(ValueError, match="grad_kernels\\['conv1_2'\\]"):
    model(x, "relu2_1", {**kernels, "conv1_2": bad})
  with pytest.raises(ValueError, match="grad_kernels\\['conv1_1'\\]"):
    model(x, "relu2_1", {**kernels, "conv1_1": params["conv1_1"]["kernel"][...]})


def test_conv_impls_and_bad_conv_impl():
  assert set(vgg19.conv_impls("xla").values()) == {"xla"}
  assert set(vgg19.conv_impls("winograd").values()) == {"winograd"}
  with pytest.raises(ValueError, match="conv_impl='fft'"):
    vgg19.input_grad_kernels(nnx.split(vgg19.build_vgg19())[1], "fft")


def test_input_grad_kernels_up_to_a_layer_hold_only_the_convolutions_it_needs():
  model = vgg19.build_vgg19(seed=1)
  graphdef, params = nnx.split(model)
  part = vgg19.input_grad_kernels(params, "xla", last_layer="relu2_1")
  assert sorted(part) == ["conv1_1", "conv1_2", "conv2_1"]
  full = vgg19.input_grad_kernels(params, "xla")
  for name in part:
    np.testing.assert_array_equal(np.asarray(part[name][vgg19.KERNEL_T]),
                                  np.asarray(full[name][vgg19.KERNEL_T]))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 8, 8, 3)), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(vgg19.features(graphdef, params, x, "relu2_1", part)["relu2_1"]),
      np.asarray(vgg19.features(graphdef, params, x, "relu2_1", full)["relu2_1"]))
  # A deeper layer than the kernels cover is refused, naming the missing one.
  with pytest.raises(ValueError, match="grad_kernels\\['conv2_2'\\]"):
    model(x, "relu2_2", part)
  with pytest.raises(ValueError, match="relu9_9"):
    vgg19.input_grad_kernels(params, "xla", last_layer="relu9_9")


def test_conv_input_gradient_matches_numpy_adjoint():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 5, 4, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  w = rng.normal(size=(5, 4, 2))
  f = lambda x, k: jnp.sum(vgg19._conv3x3(x, k, vgg19.input_grad_kernel(k)) * w)
  np.testing.assert_allclose(float(f(jnp.asarray(x), jnp.asarray(k))),
                             np.sum(_np_conv_same(x[0].astype(np.float64), k, 0) * w), rtol=1e-5)
  # y[i, j] = sum_{di,dj} x[i+di-1, j+dj-1] @ k[di, dj]  =>  scatter w back through each tap.
  want_dx = np.zeros((5, 4, 3))
  want_dk = np.zeros((3, 3, 3, 2))
  for i in range(5):
    for j in range(4):
      for di in range(3):
        for dj in range(3):
          ii, jj = i + di - 1, j + dj - 1
          if 0 <= ii < 5 and 0 <= jj < 4:
            want_dx[ii, jj] += k[di, dj] @ w[i, j]
            want_dk[di, dj] += np.outer(x[0, ii, jj], w[i, j])
  dx, dk = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
  np.testing.assert_allclose(np.asarray(dx[0]), want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-5)
