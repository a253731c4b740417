"""The demo's grid of rows trained by tailjax and by the PyTorch peer: wall time side by side.

  python -m benchmarks.bench_grid                     # 6 rows × 200 steps
  python -m benchmarks.bench_grid --steps=800         # one category of the demo, whole
  python -m benchmarks.bench_grid --precision=bfloat16 --no-peer

The grid: study A's demo rows for one category (``configs/fastflow_textures.py``:
mean-only λ = 0 and tail-aware λ = 0.7, r = 0.02, × 3 seeds), each trained ``--steps``
steps on 96 random 14×14×112 feature maps (the demo's training split), batch 16,
4-step FastFlow (3×3 / 1×1), Adam 2e-3 with gradient clipping at norm 10.

Four ways to train it, each in fresh processes (none inherits another's threads):

  ours, 1 process         ``tailjax.engine.run_rows``, one process on every core
                          (``train.processes=1``), rows one after another (``lax.map``)
  ours, n processes       the same grid as n local processes (``train.processes=auto``,
                          ``tailjax.distributed.launch_local``), each pinned to its own
                          core while it trains; the same numbers as one process
  ours, n × 1 thread      the same, but each process pinned before JAX starts, so its
                          XLA thread pool has one thread: the numbers of a one-core
                          run, not the default's (what the pool size costs)
  peer, 1 process         anomalib's FastFlow block in torch (``benchmarks.peer_torch``),
                          torch threads = cores, the rows one after another
  peer, n processes       n processes with one torch thread each, pinned to their own
                          core, the rows split between them

Ours includes what a run pays: compilation, the checkpoint at every 100 steps and
the process start-up of the local processes (start-up of the interpreters, joining
``jax.distributed``); the peer trains in a plain loop with no checkpoints, and its
block does ≈ 27 % more multiply-adds per step (a permutation convolution and a global
affine, ``benchmarks.peer_torch``). Throughput = rows × steps / wall seconds; the
ratio is ours (best) / peer (best). The torch version is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

N_FEATS, H, W, C = 96, 14, 14, 112


def _feats() -> np.ndarray:
  return np.random.default_rng(0).normal(size=(N_FEATS, H, W, C)).astype(np.float32)


def grid_config(steps: int, precision: str = "float32"):
  from tailjax.configs import fastflow_textures
  cfg = fastflow_textures.get_config()
  cfg.train.num_steps = steps
  cfg.train.precision = precision
  cfg.eval.budgets = (0, steps)
  return cfg


def _ours_worker(args) -> None:
  from tailjax import distributed
  if args.pin_at_start:          # before the backend starts: a pool of this share's size
    os.sched_setaffinity(0, {int(c) for c in os.environ[distributed.CORES_ENV].split(",")})
  if args.distributed:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout_s=args.heartbeat_timeout)
  from tailjax import engine, runrecord
  cfg = grid_config(args.steps, args.precision)
  rows = engine.Rows.from_variants(cfg).labelled(category="bench")
  with runrecord.open_run(args.workdir, cfg, kind="bench_grid") as run:
    t = time.perf_counter()
    result = engine.run_rows(cfg, run, "bench", _feats(), rows, progress=False)
    wall = time.perf_counter() - t
  if distributed.is_lead():
    Path(args.out).write_text(json.dumps({"train_s": wall, "rows": rows.num_rows,
                                          "steps": result.step,
                                          "processes": distributed.process_count()}))


def _peer_worker(args) -> None:
  import torch
  from benchmarks import peer_torch
  if args.cores:
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
  torch.set_num_threads(args.threads)
  cfg = grid_config(args.steps)
  feats = torch.from_numpy(_feats()).permute(0, 3, 1, 2).contiguous()
  top_k = max(1, round(float(cfg.variants.tail_aware.top_k_ratio) * H * W))
  todo = [int(i) for i in args.peer_rows.split(",") if i]
  seeds = [int(cfg.seed) + s for s in range(int(cfg.num_seeds))]
  grid = [(v, s) for v in cfg.variants.values() for s in seeds]
  t = time.perf_counter()
  for i in todo:
    variant, seed = grid[i]
    flow = peer_torch.build_flow(int(cfg.flow.num_steps), seed=seed)
    opt = torch.optim.Adam(flow.parameters(), lr=float(cfg.optim.learning_rate))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
      idx = torch.randint(0, N_FEATS, (int(cfg.train.batch_size),), generator=gen)
      opt.zero_grad(set_to_none=True)
      loss = peer_torch.tail_aware_loss(peer_torch.patch_nll(flow, feats[idx]),
                                        float(variant.tail_weight), top_k)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(flow.parameters(), float(cfg.optim.grad_clip_norm))
      opt.step()
    if not np.isfinite(float(loss.detach())):
      raise FloatingPointError(f"peer row {i}: non-finite loss")
  Path(args.out).write_text(json.dumps({"train_s": time.perf_counter() - t, "rows": len(todo),
                                        "torch": torch.__version__}))


def _run(cmd: Sequence[str]) -> None:
  subprocess.run([sys.executable, "-m", "benchmarks.bench_grid", *cmd], check=True,
                 stdout=subprocess.DEVNULL)


def ours(steps: int, processes: int, precision: str, tmp: Path, pin_at_start: bool = False) -> dict:
  from tailjax import distributed
  tag = f"{processes}{'_own' if pin_at_start else ''}"
  out, workdir = tmp / f"ours{tag}.json", tmp / f"ours{tag}"
  args = ["--role=ours", f"--steps={steps}", f"--precision={precision}",
          f"--workdir={workdir}", f"--out={out}"] + (["--pin-at-start"] if pin_at_start else [])
  t = time.perf_counter()
  if processes == 1:
    _run(args)
  else:
    code = distributed.launch_local(args, processes, module="benchmarks.bench_grid")
    if code:
      raise RuntimeError(f"the {processes} local processes exited with {code}")
  res = json.loads(out.read_text())
  res["wall_s"] = time.perf_counter() - t   # with interpreter start-up and joining
  return res


def peer(steps: int, processes: int, n_rows: int, tmp: Path) -> dict:
  from tailjax import distributed
  shares = distributed.core_shares(distributed.cores(), processes)
  threads = len(distributed.cores()) if processes == 1 else 1
  procs, outs = [], []
  t = time.perf_counter()
  for p in range(processes):
    out = tmp / f"peer{processes}_{p}.json"
    outs.append(out)
    mine = ",".join(str(i) for i in range(p, n_rows, processes))
    cores = "" if processes == 1 else ",".join(map(str, shares[p]))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_grid", "--role=peer", f"--steps={steps}",
         f"--peer-rows={mine}", f"--threads={threads}", f"--cores={cores}", f"--out={out}"],
        stdout=subprocess.DEVNULL))
  if any(p.wait() for p in procs):
    raise RuntimeError("a peer process failed")
  wall = time.perf_counter() - t
  parts = [json.loads(o.read_text()) for o in outs]
  return {"wall_s": wall, "train_s": max(r["train_s"] for r in parts), "rows": n_rows,
          "steps": steps, "processes": processes, "threads": threads, "torch": parts[0]["torch"]}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--precision", default="float32")
  parser.add_argument("--processes", type=int, default=0, help="local processes (0: one per core)")
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--out", default=None)
  # Internal: the worker processes.
  parser.add_argument("--role", default="main", choices=("main", "ours", "peer"))
  parser.add_argument("--workdir", default="")
  parser.add_argument("--peer-rows", default="")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--cores", default="")
  parser.add_argument("--pin-at-start", action="store_true")
  parser.add_argument("--distributed", action="store_true")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--heartbeat_timeout", type=int, default=100)
  args = parser.parse_args(argv)
  if args.role == "ours":
    return _ours_worker(args)
  if args.role == "peer":
    return _peer_worker(args)

  from benchmarks import peer_torch
  from tailjax import distributed
  n = args.processes or len(distributed.cores())
  n_rows = 6
  res = {"steps": args.steps, "rows": n_rows, "precision": args.precision, "cores": len(distributed.cores())}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    res["ours_1"] = ours(args.steps, 1, args.precision, tmp)
    res["ours_n"] = ours(args.steps, n, args.precision, tmp) if n > 1 else res["ours_1"]
    if n > 1:
      res["ours_n_own"] = ours(args.steps, n, args.precision, tmp, pin_at_start=True)
    if not args.no_peer and peer_torch.peer_available():
      res["peer_1"] = peer(args.steps, 1, n_rows, tmp)
      res["peer_n"] = peer(args.steps, n, n_rows, tmp) if n > 1 else res["peer_1"]
  rs = lambda r: r["rows"] * args.steps / r["wall_s"]
  print(f"Grid: {n_rows} rows × {args.steps} steps ({args.precision}), {res['cores']} cores; "
        "row-steps per second (wall, start-up included)")
  print(f"{'':<22} {'wall s':>8} {'training s':>10} {'row-steps/s':>12}")
  for key, label in (("ours_1", "ours, 1 process"), ("ours_n", f"ours, {n} processes"),
                     ("ours_n_own", f"ours, {n} × 1 thread"),
                     ("peer_1", "peer, 1 process"), ("peer_n", f"peer, {n} processes")):
    if key in res:
      res[key]["row_steps_per_s"] = rs(res[key])
      print(f"{label:<22} {res[key]['wall_s']:>8.1f} {res[key]['train_s']:>10.1f} "
            f"{rs(res[key]):>12.2f}")
  # The default's numbers: one process or the same-numbers processes (not the 1-thread ones).
  best_ours = max(res["ours_1"]["row_steps_per_s"], res["ours_n"]["row_steps_per_s"])
  res["processes_speedup"] = res["ours_n"]["row_steps_per_s"] / res["ours_1"]["row_steps_per_s"]
  print(f"ours: {n} processes / 1 process = {res['processes_speedup']:.2f}×")
  if "peer_1" in res:
    best_peer = max(res["peer_1"]["row_steps_per_s"], res["peer_n"]["row_steps_per_s"])
    res["speedup_vs_peer"] = best_ours / best_peer
    print(f"ours (best) / peer (best) = {res['speedup_vs_peer']:.2f}× (torch "
          f"{res['peer_1']['torch']})")
  if args.out:
    Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
