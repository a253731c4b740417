"""Figures for the reports (matplotlib, Agg backend, written atomically as PNG)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tailjax.reporting import save_figure as save  # noqa: E402  (the one figure writer)


def pick_examples(labels_N, types_N: Sequence[str], n: int) -> list[int]:
  """Up to ``n`` defective images, one per defect type first, plus one good image."""
  idx, seen = [], set()
  for i, t in enumerate(types_N):
    if labels_N[i] and t not in seen:
      idx.append(i)
      seen.add(t)
  rest = [i for i in range(len(types_N)) if labels_N[i] and i not in idx]
  idx = (idx + rest)[:max(n - 1, 1)]
  good = [i for i in range(len(types_N)) if not labels_N[i]]
  return idx + good[:1]


def anomaly_examples(path, images_NxHxWx3, masks_NxHxW, types_N: Sequence[str],
                     maps_by_method: Mapping[str, np.ndarray], n_examples: int = 4,
                     title: str = "") -> None:
  """Grid: one row per test image — the image with its ground-truth outline, then each
  method's anomaly map (own colour scale per method, shared across its rows).

  ``images_NxHxWx3`` may be None (data without images, e.g. pre-extracted features):
  the first column then shows the ground-truth mask instead of the image."""
  labels = np.asarray(masks_NxHxW).reshape(len(masks_NxHxW), -1).any(1)
  rows = pick_examples(labels, types_N, n_examples)
  methods = list(maps_by_method)
  fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(2.3 * (1 + len(methods)), 2.3 * len(rows)),
                           squeeze=False)
  for m in methods:
    maps_by_method[m] = np.asarray(maps_by_method[m])
  ranges = {m: (np.percentile(maps_by_method[m], 1), np.percentile(maps_by_method[m], 99.9))
            for m in methods}
  for r, i in enumerate(rows):
    ax = axes[r, 0]
    if images_NxHxWx3 is None:
      ax.imshow(masks_NxHxW[i], cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{types_N[i]} (mask)", fontsize=8)
    else:
      ax.imshow(images_NxHxWx3[i])
      if labels[i]:
        ax.contour(masks_NxHxW[i], levels=[0.5], colors="lime", linewidths=0.8)
      ax.set_title(types_N[i], fontsize=8)
    for j, m in enumerate(methods):
      ax = axes[r, 1 + j]
      ax.imshow(maps_by_method[m][i], cmap="inferno", vmin=ranges[m][0], vmax=ranges[m][1])
      if labels[i]:
        ax.contour(masks_NxHxW[i], levels=[0.5], colors="cyan", linewidths=0.6)
      if r == 0:
        ax.set_title(m, fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  save(fig, path)
