"""Receptive fields from layer geometry vs. brute-force support propagation and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxface import conv as conv_lib
from jaxface.visualize import adapters, receptive as rf


def _support_1d(layers, n, unit):
  """Slow reference along one axis: which input pixels reach output ``unit`` of the last layer.

  Propagates, for every position, the boolean set of input pixels it depends on.
  """
  dep = [np.eye(n, dtype=bool)[i] for i in range(n)]  # position i of the input depends on pixel i
  for layer in layers:
    dep = _apply_1d(layer, dep, n)
  return np.nonzero(dep[unit])[0]


def _apply_1d(layer, dep, n):
  if isinstance(layer, rf.Parallel):
    outs = [_chain_1d(branch, dep, n) for branch in layer.branches]
    size = max(len(o) for o in outs)
    return [np.any([o[i] for o in outs if i < len(o)], axis=0) for i in range(size)]
  k, s, d = layer.kernel, layer.stride, layer.dilation
  (lo, hi), = conv_lib.conv_padding((len(dep), 1), k, s, layer.padding, d)
  out = []
  m = len(dep)
  o = 0
  while o * s + d * (k - 1) <= m + lo + hi - 1:
    acc = np.zeros(n, bool)
    for t in range(k):
      p = o * s - lo + d * t
      if 0 <= p < m:
        acc |= dep[p]
    out.append(acc)
    o += 1
  return out


def _chain_1d(layers, dep, n):
  for layer in layers:
    dep = _apply_1d(layer, dep, n)
  return dep


CASES = [
    ("plain", [rf.Window(3, 1, 0, name="a"), rf.Window(3, 2, 0, name="b"), rf.Window(5, 1, 2, name="c")]),
    ("same-stride", [rf.Window(7, 2, "same", name="a"), rf.Window(3, 2, "same", name="b"),
                     rf.Window(3, 1, "same", name="c")]),
    ("dilated", [rf.Window(3, 1, 0, 2, name="a"), rf.Window(2, 2, 0, name="b"),
                 rf.Window(3, 1, 1, 3, name="c")]),
    ("residual", [rf.Window(3, 1, 1, name="a"),
                  rf.Parallel(((rf.Window(3, 2, 0), rf.Window(3, 1, 1)), (rf.Window(2, 2, 0),)), name="b"),
                  rf.Parallel(((rf.Window(3, 1, 1), rf.Window(3, 1, 1)), ()), name="c")]),
]


@pytest.mark.parametrize("name,layers", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n", [23, 30])
def test_fields_match_brute_force_support(name, layers, n):
  fields = rf.receptive_fields(layers, (n,))
  for depth, tap in enumerate(["a", "b", "c"], start=1):
    f = fields[tap]
    dep = _chain_1d(layers[:depth], [np.eye(n, dtype=bool)[i] for i in range(n)], n)
    assert f.out_size == (len(dep),), tap
    interior = 0
    for unit in range(len(dep)):
      support = np.nonzero(dep[unit])[0]
      (lo, hi), = f.box((unit,))
      assert support.size, (tap, unit)
      # Never smaller than the true support, and exact for fields inside the image. At a
      # border the field is an upper bound: a tap landing in padding, or on a position a
      # strided layer dropped (floor), may skip pixels the formula counts.
      assert lo <= support.min() and support.max() <= hi, (tap, unit, lo, hi)
      if lo >= 0 and hi <= n - 1:
        interior += 1
        assert support.min() == lo and support.max() == hi, (tap, unit, lo, hi)
    assert interior > 0, tap


def test_vgg19_conv5_4_field_is_252():
  from jaxface.models import vgg19
  model = nnx.eval_shape(lambda: vgg19.VGG19(rngs=nnx.Rngs(0)))
  a = adapters.vgg19_adapter(model, vgg19.TORCH)
  f = a.fields((224, 224))
  assert f["conv1_1"].size == (3, 3) and f["conv1_2"].size == (5, 5)
  assert f["pool1"].size == (6, 6) and f["pool1"].jump == (2, 2)
  assert f["conv5_4"].size == (252, 252) and f["conv5_4"].jump == (16, 16)
  assert f["pool5"].out_size == (7, 7)


def test_two_dimensional_fields_are_per_axis():
  f = rf.receptive_fields([rf.Window((3, 5), (1, 2), "valid", name="a")], (10, 20))["a"]
  assert f.size == (3, 5) and f.jump == (1, 2) and f.out_size == (8, 8)
  assert f.box((2, 3)) == ((2, 4), (6, 10))


def _grad_boxes(a, x, wanted):
  """Per (tap, unit) of ``wanted``, the bounding box of input pixels with nonzero gradient.

  One compiled reverse-mode Jacobian of every unit's channel sum w.r.t. the input.
  """
  taps = tuple(sorted({t for t, _ in wanted}, key=a.layers.index))

  def outputs(v):
    acts = a.features(a.params, v, taps)
    return jnp.stack([jnp.sum(acts[t][0, u[0], u[1], :]) for t, u in wanted])

  jac = np.asarray(jax.jit(jax.jacrev(outputs))(x))  # [len(wanted), 1, H, W, C]
  boxes = []
  for g in jac:
    nz = np.nonzero(np.abs(g).sum(axis=(0, 3)) > 0)
    boxes.append(((nz[0].min(), nz[0].max()), (nz[1].min(), nz[1].max())))
  return boxes


def test_encoder_adapter_field_matches_gradient_support():
  from jaxface.models import encoder
  spec = encoder.EncoderSpec(stem_width=4, widths=(4, 8, 8), depths=(1, 1, 1), stem_stride=2,
                             embedding_dim=4)
  model = encoder.build_encoder(spec, seed=1)
  for block in model.blocks:  # zero-initialised scales would hide the residual branch
    block.bn2.scale[...] = jnp.ones_like(block.bn2.scale[...])
  a = adapters.encoder_adapter(model, (41, 41))
  fields = a.fields((41, 41))
  x = jax.random.uniform(jax.random.key(0), (1, 41, 41, 3))
  wanted = [(tap, u) for tap in a.layers for u in
            [(0, 0), (fields[tap].out_size[0] // 2, fields[tap].out_size[1] // 3),
             (fields[tap].out_size[0] - 1,) * 2]]
  for (tap, unit), box in zip(wanted, _grad_boxes(a, x, wanted)):
    want = tuple((max(lo, 0), min(hi, 40)) for lo, hi in fields[tap].box(unit))
    assert box == want, (tap, unit)


def test_dlib_adapter_field_matches_gradient_support():
  from jaxface.models import dlib_resnet
  spec = dlib_resnet.DlibResNetSpec(stem_width=4, widths=(4, 8, 8), depths=(1, 2, 1), embedding_dim=4)
  model = dlib_resnet.DlibResNet(spec, rngs=nnx.Rngs(0))
  a = adapters.dlib_adapter(model)
  fields = a.fields((150, 150))
  x = jax.random.normal(jax.random.key(1), (1, 150, 150, 3))
  # Middle units: at the far edge of a down block only the pooled shortcut reaches (the hull
  # is then an upper bound), so check units whose conv branch exists.
  wanted = [(tap, (fields[tap].out_size[0] // 2, fields[tap].out_size[1] // 2 - 1))
            for tap in ("stem", "pool", "s1b1", "s2b2", "s3b1")]
  for (tap, unit), got in zip(wanted, _grad_boxes(a, x, wanted)):
    want = tuple((max(lo, 0), min(hi, 149)) for lo, hi in fields[tap].box(unit))
    assert got == want, (tap, unit, got, want)


def test_bad_geometry_is_a_value_error():
  with pytest.raises(ValueError, match="input_size"):
    rf.receptive_fields([rf.Window(3, name="a")], (0, 5))
  with pytest.raises(ValueError, match="downsample differently"):
    rf.receptive_fields([rf.Parallel(((rf.Window(3, 2),), ()), name="p")], (9,))
  with pytest.raises(ValueError, match="twice"):
    rf.receptive_fields([rf.Window(3, name="a"), rf.Window(3, name="a")], (9,))
  with pytest.raises(ValueError, match="does not fit"):
    rf.receptive_fields([rf.Window(5, name="a")], (3,))
  with pytest.raises(ValueError, match="Window or Parallel"):
    rf.receptive_fields([(3, 1, 0, 1)], (9,))
