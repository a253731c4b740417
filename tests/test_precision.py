"""``train.precision``: bfloat16 convolutions, float32 everywhere the numbers are kept."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailjax import evaluation, losses, train

FEATS = np.random.default_rng(7).normal(size=(10, 6, 6, 10)).astype(np.float32)
HP = {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2}
KEY = train.row_keys([3])[0]


def _cfg(precision=None, conv_impl="matmul"):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 4, "kernel_mode": "alternate", "hidden_ratio": 1.0, "clamp": 2.0,
            "layer_norm": "image", "global_affine": False}
  c.optim = {"name": "adam", "learning_rate": 1e-2}
  c.train = {"num_steps": 3, "batch_size": 4, "conv_impl": conv_impl}
  if precision is not None:
    c.train.precision = precision
  return c


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (loops, conds, custom rules) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _trained_params(steps=40):
  """Float32 parameters after a few steps (a fresh flow is the identity: its zero last
  convolutions would hide any precision error)."""
  p32 = train.make_flow_program(_cfg("float32"), FEATS.shape)
  state, _ = jax.jit(lambda s: p32.run(s, KEY, jnp.asarray(FEATS), steps))(p32.init(HP, KEY))
  return state.params


@pytest.mark.parametrize("conv_impl", ["matmul", "xla"])
def test_bfloat16_keeps_logdets_nll_loss_and_optimiser_state_float32(conv_impl):
  program = train.make_flow_program(_cfg("bfloat16", conv_impl), FEATS.shape)
  assert program.precision == "bfloat16" and program.model.precision == "bfloat16"
  state = program.init(HP, KEY)
  x = jnp.asarray(FEATS[:4])
  z, logdet = jax.eval_shape(program.apply, state.params, x)
  assert (z.dtype, logdet.dtype) == (jnp.float32, jnp.float32)
  nll = jax.eval_shape(lambda p: losses.patch_nll(*program.apply(p, x)), state.params)
  assert nll.dtype == jnp.float32
  # One train step: the loss, its metrics and every leaf of the new state (params,
  # Adam's moments, the injected learning rate, hparams) are float32.
  step = lambda s: program.run(s, KEY, jnp.asarray(FEATS), 1)
  new_state, metrics = jax.eval_shape(step, state)
  assert {l.dtype for l in jax.tree.leaves(metrics)} == {jnp.dtype(jnp.float32)}
  floats = [l for l in jax.tree.leaves(new_state) if jnp.issubdtype(l.dtype, jnp.floating)]
  assert floats and all(l.dtype == jnp.float32 for l in floats)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(new_state.opt_state)
             if jnp.issubdtype(l.dtype, jnp.floating))
  # The policy does something: the convolutions take bfloat16 operands, and the top-k
  # selection (a sort over the per-patch scores) sorts float32.
  eqns = list(_eqns(jax.make_jaxpr(step)(state).jaxpr))
  convs = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert convs and any(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  sorts = [e for e in eqns if e.primitive.name == "sort"]
  assert sorts and all(v.aval.dtype != jnp.bfloat16 for e in sorts for v in e.invars)


@pytest.mark.parametrize("conv_impl", ["matmul", "xla"])
def test_bfloat16_nll_is_within_the_stated_tolerance_of_float32(conv_impl):
  """Per-patch NLL of the same (trained, float32) parameters scored with bfloat16
  convolutions vs float32, on this 4-step 10-channel flow (NLL ≈ 10–19 nats per patch).

  Measured: max |ΔNLL| ≈ 0.010 nats ("matmul"; 0.016 with "xla", whose ``nn.Conv`` also
  rounds the convolutions' outputs to bfloat16), mean ≈ 0.002 nats, max |Δlogdet| ≈
  0.006 (bfloat16 keeps 8 significand bits, a relative error ≈ 2⁻⁹ per rounding; here
  ≤ 1.1·10⁻³ of the NLL). Tolerances with a margin of 2.5–4×: max 0.04 and mean 0.008
  nats per patch, max 0.025 for the log-det. The error must also be non-zero (bfloat16
  really ran)."""
  params = _trained_params()
  x = jnp.asarray(FEATS)
  out = {}
  for precision in ("float32", "bfloat16"):
    program = train.make_flow_program(_cfg(precision, conv_impl), FEATS.shape)
    z, logdet = jax.jit(program.apply)(params, x)
    out[precision] = (np.asarray(losses.patch_nll(z, logdet)), np.asarray(logdet))
  d_nll = np.abs(out["bfloat16"][0] - out["float32"][0])
  d_ld = np.abs(out["bfloat16"][1] - out["float32"][1])
  assert 0 < d_nll.max() < 0.04 and d_nll.mean() < 0.008, (d_nll.max(), d_nll.mean())
  assert d_ld.max() < 0.025, d_ld.max()


def test_scoring_uses_the_rows_precision():
  """``evaluation.patch_scores`` on a program's model scores in the program's precision:
  it equals that program's own NLL, and bfloat16 scores differ from float32 ones."""
  params = _trained_params(steps=10)
  x = FEATS[:4]
  scores = {}
  for precision in ("float32", "bfloat16"):
    program = train.make_flow_program(_cfg(precision), FEATS.shape)
    scores[precision] = evaluation.patch_scores(program.model, params, x, "nll",
                                                conv_impl=program.conv_impl)
    own = np.asarray(losses.patch_nll(*jax.jit(program.apply)(params, jnp.asarray(x))))
    np.testing.assert_allclose(scores[precision].reshape(own.shape), own, rtol=1e-6, atol=1e-5)
  assert not np.array_equal(scores["float32"], scores["bfloat16"])


@pytest.mark.parametrize("conv_impl", ["matmul", "xla"])
def test_float32_is_the_program_without_a_precision_bit_for_bit(conv_impl):
  """precision "float32" (the default) compiles the same program as a config without the
  field and trains to the same bits; its program holds no bfloat16 at all."""
  feats = jnp.asarray(FEATS)
  runs, texts = [], []
  for precision in (None, "float32"):
    program = train.make_flow_program(_cfg(precision, conv_impl), FEATS.shape)
    run = jax.jit(lambda s, p=program: p.run(s, KEY, feats, 3))
    state = program.init(HP, KEY)
    texts.append(run.lower(state).as_text())
    runs.append(run(state))
  assert texts[0] == texts[1] and "bf16" not in texts[1]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_precision_is_refused_naming_the_field():
  with pytest.raises(ValueError, match=r"config\.train\.precision must be one of"):
    train.make_flow_program(_cfg("float16"), FEATS.shape)
