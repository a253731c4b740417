"""Scores, anomaly maps and decisions for new images from a finished study-A run.

  tailjax predict --workdir=runs/mvtec --images=/data/new_parts --out=runs/mvtec/predict
  predict("runs/mvtec", "/data/new_parts", "runs/mvtec/predict")   # the library call

1. **Model.** The run's trained row (variant, seed) — by default the
   ``report.treatment`` variant's first seed — restored from its final
   checkpoint (``study_a_record.load_trained``); nothing is trained. The run is only
   read: its manifest is verified without a lock (``runrecord.read_run``) and
   nothing is written under the workdir, so a read-only workdir works; everything
   predict writes goes to ``out_dir``.
2. **Features.** Each image is read, resized and passed through the run's
   backbone exactly as its training images were (``pipeline.Dataset.image_features``:
   ``mvtec.load_images`` at ``backbone.resolution``, grayscale replicated to RGB,
   the run's extractor and feature cache). The run's input is square, so an image
   whose sides differ by more than ``MAX_ASPECT_RATIO``:1 is refused, naming it and
   its size (resizing would stretch it past recognition; crop or tile it first). An
   image whose channels differ from the run's training images (grayscale scored by a
   model trained on colour, or the reverse) is scored — grayscale is replicated to
   RGB — with a warning, and recorded per image (``channels``) and in ``warnings``.
3. **Scores.** Per-patch scores (``evaluation.patch_scores``), pixel maps at
   ``eval.size`` (``anomaly.anomaly_maps``: bilinear upsampling, Gaussian σ) and
   image scores (``anomaly.image_scores``), all with the run's ``eval.*``
   settings: the numbers its evaluation would give these images.
4. **Thresholds, chosen without any test image.** Decisions: an image is
   anomalous iff its score ≥ the image threshold, a pixel iff its map value ≥
   the pixel threshold.

   * ``threshold="val_quantile"`` (default): the run's held-out normal training
     images (``data.val_fraction``; never trained on, never test images). Image
     threshold = the ``quantile`` of their image scores, pixel threshold = the
     ``quantile`` of all their map pixels, so about ``1 − quantile`` of normal
     images (pixels) are flagged. A run without held-out images is an error.
   * ``threshold="f1"``: a labelled validation folder the user gives
     (``labelled_dir``, MVTec test layout: ``<dir>/good/*.png``,
     ``<dir>/<defect>/*.png`` and masks in ``<dir>/ground_truth/<defect>/`` or
     ``<dir>/../ground_truth/<defect>/``). The image threshold maximises the
     image-level F1 over its images, the pixel threshold the pixel-level F1 over
     all its pixels (``f1_threshold``). A folder sharing an image (by content)
     with the run's test split, or with the images it trained on, is refused.

   The threshold record (mode, quantile, the data's file list, values) goes to
   ``threshold.json`` and ``results.json`` in ``out_dir``.
5. **Outputs** in ``out_dir`` (``<name>`` = the file stem, under ``<type>/`` for
   an MVTec-layout folder), all or nothing: they are built in a hidden sibling
   folder and renamed onto ``out_dir`` only when complete, so a failed predict
   leaves ``out_dir`` as it was (absent, or a previous predict's complete outputs)
   and says why on one line. ``out_dir`` must be absent, empty or a previous
   predict's outputs (anything else is refused rather than replaced):

   * ``overlays/<name>.png``: the image with its anomaly map (inferno, 50 %
     blend; one colour scale for every image: from the median pixel score of the
     threshold data to pixel threshold + (threshold − median), so the pixel
     threshold sits mid-scale) and the outline of its mask (cyan);
   * ``masks/<name>_mask.png``: the binary mask (0 / 255) at the pixel threshold,
     at the image's own size (the ``eval.size`` map resized bilinearly to the
     image, then thresholded);
   * ``results.csv`` / ``results.json``: one row per image — path, defect type and
     label (MVTec layout only), image score, decision, anomalous pixel fraction,
     mask and overlay paths (relative to ``out_dir``), channels; the JSON adds the
     threshold record, the model row, the eval settings, warnings, a summary and
     the record of this invocation (arguments, code version, the run's
     ``config_hash``; ``kind: "predict"``).

``images`` is an image file, a folder of images (its image files), or — when the
folder holds no image files — an MVTec-layout test split (one subfolder per
type; ``good`` means label 0; masks as above are optional).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io as _io
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from tailjax import anomaly, evaluation, io, runrecord
from tailjax.data import features as feature_cache
from tailjax.data import mvtec, pipeline
from tailjax.studies import study_a_record

THRESHOLDS = ("val_quantile", "f1")
GROUND_TRUTH = "ground_truth"
CSV_COLUMNS = ("path", "defect_type", "label", "image_score", "image_threshold", "decision",
               "anomalous_pixel_fraction", "mask", "overlay", "channels")
KIND = "predict"          # results.json's "kind": marks a folder predict may replace
# Longest / shortest side beyond which an image is refused: the backbone sees a square,
# and 4:1 is already a 4× stretch of one axis (a 16:9 photo is 1.8:1).
MAX_ASPECT_RATIO = 4.0


# ----------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Images to score: paths, output names, and (MVTec layout only) types, labels, masks."""
  root: Path
  paths: tuple[Path, ...]
  names: tuple[str, ...]                    # output names without extension, e.g. "scratch/000"
  types: tuple[str, ...] | None             # None: a plain folder (no labels)
  labels: np.ndarray | None                 # int32 [n], 0 = good
  mask_paths: tuple[Path | None, ...] | None

  def __len__(self) -> int:
    return len(self.paths)


def _unique(names: list[str], paths: list[Path], root: Path) -> None:
  seen: dict[str, Path] = {}
  for n, p in zip(names, paths):
    if n in seen:
      raise mvtec.DatasetError(f"{root}: {seen[n].name} and {p.name} would write the same "
                               f"outputs ({n}.png); rename one")
    seen[n] = p


def scan_images(path: str | Path) -> ImageSet:
  """An image file, a folder's image files (sorted), or an MVTec-layout test split
  (when the folder holds no image files: ``<path>/<type>/*``, ``good`` = label 0,
  masks looked up in ``<path>/ground_truth/<type>`` or ``<path>/../ground_truth/<type>``)."""
  root = Path(path).expanduser()
  if root.is_file():
    if root.suffix.lower() not in mvtec.IMAGE_EXTENSIONS:
      raise mvtec.DatasetError(f"{root} is not an image file ({', '.join(mvtec.IMAGE_EXTENSIONS)})")
    return ImageSet(root.parent, (root,), (root.stem,), None, None, None)
  if not root.is_dir():
    raise mvtec.MissingDataError(f"images: {root} does not exist")
  direct = mvtec._list_images(root)
  if direct:
    names = [p.stem for p in direct]
    _unique(names, direct, root)
    return ImageSet(root, tuple(direct), tuple(names), None, None, None)
  gt = next((d for d in (root / GROUND_TRUTH, root.parent / GROUND_TRUTH) if d.is_dir()), None)
  paths, names, types, masks = [], [], [], []
  for type_dir in sorted(p for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and p.name != GROUND_TRUTH):
    for image in mvtec._list_images(type_dir):
      paths.append(image)
      names.append(f"{type_dir.name}/{image.stem}")
      types.append(type_dir.name)
      masks.append(None if gt is None or type_dir.name == mvtec.GOOD
                   else mvtec._find_mask(gt / type_dir.name, image))
  if not paths:
    raise mvtec.DatasetError(f"images: {root} holds no image files "
                             f"({', '.join(mvtec.IMAGE_EXTENSIONS)}), neither directly nor "
                             "in type subfolders (MVTec test layout)")
  _unique(names, paths, root)
  labels = np.asarray([0 if t == mvtec.GOOD else 1 for t in types], np.int32)
  return ImageSet(root, tuple(paths), tuple(names), tuple(types), labels, tuple(masks))


def _labelled_split(images: ImageSet) -> mvtec.ImageSplit:
  """The labelled folder as an ``ImageSplit`` (masks required for every defective image)."""
  where = f"labelled_dir {images.root}"
  if images.types is None:
    raise mvtec.DatasetError(f"{where} must be in the MVTec test layout (good/ and one "
                             "folder per defect type), not a plain folder of images")
  if images.labels.min() == images.labels.max():
    missing = "defective" if images.labels[0] == 0 else "good"
    raise mvtec.DatasetError(f"{where} holds no {missing} images; an F1 threshold needs both")
  for p, t, m in zip(images.paths, images.types, images.mask_paths):
    if t != mvtec.GOOD and m is None:
      raise mvtec.MissingDataError(f"{where}: defective image {p} has no mask (expected "
                                   f"{GROUND_TRUTH}/{t}/{p.stem}_mask.png beside or inside "
                                   "the folder)")
  return mvtec.ImageSplit(images.root, images.root.name, "test", images.paths, images.labels,
                          images.types, images.mask_paths)


# ----------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------


def f1_threshold(scores, labels) -> tuple[float, float]:
  """(t, F1) maximising the F1 of "anomalous iff score ≥ t" over every distinct score t
  (ties: the highest such t). ``scores`` and ``labels`` (0/1) have any equal shape, e.g.
  maps and masks ``[N, S, S]``. ``F1 = 2·TP / (TP + FP + P)``; needs ≥ 1 positive."""
  s = np.asarray(scores).reshape(-1)
  y = np.asarray(labels).reshape(-1).astype(bool)
  if s.shape != y.shape:
    raise ValueError(f"f1_threshold: {np.shape(scores)} scores but {np.shape(labels)} labels")
  n_pos = int(y.sum())
  if n_pos == 0:
    raise ValueError("f1_threshold: no positive label")
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  tp = np.cumsum(y, dtype=np.int64)
  fp = np.arange(1, s.size + 1, dtype=np.int64) - tp
  end = np.r_[s[1:] != s[:-1], True]          # last element of each tie group
  f1 = 2 * tp[end] / (tp[end] + fp[end] + n_pos)
  i = int(np.argmax(f1))
  return float(s[end][i]), float(f1[i])


def _digest(paths) -> str:
  h = hashlib.sha256()
  for p in paths:
    h.update(bytes.fromhex(feature_cache.file_digest(p)))
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def _scorer(cfg, tc: study_a_record.TrainedCategory, row: int):
  params = jax.tree.map(lambda a: a[row], tc.params_R)
  e = cfg.eval

  def score(feats_NxhxwxC):
    """(maps [N, S, S] float32, image scores [N]) with the run's eval settings."""
    patch = evaluation.patch_scores(tc.model, params, feats_NxhxwxC, e.score,
                                    conv_impl=tc.program.conv_impl)
    maps = anomaly.anomaly_maps(patch, e.size, sigma=e.smoothing_sigma).astype(np.float32)
    return maps, np.asarray(anomaly.image_scores(maps, e.image_score, k=e.image_topk))

  return score


def _select_row(cfg, grid_rows: list[dict], variant, seed) -> int:
  """The index of the trained row (variant, seed); default ``report.treatment``, its first seed."""
  variant = cfg.report.treatment if variant is None else variant
  names = list(dict.fromkeys(r["variant"] for r in grid_rows))
  if variant not in names:
    raise ValueError(f"variant {variant!r} is not in the run (variants: {', '.join(names)})")
  seeds = [r["seed"] for r in grid_rows if r["variant"] == variant]
  seed = seeds[0] if seed is None else int(seed)
  if seed not in seeds:
    raise ValueError(f"seed {seed} is not in the run for variant {variant!r} (seeds: {seeds})")
  return next(i for i, r in enumerate(grid_rows) if r["variant"] == variant and r["seed"] == seed)


def _trained_categories(workdir: Path) -> list[str]:
  return sorted(p.parent.name for p in workdir.glob("*/rows.json"))


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
  with io.atomic_path(path) as tmp:
    Image.fromarray(array).save(tmp, format="PNG")


def _outputs(path: Path, map_SxS: np.ndarray, pixel_thr: float, colour: tuple[float, float],
             mask_path: Path, overlay_path: Path) -> float:
  """Writes the mask and the overlay at the image's size; returns the anomalous pixel fraction."""
  import matplotlib
  from scipy import ndimage
  image = mvtec.read_image(path)
  h, w = image.shape[:2]
  m = np.asarray(Image.fromarray(map_SxS).resize((w, h), Image.Resampling.BILINEAR))
  mask = m >= pixel_thr
  _write_png(mask_path, (mask * 255).astype(np.uint8))
  lo, hi = colour
  heat = matplotlib.colormaps["inferno"](np.clip((m - lo) / (hi - lo), 0.0, 1.0))[..., :3]
  over = (0.5 * image + 127.5 * heat).round().astype(np.uint8)
  over[mask & ~ndimage.binary_erosion(mask)] = (0, 255, 255)
  _write_png(overlay_path, over)
  return float(mask.mean())


def _write_csv(path: Path, image_records: list[dict]) -> None:
  buf = _io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for r in image_records:
    writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
  io.atomic_write_text(path, buf.getvalue())


def _summary(image_records: list[dict]) -> dict:
  """Counts of decisions and, when every image has a label, the confusion matrix,
  precision, recall and F1 against the labels."""
  flagged = np.asarray([r["decision"] == "anomalous" for r in image_records])
  out: dict[str, Any] = {"n_images": len(image_records), "n_anomalous": int(flagged.sum())}
  labels = [r["label"] for r in image_records]
  if all(l is not None for l in labels):
    y = np.asarray(labels, bool)
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
    out["confusion"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    out["precision"] = tp / (tp + fp) if tp + fp else None
    out["recall"] = tp / (tp + fn) if tp + fn else None
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
  return out


# ----------------------------------------------------------------------------
# Input and output checks (before anything is scored)
# ----------------------------------------------------------------------------


def check_aspect_ratios(paths, side: int) -> None:
  """Refuses an image whose longer side exceeds ``MAX_ASPECT_RATIO`` × its shorter one,
  naming the file and its size (header reads only)."""
  for p in paths:
    h, w = mvtec.image_size_of(p)
    ratio = max(h, w) / max(min(h, w), 1)
    if ratio > MAX_ASPECT_RATIO:
      raise mvtec.DatasetError(
          f"{p}: {w}×{h} pixels (aspect ratio {ratio:.3g}:1); the run scores images resized to "
          f"its square {side}×{side} input, which would stretch this one beyond the "
          f"{MAX_ASPECT_RATIO:g}:1 limit — crop or tile it first")


def _channels_name(c: int) -> str:
  return "grayscale" if c == 1 else "colour"


def channel_warnings(paths, names, trained_channels: set[int]) -> tuple[list[int], list[str]]:
  """(channels per image, warnings): one warning when some images' channels differ from
  every training image's (the run has seen only grayscale, or only colour)."""
  channels = [mvtec.image_channels_of(p) for p in paths]
  if len(trained_channels) != 1:
    return channels, []
  (trained,) = trained_channels
  odd = [n for n, c in zip(names, channels) if c != trained]
  if not odd:
    return channels, []
  other = _channels_name(3 if trained == 1 else 1)
  how = ("replicated to 3 channels" if trained == 3 else "scored through the RGB backbone")
  return channels, [f"{len(odd)} of {len(names)} images are {other} but the run trained on "
                    f"{_channels_name(trained)} images only ({io.first_few(odd)}); they are {how} "
                    "and scored anyway, so their scores may not be comparable"]


def _check_out_dir(out_dir: Path, workdir: Path) -> None:
  """``out_dir`` may be absent, empty, or a previous predict's outputs; it is replaced
  whole, so anything else (someone's folder) is refused rather than deleted."""
  if out_dir.resolve() == workdir.resolve():
    raise ValueError(f"out_dir {out_dir} is the run's workdir; predict never writes into the "
                     "run itself: pass another --out (e.g. <workdir>/predict)")
  if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
    return
  try:
    previous = json.loads((out_dir / "results.json").read_text()).get("kind")
  except (OSError, ValueError, AttributeError):
    previous = None
  if not out_dir.is_dir() or previous != KIND:
    raise ValueError(f"out_dir {out_dir} exists and is not a previous predict's output (no "
                     "results.json of kind 'predict'); predict replaces its out_dir whole, "
                     "so choose a new or empty folder")


# ----------------------------------------------------------------------------
# The steps of predict, in order: arguments, the run's category and row, thresholds,
# then one writer for every output
# ----------------------------------------------------------------------------


def _check_threshold_arguments(threshold: str, quantile: float, labelled_dir) -> None:
  if threshold not in THRESHOLDS:
    raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
  if threshold == "val_quantile":
    if not 0.0 < float(quantile) <= 1.0:
      raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    if labelled_dir is not None:
      raise ValueError("labelled_dir is used only with threshold='f1'")
  elif labelled_dir is None:
    raise ValueError("threshold='f1' needs labelled_dir: a labelled validation folder "
                     "(MVTec test layout with masks)")


def _choose_category(cfg, workdir: Path, category: str | None) -> str:
  """The trained category whose model scores the images (the only one by default);
  multi-scale runs are refused."""
  trained = _trained_categories(workdir)
  if category is None:
    if len(trained) != 1:
      raise ValueError(f"{workdir} holds the categories {trained}: pass category=...")
    category = trained[0]
  elif category not in trained:
    raise ValueError(f"category {category!r} was not trained in {workdir} "
                     f"(trained: {', '.join(trained)})")
  if len(pipeline.scale_layers(cfg)) > 1:
    raise ValueError(f"{workdir} is a multi-scale run (config.backbone.layers="
                     f"{tuple(cfg.backbone.layers)}); predict scores single-scale runs only")
  return category


def _val_quantile_threshold(cfg, workdir: Path, tc, paths, score, quantile: float):
  """Thresholds from the run's held-out normal training images: ``(record, data,
  reference maps for the colour scale, id key)``."""
  if len(tc.data.val_feats) == 0:
    raise ValueError(
        f"{workdir} holds no held-out normal images (data.val_fraction = "
        f"{cfg.data.get('val_fraction', 0.0)}): retrain with --config.data.val_fraction=0.2, "
        "or use threshold='f1' with a labelled validation folder")
  ref_maps, ref_scores = score(tc.data.val_feats)
  data = [str(q) for q in paths["val"]]
  thr = {"mode": "val_quantile", "quantile": float(quantile),
         "source": f"the run's held-out normal training images (data.val_fraction = "
                   f"{cfg.data.val_fraction}, data.split_seed = {cfg.data.split_seed})",
         "image": float(np.quantile(ref_scores, quantile)),
         "pixel": float(np.quantile(ref_maps, quantile))}
  return thr, data, ref_maps, f"val-q{float(quantile):g}"


def _f1_threshold(cfg, tc, paths, split: mvtec.ImageSplit, score, labelled_dir, progress: bool):
  """F1-optimal thresholds on a labelled folder that shares no image with the run's
  training or test images: ``(record, data, reference maps, id key)``."""
  seen = {**{feature_cache.file_digest(q): ("training image", q) for q in paths["train"]},
          **{feature_cache.file_digest(q): ("test image", q) for q in paths["test"]}}
  for q in split.image_paths:
    what, other = seen.get(feature_cache.file_digest(q), (None, None))
    if what == "test image":
      raise ValueError(f"labelled_dir: {q} is the run's test image {other}; thresholds must "
                       "not be chosen on the test split")
    if what:
      raise ValueError(f"labelled_dir: {q} is the run's training image {other}; its scores "
                       "are optimistic (trained on), so it cannot choose thresholds")
  ref_maps, ref_scores = score(tc.dataset.image_features(split.image_paths, progress))
  masks = split.load_masks(cfg.eval.size)
  image_thr, image_f1 = f1_threshold(ref_scores, split.labels)
  pixel_thr, pixel_f1 = f1_threshold(ref_maps, masks)
  data = [str(q) for q in split.image_paths]
  thr = {"mode": "f1", "quantile": None,
         "source": f"labelled validation folder {Path(labelled_dir).expanduser()}",
         "image": image_thr, "pixel": pixel_thr,
         "image_f1": image_f1, "pixel_f1": pixel_f1}
  key = "f1-" + _digest([*split.image_paths, *(m for m in split.mask_paths if m)])[:12]
  return thr, data, ref_maps[split.labels == 0], key


def _threshold_record(thr: dict, data: list[str], colour_ref, key: str, category: str, row: dict) -> dict:
  """The full threshold record: ``thr`` plus its data, the model row, the decision rule,
  the overlays' colour scale (median of the threshold data's pixels to pixel
  threshold + (threshold − median)) and an id."""
  lo = float(np.median(colour_ref))
  hi = thr["pixel"] + (thr["pixel"] - lo)
  return {**thr, "data": data, "n_images": len(data), "category": category,
          "variant": row["variant"], "seed": row["seed"],
          "rule": "anomalous iff score >= threshold (image: image score, pixel: map value)",
          "colour_scale": [lo, hi if hi > lo else lo + 1e-6],
          "id": f"{category}/threshold-{row['variant']}-seed{row['seed']}-{key}"}


def _image_record(to_score: ImageSet, j: int, score: float, thr: dict, fraction: float,
                  mask_rel: str, overlay_rel: str, channels: int) -> dict:
  """One row of results.csv / one entry of results.json's ``images`` (``CSV_COLUMNS``)."""
  anomalous = bool(score >= thr["image"])
  return {"path": str(to_score.paths[j]),
          "defect_type": to_score.types[j] if to_score.types else None,
          "label": int(to_score.labels[j]) if to_score.labels is not None else None,
          "image_score": float(score), "image_threshold": thr["image"],
          "decision": "anomalous" if anomalous else "normal",
          "anomalous_pixel_fraction": fraction, "mask": mask_rel,
          "overlay": overlay_rel, "channels": channels}


def _write_outputs(out_dir: Path, to_score: ImageSet, maps, scores, channels: list[int], thr: dict,
                   results_of) -> dict:
  """Writes every output into ``out_dir``, all or nothing: masks and overlays, then
  ``threshold.json``, ``results.json`` (``results_of(image records)``) and
  ``results.csv``; returns what ``results.json`` holds.

  Everything goes into a staging folder renamed onto out_dir when complete: a failure
  anywhere leaves out_dir as it was. Only writes happen inside (the images were read
  before), so an OSError there is about out_dir: one line naming it."""
  try:
    with io.atomic_directory(out_dir) as stage:
      image_records = []
      for j, path in enumerate(to_score.paths):
        name = to_score.names[j]
        mask_rel, overlay_rel = f"masks/{name}_mask.png", f"overlays/{name}.png"
        fraction = _outputs(path, maps[j], thr["pixel"], tuple(thr["colour_scale"]),
                            stage / mask_rel, stage / overlay_rel)
        image_records.append(_image_record(to_score, j, scores[j], thr, fraction, mask_rel,
                                           overlay_rel, channels[j]))
      result = results_of(image_records)
      io.atomic_write_json(stage / "threshold.json", thr)
      io.atomic_write_json(stage / "results.json", result)
      _write_csv(stage / "results.csv", image_records)
  except OSError as e:
    raise OutputNotWritableError(
        f"--out {out_dir}: cannot write the predict outputs there ({e.strerror or e}); give "
        "a writable --out (predict only reads the run)") from None
  return result


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def predict(workdir: str | Path, images: str | Path, out_dir: str | Path, *,
            category: str | None = None, variant: str | None = None, seed: int | None = None,
            threshold: str = "val_quantile", quantile: float = 0.99,
            labelled_dir: str | Path | None = None, progress: bool = True) -> dict:
  """Scores ``images`` with a finished study-A run and writes maps, masks and results.

  Args:
    workdir: the study-A run (trained to ``train.num_steps``; image data, not
      ``data.kind=features``).
    images: an image file, a folder of images or an MVTec-layout test split.
    out_dir: where overlays/, masks/, results.csv and results.json go.
    category: the run's category whose model scores the images (default: the run's
      only category).
    variant, seed: the row (default ``report.treatment``, its first seed).
    threshold: "val_quantile" (held-out normal images, ``quantile``) or "f1"
      (``labelled_dir``); see the module docstring.
    quantile: in (0, 1], for "val_quantile".
    labelled_dir: MVTec-test-layout folder with masks, for "f1" only.
  Returns:
    what ``results.json`` holds: ``{"kind", "workdir", "out_dir", "category", "images_from",
    "row", "threshold", "eval", "images", "summary", "warnings", "invocation", "seconds"}``;
    ``images`` is one dict per image (``CSV_COLUMNS``), ``threshold`` the record also saved
    as ``threshold.json``.
  """
  t0 = time.time()
  _check_threshold_arguments(threshold, quantile, labelled_dir)
  workdir, out_dir = Path(workdir), Path(out_dir).expanduser()
  started = time.strftime("%Y-%m-%d %H:%M:%S")
  manifest = runrecord.read_run(workdir, kind=study_a_record.KIND)   # verified, no lock, no write
  cfg = study_a_record.load_config(workdir)
  if cfg.data.kind == "features":
    raise ValueError(f"{workdir} was trained on pre-extracted features (data.kind=features): "
                     "it has no backbone to extract features of new images")
  _check_out_dir(out_dir, workdir)
  to_score = scan_images(images)
  split = _labelled_split(scan_images(labelled_dir)) if labelled_dir is not None else None
  check_aspect_ratios(to_score.paths, int(cfg.backbone.resolution))
  if split is not None:
    check_aspect_ratios(split.image_paths, int(cfg.backbone.resolution))

  category = _choose_category(cfg, workdir, category)
  tc = study_a_record.load_trained(workdir, [category])[category]
  i = _select_row(cfg, tc.rows, variant, seed)
  row = tc.rows[i]
  score = _scorer(cfg, tc, i)
  paths = tc.dataset.split_paths(category)
  channels, warnings = channel_warnings(
      to_score.paths, to_score.names,
      {mvtec.image_channels_of(q) for q in [*paths["train"], *paths["val"]]})
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)

  if threshold == "val_quantile":
    chosen = _val_quantile_threshold(cfg, workdir, tc, paths, score, quantile)
  else:
    chosen = _f1_threshold(cfg, tc, paths, split, score, labelled_dir, progress)
  thr = _threshold_record(*chosen, category, row)
  maps, scores = score(tc.dataset.image_features(to_score.paths, progress))

  def results_of(image_records: list[dict]) -> dict:
    invocation = {"started": started, "seconds": time.time() - t0,
                  "code": runrecord.code_version(),
                  "run": {"workdir": str(workdir), "config_hash": manifest["config_hash"],
                          "invocations": len(manifest.get("invocations", []))},
                  "arguments": {"images": str(images), "out_dir": str(out_dir),
                                "category": category, "variant": variant, "seed": seed,
                                "threshold": threshold, "quantile": quantile,
                                "labelled_dir": None if labelled_dir is None else str(labelled_dir)}}
    return {"kind": KIND, "workdir": str(workdir), "out_dir": str(out_dir), "category": category,
            "images_from": str(to_score.root), "row": row, "threshold": thr,
            "eval": dict(cfg.eval), "images": image_records, "summary": _summary(image_records),
            "warnings": warnings, "invocation": invocation, "seconds": time.time() - t0}

  return _write_outputs(out_dir, to_score, maps, scores, channels, thr, results_of)


class OutputNotWritableError(RuntimeError):
  """``--out`` (or its parent) cannot be written."""


def main(workdir: str, images: str, out_dir: str, *, category: str | None = None,
         variant: str | None = None, seed: int | None = None, threshold: str = "val_quantile",
         quantile: float = 0.99, labelled_dir: str | None = None,
         progress: bool = True) -> dict:
  """``predict`` with plain arguments (the CLI's entry point); prints a short summary."""
  res = predict(workdir, images, out_dir, category=category, variant=variant, seed=seed,
                threshold=threshold, quantile=quantile, labelled_dir=labelled_dir,
                progress=progress)
  t, s = res["threshold"], res["summary"]
  how = (f"{t['quantile']:g} quantile of {t['n_images']} held-out normal images"
         if t["mode"] == "val_quantile" else f"F1-optimal on {t['n_images']} labelled images")
  print(f"[{res['category']}] {res['row']['variant']} seed {res['row']['seed']}: "
        f"{s['n_anomalous']} of {s['n_images']} images anomalous; thresholds image "
        f"{t['image']:.6g}, pixel {t['pixel']:.6g} ({how})")
  if "confusion" in s:
    print("  against the folder's labels: " + json.dumps(s["confusion"])
          + (f", F1 {s['f1']:.3f}" if s["f1"] is not None else ""))
  print(f"  results: {Path(out_dir) / 'results.csv'}, maps in {Path(out_dir) / 'overlays'}, "
        f"masks in {Path(out_dir) / 'masks'}")
  return res
