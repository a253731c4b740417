import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fastflow_textures

from tailjax import flow_train, flows, io, sharding, sweep, train
from tailjax.data import textures

REPO = Path(__file__).resolve().parents[1]
FEATS = np.random.default_rng(0).normal(size=(16, 4, 4, 6)).astype(np.float32)


def _cfg(num_steps=6, **grid):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.flow = {"num_steps": 2, "kernel_mode": "alternate", "hidden_ratio": 1.0, "layer_norm": "image"}
  c.loss = {"tail_weight": 0.5, "top_k_ratio": 0.25}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 10.0}
  c.train = {"num_steps": num_steps, "batch_size": 4, "log_every": 3}
  c.sweep = {"tail_weight": (0.0, 0.7), "top_k_ratio": (0.25,), "learning_rate": (1e-2,),
             "seeds": (0, 1), "segment_steps": 3, "rows": "auto", "conv_impl": "auto",
             "batch_devices": 1}
  c.sweep.update(grid)
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _close(a, b, atol=2e-6):
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=atol)
                                    for x, y in zip(la, lb))


def test_vmapped_sweep_rows_equal_single_runs_and_flow_train(tmp_path):
  """Row (h, s) of jit(vmap(vmap(train))) is the single run with λ_h, lr_h and seed s,
  and the checkpointed host-loop run of flow_train with that config."""
  cfg = _cfg()
  hp_H = {"tail_weight": jnp.asarray([0.0, 0.7]), "top_k_ratio": jnp.asarray([0.25, 0.125]),
          "learning_rate": jnp.asarray([1e-2, 3e-3])}
  seeds = [0, 5]
  train = sweep.make_train(cfg, FEATS.shape, conv_impl="xla")
  state_HxS, metrics_HxSxT = sweep.sweep_hxs(train)(hp_H, flow_train.row_keys(seeds),
                                                    jnp.asarray(FEATS))
  assert metrics_HxSxT["loss"].shape == (2, 2, cfg.train.num_steps)
  single = jax.jit(train)
  for h in range(2):
    for s in range(2):
      hp = {k: v[h] for k, v in hp_H.items()}
      state, metrics = single(hp, flow_train.row_keys([seeds[s]])[0], jnp.asarray(FEATS))
      row = jax.tree.map(lambda a: a[h, s], state_HxS.params)
      assert _close(row, state.params), (h, s)
      np.testing.assert_allclose(metrics_HxSxT["loss"][h, s], metrics["loss"], rtol=1e-5)
  # Different hyperparameters (same seed) and different seeds train differently.
  assert not _close(jax.tree.map(lambda a: a[0, 0], state_HxS.params),
                    jax.tree.map(lambda a: a[1, 0], state_HxS.params))
  assert not _close(jax.tree.map(lambda a: a[0, 0], state_HxS.params),
                    jax.tree.map(lambda a: a[0, 1], state_HxS.params))
  # ... and equals flow_train's checkpointed host loop (same init/batch/step keys).
  ref_cfg = _cfg()
  ref_cfg.seed = seeds[1]
  ref_cfg.loss.tail_weight, ref_cfg.loss.top_k_ratio = 0.7, 0.125
  ref_cfg.optim.learning_rate = 3e-3
  _, ref = flow_train.train_flow_on_features(ref_cfg, tmp_path / "ref", FEATS, progress=False)
  assert _close(jax.tree.map(lambda a: a[1, 1], state_HxS.params), ref.state.params)


def test_conv_as_matmul_equals_lax_conv():
  model = flows.build_flow({"channels": 6, "num_steps": 2, "kernel_mode": "alternate"})
  x = jnp.asarray(FEATS[:3])
  params = model.init(jax.random.key(1), x)
  # Non-zero last layers, so the 3×3 and 1×1 convolutions all matter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(treedef, [l + 0.3 * jax.random.normal(k, l.shape)
                                        for l, k in zip(leaves, keys)])
  z_ref, ld_ref = jax.jit(model.apply)(params, x)

  @jax.jit
  def lowered(p, x):
    with nn.intercept_methods(sweep.conv_as_matmul):
      return model.apply(p, x)

  z, ld = lowered(params, x)
  assert np.abs(np.asarray(z_ref) - np.asarray(x)).max() > 0.1   # the flow is not the identity
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ld, ld_ref, rtol=1e-5, atol=1e-5)
  # A convolution it cannot express (stride 2) falls back to lax.conv.
  conv = nn.Conv(4, (3, 3), strides=2, padding="SAME")
  p = conv.init(jax.random.key(0), x)
  with nn.intercept_methods(sweep.conv_as_matmul):
    np.testing.assert_array_equal(conv.apply(p, x), nn.Conv(4, (3, 3), strides=2).apply(p, x))


def test_interrupted_sweep_resumes_bit_identical(tmp_path):
  cfg = _cfg(num_steps=7)                      # segments of 3, 3, 1 steps
  cfg.flow.num_steps = 1                       # structure does not matter here; compile less
  grid = sweep.grid_from_config(cfg.sweep)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  full = sweep.run_sweep(cfg, tmp_path / "full", FEATS, grid, mesh=mesh, progress=False)
  part = sweep.run_sweep(cfg, tmp_path / "cut", FEATS, grid, mesh=mesh, progress=False,
                         max_segments=1)
  assert (part.step, part.finished) == (3, False)
  assert not _close(part.params_R, full.params_R, atol=0)
  done = sweep.run_sweep(cfg, tmp_path / "cut", FEATS, grid, mesh=mesh, progress=False)
  assert (done.resumed_from, done.step, done.finished) == (3, 7, True)
  for a, b in zip(_leaves(done.params_R), _leaves(full.params_R)):
    np.testing.assert_array_equal(a, b)
  logged = io.read_jsonl(tmp_path / "cut" / "metrics.jsonl")
  assert [r["step"] for r in logged] == [3, 6, 7]
  assert logged == io.read_jsonl(tmp_path / "full" / "metrics.jsonl")
  saved = json.loads((tmp_path / "cut" / "grid.json").read_text())
  assert saved["rows"] == grid.rows() and saved["num_rows"] == 4
  # A different grid in the same workdir is refused, naming what differs.
  other = sweep.grid_from_config(_cfg(tail_weight=(0.0, 0.5)).sweep)
  with pytest.raises(ValueError, match="different sweep"):
    sweep.run_sweep(cfg, tmp_path / "cut", FEATS, other, mesh=mesh, progress=False)


def test_non_finite_loss_names_the_row_and_keeps_the_last_checkpoint(tmp_path):
  # lr = 1e30 blows the parameters up after the first update: step 0 is finite, step 1 not.
  cfg = _cfg(num_steps=4, tail_weight=(0.5,), learning_rate=(1e-2, 1e30), seeds=(0,),
             segment_steps=1)
  cfg.flow.num_steps = 1
  cfg.optim.grad_clip_norm = None
  grid = sweep.grid_from_config(cfg.sweep)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(train.NonFiniteLossError,
                     match=r"sweep row 1 .*'learning_rate': 1e\+30.* at step 1; .*checkpoint is step 1"):
    sweep.run_sweep(cfg, tmp_path / "run", FEATS, grid, mesh=mesh, progress=False)
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("field,value", [
    ("tail_weight", (0.0, 1.5)), ("tail_weight", (-0.1,)), ("top_k_ratio", (0.0,)),
    ("top_k_ratio", (1.2,)), ("learning_rate", (0.0,)), ("learning_rate", (-1e-3, 1e-3)),
    ("seeds", ()), ("seeds", (0, 0)), ("seeds", (1.5,))])
def test_grid_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=rf"config\.sweep\.{field}"):
    sweep.grid_from_config(_cfg(**{field: value}).sweep)


def test_grid_rows_are_point_major():
  grid = sweep.grid_from_config(_cfg(tail_weight=(0.0, 1.0), top_k_ratio=(0.02, 0.5),
                                     seeds=(3, 4, 5)).sweep)
  rows = grid.rows()
  assert grid.num_rows == len(rows) == 12
  assert [r["seed"] for r in rows[:3]] == [3, 4, 5]
  assert [(r["tail_weight"], r["top_k_ratio"]) for r in rows[::3]] == [
      (0.0, 0.02), (0.0, 0.5), (1.0, 0.02), (1.0, 0.5)]
  np.testing.assert_array_equal(grid.hparams_R()["tail_weight"], [0.0] * 6 + [1.0] * 6)


def test_sweep_script_smoke(tmp_path):
  root = tmp_path / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=64, n_train=8, n_test=8,
                                   categories=("gravel",))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "scripts/sweep.py", "--config=configs/sweep_tail_weight.py:smoke",
         "--config.data.kind=mvtec", f"--config.data.root={root}",
         "--config.data.categories=gravel", f"--config.data.cache_dir={tmp_path / 'cache'}",
         "--config.eval.size=64", "--config.train.num_steps=4", "--config.sweep.segment_steps=2",
         "--config.sweep.top_k_ratio=(0.02,0.5)", "--config.flow.num_steps=1",
         f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = tmp_path / "run"
  rows = json.loads((run / "results.json").read_text())["rows"]
  assert len(rows) == 2 * 2 * 2   # λ ∈ {0, 0.7} × r ∈ {0.02, 0.5} × seeds {0, 1}
  for r in rows:
    assert set(r) == {"category", "tail_weight", "top_k_ratio", "learning_rate", "seed", "metrics"}
    assert r["category"] == "gravel" and 0.0 <= r["metrics"]["pixel_ap"] <= 1.0
  assert [(r["tail_weight"], r["top_k_ratio"], r["seed"]) for r in rows[:3]] == [
      (0.0, 0.02, 0), (0.0, 0.02, 1), (0.0, 0.5, 0)]
  assert io.read_jsonl(run / "results.jsonl") == rows
  md = (run / "results.md").read_text()
  lr = fastflow_textures.get_config("smoke").optim.learning_rate   # the sweep's default lr
  assert "| λ | r | k | lr |" in md and f"| 0.7 | 0.5 | 98 | {lr:g} |" in md
  assert f"| 0.7 | 0.5 | 98 | {lr:g} |" in proc.stdout
  assert json.loads((run / "gravel" / "grid.json").read_text())["num_rows"] == 8
  assert (run / "gravel" / "checkpoints").is_dir()


def test_results_markdown_means_over_seeds_and_categories():
  cfg = _cfg(tail_weight=(0.0, 1.0), seeds=(0, 1))
  cfg.data = {"kind": "mvtec"}
  grid = sweep.grid_from_config(cfg.sweep)
  ap = {("a", 0.0): (0.10, 0.20), ("a", 1.0): (0.30, 0.50), ("b", 0.0): (0.30, 0.40),
        ("b", 1.0): (0.10, 0.10)}
  rows = [{"category": c, **r, "metrics": {"image_auroc": 0.5, "pixel_auroc": 0.5, "aupro": 0.5,
                                           "pixel_ap": ap[(c, r["tail_weight"])][r["seed"]]}}
          for c in ("a", "b") for r in grid.rows()]
  md = sweep.results_markdown(cfg, rows, grid, n_patches=16)
  a, b, mean = (md.split(f"## {s}")[1].split("##")[0] for s in ("a", "b", "mean over categories"))
  assert "| 1 | 0.25 | 4 | 0.01 | 50.00 ± 0.00 | 50.00 ± 0.00 | **40.00 ± 14.14** |" in a
  assert "| 0 | 0.25 | 4 | 0.01 | 50.00 ± 0.00 | 50.00 ± 0.00 | **35.00 ± 7.07** |" in b
  # mean over categories: per seed first (λ = 0: 0.2, 0.3; λ = 1: 0.2, 0.3), then over seeds
  assert mean.count("25.00 ± 7.07") == 2 and mean.count("**") == 2
