"""Hyperparameter × seed sweeps of the flow as ONE compiled, sharded, resumable program.

The pure core (purejaxrl's ``make_train``)::

    train = make_train(cfg, feats_shape)            # static structure only
    state, metrics_T = train(hparams, key, feats)   # pure; lax.scan over the steps
    sweep = jax.jit(jax.vmap(jax.vmap(train, (None, 0, None)), (0, None, None)))
    state_HxS, metrics_HxSxT = sweep(hparams_H, keys_S, feats)

``hparams`` = {"tail_weight": λ, "top_k_ratio": r, "learning_rate": lr} are
traced arrays (λ, r reach ``losses.tail_aware_loss`` as traced values, lr is
injected into the optimiser state by ``optax.inject_hyperparams``), so one
program serves the whole grid. Everything random comes from the row key with
``flow_train``'s conventions (``init_row``: ``fold_in(key, 0)``; batches:
``sample_batch``; step keys: ``fold_in(fold_in(key, 2), step)``), and the
functions are ``flow_train``'s own, so a row of a sweep equals
``flow_train.train_flow_on_features`` with that row's hyperparameters and seed
(to float rounding: batching changes the order of floating-point sums).

**Data is an argument, not a constant.** ``train`` takes the training features
as its third argument. A jitted function that closes over a device array embeds
the array in the program as a literal: for the 120-image texture category
(10.5 MB of float32) the vmapped sweep's HLO grows from 0.23 MB to 21 MB, the
executable carries a second copy of the data, every new dataset (category,
fold) means a new compilation, and the data cannot be placed on a mesh. Lower +
compile time itself is not the problem at this size (equal within the machine's
noise, ``benchmarks/bench_sweep.py``). As an
argument the data is a device buffer (replicated over the mesh), and one
compiled program serves every category of the same shape. (The spec's
``train(hparams, key)`` is ``lambda h, k: train(h, k, feats)`` *inside* a
jitted function that receives ``feats`` as an argument; note that
``functools.partial(train, feats=...)`` is not vmap-safe: vmap maps keyword
arguments over their leading axis.)

**How convolutions are lowered** (``cfg.sweep.conv_impl``): "xla" keeps
``lax.conv_general_dilated``; "matmul" computes every stride-1 "SAME"
``nn.Conv`` of the flow as one matmul over the k×k neighbourhood (im2col; for
1×1 kernels a plain matmul) with the module's own parameters, through a Flax
method interceptor, so parameters, names and maths are unchanged; "auto" =
"matmul" on CPU and "xla" elsewhere (cuDNN). Why: on XLA:CPU a convolution
inside a loop (the ``lax.scan`` over steps) runs 3–12× slower than the same
convolution in a standalone jitted step, and a vmapped convolution with
per-row weights becomes a grouped convolution that is slower still; as
matmuls both run at the standalone speed (``benchmarks/bench_train_step.py``,
``bench_sweep.py``).

**How rows run on one device** (``cfg.sweep.rows``): "vmap" batches the rows
into one set of larger ops (right for GPU/TPU, where one small-batch row leaves
the device idle), "map" runs them one after the other inside the same program
(``lax.map``), "auto" = "map" on CPU, "vmap" elsewhere. On CPU one row's step
already keeps the cores busy, so batching rows cannot add parallelism, and
batched matmuls and sorts run slower than a loop of the plain ones (vmap ≈ 0.8×
the row-by-row program, ``benchmarks/results.md``).

**Scale-out.** Rows are padded to a multiple of the mesh's "sweep" axis and
split over it with ``jax.shard_map`` (each device trains its rows, no
communication); with ``cfg.sweep.batch_devices = b > 1`` the b devices that
share a row split its mini-batch and average the loss (``lax.pmean``; the
parameter gradients are then summed across them by ``shard_map``'s transpose).
Multi-host: see ``tailjax/sharding.py`` (``jax.distributed.initialize`` first).

**Resume.** The scan over steps is cut into segments of
``cfg.sweep.segment_steps`` steps; after each segment the stacked state is
saved with orbax (``<workdir>/checkpoints``) next to ``grid.json``. A restarted
sweep restores the latest segment and continues; because the segment program
and every key depend only on the step, it ends bit-identical to an
uninterrupted sweep with the same segment length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tailjax import flow_train, flows, io, losses, sharding, train

PyTree = Any
log = logging.getLogger(__name__)

HPARAM_NAMES = flow_train.HPARAM_NAMES   # ("tail_weight", "top_k_ratio", "learning_rate")
ROW_IMPLS = ("auto", "vmap", "map")
CONV_IMPLS = ("auto", "xla", "matmul")
RESULT_KEYS = ("category", "tail_weight", "top_k_ratio", "learning_rate", "seed", "metrics")


# ----------------------------------------------------------------------------
# Convolution lowering
# ----------------------------------------------------------------------------


def _is_one(v) -> bool:
  return v is None or all(int(x) == 1 for x in np.atleast_1d(v))


def _matmul_lowerable(conv: nn.Conv) -> bool:
  ks = tuple(conv.kernel_size) if not isinstance(conv.kernel_size, int) else (conv.kernel_size,) * 2
  return (len(ks) == 2 and all(k % 2 == 1 for k in ks)
          and isinstance(conv.padding, str) and conv.padding.upper() == "SAME"
          and _is_one(conv.strides) and _is_one(conv.input_dilation)
          and _is_one(conv.kernel_dilation) and conv.feature_group_count == 1
          and conv.mask is None)


def conv_as_matmul(next_fun, args, kwargs, context):
  """Flax method interceptor: a stride-1, "SAME", odd-kernel ``nn.Conv`` on [B, H, W, C]
  computed as ``im2col(x) @ kernel.reshape(k·k·C, O) + bias``.

  Same parameters (read from the module), same result up to float rounding
  (cross-correlation, zero padding (k−1)/2 on each side, kernel index (i, j, c)
  ↔ input offset (i − (k−1)/2, j − (k−1)/2)). Any other call, and the first call
  that creates the parameters (``init``), goes to the original method.
  """
  conv = context.module
  if (context.method_name != "__call__" or not isinstance(conv, nn.Conv) or kwargs
      or len(args) != 1 or getattr(args[0], "ndim", 0) != 4
      or not conv.has_variable("params", "kernel") or not _matmul_lowerable(conv)):
    return next_fun(*args, **kwargs)
  x_BxHxWxC = args[0]
  kernel = conv.get_variable("params", "kernel")
  kh, kw = kernel.shape[:2]
  if kh > 1 or kw > 1:
    h, w = x_BxHxWxC.shape[1:3]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    x_BxHxWxC = jnp.concatenate(
        [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
  y_BxHxWxO = jnp.einsum("bhwk,ko->bhwo", x_BxHxWxC, kernel.reshape(-1, kernel.shape[-1]))
  if conv.use_bias:
    y_BxHxWxO = y_BxHxWxO + conv.get_variable("params", "bias")[None, None, None, :]
  return y_BxHxWxO


def resolve_conv_impl(impl: str) -> str:
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  if impl not in CONV_IMPLS:
    raise ValueError(f"config.sweep.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  return impl


def resolve_row_impl(impl: str) -> str:
  if impl == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  if impl not in ROW_IMPLS:
    raise ValueError(f"config.sweep.rows must be one of {ROW_IMPLS}, got {impl!r}")
  return impl


def _sweep_get(cfg, name: str, default):
  s = cfg.get("sweep", None) if hasattr(cfg, "get") else getattr(cfg, "sweep", None)
  if s is None:
    return default
  return s.get(name, default) if hasattr(s, "get") else getattr(s, name, default)


# ----------------------------------------------------------------------------
# The pure program
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlowProgram:
  """Static structure of a flow run; its methods are pure and traceable.

  ``init(hparams, key) -> TrainState``; ``run(state, key, feats, num_steps) ->
  (state, metrics_T)`` continues from ``state.step``; ``train(hparams, key,
  feats) = run(init(hparams, key), key, feats, total_steps)``. ``key`` is the
  row key (``flow_train.row_keys``), a typed PRNG key.
  """

  model: flows.FastFlow2d
  tx: optax.GradientTransformation
  feats_shape: tuple[int, ...]
  batch_size: int
  total_steps: int
  conv_impl: str = "xla"
  batch_axis: str | None = None
  batch_shards: int = 1

  def _lowering(self):
    return nn.intercept_methods(conv_as_matmul) if self.conv_impl == "matmul" else contextlib.nullcontext()

  def _loss_fn(self):
    base = flow_train.make_flow_loss(self.model)
    if self.batch_axis is None:
      return base
    axis, shards = self.batch_axis, self.batch_shards

    def loss_fn(params, batch_BxHxWxC, hparams, key):
      # Every device of the row drew the same batch (same key); each takes its slice,
      # and pmean makes the loss (and, by transposition, the gradients) the full-batch ones.
      n = batch_BxHxWxC.shape[0] // shards
      local = jax.lax.dynamic_slice_in_dim(batch_BxHxWxC, jax.lax.axis_index(axis) * n, n, axis=0)
      loss, aux = base(params, local, hparams, key)
      return jax.lax.pmean(loss, axis), jax.tree.map(lambda a: jax.lax.pmean(a, axis), aux)

    return loss_fn

  def init(self, hparams: Mapping, key) -> train.TrainState:
    # Flax init depends on shapes only, so a zero example gives init_row's params.
    example_1xHxWxC = jnp.zeros((1, *self.feats_shape[1:]), jnp.float32)
    with self._lowering():
      return flow_train.init_row(self.model, self.tx, example_1xHxWxC, hparams, key)

  def run(self, state: train.TrainState, key, feats_NxHxWxC, num_steps: int):
    if tuple(feats_NxHxWxC.shape[1:]) != tuple(self.feats_shape[1:]):
      raise ValueError(f"features must be [N, {', '.join(map(str, self.feats_shape[1:]))}] "
                       f"like the program's, got {tuple(feats_NxHxWxC.shape)}")
    train_step = train.make_train_step(self._loss_fn())
    step_key = jax.random.fold_in(key, 2)

    def body(st, _):
      batch = flow_train.sample_batch(feats_NxHxWxC, self.batch_size, key, st.step)
      return train_step(st, batch, step_key)

    with self._lowering():
      return jax.lax.scan(body, state, None, length=int(num_steps))

  def train(self, hparams: Mapping, key, feats_NxHxWxC):
    return self.run(self.init(hparams, key), key, feats_NxHxWxC, self.total_steps)

  def scores(self, params, feats_BxHxWxC, score: str = "nll") -> jax.Array:
    """Per-patch anomaly scores [B, H, W] ("nll" or "fastflow"), as ``study_a.patch_scores``."""
    from tailjax import anomaly
    with self._lowering():
      z, logdet = self.model.apply(params, feats_BxHxWxC)
    return losses.patch_nll(z, logdet) if score == "nll" else anomaly.fastflow_score(z)


def make_flow_program(cfg, feats_shape: Sequence[int], *, num_steps: int | None = None,
                      conv_impl: str | None = None, batch_axis: str | None = None,
                      batch_shards: int = 1) -> FlowProgram:
  """The flow program for ``cfg`` (fields flow.*, optim.*, train.batch_size,
  train.num_steps, sweep.conv_impl) on features of shape ``feats_shape`` [N, H, W, C]."""
  feats_shape = tuple(int(s) for s in feats_shape)
  if len(feats_shape) != 4:
    raise ValueError(f"feats_shape must be [N, H, W, C], got {feats_shape}")
  bs = int(cfg.train.batch_size)
  if bs < 1:
    raise ValueError(f"config.train.batch_size must be ≥ 1, got {bs}")
  if batch_axis is not None and bs % int(batch_shards):
    raise ValueError(f"config.train.batch_size ({bs}) must be divisible by "
                     f"config.sweep.batch_devices ({batch_shards})")
  steps = int(cfg.train.num_steps if num_steps is None else num_steps)
  if steps < 1:
    raise ValueError(f"config.train.num_steps must be ≥ 1, got {steps}")
  return FlowProgram(
      model=flow_train.model_for(cfg, feats_shape[-1]), tx=train.make_optimizer(cfg.optim),
      feats_shape=feats_shape, batch_size=bs, total_steps=steps,
      conv_impl=resolve_conv_impl(conv_impl or _sweep_get(cfg, "conv_impl", "auto")),
      batch_axis=batch_axis, batch_shards=int(batch_shards))


def make_train(cfg, feats_shape: Sequence[int], **kwargs) -> Callable:
  """``train(hparams, key, feats) -> (TrainState, metrics_T)``: a whole run, pure.

  Vmap it over hyperparameters and seeds (see ``sweep_hxs``); ``kwargs`` go to
  ``make_flow_program``.
  """
  return make_flow_program(cfg, feats_shape, **kwargs).train


def sweep_hxs(train_fn: Callable) -> Callable:
  """``jit(vmap(vmap(train, seeds), hparams))``: ``(hparams_H, keys_S, feats) ->
  (state_HxS, metrics_HxSxT)``; every leaf gets leading [H, S] axes."""
  return jax.jit(jax.vmap(jax.vmap(train_fn, (None, 0, None)), (0, None, None)))


# ----------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
  """Grid points (λ, r, lr) × seeds. Rows are point-major: row = point · S + seed index."""

  points: tuple[tuple[float, float, float], ...]
  seeds: tuple[int, ...]

  @property
  def num_rows(self) -> int:
    return len(self.points) * len(self.seeds)

  def rows(self) -> list[dict]:
    return [dict(zip(HPARAM_NAMES, p), seed=s) for p in self.points for s in self.seeds]

  def hparams_R(self) -> dict[str, np.ndarray]:
    rows = self.rows()
    return {k: np.asarray([r[k] for r in rows], np.float32) for k in HPARAM_NAMES}

  def seeds_R(self) -> list[int]:
    return [r["seed"] for r in self.rows()]

  def to_json(self) -> dict:
    return {"axes": {k: sorted({p[i] for p in self.points}) for i, k in enumerate(HPARAM_NAMES)},
            "seeds": list(self.seeds), "rows": self.rows()}


def _as_list(value, field: str) -> list:
  if isinstance(value, (str, bytes)):
    try:
      value = json.loads(value.replace("(", "[").replace(")", "]"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{field} must be a list of numbers, got {value!r}") from e
  values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
  if not values:
    raise ValueError(f"{field} must not be empty")
  try:
    out = [float(v) for v in values]
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field} must be a list of numbers, got {values!r}") from e
  if len(set(out)) != len(out):
    raise ValueError(f"{field} has duplicate values: {out}")
  return out


def grid_from_config(sweep_cfg, where: str = "config.sweep") -> Grid:
  """Validated grid from lists in the config: tail_weight (λ ∈ [0, 1]),
  top_k_ratio (r ∈ (0, 1]), learning_rate (> 0), seeds (distinct integers).
  Errors name the field, e.g. ``config.sweep.top_k_ratio``."""
  get = lambda k: sweep_cfg[k] if k in sweep_cfg else None
  vals = {}
  for k in (*HPARAM_NAMES, "seeds"):
    if get(k) is None:
      raise ValueError(f"{where}.{k} is missing (a list of values)")
    vals[k] = _as_list(get(k), f"{where}.{k}")
  losses.validate_tail_params(np.asarray(vals["tail_weight"]), np.asarray(vals["top_k_ratio"]),
                              where=where)
  lr = np.asarray(vals["learning_rate"])
  if not np.all(np.isfinite(lr)) or np.any(lr <= 0):
    raise ValueError(f"{where}.learning_rate must be > 0 (and finite); got {lr.tolist()}")
  seeds = vals["seeds"]
  if any(s != int(s) or s < 0 for s in seeds):
    raise ValueError(f"{where}.seeds must be non-negative integers, got {seeds}")
  points = tuple(itertools.product(vals["tail_weight"], vals["top_k_ratio"], vals["learning_rate"]))
  return Grid(points=points, seeds=tuple(int(s) for s in seeds))


# ----------------------------------------------------------------------------
# Sharded row programs
# ----------------------------------------------------------------------------


def _block_json(block) -> str:
  return io.to_json(block.to_dict() if hasattr(block, "to_dict") else dict(block), sort_keys=True)


# Compiled row programs, reused by every run_sweep call with the same structure (the
# categories of a sweep, a resumed sweep, ...): compiling is the slow part on CPU.
_ROW_FNS: dict[tuple, tuple] = {}


def _cached_row_fns(cfg, feats_shape, mesh, row_impl: str):
  b = int(mesh.shape[sharding.BATCH_AXIS])
  program = make_flow_program(cfg, feats_shape,
                              batch_axis=sharding.BATCH_AXIS if b > 1 else None, batch_shards=b)
  # Everything the compiled segment depends on; not the total number of steps.
  key = (_block_json(cfg.flow), _block_json(cfg.optim), program.batch_size, program.conv_impl,
         program.feats_shape, program.batch_axis, program.batch_shards, mesh, row_impl)
  if key not in _ROW_FNS:
    if len(_ROW_FNS) >= 16:
      _ROW_FNS.pop(next(iter(_ROW_FNS)))
    _ROW_FNS[key] = (program, *make_row_fns(program, mesh, row_impl))
  cached_program, init_fn, segment_fn = _ROW_FNS[key]
  return dataclasses.replace(cached_program, total_steps=program.total_steps), init_fn, segment_fn


def over_rows(fn: Callable, row_impl: str) -> Callable:
  """``fn(*row_args)`` for one row → the same over a leading row axis, by vmap or lax.map."""
  if row_impl == "vmap":
    return jax.vmap(fn)
  return lambda *xs: jax.lax.map(lambda a: fn(*a), xs)


def make_row_fns(program: FlowProgram, mesh, row_impl: str):
  """Jitted, row-sharded ``init(hparams_R, keydata_R)`` and ``segment(num_steps)`` →
  ``(state_R, keydata_R, feats) -> (state_R, metrics_RxT)`` (state donated).

  Keys travel as raw ``uint32 [R, 2]`` key data (``jax.random.key_data``) so they
  can be sharded like any array.
  """
  rows = P(sharding.SWEEP_AXIS)
  wrap = jax.random.wrap_key_data

  def local_init(h_r, kd_r):
    return over_rows(lambda h, kd: program.init(h, wrap(kd)), "vmap")(h_r, kd_r)

  init = jax.jit(jax.shard_map(local_init, mesh=mesh, in_specs=(rows, rows), out_specs=rows))

  @functools.lru_cache(maxsize=None)
  def segment(num_steps: int):
    def local_run(state_r, kd_r, feats):
      return over_rows(lambda st, kd: program.run(st, wrap(kd), feats, num_steps),
                         row_impl)(state_r, kd_r)
    fn = jax.shard_map(local_run, mesh=mesh, in_specs=(rows, rows, P()), out_specs=(rows, rows))
    return jax.jit(fn, donate_argnums=0)

  return init, segment


# ----------------------------------------------------------------------------
# The checkpointed sweep
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
  program: FlowProgram
  params_R: PyTree          # host NumPy, leading axis = grid rows (padding dropped)
  step: int                 # steps done (== total steps when finished)
  finished: bool
  history: list[dict]
  resumed_from: int | None


def _check_feats(feats, where: str) -> None:
  if np.ndim(feats) != 4:
    raise ValueError(f"{where}: features must be [N, H, W, C], got shape {np.shape(feats)}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{where}: features contain NaN/Inf")


def _grid_record(cfg, grid: Grid, feats_shape) -> dict:
  return {**grid.to_json(), "num_rows": grid.num_rows, "num_steps": int(cfg.train.num_steps),
          "segment_steps": int(_sweep_get(cfg, "segment_steps", cfg.train.num_steps)),
          "batch_size": int(cfg.train.batch_size), "feats_shape": list(feats_shape)}


def _check_grid_file(path: Path, record: dict) -> None:
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  for k in ("rows", "num_steps", "segment_steps", "batch_size", "feats_shape"):
    if saved.get(k) != json.loads(io.to_json(record[k])):
      raise ValueError(f"{path} describes a different sweep ({k} differs: saved "
                       f"{saved.get(k)!r}, now {record[k]!r}); use a new --workdir or delete it")


def run_sweep(cfg, workdir: str | Path, train_feats: np.ndarray, grid: Grid, *, mesh=None,
              progress: bool = True, max_segments: int | None = None,
              desc: str = "sweep") -> SweepResult:
  """Trains every grid row on ``train_feats`` as one sharded program, in resumable segments.

  Args:
    cfg: config with flow.*, optim.*, train.{num_steps, batch_size},
      sweep.{segment_steps, rows, conv_impl}.
    workdir: holds ``grid.json``, ``metrics.jsonl`` and ``checkpoints/`` (orbax; the
      stacked, padded state after the latest segment). An existing checkpoint is resumed.
    train_feats: [N, H, W, C] host array (identical on every process).
    grid: the rows (``grid_from_config``).
    mesh: ("sweep", "batch") mesh (default ``sharding.make_mesh(cfg.sweep.batch_devices)``).
    max_segments: stop after this many segments (a time-sliced job; the next call resumes).
  Raises:
    train.NonFiniteLossError: naming the first row (its hyperparameters and seed) and
      step whose loss is NaN/Inf; the last checkpoint is the previous segment's.
  """
  workdir = Path(workdir)
  _check_feats(train_feats, "run_sweep")
  mesh = mesh or sharding.make_mesh(int(_sweep_get(cfg, "batch_devices", 1)))
  row_impl = resolve_row_impl(_sweep_get(cfg, "rows", "auto"))
  program, init_fn, segment_fn = _cached_row_fns(cfg, train_feats.shape, mesh, row_impl)
  total = program.total_steps
  seg_len = int(_sweep_get(cfg, "segment_steps", total))
  if seg_len < 1:
    raise ValueError(f"config.sweep.segment_steps must be ≥ 1, got {seg_len}")

  record = _grid_record(cfg, grid, train_feats.shape)
  is_lead = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  _check_grid_file(workdir / "grid.json", record)
  if is_lead:
    io.atomic_write_json(workdir / "grid.json", record)

  shards = sharding.num_row_shards(mesh)
  n_rows = grid.num_rows
  keydata_R = np.asarray(jax.random.key_data(flow_train.row_keys(grid.seeds_R())))
  (h_pad, kd_pad), _ = sharding.pad_rows((grid.hparams_R(), keydata_R), shards)
  h_dev, kd_dev = sharding.put_rows((h_pad, kd_pad), mesh)
  feats_dev = sharding.put_replicated(np.asarray(train_feats, np.float32), mesh)

  mngr = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False))
  metrics_log = io.JsonlWriter(workdir / "metrics.jsonl")
  history: list[dict] = []
  resumed_from = mngr.latest_step()
  try:
    if resumed_from is None:
      state = init_fn(h_dev, kd_dev)
      if is_lead:
        metrics_log.truncate_after(-1)
    else:
      state = _restore(mngr, resumed_from, program, grid, h_pad, kd_pad, mesh)
      if is_lead:
        metrics_log.truncate_after(resumed_from)
      log.info("resumed sweep %s from step %d", workdir, resumed_from)

    done = train.step_of(state)
    segments = 0
    bar = tqdm(total=total, initial=done, desc=desc, disable=not progress, leave=False)
    while done < total and (max_segments is None or segments < max_segments):
      n = min(seg_len, total - done)
      state, metrics = segment_fn(n)(state, kd_dev, feats_dev)
      host = sharding.to_host(metrics)
      loss_RxT = np.asarray(host["loss"])[:n_rows]
      bad = ~np.isfinite(loss_RxT)
      if bad.any():
        row, t = map(int, np.argwhere(bad)[0])
        last = mngr.latest_step()
        raise train.NonFiniteLossError(
            f"non-finite loss in sweep row {row} ({grid.rows()[row]}) at step {done + t}; "
            "stopped. " + (f"The last good checkpoint is step {last} in "
                           f"{(workdir / 'checkpoints').absolute()}." if last is not None else
                           "No checkpoint was written yet."))
      done += n
      segments += 1
      mngr.save(done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          loop=ocp.args.JsonSave({"num_padded_rows": int(h_pad["tail_weight"].shape[0])})))
      mngr.wait_until_finished()
      rec = {"step": done, "split": "train", "loss": loss_RxT[:, -1].tolist(),
             "segment_mean_loss": loss_RxT.mean(axis=1).tolist(),
             "mean_nll": np.asarray(host["mean_nll"])[:n_rows, -1].tolist()}
      if is_lead:
        metrics_log.write(rec)
      history.append(rec)
      bar.update(n)
      bar.set_postfix(loss=f"{float(np.mean(loss_RxT[:, -1])):.3g}")
    bar.close()
    params_R = sharding.unpad_rows(sharding.to_host(state.params), n_rows)
    return SweepResult(program=program, params_R=params_R, step=done, finished=done >= total,
                       history=history, resumed_from=resumed_from)
  finally:
    mngr.close()


def _restore(mngr, step: int, program: FlowProgram, grid: Grid, h_pad, kd_pad, mesh):
  """Restores the stacked state; re-pads it if the device count changed since it was saved."""
  loop = mngr.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]
  saved_rows = int(loop["num_padded_rows"])
  now_rows = int(h_pad["tail_weight"].shape[0])
  # The restore target needs the saved row count; only shapes matter, so real rows
  # with the last one repeated (or dropped) serve.
  real = sharding.unpad_rows((h_pad, kd_pad), grid.num_rows)
  h_saved, kd_saved = jax.tree.map(
      lambda x: np.concatenate([x, np.repeat(x[-1:], max(0, saved_rows - len(x)), axis=0)])[:saved_rows],
      real)
  abstract = jax.eval_shape(
      jax.vmap(lambda h, kd: program.init(h, jax.random.wrap_key_data(kd))), h_saved, kd_saved)
  shards = sharding.num_row_shards(mesh)
  target = (sharding.with_row_sharding(abstract, mesh) if saved_rows % shards == 0
            else sharding.with_replicated_sharding(abstract, mesh))
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  if saved_rows == now_rows:
    return state
  # Padding rows copy the last real row, so re-padding the real rows is exact.
  real = sharding.unpad_rows(sharding.to_host(state), grid.num_rows)
  padded, _ = sharding.pad_rows(real, shards)
  return sharding.put_rows(padded, mesh)


# ----------------------------------------------------------------------------
# Evaluation, results files, the whole sweep over categories
# ----------------------------------------------------------------------------


def row_scores(program: FlowProgram, params_R, test_feats: np.ndarray, score: str,
               chunk: int = 32) -> list[np.ndarray]:
  """Per-patch scores [M, H, W] of every row; one compiled scorer for all rows."""
  if score not in ("nll", "fastflow"):
    raise ValueError(f"config.eval.score must be 'nll' or 'fastflow', got {score!r}")
  scorer = jax.jit(functools.partial(program.scores, score=score))
  n = jax.tree.leaves(params_R)[0].shape[0]
  out = []
  for i in range(n):
    p = jax.tree.map(lambda a: jnp.asarray(a[i]), params_R)
    out.append(np.concatenate([np.asarray(scorer(p, jnp.asarray(test_feats[j:j + chunk])))
                               for j in range(0, len(test_feats), chunk)]))
  return out


def _row_id(row: Mapping) -> tuple:
  return (row["category"], *(round(float(row[k]), 12) for k in HPARAM_NAMES), int(row["seed"]))


def _fmt(values) -> str:
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v.mean():.2f}"


def results_markdown(cfg, rows: list[dict], grid: Grid, n_patches: int) -> str:
  """Per category (and the mean over categories): one line per grid point, mean ± std
  over seeds, in %; the best pixel AP per table in bold."""
  from tailjax import study_a
  keys = study_a.METRIC_KEYS
  cats = list(dict.fromkeys(r["category"] for r in rows))
  by = {_row_id(r): r["metrics"] for r in rows}
  lines = [f"# Sweep over tail weight λ, top-k ratio r and learning rate ({cfg.data.kind})", "",
           f"{cfg.train.num_steps} steps of batch {cfg.train.batch_size}, flow "
           f"{cfg.flow.num_steps} steps ({cfg.flow.kernel_mode}), {len(grid.seeds)} seeds "
           f"{list(grid.seeds)} per grid point; k = max(1, round(r · {n_patches})). "
           "Metrics in %, mean ± std over seeds; **bold** = best pixel AP in the table.", ""]
  scopes = cats + (["mean over categories"] if len(cats) > 1 else [])
  for scope in scopes:
    lines += [f"## {scope}", "",
              "| λ | r | k | lr | " + " | ".join(study_a.METRIC_NAMES[k] for k in keys) + " |",
              "|" + "---|" * (4 + len(keys))]
    table = []
    for p in grid.points:
      per_seed = []
      for s in grid.seeds:
        ms = [by.get((c, *(round(float(x), 12) for x in p), s)) for c in
              (cats if scope not in cats else [scope])]
        if any(m is None for m in ms):
          continue
        per_seed.append({k: float(np.mean([m[k] for m in ms])) for k in keys})
      if per_seed:
        table.append((p, per_seed))
    best = max(range(len(table)), key=lambda i: np.mean([m["pixel_ap"] for m in table[i][1]]),
               default=None)
    for i, (p, per_seed) in enumerate(table):
      k = int(losses.top_k_count(p[1], n_patches))
      cells = [_fmt([m[key] for m in per_seed]) for key in keys]
      if i == best:
        cells[keys.index("pixel_ap")] = f"**{cells[keys.index('pixel_ap')]}**"
      lines.append(f"| {p[0]:g} | {p[1]:g} | {k} | {p[2]:g} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def run_and_evaluate(cfg, workdir: str | Path, progress: bool = True) -> dict:
  """The whole sweep: for every category, train all grid rows (resumable), evaluate each
  row, and write ``results.jsonl``, ``results.json`` (``{"rows": [...]}``) and
  ``results.md`` in ``workdir``. Rows already in ``results.jsonl`` are not evaluated again.
  """
  from tailjax import study_a
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  grid = grid_from_config(cfg.sweep)
  is_lead = jax.process_index() == 0
  if is_lead:
    train.write_config(workdir, cfg)
  root = study_a.dataset_root(cfg)
  splits = study_a.category_splits(cfg, root)
  extractor, extractor_id = study_a.make_extractor(cfg)
  jsonl = workdir / "results.jsonl"
  done = {}
  if jsonl.exists():
    for line in jsonl.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a crash is evaluated again
      done[_row_id(rec)] = rec
  writer = io.JsonlWriter(jsonl)
  if is_lead:   # keep only complete, current records (drops torn lines)
    io.atomic_write_text(jsonl, "".join(io.to_json(r, sort_keys=True) + "\n" for r in done.values()))

  all_rows: list[dict] = []
  n_patches = None
  for cat, (tr, te) in splits.items():
    data = study_a.load_category(cfg, cat, tr, te, extractor, extractor_id)
    n_patches = int(np.prod(data.train_feats.shape[1:3]))
    wanted = [{"category": cat, **r} for r in grid.rows()]
    missing = [i for i, r in enumerate(wanted) if _row_id(r) not in done]
    if missing:
      t_cat = time.time()
      result = run_sweep(cfg, workdir / cat, data.train_feats, grid, progress=progress, desc=cat)
      params = jax.tree.map(lambda a: a[np.asarray(missing)], result.params_R)
      scores = row_scores(result.program, params, data.test_feats, cfg.eval.score)
      for i, s in zip(missing, scores):
        m, _ = study_a.evaluate_scores(cfg, s, data)
        rec = {**wanted[i], "metrics": m}
        done[_row_id(rec)] = rec
        if is_lead:
          writer.write(rec)
      print(f"[{cat}] {grid.num_rows} rows trained and evaluated in {time.time() - t_cat:.0f} s")
    all_rows += [done[_row_id(r)] for r in wanted]

  rows = [{k: r[k] for k in RESULT_KEYS} for r in all_rows]
  text = results_markdown(cfg, rows, grid, n_patches)
  if is_lead:
    io.atomic_write_json(workdir / "results.json", {"rows": rows})
    io.atomic_write_text(workdir / "results.md", text + "\n")
  print(text)
  return {"rows": rows, "markdown": text, "seconds": time.time() - t0}


__all__ = ("FlowProgram", "Grid", "SweepResult", "conv_as_matmul", "grid_from_config",
           "make_flow_program", "make_row_fns", "make_train", "over_rows", "results_markdown",
           "row_scores", "run_and_evaluate", "run_sweep", "sweep_hxs")
