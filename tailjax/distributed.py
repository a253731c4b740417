"""Runs that span several processes and hosts, on JAX's own distributed runtime.

One command is started once per process (``tailjax train|sweep|mil --distributed``,
by hand, by ``srun`` or by ``mpirun``). ``initialize`` joins them through
``jax.distributed.initialize``: from explicit flags (coordinator address, process
count, process id) or from the cluster environment JAX detects itself (SLURM, Open
MPI, TPU pods, ...). After that ``jax.devices()`` lists every process's devices and
the engine's mesh spans them all (``tailjax.sharding``); CPU collectives go through
JAX's gloo implementation, GPU collectives through NCCL.

Everything else is coordinated through the key-value store and barriers of JAX's
coordination service (``jax._src.distributed.global_state.client``); tailjax runs
no coordinator of its own. Single-process runs use the same calls, which then do
nothing, so no code path differs:

* **One writer.** Process 0 (the *lead*) writes every file of the run record
  (manifest, lock, ``units/``, metrics, report); orbax checkpoints are saved by all
  processes together. ``lead_first(name, fn)`` runs ``fn`` on the lead while the
  others wait for its outcome; a failure there is raised on every process
  (``LeadFailedError`` on the others), so no process is left waiting for a peer
  that gave up. ``from_lead(name, fn)`` also hands the lead's (JSON) result to all.
* **Independent jobs** (study B's contamination ratios): ``split_work`` gives each
  process its share and sends the (JSON) results to the lead, which writes them.
* **Same inputs.** ``check_same(name, fields)`` compares a dict of fingerprints
  (config fields, code version, data hashes) of every process with process 0's and
  raises ``ProcessMismatchError`` on every process, naming the first differing
  fields, before anything is trained.
* **Faults.** A process that never joins ends every process that did with a
  one-line error after ``timeout_s`` (exit 2; JAX itself would abort with a stack
  trace). A process that dies mid-run is detected by JAX's heartbeats
  (``heartbeat_timeout_s``): the others stop, and rerunning the same command on
  every process resumes from the last checkpoint (``tailjax.engine``).

**Local processes** (``train.processes``): on a CPU host whose cores one row's step
does not keep busy, a grid's rows can train in several processes, each on its own
share of the cores (on 2 cores one process already runs the step 1.8× faster than on
one, and the processes gain nothing there: docs/distributed.md). ``launch_local``
starts the same command as n processes joined on 127.0.0.1 and waits for them;
``own_cores`` pins a process to its share while a training segment runs. The numbers
stay those of a single process: XLA:CPU splits a reduction over leading axes by the
size of its intra-op thread pool, which is fixed when the backend starts from the cores the
process may use, so every process starts unpinned (a pool as large as the single
process's) and is pinned only while it trains; evaluation and everything process 0
does alone run on every core.

Calls that coordinate must be made by every process in the same order (they are
numbered, like collectives). Waits have a long default timeout (``wait_timeout_s``)
because the lead may spend minutes evaluating while the others wait.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pkgutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax

DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
DEFAULT_WAIT_TIMEOUT_S = 24 * 3600


class DistributedError(RuntimeError):
  """The processes of a distributed run could not be joined or disagree."""


class ProcessMismatchError(DistributedError):
  """A process started with a different config, code version or data than process 0."""


class LeadFailedError(DistributedError):
  """Process 0 failed in a step the other processes were waiting for."""


_state: dict[str, Any] = {"seq": {}, "wait_timeout_s": DEFAULT_WAIT_TIMEOUT_S,
                          "initialized": False}


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_lead() -> bool:
  """True on process 0, the one process that writes the run record."""
  return jax.process_index() == 0


def initialized() -> bool:
  return bool(_state["initialized"])


def _exit_with(message: str) -> None:
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
  """Joins this process to the others through ``jax.distributed.initialize``.

  Must run before any other JAX call. Give all three of ``coordinator_address``
  (``host:port`` of process 0), ``num_processes`` and ``process_id``, or none of them
  to let JAX read the cluster environment (SLURM, Open MPI, TPU pods).

  Args:
    timeout_s: how long to wait for every process to join. JAX aborts a process whose
      peers never come with a fatal log; a watchdog ends it first with one line
      naming what is missing (exit code 2).
    heartbeat_timeout_s: JAX's heartbeat timeout: after a peer stops responding for
      this long, the surviving processes stop too.
    wait_timeout_s: the longest ``lead_first`` / ``barrier`` waits for process 0.
  """
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     "(give all three, or none to read the cluster environment)")
  if all(given):
    if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
      raise ValueError(f"--process_id must lie in [0, --num_processes={num_processes}), got "
                       f"{process_id}")
    if ":" not in str(coordinator_address):
      raise ValueError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
  if timeout_s <= 0 or heartbeat_timeout_s <= 0:
    raise ValueError("the distributed timeouts must be > 0")
  where = (f"the coordinator at {coordinator_address}" if coordinator_address else
           "the coordinator the cluster environment names")
  who = (f"process {process_id} of {num_processes}" if all(given) else "this process")
  watchdog = threading.Timer(timeout_s, _exit_with, args=(
      f"jax.distributed: {who} waited {timeout_s:g} s for every process to join {where}; "
      "start the same command on every process (each with its own --process_id), or raise "
      "--distributed_timeout",))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address, None if num_processes is None else int(num_processes),
        None if process_id is None else int(process_id),
        # JAX's own deadline comes after the watchdog's, which gives the clearer message.
        initialization_timeout=int(timeout_s) + 30,
        heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  except ValueError as e:
    if all(given):
      raise
    raise ValueError(f"--distributed: no cluster environment detected ({e}); give "
                     "--coordinator_address, --num_processes and --process_id") from None
  finally:
    watchdog.cancel()
  _state["initialized"] = True
  _state["wait_timeout_s"] = float(wait_timeout_s)


# ----------------------------------------------------------------------------
# Coordination (no-ops with one process)
# ----------------------------------------------------------------------------


def _client():
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:
    raise DistributedError("jax.distributed is not initialised (pass --distributed)")
  return client


def _key(name: str) -> str:
  """``tailjax/<name>/<n>``: the n-th call with this name, the same on every process."""
  n = _state["seq"].get(name, 0)
  _state["seq"][name] = n + 1
  return f"tailjax/{name}/{n}"


def _wait_ms(timeout_s: float | None) -> int:
  return int(1000 * (_state["wait_timeout_s"] if timeout_s is None else timeout_s))


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Every process waits here until all have arrived."""
  if process_count() == 1:
    return
  _client().wait_at_barrier(_key(f"barrier/{name}").replace("/", "."), _wait_ms(timeout_s))


def from_lead(name: str, fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
  """Runs ``fn`` on process 0 only and returns its result (JSON-able) on every process.

  An exception in ``fn`` is re-raised on process 0 and raised as ``LeadFailedError``
  (with the same message) on the others, which were waiting for it.
  """
  if process_count() == 1:
    return fn()
  key = _key(name)
  client = _client()
  if is_lead():
    try:
      out = fn()
    except BaseException as e:
      client.key_value_set(key, json.dumps({"error": type(e).__name__, "message": str(e)}))
      raise
    client.key_value_set(key, json.dumps({"result": out}))
    return out
  status = json.loads(client.blocking_key_value_get(key, _wait_ms(timeout_s)))
  if "error" in status:
    raise LeadFailedError(f"process 0 failed ({status['error']}): "
                          f"{status['message'].splitlines()[0] if status['message'] else ''}")
  return status["result"]


def lead_first(name: str, fn: Callable[[], Any], others: Callable[[], Any] | None = None,
               timeout_s: float | None = None) -> Any:
  """Runs ``fn`` on process 0; the other processes wait until it has succeeded, then run
  ``others`` (default: nothing) and return its result. Process 0 returns ``fn()``.

  E.g. process 0 builds a dataset or fills the feature cache, and the others then read
  what it wrote; or process 0 evaluates and writes a unit while the others wait.
  """
  if process_count() == 1:
    return fn()
  box = []
  from_lead(name, lambda: box.append(fn()), timeout_s)
  if is_lead():
    return box[0]
  return others() if others is not None else None


def check_same(name: str, fields: Mapping[str, Any]) -> None:
  """Raises ``ProcessMismatchError`` on every process unless every process passed the
  same ``fields`` (a flat dict of JSON-able fingerprints) as process 0."""
  if process_count() == 1:
    return
  key = _key(f"same/{name}")
  client = _client()
  mine = json.loads(json.dumps(dict(fields), sort_keys=True, default=str))
  client.key_value_set(f"{key}/{process_index()}", json.dumps(mine))
  timeout = _wait_ms(None)
  theirs = {p: mine if p == process_index() else
            json.loads(client.blocking_key_value_get(f"{key}/{p}", timeout))
            for p in range(process_count())}
  lead = theirs[0]
  for p in range(1, process_count()):
    diff = [k for k in sorted(set(lead) | set(theirs[p])) if lead.get(k) != theirs[p].get(k)]
    if diff:
      shown = "; ".join(f"{k}: {_short(lead.get(k))} on process 0, {_short(theirs[p].get(k))} "
                        f"on process {p}" for k in diff[:3])
      more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
      raise ProcessMismatchError(f"process {p} started with a different {name} than process 0: "
                                 f"{shown}{more}; start every process with the same command, "
                                 "code and data")


def split_work(name: str, keys: Sequence[str], compute: Callable[[str], Any],
               on_result: Callable[[str, Any], None] | None = None) -> dict[str, Any] | None:
  """Independent jobs spread over the processes: process p computes ``compute(k)`` for
  the keys ``keys[p], keys[p + P], ...`` (P processes; results JSON-able) and process 0
  receives every result, calling ``on_result(k, result)`` on each as soon as it has it
  (its own first, then the others' in key order; e.g. to save it as a unit). Process 0 returns ``{k: result}``, the others
  None. A failure on any process is raised on process 0 naming that process.
  ``keys`` must be the same on every process (decide them with ``from_lead``)."""
  keys = list(keys)
  n, me = process_count(), process_index()
  prefix = _key(f"work/{name}")
  if n == 1:
    out = {}
    for k in keys:
      out[k] = compute(k)
      if on_result is not None:
        on_result(k, out[k])
    return out
  client = _client()
  mine = {}
  for i, k in enumerate(keys):
    if i % n != me:
      continue
    try:
      mine[k] = compute(k)
    except BaseException as e:
      client.key_value_set(f"{prefix}/{k}", json.dumps({"error": type(e).__name__,
                                                        "message": str(e)}))
      raise
    if me != 0:
      from tailjax import io
      client.key_value_set(f"{prefix}/{k}", io.to_json({"result": mine[k]}))
    elif on_result is not None:
      on_result(k, mine[k])
  if me != 0:
    return None
  out = {}
  for i, k in enumerate(keys):
    if k not in mine:
      got = json.loads(client.blocking_key_value_get(f"{prefix}/{k}", _wait_ms(None)))
      if "error" in got:
        raise DistributedError(f"process {i % n} failed on {name} {k} ({got['error']}): "
                               f"{got['message'].splitlines()[0] if got['message'] else ''}")
      mine[k] = got["result"]
      if on_result is not None:
        on_result(k, mine[k])
    out[k] = mine[k]
  return out


# ----------------------------------------------------------------------------
# Local processes: a grid's rows over this host's cores
# ----------------------------------------------------------------------------

CORES_ENV = "TAILJAX_LOCAL_CORES"   # a child's share of the cores, "0,1"
PROCESSES_FIELD = "config.train.processes"
# Starting n processes, importing JAX and joining them costs a few seconds; below this
# many row-steps (at ~50 ms per row-step on a 2-core CPU, under a minute of training)
# "auto" keeps one process.
MIN_ROW_STEPS = 1000
# A dead peer is noticed by the others after this many seconds without a heartbeat.
LOCAL_HEARTBEAT_S = 20


def _cpu_only() -> bool:
  """True when JAX can only run on the CPU here, decided without starting a backend
  (which on a GPU would claim its memory in the launching process): ``JAX_PLATFORMS``
  when set, else whether any PJRT plugin (``jax_plugins.*``, ``libtpu``) is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    if any(True for _ in pkgutil.iter_modules(list(spec.submodule_search_locations))):
      return False
  from importlib import metadata
  return not list(metadata.entry_points(group="jax_plugins"))


def cores() -> list[int]:
  """The cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def local_process_count(setting: Any, n_rows: int, row_steps: int, *, batch_devices: int = 1,
                        where: str = PROCESSES_FIELD) -> int:
  """How many local processes train a grid of ``n_rows`` rows (``row_steps`` = rows × steps).

  ``setting`` is ``train.processes``: a count ≥ 1, or "auto" = one per core (at most one
  per row) when JAX runs on the CPU only, the grid has at least ``MIN_ROW_STEPS``
  row-steps and each row runs on one device (``batch_devices`` = 1); else 1. On GPU/TPU
  one process drives its devices (several hosts: ``--distributed``)."""
  if isinstance(setting, str) and setting == "auto":
    if batch_devices != 1 or n_rows < 2 or row_steps < MIN_ROW_STEPS or not _cpu_only():
      return 1
    return max(1, min(len(cores()), n_rows))
  if isinstance(setting, bool) or not isinstance(setting, (int, str)) or not str(setting).isdigit() \
      or int(setting) < 1:
    raise ValueError(f"{where} must be 'auto' or a number of processes ≥ 1, got {setting!r}")
  return int(setting)


def core_shares(available: Sequence[int], n: int) -> list[list[int]]:
  """``available`` cores split into n contiguous shares as even as possible; with more
  processes than cores, process i gets core i mod (number of cores)."""
  available = list(available)
  if n <= len(available):
    bounds = [round(i * len(available) / n) for i in range(n + 1)]
    return [available[bounds[i]:bounds[i + 1]] for i in range(n)]
  return [[available[i % len(available)]] for i in range(n)]


def _set_affinity(cpus: set[int]) -> None:
  # Every thread of this process (XLA's pool, gloo, Python's): os.sched_setaffinity(0)
  # would move only the calling thread, and threads started later inherit their
  # creator's set.
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), cpus)
    except OSError:   # the thread has ended
      pass


@contextlib.contextmanager
def own_cores() -> Iterator[None]:
  """Inside the block, this process runs on its share of the cores (``CORES_ENV``, set
  by ``launch_local``) and afterwards on all of them again; elsewhere a no-op."""
  share = os.environ.get(CORES_ENV, "")
  if not share or not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
    yield
    return
  every = _state.setdefault("all_cores", set(os.sched_getaffinity(0)))
  _set_affinity({int(c) for c in share.split(",")})
  try:
    yield
  finally:
    _set_affinity(every)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(args: Sequence[str], n: int, *, module: str = "tailjax.cli",
                 poll_s: float = 0.2, grace_s: float = 2 * LOCAL_HEARTBEAT_S) -> int:
  """Runs ``python -m <module> <args>`` (``tailjax <args>``) as n processes of one
  distributed run on this host and returns the exit code: process 0's, or the first
  failing one's.

  Process i gets ``--distributed`` flags for 127.0.0.1 and its share of the cores
  (``core_shares``) in ``CORES_ENV``; it starts unpinned (see the module doc). Process 0
  prints as the command would; the others' output is kept and its last lines shown if
  one of them fails. SIGINT and SIGTERM are passed on once to every process (they are
  started outside the terminal's process group, ``start_new_session``, so a Ctrl-C does
  not reach them twice), and the run
  stops at its next boundary as a single process would. A process that dies takes the
  others down within ``LOCAL_HEARTBEAT_S`` (JAX's heartbeat); any still running
  ``grace_s`` later are killed."""
  port = _free_port()
  shares = core_shares(cores(), n)
  procs, logs = [], []
  for i in range(n):
    env = dict(os.environ, **{CORES_ENV: ",".join(map(str, shares[i]))})
    cmd = [sys.executable, "-m", module, *args, "--distributed",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
           f"--process_id={i}", f"--heartbeat_timeout={LOCAL_HEARTBEAT_S}"]
    log = None if i == 0 else tempfile.TemporaryFile(mode="w+")
    logs.append(log)
    procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                  stdout=log, stderr=log))

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  in_main = threading.current_thread() is threading.main_thread()
  saved = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
  try:
    first_failed_at = None
    while any(p.poll() is None for p in procs):
      if first_failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        first_failed_at = time.monotonic()
      if first_failed_at is not None and time.monotonic() - first_failed_at > grace_s:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(poll_s)
  finally:
    for s, h in saved.items():
      signal.signal(s, h)
  codes = [p.wait() for p in procs]
  lead_code = codes[0]
  for i, (code, log) in enumerate(zip(codes, logs)):
    if log is None:
      continue
    if code not in (0, lead_code):
      log.seek(0)
      tail = [l for l in log.read().splitlines() if l.strip()][-3:]
      print(f"process {i} of the local run exited with {code}:", *tail, sep="\n  ",
            file=sys.stderr)
    log.close()
  if lead_code != 0:
    return lead_code if lead_code > 0 else 128 - lead_code
  bad = next((c for c in codes if c != 0), 0)
  return bad if bad >= 0 else 128 - bad


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
  return text if len(text) <= 60 else text[:57] + "..."


__all__ = ("initialize", "initialized", "is_lead", "process_count", "process_index", "barrier",
           "from_lead", "lead_first", "check_same", "split_work", "local_process_count", "core_shares",
           "launch_local", "own_cores", "DistributedError",
           "ProcessMismatchError",
           "LeadFailedError")
