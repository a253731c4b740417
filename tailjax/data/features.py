"""Feature cache for frozen backbones, and the readers for user-supplied feature files.

Extracting backbone features is the slowest step of study A and its result
depends only on the image bytes, the backbone, the input resolution and the
layers, so ``cached_features`` stores it under a content hash:

  key = sha256(format version, extractor_id, resolution, layers,
               number of images, sha256(bytes of image 1), sha256(bytes of image 2), ...)

Hashing the bytes (not paths or mtimes) makes the key robust: a copied or
moved dataset still hits, any edited image misses, and a file rewritten within
the file system's timestamp granularity cannot go unnoticed. The cost is one
read of the images per call (hundreds of MB/s, far below extraction cost).
Image order is part of the key because row i of the result belongs to image i.
``extractor_id`` must change whenever the extractor's weights or code change.

Entries are ``<cache_dir>/<key>.npz`` holding one float32 array per layer plus
a JSON metadata record, written atomically; an unreadable or mismatching entry
is recomputed and replaced. A cache that cannot be written (a shared, read-only one;
a full disk) is still read; what it lacks is extracted and used without being stored,
with one warning per folder (``data.cache_dir`` names a writable one instead).

Features extracted elsewhere come in as ``.npz`` files: ``load_feature_category``
reads one category for ``data.kind=features`` (``train_features``,
``test_features``, ``test_labels``, ``test_masks``; see ``tailjax.data.pipeline``),
``load_feature_npz`` one labelled split (``features``, ``labels``, optional
``masks``). Both validate shapes, values and masks, raising ``DatasetError`` that
names the file and the array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np

from tailjax.data.mvtec import DatasetError, MissingDataError, load_images
from tailjax.io import atomic_path, read_npz

CACHE_FORMAT_VERSION = 1
Extractor = Callable[[np.ndarray], Mapping[Hashable, np.ndarray]]


def file_digest(path: str | os.PathLike) -> str:
  """sha256 hex digest of a file's bytes."""
  h = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  except FileNotFoundError as e:
    raise MissingDataError(f"image {path} does not exist") from e
  return h.hexdigest()


def feature_cache_key(image_paths: Sequence[str | os.PathLike], extractor_id: str,
                      resolution: int, layers: Sequence[Hashable]) -> str:
  """The content hash described in the module docstring (hex, 64 chars)."""
  h = hashlib.sha256()
  header = {"version": CACHE_FORMAT_VERSION, "extractor_id": extractor_id,
            "resolution": int(resolution), "layers": [repr(l) for l in layers],
            "n": len(image_paths)}
  h.update(json.dumps(header, sort_keys=True).encode())
  for path in image_paths:
    h.update(bytes.fromhex(file_digest(path)))
  return h.hexdigest()


def _read_entry(path: Path, key: str, layers: Sequence[Hashable], n: int):
  """The cached arrays, or None if the entry is missing, unreadable or not ours."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(str(data["__meta__"]))
      if meta.get("key") != key:
        return None
      out = {layer: np.asarray(data[f"layer_{i}"]) for i, layer in enumerate(layers)}
  except Exception:  # noqa: BLE001  any unreadable entry is a miss; recomputing is safe
    return None
  if any(a.shape[0] != n for a in out.values()):
    return None
  return out


_cache_only: dict[str, str | None] = {"reason": None}


@contextlib.contextmanager
def cache_only(reason: str) -> Iterator[None]:
  """Within the block ``cached_features`` reads the cache and never extracts: a miss is
  a ``MissingDataError`` ending with ``reason``. The processes of a distributed run
  other than process 0 read the features process 0 extracted this way, so they are
  extracted once (and a cache folder not shared between processes is named)."""
  before = _cache_only["reason"]
  _cache_only["reason"] = reason
  try:
    yield
  finally:
    _cache_only["reason"] = before


def cached_features(image_paths: Sequence[str | os.PathLike], extractor: Extractor,
                    extractor_id: str, resolution: int, layers: Sequence[Hashable],
                    cache_dir: str | os.PathLike, *, batch_size: int = 64,
                    progress: bool = False) -> dict[Hashable, np.ndarray]:
  """Backbone features of ``image_paths``, computed once and cached on disk.

  Images are decoded with ``mvtec.load_images`` (RGB uint8, bilinear resize to
  ``resolution`` x ``resolution``) in chunks of ``batch_size`` and passed to
  ``extractor(images_BxRxRx3_uint8) -> {layer: array [B, ...]}``, which must
  return every entry of ``layers`` (extra keys are ignored).

  Args:
    image_paths: images in the order of the result's rows.
    extractor: any callable as above, e.g. ``lambda x: backbone.extract(x, layers=(16,))``.
    extractor_id: names the extractor's weights and code; part of the key.
    resolution: side length the images are resized to before extraction.
    layers: the extractor output keys to keep (e.g. strides ``(8, 16)``).
    cache_dir: folder for ``<key>.npz`` entries.
  Returns:
    ``{layer: float32 array [N, ...]}`` in the order of ``layers``.
  """
  layers = tuple(layers)
  if not layers:
    raise ValueError("layers must name at least one extractor output")
  image_paths = list(image_paths)
  if not image_paths:
    raise ValueError("image_paths is empty")
  key = feature_cache_key(image_paths, extractor_id, resolution, layers)
  entry = Path(cache_dir) / f"{key}.npz"
  cached = _read_entry(entry, key, layers, len(image_paths))
  if cached is not None:
    return cached
  if _cache_only["reason"]:
    raise MissingDataError(f"feature cache entry {entry} is missing: {_cache_only['reason']}")

  chunks: dict[Hashable, list[np.ndarray]] = {layer: [] for layer in layers}
  starts = range(0, len(image_paths), batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=f"features {extractor_id}", unit="batch")
  for start in starts:
    batch_paths = image_paths[start:start + batch_size]
    out = extractor(load_images(batch_paths, resolution))
    for layer in layers:
      if layer not in out:
        raise KeyError(f"extractor {extractor_id!r} returned keys {list(out)}; "
                       f"layer {layer!r} is missing")
      a = np.asarray(out[layer], dtype=np.float32)
      if a.shape[0] != len(batch_paths):
        raise ValueError(f"extractor {extractor_id!r} layer {layer!r} returned {a.shape[0]} "
                         f"rows for {len(batch_paths)} images")
      bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
      if bad.any():
        raise FloatingPointError(f"extractor {extractor_id!r} layer {layer!r} produced NaN/Inf "
                                 f"features for image {batch_paths[int(np.argmax(bad))]}")
      chunks[layer].append(a)
  result = {layer: np.concatenate(chunks[layer]) for layer in layers}

  meta = {"key": key, "extractor_id": extractor_id, "resolution": int(resolution),
          "layers": [repr(l) for l in layers], "n": len(image_paths),
          "first_image": str(image_paths[0])}
  arrays = {f"layer_{i}": result[layer] for i, layer in enumerate(layers)}
  try:
    with atomic_path(entry) as tmp:
      with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)
  except OSError as e:   # a read-only (shared) cache, a full disk: the features are still good
    _warn_unwritable(Path(cache_dir), e)
  return result


_warned_unwritable: set[str] = set()


def _warn_unwritable(cache_dir: Path, e: OSError) -> None:
  """One warning per cache folder that cannot store an entry (the run goes on)."""
  if str(cache_dir) in _warned_unwritable:
    return
  _warned_unwritable.add(str(cache_dir))
  print(f"warning: the feature cache {cache_dir} cannot be written ({e.strerror or e}): "
        "features it lacks are extracted and used without being stored; set data.cache_dir "
        "(or $TAILJAX_CACHE) to a writable folder to keep them", file=sys.stderr)


# ----------------------------------------------------------------------------
# User-supplied features
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
  """Pre-extracted features: ``features [N, H, W, C]`` float32, ``labels [N]`` int32
  (0 good, 1 defective) and optional ``masks [N, S, S]`` uint8 in {0, 1} (square)."""
  features: np.ndarray
  labels: np.ndarray
  masks: np.ndarray | None
  path: Path


def _read(path: str | os.PathLike, required: Sequence[str],
          what: str = "feature file") -> tuple[Path, dict[str, np.ndarray]]:
  path = Path(path)
  if not path.is_file():
    raise MissingDataError(f"{what} {path} does not exist")
  arrays = read_npz(path, error=DatasetError)
  missing = [k for k in required if k not in arrays]
  if missing:
    raise DatasetError(f"{what} {path} lacks the array{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(repr(k) for k in missing)} (found {sorted(arrays)})")
  return path, arrays


def _check_features(path: Path, name: str, feats: np.ndarray) -> np.ndarray:
  """A finite real ``[n, H, W, C]`` array as float32, or ``DatasetError`` naming file and field."""
  if feats.ndim != 4:
    raise DatasetError(f"{path}: {name!r} must be [n, H, W, C], got shape {feats.shape}")
  if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
    raise DatasetError(f"{path}: {name!r} must be real numbers, got dtype {feats.dtype}")
  if 0 in feats.shape:
    raise DatasetError(f"{path}: {name!r} is empty (shape {feats.shape})")
  feats = feats.astype(np.float32, copy=False)
  finite_N = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
  if not finite_N.all():
    bad = int((~np.isfinite(feats)).sum())
    raise DatasetError(f"{path}: {name!r} holds {bad} NaN/Inf values "
                       f"(first in sample {int(np.argmax(~finite_N))})")
  return feats


def _check_labels(path: Path, name: str, labels: np.ndarray, n: int, against: str) -> np.ndarray:
  if labels.shape != (n,):
    raise DatasetError(f"{path}: {name!r} must have shape ({n},) to match {against!r}, "
                       f"got {labels.shape}")
  if not np.isin(labels, (0, 1)).all():
    raise DatasetError(f"{path}: {name!r} must be 0 (good) or 1 (defective), "
                       f"got values {np.unique(labels)[:8].tolist()}")
  return labels.astype(np.int32)


def _check_masks(path: Path, name: str, masks: np.ndarray, labels: np.ndarray,
                 labels_name: str, require_defect_pixels: bool) -> np.ndarray:
  n = len(labels)
  if masks.ndim != 3 or masks.shape[0] != n:
    raise DatasetError(f"{path}: {name!r} must be [{n}, h, w] (one mask per {labels_name!r} "
                       f"entry), got shape {masks.shape}")
  if 0 in masks.shape[1:]:
    raise DatasetError(f"{path}: {name!r} has empty masks (shape {masks.shape})")
  if masks.shape[1] != masks.shape[2]:
    # Maps are scored on the square eval.size grid: a non-square mask would be stretched
    # onto it and every pixel metric computed against distorted defects.
    raise DatasetError(f"{path}: {name!r} must hold square masks [{n}, S, S], got shape "
                       f"{masks.shape}; crop or pad them to square (as the features were)")
  values = set(np.unique(masks).tolist())
  if not (values <= {0, 1} or values <= {0, 255}):
    raise DatasetError(f"{path}: {name!r} is not binary, values {sorted(values)[:8]} "
                       "(expected 0/1 or 0/255)")
  masks = (masks > 0).astype(np.uint8)
  any_N = masks.reshape(n, -1).any(axis=1)
  good_marked = np.flatnonzero(any_N & (labels == 0))
  if good_marked.size:
    raise DatasetError(f"{path}: {name!r} marks defect pixels in sample {int(good_marked[0])}, "
                       f"which {labels_name!r} labels good")
  if require_defect_pixels:
    unmarked = np.flatnonzero(~any_N & (labels == 1))
    if unmarked.size:
      raise DatasetError(f"{path}: {labels_name!r} labels sample {int(unmarked[0])} defective "
                         f"but its mask in {name!r} is empty ({unmarked.size} such samples); "
                         "every defective sample needs its pixel mask")
  return masks


def load_feature_npz(path: str | os.PathLike) -> FeatureSet:
  """Reads and validates a ``.npz`` with ``features``, ``labels`` and optional ``masks``.

  Checks: the file opens; ``features`` is a finite real array of rank 4;
  ``labels`` has shape [N] with values in {0, 1}; ``masks`` (if present) has
  shape [N, S, S] (square) with values in {0, 1} or {0, 255}. Every failure raises
  ``DatasetError`` naming the file and the field.
  """
  path, arrays = _read(path, ("features", "labels"))
  feats = _check_features(path, "features", arrays["features"])
  labels = _check_labels(path, "labels", arrays["labels"], len(feats), "features")
  masks = arrays.get("masks")
  if masks is not None:
    masks = _check_masks(path, "masks", masks, labels, "labels", require_defect_pixels=False)
  return FeatureSet(feats, labels, masks, path)


FEATURE_CATEGORY_KEYS = ("train_features", "test_features", "test_labels", "test_masks")


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureCategory:
  """One category of pre-extracted features (a ``data.kind=features`` file).

  Attributes:
    train_features: float32 [N, H, W, C], defect-free training samples.
    test_features: float32 [M, H, W, C], same grid and channels.
    test_labels: int32 [M], 0 good / 1 defective.
    test_masks: uint8 [M, S, S] in {0, 1}; all-zero exactly for the good samples.
    path: the file.
  """
  train_features: np.ndarray
  test_features: np.ndarray
  test_labels: np.ndarray
  test_masks: np.ndarray
  path: Path


def load_feature_category(path: str | os.PathLike) -> FeatureCategory:
  """Reads and validates one category's ``.npz``: exactly the arrays of ``FEATURE_CATEGORY_KEYS``.

  ``train_features [N, H, W, C]`` and ``test_features [M, H, W, C]`` (any grid H×W,
  any channel count C, the same in both; real, finite; N ≥ 2), ``test_labels [M]``
  in {0, 1} with at least one good and one defective sample (the metrics need both),
  ``test_masks [M, S, S]`` with values {0, 1} or {0, 255} (any square size): empty
  for every good sample, non-empty for every defective one. Any failure, and any
  other array in the file, raises ``DatasetError`` naming the file and the array.
  """
  path, arrays = _read(path, FEATURE_CATEGORY_KEYS, what="features file")
  extra = sorted(set(arrays) - set(FEATURE_CATEGORY_KEYS))
  if extra:
    raise DatasetError(f"{path}: unknown arrays {extra}; a features file holds exactly "
                       f"{', '.join(FEATURE_CATEGORY_KEYS)}")
  train = _check_features(path, "train_features", arrays["train_features"])
  test = _check_features(path, "test_features", arrays["test_features"])
  if len(train) < 2:
    raise DatasetError(f"{path}: 'train_features' needs at least 2 samples, got {len(train)}")
  if train.shape[1:] != test.shape[1:]:
    (h, w, c), (th, tw, tc) = train.shape[1:], test.shape[1:]
    raise DatasetError(f"{path}: 'test_features' is a {th}×{tw} grid of {tc} channels but "
                       f"'train_features' a {h}×{w} grid of {c}; they must match")
  labels = _check_labels(path, "test_labels", arrays["test_labels"], len(test), "test_features")
  if labels.min() == labels.max():
    kind = "defective" if labels[0] == 0 else "good"
    raise DatasetError(f"{path}: 'test_labels' has no {kind} sample; the metrics need both "
                       "good and defective test samples")
  masks = _check_masks(path, "test_masks", arrays["test_masks"], labels, "test_labels",
                       require_defect_pixels=True)
  return FeatureCategory(train, test, labels, masks, path)
