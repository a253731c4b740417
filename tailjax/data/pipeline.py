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
                 "data.val_fraction", "data.split_seed",
                 "data.benchmark_seed", "data.image_size", "data.n_train", "data.n_test"),
    "mvtec": ("data.kind", "data.root", "data.categories", "data.cache_dir",
              "data.val_fraction", "data.split_seed"),
    "visa": ("data.kind", "data.root", "data.categories", "data.cache_dir",
             "data.val_fraction", "data.split_seed"),
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
  """One category as every stage after feature extraction sees it."""
  name: str
  train_feats: np.ndarray        # [N, h, w, C]  normal images the flows train on
  val_feats: np.ndarray          # [V, h, w, C]  held-out normal training images (V may be 0)
  test_feats: np.ndarray         # [M, h, w, C]
  test_masks: np.ndarray         # [M, S, S] uint8 {0, 1}
  test_labels: np.ndarray        # [M]
  test_images: np.ndarray | None  # [M, S, S, 3] uint8 (for figures), None if not available
  test_types: tuple[str, ...]
  train_index: np.ndarray        # indices of train_feats rows among the split's normal images
  val_index: np.ndarray          # indices of val_feats rows (disjoint from train_index)


def split_train_val(n: int, val_fraction: float, seed: int, where: str = "config.data"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, val indices) of n normal training images: a seeded random
  ``round(val_fraction · n)`` are held out for validation / thresholds, never trained on.
  Only training images are ever split; test images never enter."""
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"{where}.val_fraction must lie in [0, 1), got {val_fraction}")
  n_val = int(round(float(val_fraction) * n))
  if val_fraction > 0 and (n_val < 1 or n - n_val < 2):
    raise ValueError(f"{where}.val_fraction={val_fraction} leaves {n - n_val} training and "
                     f"{n_val} validation images of {n}; need ≥ 2 and ≥ 1")
  perm = np.random.default_rng(int(seed)).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class Dataset:
  """The categories of ``cfg.data`` and, per category, its ``CategoryData``.

  ``categories`` lists what will run; ``load(name)`` extracts (or reads from the
  cache) the features; ``train_images(name, size)`` returns the training images in
  ``train_feats`` order (for image-space analyses; None when the source has none).
  """

  def __init__(self, cfg):
    self.cfg = cfg
    self.root = dataset_root(cfg)
    self._splits = category_splits(cfg, self.root)
    self._extractor = None

  @property
  def categories(self) -> list[str]:
    return list(self._splits)

  def _check(self, name):
    if name not in self._splits:
      raise ValueError(f"category {name!r} is not in the data ({', '.join(self._splits)})")

  def load(self, name: str) -> CategoryData:
    self._check(name)
    if self._extractor is None:
      self._extractor = make_extractor(self.cfg)
    return load_category(self.cfg, name, *self._splits[name], *self._extractor)

  def train_images(self, name: str, size: int) -> np.ndarray | None:
    self._check(name)
    images = self._splits[name][0].load_images(size)
    tr, _ = _val_split(self.cfg, len(images))
    return images[tr]


def _val_split(cfg, n: int):
  d = cfg.data
  return split_train_val(n, d.get("val_fraction", 0.0), d.get("split_seed", 0))


def load_category(cfg, name: str, train_split, test_split, extractor, extractor_id) -> CategoryData:
  b = cfg.backbone
  cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
  feats = {}
  for split_name, split in (("train", train_split), ("test", test_split)):
    feats[split_name] = feature_cache.cached_features(
        list(split.image_paths), extractor, extractor_id, resolution=b.resolution,
        layers=(int(b.layer),), cache_dir=cache_dir, batch_size=b.batch_size,
        progress=True)[int(b.layer)]
  tr, va = _val_split(cfg, len(feats["train"]))
  size = cfg.eval.size
  images, masks = test_split.load(size)
  return CategoryData(name, feats["train"][tr], feats["train"][va], feats["test"], masks,
                      np.asarray(test_split.labels), images, tuple(test_split.defect_types),
                      tr, va)


def default_cache_dir() -> Path:
  from tailjax.backbones import torch_pickle
  return Path(torch_pickle.default_cache_dir()) / "features"
