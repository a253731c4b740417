"""The embedded texture benchmark: layout, determinism, disjoint crops, masks, reuse."""

from __future__ import annotations

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
