"""The embedded texture benchmark: layout, determinism, disjoint crops, masks, reuse."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailjax.data import mvtec
from tailjax.data import textures as T

TINY = dict(image_size=64, n_train=3, n_test=10, categories=("brick", "gravel"),
            crop_range=(64, 80))


def _digests(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
  return T.build_texture_benchmark(tmp_path_factory.mktemp("tex") / "textures", seed=3, **TINY)


@pytest.fixture(scope="module")
def photos():
  return {name: T.load_photo(name) for name in T.SOURCE_PHOTOS}


def test_photos_are_real_grayscale_512():
  for name in T.SOURCE_PHOTOS:
    p = T.load_photo(name)
    assert p.shape == (512, 512)
    assert p.std() > 10  # a photograph, not a flat placeholder


def test_layout_is_mvtec(tiny):
  n_good = round(TINY["n_test"] * 0.375)
  for cat in TINY["categories"]:
    train = sorted((tiny / cat / "train" / "good").glob("*.png"))
    assert len(train) == TINY["n_train"]
    test_dirs = {p.name for p in (tiny / cat / "test").iterdir()}
    assert test_dirs == {"good", *T.DEFECT_TYPES}
    assert len(list((tiny / cat / "test" / "good").glob("*.png"))) == n_good
    n_defective = 0
    for defect in T.DEFECT_TYPES:
      images = sorted((tiny / cat / "test" / defect).glob("*.png"))
      masks = sorted((tiny / cat / "ground_truth" / defect).glob("*_mask.png"))
      assert [m.name for m in masks] == [f"{i.stem}_mask.png" for i in images]
      n_defective += len(images)
    assert n_defective == TINY["n_test"] - n_good >= 0.4 * TINY["n_test"]
    assert not (tiny / cat / "ground_truth" / "good").exists()
    image = Image.open(train[0])
    assert image.mode == "L" and image.size == (64, 64)
  assert (tiny / "COMPLETE").is_file()


def test_masks_binary_and_area_in_range(tiny):
  areas = []
  for mask_path in tiny.rglob("*_mask.png"):
    m = np.asarray(Image.open(mask_path))
    assert m.shape == (64, 64)
    assert set(np.unique(m).tolist()) == {0, 255}, mask_path
    areas.append((m > 0).mean())
  assert len(areas) == 2 * (TINY["n_test"] - round(TINY["n_test"] * 0.375))
  assert T.MIN_DEFECT_AREA <= min(areas) and max(areas) <= T.MAX_DEFECT_AREA


def test_defects_change_pixels_inside_mask_only(tiny, photos):
  # Re-render each crop from its recorded box: outside the mask only sensor
  # noise (σ = 1.5, mean |noise| ≈ 1.2) may remain; inside, the defect.
  manifest = T.read_manifest(tiny)
  for rec in manifest["images"]:
    clean = T.render_view(photos[rec["category"]], rec["box_yxhw"], rec["rot90"], rec["flip"], 64)
    diff = np.abs(np.asarray(Image.open(tiny / rec["image"]), np.float32) - clean)
    if rec["mask"] is None:
      assert diff.mean() < 2.0, rec["image"]
      continue
    mask = np.asarray(Image.open(tiny / rec["mask"])) > 0
    assert diff[~mask].mean() < 2.0, rec["image"]
    assert diff[mask].mean() > 3 * diff[~mask].mean(), rec["image"]


def test_train_and_test_crops_come_from_disjoint_regions(tiny):
  manifest = T.read_manifest(tiny)
  for cat in TINY["categories"]:
    boxes = {"train": [], "test": []}
    for rec in manifest["images"]:
      if rec["category"] == cat:
        boxes[rec["split"]].append(rec["box_yxhw"])
    for split, split_boxes in boxes.items():
      regions = T.split_regions((512, 512), split)
      for y, x, h, w in split_boxes:
        assert any(y0 <= y and y + h <= y1 and x0 <= x and x + w <= x1
                   for y0, x0, y1, x1 in regions)
    for ty, tx, th, tw in boxes["train"]:
      for sy, sx, sh, sw in boxes["test"]:
        overlap_x = min(tx + tw, sx + sw) - max(tx, sx)
        overlap_y = min(ty + th, sy + sh) - max(ty, sy)
        assert overlap_x <= 0 or overlap_y <= 0


def test_foreign_material_comes_from_another_photo(tiny):
  recs = [r for r in T.read_manifest(tiny)["images"] if r["defect"] == "foreign_material"]
  assert recs
  assert all(r["defect_params"]["donor"] != r["category"] for r in recs)


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
  again = T.build_texture_benchmark(tmp_path / "again", seed=3, **TINY)
  assert _digests(again) == _digests(tiny)
  other = T.build_texture_benchmark(tmp_path / "other", seed=4, **TINY)
  a, b = _digests(tiny), _digests(other)
  train = [k for k in a if "/train/" in k]
  assert sum(a[k] != b[k] for k in train) == len(train)


def test_complete_copy_is_reused_without_rewriting(tmp_path):
  root = T.build_texture_benchmark(tmp_path / "t", seed=0, **TINY)
  before = _mtimes(root)
  assert T.build_texture_benchmark(root, seed=0, **TINY) == root
  assert _mtimes(root) == before


def test_half_written_copy_is_detected_and_rebuilt(tmp_path):
  root = T.build_texture_benchmark(tmp_path / "t", seed=0, **TINY)
  reference = _digests(root)
  # A copy interrupted before its marker: the marker and some images are missing.
  (root / "COMPLETE").unlink()
  victim = next((root / "brick" / "test" / "hole").glob("*.png"))
  victim.unlink()
  T.build_texture_benchmark(root, seed=0, **TINY)
  assert _digests(root) == reference
  # A complete copy missing a file is rebuilt as well.
  victim.unlink()
  T.build_texture_benchmark(root, seed=0, **TINY)
  assert _digests(root) == reference
  # Other parameters: rebuilt in place, marker updated.
  T.build_texture_benchmark(root, seed=1, **TINY)
  assert json.loads((root / "COMPLETE").read_text())["seed"] == 1
  assert _digests(root) != reference


def test_killed_build_leftovers_are_cleaned(tmp_path):
  root = tmp_path / "t"
  stale = tmp_path / ".t.abc123.partial"
  fresh = tmp_path / ".t.def456.partial"  # perhaps a concurrent build's
  for d in (stale, fresh):
    (d / "brick" / "train" / "good").mkdir(parents=True)
  os.utime(stale, (time.time() - 7200, time.time() - 7200))
  T.build_texture_benchmark(root, seed=0, **TINY)
  assert not stale.exists() and fresh.exists()
  assert (root / "COMPLETE").is_file()


def test_mvtec_reader_loads_the_benchmark(tiny):
  train, test = mvtec.scan_category(tiny, "gravel")
  assert len(train) == TINY["n_train"] and len(test) == TINY["n_test"]
  images, masks = test.load()
  assert images.shape == (TINY["n_test"], 64, 64, 3)
  assert (images[..., 0] == images[..., 1]).all()
  assert (masks.reshape(len(test), -1).any(1) == test.labels.astype(bool)).all()


def test_refuses_to_replace_a_foreign_directory(tmp_path):
  root = tmp_path / "mine"
  root.mkdir()
  (root / "thesis.tex").write_text("precious")
  with pytest.raises(FileExistsError, match=str(root)):
    T.build_texture_benchmark(root, seed=0, **TINY)
  assert (root / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("defect", T.DEFECT_TYPES)
def test_defects_at_default_size_respect_area_bounds(defect, photos):
  rng = np.random.default_rng(0)
  image = T.render_view(photos["brick"], (0, 0, 160, 160), 0, False, 256)
  for _ in range(3):
    out, mask, params = T.synthesize_defect(image, defect, rng, photos, "brick")
    assert mask.dtype == bool and out.shape == image.shape
    assert T.MIN_DEFECT_AREA <= mask.mean() <= T.MAX_DEFECT_AREA
    assert params["area_fraction"] == pytest.approx(mask.mean())
    assert np.abs(out - image)[mask].mean() > 2.0


def test_bad_arguments_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="categories"):
    T.build_texture_benchmark(tmp_path / "x", categories=("carpet",))
  with pytest.raises(ValueError, match="test_good_fraction"):
    T.build_texture_benchmark(tmp_path / "x", test_good_fraction=0.9)


# ----------------------------------------------------------------------------
# Tiers: the hard tier pinned, the calibrated tier's exact masks and calibration
# ----------------------------------------------------------------------------

# sha256 over "path:sha256\n" of every PNG of the TINY-like build below: the hard tier's
# images are pinned (results on them stay comparable), whatever the builder adds.
HARD_TIER_GOLDEN = "4001578048ef447ff61d2b0ae581918964e4767dcc0afe137fb6612d4ca310fc"


def test_hard_tier_images_match_their_golden_digest(tmp_path):
  root = T.build_texture_benchmark(tmp_path / "t", seed=3, image_size=64, n_train=3, n_test=10,
                                   categories=T.HARD_CATEGORIES, crop_range=(64, 80))
  pngs = {k: v for k, v in _digests(root).items() if k.endswith(".png")}
  listing = "".join(f"{k}:{v}\n" for k, v in sorted(pngs.items()))
  assert hashlib.sha256(listing.encode()).hexdigest() == HARD_TIER_GOLDEN


def test_catalogue_has_two_tiers_and_every_photo_loads_offline():
  assert len(T.CATEGORIES) >= 8
  assert T.HARD_CATEGORIES == ("brick", "grass", "gravel") == T.SOURCE_PHOTOS
  assert {T.category_tier(c) for c in T.CATEGORIES} == set(T.TIERS)
  for c in T.CATEGORIES:
    photo = T.load_photo(c)
    assert photo.ndim == 2 and photo.dtype == np.float32 and photo.std() > 10, c
    cells = T.split_regions(photo.shape, "train", T.CATEGORY_SPECS[c].cells)
    # every cell holds the largest default crop
    assert min(min(y1 - y0, x1 - x0) for y0, x0, y1, x1 in cells) >= 160, c


@pytest.mark.parametrize("cells", [2, 3, 4])
def test_checkerboard_splits_are_disjoint_and_cover_the_photo(cells):
  shape = (301, 407)
  cover = np.zeros(shape, int)
  for split in ("train", "test"):
    for y0, x0, y1, x1 in T.split_regions(shape, split, cells):
      cover[y0:y1, x0:x1] += 1
  assert (cover == 1).all()
  assert T.split_regions((512, 512), "train", 2) == ((0, 0, 256, 256), (256, 256, 512, 512))


@pytest.fixture(scope="module")
def all_photos():
  return T.load_photos(T.CATEGORIES)


@pytest.mark.parametrize("category", T.CALIBRATED_CATEGORIES)
def test_calibrated_masks_are_exact(category, all_photos):
  # On the float image (before noise and rounding): the defect changes no pixel outside
  # its mask (tolerance 0) and every mask pixel by at least s·τ/f (τ = CHANGE_TOL =
  # 0.5 grey levels, f = the 2 px feather: the edge weight), so no mask pixel is unchanged.
  photo = all_photos[category]
  regions = T.split_regions(photo.shape, "test", T.CATEGORY_SPECS[category].cells)
  for j, defect in enumerate(T.DEFECT_TYPES):
    for s in (0.3, 2.0):
      rng = np.random.default_rng([11, j])
      image, _ = T._random_view(photo, regions, (128, 160), 256, rng)
      out, mask, params = T.synthesize_defect(image, defect, rng, all_photos, category,
                                              strength=s)
      change = np.abs(out.astype(np.float64) - image)
      assert (change[~mask] == 0).all(), (category, defect)
      assert change[mask].min() >= s * T.CHANGE_TOL / 2.0 * (1 - 1e-5), (category, defect)
      assert T.MIN_DEFECT_AREA <= mask.mean() <= T.MAX_DEFECT_AREA
      assert params["strength"] == s


def test_strength_scales_the_change_and_keeps_the_draw(all_photos):
  # Common random numbers: the mask and geometry do not depend on s; the change is
  # linear in s (before clipping).
  photo = all_photos["moon"]
  image, _ = T._random_view(photo, [(0, 0, 256, 256)], (128, 128), 128, np.random.default_rng(0))
  outs = {}
  for s in (0.5, 1.0):
    outs[s] = T.synthesize_defect(image, "stain", np.random.default_rng(4), all_photos, "moon",
                                  strength=s)
  np.testing.assert_array_equal(outs[0.5][1], outs[1.0][1])
  np.testing.assert_allclose(outs[1.0][0] - image, 2 * (outs[0.5][0] - image), atol=1e-3)


CAL = dict(image_size=64, n_train=3, n_test=10, crop_range=(64, 80))


def test_calibrated_build_records_tiers_and_strengths(tmp_path):
  cats = ("brick", "moon", "retina")
  root = T.build_texture_benchmark(tmp_path / "c", seed=5, categories=cats,
                                   strengths={"moon": 0.7, "retina": 1.3}, **CAL)
  manifest = T.read_manifest(root)
  info = manifest["categories"]
  assert info["brick"]["tier"] == "hard" and info["brick"]["strength"] is None
  assert info["moon"]["tier"] == "calibrated" and info["moon"]["strength"] == 0.7
  assert info["moon"]["calibration"] is None  # not the committed strength
  assert manifest["params"]["strengths"] == {"moon": 0.7, "retina": 1.3}
  assert {r["tier"] for r in manifest["images"] if r["category"] == "retina"} == {"calibrated"}
  for rec in manifest["images"]:
    if rec["mask"] is not None and rec["tier"] == "calibrated":
      assert rec["defect_params"]["strength"] == info[rec["category"]]["strength"]
  # the reader sees an MVTec layout
  train, test = mvtec.scan_category(root, "moon")
  assert len(train) == CAL["n_train"] and len(test) == CAL["n_test"]


def test_committed_calibration_is_recorded_in_the_manifest(tmp_path):
  assert set(T.CALIBRATED_STRENGTHS) == set(T.CALIBRATED_CATEGORIES)
  lo, hi = T.CALIBRATION_SETTINGS.band
  for c in T.CALIBRATED_CATEGORIES:
    assert lo <= T.CALIBRATION_RESULTS[c]["image_auroc"] <= hi, c
  root = T.build_texture_benchmark(tmp_path / "c", seed=5, categories=("coins",), **CAL)
  cal = T.read_manifest(root)["categories"]["coins"]["calibration"]
  assert cal["settings"]["seed"] == T.CALIBRATION_SETTINGS.seed
  assert cal["settings"]["band"] == list(T.CALIBRATION_SETTINGS.band)
  assert cal["image_auroc"] == T.CALIBRATION_RESULTS["coins"]["image_auroc"]
  assert T.read_manifest(root)["categories"]["coins"]["strength"] == T.CALIBRATED_STRENGTHS["coins"]


def test_calibrated_build_is_deterministic_and_strength_moves_only_defects(tmp_path):
  kw = dict(seed=5, categories=("moon",), **CAL)
  a = _digests(T.build_texture_benchmark(tmp_path / "a", strengths={"moon": 0.7}, **kw))
  b = _digests(T.build_texture_benchmark(tmp_path / "b", strengths={"moon": 0.7}, **kw))
  c = _digests(T.build_texture_benchmark(tmp_path / "c", strengths={"moon": 1.4}, **kw))
  assert a == b
  pngs = [k for k in a if k.endswith(".png")]
  moved = {k for k in pngs if a[k] != c[k]}
  assert moved and all("/test/" in k and "/good/" not in k for k in moved)
  assert not any("ground_truth" in k for k in moved)  # masks do not depend on s


def test_validation_defects_come_from_their_own_seed(tmp_path, all_photos):
  # The calibration split ("validation defects") draws from settings.seed on its own
  # split ids: no image equals a built test image, and another seed gives other defects.
  settings = T.CalibrationSettings(image_size=64, n_fit=2, n_good=2, n_defective=5,
                                   crop_range=(64, 80))
  root = T.build_texture_benchmark(tmp_path / "t", seed=settings.seed, categories=("moon",),
                                   strengths={"moon": 1.0}, **{**CAL, "n_test": 10})
  built = {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
           for p in (root / "moon" / "test").rglob("*.png")}
  images, masks, kinds = T.calibration_defects("moon", 1.0, settings, all_photos)
  assert kinds == list(T.DEFECT_TYPES)
  assert not built & {hashlib.sha256(i.tobytes()).hexdigest() for i in images}
  again, masks2, _ = T.calibration_defects("moon", 1.0, settings, all_photos)
  np.testing.assert_array_equal(images, again)
  other, masks3, _ = T.calibration_defects(
      "moon", 1.0, dataclasses.replace(settings, seed=settings.seed + 1), all_photos)
  assert all((m2 != m3).any() for m2, m3 in zip(masks2, masks3))
  assert not (images == other).all(axis=(1, 2)).any()


def _cell_features(paths):
  """A cheap stand-in backbone: per 8x8-pixel cell, mean, std, min, max and mean
  absolute gradients ([N, S/8, S/8, 6]); enough for PaDiM to see a defect."""
  out = []
  for p in paths:
    x = np.asarray(Image.open(p), np.float32)
    gy, gx = np.abs(np.diff(x, axis=0, append=x[-1:])), np.abs(np.diff(x, axis=1, append=x[:, -1:]))
    s = x.shape[0] // 8
    cells = lambda a: a.reshape(s, 8, s, 8).transpose(0, 2, 1, 3).reshape(s, s, 64)
    c, cgy, cgx = cells(x), cells(gy), cells(gx)
    out.append(np.stack([c.mean(-1), c.std(-1), c.min(-1), c.max(-1), cgy.mean(-1),
                         cgx.mean(-1)], -1) / 64.0)
  return np.stack(out).astype(np.float32)


SMALL_CAL = T.CalibrationSettings(image_size=64, n_fit=24, n_good=16, n_defective=20,
                                  crop_range=(64, 80), eval_size=64, smoothing_sigma=1.0,
                                  padim_n_channels=None, band=(0.62, 0.8), tol=0.03,
                                  bounds=(1 / 64, 16.0))


def test_calibration_lands_in_its_band_and_is_reproducible(tmp_path):
  r = T.calibrate_strength("moon", _cell_features, SMALL_CAL, workdir=tmp_path / "w")
  lo, hi = SMALL_CAL.band
  assert lo <= r["image_auroc"] <= hi
  assert r["seed"] == SMALL_CAL.seed and r["n_defective"] == SMALL_CAL.n_defective
  # Re-measuring at the found strength gives the recorded AUROC (deterministic split).
  again = T.calibration_auroc("moon", r["strength"], _cell_features, SMALL_CAL)
  assert again == r["image_auroc"]
  # The search moved the right way: the AUROCs seen rise with the strength.
  seen = sorted(r["iterations"])
  assert seen[0][1] <= seen[-1][1]
  table = T.format_calibration_table({"moon": r})
  assert "CALIBRATED_STRENGTHS" in table and repr(r["strength"]) in table


def test_calibration_out_of_reach_is_an_error(tmp_path):
  # Strengths capped far below what PaDiM needs: the band cannot be reached.
  tiny = dataclasses.replace(SMALL_CAL, bounds=(1e-4, 2e-4), max_iter=2)
  with pytest.raises(ValueError, match="calibration of 'moon'.*no strength"):
    T.calibrate_strength("moon", _cell_features, tiny, workdir=tmp_path)
  with pytest.raises(ValueError, match="hard"):
    T.calibrate_strength("brick", _cell_features, tiny)
  with pytest.raises(ValueError, match="strengths"):
    T.build_texture_benchmark(tmp_path / "x", categories=("moon",), strengths={"brick": 1.0})


def test_category_vocabulary_expands_all_tiers_and_names_in_order():
  assert T.expand_categories() == T.expand_categories("") == T.expand_categories(["all"]) == T.CATEGORIES
  assert set(T.CATEGORIES) == set(T.CATEGORY_SPECS) and len(T.CATEGORIES) == 9
  assert T.expand_categories("hard") == T.HARD_CATEGORIES
  assert T.expand_categories(["calibrated"]) == T.CALIBRATED_CATEGORIES
  # First mention wins, each category once; whitespace around names is ignored.
  assert T.expand_categories("moon, hard,brick,all") == (
      "moon", *T.HARD_CATEGORIES, *(c for c in T.CALIBRATED_CATEGORIES if c != "moon"))
  with pytest.raises(ValueError, match=r"^--categories: \['carpet'\] are neither texture categories"):
    T.expand_categories("brick,carpet", where="--categories")


def test_shared_build_keeps_the_hard_tier_apart_from_the_full_build(tmp_path):
  base = tmp_path / "textures"
  for selection in ("hard", "brick", "gravel,brick"):
    assert T.shared_build(base, T.expand_categories(selection)) == (base, T.HARD_CATEGORIES)
  for selection in ("all", "calibrated", "brick,moon"):
    assert T.shared_build(base, T.expand_categories(selection)) == (tmp_path / "textures-all", T.CATEGORIES)


def test_a_build_reads_the_same_vocabulary(tmp_path):
  kw = dict(seed=3, image_size=32, n_train=1, n_test=2, crop_range=(64, 80))
  root = T.build_texture_benchmark(tmp_path / "t", categories="gravel,hard", **kw)
  assert T.read_manifest(root)["params"]["categories"] == ["gravel", "brick", "grass"]


# ----------------------------------------------------------------------------
# Strength left open (the difficulty ladder's draws) and the shared bisection
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["grass", "coins"])
def test_a_defect_draw_is_render_sample_at_every_strength(category, all_photos):
  kw = dict(seed=7, image_size=64, crop_range=(64, 80), noise_sigma=1.5)
  for i, kind in enumerate(T.DEFECT_TYPES):
    draw = T.draw_defective(category, all_photos, "test", kind, i, **kw)
    clean = draw.clean()
    for s in (0.4, 2.5):
      image, mask, prov, params = T.render_sample(category, all_photos, "test", kind, i,
                                                  strength=s, **kw)
      np.testing.assert_array_equal(draw.image(s), image)
      np.testing.assert_array_equal(draw.mask_HxW, mask)
      assert prov == draw.provenance and params == draw.defect_params(s)
      np.testing.assert_array_equal(image[~mask], clean[~mask])   # off the mask: clean
  with pytest.raises(ValueError, match="strength"):
    draw.image(0.0)


def test_bisection_shares_evaluations_and_stops_at_saturation():
  # A planted smooth AUROC curve a(s) = 0.5 + 0.45 · s / (s + 1), saturating at 0.95.
  calls = []

  def auroc(s):
    calls.append(s)
    return 0.5 + 0.45 * s / (s + 1.0)

  bounds, tol = (1 / 32, 8.0), 0.01
  seen = [[8.0, auroc(8.0)]]
  chosen, seen = T.bisect_strengths(auroc, [0.6, 0.7, 0.8, 0.97], bounds, tol, 8, seen=seen)
  assert calls == [s for s, _ in seen]  # each strength evaluated once, in order
  for t, (s, a) in zip([0.6, 0.7, 0.8], chosen):
    assert abs(a - t) <= tol and a == auroc(s)
  # 0.97 lies above a(8) = 0.9: no evaluation, the top strength is kept.
  assert chosen[3] == [8.0, auroc(8.0)]
  # Shared evaluations: fewer than three separate searches need.
  separate = sum(len(T.bisect_strengths(auroc, [t], bounds, tol, 8)[1]) for t in (0.6, 0.7, 0.8))
  assert len(seen) - 1 < separate
  # One target, nothing seen: plain geometric bisection (first point sqrt(lo · hi)).
  _, single = T.bisect_strengths(auroc, [0.8], bounds, tol, 1)
  assert single == [[0.5, auroc(0.5)]]
