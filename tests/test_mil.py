"""Study B core: MIL models, padding safety, no-learning baselines, instance metrics, in-graph AUC, training."""

from __future__ import annotations

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


MODEL_VARIANTS = ([(k, "attention", g, ln) for k in ("attention", "relation") for g in (False, True)
                   for ln in (False, True)] + [("attention", "max", False, False), ("relation", "max", False, True)])


def _model(kind, pooling="attention", gated=False, layer_norm=False, d=16):
  return mil.make_model(kind, input_dim=d, hidden_dim=8, attention_dim=4, gated=gated, layer_norm=layer_norm,
                        pooling=pooling)


@pytest.mark.parametrize("kind,pooling,gated,layer_norm", MODEL_VARIANTS)
def test_models_invariant_to_instance_order_and_padding(kind, pooling, gated, layer_norm):
  x, mask = _bags()
  model = _model(kind, pooling, gated, layer_norm)
  params = model.init(jax.random.PRNGKey(0), x, mask)
  apply = lambda xx, mm: model.apply(params, xx, mm, instance_scores=True)  # eager: no compiles to wait for
  logits, alpha, s = apply(x, mask)

  perm = np.random.default_rng(1).permutation(x.shape[1])
  logits_p, alpha_p, s_p = apply(x[:, perm], mask[:, perm])
  np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alpha_p, alpha[:, perm], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_p, s[:, perm], rtol=1e-5, atol=1e-6)

  # Extra padding holding garbage must change nothing: not the bag logits,
  # not the attention and not the instance scores of the valid instances.
  junk = 1e3 * np.random.default_rng(2).normal(size=(x.shape[0], 5, x.shape[2])).astype(np.float32)
  x_pad = np.concatenate([np.where(mask[:, :, None] > 0, x, 77.0), junk], axis=1)
  mask_pad = np.concatenate([mask, np.zeros((x.shape[0], 5), np.float32)], axis=1)
  logits_pad, alpha_pad, s_pad = apply(x_pad, mask_pad)
  np.testing.assert_allclose(logits_pad, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_pad[:, :7][mask > 0], s[mask > 0], rtol=1e-5, atol=1e-6)
  assert np.all(alpha_pad[mask_pad == 0] == 0) and np.all(s_pad[mask_pad == 0] == 0)
  np.testing.assert_allclose(alpha_pad.sum(1), 1.0, rtol=1e-6)
  assert not np.allclose(logits, logits[0])  # the test would be vacuous for a constant model


@pytest.mark.parametrize("kind,pooling,layer_norm", [("attention", "attention", True), ("relation", "max", True)])
def test_nan_and_inf_in_padding_leave_every_output_and_gradient_finite(kind, pooling, layer_norm):
  # 0 · NaN = NaN: a mask applied by multiplication would let padded NaN/Inf
  # reach the dispersion, the attention, the logits and the gradients.
  x, _ = _bags(b=3, n=6)
  full = np.ones(x.shape[:2], np.float32)
  pad_BxPxD = np.full((3, 4, x.shape[2]), np.nan, np.float32)
  pad_BxPxD[:, 1] = np.inf
  pad_BxPxD[:, 2] = -np.inf
  x_pad = np.concatenate([x, pad_BxPxD], axis=1)
  mask_pad = np.concatenate([full, np.zeros((3, 4), np.float32)], axis=1)

  model = _model(kind, pooling, layer_norm=layer_norm)
  params = model.init(jax.random.PRNGKey(0), x, full)
  ref = model.apply(params, x, full, instance_scores=True)
  got = model.apply(params, x_pad, mask_pad, instance_scores=True)
  for r, g in zip(ref, got):
    assert np.all(np.isfinite(g))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1][:, :6], ref[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[2][:, :6], ref[2], rtol=1e-5, atol=1e-6)

  def loss(p):
    logits, _ = model.apply(p, x_pad, mask_pad, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.sum(logits)
  grads = jax.jit(jax.grad(loss), compiler_options=FAST)(params)
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(grads))

  np.testing.assert_allclose(mil.bag_dispersion(x_pad, mask_pad), mil.bag_dispersion(x, full), rtol=1e-5)
  np.testing.assert_allclose(mil.medoid_distances(x_pad, mask_pad)[:, :6], mil.medoid_distances(x, full),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mil.masked_mean(jnp.asarray(x_pad), jnp.asarray(mask_pad)), x.mean(1), rtol=1e-5)


def test_bag_logit_is_pooled_instance_scores():
  x, mask = _bags()
  for pooling in ("attention", "max"):
    model = _model("relation", pooling)
    params = model.init(jax.random.PRNGKey(0), x, mask)
    logits, alpha, s = model.apply(params, x, mask, instance_scores=True)
    if pooling == "attention":  # c·Σ α h + b = Σ α (c·h + b) since Σ α = 1
      np.testing.assert_allclose(logits, np.sum(alpha * s, 1), rtol=1e-5, atol=1e-6)
    else:                       # critical instance: max score, attention one-hot on it
      np.testing.assert_allclose(logits, np.where(mask > 0, s, -np.inf).max(1), rtol=1e-6)
      np.testing.assert_array_equal(np.argmax(alpha, 1), np.argmax(np.where(mask > 0, s, -np.inf), 1))
      np.testing.assert_allclose(alpha.sum(1), 1.0)


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
  padded = np.ones(mask.shape, np.float32)
  padded[1, 0] = 0  # the same NaN in a padded slot is fine
  assert np.isfinite(np.asarray(mil.bag_dispersion(x, padded))).all()


def test_medoid_distances_and_top_k_mean_match_brute_force():
  x, mask = _bags(b=5, n=9, d=12, seed=3)
  got = np.asarray(mil.medoid_distances(x, mask))
  for b in range(len(x)):
    v = x[b, mask[b] > 0].astype(np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    dist = 1 - u @ u.T
    medoid = np.argmin(dist.sum(1))
    np.testing.assert_allclose(got[b, : len(v)], dist[:, medoid], rtol=1e-5, atol=1e-6)
    assert np.all(got[b, len(v):] == 0)
    for k in (1, 3, 50):
      np.testing.assert_allclose(mil.top_k_mean(got, mask, k)[b], np.sort(dist[:, medoid])[::-1][:k].mean(),
                                 rtol=1e-5, atol=1e-6)
  # A bag of one identity plus one outlier: the outlier is farthest from the medoid.
  bag = np.tile(np.eye(4, dtype=np.float32)[:1], (5, 1)) + 0.01 * np.arange(5)[:, None]
  bag[2] = np.eye(4, dtype=np.float32)[3]
  assert int(np.argmax(mil.medoid_distances(bag[None])[0])) == 2
  with pytest.raises(ValueError, match="k must be >= 1"):
    mil.top_k_mean(got, mask, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_instance_auroc_equals_sklearn_on_flattened_masked_instances(seed):
  rng = np.random.default_rng(seed)
  b, n = 12, 7
  scores = rng.integers(0, 5, (b, n)).astype(np.float32)   # ties
  scores[:, -2:] = 99.0                                    # padding must not count
  mask = np.ones((b, n), np.float32)
  mask[:, -2:] = 0
  mask[3, 2:] = 0
  foreign = (rng.random((b, n)) < 0.3).astype(np.int8)
  bag_y = np.zeros(b, np.int8)
  bag_y[: b // 2] = 1
  foreign[bag_y == 0] = 0
  foreign[:6, 0] = 1                                       # every positive bag has a foreign instance
  keep = (mask > 0) & (bag_y[:, None] > 0)
  expect = roc_auc_score(foreign[keep], scores[keep])
  assert mil.instance_auroc(scores, foreign, mask, bag_y) == pytest.approx(expect, abs=1e-12)
  assert mil.instance_auroc(scores, foreign, mask) == pytest.approx(
      roc_auc_score(foreign[mask > 0], scores[mask > 0]), abs=1e-12)
  top = mil.top_instance_is_foreign(scores, foreign, mask)
  first_max = np.argmax(np.where(mask > 0, scores, -np.inf), 1)
  np.testing.assert_array_equal(top, foreign[np.arange(b), first_max])


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


MAX_EPOCHS = 12
_TOY_MODEL = mil.AttentionMIL(input_dim=8, hidden_dim=8, attention_dim=4, dropout=0.1)
_COMPILED = {}


def _toy_config():
  return mlc.ConfigDict({"model": dict(input_dim=8, hidden_dim=8, attention_dim=4, dropout=0.1, gated=False),
                         "train": dict(batch_size=8, max_epochs=MAX_EPOCHS)})


def _train_fn():
  """One compiled ``train_fn(data, hparams, key)`` shared by the training tests (data is an argument)."""
  if "single" not in _COMPILED:
    _COMPILED["single"] = jax.jit(mil_train.make_train_fn(_TOY_MODEL, batch_size=8, max_epochs=MAX_EPOCHS),
                                  compiler_options=FAST)
  return _COMPILED["single"]


def test_vmapped_sweep_row_equals_single_run():
  data = _toy_data()
  train = mil_train.make_train(_toy_config(), data, kind="attention")
  hp = mil_train.make_hparams([dict(learning_rate=1e-3, fp_weight=2.0, pos_weight=1.0, epochs=4, patience=2),
                               dict(learning_rate=3e-2, fp_weight=0.0, pos_weight=1.0, epochs=3, patience=1)])
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  sweep = jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)), compiler_options=FAST)
  out_HxS = sweep(hp, keys)
  for h, s in [(1, 1), (0, 1)]:
    one = _train_fn()(data, jax.tree.map(lambda a: a[h], hp), keys[s])
    assert int(out_HxS.best_epoch[h, s]) == int(one.best_epoch)
    assert int(out_HxS.epochs_run[h, s]) == int(one.epochs_run)
    np.testing.assert_allclose(out_HxS.val_auc_E[h, s], one.val_auc_E, rtol=1e-5)
    np.testing.assert_allclose(out_HxS.train_loss_E[h, s], one.train_loss_E, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[h, s], b, rtol=1e-4, atol=1e-6),
                 out_HxS.params, one.params)
  # Rows differ (the sweep really varies the hyperparameters) and row 1's budget of 3 epochs holds.
  assert not np.allclose(out_HxS.train_loss_E[0, 0, :3], out_HxS.train_loss_E[1, 0, :3])
  assert int(out_HxS.epochs_run[1].max()) <= 3 and np.isnan(out_HxS.val_auc_E[1, :, 3:]).all()


def test_early_stopping_restores_the_best_epoch():
  # Validation labels are the reverse of the training rule: the better the
  # model fits, the worse its validation AUC, so the best epoch is early.
  data = _toy_data(flip_val=True)
  train = lambda hp, key: _train_fn()(data, hp, key)
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
  logits = lambda p: _TOY_MODEL.apply(p, data.val_x, data.val_mask)[0]
  np.testing.assert_allclose(mil_train.rank_auc(logits(out.params), data.val_y), out.best_val_auc, rtol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_params():
  data = _toy_data()
  hp = jax.tree.map(lambda a: a[0], mil_train.make_hparams(
      [dict(learning_rate=1e30, fp_weight=0.0, pos_weight=1.0, epochs=4, patience=3)]))
  out = _train_fn()(data, hp, jax.random.PRNGKey(0))
  assert bool(out.nonfinite) and int(out.epochs_run) == 1 and int(out.best_epoch) == -1
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(out.params))


def test_mil_and_arcface_train_through_the_shared_training_pieces():
  # One optimiser factory, one train step, one early stopping (tailjax/train.py):
  # no hand-written Adam or patience loop in the study-B training code.
  for rel in ("tailjax/mil_train.py", "tailjax/data/digits.py", "tailjax/studies/mil_diagnosis.py"):
    src = (ROOT / rel).read_text()
    for banned in ("optax.adam", "opt.update", "apply_updates", "bad_epochs"):
      assert banned not in src, f"{rel} contains {banned!r}"
  src = (ROOT / "tailjax/mil_train.py").read_text()
  for used in ("make_optimizer", "set_learning_rate", "make_train_step", "early_stopping_update"):
    assert f"train_lib.{used}" in src
