"""Figures of the mechanism report: one PNG per analysis, one row per category.

Each function takes the JSON-ready results of ``tailjax.studies.mechanisms.analyze_category``
(or sweep summaries) and writes a PNG atomically with ``tailjax.figures.save``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tailjax import figures as base_figures
from tailjax.figures import plt

LAMBDA_COLORS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def _rows(n: int, ncols: int, w: float = 3.4, h: float = 2.9):
  fig, axes = plt.subplots(n, ncols, figsize=(w * ncols, h * n), squeeze=False)
  return fig, axes


def _lambda_label(lam: float) -> str:
  return {0.0: "λ=0 (mean)", 1.0: "λ=1 (tail only)"}.get(lam, f"λ={lam:g}")


def gradient_concentration(path: str | Path, h3_by_cat: Mapping[str, dict]) -> None:
  """Per category: tail vs non-tail mean gradient norm per λ in input and parameter space
  (log scale), the tail share of the update, and Lorenz curves of per-patch parameter norms."""
  cats = list(h3_by_cat)
  fig, axes = _rows(len(cats), 4)
  for r, cat in enumerate(cats):
    h3 = h3_by_cat[cat]
    conds = h3["conditions"]
    x = np.arange(len(conds))
    for c, space in enumerate(("input", "param")):
      ax = axes[r, c]
      tail = [cd[space]["tail"] for cd in conds]
      non = [cd[space]["non_tail"] for cd in conds]
      ax.bar(x - 0.2, tail, 0.4, label="tail (top-k)", color="tab:red")
      ax.bar(x + 0.2, [v if v > 0 else np.nan for v in non], 0.4, label="non-tail", color="tab:gray")
      for i, (t, v, cd) in enumerate(zip(tail, non, conds)):
        ratio = cd[space]["ratio"]
        txt = "non-tail 0" if v == 0 else f"{ratio:.1f}×"
        ax.annotate(txt, (i, max(t, v)), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
      ax.set_yscale("log")
      ax.set_xticks(x, [_lambda_label(cd["tail_weight"]) for cd in conds], fontsize=7)
      what = "‖∂L_b/∂x_i‖ (input)" if space == "input" else "‖∂(w_i·NLL_i)/∂θ‖ (parameters)"
      ax.set_title(f"{cat}: {what}", fontsize=8)
      ax.set_ylabel("mean per-patch norm", fontsize=7)
      ax.margins(y=0.25)
      if c == 0:
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[r, 2]
    shares = [cd["update"]["share"] for cd in conds]
    ax.bar(x, shares, 0.5, color=[LAMBDA_COLORS[i % 5] for i in range(len(conds))])
    ax.axhline(h3["k"] / h3["n_patches"], color="k", ls=":", lw=1, label=f"k/N = {h3['k']}/{h3['n_patches']}")
    for i, s in enumerate(shares):
      ax.annotate(f"{s:.2f}", (i, s), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                  textcoords="offset points")
    ax.set_xticks(x, [_lambda_label(cd["tail_weight"]) for cd in conds], fontsize=7)
    ax.set_ylim(min(0.0, min(shares) - 0.05), 1.15)
    ax.set_title(f"{cat}: tail share of the update ⟨G_T,G⟩/‖G‖²", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[r, 3]
    for i, cd in enumerate(conds):
      g = np.asarray(cd["param_norm_BxN"], np.float64)
      g = np.sort(g, axis=1)
      tot = g.sum(1, keepdims=True)
      lor = np.concatenate([np.zeros((len(g), 1)), np.cumsum(g, 1) / np.where(tot > 0, tot, 1)], 1)
      ax.plot(np.linspace(0, 1, lor.shape[1]), lor.mean(0), color=LAMBDA_COLORS[i % 5],
              label=f"{_lambda_label(cd['tail_weight'])}, Gini {cd['param']['gini']:.2f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("fraction of patches (ascending norm)", fontsize=7)
    ax.set_ylabel("fraction of Σ‖g_i‖", fontsize=7)
    ax.set_title(f"{cat}: Lorenz curve, parameter space", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper left")
  for ax in axes.ravel():
    ax.tick_params(labelsize=7)
  fig.suptitle(f"H3 gradient concentration (k = {h3_by_cat[cats[0]]['k']} of "
               f"{h3_by_cat[cats[0]]['n_patches']} patches per image)", fontsize=10)
  fig.tight_layout()
  base_figures.save(fig, path)


def latent_calibration(path: str | Path, h7_by_cat: Mapping[str, dict]) -> None:
  """Per category: QQ plot against N(0,1) per variant, quantile errors at the tail
  percentiles, and the histogram of z of the analysed model against the N(0,1) density."""
  from scipy import stats
  cats = list(h7_by_cat)
  fig, axes = _rows(len(cats), 3)
  for r, cat in enumerate(cats):
    h7 = h7_by_cat[cat]
    ax = axes[r, 0]
    lim = 0.0
    for i, (name, cal) in enumerate(h7["first_seed_by_variant"].items()):
      ax.plot(cal["qq_theoretical"], cal["qq_empirical"], ".", ms=3, color=LAMBDA_COLORS[i % 5],
              label=f"{name}: r = {cal['qq_corr']:.4f}, std {cal['std']:.2f}")
      lim = max(lim, np.max(np.abs(cal["qq_empirical"])), np.max(np.abs(cal["qq_theoretical"])))
    ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    ax.set_xlabel("N(0,1) quantile (percentiles 1..99)", fontsize=7)
    ax.set_ylabel("empirical quantile of z", fontsize=7)
    ax.set_title(f"{cat}: QQ plot, normal test images", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper left")
    ax = axes[r, 1]
    variants = list(h7["first_seed_by_variant"])
    width = 0.8 / max(len(variants), 1)
    for i, name in enumerate(variants):
      q = h7["first_seed_by_variant"][name]["quantiles"]
      q = [e for e in q if e["percentile"] in (1, 2, 5, 95, 98, 99)]
      xs = np.arange(len(q)) + (i - (len(variants) - 1) / 2) * width
      ax.bar(xs, [e["empirical"] - e["theoretical"] for e in q], width, color=LAMBDA_COLORS[i % 5],
             label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(6), ["1%", "2%", "5%", "95%", "98%", "99%"])
    ax.set_ylabel("empirical − theoretical", fontsize=7)
    ax.set_title(f"{cat}: tail quantile errors", fontsize=8)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax = axes[r, 2]
    hist = h7["histogram"]
    edges = np.asarray(hist["edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    ax.bar(centres, hist["density"], width=np.diff(edges), color="tab:orange", alpha=0.6,
           label=f"z ({h7['analysed_variant']})")
    ax.plot(centres, stats.norm.pdf(centres), "k", lw=1, label="N(0,1)")
    ax.set_xlabel("z", fontsize=7)
    ax.set_title(f"{cat}: distribution of z", fontsize=8)
    ax.legend(fontsize=7)
  for ax in axes.ravel():
    ax.tick_params(labelsize=7)
  fig.suptitle("H7 latent calibration", fontsize=10)
  fig.tight_layout()
  base_figures.save(fig, path)


def topk_dilution(path: str | Path, h4_by_cat: Mapping[str, dict]) -> None:
  """Per category: amplification N/k, purity and effective concentration vs r, and the
  sweep's pixel AP vs r where sweep results exist."""
  cats = list(h4_by_cat)
  fig, axes = _rows(len(cats), 2, w=4.2)
  for r, cat in enumerate(cats):
    h4 = h4_by_cat[cat]
    rows = h4["dilution"]["rows"]
    ratios = [e["ratio"] for e in rows]
    ax = axes[r, 0]
    ax.plot(ratios, [e["amplification"] for e in rows], "o-", label="amplification N/k")
    ax.plot(ratios, [e["effective"] for e in rows], "s-", label="effective = purity × N/k")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("top-k ratio r", fontsize=7)
    ax.set_ylabel("concentration (×)", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(ratios, [100 * e["purity"] for e in rows], "^--", color="tab:green", label="purity (%)")
    ax2.set_ylabel("purity (%)", fontsize=7, color="tab:green")
    ax2.set_ylim(0, 105)
    ax2.tick_params(labelsize=7)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6.5, loc="lower left")
    ax.set_title(f"{cat}: top-k dilution (hard set: NLL > p{h4['dilution']['hard_percentile']:g})",
                 fontsize=8)
    ax = axes[r, 1]
    axis = h4.get("sweep_r_axis") or []
    if axis:
      xs = [e["top_k_ratio"] for e in axis]
      ax.errorbar(xs, [100 * e["mean"] for e in axis],
                  yerr=[100 * (e["std"] if np.isfinite(e["std"]) else 0) for e in axis],
                  fmt="o-", capsize=3)
      ax.set_xscale("log")
      ax.set_xlabel("top-k ratio r", fontsize=7)
      ax.set_ylabel("pixel AP (%), mean ± std over seeds", fontsize=7)
      ax.set_title(f"{cat}: sweep at λ = {h4['sweep_lambda']:g}", fontsize=8)
    else:
      ax.text(0.5, 0.5, "no sweep results over r\n(pass --sweeps=<dir>)", ha="center", va="center",
              fontsize=9, transform=ax.transAxes)
      ax.set_xticks([])
      ax.set_yticks([])
  for ax in axes.ravel():
    ax.tick_params(labelsize=7)
  fig.suptitle("H4 top-k dilution", fontsize=10)
  fig.tight_layout()
  base_figures.save(fig, path)


def tail_weight_ablation(path: str | Path, series: Mapping[str, Sequence[dict]], source: str) -> None:
  """Metric vs λ: ``series`` maps a metric name to entries with tail_weight, mean, std."""
  names = list(series)
  fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.0), squeeze=False)
  for ax, name in zip(axes[0], names):
    entries = sorted(series[name], key=lambda e: e["tail_weight"])
    ax.errorbar([e["tail_weight"] for e in entries], [100 * e["mean"] for e in entries],
                yerr=[100 * (e["std"] if np.isfinite(e["std"]) else 0) for e in entries],
                fmt="o-", capsize=3)
    ax.set_xlabel("tail weight λ", fontsize=8)
    ax.set_ylabel(f"{name} (%)", fontsize=8)
    ax.set_title(f"{name} vs λ", fontsize=9)
    ax.tick_params(labelsize=7)
  fig.suptitle(f"Tail-weight ablation ({source})", fontsize=9)
  fig.tight_layout()
  base_figures.save(fig, path)


def tail_location(path: str | Path, h1_by_cat: Mapping[str, dict]) -> None:
  """Per category: border distance of tail patches vs the exact uniform distribution, how
  often each grid cell is a tail patch, and the Sobel magnitude of tail vs non-tail cells."""
  cats = list(h1_by_cat)
  fig, axes = _rows(len(cats), 3)
  for r, cat in enumerate(cats):
    h1 = h1_by_cat[cat]
    t = h1["distance_test"]
    ax = axes[r, 0]
    v = np.asarray(t["values"])
    n = t["n"]
    ax.bar(v - 0.2, np.asarray(t["observed"]) / n, 0.4, color="tab:red", label="tail patches")
    ax.bar(v + 0.2, np.asarray(t["expected"]) / n, 0.4, color="tab:gray", label="uniform (exact)")
    ax.set_xlabel("distance to the nearest grid border (patches)", fontsize=7)
    ax.set_ylabel("fraction", fontsize=7)
    ax.set_title(f"{cat}: χ² p = {t['chi2_p']:.2g}, KS D = {t['ks_d']:.2f}", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[r, 1]
    im = ax.imshow(np.asarray(h1["tail_count_HxW"]), cmap="magma")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    ax.set_title(f"{cat}: tail count per grid cell ({h1['n_images']} images)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax = axes[r, 2]
    s = h1.get("sobel")
    if s:
      ax.bar([0, 1], [s["mean_a"], s["mean_b"]], yerr=[s["std_a"], s["std_b"]], capsize=3,
             color=["tab:red", "tab:gray"])
      ax.set_xticks([0, 1], ["tail", "non-tail"])
      ax.set_ylabel("Sobel magnitude per cell (mean ± std)", fontsize=7)
      ax.set_title(f"{cat}: ratio {s['ratio']:.3f}×, Mann-Whitney p = {s['p']:.2g}", fontsize=8)
    else:
      ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
  for ax in axes.ravel():
    ax.tick_params(labelsize=7)
  fig.suptitle("H1 where are the tail patches?", fontsize=10)
  fig.tight_layout()
  base_figures.save(fig, path)
