"""Pickled checkpoints are read without torch and without running code from the file; damaged
.ckpt and .safetensors files fail with one line naming the file.

The checkpoints here are written by hand in torch's zip layout (archive/data.pkl whose
persistent ids name the storages archive/data/<key>), with the globals torch.save writes.
"""
import io
import json
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from ldm_jax.interop import ConversionError, read_state_dict
from ldm_jax.interop.convert import main as convert_main
from tests.interop.helpers import compvis_state


# ---------------------------------------------------------------------------------------------
# A torch-layout writer that needs no torch
# ---------------------------------------------------------------------------------------------
class Global:
  """A global named in the pickle (module, name), whatever Python has under that name."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called")


class Call:
  """Pickles as a call of `func` (a Global) with `args`."""

  def __init__(self, func: Global, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


class NewObj:
  """Pickles as protocol 2 writes an instance of a plain class: NEWOBJ of `cls` (a Global),
  then BUILD with `state`."""

  def __init__(self, cls: Global, state):
    self.cls, self.state = cls, state


class Storage:
  """A storage: its key, torch type name and raw bytes."""

  def __init__(self, key: str, type_name: str, data: bytes, numel: int):
    self.key, self.type_name, self.data, self.numel = key, type_name, data, numel


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access  # the Python one: save()
  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      module, _, name = f"torch.{obj.type_name}".rpartition(".")
      return ("storage", Global(module, name), obj.key, "cpu", obj.numel)
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    if isinstance(obj, NewObj):
      self.save(obj.cls)
      self.save(())
      self.write(pickle.NEWOBJ)
      self.save(obj.state)
      self.write(pickle.BUILD)
      return
    super().save(obj, save_persistent_id)


_TYPES = {"f4": "FloatStorage", "f2": "HalfStorage", "f8": "DoubleStorage", "i8": "LongStorage",
          "i4": "IntStorage", "i2": "ShortStorage", "i1": "CharStorage", "u1": "ByteStorage",
          "b1": "BoolStorage"}


def storage_of(key: str, a: np.ndarray, big_endian=False) -> Storage:
  a = np.ascontiguousarray(a).ravel()
  data = a.astype(a.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
  return Storage(key, _TYPES[a.dtype.str[1:]], data, a.size)


def bf16_storage(key: str, a: np.ndarray) -> Storage:
  """bfloat16 storage of float32 values (their upper 16 bits)."""
  bits = (np.ascontiguousarray(a, np.float32).ravel().view(np.uint32) >> 16).astype("<u2")
  return Storage(key, "BFloat16Storage", bits.tobytes(), bits.size)


def tensor(storage: Storage, shape, stride=None, offset=0):
  """torch.save's form of a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
  if stride is None:
    stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
  return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, tuple(shape),
              tuple(stride), False, Call(Global("collections", "OrderedDict")))


def _storages(obj, found):
  if isinstance(obj, Storage):
    found[obj.key] = obj
  elif isinstance(obj, Call):
    _storages(obj.args, found)
  elif isinstance(obj, NewObj):
    _storages(obj.state, found)
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _storages(k, found)
      _storages(v, found)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _storages(v, found)
  return found


def write_ckpt(path, obj, big_endian=False, skip=()):
  """`obj` as torch.save writes it: a stored zip of archive/data.pkl and archive/data/<key>
  (storages whose key is in `skip` are left out)."""
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "big" if big_endian else "little")
    for key, s in _storages(obj, {}).items():
      if key not in skip:
        zf.writestr(f"archive/data/{key}", s.data)
    zf.writestr("archive/version", "3\n")
  return str(path)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
def test_tensors_round_trip_exactly(tmp_path):
  rng = np.random.default_rng(0)
  f32 = rng.normal(size=(2, 3)).astype(np.float32)
  f16 = rng.normal(size=(4,)).astype(np.float16)
  bf = rng.normal(size=(3, 2)).astype(np.float32)
  bf_exact = ((bf.view(np.uint32) >> 16) << 16).view(np.float32)   # the bfloat16 values
  i64 = np.array([[-(2 ** 40), 7], [0, 2 ** 62]], np.int64)
  u16 = np.array([1, 65535, 7], np.uint16)
  base = np.arange(12, dtype=np.float32)                           # a 3x4 storage
  shared = storage_of("5", base)
  state = {
      "f32": tensor(storage_of("0", f32), (2, 3)),
      "f16": tensor(storage_of("1", f16), (4,)),
      "bf16": tensor(bf16_storage("2", bf), (3, 2)),
      "i64": tensor(storage_of("3", i64), (2, 2)),
      "transposed": tensor(shared, (4, 3), stride=(1, 4)),         # base.reshape(3, 4).T
      "row": tensor(shared, (2, 2), offset=8),                     # base[8:12] as 2x2
      "strided": tensor(shared, (2, 3), stride=(6, 2), offset=1),  # base[1::2] as 2x3
      "empty": tensor(storage_of("6", np.zeros(0, np.float32)), (0, 3)),
      "scalar": tensor(storage_of("7", np.array([2.5], np.float64)), ()),
      # uint16 as torch >= 2.3 saves it: untyped storage, _rebuild_tensor_v3 with the dtype
      "u16": Call(Global("torch._utils", "_rebuild_tensor_v3"),
                  Storage("8", "storage.UntypedStorage", u16.astype("<u2").tobytes(), 6), 1,
                  (2,), (1,), False, Call(Global("collections", "OrderedDict")),
                  Global("torch", "uint16")),
  }
  got = read_state_dict(write_ckpt(tmp_path / "m.ckpt", state))
  want = {"f32": f32, "f16": f16, "bf16": bf_exact, "i64": i64,
          "transposed": base.reshape(3, 4).T, "row": base[8:].reshape(2, 2),
          "strided": base[1::2].reshape(2, 3), "empty": np.zeros((0, 3), np.float32),
          "scalar": np.array(2.5), "u16": u16[1:]}
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def write_legacy(path, obj):
  """`obj` as torch.save(_use_new_zipfile_serialization=False) writes it: pickles of the magic
  number, version and system info, the object and the sorted storage keys, then per storage an
  int64 element count and the bytes."""
  storages = _storages(obj, {})
  with open(path, "wb") as f:
    for head in (0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(head, f, protocol=2)
    _Pickler(f, protocol=2).dump(obj)
    pickle.dump(sorted(storages), f, protocol=2)
    for key in sorted(storages):
      f.write(storages[key].numel.to_bytes(8, "little") + storages[key].data)
  return str(path)


def test_pre_1_6_format_reads(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  shared = storage_of("9", np.arange(10, dtype=np.int64))
  obj = _lightning({"a": tensor(storage_of("1", a), (2, 3)), "b": tensor(shared, (3,), (2,), 1)})
  got = read_state_dict(write_legacy(tmp_path / "old.pt", obj))
  np.testing.assert_array_equal(got["a"], a)
  np.testing.assert_array_equal(got["b"], np.array([1, 3, 5]))
  cut = tmp_path / "old_cut.pt"
  cut.write_bytes((tmp_path / "old.pt").read_bytes()[:-9])
  with pytest.raises(ConversionError, match="past the end of the file") as excinfo:
    read_state_dict(str(cut))
  _one_line(excinfo, cut)


def test_reading_needs_no_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)     # as if torch were not installed
  a = np.arange(3, dtype=np.float16)
  got = read_state_dict(write_ckpt(tmp_path / "m.ckpt", {"a": tensor(storage_of("0", a), (3,))}))
  np.testing.assert_array_equal(got["a"], a)


def test_big_endian_storages(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
  path = write_ckpt(tmp_path / "be.ckpt", {"a": tensor(storage_of("0", a, True), (2, 3))},
                    big_endian=True)
  np.testing.assert_array_equal(read_state_dict(path)["a"], a)


def _lightning(state):
  """A Lightning checkpoint around `state`, with the metadata such files hold: a callback class
  as a dict key, an argparse.Namespace (protocol 0/1 and 2 forms), an omegaconf DictConfig, a
  numpy scalar, optimizer tensors."""
  namespace = Call(Global("copyreg", "_reconstructor"), Global("argparse", "Namespace"),
                   Global("builtins", "object"), None)
  config = NewObj(Global("omegaconf.dictconfig", "DictConfig"),
                  {"_content": {"lr": 1e-4}, "_metadata": NewObj(
                      Global("omegaconf.base", "ContainerMetadata"), {"key_type": None})})
  score = Call(Global("numpy.core.multiarray", "scalar"), "f8", b"\0" * 8)
  moment = storage_of("opt0", np.ones(3, np.float32))
  return {
      "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
      "state_dict": state,
      "callbacks": {Global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
                    {"best_model_score": score, "dirpath": "/logs"}},
      "hyper_parameters": {"args": namespace, "config": config,
                           "ns": NewObj(Global("argparse", "Namespace"), {"lr": 1e-4})},
      "optimizer_states": [{"state": {0: {"exp_avg": tensor(moment, (3,))}}}],
  }


def test_lightning_checkpoint_gives_its_state_dict(tmp_path):
  """Metadata classes become inert stand-ins; optimizer tensors are never read (their storage
  is missing from this file)."""
  w = np.arange(4, dtype=np.float32)
  obj = _lightning({"model.w": tensor(storage_of("0", w), (4,)), "model.n": 7})
  got = read_state_dict(write_ckpt(tmp_path / "l.ckpt", obj, skip={"opt0"}))
  assert list(got) == ["model.w"]
  np.testing.assert_array_equal(got["model.w"], w)


def test_compvis_fixture_as_ckpt_reads_like_its_safetensors(tmp_path):
  """The CompVis fixture state (as float32 and float16 .ckpt) through the pickle reader."""
  state = compvis_state("kl_ae")
  half = {k: tensor(storage_of(str(i), v.astype(np.float16)), v.shape)
          for i, (k, v) in enumerate(state.items())}
  got = read_state_dict(write_ckpt(tmp_path / "kl.ckpt", _lightning(half), skip={"opt0"}))
  assert set(got) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(got[k], v.astype(np.float16), err_msg=k)
  full = {k: tensor(storage_of(str(i), v), v.shape) for i, (k, v) in enumerate(state.items())}
  got = read_state_dict(write_ckpt(tmp_path / "kl32.ckpt", full))
  for k, v in state.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def _one_line(excinfo, path):
  message = str(excinfo.value)
  assert "\n" not in message and str(path) in message, message
  return message


@pytest.mark.parametrize("where", ["top", "state_dict", "hyper_parameters"])
@pytest.mark.parametrize("module,name,args", [
    ("builtins", "open", ("{target}", "w")),
    ("os", "system", ("touch {target}",)),
    ("posix", "system", ("touch {target}",)),
    ("subprocess", "call", (["touch", "{target}"],)),
    ("builtins", "eval", ("open('{target}', 'w')",)),
    ("builtins", "exec", ("open('{target}', 'w')",)),
])
def test_code_in_the_pickle_is_refused(tmp_path, where, module, name, args):
  target = tmp_path / "created_by_the_pickle"

  def fill(a):
    return [fill(x) for x in a] if isinstance(a, list) else a.format(target=target)
  attack = Call(Global(module, name), *[fill(a) for a in args])
  w = tensor(storage_of("0", np.ones(2, np.float32)), (2,))
  obj = {"top": attack, "state_dict": {"w": w, "x": attack},
         "hyper_parameters": _lightning({"w": w})}[where]
  if where == "hyper_parameters":
    obj["hyper_parameters"]["cfg"] = attack
  path = write_ckpt(tmp_path / "evil.ckpt", obj, skip={"opt0"})
  with pytest.raises(ConversionError) as excinfo:
    read_state_dict(path)
  assert f"refers to {module}.{name}" in _one_line(excinfo, path)
  assert not target.exists()


def test_reduce_of_an_allowed_marker_or_unknown_persistent_id_is_refused(tmp_path):
  path = write_ckpt(tmp_path / "a.ckpt", {"w": Call(Global("torch", "FloatStorage"), "x")})
  with pytest.raises(ConversionError, match="damaged PyTorch checkpoint") as excinfo:
    read_state_dict(path)
  _one_line(excinfo, path)

  class OddPickler(_Pickler):
    def persistent_id(self, obj):
      return ("file", "/etc/passwd") if isinstance(obj, Storage) else None
  path = tmp_path / "b.ckpt"
  with zipfile.ZipFile(path, "w") as zf:
    buf = io.BytesIO()
    OddPickler(buf, protocol=2).dump({"w": Storage("0", "FloatStorage", b"", 0)})
    zf.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(ConversionError, match="storage reference of an unknown form") as excinfo:
    read_state_dict(str(path))
  _one_line(excinfo, path)


def test_convert_has_no_trust_pickle_option(capsys):
  with pytest.raises(SystemExit) as excinfo:
    convert_main(["compvis", "--ckpt", "m.ckpt", "--yaml", "m.yaml", "--out", "o",
                  "--trust_pickle"])
  assert excinfo.value.code == 2
  assert "--trust_pickle" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------
def _good_ckpt(tmp_path):
  a = np.arange(64, dtype=np.float32)
  return write_ckpt(tmp_path / "good.ckpt", {"state_dict": {"a": tensor(storage_of("0", a),
                                                                         (8, 8))}})


def _damaged_ckpts(tmp_path):
  good = open(_good_ckpt(tmp_path), "rb").read()
  files = {"truncated.ckpt": (good[:len(good) // 2], "damaged zip archive"),
           "garbage.ckpt": (b"this is not a checkpoint at all", "not a zip archive"),
           "empty.ckpt": (b"", "not a zip archive"),
           "legacy_cut.pt": (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "damaged"),
           "plain.pkl": (pickle.dumps({"a": 1}, protocol=2), "no torch magic number")}
  for name, (data, _) in files.items():
    (tmp_path / name).write_bytes(data)
  with zipfile.ZipFile(tmp_path / "nopkl.ckpt", "w") as zf:
    zf.writestr("archive/version", "3\n")
  with zipfile.ZipFile(tmp_path / "cutpkl.ckpt", "w") as zf:
    with zipfile.ZipFile(tmp_path / "good.ckpt") as src:
      zf.writestr("archive/data.pkl", src.read("archive/data.pkl")[:-20])
  write_ckpt(tmp_path / "nodata.ckpt", {"a": tensor(storage_of("0", np.ones(4)), (4,))},
             skip={"0"})
  write_ckpt(tmp_path / "overrun.ckpt", {"a": tensor(storage_of("0", np.ones(4)), (4,), (2,))})
  write_ckpt(tmp_path / "nodict.ckpt", [tensor(storage_of("0", np.ones(4)), (4,))])
  files.update({"nopkl.ckpt": (0, "no <folder>/data.pkl"), "cutpkl.ckpt": (0, "damaged"),
                "nodata.ckpt": (0, "lacks the tensor data archive/data/0"),
                "overrun.ckpt": (0, "holds 4 elements"), "nodict.ckpt": (0, "no state dict")})
  return {name: match for name, (_, match) in files.items()}


def test_damaged_ckpt_fails_with_one_line(tmp_path):
  for name, match in _damaged_ckpts(tmp_path).items():
    path = str(tmp_path / name)
    with pytest.raises(ConversionError, match=match) as excinfo:
      read_state_dict(path)
    _one_line(excinfo, path)


def test_damaged_safetensors_fails_with_one_line(tmp_path):
  good = tmp_path / "good.safetensors"
  save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(good))
  blob = good.read_bytes()
  header = b'{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}'   # no closing }
  bf16 = b'{"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}'
  files = {"truncated": blob[:-5], "garbage": b"this is no safetensors file at all",
           "short": b"abc", "empty": b"", "badjson": struct.pack("<Q", len(header)) + header,
           "bf16_truncated": struct.pack("<Q", len(bf16)) + bf16 + b"\0" * 6}
  for name, data in files.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    with pytest.raises(ConversionError, match="not a readable .safetensors file") as excinfo:
      read_state_dict(str(path))
    _one_line(excinfo, path)


def test_bfloat16_safetensors_still_reads(tmp_path):
  bf16 = json.dumps({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
  path = tmp_path / "bf.safetensors"
  path.write_bytes(struct.pack("<Q", len(bf16)) + bf16 + b"\x80\x3f\x00\x40")
  np.testing.assert_array_equal(read_state_dict(str(path))["a"], np.array([1.0, 2.0],
                                                                          np.float32))
