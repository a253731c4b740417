"""Feature cache (reuse, invalidation, content keys) and the pre-extracted .npz reader."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailjax.data import features as F
from tailjax.data.mvtec import DatasetError, MissingDataError


class FakeExtractor:
  """Cheap stand-in for a backbone: 4x4 and 2x2 average-pooled pixels; counts calls."""

  def __init__(self):
    self.calls = 0
    self.images_seen = 0

  def __call__(self, images_NxHxWx3):
    self.calls += 1
    self.images_seen += len(images_NxHxWx3)
    x = images_NxHxWx3.astype(np.float32) / 255.0
    n, h, w, c = x.shape
    pool = lambda s: x.reshape(n, h // s, s, w // s, s, c).mean(axis=(2, 4))
    return {4: pool(4), 8: pool(8), "unused": np.zeros(n)}


def _images(folder: Path, n: int = 5, seed: int = 0) -> list[Path]:
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(n):
    p = folder / f"{i:03d}.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  return paths


def _get(paths, extractor, cache, **kw):
  args = dict(extractor_id="fake-v1", resolution=16, layers=(4, 8), cache_dir=cache)
  args.update(kw)
  return F.cached_features(paths, extractor, batch_size=2, **args)


def test_second_call_reuses_the_cache(tmp_path):
  paths = _images(tmp_path / "img")
  fake = FakeExtractor()
  first = _get(paths, fake, tmp_path / "cache")
  assert set(first) == {4, 8}
  assert first[4].shape == (5, 4, 4, 3) and first[8].shape == (5, 2, 2, 3)
  assert fake.calls == 3 and fake.images_seen == 5  # batches of 2
  second = _get(paths, fake, tmp_path / "cache")
  assert fake.calls == 3
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
  assert not list((tmp_path / "cache").glob(".*"))  # no temp files left behind


def test_changed_file_recomputes(tmp_path):
  paths = _images(tmp_path / "img")
  fake = FakeExtractor()
  before = _get(paths, fake, tmp_path / "cache")
  # Rewrite one image immediately (same size, probably the same mtime tick).
  Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(paths[2])
  after = _get(paths, fake, tmp_path / "cache")
  assert fake.images_seen == 10
  changed = [not np.array_equal(before[4][i], after[4][i]) for i in range(5)]
  assert changed == [False, False, True, False, False]
  np.testing.assert_allclose(after[4][2], 7 / 255.0, rtol=1e-6)


def test_key_depends_on_content_params_and_order_not_location(tmp_path):
  paths = _images(tmp_path / "img")
  key = F.feature_cache_key(paths, "fake-v1", 16, (4, 8))
  moved = tmp_path / "moved"
  shutil.copytree(tmp_path / "img", moved)
  assert F.feature_cache_key(sorted(moved.iterdir()), "fake-v1", 16, (4, 8)) == key
  assert F.feature_cache_key(paths, "fake-v2", 16, (4, 8)) != key
  assert F.feature_cache_key(paths, "fake-v1", 32, (4, 8)) != key
  assert F.feature_cache_key(paths, "fake-v1", 16, (4,)) != key
  assert F.feature_cache_key(paths[::-1], "fake-v1", 16, (4, 8)) != key
  fake = FakeExtractor()
  _get(paths, fake, tmp_path / "cache")
  _get(sorted(moved.iterdir()), fake, tmp_path / "cache")
  assert fake.calls == 3


def test_corrupt_entry_is_recomputed(tmp_path):
  paths = _images(tmp_path / "img")
  fake = FakeExtractor()
  good = _get(paths, fake, tmp_path / "cache")
  entry = next((tmp_path / "cache").glob("*.npz"))
  entry.write_bytes(entry.read_bytes()[:100])
  again = _get(paths, fake, tmp_path / "cache")
  assert fake.calls == 6
  np.testing.assert_array_equal(good[8], again[8])
  assert F._read_entry(entry, entry.stem, (4, 8), 5) is not None


def test_extractor_errors_are_named(tmp_path):
  paths = _images(tmp_path / "img")

  def nan_extractor(images):
    out = FakeExtractor()(images)
    out[4][-1, 0, 0, 0] = np.nan
    return out

  with pytest.raises(FloatingPointError, match=re.escape(str(paths[1]))):
    _get(paths, nan_extractor, tmp_path / "cache")
  with pytest.raises(KeyError, match="16"):
    _get(paths, FakeExtractor(), tmp_path / "cache", layers=(16,))
  assert not list((tmp_path / "cache").glob("*.npz"))
  with pytest.raises(MissingDataError, match="nope.png"):
    _get([tmp_path / "nope.png"], FakeExtractor(), tmp_path / "cache")


# ----------------------------------------------------------------------------
# .npz reader
# ----------------------------------------------------------------------------


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return path


def _valid(rng, n=4):
  labels = np.array([0, 0, 1, 1])
  masks = np.zeros((n, 8, 8), np.uint8)
  masks[2:, 2:4, 3:5] = 255
  return dict(features=rng.normal(size=(n, 3, 3, 5)).astype(np.float32), labels=labels,
              masks=masks)


def test_npz_roundtrip(tmp_path):
  arrays = _valid(np.random.default_rng(0))
  fs = F.load_feature_npz(_npz(tmp_path / "f.npz", **arrays))
  np.testing.assert_array_equal(fs.features, arrays["features"])
  assert fs.labels.tolist() == [0, 0, 1, 1]
  np.testing.assert_array_equal(fs.masks, arrays["masks"] > 0)
  no_masks = {k: v for k, v in arrays.items() if k != "masks"}
  assert F.load_feature_npz(_npz(tmp_path / "g.npz", **no_masks)).masks is None


@pytest.mark.parametrize("case", ["nan", "inf", "no_labels", "rank", "label_count",
                                  "label_values", "mask_values", "mask_count", "good_mask",
                                  "non_square"])
def test_npz_bad_content_names_the_file(tmp_path, case):
  a = _valid(np.random.default_rng(1))
  if case == "nan":
    a["features"][1, 2, 0, 4] = np.nan
  elif case == "inf":
    a["features"][0, 0, 0, 0] = np.inf
  elif case == "no_labels":
    del a["labels"]
  elif case == "rank":
    a["features"] = a["features"][:, 0]
  elif case == "label_count":
    a["labels"] = a["labels"][:3]
  elif case == "label_values":
    a["labels"] = np.array([0, 2, 1, 1])
  elif case == "mask_values":
    a["masks"][3, 0, 0] = 17
  elif case == "mask_count":
    a["masks"] = a["masks"][:2]
  elif case == "good_mask":
    a["masks"][0, 0, 0] = 255
  elif case == "non_square":
    a["masks"] = a["masks"][:, :, :6]
  path = _npz(tmp_path / f"{case}.npz", **a)
  with pytest.raises(DatasetError, match=re.escape(str(path))):
    F.load_feature_npz(path)


def test_npz_unreadable(tmp_path):
  path = tmp_path / "broken.npz"
  path.write_bytes(b"PK\x03\x04 definitely not a zip")
  with pytest.raises(DatasetError, match=re.escape(str(path))):
    F.load_feature_npz(path)
  with pytest.raises(MissingDataError, match="absent.npz"):
    F.load_feature_npz(tmp_path / "absent.npz")
