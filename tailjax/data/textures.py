"""Embedded texture benchmark: real photos with synthetic defects, MVTec AD layout, two tiers.

No dataset can be downloaded at run time, so the default study-A data is built
from photographs that scikit-image ships (``skimage.data``; all load offline).
Each photo becomes one category::

  <root>/<category>/train/good/000.png ...
  <root>/<category>/test/good/000.png ...
  <root>/<category>/test/<defect>/000.png ...
  <root>/<category>/ground_truth/<defect>/000_mask.png   (0/255; none for good)
  <root>/manifest.json     {"params", "categories": per-category tier, strength and
                           calibration, "images": per-image provenance (crop box,
                           augmentation, tier, defect params)}
  <root>/COMPLETE          the build parameters, written last

so ``tailjax.data.mvtec`` reads it like MVTec AD (grayscale images, like
MVTec's grid/screw/zipper).

Tiers (``CATEGORY_SPECS``, ``category_tier``):

* ``hard`` — brick, grass, gravel (512x512 grey), the default build
  (``SOURCE_PHOTOS``). Their images are pinned by a golden hash in the tests, so
  results on them stay comparable across builder versions. Their defect
  strengths are whatever the draw gives, so PaDiM sits near chance on grass and
  gravel (see Difficulty below).
* ``calibrated`` — moon (``skimage.data.moon``), tissue (``immunohistochemistry``,
  grey, zoom 1.5), page (``page``, zoom 2), notes (``text``, zoom 2), retina
  (``retina``: the square inscribed in its circular field of view, zoom 0.5), coins
  (``coins``, zoom 2). The same five defect kinds, drawn the same way, then made
  exact and scaled by one strength per category (``confine_defect``) that a
  no-training reference fixes: PaDiM's image AUROC on a calibration split must land
  in ``CALIBRATION_SETTINGS.band`` (85–97 %). The flows never take part.
  (``hubble_deep_field`` is not a category: its bright galaxies make normal crops
  score as high as defective ones, and no strength reaches the band.)

A selection (``tailjax build-textures --categories``, ``config.data.categories``)
names categories, tiers or ``all`` (``expand_categories``); ``shared_build`` says
which of the two shared builds (the hard tier, or all nine at ``<root>-all``) holds it.

Images. The photo is cut into a checkerboard of cells (``split_regions``): the
hard tier's is 2x2 (256x256 quadrants): the diagonal (top-left, bottom-right)
feeds the train split, the anti-diagonal the test split, so train and test crops
never share a pixel while both splits see the top and bottom, left and right of
the photo (its slow changes of lighting and perspective). The calibrated tier
uses cells as fine as the largest crop allows (``CategorySpec.cells``: 4x4 tissue,
3x3 moon and coins, 2x2 page, notes and retina): a photo whose content drifts
(moon's craters, tissue's glands) would otherwise give test crops that PaDiM scores
as anomalous for their region alone. A crop is a random square of side ``s ~ U{crop_range}``
pixels (default 128..160) inside one of its split's cells, rotated
by a random multiple of 90 degrees, randomly mirrored, resized to
``image_size`` (bicubic) and given mild Gaussian sensor noise (σ = 1.5 grey
levels) before quantisation. The same pipeline makes train, good test and
defective test images, so the only systematic difference is the defect.

Defects (both tiers draw them so; area 0.1-5 % of the image, enforced by rejection;
the masks described here are the hard tier's, the calibrated tier's follow below):

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

Calibrated tier: exact masks and one strength. Each defect above is drawn as
for the hard tier (the same random numbers; the foreign material's donor is one of
the three hard-tier photos, a fixed pool); with Δ = drawn − clean, the mask is the
part of the drawn region that Δ changes by at least τ = 0.5 grey levels,
``M = region ∧ |Δ| >= τ``, and the image is ``clean + s · w · Δ`` with the inward
feather ``w = [M] · clip(d / 2 px, 0, 1)`` (d = distance to the region's outside,
lengths at 256 px). Off the mask nothing changes (tolerance 0 on the float image);
on it every pixel changes by at least ``s · τ / 2``. The strength s (the defect's
opacity; s > 1 exaggerates, clipped at quantisation) changes neither the mask nor
any random draw, so PaDiM's AUROC is a smooth, nearly monotone function of s.

Strength left open: ``draw_defective`` draws a defective sample of the exact-mask
generator once (``DefectDraw``: crop, defect, mask, sensor noise) and ``image(s)``
renders it at any strength, byte for byte ``render_sample(..., strength=s)``. The
calibration split (``CalibrationSplit``) and the difficulty ladder
(``tailjax.data.ladder``: one train split, test sets at several strengths, every photo)
are built on it.

Calibration (``calibrate_strength`` / ``calibrate_benchmark``; result committed in
``CALIBRATED_STRENGTHS`` and ``CALIBRATION_RESULTS``, written into every build's
manifest with ``CALIBRATION_SETTINGS``). Per category, a calibration split drawn
with its own seed (``CalibrationSettings.seed`` = 1000) on its own split ids,
never the build's streams: 96 fit images from the train cells (the demo's 120
train images less its 20 % validation share), 40 good and 60 defective images
(12 per kind) from the test cells. PaDiM (ε = 0.01, 100 random channels) on the
caller's features, maps upsampled to 224 px and smoothed with σ = 4 px, image
score = map maximum, image AUROC. Geometric bisection of s on [1/32, 8] towards
the band centre (0.91) stops within ±0.015 or after 8 evaluations; the strength
whose AUROC is nearest the centre is kept and must lie in the band. The committed
table comes from the demo's backbone (EfficientNet-Lite0 stride 16 at 224 px,
``inception`` normalisation), by::

  python -c "
  from tailjax.configs import fastflow_textures
  from tailjax.data import pipeline, textures
  cfg = fastflow_textures.get_config()
  ex, ex_id = pipeline.make_extractor(cfg)
  fn = lambda paths: pipeline.extract_features(cfg, paths, ex, ex_id, progress=False)
  print(textures.format_calibration_table(textures.calibrate_benchmark(fn, verbose=True)))"

(about 4 min on 2 CPU cores; features are cached by image content, so a rerun,
or ``check_calibration(fn)`` which re-measures the AUROC at the committed
strengths, takes seconds).

Determinism: every image draws from its own
``numpy.random.default_rng([seed, category_id, split_id, index])`` (split ids: train
0, test 1, calibration fit 2, calibration evaluation 3), so the
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

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi
import skimage.data
import skimage.transform
from PIL import Image
from scipy.spatial import cKDTree

from tailjax.io import atomic_directory, atomic_write_json, atomic_write_text

# Part of a build's parameters (COMPLETE): a build of another version is rebuilt. Bump it
# when a change alters any built file; the hard tier's images are pinned by a golden
# hash in the tests, so a bump never moves them.
BUILDER_VERSION = 2
TIERS = ("hard", "calibrated")
ALL = "all"  # the category selection that names every category


@dataclasses.dataclass(frozen=True)
class CategorySpec:
  """Where a category's photograph comes from and how it is prepared.

  Attributes:
    photo: the ``skimage.data`` function that returns it (bundled, no download).
    tier: ``"hard"`` (uncalibrated, strength fixed by the draw) or ``"calibrated"``
      (defect strength from ``CALIBRATED_STRENGTHS``).
    region: (y0, x0, y1, x1) fractions of the photo kept before cropping (retina:
      the square inscribed in its circular field of view, no black border).
    zoom: resize factor applied to the region (bicubic; anti-aliased when < 1).
    cells: side of the checkerboard that splits the photo into train and test cells
      (``split_regions``): 2 for the hard tier; finer for the calibrated tier, so both
      splits see every part of a photo whose content drifts across it (no cell may be
      smaller than the largest crop).
  """
  photo: str
  tier: str
  region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
  zoom: float = 1.0
  cells: int = 2


CATEGORY_SPECS: dict[str, CategorySpec] = {
    "brick": CategorySpec("brick", "hard"),
    "grass": CategorySpec("grass", "hard"),
    "gravel": CategorySpec("gravel", "hard"),
    "moon": CategorySpec("moon", "calibrated", cells=3),
    "tissue": CategorySpec("immunohistochemistry", "calibrated", zoom=1.5, cells=4),
    "page": CategorySpec("page", "calibrated", zoom=2.0),
    "notes": CategorySpec("text", "calibrated", zoom=2.0),
    "retina": CategorySpec("retina", "calibrated", region=(0.16, 0.16, 0.84, 0.84), zoom=0.5),
    "coins": CategorySpec("coins", "calibrated", zoom=2.0, cells=3),
}
HARD_CATEGORIES = tuple(c for c, s in CATEGORY_SPECS.items() if s.tier == "hard")
CALIBRATED_CATEGORIES = tuple(c for c, s in CATEGORY_SPECS.items() if s.tier == "calibrated")
CATEGORIES = HARD_CATEGORIES + CALIBRATED_CATEGORIES
SOURCE_PHOTOS = HARD_CATEGORIES  # the default build (the hard tier)
DEFECT_TYPES = ("scratch", "foreign_material", "stain", "hole", "warp")
MIN_DEFECT_AREA, MAX_DEFECT_AREA = 0.001, 0.05  # fraction of the image
# Every image's generator is keyed by its split; the calibration splits have their own
# ids (and seed), so no calibration image shares a random stream with a built image.
_SPLIT_IDS = {"train": 0, "test": 1, "calibration_fit": 2, "calibration_eval": 3}
_SPLIT_REGIONS = {"train": "train", "test": "test", "calibration_fit": "train",
                  "calibration_eval": "test"}
_MARKER = "COMPLETE"
_MANIFEST = "manifest.json"
_REFERENCE_SIZE = 256  # defect lengths below are given at this image size
_STALE_PARTIAL_S = 3600.0  # a build takes seconds; older partial copies are dead


def default_benchmark_root() -> Path:
  """``$TAILJAX_DATA/textures`` if ``TAILJAX_DATA`` is set, else ``./data/textures``."""
  base = os.environ.get("TAILJAX_DATA")
  return (Path(base) if base else Path.cwd() / "data") / "textures"


def category_tier(category: str) -> str:
  """``"hard"`` or ``"calibrated"`` (``CATEGORY_SPECS``)."""
  if category not in CATEGORY_SPECS:
    raise ValueError(f"unknown texture category {category!r}; choose from {CATEGORIES}")
  return CATEGORY_SPECS[category].tier


def expand_categories(names: str | Sequence[str] | None = None, *,
                      where: str = "categories") -> tuple[str, ...]:
  """The texture categories a selection names: the one vocabulary of
  ``tailjax build-textures --categories`` and ``config.data.categories``.

  ``names`` is a comma list or a sequence of names, each a category
  (``CATEGORIES``), a tier (``TIERS``: its categories in ``CATEGORY_SPECS`` order)
  or ``"all"`` (every category); None or empty means ``"all"``. Returns the
  categories in the order first named, each once. An unknown name raises a
  ValueError on one line that starts with ``where`` (the flag or config field).
  """
  if isinstance(names, str):
    names = names.split(",")
  wanted = [str(n).strip() for n in (names or ()) if str(n).strip()] or [ALL]
  groups = {ALL: CATEGORIES, **{t: tuple(c for c in CATEGORIES if category_tier(c) == t) for t in TIERS}}
  bad = [n for n in wanted if n not in CATEGORIES and n not in groups]
  if bad:
    raise ValueError(f"{where}: {bad} are neither texture categories ({', '.join(CATEGORIES)}) "
                     f"nor tiers ({', '.join(TIERS)}) nor {ALL!r}")
  return tuple(dict.fromkeys(c for n in wanted for c in groups.get(n, (n,))))


def shared_build(base: Path, categories: Sequence[str]) -> tuple[Path, tuple[str, ...]]:
  """``(root, categories built)`` of the shared build that holds ``categories``.

  The hard tier (``SOURCE_PHOTOS``) at ``base`` when every requested category is in
  it; otherwise every category (``CATEGORIES``) at the sibling ``<base>-all``,
  whatever subset is requested. So any selection reuses one of two builds, and a
  selection outside the hard tier never replaces the default build at ``base``.
  """
  if all(c in SOURCE_PHOTOS for c in categories):
    return base, tuple(SOURCE_PHOTOS)
  return base.with_name(base.name + "-all"), tuple(CATEGORIES)


def load_photo(name: str) -> np.ndarray:
  """The photo of category ``name`` as float32 grayscale in [0, 255], [H, W].

  Colour photos become grey with the ITU-R 709 luma weights (scikit-image's
  ``rgb2gray``); then ``CategorySpec.region`` is cut and ``CategorySpec.zoom`` applied.
  The hard tier's photos are used as shipped (512x512 grey, no region, no zoom).
  """
  if name not in CATEGORY_SPECS:
    raise ValueError(f"unknown texture photo {name!r}; choose from {CATEGORIES}")
  spec = CATEGORY_SPECS[name]
  photo = np.asarray(getattr(skimage.data, spec.photo)())
  if photo.ndim == 3:
    photo = (photo[..., :3].astype(np.float64) @ [0.2125, 0.7154, 0.0721])
  if spec.region != (0.0, 0.0, 1.0, 1.0):
    h, w = photo.shape
    y0, x0, y1, x1 = spec.region
    photo = photo[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))]
  if spec.zoom != 1.0:
    photo = skimage.transform.rescale(photo.astype(np.float64), spec.zoom, order=3,
                                      mode="reflect", anti_aliasing=spec.zoom < 1,
                                      preserve_range=True)
    photo = np.clip(photo, 0.0, 255.0)
  return photo.astype(np.float32)


def _donor_pool(category: str) -> tuple[str, ...]:
  """Photos that ``foreign_material`` may cut from: the hard tier's three, for every
  category (a fixed pool, so adding a category never changes another's defects)."""
  del category
  return HARD_CATEGORIES


# ----------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------


def split_regions(photo_shape: tuple[int, int], split: str,
                  cells: int = 2) -> tuple[tuple[int, int, int, int], ...]:
  """The (y0, x0, y1, x1) cells that feed ``split`` on a ``cells`` x ``cells``
  checkerboard (edges at ``i·H // cells``): train the cells with i + j even, test those
  with i + j odd, row-major, so the two splits share no pixel. ``cells=2`` (the hard
  tier): train the diagonal quadrants, test the anti-diagonal ones."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if cells < 2:
    raise ValueError(f"cells must be >= 2 (train and test need a cell each), got {cells}")
  h, w = photo_shape
  ys = [i * h // cells for i in range(cells + 1)]
  xs = [j * w // cells for j in range(cells + 1)]
  parity = 0 if split == "train" else 1
  return tuple((ys[i], xs[j], ys[i + 1], xs[j + 1]) for i in range(cells)
               for j in range(cells) if (i + j) % 2 == parity)


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
  donors = [p for p in _donor_pool(category) if p != category]
  donor_name = donors[int(rng.integers(len(donors)))]
  donor_photo = photos[donor_name]
  h, w = donor_photo.shape
  hi = min(h, w) // 2 + 1  # a small donor photo (retina) caps the side for large images
  side = int(rng.integers(min(size // 2, hi - 1), hi))
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


def exact_defect(image_HxW: np.ndarray, defective_HxW: np.ndarray, region_HxW: np.ndarray,
                 feather_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The strength-free parts of the calibrated tier's defect: ``(w_HxW, Δ_HxW, M_HxW)``.

  With Δ = defective − image (the drawn defect), the mask is the part of the drawn
  region that Δ visibly changes,

    M = region ∧ (|Δ| >= τ),   τ = CHANGE_TOL = 0.5 grey levels (half a quantisation step),

  and the weight is ``w_p = [p ∈ M] · clip(d_p / f, 0, 1)``, where d_p is pixel p's
  Euclidean distance to the nearest pixel outside the region
  (``scipy.ndimage.distance_transform_edt``: ≥ 1 on the region) and f = ``feather_px``.
  The defect at strength s is ``apply_defect(image, w, Δ, s)`` (``confine_defect``).
  """
  delta_HxW = defective_HxW - image_HxW
  mask_HxW = region_HxW & (np.abs(delta_HxW) >= CHANGE_TOL)
  depth_HxW = ndi.distance_transform_edt(region_HxW)
  w_HxW = mask_HxW * np.clip(depth_HxW / max(float(feather_px), 1.0), 0.0, 1.0)
  return w_HxW, delta_HxW, mask_HxW


def apply_defect(image_HxW: np.ndarray, w_HxW: np.ndarray, delta_HxW: np.ndarray,
                 strength: float) -> np.ndarray:
  """``image + s · w · Δ``: an exact defect (``exact_defect``) at opacity s (float64)."""
  return image_HxW + float(strength) * w_HxW * delta_HxW


def confine_defect(image_HxW: np.ndarray, defective_HxW: np.ndarray, region_HxW: np.ndarray,
                   strength: float, feather_px: float) -> tuple[np.ndarray, np.ndarray]:
  """The calibrated tier's defect: the drawn change, scaled and confined to an exact mask.

  The output is ``image + s · w · Δ`` with w, Δ and the mask M of ``exact_defect``.
  So off M the image is returned bit for bit, and on M every pixel changes by at least
  ``s · τ / f`` (w >= 1/f there): the mask holds every changed pixel and no unchanged
  one. ``s`` is the defect's opacity (s = 1: the drawn defect; s < 1 fainter; s > 1
  exaggerated, clipped to [0, 255] when quantised). Returns (image, mask M).
  """
  w_HxW, delta_HxW, mask_HxW = exact_defect(image_HxW, defective_HxW, region_HxW, feather_px)
  return apply_defect(image_HxW, w_HxW, delta_HxW, strength), mask_HxW


CHANGE_TOL = 0.5  # grey levels: a smaller change of the float image can vanish in rounding
_FEATHER_PX = 2.0  # calibrated tier's inward feather at 256 px


def _check_strength(strength) -> None:
  if not (math.isfinite(strength) and strength > 0):
    raise ValueError(f"defect strength must be a finite number > 0, got {strength}")


def _draw_defect(image_HxW, defect, rng, photos, category, max_tries, exact):
  """The draw both tiers share: redraws until the mask covers between MIN_DEFECT_AREA
  and MAX_DEFECT_AREA of the image. Returns ``(drawn image, mask, params, area
  fraction, (w, Δ) of exact_defect or None)``; ``exact`` takes the calibrated tier's
  mask, which consumes no random number, so both tiers draw the same numbers."""
  if defect not in _DEFECTS:
    raise ValueError(f"unknown defect {defect!r}; choose from {DEFECT_TYPES}")
  size = image_HxW.shape[0]
  scale = size / _REFERENCE_SIZE
  gain = float(np.clip((image_HxW.std() / 26.0) ** 2.5, 1.0, 3.0))
  for _ in range(max_tries):
    out, mask, params = _DEFECTS[defect](image_HxW, rng, scale, gain, photos, category)
    parts = None
    if exact:
      w_HxW, delta_HxW, mask = exact_defect(image_HxW, out, mask, _FEATHER_PX * scale)
      parts = (w_HxW, delta_HxW)
    frac = float(mask.mean())
    if MIN_DEFECT_AREA <= frac <= MAX_DEFECT_AREA:
      params = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in params.items()}
      return out, mask, params, frac, parts
  raise RuntimeError(f"could not draw a {defect} with area in "
                     f"[{MIN_DEFECT_AREA}, {MAX_DEFECT_AREA}] for a {size}px image")


def synthesize_defect(image_HxW: np.ndarray, defect: str, rng: np.random.Generator,
                      photos: dict[str, np.ndarray], category: str,
                      max_tries: int = 200, strength: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Adds one ``defect`` to a float image; returns (image, mask_HxW bool, params).

  Redraws until the mask covers between MIN_DEFECT_AREA and MAX_DEFECT_AREA of
  the image. ``photos`` maps category names to float photos (donors for
  ``foreign_material``, which never uses ``category``'s own photo).

  ``strength=None`` is the hard tier's defect exactly as drawn (its masks are the
  half-coverage contours described in the module docstring). A number ``s > 0``
  is the calibrated tier's: the same draw, then ``confine_defect`` with opacity s and
  a 2 px (at 256 px) inward feather, so the mask holds exactly the changed pixels. The
  mask (hence the area check and every random draw) does not depend on s.
  """
  if strength is not None:
    _check_strength(strength)
  out, mask, params, frac, parts = _draw_defect(image_HxW, defect, rng, photos, category,
                                                max_tries, exact=strength is not None)
  if strength is not None:
    out = apply_defect(image_HxW, *parts, strength)
    params = {**params, "strength": float(strength)}
  return out.astype(np.float32), mask, {**params, "area_fraction": frac}


# ----------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------


def _quantize(image, rng, noise_sigma):
  return _quantize_noisy(image, rng.normal(0.0, noise_sigma, size=image.shape))


def _quantize_noisy(image, noise):
  return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


def _test_plan(n_test: int, test_good_fraction: float, defects: Sequence[str]) -> list[str]:
  n_good = int(round(n_test * test_good_fraction))
  return ["good"] * n_good + [defects[i % len(defects)] for i in range(n_test - n_good)]


def _category_id(name: str) -> int:
  return zlib.crc32(name.encode())


def _sample_rng(category: str, split: str, index: int, seed: int) -> np.random.Generator:
  if split not in _SPLIT_IDS:
    raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
  return np.random.default_rng([seed, _category_id(category), _SPLIT_IDS[split], index])


def _sample_view(category, photos, split, rng, image_size, crop_range):
  photo = photos[category]
  regions = split_regions(photo.shape, _SPLIT_REGIONS[split], CATEGORY_SPECS[category].cells)
  return _random_view(photo, regions, crop_range, image_size, rng)


def render_sample(category: str, photos: Mapping[str, np.ndarray], split: str, kind: str,
                  index: int, *, seed: int, image_size: int, crop_range: tuple[int, int],
                  noise_sigma: float, strength: float | None = None):
  """One benchmark image, drawn from ``numpy.random.default_rng([seed, crc32(category),
  split id, index])``: a crop of the split's regions, a ``kind`` defect unless "good",
  sensor noise, quantisation. Returns (uint8 image [S, S], bool mask or None,
  provenance dict, defect params or None). ``split`` is "train", "test" (the build) or
  "calibration_fit" / "calibration_eval" (train / test regions, own streams). With a
  ``strength`` (exact masks), a defective image is ``draw_defective(...).image(strength)``."""
  if kind != "good" and strength is not None:
    _check_strength(strength)
    draw = draw_defective(category, photos, split, kind, index, seed=seed,
                          image_size=image_size, crop_range=crop_range,
                          noise_sigma=noise_sigma)
    return draw.image(strength), draw.mask_HxW, draw.provenance, draw.defect_params(strength)
  rng = _sample_rng(category, split, index, seed)
  image, prov = _sample_view(category, photos, split, rng, image_size, crop_range)
  mask = params = None
  if kind != "good":
    image, mask, params = synthesize_defect(image, kind, rng, photos, category)
  return _quantize(image, rng, noise_sigma), mask, prov, params


@dataclasses.dataclass(frozen=True, eq=False)
class DefectDraw:
  """One defective sample of the exact-mask generator with its strength left open.

  Everything ``render_sample`` draws for it (crop, defect kind and shape, position,
  sensor noise) is fixed; the strength s is applied last, so the images of one draw at
  any two strengths are identical off the mask and differ on it only by s:

    image(s) = quantise(clean + s · w · Δ + noise),   clean() = quantise(clean + noise),

  quantise = round and clip to [0, 255] (uint8). ``image(s)`` is byte for byte
  ``render_sample(..., strength=s)``'s image.

  Attributes:
    clean_HxW: the defect-free float view (float32).
    w_HxW, delta_HxW, mask_HxW: ``exact_defect``'s weight, change and mask.
    noise_HxW: the sensor noise added before quantisation.
    provenance: crop box, rotation and mirroring (as in the manifest).
    params: the defect's drawn parameters (no strength).
    area_fraction: the mask's share of the image.
  """
  clean_HxW: np.ndarray
  w_HxW: np.ndarray
  delta_HxW: np.ndarray
  mask_HxW: np.ndarray
  noise_HxW: np.ndarray
  provenance: dict
  params: dict
  area_fraction: float

  def clean(self) -> np.ndarray:
    """The quantised defect-free image with this draw's noise, uint8 [S, S]."""
    return _quantize_noisy(self.clean_HxW, self.noise_HxW)

  def image(self, strength: float) -> np.ndarray:
    """The quantised defective image at ``strength``, uint8 [S, S]."""
    _check_strength(strength)
    out = apply_defect(self.clean_HxW, self.w_HxW, self.delta_HxW, strength)
    return _quantize_noisy(out.astype(np.float32), self.noise_HxW)

  def defect_params(self, strength: float | None = None) -> dict:
    """The manifest's defect parameters (with ``strength`` when given)."""
    extra = {} if strength is None else {"strength": float(strength)}
    return {**self.params, **extra, "area_fraction": self.area_fraction}


def draw_defective(category: str, photos: Mapping[str, np.ndarray], split: str, kind: str,
                   index: int, *, seed: int, image_size: int, crop_range: tuple[int, int],
                   noise_sigma: float) -> DefectDraw:
  """The ``kind`` defect sample ``render_sample`` draws for (split, index), through the
  exact-mask generator, with its strength left open (``DefectDraw``)."""
  if kind not in DEFECT_TYPES:
    raise ValueError(f"unknown defect {kind!r}; choose from {DEFECT_TYPES}")
  rng = _sample_rng(category, split, index, seed)
  image, prov = _sample_view(category, photos, split, rng, image_size, crop_range)
  _, mask, params, frac, (w_HxW, delta_HxW) = _draw_defect(
      image, kind, rng, photos, category, max_tries=200, exact=True)
  noise_HxW = rng.normal(0.0, noise_sigma, size=image.shape)
  return DefectDraw(image, w_HxW, delta_HxW, mask, noise_HxW, prov, params, frac)


def _build_category(out_dir: Path, category: str, photos, *, seed, image_size, n_train,
                    n_test, test_good_fraction, defects, crop_range, noise_sigma,
                    strength) -> list[dict]:
  records = []
  counters: dict[str, int] = {}
  plan = [("train", "good")] * n_train + [("test", d) for d in
                                          _test_plan(n_test, test_good_fraction, defects)]
  split_index = {"train": 0, "test": 0}
  tier = category_tier(category)
  for split, kind in plan:
    index = split_index[split]
    split_index[split] += 1
    image, mask, prov, params = render_sample(
        category, photos, split, kind, index, seed=seed, image_size=image_size,
        crop_range=crop_range, noise_sigma=noise_sigma, strength=strength)
    number = counters.get(f"{split}/{kind}", 0)
    counters[f"{split}/{kind}"] = number + 1
    name = f"{number:03d}"
    rel_image = Path(category) / split / kind / f"{name}.png"
    record = {"category": category, "tier": tier, "split": split, "defect": kind,
              "index": index, "image": str(rel_image), "mask": None, **prov}
    if kind != "good":
      rel_mask = Path(category) / "ground_truth" / kind / f"{name}_mask.png"
      _save_png(out_dir / rel_mask, mask.astype(np.uint8) * 255)
      record.update(mask=str(rel_mask), defect_params=params)
    _save_png(out_dir / rel_image, image)
    records.append(record)
  return records


def category_info(category: str, strength: float | None) -> dict:
  """The manifest's entry for a category: tier, photo source, defect strength and,
  when the strength is the committed one, its calibration record."""
  spec = CATEGORY_SPECS[category]
  info = {"tier": spec.tier, "photo": f"skimage.data.{spec.photo}", "region": list(spec.region),
          "zoom": spec.zoom, "cells": spec.cells, "strength": strength, "calibration": None}
  if spec.tier == "calibrated":
    committed = CALIBRATED_STRENGTHS.get(category)
    if committed is not None and strength == committed:
      info["calibration"] = {**CALIBRATION_RESULTS[category],
                             "settings": dataclasses.asdict(CALIBRATION_SETTINGS)}
  return info


def resolve_strengths(categories: Sequence[str],
                      strengths: Mapping[str, float] | None = None) -> dict[str, float | None]:
  """Per category the defect strength a build uses: None for the hard tier, else
  ``strengths[c]`` if given, else the committed ``CALIBRATED_STRENGTHS[c]``."""
  strengths = dict(strengths or {})
  bad = [c for c in strengths if c not in CALIBRATED_CATEGORIES]
  if bad:
    raise ValueError(f"strengths: {bad} are not calibrated-tier categories "
                     f"({', '.join(CALIBRATED_CATEGORIES)})")
  out = {}
  for c in categories:
    if category_tier(c) == "hard":
      out[c] = None
      continue
    s = strengths.get(c, CALIBRATED_STRENGTHS.get(c))
    if s is None:
      raise ValueError(f"category {c!r} has no calibrated strength in CALIBRATED_STRENGTHS "
                       "(run textures.calibrate_benchmark) and none was passed in strengths")
    if not (math.isfinite(float(s)) and float(s) > 0):
      raise ValueError(f"strengths[{c!r}] must be a finite number > 0, got {s}")
    out[c] = float(s)
  return out


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
  ours = set(CATEGORIES) | {_MARKER, _MANIFEST}
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


def _check_build_arguments(defects, test_good_fraction, n_train, n_test, image_size,
                           crop_range) -> tuple[int, int]:
  """Refuses out-of-range build arguments, naming them; returns the crop range as ints."""
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
  return lo, hi


def build_texture_benchmark(root: str | os.PathLike | None = None, seed: int = 0,
                            image_size: int = 256, n_train: int = 120, n_test: int = 80,
                            categories: Sequence[str] = SOURCE_PHOTOS, *,
                            test_good_fraction: float = 0.375,
                            defects: Sequence[str] = DEFECT_TYPES,
                            crop_range: tuple[int, int] = (128, 160),
                            noise_sigma: float = 1.5,
                            strengths: Mapping[str, float] | None = None,
                            verbose: bool = False) -> Path:
  """Builds (or reuses) the embedded texture benchmark at ``root``; returns ``root``.

  Args:
    root: output directory (default ``default_benchmark_root()``).
    seed: all randomness derives from it; same arguments, byte-identical files.
    image_size: side of the square output images, pixels.
    n_train: defect-free train images per category.
    n_test: test images per category; ``round(n_test * test_good_fraction)`` are
      good, the rest cycle through ``defects`` (defaults: 30 good, 10 per defect).
    categories: what to build, in ``expand_categories``' vocabulary: category and
      tier names or ``"all"`` (default: the hard tier, brick, grass, gravel; empty or
      ``"all"``: all nine).
    test_good_fraction: share of good test images, in [0, 0.6] so that at least
      40 % of the test split is defective.
    defects: subset of ``DEFECT_TYPES``.
    crop_range: min/max crop side in photo pixels before resizing.
    noise_sigma: Gaussian sensor noise added to every image, grey levels.
    strengths: defect strength per calibrated-tier category, overriding the
      committed ``CALIBRATED_STRENGTHS`` (the calibration itself uses this).
  Returns:
    the root path, holding one MVTec-layout folder per category; ``manifest.json``
    has ``params``, ``categories`` (``category_info``: tier, strength, calibration)
    and ``images``.
  """
  root = Path(root) if root is not None else default_benchmark_root()
  categories = expand_categories(categories)
  defects = tuple(defects)
  lo, hi = _check_build_arguments(defects, test_good_fraction, n_train, n_test, image_size, crop_range)
  strength_of = resolve_strengths(categories, strengths)
  params = {"builder_version": BUILDER_VERSION, "seed": int(seed), "image_size": int(image_size),
            "n_train": int(n_train), "n_test": int(n_test), "categories": list(categories),
            "test_good_fraction": float(test_good_fraction), "defects": list(defects),
            "crop_range": [lo, hi], "noise_sigma": float(noise_sigma),
            "strengths": {c: s for c, s in strength_of.items() if s is not None}}
  if _is_complete(root, params):
    return root
  prepare_build(root)
  photos = load_photos(categories)
  with atomic_directory(root) as tmp:
    built = build_categories(
        lambda category: _build_category(
            tmp, category, photos, seed=int(seed), image_size=int(image_size),
            n_train=int(n_train), n_test=int(n_test), test_good_fraction=test_good_fraction,
            defects=defects, crop_range=(lo, hi), noise_sigma=float(noise_sigma),
            strength=strength_of[category]),
        categories, "textures" if verbose else None)
    records = [r for recs in built for r in recs]
    info = {c: category_info(c, strength_of[c]) for c in categories}
    atomic_write_json(tmp / _MANIFEST, {"params": params, "categories": info, "images": records})
    atomic_write_text(tmp / _MARKER, json.dumps(params, sort_keys=True) + "\n")
  return root


def prepare_build(root: Path) -> None:
  """Before a build replaces ``root``: refuses a folder that is not a build of ours
  (``_check_replaceable``) and removes dead partial copies of earlier builds."""
  _check_replaceable(root)
  _remove_stale_partials(root)


def build_categories(build_one, categories: Sequence[str], label: str | None = None) -> list:
  """``[build_one(c) for c in categories]``, the categories in parallel threads, one per
  core. Safe because every image draws from its own seeded stream (``render_sample``)
  and goes to its own file, so the files are the same bytes in any order; the image work
  (NumPy, SciPy, PNG compression) mostly releases the GIL. Results keep the category
  order. ``label``: print "[label] <category>: built (<s>)" as each one finishes."""
  start = time.perf_counter()

  def one(category):
    out = build_one(category)
    if label:
      print(f"[{label}] {category}: built ({time.perf_counter() - start:.1f}s)", flush=True)
    return out

  workers = max(1, min(len(categories), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
    return list(ex.map(one, categories))


def load_photos(categories: Sequence[str]) -> dict[str, np.ndarray]:
  """``{name: load_photo(name)}`` for ``categories`` and every photo their foreign
  material may be cut from."""
  names = dict.fromkeys(n for c in categories for n in (c, *_donor_pool(c)))
  return {name: load_photo(name) for name in names}


def read_manifest(root: str | os.PathLike) -> dict:
  """The manifest of a complete build: ``{"params": ..., "categories": {name:
  category_info}, "images": [per-image records]}``."""
  root = Path(root)
  if _read_marker(root) is None:
    raise FileNotFoundError(f"{root / _MARKER} missing: {root} is not a complete texture build")
  return json.loads((root / _MANIFEST).read_text())


# ----------------------------------------------------------------------------
# Calibration of the calibrated tier: difficulty set by PaDiM, never by the flows
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
  """What a calibration draws and how PaDiM scores it (recorded in the manifest).

  The defaults mirror the demo (``configs/fastflow_textures.py``): 256 px images,
  96 fit images (= the demo's 120 train images less its 20 % validation share),
  PaDiM with ε = 0.01 on 100 random channels of the features the caller's
  ``features_fn`` returns, maps upsampled to 224 px and smoothed with σ = 4 px,
  image score = map maximum.
  """
  seed: int = 1000            # the calibration seed; never the build's seed streams
  band: tuple[float, float] = (0.85, 0.97)   # PaDiM image AUROC the strength must reach
  image_size: int = 256
  n_fit: int = 96             # normal images PaDiM is fitted to (train regions)
  n_good: int = 40            # normal evaluation images (test regions)
  n_defective: int = 60       # defective evaluation images, cycling through ``defects``
  defects: tuple[str, ...] = DEFECT_TYPES
  crop_range: tuple[int, int] = (128, 160)
  noise_sigma: float = 1.5
  eval_size: int = 224
  smoothing_sigma: float = 4.0
  padim_eps: float = 0.01
  padim_n_channels: int | None = 100
  bounds: tuple[float, float] = (1.0 / 32.0, 8.0)   # strengths searched (geometric bisection)
  max_iter: int = 8
  tol: float = 0.015          # stop once |AUROC − band centre| <= tol


CALIBRATION_SETTINGS = CalibrationSettings()

# features_fn(paths) -> float features [N, h, w, C] of the image files, in order.
FeaturesFn = Callable[[Sequence[Path]], np.ndarray]


def _write_png_set(folder: Path, images) -> list[Path]:
  paths = []
  for i, image in enumerate(images):
    path = folder / f"{i:03d}.png"
    _save_png(path, image)
    paths.append(path)
  return paths


def calibration_normals(category: str, settings: CalibrationSettings = CALIBRATION_SETTINGS,
                        photos: Mapping[str, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The calibration split's defect-free images (uint8): ``(fit_NxSxS, good_MxSxS)``,
  fit crops from the train regions (split ``calibration_fit``), good evaluation crops
  from the test regions (``calibration_eval``, indices ``0..n_good-1``), all drawn with
  ``settings.seed``; independent of the strength."""
  photos = photos or load_photos([category])
  kw = dict(seed=settings.seed, image_size=settings.image_size,
            crop_range=tuple(settings.crop_range), noise_sigma=settings.noise_sigma)
  fit = [render_sample(category, photos, "calibration_fit", "good", i, **kw)[0]
         for i in range(settings.n_fit)]
  good = [render_sample(category, photos, "calibration_eval", "good", i, **kw)[0]
          for i in range(settings.n_good)]
  return np.stack(fit), np.stack(good)


def calibration_draws(category: str, settings: CalibrationSettings = CALIBRATION_SETTINGS,
                      photos: Mapping[str, np.ndarray] | None = None
                      ) -> tuple[list[DefectDraw], list[str]]:
  """The calibration split's defective samples with their strength left open
  (``DefectDraw``): test-region crops ``n_good..n_good+n_defective-1`` of
  ``calibration_eval``, kinds cycling through ``settings.defects``. Returns (draws, kinds)."""
  photos = photos or load_photos([category])
  kinds = [settings.defects[i % len(settings.defects)] for i in range(settings.n_defective)]
  draws = [draw_defective(category, photos, "calibration_eval", kind, settings.n_good + i,
                          seed=settings.seed, image_size=settings.image_size,
                          crop_range=tuple(settings.crop_range),
                          noise_sigma=settings.noise_sigma)
           for i, kind in enumerate(kinds)]
  return draws, kinds


def calibration_defects(category: str, strength: float,
                        settings: CalibrationSettings = CALIBRATION_SETTINGS,
                        photos: Mapping[str, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The calibration split's defective images at ``strength``: ``(images_NxSxS uint8,
  masks_NxSxS bool, kinds)`` of ``calibration_draws``. The random draws do not depend
  on the strength (common random numbers), so AUROC(strength) is smooth."""
  draws, kinds = calibration_draws(category, settings, photos)
  return (np.stack([d.image(strength) for d in draws]), np.stack([d.mask_HxW for d in draws]),
          kinds)


def padim_image_auroc(fit_feats_NxhxwxC: np.ndarray, eval_feats_MxhxwxC: np.ndarray,
                      labels_M: np.ndarray, settings: CalibrationSettings = CALIBRATION_SETTINGS
                      ) -> float:
  """PaDiM's image AUROC as study A computes its reference row: ``anomaly.padim_fit`` on
  the fit features, Mahalanobis scores of the evaluation features, maps upsampled to
  ``eval_size`` and smoothed (``anomaly.anomaly_maps``), image score = map maximum,
  ``metrics.image_auroc``."""
  from tailjax import anomaly, metrics
  fit = anomaly.padim_fit(fit_feats_NxhxwxC, eps=settings.padim_eps,
                          n_channels=settings.padim_n_channels)
  scores_Mxhxw = np.asarray(anomaly.padim_score(fit, eval_feats_MxhxwxC))
  maps_MxSxS = anomaly.anomaly_maps(scores_Mxhxw, settings.eval_size,
                                    sigma=settings.smoothing_sigma)
  return float(metrics.image_auroc(np.asarray(anomaly.image_scores(maps_MxSxS, "max")),
                                   labels_M))


class CalibrationSplit:
  """AUROC(strength) on one category's calibration split (any category, both tiers'
  photos, through the exact-mask generator): the normal images' features are computed
  once and the defective samples drawn once (``calibration_draws``), so each strength
  costs only its quantisation, PNG files and their features.

  Attributes:
    draws, kinds: the defective samples (``DefectDraw``) and their defect kinds.
  """

  def __init__(self, category: str, features_fn: FeaturesFn, workdir: Path,
               settings: CalibrationSettings = CALIBRATION_SETTINGS,
               photos: Mapping[str, np.ndarray] | None = None):
    _check_settings(settings)
    photos = photos or load_photos([category])
    self.category, self.features_fn, self.settings = category, features_fn, settings
    self.dir = Path(workdir) / category
    fit, good = calibration_normals(category, settings, photos)
    self.fit_feats = np.asarray(features_fn(_write_png_set(self.dir / "fit", fit)))
    self.good_feats = np.asarray(features_fn(_write_png_set(self.dir / "good", good)))
    self.draws, self.kinds = calibration_draws(category, settings, photos)

  def images(self, strength: float) -> np.ndarray:
    """The defective images at ``strength``, uint8 [n_defective, S, S]."""
    return np.stack([d.image(strength) for d in self.draws])

  def auroc(self, strength: float) -> float:
    """PaDiM's image AUROC (``padim_image_auroc``) of the good against the defective
    images at ``strength``."""
    paths = _write_png_set(self.dir / f"defective_s{strength:.6f}", self.images(strength))
    defect_feats = np.asarray(self.features_fn(paths))
    labels = np.r_[np.zeros(len(self.good_feats)), np.ones(len(defect_feats))].astype(np.int32)
    return padim_image_auroc(self.fit_feats, np.concatenate([self.good_feats, defect_feats]),
                             labels, self.settings)


def bisect_strengths(auroc_fn: Callable[[float], float], targets: Sequence[float],
                     bounds: tuple[float, float], tol: float, max_iter: int,
                     seen: list[list[float]] | None = None
                     ) -> tuple[list[list[float]], list[list[float]]]:
  """Geometric bisection of the strength for each AUROC target, evaluations shared.

  For each target t in order: with ``seen`` the [s, a(s)] pairs evaluated so far (every
  target's), the bracket is s_lo = the largest seen s with a(s) < t (else bounds[0])
  and s_hi = the smallest seen s > s_lo with a(s) >= t (else bounds[1]); while no seen
  pair lies within ``tol`` of t, evaluate ``a(sqrt(s_lo · s_hi))``, at most ``max_iter``
  times for this target (none when the bracket is empty: t lies beyond a(bounds[1])
  once bounds[1] is seen). The target's strength is the seen pair whose AUROC is
  nearest t (the first evaluated on ties). For one target and nothing seen, this is
  plain geometric bisection on ``bounds`` stopping within ``tol``.

  Returns:
    (chosen: one [s, a] per target, seen: every evaluation in order; ``seen`` is
    extended in place when given).
  """
  if max_iter < 1:
    raise ValueError(f"max_iter must be >= 1, got {max_iter}")
  seen = [] if seen is None else seen
  b_lo, b_hi = (float(b) for b in bounds)
  chosen = []
  for t in targets:
    for _ in range(max_iter):
      if any(abs(a - t) <= tol for _, a in seen):
        break
      s_lo = max([b_lo] + [s for s, a in seen if a < t])
      s_hi = min([b_hi] + [s for s, a in seen if a >= t and s > s_lo])
      if not s_lo < s_hi:
        break
      s = math.sqrt(s_lo * s_hi)
      seen.append([s, float(auroc_fn(s))])
    chosen.append(list(min(seen, key=lambda sa: abs(sa[1] - t))))
  return chosen, seen


def calibration_auroc(category: str, strength: float, features_fn: FeaturesFn,
                      settings: CalibrationSettings = CALIBRATION_SETTINGS, *,
                      workdir: str | os.PathLike | None = None) -> float:
  """PaDiM's image AUROC on ``category``'s calibration split at ``strength`` (the
  quantity ``calibrate_strength`` searches; deterministic given the features)."""
  with tempfile.TemporaryDirectory(prefix="tailjax-calibration-") as tmp:
    calib = CalibrationSplit(category, features_fn, Path(workdir) if workdir else Path(tmp),
                             settings)
    return calib.auroc(float(strength))


def _check_settings(settings: CalibrationSettings) -> None:
  lo, hi = settings.band
  if not 0.5 < lo < hi <= 1.0:
    raise ValueError(f"CalibrationSettings.band must satisfy 0.5 < low < high <= 1, "
                     f"got {settings.band}")
  s_lo, s_hi = settings.bounds
  if not 0 < s_lo < s_hi:
    raise ValueError(f"CalibrationSettings.bounds must satisfy 0 < low < high, "
                     f"got {settings.bounds}")
  bad = [d for d in settings.defects if d not in DEFECT_TYPES]
  if bad or not settings.defects:
    raise ValueError(f"CalibrationSettings.defects must be a non-empty subset of "
                     f"{DEFECT_TYPES}, got {settings.defects}")
  if settings.n_fit < 2 or settings.n_good < 1 or settings.n_defective < 1:
    raise ValueError("CalibrationSettings needs n_fit >= 2, n_good >= 1, n_defective >= 1; "
                     f"got {settings.n_fit}, {settings.n_good}, {settings.n_defective}")


def calibrate_strength(category: str, features_fn: FeaturesFn,
                       settings: CalibrationSettings = CALIBRATION_SETTINGS, *,
                       workdir: str | os.PathLike | None = None) -> dict:
  """The defect strength at which PaDiM's image AUROC on ``category``'s calibration
  split lands in ``settings.band``.

  Geometric bisection (``bisect_strengths`` with one target, the band centre c) on
  ``settings.bounds`` = [s_lo, s_hi]: evaluate ``a(s)`` at ``s = sqrt(s_lo · s_hi)``;
  ``a(s) < c`` moves s_lo up to s, else s_hi down, until ``|a(s) − c| <= tol`` or
  ``max_iter`` evaluations. Returned: the
  evaluated strength nearest c (it must lie in the band, else ValueError naming the
  category and the AUROCs seen: the band is out of reach within the bounds). The
  search is deterministic: the split is fixed by ``settings.seed`` and its random
  draws do not depend on the strength. Only the calibration split is ever seen.

  Args:
    category: a calibrated-tier category.
    features_fn: ``features_fn(paths) -> [N, h, w, C]`` features of PNG files; for the
      study's backbone, ``lambda p: pipeline.extract_features(cfg, p, *pipeline.
      make_extractor(cfg), progress=False)`` (cached by image content).
    settings: what to draw and how to score (``CalibrationSettings``).
    workdir: where the split's PNGs are written (default: a temporary folder).
  Returns:
    ``{"strength", "image_auroc", "band", "seed", "n_fit", "n_good", "n_defective",
    "iterations": [[strength, auroc], ...], "seconds"}``.
  """
  if category_tier(category) != "calibrated":
    raise ValueError(f"category {category!r} is in the {category_tier(category)!r} tier; "
                     f"only {CALIBRATED_CATEGORIES} are calibrated")
  _check_settings(settings)
  start = time.perf_counter()
  lo, hi = settings.band
  centre = 0.5 * (lo + hi)
  with tempfile.TemporaryDirectory(prefix="tailjax-calibration-") as tmp:
    calib = CalibrationSplit(category, features_fn, Path(workdir) if workdir else Path(tmp),
                             settings)
    [[best_s, best_a]], seen = bisect_strengths(calib.auroc, [centre], settings.bounds,
                                                settings.tol, settings.max_iter)
  if not lo <= best_a <= hi:
    raise ValueError(f"calibration of {category!r}: no strength in {settings.bounds} gives a "
                     f"PaDiM image AUROC in {settings.band}; tried "
                     + ", ".join(f"s={s:.4g}: {a:.3f}" for s, a in seen))
  return {"strength": round(best_s, 6), "image_auroc": best_a, "band": list(settings.band),
          "seed": settings.seed, "n_fit": settings.n_fit, "n_good": settings.n_good,
          "n_defective": settings.n_defective, "iterations": seen,
          "seconds": time.perf_counter() - start}


def calibrate_benchmark(features_fn: FeaturesFn,
                        categories: Sequence[str] = CALIBRATED_CATEGORIES,
                        settings: CalibrationSettings = CALIBRATION_SETTINGS, *,
                        workdir: str | os.PathLike | None = None,
                        verbose: bool = False) -> dict[str, dict]:
  """``calibrate_strength`` for every category; ``format_calibration_table`` turns the
  result into the source of ``CALIBRATED_STRENGTHS`` / ``CALIBRATION_RESULTS``."""
  out = {}
  for category in categories:
    out[category] = calibrate_strength(category, features_fn, settings, workdir=workdir)
    if verbose:
      r = out[category]
      print(f"[calibration] {category}: strength {r['strength']:.4g}, PaDiM image AUROC "
            f"{r['image_auroc']:.3f} ({len(r['iterations'])} evaluations, {r['seconds']:.0f}s)")
  return out


def check_calibration(features_fn: FeaturesFn,
                      categories: Sequence[str] = CALIBRATED_CATEGORIES,
                      settings: CalibrationSettings = CALIBRATION_SETTINGS, *,
                      workdir: str | os.PathLike | None = None) -> dict[str, float]:
  """Re-measures PaDiM's calibration-split image AUROC at the committed strengths
  (``{category: auroc}``); equal to ``CALIBRATION_RESULTS[c]["image_auroc"]`` (to its 4
  decimals) when the
  backbone, its weights and the settings are the ones the table was made with."""
  out = {}
  for c in categories:
    strength = resolve_strengths([c])[c]
    if strength is None:
      raise ValueError(f"category {c!r} is in the hard tier: it has no calibrated strength")
    out[c] = calibration_auroc(c, strength, features_fn, settings, workdir=workdir)
  return out


def format_calibration_table(results: Mapping[str, dict]) -> str:
  """Python source of ``CALIBRATED_STRENGTHS`` and ``CALIBRATION_RESULTS`` for
  ``calibrate_benchmark``'s results (it replaces the table at the end of this module)."""
  lines = ["CALIBRATED_STRENGTHS: dict[str, float] = {"]
  lines += [f"    {c!r}: {r['strength']!r}," for c, r in results.items()]
  lines += ["}", "CALIBRATION_RESULTS: dict[str, dict] = {"]
  for c, r in results.items():
    seen = [[round(s, 6), round(a, 4)] for s, a in r["iterations"]]
    lines.append(f"    {c!r}: {{\"image_auroc\": {round(r['image_auroc'], 4)!r}, "
                 f"\"seconds\": {round(r['seconds'], 1)!r}, \"iterations\": [")
    lines += [f"        {', '.join(map(repr, seen[i:i + 4]))}," for i in range(0, len(seen), 4)]
    lines.append("    ]},")
  lines.append("}")
  return "\n".join(lines)


# The committed calibration (``calibrate_benchmark`` with ``CALIBRATION_SETTINGS`` and the
# demo's EfficientNet-Lite0 stride-16 features, empty feature cache: 237 s in all on 2 busy
# CPU cores; see the module docstring for the command).
CALIBRATED_STRENGTHS: dict[str, float] = {
    'moon': 4.0,
    'tissue': 3.363586,
    'page': 7.336032,
    'notes': 7.336032,
    'retina': 2.0,
    'coins': 6.727171,
}
CALIBRATION_RESULTS: dict[str, dict] = {
    'moon': {"image_auroc": 0.9137, "seconds": 35.9, "iterations": [
        [0.5, 0.6892], [2.0, 0.8625], [4.0, 0.9137],
    ]},
    'tissue': {"image_auroc": 0.9037, "seconds": 40.9, "iterations": [
        [0.5, 0.5408], [2.0, 0.8467], [4.0, 0.9325], [2.828427, 0.8717],
        [3.363586, 0.9037],
    ]},
    'page': {"image_auroc": 0.8929, "seconds": 67.4, "iterations": [
        [0.5, 0.6704], [2.0, 0.8063], [4.0, 0.865], [5.656854, 0.8812],
        [6.727171, 0.8879], [7.336032, 0.8929], [7.660826, 0.8929], [7.828576, 0.8929],
    ]},
    'notes': {"image_auroc": 0.9, "seconds": 43.9, "iterations": [
        [0.5, 0.4483], [2.0, 0.6646], [4.0, 0.8104], [5.656854, 0.8583],
        [6.727171, 0.8825], [7.336032, 0.9],
    ]},
    'retina': {"image_auroc": 0.9175, "seconds": 21.9, "iterations": [
        [0.5, 0.6979], [2.0, 0.9175],
    ]},
    'coins': {"image_auroc": 0.8962, "seconds": 26.7, "iterations": [
        [0.5, 0.6238], [2.0, 0.8], [4.0, 0.8408], [5.656854, 0.8729],
        [6.727171, 0.8962],
    ]},
}
