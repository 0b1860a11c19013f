"""Tests for jaxface.formats.vgg_weights: the three VGG19 file readers.

Every file here is built by hand in the published layout with tiny channel
counts (read with strict_shapes=False); nothing is downloaded. The builders
are also used by tests/test_weights.py.
"""

import collections
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
import scipy.io

from jaxface.formats import vgg_weights as vw
from jaxface.models import vgg19

# The network's conv names and their names in Keras files (the readers map one to the other).
CONVS = vgg19.CONVS
KERAS_NAMES = CONVS.keras_names()

# Tiny channel chain with the real structure (3 -> ... over 16 convs).
TINY_CHANNELS = (3, 4, 4, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 8)


def tiny_params(seed=0, channels=TINY_CHANNELS):
  """CONV_NAMES -> (kernel [3,3,Cin,Cout] HWIO float32, bias [Cout] float32), random."""
  rng = np.random.default_rng(seed)
  return {n: (rng.normal(size=(3, 3, channels[i], channels[i + 1])).astype(np.float32),
              rng.normal(size=(channels[i + 1],)).astype(np.float32))
          for i, n in enumerate(vgg19.CONV_NAMES)}


# ----------------------------------------------------------------------------- builders

def write_keras_h5(path, params, *, keras2=False, model_weights=False):
  """A Keras weights file: group per layer, datasets listed in attr weight_names.

  Keras 1 (the published notop file): datasets ``block1_conv1_W_1:0`` and
  ``block1_conv1_b_1:0`` directly in the layer group. Keras 2: nested
  ``block1_conv1/kernel:0``. Pooling/input layers are groups without weights.
  """
  import h5py
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if model_weights else f
    layer_names = ["input_1"]
    for name, kname in zip(vgg19.CONV_NAMES, KERAS_NAMES):
      layer_names.append(kname)
      if name.endswith(("1_2", "2_2", "3_4", "4_4", "5_4")):
        layer_names.append(f"block{name[4]}_pool")
    for lname in layer_names:
      g = root.create_group(lname)
      if "conv" not in lname:
        g.attrs["weight_names"] = np.array([], dtype="S1")
        continue
      k, b = params[vgg19.CONV_NAMES[KERAS_NAMES.index(lname)]]
      if keras2:
        wn = [f"{lname}/kernel:0", f"{lname}/bias:0"]
      else:
        wn = [f"{lname}_W_1:0", f"{lname}_b_1:0"]
      g.create_dataset(wn[0], data=k)
      g.create_dataset(wn[1], data=b)
      g.attrs["weight_names"] = np.array([w.encode() for w in wn])
    root.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.0.0" if keras2 else b"1.2.2"


def _pk_global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _pk_str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _pk_int(i):
  return b"J" + struct.pack("<i", i)


def _pk_tuple(items):
  return b"(" + b"".join(items) + b"t"


def state_dict_pickle(entries, *, legacy):
  """Protocol-2 pickle of an OrderedDict of tensors, written opcode by opcode.

  ``entries``: (key, storage_key, storage_numel, offset, size, stride,
  storage_type) tuples; the tensor is rebuilt like torch does, with
  ``torch._utils._rebuild_tensor_v2`` and a ``('storage', ...)`` persistent id.
  """
  out = b"\x80\x02" + _pk_global("collections", "OrderedDict") + b")R("
  for key, skey, numel, off, size, stride, stype, *view in entries:
    if view:  # legacy view metadata: (view_key, element offset into the root, view size)
      view_md = [_pk_tuple([_pk_str(view[0][0]), _pk_int(view[0][1]), _pk_int(view[0][2])])]
    else:
      view_md = [b"N"]
    pid = [_pk_str("storage"), _pk_global("torch", stype), _pk_str(skey), _pk_str("cpu"),
           _pk_int(numel)] + (view_md if legacy else [])
    out += _pk_str(key)
    out += (_pk_global("torch._utils", "_rebuild_tensor_v2") + b"(" + _pk_tuple(pid) + b"Q"
            + _pk_int(off) + _pk_tuple([_pk_int(s) for s in size])
            + _pk_tuple([_pk_int(s) for s in stride]) + b"\x89"
            + _pk_global("collections", "OrderedDict") + b")R" + b"tR")
  return out + b"u."


_STYPE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
          np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage"}


def _entries(tensors):
  entries, storages = [], {}
  for i, (k, a) in enumerate(tensors.items()):
    a = np.ascontiguousarray(a)
    skey = str(i)
    storages[skey] = a.ravel().astype(a.dtype.newbyteorder("<")).tobytes()
    stride = tuple(s // a.itemsize for s in a.strides)
    entries.append((k, skey, a.size, 0, a.shape, stride, _STYPE[a.dtype]))
  return entries, storages


def write_torch_zip(path, tensors, *, pickle_bytes=None):
  """A torch >= 1.6 zip-container state dict, built without torch."""
  entries, storages = _entries(tensors)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle_bytes or state_dict_pickle(entries, legacy=False))
    z.writestr("archive/byteorder", "little")
    for k, data in storages.items():
      z.writestr(f"archive/data/{k}", data)
    z.writestr("archive/version", "3\n")


def write_torch_legacy(path, tensors):
  """A legacy (pre-1.6) torch.save stream, built without torch."""
  entries, storages = _entries(tensors)
  with open(path, "wb") as f:
    f.write(pickle.dumps(vw.LEGACY_TORCH_MAGIC, protocol=2))
    f.write(pickle.dumps(1001, protocol=2))
    f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    f.write(state_dict_pickle(entries, legacy=True))
    keys = sorted(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for k in keys:
      n = len(storages[k]) // {"Float": 4, "Double": 8, "Half": 2, "Long": 8}[
          next(e[6] for e in entries if e[1] == k)[: -len("Storage")]]
      f.write(struct.pack("<q", n) + storages[k])


def torchvision_state_dict(params, with_classifier=True):
  """params in torchvision's layout: features.N.weight [Cout,Cin,3,3] (OIHW) and bias."""
  sd = collections.OrderedDict()
  for name, i in zip(vgg19.CONV_NAMES, vw.TORCH_FEATURE_INDICES):
    k, b = params[name]
    sd[f"features.{i}.weight"] = np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))
    sd[f"features.{i}.bias"] = b
  if with_classifier:
    sd["classifier.0.weight"] = np.ones((5, 8), np.float32)
    sd["classifier.0.bias"] = np.zeros((5,), np.float32)
  return sd


def write_matconvnet(path, params, *, meta=False, mean=(123.68, 116.779, 103.939),
                     spatial_order="WH"):
  """A MatConvNet simplenn .mat: layers cell of structs {name,type,weights={filters,biases}}.

  Filters are written [W,H,Cin,Cout] (the published file's order) unless
  spatial_order == "HW". Relu/pool layers sit between the convs, and an fc
  layer (type 'conv' too, as in MatConvNet) follows them.
  """
  layers = []
  for name in vgg19.CONV_NAMES:
    k, b = params[name]
    f = np.transpose(k, (1, 0, 2, 3)) if spatial_order == "WH" else k
    w = np.empty((1, 2), dtype=object)
    w[0, 0], w[0, 1] = f, b.reshape(-1, 1)
    layers.append({"name": name, "type": "conv", "weights": w, "pad": np.ones(4),
                   "stride": np.ones(2)})
    layers.append({"name": "relu" + name[4:], "type": "relu", "weights": np.empty((1, 0), object),
                   "pad": 0.0, "stride": 1.0})
    if name.endswith(("1_2", "2_2", "3_4", "4_4", "5_4")):
      layers.append({"name": "pool" + name[4], "type": "pool",
                     "weights": np.empty((1, 0), object), "pad": 0.0, "stride": 2.0})
  fc = np.empty((1, 2), dtype=object)
  cout = params["conv5_4"][1].shape[0]
  fc[0, 0], fc[0, 1] = np.ones((7, 7, cout, 10), np.float32), np.zeros((10, 1), np.float32)
  layers.append({"name": "fc6", "type": "conv", "weights": fc, "pad": 0.0, "stride": 1.0})
  cell = np.empty((1, len(layers)), dtype=object)
  for i, l in enumerate(layers):
    cell[0, i] = l
  if meta:  # newer files: meta.normalization.averageImage is one pixel [1,1,3]
    norm = {"averageImage": np.asarray(mean, np.float32).reshape(1, 1, 3),
            "imageSize": np.array([224.0, 224, 3])}
    scipy.io.savemat(path, {"layers": cell, "meta": {"normalization": norm}})
  else:  # the older published file: normalization.averageImage is a whole mean image
    img = np.broadcast_to(np.asarray(mean, np.float64), (6, 5, 3)).copy()
    img[0, 0] += 1.0
    img[1, 1] -= 1.0  # deviations cancel: the mean is still ``mean``
    scipy.io.savemat(path, {"layers": cell, "normalization": {"averageImage": img}})


def assert_params_equal(got, want):
  assert set(got) == set(vgg19.CONV_NAMES)
  for n in vgg19.CONV_NAMES:
    assert got[n][0].dtype == np.float32 and got[n][1].dtype == np.float32
    np.testing.assert_array_equal(got[n][0], want[n][0], err_msg=n)
    np.testing.assert_array_equal(got[n][1], want[n][1], err_msg=n)


def _oihw_to_hwio_loops(w):
  """Slow, obviously right reference: hwio[h, w, i, o] = oihw[o, i, h, w]."""
  o, i, h, ww = w.shape
  out = np.zeros((h, ww, i, o), w.dtype)
  for a in range(o):
    for b in range(i):
      for c in range(h):
        for d in range(ww):
          out[c, d, b, a] = w[a, b, c, d]
  return out


# ----------------------------------------------------------------------------- constants

def test_conv_names_and_expected_channel_chain():
  assert len(vgg19.CONV_NAMES) == 16 and vgg19.CONV_NAMES[0] == "conv1_1"
  assert vgg19.CONV_NAMES[-1] == "conv5_4" and "conv3_4" in vgg19.CONV_NAMES
  assert KERAS_NAMES[vgg19.CONV_NAMES.index("conv3_4")] == "block3_conv4"
  chans = [vgg19.CONV_CHANNELS[n] for n in vgg19.CONV_NAMES]
  assert chans[0] == (3, 64) and chans[2] == (64, 128) and chans[8] == (256, 512)
  assert all(a[1] == b[0] for a, b in zip(chans, chans[1:]))
  assert sum(9 * ci * co + co for ci, co in chans) == 20_024_384  # VGG19 conv parameters
  assert vw.TORCH == vw.Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert vw.CAFFE.channel_order == "BGR" and vw.CAFFE.scale == 255.0
  assert vw.Preprocessing.from_dict(vw.CAFFE.to_dict()) == vw.CAFFE


# ----------------------------------------------------------------------------- Keras

@pytest.mark.parametrize("keras2,model_weights", [(False, False), (True, False), (True, True)])
def test_keras_h5_round_trip(tmp_path, keras2, model_weights):
  pytest.importorskip("h5py")
  params = tiny_params(1)
  path = str(tmp_path / "w.h5")
  write_keras_h5(path, params, keras2=keras2, model_weights=model_weights)
  w = vw.read_keras_h5(path, CONVS, strict_shapes=False)
  assert_params_equal(w.params, params)  # keras kernels are already HWIO
  assert w.preprocessing == vw.CAFFE
  assert w.source == f"keras-h5:{os.path.abspath(path)}"
  assert vw.detect_format(path) == "keras-h5"
  assert_params_equal(vw.read_vgg19(path, CONVS, strict_shapes=False).params, params)


def test_keras_h5_missing_layer_and_strict_shapes_name_file_and_layer(tmp_path):
  h5py = pytest.importorskip("h5py")
  path = str(tmp_path / "w.h5")
  write_keras_h5(path, tiny_params())
  with pytest.raises(ValueError, match=r"w\.h5.*conv1_1.*\(3, 3, 3, 64\)"):
    vw.read_keras_h5(path, CONVS)  # tiny channels are not VGG19's
  with h5py.File(path, "a") as f:
    del f["block4_conv2"]
  with pytest.raises(ValueError, match=r"w\.h5.*block4_conv2 \(conv4_2\) is missing"):
    vw.read_keras_h5(path, CONVS, strict_shapes=False)


def test_keras_h5_truncated_file_is_a_value_error_naming_it(tmp_path):
  pytest.importorskip("h5py")
  path = str(tmp_path / "w.h5")
  write_keras_h5(path, tiny_params())
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 3])
  with pytest.raises(ValueError, match=r"w\.h5"):
    vw.read_keras_h5(path, CONVS, strict_shapes=False)


def test_keras_without_h5py_says_pip_install(tmp_path, monkeypatch):
  path = str(tmp_path / "w.h5")
  with open(path, "wb") as f:
    f.write(vw.HDF5_SIGNATURE + b"\0" * 100)
  monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
  with pytest.raises(ImportError, match="pip install h5py"):
    vw.read_keras_h5(path, CONVS)


# ----------------------------------------------------------------------------- torch

@pytest.mark.parametrize("writer", [write_torch_zip, write_torch_legacy])
def test_torchvision_pth_without_torch_round_trip(tmp_path, writer):
  params = tiny_params(2)
  path = str(tmp_path / "vgg.pth")
  sd = torchvision_state_dict(params)
  writer(path, sd)
  w = vw.read_torchvision_pth(path, CONVS, strict_shapes=False)
  assert_params_equal(w.params, params)
  for name, i in zip(vgg19.CONV_NAMES, vw.TORCH_FEATURE_INDICES):
    np.testing.assert_array_equal(w.params[name][0], _oihw_to_hwio_loops(sd[f"features.{i}.weight"]))
  assert w.preprocessing == vw.TORCH
  assert w.source.startswith("torchvision-pth:")
  assert vw.detect_format(path) == "torchvision-pth"


def test_torch_reader_only_reads_wanted_storages(tmp_path):
  sd = torchvision_state_dict(tiny_params(3))
  path = str(tmp_path / "vgg.pth")
  write_torch_zip(path, sd)
  # Corrupt the classifier's storage member name: reading convs must not touch it.
  with zipfile.ZipFile(path) as z:
    members = {n: z.read(n) for n in z.namelist()}
  classifier_key = str(list(sd).index("classifier.0.weight"))
  del members[f"archive/data/{classifier_key}"]
  with zipfile.ZipFile(path, "w") as z:
    for n, d in members.items():
      z.writestr(n, d)
  w = vw.read_torchvision_pth(path, CONVS, strict_shapes=False)
  assert len(w.params) == 16
  with pytest.raises(ValueError, match=r"vgg\.pth.*classifier\.0\.weight"):
    vw.read_torch_state_dict(path)


def test_torch_strided_and_offset_tensors(tmp_path):
  # A non-contiguous view (a transpose) and an offset into a shared storage.
  base = np.arange(24, dtype=np.float64)
  entries = [("t", "0", 24, 0, (4, 3), (1, 4), "DoubleStorage"),
             ("s", "0", 24, 5, (2, 2), (6, 2), "DoubleStorage")]
  path = str(tmp_path / "x.pth")
  write_torch_zip(path, {}, pickle_bytes=state_dict_pickle(entries, legacy=False))
  with zipfile.ZipFile(path, "a") as z:
    z.writestr("archive/data/0", base.tobytes())
  out = vw.read_torch_state_dict(path)
  np.testing.assert_array_equal(out["t"], base[:12].reshape(3, 4).T)
  np.testing.assert_array_equal(out["s"], [[base[5], base[7]], [base[11], base[13]]])
  # A tensor reaching past its storage is refused.
  bad = [("t", "0", 24, 20, (4,), (2,), "DoubleStorage")]
  write_torch_zip(path, {}, pickle_bytes=state_dict_pickle(bad, legacy=False))
  with zipfile.ZipFile(path, "a") as z:
    z.writestr("archive/data/0", base.tobytes())
  with pytest.raises(ValueError, match=r"x\.pth.*reaches element 26"):
    vw.read_torch_state_dict(path)


def test_torch_legacy_storage_views(tmp_path):
  # Old torch (< 0.4) could save a tensor on a view of a root storage.
  base = np.arange(10, dtype=np.float32)
  path = str(tmp_path / "views.pth")
  with open(path, "wb") as f:
    for head in (vw.LEGACY_TORCH_MAGIC, 1001, {"little_endian": True}):
      f.write(pickle.dumps(head, protocol=2))
    f.write(state_dict_pickle([("v", "7", 10, 1, (3,), (2,), "FloatStorage", ("8", 3, 6))],
                              legacy=True))
    f.write(pickle.dumps(["7"], protocol=2))
    f.write(struct.pack("<q", 10) + base.tobytes())
  np.testing.assert_array_equal(vw.read_torch_state_dict(path)["v"], [4.0, 6.0, 8.0])


def test_torch_pickle_with_other_globals_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  evil = (b"\x80\x02" + _pk_global("os", "system") + _pk_str(f"touch {marker}") + b"\x85R.")
  path = str(tmp_path / "evil.pth")
  write_torch_zip(path, {}, pickle_bytes=evil)
  with pytest.raises(ValueError, match=r"evil\.pth.*os\.system"):
    vw.read_torch_state_dict(path)
  assert not marker.exists()
  # A pickled whole model (not a state dict) names its class: refused too.
  model = b"\x80\x02" + _pk_global("torchvision.models.vgg", "VGG") + b")\x81."
  write_torch_zip(path, {}, pickle_bytes=model)
  with pytest.raises(ValueError, match="torchvision.models.vgg.VGG"):
    vw.read_torch_state_dict(path)


@pytest.mark.parametrize("writer", [write_torch_zip, write_torch_legacy])
def test_torch_truncated_file_is_a_value_error_naming_it(tmp_path, writer):
  path = str(tmp_path / "cut.pth")
  writer(path, torchvision_state_dict(tiny_params()))
  data = open(path, "rb").read()
  for n in (len(data) // 2, len(data) - 10):
    with open(path, "wb") as f:
      f.write(data[:n])
    with pytest.raises(ValueError, match=r"cut\.pth"):
      vw.read_torchvision_pth(path, CONVS, strict_shapes=False)


def test_torch_wrong_model_is_refused(tmp_path):
  sd = torchvision_state_dict(tiny_params())
  del sd["features.34.weight"], sd["features.34.bias"]
  path = str(tmp_path / "v16.pth")
  write_torch_zip(path, sd)
  with pytest.raises(ValueError, match=r"v16\.pth.*16 convolutions.*found 15"):
    vw.read_torchvision_pth(path, CONVS, strict_shapes=False)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_matches_torch_load(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  sd = collections.OrderedDict(
      a=torch.randn(4, 3, 3, 3, generator=g),
      b=torch.randn(5, 6, generator=g).t(),           # non-contiguous
      c=torch.randn(10, generator=g, dtype=torch.float64)[3:7],  # offset view
      d=torch.randn(3, generator=g).half(),
      e=torch.randn(3, generator=g).bfloat16(),
      f=torch.arange(5))
  path = str(tmp_path / "t.pth")
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  want = torch.load(path, weights_only=True)
  got = vw.read_torch_state_dict(path)
  assert list(got) == list(want)
  for k in want:
    assert tuple(got[k].shape) == tuple(want[k].shape), k
    np.testing.assert_array_equal(got[k].astype(np.float64), want[k].to(torch.float64).numpy(),
                                  err_msg=k)
  assert got["a"].dtype == np.float32 and got["c"].dtype == np.float64
  assert got["d"].dtype == np.float16 and got["f"].dtype == np.int64


# ----------------------------------------------------------------------------- MatConvNet

def test_loadmat_keeps_matlab_index_order(tmp_path):
  # The documented assumption behind the reader: savemat/loadmat preserve
  # a[i, j, k, l] (MATLAB's A(i+1, j+1, k+1, l+1)), only the memory order differs.
  a = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  scipy.io.savemat(str(tmp_path / "a.mat"), {"a": a})
  b = scipy.io.loadmat(str(tmp_path / "a.mat"))["a"]
  np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("meta", [False, True])
def test_matconvnet_round_trip(tmp_path, meta):
  params = tiny_params(4)
  path = str(tmp_path / "vgg.mat")
  write_matconvnet(path, params, meta=meta, mean=(120.0, 110.0, 100.0))
  w = vw.read_matconvnet_mat(path, CONVS, strict_shapes=False)
  assert_params_equal(w.params, params)  # [W,H,...] in the file -> HWIO
  assert w.preprocessing.channel_order == "RGB" and w.preprocessing.scale == 255.0
  np.testing.assert_allclose(w.preprocessing.mean, (120.0, 110.0, 100.0), rtol=1e-6)
  assert w.preprocessing.std == (1.0, 1.0, 1.0)
  assert vw.detect_format(path) == "matconvnet-mat"


def test_matconvnet_spatial_order_option(tmp_path):
  params = tiny_params(5)
  path = str(tmp_path / "hw.mat")
  write_matconvnet(path, params, spatial_order="HW")
  assert_params_equal(vw.read_matconvnet_mat(path, CONVS, strict_shapes=False, spatial_order="HW").params,
                      params)
  wh = vw.read_matconvnet_mat(path, CONVS, strict_shapes=False)  # default transposes
  np.testing.assert_array_equal(wh.params["conv2_1"][0],
                                np.transpose(params["conv2_1"][0], (1, 0, 2, 3)))
  with pytest.raises(ValueError, match="spatial_order"):
    vw.read_matconvnet_mat(path, CONVS, spatial_order="XY")


def test_matconvnet_bad_files(tmp_path):
  path = str(tmp_path / "other.mat")
  scipy.io.savemat(path, {"x": np.ones(3)})
  with pytest.raises(ValueError, match=r"other\.mat.*no 'layers'"):
    vw.read_matconvnet_mat(path, CONVS)
  good = str(tmp_path / "vgg.mat")
  write_matconvnet(good, tiny_params())
  data = open(good, "rb").read()
  cut = str(tmp_path / "cut.mat")
  with open(cut, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.mat"):
    vw.read_matconvnet_mat(cut, CONVS, strict_shapes=False)
  v73 = str(tmp_path / "v73.mat")
  with open(v73, "wb") as f:
    f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + b" " * 200)
  with pytest.raises(ValueError, match=r"v73\.mat.*v7\.3"):
    vw.read_matconvnet_mat(v73, CONVS)


# ----------------------------------------------------------------------------- validation

def test_validate_accepts_real_shapes_and_refuses_mismatches():
  real = {n: (np.broadcast_to(np.float32(0), (3, 3) + vgg19.CONV_CHANNELS[n]),
              np.zeros(vgg19.CONV_CHANNELS[n][1], np.float32)) for n in vgg19.CONV_NAMES}
  out = vw.validate(real, "f.h5", CONVS)
  assert out["conv5_4"][0].shape == (3, 3, 512, 512) and out["conv5_4"][0].flags.c_contiguous
  bad = dict(real, conv3_2=(np.zeros((3, 3, 256, 128), np.float32), np.zeros(128, np.float32)))
  with pytest.raises(ValueError, match=r"f\.h5: layer conv3_2 kernel has shape \(3, 3, 256, 128\)"):
    vw.validate(bad, "f.h5", CONVS)


def test_validate_structure_errors_name_file_and_layer():
  p = tiny_params()
  with pytest.raises(ValueError, match=r"x: layer conv2_1 takes 5 input channels.*gives 4"):
    vw.validate(dict(p, conv2_1=tiny_params(channels=(3, 4, 4, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 8, 8,
                                                       8, 8))["conv2_2"]), "x", CONVS, strict_shapes=False)
  with pytest.raises(ValueError, match=r"x: layer conv1_2 bias has shape \(3,\)"):
    vw.validate(dict(p, conv1_2=(p["conv1_2"][0], np.zeros(3, np.float32))), "x", CONVS,
                strict_shapes=False)
  with pytest.raises(ValueError, match=r"x: layer conv1_1 kernel .* \[3, 3, Cin, Cout\] \(chan.*th_dim"):
    vw.validate(dict(p, conv1_1=(np.zeros((4, 3, 3, 3)), p["conv1_1"][1])), "x", CONVS,
                strict_shapes=False)
  with pytest.raises(ValueError, match=r"x: layer conv1_1 kernel has shape \(5, 5, 3, 4\)"):
    vw.validate(dict(p, conv1_1=(np.zeros((5, 5, 3, 4)), p["conv1_1"][1])), "x", CONVS,
                strict_shapes=False)
  k = p["conv4_4"][0].copy()
  k[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"x: layer conv4_4 holds NaN"):
    vw.validate(dict(p, conv4_4=(k, p["conv4_4"][1])), "x", CONVS, strict_shapes=False)
  missing = dict(p)
  del missing["conv5_1"]
  with pytest.raises(ValueError, match=r"x: not a VGG19 weight file.*conv5_1"):
    vw.validate(missing, "x", CONVS, strict_shapes=False)


def test_detect_format_refuses_unrelated_empty_and_missing_files(tmp_path):
  txt = tmp_path / "notes.txt"
  txt.write_text("hello")
  with pytest.raises(ValueError, match=r"notes\.txt is not a Keras .h5, torch .pth or MatConvNet"):
    vw.read_vgg19(str(txt), CONVS)
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.pth is empty"):
    vw.detect_format(str(empty))
  with pytest.raises(ValueError, match=r"nope\.h5.*does not exist"):
    vw.read_vgg19(str(tmp_path / "nope.h5"), CONVS)
  with pytest.raises(ValueError, match=r"notes\.txt is neither a zip"):
    vw.read_torchvision_pth(str(txt), CONVS)


def test_matconvnet_reader_crash_becomes_value_error(tmp_path, monkeypatch):
  # scipy's MAT reader can segfault on some damaged uncompressed files (seen by
  # fuzzing); the child process turns that into a ValueError naming the file.
  path = str(tmp_path / "crash.mat")
  write_matconvnet(path, tiny_params())
  monkeypatch.setattr(vw, "_LOADMAT_CHILD", "import os; os.abort()")
  with pytest.raises(ValueError, match=r"crash\.mat cannot be read \(the MAT reader crashed "
                                       r"\(signal 6\)\)"):
    vw.read_matconvnet_mat(path, CONVS, strict_shapes=False)
  # In-process reading gives the same weights as the isolated one.
  monkeypatch.undo()
  a = vw.read_matconvnet_mat(path, CONVS, strict_shapes=False, isolate=False)
  b = vw.read_matconvnet_mat(path, CONVS, strict_shapes=False)
  assert_params_equal(a.params, b.params)
  assert a.preprocessing == b.preprocessing


def test_torch_kernels_convolve_like_torch_in_nhwc(tmp_path):
  # The interface promise: kernels are HWIO for jax.lax.conv_general_dilated
  # (NHWC, SAME), giving what the source framework's conv gives.
  torch = pytest.importorskip("torch")
  import jax
  params = tiny_params(6)
  path = str(tmp_path / "vgg.pth")
  sd = torchvision_state_dict(params)
  write_torch_zip(path, sd)
  k, b = vw.read_torchvision_pth(path, CONVS, strict_shapes=False).params["conv1_2"]
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 4)).astype(np.float32)
  got = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                    torch.from_numpy(sd["features.2.weight"]),
                                    torch.from_numpy(sd["features.2.bias"]), padding=1)
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                             atol=1e-5)
