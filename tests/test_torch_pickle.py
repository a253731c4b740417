"""The restricted torch.save reader, on zip and legacy files written here without torch.

The writers below produce what ``torch.save`` produces: a protocol-2 pickle
whose tensors reduce to ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, backward_hooks)`` and whose storages are persistent
ids ``('storage', torch.<X>Storage, key, 'cpu', numel)`` (legacy: plus
``view_metadata``); the zip archive holds torch 2.x's records in its order
(``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>``..., ``version``, ``.data/serialization_id``), uncompressed, each
record's data aligned to 64 bytes by an ``FB`` padding field. torch's globals
are inert stand-ins written as pickle GLOBAL opcodes, so torch is not needed;
where torch is installed, the last tests check the writer and the reader
against the real ``torch.save`` / ``torch.load``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tailjax.backbones import torch_pickle as tp

# numpy dtype -> torch storage class name (torch/storage.py's _dtype_to_storage_type_map).
STORAGE_NAMES = {
    np.dtype("float64"): "DoubleStorage", np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage", np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage",
}


class TorchGlobal:
  """Stands in for a torch class or function; pickled as ``GLOBAL '<module> <name>'``."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("stand-ins are only ever pickled")


_GLOBALS: dict[tuple[str, str], TorchGlobal] = {}


def torch_global(module: str, name: str) -> TorchGlobal:
  # One object per name, so the pickler memoises repeats (BINGET) as torch's does.
  return _GLOBALS.setdefault((module, name), TorchGlobal(module, name))


class Storage:
  """A flat typed buffer; tensors built on the same Storage share its bytes in the file."""

  def __init__(self, data):
    self.data = np.ascontiguousarray(data).reshape(-1)


class Tensor:
  """What a torch tensor pickles to: a view (offset, size, stride in elements) of a Storage."""

  def __init__(self, storage: Storage, offset: int, shape, stride):
    self.storage, self.offset = storage, offset
    self.shape, self.stride = tuple(shape), tuple(stride)

  def __reduce__(self):
    return (torch_global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.shape, self.stride, False,
             collections.OrderedDict()))


def tensor(arr) -> Tensor:
  """A contiguous tensor over its own storage."""
  arr = np.asarray(arr)
  strides = [int(np.prod(arr.shape[i + 1:], dtype=np.int64)) for i in range(arr.ndim)]
  return Tensor(Storage(arr), 0, arr.shape, strides)


class Evil:
  """Reduces to ``module.name(arg)``: what a malicious checkpoint contains."""

  def __init__(self, module: str, name: str, arg: str):
    self.fn, self.arg = torch_global(module, name), arg

  def __reduce__(self):
    return self.fn, (self.arg,)


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit GLOBAL ourselves
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, f, legacy: bool):
    super().__init__(f, protocol=2)
    self.legacy = legacy
    self.storages: dict[int, tuple[str, Storage]] = {}

  def save_torch_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[TorchGlobal] = save_torch_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    # torch numbers storages "0", "1", ... in order of first appearance.
    key, _ = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))
    pid = ("storage", torch_global("torch", STORAGE_NAMES[obj.data.dtype]), key, "cpu",
           obj.data.size)
    return (*pid, None) if self.legacy else pid


def _pickle_state(state, legacy: bool) -> tuple[bytes, list[tuple[str, Storage]]]:
  buf = io.BytesIO()
  pickler = _TorchPickler(buf, legacy)
  pickler.dump(state)
  return buf.getvalue(), list(pickler.storages.values())


def write_zip_checkpoint(path, state, byteorder: str = "little", archive: str | None = None,
                         records: list[tuple[str, bytes]] | None = None) -> Path:
  """Writes ``state`` (nested dicts of :class:`Tensor`) as torch 2.x's ``torch.save`` does.

  ``archive``: the top-level folder (torch: the file's stem). ``records``:
  replaces the record list (name, bytes) after pickling, to build broken files.
  """
  path = Path(path)
  pkl, storages = _pickle_state(state, legacy=False)
  big = byteorder == "big"
  if records is None:
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", byteorder.encode())]
    records += [(f"data/{key}", (st.data.byteswap() if big else st.data).tobytes())
                for key, st in storages]
    records += [("version", b"3\n"), (".data/serialization_id", b"1" * 40)]
  archive = path.stem if archive is None else archive
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for name, data in records:
      info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
      # torch pads the local header with an 'FB' extra field so data starts on a
      # 64-byte boundary (30-byte header + name + 4-byte field header + padding).
      data_start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
      pad = -data_start % 64
      info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
      zf.writestr(info, data)
  return path


def write_legacy_checkpoint(path, state) -> Path:
  """Writes ``state`` in the pre-1.6 format: magic, protocol, sys_info, obj, keys, raw storages."""
  pkl, storages = _pickle_state(state, legacy=True)
  with open(path, "wb") as f:
    for header in (tp._LEGACY_MAGIC_NUMBER, tp._LEGACY_PROTOCOL_VERSION,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}):
      pickle.dump(header, f, protocol=2)
    f.write(pkl)
    pickle.dump([key for key, _ in storages], f, protocol=2)
    for _, st in storages:
      f.write(int(st.data.size).to_bytes(8, "little", signed=True))
      f.write(st.data.tobytes())
  return Path(path)


def _state_dict(entries) -> collections.OrderedDict:
  """An OrderedDict carrying ``_metadata``, as ``nn.Module.state_dict()`` returns."""
  sd = collections.OrderedDict(entries)
  sd._metadata = collections.OrderedDict({"": {"version": 1}, "bn1": {"version": 2}})
  return sd


def _all_dtypes(rng) -> dict[str, np.ndarray]:
  return {
      "f32": rng.standard_normal((3, 4)).astype(np.float32),
      "f16": rng.standard_normal((2, 3)).astype(np.float16),
      "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
      "f64": rng.standard_normal((2, 2, 2)),
      "i64": np.array(123456789012, np.int64),  # 0-d, like num_batches_tracked
      "i32": rng.integers(-2**31, 2**31 - 1, (4,), dtype=np.int32),
      "i16": rng.integers(-2**15, 2**15 - 1, (3,), dtype=np.int16),
      "i8": rng.integers(-128, 127, (6,), dtype=np.int8),
      "u8": rng.integers(0, 255, (2, 3), dtype=np.uint8),
      "bool": rng.random((7,)) > 0.5,
      "empty": np.zeros((0, 3), np.float32),
  }


def _assert_same(got: dict, want: dict):
  assert list(got) == list(want)
  for name, w in want.items():
    assert got[name].dtype == w.dtype, name
    assert got[name].shape == w.shape, name
    # Compare bytes: NaN-safe, and exact for bfloat16/bool too.
    np.testing.assert_array_equal(np.atleast_1d(got[name]).view(np.uint8),
                                  np.atleast_1d(np.ascontiguousarray(w)).view(np.uint8),
                                  err_msg=name)


# --------------------------------------------------------------------------- zip format

def test_zip_round_trips_every_dtype_bit_exactly(tmp_path):
  want = _all_dtypes(np.random.default_rng(0))
  path = write_zip_checkpoint(tmp_path / "dtypes.pth", _state_dict(
      (k, tensor(v)) for k, v in want.items()))
  got = tp.load_torch_state_dict(path)
  _assert_same(got, want)
  assert all(a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"] for a in got.values())


def test_zip_shared_storage_offsets_and_strides_are_rebuilt_exactly(tmp_path):
  base_24 = np.arange(24, dtype=np.float32) * 1.5
  shared = Storage(base_24)
  i, j = np.arange(3)[:, None], np.arange(2)[None, :]
  path = write_zip_checkpoint(tmp_path / "views.pth", _state_dict([
      ("whole", Tensor(shared, 0, (4, 6), (6, 1))),
      # offset 5, column-major-ish, non-contiguous: element [i, j] = storage[5 + 1*i + 6*j]
      ("view", Tensor(shared, 5, (3, 2), (1, 6))),
      ("broadcast", Tensor(shared, 23, (2, 3), (0, 0))),  # an expand()ed scalar
      ("nested", {"inner": {"last_row": Tensor(shared, 18, (6,), (1,))}}),
  ]))
  with zipfile.ZipFile(path) as zf:  # one storage record for all four tensors
    assert [n for n in zf.namelist() if "/data/" in n] == ["views/data/0"]
  got = tp.load_torch_state_dict(path)
  np.testing.assert_array_equal(got["whole"], base_24.reshape(4, 6))
  np.testing.assert_array_equal(got["view"], base_24[5 + i + 6 * j])
  np.testing.assert_array_equal(got["broadcast"], np.full((2, 3), base_24[23]))
  np.testing.assert_array_equal(got["nested.inner.last_row"], base_24[18:])
  # Sharing in the file does not alias the returned arrays.
  got["whole"][0, 0] = -1.0
  assert got["nested.inner.last_row"][0] == base_24[18] and got["view"][0, 0] == base_24[5]


def test_zip_big_endian_byteorder_record_is_honoured(tmp_path):
  want = {k: v for k, v in _all_dtypes(np.random.default_rng(1)).items()}
  path = write_zip_checkpoint(tmp_path / "big.pth", _state_dict(
      (k, tensor(v)) for k, v in want.items()), byteorder="big")
  _assert_same(tp.load_torch_state_dict(path), want)


def test_zip_archive_folder_is_taken_from_the_first_record(tmp_path):
  # torch.save to a buffer names the folder "archive", to a path the file's stem.
  path = write_zip_checkpoint(tmp_path / "x.pt", {"w": tensor(np.ones(2, np.float32))},
                              archive="archive")
  np.testing.assert_array_equal(tp.load_torch_state_dict(path)["w"], np.ones(2, np.float32))


@pytest.mark.parametrize("module, name, arg", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_global_is_refused_naming_the_file_and_never_runs(tmp_path, fmt, module, name,
                                                                     arg):
  marker = tmp_path / "pwned"
  state = _state_dict([("w", tensor(np.ones(2, np.float32))),
                       ("x", Evil(module, name, arg.format(marker=str(marker))))])
  path = tmp_path / f"evil_{fmt}.pth"
  (write_zip_checkpoint if fmt == "zip" else write_legacy_checkpoint)(path, state)
  with pytest.raises(pickle.UnpicklingError,
                     match=rf"evil_{fmt}\.pth: refused to load global '{module}\.{name}'"):
    tp.load_torch_state_dict(path)
  assert not marker.exists()


def test_a_refused_storage_type_in_a_persistent_id_is_refused(tmp_path):
  path = write_zip_checkpoint(tmp_path / "pid.pth", {"w": tensor(np.ones(2, np.float32))})
  with zipfile.ZipFile(path) as zf:
    records = [(n.split("/", 1)[1], zf.read(n)) for n in zf.namelist()]
  pkl = records[0][1].replace(b"ctorch\nFloatStorage\n", b"cos\nsystem\n")
  write_zip_checkpoint(path, {}, records=[("data.pkl", pkl), *records[1:]])
  with pytest.raises(pickle.UnpicklingError, match=r"pid\.pth: refused .*'os\.system'"):
    tp.load_torch_state_dict(path)


def test_broken_zip_files_give_errors_naming_the_file(tmp_path):
  good = write_zip_checkpoint(tmp_path / "good.pth",
                              {"w": tensor(np.arange(6, dtype=np.float32))})
  with zipfile.ZipFile(good) as zf:
    records = [(n.split("/", 1)[1], zf.read(n)) for n in zf.namelist()]

  cut = tmp_path / "cut.pth"
  cut.write_bytes(good.read_bytes()[:300])
  with pytest.raises(pickle.UnpicklingError, match=r"cut\.pth: corrupt or truncated"):
    tp.load_torch_state_dict(cut)

  no_data = write_zip_checkpoint(tmp_path / "nodata.pth", {}, records=[
      r for r in records if r[0] != "data/0"])
  with pytest.raises(pickle.UnpicklingError,
                     match=r"nodata\.pth: record 'nodata/data/0' is missing"):
    tp.load_torch_state_dict(no_data)

  short = write_zip_checkpoint(tmp_path / "short.pth", {}, records=[
      (n, d[:-4] if n == "data/0" else d) for n, d in records])
  with pytest.raises(pickle.UnpicklingError,
                     match=r"short\.pth: record .*data/0' holds 20 bytes.*24"):
    tp.load_torch_state_dict(short)

  oob = write_zip_checkpoint(tmp_path / "oob.pth", {"w": Tensor(
      Storage(np.zeros(4, np.float32)), 2, (2, 2), (2, 1))})
  with pytest.raises(pickle.UnpicklingError, match=r"oob\.pth: tensor w reads past the end"):
    tp.load_torch_state_dict(oob)

  not_tensors = write_zip_checkpoint(tmp_path / "model.pth", {"w": tensor(np.ones(1)),
                                                              "epoch": 3})
  with pytest.raises(ValueError, match=r"model\.pth: entry 'epoch' is a int, not a tensor"):
    tp.load_torch_state_dict(not_tensors)

  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    tp.load_torch_state_dict(tmp_path / "nowhere.pth")


# ------------------------------------------------------------- legacy format, dispatch, cache

def test_legacy_files_are_detected_and_read_by_the_same_loader(tmp_path):
  rng = np.random.default_rng(2)
  want = {"f32": rng.standard_normal((2, 3)).astype(np.float32),
          "bf16": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
          "i64": np.array(7, np.int64)}
  legacy = write_legacy_checkpoint(tmp_path / "old.pth", _state_dict(
      (k, tensor(v)) for k, v in want.items()))
  zipped = write_zip_checkpoint(tmp_path / "new.pth", _state_dict(
      (k, tensor(v)) for k, v in want.items()))
  _assert_same(tp.load_torch_state_dict(legacy), want)
  _assert_same(tp.load_legacy_torch_pickle(legacy), want)
  _assert_same(tp.load_torch_state_dict(zipped), want)
  with pytest.raises(ValueError, match=r"new\.pth: zip-format .*load_torch_state_dict"):
    tp.load_legacy_torch_pickle(zipped)


def test_cached_loader_reads_zip_files_and_keeps_bfloat16(tmp_path, monkeypatch):
  want = _all_dtypes(np.random.default_rng(3))
  path = write_zip_checkpoint(tmp_path / "w.pth", _state_dict(
      (k, tensor(v)) for k, v in want.items()))
  _assert_same(tp.load_torch_state_dict_cached(path, cache_dir=tmp_path / "cache"), want)

  def fail(p):
    raise AssertionError(f"re-parsed {p} despite the cache")

  monkeypatch.setattr(tp, "_load_zip", fail)
  _assert_same(tp.load_torch_state_dict_cached(path, cache_dir=tmp_path / "cache"), want)


# --------------------------------------------------------------- against real torch (optional)

def _torch_state(torch):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(30, generator=g)
  sd = collections.OrderedDict(
      f32=base,
      view=base[3:].view(3, 9)[:, ::2].t(),  # offset 3, strides (2, 9): non-contiguous
      f16=torch.randn(2, 3, generator=g).half(),
      bf16=torch.randn(4, generator=g).bfloat16(),
      f64=torch.randn(2, 2, generator=g).double(),
      i64=torch.tensor(12345678901),
      i32=torch.arange(-3, 3, dtype=torch.int32),
      i8=torch.arange(-4, 4, dtype=torch.int8),
      u8=torch.arange(250, 256, dtype=torch.uint8),
      bool=torch.tensor([True, False, True]),
  )
  sd._metadata = collections.OrderedDict({"": {"version": 1}})
  return sd


def _torch_to_numpy(torch, t):
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()


def test_reads_a_real_torch_save_file(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _torch_state(torch)
  assert sd["view"].storage_offset() == 3 and not sd["view"].is_contiguous()
  torch.save(sd, tmp_path / "real.pth")
  _assert_same(tp.load_torch_state_dict(tmp_path / "real.pth"),
               {k: _torch_to_numpy(torch, v) for k, v in sd.items()})
  torch.save(sd, tmp_path / "real_legacy.pth", _use_new_zipfile_serialization=False)
  _assert_same(tp.load_torch_state_dict(tmp_path / "real_legacy.pth"),
               {k: _torch_to_numpy(torch, v) for k, v in sd.items()})


def test_the_test_writer_matches_torch_save(tmp_path):
  torch = pytest.importorskip("torch")
  want = {k: v for k, v in _all_dtypes(np.random.default_rng(4)).items()}
  base = np.arange(12, dtype=np.float32)
  ours = write_zip_checkpoint(tmp_path / "ours.pth", _state_dict(
      [*((k, tensor(v)) for k, v in want.items()),
       ("view", Tensor(Storage(base), 2, (5, 2), (1, 5)))]))
  loaded = torch.load(ours, weights_only=True)
  _assert_same({k: _torch_to_numpy(torch, v) for k, v in loaded.items() if k != "view"}, want)
  np.testing.assert_array_equal(loaded["view"].numpy(), base[2:].reshape(2, 5).T)
  assert loaded["view"].stride() == (1, 5) and loaded["view"].storage_offset() == 2

  sd = collections.OrderedDict(
      (k, torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
       if v.dtype == ml_dtypes.bfloat16 else torch.tensor(v)) for k, v in want.items())
  sd["empty"] = torch.zeros(0, 3)  # torch.tensor(np.zeros((0, 3))) has strides (0, 0)
  sd["view"] = torch.arange(12, dtype=torch.float32)[2:].view(2, 5).t()
  sd._metadata = _state_dict([])._metadata
  torch.save(sd, tmp_path / "theirs.pth")
  with zipfile.ZipFile(ours) as a, zipfile.ZipFile(tmp_path / "theirs.pth") as b:
    names = lambda z: [n.split("/", 1)[1] for n in z.namelist()]  # noqa: E731
    assert names(a) == names(b)
    # Byte-identical records, data.pkl included (the id is random per save).
    for n in names(a):
      if n != ".data/serialization_id":
        assert a.read(f"ours/{n}") == b.read(f"theirs/{n}"), n
