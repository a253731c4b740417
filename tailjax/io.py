"""Small I/O helpers: atomic writes, the metric writers (JSON lines, and TensorBoard
event files beside them), the list of files a run wrote, and the short listings that
errors about bad input files use.

Every output file is written to a temporary sibling and moved into place with
``os.replace``, so a crash never leaves a half-written file under the final name. The
temporary file gets the mode ``open`` would give a new file (``0o666`` less the
process's umask; ``tempfile`` alone makes it ``0o600``), so results on a shared file
system are as readable as the user's umask says.

**The list of written files.** A folder holding a ``.tailjax-files`` file (a run's
workdir: ``runrecord.open_run`` starts it) lists every path tailjax wrote below it,
one relative path a line, folders written as a whole (checkpoints, TensorBoard runs,
``atomic_directory``) with a trailing ``/``. Every writer here notes its path there
(``note_written``) before writing, so ``--restart`` can remove exactly what tailjax
wrote and nothing else (``runrecord``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
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


# ----------------------------------------------------------------------------
# File modes
# ----------------------------------------------------------------------------

_UMASK_LOCK = threading.Lock()


def umask() -> int:
  """The process's umask, read without changing it where the kernel says it
  (``/proc/self/status``, Linux ≥ 4.7); elsewhere set and restored under a lock (a file
  created by another thread in between would get the momentary mask)."""
  with contextlib.suppress(OSError):
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  with _UMASK_LOCK:
    mask = os.umask(0o077)
    os.umask(mask)
  return mask


def default_mode(directory: bool = False) -> int:
  """The mode ``open`` / ``mkdir`` give a new file / folder: 0o666 / 0o777 less the umask."""
  return (0o777 if directory else 0o666) & ~umask()


# ----------------------------------------------------------------------------
# The list of written files
# ----------------------------------------------------------------------------

LEDGER = ".tailjax-files"
_LEDGER_LOCK = threading.Lock()
# ledger path -> ((size, mtime_ns), entries): re-read only when the file changed.
_LEDGER_CACHE: dict[Path, tuple[tuple[int, int], set[str]]] = {}


def start_ledger(root: str | os.PathLike) -> None:
  """Makes ``root`` a folder whose written files are listed (keeps an existing list)."""
  path = Path(root) / LEDGER
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
  os.close(fd)


def _ledger_of(path: Path) -> Path | None:
  for parent in path.parents:
    if (parent / LEDGER).is_file():
      return parent / LEDGER
  return None


def ledger_entries(root: str | os.PathLike) -> set[str] | None:
  """The paths listed under ``root`` (relative, POSIX; folders end in ``/``), or None when
  ``root`` keeps no list."""
  ledger = Path(root) / LEDGER
  try:
    st = ledger.stat()
  except FileNotFoundError:
    return None
  sig = (st.st_size, st.st_mtime_ns)
  cached = _LEDGER_CACHE.get(ledger)
  if cached is None or cached[0] != sig:
    cached = (sig, {l for l in ledger.read_text().splitlines() if l})
    _LEDGER_CACHE[ledger] = cached
  return cached[1]


def note_written(path: str | os.PathLike, *, folder: bool = False) -> None:
  """Lists ``path`` (a file, or with ``folder`` a folder written as a whole) in the ledger
  of the nearest folder above it that keeps one; nothing when none does. A ledger that
  cannot be written is left as it is: its folder's ``--restart`` then refuses the
  unlisted file rather than delete it."""
  path = Path(os.path.abspath(path))
  ledger = _ledger_of(path)
  if ledger is None:
    return
  rel_path = path.relative_to(ledger.parent)
  rel = rel_path.as_posix() + ("/" if folder else "")
  with _LEDGER_LOCK:
    try:
      known = ledger_entries(ledger.parent) or set()
      if (rel in known or any(f"{p.as_posix()}/" in known for p in rel_path.parents)
          or any(temp_sibling_of(part) for part in rel_path.parts[:-1])):
        return   # listed already, or inside a folder listed (or to be listed) as a whole
      # O_APPEND: one short write per line, so lines of concurrent writers never interleave.
      fd = os.open(ledger, os.O_WRONLY | os.O_APPEND)
      try:
        os.write(fd, (rel + "\n").encode())
      finally:
        os.close(fd)
    except OSError:
      return
    _LEDGER_CACHE.pop(ledger, None)   # re-read next time, with any other writer's lines


# The temporary siblings of a listed path: atomic_path's ``.<name>.<random>.tmp``,
# atomic_directory's ``.<name>.<random>.partial`` and ``.<name>.old``.
_TEMP_SIBLING = re.compile(r"^\.(?P<name>.+?)(\.[A-Za-z0-9_]+\.(tmp|partial)|\.old)$")


def temp_sibling_of(name: str) -> str | None:
  """The listed name a leftover temporary file ``name`` belongs to, or None."""
  m = _TEMP_SIBLING.match(name)
  return m.group("name") if m else None


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside ``path`` (mode as ``open`` would create it); moves it
  onto ``path`` on success only."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  note_written(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    os.fchmod(fd, default_mode())
  finally:
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
  note_written(path, folder=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
  try:
    os.chmod(tmp, default_mode(directory=True))   # mkdtemp makes it 0o700
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
    self._noted = False

  def truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    kept = []
    for line in lines:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a crash
      if rec.get("step", -1) <= step:
        kept.append(line)
    if kept != lines:   # a rerun of a finished run leaves the log untouched
      atomic_write_text(self.path, "".join(l + "\n" for l in kept))

  def write(self, record: dict) -> None:
    if not self._noted:
      note_written(self.path)
      self._noted = True
    with open(self.path, "a") as f:
      f.write(to_json(record, sort_keys=True) + "\n")
      f.flush()


def first_few(items, n: int = 5) -> str:
  """``"a, b, c (and 397 more)"``: the first ``n`` items, then a count, so an
  error message stays short however many offenders there are."""
  items = list(items)
  shown = ", ".join(str(x) for x in items[:n])
  return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def flat_leaves(tree: Any, keep, *, lists: bool = True, prefix: str = "") -> dict[str, Any]:
  """The leaves of a JSON tree for which ``keep(leaf)`` holds, keyed by their path (dict
  keys, and list indices when ``lists``, joined by ``/``); with ``lists=False`` a list is
  a leaf like any other."""
  items = (tree.items() if isinstance(tree, dict) else
           enumerate(tree) if lists and isinstance(tree, list) else None)
  if items is None:
    return {prefix.rstrip("/"): tree} if keep(tree) else {}
  out: dict[str, Any] = {}
  for k, v in items:
    out.update(flat_leaves(v, keep, lists=lists, prefix=f"{prefix}{k}/"))
  return out


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def flat_scalars(record: Any) -> dict[str, float]:
  """The finite numbers of a nested dict, keyed by their ``/``-joined path
  (``{"metrics": {"pixel_ap": 0.3}}`` -> ``{"metrics/pixel_ap": 0.3}``); lists,
  strings and booleans are left out."""
  return {k: float(v) for k, v in flat_leaves(
      record, lambda x: _is_number(x) and np.isfinite(x), lists=False).items()}


class TensorBoardWriter:
  """Scalars for TensorBoard, one TensorBoard run (sub-folder of ``logdir``) per name.

  Written with tensorboardX, which brings neither TensorFlow nor PyTorch:
  ``tensorboard --logdir <workdir>`` then shows every row of every grid. Event files
  are append-only, so a resumed run passes ``purge_step`` (the first step it will
  log again): TensorBoard then hides the earlier files' events from that step on,
  and the curves hold each step once, as the JSON lines do. A run's writer is
  created at its first scalar, so a rerun that logs nothing adds no file.
  """

  def __init__(self, logdir: str | os.PathLike, names: list[str], purge_step: int | None = None):
    self.logdir = Path(logdir)
    self.names = list(names)
    self.purge_step = purge_step
    self._writers: dict[int, Any] = {}

  def _writer(self, i: int):
    if i not in self._writers:
      from tensorboardX import SummaryWriter
      note_written(self.logdir / self.names[i], folder=True)
      # Event files are named by the second they were opened; a resume within the same
      # second would reopen (and truncate) the earlier file, so the names carry the
      # nanosecond too, which also keeps TensorBoard's name order = opening order.
      self._writers[i] = SummaryWriter(str(self.logdir / self.names[i]),
                                       purge_step=self.purge_step, flush_secs=30,
                                       filename_suffix=f".{time.time_ns()}")
    return self._writers[i]

  def scalars(self, step: int, values: list[dict[str, float]]) -> None:
    """``values[i]`` (tag -> number) for run ``names[i]`` at ``step``."""
    for i, tags in enumerate(values):
      for tag, v in tags.items():
        self._writer(i).add_scalar(tag, v, global_step=int(step))

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers.clear()


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
