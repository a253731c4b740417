"""Reads legacy (non-zip) PyTorch ``.pth`` files without PyTorch and without running pickle code.

A legacy ``torch.save`` file (the default before PyTorch 1.6) is five pickles
followed by raw storage bytes::

  pickle(MAGIC_NUMBER)  pickle(PROTOCOL_VERSION=1001)  pickle(sys_info)
  pickle(obj)           pickle([storage_key, ...])
  for each key in that list:  int64 little-endian element count, then count * itemsize bytes

Inside ``obj`` every storage is a *persistent id*
``('storage', <torch.XStorage>, key, location, numel, view_metadata)`` and every
tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

Unpickling is arbitrary code execution in general: ``find_class`` may import any
callable and ``REDUCE`` calls it. Here ``find_class`` resolves only an allow-list
of names (``collections.OrderedDict``, the tensor-rebuild functions and the
storage types) to our own inert stand-ins -- ``torch`` is never imported -- and
refuses everything else with an :class:`UnpicklingError` naming the file and
the refused global. The result is a flat ``{name: np.ndarray}`` state dict.

:func:`load_torch_state_dict_cached` converts once and keeps the arrays as an
``.npz`` in the user cache directory (``$TAILJAX_CACHE``, else
``$XDG_CACHE_HOME/tailjax``, else ``~/.cache/tailjax``).
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
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

from tailjax import io as tj_io

__all__ = [
  "UnpicklingError",
  "load_legacy_torch_pickle",
  "load_torch_state_dict_cached",
  "default_cache_dir",
]

UnpicklingError = pickle.UnpicklingError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

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


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A (view of a) storage whose bytes come after the pickle; resolved once they are read."""
  key: str
  dtype: np.dtype
  offset: int  # in elements, non-zero only for legacy storage views
  numel: int


@dataclasses.dataclass(frozen=True)
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

  def __init__(self, f: BinaryIO, source: str, storages: dict[str, _StorageRef] | None = None):
    super().__init__(f)
    self._source = source
    self._storages = storages

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
    if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise UnpicklingError(f"{self._source}: malformed storage id {pid!r}")
    _, stype, key, _location, numel, view_metadata = pid
    root = self._storages.get(key)
    if root is None:
      root = self._storages[key] = _StorageRef(key, stype.dtype, 0, numel)
    elif root.dtype != stype.dtype or root.numel != numel:
      raise UnpicklingError(f"{self._source}: storage {key} declared twice with different types")
    if view_metadata is None:
      return root
    # Pre-1.0 files could pickle views of a root storage: (view_key, offset, view_numel).
    if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
      raise UnpicklingError(f"{self._source}: malformed storage view {view_metadata!r}")
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


def load_legacy_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a legacy-format ``torch.save`` state dict as ``{name: np.ndarray}``, without torch.

  Nested mappings are flattened with ``.``-joined keys. Raises
  :class:`UnpicklingError` (naming ``path`` and the global) on any pickled
  global outside the tensor/storage allow-list -- nothing in the file is ever
  executed -- and ``ValueError`` on a zip-format file, a bad header, truncation
  or non-tensor entries.
  """
  path = Path(path)
  source = str(path)
  with open(path, "rb") as f:
    if f.read(4) == b"PK\x03\x04":
      raise ValueError(f"{source}: zip-format torch.save file; only the legacy format is read")
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
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, struct.error) as e:
      if str(e).startswith(source):  # our own error, already names the file
        raise
      raise UnpicklingError(f"{source}: corrupt or truncated legacy PyTorch file ({e!r})") from e
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
      raise UnpicklingError(f"{source}: storage key list is malformed")
    storages = _read_storages(f, keys, refs, big_endian, source)
  tensors: dict[str, _TensorRef] = {}
  _flatten(obj, "", tensors, source)
  return {name: _materialise(t, storages, source, name) for name, t in tensors.items()}


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
  """:func:`load_legacy_torch_pickle`, memoised on disk as ``<stem>-<sha256[:16]>.npz``.

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
        return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      log.warning("rebuilding unreadable weight cache %s (%s)", cache, e)
  arrays = load_legacy_torch_pickle(path)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tj_io.atomic_write_bytes(cache, buf.getvalue())
  return arrays
