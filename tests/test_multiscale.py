"""Multi-scale FastFlow: one flow per scale, the summed tail-aware loss, averaged maps,
a multi-scale row through the engine, and study A on two ResNet-18 scales."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailjax.configs import fastflow_mvtec_resnet18
from tailjax import anomaly, engine, evaluation, flows, losses, runrecord, sharding
from tailjax import train as train_lib
from tailjax.backbones import resnet as rn
from tailjax.data import pipeline, textures
from tailjax.studies import study_a
from tailjax.studies import study_a_record

from test_torch_pickle import tensor, write_zip_checkpoint

RNG = np.random.default_rng(0)
FEATS = (RNG.normal(size=(12, 8, 8, 6)).astype(np.float32),      # scale 0: 8×8×6
         RNG.normal(size=(12, 4, 4, 10)).astype(np.float32))     # scale 1: 4×4×10
ONE_DEV = sharding.make_mesh(devices=jax.devices()[:1])


def _cfg(num_steps=3):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 2, "kernel_mode": "alternate", "hidden_ratio": 1.0,
            "layer_norm": "image"}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 10.0}
  c.train = {"num_steps": num_steps, "batch_size": 4, "segment_steps": 1, "rows": "auto",
             "conv_impl": "auto", "batch_devices": 1}
  return c


def _perturbed(params, seed=1, scale=0.3):
  """Non-identity weights: every leaf plus noise (a fresh flow is the identity)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def _scale_params(params, s):
  return {"params": params["params"][f"scale_{s}"]}


def test_multiscale_maps_equal_the_per_scale_average():
  model = flows.build_multiscale_flow(_cfg().flow, (6, 10))
  params = _perturbed(model.init(jax.random.key(0), tuple(f[:1] for f in FEATS)))
  test = tuple(f[:5] for f in FEATS)
  for score in ("nll", "fastflow"):
    got = evaluation.patch_scores(model, params, test, score, chunk=3)   # padded last chunk
    assert isinstance(got, tuple) and [g.shape for g in got] == [(5, 8, 8), (5, 4, 4)]
    by_hand = [evaluation.patch_scores(model.flow_of_scale(s), _scale_params(params, s), test[s],
                                       score, chunk=3) for s in range(2)]
    for g, h in zip(got, by_hand):
      np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
    e = {"size": 16, "smoothing_sigma": 1.0, "image_score": "max", "image_topk": 1,
         "fpr_limit": 0.3}
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[3:, 4:8, 4:8] = 1
    labels = np.array([0, 0, 0, 1, 1])
    _, maps = evaluation.evaluate_scores(e, got, masks, labels)
    mean = (np.asarray(anomaly.upsample_maps(by_hand[0], 16))
            + np.asarray(anomaly.upsample_maps(by_hand[1], 16))) / 2
    np.testing.assert_allclose(maps, anomaly.smooth_maps(mean, 1.0), rtol=1e-5, atol=1e-5)


def test_multiscale_row_trains_through_the_engine_on_the_summed_loss(tmp_path):
  cfg = _cfg()
  rows = engine.Rows.from_dicts([
      {"tail_weight": 0.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
      {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 1}])
  seen = {}

  def evaluate(step, params_R, program):
    seen[step] = sorted(params_R["params"])
    return {"ok": True}

  with runrecord.open_run(tmp_path / "run", cfg, kind="test") as run:
    res = engine.run_rows(cfg, run, "cat", FEATS, rows, eval_steps=(0, 3), evaluate=evaluate,
                          mesh=ONE_DEV, progress=False)
  assert res.finished and res.program.multiscale
  assert seen == {0: ["scale_0", "scale_1"], 3: ["scale_0", "scale_1"]}
  saved = json.loads((tmp_path / "run" / "cat" / "rows.json").read_text())
  assert saved["feats_shape"] == [[12, 8, 8, 6], [12, 4, 4, 10]]
  program = res.program
  keys = train_lib.row_keys(rows.seeds_R)
  # Step 1's logged loss is the initial state's loss on batch 0: the sum over scales of each
  # scale's tail-aware loss, every scale indexed with the same images.
  first = json.loads((tmp_path / "run" / "cat" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["step"] == 1
  loss_fn = train_lib.make_flow_loss(program.model)
  for i in range(rows.num_rows):
    h = rows.row(i)
    state = program.init(h, keys[i])
    batch = train_lib.sample_batch(FEATS, 4, keys[i], 0)
    idx = np.asarray(jax.random.randint(
        jax.random.fold_in(jax.random.fold_in(keys[i], 1), 0), (4,), 0, 12))
    for s in range(2):
      np.testing.assert_array_equal(batch[s], FEATS[s][idx])
    with train_lib.lowering(program.conv_impl):
      loss, _ = loss_fn(state.params, batch, state.hparams, None)
      per_scale = [losses.tail_aware_loss(
          flows.flat_nll(program.model.flow_of_scale(s), _scale_params(state.params, s),
                         batch[s]), h["tail_weight"], h["top_k_ratio"]) for s in range(2)]
    np.testing.assert_allclose(float(loss), float(sum(per_scale)), rtol=1e-6)
    np.testing.assert_allclose(first["loss"][i], float(loss), rtol=1e-5)
    # on fixed (trained) weights too, where the scales' NLLs are no longer the identity's
    p = jax.tree.map(lambda a: jnp.asarray(a[i]), res.params_R)
    with train_lib.lowering(program.conv_impl):
      loss, aux = loss_fn(p, batch, state.hparams, None)
      nll = [flows.flat_nll(program.model.flow_of_scale(s), _scale_params(p, s), batch[s])
             for s in range(2)]
    want = sum(losses.tail_aware_loss(n, h["tail_weight"], h["top_k_ratio"]) for n in nll)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(aux["mean_nll"]), float(sum(n.mean() for n in nll)),
                               rtol=1e-6)
  # The restored checkpoint has the same multi-scale layout.
  _, params_R, step = engine.load_rows(cfg, tmp_path / "run", "cat",
                                       train_lib.feats_shape_of(FEATS), rows)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, params_R, res.params_R)


def test_single_scale_keeps_its_digest_and_program():
  import hashlib
  f = FEATS[0]
  assert engine.feats_digest(f) == hashlib.sha256(f.tobytes()).hexdigest()[:16]
  program = train_lib.make_flow_program(_cfg(), f.shape)
  assert not program.multiscale and isinstance(program.model, flows.FastFlow2d)
  assert program.feats_shape == (12, 8, 8, 6)


def test_scale_layers_validation():
  cfg = fastflow_mvtec_resnet18.get_config("smoke,multiscale")
  assert pipeline.scale_layers(cfg) == (4, 8, 16)
  assert pipeline.scale_layers(fastflow_mvtec_resnet18.get_config("smoke")) == ()
  cfg.backbone.layers = (4, 16)
  with pytest.raises(ValueError, match=r"config.backbone.layer=8 must be one of"):
    pipeline.scale_layers(cfg)
  cfg.backbone.layers = (8,)
  assert pipeline.scale_layers(cfg) == ()          # just the reference scale: single scale


def test_study_a_records_on_two_resnet_scales(tmp_path):
  weights = write_zip_checkpoint(
      tmp_path / "resnet18-seed0.pth",
      {k: tensor(v) for k, v in rn.random_torchvision_state_dict("resnet18", seed=0).items()})
  root = tmp_path / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=48, n_train=5, n_test=4,
                                   categories=("gravel",))
  cfg = fastflow_mvtec_resnet18.get_config("smoke,multiscale")
  cfg.backbone.layers = (4, 8)
  cfg.backbone.weights = str(weights)
  cfg.backbone.resolution = 32
  cfg.backbone.batch_size = 8
  cfg.data.root = str(root)
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.eval.size = 32
  cfg.num_seeds = 1
  cfg.train.num_steps = 3
  cfg.eval.budgets = (0, 3)
  cfg.flow.num_steps = 2
  cfg.train.batch_size = 4
  cfg.report.n_examples = 0
  out = study_a.main(cfg, tmp_path / "run", progress=False)
  res = out["results"]["gravel"]
  assert res["grid"] == [4, 4]                      # the reference scale (stride 8)
  for r in res["rows"]:
    assert all(np.isfinite(v) for v in r["metrics"].values())
  assert "strides 4, 8" in (tmp_path / "run" / "report.md").read_text()
  tc = study_a_record.load_trained(tmp_path / "run")["gravel"]
  assert tc.data.multiscale and tc.data.layers == (4, 8)
  assert [f.shape[1:] for f in tc.data.flow_feats("train")] == [(8, 8, 64), (4, 4, 128)]
  assert tc.data.train_feats.shape[1:] == (4, 4, 128)
  assert isinstance(tc.model, flows.FastFlow2d) and tc.model.channels == 128
  np.testing.assert_array_equal(
      jax.tree.leaves(tc.params_R)[0],
      jax.tree.leaves({"params": tc.full_params_R["params"]["scale_1"]})[0])
  assert isinstance(tc.full_program.model, flows.MultiScaleFlow)
