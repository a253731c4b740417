"""Study B: MIL models, dispersion baseline, in-graph AUC, training and the diagnosis."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tailjax import losses
from tailjax import mil
from tailjax import mil_train

ROOT = Path(__file__).resolve().parents[1]
FAST = {"xla_backend_optimization_level": 0}  # these tests are compile-bound


def _bags(b=4, n=7, d=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  sizes = rng.integers(2, n + 1, b)
  sizes[0] = n
  mask = (np.arange(n)[None, :] < sizes[:, None]).astype(np.float32)
  return x, mask


MODEL_VARIANTS = [(k, g, ln) for k in ("attention", "relation") for g in (False, True) for ln in (False, True)]


@pytest.mark.parametrize("kind,gated,layer_norm", MODEL_VARIANTS)
def test_models_invariant_to_instance_order_and_padding(kind, gated, layer_norm):
  x, mask = _bags()
  model = mil.make_model(kind, input_dim=16, hidden_dim=8, attention_dim=4, gated=gated, layer_norm=layer_norm)
  params = model.init(jax.random.PRNGKey(0), x, mask)
  apply = lambda xx, mm: model.apply(params, xx, mm)  # eager: 8 variants, no compiles to wait for
  logits, alpha = apply(x, mask)

  perm = np.random.default_rng(1).permutation(x.shape[1])
  logits_p, alpha_p = apply(x[:, perm], mask[:, perm])
  np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alpha_p, alpha[:, perm], rtol=1e-5, atol=1e-6)

  # Extra padding holding garbage must change nothing.
  junk = 1e3 * np.random.default_rng(2).normal(size=(x.shape[0], 5, x.shape[2])).astype(np.float32)
  x_pad = np.concatenate([np.where(mask[:, :, None] > 0, x, 77.0), junk], axis=1)
  mask_pad = np.concatenate([mask, np.zeros((x.shape[0], 5), np.float32)], axis=1)
  logits_pad, alpha_pad = apply(x_pad, mask_pad)
  np.testing.assert_allclose(logits_pad, logits, rtol=1e-5, atol=1e-5)
  assert np.all(alpha_pad[mask_pad == 0] == 0)
  np.testing.assert_allclose(alpha_pad.sum(1), 1.0, rtol=1e-6)
  assert not np.allclose(logits, logits[0])  # the test would be vacuous for a constant model


def test_relation_features_compare_each_instance_with_its_bag_mean():
  # [x, x − m, |x − m|] with m the masked bag mean.
  model = mil.RelationMIL(input_dim=4, hidden_dim=8)
  x = np.eye(4, dtype=np.float32)[None, :3]
  feats = model.instance_features(jnp.asarray(x), jnp.ones((1, 3)))
  mean = x.mean(1, keepdims=True)
  np.testing.assert_allclose(feats, np.concatenate([x, x - mean, np.abs(x - mean)], -1), rtol=1e-6)


def test_model_rejects_wrong_input_dim():
  x, mask = _bags(d=16)
  with pytest.raises(ValueError, match="input_dim=256"):
    mil.AttentionMIL().init(jax.random.PRNGKey(0), x, mask)


def study_loop_dispersion(instance_array):
  """The study's O(n²) loop, verbatim apart from formatting."""
  X = instance_array / (np.linalg.norm(instance_array, axis=1, keepdims=True) + 1e-9)
  s = 0.0
  cnt = 0
  for i in range(len(X)):
    for j in range(i + 1, len(X)):
      s += 1 - (X[i] * X[j]).sum()
      cnt += 1
  return s / max(cnt, 1)


def test_bag_dispersion_closed_form_equals_pairwise_definition():
  x, mask = _bags(b=5, n=9, d=12)
  got = np.asarray(mil.bag_dispersion(x, mask))
  for b in range(x.shape[0]):
    v = x[b, mask[b] > 0].astype(np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    iu = np.triu_indices(len(u), 1)
    pairwise = np.mean(1 - (u @ u.T)[iu])
    np.testing.assert_allclose(got[b], pairwise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[b], study_loop_dispersion(v), rtol=1e-5, atol=1e-6)
  # No mask = all valid; invariant to instance scale.
  np.testing.assert_allclose(mil.bag_dispersion(x), mil.bag_dispersion(3.0 * x), rtol=1e-5)
  # Identical instances have zero dispersion.
  same = np.repeat(x[:1, :1], 4, axis=1)
  np.testing.assert_allclose(mil.bag_dispersion(same), [0.0], atol=1e-5)


def test_bag_dispersion_rejects_bags_below_two_instances():
  x, mask = _bags(b=4, n=6)
  mask[2] = 0
  mask[2, 3] = 1
  with pytest.raises(ValueError, match=r"bag 2 has 1 valid instance"):
    mil.bag_dispersion(x, mask)
  with pytest.raises(ValueError, match=r"bag 0 has 1 valid"):
    mil.bag_dispersion(x[:, :1])
  x[1, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"bag 1 has NaN"):
    mil.bag_dispersion(x, np.ones(mask.shape, np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_auc_equals_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 101)
  scores = rng.integers(0, 6, 101).astype(np.float32)  # many ties
  got = jax.jit(mil_train.rank_auc)(scores, y)
  np.testing.assert_allclose(got, roc_auc_score(y, scores), rtol=1e-6)
  cont = rng.normal(size=101).astype(np.float32)
  np.testing.assert_allclose(mil_train.rank_auc(cont, y), roc_auc_score(y, cont), rtol=1e-6)
  assert np.isnan(mil_train.rank_auc(cont, np.zeros(101)))
  np.testing.assert_allclose(mil_train._auc_np(scores[None], y[None].astype(float)), [roc_auc_score(y, scores)])


def test_bag_loss_uses_the_study_losses():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=16).astype(np.float32) * 3
  y = (rng.random(16) < 0.5).astype(np.float32)
  np.testing.assert_allclose(mil_train.bag_loss(logits, y, 2.0, 1.0), losses.weighted_bce(logits, y, 2.0), rtol=1e-6)
  np.testing.assert_allclose(mil_train.bag_loss(logits, y, 0.0, 3.0),
                             losses.bce_with_logits(logits, y, pos_weight=3.0), rtol=1e-6)
  # fp_weight 2 triples the negatives' share on balanced data.
  neg = y == 0
  plain = jax.nn.softplus(jnp.asarray(logits[neg])).sum() / 16
  np.testing.assert_allclose(mil_train.bag_loss(logits, y, 2.0, 1.0) - mil_train.bag_loss(logits, y, 0.0, 1.0),
                             2.0 * plain, rtol=1e-5)


def test_recipes_map_to_losses_and_validation_names_fields():
  cfg = _load_config("smoke")
  rec = {r.name: r for r in mil_train.recipes_from_config(cfg)}
  assert rec["before"].hparam_row(pos_weight=3.0)["fp_weight"] == 2.0
  assert rec["before"].hparam_row(pos_weight=3.0)["pos_weight"] == 1.0  # WeightedBCE has none
  assert rec["loss_only"].hparam_row(pos_weight=3.0) == {**rec["before"].hparam_row(3.0), "fp_weight": 0.0,
                                                         "pos_weight": 3.0}
  row = dict(learning_rate=1e-3, fp_weight=2.0, pos_weight=2.0, epochs=3, patience=1)
  with pytest.raises(ValueError, match="row 1.*pos_weight"):
    mil_train.make_hparams([{**row, "pos_weight": 1.0}, row])
  with pytest.raises(ValueError, match="row 0: epochs=9"):
    mil_train.make_hparams([{**row, "pos_weight": 1.0, "epochs": 9}], max_epochs=3)
  cfg.recipes.before.loss = "focal"
  with pytest.raises(ValueError, match="recipes.before.loss"):
    mil_train.recipes_from_config(cfg)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def _toy_data(flip_val=False, n_train=24, n_val=16, n=5, d=8, seed=0):
  """Positive bags hold one instance shifted along a fixed direction."""
  rng = np.random.default_rng(seed)

  def make(b, flip):
    x = rng.normal(size=(b, n, d)).astype(np.float32)
    y = (np.arange(b) % 2).astype(np.float32)
    x[y == 1, 0, 0] += 3.0
    return x, np.ones((b, n), np.float32), (1 - y if flip else y)

  tx, tm, ty = make(n_train, False)
  vx, vm, vy = make(n_val, flip_val)
  return mil_train.BagData(*map(jnp.asarray, (tx, tm, ty, vx, vm, vy)))


def _toy_config(max_epochs=4):
  return mlc.ConfigDict({"model": dict(input_dim=8, hidden_dim=8, attention_dim=4, dropout=0.1, gated=False),
                         "train": dict(batch_size=8, max_epochs=max_epochs)})


def test_vmapped_sweep_row_equals_single_run():
  data = _toy_data()
  train = mil_train.make_train(_toy_config(), data, kind="attention")
  hp = mil_train.make_hparams([dict(learning_rate=1e-3, fp_weight=2.0, pos_weight=1.0, epochs=4, patience=2),
                               dict(learning_rate=3e-2, fp_weight=0.0, pos_weight=1.0, epochs=3, patience=1)])
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  sweep = jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)), compiler_options=FAST)
  out_HxS = sweep(hp, keys)
  single = jax.jit(train, compiler_options=FAST)
  for h, s in [(1, 1), (0, 1)]:
    one = single(jax.tree.map(lambda a: a[h], hp), keys[s])
    assert int(out_HxS.best_epoch[h, s]) == int(one.best_epoch)
    assert int(out_HxS.epochs_run[h, s]) == int(one.epochs_run)
    np.testing.assert_allclose(out_HxS.val_auc_E[h, s], one.val_auc_E, rtol=1e-5)
    np.testing.assert_allclose(out_HxS.train_loss_E[h, s], one.train_loss_E, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[h, s], b, rtol=1e-4, atol=1e-6),
                 out_HxS.params, one.params)
  # Rows differ (the sweep really varies the hyperparameters) and row 1's budget of 3 epochs holds.
  assert not np.allclose(out_HxS.train_loss_E[0, 0, :3], out_HxS.train_loss_E[1, 0, :3])
  assert int(out_HxS.epochs_run[1].max()) <= 3 and np.isnan(out_HxS.val_auc_E[1, :, 3]).all()


def test_early_stopping_restores_the_best_epoch():
  # Validation labels are the reverse of the training rule: the better the
  # model fits, the worse its validation AUC, so the best epoch is early.
  data = _toy_data(flip_val=True)
  train = jax.jit(mil_train.make_train(_toy_config(max_epochs=12), data), compiler_options=FAST)
  key = jax.random.PRNGKey(3)
  hp = lambda epochs: jax.tree.map(lambda a: a[0], mil_train.make_hparams(
      [dict(learning_rate=3e-2, fp_weight=0.0, pos_weight=1.0, epochs=epochs, patience=2)]))
  out = train(hp(12), key)
  best, run = int(out.best_epoch), int(out.epochs_run)
  assert 0 <= best < run - 1, (best, run)     # stopped after the best epoch...
  assert run == best + 1 + 2                  # ...by patience 2, not by the budget
  hist = np.asarray(out.val_auc_E)
  assert hist[best] == out.best_val_auc == np.nanmax(hist[:run])
  assert np.isnan(hist[run:]).all()
  # The returned params are those at the end of the best epoch: a run that
  # simply ends there produces the same params.
  ref = train(hp(best + 1), key)
  assert int(ref.epochs_run) == best + 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out.params, ref.params)
  last = train(hp(run), key)  # ...and they differ from the last epoch's
  assert int(last.best_epoch) == best  # same trajectory
  logits = lambda p: mil.AttentionMIL(input_dim=8, hidden_dim=8, attention_dim=4).apply(p, data.val_x, data.val_mask)[0]
  np.testing.assert_allclose(mil_train.rank_auc(logits(out.params), data.val_y), out.best_val_auc, rtol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_params():
  data = _toy_data()
  train = jax.jit(mil_train.make_train(_toy_config(), data), compiler_options=FAST)
  hp = jax.tree.map(lambda a: a[0], mil_train.make_hparams(
      [dict(learning_rate=1e30, fp_weight=0.0, pos_weight=1.0, epochs=4, patience=3)]))
  out = train(hp, jax.random.PRNGKey(0))
  assert bool(out.nonfinite) and int(out.epochs_run) == 1 and int(out.best_epoch) == -1
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(out.params))


# ----------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------


def _load_config(arg=None):
  spec = importlib.util.spec_from_file_location("mil_diagnosis_cfg", ROOT / "configs" / "mil_diagnosis.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_diagnosis_smoke_end_to_end(tmp_path):
  cfg = _load_config("smoke")
  cfg.data.cache_dir = str(tmp_path / "cache")
  res = mil_train.run_diagnosis(cfg, tmp_path / "run", progress=False)
  report = (tmp_path / "run" / "report.md").read_text()
  assert "## Answers" in report and "| dispersion baseline" in report and "fp_weight sweep" in report
  assert "computing 2 of 2 ratios" in report
  for r in cfg.data.ratios:
    assert r in report
  assert (tmp_path / "run" / "auc_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(saved["per_ratio"]) == set(cfg.data.ratios)
  cell = saved["per_ratio"]["5p"]["recipes"]["before"]
  assert len(cell["test_auc"]) == cfg.num_seeds and cell["test"]["lo"] <= cell["test"]["mean"] <= cell["test"]["hi"]
  assert isinstance(res["answers"]["loss_weighting_cause"], bool)
  base = saved["per_ratio"]["50p"]["baseline"]
  assert base["test_bootstrap"]["mean"] == pytest.approx(base["test_auc"])
  assert list((tmp_path / "cache").glob("digits_arcface_*.npz"))
  # A rerun in the same workdir reuses the finished ratios (resume) and agrees.
  again = mil_train.run_diagnosis(cfg, tmp_path / "run", progress=False)
  assert again["per_ratio"] == json.loads(json.dumps(res["per_ratio"])) and again["computed_ratios"] == []
  assert "computing 0 of 2 ratios" in (tmp_path / "run" / "report.md").read_text()
