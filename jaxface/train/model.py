"""The trained model: building it, its forward pass, and its eval-mode embedding.

``init="scratch"`` builds the encoder of ``jaxface.models.encoder`` from the
config's seed; ``init="dlib"`` starts from dlib's pretrained 128-D ResNet
(``jaxface.pretrained.face_encoder``), fed RGB (a gray image as R = G = B) with
dlib's own input scaling. :func:`make_embed_fn` is the embedding the
evaluation and the recognition CLI use: centre crop (or the centre and 4
corner crops) and, optionally, the mirror image, averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxface.data import augment as augment_lib, source as source_lib
from jaxface.models import encoder as encoder_lib
from jaxface.train import heads
from jaxface.train.config import ModelConfig, TripletConfig


def build_model(cfg: TripletConfig, *, dlib_spec: dict | None = None
                ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, params, rest)`` of the configured model (``rest``: BatchNorm statistics).

  Args:
    cfg: ``init="scratch"`` builds a random encoder from ``cfg.seed``;
      ``init="dlib"`` loads dlib's pretrained weights.
    dlib_spec: with ``init="dlib"``, a saved ``DlibResNetSpec.to_dict()``:
      build only the shapes (a restore target) without loading the weights.
  """
  if cfg.model.init == "dlib":
    from jaxface.models import dlib_resnet
    if dlib_spec is not None:
      spec = dlib_resnet.DlibResNetSpec.from_dict(dlib_spec)
      model = nnx.eval_shape(lambda: dlib_resnet.build_dlib_resnet(spec))
      return nnx.split(model, nnx.Param, ...)
    from jaxface import pretrained
    enc = pretrained.face_encoder(fold_affine=False,
                                  spec_overrides={"l2_normalize": cfg.model.l2_normalize})
    return enc.graphdef, enc.params, enc.rest
  model = encoder_lib.build_encoder(cfg.encoder_spec(), seed=cfg.seed)
  return nnx.split(model, nnx.Param, ...)


def model_extras(cfg: TripletConfig, num_classes: int) -> dict:
  """What rebuilds the model beyond the config: saved with every checkpoint.

  ``dlib_spec``: :meth:`DlibResNetSpec.to_dict` of an ``init="dlib"`` run;
  ``num_classes``: training identities of the CosFace head (0 without one).
  """
  return {"dlib_spec": cfg.dlib_spec().to_dict() if cfg.model.init == "dlib" else None,
          "num_classes": int(num_classes) if cfg.loss.cls_weight > 0 else 0}


def model_apply(model: ModelConfig) -> Callable:
  """The forward pass of the configured model, with the encoder API.

  Returns:
    ``fwd(graphdef, params, rest, x, train) -> (emb [B, D] float32, rest)``
    where ``x`` is ``[B, *spatial, C] float32`` in [0, 1] (the augmentation
    pipeline's output). ``init="dlib"`` replicates grayscale to RGB and
    applies dlib's input scaling; ``standardize`` standardises each sample.
  """
  if model.init == "dlib":
    from jaxface.models import dlib_resnet

    def fwd_dlib(graphdef, params, rest, x, train):
      if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # dlib's net takes RGB; a gray face is R = G = B
      return dlib_resnet.apply(graphdef, params, rest, dlib_resnet.preprocess_unit(x), train)

    return fwd_dlib

  def fwd(graphdef, params, rest, x, train):
    if model.standardize:
      x = heads.standardize(x)
    return encoder_lib.apply(graphdef, params, rest, x, train)

  return fwd


def make_embed_fn(graphdef: nnx.GraphDef, cfg: TripletConfig) -> Callable:
  """Jitted eval-mode ``embed(params, rest, images [B,H,W,C] uint8) -> [B, D] float32``.

  Images may be signals ``[B, T, C]`` or volumes ``[B, D, H, W, C]`` too.
  With ``eval_flip`` the embedding is that of the image plus its mirror image
  (renormalised), the usual test-time augmentation for faces; the mirror is
  along the last spatial axis (left-right for volumes as well). With
  ``eval_crops=5`` the centre and the 4 corner crops are averaged too.
  """
  crop = tuple(cfg.data.crop_size)
  flip, crops = cfg.eval.eval_flip, cfg.eval.eval_crops
  fwd = model_apply(cfg.model)

  def embed_view(params, rest, x):
    emb, _ = fwd(graphdef, params, rest, x, False)
    if flip:
      # A face and its mirror image are the same person: averaging both views
      # removes the left/right bias the encoder learned from one view.
      flipped, _ = fwd(graphdef, params, rest, jnp.flip(x, axis=-2), False)
      emb = emb + flipped
    return emb

  @jax.jit
  def embed(params, rest, images):
    x = augment_lib.to_float(images)
    if crops == 5:
      # Centre and the 4 corner crops: averages out where the face sits in the
      # crop, as the random training crops taught the net to tolerate.
      (h, w), (ch, cw) = x.shape[1:3], crop
      emb = 0
      for top, left in (((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0),
                        (h - ch, w - cw)):
        emb = emb + embed_view(params, rest, x[:, top:top + ch, left:left + cw])
    else:
      emb = embed_view(params, rest, augment_lib.center_crop(x, crop))
    views = (2 if flip else 1) * crops
    if views == 1:
      return emb
    return encoder_lib.l2_normalize(emb) if cfg.model.l2_normalize else emb / views

  return embed


def embed_source(embed: Callable, params, rest, source: source_lib.ImageSource, batch_size: int,
                 indices: np.ndarray | None = None) -> np.ndarray:
  """Embeds every image of ``source`` (or its rows ``indices``) in fixed-size batches
  (last one padded: one compile).

  Returns:
    ``[N, D]`` float32 embeddings on the host (N = len(source) or len(indices)).
  """
  rows = np.arange(len(source)) if indices is None else np.asarray(indices)
  n = rows.shape[0]
  out = []
  for start in range(0, n, batch_size):
    idx = rows[start:start + batch_size]
    images = source.get(idx)
    if len(idx) < batch_size:
      pad = np.zeros((batch_size - len(idx),) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    out.append(np.asarray(embed(params, rest, images))[: len(idx)])
  return np.concatenate(out)
