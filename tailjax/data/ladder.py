"""Within-category difficulty ladder: one train split, test sets at several defect strengths.

Study A's flows train on normal images only, so one trained row can be scored on
several test sets that differ only in how strong the defects are. A ladder gives each
of the nine texture photographs (``textures.CATEGORIES``, the hard tier's brick, grass
and gravel included) test sets at ``len(LADDER_TARGETS)`` strengths, all through the
exact-mask generator (``textures.draw_defective``; the hard tier's own build,
``textures.build_texture_benchmark``, stays as it is):

* same photographs, same random draws (crop, defect kind, shape, position, sensor
  noise), same exact masks at every rung; a rung differs from another only on the
  mask, by the strength s (``textures.DefectDraw``: ``quantise(clean + s·w·Δ + noise)``).
  Good test images and masks are the same files at every rung (hard links).
* Rung j's strength is calibrated once, on the calibration split only (never the test
  split, never a flow): PaDiM's image AUROC there must land within ``tol`` of
  ``LADDER_TARGETS[j]`` (``calibrate_ladder``). That AUROC is the rung's
  pre-treatment covariate. Committed in ``ladder_strengths.json`` (``committed_ladder``).
* Each rung records the share of mask pixels that quantisation clips (``clipped_fraction``);
  a rung whose test set clips more than ``CLIP_LIMIT`` (fixed before any run), or that
  repeats a weaker rung's strength (a target out of the photo's reach), is built and
  scored but flagged ``in_slope=False`` with its reason (``why_out``): a dose–response
  slope leaves it out and shows it as such.

The committed ladder (``LADDER_SETTINGS``: targets 0.60 / 0.70 / 0.80 / 0.90 / 0.97,
±0.02, at most 6 new evaluations per rung, strengths in [1/32, 8]; the calibrated
tier's split and PaDiM scoring, ``textures.CALIBRATION_SETTINGS``) comes from the demo's
backbone (EfficientNet-Lite0 stride 16 at 224 px, ``inception`` normalisation), by::

  python -c "
  from tailjax.configs import fastflow_textures
  from tailjax.data import ladder, pipeline
  cfg = fastflow_textures.get_config()
  ex, ex_id = pipeline.make_extractor(cfg)
  fn = lambda paths: pipeline.extract_features(cfg, paths, ex, ex_id, progress=False)
  r = ladder.calibrate_ladders(fn, features=pipeline.describe_features(cfg), verbose=True)
  ladder.write_ladder_file(r, 'tailjax/data/ladder_strengths.json')
  print(ladder.format_rung_table(r))"

(about 5 CPU-minutes from an empty feature cache, 82 AUROC evaluations for the nine
photos). Within s <= 8, grass, gravel, page, notes and coins saturate below 0.97
(their PaDiM AUROC tops out at 0.89-0.92): their top two rungs share the strength 8.
Exaggerated defects (s > 1) clip much of their masks, holes and stains first (a hole's
dark level times s falls below 0), so in the hard tier's photos, whose drawn defects
are already strong, few rungs stay under ``CLIP_LIMIT``.

Layout (``build_ladder``; the MVTec reader reads every rung)::

  <root>/<category>/train/good/000.png ...                 one train split per category
                                                           (the same bytes as the texture
                                                           build's train split)
  <root>/<category>/rung<j>/test/good/000.png ...          rung j's test split
  <root>/<category>/rung<j>/test/<defect>/000.png ...
  <root>/<category>/rung<j>/ground_truth/<defect>/000_mask.png
  <root>/manifest.json     {"params", "calibration", "categories": per-category rung
                           table, "images": per-sample provenance}
  <root>/COMPLETE          the build parameters, written last

so a trainer trains once on ``train_split(root, c)`` and scores every
``load_rungs(root, c)[j].test`` (an ``mvtec.ImageSplit``: paths, labels, defect kinds,
mask paths; ``mvtec.scan_split(root, f"{c}/rung{j}", "test")``).

Determinism and reuse are the texture build's: every sample draws from its own seeded
stream, categories are built in parallel threads (same bytes in any order), the build
is renamed onto ``root`` when complete and reused when ``COMPLETE`` matches.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from tailjax.data import mvtec
from tailjax.data import textures
from tailjax.io import atomic_directory, atomic_write_json, atomic_write_text

LADDER_VERSION = 1  # part of a build's parameters: bump when a change alters a built file
# PaDiM calibration-split image AUROC each rung aims at, weakest rung first.
LADDER_TARGETS = (0.60, 0.70, 0.80, 0.90, 0.97)
# Share of mask pixels clipped at quantisation above which a rung is out of the slope
# (``in_slope=False``): beyond it "a stronger defect" is partly a flat blob at 0 or 255.
CLIP_LIMIT = 0.05
LADDER_FILE = "ladder_strengths.json"  # the committed calibration, package data of tailjax.data
_MARKER, _MANIFEST = "COMPLETE", "manifest.json"


@dataclasses.dataclass(frozen=True)
class LadderSettings:
  """How the rung strengths are searched (recorded in the committed file).

  Attributes:
    targets: the PaDiM calibration-split image AUROC of each rung.
    tol: a rung is ``reached`` when its AUROC lies within ``tol`` of its target.
    max_iter: new AUROC evaluations per rung at most (``textures.bisect_strengths``).
    bounds: strengths searched; the upper bound is evaluated first, so a target above
      the photo's reachable AUROC costs no evaluation.
    split: the calibration split and PaDiM scoring (``textures.CalibrationSettings``;
      its own band, bounds, tol and max_iter serve the calibrated tier, not the ladder).
  """
  targets: tuple[float, ...] = LADDER_TARGETS
  tol: float = 0.02
  max_iter: int = 6
  bounds: tuple[float, float] = (1.0 / 32.0, 8.0)
  split: textures.CalibrationSettings = textures.CALIBRATION_SETTINGS


LADDER_SETTINGS = LadderSettings()


def default_ladder_root() -> Path:
  """``textures-ladder`` beside ``textures.default_benchmark_root()``."""
  return textures.default_benchmark_root().with_name("textures-ladder")


def rung_name(j: int) -> str:
  return f"rung{j}"


def clipped_fraction(clean_NxHxW: np.ndarray, defective_NxHxW: np.ndarray,
                     masks_NxHxW: np.ndarray) -> float:
  """Share of mask pixels the defect drove onto a quantisation bound.

  A mask pixel p is clipped when ``defective_p == 0 < clean_p`` or ``defective_p == 255 >
  clean_p``, where clean is the same sample without the defect (same noise): pixels
  the normal image already held at 0 or 255 do not count. Pooled over every mask pixel
  of the set (uint8 images, bool masks, any matching shapes); 0.0 when the masks are empty.
  """
  clipped, n = _clipped_count(clean_NxHxW, defective_NxHxW, masks_NxHxW)
  return clipped / n if n else 0.0


def _clipped_count(clean, defective, mask) -> tuple[int, int]:
  """(clipped mask pixels, mask pixels) of ``clipped_fraction``."""
  clean, defective, mask = np.asarray(clean), np.asarray(defective), np.asarray(mask, bool)
  if not clean.shape == defective.shape == mask.shape:
    raise ValueError(f"clipped_fraction: shapes differ: clean {clean.shape}, defective "
                     f"{defective.shape}, masks {mask.shape}")
  clipped = mask & (((defective == 0) & (clean > 0)) | ((defective == 255) & (clean < 255)))
  return int(clipped.sum()), int(mask.sum())


# ----------------------------------------------------------------------------
# Calibration: rung strengths from PaDiM on the calibration split
# ----------------------------------------------------------------------------


def _check_settings(settings: LadderSettings) -> None:
  t = list(settings.targets)
  if not t or any(not 0.5 < x <= 1.0 for x in t) or t != sorted(t):
    raise ValueError(f"LadderSettings.targets must be increasing AUROCs in (0.5, 1], got "
                     f"{settings.targets}")
  lo, hi = settings.bounds
  if not 0 < lo < hi:
    raise ValueError(f"LadderSettings.bounds must satisfy 0 < low < high, got {settings.bounds}")
  if not settings.tol > 0 or settings.max_iter < 1:
    raise ValueError(f"LadderSettings needs tol > 0 and max_iter >= 1, got {settings.tol}, "
                     f"{settings.max_iter}")


def calibrate_ladder(category: str, features_fn: textures.FeaturesFn,
                     settings: LadderSettings = LADDER_SETTINGS, *,
                     workdir: str | os.PathLike | None = None) -> dict:
  """The rung strengths of ``category`` (any of ``textures.CATEGORIES``).

  On the calibration split (``textures.CalibrationSplit``: its own seed and split ids,
  never the build's test split; normal features once, defects drawn once), PaDiM's
  image AUROC a(s) is evaluated first at ``bounds[1]``, then
  ``textures.bisect_strengths`` finds, target by target (evaluations shared), the
  strength whose AUROC is nearest each target. A target out of reach (above
  a(bounds[1]), or not within ``tol`` after ``max_iter`` evaluations) keeps its nearest
  strength with ``reached=False``; ``reachable`` gives the range of AUROCs seen.

  Returns:
    ``{"rungs": [{"target", "strength", "auroc_cal", "reached", "clipped_cal"}, ...],
    "reachable": [min, max AUROC seen], "evaluations": [[s, a], ...], "seconds"}``;
    ``clipped_cal`` is ``clipped_fraction`` on the calibration split's defects.
  """
  textures.category_tier(category)  # an unknown category raises here, naming it
  _check_settings(settings)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="tailjax-ladder-") as tmp:
    split = textures.CalibrationSplit(category, features_fn,
                                      Path(workdir) if workdir else Path(tmp), settings.split)
    top = float(settings.bounds[1])
    seen = [[top, float(split.auroc(top))]]
    chosen, seen = textures.bisect_strengths(split.auroc, settings.targets, settings.bounds,
                                             settings.tol, settings.max_iter, seen=seen)
    clean = np.stack([d.clean() for d in split.draws])
    masks = np.stack([d.mask_HxW for d in split.draws])
    rungs = [{"target": float(t), "strength": float(s), "auroc_cal": float(a),
              "reached": bool(abs(a - t) <= settings.tol),
              "clipped_cal": clipped_fraction(clean, split.images(s), masks)}
             for t, (s, a) in zip(settings.targets, chosen)]
  aurocs = [a for _, a in seen]
  return {"rungs": rungs, "reachable": [min(aurocs), max(aurocs)], "evaluations": seen,
          "seconds": time.perf_counter() - start}


def settings_record(settings: LadderSettings = LADDER_SETTINGS) -> dict:
  """The settings as JSON (``dataclasses.asdict``, tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(settings)))


def calibrate_ladders(features_fn: textures.FeaturesFn,
                      categories: Sequence[str] = textures.CATEGORIES,
                      settings: LadderSettings = LADDER_SETTINGS, *,
                      features: str = "", workdir: str | os.PathLike | None = None,
                      verbose: bool = False) -> dict:
  """``calibrate_ladder`` for every category: the content of ``ladder_strengths.json``
  (``write_ladder_file``): ``{"settings", "clip_limit", "features", "categories": {c:
  calibrate_ladder(c)}, "seconds", "cpu_seconds"}``; ``features`` describes
  ``features_fn`` (the backbone)."""
  start, cpu_start = time.perf_counter(), time.process_time()
  out = {"settings": settings_record(settings), "clip_limit": CLIP_LIMIT,
         "features": features, "categories": {}}
  for c in textures.expand_categories(categories):
    r = out["categories"][c] = calibrate_ladder(c, features_fn, settings, workdir=workdir)
    if verbose:
      print(f"[ladder] {c}: " + ", ".join(
          f"s={x['strength']:.3g}: {x['auroc_cal']:.3f}" for x in r["rungs"])
          + f" ({len(r['evaluations'])} evaluations, {r['seconds']:.0f}s)", flush=True)
  # process_time: CPU seconds of every thread of this process (the backbone's included).
  return {**out, "seconds": time.perf_counter() - start,
          "cpu_seconds": time.process_time() - cpu_start}


def write_ladder_file(result: Mapping, path: str | os.PathLike) -> None:
  """Writes ``calibrate_ladders``' result as the committed JSON file (one rung or one
  evaluation per line)."""
  Path(path).write_text(_dumps(result) + "\n")


def _dumps(obj, level: int = 0) -> str:
  """JSON with a line per container that holds containers, the rest inline (``json``'s
  ``indent`` puts every number of a rung on its own line, which no reviewer reads)."""
  scalar = lambda v: not isinstance(v, (dict, list))
  if isinstance(obj, dict):
    items = list(obj.items())
    if all(scalar(v) or (isinstance(v, list) and all(map(scalar, v))) for _, v in items):
      return json.dumps(obj)
    inner = [f"{' ' * (level + 1)}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in items]
    return "{\n" + ",\n".join(inner) + "\n" + " " * level + "}"
  if isinstance(obj, list) and not all(map(scalar, obj)):
    inner = [" " * (level + 1) + _dumps(v, level + 1) for v in obj]
    return "[\n" + ",\n".join(inner) + "\n" + " " * level + "]"
  return json.dumps(obj)


def committed_ladder() -> dict:
  """The committed calibration (``ladder_strengths.json``, package data)."""
  text = importlib.resources.files("tailjax.data").joinpath(LADDER_FILE).read_text()
  return json.loads(text)


def format_rung_table(result: Mapping) -> str:
  """A markdown table of a calibration result (category × rung: strength, AUROC, clipped)."""
  targets = result["settings"]["targets"]
  head = "| category | " + " | ".join(f"rung {j} (target {t:.2f})"
                                      for j, t in enumerate(targets)) + " | reachable |"
  lines = [head, "|---" * (len(targets) + 2) + "|"]
  for c, r in result["categories"].items():
    cells = [f"s={x['strength']:.3g}, {x['auroc_cal']:.3f}{'' if x['reached'] else '*'}, "
             f"{100 * x['clipped_cal']:.1f}%" for x in r["rungs"]]
    lo, hi = r["reachable"]
    lines.append(f"| {c} | " + " | ".join(cells) + f" | {lo:.3f}–{hi:.3f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------


def resolve_rungs(categories: Sequence[str],
                  strengths: Mapping[str, Sequence[float]] | None = None,
                  committed: Mapping | None = None) -> dict[str, list[dict]]:
  """Per category its rungs' calibration records: ``strengths[c]`` when given (then
  target, AUROC and reached are None unless they equal the committed strengths), else
  the committed ones. Each record: ``{"target", "strength", "auroc_cal", "reached",
  "clipped_cal"}``."""
  committed = committed_ladder() if committed is None else committed
  strengths = dict(strengths or {})
  bad = [c for c in strengths if c not in textures.CATEGORIES]
  if bad:
    raise ValueError(f"strengths: {bad} are not texture categories "
                     f"({', '.join(textures.CATEGORIES)})")
  out = {}
  for c in categories:
    rungs = committed["categories"].get(c, {}).get("rungs")
    if c in strengths:
      given = [float(s) for s in strengths[c]]
      if not given or not all(math.isfinite(s) and s > 0 for s in given):
        raise ValueError(f"strengths[{c!r}] must be a non-empty list of finite numbers > 0, "
                         f"got {strengths[c]}")
      if not rungs or given != [r["strength"] for r in rungs]:
        rungs = [{"target": None, "strength": s, "auroc_cal": None, "reached": None,
                  "clipped_cal": None} for s in given]
    if not rungs:
      raise ValueError(f"category {c!r} has no committed ladder in {LADDER_FILE} "
                       "(run ladder.calibrate_ladders) and none was passed in strengths")
    out[c] = [dict(r) for r in rungs]
  return out


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _write_shared(out_dir: Path, rels: Sequence[str], data: bytes) -> None:
  """Writes ``data`` at the first path and hard-links the others to it (a copy where
  the file system has no hard links): every rung's copy of a good image or mask is one
  file on disk."""
  first = out_dir / rels[0]
  first.parent.mkdir(parents=True, exist_ok=True)
  first.write_bytes(data)
  for rel in rels[1:]:
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.link(first, path)
    except OSError:
      shutil.copyfile(first, path)


def _build_category(out_dir: Path, category: str, photos, rungs: list[dict], *, seed,
                    image_size, n_train, n_test, test_good_fraction, defects, crop_range,
                    noise_sigma) -> tuple[list[dict], list[float]]:
  """Writes one category's train split and rungs; returns (records, test-split clipped
  fraction per rung)."""
  kw = dict(seed=seed, image_size=image_size, crop_range=crop_range, noise_sigma=noise_sigma)
  records = []
  for i in range(n_train):
    image, _, prov, _ = textures.render_sample(category, photos, "train", "good", i, **kw)
    rel = f"{category}/train/good/{i:03d}.png"
    textures._save_png(out_dir / rel, image)
    records.append({"category": category, "split": "train", "defect": "good", "index": i,
                    "images": [rel], "masks": None, **prov})
  strengths = [r["strength"] for r in rungs]
  clipped_R = [0] * len(rungs)
  mask_px = 0
  counters: dict[str, int] = {}
  for index, kind in enumerate(textures._test_plan(n_test, test_good_fraction, defects)):
    number = counters.get(kind, 0)
    counters[kind] = number + 1
    rels = [f"{category}/{rung_name(j)}/test/{kind}/{number:03d}.png" for j in range(len(rungs))]
    record = {"category": category, "split": "test", "defect": kind, "index": index,
              "images": rels, "masks": None}
    if kind == "good":
      image, _, prov, _ = textures.render_sample(category, photos, "test", "good", index, **kw)
      _write_shared(out_dir, rels, _png_bytes(image))
      records.append({**record, **prov})
      continue
    draw = textures.draw_defective(category, photos, "test", kind, index, **kw)
    masks = [f"{category}/{rung_name(j)}/ground_truth/{kind}/{number:03d}_mask.png"
             for j in range(len(rungs))]
    _write_shared(out_dir, masks, _png_bytes(draw.mask_HxW.astype(np.uint8) * 255))
    clean = draw.clean()
    mask_px += int(draw.mask_HxW.sum())
    for s in dict.fromkeys(strengths):
      image = draw.image(s)
      same = [j for j, x in enumerate(strengths) if x == s]
      for j in same:
        clipped_R[j] += _clipped_count(clean, image, draw.mask_HxW)[0]
      _write_shared(out_dir, [rels[j] for j in same], _png_bytes(image))
    records.append({**record, "masks": masks, **draw.provenance,
                    "defect_params": draw.defect_params()})
  return records, [c / mask_px if mask_px else 0.0 for c in clipped_R]


def _why_out(j: int, strengths: Sequence[float], clipped: float) -> str | None:
  """Why rung j stays out of a dose–response slope, or None: it repeats a weaker rung's
  strength (a target above the photo's reachable AUROC keeps the top strength: one
  test set counted twice), or its test set clips more than ``CLIP_LIMIT``."""
  same = [k for k in range(j) if strengths[k] == strengths[j]]
  if same:
    return f"same strength as {rung_name(same[0])}"
  if clipped > CLIP_LIMIT:
    return f"clipped {100 * clipped:.1f} % > {100 * CLIP_LIMIT:.0f} %"
  return None


def _is_complete(root: Path, params: dict) -> bool:
  if textures._read_marker(root) != params:
    return False
  try:
    manifest = json.loads((root / _MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  return all((root / p).is_file() for r in manifest["images"]
             for p in r["images"] + (r["masks"] or []))


def build_ladder(root: str | os.PathLike | None = None, seed: int = 0, image_size: int = 256,
                 n_train: int = 120, n_test: int = 80,
                 categories: str | Sequence[str] = textures.CATEGORIES, *,
                 test_good_fraction: float = 0.375,
                 defects: Sequence[str] = textures.DEFECT_TYPES,
                 crop_range: tuple[int, int] = (128, 160), noise_sigma: float = 1.5,
                 strengths: Mapping[str, Sequence[float]] | None = None,
                 verbose: bool = False) -> Path:
  """Builds (or reuses) the difficulty ladder at ``root`` (layout in the module
  docstring); returns ``root``.

  Arguments as ``textures.build_texture_benchmark``'s (same images: the train split
  and every test sample's draw are the texture build's, through the exact-mask
  generator); ``categories`` defaults to all nine; ``strengths`` maps a category to
  its rung strengths, overriding the committed ladder (``committed_ladder``).

  The manifest's ``categories[c]["rungs"]`` holds per rung: ``target``, ``strength``,
  ``auroc_cal`` (PaDiM on the calibration split), ``reached``, ``clipped_cal``,
  ``clipped`` (``clipped_fraction`` on this build's defective test images),
  ``in_slope`` and ``why_out`` (None, or why a slope leaves the rung out: clipped above
  ``CLIP_LIMIT``, or the same strength as a weaker rung).
  """
  root = Path(root) if root is not None else default_ladder_root()
  categories = textures.expand_categories(categories)
  defects = tuple(defects)
  lo, hi = textures._check_build_arguments(defects, test_good_fraction, n_train, n_test,
                                           image_size, crop_range)
  committed = committed_ladder()
  rungs_of = resolve_rungs(categories, strengths, committed)
  params = {"builder_version": textures.BUILDER_VERSION, "ladder_version": LADDER_VERSION,
            "seed": int(seed), "image_size": int(image_size), "n_train": int(n_train),
            "n_test": int(n_test), "categories": list(categories),
            "test_good_fraction": float(test_good_fraction), "defects": list(defects),
            "crop_range": [lo, hi], "noise_sigma": float(noise_sigma),
            "clip_limit": CLIP_LIMIT,
            "strengths": {c: [r["strength"] for r in rungs_of[c]] for c in categories}}
  if _is_complete(root, params):
    return root
  textures.prepare_build(root)
  photos = textures.load_photos(categories)
  with atomic_directory(root) as tmp:
    built = textures.build_categories(
        lambda category: _build_category(
            tmp, category, photos, rungs_of[category], seed=int(seed),
            image_size=int(image_size), n_train=int(n_train), n_test=int(n_test),
            test_good_fraction=test_good_fraction, defects=defects, crop_range=(lo, hi),
            noise_sigma=float(noise_sigma)),
        categories, "ladder" if verbose else None)
    info = {}
    for c, (_, clipped) in zip(categories, built):
      spec = textures.CATEGORY_SPECS[c]
      rungs = []
      for j, r in enumerate(rungs_of[c]):
        why = _why_out(j, [x["strength"] for x in rungs_of[c]], clipped[j])
        rungs.append({**r, "name": rung_name(j), "clipped": clipped[j],
                      "in_slope": why is None, "why_out": why})
      info[c] = {"tier": spec.tier, "photo": f"skimage.data.{spec.photo}", "rungs": rungs}
    calibration = {k: committed.get(k) for k in ("settings", "features")}
    atomic_write_json(tmp / _MANIFEST, {
        "params": params, "calibration": calibration, "categories": info,
        "images": [r for recs, _ in built for r in recs]})
    atomic_write_text(tmp / _MARKER, json.dumps(params, sort_keys=True) + "\n")
  return root


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Rung:
  """One rung of a category's ladder, as a trainer scores it.

  Attributes:
    index: j, weakest rung first.
    name: ``rung<j>``.
    strength: the defect opacity s.
    target: the calibration target AUROC (None for strengths passed by hand).
    auroc_cal: PaDiM's image AUROC on the calibration split at s: the rung's
      pre-treatment difficulty covariate (None for strengths passed by hand).
    reached: ``auroc_cal`` within the calibration tolerance of ``target``.
    clipped_cal, clipped: ``clipped_fraction`` on the calibration split and on this
      rung's test images.
    in_slope: False when ``clipped > CLIP_LIMIT`` or the strength repeats a weaker
      rung's (a target out of reach); such a rung is scored and shown, and a
      dose–response slope leaves it out.
    why_out: None, or why ``in_slope`` is False.
    test: the rung's test split (``mvtec.ImageSplit``: paths, labels, ``defect_types``
      = "good" or the defect kind, mask paths).
  """
  index: int
  name: str
  strength: float
  target: float | None
  auroc_cal: float | None
  reached: bool | None
  clipped_cal: float | None
  clipped: float
  in_slope: bool
  why_out: str | None
  test: mvtec.ImageSplit


def read_manifest(root: str | os.PathLike) -> dict:
  """The manifest of a complete ladder build."""
  root = Path(root)
  if textures._read_marker(root) is None:
    raise FileNotFoundError(f"{root / _MARKER} missing: {root} is not a complete ladder build")
  return json.loads((root / _MANIFEST).read_text())


def train_split(root: str | os.PathLike, category: str) -> mvtec.ImageSplit:
  """The category's one train split, shared by every rung."""
  return mvtec.scan_split(root, category, "train")


def load_rungs(root: str | os.PathLike, category: str) -> list[Rung]:
  """Every rung of ``category`` in a ladder build at ``root``, weakest first."""
  info = read_manifest(root)["categories"]
  if category not in info:
    raise ValueError(f"ladder build {root} has no category {category!r}; it has "
                     f"{', '.join(info)}")
  out = []
  for j, r in enumerate(info[category]["rungs"]):
    out.append(Rung(j, r["name"], r["strength"], r["target"], r["auroc_cal"], r["reached"],
                    r["clipped_cal"], r["clipped"], r["in_slope"], r["why_out"],
                    mvtec.scan_split(root, f"{category}/{r['name']}", "test")))
  return out
