"""Small statistics shared by the reports."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean, sample std (ddof 1) and the two-sided t-interval of the mean over seeds.

  With one value the spread is undefined: std, lo and hi are NaN.
  """
  v = np.asarray(values, np.float64).reshape(-1)
  n = int(v.size)
  mean = float(v.mean())
  if n < 2:
    return {"mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
  sd = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n))
  return {"mean": mean, "std": sd, "lo": mean - half, "hi": mean + half, "n": n}
