"""The one driver for flow training: any grid of rows, in checkpointed segments, on any mesh.

A *row* is one training run: hyperparameters (λ = tail_weight, r = top_k_ratio,
learning rate) and a seed (``Rows``). Study A's variants × seeds, a λ / r / lr
sweep and the toy run are all grids of rows; ``run_rows`` trains them with the
pure ``tailjax.train.FlowProgram``:

* Rows are padded to a multiple of the mesh's "sweep" axis, split over it with
  ``jax.shard_map``, and run on each device by vmap or ``lax.map``
  (``train.row_mode``); with ``train.batch_devices = b > 1`` the b devices that
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
* **SIGTERM and Ctrl-C (SIGINT)** while a grid trains do not cut the compiled segment
  in flight (one XLA call, which cannot be stopped part-way): it finishes, its boundary
  is evaluated and checkpointed as usual, the stop is recorded in the manifest
  (``stopped``) and ``Interrupted`` (a ``KeyboardInterrupt``; ``exit_code`` 143 or 130)
  says at which step the run stopped and where it resumes. The rerun is bit for bit
  the uninterrupted run. A second signal stops at once, from the last checkpoint.
  With several processes they agree at each boundary, so all stop at the same one.
* **Checkpoints are verified on restore.** Each one carries the sha256 of its files
  (``CHECKSUMS``); one whose files do not match, or that orbax cannot read, is named in
  one line, moved aside to ``<step>.damaged-<n>`` (never deleted) and the run resumes
  from the newest intact one, or from the start, saying so.
* **Local processes** (``train.processes``, ``tailjax.distributed.launch_local``): on a
  CPU host the grid's rows may be split over several processes of this machine, each
  pinned to its own cores while a segment runs (``distributed.own_cores``); rows run
  whole on one device, so every row's numbers are the single process's.
* **Profiling** (``train.profile_steps`` = n > 0): after the first segment of a call, a
  ``jax.profiler`` trace of n more train steps, run on a copy of the state and then
  dropped, is written to ``<prefix>/profile/`` with ``ops.md`` / ``ops.json`` beside it,
  the traced ops' time per step by region of the step and kind of op
  (``tailjax.profiling``; ``_profile``); it changes no number.
* **Sizes are checked before anything is allocated** (``check_batch_size``,
  ``_check_memory``): a batch larger than the training split, and a grid whose training
  step needs more memory than the device has (a lower bound, ``_step_bytes``), are
  refused in one line naming ``train.batch_size`` and its limit. ``top_k`` needs no check: k = max(1, round(r·H·W)) ≤ H·W for every r
  in (0, 1], the range ``Rows`` accepts.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tailjax import distributed, io, losses, profiling, reporting, runrecord, sharding
from tailjax import train as train_lib

PyTree = Any
log = logging.getLogger(__name__)
HPARAM_NAMES = train_lib.HPARAM_NAMES
TRACED_NAMES = train_lib.TRACED_NAMES
DEFAULT_SEGMENT_STEPS = 100


class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) or SIGTERM; the message says where the run
  resumes, ``exit_code`` is the shell's 128 + the signal's number (130, 143)."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class DamagedCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back (its files changed since saved, or unreadable)."""


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
  """R training runs, each a dict: the hyperparameters ``HPARAM_NAMES`` (exact Python
  floats, as the config gave them), the per-patch NLL the tail is ranked by
  (``"tail_nll"``: exact | sq_norm | even_share, default exact; traced as the two
  scalars ``train.TAIL_NLL_NAMES``), a ``seed``, and descriptive labels (e.g.
  ``{"variant": "tail_aware"}`` or a grid point's category).

  Built from a config by ``from_variants`` (study A) or ``from_grid`` (a sweep), or
  from dicts by ``from_dicts``; all three validate in ``from_dicts``."""

  rows: tuple[dict, ...]

  @classmethod
  def from_dicts(cls, rows: Sequence[Mapping], where: str | Sequence[str] = "rows", *,
                 seed_field: str | None = None) -> "Rows":
    """The one validator of rows: λ ∈ [0, 1] and r ∈ (0, 1] (``losses.validate_tail_params``),
    a finite lr > 0, a non-negative integer seed and a known ``tail_nll``.

    Errors are one line naming the config field: ``<where>.<key>``, with ``where`` the
    config block of all rows or one block per row (``config.variants.<name>``), and
    ``seed_field`` (default ``<where>.seed``) the field the seeds came from.
    """
    if not rows:
      raise ValueError(f"{where if isinstance(where, str) else 'rows'}: no rows to train")
    blocks = [where] * len(rows) if isinstance(where, str) else list(where)
    fixed = (*HPARAM_NAMES, "tail_nll", "seed")
    out = []
    for r, block in zip(rows, blocks):
      missing = [k for k in (*HPARAM_NAMES, "seed") if k not in r]
      if missing:
        raise ValueError(f"{block}.{missing[0]} is missing")
      h = {}
      for k in HPARAM_NAMES:
        try:
          h[k] = float(r[k])
        except (TypeError, ValueError):
          raise ValueError(f"{block}.{k} must be a number, got {r[k]!r}") from None
      losses.validate_tail_params(h["tail_weight"], h["top_k_ratio"], where=block)
      if not (np.isfinite(h["learning_rate"]) and h["learning_rate"] > 0):
        raise ValueError(f"{block}.learning_rate must be > 0, got {h['learning_rate']}")
      seed = r["seed"]
      try:
        ok = int(seed) == seed and int(seed) >= 0
      except (TypeError, ValueError, OverflowError):
        ok = False
      if not ok:
        raise ValueError(f"{seed_field or block + '.seed'}: seeds must be non-negative "
                         f"integers, got {seed!r}")
      nll = str(r.get("tail_nll", "exact"))
      if nll not in losses.NLL_DEFINITIONS:
        raise ValueError(f"{block}.tail_nll must be one of {tuple(losses.NLL_DEFINITIONS)}, "
                         f"got {nll!r}")
      out.append({**{k: v for k, v in r.items() if k not in fixed}, **h, "tail_nll": nll,
                  "seed": int(seed)})
    return cls(tuple(out))

  @classmethod
  def from_variants(cls, cfg) -> "Rows":
    """Study A's rows: every variant of ``cfg.variants`` (λ = ``tail_weight``, r =
    ``top_k_ratio``, ``learning_rate`` default ``cfg.optim.learning_rate``, ``tail_nll``
    default "exact") × the seeds ``cfg.seed, cfg.seed + 1, …`` (``cfg.num_seeds`` of
    them), variant-major, each row labelled ``{"variant": name}``."""
    rows, blocks = [], []
    for name, v in cfg.variants.items():
      for s in range(int(cfg.num_seeds)):
        rows.append({"variant": name, **{k: v[k] for k in ("tail_weight", "top_k_ratio") if k in v},
                     "tail_nll": v.get("tail_nll", "exact"),
                     "learning_rate": v.get("learning_rate", cfg.optim.learning_rate),
                     "seed": int(cfg.seed) + s})
        blocks.append(f"config.variants.{name}")
    return cls.from_dicts(rows, blocks if rows else "config.variants", seed_field="config.seed")

  @classmethod
  def from_grid(cls, sweep_cfg, where: str = "config.sweep") -> "Rows":
    """A sweep's rows: the lists ``tail_weight`` × ``top_k_ratio`` × ``learning_rate`` ×
    ``tail_nll`` (optional, default ("exact",); names, or one comma-separated string)
    give the grid points, in that order, × ``seeds``; point-major (row = point · S +
    seed index). Each list is non-empty with distinct values (a string such as "(0.1,
    0.5)", as a command-line flag gives it, is read as a list); the values are checked
    by ``from_dicts``. Errors name the field, e.g. ``config.sweep.top_k_ratio``."""
    get = lambda k: sweep_cfg[k] if k in sweep_cfg else None
    vals = {}
    for k in (*HPARAM_NAMES, "seeds"):
      if get(k) is None:
        raise ValueError(f"{where}.{k} is missing (a list of values)")
      vals[k] = _config_list(get(k), f"{where}.{k}")
    nll = get("tail_nll") or ("exact",)
    nll = [n.strip() for n in nll.split(",")] if isinstance(nll, str) else [str(n) for n in nll]
    if len(set(nll)) != len(nll):
      raise ValueError(f"{where}.tail_nll has duplicate names: {nll}")
    points = itertools.product(*(vals[k] for k in HPARAM_NAMES), nll)
    rows = [{**dict(zip((*HPARAM_NAMES, "tail_nll"), p)), "seed": s}
            for p in points for s in vals["seeds"]]
    return cls.from_dicts(rows, where, seed_field=f"{where}.seeds")

  def labelled(self, **labels) -> "Rows":
    """The same rows with ``labels`` (e.g. ``category=...``) put first in every row."""
    return dataclasses.replace(self, rows=tuple({**labels, **r} for r in self.rows))

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


def _config_list(value, field: str) -> list[float]:
  """A config list of distinct numbers; a string "(a, b)" (a command-line flag) is parsed
  as a Python literal."""
  if isinstance(value, (str, bytes)):
    try:
      value = ast.literal_eval(value.decode() if isinstance(value, bytes) else value)
    except (ValueError, SyntaxError) as e:
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
         program.precision, program.feats_shape, program.batch_axis, program.batch_shards, mesh, row_impl, seg_len)
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
  _drop_closed_loop_reports()
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract_state(program, n_rows))
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


# The sha256 of every file of a checkpoint, written beside them once orbax has committed it.
CHECKSUMS = "tailjax-sha256.json"


def _step_dir(mngr, step: int) -> Path:
  return Path(str(mngr.directory)) / str(int(step))


def _checksums(step_dir: Path) -> dict[str, str]:
  return {p.relative_to(step_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def _save(mngr, step: int, state_host) -> None:
  """Checkpoint ``step`` (every process saves its part), then process 0 records the sha256
  of its files (``_damage`` checks them before a restore)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_host)), force=True)
  mngr.wait_until_finished()
  if distributed.is_lead():
    io.atomic_write_json(_step_dir(mngr, step) / CHECKSUMS, _checksums(_step_dir(mngr, step)))


def _damage(step_dir: Path) -> str | None:
  """Why the checkpoint ``step_dir`` is not as it was saved (a file missing, truncated or
  changed), or None. One saved without checksums is left to orbax's read."""
  path = step_dir / CHECKSUMS
  if not path.is_file():
    return None
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return f"its {CHECKSUMS} is unreadable"
  now = _checksums(step_dir)
  bad = [name for name, digest in saved.items() if now.get(name) != digest]
  return (f"{io.first_few(bad, 2)} {'is' if len(bad) == 1 else 'are'} missing or changed "
          "since it was saved") if bad else None


def _read_checkpoint(mngr, step: int, program, n_rows: int) -> PyTree:
  """The verified state of checkpoint ``step`` (host arrays), or ``DamagedCheckpointError``
  naming it: its files differ from their checksums, or orbax cannot read them."""
  step_dir = _step_dir(mngr, step)
  why = _damage(step_dir)
  if why is None:
    try:
      return _restore_host(mngr, step, program, n_rows)
    except Exception as e:  # noqa: BLE001 -- whatever orbax raises, the checkpoint is unreadable
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      why = f"orbax cannot read it: {first}"
  raise DamagedCheckpointError(f"checkpoint {step_dir} cannot be read ({why})")


def _move_aside(step_dir: Path) -> Path:
  """Renames a damaged checkpoint to ``<step>.damaged-<n>`` (a name orbax ignores)."""
  n = 1
  while step_dir.with_name(f"{step_dir.name}.damaged-{n}").exists():
    n += 1
  target = step_dir.with_name(f"{step_dir.name}.damaged-{n}")
  os.rename(step_dir, target)
  return target


def _drop_closed_loop_reports() -> None:
  """Silences one harmless report, once per process. When an orbax restore fails (a
  damaged checkpoint), orbax closes its event loop while tensorstore still completes the
  reads it had issued; their callbacks then call ``call_soon_threadsafe`` on the closed
  loop and tensorstore reports each ``RuntimeError: Event loop is closed`` through
  ``sys.unraisablehook``: dozens of tracebacks around the one real error. Only those
  reports are dropped; any other goes to the hook that was installed before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


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
  profile_steps: int = 0


def _plan(cfg, prefix: str, train_feats, eval_steps, evaluate, mesh, n_rows: int = 1) -> _Plan:
  _check_feats(train_feats, f"{prefix}: training features")
  if evaluate is None and eval_steps:
    raise ValueError("run_rows: eval_steps given without an evaluate hook")
  mesh = mesh or sharding.make_mesh(int(_exec_get(cfg, "batch_devices", 1)))
  row_impl = train_lib.resolve_row_impl(_exec_get(cfg, "row_mode", "auto"))
  total = int(cfg.train.num_steps)
  seg_len = int(_exec_get(cfg, "segment_steps", DEFAULT_SEGMENT_STEPS))
  if seg_len < 1:
    raise ValueError(f"config.train.segment_steps must be ≥ 1, got {seg_len}")
  seg_len = min(seg_len, total)
  bad_eval = [s for s in eval_steps if not 0 <= int(s) <= total]
  if bad_eval:
    raise ValueError(f"evaluation steps {bad_eval} lie outside [0, train.num_steps={total}]")
  profile_steps = _exec_get(cfg, "profile_steps", 0)
  if isinstance(profile_steps, bool) or not isinstance(profile_steps, int) or profile_steps < 0:
    raise ValueError(f"config.train.profile_steps must be an integer ≥ 0, got {profile_steps!r}")
  # train.processes is acted on by the command, before JAX starts (cli._local_launch);
  # checked here too, so that a bad value fails in one line when the library is called.
  distributed.local_process_count(_exec_get(cfg, "processes", 1), n_rows, n_rows * total)
  feats_shape = train_lib.feats_shape_of(train_feats)
  check_batch_size(cfg.train.batch_size, jax.tree.leaves(feats_shape)[0], prefix)
  program, init_fn, segment_fn = _row_fns(cfg, feats_shape, mesh, row_impl, seg_len)
  plan = _Plan(mesh, row_impl, total, seg_len, sorted({int(s) for s in eval_steps}), program,
               init_fn, segment_fn, feats_shape, profile_steps)
  _check_memory(plan, n_rows, prefix)
  return plan


def check_batch_size(batch_size: int, n_train: int, where: str) -> None:
  """A mini-batch draws ``batch_size`` of the ``n_train`` images a grid trains on; a batch
  larger than that split is refused (a mistyped size, which would otherwise surface as an
  out-of-memory error after the features were extracted)."""
  if int(batch_size) > int(n_train):
    raise ValueError(f"config.train.batch_size={int(batch_size)} is larger than the "
                     f"{int(n_train)} training images of {where}; it can be at most {int(n_train)}")


def _step_bytes(plan: _Plan, n_rows: int) -> tuple[int, int]:
  """(fixed, per_image): a lower bound on what one device holds while a segment trains is
  ``fixed + per_image · batch_size`` bytes (float32). ``fixed``: the training features, on
  every device. ``per_image``: the backward pass keeps, for each of the K coupling steps,
  at least the step's input and its conditioner's hidden activation (C + ⌈C/2⌉·hidden_ratio
  channels) at every location, for every row trained at once on the device (all of its
  rows under vmap, one under map), the batch split over ``batch_devices``. Parameters,
  optimiser state, gradients and XLA's scratch come on top, so a grid this refuses cannot
  fit; one it passes may still not."""
  model = plan.program.model
  shapes = (plan.feats_shape if train_lib.is_multiscale_shape(plan.feats_shape)
            else (plan.feats_shape,))
  shards = sharding.num_row_shards(plan.mesh)
  rows_at_once = math.ceil(n_rows / shards) if plan.row_impl == "vmap" else 1
  batch_shards = int(plan.mesh.shape[sharding.BATCH_AXIS])
  fixed = sum(4 * n * h * w * c for n, h, w, c in shapes)
  per_location = sum(h * w * int(model.num_steps)
                     * (c + max(1, round(math.ceil(c / 2) * float(model.hidden_ratio))))
                     for _, h, w, c in shapes)
  return fixed, 4 * per_location * rows_at_once // batch_shards


def _device_memory(mesh) -> tuple[int, str] | None:
  """(bytes, what) one device of ``mesh`` can hold: the accelerator's limit, or the host's
  physical memory shared by the CPU devices of this process; None if unknown."""
  dev = mesh.devices.flat[0]
  try:
    limit = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 -- backends without memory statistics raise various errors
    limit = None
  if limit:
    return int(limit), f"{dev.device_kind} memory"
  if dev.platform == "cpu" and hasattr(os, "sysconf"):
    with contextlib.suppress(ValueError, OSError):
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
      return total // max(1, local), (f"host memory ({total / 1e9:.1f} GB shared by {local} "
                                      "CPU devices)" if local > 1 else "host memory")
  return None


def _check_memory(plan: _Plan, n_rows: int, where: str) -> None:
  """Refuses a grid whose training step cannot fit one device (``_step_bytes``), in one
  line naming ``train.batch_size`` and the largest batch the estimate allows."""
  memory = _device_memory(plan.mesh)
  if memory is None:
    return
  have, what = memory
  fixed, per_image = _step_bytes(plan, n_rows)
  batch = plan.program.batch_size
  need = fixed + per_image * batch
  if need <= have:
    return
  text = (f"one training step of {where} needs at least {_bytes_text(need)} on each device, "
          f"more than the {_bytes_text(have)} of {what}")
  if fixed >= have:
    raise ValueError(f"{text}: its training features alone take {_bytes_text(fixed)}")
  fits = (have - fixed) // max(1, per_image)
  hint = " (or train.row_mode=map: one row at a time)" if plan.row_impl == "vmap" and n_rows > 1 else ""
  raise ValueError(f"config.train.batch_size={batch}: {text}; at most about {fits} fits{hint}")


def _bytes_text(n: int) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} bytes"


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
             eval_steps: Sequence[int] = (), evaluate: Callable[[int, PyTree, Any], Any] | None = None,
             mesh=None, progress: bool = True, max_segments: int | None = None,
             desc: str | None = None) -> RowsResult:
  """Trains every row on ``train_feats`` to ``cfg.train.num_steps`` (resuming), evaluating
  at ``eval_steps``.

  Args:
    cfg: config with flow.*, optim.*, train.{num_steps, batch_size, segment_steps, rows,
      conv_impl, batch_devices} and optionally train.precision, train.profile_steps.
    run: the open workdir (``runrecord.open_run``); files go under ``run.path(prefix)``.
    prefix: this grid's folder inside the workdir (e.g. the category).
    train_feats: [N, H, W, C] host array (identical on every process), or — multi-scale
      FastFlow — a tuple of per-scale arrays [N, H_s, W_s, C_s] of the same N images:
      every row then trains one flow per scale on the sum of the scales' losses
      (``train.make_flow_loss``), and ``evaluate`` sees all scales' parameters.
    eval_steps: steps (0 = the untrained flow) at which ``evaluate(step, params_R, program)`` runs (``program``: the
      grid's ``train.FlowProgram``, built once by the engine, for scoring);
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
  plan = _plan(cfg, prefix, train_feats, eval_steps, evaluate, mesh, rows.num_rows)
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
  if run.writer:
    io.note_written(ckpt_dir, folder=True)
  mngr = _manager(ckpt_dir)
  at = _Progress()
  try:
    with _stop_on_signals(at):
      return _train_grid(plan, grid, run, prefix, rows, mngr, evaluate, progress, max_segments,
                         desc, at)
  except Interrupted:
    raise
  except KeyboardInterrupt:
    last = mngr.latest_step()
    where = f"step {last}" if last is not None else "the start (no checkpoint yet)"
    raise Interrupted(f"interrupted at step {at.step} of {prefix}; rerunning the same command "
                      f"resumes from {where} in {ckpt_dir}", at.signal or signal.SIGINT) from None
  finally:
    mngr.close()


@dataclasses.dataclass
class _Progress:
  """Where the segment loop is, and whether a signal asked it to stop."""
  step: int = 0                  # the last step reached (trained, or restored)
  signal: int | None = None      # the SIGTERM / SIGINT received while training, if any


@contextlib.contextmanager
def _stop_on_signals(at: _Progress):
  """While a grid trains, SIGTERM and SIGINT set ``at.signal``, and the loop stops at the
  next boundary (``_stop_if_asked``); a second signal stops at once (KeyboardInterrupt).
  Python runs signal handlers in the main thread only: elsewhere nothing is installed."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    if at.signal is not None:
      raise KeyboardInterrupt
    at.signal = signum

  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, signal.SIG_DFL if h is None else h)


def _stop_if_asked(at: _Progress, run: runrecord.Run, prefix: str, mngr) -> None:
  """At a boundary whose checkpoint is saved: if a signal asked to stop (on any process,
  so that all stop at the same boundary), records the stop in the manifest and raises
  ``Interrupted``."""
  asked = at.signal or 0
  if jax.process_count() > 1:   # a collective, reached at the same boundary by every process
    from jax.experimental import multihost_utils
    asked = int(np.max(multihost_utils.process_allgather(np.asarray(asked, np.int32))))
  if not asked:
    return
  name = signal.Signals(asked).name
  run.record(stopped={"signal": name, "prefix": prefix, "step": at.step,
                      "at": time.strftime("%Y-%m-%d %H:%M:%S")})
  if at.step > 0:
    what = (f"stopped at step {at.step}, the end of the compiled segment that was running, "
            f"with checkpoint {_step_dir(mngr, at.step)}; rerunning the same command resumes "
            "from there")
  else:
    what = "stopped before its first step; rerunning the same command starts it"
  raise Interrupted(f"{name}: {prefix} {what}", asked)


def _resume(mngr, grid: "_Grid", prefix: str) -> tuple[int | None, Any]:
  """(step, device state) of the newest checkpoint that reads back intact, or (None, the
  initial state). Process 0 checks the checkpoints newest first; each damaged one is
  moved aside and named in one line that says where the run resumes. With one process a
  checkpoint orbax cannot read is damaged too; with several (a restore is collective, so
  a trial read on one process is impossible) the checksums decide, then every process
  restores the step process 0 chose."""
  single = jax.process_count() == 1
  kept: dict[int, Any] = {}

  def newest_intact() -> int | None:
    damaged, found = [], None
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        if single:
          kept[step] = _read_checkpoint(mngr, step, grid.plan.program, grid.n_rows)
        elif (why := _damage(_step_dir(mngr, step))) is not None:
          raise DamagedCheckpointError(f"checkpoint {_step_dir(mngr, step)} cannot be read ({why})")
        found = step
        break
      except DamagedCheckpointError as e:
        damaged.append(f"{e}; moved it aside to {_move_aside(_step_dir(mngr, step)).name}")
    if damaged:
      mngr.reload()
      then = (f"resuming from step {found}" if found is not None else
              "no intact checkpoint is left: training starts from step 0")
      for line in damaged:
        print(f"{line}, {then}", file=sys.stderr, flush=True)
    return found

  step = distributed.from_lead(f"{prefix}/resume", newest_intact)
  if not distributed.is_lead():
    mngr.reload()
    if mngr.latest_step() != step:
      raise distributed.DistributedError(
          f"process {jax.process_index()} sees checkpoint {mngr.latest_step()} in "
          f"{mngr.directory}, process 0 sees {step}: the workdir must be on a file system "
          "every process sees")
  if step is None:
    return None, grid.init()
  if step not in kept:
    kept[step] = _restore_host(mngr, step, grid.plan.program, grid.n_rows)
  return step, grid.to_device(kept[step])


def _train_grid(plan: _Plan, grid: _Grid, run: runrecord.Run, prefix: str, rows: Rows, mngr,
                evaluate, progress: bool, max_segments: int | None, desc: str | None,
                at: _Progress) -> RowsResult:
  """Restore (or init), then the segment loop: train to each boundary, check the losses,
  evaluate, checkpoint, log; stop at a boundary when a signal asked to."""
  resumed_from, state = _resume(mngr, grid, prefix)
  metric_log = _Log(run, prefix, rows, resumed_from)
  done = at.step = 0 if resumed_from is None else int(resumed_from)
  if resumed_from is not None:
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
      _stop_if_asked(at, run, prefix, mngr)
      n = b - done
      with distributed.own_cores():   # local processes: each on its own cores while it trains
        state, metrics = grid.segment(state, n)
        host = sharding.to_host(metrics)
      loss_RxT = np.asarray(host["loss"])[:rows.num_rows, :n]
      if not np.all(np.isfinite(loss_RxT)):
        _halt(mngr, loss_RxT, done, rows, grid)
      done, segments = b, segments + 1
      at.step = done
      evaluate_at(done, state)
      # Logged before the checkpoint: a crash between the two resumes from the previous
      # checkpoint and drops this line (``_Log``), never the reverse (a lost line).
      metric_log.train(done, loss_RxT, np.asarray(host["mean_nll"])[:rows.num_rows, n - 1])
      state_host = grid.host(state)
      _save(mngr, done, state_host)
      if segments == 1 and plan.profile_steps:
        _profile(grid, state_host, plan.profile_steps, run.path(prefix) / PROFILE_DIR, run.writer)
      bar.update(n)
      bar.set_postfix(loss=f"{float(np.mean(loss_RxT[:, -1])):.3g}")
    _stop_if_asked(at, run, prefix, mngr)
  finally:
    bar.close()
    metric_log.close()
  evals = {s: run.load_unit(f"{prefix}/eval/{s}") for s in plan.eval_steps if s <= done}
  params_R = grid.host(state).params
  seconds["train"] = time.perf_counter() - t_start - seconds["eval"]
  return RowsResult(program=plan.program, params_R=params_R, step=done,
                    finished=done >= plan.total, evals=evals, resumed_from=resumed_from,
                    row_mode=plan.row_impl, seconds=seconds)


PROFILE_DIR = "profile"


def _profile(grid: _Grid, state_host, steps: int, folder: Path, writer: bool) -> None:
  """``train.profile_steps``: a ``jax.profiler`` trace of ``steps`` train steps in
  ``folder`` (TensorBoard's profile plugin or Perfetto read it; ``profiling.trace``),
  taken after the first segment of a call so that compilation is not in it, and beside
  it ``ops.md`` / ``ops.json``: the traced ops' time per step by region of the step and
  kind of op (``profiling.op_summary``). With several processes each traces into
  ``folder/process-<i>``.

  The traced steps run on a *copy* of the state (the segment program donates its
  input) and their result is dropped: the run's own state, keys and checkpoints are
  untouched, so profiling never changes a number; it costs ``steps`` extra steps and
  one more compilation of the segment program (for the op names)."""
  if writer:
    io.note_written(folder, folder=True)
  if distributed.process_count() > 1:
    folder = folder / f"process-{distributed.process_index()}"
  folder.mkdir(parents=True, exist_ok=True)
  copy = grid.to_device(state_host)
  n = min(steps, grid.plan.seg_len)
  hlo = grid.plan.segment_fn.lower(copy, grid.kd_dev, grid.feats_dev,
                                   jnp.asarray(n, jnp.int32)).compile().as_text()
  with profiling.trace(folder):
    left = steps
    while left > 0:
      n = min(left, grid.plan.seg_len)
      copy, metrics = grid.segment(copy, n)
      left -= n
    jax.block_until_ready((copy, metrics))
  try:
    summary = profiling.op_summary(profiling.trace_events(folder), hlo, steps)
  except (FileNotFoundError, ValueError) as e:   # the trace is written; only its summary fails
    logging.warning("train.profile_steps: no op summary beside the trace in %s (%s)", folder, e)
    return
  title = "Ops of one train step of the rows on this process's devices"
  io.atomic_write_json(folder / "ops.json", summary)
  reporting.write_markdown(folder / "ops.md", profiling.summary_lines(summary, title))


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
        out = evaluate(step, params_R, plan.program)
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
    state = _read_checkpoint(mngr, step, program, rows.num_rows)   # verified, or one line
  return program, state.params, int(step)
