"""Small I/O helpers: atomic writes and a JSON-lines metrics writer.

Every output file is written to a temporary sibling and moved into place with
``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _json_default(x: Any):
  if isinstance(x, (np.generic,)):
    return x.item()
  if hasattr(x, "tolist"):  # NumPy / JAX arrays
    return np.asarray(x).tolist()
  if isinstance(x, Path):
    return str(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def to_json(obj: Any, **kwargs) -> str:
  return json.dumps(obj, default=_json_default, **kwargs)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside ``path``; moves it onto ``path`` on success only."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, to_json(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
  """Builds a directory under a temporary name and renames it onto ``path`` on success.

  An existing ``path`` is replaced only once the new one is complete; on error
  the partial directory is removed and ``path`` is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
  try:
    yield tmp
    if path.exists():
      old = path.with_name(f".{path.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


class JsonlWriter:
  """Appends one JSON object per line to ``path`` (flushed per line).

  ``truncate_after(step)`` drops lines logged after ``step``: a resumed run
  calls it so the log holds each step once, as an uninterrupted run's would.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a crash
      if rec.get("step", -1) <= step:
        kept.append(line)
    atomic_write_text(self.path, "".join(l + "\n" for l in kept))

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(to_json(record, sort_keys=True) + "\n")
      f.flush()


def read_npz(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, np.ndarray]:
  """All arrays of a user-supplied ``.npz`` (no pickles), or ``error`` naming the file.

  Truncated or corrupt archives surface as OSError, ValueError, BadZipFile or
  EOFError depending on where they break; callers see one clear error.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise error(f"{path}: not a readable .npz file ({e})") from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
