"""Tests for jaxface.train.model: building the model, its eval-mode embedding, embed_source."""

import dataclasses

import numpy as np

from jaxface.data import source as source_lib
from jaxface.train import model as model_lib, step as step_lib
from tests.test_train_triplet import TINY, _batch


def test_eval_flip_embeds_an_image_and_its_mirror_identically():
  graphdef, _, state = step_lib.init_state(TINY)
  images = _batch(TINY)["images"]
  mirror = images[:, :, ::-1, :].copy()
  with_flip = model_lib.make_embed_fn(graphdef, TINY)
  cfg_plain = dataclasses.replace(TINY, eval_flip=False)
  plain = model_lib.make_embed_fn(graphdef, cfg_plain)
  a = np.asarray(with_flip(state["params"], state["rest"], images))
  b = np.asarray(with_flip(state["params"], state["rest"], mirror))
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5)
  p1 = np.asarray(plain(state["params"], state["rest"], images))
  p2 = np.asarray(plain(state["params"], state["rest"], mirror))
  assert not np.allclose(p1, p2, atol=1e-4)


def test_embed_source_pads_the_last_batch_and_keeps_row_order():
  graphdef, _, state = step_lib.init_state(TINY)
  embed = model_lib.make_embed_fn(graphdef, TINY)
  images = _batch(TINY)["images"][:7]
  src = source_lib.ArraySource(images, np.arange(7) % 3)
  whole = np.asarray(embed(state["params"], state["rest"], images))
  got = model_lib.embed_source(embed, state["params"], state["rest"], src, batch_size=3)
  assert got.shape == (7, TINY.embedding_dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, whole, atol=1e-6)
  rows = model_lib.embed_source(embed, state["params"], state["rest"], src, 4, indices=np.array([6, 1]))
  np.testing.assert_allclose(rows, whole[[6, 1]], atol=1e-6)
  assert embed._cache_size() == 3  # batch sizes 7, 3 and 4: one compile each, padding included


def test_model_extras_record_what_rebuilds_the_model():
  assert model_lib.model_extras(TINY, 8) == {"dlib_spec": None, "num_classes": 0}
  with_head = dataclasses.replace(TINY, cls_weight=1.0)
  assert model_lib.model_extras(with_head, 8) == {"dlib_spec": None, "num_classes": 8}
  dlib = dataclasses.replace(TINY, init="dlib", image_size=(108, 108), crop_size=(104, 104),
                             embedding_dim=128)
  assert model_lib.model_extras(dlib, 8)["dlib_spec"] == dlib.dlib_spec().to_dict()
