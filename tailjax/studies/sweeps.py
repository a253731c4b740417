"""Sweeps: every (λ, r, learning rate) × seed row of a category as one grid on the engine.

  tailjax sweep --config=configs/sweep_tail_weight.py --workdir=runs/sweep_lambda

Per category the rows train as one compiled, sharded program
(``tailjax.engine.run_rows``; vmap or ``lax.map`` per device, rows split over
the mesh), are checkpointed in segments, and are evaluated once at the last
step through the engine's evaluation hook (a saved unit, never recomputed on
resume). ``results.json`` (one row per grid point and seed) and ``results.md``
(mean ± std over seeds) are written at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tailjax import engine, evaluation, io, losses, reporting, runrecord
from tailjax.data import pipeline
from tailjax.evaluation import METRIC_KEYS, METRIC_NAMES
from tailjax.studies import study_a

KIND = "sweep"
HPARAM_NAMES = engine.HPARAM_NAMES
AXES = (*HPARAM_NAMES, "tail_nll")   # a grid point: (λ, r, lr, per-patch NLL definition)
RESULT_KEYS = ("category", *AXES, "seed", "metrics")

FIELDS = tuple(f for f in study_a.FIELDS
               if not f.startswith(("variants.", "report.", "padim.", "mechanisms."))
               and f not in ("seed", "num_seeds")) + (
    "sweep.tail_weight", "sweep.top_k_ratio", "sweep.learning_rate", "sweep.tail_nll",
    "sweep.seeds")


def results_markdown(cfg, rows: list[dict], grid: engine.Rows, n_patches: int) -> str:
  """Per category (and the mean over categories): one line per grid point of ``grid``
  (``engine.Rows.from_grid``), mean ± std over seeds, in %; the best pixel AP per table
  in bold."""
  keys = METRIC_KEYS
  points = list(dict.fromkeys(tuple(r[k] for k in AXES) for r in grid.rows))
  seeds = list(dict.fromkeys(grid.seeds_R))
  cats = list(dict.fromkeys(r["category"] for r in rows))
  by = {_row_id(r): r["metrics"] for r in rows}
  lines = [f"# Sweep over tail weight λ, top-k ratio r and learning rate ({cfg.data.kind})", "",
           f"{cfg.train.num_steps} steps of batch {cfg.train.batch_size}, flow "
           f"{cfg.flow.num_steps} steps ({cfg.flow.kernel_mode}), {len(seeds)} seeds "
           f"{seeds} per grid point; k = max(1, round(r · {n_patches})). "
           "Metrics in %, mean ± std over seeds; **bold** = best pixel AP in the table.", ""]
  scopes = cats + (["mean over categories"] if len(cats) > 1 else [])
  for scope in scopes:
    table = []
    for p in points:
      per_seed = []
      for s in seeds:
        ms = [by.get((c, *_point_id(p), s)) for c in
              (cats if scope not in cats else [scope])]
        if any(m is None for m in ms):
          continue
        per_seed.append({k: float(np.mean([m[k] for m in ms])) for k in keys})
      if per_seed:
        table.append((p, per_seed))
    best = max(range(len(table)), key=lambda i: np.mean([m["pixel_ap"] for m in table[i][1]]),
               default=None)
    body = []
    for i, (p, per_seed) in enumerate(table):
      k = int(losses.top_k_count(p[1], n_patches))
      cells = [reporting.mean_std([m[key] for m in per_seed]) for key in keys]
      if i == best:
        cells[keys.index("pixel_ap")] = f"**{cells[keys.index('pixel_ap')]}**"
      body.append([f"{p[0]:g}", f"{p[1]:g}", k, f"{p[2]:g}", p[3], *cells])
    lines += [f"## {scope}", ""]
    lines += reporting.table(["λ", "r", "k", "lr", "tail NLL", *(METRIC_NAMES[k] for k in keys)],
                             body)
    lines.append("")
  return "\n".join(lines)


def _point_id(p) -> tuple:
  return (*(round(float(x), 12) for x in p[:len(HPARAM_NAMES)]), str(p[len(HPARAM_NAMES)]))


def _row_id(row) -> tuple:
  return (row["category"], *_point_id([row[k] for k in AXES]), int(row["seed"]))


def run_category(cfg, run: runrecord.Run, data: pipeline.CategoryData, grid: engine.Rows,
                 progress: bool = True, mesh=None) -> list[dict]:
  """Trains every grid row of one category (resuming) and evaluates it at the last step."""
  rows = grid.labelled(category=data.name)
  total = int(cfg.train.num_steps)
  feats = data.flow_feats("train")          # every scale of a multi-scale run
  evaluate = lambda step, params_R, program: evaluation.evaluate_rows(cfg, program, params_R,
                                                                      data)
  res = engine.run_rows(cfg, run, data.name, feats, rows, eval_steps=(total,),
                        evaluate=evaluate, progress=progress, desc=data.name, mesh=mesh)
  return [{**rows.row(i), "metrics": res.evals[total][i]["metrics"]}
          for i in range(rows.num_rows)]


def run_and_evaluate(cfg, workdir: str | Path, *, on_change: str = "error",
                     progress: bool = True, mesh=None) -> dict:
  """The whole sweep: every category's grid trained (resumable) and evaluated; writes
  ``results.json`` (``{"rows": [...]}``) and ``results.md`` in the workdir. ``mesh``:
  the devices to train on (default: all, ``sharding.make_mesh(train.batch_devices)``)."""
  runrecord.check_fields(cfg, FIELDS + pipeline.input_fields(cfg))
  grid = engine.Rows.from_grid(cfg.sweep)
  with runrecord.open_run(workdir, cfg, kind=KIND, on_change=on_change, extendable=True) as run:
    t0 = time.time()
    dataset = pipeline.open_dataset(cfg)
    all_rows: list[dict] = []
    n_patches = None
    for cat in dataset.categories:
      t_cat = time.time()
      data = pipeline.load_once(dataset, cat)
      n_patches = int(np.prod(data.train_feats.shape[1:3]))
      all_rows += run_category(cfg, run, data, grid, progress=progress, mesh=mesh)
      if run.writer:
        print(f"[{cat}] {grid.num_rows} rows trained and evaluated ({time.time() - t_cat:.0f} s)")
    rows = [{k: r[k] for k in RESULT_KEYS} for r in all_rows]
    text = results_markdown(cfg, rows, grid, n_patches)
    if run.writer:   # process 0; the others read the same evaluation units and agree
      io.atomic_write_json(run.path("results.json"), {"rows": rows})
      io.atomic_write_text(run.path("results.md"), text + "\n")
      print(text)
    return {"rows": rows, "markdown": text, "seconds": time.time() - t0, "workdir": run.workdir}
