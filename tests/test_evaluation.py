"""Resampled and per-kind metrics (``evaluation.resampled_metrics``), the shared test-image
resamples (``evaluation.test_weights``) and the records of ``evaluate_rows`` with the
difficulty ladder's rungs, checked against explicit subsets and explicitly repeated images."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from tailjax import evaluation, metrics
from tailjax import train as train_lib
from tailjax.configs import fastflow_mvtec
from tailjax.data import pipeline


def _planted(seed, n=12, size=8):
  """n images of size×size: 5 good, the rest of kinds "crack" / "spot" (shuffled), each
  defective image with a planted rectangle mask on which the map is raised (plus noise
  everywhere, so neither metric is 0 or 1). Returns maps, masks, image scores, labels, kinds."""
  rng = np.random.default_rng(seed)
  types = np.array(["good"] * 5 + ["crack"] * 4 + ["spot"] * (n - 9))
  rng.shuffle(types)
  masks = np.zeros((n, size, size), np.uint8)
  for i in np.flatnonzero(types != "good"):
    r, c = rng.integers(0, size - 3, 2)
    masks[i, r:r + rng.integers(2, 4), c:c + rng.integers(2, 4)] = 1
  maps = (rng.normal(size=masks.shape) + 1.2 * masks).astype(np.float32)
  img = maps.reshape(n, -1).max(1) + 0.3 * rng.normal(size=n)
  return maps, masks, img, (types != "good").astype(np.int64), types


def _sk(maps, masks, img, labels):
  return (sklearn.metrics.average_precision_score(masks.ravel(), maps.ravel()),
          sklearn.metrics.roc_auc_score(labels, img))


@pytest.mark.parametrize("seed", [0, 1])
def test_observed_and_per_kind_metrics_equal_the_explicit_subsets(seed):
  maps, masks, img, labels, types = _planted(seed)
  res = evaluation.resampled_metrics(maps, masks, img, labels, types, np.zeros((0, 12)))
  ap, auc = _sk(maps, masks, img, labels)
  assert res["observed"]["pixel_ap"] == pytest.approx(ap, rel=1e-9)
  assert res["observed"]["pixel_ap"] == pytest.approx(metrics.pixel_ap(maps, masks), rel=1e-9)
  assert res["observed"]["image_auroc"] == pytest.approx(auc, rel=1e-12)
  assert res["observed"]["image_auroc"] == pytest.approx(metrics.image_auroc(img, labels),
                                                         rel=1e-12)
  assert res["boot"] == {"pixel_ap": [], "image_auroc": []}
  assert sorted(res["by_kind"]) == ["crack", "spot"]
  for kind, got in res["by_kind"].items():
    sel = (types == kind) | (types == "good")
    k_ap, k_auc = _sk(maps[sel], masks[sel], img[sel], labels[sel])
    assert got["pixel_ap"] == pytest.approx(k_ap, rel=1e-9), kind
    assert got["image_auroc"] == pytest.approx(k_auc, rel=1e-12), kind
    assert got["n"] == int(np.sum(types == kind))
  # A kind's subset is not the whole set: the per-kind numbers are not the observed ones.
  assert {v["pixel_ap"] for v in res["by_kind"].values()} != {res["observed"]["pixel_ap"]}


def test_bootstrap_rows_equal_the_metrics_on_explicitly_repeated_images():
  maps, masks, img, labels, types = _planted(2)
  w = evaluation.test_weights(labels, 6, seed=3)
  hand = np.array([[0, 1, 2, 3] * 3, [3, 0, 0, 1, 2, 1, 0, 2, 1, 1, 0, 1]], np.float64)
  both = np.concatenate([w, hand])
  for rows in (both, both[::-1]):      # each row's value depends on that row alone
    res = evaluation.resampled_metrics(maps, masks, img, labels, types, rows)
    assert len(res["boot"]["pixel_ap"]) == len(res["boot"]["image_auroc"]) == len(rows)
    for r, w_N in enumerate(rows):
      rep = np.repeat(np.arange(12), w_N.astype(int))
      assert len(np.unique(labels[rep])) == 2
      ap, auc = _sk(maps[rep], masks[rep], img[rep], labels[rep])
      assert res["boot"]["pixel_ap"][r] == pytest.approx(ap, rel=1e-9), r
      assert res["boot"]["image_auroc"][r] == pytest.approx(auc, rel=1e-12), r
  # The observed set and the kinds do not depend on the resamples given alongside.
  alone = evaluation.resampled_metrics(maps, masks, img, labels, types, np.zeros((0, 12)))
  assert res["observed"] == alone["observed"] and res["by_kind"] == alone["by_kind"]


def test_test_weights_are_stratified_seeded_and_unbiased():
  labels = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0])
  w = evaluation.test_weights(labels, 2000, seed=5)
  assert w.shape == (2000, 12) and (w >= 0).all() and (w == np.round(w)).all()
  np.testing.assert_array_equal(w[:, labels == 0].sum(1), np.full(2000, 7))
  np.testing.assert_array_equal(w[:, labels == 1].sum(1), np.full(2000, 5))
  # Every image is drawn once per resample on average, and resamples differ.
  np.testing.assert_allclose(w.mean(0), 1.0, atol=0.1)
  assert len({row.tobytes() for row in w[:50]}) > 40
  np.testing.assert_array_equal(w, evaluation.test_weights(labels, 2000, seed=5))
  np.testing.assert_array_equal(w, evaluation.test_weights(list(labels), 2000, 5))
  assert not np.array_equal(w, evaluation.test_weights(labels, 2000, seed=6))
  # The resamples depend on the labels alone: a rung with the same labels gets the same ones.
  assert evaluation.test_weights(labels, 0, 5).shape == (0, 12)


# ----------------------------------------------------------------------------
# evaluate_rows with the difficulty ladder
# ----------------------------------------------------------------------------

H, C, S, M = 4, 6, 16, 10      # feature grid, channels, eval.size, test images


def _cfg(n_boot=7):
  cfg = fastflow_mvtec.get_config("smoke")
  cfg.flow.num_steps = 2
  cfg.train.batch_size = 4
  cfg.eval.size = S
  cfg.eval.smoothing_sigma = 1.0
  cfg.eval.image_topk = 4
  cfg.eval.boundary_px = 1
  cfg.eval.n_boot = n_boot
  cfg.seed = 11
  return cfg


def _test_split(rng, strength, masks, labels):
  """Test features whose cells under a mask are shifted by ``strength``."""
  cell = masks.reshape(M, H, S // H, H, S // H).max((2, 4)).astype(np.float32)
  return (rng.normal(size=(M, H, H, C)) + strength * cell[..., None]).astype(np.float32)


@pytest.fixture(scope="module")
def ladder_data():
  """A CategoryData of 10 test images (4 good, 6 of two kinds) with two rungs that share
  its image order, labels and masks and differ in the defect's strength."""
  rng = np.random.default_rng(0)
  types = ("good", "crack", "spot", "good", "crack", "spot", "good", "crack", "good", "spot")
  labels = np.array([t != "good" for t in types], np.int64)
  masks = np.zeros((M, S, S), np.uint8)
  for i in np.flatnonzero(labels):
    r, c = rng.integers(0, S - 8, 2)
    masks[i, r:r + 6, c:c + 6] = 1
  rungs = tuple(pipeline.RungData(
      index=j, name=f"r{j}", strength=s, auroc_cal=a, clipped=0.0, in_slope=True, why_out=None,
      test_feats=_test_split(rng, s, masks, labels), test_masks=masks, test_labels=labels,
      test_types=types) for j, (s, a) in enumerate([(0.5, 0.7), (2.0, 0.9)]))
  return pipeline.CategoryData(
      name="cat", train_feats=rng.normal(size=(8, H, H, C)).astype(np.float32),
      val_feats=rng.normal(size=(M, H, H, C)).astype(np.float32),
      test_feats=_test_split(rng, 1.0, masks, labels), test_masks=masks, test_labels=labels,
      test_images=None, test_types=types, train_index=np.arange(8), val_index=np.arange(8, 8 + M),
      rungs=rungs)


def _same(a, b) -> bool:
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)   # NaN too


def _perturbed(params, seed):
  """Parameters moved off the identity map (a fresh flow is the identity)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: l + 0.2 * rng.normal(size=l.shape).astype(l.dtype), params)


@pytest.fixture(scope="module")
def ladder_rows(ladder_data):
  """Three rows (a, b, a): the records with rungs, and the program and parameters."""
  cfg = _cfg()
  program = train_lib.make_flow_program(cfg, ladder_data.train_feats.shape)
  fresh = jax.jit(program.model.init)(jax.random.key(0), jnp.asarray(ladder_data.train_feats[:1]))
  a, b = (_perturbed(fresh, s) for s in (1, 2))
  params_R = jax.tree.map(lambda *x: jnp.stack(x), a, b, a)
  recs = evaluation.evaluate_rows(cfg, program, params_R, ladder_data, rungs=True)
  return cfg, program, params_R, recs


def test_every_row_is_scored_on_every_rung_with_shared_resamples(ladder_data, ladder_rows):
  cfg, program, params_R, recs = ladder_rows
  assert len(recs) == 3
  for rec in recs:
    assert len(rec["boot"]["pixel_ap"]) == len(rec["boot"]["image_auroc"]) == cfg.eval.n_boot
    assert sorted(rec["by_kind"]) == ["crack", "spot"]
    assert len(rec["rungs"]) == 2
    for r in rec["rungs"]:
      assert set(r) == {"metrics", "boot", "by_kind"}
      assert set(r["metrics"]) == {"pixel_ap", "image_auroc"}
      assert [len(r["boot"][k]) for k in ("pixel_ap", "image_auroc")] == [cfg.eval.n_boot] * 2
      assert sorted(r["by_kind"]) == ["crack", "spot"]
  assert _same(recs[0], recs[2]) and recs[0]["rungs"] != recs[1]["rungs"]
  assert recs[0]["rungs"][0] != recs[0]["rungs"][1]
  # Each rung's record is that row's metrics on that rung's test split, with the resamples
  # ``test_weights(labels, eval.n_boot, seed)``: the same for every row and every rung.
  weights = evaluation.test_weights(ladder_data.test_labels, cfg.eval.n_boot, cfg.seed)
  e = dict(cfg.eval)
  for i in (0, 1):
    params = evaluation.row_params(params_R, i)
    for j, rung in enumerate(ladder_data.rungs):
      scores = evaluation.patch_scores(program.model, params, rung.test_feats, cfg.eval.score,
                                       conv_impl=program.conv_impl)
      m, _ = evaluation.evaluate_scores(e, scores, rung.test_masks, rung.test_labels)
      got = recs[i]["rungs"][j]
      assert got["metrics"]["pixel_ap"] == pytest.approx(m["pixel_ap"], rel=1e-6), (i, j)
      assert got["metrics"]["image_auroc"] == pytest.approx(m["image_auroc"], rel=1e-9), (i, j)
      maps, img = evaluation.maps_and_image_scores(e, scores)
      want = evaluation.resampled_metrics(maps.astype(np.float32), rung.test_masks, img,
                                          rung.test_labels, rung.test_types, weights)
      for k in ("pixel_ap", "image_auroc"):
        np.testing.assert_allclose(got["boot"][k], want["boot"][k], rtol=1e-9, err_msg=k)
  # The test split's own resamples are the same weights too.
  scores = evaluation.patch_scores(program.model, evaluation.row_params(params_R, 1),
                                   ladder_data.test_feats, cfg.eval.score,
                                   conv_impl=program.conv_impl)
  maps, img = evaluation.maps_and_image_scores(e, scores)
  want = evaluation.resampled_metrics(maps.astype(np.float32), ladder_data.test_masks, img,
                                      ladder_data.test_labels, ladder_data.test_types, weights)
  np.testing.assert_allclose(recs[1]["boot"]["pixel_ap"], want["boot"]["pixel_ap"], rtol=1e-9)
  assert recs[1]["metrics"]["pixel_ap"] == pytest.approx(want["observed"]["pixel_ap"], rel=1e-6)


def test_rungs_and_resamples_only_when_asked(ladder_data, ladder_rows):
  cfg, program, params_R, recs = ladder_rows
  off = evaluation.evaluate_rows(cfg, program, params_R, ladder_data, rungs=False)
  assert all("rungs" not in r for r in off)
  for a, b in zip(off, recs):      # the rest of the record is the same
    assert _same(a, {k: v for k, v in b.items() if k != "rungs"})
  no_boot = evaluation.evaluate_rows(_cfg(n_boot=0), program, params_R, ladder_data, rungs=True)
  assert all("boot" not in r and "by_kind" not in r for r in no_boot)
  for a, b in zip(no_boot, recs):   # the resamples change no observed number
    assert a["metrics"] == b["metrics"]
    assert [r["metrics"] for r in a["rungs"]] == [r["metrics"] for r in b["rungs"]]
