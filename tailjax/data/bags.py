"""Contaminated identity bags for study B, with leak-free train/val/test splits.

A *negative* bag holds n instances of one identity. A *positive*
("contaminated") bag holds n − k instances of its majority identity and
``k = max(1, floor(p·n + 1/2))`` instances of one other identity, p being the
split's contamination ratio (names ``"5p"``, ``"10p"``, ``"20p"``, ``"30p"``,
``"50p"``). With the default bag size of 20, 5 % is exactly one foreign
instance; below n = 20 the ``max(1, ·)`` would make the real fraction exceed p
(n = 10 gives 10 %), which is why the default is 20 and bag sizes are
reported.

Leakage: every identity's instances are split into train/val/test pools
*before* any bag is built (stratified by identity, fractions
``pool_fractions``), and a split's bags draw only from its own pools. No
instance therefore appears in two splits. Within a split an instance may
appear in several bags (there are more bag slots than instances), never twice
in the same bag.

Bags are stored padded: ``features_BxNxD`` with ``mask_BxN``; ``load_split``
returns the unpadded per-bag lists the study's code expects.

Prebuilt splits on disk: ``<root>/<ratio>/<split>.npz`` with ``features
[B, N, D]``, ``labels [B]`` and optionally ``mask [B, N]``, ``instance_labels
[B, N]``, ``bag_ids [B]`` (``BagDataset.save`` writes this layout).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from tailjax import io as tio
from tailjax.io import first_few

RATIOS: dict[str, float] = {"5p": 0.05, "10p": 0.10, "20p": 0.20, "30p": 0.30, "50p": 0.50}
SPLITS: tuple[str, ...] = ("train", "val", "test")


def ratio_value(name: str) -> float:
  """``"5p"`` → 0.05 (any ``"<percent>p"`` name in (0, 100) is accepted)."""
  m = re.fullmatch(r"(\d+(?:\.\d+)?)p", str(name))
  if not m or not 0 < float(m.group(1)) < 100:
    raise ValueError(f"ratio must be named like '5p' (percent, then 'p'); got {name!r}")
  return float(m.group(1)) / 100.0


def contamination_count(ratio: float, n: int) -> int:
  """Number of foreign instances in a positive bag of size n: ``max(1, floor(p·n + 1/2))``."""
  return max(1, int(np.floor(ratio * n + 0.5)))


class Split(NamedTuple):
  """One (ratio, split) of padded bags.

  ``instance_index_BxN`` points into the instance pool the bags were built
  from (−1 for padding or unknown); ``identity_BxN`` is each instance's
  identity (−1 for padding or unknown).
  """
  features_BxNxD: np.ndarray
  mask_BxN: np.ndarray
  labels_B: np.ndarray
  instance_labels_BxN: np.ndarray
  bag_ids_B: np.ndarray
  instance_index_BxN: np.ndarray
  identity_BxN: np.ndarray

  @property
  def sizes_B(self) -> np.ndarray:
    return self.mask_BxN.sum(1).astype(np.int64)


def split_pools(identity_N: np.ndarray, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
  """Disjoint train/val/test instance indices, stratified by identity.

  Each identity's instances are shuffled and cut at the cumulative
  ``fractions`` (which must sum to 1).
  """
  fr = np.asarray(fractions, np.float64)
  if fr.shape != (3,) or (fr <= 0).any() or abs(fr.sum() - 1) > 1e-6:
    raise ValueError(f"data.pool_fractions must be 3 positive numbers summing to 1; got {list(fractions)}")
  rng = np.random.default_rng(seed)
  pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  for ident in np.unique(identity_N):
    idx = rng.permutation(np.flatnonzero(identity_N == ident))
    cuts = np.floor(np.cumsum(fr)[:2] * len(idx) + 0.5).astype(int)
    for s, part in zip(SPLITS, np.split(idx, cuts)):
      pools[s].append(part)
  return {s: np.sort(np.concatenate(p)) for s, p in pools.items()}


def make_bags(embeddings_NxD: np.ndarray, identity_N: np.ndarray, pool_P: np.ndarray, *,
              ratio: float, n_bags: int, min_size: int, max_size: int,
              positive_fraction: float, rng: np.random.Generator, bag_id_start: int = 0,
              where: str = "bags") -> Split:
  """Builds ``n_bags`` bags from the instances ``pool_P`` (indices into the embeddings).

  Exactly ``round(positive_fraction · n_bags)`` bags are positive. For each
  bag: size n ~ U{min_size..max_size}; majority identity uniform over the
  identities of the pool; positives replace k = ``contamination_count`` of the
  n instances by instances of a different, uniformly chosen identity. Instances
  are drawn without replacement within a bag and the bag is shuffled, so
  position carries no signal.
  """
  if min_size < 2 or max_size < min_size:
    raise ValueError(f"{where}: need 2 <= min_bag_size <= max_bag_size; got {min_size}, {max_size}")
  n_pos = int(np.floor(positive_fraction * n_bags + 0.5))
  if not 0 < n_pos < n_bags:
    raise ValueError(f"{where}: {n_bags} bags with positive_fraction={positive_fraction} give "
                     f"{n_pos} positives; AUC needs both classes")
  idents = np.unique(identity_N[pool_P])
  by_ident = {int(c): pool_P[identity_N[pool_P] == c] for c in idents}
  small = [f"{c}: {len(v)}" for c, v in by_ident.items() if len(v) < max_size]
  if small:
    raise ValueError(f"{where}: {len(small)} of {len(by_ident)} identities have fewer instances in this "
                     f"pool than max_bag_size={max_size} (identity: count {first_few(small)}); lower "
                     "the bag size, drop small identities or use more data")
  if len(idents) < 2:
    raise ValueError(f"{where}: the pool holds {len(idents)} identity; contamination needs >= 2")

  d = embeddings_NxD.shape[1]
  feats = np.zeros((n_bags, max_size, d), np.float32)
  mask = np.zeros((n_bags, max_size), np.float32)
  inst_lab = np.zeros((n_bags, max_size), np.int8)
  inst_idx = np.full((n_bags, max_size), -1, np.int64)
  ident_bn = np.full((n_bags, max_size), -1, np.int64)
  labels = rng.permutation(np.r_[np.ones(n_pos, np.int8), np.zeros(n_bags - n_pos, np.int8)])
  for b in range(n_bags):
    n = int(rng.integers(min_size, max_size + 1))
    major = int(rng.choice(idents))
    k = contamination_count(ratio, n) if labels[b] else 0
    chosen = [rng.choice(by_ident[major], n - k, replace=False)]
    flags = [np.zeros(n - k, np.int8)]
    if k:
      other = int(rng.choice(idents[idents != major]))
      chosen.append(rng.choice(by_ident[other], k, replace=False))
      flags.append(np.ones(k, np.int8))
    order = rng.permutation(n)
    idx = np.concatenate(chosen)[order]
    feats[b, :n] = embeddings_NxD[idx]
    mask[b, :n] = 1
    inst_lab[b, :n] = np.concatenate(flags)[order]
    inst_idx[b, :n] = idx
    ident_bn[b, :n] = identity_N[idx]
  bag_ids = np.arange(bag_id_start, bag_id_start + n_bags, dtype=np.int64)
  return Split(feats, mask, labels, inst_lab, bag_ids, inst_idx, ident_bn)


def validate_split(s: Split, where: str) -> None:
  """Shapes, finite features, binary labels, >= 2 valid instances per bag, both classes."""
  b, n, _ = s.features_BxNxD.shape
  for name, arr, shape in (("mask", s.mask_BxN, (b, n)), ("labels", s.labels_B, (b,)),
                           ("instance_labels", s.instance_labels_BxN, (b, n)),
                           ("bag_ids", s.bag_ids_B, (b,))):
    if arr.shape != shape:
      raise ValueError(f"{where}: '{name}' has shape {arr.shape}, expected {shape}")
  if not np.isin(s.mask_BxN, (0, 1)).all():
    raise ValueError(f"{where}: 'mask' must be 0/1")
  if not np.isin(s.labels_B, (0, 1)).all():
    raise ValueError(f"{where}: 'labels' must be 0/1; got values {first_few(np.unique(s.labels_B).tolist())}")
  sizes = s.mask_BxN.sum(1)
  small = np.flatnonzero(sizes < 2)
  if small.size:
    raise ValueError(f"{where}: bag {int(small[0])} has {int(sizes[small[0]])} valid instance(s); "
                     f"bags need at least 2 ({small.size} such bag(s): {first_few(small.tolist())})")
  bad = np.flatnonzero(~(np.isfinite(s.features_BxNxD) | (s.mask_BxN[:, :, None] == 0)).all((1, 2)))
  if bad.size:
    raise ValueError(f"{where}: bag {int(bad[0])} has NaN/Inf features ({bad.size} such bag(s): "
                     f"{first_few(bad.tolist())})")
  if len(np.unique(s.labels_B)) < 2:
    raise ValueError(f"{where}: all bags have label {int(s.labels_B[0])}; AUC needs both classes")


@dataclasses.dataclass
class BagDataset:
  """All (ratio, split) bag sets of a study-B run, plus provenance."""
  splits: dict[tuple[str, str], Split]
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def ratios(self) -> list[str]:
    names = sorted({r for r, _ in self.splits}, key=ratio_value)
    return names

  def padded(self, ratio: str, split: str) -> Split:
    """The padded ``Split`` of one ratio and split (KeyError lists what exists)."""
    if (ratio, split) not in self.splits:
      raise KeyError(f"no bags for ratio={ratio!r}, split={split!r}; have ratios {self.ratios} "
                     f"and splits {sorted({s for _, s in self.splits})}")
    return self.splits[(ratio, split)]

  def load_split(self, ratio: str, split: str):
    """The study's loader: ``(features, labels, instance_labels, bag_ids)``.

    ``features`` is a list of ``[n_b, D]`` arrays (one per bag, padding
    removed), ``labels`` ``[B]`` (1 = contaminated), ``instance_labels`` a list
    of ``[n_b]`` arrays (1 = foreign instance), ``bag_ids`` ``[B]``.
    """
    s = self.padded(ratio, split)
    valid = s.mask_BxN > 0
    feats = [s.features_BxNxD[b, valid[b]] for b in range(len(s.labels_B))]
    inst = [s.instance_labels_BxN[b, valid[b]] for b in range(len(s.labels_B))]
    return feats, s.labels_B.copy(), inst, s.bag_ids_B.copy()

  def split_info(self, ratio: str) -> dict[str, dict[str, int]]:
    """``{split: {'count', 'positives', 'negatives', 'min_size', 'max_size'}}`` for one ratio."""
    out = {}
    for (r, split), s in self.splits.items():
      if r == ratio:
        pos = int(s.labels_B.sum())
        out[split] = {"count": int(len(s.labels_B)), "positives": pos,
                      "negatives": int(len(s.labels_B)) - pos,
                      "min_size": int(s.sizes_B.min()), "max_size": int(s.sizes_B.max())}
    if not out:
      raise KeyError(f"no bags for ratio={ratio!r}; have {self.ratios}")
    return out

  def save(self, root: str | os.PathLike) -> None:
    """Writes ``<root>/<ratio>/<split>.npz`` atomically (one file at a time)."""
    for (r, split), s in self.splits.items():
      with tio.atomic_path(Path(root) / r / f"{split}.npz") as tmp:
        with open(tmp, "wb") as f:
          np.savez(f, features=s.features_BxNxD, mask=s.mask_BxN, labels=s.labels_B,
                   instance_labels=s.instance_labels_BxN, bag_ids=s.bag_ids_B,
                   instance_index=s.instance_index_BxN, identity=s.identity_BxN)


def build_bag_dataset(embeddings_NxD: np.ndarray, identity_N: np.ndarray, *,
                      ratios: Sequence[str] = tuple(RATIOS), n_bags: dict[str, int] | None = None,
                      min_bag_size: int = 20, max_bag_size: int = 20,
                      positive_fraction: float = 0.5,
                      pool_fractions: Sequence[float] = (0.5, 0.25, 0.25),
                      seed: int = 0, info: dict | None = None) -> BagDataset:
  """Splits the instances into pools, then bags every (ratio, split).

  ``positive_fraction`` = 0.5 gives balanced labels; other values make the
  imbalanced case (then train with ``pos_weight = n_neg / n_pos``). Each
  (ratio, split) uses its own random stream derived from ``seed``.
  """
  n_bags = dict(n_bags or {"train": 256, "val": 128, "test": 256})
  missing = [s for s in SPLITS if s not in n_bags]
  if missing:
    raise ValueError(f"data.n_bags is missing split(s) {missing}")
  if not 0 < positive_fraction < 1:
    raise ValueError(f"data.positive_fraction must lie in (0, 1); got {positive_fraction}")
  pools = split_pools(identity_N, pool_fractions, seed)
  splits = {}
  next_id = 0
  for ri, r in enumerate(ratios):
    p = ratio_value(r)
    for si, split in enumerate(SPLITS):
      rng = np.random.default_rng([seed, ri, si, int(round(p * 1e4))])
      splits[(r, split)] = make_bags(
          embeddings_NxD, identity_N, pools[split], ratio=p, n_bags=int(n_bags[split]),
          min_size=min_bag_size, max_size=max_bag_size, positive_fraction=positive_fraction,
          rng=rng, bag_id_start=next_id, where=f"bags[{r}/{split}]")
      next_id += int(n_bags[split])
  meta = dict(info or {})
  meta.update(bag_size=[min_bag_size, max_bag_size], positive_fraction=positive_fraction,
              pool_fractions=list(pool_fractions), pool_sizes={s: int(len(v)) for s, v in pools.items()},
              seed=seed)
  return BagDataset(splits, meta)


def load_prebuilt(root: str | os.PathLike, ratios: Sequence[str] | None = None) -> BagDataset:
  """Reads ``<root>/<ratio>/<split>.npz`` bag splits; errors name the file and field."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"prebuilt bag directory not found: {root}")
  ratios = list(ratios) if ratios else sorted((p.name for p in root.iterdir() if p.is_dir()),
                                              key=lambda n: ratio_value(n))
  if not ratios:
    raise ValueError(f"{root}: no '<ratio>/' folders (expected e.g. {root}/5p/train.npz)")
  splits = {}
  for r in ratios:
    ratio_value(r)
    for split in SPLITS:
      path = root / r / f"{split}.npz"
      if not path.is_file():
        raise FileNotFoundError(f"prebuilt bags: missing {path}")
      z = tio.read_npz(path)
      for key in ("features", "labels"):
        if key not in z:
          raise ValueError(f"{path}: missing key '{key}'; found {first_few(sorted(z), 8)}")
      feats = np.asarray(z["features"], np.float32)
      if feats.ndim != 3:
        raise ValueError(f"{path}: 'features' must be [B, N, D]; got shape {feats.shape}")
      b, n, _ = feats.shape
      get = lambda k, default: z[k] if k in z else default
      s = Split(feats, get("mask", np.ones((b, n))).astype(np.float32),
                get("labels", None).astype(np.int8),
                get("instance_labels", np.zeros((b, n))).astype(np.int8),
                get("bag_ids", np.arange(b)).astype(np.int64),
                get("instance_index", np.full((b, n), -1)).astype(np.int64),
                get("identity", np.full((b, n), -1)).astype(np.int64))
      validate_split(s, str(path))
      splits[(r, split)] = s
  return BagDataset(splits, {"source": str(root)})


def dataset_from_config(data: Any, *, default_cache_dir: str | os.PathLike | None = None) -> BagDataset:
  """The BagDataset a ``config.data`` describes.

  ``data.source``: ``'digits'`` (embedded default: ArcFace on sklearn digits,
  cached under ``data.cache_dir``, or ``default_cache_dir`` when that is
  empty), ``'embeddings'`` (``data.path`` → an ``.npz`` with
  ``embeddings``/``identity``) or ``'bags'`` (``data.path`` → a prebuilt
  ``<ratio>/<split>.npz`` tree). ``data.path`` set with the digits source is
  an error (it would be silently ignored).
  """
  from tailjax.data import digits as digits_lib

  ratios = list(data.ratios)
  for r in ratios:
    ratio_value(r)
  source, path = data.source, data.path
  if source not in ("digits", "embeddings", "bags"):
    raise ValueError(f"data.source must be 'digits', 'embeddings' or 'bags'; got {source!r}")
  if source == "digits" and path:
    raise ValueError(f"data.path={path!r} is only read with data.source='embeddings' or 'bags' "
                     "(data.source is 'digits'); set the source or remove the path")
  if source == "bags":
    if not path:
      raise ValueError("data.path must point to a directory of <ratio>/<split>.npz bag files")
    return load_prebuilt(path, ratios)
  if source == "digits":
    cache_dir = data.get("cache_dir") or default_cache_dir
    emb = digits_lib.digits_embeddings(digits_lib.settings_from_config(data.embedder),
                                       cache_dir=cache_dir or None)
  else:
    if not path:
      raise ValueError("data.path must point to an .npz with 'embeddings' and 'identity'")
    emb = digits_lib.load_embeddings(path)
  missing = [s for s in SPLITS if s not in data.n_bags]
  if missing:
    raise ValueError(f"data.n_bags is missing split(s) {missing}")
  ds = build_bag_dataset(
      emb.embeddings_NxD, emb.identity_N, ratios=ratios, n_bags={s: int(data.n_bags[s]) for s in SPLITS},
      min_bag_size=int(data.min_bag_size), max_bag_size=int(data.max_bag_size),
      positive_fraction=float(data.positive_fraction), pool_fractions=tuple(data.pool_fractions),
      seed=int(data.seed), info=emb.info)
  for (r, split), s in ds.splits.items():
    validate_split(s, f"bags[{r}/{split}]")
  return ds


_DEFAULT: dict[str, BagDataset] = {}


def default_dataset() -> BagDataset:
  """The embedded default (digits, all five ratios), built once per process."""
  if "ds" not in _DEFAULT:
    from tailjax.data import digits as digits_lib
    emb = digits_lib.digits_embeddings()
    _DEFAULT["ds"] = build_bag_dataset(emb.embeddings_NxD, emb.identity_N, info=emb.info)
  return _DEFAULT["ds"]


def load_split(ratio: str, split: str, dataset: BagDataset | None = None):
  """``(features, labels, instance_labels, bag_ids)`` of one ratio/split (see ``BagDataset.load_split``)."""
  return (dataset or default_dataset()).load_split(ratio, split)


def split_info(ratio: str, dataset: BagDataset | None = None) -> dict[str, dict[str, int]]:
  """``split_info(ratio)[split]`` → ``{'count', 'positives', ...}`` (see ``BagDataset.split_info``)."""
  return (dataset or default_dataset()).split_info(ratio)
