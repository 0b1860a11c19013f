"""Readers for the published VGG19 weight files, into one in-memory layout.

Keras ``.h5`` (:func:`read_keras_h5`), torchvision ``.pth`` read without torch
(:func:`read_torchvision_pth`) and MatConvNet ``.mat`` (:func:`read_matconvnet_mat`),
all holding the same 16 convolutions of VGG19 (a fully connected classifier,
when present, is ignored). The network owns the convolutions' names and
describes them as a :class:`ConvStack`; each reader maps the file's own layout
to them, and validates them before any compute.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Input normalisation a set of weights expects.

  ``x = ((rgb01 * scale) reordered to channel_order - mean) / std``.
  """
  channel_order: str                 # "RGB" or "BGR": order the network expects
  scale: float                       # RGB in [0,1] is multiplied by this first (255.0 or 1.0)
  mean: tuple[float, float, float]   # subtracted after scaling, in channel_order
  std: tuple[float, float, float]    # then divided by this (1.0s for caffe-style weights)

  def to_dict(self) -> dict:
    return {"channel_order": self.channel_order, "scale": float(self.scale),
            "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

  @classmethod
  def from_dict(cls, d: dict) -> Preprocessing:
    return cls(str(d["channel_order"]), float(d["scale"]),
               tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


TORCH = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CAFFE = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))

@dataclasses.dataclass(frozen=True)
class ConvStack:
  """The 3x3 convolutions a reader fills, as the network names them.

  The network module owns the instance (``jaxface.models.vgg19.CONVS``); the
  readers map the file's layers to it.

  Attributes:
    names: the network's name of each convolution, in network order.
    depths: convolutions per block (VGG19: 2, 2, 4, 4, 4); block ``b``'s
      ``i``-th convolution is Keras' ``block{b}_conv{i}`` and MatConvNet's
      ``conv{b}_{i}`` (1-based).
    widths: output channels of each block's convolutions in the real network.
  """
  names: tuple[str, ...]
  depths: tuple[int, ...]
  widths: tuple[int, ...]

  def __post_init__(self):
    if len(self.depths) != len(self.widths) or sum(self.depths) != len(self.names):
      raise ValueError(f"ConvStack: {len(self.names)} names for depths {self.depths} and "
                       f"widths {self.widths}")

  def positions(self) -> tuple[tuple[int, int], ...]:
    """(block, index), 1-based, of each convolution."""
    return tuple((b, i) for b, n in enumerate(self.depths, start=1) for i in range(1, n + 1))

  def channels(self) -> dict[str, tuple[int, int]]:
    """``{name: (Cin, Cout)}`` of the real network (3 input channels)."""
    out, prev = {}, 3
    for name, (b, _) in zip(self.names, self.positions()):
      out[name] = (prev, self.widths[b - 1])
      prev = self.widths[b - 1]
    return out

  def keras_names(self) -> tuple[str, ...]:
    """Keras' layer names, in network order: ``block3_conv4`` for block 3's 4th convolution."""
    return tuple(f"block{b}_conv{i}" for b, i in self.positions())

  def matconvnet_names(self) -> tuple[str, ...]:
    """MatConvNet's layer names, in network order: ``conv3_4``."""
    return tuple(f"conv{b}_{i}" for b, i in self.positions())


# Indices of the convolutions in torchvision's ``vgg19().features`` Sequential.
TORCH_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


@dataclasses.dataclass(frozen=True)
class VGGWeights:
  """The 16 VGG19 convolutions and the preprocessing they were trained with."""
  # The network's conv names ("conv1_1".."conv5_4") -> (kernel [3,3,Cin,Cout] float32 HWIO,
  # bias [Cout] float32).
  params: dict[str, tuple[np.ndarray, np.ndarray]]
  preprocessing: Preprocessing
  source: str                        # e.g. "keras-h5:/path/file.h5"


# ----------------------------------------------------------------------------- validation

def validate(params: dict, where: str, convs: ConvStack, *, strict_shapes: bool = True) -> dict:
  """Checks and normalises ``params`` (name -> (kernel, bias)) in place of a reader.

  Args:
    params: ``convs.names`` -> (kernel [3,3,Cin,Cout], bias [Cout]) of any float dtype.
    where: the file, for error messages.
    convs: the network's convolutions.
    strict_shapes: require the real VGG19 channel counts; when False any
      channel counts are accepted as long as they chain (first Cin is 3, each
      Cin equals the previous Cout) — tests use tiny networks this way.

  Returns:
    A new dict of contiguous float32 numpy arrays.

  Raises:
    ValueError: naming ``where`` and the layer, for a missing layer, a wrong
      shape, a broken channel chain or non-finite values.
  """
  missing = [n for n in convs.names if n not in params]
  if missing:
    raise ValueError(f"{where}: not a VGG19 weight file, layers {missing} are missing")
  expected = convs.channels()
  out = {}
  prev = 3
  for name in convs.names:
    kernel, bias = (np.asarray(a) for a in params[name])
    if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
      hint = (" (channels-first: a Theano 'th_dim_ordering' file? use the 'tf_dim_ordering' one)"
              if kernel.ndim == 4 and kernel.shape[2:] == (3, 3) else "")
      raise ValueError(f"{where}: layer {name} kernel has shape {kernel.shape}, "
                       f"expected [3, 3, Cin, Cout]{hint}")
    cin, cout = kernel.shape[2:]
    if strict_shapes and (cin, cout) != expected[name]:
      raise ValueError(f"{where}: layer {name} kernel has shape {kernel.shape}, VGG19 needs "
                       f"{(3, 3) + expected[name]}")
    if cin != prev:
      raise ValueError(f"{where}: layer {name} takes {cin} input channels but the layer "
                       f"before it gives {prev}")
    if bias.shape != (cout,):
      raise ValueError(f"{where}: layer {name} bias has shape {bias.shape}, expected ({cout},)")
    if not (np.issubdtype(kernel.dtype, np.floating) and np.issubdtype(bias.dtype, np.floating)):
      raise ValueError(f"{where}: layer {name} holds {kernel.dtype}/{bias.dtype} values, "
                       f"expected floating point")
    kernel = np.ascontiguousarray(kernel, np.float32)
    bias = np.ascontiguousarray(bias, np.float32)
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
      raise ValueError(f"{where}: layer {name} holds NaN or infinite values")
    out[name] = (kernel, bias)
    prev = cout
  return out


def _check_file(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"VGG19 weight file {path!r} does not exist or is not a file")
  return path


# ----------------------------------------------------------------------------- Keras HDF5

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _h5py():
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading Keras .h5 weights needs h5py: pip install h5py "
                      "(or pip install 'jaxface[weights]')") from e
  return h5py


def _h5_names(group, attr: str) -> list[str]:
  """A list-of-strings attribute; Keras splits long ones into ``attr0``, ``attr1``, ..."""
  if attr in group.attrs:
    values = list(group.attrs[attr])
  else:
    values, i = [], 0
    while f"{attr}{i}" in group.attrs:
      values.extend(group.attrs[f"{attr}{i}"])
      i += 1
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str, convs: ConvStack, *, strict_shapes: bool = True) -> VGGWeights:
  """Reads Keras' ``vgg19_weights_tf_dim_ordering_tf_kernels[_notop].h5`` into ``convs``' names.

  HDF5, needs ``h5py``: one group per layer ``block1_conv1``..``block5_conv4``
  holding a kernel (already ``[3, 3, Cin, Cout]`` HWIO for cross-correlation)
  and a bias, listed by the group attribute ``weight_names``. These are the
  original Caffe weights, so the network expects Caffe preprocessing. Also
  accepts a whole-model ``.h5`` (weights under ``model_weights``). The kernel
  of each layer is its 4-D dataset and the bias its 1-D one (Keras 1
  names them ``block1_conv1_W_1:0``/``..._b_1:0``, Keras 2 ``kernel:0``/``bias:0``).

  Returns:
    VGGWeights with CAFFE preprocessing.

  Raises:
    ValueError: naming the file, when it is not HDF5 or lacks/misshapes a layer.
    ImportError: when h5py is missing.
  """
  path = _check_file(path)
  h5py = _h5py()
  where = f"Keras weights file {path}"
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{where} cannot be opened as HDF5 ({e}); it may be truncated or "
                     f"not a Keras weight file") from e
  params = {}
  try:
    with f:
      root = f["model_weights"] if "model_weights" in f else f
      for name, kname in zip(convs.names, convs.keras_names()):
        if kname not in root:
          layers = _h5_names(root, "layer_names") or sorted(root.keys())
          raise ValueError(f"{where}: layer {kname} ({name}) is missing; the file has "
                           f"{layers[:8]}{'...' if len(layers) > 8 else ''}")
        g = root[kname]
        weight_names = _h5_names(g, "weight_names")
        datasets = []
        if weight_names:
          for wn in weight_names:
            if wn not in g:
              raise ValueError(f"{where}: layer {kname} lists weight {wn!r} that is not stored")
            datasets.append(g[wn])
        else:  # no attribute: take every dataset below the group
          g.visititems(lambda _, obj, found=datasets: found.append(obj)
                       if isinstance(obj, h5py.Dataset) else None)
        kernels = [d for d in datasets if d.ndim == 4]
        biases = [d for d in datasets if d.ndim == 1]
        if len(kernels) != 1 or len(biases) != 1:
          raise ValueError(f"{where}: layer {kname} should hold one 4-D kernel and one 1-D "
                           f"bias, found shapes {[tuple(d.shape) for d in datasets]}")
        params[name] = (np.asarray(kernels[0][()]), np.asarray(biases[0][()]))
  except ValueError as e:
    if str(e).startswith(where):
      raise
    raise ValueError(f"{where} is damaged ({e})") from e
  except (OSError, KeyError, RuntimeError, TypeError) as e:  # h5py's errors for damaged data
    raise ValueError(f"{where} is damaged ({type(e).__name__}: {e})") from e
  return VGGWeights(validate(params, where, convs, strict_shapes=strict_shapes), CAFFE,
                    f"keras-h5:{os.path.abspath(path)}")


# ----------------------------------------------------------------------------- torch .pth

LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save stream

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (ships with jax)
  return ml_dtypes.bfloat16


class _StorageType:
  """Stands in for ``torch.FloatStorage`` etc. inside the unpickled data."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self):
    if self.name == "BFloat16Storage":
      return np.dtype(_bfloat16())
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _Storage:
  """A reference to raw storage bytes, read only when a tensor needs them."""
  key: str
  dtype: np.dtype
  numel: int
  view_offset: int = 0          # legacy view storages: element offset into the root


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Our stand-in for torch._utils._rebuild_tensor(_v2): records, reads nothing."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not a storage")
  return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                     tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


# The only globals a state-dict pickle may name; each maps to our own function.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into lazy tensors; refuses every other global."""

  def __init__(self, file, where: str):
    super().__init__(file)
    self.where = where
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"the pickle names {module}.{name}, which a plain state dict does not need; only "
        f"state dicts saved with torch.save(model.state_dict(), path) can be read")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
    key = str(key)
    root = self.storages.get(key)
    if root is None:
      root = _Storage(key, storage_type.dtype, int(numel))
      self.storages[key] = root
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy format: (view_key, offset, view_size) into the root
      _view_key, view_offset, _view_size = view
      return dataclasses.replace(root, view_offset=int(view_offset))
    return root


def _materialize(t: _LazyTensor, data: bytes, byteorder: str, where: str,
                 name: str) -> np.ndarray:
  """The numpy array of a lazy tensor from its storage's bytes."""
  dtype = t.storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
  if len(data) < t.storage.numel * dtype.itemsize:
    raise ValueError(f"{where}: storage of {name} holds {len(data)} bytes, expected "
                     f"{t.storage.numel * dtype.itemsize} (file truncated?)")
  flat = np.frombuffer(data, dtype=dtype, count=t.storage.numel)
  start = t.storage.view_offset + t.offset
  if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride):
    raise ValueError(f"{where}: tensor {name} has a negative size or stride")
  if 0 in t.size:
    return np.zeros(t.size, dtype.newbyteorder("="))
  last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if start < 0 or last >= t.storage.numel:
    raise ValueError(f"{where}: tensor {name} reaches element {last} of a storage of "
                     f"{t.storage.numel}")
  view = np.lib.stride_tricks.as_strided(
      flat[start:], shape=t.size, strides=tuple(s * dtype.itemsize for s in t.stride),
      writeable=False)
  return np.array(view, dtype=dtype.newbyteorder("="))


def _torch_state_dict_zip(path: str, where: str, wanted) -> dict[str, np.ndarray]:
  """Tensors ``wanted(key)`` of a zip-container torch.save file."""
  try:
    return _torch_state_dict_zip_unchecked(path, where, wanted)
  except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, RuntimeError,
          struct.error, zlib.error) as e:  # zipfile's errors for damaged archives
    raise ValueError(f"{where} is not a valid zip archive ({type(e).__name__}: {e}); it may "
                     f"be truncated or damaged") from e


def _torch_state_dict_zip_unchecked(path: str, where: str, wanted) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
      raise ValueError(f"{where}: zip archive without a single data.pkl; not a torch.save file")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
      byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
    try:
      up = _StateDictUnpickler(io.BytesIO(zf.read(pkls[0])), where)
      obj = up.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, zipfile.BadZipFile) as e:
      raise ValueError(f"{where}: cannot read its pickle ({e})") from e
    tensors = _select_tensors(obj, where, wanted)
    out = {}
    for k, t in tensors.items():
      member = f"{prefix}data/{t.storage.key}"
      try:
        data = zf.read(member)
      except KeyError as e:
        raise ValueError(f"{where}: storage {member} of {k} is missing") from e
      except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{where}: storage {member} of {k} is damaged ({e})") from e
      out[k] = _materialize(t, data, byteorder, where, k)
    return out


def _torch_state_dict_legacy(path: str, where: str, wanted) -> dict[str, np.ndarray]:
  """Tensors ``wanted(key)`` of a legacy (pre-1.6, non-zip) torch.save stream.

  Layout: pickles of the magic number, protocol version and sys info, then the
  object pickle, then the sorted list of storage keys, then for each key an
  int64 element count followed by the raw elements.
  """
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
      if magic != LEGACY_TORCH_MAGIC:
        raise ValueError(f"{where}: not a torch.save file (bad magic number)")
      proto = pickle.load(f)
      if proto != 1001:
        raise ValueError(f"{where}: unsupported legacy torch protocol {proto!r}")
      sys_info = pickle.load(f)
      up = _StateDictUnpickler(f, where)
      obj = up.load()
      keys = pickle.load(f)
    except ValueError as e:
      if str(e).startswith(where):
        raise
      raise ValueError(f"{where}: cannot read its pickles ({e}); the file may be truncated") from e
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, struct.error) as e:
      raise ValueError(f"{where}: cannot read its pickles ({type(e).__name__}: {e}); "
                       f"the file may be truncated") from e
    byteorder = "little" if (not isinstance(sys_info, dict)
                             or sys_info.get("little_endian", True)) else "big"
    tensors = _select_tensors(obj, where, wanted)
    # Walk the storage records to find where each one's bytes start; skip the rest.
    offsets = {}
    pos = f.tell()
    size = os.fstat(f.fileno()).st_size
    for key in keys:
      key = str(key)
      st = up.storages.get(key)
      if st is None:
        raise ValueError(f"{where}: storage key {key} was never referenced")
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f"{where}: truncated before storage {key}")
      (count,) = struct.unpack("<q" if byteorder == "little" else ">q", header)
      pos += 8
      nbytes = count * st.dtype.itemsize
      if count < 0 or pos + nbytes > size:
        raise ValueError(f"{where}: storage {key} of {count} elements runs past the end of "
                         f"the file (truncated?)")
      offsets[key] = (pos, nbytes)
      pos += nbytes
      f.seek(pos)
    out = {}
    for k, t in tensors.items():
      if t.storage.key not in offsets:
        raise ValueError(f"{where}: storage of {k} is missing")
      start, nbytes = offsets[t.storage.key]
      f.seek(start)
      out[k] = _materialize(t, f.read(nbytes), byteorder, where, k)
    return out


def _select_tensors(obj, where: str, wanted) -> dict[str, _LazyTensor]:
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]  # a training checkpoint that wraps the state dict
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: holds a {type(obj).__name__}, expected a state dict")
  out = {}
  for k, v in obj.items():
    if isinstance(k, str) and wanted(k):
      if not isinstance(v, _LazyTensor):
        raise ValueError(f"{where}: entry {k} is a {type(v).__name__}, not a tensor")
      out[k] = v
  return out


def read_torch_state_dict(path: str, wanted=lambda key: True) -> dict[str, np.ndarray]:
  """The tensors of a ``torch.save``'d state dict as numpy arrays, without torch.

  Args:
    path: a zip-container or legacy ``.pth`` file.
    wanted: which keys to read; the others' bytes are never loaded (the
      torchvision file is 548 MB, 80 MB of which are the convolutions).

  Raises:
    ValueError: naming the file, when it is not a torch.save file, pickles
      anything beyond tensors and dicts, or is truncated.
  """
  path = _check_file(path)
  where = f"torch weights file {path}"
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(b"PK"):
    return _torch_state_dict_zip(path, where, wanted)
  if head.startswith(b"\x80\x02\x8a\x0a"):  # pickle protocol 2, then a 10-byte long
    return _torch_state_dict_legacy(path, where, wanted)
  raise ValueError(f"{where} is neither a zip nor a legacy torch.save file (starts with "
                   f"{head!r}); very old tar-format files must be re-saved with torch first")


def read_torchvision_pth(path: str, convs: ConvStack, *, strict_shapes: bool = True) -> VGGWeights:
  """Reads torchvision's ``vgg19-dcbbb0f4.pth`` (or any vgg19 state dict) without torch.

  The 16 convolutions (``convs.names`` in order) are the ``features.N.weight``
  4-D tensors in increasing ``N`` (0, 2, 5, 7, ... 34 in torchvision); a ``module.`` prefix (DataParallel)
  is accepted. Kernels are OIHW and are transposed to HWIO. Retrained weights.

  Both the zip container (torch >= 1.6) and the older "legacy" stream of
  pickles are understood (:func:`read_torch_state_dict`). The pickle is read by
  an unpickler that only allows the few torch tensor-rebuilding names, each
  mapped to a numpy-building function, so a hostile file cannot run code.

  Returns:
    VGGWeights with TORCH preprocessing.
  """
  where = f"torch weights file {path}"

  def strip(k):
    return k[len("module."):] if k.startswith("module.") else k

  def wanted(k):
    parts = strip(k).split(".")
    return (len(parts) == 3 and parts[0] == "features" and parts[1].isdigit()
            and parts[2] in ("weight", "bias"))

  tensors = {strip(k): v for k, v in read_torch_state_dict(path, wanted).items()}
  weights = {int(k.split(".")[1]): v for k, v in tensors.items()
             if k.endswith(".weight") and v.ndim == 4}
  indices = sorted(weights)
  if len(indices) != len(convs.names):
    raise ValueError(f"{where}: expected the {len(convs.names)} convolutions of VGG19 as "
                     f"features.N.weight, found {len(indices)} ({indices})")
  if strict_shapes and tuple(indices) != TORCH_FEATURE_INDICES:
    raise ValueError(f"{where}: convolutions at features indices {indices}, torchvision's "
                     f"vgg19 has them at {list(TORCH_FEATURE_INDICES)} (a vgg19_bn or other model?)")
  params = {}
  for name, i in zip(convs.names, indices):
    bias = tensors.get(f"features.{i}.bias")
    if bias is None:
      raise ValueError(f"{where}: layer {name} (features.{i}) has no bias")
    params[name] = (np.transpose(weights[i], (2, 3, 1, 0)), bias)
  return VGGWeights(validate(params, where, convs, strict_shapes=strict_shapes), TORCH,
                    f"torchvision-pth:{os.path.abspath(path)}")


# ----------------------------------------------------------------------------- MatConvNet

MAT5_HEADER = b"MATLAB 5.0 MAT-file"


def _mat_str(v) -> str:
  if isinstance(v, str):
    return v
  arr = np.asarray(v)
  if arr.dtype.kind in "US":
    return "".join(str(s) for s in arr.ravel())
  return str(v)


def _unwrap(v):
  while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
    v = v.flat[0]
  if isinstance(v, np.ndarray) and v.dtype.names is not None and v.size == 1:
    v = v.reshape(())[()]  # structured scalar -> np.void record
  return v


_LOADMAT_CHILD = """
import pickle, sys
import scipy.io
mat = scipy.io.loadmat(sys.argv[1], variable_names=("layers", "meta", "normalization"))
with open(sys.argv[2], "wb") as f:
  pickle.dump({k: v for k, v in mat.items() if not k.startswith("__")}, f, protocol=5)
"""


def _loadmat(path: str, where: str, *, isolate: bool) -> dict:
  """``scipy.io.loadmat`` of the variables we need, optionally in a child process.

  scipy's MAT v5 reader can crash the interpreter (segfault) on a damaged
  uncompressed file; in a child process that becomes a ValueError naming the
  file. The child's pickle holds only what loadmat built (numpy arrays).
  """
  if not isolate:
    import scipy.io  # pylint: disable=g-import-not-at-top  (scipy ships with jax)
    try:
      return scipy.io.loadmat(path, variable_names=("layers", "meta", "normalization"))
    except Exception as e:  # scipy raises many types for damaged files
      raise ValueError(f"{where} cannot be read ({type(e).__name__}: {e}); it may be "
                       f"truncated") from e
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="jaxface-mat-") as tmp:
    out = os.path.join(tmp, "vars.pkl")
    proc = subprocess.run([sys.executable, "-c", _LOADMAT_CHILD, os.path.abspath(path), out],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
      why = (f"the MAT reader crashed (signal {-proc.returncode})" if proc.returncode < 0
             else last[:300])
      raise ValueError(f"{where} cannot be read ({why}); it may be truncated or damaged")
    with open(out, "rb") as f:
      return pickle.load(f)


def read_matconvnet_mat(path: str, convs: ConvStack, *, strict_shapes: bool = True,
                        spatial_order: str = "WH", isolate: bool = True) -> VGGWeights:
  """Reads MatConvNet's ``imagenet-vgg-verydeep-19.mat`` (MATLAB v5 format).

  Read with ``scipy.io.loadmat``: ``layers`` is a cell array of structs with
  ``name``, ``type`` and ``weights = {filters, biases}``; the mean pixel comes
  from ``normalization.averageImage`` (or ``meta.normalization.averageImage``)
  in 0-255 RGB. ``loadmat`` keeps MATLAB's index order (a MATLAB array
  ``F(i, j, k, l)`` becomes ``F[i, j, k, l]``), and the filters in this file are
  stored ``[W, H, Cin, Cout]`` as in the widely used TensorFlow ports of it
  (anishathalye/neural-style, lengstrom/fast-style-transfer), so they are
  transposed to HWIO.

  Args:
    path: the .mat file.
    convs: the network's convolutions (filled in file order).
    strict_shapes: see ``validate``.
    spatial_order: how the first two filter axes are stored: "WH" (the
      published file, as the TensorFlow ports read it: transposed to HWIO) or
      "HW" (taken as is).
    isolate: run scipy's reader in a child process (about 1 s more), so that
      a damaged file that crashes it is a ValueError rather than a segfault.

  Returns:
    VGGWeights with preprocessing (RGB, scale 255, the file's mean pixel, std 1).
  """
  if spatial_order not in ("WH", "HW"):
    raise ValueError(f"spatial_order must be 'WH' or 'HW', got {spatial_order!r}")
  path = _check_file(path)
  where = f"MatConvNet weights file {path}"
  with open(path, "rb") as f:
    head = f.read(128)
  if not head.startswith(MAT5_HEADER):
    hint = (" (a MATLAB v7.3 file: re-save it with save(..., '-v7') in MATLAB)"
            if head.startswith(b"MATLAB 7.3") else "")
    raise ValueError(f"{where} is not a MATLAB v5 .mat file{hint}")
  mat = _loadmat(path, where, isolate=isolate)
  if "layers" not in mat:
    raise ValueError(f"{where}: no 'layers' variable; not a MatConvNet simplenn model")
  layers = [_unwrap(c) for c in np.asarray(mat["layers"], dtype=object).ravel()]
  conv_layers = []
  try:
    for layer in layers:
      names = layer.dtype.names or ()
      if "type" in names and _mat_str(_unwrap(layer["type"])) == "conv":
        conv_layers.append(layer)
  except (AttributeError, TypeError) as e:
    raise ValueError(f"{where}: 'layers' is not a cell array of layer structs ({e})") from e
  n = len(convs.names)
  if len(conv_layers) < n:
    raise ValueError(f"{where}: found {len(conv_layers)} conv layers, VGG19 needs {n} (plus the "
                     f"3 fully connected ones, which are ignored)")
  params = {}
  # VGG19's 16 3x3 convolutions come first; the classifier's fc layers are
  # also type 'conv' in MatConvNet (7x7 and 1x1 filters) and come after.
  for name, fname, layer in zip(convs.names, convs.matconvnet_names(), conv_layers[:n]):
    lname = _mat_str(_unwrap(layer["name"])) if "name" in layer.dtype.names else fname
    if "weights" in layer.dtype.names:
      w = np.asarray(layer["weights"], dtype=object).ravel()
      w = [_unwrap(x) for x in w]
      while len(w) == 1 and isinstance(w[0], np.ndarray) and w[0].dtype == object:
        w = [_unwrap(x) for x in w[0].ravel()]
    elif "filters" in layer.dtype.names:  # very old MatConvNet: separate fields
      w = [_unwrap(layer["filters"]), _unwrap(layer["biases"])]
    else:
      raise ValueError(f"{where}: layer {lname} has no weights")
    if len(w) != 2:
      raise ValueError(f"{where}: layer {lname} should hold {{filters, biases}}, found "
                       f"{len(w)} arrays")
    filters, biases = np.asarray(w[0]), np.asarray(w[1]).reshape(-1)
    if filters.ndim == 3:  # MATLAB drops a trailing singleton (Cout == 1)
      filters = filters[..., None]
    if filters.ndim != 4:
      raise ValueError(f"{where}: layer {lname} filters have shape {filters.shape}, expected "
                       f"4 axes")
    if spatial_order == "WH":
      filters = np.transpose(filters, (1, 0, 2, 3))
    if lname != fname and strict_shapes and lname.startswith("conv"):
      raise ValueError(f"{where}: the conv layer in place of {fname} is named {lname}")
    params[name] = (filters, biases)
  mean = _matconvnet_mean(mat, where)
  prep = Preprocessing("RGB", 255.0, mean, (1.0, 1.0, 1.0))
  return VGGWeights(validate(params, where, convs, strict_shapes=strict_shapes), prep,
                    f"matconvnet-mat:{os.path.abspath(path)}")


def _matconvnet_mean(mat: dict, where: str) -> tuple[float, float, float]:
  """Mean RGB pixel (0-255) from normalization.averageImage (a pixel or a whole image)."""
  norm = None
  if "normalization" in mat:
    norm = _unwrap(mat["normalization"])
  elif "meta" in mat:
    meta = _unwrap(mat["meta"])
    if meta.dtype.names and "normalization" in meta.dtype.names:
      norm = _unwrap(meta["normalization"])
  if norm is None or not norm.dtype.names or "averageImage" not in norm.dtype.names:
    raise ValueError(f"{where}: no normalization.averageImage (the mean pixel)")
  avg = np.asarray(_unwrap(norm["averageImage"]), dtype=np.float64)
  if avg.size % 3 or avg.size == 0 or (avg.ndim >= 1 and avg.shape[-1] != 3 and avg.size != 3):
    raise ValueError(f"{where}: averageImage has shape {avg.shape}, expected [..., 3]")
  mean = avg.reshape(-1, 3).mean(axis=0)
  if not np.all(np.isfinite(mean)):
    raise ValueError(f"{where}: averageImage holds NaN or infinite values")
  return tuple(float(v) for v in mean)


# ----------------------------------------------------------------------------- dispatch

def detect_format(path: str) -> str:
  """"keras-h5", "torchvision-pth" or "matconvnet-mat", from the file's first bytes.

  Raises:
    ValueError: naming the file when it is none of them.
  """
  path = _check_file(path)
  with open(path, "rb") as f:
    head = f.read(1024)
  if head.startswith(HDF5_SIGNATURE):
    return "keras-h5"
  if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a\x0a"):
    return "torchvision-pth"
  if head.startswith(MAT5_HEADER) or head.startswith(b"MATLAB"):
    return "matconvnet-mat"
  if len(head) >= 520 and head[512:520] == HDF5_SIGNATURE:  # HDF5 with a user block (.mat v7.3)
    return "matconvnet-mat"
  if not head:
    raise ValueError(f"VGG19 weight file {path} is empty")
  raise ValueError(f"VGG19 weight file {path} is not a Keras .h5, torch .pth or MatConvNet "
                   f".mat file (it starts with {head[:16]!r})")


READERS = {"keras-h5": read_keras_h5, "torchvision-pth": read_torchvision_pth,
           "matconvnet-mat": read_matconvnet_mat}


def read_vgg19(path: str, convs: ConvStack, *, strict_shapes: bool = True) -> VGGWeights:
  """Reads any of the three formats, detected from the file's content, into ``convs``' names.

  Every reader validates the 16 convolutions (3x3 kernels, channel chain
  3->64->64->128->...->512, bias length, finite values; :func:`validate`) and
  raises ``ValueError`` naming the file (and layer) before any compute.
  """
  return READERS[detect_format(path)](path, convs, strict_shapes=strict_shapes)
