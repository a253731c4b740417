"""The training core: one state, one optimiser factory, one pure step, one early
stopping, and the pure flow program every flow run is made of.

The contract every study builds on:

* ``train_step(state, batch, key) -> (state, metrics)`` is pure; its randomness is
  ``fold_in(key, state.step)``, so a run resumed from step s replays steps s, s+1, ...
  exactly.
* Hyperparameters that sweeps vary live *in the state* as arrays: the learning
  rate in the optimiser state (``optax.inject_hyperparams``) and loss
  hyperparameters (λ, r, ...) in ``state.hparams``. A stacked state with a
  leading row axis is ``jax.vmap(init)`` away, and ``jax.vmap(train_step)``
  trains every row at once.
* ``FlowProgram`` holds the pieces of a flow run: ``init`` and one step loop,
  ``segment``, which the checkpointed driver (``tailjax.engine.run_rows``, behind
  every command) runs in segments; ``run`` is that loop over all steps.
  ``make_train(cfg, feats_shape)`` returns the pure ``train(hparams, key, feats)``
  of a flow built on it (purejaxrl's shape), for library use:
  ``jit(vmap(vmap(train)))`` sweeps hyperparameters × seeds.
* MIL and the ArcFace embedder use the same ``TrainState``, ``make_optimizer``,
  ``make_train_step`` and ``EarlyStopping`` inside their own in-graph loops.

**Keys.** Everything random in a flow row comes from its row key
(``row_keys``: ``fold_in(key(0), seed)``)::

    params  = model.init(fold_in(row_key, 0), x)
    batch_t = feats[randint(fold_in(fold_in(row_key, 1), t), B)]   (step t)
    step key = fold_in(row_key, 2)  (folded with the step inside train_step)

so rows that share a seed (λ = 0 and λ = 0.7, say) start from the same weights
and see the same batches — a paired comparison — and row i of a stacked run
equals the single run with row i's hyperparameters and seed.

**How convolutions are lowered** (``train.conv_impl``): "xla" keeps
``lax.conv_general_dilated``; "matmul" computes every stride-1 "SAME"
``nn.Conv`` of the flow as one matmul over the k×k neighbourhood (im2col; for
1×1 kernels a plain matmul) with the module's own parameters, through a Flax
method interceptor, so parameters, names and maths are unchanged; "auto" =
"matmul" on CPU and "xla" elsewhere (cuDNN). Why: on XLA:CPU a convolution
inside a loop (the loop over steps) runs 3–12× slower than the same convolution
in a standalone jitted step, and a vmapped convolution with per-row weights
becomes a grouped convolution that is slower still; as matmuls both run at the
standalone speed (``benchmarks/bench_train_step.py``).

**Precision** (``train.precision``): "float32" (the default), or "bfloat16": the
flow's subnet convolutions compute in bfloat16 on float32 parameters (their inputs
and kernels are cast; as matmuls they accumulate in float32), while the LayerNorm,
the affine couplings, z, the log-determinants, the per-patch NLL, the top-k
selection, the loss, the gradients and the optimiser state stay float32
(``flows.AffineCouplingStep``). The precision is part of the model, so a row is
scored (``FlowProgram.apply``, ``tailjax.evaluation``) in the precision it trained in.

**How rows run on one device** (``train.row_mode``): "vmap" batches the rows into one
set of larger ops (right for GPU/TPU, where one small-batch row leaves the
device idle), "map" runs them one after the other inside the same program
(``lax.map``), "auto" = "map" on CPU, "vmap" elsewhere. On CPU one row's step
already keeps the cores busy, so batching rows cannot add parallelism. The row
mode is an execution choice: it never changes the checkpoint layout.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from tailjax import flows, losses

PyTree = Any


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
  # A field the chosen optimiser ignores would be recorded but change nothing: refuse it.
  used = {"adam": {"b1", "b2"}, "adamw": {"b1", "b2", "weight_decay"}, "sgd": {"momentum"}}
  keys = set(cfg.keys()) if hasattr(cfg, "keys") else set()
  dead = sorted(keys - {"name", "learning_rate", "grad_clip_norm"} - used.get(name, set()))
  if dead and name in used:
    raise ValueError(f"optim.{dead[0]} is not used by optim.name={name!r}; remove it "
                     f"(fields for {name}: {', '.join(sorted(used[name]))})")
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
# Convolution lowering and row execution
# ----------------------------------------------------------------------------

ROW_IMPLS = ("auto", "vmap", "map")
CONV_IMPLS = ("auto", "xla", "matmul")


def _is_one(v) -> bool:
  return v is None or all(int(x) == 1 for x in np.atleast_1d(v))


def _matmul_lowerable(conv: nn.Conv) -> bool:
  ks = tuple(conv.kernel_size) if not isinstance(conv.kernel_size, int) else (conv.kernel_size,) * 2
  return (len(ks) == 2 and all(k % 2 == 1 for k in ks)
          and isinstance(conv.padding, str) and conv.padding.upper() == "SAME"
          and _is_one(conv.strides) and _is_one(conv.input_dilation)
          and _is_one(conv.kernel_dilation) and conv.feature_group_count == 1
          and conv.mask is None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x_MxK: jax.Array, w_KxO: jax.Array, dtype) -> jax.Array:
  """``x @ w`` with both operands cast to ``dtype`` (bfloat16) and float32 accumulation;
  returns float32. The backward runs its two matmuls the same way (the float32
  cotangent cast to ``dtype``) and returns both gradients in their inputs' dtypes,
  accumulated in float32, never rounded to ``dtype``.

  Hand-written because JAX's own transpose of a ``preferred_element_type=float32``
  product multiplies a float32 cotangent by a bfloat16 operand into a bfloat16 result,
  which XLA:CPU runs slower than float32 (``benchmarks/bench_step_parts.py``); with
  both operands bfloat16 and float32 accumulation it uses the CPU's bfloat16 units.
  The operands are cast here, after the im2col, so the patch building and its
  transpose stay float32 (XLA:CPU's bfloat16 elementwise ops are converted ones)."""
  return jnp.dot(x_MxK.astype(dtype), w_KxO.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x_MxK, w_KxO, dtype):
  x, w = x_MxK.astype(dtype), w_KxO.astype(dtype)
  # Empty slices carry the inputs' dtypes (residuals must be arrays).
  return jnp.dot(x, w, preferred_element_type=jnp.float32), (x, w, x_MxK[:0, :0], w_KxO[:0, :0])


def _mixed_matmul_bwd(dtype, res, g_MxO):
  x, w, x_like, w_like = res
  g = g_MxO.astype(dtype)
  dx_MxK = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x_like.dtype)
  dw_KxO = jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w_like.dtype)
  return dx_MxK, dw_KxO


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def conv_as_matmul(next_fun, args, kwargs, context):
  """Flax method interceptor: a stride-1, "SAME", odd-kernel ``nn.Conv`` on [B, H, W, C]
  computed as ``im2col(x) @ kernel.reshape(k·k·C, O) + bias``.

  A conv with a compute ``dtype`` (``flows.PRECISIONS``) multiplies in it (``mixed_matmul``),
  and keeps its float32 accumulation: it adds the bias and returns float32 (``nn.Conv``,
  the "xla" lowering, returns ``dtype``), so the ReLU, the next im2col and the subnet's
  output are float32 and only the matmuls' operands are rounded.
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
  if conv.dtype is None:
    y_BxHxWxO = jnp.einsum("bhwk,ko->bhwo", x_BxHxWxC, kernel.reshape(-1, kernel.shape[-1]))
  else:                        # conv.dtype operands, float32 accumulation and bias
    b, h, w, k = x_BxHxWxC.shape
    y_BxHxWxO = mixed_matmul(x_BxHxWxC.reshape(b * h * w, k), kernel.reshape(-1, kernel.shape[-1]),
                             conv.dtype).reshape(b, h, w, -1)
  if conv.use_bias:
    y_BxHxWxO = y_BxHxWxO + conv.get_variable("params", "bias")[None, None, None, :]
  return y_BxHxWxO


def lowering(conv_impl: str):
  """Context in which flow modules run with ``conv_impl`` ("xla" or "matmul")."""
  return nn.intercept_methods(conv_as_matmul) if conv_impl == "matmul" else contextlib.nullcontext()


def over_rows(fn: Callable, row_impl: str) -> Callable:
  """``fn(*row_args)`` for one row → the same over a leading row axis, by vmap or lax.map."""
  if row_impl == "vmap":
    return jax.vmap(fn)
  return lambda *xs: jax.lax.map(lambda a: fn(*a), xs)


# ----------------------------------------------------------------------------
# The flow program
# ----------------------------------------------------------------------------

HPARAM_NAMES = ("tail_weight", "top_k_ratio", "learning_rate")
# The per-patch NLL the tail is chosen and averaged by (``losses.NLL_DEFINITIONS``): a row's
# "tail_nll" label ("exact", "sq_norm", "even_share") as two traced scalars (a, b).
TAIL_NLL_NAMES = ("tail_logdet_weight", "tail_share_weight")
TRACED_NAMES = HPARAM_NAMES + TAIL_NLL_NAMES


def tail_nll_hparams(definitions) -> dict[str, np.ndarray]:
  """{"tail_logdet_weight": a_R, "tail_share_weight": b_R} for a sequence of per-patch
  NLL definitions (``losses.NLL_DEFINITIONS``); an unknown name is a ValueError."""
  a_R, b_R = losses.nll_definition_weights(list(definitions))
  return dict(zip(TAIL_NLL_NAMES, (np.asarray(a_R, np.float32), np.asarray(b_R, np.float32))))


def make_flow_loss(model: flows.FastFlow2d | flows.MultiScaleFlow):
  """``loss_fn(params, batch, hparams, key)`` for ``make_train_step``: the tail-aware
  loss with λ = hparams["tail_weight"], r = hparams["top_k_ratio"], its tail chosen and
  averaged by the per-patch NLL definition (a, b) = hparams["tail_logdet_weight"],
  hparams["tail_share_weight"] (``losses.tail_aware_loss_nll``; (1, 0), the exact
  per-location NLL, when absent):

      L = (1−λ)·mean_i NLL_i + λ·mean_{i ∈ top-k(s)} s_i,   s_i = NLL_i + (1−a)·logdet_i − b·mean_j logdet_j.

  Multi-scale (``flows.MultiScaleFlow``, batch = tuple of per-scale maps of the same
  images): the loss is the **sum over scales** of each scale's tail-aware loss,

      L = Σ_s [(1−λ)·mean_i NLL_s,i + λ·mean of the top ⌈r·H_s·W_s⌉ s_s,i per image],

  with the top-k taken within each scale's own grid (anomalib's FastFlow combines
  its scales' losses by summation). The scales' parameters are disjoint, so each
  scale's gradient is that of its own loss alone, and with Adam (per-parameter
  moments) the scales' updates do not interact — except through
  ``optim.grad_clip_norm``, which clips the *global* norm over all scales'
  gradients together (``optax.clip_by_global_norm`` on the whole parameter tree),
  so one scale with large gradients shrinks every scale's update. ``mean_nll`` is
  the sum over scales of each scale's mean patch NLL (the loss at λ = 0).
  """

  def one_scale(z_BxHxWxC, logdet_BxHxW, hparams):
    b = z_BxHxWxC.shape[0]
    nll_BxN = losses.patch_nll(z_BxHxWxC, logdet_BxHxW).reshape(b, -1)
    loss = losses.tail_aware_loss_nll(
        nll_BxN, logdet_BxHxW.reshape(b, -1), hparams["tail_weight"], hparams["top_k_ratio"],
        hparams.get("tail_logdet_weight", 1.0), hparams.get("tail_share_weight", 0.0))
    return loss, jnp.mean(nll_BxN)

  def loss_fn(params, feats_BxHxWxC, hparams, key):
    del key  # the flow is deterministic
    out = model.apply(params, feats_BxHxWxC)
    if isinstance(feats_BxHxWxC, (tuple, list)):    # multi-scale: ((z, logdet), ...)
      per_scale = [one_scale(z, ld, hparams) for z, ld in out]
      return (sum(l for l, _ in per_scale), {"mean_nll": sum(m for _, m in per_scale)})
    loss, mean_nll = one_scale(*out, hparams)
    return loss, {"mean_nll": mean_nll}

  return loss_fn


def init_row(model, tx, example_1xHxWxC, hparams: Mapping, row_key) -> TrainState:
  """A fresh TrainState for one row (traceable in ``hparams`` and ``row_key``)."""
  params = model.init(jax.random.fold_in(row_key, 0), example_1xHxWxC)
  state = create_state(model.apply, params, tx, {
      "tail_weight": hparams["tail_weight"], "top_k_ratio": hparams["top_k_ratio"],
      "tail_logdet_weight": hparams.get("tail_logdet_weight", 1.0),
      "tail_share_weight": hparams.get("tail_share_weight", 0.0)})
  return set_learning_rate(state, hparams["learning_rate"])


def sample_batch(feats_NxHxWxC, batch_size: int, row_key, step):
  """The row's mini-batch at ``step`` (uniform with replacement). ``feats`` may be a
  pytree of per-scale arrays [N, ...]: every scale is indexed with the same images."""
  k = jax.random.fold_in(jax.random.fold_in(row_key, 1), step)
  n = jax.tree.leaves(feats_NxHxWxC)[0].shape[0]
  idx_B = jax.random.randint(k, (batch_size,), 0, n)
  return jax.tree.map(lambda f: f[idx_B], feats_NxHxWxC)


def is_multiscale_shape(feats_shape) -> bool:
  """True for a tuple of per-scale shapes ``((N, H_s, W_s, C_s), ...)``."""
  return len(feats_shape) > 0 and isinstance(feats_shape[0], (tuple, list))


def feats_shape_of(feats) -> tuple:
  """``feats.shape`` of one array; ``tuple(f.shape for f in feats)`` of a tuple of scales."""
  if isinstance(feats, (tuple, list)):
    return tuple(tuple(int(d) for d in np.shape(f)) for f in feats)
  return tuple(int(d) for d in np.shape(feats))


def row_keys(seeds: Sequence[int]) -> jax.Array:
  """One key per row: ``fold_in(key(0), seed)``."""
  base = jax.random.key(0)
  return jnp.stack([jax.random.fold_in(base, int(s)) for s in seeds])


def model_for(cfg, channels, precision: str = "float32"
              ) -> flows.FastFlow2d | flows.MultiScaleFlow:
  """The flow of ``cfg.flow`` on C channels, or one flow per scale for a tuple of C_s,
  with its convolutions in ``precision``."""
  flow_cfg = {**dict(cfg.flow), "precision": precision}
  if isinstance(channels, (tuple, list)):
    return flows.build_multiscale_flow(flow_cfg, channels)
  flow_cfg["channels"] = int(channels)
  return flows.build_flow(flow_cfg)


def resolve_conv_impl(impl: str, where: str = "config.train.conv_impl") -> str:
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "xla"
  if impl not in CONV_IMPLS:
    raise ValueError(f"{where} must be one of {CONV_IMPLS}, got {impl!r}")
  return impl


def resolve_precision(precision: str, where: str = "config.train.precision") -> str:
  if precision not in flows.PRECISIONS:
    raise ValueError(f"{where} must be one of {flows.PRECISIONS}, got {precision!r}")
  return precision


def resolve_row_impl(impl: str, where: str = "config.train.row_mode") -> str:
  if impl == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  if impl not in ROW_IMPLS:
    raise ValueError(f"{where} must be one of {ROW_IMPLS}, got {impl!r}")
  return impl


@dataclasses.dataclass(frozen=True)
class FlowProgram:
  """Static structure of a flow run; its methods are pure and traceable.

  ``init(hparams, key) -> TrainState``; ``segment(state, key, feats, n,
  segment_len)`` runs a *traced* number n ≤ ``segment_len`` of steps from
  ``state.step`` (one compiled program for every segment length: the driver cuts
  runs at evaluation steps and checkpoints without recompiling); ``run(state, key,
  feats, num_steps) -> (state, metrics_T)`` is ``segment`` over all the steps, and
  ``train(hparams, key, feats) = run(init(hparams, key), key, feats, total_steps)``.
  ``key`` is the row key (``row_keys``), a typed PRNG key.
  """

  model: flows.FastFlow2d | flows.MultiScaleFlow
  tx: optax.GradientTransformation
  feats_shape: tuple          # [N, H, W, C], or one such shape per scale (multi-scale)
  batch_size: int
  total_steps: int
  conv_impl: str = "xla"
  batch_axis: str | None = None
  batch_shards: int = 1
  precision: str = "float32"  # the model's (``model.precision``), kept here for the record

  def _loss_fn(self):
    base = make_flow_loss(self.model)
    if self.batch_axis is None:
      return base
    axis, shards = self.batch_axis, self.batch_shards

    def loss_fn(params, batch_BxHxWxC, hparams, key):
      # Every device of the row drew the same batch (same key); each takes its slice,
      # and pmean makes the loss (and, by transposition, the gradients) the full-batch ones.
      n = jax.tree.leaves(batch_BxHxWxC)[0].shape[0] // shards
      local = jax.tree.map(
          lambda b: jax.lax.dynamic_slice_in_dim(b, jax.lax.axis_index(axis) * n, n, axis=0),
          batch_BxHxWxC)
      loss, aux = base(params, local, hparams, key)
      return jax.lax.pmean(loss, axis), jax.tree.map(lambda a: jax.lax.pmean(a, axis), aux)

    return loss_fn

  @property
  def multiscale(self) -> bool:
    return is_multiscale_shape(self.feats_shape)

  def _check(self, feats):
    if self.multiscale:
      got = feats_shape_of(feats) if isinstance(feats, (tuple, list)) else None
      if (got is None or len(got) != len(self.feats_shape)
          or any(g[1:] != tuple(w[1:]) or g[0] != got[0][0] for g, w in zip(got, self.feats_shape))):
        raise ValueError(f"features must be a tuple of {len(self.feats_shape)} scales "
                         f"[N, H_s, W_s, C_s] like the program's {self.feats_shape} (same N), "
                         f"got {got if got is not None else np.shape(feats)}")
      return
    if tuple(feats.shape[1:]) != tuple(self.feats_shape[1:]):
      raise ValueError(f"features must be [N, {', '.join(map(str, self.feats_shape[1:]))}] "
                       f"like the program's, got {tuple(feats.shape)}")

  def init(self, hparams: Mapping, key) -> TrainState:
    # Flax init depends on shapes only, so a zero example gives the same params.
    if self.multiscale:
      example_1xHxWxC = tuple(jnp.zeros((1, *s[1:]), jnp.float32) for s in self.feats_shape)
    else:
      example_1xHxWxC = jnp.zeros((1, *self.feats_shape[1:]), jnp.float32)
    with lowering(self.conv_impl):
      return init_row(self.model, self.tx, example_1xHxWxC, hparams, key)

  def _body(self, key, feats_NxHxWxC):
    train_step = make_train_step(self._loss_fn())
    step_key = jax.random.fold_in(key, 2)

    def body(st):
      batch = sample_batch(feats_NxHxWxC, self.batch_size, key, st.step)
      return train_step(st, batch, step_key)

    return body

  def run(self, state: TrainState, key, feats_NxHxWxC, num_steps: int):
    """``num_steps`` steps from ``state.step``: ``segment`` over all of them (one loop
    body for every flow run); metrics ``{"loss", "mean_nll"}``, each [num_steps]."""
    return self.segment(state, key, feats_NxHxWxC, int(num_steps), int(num_steps))

  def segment(self, state: TrainState, key, feats_NxHxWxC, n, segment_len: int):
    """Runs ``n`` (traced, ≤ ``segment_len``) steps; metrics are [segment_len] buffers
    holding the steps' values in their first n entries and NaN after. A Python-int ``n``
    gives a fixed trip count (a ``scan``, so the run is differentiable); a traced one a
    ``while`` loop, one compiled program for every n."""
    self._check(feats_NxHxWxC)
    body = self._body(key, feats_NxHxWxC)
    # Derived from the state so that, inside shard_map, the buffers vary over the same
    # mesh axes as the losses written into them (a fresh state's step is a Python 0).
    nan = jnp.full((segment_len,), jnp.nan, jnp.float32) + jnp.asarray(state.step * 0).astype(
        jnp.float32)

    def loop(t, carry):
      st, loss_T, nll_T = carry
      st, m = body(st)
      return st, loss_T.at[t].set(m["loss"]), nll_T.at[t].set(m["mean_nll"])

    with lowering(self.conv_impl):
      state, loss_T, nll_T = jax.lax.fori_loop(0, n, loop, (state, nan, nan))
    return state, {"loss": loss_T, "mean_nll": nll_T}

  def train(self, hparams: Mapping, key, feats_NxHxWxC):
    return self.run(self.init(hparams, key), key, feats_NxHxWxC, self.total_steps)

  def apply(self, params, feats_BxHxWxC):
    """(z, logdet_BxHxW) with this program's convolution lowering."""
    with lowering(self.conv_impl):
      return self.model.apply(params, feats_BxHxWxC)


def make_flow_program(cfg, feats_shape: Sequence[int], *, num_steps: int | None = None,
                      conv_impl: str | None = None, batch_axis: str | None = None,
                      batch_shards: int = 1, precision: str | None = None) -> FlowProgram:
  """The flow program for ``cfg`` (fields flow.*, optim.*, train.batch_size,
  train.num_steps, train.conv_impl, train.precision) on features of shape ``feats_shape``
  [N, H, W, C],
  or — multi-scale — a tuple of per-scale shapes ``((N, H_s, W_s, C_s), ...)``: then the
  model is a ``flows.MultiScaleFlow`` (one flow per scale), the program's features are
  the tuple of per-scale arrays, and the loss is ``make_flow_loss``'s sum over scales."""
  if is_multiscale_shape(feats_shape):
    feats_shape = tuple(tuple(int(d) for d in s) for s in feats_shape)
    if any(len(s) != 4 for s in feats_shape) or len({s[0] for s in feats_shape}) != 1:
      raise ValueError(f"multi-scale feats_shape must be [N, H_s, W_s, C_s] per scale with "
                       f"one N, got {feats_shape}")
    channels = tuple(s[-1] for s in feats_shape)
  else:
    feats_shape = tuple(int(s) for s in feats_shape)
    if len(feats_shape) != 4:
      raise ValueError(f"feats_shape must be [N, H, W, C], got {feats_shape}")
    channels = feats_shape[-1]
  bs = int(cfg.train.batch_size)
  if bs < 1:
    raise ValueError(f"config.train.batch_size must be ≥ 1, got {bs}")
  if batch_axis is not None and bs % int(batch_shards):
    raise ValueError(f"config.train.batch_size ({bs}) must be divisible by "
                     f"config.train.batch_devices ({batch_shards})")
  steps = int(cfg.train.num_steps if num_steps is None else num_steps)
  if steps < 1:
    raise ValueError(f"config.train.num_steps must be ≥ 1, got {steps}")
  if conv_impl is None:
    conv_impl = cfg.train.get("conv_impl", "auto") if hasattr(cfg.train, "get") else "auto"
  if precision is None:
    precision = cfg.train.get("precision", "float32") if hasattr(cfg.train, "get") else "float32"
  precision = resolve_precision(precision)
  return FlowProgram(
      model=model_for(cfg, channels, precision), tx=make_optimizer(cfg.optim),
      feats_shape=feats_shape, batch_size=bs, total_steps=steps,
      conv_impl=resolve_conv_impl(conv_impl), batch_axis=batch_axis,
      batch_shards=int(batch_shards), precision=precision)


def make_train(cfg, feats_shape: Sequence[int], **kwargs) -> Callable:
  """``train(hparams, key, feats) -> (TrainState, metrics_T)``: a whole flow run as one
  pure function (purejaxrl's shape), for using tailjax as a library.

  ``hparams`` = {"tail_weight": λ, "top_k_ratio": r, "learning_rate": lr} and
  optionally the ``TAIL_NLL_NAMES`` pair, scalars or traced arrays; ``key`` a row key
  (``row_keys``); metrics ``{"loss", "mean_nll"}``, each [T]. Vmap it over
  hyperparameters and seeds (``sweep_hxs``); ``kwargs`` go to ``make_flow_program``.
  It is ``FlowProgram.train``, the same step loop the engine runs in segments, so row
  i of ``engine.run_rows`` equals ``train`` with row i's hyperparameters and seed (to
  float rounding: a different compiled program). The command line's studies and sweeps
  run through ``engine.run_rows`` (checkpoints, resume, evaluation hooks, sharding).
  """
  return make_flow_program(cfg, feats_shape, **kwargs).train


def sweep_hxs(train_fn: Callable) -> Callable:
  """``jit(vmap(vmap(train, seeds), hparams))``: ``(hparams_H, keys_S, feats) ->
  (state_HxS, metrics_HxSxT)``; every leaf gets leading [H, S] axes. The pure-function
  sweep of ``make_train``; ``tailjax sweep`` runs its grid through ``engine.run_rows``."""
  return jax.jit(jax.vmap(jax.vmap(train_fn, (None, 0, None)), (0, None, None)))
