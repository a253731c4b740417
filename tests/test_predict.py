"""``predict`` on a tiny MVTec-layout folder: one row per image, masks at the image size,
thresholds from held-out normal images only (or F1-optimal on a labelled folder), and
the threshold recorded in the run."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import fastflow_mvtec
from tailjax import metrics, runrecord
from tailjax.data import pipeline, textures
from tailjax.studies import predict as P
from tailjax.studies import study_a

from fakes import cellstats_extractor

_fake_extractor = cellstats_extractor((6, 10), 24, "fake-cellstats-6x10-v1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished smoke study-A run on a tiny texture folder (8 train images, 2 held out)."""
  mp = pytest.MonkeyPatch()
  mp.setattr(pipeline, "make_extractor", _fake_extractor)
  tmp = tmp_path_factory.mktemp("predict")
  root = textures.build_texture_benchmark(tmp / "tree", seed=3, image_size=64, n_train=8,
                                          n_test=8, categories=("gravel",))
  cfg = fastflow_mvtec.get_config("smoke")
  cfg.data.root = str(root)
  cfg.data.cache_dir = str(tmp / "cache")
  cfg.backbone.resolution = 60
  cfg.eval.size = 32                 # maps at 32 px; masks must come back at 64 px
  cfg.flow.num_steps = 2
  cfg.optim.learning_rate = 2e-3     # (same flow program as tests/test_pipeline.py's run)
  cfg.report.n_examples = 0
  study_a.main(cfg, tmp / "run", progress=False)
  yield tmp, root / "gravel"
  mp.undo()


def _rows(out):
  with open(out / "results.csv", newline="") as f:
    return list(csv.DictReader(f))


def test_predict_on_the_test_folder_uses_held_out_normal_images_only(run, tmp_path):
  tmp, cat = run
  test_dir = tmp_path / "test"
  shutil.copytree(cat / "test", test_dir)
  shutil.copytree(cat / "ground_truth", tmp_path / "ground_truth")
  res = P.predict(tmp / "run", test_dir, tmp_path / "out", progress=False)
  images = sorted(p for p in test_dir.rglob("*.png"))
  rows = _rows(tmp_path / "out")
  assert sorted(r["path"] for r in rows) == [str(p) for p in images] and len(rows) == 8
  assert {r["defect_type"] for r in rows} >= {"good"} and len({r["defect_type"] for r in rows}) > 1
  for r in rows:
    mask = np.asarray(Image.open(tmp_path / "out" / r["mask"]))
    overlay = np.asarray(Image.open(tmp_path / "out" / r["overlay"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}   # the image's size
    assert overlay.shape == (64, 64, 3)
    assert float(r["anomalous_pixel_fraction"]) == pytest.approx((mask > 0).mean())
    assert r["decision"] == ("anomalous" if float(r["image_score"]) >= float(r["image_threshold"])
                             else "normal")
  thr = res["threshold"]
  assert res["row"]["variant"] == "tail_aware" and res["row"]["seed"] == 0
  assert thr["mode"] == "val_quantile" and thr["quantile"] == 0.99 and thr["n_images"] == 2
  # The recorded data are exactly the run's held-out training images — no test image.
  cfg = study_a.load_config(tmp / "run")
  train = sorted((cat / "train" / "good").glob("*.png"))
  _, va = pipeline.split_train_val(len(train), cfg.data.val_fraction, cfg.data.split_seed)
  assert thr["data"] == [str(train[i]) for i in va]
  test_paths = {str(p) for p in (cat / "test").rglob("*.png")} | {str(p) for p in images}
  assert not set(thr["data"]) & test_paths
  # Recorded in the run: the unit and this invocation.
  assert runrecord.Run(tmp / "run", {}, False).load_unit(thr["unit"]) == json.loads(
      json.dumps(thr))
  inv = runrecord.read_manifest(tmp / "run")["invocations"][-1]
  assert inv["predict"]["threshold_unit"] == thr["unit"] and inv["predict"]["n_images"] == 8
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["threshold"]["image"] == thr["image"] and len(saved["images"]) == 8

  # Changing a test image — in the predicted folder and in the run's own test split —
  # changes its score, never the thresholds.
  target = next(p for p in images if p.parent.name == "good")
  own = cat / "test" / "good" / target.name
  original = own.read_bytes()
  pixels = np.asarray(Image.open(target)).copy()
  pixels[8:40, 8:40] = 255 - pixels[8:40, 8:40]
  Image.fromarray(pixels).save(target)
  shutil.copy(target, own)
  try:
    again = P.predict(tmp / "run", test_dir, tmp_path / "out2", progress=False)
  finally:
    own.write_bytes(original)
  assert (again["threshold"]["image"], again["threshold"]["pixel"]) == (thr["image"], thr["pixel"])
  before = {r["path"]: r["image_score"] for r in res["images"]}
  after = {r["path"]: r["image_score"] for r in again["images"]}
  assert after[str(target)] != before[str(target)]
  assert all(after[p] == before[p] for p in before if p != str(target))


def test_quantile_threshold_is_the_quantile_of_the_val_scores(run, tmp_path):
  tmp, cat = run
  res = P.predict(tmp / "run", cat / "train" / "good", tmp_path / "out", quantile=0.5,
                  variant="mean_only", seed=1, progress=False)
  assert res["row"]["variant"] == "mean_only" and res["row"]["seed"] == 1
  val = set(res["threshold"]["data"])
  scores = [r["image_score"] for r in res["images"] if r["path"] in val]
  assert len(scores) == 2 and res["threshold"]["image"] == pytest.approx(np.median(scores))
  assert res["images"][0]["defect_type"] is None and res["summary"]["n_images"] == 8
  assert res["threshold"]["unit"].endswith("mean_only-seed1-val-q0.5")


def test_f1_thresholds_from_a_labelled_folder(run, tmp_path):
  tmp, cat = run
  other = textures.build_texture_benchmark(tmp_path / "other", seed=4, image_size=64, n_train=2,
                                           n_test=8, categories=("gravel",)) / "gravel"
  res = P.predict(tmp / "run", cat / "test", tmp_path / "out", threshold="f1",
                  labelled_dir=other / "test", progress=False)
  thr = res["threshold"]
  assert thr["mode"] == "f1" and thr["n_images"] == 8
  assert all(str(other) in p for p in thr["data"])
  # Cross-check with the metric's own F1 sweep: predicting on the labelled folder itself
  # gives its scores; their best F1 is the recorded one, reached at the recorded threshold.
  lab = P.predict(tmp / "run", other / "test", tmp_path / "out_lab", threshold="f1",
                  labelled_dir=other / "test", progress=False)
  s = np.asarray([r["image_score"] for r in lab["images"]])
  y = np.asarray([r["label"] for r in lab["images"]])
  assert thr["image_f1"] == pytest.approx(metrics.f1_max(s, y), abs=1e-12)
  flagged = s >= thr["image"]
  assert 2 * (flagged & (y == 1)).sum() / (flagged.sum() + y.sum()) == pytest.approx(thr["image_f1"])
  assert lab["summary"]["f1"] == pytest.approx(thr["image_f1"])
  assert 0 < thr["pixel_f1"] <= 1 and thr["unit"].startswith("gravel/predict/threshold-tail_aware")
  # The run's own test split is refused as a labelled folder.
  with pytest.raises(ValueError, match="labelled_dir: .* is the run's test image"):
    P.predict(tmp / "run", cat / "test", tmp_path / "out3", threshold="f1",
              labelled_dir=cat / "test", progress=False)
  # ... and so is a folder holding an image the run trained on.
  cfg = study_a.load_config(tmp / "run")
  train = sorted((cat / "train" / "good").glob("*.png"))
  tr, _ = pipeline.split_train_val(len(train), cfg.data.val_fraction, cfg.data.split_seed)
  leaky = tmp_path / "leaky"
  shutil.copytree(other / "test", leaky / "test")
  shutil.copytree(other / "ground_truth", leaky / "ground_truth")
  shutil.copy(train[tr[0]], leaky / "test" / "good" / "zzz.png")
  with pytest.raises(ValueError, match="labelled_dir: .*zzz.png is the run's training image"):
    P.predict(tmp / "run", cat / "test", tmp_path / "out4", threshold="f1",
              labelled_dir=leaky / "test", progress=False)


def test_f1_threshold_matches_the_metric_sweep():
  rng = np.random.default_rng(5)
  s = np.round(rng.normal(size=300), 1).astype(np.float32)   # many ties
  y = (s + rng.normal(size=300) > 0.8).astype(np.int32)
  t, f1 = P.f1_threshold(s, y)
  assert f1 == pytest.approx(metrics.f1_max(s, y), abs=1e-12)
  flagged = s >= t
  assert 2 * (flagged & (y == 1)).sum() / (flagged.sum() + y.sum()) == pytest.approx(f1)


def test_bad_arguments_are_named(run, tmp_path):
  tmp, cat = run
  with pytest.raises(ValueError, match="threshold must be one of"):
    P.predict(tmp / "run", cat / "test", tmp_path / "o", threshold="otsu")
  with pytest.raises(ValueError, match="needs labelled_dir"):
    P.predict(tmp / "run", cat / "test", tmp_path / "o", threshold="f1")
  with pytest.raises(ValueError, match="quantile must lie in"):
    P.predict(tmp / "run", cat / "test", tmp_path / "o", quantile=1.5)
  with pytest.raises(FileNotFoundError, match="images: .*absent"):
    P.predict(tmp / "run", tmp_path / "absent", tmp_path / "o")
  with pytest.raises(ValueError, match="variant 'nope'"):
    P.predict(tmp / "run", cat / "test", tmp_path / "o", variant="nope", progress=False)
  with pytest.raises(ValueError, match="category 'brick' was not trained"):
    P.predict(tmp / "run", cat / "test", tmp_path / "o", category="brick", progress=False)
