"""Training core: TrainState, pure train steps, optimisers, checkpointed loop, early stopping.

The contract every study builds on:

* ``train_step(state, batch, key) -> (state, metrics)`` is pure and jitted with
  the state donated; its randomness is ``fold_in(key, state.step)``, so a run
  resumed from step s replays steps s, s+1, ... exactly.
* Hyperparameters that sweeps vary live *in the state* as arrays: the learning
  rate in the optimiser state (``optax.inject_hyperparams``) and loss
  hyperparameters (λ, r, ...) in ``state.hparams``. A stacked state with a
  leading sweep axis is therefore just ``jax.vmap(init)`` away, and
  ``jax.vmap(train_step)`` trains every row at once.
* ``fit`` runs the host loop: orbax checkpoints of the latest and the best state,
  auto-resume from the workdir (restored into ``jax.eval_shape(init)``), a JSONL
  metrics log, ``config.json``, a tqdm bar, NaN/Inf detection that names the
  step and leaves the last good checkpoint intact, and early stopping.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from tqdm.auto import tqdm

from tailjax import io

PyTree = Any
log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  """Flax TrainState plus ``hparams``: per-run loss hyperparameters as (traceable) arrays."""

  hparams: PyTree = flax.struct.field(default_factory=dict)


class NonFiniteLossError(FloatingPointError):
  """Raised when a loss or monitored metric becomes NaN/Inf; names the step."""


# ----------------------------------------------------------------------------
# Optimisers
# ----------------------------------------------------------------------------


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Optimiser from a config block (fields: name, learning_rate, weight_decay, b1, b2,
  grad_clip_norm), wrapped in ``optax.inject_hyperparams`` so the learning rate is
  an array in the optimiser state: settable per sweep row, vmappable, checkpointed.
  """
  get = lambda k, d: cfg.get(k, d) if hasattr(cfg, "get") else getattr(cfg, k, d)
  name = str(get("name", "adam")).lower()
  clip = get("grad_clip_norm", None)
  wd = float(get("weight_decay", 0.0))
  b1, b2 = float(get("b1", 0.9)), float(get("b2", 0.999))

  def factory(learning_rate):
    if name == "adam":
      opt = optax.adam(learning_rate, b1=b1, b2=b2)
    elif name == "adamw":
      opt = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=wd)
    elif name == "sgd":
      opt = optax.sgd(learning_rate, momentum=float(get("momentum", 0.9)))
    else:
      raise ValueError(f"optim.name must be adam, adamw or sgd, got {name!r}")
    if clip is not None and float(clip) > 0:
      opt = optax.chain(optax.clip_by_global_norm(float(clip)), opt)
    return opt

  lr = float(get("learning_rate", 1e-3))
  if not lr > 0:
    raise ValueError(f"optim.learning_rate must be > 0, got {lr}")
  factory(lr)  # validate the name eagerly, at config time
  return optax.inject_hyperparams(factory)(learning_rate=lr)


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
  """Returns ``state`` with the injected learning rate replaced (may be traced)."""
  opt_state = state.opt_state
  hp = dict(opt_state.hyperparams)
  hp["learning_rate"] = jnp.asarray(learning_rate, jnp.asarray(hp["learning_rate"]).dtype)
  return state.replace(opt_state=opt_state._replace(hyperparams=hp))


def learning_rate_of(state: TrainState) -> jax.Array:
  return state.opt_state.hyperparams["learning_rate"]


def create_state(apply_fn, params, tx, hparams=None) -> TrainState:
  hparams = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, hparams=hparams)


# ----------------------------------------------------------------------------
# The pure step
# ----------------------------------------------------------------------------

LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)`` from a loss.

  ``loss_fn(params, batch, hparams, key) -> (loss, aux_metrics)``. The step key
  is ``fold_in(key, state.step)``. Metrics: loss, grad_norm, learning_rate and
  the aux entries. Jit it with ``jax.jit(step, donate_argnums=0)``; vmap it over
  a stacked state for sweeps.
  """

  def train_step(state: TrainState, batch, key):
    step_key = jax.random.fold_in(key, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.hparams, step_key)
    new_state = state.apply_gradients(grads=grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate_of(state), **aux}
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------
# Early stopping (pure: works on the host and inside lax.scan / vmap)
# ----------------------------------------------------------------------------


class EarlyStopping(NamedTuple):
  """Patience on a monitored metric; a pure pytree so it can live in ``lax.scan``.

  ``best`` is the best value seen (in "min" orientation: larger-is-better
  metrics are negated by ``early_stopping_update``), ``best_step`` when it was
  seen, ``bad`` the number of evaluations since, ``stop`` whether patience ran out.
  """

  best: jax.Array
  best_step: jax.Array
  bad: jax.Array
  stop: jax.Array


def early_stopping_init() -> EarlyStopping:
  return EarlyStopping(best=jnp.asarray(jnp.inf, jnp.float32), best_step=jnp.asarray(-1, jnp.int32),
                       bad=jnp.asarray(0, jnp.int32), stop=jnp.asarray(False))


def early_stopping_update(es: EarlyStopping, value, step, *, patience, mode: str = "min",
                          min_delta: float = 0.0) -> tuple[EarlyStopping, jax.Array]:
  """One evaluation: returns (new state, improved?). ``patience`` may be traced.

  Improvement means ``value < best − min_delta`` (mode "min") or
  ``value > best + min_delta`` (mode "max"). Once ``stop`` is set it stays set
  and the state no longer changes.
  """
  if mode not in ("min", "max"):
    raise ValueError(f"early_stopping.mode must be 'min' or 'max', got {mode!r}")
  v = jnp.asarray(value, jnp.float32)
  v = -v if mode == "max" else v
  improved = jnp.logical_and(v < es.best - min_delta, jnp.logical_not(es.stop))
  bad = jnp.where(improved, 0, es.bad + jnp.where(es.stop, 0, 1))
  new = EarlyStopping(
      best=jnp.where(improved, v, es.best),
      best_step=jnp.where(improved, jnp.asarray(step, jnp.int32), es.best_step),
      bad=bad.astype(jnp.int32),
      stop=jnp.logical_or(es.stop, bad >= patience),
  )
  return new, improved


# ----------------------------------------------------------------------------
# The checkpointed host loop
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
  state: TrainState
  history: list[dict]
  best_step: int | None
  stopped_early: bool
  resumed_from: int | None


def step_of(state: TrainState) -> int:
  """The state's step; for a stacked (sweep) state every row is at the same step."""
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def _scalarize(metrics: dict) -> dict:
  """Host-side summary of (possibly sweep-stacked) metrics: scalars stay, arrays become lists."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    out[k] = a.item() if a.ndim == 0 else a.tolist()
  return out


def write_config(workdir: Path, config) -> None:
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
  else:
    text = io.to_json(config, indent=2, sort_keys=True)
  io.atomic_write_text(workdir / "config.json", text + "\n")


def fit(
    *,
    workdir: str | Path,
    init_fn: Callable[[jax.Array], TrainState],
    train_step: Callable,
    get_batch: Callable[[int], PyTree],
    key: jax.Array,
    num_steps: int,
    config=None,
    log_every: int = 50,
    checkpoint_every: int | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int | None = None,
    monitor: str | None = None,
    monitor_mode: str = "min",
    patience: int | None = None,
    restore_best: bool = True,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
  """Runs ``train_step`` from the latest checkpoint in ``workdir`` (or from init) to ``num_steps``.

  Args:
    workdir: run directory; holds ``config.json``, ``metrics.jsonl`` and
      ``checkpoints/{latest,best}``. An existing latest checkpoint is resumed.
    init_fn: ``init_fn(key) -> TrainState`` (also used, under ``jax.eval_shape``,
      as the restore target).
    train_step: jitted ``(state, batch, key) -> (state, metrics)``; metrics must
      contain "loss" (any shape: a sweep-stacked loss is checked elementwise).
    get_batch: ``get_batch(step) -> batch``, a deterministic function of the step
      so that a resumed run sees the same data.
    key: the run's base key (``init_fn`` gets ``fold_in(key, 0)``'s parent: key itself).
    num_steps: total number of steps.
    log_every: steps between JSONL records and NaN checks.
    checkpoint_every: steps between latest-checkpoint saves (default: log_every).
    eval_fn: ``eval_fn(state) -> dict`` of host floats, run every ``eval_every``.
    monitor: key of ``eval_fn``'s output used for the best checkpoint and patience.
    monitor_mode: "min" or "max".
    patience: evaluations without improvement before stopping (None: never stop).
    restore_best: at the end, return the best checkpoint's state (if any).
  Raises:
    NonFiniteLossError: the first step whose loss is NaN/Inf (the latest
      checkpoint then still holds the last good state).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config is not None:
    write_config(workdir, config)
  checkpoint_every = checkpoint_every or log_every
  if eval_fn is not None and (monitor is None or eval_every is None):
    raise ValueError("fit: eval_fn needs both `monitor` and `eval_every`")

  ckpt_dir = (workdir / "checkpoints").absolute()
  latest = ocp.CheckpointManager(
      ckpt_dir / "latest",
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False))
  best = None
  if eval_fn is not None:
    best = ocp.CheckpointManager(
        ckpt_dir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: float(m[monitor]),
            best_mode=monitor_mode, enable_async_checkpointing=False))
  metrics_log = io.JsonlWriter(workdir / "metrics.jsonl")
  abstract_state = jax.eval_shape(init_fn, key)
  es = early_stopping_init()
  history: list[dict] = []
  resumed_from = latest.latest_step()

  if resumed_from is not None:
    restored = latest.restore(resumed_from, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        loop=ocp.args.JsonRestore()))
    state = restored["state"]
    loop = restored["loop"] or {}
    if "early_stopping" in loop:
      es = EarlyStopping(*(jnp.asarray(v) for v in loop["early_stopping"]))
    metrics_log.truncate_after(resumed_from)
    log.info("resumed %s from step %d", workdir, resumed_from)
  else:
    state = init_fn(key)
    metrics_log.truncate_after(-1)

  def loop_state():
    return {"early_stopping": [np.asarray(x).item() for x in es]}

  def save_latest(st):
    step = step_of(st)
    if latest.latest_step() == step:
      return
    latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(st), loop=ocp.args.JsonSave(loop_state())))
    latest.wait_until_finished()

  pending: list[tuple[int, dict]] = []

  def flush():
    """Moves buffered step metrics to the host; raises at the first non-finite loss."""
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host):
      if not np.all(np.isfinite(np.asarray(m["loss"]))):
        pending.clear()
        raise NonFiniteLossError(
            f"non-finite loss at step {s} (loss={np.asarray(m['loss']).tolist()}); training "
            f"stopped. The last good checkpoint is step {latest.latest_step()} in "
            f"{ckpt_dir / 'latest'}.")
    s, m = pending[-1][0], host[-1]
    rec = {"step": s + 1, "split": "train", **_scalarize(m)}
    metrics_log.write(rec)
    history.append(rec)
    pending.clear()

  start = step_of(state)
  stopped = bool(es.stop)
  try:
    bar = tqdm(range(start, num_steps), initial=start, total=num_steps, desc=desc,
               disable=not progress, leave=False)
    for step in bar:
      if stopped:
        break
      state, metrics = train_step(state, get_batch(step), key)
      pending.append((step, metrics))
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        flush()
        if progress and history:
          bar.set_postfix(loss=history[-1]["loss"] if np.ndim(history[-1]["loss"]) == 0 else "…")
      if eval_fn is not None and (done % eval_every == 0 or done == num_steps):
        flush()
        ev = {k: float(v) for k, v in eval_fn(state).items()}
        if not np.isfinite(ev[monitor]):
          raise NonFiniteLossError(f"non-finite {monitor}={ev[monitor]} at step {done}; "
                                   f"last good checkpoint: step {latest.latest_step()}")
        es, improved = early_stopping_update(es, ev[monitor], done,
                                             patience=patience if patience is not None else 2**30,
                                             mode=monitor_mode)
        rec = {"step": done, "split": "eval", **ev}
        metrics_log.write(rec)
        history.append(rec)
        if bool(improved):
          best.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  loop=ocp.args.JsonSave(loop_state())),
                    metrics=ev)
          best.wait_until_finished()
        stopped = bool(es.stop)
      if done % checkpoint_every == 0 or done == num_steps or stopped:
        flush()
        save_latest(state)
    flush()
    save_latest(state)
    best_step = None
    if best is not None and best.best_step() is not None:
      best_step = int(best.best_step())
      if restore_best:
        state = best.restore(best_step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
    return FitResult(state=state, history=history, best_step=best_step,
                     stopped_early=stopped, resumed_from=resumed_from)
  finally:
    latest.close()
    if best is not None:
      best.close()


def restore_checkpoint(workdir: str | Path, init_fn: Callable[[jax.Array], TrainState],
                       key: jax.Array, which: str = "latest", step: int | None = None) -> TrainState:
  """Restores ``workdir/checkpoints/<which>`` into ``jax.eval_shape(init_fn, key)``."""
  path = (Path(workdir) / "checkpoints" / which).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no checkpoints at {path}")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps under {path}")
    abstract = jax.eval_shape(init_fn, key)
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
