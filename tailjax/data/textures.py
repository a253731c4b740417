"""Embedded texture benchmark: real texture photos with synthetic defects, MVTec AD layout.

No dataset can be downloaded at run time, so the default study-A data is built
from the three real texture photographs that scikit-image ships
(``skimage.data.brick``, ``grass``, ``gravel``: 512x512, 8-bit grayscale).
Each photo becomes one category::

  <root>/<category>/train/good/000.png ...
  <root>/<category>/test/good/000.png ...
  <root>/<category>/test/<defect>/000.png ...
  <root>/<category>/ground_truth/<defect>/000_mask.png   (0/255; none for good)
  <root>/manifest.json     per-image provenance (crop box, augmentation, defect params)
  <root>/COMPLETE          the build parameters, written last

so ``tailjax.data.mvtec`` reads it like MVTec AD (grayscale images, like
MVTec's grid/screw/zipper).

Images. The photo is cut into a 2x2 checkerboard of 256x256 quadrants: the
diagonal (top-left, bottom-right) feeds the train split, the anti-diagonal the
test split, so train and test crops never share a pixel while both splits see
the top and bottom, left and right of the photo (its slow changes of lighting
and perspective). A crop is a random square of side ``s ~ U{crop_range}``
pixels (default 128..160) inside one of its split's quadrants, rotated
by a random multiple of 90 degrees, randomly mirrored, resized to
``image_size`` (bicubic) and given mild Gaussian sensor noise (σ = 1.5 grey
levels) before quantisation. The same pipeline makes train, good test and
defective test images, so the only systematic difference is the defect.

Defects (exact pixel masks; area 0.1-5 % of the image, enforced by rejection):

* ``scratch``: a thin smooth curve (random heading and curvature, 1.5-3.5 px
  wide), lighter or darker by 12-60 grey levels x gain, anti-aliased.
  Mask = pixels whose centre lies within half the stroke width of the curve
  (the stroke's half-coverage contour).
* ``foreign_material``: a patch cut from a *different* photograph, pasted
  through an irregular blob with a 0.7 px feathered edge; 35 % of the time its
  mean is matched to the covered host pixels so only the texture differs.
  Mask = feather weight >= 0.5.
* ``stain``: a smooth blob (edge blur σ 1.5-4 px) that shifts intensity by
  ±12-45 grey levels x gain and washes out up to half the local contrast.
  Mask = blob weight >= 0.5 (its half-strength contour).
* ``hole``: a dark blob (1.2-3.5 image stds below the image mean, at least
  grey level 5; 10-35 % of the texture showing through) whose darkness ramps
  up over a 1.5-4 px rim from the edge, with an optional lit lip just inside.
  Every change lies inside the blob; mask = blob.
* ``warp``: a smooth random displacement field (peak 3-8 px) windowed by a
  soft blob centred on image structure (sampled ∝ local gradient energy, since
  a warp of a flat surface is invisible), applied with cubic interpolation.
  Mask = pixels displaced by >= 0.5 px, where a textured surface visibly changes.

Blobs are star-shaped: a rotated ellipse (aspect 1-2.2) whose radius is
modulated by random harmonics 2..6. Lengths are given for 256 px images and
scale with ``image_size``. Intensity changes scale with the texture's contrast,
``gain = clip((std(image) / 26)^2.5, 1, 3)`` (26 = the brick photo's std;
about 1 for brick, 2.6 for grass and gravel), since a busy texture hides a
shift that a flat one shows. Strengths are drawn from ranges that reach down
to faint, so the benchmark is not saturated: thin scratches in grass or small
warps in gravel are hard.

Difficulty (default build, seed 0): PaDiM on EfficientNet-Lite0 stride-8 +
stride-16 features (224 px input, 100 random channels, σ = 4 smoothing) gives
image AUROC 0.78 / 0.63 / 0.61, pixel AUROC 0.93 / 0.73 / 0.76 and pixel AP
0.46 / 0.13 / 0.15 for brick / grass / gravel; per defect type it ranges from
chance (brick stains, grass warps) to 1.0 (foreign material on brick).

Determinism: every image draws from its own
``numpy.random.default_rng([seed, category_id, split_id, index])``, so the
same arguments give byte-identical PNGs, a larger ``n_train`` extends a
smaller build, and categories do not depend on which others are built.

Reuse: a build lives in a temporary sibling directory and is renamed onto
``root`` only when complete (``tailjax.io.atomic_directory``); ``COMPLETE`` is
its last file. A later call with the same parameters finds a matching
``COMPLETE`` and the expected files and returns at once; a copy without the
marker, with other parameters or with missing files is rebuilt. A directory
that holds anything else is never deleted: that raises an error naming it.
Partial copies left beside ``root`` by killed builds are removed once they are
an hour old.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import skimage.data
import skimage.transform
from PIL import Image
from scipy.spatial import cKDTree

from tailjax.io import atomic_directory, atomic_write_json, atomic_write_text

BUILDER_VERSION = 1
SOURCE_PHOTOS = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "foreign_material", "stain", "hole", "warp")
MIN_DEFECT_AREA, MAX_DEFECT_AREA = 0.001, 0.05  # fraction of the image
_SPLIT_IDS = {"train": 0, "test": 1}
_MARKER = "COMPLETE"
_MANIFEST = "manifest.json"
_REFERENCE_SIZE = 256  # defect lengths below are given at this image size
_STALE_PARTIAL_S = 3600.0  # a build takes seconds; older partial copies are dead


def default_benchmark_root() -> Path:
  """``$TAILJAX_DATA/textures`` if ``TAILJAX_DATA`` is set, else ``./data/textures``."""
  base = os.environ.get("TAILJAX_DATA")
  return (Path(base) if base else Path.cwd() / "data") / "textures"


def load_photo(name: str) -> np.ndarray:
  """The scikit-image texture photo ``name`` as float32 grayscale in [0, 255], [H, W]."""
  if name not in SOURCE_PHOTOS:
    raise ValueError(f"unknown texture photo {name!r}; choose from {SOURCE_PHOTOS}")
  photo = np.asarray(getattr(skimage.data, name)())
  if photo.ndim == 3:  # a future scikit-image might ship them in colour
    photo = (photo[..., :3].astype(np.float64) @ [0.2125, 0.7154, 0.0721])
  return photo.astype(np.float32)


# ----------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------


def split_regions(photo_shape: tuple[int, int],
                  split: str) -> tuple[tuple[int, int, int, int], ...]:
  """The (y0, x0, y1, x1) quadrants that feed ``split``: train the diagonal, test the
  anti-diagonal of a 2x2 checkerboard, so the two splits share no pixel."""
  h, w = photo_shape
  hh, hw = h // 2, w // 2
  if split == "train":
    return (0, 0, hh, hw), (hh, hw, h, w)
  if split == "test":
    return (0, hw, hh, w), (hh, 0, h, hw)
  raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def render_view(photo_HxW: np.ndarray, box_yxhw: Sequence[int], rot90: int, flip: bool,
                image_size: int) -> np.ndarray:
  """The defect-free float image of one crop: ``photo[box]``, rotated by ``rot90``
  quarter turns (``np.rot90``), mirrored left-right if ``flip``, bicubic-resized
  to ``image_size``. ``manifest.json`` records these arguments for every image."""
  y, x, h, w = box_yxhw
  crop = np.rot90(photo_HxW[y:y + h, x:x + w], rot90)
  if flip:
    crop = crop[:, ::-1]
  return skimage.transform.resize(
      crop, (image_size, image_size), order=3, mode="reflect",
      anti_aliasing=max(h, w) > image_size, preserve_range=True).astype(np.float32)


def _random_view(photo_HxW, regions, crop_range, image_size, rng):
  """A random augmented crop inside one of ``regions``, resized; returns (image, provenance)."""
  region = regions[int(rng.integers(len(regions)))]
  y0, x0, y1, x1 = region
  lo, hi = crop_range
  side = int(rng.integers(lo, hi + 1))
  if side > min(y1 - y0, x1 - x0):
    raise ValueError(f"crop side {side} does not fit the region {region}")
  y = int(rng.integers(y0, y1 - side + 1))
  x = int(rng.integers(x0, x1 - side + 1))
  k = int(rng.integers(4))
  flip = bool(rng.random() < 0.5)
  prov = {"box_yxhw": [y, x, side, side], "rot90": k, "flip": flip}
  return render_view(photo_HxW, prov["box_yxhw"], k, flip, image_size), prov


# ----------------------------------------------------------------------------
# Defect shapes
# ----------------------------------------------------------------------------


def _blob(size: int, area_px: float, rng, centre=None) -> np.ndarray:
  """An irregular star-shaped blob of roughly ``area_px`` pixels, bool [size, size]."""
  r0 = np.sqrt(area_px / np.pi)
  aspect = rng.uniform(1.0, 2.2)
  a, b = r0 * np.sqrt(aspect), r0 / np.sqrt(aspect)
  angle = rng.uniform(0.0, np.pi)
  cy, cx = rng.uniform(0.12 * size, 0.88 * size, size=2) if centre is None else centre
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  u = (np.cos(angle) * dx + np.sin(angle) * dy) / a
  v = (-np.sin(angle) * dx + np.cos(angle) * dy) / b
  rho, theta = np.hypot(u, v), np.arctan2(v, u)
  log_radius = np.zeros_like(theta)
  for k in range(2, 7):
    log_radius += rng.normal(0.0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  return rho <= np.exp(log_radius)


def _blob_area_px(size: int, rng) -> float:
  return float(np.exp(rng.uniform(np.log(0.004), np.log(0.04)))) * size * size


def _local_mean(image_HxW, size):
  return ndi.gaussian_filter(image_HxW, sigma=8.0 * size / _REFERENCE_SIZE, mode="reflect")


def _scratch(image, rng, scale, gain, photos, category):
  del photos, category
  size = image.shape[0]
  length = rng.uniform(0.15, 0.5) * size
  width = max(1.0, rng.uniform(1.5, 3.5) * scale)
  step = 0.25
  t = np.arange(int(length / step)) * step
  # Heading = start angle + constant curvature + a slow wiggle: a smooth stroke.
  heading = (rng.uniform(0, 2 * np.pi) + rng.normal(0.0, 1.5) * t / size
             + rng.uniform(0.0, 0.6) * np.sin(2 * np.pi * t / (rng.uniform(0.3, 1.0) * size)
                                              + rng.uniform(0, 2 * np.pi)))
  start = rng.uniform(0.15 * size, 0.85 * size, size=2)
  pts = start + np.cumsum(step * np.stack([np.sin(heading), np.cos(heading)], -1), axis=0)
  yy, xx = np.mgrid[:size, :size]
  reach = width + 2.0
  dist, nearest = cKDTree(pts).query(np.stack([yy.ravel(), xx.ravel()], -1),
                                     distance_upper_bound=reach)
  dist = np.minimum(dist, reach).reshape(size, size)
  t_nearest = t[np.minimum(nearest, len(t) - 1)].reshape(size, size)
  # Coverage of a pixel by a stroke of this width, linear over one pixel.
  alpha = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
  mask = dist <= width / 2
  sign = 1.0 if rng.random() < 0.5 else -1.0
  delta = sign * rng.uniform(12.0, 60.0) * gain
  # Pressure varies along the stroke, as a real scratch's depth does.
  along = 0.65 + 0.35 * np.sin(2 * np.pi * t_nearest / (0.5 * length) + rng.uniform(0, 2 * np.pi))
  out = image + alpha * along * delta
  return out, mask, {"length_px": length, "width_px": width, "delta": delta}


def _foreign_material(image, rng, scale, gain, photos, category):
  del scale, gain
  size = image.shape[0]
  donors = [p for p in SOURCE_PHOTOS if p != category]
  donor_name = donors[int(rng.integers(len(donors)))]
  donor_photo = photos[donor_name]
  h, w = donor_photo.shape
  side = int(rng.integers(size // 2, min(h, w) // 2 + 1))
  donor, prov = _random_view(donor_photo, [(0, 0, h, w)], (side, side), size, rng)
  blob = _blob(size, _blob_area_px(size, rng), rng)
  alpha = ndi.gaussian_filter(blob.astype(np.float32), 0.7)
  mask = alpha >= 0.5
  matched = bool(rng.random() < 0.35)
  if matched and mask.any():
    # Mean only: the donor keeps its own contrast and texture, as real debris does.
    donor = donor - donor[mask].mean() + image[mask].mean()
  out = image * (1 - alpha) + donor * alpha
  return out, mask, {"donor": donor_name, "donor_box_yxhw": prov["box_yxhw"],
                     "intensity_matched": matched}


def _stain(image, rng, scale, gain, photos, category):
  del photos, category
  size = image.shape[0]
  blob = _blob(size, _blob_area_px(size, rng), rng)
  alpha = ndi.gaussian_filter(blob.astype(np.float32), rng.uniform(1.5, 4.0) * scale)
  mask = alpha >= 0.5
  sign = 1.0 if rng.random() < 0.5 else -1.0
  delta = sign * rng.uniform(12.0, 45.0) * gain
  washout = rng.uniform(0.0, 0.5)
  local = _local_mean(image, size)
  out = image + alpha * (delta - washout * (image - local))
  return out, mask, {"delta": delta, "washout": washout}


def _hole(image, rng, scale, gain, photos, category):
  del gain, photos, category  # darkness is set in image stds, already contrast-relative
  size = image.shape[0]
  blob = _blob(size, _blob_area_px(size, rng), rng)
  depth_px = ndi.distance_transform_edt(blob)  # 1 on the blob's edge pixels
  rim = rng.uniform(1.5, 4.0) * scale
  depth = np.clip(depth_px / rim, 0.0, 1.0)
  dark = max(5.0, float(image.mean() - rng.uniform(1.2, 3.5) * image.std()))
  show_through = rng.uniform(0.1, 0.35)
  lip = rng.uniform(0.0, 35.0) * np.exp(-0.5 * (depth_px - 1.0) ** 2) * blob
  local = _local_mean(image, size)
  inside = dark + show_through * (image - local)
  out = np.where(blob, image * (1 - depth) + inside * depth + lip, image)
  return out, blob, {"dark_level": dark, "rim_px": rim, "lip": float(lip.max(initial=0.0))}


def _warp(image, rng, scale, gain, photos, category):
  del gain, photos, category
  size = image.shape[0]
  # A warp of flat surface changes nothing visible (its mask would be a lie), so
  # centre it on structure: sample the centre ∝ squared local gradient energy.
  energy = ndi.gaussian_filter(ndi.gaussian_gradient_magnitude(image, 1.0), 6.0 * scale) ** 2
  border = int(0.12 * size)
  inner = energy[border:size - border, border:size - border]
  flat = rng.choice(inner.size, p=(inner / inner.sum()).ravel())
  row, col = divmod(int(flat), inner.shape[1])
  centre = (border + row + rng.random(), border + col + rng.random())
  blob = _blob(size, _blob_area_px(size, rng), rng, centre=centre)
  r0 = np.sqrt(max(blob.sum(), 1) / np.pi)
  window = ndi.gaussian_filter(blob.astype(np.float32), max(1.0, r0 / 3))
  window /= max(window.max(), 1e-6)
  field = ndi.gaussian_filter(rng.normal(size=(2, size, size)).astype(np.float32),
                              sigma=(0, max(1.0, r0 / 2), max(1.0, r0 / 2)))
  disp = field * window
  disp /= max(np.hypot(disp[0], disp[1]).max(), 1e-6)
  amplitude = rng.uniform(3.0, 8.0) * scale
  disp *= amplitude
  grid = np.mgrid[:size, :size].astype(np.float32)
  out = ndi.map_coordinates(image, grid + disp, order=3, mode="reflect")
  mask = np.hypot(disp[0], disp[1]) >= 0.5
  return out, mask, {"amplitude_px": amplitude}


_DEFECTS = {
    "scratch": _scratch,
    "foreign_material": _foreign_material,
    "stain": _stain,
    "hole": _hole,
    "warp": _warp,
}


def synthesize_defect(image_HxW: np.ndarray, defect: str, rng: np.random.Generator,
                      photos: dict[str, np.ndarray], category: str,
                      max_tries: int = 200) -> tuple[np.ndarray, np.ndarray, dict]:
  """Adds one ``defect`` to a float image; returns (image, mask_HxW bool, params).

  Redraws until the mask covers between MIN_DEFECT_AREA and MAX_DEFECT_AREA of
  the image. ``photos`` maps photo names to float photos (donors for
  ``foreign_material``, which never uses ``category``'s own photo).
  """
  if defect not in _DEFECTS:
    raise ValueError(f"unknown defect {defect!r}; choose from {DEFECT_TYPES}")
  size = image_HxW.shape[0]
  scale = size / _REFERENCE_SIZE
  gain = float(np.clip((image_HxW.std() / 26.0) ** 2.5, 1.0, 3.0))
  for _ in range(max_tries):
    out, mask, params = _DEFECTS[defect](image_HxW, rng, scale, gain, photos, category)
    frac = float(mask.mean())
    if MIN_DEFECT_AREA <= frac <= MAX_DEFECT_AREA:
      params = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in params.items()}
      return out.astype(np.float32), mask, {**params, "area_fraction": frac}
  raise RuntimeError(f"could not draw a {defect} with area in "
                     f"[{MIN_DEFECT_AREA}, {MAX_DEFECT_AREA}] for a {size}px image")


# ----------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------


def _quantize(image, rng, noise_sigma):
  noisy = image + rng.normal(0.0, noise_sigma, size=image.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def _test_plan(n_test: int, test_good_fraction: float, defects: Sequence[str]) -> list[str]:
  n_good = int(round(n_test * test_good_fraction))
  return ["good"] * n_good + [defects[i % len(defects)] for i in range(n_test - n_good)]


def _category_id(name: str) -> int:
  return zlib.crc32(name.encode())


def _build_category(out_dir: Path, category: str, photos, *, seed, image_size, n_train,
                    n_test, test_good_fraction, defects, crop_range, noise_sigma) -> list[dict]:
  photo = photos[category]
  records = []
  counters: dict[str, int] = {}
  plan = [("train", "good")] * n_train + [("test", d) for d in
                                          _test_plan(n_test, test_good_fraction, defects)]
  split_index = {"train": 0, "test": 0}
  for split, kind in plan:
    index = split_index[split]
    split_index[split] += 1
    rng = np.random.default_rng([seed, _category_id(category), _SPLIT_IDS[split], index])
    image, prov = _random_view(photo, split_regions(photo.shape, split), crop_range,
                               image_size, rng)
    number = counters.get(f"{split}/{kind}", 0)
    counters[f"{split}/{kind}"] = number + 1
    name = f"{number:03d}"
    rel_image = Path(category) / split / kind / f"{name}.png"
    record = {"category": category, "split": split, "defect": kind, "index": index,
              "image": str(rel_image), "mask": None, **prov}
    if kind != "good":
      image, mask, params = synthesize_defect(image, kind, rng, photos, category)
      rel_mask = Path(category) / "ground_truth" / kind / f"{name}_mask.png"
      _save_png(out_dir / rel_mask, mask.astype(np.uint8) * 255)
      record.update(mask=str(rel_mask), defect_params=params)
    _save_png(out_dir / rel_image, _quantize(image, rng, noise_sigma))
    records.append(record)
  return records


def _read_marker(root: Path) -> dict | None:
  try:
    return json.loads((root / _MARKER).read_text())
  except (OSError, ValueError):
    return None


def _is_complete(root: Path, params: dict) -> bool:
  if _read_marker(root) != params:
    return False
  try:
    manifest = json.loads((root / _MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  # Cheap completeness check: every file the manifest lists is still there.
  return all((root / r["image"]).is_file() and (r["mask"] is None or (root / r["mask"]).is_file())
             for r in manifest["images"])


def _check_replaceable(root: Path) -> None:
  """Refuses to replace a directory that is not (a partial copy of) this benchmark."""
  if not root.exists():
    return
  if not root.is_dir():
    raise FileExistsError(f"texture benchmark root {root} exists and is not a directory")
  ours = set(SOURCE_PHOTOS) | {_MARKER, _MANIFEST}
  foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
  if foreign:
    raise FileExistsError(
        f"texture benchmark root {root} holds entries that the builder did not write "
        f"({', '.join(foreign[:5])}); refusing to replace it. Choose another --root.")


def _remove_stale_partials(root: Path) -> None:
  """Deletes partial copies that killed builds left beside ``root`` (atomic_directory's
  ``.<name>.*.partial`` temporaries), sparing recent ones a concurrent build may own."""
  if not root.parent.is_dir():
    return
  now = time.time()
  for tmp in root.parent.glob(f".{root.name}.*.partial"):
    try:
      if now - tmp.stat().st_mtime > _STALE_PARTIAL_S:
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
      pass  # vanished meanwhile


def build_texture_benchmark(root: str | os.PathLike | None = None, seed: int = 0,
                            image_size: int = 256, n_train: int = 120, n_test: int = 80,
                            categories: Sequence[str] = SOURCE_PHOTOS, *,
                            test_good_fraction: float = 0.375,
                            defects: Sequence[str] = DEFECT_TYPES,
                            crop_range: tuple[int, int] = (128, 160),
                            noise_sigma: float = 1.5, verbose: bool = False) -> Path:
  """Builds (or reuses) the embedded texture benchmark at ``root``; returns ``root``.

  Args:
    root: output directory (default ``default_benchmark_root()``).
    seed: all randomness derives from it; same arguments, byte-identical files.
    image_size: side of the square output images, pixels.
    n_train: defect-free train images per category.
    n_test: test images per category; ``round(n_test * test_good_fraction)`` are
      good, the rest cycle through ``defects`` (defaults: 30 good, 10 per defect).
    categories: subset of ``SOURCE_PHOTOS``.
    test_good_fraction: share of good test images, in [0, 0.6] so that at least
      40 % of the test split is defective.
    defects: subset of ``DEFECT_TYPES``.
    crop_range: min/max crop side in photo pixels before resizing.
    noise_sigma: Gaussian sensor noise added to every image, grey levels.
  Returns:
    the root path, holding one MVTec-layout folder per category.
  """
  root = Path(root) if root is not None else default_benchmark_root()
  categories = tuple(categories)
  defects = tuple(defects)
  bad = [c for c in categories if c not in SOURCE_PHOTOS]
  if bad or not categories:
    raise ValueError(f"categories must be a non-empty subset of {SOURCE_PHOTOS}, got {categories}")
  bad = [d for d in defects if d not in DEFECT_TYPES]
  if bad or not defects:
    raise ValueError(f"defects must be a non-empty subset of {DEFECT_TYPES}, got {defects}")
  if not 0.0 <= test_good_fraction <= 0.6:
    raise ValueError(f"test_good_fraction must lie in [0, 0.6], got {test_good_fraction}")
  if n_train < 1 or n_test < 1 or image_size < 16:
    raise ValueError(f"need n_train >= 1, n_test >= 1, image_size >= 16; got "
                     f"{n_train}, {n_test}, {image_size}")
  lo, hi = (int(c) for c in crop_range)
  if not 8 <= lo <= hi <= 256:
    raise ValueError(f"crop_range must satisfy 8 <= min <= max <= 256, got {crop_range}")
  params = {"builder_version": BUILDER_VERSION, "seed": int(seed), "image_size": int(image_size),
            "n_train": int(n_train), "n_test": int(n_test), "categories": list(categories),
            "test_good_fraction": float(test_good_fraction), "defects": list(defects),
            "crop_range": [lo, hi], "noise_sigma": float(noise_sigma)}
  if _is_complete(root, params):
    return root
  _check_replaceable(root)
  _remove_stale_partials(root)
  start = time.perf_counter()
  photos = {name: load_photo(name) for name in SOURCE_PHOTOS}
  with atomic_directory(root) as tmp:
    records = []
    for category in categories:
      records += _build_category(
          tmp, category, photos, seed=int(seed), image_size=int(image_size),
          n_train=int(n_train), n_test=int(n_test), test_good_fraction=test_good_fraction,
          defects=defects, crop_range=(lo, hi), noise_sigma=float(noise_sigma))
      if verbose:
        print(f"[textures] {category}: built in {time.perf_counter() - start:.1f}s")
    atomic_write_json(tmp / _MANIFEST, {"params": params, "images": records})
    atomic_write_text(tmp / _MARKER, json.dumps(params, sort_keys=True) + "\n")
  return root


def read_manifest(root: str | os.PathLike) -> dict:
  """The manifest of a complete build: ``{"params": ..., "images": [per-image records]}``."""
  root = Path(root)
  if _read_marker(root) is None:
    raise FileNotFoundError(f"{root / _MARKER} missing: {root} is not a complete texture build")
  return json.loads((root / _MANIFEST).read_text())
