"""The training core: pure steps, optimiser factory, early stopping, the pure flow program."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailjax import flows, toy, train

FEATS = toy.two_moons_maps(64, 2, 2, 4, seed=0)
SWEEP_FEATS = np.random.default_rng(0).normal(size=(16, 4, 4, 6)).astype(np.float32)


def _cfg(num_steps=6):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 2, "kernel_mode": "alternate", "hidden_ratio": 1.0, "layer_norm": "image"}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 10.0}
  c.train = {"num_steps": num_steps, "batch_size": 4}
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _close(a, b, atol=2e-6):
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=atol)
                                    for x, y in zip(la, lb))


def test_vmapped_sweep_rows_equal_single_runs():
  """Row (h, s) of jit(vmap(vmap(train))) is the single run with λ_h, lr_h and seed s."""
  cfg = _cfg()
  hp_H = {"tail_weight": jnp.asarray([0.0, 0.7]), "top_k_ratio": jnp.asarray([0.25, 0.125]),
          "learning_rate": jnp.asarray([1e-2, 3e-3])}
  seeds = [0, 5]
  train_fn = train.make_train(cfg, SWEEP_FEATS.shape, conv_impl="xla")
  state_HxS, metrics_HxSxT = train.sweep_hxs(train_fn)(hp_H, train.row_keys(seeds),
                                                    jnp.asarray(SWEEP_FEATS))
  assert metrics_HxSxT["loss"].shape == (2, 2, cfg.train.num_steps)
  single = jax.jit(train_fn)
  for h in range(2):
    for s in range(2):
      hp = {k: v[h] for k, v in hp_H.items()}
      state, metrics = single(hp, train.row_keys([seeds[s]])[0], jnp.asarray(SWEEP_FEATS))
      row = jax.tree.map(lambda a: a[h, s], state_HxS.params)
      assert _close(row, state.params), (h, s)
      np.testing.assert_allclose(metrics_HxSxT["loss"][h, s], metrics["loss"], rtol=1e-5)
  # Different hyperparameters (same seed) and different seeds train differently.
  assert not _close(jax.tree.map(lambda a: a[0, 0], state_HxS.params),
                    jax.tree.map(lambda a: a[1, 0], state_HxS.params))
  assert not _close(jax.tree.map(lambda a: a[0, 0], state_HxS.params),
                    jax.tree.map(lambda a: a[0, 1], state_HxS.params))


def test_conv_as_matmul_equals_lax_conv():
  model = flows.build_flow({"channels": 6, "num_steps": 2, "kernel_mode": "alternate"})
  x = jnp.asarray(SWEEP_FEATS[:3])
  params = model.init(jax.random.key(1), x)
  # Non-zero last layers, so the 3×3 and 1×1 convolutions all matter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(treedef, [l + 0.3 * jax.random.normal(k, l.shape)
                                        for l, k in zip(leaves, keys)])
  z_ref, ld_ref = jax.jit(model.apply)(params, x)

  @jax.jit
  def lowered(p, x):
    with nn.intercept_methods(train.conv_as_matmul):
      return model.apply(p, x)

  z, ld = lowered(params, x)
  assert np.abs(np.asarray(z_ref) - np.asarray(x)).max() > 0.1   # the flow is not the identity
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ld, ld_ref, rtol=1e-5, atol=1e-5)
  # A convolution it cannot express (stride 2) falls back to lax.conv.
  conv = nn.Conv(4, (3, 3), strides=2, padding="SAME")
  p = conv.init(jax.random.key(0), x)
  with nn.intercept_methods(train.conv_as_matmul):
    np.testing.assert_array_equal(conv.apply(p, x), nn.Conv(4, (3, 3), strides=2).apply(p, x))



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
  step = train.make_train_step(train.make_flow_loss(model))
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




def test_optimizer_refuses_fields_it_would_ignore():
  with pytest.raises(ValueError, match="optim.weight_decay is not used by optim.name='adam'"):
    train.make_optimizer({"name": "adam", "learning_rate": 1e-3, "weight_decay": 0.1})
  with pytest.raises(ValueError, match="optim.momentum"):
    train.make_optimizer({"name": "adamw", "learning_rate": 1e-3, "momentum": 0.9})
  train.make_optimizer({"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.1})


def test_segment_with_traced_length_is_one_program_and_run_is_segment():
  """One compiled segment program runs any n ≤ its buffer length, bit-identical however
  the steps are cut; ``run`` is that loop over all steps (a fixed trip count)."""
  program = train.make_flow_program(_cfg(), SWEEP_FEATS.shape, conv_impl="xla")
  h = {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2}
  key = train.row_keys([3])[0]
  feats = jnp.asarray(SWEEP_FEATS)
  seg = jax.jit(lambda st, n: program.segment(st, key, feats, n, 5))
  st, m = seg(program.init(h, key), 3)
  st, m2 = seg(st, 2)
  whole, m5 = seg(program.init(h, key), 5)
  assert int(st.step) == 5
  # Cut 3 + 2 or run 5 at once: the same program, bit-identical.
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(st.params), _leaves(whole.params)))
  np.testing.assert_array_equal(np.concatenate([m["loss"][:3], m2["loss"][:2]]), m5["loss"])
  assert np.all(np.isnan(np.asarray(m["loss"][3:])))
  # run: the same loop body with a trip count fixed at trace time (a scan, not a while
  # loop: another compiled program, so equal to float rounding), metrics [num_steps].
  ref, m_ref = jax.jit(lambda: program.run(program.init(h, key), key, feats, 5))()
  assert int(ref.step) == 5 and set(m_ref) == {"loss", "mean_nll"}
  assert m_ref["loss"].shape == (5,) and np.isfinite(np.asarray(m_ref["loss"])).all()
  assert _close(st.params, ref.params, atol=1e-5)
  np.testing.assert_allclose(m5["loss"], m_ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(m5["mean_nll"], m_ref["mean_nll"], rtol=1e-5)


# Three train steps of a small flow (C = 10, 4 alternating steps, image LayerNorm, λ = 0.7,
# r = 0.25, Adam 1e-2, batch 4, seed 3) as a straightforward implementation computes them
# (per-step minor-axis gathers for the channel permutations, commit a6a548a): the losses
# and each parameter leaf's squared norm afterwards. The optimised step (permutations
# folded into the weights, matmul convolutions) must do the same maths.
_REFERENCE_STEPS = {
    False: ([16.270395279, 16.080665588, 15.94999218],
            [0.001265654, 5.87554121, 0.004712183, 0.209327042, 0.001243871, 3.748811007, 0.004989278, 0.02470961, 0.0009485, 5.036163807, 0.004914781, 0.200970367, 0.001185758, 5.866299629, 0.004637584, 0.027806606]),
    True: ([16.270395279, 16.005580902, 15.81278801],
            [0.001273873, 5.798069477, 0.003852273, 0.197642237, 0.006858735, 0.001785527, 0.001184561, 3.738395214, 0.00430994, 0.023945825, 0.006873727, 0.001775525, 0.000954203, 4.984963417, 0.004340588, 0.192112565, 0.006902527, 0.001763768, 0.000806655, 5.848083019, 0.003767612, 0.024598576, 0.006907354, 0.00176035]),
}


@pytest.mark.parametrize("global_affine", [False, True])
@pytest.mark.parametrize("conv_impl", ["matmul", "xla"])
def test_train_steps_equal_the_reference_recording(global_affine, conv_impl):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 4, "kernel_mode": "alternate", "hidden_ratio": 1.0, "clamp": 2.0,
            "layer_norm": "image", "global_affine": global_affine}
  c.optim = {"name": "adam", "learning_rate": 1e-2}
  c.train = {"num_steps": 3, "batch_size": 4, "segment_steps": 3, "rows": "auto",
             "conv_impl": conv_impl, "batch_devices": 1}
  feats = jnp.asarray(np.random.default_rng(7).normal(size=(10, 6, 6, 10)).astype(np.float32))
  program = train.make_flow_program(c, feats.shape)
  key = train.row_keys([3])[0]
  state = program.init({"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2}, key)
  state, m = jax.jit(lambda s: program.run(s, key, feats, 3))(state)
  want_loss, want_sq = _REFERENCE_STEPS[global_affine]
  np.testing.assert_allclose(np.asarray(m["loss"]), want_loss, rtol=1e-5)
  got_sq = [float(jnp.sum(jnp.square(l))) for l in jax.tree.leaves(state.params)]
  np.testing.assert_allclose(got_sq, want_sq, rtol=1e-4)



def test_flow_loss_exact_definition_is_the_weights_form_bit_for_bit():
  """The training loss with (a, b) = (1, 0) — and with no definition given — has the
  value and gradients of the exact loss in its weights form,
  ``mean_b Σ_i tail_patch_weights(NLL)_bi NLL_bi`` of the flow's NLL, bit for bit, compiled."""
  from tailjax import losses
  model = flows.build_flow({"channels": 6, "num_steps": 2, "kernel_mode": "alternate",
                            "layer_norm": "image"})
  x = jnp.asarray(SWEEP_FEATS[:4])
  params = model.init(jax.random.key(0), x)
  loss_fn = train.make_flow_loss(model)

  def weights_form(p, h):
    nll_BxN = flows.flat_nll(model, p, x)
    w_BxN = losses.tail_patch_weights(nll_BxN, h["tail_weight"], h["top_k_ratio"])
    return jnp.mean(jnp.sum(w_BxN * nll_BxN, axis=-1))

  base = {"tail_weight": jnp.float32(0.7), "top_k_ratio": jnp.float32(0.125)}
  for h in (base, {**base, **{k: v[0] for k, v in train.tail_nll_hparams(["exact"]).items()}}):
    got, g_got = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, h, None)[0]))(params)
    want, g_want = jax.jit(jax.value_and_grad(lambda p: weights_form(p, h)))(params)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    for a, b in zip(_leaves(g_got), _leaves(g_want)):
      assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("definition", ["sq_norm", "even_share"])
def test_flow_loss_approximate_definitions_follow_the_losses_module(definition):
  """The training loss of a sq_norm / even_share row is ``tail_aware_loss_nll`` of the
  flow's own (NLL, logdet), and differs from the exact row's (selection and average)."""
  from tailjax import losses
  model = flows.build_flow({"channels": 6, "num_steps": 2, "kernel_mode": "alternate",
                            "layer_norm": "image"})
  x = jnp.asarray(SWEEP_FEATS[:4])
  params = model.init(jax.random.key(1), x)
  # Away from the identity initialisation (log-dets 0 everywhere, every definition equal).
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [l + 0.3 * rng.normal(size=l.shape).astype(np.float32)
                                     for l in leaves])
  h = {"tail_weight": jnp.float32(1.0), "top_k_ratio": jnp.float32(0.125),
       **{k: v[0] for k, v in train.tail_nll_hparams([definition]).items()}}
  got = float(train.make_flow_loss(model)(params, x, h, None)[0])
  z, logdet = model.apply(params, x)
  nll_BxN, logdet_BxN = losses.patch_nll(z, logdet).reshape(4, -1), logdet.reshape(4, -1)
  want = float(losses.tail_aware_loss_nll(nll_BxN, logdet_BxN, 1.0, 0.125,
                                          *losses.nll_definition_weights(definition)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  exact = float(losses.tail_aware_loss_nll(nll_BxN, logdet_BxN, 1.0, 0.125))
  assert abs(got - exact) > 1e-3


def test_rows_of_different_tail_nll_vmap_as_one_program():
  """One compiled program over rows with different per-patch NLL definitions: each row
  equals its single run, and the definitions train differently."""
  cfg = _cfg()
  names = ["exact", "even_share", "sq_norm"]
  hp_R = {"tail_weight": jnp.full(3, 0.7), "top_k_ratio": jnp.full(3, 0.125),
          "learning_rate": jnp.full(3, 1e-2),
          **{k: jnp.asarray(v) for k, v in train.tail_nll_hparams(names).items()}}
  train_fn = train.make_train(cfg, SWEEP_FEATS.shape, conv_impl="xla")
  keys = train.row_keys([0, 0, 0])
  state_R, _ = jax.jit(jax.vmap(train_fn, in_axes=(0, 0, None)))(hp_R, keys,
                                                                  jnp.asarray(SWEEP_FEATS))
  single = jax.jit(train_fn)
  for i in range(3):
    state, _ = single({k: v[i] for k, v in hp_R.items()}, keys[i], jnp.asarray(SWEEP_FEATS))
    assert _close(jax.tree.map(lambda a: a[i], state_R.params), state.params), names[i]
  row = lambda i: jax.tree.map(lambda a: a[i], state_R.params)
  assert not _close(row(0), row(1)) and not _close(row(1), row(2))


def test_profile_steps_writes_a_trace_and_changes_no_number(tmp_path):
  """``train.profile_steps = 2``: the engine writes a ``jax.profiler`` trace under
  ``<prefix>/profile/`` and the rows' parameters, losses and checkpoints are those of the
  run without it, bit for bit (the traced steps run on a copy of the state)."""
  import pathlib
  from tailjax import engine, runrecord, sharding
  rows = engine.Rows.from_dicts([
      {"tail_weight": 0.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
      {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 1}])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  out = {}
  for steps in (0, 2):
    cfg = _cfg(num_steps=6)
    cfg.train.update({"segment_steps": 3, "rows": "auto", "conv_impl": "auto",
                      "batch_devices": 1, "profile_steps": steps})
    with runrecord.open_run(tmp_path / f"p{steps}", cfg, kind="test") as run:
      out[steps] = engine.run_rows(cfg, run, "cat", SWEEP_FEATS, rows, mesh=mesh, progress=False)
  folder = pathlib.Path(tmp_path / "p2" / "cat" / engine.PROFILE_DIR)
  assert list(folder.rglob("*.xplane.pb")) and list(folder.rglob("*.trace.json.gz"))
  assert not (tmp_path / "p0" / "cat" / engine.PROFILE_DIR).exists()
  # The op summary beside the trace: the run's couplings in both directions, shares to 100 %.
  ops = json.loads((folder / "ops.json").read_text())
  regions = {r["region"] for r in ops["rows"]}
  assert {"coupling 0 fwd", "coupling 0 bwd"} <= regions, sorted(regions)
  assert sum(r["pct"] for r in ops["rows"]) == pytest.approx(100)
  assert (folder / "ops.md").read_text().startswith("# Ops of one train step")
  for a, b in zip(_leaves(out[0].params_R), _leaves(out[2].params_R)):
    np.testing.assert_array_equal(a, b)
  ckpts = [sorted(p.name for p in (tmp_path / f"p{s}" / "cat" / "checkpoints").iterdir()
                  if p.name.isdigit()) for s in (0, 2)]
  assert ckpts[0] == ckpts[1] == ["3", "6"]
  metrics = [(tmp_path / f"p{s}" / "cat" / "metrics.jsonl").read_text() for s in (0, 2)]
  assert metrics[0] == metrics[1]


def test_profile_steps_must_be_a_non_negative_integer(tmp_path):
  from tailjax import engine, runrecord
  cfg = _cfg(num_steps=2)
  cfg.train.profile_steps = -1
  rows = engine.Rows.from_dicts([{"tail_weight": 0.0, "top_k_ratio": 0.25,
                                  "learning_rate": 1e-2, "seed": 0}])
  with runrecord.open_run(tmp_path / "r", cfg, kind="test") as run:
    with pytest.raises(ValueError, match=r"config\.train\.profile_steps must be an integer"):
      engine.run_rows(cfg, run, "cat", SWEEP_FEATS, rows, progress=False)
