"""Runs that span processes (``tailjax.distributed``): two local CPU processes × 2 fake
devices each, joined by ``jax.distributed`` on 127.0.0.1 (CPU collectives: gloo).

* the smoke study, killed (process 0, SIGKILL) after its first checkpoint and rerun on
  both processes, ends with evaluation records and a report equal, bit for bit, to a
  1-process 1-device run (rows run whole on each device through ``lax.map``, so no
  reduction crosses devices), and to a 1-process 4-device run to float rounding: every
  number within 1e-5 + 1e-4 relative (measured ≤ 5e-6 relative on the records, 1.6e-6
  absolute on a derived interval bound; 1e-3 relative on the conclusions' p-values) and
  every verdict the same. (XLA:CPU
  evaluates some reductions in another order when four devices share this machine's
  thread pool; the 2 × 2 and 1 × 1 runs happen to agree exactly.)
* the smoke sweep with each row's mini-batch split over all 4 devices, so gradients
  are averaged across the two processes, equals the 1-process run of the same mesh
  and the 1-device full-batch run to float tolerance (stated below);
* the smoke study as ``train.processes=2`` (one command, two local processes pinned to
  their cores while they train), stopped by SIGTERM and resumed, equals the plain
  1-process 1-device run bit for bit;
* a process started with another config is refused on both processes, naming the
  field; a process whose peer never comes gives a one-line timeout error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tailjax import distributed, engine
from tailjax.configs import fastflow_textures, sweep_tail_weight
from tailjax.studies import study_a, sweeps

STUDY = "configs/fastflow_textures.py:smoke"
SWEEP = "configs/sweep_tail_weight.py:smoke"
# Smaller evaluation maps (64² instead of 224²) and no example figure keep the ten runs
# here cheap; the same overrides go to every run that is compared.
SMALL = ["--config.eval.size=64"]
STUDY_SMALL = SMALL + ["--config.report.n_examples=0"]


def _small(cfg):
  cfg.eval.size = 64
  if "report" in cfg:
    cfg.report.n_examples = 0
  return cfg


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One folder every process sees: cwd (the smoke config's data root is relative), the
  feature and weight cache, and the workdirs."""
  return tmp_path_factory.mktemp("dist")


def _env(shared: Path, devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "TAILJAX"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0",     # as conftest.py: compile time
             TAILJAX_CACHE=str(shared / "cache"), PYTHONUNBUFFERED="1",
             # The processes compile the same programs again and again: reuse them.
             JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(shared, args, *, n=2, devices=2, timeout_s=None, heartbeat_s=5):
  """Starts ``tailjax <args> --distributed`` as n processes (or one plain process, n=0)."""
  port = _free_port()
  procs = []
  for i in range(max(n, 1)):
    extra = ([] if n == 0 else
             ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
              f"--num_processes={n}", f"--process_id={i}", f"--heartbeat_timeout={heartbeat_s}"]
             + ([f"--distributed_timeout={timeout_s}"] if timeout_s else []))
    procs.append(subprocess.Popen([sys.executable, "-m", "tailjax.cli", *args, *extra],
                                  cwd=shared, env=_env(shared, devices), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  return procs


def _finish(procs, limit_s=300):
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError("a process hung") from None
    out.append((p.returncode, stdout, stderr))
  return out


def _ok(results):
  for rc, _, err in results:
    assert rc == 0, err[-3000:]


def _units(workdir: Path) -> dict[str, str]:
  return {str(p.relative_to(workdir)): p.read_text()
          for p in sorted((workdir / "units").rglob("*.json"))}


def _report(workdir: Path) -> str:
  """report.md without its one timing phrase ("training and evaluation took x min")."""
  import re
  return re.sub(r"took [0-9.]+ min", "took … min", (workdir / "report.md").read_text())


def _assert_close(a, b, where: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
  """Same structure, strings and booleans; numbers within ``atol + rtol · |x|`` (the
  absolute part for derived numbers near 0, such as a difference's interval bound)."""
  if isinstance(a, dict):
    assert a.keys() == b.keys(), where
    for k in a:
      _assert_close(a[k], b[k], f"{where}.{k}", rtol, atol)
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{where}[{i}]", rtol, atol)
  elif isinstance(a, float) and not isinstance(a, bool):
    if np.isnan(a) or np.isnan(b):
      assert np.isnan(a) and np.isnan(b), (where, a, b)
    elif np.isinf(a) or np.isinf(b):
      assert a == b, (where, a, b)
    else:
      assert abs(a - b) <= atol + rtol * max(abs(a), abs(b)), (where, a, b)
  else:
    assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def one_process_study(shared):
  """The smoke study in one plain process with one device: the reference run."""
  one_dev = shared / "study1x1"
  _ok(_finish(_start(shared, ["train", f"--config={STUDY}", f"--workdir={one_dev}", *STUDY_SMALL],
                     n=0, devices=1)))
  return one_dev


def test_study_killed_and_resumed_on_two_processes_equals_one_process(shared, monkeypatch,
                                                                       one_process_study):
  work = shared / "study2"
  procs = _start(shared, ["train", f"--config={STUDY}", f"--workdir={work}", *STUDY_SMALL])
  first_ckpt = work / "brick" / "checkpoints" / "5"
  deadline = time.time() + 240
  while not first_ckpt.is_dir() and time.time() < deadline and procs[0].poll() is None:
    time.sleep(0.02)
  assert first_ckpt.is_dir(), _finish(procs)[0][2][-3000:]
  procs[0].send_signal(signal.SIGKILL)                  # the lead: coordinator and writer
  killed = _finish(procs)
  assert killed[0][0] == -signal.SIGKILL and killed[1][0] != 0   # its peer stops too
  assert not (work / "report.md").exists()              # the run was cut short

  _ok(_finish(_start(shared, ["train", f"--config={STUDY}", f"--workdir={work}", *STUDY_SMALL])))
  manifest = json.loads((work / "manifest.json").read_text())
  assert [i["process_count"] for i in manifest["invocations"]] == [2, 2]
  assert manifest["invocations"][-1]["device_count"] == 4

  one_dev = one_process_study
  # 1 process × 4 devices (this test process's fake devices).
  monkeypatch.chdir(shared)
  monkeypatch.setenv("TAILJAX_CACHE", str(shared / "cache"))
  four_dev = shared / "study1x4"
  study_a.main(_small(fastflow_textures.get_config("smoke")), four_dev, progress=False)

  assert set(_units(work)) == {f"units/brick/eval/{s}.json" for s in (0, 5, 10)}
  assert _units(work) == _units(one_dev)
  assert _report(work) == _report(one_dev)
  assert (work / "conclusions.json").read_text() == (one_dev / "conclusions.json").read_text()
  for name, text in _units(four_dev).items():
    _assert_close(json.loads(_units(work)[name]), json.loads(text), name)
  # The conclusions' p-values and interval bounds (2-seed t-tests) magnify that rounding;
  # every verdict, selected step and label must still agree. Pixel AP on a subset of a few
  # images (the per-defect-kind rows) is a step function of the pixels' order, so a
  # rounding-level swap of two near-equal scores moves it by a step: atol 1e-4.
  _assert_close(*(json.loads((w / "conclusions.json").read_text()) for w in (work, four_dev)),
                "conclusions.json", rtol=1e-3, atol=1e-4)
  # One writer: the TensorBoard runs (one per row) and the metric log hold each step once.
  log = [json.loads(l)["step"] for l in (work / "brick" / "metrics.jsonl").read_text().splitlines()]
  assert log == [5, 10]
  assert len(list((work / "tensorboard" / "brick").iterdir())) == 4


def test_rows_in_local_processes_stopped_and_resumed_equal_one_process(shared, one_process_study):
  """``train.processes=2``: one command starts two local processes (each pinned to its own
  core while it trains); SIGTERM to that command stops both at a boundary (exit 143) and
  the rerun resumes. Every record equals the plain single-process run bit for bit."""
  work = shared / "study_local"
  args = ["train", f"--config={STUDY}", f"--workdir={work}", *STUDY_SMALL,
          "--config.train.processes=2"]
  parent = _start(shared, args, n=0, devices=1)[0]
  first_ckpt = work / "brick" / "checkpoints" / "5"
  deadline = time.time() + 240
  while not first_ckpt.is_dir() and time.time() < deadline and parent.poll() is None:
    time.sleep(0.02)
  assert first_ckpt.is_dir(), _finish([parent])[0][2][-3000:]
  parent.send_signal(signal.SIGTERM)
  (rc, _, err), = _finish([parent])
  assert rc == 143, err[-3000:]
  assert "resume" in err.splitlines()[-1], err[-3000:]
  manifest = json.loads((work / "manifest.json").read_text())
  # At the boundary after the signal: 5, or 10 when the next segment was already running.
  assert manifest["invocations"][0]["stopped"]["step"] in (5, 10), manifest["invocations"][0]
  assert not (work / "report.md").exists()

  _ok(_finish(_start(shared, args, n=0, devices=1)))
  manifest = json.loads((work / "manifest.json").read_text())
  assert [i["process_count"] for i in manifest["invocations"]] == [2, 2]
  assert _units(work) == _units(one_process_study)
  assert _report(work) == _report(one_process_study)
  assert (work / "conclusions.json").read_text() == (
      one_process_study / "conclusions.json").read_text()


def test_local_process_count_and_core_shares(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(distributed, "cores", lambda: [0, 1])
  count = distributed.local_process_count
  assert count("auto", n_rows=6, row_steps=4800) == 2
  assert count("auto", n_rows=1, row_steps=4800) == 1          # one row: nothing to split
  assert count("auto", n_rows=6, row_steps=60) == 1            # start-up would not pay
  assert count("auto", n_rows=6, row_steps=4800, batch_devices=2) == 1
  assert count("3", n_rows=6, row_steps=60) == 3 and count(1, 6, 60) == 1
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert count("auto", n_rows=6, row_steps=4800) == 1          # accelerators: one process
  for bad in ("0", "two", 1.5, True, -1):
    with pytest.raises(ValueError, match="config.train.processes"):
      count(bad, 6, 4800)
  assert distributed.core_shares([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
  assert sorted(map(len, distributed.core_shares([0, 1, 2], 2))) == [1, 2]
  assert distributed.core_shares([4], 2) == [[4], [4]]


def test_own_cores_pins_every_thread_and_restores(monkeypatch):
  if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs sched_setaffinity and two cores")
  import threading
  every = os.sched_getaffinity(0)
  mine = min(every)
  stop = threading.Event()
  worker = threading.Thread(target=stop.wait, daemon=True)
  worker.start()
  monkeypatch.setenv(distributed.CORES_ENV, str(mine))
  monkeypatch.setitem(distributed._state, "all_cores", set(every))
  affinity = lambda: {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
  with distributed.own_cores():
    assert set(map(frozenset, affinity().values())) == {frozenset({mine})}
  assert set(map(frozenset, affinity().values())) == {frozenset(every)}
  stop.set()


# Tolerance of the batch-sharded sweep: every step averages 4 partial-batch gradients
# (psum over the "batch" axis, across the two processes through gloo) where the 1-device
# run takes one full-batch mean, and gloo's all-reduce sums in another order than the
# in-process one, so gradients agree to float32 rounding (~1e-7 relative), not bit for
# bit. After 10 Adam steps (Adam divides by sqrt(v), which magnifies rounding in small
# gradient components) the parameters (|p| ≤ 0.33) differed by at most 2.5e-6 from the
# 1-device run and 2.8e-6 from the 1-process 4-device run, the metrics by 1.6e-7.
PARAM_ATOL = 2e-5
METRIC_ATOL = 1e-5


def _sweep_params(cfg, workdir: Path):
  import ml_collections
  cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  rows = engine.Rows.from_grid(cfg.sweep).labelled(category="brick")
  feats_shape = json.loads((workdir / "brick" / "rows.json").read_text())["feats_shape"]
  _, params_R, step = engine.load_rows(cfg, workdir, "brick", feats_shape, rows)
  return params_R, step


def test_sweep_with_the_batch_split_across_processes_equals_one_process(shared, monkeypatch):
  import jax
  work = shared / "sweep2"
  batch4 = "--config.train.batch_devices=4"         # each row's batch over all 4 devices
  _ok(_finish(_start(shared, ["sweep", f"--config={SWEEP}", f"--workdir={work}", batch4, *SMALL])))
  monkeypatch.chdir(shared)
  monkeypatch.setenv("TAILJAX_CACHE", str(shared / "cache"))
  # 1 process: the full batch on 1 device (this process's first), and the same 4-device
  # batch split (this process's 4 fake devices).
  from tailjax import sharding
  one_dev = shared / "sweep1x1"
  sweeps.run_and_evaluate(_small(sweep_tail_weight.get_config("smoke")), one_dev, progress=False,
                          mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  four_dev = shared / "sweep1x4"
  cfg = _small(sweep_tail_weight.get_config("smoke"))
  cfg.train.batch_devices = 4
  sweeps.run_and_evaluate(cfg, four_dev, progress=False)

  rows = {w: json.loads((w / "results.json").read_text())["rows"] for w in (work, one_dev, four_dev)}
  assert len(rows[work]) == 4
  for other in (one_dev, four_dev):
    for a, b in zip(rows[work], rows[other]):
      assert {k: a[k] for k in a if k != "metrics"} == {k: b[k] for k in b if k != "metrics"}
      for k in a["metrics"]:
        assert abs(a["metrics"][k] - b["metrics"][k]) <= METRIC_ATOL, (other, k)
    p2, step2 = _sweep_params(cfg, work)
    p1, step1 = _sweep_params(cfg, other)
    assert step1 == step2 == 10
    for x, y in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
      np.testing.assert_allclose(x, y, rtol=0, atol=PARAM_ATOL)


def test_a_process_with_another_config_is_refused_on_both(shared):
  work = shared / "mismatch"
  port = _free_port()
  procs = []
  for i, lr in enumerate(("0.002", "0.01")):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tailjax.cli", "train", f"--config={STUDY}", f"--workdir={work}",
         f"--config.optim.learning_rate={lr}", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=shared, env=_env(shared, 1), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  for rc, _, err in _finish(procs, limit_s=120):
    assert rc == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: process 1 started with a different config than process 0")
    assert "config optim.learning_rate: 0.002 on process 0, 0.01 on process 1" in line
  assert not work.exists() or not (work / "manifest.json").exists()   # nothing written


def test_a_peer_that_never_joins_is_a_clear_timeout(shared):
  t0 = time.time()
  procs = _start(shared, ["train", f"--config={STUDY}", f"--workdir={shared / 'alone'}"],
                 n=2, devices=1, timeout_s=3)
  procs[1].kill()                                       # process 1 never joins
  rc, _, err = _finish(procs[:1], limit_s=60)[0]
  procs[1].wait()
  assert rc == 2 and time.time() - t0 < 45
  address = next(a for a in procs[0].args if a.startswith("--coordinator_address="))
  assert err.strip().splitlines()[-1] == (
      "error: jax.distributed: process 0 of 2 waited 3 s for every process to join the "
      f"coordinator at {address.split('=', 1)[1]}; start the same command on every "
      "process (each with its own --process_id), or raise --distributed_timeout")


def test_flags_need_distributed_and_go_together():
  from tailjax import cli
  assert cli.main(["train", "--process_id=1", "--workdir=/nonexistent/x"]) == 2
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1", None, 0)
  with pytest.raises(ValueError, match=r"--process_id must lie in \[0, --num_processes=2\)"):
    distributed.initialize("127.0.0.1:1", 2, 2)


def test_single_process_coordination_is_a_plain_call():
  calls = []
  assert distributed.lead_first("x", lambda: calls.append(1) or 7, lambda: 8) == 7
  assert distributed.from_lead("y", lambda: {"a": 1}) == {"a": 1}
  distributed.check_same("z", {"a": 1})
  distributed.barrier("w")
  assert calls == [1] and distributed.is_lead()


_PRIMITIVES = r'''
import json, sys
from tailjax import distributed
pid, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60, heartbeat_timeout_s=5)
# Jobs split over processes; process 0 gets every result, in its own order then key order.
got = []
out = distributed.split_work("jobs", ["a", "b", "c"], lambda k: {"k": k, "by": pid},
                             on_result=lambda k, v: got.append(k))
print(json.dumps({"split": out, "got": got}))
print(json.dumps({"lead": distributed.from_lead("x", lambda: {"pid": pid})}))
# A failure on process 0 is raised on process 1 too, with its message.
try:
  distributed.lead_first("fail", lambda: 1 / 0)
except Exception as e:
  print(json.dumps({"error": type(e).__name__, "message": str(e)}))
distributed.barrier("end")
'''


def test_coordination_primitives_on_two_processes(tmp_path):
  script = tmp_path / "p.py"
  script.write_text(_PRIMITIVES)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], cwd=tmp_path,
                            env=_env(tmp_path, 1), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for i in range(2)]
  (rc0, out0, err0), (rc1, out1, err1) = _finish(procs, limit_s=120)
  assert rc0 == rc1 == 0, err0[-2000:] + err1[-2000:]
  lines0 = [json.loads(l) for l in out0.splitlines() if l.startswith("{")]
  lines1 = [json.loads(l) for l in out1.splitlines() if l.startswith("{")]
  assert lines0[0] == {"split": {"a": {"k": "a", "by": 0}, "b": {"k": "b", "by": 1},
                                 "c": {"k": "c", "by": 0}}, "got": ["a", "c", "b"]}
  assert lines1[0] == {"split": None, "got": []}
  assert lines0[1] == lines1[1] == {"lead": {"pid": 0}}
  assert lines0[2] == {"error": "ZeroDivisionError", "message": "division by zero"}
  assert lines1[2] == {"error": "LeadFailedError",
                       "message": "process 0 failed (ZeroDivisionError): division by zero"}
