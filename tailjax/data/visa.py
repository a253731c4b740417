"""Reader for VisA through its split CSV (``<root>/split_csv/1cls.csv``).

The CSV has the columns ``object, split, label, image, mask``: ``split`` is
``train`` or ``test``, ``label`` is ``normal`` or ``anomaly``, ``image`` and
``mask`` are paths relative to ``<root>`` (``mask`` empty for normal images).
VisA's masks are stored as 0/255 or as small integer labels, so any value > 0
is defect. The result is the same ``ImageSplit`` the MVTec reader returns
(defect type ``"anomaly"`` for every anomalous image, since the 1-class CSV
does not name defect types).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from tailjax.data.mvtec import GOOD, DatasetError, ImageSplit, MissingDataError

VISA_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _csv_path(root: Path, csv_path: str | os.PathLike | None) -> Path:
  path = Path(csv_path) if csv_path is not None else root / VISA_CSV
  if not root.is_dir():
    raise MissingDataError(f"VisA root {root} does not exist")
  if not path.is_file():
    raise MissingDataError(f"VisA split CSV {path} does not exist")
  return path


def read_visa_csv(root: str | os.PathLike,
                  csv_path: str | os.PathLike | None = None) -> list[dict[str, str]]:
  """The CSV's rows as dicts (whitespace stripped); checks columns and labels."""
  root = Path(root)
  path = _csv_path(root, csv_path)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
      raise DatasetError(f"VisA split CSV {path} lacks columns {missing}; header is {header}")
    rows = []
    for line, raw in enumerate(reader, start=2):
      row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
      if row["label"] not in _LABELS:
        raise DatasetError(f"{path}:{line}: label {row['label']!r} is not 'normal' or 'anomaly'")
      if row["split"] not in ("train", "test"):
        raise DatasetError(f"{path}:{line}: split {row['split']!r} is not 'train' or 'test'")
      rows.append({**row, "line": str(line)})
  if not rows:
    raise DatasetError(f"VisA split CSV {path} has no rows")
  return rows


def list_visa_categories(root: str | os.PathLike,
                         csv_path: str | os.PathLike | None = None) -> list[str]:
  """Sorted object names in the split CSV."""
  return sorted({r["object"] for r in read_visa_csv(root, csv_path)})


def scan_visa_split(root: str | os.PathLike, category: str, split: str,
                    csv_path: str | os.PathLike | None = None) -> ImageSplit:
  """Indexes one object's ``train`` or ``test`` split from the CSV; files must exist.

  An anomalous row without a mask, or a listed file that is missing, raises an
  error naming the CSV line and the file.
  """
  root = Path(root)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  csv_file = _csv_path(root, csv_path)
  rows = [r for r in read_visa_csv(root, csv_path) if r["object"] == category]
  if not rows:
    raise DatasetError(f"category {category!r} does not appear in {csv_file}")
  rows = [r for r in rows if r["split"] == split]
  if not rows:
    raise DatasetError(f"empty category: {csv_file} lists no {split} images for {category!r}")
  paths, labels, types, masks = [], [], [], []
  for r in rows:
    image = root / r["image"]
    if not image.is_file():
      raise MissingDataError(f"image {image} listed in {csv_file}:{r['line']} does not exist")
    label = _LABELS[r["label"]]
    mask = None
    if label == 1:
      if not r["mask"]:
        raise MissingDataError(f"anomalous image {image} has no mask in {csv_file}:{r['line']}")
      mask = root / r["mask"]
      if not mask.is_file():
        raise MissingDataError(f"mask {mask} for image {image} ({csv_file}:{r['line']}) "
                               f"does not exist")
    paths.append(image)
    labels.append(label)
    types.append(GOOD if label == 0 else "anomaly")
    masks.append(mask)
  return ImageSplit(root, category, split, tuple(paths), np.asarray(labels, np.int32),
                    tuple(types), tuple(masks), strict_masks=False)
