"""``--init=dlib``: fine-tuning dlib's pretrained ResNet through the triplet experiment.

The pretrained weights come from the ``face-recognition-models`` package; the
tests that need them skip (with the install hint) when it is missing. Inputs
are 104 px (the smallest size the net accepts is 103) to keep CPU time low.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxface import pretrained
from jaxface.models import dlib_resnet
from jaxface.train import triplet
from jaxface.train.config import TripletConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  pretrained.model_file("resnet")
  HAVE_WEIGHTS, WHY = True, ""
except pretrained.PretrainedNotFoundError as e:
  HAVE_WEIGHTS, WHY = False, str(e)
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=WHY)

DLIB_TINY = TripletConfig(
    data="synthetic", synthetic_identities=6, synthetic_images=3, num_holdout=2,
    image_size=(108, 108), crop_size=(104, 104), channels=1, init="dlib", P=2, K=2,
    num_steps=2, warmup_steps=0, learning_rate=1e-4, weight_decay=0.0, log_every=1,
    checkpoint_every=1, eval_batch_size=8, roc_png=False, eval_flip=False)


@pytest.mark.parametrize("change,match", [
    ({"crop_size": (96, 104), "image_size": (108, 108)}, "^crop_size=.*at least 103"),
    ({"embedding_dim": 64}, "^embedding_dim=64: init='dlib' keeps"),
    ({"standardize": True}, "^standardize=True"),
    ({"spatial_rank": 1, "image_size": (128,), "crop_size": (112,), "flip": False,
      "eval_flip": False}, "^init='dlib': dlib's ResNet embeds 2-D"),
])
def test_dlib_init_refuses_impossible_settings(change, match):
  with pytest.raises(ValueError, match=match):
    TripletConfig(**{**DLIB_TINY.to_dict(), **change}).validate()


@needs_weights
def test_dlib_init_starts_from_the_pretrained_weights_and_lowers_the_loss():
  graphdef, tx, state = triplet.init_state(DLIB_TINY)
  assert jax.tree.leaves(state["rest"]) == []  # no batch statistics
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (4, 104, 104, 1), np.uint8)
  # Wiring: the embed function equals dlib's own network on the RGB image, normalised.
  ref_net = pretrained.face_encoder(fold_affine=False)
  ref_graphdef, ref_params, ref_rest = ref_net.graphdef, ref_net.params, ref_net.rest
  ref, _ = dlib_resnet.apply(ref_graphdef, ref_params, ref_rest,
                             dlib_resnet.preprocess(np.repeat(gray, 3, axis=-1)))
  ref = np.asarray(ref) / np.linalg.norm(np.asarray(ref), axis=1, keepdims=True)
  embed = triplet.make_embed_fn(graphdef, DLIB_TINY)
  np.testing.assert_allclose(np.asarray(embed(state["params"], state["rest"], gray)), ref, atol=2e-5)
  # A few steps on one fixed batch lower the triplet loss.
  step = triplet.make_train_step(graphdef, tx, DLIB_TINY)
  batch = {"images": np.concatenate([gray, gray[:, ::-1]])[[0, 4, 1, 5]],
           "labels": np.array([0, 0, 1, 1], np.int32)}
  batch["images"] = np.pad(batch["images"], ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  losses = []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert losses[-1] < losses[0], losses
  assert int(state["bad_step"]) == -1


@needs_weights
def test_dlib_run_checkpoints_the_spec_and_resumes(tmp_path):
  workdir = str(tmp_path)
  triplet.run(DLIB_TINY, workdir, stop_after=1, printer=lambda s: None)
  saved = json.load(open(os.path.join(workdir, "checkpoints", "1", "config", "metadata")))
  assert saved["model_extras"]["dlib_spec"] == DLIB_TINY.dlib_spec().to_dict()
  lines = []
  res = triplet.run(DLIB_TINY, workdir, printer=lines.append)
  assert any("resumed from" in l for l in lines)
  assert sum(l.startswith("step ") for l in lines) == 1  # only step 2 ran after the resume
  assert res["eval/step"] == 2 and 0.0 <= res["eval/accuracy"] <= 1.0
  model, cfg = triplet.load_params(workdir)
  assert isinstance(model, dlib_resnet.DlibResNet) and cfg == DLIB_TINY
  assert model.spec == DLIB_TINY.dlib_spec() and model.spec.l2_normalize
  # Fine-tuning moved the weights away from the pretrained ones.
  pre = jax.tree.leaves(pretrained.face_encoder(fold_affine=False).params)
  tuned = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(pre) == len(tuned) > 50
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pre, tuned))


@needs_weights
def test_zero_steps_evaluates_the_pretrained_net(tmp_path):
  cfg = TripletConfig(**{**DLIB_TINY.to_dict(), "num_steps": 0})
  res = triplet.run(cfg, str(tmp_path), printer=lambda s: None)
  assert res["eval/step"] == 0 and 0.0 <= res["eval/accuracy"] <= 1.0
