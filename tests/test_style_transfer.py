"""Tests for jaxface.style: the pure step, vmap == loop, resume, colour modes, bad input."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxface import checkpointing
from jaxface.models import vgg19
from jaxface.style import images as images_lib, transfer
from jaxface.style.config import NSTConfig

# Shallow layers and tiny images: each compile takes a second or two.
TINY = NSTConfig(size=24, num_scales=1, steps=(6,), content_layer="relu2_1", style_layers="relu1_1,relu2_1",
                 log_every=2, checkpoint_every=2, beta=1e4, tv_weight=1e-2, init="content_noise")

# Step-level tests where the depth does not matter: two convolutions.
MICRO = dataclasses.replace(TINY, size=16, content_layer="relu1_2", style_layers="relu1_1,relu1_2")


@pytest.fixture(autouse=True)
def _no_user_weights(monkeypatch, tmp_path_factory):
  # Runs must not pick up weights from the developer's cache or $JAXFACE_VGG19.
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path_factory.mktemp("cache")))
  monkeypatch.delenv("JAXFACE_VGG19", raising=False)


def _setup(cfg, k=0):
  problem = transfer.prepare(cfg)
  graphdef, vgg, prep, _ = transfer.build_network(cfg, None)
  tx = transfer.make_optimizer(cfg)
  consts = transfer.scale_consts(cfg, problem, k, vgg, transfer.make_targets(graphdef, cfg, prep))
  contents, _ = transfer.scale_images(cfg, problem, k)
  state = transfer.new_state(tx, transfer.initial_image(cfg, contents), step=0, scale_index=k,
                             seed=cfg.seed)
  return problem, graphdef, vgg, prep, tx, consts, state


def _run(cfg, workdir, **kw):
  return transfer.run(cfg, str(workdir), printer=lambda s: None, **kw)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_step_compiles_once_donates_and_lowers_the_cost(optimizer):
  cfg = dataclasses.replace(MICRO, optimizer=optimizer)
  _, graphdef, _, prep, tx, consts, state = _setup(cfg)
  step = transfer.make_step(graphdef, tx, cfg, prep)
  old = state["image"]
  losses = []
  for _ in range(8):
    state, m = step(state, consts)
    losses.append(float(m["train/loss"]))
  assert old.is_deleted()
  assert step._cache_size() == 1
  assert int(state["step"]) == 8 and int(state["bad_step"]) == -1
  assert losses[-1] < 0.9 * losses[0], losses
  if optimizer == "adam":
    img = np.asarray(state["image"])
    assert img.min() >= 0 and img.max() <= 1


def test_step_cost_equals_the_lecture_formula_on_vgg_features():
  cfg = TINY
  problem, graphdef, vgg, prep, tx, consts, state = _setup(cfg)
  image = np.asarray(state["image"])
  _, m = transfer.make_step(graphdef, tx, cfg, prep)(jax.tree.map(jnp.copy, state), consts)
  model = nnx.merge(graphdef, vgg)
  feats = model(vgg19.preprocess(jnp.asarray(image), vgg19.TORCH), "relu2_1")
  contents, styles = transfer.scale_images(cfg, problem, 0)
  c_feats = model(vgg19.preprocess(jnp.asarray(contents), vgg19.TORCH), "relu2_1")
  s_feats = model(vgg19.preprocess(jnp.asarray(styles[0][None]), vgg19.TORCH), "relu2_1")
  a_c, a_g = np.asarray(c_feats["relu2_1"][0], np.float64), np.asarray(feats["relu2_1"][0], np.float64)
  j_content = 0.5 * np.sum((a_c - a_g) ** 2)
  j_style = 0.0
  for layer in ("relu1_1", "relu2_1"):
    s = np.asarray(s_feats[layer][0], np.float64).reshape(-1, s_feats[layer].shape[-1])
    g = np.asarray(feats[layer][0], np.float64)
    n_h, n_w, n_c = g.shape
    g = g.reshape(-1, n_c)
    j_style += 0.5 * np.sum((s.T @ s - g.T @ g) ** 2) / (2 * n_h * n_w * n_c) ** 2
  tv = np.sum(np.diff(image[0], axis=0) ** 2) + np.sum(np.diff(image[0], axis=1) ** 2)
  np.testing.assert_allclose(float(m["train/content"]), j_content, rtol=1e-4)
  np.testing.assert_allclose(float(m["train/style"]), j_style, rtol=1e-4)
  np.testing.assert_allclose(float(m["train/tv"]), tv, rtol=1e-4)
  np.testing.assert_allclose(float(m["train/loss"]), j_content + 1e4 * j_style + 1e-2 * tv, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_batch_of_contents_equals_separate_runs(optimizer):
  cfg = dataclasses.replace(MICRO, content="builtin:scene,builtin:checker", optimizer=optimizer)
  _, graphdef, _, prep, tx, consts, state = _setup(cfg)
  step = transfer.make_step(graphdef, tx, cfg, prep)
  singles = []
  for i in range(2):
    s_i = jax.tree.map(lambda x: x[i:i + 1] if x.ndim else x,
                       {"image": state["image"], "opt_state": state["opt_state"]})
    s_i.update({k: jnp.copy(state[k]) for k in ("step", "scale_index", "seed", "bad_step")})
    c_i = {**consts, "content": consts["content"][i:i + 1]}
    for _ in range(2):
      s_i, _ = step(s_i, c_i)
    singles.append(np.asarray(s_i["image"][0]))
  for _ in range(2):
    state, _ = step(state, consts)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(state["image"][i]), singles[i], atol=2e-5)
  assert not np.allclose(singles[0], singles[1])


def test_precomputed_input_grad_kernels_give_the_same_steps():
  # scale_consts adds vgg19.input_grad_kernels (faster backward); without them
  # the step differentiates nnx.Conv directly. Same trajectory either way.
  _, graphdef, _, prep, tx, consts, state = _setup(MICRO)
  # Only the convolutions up to the deepest layer the costs read.
  last = vgg19.layer_index(MICRO.last_layer())
  assert set(consts["grad_kernels"]) == {n for n in vgg19.CONV_NAMES if vgg19.layer_index(n) <= last}
  step = transfer.make_step(graphdef, tx, MICRO, prep)
  plain = {k: v for k, v in consts.items() if k != "grad_kernels"}
  a, b = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)
  for _ in range(3):
    a, ma = step(a, consts)
    b, mb = step(b, plain)
  np.testing.assert_allclose(float(ma["train/loss"]), float(mb["train/loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(a["image"]), np.asarray(b["image"]), atol=1e-5)


def test_non_finite_cost_keeps_the_images_and_stops():
  _, graphdef, _, prep, tx, consts, state = _setup(MICRO)
  step = transfer.make_step(graphdef, tx, MICRO, prep)
  state, _ = step(state, consts)
  state["image"] = state["image"].at[0, 0, 0, 0].set(jnp.nan)
  before = np.asarray(state["image"])
  after, _ = step(state, consts)
  assert int(after["bad_step"]) == 1
  np.testing.assert_array_equal(np.asarray(after["image"]), before)
  with pytest.raises(transfer.TransferError, match="non-finite cost at step 1"):
    transfer._check_health(after)


def test_init_modes_are_seeded():
  contents = np.full((2, 8, 8, 3), 0.5, np.float32)
  cfg = dataclasses.replace(TINY, init="noise")
  a, b = transfer.initial_image(cfg, contents), transfer.initial_image(cfg, contents)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]))  # own noise per image
  other = transfer.initial_image(dataclasses.replace(cfg, seed=1), contents)
  assert not np.allclose(np.asarray(a), np.asarray(other))
  c = transfer.initial_image(dataclasses.replace(cfg, init="content"), contents)
  np.testing.assert_array_equal(np.asarray(c), contents)
  mix = transfer.initial_image(dataclasses.replace(cfg, init="content_noise", noise_ratio=0.25),
                               contents)
  np.testing.assert_allclose(np.asarray(mix), 0.75 * contents + 0.25 * np.asarray(a), atol=1e-6)


def test_style_grams_rescale_to_the_output_size_and_blend():
  cfg = dataclasses.replace(TINY, style="builtin:waves,builtin:mosaic", style_blend="1,3",
                            style_scale=2.0)
  problem, graphdef, vgg, prep, tx, consts, state = _setup(cfg)
  _, styles = transfer.scale_images(cfg, problem, 0)
  assert styles[0].shape == (48, 48, 3)
  model = nnx.merge(graphdef, vgg)
  want = 0
  for w, st in zip((0.25, 0.75), styles):
    a = np.asarray(model(vgg19.preprocess(jnp.asarray(st[None]), vgg19.TORCH), "relu2_1")["relu2_1"][0])
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    want = want + w * (a.T @ a) * (12 * 12) / (24 * 24)
  np.testing.assert_allclose(np.asarray(consts["grams"]["relu2_1"]), want, rtol=1e-4)


def test_match_color_gives_the_target_mean_and_covariance():
  rng = np.random.default_rng(0)
  style = np.clip(rng.normal(0.5, 0.1, (20, 20, 3)) @ np.array([[1, .2, 0], [0, 1, .3], [0, 0, 1]]) * .6,
                  0, 1).astype(np.float32)
  target = np.clip(rng.normal([0.6, 0.4, 0.3], 0.08, (30, 30, 3)), 0, 1).astype(np.float32)
  out = images_lib.match_color(style, target).reshape(-1, 3)
  t = target.reshape(-1, 3)
  np.testing.assert_allclose(out.mean(0), t.mean(0), atol=1e-3)
  np.testing.assert_allclose(np.cov(out, rowvar=False), np.cov(t, rowvar=False), atol=1e-4)


def test_luminance_round_trip_keeps_content_colour():
  rng = np.random.default_rng(0)
  content = rng.uniform(0.2, 0.8, (6, 6, 3)).astype(np.float32)
  gray = images_lib.luminance_rgb(content)
  np.testing.assert_allclose(images_lib.combine_luminance(gray, content), content, atol=1e-5)
  y = images_lib.rgb_to_yiq(content)[..., 0]
  np.testing.assert_allclose(gray[..., 1], y, atol=1e-6)


def test_resumed_run_equals_uninterrupted_mid_scale_and_at_the_boundary(tmp_path):
  cfg = dataclasses.replace(TINY, num_scales=2, steps=(4, 3))
  full = _run(cfg, tmp_path / "full")
  assert full["images"].shape == (1, 24, 24, 3) and full["steps"] == 7
  for stop in (3, 4):  # mid-scale 1; exactly at the scale boundary
    d = tmp_path / f"split{stop}"
    assert _run(cfg, d, stop_after=stop) == {}
    assert checkpointing.Checkpointer(str(d)).latest_step() == stop
    resumed = _run(cfg, d)
    np.testing.assert_array_equal(resumed["images"], full["images"])
    assert resumed["final"] == full["final"]
  assert os.path.exists(tmp_path / "full" / "scene_stylized.png")


def test_resume_refuses_a_changed_config(tmp_path):
  _run(TINY, tmp_path, stop_after=2)
  with pytest.raises(checkpointing.CheckpointError, match="beta"):
    _run(dataclasses.replace(TINY, beta=1.0), tmp_path)


@pytest.mark.parametrize("mode", ["luminance", "histogram"])
def test_colour_preservation_runs_and_writes_pngs(tmp_path, mode):
  cfg = dataclasses.replace(TINY, preserve_color=mode, steps=(2,), snapshot_every=1)
  res = _run(cfg, tmp_path)
  out = np.asarray(Image.open(res["outputs"][0]), np.float32) / 255
  assert out.shape == (24, 24, 3)
  assert os.path.exists(tmp_path / "snapshots" / "step000002_scene.png")
  if mode == "luminance":
    # The saved image has the content's colours (I, Q) and the result's luminance.
    content = images_lib.resize_cover(images_lib.load("builtin:scene"), (24, 24))
    iq = images_lib.rgb_to_yiq(out)[..., 1:]
    assert np.abs(iq - images_lib.rgb_to_yiq(content)[..., 1:]).mean() < 0.02
    y_gen = images_lib.rgb_to_yiq(res["images"][0])[..., 0]
    assert np.abs(images_lib.rgb_to_yiq(out)[..., 0] - y_gen).mean() < 0.02


def test_bad_inputs_fail_before_compute(tmp_path):
  bad_file = tmp_path / "bad.png"
  bad_file.write_bytes(b"not an image")
  with pytest.raises(images_lib.ImageError, match="no such file"):
    transfer.prepare(dataclasses.replace(TINY, content=str(tmp_path / "missing.png")))
  with pytest.raises(images_lib.ImageError, match="cannot be read"):
    transfer.prepare(dataclasses.replace(TINY, style=str(bad_file)))
  with pytest.raises(images_lib.ImageError, match="unknown built-in"):
    transfer.prepare(dataclasses.replace(TINY, style="builtin:nope"))
  with pytest.raises(ValueError, match="too small.*relu5_1 needs at least 16"):
    transfer.prepare(dataclasses.replace(TINY, size=24, num_scales=2, style_layers="relu5_1"))
  with pytest.raises(ValueError, match="style image.*too small"):
    transfer.prepare(dataclasses.replace(TINY, style_scale=0.05))
  for kw, match in [(dict(content_layer="relu9_1"), "unknown VGG19 layer"),
                    (dict(style_layers="relu1_1,conv6"), "unknown VGG19 layer"),
                    (dict(beta=-1.0), "beta"), (dict(alpha=float("nan")), "alpha"),
                    (dict(tv_weight=float("inf")), "tv_weight"),
                    (dict(style_layer_weights="1,-1"), "style_layer_weights"),
                    (dict(style_layer_weights="1"), "one weight per style layer"),
                    (dict(style_blend="1,2"), "one weight per style image"),
                    (dict(optimizer="sgd"), "optimizer"), (dict(steps=(1, 2, 3)), "steps"),
                    (dict(conv_impl="fft"), "conv_impl='fft': must be one of auto, xla, winograd")]:
    with pytest.raises(ValueError, match=match):
      transfer.prepare(dataclasses.replace(TINY, **kw))


def test_real_images_load_when_present():
  from jaxface import paths
  folder = os.path.join(paths.data_root(), "nst", "style")
  if not os.path.isdir(folder):
    pytest.skip(f"real NST images not found at {folder} (set JAXFACE_DATA)")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".png")))
  img = images_lib.load(os.path.join(folder, names[0]))
  assert img.ndim == 3 and img.shape[-1] == 3 and 0 <= img.min() and img.max() <= 1
  assert img.std() > 0.05


def test_loaded_weights_replace_random_init_and_bring_their_preprocessing(tmp_path, monkeypatch):
  from jaxface import weights as weights_lib
  from jaxface.formats import vgg_weights
  model = vgg19.build_vgg19(seed=5)
  params = {n: (np.asarray(getattr(model, n).kernel[...]), np.asarray(getattr(model, n).bias[...]))
            for n in vgg19.CONV_NAMES}
  fake = vgg_weights.VGGWeights(params=params, preprocessing=vgg19.CAFFE, source="fake:test")
  monkeypatch.setattr(weights_lib, "load_vgg19", lambda path=None: fake)
  lines = []
  cfg = dataclasses.replace(TINY, steps=(2,))
  res = transfer.run(cfg, str(tmp_path / "a"), printer=lines.append)
  assert not any("NOT pretrained" in line for line in lines)
  assert any("weights fake:test" in line for line in lines)
  graphdef, vgg, prep, source = transfer.build_network(cfg, fake)
  assert prep == vgg19.CAFFE and source == "fake:test"
  np.testing.assert_array_equal(np.asarray(vgg["conv1_1"]["kernel"][...]), params["conv1_1"][0])
  monkeypatch.setattr(weights_lib, "load_vgg19", lambda path=None: None)
  lines.clear()
  other = transfer.run(cfg, str(tmp_path / "b"), printer=lines.append)
  assert any("NOT pretrained" in line for line in lines)
  assert not np.array_equal(res["images"], other["images"])
