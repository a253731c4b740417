"""The one report toolkit: markdown tables, number / interval formatting, the
which-side-of-zero verdict and atomic figure saving, shared by every report
(study A, its mechanism analyses, the sweeps, the study-B diagnosis).

Intervals are dicts with at least ``mean`` and optionally ``lo``/``hi`` (as
``tailjax.stats.mean_ci`` returns them); an interval whose ends are not finite
(one seed) prints as its mean alone and never carries a verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tailjax import io

DASH = "—"


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------


def num(x, fmt: str = ".4f", none: str = DASH) -> str:
  """``format(x, fmt)``, or ``none`` for None / NaN / Inf."""
  if x is None:
    return none
  try:
    if not np.isfinite(float(x)):
      return none
  except (TypeError, ValueError):
    return str(x)
  return format(x, fmt)


def pvalue(p) -> str:
  """A p-value with 3 significant digits (``—`` when undefined)."""
  return num(p, ".3g")


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
  """``"43.09 ± 1.35"``: mean ± sample std (ddof 1) of ``values × scale``; one value: the mean."""
  v = scale * np.asarray(values, np.float64).reshape(-1)
  if v.size > 1:
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"
  return f"{v.mean():.{digits}f}"


def interval(ci: Mapping[str, float], scale: float = 1.0, digits: int = 3,
             signed: bool = False) -> str:
  """``"0.784 [0.716, 0.853]"`` (``signed``: ``"+0.189 [+0.137, +0.243]"``); scaled by ``scale``."""
  sign = "+" if signed else ""
  f = lambda x: f"{scale * float(x):{sign}.{digits}f}"
  lo, hi = ci.get("lo", np.nan), ci.get("hi", np.nan)
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return f(ci["mean"])
  return f"{f(ci['mean'])} [{f(lo)}, {f(hi)}]"


def side_of_zero(ci: Mapping[str, float], null: float = 0.0) -> int:
  """+1 if the interval lies above ``null``, −1 below, 0 if it covers it or is undefined."""
  lo, hi = ci.get("lo", np.nan), ci.get("hi", np.nan)
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return 0
  return 1 if lo > null else (-1 if hi < null else 0)


def difference_verdict(ci: Mapping[str, float], better: str, worse: str,
                       level: str = "95 %") -> str:
  """Plain words for a paired difference's interval: ``better`` when it lies above 0,
  ``worse`` below, otherwise no significant difference (or undetermined, one value)."""
  lo, hi = ci.get("lo", np.nan), ci.get("hi", np.nan)
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "undetermined (one seed)"
  side = side_of_zero(ci)
  if side > 0:
    return f"{better} ({level} CI above 0)"
  if side < 0:
    return f"{worse} ({level} CI below 0)"
  return f"no significant difference ({level} CI contains 0)"


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> list[str]:
  """A markdown table as lines. Cells are ``str()``-ed; every row must have
  ``len(header)`` cells (a mismatch is a bug in the caller, so it raises)."""
  for r in rows:
    if len(r) != len(header):
      raise ValueError(f"table row has {len(r)} cells, header has {len(header)}: {list(r)}")
  sep = align or "|" + "---|" * len(header)
  return (["| " + " | ".join(str(h) for h in header) + " |", sep]
          + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def bullets(items: Sequence[str]) -> list[str]:
  return [f"- {t}" for t in items]


def write_markdown(path: str | Path, lines: Sequence[str]) -> str:
  """Joins ``lines`` and writes them atomically; returns the text."""
  text = "\n".join(lines).rstrip("\n") + "\n"
  io.atomic_write_text(path, text)
  return text


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
  """Writes a matplotlib figure as PNG atomically (never a half-written file) and closes it."""
  import matplotlib.pyplot as plt
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
