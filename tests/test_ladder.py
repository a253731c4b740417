"""The difficulty ladder: shared draws and masks, rung calibration on the calibration
split only, clipped fractions, the MVTec layout, deterministic rebuilds."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailjax.data import ladder as L
from tailjax.data import mvtec
from tailjax.data import textures as T
from test_textures import SMALL_CAL, _cell_features

KW = dict(seed=3, image_size=64, n_train=2, n_test=12, crop_range=(64, 80))
CATS = ("brick", "moon")
STRENGTHS = {"brick": [0.3, 1.0, 3.0], "moon": [0.3, 1.0, 3.0]}


def _digests(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
  return L.build_ladder(tmp_path_factory.mktemp("ladder") / "lad", categories=CATS,
                        strengths=STRENGTHS, **KW)


def test_layout_is_one_train_split_and_one_mvtec_test_split_per_rung(built):
  n_good = round(KW["n_test"] * 0.375)
  for c in CATS:
    train = L.train_split(built, c)
    assert len(train) == KW["n_train"]
    rungs = L.load_rungs(built, c)
    assert [r.strength for r in rungs] == STRENGTHS[c]
    assert [r.name for r in rungs] == ["rung0", "rung1", "rung2"]
    for r in rungs:
      assert isinstance(r.test, mvtec.ImageSplit) and len(r.test) == KW["n_test"]
      assert int((r.test.labels == 0).sum()) == n_good
      assert set(r.test.defect_types) == {"good", *T.DEFECT_TYPES}  # per-kind labels
      images, masks = r.test.load()
      assert (masks.reshape(len(r.test), -1).any(1) == r.test.labels.astype(bool)).all()
      assert r.target is None and r.auroc_cal is None  # strengths passed by hand
  with pytest.raises(ValueError, match="no category 'grass'"):
    L.load_rungs(built, "grass")


def test_rungs_share_draws_and_masks_and_differ_only_on_the_mask(built):
  for c in CATS:
    rungs = L.load_rungs(built, c)
    paths = [r.test.image_paths for r in rungs]
    masks = [r.test.mask_paths for r in rungs]
    kinds = rungs[0].test.defect_types
    assert all(r.test.defect_types == kinds for r in rungs)
    n_defective = 0
    for i, kind in enumerate(kinds):
      images = [_png(p[i]).astype(np.int16) for p in paths]
      if kind == "good":
        assert all((im == images[0]).all() for im in images)
        continue
      n_defective += 1
      mask = _png(masks[0][i]) > 0
      assert all(((_png(m[i]) > 0) == mask).all() for m in masks)   # same exact mask
      for im in images[1:]:
        assert (im[~mask] == images[0][~mask]).all()                 # off the mask: same bytes
      # On the mask the change from the weakest rung grows with the strength.
      change = [np.abs(im - images[0])[mask].mean() for im in images]
      assert change[0] == 0 < change[1] < change[2], (c, kind, change)
    assert n_defective == KW["n_test"] - round(KW["n_test"] * 0.375)


def test_rung_images_are_the_texture_generators_draws(built, tmp_path):
  # Same draws as the texture build: its train split, its good test images, and (for a
  # calibrated category built at a rung's strength) its defective test images.
  tex = T.build_texture_benchmark(tmp_path / "tex", categories=("moon",),
                                  strengths={"moon": STRENGTHS["moon"][1]}, **KW)
  rung = L.load_rungs(built, "moon")[1]
  tex_train, tex_test = mvtec.scan_category(tex, "moon")
  lad_train = L.train_split(built, "moon")
  read = lambda split: [p.read_bytes() for p in split.image_paths]
  assert read(lad_train) == read(tex_train)
  assert rung.test.defect_types == tex_test.defect_types
  for a, b in zip(rung.test.image_paths, tex_test.image_paths):
    assert a.read_bytes() == b.read_bytes(), a
  for a, b in zip(rung.test.mask_paths, tex_test.mask_paths):
    assert (a is None and b is None) or (_png(a) == _png(b)).all()


def test_clipped_fraction_counts_only_defect_driven_clipping():
  clean = np.array([[[10, 250, 255, 0, 128, 5]]], np.uint8)
  defective = np.array([[[0, 255, 255, 0, 200, 0]]], np.uint8)
  mask = np.array([[[1, 1, 1, 1, 1, 0]]], bool)
  # clipped: 10->0 and 250->255; not: already 255 / already 0, 128->200 (not at a bound),
  # 5->0 off the mask. 2 of 5 mask pixels.
  assert L.clipped_fraction(clean, defective, mask) == pytest.approx(2 / 5)
  assert L.clipped_fraction(clean, defective, np.zeros_like(mask)) == 0.0
  with pytest.raises(ValueError, match="shapes differ"):
    L.clipped_fraction(clean, defective, mask[..., :3])


def test_clipped_fraction_and_slope_flag_of_a_build(tmp_path):
  # A faint rung clips nothing; an absurdly strong one clips most of its masks: it is
  # built and kept, flagged out of the slope.
  root = L.build_ladder(tmp_path / "c", categories=("moon",),
                        strengths={"moon": [0.2, 40.0]}, **KW)
  rungs = L.load_rungs(root, "moon")
  assert [r.in_slope for r in rungs] == [True, False]
  assert rungs[0].clipped <= L.CLIP_LIMIT < rungs[1].clipped
  assert rungs[0].why_out is None and rungs[1].why_out.startswith("clipped")
  # The recorded fraction is clipped_fraction of the rung's images against the same
  # samples without the defect.
  photos = T.load_photos(["moon"])
  plan = T._test_plan(KW["n_test"], 0.375, T.DEFECT_TYPES)
  draws = [T.draw_defective("moon", photos, "test", k, i, seed=KW["seed"],
                            image_size=KW["image_size"], crop_range=KW["crop_range"],
                            noise_sigma=1.5) for i, k in enumerate(plan) if k != "good"]
  test = rungs[1].test
  defective = np.stack([_png(p) for p, l in zip(test.image_paths, test.labels) if l])
  # the split is sorted by kind, the plan cycles through kinds: match by mask
  masks = np.stack([_png(m) > 0 for m in test.mask_paths if m is not None])
  order = [next(j for j, d in enumerate(draws) if (d.mask_HxW == m).all()) for m in masks]
  clean = np.stack([draws[j].clean() for j in order])
  assert rungs[1].clipped == pytest.approx(L.clipped_fraction(clean, defective, masks))
  assert all((draws[j].image(40.0) == im).all() for j, im in zip(order, defective))


def test_a_repeated_strength_is_built_once_and_left_out_of_the_slope(tmp_path):
  # A target above a photo's reachable AUROC keeps the top strength: two rungs, one test set.
  root = L.build_ladder(tmp_path / "d", categories=("brick",),
                        strengths={"brick": [0.3, 1.0, 1.0]}, **KW)
  rungs = L.load_rungs(root, "brick")
  assert [r.in_slope for r in rungs] == [True, True, False]
  assert rungs[2].why_out == "same strength as rung1"
  for a, b in zip(rungs[1].test.image_paths, rungs[2].test.image_paths):
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_ino == b.stat().st_ino  # one file on disk


def test_rebuild_is_deterministic_and_reused(built, tmp_path):
  again = L.build_ladder(tmp_path / "again", categories=CATS, strengths=STRENGTHS, **KW)
  assert _digests(again) == _digests(built)
  before = {str(p): p.stat().st_mtime_ns for p in again.rglob("*")}
  assert L.build_ladder(again, categories=CATS, strengths=STRENGTHS, **KW) == again
  assert {str(p): p.stat().st_mtime_ns for p in again.rglob("*")} == before
  # Another strength moves only that rung's defective images.
  moved = L.build_ladder(tmp_path / "moved", categories=CATS,
                         strengths={**STRENGTHS, "moon": [0.3, 1.0, 2.0]}, **KW)
  a, b = _digests(built), _digests(moved)
  changed = {k for k in a if k.endswith(".png") and a[k] != b[k]}
  assert changed and all(k.startswith("moon/rung2/test/") and "/good/" not in k for k in changed)


def test_bad_ladder_arguments_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="strengths"):
    L.build_ladder(tmp_path / "x", categories=("moon",), strengths={"carpet": [1.0]}, **KW)
  with pytest.raises(ValueError, match=r"strengths\['moon'\]"):
    L.build_ladder(tmp_path / "x", categories=("moon",), strengths={"moon": [1.0, -2.0]}, **KW)
  with pytest.raises(ValueError, match="targets"):
    L.calibrate_ladder("moon", _cell_features, L.LadderSettings(targets=(0.9, 0.7)))


LADDER_CAL = L.LadderSettings(targets=(0.6, 0.7, 0.8), tol=0.03, max_iter=4,
                              bounds=(1 / 64, 16.0), split=SMALL_CAL)


def test_calibration_lands_each_rung_on_the_calibration_split_only(tmp_path, monkeypatch):
  # Every image the calibration draws goes through textures._sample_rng: record the
  # splits. The features function sees only files under the calibration's workdir.
  splits, seen_paths = set(), []
  real_rng = T._sample_rng
  monkeypatch.setattr(T, "_sample_rng", lambda c, split, i, seed: (
      splits.add(split), real_rng(c, split, i, seed))[1])

  def features(paths):
    seen_paths.extend(Path(p) for p in paths)
    return _cell_features(paths)

  work = tmp_path / "w"
  r = L.calibrate_ladder("grass", features, LADDER_CAL, workdir=work)
  assert splits == {"calibration_fit", "calibration_eval"}
  assert all(work in p.parents for p in seen_paths)
  monkeypatch.undo()
  assert [x["target"] for x in r["rungs"]] == list(LADDER_CAL.targets)
  lo, hi = r["reachable"]
  for x in r["rungs"]:
    if lo + LADDER_CAL.tol <= x["target"] <= hi - LADDER_CAL.tol:
      assert x["reached"], x
    if x["reached"]:
      assert abs(x["auroc_cal"] - x["target"]) <= LADDER_CAL.tol
    # Re-measured at the rung's strength: the same AUROC (a deterministic split).
    assert T.calibration_auroc("grass", x["strength"], _cell_features, SMALL_CAL) == x["auroc_cal"]
    assert 0.0 <= x["clipped_cal"] <= 1.0
  assert [x["strength"] for x in r["rungs"]] == sorted(x["strength"] for x in r["rungs"])
  # The upper bound is evaluated first; bisection shares evaluations across rungs.
  assert r["evaluations"][0][0] == LADDER_CAL.bounds[1]
  assert len(r["evaluations"]) <= 1 + LADDER_CAL.max_iter * len(LADDER_CAL.targets)


def test_committed_ladder_covers_every_photo_and_is_package_data(tmp_path):
  committed = L.committed_ladder()
  assert committed["settings"] == L.settings_record(L.LADDER_SETTINGS)
  assert committed["clip_limit"] == L.CLIP_LIMIT
  assert set(committed["categories"]) == set(T.CATEGORIES)
  tol = L.LADDER_SETTINGS.tol
  for c, r in committed["categories"].items():
    rungs = r["rungs"]
    assert [x["target"] for x in rungs] == list(L.LADDER_TARGETS), c
    for x in rungs:
      assert x["reached"] == (abs(x["auroc_cal"] - x["target"]) <= tol), (c, x)
      assert r["reachable"][0] <= x["auroc_cal"] <= r["reachable"][1], (c, x)
  pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
  assert L.LADDER_FILE in pyproject["tool"]["setuptools"]["package-data"]["tailjax.data"]
  # A build with the committed strengths records the calibration per rung.
  root = L.build_ladder(tmp_path / "c", categories=("gravel",),
                        **{**KW, "n_test": 5, "n_train": 1})
  rungs = L.load_rungs(root, "gravel")
  assert [(x.strength, x.auroc_cal) for x in rungs] == [
      (x["strength"], x["auroc_cal"]) for x in committed["categories"]["gravel"]["rungs"]]
  assert json.loads((root / "COMPLETE").read_text())["strengths"]["gravel"] == [
      x.strength for x in rungs]
