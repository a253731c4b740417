"""Reads ``torch.save`` state dicts (zip and legacy formats) without PyTorch or running pickle code.

Zip format (the default since PyTorch 1.6): an uncompressed zip archive whose
records all sit in one top-level folder ``<archive>/`` (the saved file's stem,
or ``archive``)::

  <archive>/data.pkl              pickle of the object (protocol 2)
  <archive>/byteorder             "little" or "big" (absent in old files: little)
  <archive>/data/<key>            raw bytes of storage <key>, numel * itemsize
  <archive>/version, .format_version, .storage_alignment, .data/...   (bookkeeping, unread)

Inside ``data.pkl`` every storage is a *persistent id*
``('storage', <torch.XStorage>, key, location, numel)`` (numel in elements of
the storage's dtype) and every tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``, so
tensors may share a storage and be strided views of it.

Legacy format (before 1.6) is five pickles followed by raw storage bytes::

  pickle(MAGIC_NUMBER)  pickle(PROTOCOL_VERSION=1001)  pickle(sys_info)
  pickle(obj)           pickle([storage_key, ...])
  for each key in that list:  int64 little-endian element count, then count * itemsize bytes

with 6-tuple ids ``('storage', <torch.XStorage>, key, location, numel, view_metadata)``.

Unpickling is arbitrary code execution in general: ``find_class`` may import any
callable and ``REDUCE`` calls it. Here ``find_class`` resolves only an allow-list
of names (``collections.OrderedDict``, the tensor/parameter-rebuild functions
and the storage types) to our own inert stand-ins -- ``torch`` is never
imported -- and refuses everything else with an :class:`UnpicklingError`
naming the file and the refused global. A tensor becomes exactly what
``_rebuild_tensor_v2`` would give, ``as_strided(storage[offset:], size,
stride)``, copied to a C-contiguous ``np.ndarray`` after a bounds check. The
result is a flat ``{name: np.ndarray}`` state dict.

:func:`load_torch_state_dict` detects the format; :func:`load_torch_state_dict_cached`
converts once and keeps the arrays as an ``.npz`` in the user cache directory
(``$TAILJAX_CACHE``, else ``$XDG_CACHE_HOME/tailjax``, else ``~/.cache/tailjax``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

from tailjax import io as tj_io

__all__ = [
  "UnpicklingError",
  "load_torch_state_dict",
  "load_legacy_torch_pickle",
  "load_torch_state_dict_cached",
  "default_cache_dir",
]

UnpicklingError = pickle.UnpicklingError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# Storage class name -> element dtype (little-endian; byte-swapped if the file says big-endian).
_STORAGE_DTYPES: dict[str, np.dtype] = {
  "DoubleStorage": np.dtype("<f8"),
  "FloatStorage": np.dtype("<f4"),
  "HalfStorage": np.dtype("<f2"),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype("<i8"),
  "IntStorage": np.dtype("<i4"),
  "ShortStorage": np.dtype("<i2"),
  "CharStorage": np.dtype("i1"),
  "ByteStorage": np.dtype("u1"),
  "BoolStorage": np.dtype("?"),
}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
  """A (view of a) storage whose bytes come after the pickle; resolved once they are read."""
  key: str
  dtype: np.dtype
  offset: int  # in elements, non-zero only for legacy storage views
  numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state has no NumPy meaning
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  if not isinstance(storage, _StorageRef):
    raise UnpicklingError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")
  return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                    tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _allowed_global(module: str, name: str):
  if (module, name) == ("collections", "OrderedDict"):
    return collections.OrderedDict
  if module == "torch._utils":
    return {"_rebuild_tensor_v2": _rebuild_tensor_v2,
            "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_parameter": _rebuild_parameter}.get(name)
  if module == "torch" and name in _STORAGE_DTYPES:
    return _StorageType(name, _STORAGE_DTYPES[name])
  return None


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals, to inert stand-ins; refuses the rest."""

  def __init__(self, f: BinaryIO, source: str, storages: dict[str, _StorageRef] | None = None,
               zip_format: bool = False):
    super().__init__(f)
    self._source = source
    self._storages = storages
    # Zip files drop the legacy format's trailing view_metadata from storage ids.
    self._id_length = 5 if zip_format else 6

  def find_class(self, module: str, name: str):
    obj = _allowed_global(module, name)
    if obj is None:
      raise UnpicklingError(
          f"{self._source}: refused to load global '{module}.{name}'; only tensor/storage "
          "reconstruction is allowed (the file may be malicious or not a plain state dict)")
    return obj

  def persistent_load(self, pid):
    if self._storages is None:
      raise UnpicklingError(f"{self._source}: unexpected persistent id in a header pickle")
    if (not isinstance(pid, tuple) or len(pid) != self._id_length or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise UnpicklingError(f"{self._source}: malformed storage id {repr(pid)[:200]}")
    _, stype, key, _location, numel, view_metadata = pid if len(pid) == 6 else (*pid, None)
    root = self._storages.get(key)
    if root is None:
      root = self._storages[key] = _StorageRef(key, stype.dtype, 0, numel)
    elif root.dtype != stype.dtype or root.numel != numel:
      raise UnpicklingError(f"{self._source}: storage {key} declared twice with different types")
    if view_metadata is None:
      return root
    # Pre-1.0 files could pickle views of a root storage: (view_key, offset, view_numel).
    if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
      raise UnpicklingError(f"{self._source}: malformed storage view {repr(view_metadata)[:200]}")
    _view_key, view_offset, view_numel = view_metadata
    if not (0 <= view_offset and 0 <= view_numel and view_offset + view_numel <= numel):
      raise UnpicklingError(f"{self._source}: storage view outside storage {key}")
    return _StorageRef(key, stype.dtype, int(view_offset), int(view_numel))


def _read_storages(f: BinaryIO, keys: list[str], refs: Mapping[str, _StorageRef],
                   big_endian: bool, source: str) -> dict[str, np.ndarray]:
  out = {}
  for key in keys:
    if key not in refs:
      raise UnpicklingError(f"{source}: storage {key} listed but never referenced")
    ref = refs[key]
    header = f.read(8)
    if len(header) != 8:
      raise UnpicklingError(f"{source}: truncated before storage {key}")
    numel = int.from_bytes(header, "little", signed=True)
    if numel != ref.numel:
      raise UnpicklingError(
          f"{source}: storage {key} holds {numel} elements, the pickle declared {ref.numel}")
    nbytes = numel * ref.dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
      raise UnpicklingError(f"{source}: truncated inside storage {key}")
    arr = np.frombuffer(data, dtype=ref.dtype)
    out[key] = arr.byteswap() if big_endian else arr
  missing = set(refs) - set(out)
  if missing:
    raise UnpicklingError(f"{source}: storages referenced but absent: {sorted(missing)[:5]}")
  return out


def _materialise(t: _TensorRef, storages: Mapping[str, np.ndarray], source: str,
                 name: str) -> np.ndarray:
  flat = storages[t.storage.key][t.storage.offset:t.storage.offset + t.storage.numel]
  if any(s < 0 for s in t.shape) or any(s < 0 for s in t.stride) or t.offset < 0:
    raise UnpicklingError(f"{source}: tensor {name} has a negative size/stride/offset")
  if len(t.shape) != len(t.stride):
    raise UnpicklingError(f"{source}: tensor {name} has size {t.shape} but stride {t.stride}")
  if 0 not in t.shape:
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
    if last >= flat.size:
      raise UnpicklingError(f"{source}: tensor {name} reads past the end of its storage")
  # as_strided is safe here only because of the bounds check above.
  view = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.shape, strides=[s * flat.itemsize for s in t.stride],
      writeable=False)
  return np.array(view, order="C", copy=True)


def _flatten(obj: Any, prefix: str, out: dict[str, _TensorRef], source: str) -> None:
  if isinstance(obj, Mapping):
    for k, v in obj.items():
      _flatten(v, f"{prefix}{k}.", out, source)
  elif isinstance(obj, _TensorRef) and prefix:
    out[prefix[:-1]] = obj
  else:
    where = f"entry '{prefix[:-1]}'" if prefix else "the top-level object"
    raise ValueError(f"{source}: {where} is a {type(obj).__name__}, not a tensor (state dict "
                     "of tensors expected)")


# What a corrupt or hostile pickle can make the unpickler raise; re-raised naming the file.
_UNPICKLE_ERRORS = (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
                    AttributeError, OverflowError, RecursionError, MemoryError, struct.error)


def _corrupt(source: str, what: str, e: BaseException) -> UnpicklingError:
  return UnpicklingError(f"{source}: corrupt or truncated {what} ({type(e).__name__}: "
                         f"{str(e)[:200]})")


def _state_dict(obj: Any, storages: Mapping[str, np.ndarray], source: str
                ) -> dict[str, np.ndarray]:
  tensors: dict[str, _TensorRef] = {}
  _flatten(obj, "", tensors, source)
  return {name: _materialise(t, storages, source, name) for name, t in tensors.items()}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a ``torch.save`` state dict, zip or legacy format, as ``{name: np.ndarray}``.

  The format is told by the first four bytes (``PK\\x03\\x04``: zip, as
  ``torch.load`` decides). Nested mappings are flattened with ``.``-joined keys;
  every tensor is ``as_strided(storage[offset:], size, stride)`` copied to a
  C-contiguous array of the storage's dtype (``bfloat16`` via ``ml_dtypes``),
  tensors sharing a storage read the same bytes. Nothing in the file is
  executed: a pickled global outside the tensor/storage allow-list raises
  :class:`UnpicklingError` naming ``path`` and the global; corruption,
  truncation, missing storage records or out-of-bounds views raise
  :class:`UnpicklingError`, non-tensor entries ``ValueError``, all naming ``path``.
  """
  path = Path(path)
  with open(path, "rb") as f:
    is_zip = f.read(4) == _ZIP_MAGIC
  return _load_zip(path) if is_zip else load_legacy_torch_pickle(path)


def _load_zip(path: Path) -> dict[str, np.ndarray]:
  source = str(path)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
    raise _corrupt(source, "zip-format PyTorch file", e) from e
  with zf:
    names = zf.namelist()
    # torch.load takes the archive folder from the first record and looks every
    # other record up under it; so do we.
    if not names or "/" not in names[0]:
      raise UnpicklingError(f"{source}: not a torch.save zip archive (no top-level folder)")
    root = names[0].split("/", 1)[0] + "/"
    if root + "constants.pkl" in names:
      raise ValueError(f"{source}: a TorchScript archive, not a state dict (save "
                       "model.state_dict() with torch.save instead)")

    def record(name: str, nbytes: int | None = None) -> bytes:
      try:
        info = zf.getinfo(root + name)
      except KeyError:
        raise UnpicklingError(f"{source}: record '{root}{name}' is missing") from None
      if nbytes is not None and info.file_size != nbytes:
        raise UnpicklingError(f"{source}: record '{root}{name}' holds {info.file_size} bytes, "
                              f"the pickle declared {nbytes}")
      try:
        return zf.read(info)
      except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as e:
        raise _corrupt(source, f"record '{root}{name}'", e) from e

    big_endian = False  # torch.load's default for files without a byteorder record
    if root + "byteorder" in names:
      order = record("byteorder")
      if order not in (b"little", b"big"):
        raise UnpicklingError(f"{source}: unknown byteorder record {order[:20]!r}")
      big_endian = order == b"big"
    refs: dict[str, _StorageRef] = {}
    try:
      obj = _RestrictedUnpickler(io.BytesIO(record("data.pkl")), source, storages=refs,
                                 zip_format=True).load()
    except _UNPICKLE_ERRORS as e:
      if str(e).startswith(source):  # our own error (e.g. a refused global), names the file
        raise
      raise _corrupt(source, "data.pkl", e) from e
    storages = {}
    for key, ref in refs.items():
      arr = np.frombuffer(record(f"data/{key}", ref.numel * ref.dtype.itemsize), ref.dtype)
      storages[key] = arr.byteswap() if big_endian else arr
  return _state_dict(obj, storages, source)


def load_legacy_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a legacy-format (pre-1.6) ``torch.save`` state dict; see :func:`load_torch_state_dict`.

  Raises ``ValueError`` on a zip-format file, otherwise the same errors as
  :func:`load_torch_state_dict`.
  """
  path = Path(path)
  source = str(path)
  with open(path, "rb") as f:
    if f.read(4) == _ZIP_MAGIC:
      raise ValueError(f"{source}: zip-format torch.save file; read it with load_torch_state_dict")
    f.seek(0)
    try:
      magic = _RestrictedUnpickler(f, source).load()
      if magic != _LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{source}: not a legacy PyTorch file (bad magic number)")
      protocol = _RestrictedUnpickler(f, source).load()
      if protocol != _LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{source}: unsupported legacy protocol version {protocol!r}")
      sys_info = _RestrictedUnpickler(f, source).load()
      big_endian = not (isinstance(sys_info, dict) and sys_info.get("little_endian", True))
      refs: dict[str, _StorageRef] = {}
      obj = _RestrictedUnpickler(f, source, storages=refs).load()
      keys = _RestrictedUnpickler(f, source).load()
    except _UNPICKLE_ERRORS as e:
      if str(e).startswith(source):  # our own error (e.g. a refused global), names the file
        raise
      raise _corrupt(source, "legacy PyTorch file", e) from e
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
      raise UnpicklingError(f"{source}: storage key list is malformed")
    storages = _read_storages(f, keys, refs, big_endian, source)
  return _state_dict(obj, storages, source)


def default_cache_dir() -> Path:
  """``$TAILJAX_CACHE``, else ``$XDG_CACHE_HOME/tailjax``, else ``~/.cache/tailjax``."""
  if os.environ.get("TAILJAX_CACHE"):
    return Path(os.environ["TAILJAX_CACHE"]).expanduser()
  if os.environ.get("XDG_CACHE_HOME"):
    return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tailjax"
  return Path.home() / ".cache" / "tailjax"


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_torch_state_dict_cached(path: str | os.PathLike,
                                 cache_dir: str | os.PathLike | None = None
                                 ) -> dict[str, np.ndarray]:
  """:func:`load_torch_state_dict`, memoised on disk as ``<stem>-<sha256[:16]>.npz``.

  The cache name carries the source file's content hash, so a changed ``.pth``
  never reuses stale arrays. The ``.npz`` is written atomically; an unreadable
  cache file is logged and rebuilt.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file not found: {path}")
  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  cache = cache_dir / f"{path.stem}-{_sha256(path)[:16]}.npz"
  if cache.exists():
    try:
      with np.load(cache, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
      # .npz keeps ml_dtypes' bfloat16 as raw 2-byte voids, the only V2 arrays we write.
      return {k: a.view(ml_dtypes.bfloat16) if a.dtype == np.dtype("V2") else a
              for k, a in arrays.items()}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      log.warning("rebuilding unreadable weight cache %s (%s)", cache, e)
  arrays = load_torch_state_dict(path)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tj_io.atomic_write_bytes(cache, buf.getvalue())
  return arrays
