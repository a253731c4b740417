"""EfficientNet-Lite0 feature-extraction throughput (images/s), jitted, after warm-up.

  python -m benchmarks.bench_features                  # batch sizes 1, 8, 32 on this machine
  python -m benchmarks.bench_features --batch-sizes=16 --images=128 --out=bench.json
  python -m benchmarks.bench_features --depthwise      # also grouped conv vs shifted sum
  python -m benchmarks.bench_features --evidence       # also the normalisation evidence

For each batch size it times ``model.extract(uint8 [N, 224, 224, 3], layers=(16,))``
(host->device copy, normalisation, network, device->host copy) and, side by
side, the full network up to the logits: requesting only the stride-16 map lets
XLA drop the last two stages and the head, and the ratio shows what that saves.
``--depthwise`` times the two depthwise-convolution implementations side by
side (``depthwise_impl="conv"`` vs ``"shifts"``). ``--evidence`` prints the
top-1 class and probability of scikit-image photos under each candidate input
normalisation, and how well each reproduces the stem BatchNorm's running
statistics (see ``tailjax/backbones/efficientnet_lite.py``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Sequence

import jax
import numpy as np

from tailjax import io as tj_io
from tailjax.backbones import efficientnet_lite


def _best_images_per_s(runs: dict, repeats: int, n_images: int) -> dict:
  """Best-of-``repeats`` images/s per named run; runs are interleaved so load drift on a
  shared machine hits all of them alike. Each run is called once first to compile."""
  for run in runs.values():
    run()
  best = {name: float("inf") for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      best[name] = min(best[name], time.perf_counter() - start)
  return {name: n_images / t for name, t in best.items()}


def throughput(model, batch_sizes: Sequence[int] = (1, 8, 32), n_images: int = 64,
               repeats: int = 3, seed: int = 0) -> list[dict]:
  """Images/s of ``extract`` for the stride-16 map alone and for the full network."""
  images = np.random.default_rng(seed).integers(0, 256, (n_images, 224, 224, 3), np.uint8)
  rows = []
  for b in batch_sizes:
    ips = _best_images_per_s({
        layers: functools.partial(model.extract, images, layers=layers, batch_size=b,
                                  progress=False)
        for layers in [(16,), ("logits",)]}, repeats, n_images)
    rows.append({"batch_size": b, "stride16_images_per_s": ips[(16,)],
                 "logits_images_per_s": ips[("logits",)],
                 "stride16_over_logits": ips[(16,)] / ips[("logits",)]})
  return rows


def depthwise_comparison(batch_size: int = 8, n_images: int = 16, repeats: int = 2,
                         seed: int = 0) -> dict:
  """Stride-16 images/s with the grouped-conv and the shifted-sum depthwise convolution."""
  images = np.random.default_rng(seed).integers(0, 256, (n_images, 224, 224, 3), np.uint8)
  models = {impl: efficientnet_lite.efficientnet_lite0(depthwise_impl=impl)
            for impl in ("conv", "shifts")}
  ips = _best_images_per_s({
      impl: functools.partial(m.extract, images, layers=(16,), batch_size=batch_size,
                              progress=False)
      for impl, m in models.items()}, repeats, n_images)
  return {"batch_size": batch_size, "conv_images_per_s": ips["conv"],
          "shifts_images_per_s": ips["shifts"], "shifts_over_conv": ips["shifts"] / ips["conv"]}


def _centre_square(img: np.ndarray) -> np.ndarray:
  h, w = img.shape[:2]
  s = min(h, w)
  return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def normalization_evidence(cache_dir=None) -> dict:
  """Top-1 (class, probability) per photo and stem-BN fit, for each normalisation."""
  import skimage.color
  import skimage.data

  labelled = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(),
              "astronaut": skimage.data.astronaut(), "rocket": skimage.data.rocket(),
              "motorcycle": skimage.data.stereo_motorcycle()[0]}
  extra = [skimage.data.stereo_motorcycle()[1], *(
      skimage.color.gray2rgb(f()) for f in (skimage.data.camera, skimage.data.brick,
                                            skimage.data.grass, skimage.data.gravel,
                                            skimage.data.moon))]
  out = {}
  for name in efficientnet_lite.NORMALIZATIONS:
    model = efficientnet_lite.efficientnet_lite0(normalization=name, cache_dir=cache_dir)
    # One photo per call: the photos differ in size, extract() resizes each on device.
    logits = np.concatenate([
        model.extract(_centre_square(p)[None], layers=("logits",), progress=False)["logits"]
        for p in labelled.values()])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    top1 = {photo: (int(p.argmax()), float(p.max())) for photo, p in zip(labelled, probs)}
    # The stem statistics are compared on the same 224x224 inputs the network sees.
    resized = np.stack([
        np.clip(np.asarray(jax.image.resize(_centre_square(p).astype(np.float32) / 255.0,
                                            (224, 224, 3), "linear", antialias=True)), 0, 1)
        for p in [*labelled.values(), *extra]])
    fit = efficientnet_lite.stem_statistics_fit(model.variables, resized, name)
    out[name] = {"top1": top1, "cat_281_285": float(probs[0, 281:286].sum()), **fit}
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", default="1,8,32")
  parser.add_argument("--images", type=int, default=64, help="images per timed run")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--depthwise", action="store_true",
                      help="also compare the two depthwise-conv implementations")
  parser.add_argument("--evidence", action="store_true")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)

  model = efficientnet_lite.efficientnet_lite0()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
             "n_images": args.images,
             "throughput": throughput(model, batch_sizes, args.images, args.repeats)}
  print(f"EfficientNet-Lite0 feature extraction, 224x224 uint8, {results['device']}")
  print(f"{'batch':>6} {'stride16 img/s':>15} {'logits img/s':>13} {'ratio':>6}")
  for r in results["throughput"]:
    print(f"{r['batch_size']:>6} {r['stride16_images_per_s']:>15.1f} "
          f"{r['logits_images_per_s']:>13.1f} {r['stride16_over_logits']:>6.2f}")

  if args.depthwise:
    results["depthwise"] = d = depthwise_comparison()
    print(f"depthwise conv, batch {d['batch_size']}, stride 16: grouped lax.conv "
          f"{d['conv_images_per_s']:.1f} img/s, shifted sum {d['shifts_images_per_s']:.1f} "
          f"img/s, ratio {d['shifts_over_conv']:.2f}")
  if args.evidence:
    results["normalization_evidence"] = ev = normalization_evidence()
    for name, e in ev.items():
      top1 = ", ".join(f"{k} {c} ({p:.2f})" for k, (c, p) in e["top1"].items())
      print(f"{name:>9}: {top1}; cats 281-285 {e['cat_281_285']:.2f}; stem-BN mean r "
            f"{e['mean_corr']:.3f}, var ratio {e['median_var_ratio']:.2f}")
  if args.out:
    tj_io.atomic_write_json(args.out, results)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
