"""Study-A data as the pipeline sees it: a dataset root, its categories, and per
category the cached backbone features, test masks and labels (``CategoryData``).

Every stage after feature extraction (training, evaluation, analysis) reads
``CategoryData`` only, so any data source that fills it runs unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tailjax.data import features as feature_cache
from tailjax.data import mvtec


# The data.* fields each data kind reads (a field of another kind would be recorded but
# change nothing, so it is refused: ``runrecord.check_fields``).
DATA_FIELDS = {
    "textures": ("data.kind", "data.root", "data.categories", "data.cache_dir",
                 "data.benchmark_seed", "data.image_size", "data.n_train", "data.n_test"),
    "mvtec": ("data.kind", "data.root", "data.categories", "data.cache_dir"),
    "visa": ("data.kind", "data.root", "data.categories", "data.cache_dir"),
}


def data_fields(cfg) -> tuple[str, ...]:
  kind = cfg.data.kind
  if kind not in DATA_FIELDS:
    raise ValueError(f"config.data.kind must be one of {sorted(DATA_FIELDS)}, got {kind!r}")
  return DATA_FIELDS[kind]


def parse_categories(value) -> list[str] | None:
  """``"a,b"`` / ``("a", "b")`` → list; empty → None (all categories)."""
  if value is None:
    return None
  if isinstance(value, str):
    items = [v.strip() for v in value.split(",") if v.strip()]
  else:
    items = [str(v) for v in value]
  return items or None


def dataset_root(cfg) -> Path:
  """The MVTec-layout root; builds (or reuses) the embedded texture benchmark if asked."""
  d = cfg.data
  if d.kind == "textures":
    from tailjax.data import textures
    return textures.build_texture_benchmark(
        d.root or None, seed=d.benchmark_seed, image_size=d.image_size,
        n_train=d.n_train, n_test=d.n_test, verbose=True)
  if d.kind in ("mvtec", "visa"):
    if not d.root:
      raise ValueError(f"config.data.root must point to the {d.kind} folder "
                       f"(--config.data.root=/path/to/{d.kind})")
    root = Path(d.root).expanduser()
    if not root.is_dir():
      raise FileNotFoundError(f"config.data.root: {root} does not exist")
    return root
  raise ValueError(f"config.data.kind must be 'textures', 'mvtec' or 'visa', got {d.kind!r}")


def category_splits(cfg, root: Path) -> dict[str, tuple[mvtec.ImageSplit, mvtec.ImageSplit]]:
  wanted = parse_categories(cfg.data.categories)
  if cfg.data.kind == "visa":
    from tailjax.data import visa
    available = visa.list_visa_categories(root)
    scan = lambda c: (visa.scan_visa_split(root, c, "train"), visa.scan_visa_split(root, c, "test"))
  else:
    available = mvtec.list_categories(root)
    scan = lambda c: mvtec.scan_category(root, c)
  cats = wanted or available
  missing = [c for c in cats if c not in available]
  if missing:
    raise ValueError(f"config.data.categories: {missing} not found under {root} "
                     f"(available: {', '.join(available)})")
  return {c: scan(c) for c in cats}


def make_extractor(cfg):
  """(extract_fn, extractor_id) for the feature cache."""
  b = cfg.backbone
  if b.name != "efficientnet_lite0":
    raise ValueError(f"config.backbone.name must be 'efficientnet_lite0', got {b.name!r}")
  from tailjax import backbones
  net = backbones.efficientnet_lite0(normalization=b.normalization)
  layer = int(b.layer)
  fn = lambda images: net.extract(images, layers=(layer,), batch_size=b.batch_size,
                                  resize_to=None, progress=False)
  return fn, f"efficientnet_lite0-{b.normalization}-v1"


@dataclasses.dataclass
class CategoryData:
  name: str
  train_feats: np.ndarray        # [N, h, w, C]
  test_feats: np.ndarray         # [M, h, w, C]
  test_masks: np.ndarray         # [M, S, S] uint8 {0, 1}
  test_labels: np.ndarray        # [M]
  test_images: np.ndarray        # [M, S, S, 3] uint8 (for figures)
  test_types: tuple[str, ...]


def load_category(cfg, name: str, train_split, test_split, extractor, extractor_id) -> CategoryData:
  b = cfg.backbone
  cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
  feats = {}
  for split_name, split in (("train", train_split), ("test", test_split)):
    feats[split_name] = feature_cache.cached_features(
        list(split.image_paths), extractor, extractor_id, resolution=b.resolution,
        layers=(int(b.layer),), cache_dir=cache_dir, batch_size=b.batch_size,
        progress=True)[int(b.layer)]
  size = cfg.eval.size
  images, masks = test_split.load(size)
  return CategoryData(name, feats["train"], feats["test"], masks, np.asarray(test_split.labels),
                      images, tuple(test_split.defect_types))


def default_cache_dir() -> Path:
  from tailjax.backbones import torch_pickle
  return Path(torch_pickle.default_cache_dir()) / "features"
