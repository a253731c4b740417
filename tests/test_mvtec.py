"""MVTec AD and VisA readers: labels, masks, resizing, and a named error per bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailjax.data import mvtec, visa
from tailjax.data.mvtec import DatasetError, MissingDataError

H, W = 24, 32  # non-square, so height/width mix-ups show


def _save(path: Path, array: np.ndarray) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def _image(rng, gray: bool) -> np.ndarray:
  shape = (H, W) if gray else (H, W, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _mask(rng, scale: int = 255) -> np.ndarray:
  m = np.zeros((H, W), np.uint8)
  y, x = rng.integers(2, 14), rng.integers(2, 20)
  m[y:y + 6, x:x + 9] = scale
  return m


def make_tree(root: Path, seed: int = 0) -> dict:
  """A mini MVTec tree: an RGB and a grayscale category; returns the written arrays."""
  rng = np.random.default_rng(seed)
  written = {}
  for cat, gray in (("bottle", False), ("grid", True)):
    for i in range(3):
      written[(cat, "train", "good", i)] = _save(
          root / cat / "train" / "good" / f"{i:03d}.png", _image(rng, gray))
    for i in range(2):
      written[(cat, "test", "good", i)] = _save(
          root / cat / "test" / "good" / f"{i:03d}.png", _image(rng, gray))
    for defect in ("crack", "hole"):
      for i in range(2):
        written[(cat, "test", defect, i)] = _save(
            root / cat / "test" / defect / f"{i:03d}.png", _image(rng, gray))
        written[(cat, "mask", defect, i)] = _save(
            root / cat / "ground_truth" / defect / f"{i:03d}_mask.png", _mask(rng))
  (root / "license_files").mkdir()  # not a category: no train/ inside
  return written


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "mvtec"
  return root, make_tree(root)


def test_list_categories(tree):
  root, _ = tree
  assert mvtec.list_categories(root) == ["bottle", "grid"]


def test_scan_labels_types_and_masks(tree):
  root, written = tree
  train, test = mvtec.scan_category(root, "grid")
  assert len(train) == 3 and train.labels.tolist() == [0, 0, 0]
  assert test.defect_types == ("crack", "crack", "good", "good", "hole", "hole")
  assert test.labels.tolist() == [1, 1, 0, 0, 1, 1]
  for path, kind, mask in zip(test.image_paths, test.defect_types, test.mask_paths):
    if kind == "good":
      assert mask is None
    else:
      assert mask == root / "grid" / "ground_truth" / kind / f"{path.stem}_mask.png"


@pytest.mark.parametrize("category,gray", [("bottle", False), ("grid", True)])
def test_load_at_native_size_returns_the_pixels(tree, category, gray):
  root, written = tree
  test = mvtec.scan_split(root, category, "test")
  images, masks = test.load()
  assert images.shape == (6, H, W, 3) and images.dtype == np.uint8
  assert masks.shape == (6, H, W) and masks.dtype == np.uint8
  for i, (kind, path) in enumerate(zip(test.defect_types, test.image_paths)):
    original = np.asarray(Image.open(written[(category, "test", kind, int(path.stem))]))
    expected = np.repeat(original[..., None], 3, -1) if gray else original
    np.testing.assert_array_equal(images[i], expected)
    if kind == "good":
      assert not masks[i].any()
    else:
      m = np.asarray(Image.open(written[(category, "mask", kind, int(path.stem))]))
      np.testing.assert_array_equal(masks[i], (m > 0).astype(np.uint8))


def test_resize_bilinear_images_nearest_masks(tree):
  root, _ = tree
  test = mvtec.scan_split(root, "grid", "test")
  images, masks = test.load((12, 16))
  assert images.shape == (6, 12, 16, 3)
  assert (images[..., 0] == images[..., 2]).all()  # grayscale replicated
  assert set(np.unique(masks).tolist()) <= {0, 1}
  # Nearest-neighbour halving with pixel-centre sampling picks source pixel 2i+1.
  np.testing.assert_array_equal(masks, test.load_masks()[:, 1::2, 1::2])
  square = test.load_images(20)
  assert square.shape == (6, 20, 20, 3)


def test_masks_of_zeros_and_ones_are_accepted(tree):
  root, _ = tree
  path = root / "grid" / "ground_truth" / "crack" / "000_mask.png"
  m = (np.asarray(Image.open(path)) > 0).astype(np.uint8)
  _save(path, m)
  masks = mvtec.scan_split(root, "grid", "test").load_masks()
  np.testing.assert_array_equal(masks[0], m)


def _raises(exc, path, fn, *args):
  with pytest.raises(exc, match=re.escape(str(path))):
    fn(*args)


def test_missing_folders_name_the_path(tmp_path):
  root = tmp_path / "mvtec"
  _raises(MissingDataError, root, mvtec.list_categories, root)
  make_tree(root)
  _raises(MissingDataError, root / "carpet", mvtec.scan_split, root, "carpet", "train")
  shutil.rmtree(root / "grid" / "train" / "good")
  _raises(MissingDataError, root / "grid" / "train" / "good", mvtec.scan_split, root, "grid",
          "train")
  shutil.rmtree(root / "bottle" / "test")
  _raises(MissingDataError, root / "bottle" / "test", mvtec.scan_split, root, "bottle", "test")
  assert issubclass(MissingDataError, FileNotFoundError)


def test_empty_category(tree):
  root, _ = tree
  for p in (root / "grid" / "train" / "good").iterdir():
    p.unlink()
  with pytest.raises(DatasetError, match="empty category.*" + re.escape(str(root / "grid"))):
    mvtec.scan_split(root, "grid", "train")


def test_defective_image_without_mask(tree):
  root, _ = tree
  (root / "grid" / "ground_truth" / "hole" / "001_mask.png").unlink()
  with pytest.raises(MissingDataError, match=re.escape(str(root / "grid" / "test" / "hole" /
                                                           "001.png"))):
    mvtec.scan_split(root, "grid", "test")


def test_mask_image_size_mismatch(tree):
  root, _ = tree
  path = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
  _save(path, np.zeros((H + 1, W), np.uint8))
  test = mvtec.scan_split(root, "bottle", "test")
  with pytest.raises(DatasetError, match=re.escape(str(path))):
    test.load_masks()


def test_non_binary_mask(tree):
  root, _ = tree
  path = root / "bottle" / "ground_truth" / "hole" / "000_mask.png"
  m = np.asarray(Image.open(path)).copy()
  m[0, :4] = 128  # an anti-aliased edge
  _save(path, m)
  with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*not binary"):
    mvtec.scan_split(root, "bottle", "test").load()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(tree, damage):
  root, _ = tree
  path = root / "bottle" / "train" / "good" / "001.png"
  data = path.read_bytes()
  path.write_bytes(b"not an image at all" if damage == "garbage" else data[:len(data) // 2])
  train = mvtec.scan_split(root, "bottle", "train")
  with pytest.raises(DatasetError, match=re.escape(str(path))):
    train.load_images(16)


# ----------------------------------------------------------------------------
# VisA
# ----------------------------------------------------------------------------


def make_visa(root: Path, seed: int = 0) -> list[tuple]:
  rng = np.random.default_rng(seed)
  rows = []
  for obj in ("candle", "pcb1"):
    base = Path(obj) / "Data"
    for i in range(3):
      rel = base / "Images" / "Normal" / f"{i:04d}.JPG"
      _save(root / rel, _image(rng, False))
      rows.append((obj, "train", "normal", str(rel), ""))
    rel = base / "Images" / "Normal" / "0100.JPG"
    _save(root / rel, _image(rng, False))
    rows.append((obj, "test", "normal", str(rel), ""))
    for i, scale in enumerate((255, 1)):  # VisA masks come both ways
      rel = base / "Images" / "Anomaly" / f"{i:03d}.JPG"
      rel_mask = base / "Masks" / "Anomaly" / f"{i:03d}.png"
      _save(root / rel, _image(rng, False))
      _save(root / rel_mask, _mask(rng, scale))
      rows.append((obj, "test", "anomaly", str(rel), str(rel_mask)))
  _write_csv(root, rows)
  return rows


def _write_csv(root, rows, header="object,split,label,image,mask"):
  path = root / visa.VISA_CSV
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
  return path


def test_visa_reader(tmp_path):
  root = tmp_path / "visa"
  make_visa(root)
  assert visa.list_visa_categories(root) == ["candle", "pcb1"]
  train = visa.scan_visa_split(root, "candle", "train")
  assert len(train) == 3 and train.labels.tolist() == [0, 0, 0]
  test = visa.scan_visa_split(root, "pcb1", "test")
  assert test.labels.tolist() == [0, 1, 1]
  assert test.defect_types == ("good", "anomaly", "anomaly")
  images, masks = test.load(16)
  assert images.shape == (3, 16, 16, 3) and masks.shape == (3, 16, 16)
  assert not masks[0].any()
  full = test.load_masks()
  for i in (1, 2):  # 0/255 and 0/1 masks binarise to the same kind of mask
    written = np.asarray(Image.open(test.mask_paths[i]))
    np.testing.assert_array_equal(full[i], (written > 0).astype(np.uint8))
    assert full[i].sum() == 54


def test_visa_errors_name_the_csv(tmp_path):
  root = tmp_path / "visa"
  _raises(MissingDataError, root, visa.read_visa_csv, root)
  rows = make_visa(root)
  bad = [r if r[2] != "anomaly" else (*r[:4], "") for r in rows]
  csv_path = _write_csv(root, bad)
  _raises(MissingDataError, csv_path, visa.scan_visa_split, root, "candle", "test")
  _write_csv(root, [(*rows[0][:2], "defect", *rows[0][3:])])
  _raises(DatasetError, csv_path, visa.read_visa_csv, root)
  _write_csv(root, [r[:4] for r in rows], header="object,split,label,image")
  _raises(DatasetError, csv_path, visa.read_visa_csv, root)
  _write_csv(root, rows)
  (root / rows[0][3]).unlink()
  _raises(MissingDataError, root / rows[0][3], visa.scan_visa_split, root, "candle", "train")
