"""``predict`` on a tiny MVTec-layout folder: one row per image, masks at the image size,
thresholds from held-out normal images only (or F1-optimal on a labelled folder), the
threshold and the invocation recorded in --out, the run only read (never written), all or
nothing outputs, and refusals / warnings for images the run cannot score faithfully."""

from __future__ import annotations

import builtins
import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailjax.configs import fastflow_mvtec
from tailjax import cli, metrics, runrecord
from tailjax.data import mvtec, pipeline, textures
from tailjax.studies import predict as P
from tailjax.studies import study_a
from tailjax.studies import study_a_record

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
  cfg.train.batch_size = 6           # the 6 training images left after holding out 2
  cfg.report.n_examples = 0
  study_a.main(cfg, tmp / "run", progress=False)
  yield tmp, root / "gravel"
  mp.undo()


def _csv_records(out):
  with open(out / "results.csv", newline="") as f:
    return list(csv.DictReader(f))


def test_predict_on_the_test_folder_uses_held_out_normal_images_only(run, tmp_path):
  tmp, cat = run
  test_dir = tmp_path / "test"
  shutil.copytree(cat / "test", test_dir)
  shutil.copytree(cat / "ground_truth", tmp_path / "ground_truth")
  res = P.predict(tmp / "run", test_dir, tmp_path / "out", progress=False)
  images = sorted(p for p in test_dir.rglob("*.png"))
  records = _csv_records(tmp_path / "out")
  assert sorted(r["path"] for r in records) == [str(p) for p in images] and len(records) == 8
  assert {r["defect_type"] for r in records} >= {"good"} and len({r["defect_type"] for r in records}) > 1
  for r in records:
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
  cfg = study_a_record.load_config(tmp / "run")
  train = sorted((cat / "train" / "good").glob("*.png"))
  _, va = pipeline.split_train_val(len(train), cfg.data.val_fraction, cfg.data.split_seed)
  assert thr["data"] == [str(train[i]) for i in va]
  test_paths = {str(p) for p in (cat / "test").rglob("*.png")} | {str(p) for p in images}
  assert not set(thr["data"]) & test_paths
  # Recorded in --out (never in the run): the threshold and this invocation.
  assert json.loads((tmp_path / "out" / "threshold.json").read_text()) == json.loads(json.dumps(thr))
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["threshold"]["image"] == thr["image"] and len(saved["images"]) == 8
  assert saved["kind"] == "predict" and saved["warnings"] == []
  manifest = runrecord.read_manifest(tmp / "run")
  assert saved["invocation"]["run"]["config_hash"] == manifest["config_hash"]
  assert not any("predict" in inv for inv in manifest["invocations"])

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
  assert res["threshold"]["id"].endswith("mean_only-seed1-val-q0.5")


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
  assert 0 < thr["pixel_f1"] <= 1 and thr["id"].startswith("gravel/threshold-tail_aware")
  # The run's own test split is refused as a labelled folder.
  with pytest.raises(ValueError, match="labelled_dir: .* is the run's test image"):
    P.predict(tmp / "run", cat / "test", tmp_path / "out3", threshold="f1",
              labelled_dir=cat / "test", progress=False)
  # ... and so is a folder holding an image the run trained on.
  cfg = study_a_record.load_config(tmp / "run")
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



# ----------------------------------------------------------------------------
# The run is only read; --out is all or nothing
# ----------------------------------------------------------------------------


def _snapshot(root):
  """Every file's size, mtime and sha256 and every folder's mtime under ``root``."""
  out = {}
  for p in sorted(root.rglob("*")):
    st = p.lstat()
    key = str(p.relative_to(root))
    out[key] = ((st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                if p.is_file() else ("dir", st.st_mtime_ns))
  out["."] = ("dir", root.stat().st_mtime_ns)
  return out


def test_predict_never_writes_to_the_run_and_a_failure_leaves_out_as_it_was(run, tmp_path,
                                                                           monkeypatch):
  # Tests run as root, where a chmod'ed workdir still accepts writes; so instead of
  # trusting permissions, check that predict writes nothing at all under the workdir:
  # no changed file or folder, and no file opened for writing there (the lock included).
  tmp, cat = run
  workdir = (tmp / "run").resolve()
  before = _snapshot(workdir)
  opened = []
  real_open, real_os_open = builtins.open, os.open

  def spy_open(file, mode="r", *a, **k):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
      opened.append(str(file))
    return real_open(file, mode, *a, **k)

  def spy_os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      opened.append(str(path))
    return real_os_open(path, flags, *a, **k)

  monkeypatch.setattr(builtins, "open", spy_open)
  monkeypatch.setattr(os, "open", spy_os_open)
  out = tmp_path / "out"
  P.predict(tmp / "run", cat / "test", out, progress=False)
  good = _snapshot(out)

  # A failure half-way through writing the outputs: out keeps the previous complete result,
  # a fresh out is never created, and no staging folder is left behind.
  calls = []
  real_outputs = P._outputs

  def failing_outputs(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise OSError("disk full")
    return real_outputs(*a, **k)

  monkeypatch.setattr(P, "_outputs", failing_outputs)
  with pytest.raises(P.OutputNotWritableError, match=r"outputs there \(disk full\)"):
    P.predict(tmp / "run", cat / "test", out, progress=False)
  calls.clear()
  with pytest.raises(P.OutputNotWritableError, match=r"outputs there \(disk full\)"):
    P.predict(tmp / "run", cat / "test", tmp_path / "fresh", progress=False)
  monkeypatch.undo()
  assert _snapshot(out) == good and not (tmp_path / "fresh").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert _snapshot(workdir) == before
  assert not [p for p in opened if str(Path(p).resolve()).startswith(str(workdir))], opened


def test_out_must_be_new_empty_or_a_previous_predict(run, tmp_path):
  tmp, cat = run
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=f"out_dir {mine} exists and is not a previous predict"):
    P.predict(tmp / "run", cat / "test", mine, progress=False)
  assert (mine / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match="is the run's workdir"):
    P.predict(tmp / "run", cat / "test", tmp / "run", progress=False)


def test_an_unwritable_out_is_one_line_naming_it(run, tmp_path, capsys):
  tmp, cat = run
  blocker = tmp_path / "file"
  blocker.write_text("x")                   # --out under a file: the OS refuses to write
  code = cli.main(["predict", f"--workdir={tmp / 'run'}", f"--images={cat / 'test'}",
                   f"--out={blocker / 'out'}"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert err.startswith(f"error: --out {blocker / 'out'}: cannot write the predict outputs")


# ----------------------------------------------------------------------------
# Images the run cannot score faithfully
# ----------------------------------------------------------------------------


def test_an_extreme_aspect_ratio_is_refused_naming_the_file_and_its_size(run, tmp_path, capsys):
  tmp, cat = run
  folder = tmp_path / "new"
  folder.mkdir()
  shutil.copy(next((cat / "test" / "good").glob("*.png")), folder / "ok.png")
  Image.fromarray(np.full((10, 4000, 3), 128, np.uint8)).save(folder / "strip.png")
  with pytest.raises(mvtec.DatasetError, match=re.escape(f"{folder / 'strip.png'}: 4000×10 pixels "
                                                         "(aspect ratio 400:1)")):
    P.predict(tmp / "run", folder, tmp_path / "out", progress=False)
  # The command: one line, exit 2, nothing written.
  code = cli.main(["predict", f"--workdir={tmp / 'run'}", f"--images={folder}",
                   f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and "strip.png: 4000×10" in err
  assert err.count("\n") == 1 and not (tmp_path / "out").exists()
  # Within the limit (4:1) an image is scored.
  Image.fromarray(np.full((16, 64, 3), 128, np.uint8)).save(folder / "strip.png")
  assert P.predict(tmp / "run", folder, tmp_path / "out", progress=False)["summary"]["n_images"] == 2


def test_a_channel_mismatch_with_the_training_images_is_warned_and_recorded(run, tmp_path, capsys):
  tmp, cat = run
  train_modes = {Image.open(p).mode for p in (cat / "train" / "good").glob("*.png")}
  trained = {mvtec.image_channels_of(p) for p in (cat / "train" / "good").glob("*.png")}
  assert len(trained) == 1, train_modes
  folder = tmp_path / "new"
  folder.mkdir()
  source = next((cat / "test" / "good").glob("*.png"))
  shutil.copy(source, folder / "same.png")
  Image.open(source).convert("RGB" if trained == {1} else "L").save(folder / "other.png")
  res = P.predict(tmp / "run", folder, tmp_path / "out", progress=False)
  err = capsys.readouterr().err
  (warning,) = res["warnings"]
  assert "1 of 2 images" in warning and "(other)" in warning and f"warning: {warning}" in err
  by_name = {Path(r["path"]).name: r["channels"] for r in res["images"]}
  assert by_name == {"same.png": next(iter(trained)), "other.png": 4 - next(iter(trained))}
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["warnings"] == res["warnings"]
  assert {r["channels"] for r in _csv_records(tmp_path / "out")} == {"1", "3"}
