"""Reads the tensors of a PyTorch checkpoint (.ckpt / .pt / .pth / .bin written by torch.save)
without torch, and without running code from the file.

The format (torch >= 1.6): an uncompressed zip whose entries lie under one folder (`archive/`
mostly). `data.pkl` is the pickled object; it names each tensor's storage by a key (a pickle
persistent id), and the storage's raw bytes are the entry `data/<key>` (little endian unless the
entry `byteorder` says `big`). A tensor is a call of a rebuild function with its storage, offset,
shape and stride.

Unpickling calls whatever the pickle names, so pickle.load can run any code. SafeUnpickler never
imports anything: `find_class` resolves a global only to
  * tensor rebuilders, replaced by our own: torch._utils._rebuild_tensor_v2 / _v3,
    _rebuild_parameter, _rebuild_parameter_with_state, torch._tensor._rebuild_from_type_v2 (of a
    plain tensor or Parameter). Tensors become numpy arrays of the storage bytes with their
    dtype, shape, stride and offset; bfloat16 becomes float32.
  * markers and plain containers: torch.<Type>Storage, torch(.storage).UntypedStorage,
    torch.<dtype>, torch.Size (a tuple), collections.OrderedDict, torch.Tensor and
    torch.nn.Parameter (as the type argument of _rebuild_from_type_v2), and the bytes of
    protocol 2 (_codecs.encode of latin-1 text, builtins.bytes of nothing).
  * inert stand-ins for the metadata of Lightning checkpoints (callbacks, hyper_parameters,
    loop states): the classes under pytorch_lightning / lightning / lightning_fabric / omegaconf
    and the plain classes of _INERT (argparse.Namespace, paths, numpy scalars and arrays,
    builtin types). A stand-in is never the real class: it is built from nothing and what it
    holds is dropped, which is fine as the weights live in 'state_dict'.
Any other global (os.system, builtins.eval, open, subprocess, ...) raises ConversionError naming
it. Tensor data is read only for the tensors returned ('state_dict'), not for optimizer states.
The pre-1.6 format (pickles and storages in one stream) is read the same way; the tar format of
torch < 0.4 is refused with one line.
"""
from __future__ import annotations

import pickle
import zipfile

import numpy as np

from ldm_jax.errors import ConversionError

# Element types of storages and tensors: numpy dtype strings, 'bf16' for bfloat16 (read as
# 16-bit words and widened to float32, which holds every bfloat16 exactly).
_STORAGES = {"DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2",
             "BFloat16Storage": "bf16", "LongStorage": "i8", "IntStorage": "i4",
             "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
             "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16", "UntypedStorage": "u1"}
_DTYPES = {"float64": "f8", "double": "f8", "float32": "f4", "float": "f4", "float16": "f2",
           "half": "f2", "bfloat16": "bf16", "int64": "i8", "long": "i8", "int32": "i4",
           "int": "i4", "int16": "i2", "short": "i2", "int8": "i1", "uint8": "u1",
           "uint16": "u2", "uint32": "u4", "uint64": "u8", "bool": "?", "complex64": "c8",
           "cfloat": "c8", "complex128": "c16", "cdouble": "c16"}
_INERT_PACKAGES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.",
                   "numpy.dtypes.")
_INERT = {"argparse.Namespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
          "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib._local.PosixPath",
          "pathlib._local.WindowsPath", "numpy.dtype", "numpy.ndarray",
          "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
          "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
          "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
          "torch.torch_version.TorchVersion", "torch.device", "typing.Any",
          "collections.defaultdict", "datetime.datetime", "datetime.timedelta",
          *(f"builtins.{t}" for t in ("object", "set", "frozenset", "slice", "list", "dict",
                                      "tuple", "int", "float", "str", "bool", "complex"))}


def _raw(kind: str, big_endian: bool) -> np.dtype:
  """The numpy dtype the bytes of `kind` are read as (bfloat16 as 16-bit words)."""
  dtype = np.dtype("u2" if kind == "bf16" else kind).newbyteorder(">" if big_endian else "<")
  return dtype.newbyteorder("=") if dtype.isnative else dtype


class _Marker:
  """A storage type or dtype named by the pickle: only its element type matters."""

  def __init__(self, name: str, kind: str):
    self.name, self.kind = name, kind


class _Inert:
  """Base of the stand-ins of metadata classes: accepts whatever the pickle does with an
  instance (construction, state, items) and keeps nothing."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values


class _Storage:
  """A storage of the file: its zip entry, read when a returned tensor needs it."""

  def __init__(self, reader, key: str, kind: str):
    self.reader, self.key, self.kind = reader, key, kind
    self._bytes = None

  def bytes(self) -> np.ndarray:
    if self._bytes is None:
      self._bytes = self.reader.storage_bytes(self.key)
    return self._bytes


class TensorRef:
  """A tensor of the file, materialised by `array()`: storage, element type, offset (in
  elements), shape and strides (in elements), as torch's rebuild functions receive them."""

  def __init__(self, storage, offset, size, stride, kind=None):
    if not isinstance(storage, _Storage):
      raise ConversionError(f"a tensor's storage is a {type(storage).__name__}")
    self.storage, self.kind = storage, kind or storage.kind
    self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)
    if len(self.size) != len(self.stride) or min(self.size + self.stride + (self.offset,),
                                                 default=0) < 0:
      raise ConversionError(f"a tensor has shape {self.size}, stride {self.stride} and offset "
                            f"{self.offset}")

  def array(self, big_endian: bool = False) -> np.ndarray:
    """The tensor's elements; a view of the storage when contiguous (as torch shares it)."""
    raw = _raw(self.kind, big_endian)
    if 0 in self.size:
      a = np.zeros(self.size, raw)
    else:
      data = self.storage.bytes()
      count = data.size // raw.itemsize
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if last >= count:
        raise ConversionError(f"storage {self.storage.key} holds {count} elements, a tensor of "
                              f"shape {self.size} and stride {self.stride} reads element {last}")
      elements = data[:count * raw.itemsize].view(raw)[self.offset:]
      a = np.lib.stride_tricks.as_strided(
          elements, self.size, tuple(s * raw.itemsize for s in self.stride), writeable=False)
      if a.flags.c_contiguous:
        a = elements[:a.size].reshape(self.size)      # a writable view, not a copy
      else:
        a = a.copy()
    if not raw.isnative:
      a = a.astype(raw.newbyteorder("="))
    if self.kind == "bf16":
      a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  del requires_grad, hooks, unused
  if not isinstance(dtype, _Marker):
    raise ConversionError(f"a tensor's dtype is a {type(dtype).__name__}")
  return TensorRef(storage, offset, size, stride, dtype.kind)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _rebuild_from_type(func, new_type, args, state):
  del state
  if new_type not in (_TENSOR_TYPE, _PARAMETER_TYPE):
    raise ConversionError(f"a tensor of type {getattr(new_type, 'name', new_type)}")
  return func(*args)


def _latin1(text, encoding="latin1"):
  """_codecs.encode as protocol 2 pickles bytes: encode(bytes decoded as latin-1, 'latin1')."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ConversionError(f"_codecs.encode of a {type(text).__name__} to {encoding!r}")
  return text.encode("latin1")


def _empty_bytes():
  """builtins.bytes as protocol 2 pickles b''."""
  return b""


def _reconstructor(cls, base, state):
  """copyreg._reconstructor of an inert class: an empty stand-in."""
  del base, state
  return cls() if isinstance(cls, type) and issubclass(cls, _Inert) else _Inert()


_TENSOR_TYPE = _Marker("torch.Tensor", "")
_PARAMETER_TYPE = _Marker("torch.nn.parameter.Parameter", "")
_REBUILDERS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch._utils._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TENSOR_TYPE, "torch._tensor.Tensor": _TENSOR_TYPE,
    "torch.nn.parameter.Parameter": _PARAMETER_TYPE,
    "torch.storage.UntypedStorage": _Marker("torch.storage.UntypedStorage", "u1"),
    "torch.Size": tuple, "collections.OrderedDict": dict, "copyreg._reconstructor": _reconstructor,
    "_codecs.encode": _latin1, "builtins.bytes": _empty_bytes,
}


class ScriptModule:
  """Stand-in of a TorchScript module class (`__torch__.<...>`) in a TorchScript archive's
  data.pkl: keeps the attributes the pickle gives it (tensors, child modules, numbers), never
  the class's code."""

  def __init__(self, *args):
    del args
    self.attributes: dict = {}

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise ConversionError(f"a TorchScript module's state is a {type(state).__name__}")
    self.attributes = state


# TorchScript's pickles wrap lists and type tags in these; each returns the plain value.
_SCRIPT_HELPERS = {
    **{f"torch.jit._pickle.build_{kind}list": list
       for kind in ("int", "double", "bool", "tensor", "generic")},
    "torch.jit._pickle.restore_type_tag": lambda value, type_str: value,
}


class SafeUnpickler(pickle.Unpickler):
  """Unpickles the object of a torch checkpoint from the allow-list of the module docstring;
  with `script=True` also TorchScript module classes, as ScriptModule stand-ins."""

  def __init__(self, file, reader, path: str, script: bool = False):
    super().__init__(file)
    self.reader, self.path, self.script = reader, path, script
    self.storages: dict[str, _Storage] = {}
    self.inert: dict[str, type] = {}

  def find_class(self, module, name):
    full = f"{module}.{name}"
    if self.script and module.startswith("__torch__."):
      return type(name, (ScriptModule,), {"global_name": full})
    if self.script and full in _SCRIPT_HELPERS:
      return _SCRIPT_HELPERS[full]
    if full in _REBUILDERS:
      return _REBUILDERS[full]
    if module == "torch" and name in _STORAGES:
      return _Marker(full, _STORAGES[name])
    if module == "torch" and name in _DTYPES:
      return _Marker(full, _DTYPES[name])
    if module == "torch" and name.startswith(("float8", "qint", "quint", "complex32")):
      raise ConversionError(f"'{self.path}' holds tensors of dtype {full}, which ldm_jax does "
                            f"not read")
    if full in _INERT or full.startswith(_INERT_PACKAGES):
      if full not in self.inert:
        self.inert[full] = type(name, (_Inert,), {"global_name": full})
      return self.inert[full]
    raise ConversionError(
        f"'{self.path}' refers to {full}, which a checkpoint of tensors does not need: refused "
        f"(ldm_jax unpickles only tensors, plain containers and Lightning metadata)")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
        or not isinstance(pid[1], _Marker) or not isinstance(pid[2], str)):
      raise ConversionError(f"'{self.path}' has a storage reference of an unknown form: "
                            f"{str(pid)[:100]}")
    if len(pid) > 5 and pid[5] is not None:
      raise ConversionError(f"'{self.path}' holds a storage view (pre-1.6 format), which ldm_jax "
                            f"does not read")
    key = pid[2]
    if key not in self.storages:
      self.storages[key] = _Storage(self.reader, key, pid[1].kind)
    return self.storages[key]


class _ZipReader:
  """The entries of a torch zip checkpoint."""

  def __init__(self, zf: zipfile.ZipFile, path: str):
    self.zf, self.path = zf, path
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
      raise ConversionError(f"'{path}' is a zip file but not a PyTorch checkpoint (it has no "
                            f"<folder>/data.pkl)")
    self.prefix = pickles[0][:-len("data.pkl")]
    names = set(zf.namelist())
    order = self.prefix + "byteorder"
    self.big_endian = order in names and zf.read(order).strip() == b"big"

  def storage_bytes(self, key: str) -> np.ndarray:
    name = f"{self.prefix}data/{key}"
    try:
      return np.frombuffer(bytearray(self.zf.read(name)), np.uint8)
    except KeyError:
      raise ConversionError(f"'{self.path}' lacks the tensor data {name}") from None


class _LegacyReader:
  """A checkpoint of the pre-1.6 format (torch.save(_use_new_zipfile_serialization=False)): in
  one stream, pickles of torch's magic number, the format version and the system info, the
  object, the sorted storage keys; then each storage as an int64 element count and its bytes."""
  MAGIC = 0x1950a86a20f9469cfc6c

  def __init__(self, f, path: str):
    self.f, self.path, self.offsets = f, path, {}
    if self._small() != self.MAGIC:
      raise ConversionError(f"'{path}' is a pickle but not a PyTorch checkpoint (no torch magic "
                            f"number): ldm_jax reads only tensors saved by torch.save")
    self._small()
    info = self._small()
    self.big_endian = isinstance(info, dict) and info.get("little_endian") is False

  def _small(self):
    return SafeUnpickler(self.f, self, self.path).load()

  def load(self):
    unpickler = SafeUnpickler(self.f, self, self.path)
    obj = unpickler.load()
    keys = self._small()
    pos = self.f.tell()
    end = self.f.seek(0, 2)
    for key in keys:
      if key not in unpickler.storages:
        raise ConversionError(f"storage {key} is listed but no tensor uses it")
      self.f.seek(pos)
      count = int.from_bytes(self.f.read(8), "big" if self.big_endian else "little")
      nbytes = count * _raw(unpickler.storages[key].kind, False).itemsize
      if pos + 8 + nbytes > end:
        raise ConversionError(f"storage {key} ends past the end of the file (truncated?)")
      self.offsets[key] = (pos + 8, nbytes)
      pos += 8 + nbytes
    return obj

  def storage_bytes(self, key: str) -> np.ndarray:
    if key not in self.offsets:
      raise ConversionError(f"'{self.path}' lacks the data of storage {key}")
    start, nbytes = self.offsets[key]
    self.f.seek(start)
    return np.frombuffer(bytearray(self.f.read(nbytes)), np.uint8)


def _one_line(e: Exception) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _arrays(obj, path: str, big_endian: bool) -> dict[str, np.ndarray]:
  """The tensors of an unpickled checkpoint's state dict: its 'state_dict' (Lightning) or
  itself."""
  state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(state, dict):
    raise ConversionError(f"'{path}' holds no state dict (found {type(obj).__name__})")
  return {k: v.array(big_endian) for k, v in state.items()
          if isinstance(k, str) and isinstance(v, TensorRef)}


def _read(path: str, is_zip: bool) -> dict[str, np.ndarray]:
  if is_zip:
    with zipfile.ZipFile(path) as zf:
      reader = _ZipReader(zf, path)
      with zf.open(reader.prefix + "data.pkl") as f:
        return _arrays(SafeUnpickler(f, reader, path).load(), path, reader.big_endian)
  with open(path, "rb") as f:
    reader = _LegacyReader(f, path)
    return _arrays(reader.load(), path, reader.big_endian)


def _module_tensors(module: ScriptModule, prefix: str, big_endian: bool, out: dict):
  for key, value in module.attributes.items():
    if isinstance(value, TensorRef):
      out[prefix + key] = value.array(big_endian)
    elif isinstance(value, ScriptModule):
      _module_tensors(value, f"{prefix}{key}.", big_endian, out)
  return out


def load_script_tensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive (torch.jit.save) by dotted attribute name
  ('net.layers.conv.weight'), read like load_state_dict: the module classes become inert
  stand-ins and the archive's code is never run (nor read)."""
  try:
    zf = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ConversionError(f"'{path}' is not a TorchScript archive ({_one_line(e)})") from None
  try:
    with zf:
      reader = _ZipReader(zf, path)
      with zf.open(reader.prefix + "data.pkl") as f:
        root = SafeUnpickler(f, reader, path, script=True).load()
      if not isinstance(root, ScriptModule):
        raise ConversionError(f"'{path}' holds a {type(root).__name__}, not a TorchScript "
                              f"module")
      return _module_tensors(root, "", reader.big_endian, {})
  except ConversionError as e:
    message = str(e)
    raise ConversionError(message if path in message else f"'{path}': {message}") from None
  except Exception as e:  # pylint: disable=broad-except  # anything a damaged file raises
    raise ConversionError(f"'{path}' is a damaged TorchScript archive ({_one_line(e)})") from None


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of the checkpoint's state dict ('state_dict' of a Lightning checkpoint, or the
  pickled dict itself) as numpy arrays; entries that are not tensors are left out."""
  try:
    with open(path, "rb") as f:
      head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
  except OSError as e:
    raise ConversionError(f"cannot read '{path}' ({_one_line(e)})") from None
  if not is_zip and head[:1] != b"\x80":
    if head.startswith(b"PK"):
      what = "a damaged zip archive (truncated, or not fully downloaded?)"
    elif _is_tar(path):
      what = ("a PyTorch checkpoint of the tar format (torch < 0.4), which ldm_jax does not "
              "read: re-save it with a newer torch.save, or convert it to .safetensors")
    else:
      what = "not a PyTorch checkpoint (not a zip archive, nor a pickle)"
    raise ConversionError(f"'{path}' is {what}")
  try:
    return _read(path, is_zip)
  except ConversionError as e:
    message = str(e)
    raise ConversionError(message if path in message else f"'{path}': {message}") from None
  except Exception as e:  # pylint: disable=broad-except  # anything a damaged file raises
    raise ConversionError(f"'{path}' is a damaged PyTorch checkpoint ({_one_line(e)})") from None


def _is_tar(path: str) -> bool:
  import tarfile  # pylint: disable=g-import-not-at-top
  try:
    return tarfile.is_tarfile(path)
  except OSError:
    return False
