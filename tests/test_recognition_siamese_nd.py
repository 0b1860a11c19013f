"""The Siamese head on 1-D signal and 3-D volume embeddings (issue 6, part 2).

The head sees only embeddings, so the spatial rank of the encoder in front of
it must not matter: signals [B, T, C] and volumes [B, D, H, W, C] go through a
rank-1 / rank-3 encoder, and the head trains on their pairs like on faces.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flax import nnx

from jaxface.data.synthetic_nd import synthetic_signals, synthetic_volumes
from jaxface.models import encoder as enc
from jaxface.recognition import siamese

SMALL = dict(stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16)


def _pairs(labels):
  """All same-identity pairs and as many different-identity ones, deterministic."""
  same, diff = [], []
  for i, j in itertools.combinations(range(len(labels)), 2):
    (same if labels[i] == labels[j] else diff).append((i, j))
  diff = diff[::max(1, len(diff) // len(same))][:len(same)]
  idx = np.array(same + diff)
  return idx[:, 0], idx[:, 1], np.array([True] * len(same) + [False] * len(diff))


@pytest.mark.parametrize("rank", [1, 3])
def test_head_trains_on_rank_1_and_rank_3_embeddings(rank):
  src = (synthetic_signals(6, 4, length=64, seed=1) if rank == 1
         else synthetic_volumes(6, 4, size=12, seed=1))
  x = src.get(np.arange(len(src))).astype(np.float32) / 255.0
  assert x.ndim == rank + 2  # [B, *spatial, C]
  model = enc.build_encoder(enc.EncoderSpec(spatial_rank=rank, in_channels=x.shape[-1], **SMALL))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  emb, _ = enc.apply(graphdef, params, rest, x, train=False)
  emb = np.asarray(emb)
  assert emb.shape == (len(src), 16) and np.isfinite(emb).all()

  a, b, same = _pairs(src.labels)
  cfg = siamese.SiameseConfig(steps=1000, val_fraction=0.0, learning_rate=0.5, l2=0.0)
  head = siamese.train(emb[a], emb[b], same, cfg)
  p = head.predict(emb[a], emb[b])
  assert p.shape == same.shape and ((p >= 0) & (p <= 1)).all()
  # The fitted head beats the untrained one (p = 0.5 everywhere, log-loss log 2).
  eps = 1e-7
  log_loss = -np.mean(same * np.log(p + eps) + (~same) * np.log(1 - p + eps))
  assert log_loss < np.log(2) - 0.05, log_loss
  assert head.history["train_loss"] == pytest.approx(log_loss, rel=0.05, abs=0.02)
