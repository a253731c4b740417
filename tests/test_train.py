import contextlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailjax import flow_train, flows, io, toy, train


def _cfg(num_steps=40, log_every=10, **loss):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.flow = {"num_steps": 2, "kernel_mode": "1x1", "hidden_ratio": 2.0, "global_affine": True}
  c.loss = {"tail_weight": loss.get("tail_weight", 0.5), "top_k_ratio": loss.get("top_k_ratio", 0.25)}
  c.optim = {"name": "adam", "learning_rate": 1e-2}
  c.train = {"num_steps": num_steps, "batch_size": 8, "log_every": log_every, "eval_every": log_every,
             "patience": None}
  return c


FEATS = toy.two_moons_maps(64, 2, 2, 4, seed=0)
VAL = toy.two_moons_maps(32, 2, 2, 4, seed=1)


@contextlib.contextmanager
def _wrapped_batches(wrapper):
  """Runs with ``fit``'s ``get_batch`` wrapped (to crash or poison a chosen step)."""
  real_fit = train.fit
  train.fit = lambda **kw: real_fit(**{**kw, "get_batch": wrapper(kw["get_batch"])})
  try:
    yield
  finally:
    train.fit = real_fit


def _params_equal_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_flow_learns_toy_density(tmp_path):
  cfg = _cfg(num_steps=300, log_every=100, tail_weight=0.0)
  cfg.flow.num_steps = 4
  cfg.flow.hidden_ratio = 8.0
  cfg.optim.learning_rate = 3e-3
  model, res = flow_train.train_flow_on_features(cfg, tmp_path / "run", FEATS, VAL, progress=False)
  init = model.init(jax.random.key(0), jnp.asarray(FEATS[:1]))
  nll = lambda p: float(jnp.mean(model.apply(p, jnp.asarray(VAL), method="nll")))
  before, after = nll(init), nll(res.state.params)
  assert after < before - 1.0, (before, after)  # nats per patch, C = 4
  logged = io.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in logged if r["split"] == "train"] == [100, 200, 300]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 3


def test_resume_is_bit_identical(tmp_path):
  cfg = _cfg(num_steps=40, log_every=10)
  _, full = flow_train.train_flow_on_features(cfg, tmp_path / "full", FEATS, progress=False)

  # Interrupt at step 25 (after the checkpoint at 20), then resume from the workdir.
  def crash_at_25(get):
    def f(step):
      if step == 25:
        raise KeyboardInterrupt("simulated kill")
      return get(step)
    return f

  with _wrapped_batches(crash_at_25), pytest.raises(KeyboardInterrupt):
    flow_train.train_flow_on_features(cfg, tmp_path / "resumed", FEATS, progress=False)
  _, resumed = flow_train.train_flow_on_features(cfg, tmp_path / "resumed", FEATS, progress=False)
  assert resumed.resumed_from == 20
  assert int(resumed.state.step) == 40
  assert _params_equal_bitwise(full.state.params, resumed.state.params)
  assert _params_equal_bitwise(full.state.opt_state, resumed.state.opt_state)
  steps = [r["step"] for r in io.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == [10, 20, 30, 40]  # the log holds each step once


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = _cfg(num_steps=40, log_every=10)
  poison_17 = lambda get: (lambda step: get(step) * (jnp.nan if step == 17 else 1.0))
  with _wrapped_batches(poison_17), pytest.raises(train.NonFiniteLossError, match=r"step 17\b") as err:
    flow_train.train_flow_on_features(cfg, tmp_path / "run", FEATS, progress=False)
  assert "last good checkpoint is step 10" in str(err.value)
  model = flows.build_flow({**cfg.flow, "channels": 4})
  init_fn = lambda k: train.create_state(model.apply, model.init(k, jnp.asarray(FEATS[:1])),
                                         train.make_optimizer(cfg.optim),
                                         {"tail_weight": 0.0, "top_k_ratio": 0.1})
  state = train.restore_checkpoint(tmp_path / "run", init_fn, jax.random.key(0))
  assert int(state.step) == 10
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_early_stopping_restores_best(tmp_path):
  # A scripted monitored metric: best at the 2nd evaluation, then worse; patience 2.
  values = iter([5.0, 1.0, 3.0, 4.0, 0.5, 0.1])
  tx = train.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.0})

  def init_fn(key):
    return train.create_state(None, {"w": jnp.zeros(())}, tx)

  step = jax.jit(train.make_train_step(lambda p, b, h, k: ((p["w"] - b) ** 2, {})))
  res = train.fit(workdir=tmp_path, init_fn=init_fn, train_step=step, get_batch=lambda s: 10.0,
                  key=jax.random.key(0), num_steps=100, log_every=1, eval_fn=lambda st: {"v": next(values)},
                  eval_every=1, monitor="v", monitor_mode="min", patience=2, progress=False)
  assert res.stopped_early and res.best_step == 2
  assert int(res.state.step) == 2  # the best state, not the last (step 4)
  np.testing.assert_allclose(res.state.params["w"], 10 - 10 * 0.8 ** 2, rtol=1e-6)


def test_early_stopping_is_pure_and_vmappable():
  vals_SxT = jnp.array([[3.0, 2.0, 2.5, 2.6, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])

  def run(vals, patience):
    def body(es, tv):
      t, v = tv
      es, _ = train.early_stopping_update(es, v, t, patience=patience, mode="min")
      return es, es.stop
    return jax.lax.scan(body, train.early_stopping_init(), (jnp.arange(5), vals))

  es, stops = jax.jit(jax.vmap(run, (0, None)))(vals_SxT, 2)
  np.testing.assert_array_equal(es.best_step, [1, 0])
  np.testing.assert_array_equal(stops, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
  es_max = train.early_stopping_init()
  for t, v in enumerate([1.0, 2.0, 3.0, 2.0, 5.0]):
    es_max, _ = train.early_stopping_update(es_max, v, t, patience=10, mode="max")
  assert int(es_max.best_step) == 4 and float(es_max.best) == -5.0
  with pytest.raises(ValueError, match="mode"):
    train.early_stopping_update(train.early_stopping_init(), 1.0, 0, patience=1, mode="up")


def test_vmapped_train_step_rows_equal_single_runs():
  model = flows.PatchFlow(channels=4, num_steps=2, global_affine=True)
  tx = train.make_optimizer({"learning_rate": 1e-2})
  x = jnp.asarray(FEATS[:8])
  params = model.init(jax.random.key(0), x)
  step = train.make_train_step(flow_train.make_flow_loss(model))
  lams, rs, lrs = jnp.array([0.0, 0.7, 1.0]), jnp.array([0.25, 0.5, 0.25]), jnp.array([1e-2, 1e-3, 3e-2])

  def init(lam, r, lr):
    st = train.create_state(model.apply, params, tx, {"tail_weight": lam, "top_k_ratio": r})
    return train.set_learning_rate(st, lr)

  def run(st):
    for i in range(3):
      st, m = step(st, x, jax.random.key(1))
    return st, m

  stacked, m_H = jax.jit(jax.vmap(lambda *a: run(init(*a))))(lams, rs, lrs)
  for i in range(3):
    single, m = jax.jit(lambda: run(init(lams[i], rs[i], lrs[i])))()
    row = jax.tree.map(lambda a: a[i], stacked.params)
    for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(single.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_H["loss"][i], m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_H["learning_rate"][i], lrs[i], rtol=1e-6)


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="optim.name"):
    train.make_optimizer({"name": "lion"})
  with pytest.raises(ValueError, match="optim.learning_rate"):
    train.make_optimizer({"learning_rate": 0.0})


def test_config_validation_names_field(tmp_path):
  with pytest.raises(ValueError, match="config.loss.tail_weight"):
    flow_train.train_flow_on_features(_cfg(tail_weight=1.5), tmp_path, FEATS, progress=False)
  with pytest.raises(ValueError, match="config.loss.top_k_ratio"):
    flow_train.train_flow_on_features(_cfg(top_k_ratio=0.0), tmp_path, FEATS, progress=False)


def test_stacked_rows_equal_single_runs(tmp_path):
  cfg = _cfg(num_steps=12, log_every=6)
  hp = {"tail_weight": [0.0, 0.7, 1.0], "top_k_ratio": [0.25, 0.25, 0.5],
        "learning_rate": [1e-2, 1e-2, 3e-3]}
  seeds = [0, 0, 5]
  _, stacked = flow_train.train_flow_rows(cfg, tmp_path / "rows", FEATS, hp, seeds, progress=False)
  _, looped = flow_train.train_flow_rows(cfg, tmp_path / "loop", FEATS, hp, seeds, progress=False,
                                         mode="loop")
  for i in (0, 2):
    c = _cfg(num_steps=12, log_every=6, tail_weight=hp["tail_weight"][i], top_k_ratio=hp["top_k_ratio"][i])
    c.optim.learning_rate = hp["learning_rate"][i]
    c.seed = seeds[i]
    _, single = flow_train.train_flow_on_features(c, tmp_path / f"single{i}", FEATS, progress=False)
    for rows in (stacked, looped):
      row = jax.tree.map(lambda a: a[i], rows.params)
      for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(single.state.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  # rows 0 and 1 share a seed: same initial weights and batches, different λ → different results
  p0 = jax.tree.leaves(jax.tree.map(lambda a: a[0], stacked.params))
  p1 = jax.tree.leaves(jax.tree.map(lambda a: a[1], stacked.params))
  assert any(not np.allclose(a, b) for a, b in zip(p0, p1))
  with pytest.raises(ValueError, match="sweep.tail_weight"):
    flow_train.train_flow_rows(cfg, tmp_path / "bad", FEATS, {**hp, "tail_weight": [0, 2, 0]}, seeds,
                               progress=False)
