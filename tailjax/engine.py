"""The one driver for flow training: any grid of rows, in checkpointed segments, on any mesh.

A *row* is one training run: hyperparameters (λ = tail_weight, r = top_k_ratio,
learning rate) and a seed (``Rows``). Study A's variants × seeds, a λ / r / lr
sweep and the toy run are all grids of rows; ``run_rows`` trains them with the
pure ``tailjax.train.FlowProgram``:

* Rows are padded to a multiple of the mesh's "sweep" axis, split over it with
  ``jax.shard_map``, and run on each device by vmap or ``lax.map``
  (``train.rows``); with ``train.batch_devices = b > 1`` the b devices that
  share a row split its mini-batch (see ``tailjax.sharding``).
* The steps are cut at *boundaries*: every ``train.segment_steps`` steps, every
  requested evaluation step and the last step. One compiled segment program
  runs any number of steps up to ``segment_steps`` (a traced trip count), so
  evaluation ladders cost no recompilation. Because every key depends only on
  the step and the program is the same, where the run is cut (or killed and
  resumed) never changes a number.
* At a boundary: the evaluation hook runs first (its result is saved as a unit
  file, ``runrecord.Run.save_unit``), then the stacked, *unpadded* state is
  saved with orbax. The checkpoint layout is ``<prefix>/checkpoints/<step>``
  whatever the row mode, device count or backend; ``rows.json`` beside it
  records the rows and a hash of the training features, checked on resume.
* Steps are numbered by updates done: checkpoint ``<step>``, ``metrics.jsonl``'s
  ``"step"`` and every message use the same number (the update that produced
  state s is "step s").
* **Non-finite losses.** The loss of step s is computed from state s−1, so when
  it is NaN/Inf, state s−1 is the one that blew up and the last *good* state is
  s−2 (its own next loss, step s−1, was finite). The driver recomputes that
  state exactly from the last checkpoint (or from the deterministic init),
  saves it, drops later checkpoints, and raises ``NonFiniteLossError`` naming
  the row, the step and the checkpoint. When step 1 already fails there is no
  good state, and the message says so.
* **Ctrl-C** closes the checkpoint manager cleanly and raises ``Interrupted``
  (a ``KeyboardInterrupt``) whose message says where the run can resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tailjax import distributed, io, losses, runrecord, sharding
from tailjax import train as train_lib

PyTree = Any
log = logging.getLogger(__name__)
HPARAM_NAMES = train_lib.HPARAM_NAMES
TRACED_NAMES = train_lib.TRACED_NAMES
DEFAULT_SEGMENT_STEPS = 100


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message says where the run resumes."""


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
  """R training runs, each a dict: the hyperparameters ``HPARAM_NAMES`` (exact Python
  floats, as the config gave them), the per-patch NLL the tail is ranked by
  (``"tail_nll"``: exact | sq_norm | even_share, default exact; traced as the two
  scalars ``train.TAIL_NLL_NAMES``), a ``seed``, and descriptive labels (e.g.
  ``{"variant": "tail_aware"}`` or a grid point's category)."""

  rows: tuple[dict, ...]

  @classmethod
  def from_dicts(cls, rows: Sequence[Mapping], where: str = "rows") -> "Rows":
    """Validates λ ∈ [0, 1], r ∈ (0, 1], lr > 0 and non-negative integer seeds."""
    if not rows:
      raise ValueError(f"{where}: no rows to train")
    for i, r in enumerate(rows):
      missing = [k for k in (*HPARAM_NAMES, "seed") if k not in r]
      if missing:
        raise ValueError(f"{where}[{i}]: missing {missing}")
    h = {k: np.asarray([float(r[k]) for r in rows], np.float64) for k in HPARAM_NAMES}
    losses.validate_tail_params(h["tail_weight"], h["top_k_ratio"], where=where)
    if not np.all(np.isfinite(h["learning_rate"])) or np.any(h["learning_rate"] <= 0):
      raise ValueError(f"{where}: learning_rate must be > 0, got {h['learning_rate'].tolist()}")
    seeds = [r["seed"] for r in rows]
    if any(int(s) != s or int(s) < 0 for s in seeds):
      raise ValueError(f"{where}: seeds must be non-negative integers, got {seeds}")
    nll = [str(r.get("tail_nll", "exact")) for r in rows]
    bad = sorted(set(nll) - set(losses.NLL_DEFINITIONS))
    if bad:
      raise ValueError(f"{where}: tail_nll must be one of {tuple(losses.NLL_DEFINITIONS)}, "
                       f"got {bad}")
    fixed = (*HPARAM_NAMES, "tail_nll", "seed")
    return cls(tuple({**{k: v for k, v in r.items() if k not in fixed},
                      **{k: float(r[k]) for k in HPARAM_NAMES}, "tail_nll": d,
                      "seed": int(r["seed"])} for r, d in zip(rows, nll)))

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  @property
  def seeds_R(self) -> tuple[int, ...]:
    return tuple(r["seed"] for r in self.rows)

  @property
  def hparams_R(self) -> dict[str, np.ndarray]:
    """Every traced hyperparameter (``TRACED_NAMES``), float32 [R]."""
    return {**{k: np.asarray([r[k] for r in self.rows], np.float32) for k in HPARAM_NAMES},
            **train_lib.tail_nll_hparams([r["tail_nll"] for r in self.rows])}

  def row(self, i: int) -> dict:
    return dict(self.rows[i])

  def to_json(self) -> list[dict]:
    return [self.row(i) for i in range(self.num_rows)]

  def describe(self, i: int) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in self.rows[i].items())


@dataclasses.dataclass
class RowsResult:
  program: train_lib.FlowProgram
  params_R: PyTree          # host NumPy, leading axis = rows
  step: int                 # steps done (== program.total_steps when finished)
  finished: bool
  evals: dict[int, Any]     # evaluation step -> what the hook returned (saved units)
  resumed_from: int | None
  row_mode: str
  # Wall seconds of this call: "train" (segments, loss checks, checkpoints) and "eval"
  # (the evaluation hook, with the gathering of parameters it needs).
  seconds: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------
# Compiled, sharded row programs
# ----------------------------------------------------------------------------


def _exec_get(cfg, name: str, default):
  t = cfg.train
  return t.get(name, default) if hasattr(t, "get") else getattr(t, name, default)


def _block_json(block) -> str:
  return io.to_json(block.to_dict() if hasattr(block, "to_dict") else dict(block), sort_keys=True)


_ROW_FNS: dict[tuple, tuple] = {}


def _row_fns(cfg, feats_shape, mesh, row_impl: str, seg_len: int):
  """(program, init(h_R, kd_R), segment(state_R, kd_R, feats, n)), compiled once per
  structure and reused by every category / resume with the same shapes."""
  b = int(mesh.shape[sharding.BATCH_AXIS])
  program = train_lib.make_flow_program(cfg, feats_shape,
                                        batch_axis=sharding.BATCH_AXIS if b > 1 else None,
                                        batch_shards=b)
  key = (_block_json(cfg.flow), _block_json(cfg.optim), program.batch_size, program.conv_impl,
         program.feats_shape, program.batch_axis, program.batch_shards, mesh, row_impl, seg_len)
  if key not in _ROW_FNS:
    if len(_ROW_FNS) >= 16:
      _ROW_FNS.pop(next(iter(_ROW_FNS)))
    rows = P(sharding.SWEEP_AXIS)
    wrap = jax.random.wrap_key_data

    def local_init(h_r, kd_r):
      return jax.vmap(lambda h, kd: program.init(h, wrap(kd)))(h_r, kd_r)

    def local_segment(state_r, kd_r, feats, n):
      return train_lib.over_rows(
          lambda st, kd: program.segment(st, wrap(kd), feats, n, seg_len), row_impl)(state_r, kd_r)

    init = jax.jit(jax.shard_map(local_init, mesh=mesh, in_specs=(rows, rows), out_specs=rows))
    segment = jax.jit(jax.shard_map(local_segment, mesh=mesh, in_specs=(rows, rows, P(), P()),
                                    out_specs=(rows, rows)), donate_argnums=0)
    _ROW_FNS[key] = (program, init, segment)
  cached, init, segment = _ROW_FNS[key]
  return dataclasses.replace(cached, total_steps=program.total_steps), init, segment


def _check_feats(feats, where: str) -> None:
  if isinstance(feats, (tuple, list)):   # multi-scale: one [N, H_s, W_s, C_s] per scale
    if not feats or len({np.shape(f)[0] if np.ndim(f) else -1 for f in feats}) != 1:
      raise ValueError(f"{where}: multi-scale features must be [N, H_s, W_s, C_s] arrays "
                       f"of one N, got shapes {[np.shape(f) for f in feats]}")
    for s, f in enumerate(feats):
      _check_feats(f, f"{where} (scale {s})")
    return
  if np.ndim(feats) != 4:
    raise ValueError(f"{where}: features must be [N, H, W, C], got shape {np.shape(feats)}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{where}: features contain NaN/Inf")


def feats_digest(feats) -> str:
  """sha256 (16 hex) of the float32 bytes; of every scale's bytes in order, multi-scale."""
  h = hashlib.sha256()
  for f in (feats if isinstance(feats, (tuple, list)) else (feats,)):
    h.update(np.ascontiguousarray(np.asarray(f, np.float32)).tobytes())
  return h.hexdigest()[:16]


def boundaries(total: int, seg_len: int, eval_steps: Sequence[int]) -> list[int]:
  """Steps at which a segment ends: multiples of ``seg_len``, evaluation steps, the last."""
  return sorted({*range(seg_len, total, seg_len), *(int(s) for s in eval_steps if 0 < s <= total),
                 total})


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def _manager(path: Path, read_only: bool = False) -> ocp.CheckpointManager:
  opts = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
          ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))
  return ocp.CheckpointManager(path.absolute(), options=opts)


def _abstract_state(program: train_lib.FlowProgram, n_rows: int):
  h = {k: jax.ShapeDtypeStruct((n_rows,), jnp.float32) for k in TRACED_NAMES}
  kd = jax.ShapeDtypeStruct((n_rows, 2), jnp.uint32)
  return jax.eval_shape(jax.vmap(lambda h, kd: program.init(h, jax.random.wrap_key_data(kd))),
                        h, kd)


def _restore_host(mngr, step: int, program, n_rows: int) -> PyTree:
  """The saved state at ``step`` as host NumPy arrays [n_rows, ...]."""
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract_state(program, n_rows))
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def _save(mngr, step: int, state_host) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_host)), force=True)
  mngr.wait_until_finished()


# ----------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
  """What a call of ``run_rows`` will do, fixed before anything runs."""
  mesh: Any
  row_impl: str
  total: int
  seg_len: int
  eval_steps: list[int]
  program: train_lib.FlowProgram
  init_fn: Callable
  segment_fn: Callable
  feats_shape: Any


def _plan(cfg, prefix: str, train_feats, eval_steps, evaluate, mesh) -> _Plan:
  _check_feats(train_feats, f"{prefix}: training features")
  if evaluate is None and eval_steps:
    raise ValueError("run_rows: eval_steps given without an evaluate hook")
  mesh = mesh or sharding.make_mesh(int(_exec_get(cfg, "batch_devices", 1)))
  row_impl = train_lib.resolve_row_impl(_exec_get(cfg, "rows", "auto"))
  total = int(cfg.train.num_steps)
  seg_len = int(_exec_get(cfg, "segment_steps", DEFAULT_SEGMENT_STEPS))
  if seg_len < 1:
    raise ValueError(f"config.train.segment_steps must be ≥ 1, got {seg_len}")
  seg_len = min(seg_len, total)
  bad_eval = [s for s in eval_steps if not 0 <= int(s) <= total]
  if bad_eval:
    raise ValueError(f"evaluation steps {bad_eval} lie outside [0, train.num_steps={total}]")
  feats_shape = train_lib.feats_shape_of(train_feats)
  program, init_fn, segment_fn = _row_fns(cfg, feats_shape, mesh, row_impl, seg_len)
  return _Plan(mesh, row_impl, total, seg_len, sorted({int(s) for s in eval_steps}), program,
               init_fn, segment_fn, feats_shape)


def _check_rows_record(run: runrecord.Run, base: Path, record: dict) -> None:
  """``rows.json``: written on the first call; later calls must match it (the rows, the
  features' shape and hash, and the step count unless the manifest records an extension)."""
  import json
  rows_file = base / "rows.json"
  if not rows_file.exists():
    io.atomic_write_json(rows_file, record)
    return
  saved = json.loads(rows_file.read_text())
  # An extended run (runrecord, "extend") trains on from a shorter num_steps.
  extended = (bool(run.manifest.get("extended")) and isinstance(saved.get("num_steps"), int)
              and saved["num_steps"] < record["num_steps"])
  for k in ("rows", "feats_shape", "feats_sha256", "num_steps"):
    if k == "num_steps" and extended:
      continue
    if saved.get(k) != json.loads(io.to_json(record[k])):
      raise runrecord.ConfigMismatchError(
          f"{rows_file}: {k} differs from this run's (saved {str(saved.get(k))[:200]}, now "
          f"{str(record[k])[:200]}); the training data or rows changed under the same config. "
          "Use --restart or another --workdir.")
  if extended:
    io.atomic_write_json(rows_file, record)


@dataclasses.dataclass
class _Grid:
  """The rows on the mesh: their hyperparameters, keys and features as global arrays, and
  the moves between host state (unpadded NumPy, what checkpoints hold) and device state."""
  plan: _Plan
  n_rows: int
  h_dev: Any
  kd_dev: Any
  feats_dev: Any

  @classmethod
  def build(cls, plan: _Plan, rows: Rows, train_feats) -> "_Grid":
    shards = sharding.num_row_shards(plan.mesh)
    keydata_R = np.asarray(jax.random.key_data(train_lib.row_keys(rows.seeds_R)))
    h_R = {k: np.asarray(v, np.float32) for k, v in rows.hparams_R.items()}
    (h_pad, kd_pad), _ = sharding.pad_rows((h_R, keydata_R), shards)
    h_dev, kd_dev = sharding.put_rows((h_pad, kd_pad), plan.mesh)
    feats_dev = sharding.put_replicated(
        jax.tree.map(lambda f: np.asarray(f, np.float32), train_feats), plan.mesh)
    return cls(plan, rows.num_rows, h_dev, kd_dev, feats_dev)

  def init(self):
    return self.plan.init_fn(self.h_dev, self.kd_dev)

  def to_device(self, state_host):
    padded, _ = sharding.pad_rows(state_host, sharding.num_row_shards(self.plan.mesh))
    return sharding.put_rows(padded, self.plan.mesh)

  def host(self, tree_dev):
    """Every process's copy of a row-sharded tree, padding rows dropped (a collective)."""
    return sharding.unpad_rows(sharding.to_host(tree_dev), self.n_rows)

  def segment(self, state_dev, n: int):
    return self.plan.segment_fn(state_dev, self.kd_dev, self.feats_dev, jnp.asarray(n, jnp.int32))

  def restore(self, mngr, step: int):
    return self.to_device(_restore_host(mngr, step, self.plan.program, self.n_rows))


def row_labels(rows: Rows) -> list[str]:
  """A short name per row from the fields that vary across the grid (``variant=tail_aware,
  seed=0``): the TensorBoard run of each row."""
  dicts = rows.to_json()
  varying = [k for k in dicts[0] if len({io.to_json(d.get(k)) for d in dicts}) > 1]
  fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  names = [",".join(f"{k}={fmt(d[k])}" for k in varying) or "row" for d in dicts]
  return [n.replace("/", "_") for n in names]


class _Log:
  """The grid's metric writer (process 0 only): ``metrics.jsonl`` and TensorBoard scalars
  per row under ``<workdir>/tensorboard/<prefix>/<row>``."""

  def __init__(self, run: runrecord.Run, prefix: str, rows: Rows, resumed_from: int | None):
    self.on = run.writer   # process 0 only
    self.jsonl = io.JsonlWriter(run.path(prefix, "metrics.jsonl"))
    self.first = 0 if resumed_from is None else int(resumed_from) + 1
    self.tb = io.TensorBoardWriter(run.path("tensorboard", prefix), row_labels(rows),
                                   purge_step=self.first)
    self.n_rows = rows.num_rows
    if self.on:
      self.jsonl.truncate_after(self.first - 1)

  def train(self, done: int, loss_RxT: np.ndarray, mean_nll_R: np.ndarray) -> None:
    if not self.on:
      return
    rec = {"step": done, "split": "train", "loss": loss_RxT[:, -1].tolist(),
           "segment_mean_loss": loss_RxT.mean(axis=1).tolist(), "mean_nll": mean_nll_R.tolist()}
    self.jsonl.write(rec)
    self.tb.scalars(done, [{"train/loss": rec["loss"][i], "train/mean_nll": rec["mean_nll"][i]}
                           for i in range(self.n_rows)])

  def evaluation(self, step: int, out) -> None:
    """Every number of each row's evaluation record, as ``eval/<path>``."""
    if not self.on or step < self.first:
      return
    per_row = out if isinstance(out, list) and len(out) == self.n_rows else [out] * (
        self.n_rows == 1)
    self.tb.scalars(step, [{f"eval/{k}": v for k, v in io.flat_scalars(r).items()}
                           for r in per_row])

  def close(self) -> None:
    self.tb.close()


def run_rows(cfg, run: runrecord.Run, prefix: str, train_feats: np.ndarray, rows: Rows, *,
             eval_steps: Sequence[int] = (), evaluate: Callable[[int, PyTree], Any] | None = None,
             mesh=None, progress: bool = True, max_segments: int | None = None,
             desc: str | None = None) -> RowsResult:
  """Trains every row on ``train_feats`` to ``cfg.train.num_steps`` (resuming), evaluating
  at ``eval_steps``.

  Args:
    cfg: config with flow.*, optim.*, train.{num_steps, batch_size, segment_steps, rows,
      conv_impl, batch_devices}.
    run: the open workdir (``runrecord.open_run``); files go under ``run.path(prefix)``.
    prefix: this grid's folder inside the workdir (e.g. the category).
    train_feats: [N, H, W, C] host array (identical on every process), or — multi-scale
      FastFlow — a tuple of per-scale arrays [N, H_s, W_s, C_s] of the same N images:
      every row then trains one flow per scale on the sum of the scales' losses
      (``train.make_flow_loss``), and ``evaluate`` sees all scales' parameters.
    eval_steps: steps (0 = the untrained flow) at which ``evaluate(step, params_R)`` runs;
      it returns anything JSON-able (e.g. one metrics dict per row), saved as the unit
      ``<prefix>/eval/<step>`` and never recomputed.
    max_segments: stop after this many segments (a time-sliced job; the next call resumes).
  Several processes (``tailjax.distributed``): every process calls this with the same
  arguments; they check that their training features are the same, train together,
  save checkpoints together, and process 0 alone evaluates and writes (the others wait
  for it, then read the evaluation units it wrote).
  Raises:
    train.NonFiniteLossError: see the module docstring.
    Interrupted: on Ctrl-C.
  """
  plan = _plan(cfg, prefix, train_feats, eval_steps, evaluate, mesh)
  run.record(row_mode=plan.row_impl, conv_impl=plan.program.conv_impl)
  base = run.path(prefix)
  record = {"rows": rows.to_json(),
            "feats_shape": ([list(s) for s in plan.feats_shape] if plan.program.multiscale
                            else list(plan.feats_shape)),
            "feats_sha256": feats_digest(train_feats), "num_steps": plan.total}
  distributed.check_same(f"training data of {prefix}", {
      "training features sha256": record["feats_sha256"],
      "rows": hashlib.sha256(io.to_json(record["rows"]).encode()).hexdigest()[:16]})
  distributed.lead_first(f"{prefix}/rows", lambda: _check_rows_record(run, base, record))
  grid = _Grid.build(plan, rows, train_feats)
  ckpt_dir = base / "checkpoints"
  mngr = _manager(ckpt_dir)
  at = [0]   # the last step reached, for the Ctrl-C message
  try:
    return _train_grid(plan, grid, run, prefix, rows, mngr, evaluate, progress, max_segments,
                       desc, at)
  except KeyboardInterrupt:
    last = mngr.latest_step()
    where = f"step {last}" if last is not None else "the start (no checkpoint yet)"
    raise Interrupted(f"interrupted at step {at[0]} of {prefix}; rerunning the same command "
                      f"resumes from {where} in {ckpt_dir}") from None
  finally:
    mngr.close()


def _latest_step(mngr, prefix: str) -> int | None:
  """The checkpoint to resume from: process 0's view, which every process must share."""
  lead = distributed.from_lead(f"{prefix}/resume", mngr.latest_step)
  mine = mngr.latest_step()
  if mine != lead:
    raise distributed.DistributedError(
        f"process {jax.process_index()} sees checkpoint {mine} in {mngr.directory}, process 0 "
        f"sees {lead}: the workdir must be on a file system every process sees")
  return lead


def _train_grid(plan: _Plan, grid: _Grid, run: runrecord.Run, prefix: str, rows: Rows, mngr,
                evaluate, progress: bool, max_segments: int | None, desc: str | None,
                at: list[int]) -> RowsResult:
  """Restore (or init), then the segment loop: train to each boundary, check the losses,
  evaluate, checkpoint, log."""
  resumed_from = _latest_step(mngr, prefix)
  metric_log = _Log(run, prefix, rows, resumed_from)
  if resumed_from is None:
    state, done = grid.init(), 0
  else:
    state, done = grid.restore(mngr, resumed_from), int(resumed_from)
    at[0] = done
    log.info("resumed %s from step %d", run.path(prefix), done)

  seconds = {"train": 0.0, "eval": 0.0}
  evaluate_at = _evaluator(plan, grid, run, prefix, evaluate, metric_log, seconds)
  t_start = time.perf_counter()
  if done == 0:
    evaluate_at(0, state)
  segments = 0
  bar = tqdm(total=plan.total, initial=done, desc=desc or prefix, leave=False,
             disable=not progress or not distributed.is_lead())
  try:
    for b in boundaries(plan.total, plan.seg_len, plan.eval_steps):
      if b <= done:
        continue
      if max_segments is not None and segments >= max_segments:
        break
      n = b - done
      state, metrics = grid.segment(state, n)
      host = sharding.to_host(metrics)
      loss_RxT = np.asarray(host["loss"])[:rows.num_rows, :n]
      if not np.all(np.isfinite(loss_RxT)):
        _halt(mngr, loss_RxT, done, rows, grid)
      done, segments = b, segments + 1
      at[0] = done
      evaluate_at(done, state)
      # Logged before the checkpoint: a crash between the two resumes from the previous
      # checkpoint and drops this line (``_Log``), never the reverse (a lost line).
      metric_log.train(done, loss_RxT, np.asarray(host["mean_nll"])[:rows.num_rows, n - 1])
      _save(mngr, done, grid.host(state))
      bar.update(n)
      bar.set_postfix(loss=f"{float(np.mean(loss_RxT[:, -1])):.3g}")
  finally:
    bar.close()
    metric_log.close()
  evals = {s: run.load_unit(f"{prefix}/eval/{s}") for s in plan.eval_steps if s <= done}
  params_R = grid.host(state).params
  seconds["train"] = time.perf_counter() - t_start - seconds["eval"]
  return RowsResult(program=plan.program, params_R=params_R, step=done,
                    finished=done >= plan.total, evals=evals, resumed_from=resumed_from,
                    row_mode=plan.row_impl, seconds=seconds)


def _evaluator(plan: _Plan, grid: _Grid, run: runrecord.Run, prefix: str, evaluate,
               metric_log: _Log, seconds: dict) -> Callable[[int, Any], None]:
  """``evaluate_at(step, state_dev)``: at an evaluation step, gathers the parameters (every
  process), then process 0 evaluates — unless the unit exists — saves and logs it while
  the others wait."""
  def evaluate_at(step: int, state_dev) -> None:
    if step not in plan.eval_steps:
      return
    t_eval = time.perf_counter()
    params_R = grid.host(state_dev.params)   # a collective: every process takes part
    name = f"{prefix}/eval/{step}"

    def lead():
      out = run.load_unit(name)
      if out is None:
        out = evaluate(step, params_R)
        run.save_unit(name, out)
      metric_log.evaluation(step, out)

    distributed.lead_first(name, lead)
    seconds["eval"] += time.perf_counter() - t_eval

  return evaluate_at


def _halt(mngr, loss_RxT, done: int, rows: Rows, grid: _Grid):
  """Saves the last good state (see module doc) and raises NonFiniteLossError."""
  ckpt_dir = Path(mngr.directory)
  bad_RxT = ~np.isfinite(loss_RxT)
  first_t = np.where(bad_RxT.any(axis=1), bad_RxT.argmax(axis=1), loss_RxT.shape[1])
  row = int(first_t.argmin())
  bad_step = done + int(first_t[row]) + 1      # the update that produced the non-finite loss
  head = (f"non-finite loss at step {bad_step} in row {row} ({rows.describe(row)}); training "
          "stopped. ")
  good = bad_step - 2
  if good < 0:
    for s in mngr.all_steps():
      mngr.delete(s)
    raise train_lib.NonFiniteLossError(
        head + "Its loss is already non-finite at the first step, from the initial weights: "
        "there is no good state to keep (check the features and the learning rate).")
  saved = [s for s in mngr.all_steps() if s <= good]
  start = max(saved) if saved else 0
  state = grid.restore(mngr, start) if saved else grid.init()
  at = start
  while at < good:   # replay deterministically to the good step
    n = min(grid.plan.seg_len, good - at)
    state, _ = grid.segment(state, n)
    at += n
  for s in mngr.all_steps():
    if s > good:
      mngr.delete(s)
  if good not in mngr.all_steps():
    _save(mngr, good, grid.host(state))
  raise train_lib.NonFiniteLossError(
      head + f"The last good state — step {good}, whose loss on its next batch (step "
      f"{good + 1}) is finite — is the checkpoint {ckpt_dir / str(good)}.")


def load_rows(cfg, run_dir: str | Path, prefix: str, feats_shape: Sequence[int],
              rows: Rows, step: int | None = None) -> tuple[train_lib.FlowProgram, PyTree, int]:
  """(program, params_R host arrays, step) of a trained grid, restored — never retrained.

  ``step`` defaults to the latest checkpoint. The checkpoint layout does not depend on
  the row mode or backend the grid was trained with.
  """
  import json
  base = Path(run_dir) / prefix
  rows_file = base / "rows.json"
  if not rows_file.is_file():
    raise FileNotFoundError(f"{rows_file} not found: {prefix!r} was not trained in {run_dir}")
  saved = json.loads(rows_file.read_text())
  if saved["rows"] != json.loads(io.to_json(rows.to_json())):
    raise runrecord.ConfigMismatchError(f"{rows_file}: the rows differ from the config's")
  program = train_lib.make_flow_program(cfg, feats_shape)
  with _manager(base / "checkpoints", read_only=True) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {base / 'checkpoints'}")
    state = _restore_host(mngr, step, program, rows.num_rows)
  return program, state.params, int(step)
