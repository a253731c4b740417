"""Reader for image folders in the MVTec AD layout.

::

  <root>/<category>/train/good/*.png
  <root>/<category>/test/good/*.png
  <root>/<category>/test/<defect>/*.png
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png    (0/255; none for good)

``scan_split`` indexes one split into an ``ImageSplit`` (paths, labels, defect
types, mask paths) without decoding pixels; ``ImageSplit.load(size)`` decodes
and validates them into ``images_NxHxWx3`` uint8 (grayscale replicated to 3
channels) and ``masks_NxHxW`` uint8 in {0, 1} (nearest-neighbour resize;
all-zero for good images). The VisA reader (``tailjax.data.visa``) returns the
same ``ImageSplit``.

Every problem with the data raises ``DatasetError`` (a ``ValueError``; the
``MissingDataError`` subclass is also a ``FileNotFoundError``) whose message
names the offending file or folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


class DatasetError(ValueError):
  """Bad dataset content; the message names the offending file or folder."""


class MissingDataError(DatasetError, FileNotFoundError):
  """A folder or file the layout requires is missing."""


Size = int | tuple[int, int] | None


def _hw(size: Size) -> tuple[int, int] | None:
  if size is None:
    return None
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


# ----------------------------------------------------------------------------
# Pixel readers
# ----------------------------------------------------------------------------


def _open(path: Path, what: str) -> Image.Image:
  path = Path(path)
  if not path.is_file():
    raise MissingDataError(f"{what} {path} does not exist")
  try:
    im = Image.open(path)
    im.load()  # decode now: truncated or corrupt files fail here, not later
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot read {what} {path}: {e}") from e
  return im


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of an image file, read from its header only."""
  try:
    with Image.open(path) as im:
      w, h = im.size
  except FileNotFoundError as e:
    raise MissingDataError(f"image {path} does not exist") from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot read image {path}: {e}") from e
  return h, w


# PIL modes of single-channel files (``read_image`` replicates them to 3 channels).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def image_channels_of(path: str | os.PathLike) -> int:
  """1 for a grayscale image file, 3 for a colour one (palette files count as colour),
  read from its header only."""
  try:
    with Image.open(path) as im:
      mode = im.mode
  except FileNotFoundError as e:
    raise MissingDataError(f"image {path} does not exist") from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot read image {path}: {e}") from e
  return 1 if mode in GRAYSCALE_MODES else 3


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to uint8 RGB ``[H, W, 3]``; grayscale is replicated.

  16-bit images are scaled to 8 bit (value / 257); alpha is dropped.
  """
  im = _open(Path(path), "image")
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(im, dtype=np.float64)
    a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if im.mode == "F":
    raise DatasetError(f"image {path} holds floating-point pixels (mode F); expected 8-bit")
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_mask(path: str | os.PathLike, *, strict: bool = True) -> np.ndarray:
  """Decodes a defect mask to bool ``[H, W]``.

  ``strict`` (MVTec): the values must be a subset of {0, 255} or of {0, 1};
  anything else (e.g. an anti-aliased or JPEG-compressed mask) is an error.
  Non-strict (VisA): every value > 0 is defect. RGB masks must have equal
  channels.
  """
  im = _open(Path(path), "mask")
  a = np.asarray(im)
  if a.ndim == 3:
    if a.shape[-1] == 4:
      a = a[..., :3]
    if not (a == a[..., :1]).all():
      raise DatasetError(f"mask {path} is a colour image with unequal channels")
    a = a[..., 0]
  if a.dtype == bool:
    return a
  if strict:
    values = np.unique(a)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
      shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
      raise DatasetError(
          f"mask {path} is not binary: values {{{shown}}}; expected 0 and 255 (or 0 and 1)")
  return a > 0


def _resize(image: Image.Image, hw: tuple[int, int], resample) -> Image.Image:
  h, w = hw
  return image if image.size == (w, h) else image.resize((w, h), resample=resample)


def load_images(paths: Sequence[str | os.PathLike], size: Size = None) -> np.ndarray:
  """Loads and resizes (bilinear, antialiased when shrinking) to ``images_NxHxWx3`` uint8.

  ``size`` is an int (square), ``(height, width)`` or None (keep; then every
  image must have the same size).
  """
  hw = _hw(size)
  out = []
  for path in paths:
    a = read_image(path)
    if hw is None:
      if out and a.shape != out[0].shape:
        raise DatasetError(f"image {path} is {a.shape[:2]} but {paths[0]} is "
                           f"{out[0].shape[:2]}; pass a size to resize them")
    else:
      a = np.asarray(_resize(Image.fromarray(a), hw, Image.Resampling.BILINEAR))
    out.append(a)
  if not out:
    h, w = hw or (0, 0)
    return np.zeros((0, h, w, 3), np.uint8)
  return np.stack(out)


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplit:
  """One split of one category: file paths and labels, no pixels.

  Attributes:
    root: dataset root.
    category: category name.
    split: "train" or "test".
    image_paths: one path per image, sorted by defect type then file name.
    labels: int32 [N], 0 = good, 1 = defective.
    defect_types: per image, "good" or the defect folder name.
    mask_paths: per image, the mask path or None (good images).
    strict_masks: masks must be exactly {0, 255} or {0, 1} (MVTec); False
      binarises any value > 0 (VisA).
  """
  root: Path
  category: str
  split: str
  image_paths: tuple[Path, ...]
  labels: np.ndarray
  defect_types: tuple[str, ...]
  mask_paths: tuple[Path | None, ...]
  strict_masks: bool = True

  def __len__(self) -> int:
    return len(self.image_paths)

  def load_images(self, size: Size = None) -> np.ndarray:
    """``images_NxHxWx3`` uint8, see ``load_images``."""
    return load_images(self.image_paths, size)

  def load_masks(self, size: Size = None) -> np.ndarray:
    """``masks_NxHxW`` uint8 in {0, 1}; zeros for good images; nearest-neighbour resize.

    Each mask must have its image's size (checked against the image header).
    """
    hw = _hw(size)
    out = []
    for image_path, mask_path in zip(self.image_paths, self.mask_paths):
      ih, iw = image_size_of(image_path)
      if mask_path is None:
        m = np.zeros((ih, iw), np.uint8)
      else:
        m = read_mask(mask_path, strict=self.strict_masks).astype(np.uint8)
        if m.shape != (ih, iw):
          raise DatasetError(f"mask {mask_path} is {m.shape[0]}x{m.shape[1]} (HxW) but its "
                             f"image {image_path} is {ih}x{iw}")
      if hw is not None:
        m = np.asarray(_resize(Image.fromarray(m), hw, Image.Resampling.NEAREST))
      elif out and m.shape != out[0].shape:
        raise DatasetError(f"image {image_path} is {m.shape} but {self.image_paths[0]} is "
                           f"{out[0].shape}; pass a size to resize them")
      out.append(m)
    if not out:
      h, w = hw or (0, 0)
      return np.zeros((0, h, w), np.uint8)
    return np.stack(out)

  def load(self, size: Size = None) -> tuple[np.ndarray, np.ndarray]:
    """(``images_NxHxWx3`` uint8, ``masks_NxHxW`` uint8 0/1)."""
    return self.load_images(size), self.load_masks(size)


def _list_images(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in IMAGE_EXTENSIONS)


def _require_dir(path: Path, what: str) -> None:
  if not path.is_dir():
    raise MissingDataError(f"{what} {path} does not exist (expected the MVTec AD layout "
                           f"<root>/<category>/train/good, test/<type>, ground_truth/<type>)")


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
  for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
    if (gt_dir / name).is_file():
      return gt_dir / name
  return None


def list_categories(root: str | os.PathLike) -> list[str]:
  """Sorted names of the folders under ``root`` that hold a ``train`` folder."""
  root = Path(root)
  _require_dir(root, "dataset root")
  cats = sorted(p.name for p in root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / "train").is_dir())
  if not cats:
    raise MissingDataError(f"dataset root {root} holds no category folder with a train/ "
                           f"subfolder (MVTec AD layout)")
  return cats


def scan_split(root: str | os.PathLike, category: str, split: str) -> ImageSplit:
  """Indexes ``<root>/<category>/<split>`` of an MVTec-AD-layout dataset.

  Train uses ``train/good`` only (must be non-empty). Test uses every folder
  under ``test``: ``good`` is label 0 without a mask, any other folder is a
  defect type, label 1, whose mask must exist as
  ``ground_truth/<type>/<stem>_mask.png`` (``<stem>.png`` is accepted too).
  """
  root = Path(root)
  _require_dir(root, "dataset root")
  cat_dir = root / category
  _require_dir(cat_dir, f"category {category!r} folder")
  if split == "train":
    good_dir = cat_dir / "train" / GOOD
    _require_dir(good_dir, "train folder")
    images = _list_images(good_dir)
    if not images:
      raise DatasetError(f"empty category: {good_dir} holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return ImageSplit(root, category, split, tuple(images), np.zeros(len(images), np.int32),
                      (GOOD,) * len(images), (None,) * len(images))
  if split != "test":
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  test_dir = cat_dir / "test"
  _require_dir(test_dir, "test folder")
  paths, labels, types, masks = [], [], [], []
  type_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
  for type_dir in type_dirs:
    for image in _list_images(type_dir):
      paths.append(image)
      types.append(type_dir.name)
      if type_dir.name == GOOD:
        labels.append(0)
        masks.append(None)
        continue
      gt_dir = cat_dir / "ground_truth" / type_dir.name
      mask = _find_mask(gt_dir, image)
      if mask is None:
        raise MissingDataError(f"defective test image {image} has no mask: expected "
                               f"{gt_dir / (image.stem + '_mask.png')}")
      labels.append(1)
      masks.append(mask)
  if not paths:
    raise DatasetError(f"test folder {test_dir} holds no images")
  return ImageSplit(root, category, split, tuple(paths), np.asarray(labels, np.int32),
                    tuple(types), tuple(masks))


def scan_category(root: str | os.PathLike, category: str) -> tuple[ImageSplit, ImageSplit]:
  """(train, test) splits of one category."""
  return scan_split(root, category, "train"), scan_split(root, category, "test")
