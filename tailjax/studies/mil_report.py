"""Study B's report and figures: ``report.md``, ``auc_vs_ratio.png`` and
``attention_bags.png`` from the per-ratio results and the verdicts (``mil_verdicts``).

Rendering only: every number shown was computed by ``mil_diagnosis`` and every
verdict by ``mil_verdicts.answers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tailjax import reporting
from tailjax.data import bags as bags_lib
from tailjax.studies.mil_verdicts import ABLATIONS
from tailjax.studies.mil_verdicts import BASELINES
from tailjax.studies.mil_verdicts import NULL_RECIPE
from tailjax.studies.mil_verdicts import max_pool_recipes
from tailjax.studies.mil_verdicts import relation_choice
from tailjax.studies.mil_verdicts import side_words

iv = reporting.interval


def ivd(ci) -> str:
  return reporting.interval(ci, signed=True)


def _both(ci, signed: bool = False) -> str:
  """``mean [seed-only CI] / [seed + test-set CI]``."""
  fmt = "+.3f" if signed else ".3f"
  return (f"{reporting.interval(ci['seed_ci'], signed=signed)} / "
          f"[{reporting.num(ci['lo'], fmt)}, {reporting.num(ci['hi'], fmt)}]")


def answer_text(config, per_ratio, ans) -> list[str]:
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  L = []
  br = ans["baseline_rule"]
  at = lambda kind, key: [r for r in ratios if br[r][key] == kind]
  L.append(f"**Do the features carry the signal?** Rule (the study's): dispersion-baseline test AUC ≥ {thr:.2f} "
           "⇒ the embeddings carry the contamination signal and a flat model AUC is the model's/training's fault; "
           f"below ⇒ the embeddings are weak. Point estimates: signal at {', '.join(at('signal', 'point')) or 'no ratio'}"
           + (f"; weak at {', '.join(at('weak', 'point'))}" if at("weak", "point") else "")
           + f". With the test-set interval (above / below {thr:.2f}): signal at "
           f"{', '.join(at('signal', 'interval')) or 'no ratio'}; weak at {', '.join(at('weak', 'interval')) or 'no ratio'}; "
           f"undetermined at {', '.join(at('undetermined', 'interval')) or 'no ratio'}. Baseline AUCs: "
           + "; ".join(f"{r} {iv(per_ratio[r]['baselines']['dispersion']['test'])}" for r in ratios) + ".")
  fl = ans["flat"]
  b = {r: per_ratio[r]["recipes"]["before"]["test"]["mean"] for r in ratios}
  L.append(f"**Is the \"before\" AUC flat?** Rule: flat if max − min of its mean test AUC over the ratios is "
           f"< {float(config.flat_range):.2f}. Here it runs from {min(b.values()):.3f} to {max(b.values()):.3f} "
           f"(spread {fl['spread']:.3f}) ⇒ **{fl['point']}**. With test-set error: AUC({fl['ends'][1]}) − "
           f"AUC({fl['ends'][0]}) = {ivd(fl['end_difference'])}; not flat if this excludes 0, flat if it lies within "
           f"±{float(config.flat_range):.2f} ⇒ **{fl['interval']}**.")
  lo = ans["loss"]
  words = {1: "higher", -1: "lower", 0: "no detectable change"}
  per = "; ".join(f"{r}: {_both(per_ratio[r]['recipes']['loss_only']['vs_before'], True)} "
                  f"({words[lo['seed_side'][r]]} / {words[lo['side'][r]]})" for r in lo["side"])
  yn = lambda x: "YES" if x else "NO"
  L.append("**Did the loss weighting (WeightedBCE, fp_weight 2) cause the low/flat AUC?** Rule: compare \"before\" "
           "with the same recipe but plain BCE (loss only changed), paired over seeds; the weighting is a cause "
           "only if the 95 % interval of (BCE − WeightedBCE) lies above 0 at a majority of ratios. Differences "
           f"(seed-only CI / seed + test-set CI): {per}. ⇒ **{yn(lo['cause_seeds'])}** over seeds; "
           f"**{yn(lo['cause'])}** with test-set error.")
  av = ans["attention_vs_baseline"]
  cnt = lambda key, v: [r for r in ratios if av[r][key] == v]
  per = "; ".join(f"{r}: {av[r]['recipe']} {iv(av[r]['test'])} vs {iv(av[r]['baseline'])}, difference "
                  f"{_both(av[r]['diff'], True)}" for r in ratios)
  L.append("**Is the plain attention-MIL itself the bottleneck?** Rule: at each ratio take the attention-MIL recipe "
           "(attention pooling) with the best mean validation AUC; it is below the no-learning baseline if the "
           "paired interval of (model − dispersion baseline) lies below 0. Here (seed-only / seed + test-set "
           f"interval of the difference): {per} ⇒ below the baseline at {len(cnt('side_seeds', -1))} of "
           f"{len(ratios)} ratios over seeds ({', '.join(cnt('side_seeds', -1)) or 'none'}), at "
           f"{len(cnt('side', -1))} with test-set error ({', '.join(cnt('side', -1)) or 'none'}).")
  g = ans["gains"]
  if g:
    txt = "; ".join(f"{k} {ivd(v)}" for k, v in g.items())
    lg = ans.get("largest_gain")
    tail = ""
    if lg and lg["runner_up"]:
      tail = (f" The largest single-change gain is **{lg['best']}**; its lead over {lg['runner_up']} is "
              f"{ivd(lg['difference'])} ⇒ **{'clear' if lg['clear'] else 'not distinguishable'}** with test-set error.")
    L.append("**Which single change matters most?** Mean paired gain over \"before\" across ratios (seed + "
             f"test-set interval; ratios have independent test sets): {txt}.{tail}")
  if "relation" in ans:
    rr = ans["relation"]
    v = lambda s: {1: "YES", -1: "NO (it is worse)", 0: "NO (not shown)"}[s]
    L.append(f"**Did the relation-aware model beat the dispersion baseline at {rr['ratio']}?** Rule: yes only if "
             "the paired interval of (model − baseline) lies above 0; the relation recipe is chosen by validation "
             f"AUC. Chosen: {rr['recipe']}; test AUC {iv(rr['test'])} vs baseline {iv(rr['baseline'])}; difference "
             f"{_both(rr['diff'], True)} ⇒ **{v(rr['side_seeds'])}** over seeds, **{v(rr['side'])}** with test-set error.")
  L.append(_contaminant_answer(per_ratio, ans))
  vi = ans["vs_instance_baseline"]
  per = "; ".join(f"{r}: " + ", ".join(f"{n} {ivd(x['diff'])} "
                                      f"({side_words(x['side'], 'beats', 'worse', 'level')})" for n, x in vi[r].items())
                  for r in ratios)
  L.append("**Does learned pooling beat the instance-level no-learning score?** Rule: model − (medoid distance, "
           "max) paired interval (seed + test set) above 0 ⇒ beats, below ⇒ worse, else level; relation recipe "
           f"chosen on validation. Here: {per}.")
  L.append(_below_chance_answer(per_ratio, ans))
  return L


def _contaminant_answer(per_ratio, ans) -> str:
  ratios = list(per_ratio)
  mark = {1: "uses", -1: "avoids", 0: "not shown"}
  parts = []
  for r in ratios:
    a = ans["instances"][r]
    models = "; ".join(f"{n} {iv(m['auroc'])} ({mark[m['uses']]}), top-1 foreign "
                       f"{100 * m['top1']['mean']:.0f} %" for n, m in a["models"].items())
    parts.append(f"{r}: {models}; medoid distance (no learning) {iv(a['baseline'])}, top-1 "
                 f"{100 * a['baseline_top1']['mean']:.0f} %; chance top-1 {100 * a['chance_top1']:.0f} %")
  uses = {n: [r for r in ratios if n in ans["instances"][r]["models"]
              and ans["instances"][r]["models"][n]["uses"] > 0] for n in ("before", "after")}
  seed_claim = ("refuted" if uses["before"] else "not refuted")
  half = [r for r in ratios if bags_lib.ratio_value(r) >= 0.5]
  caveat = (f" At {', '.join(half)} a positive bag holds as many \"foreign\" instances as native ones, so which "
            "identity is foreign is arbitrary and a relation-based score cannot exceed 0.5 there (the no-learning "
            "medoid distance shows it): the instance verdict is informative only below 50 %." if half else "")
  return ("**Does attention find the contaminants?** Rule (fixed before the run): a model \"uses the contamination "
          "signal\" at a ratio iff the seed + test-set interval of its instance AUROC — pooling weights (attention "
          "α·n; the critical-instance score for max pooling) against the foreign-instance labels, over the valid "
          "instances of the positive test bags — lies above 0.5 (\"avoids\" if below). Top-1 foreign: share of "
          f"positive test bags whose highest-weighted instance is foreign. Per ratio: {' | '.join(parts)}. "
          f"\"before\" uses the signal at {', '.join(uses['before']) or 'no ratio'}, \"after\" at "
          f"{', '.join(uses['after']) or 'no ratio'}: the seed's diagnosis \"the model is not using the "
          f"contamination signal\" is **{seed_claim}** for the study's model"
          + (f" (at {', '.join(uses['before'])})" if uses["before"] else "") + "." + caveat)


def _below_chance_answer(per_ratio, ans) -> str:
  cells = ans["below_chance"]
  null_bad = [r for r, v in ans["null"].items() if v["side"] != 0]
  shifted = [r for r, v in ans["shift"].items() if v["shifted"]]
  noise = [c for c in cells if c["side"] == 0]
  real = [c for c in cells if c["side"] < 0]
  fmt = lambda c: f"{c['recipe']}@{c['ratio']} {iv(c['test']['seed_ci'])} → {iv(c['test'])}"
  null_txt = "; ".join(f"{r} {iv(v['test'])}" for r, v in ans["null"].items())
  shift_txt = "; ".join(f"{r} {ivd(v['test_minus_train'])}" for r, v in ans["shift"].items())
  txt = ("**Are the below-chance cells noise?** Rule: a cell with mean test AUC < 0.5 is noise iff its seed + "
         "test-set interval contains 0.5; the check is trusted only if the label-permutation runs (\"before\" "
         "trained on permuted labels) give intervals containing 0.5, and a test split is shifted iff the "
         "interval of (test − train) dispersion-baseline AUC excludes 0. ")
  if not cells:
    txt += "No cell is below 0.5. "
  else:
    txt += (f"{len(cells)} cell(s) below 0.5 (seed-only CI → seed + test-set CI): "
            f"{', '.join(fmt(c) for c in cells)}. Over seeds alone "
            f"{sum(c['seed_side'] < 0 for c in cells)} of them exclude 0.5; with test-set error "
            f"{len(real)} do ({', '.join(fmt(c) for c in real) or 'none'}) ⇒ "
            f"**{len(noise)} of {len(cells)} are noise**. ")
  txt += (f"Permutation runs: {null_txt} ⇒ "
          + (f"**biased at {', '.join(null_bad)}**" if null_bad else "**all contain 0.5**")
          + f". Shift (test − train dispersion AUC): {shift_txt} ⇒ "
          + (f"**shifted at {', '.join(shifted)}**." if shifted else "**no shift detected**."))
  return txt


def _recipe_rows(recs: Mapping[str, dict]) -> list[str]:
  main = ["before", "after"] + [a for a in ABLATIONS if a in recs]
  main += [n for n in recs if n not in main and not n.startswith("fp_sweep_")]
  return main


def figure_auc(config, per_ratio, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratios = list(per_ratio)
  xs = [100 * bags_lib.ratio_value(r) for r in ratios]
  fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 6.4))
  cmap = plt.get_cmap("tab10")

  def line(a, cis, off, **kw):
    y = [c["mean"] for c in cis]
    err = np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
    a.errorbar([x + off for x in xs], y, yerr=np.nan_to_num(err), capsize=3, ms=4, **kw)

  for i, (name, style) in enumerate([("dispersion", "k--o"), ("medoid_max", "k-.s"), ("medoid_topk", "k:^")]):
    line(ax, [per_ratio[r]["baselines"][name]["test"] for r in ratios], 0.0, fmt=style, lw=1.6,
         label=_baseline_label(config, name))
  ax.axhline(float(config.baseline_threshold), color="grey", lw=0.8, ls=":")
  recs = per_ratio[ratios[0]]["recipes"]
  names = [n for n in _recipe_rows(recs) if recs[n]["model"] == "attention" or recs[n]["pooling"] == "max"]
  styles = {"before": ("tab:red", 2.2), "after": ("tab:green", 2.2)}
  for i, n in enumerate(names):
    color, lw = styles.get(n, (cmap((3 + i) % 10), 1.2))
    line(ax, [per_ratio[r]["recipes"][n]["test"] for r in ratios], 0.3 * (i - len(names) / 2), color=color,
         lw=lw, marker="o", ls="-" if n in styles else "--", label=n)
  rel = [relation_choice(per_ratio, r) for r in ratios]
  if all(rel):
    line(ax, [per_ratio[r]["recipes"][n]["test"] for r, n in zip(ratios, rel)], 0.0, color="tab:blue", lw=2.2,
         marker="s", label="relation-aware (recipe chosen on val)")
  ax.set(xlabel="contamination ratio p (%)", ylabel="bag test ROC AUC (95 % interval: seeds + test set)",
         title="Bag-level test AUC", xticks=xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)

  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in recs if n.startswith("fp_sweep_"))
  for i, r in enumerate(ratios):
    cis = [per_ratio[r]["recipes"][n]["test"] for _, n in sweep]
    off = 0.03 * (i - (len(ratios) - 1) / 2)
    err = np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
    ax2.errorbar([w + off for w, _ in sweep], [c["mean"] for c in cis], yerr=np.nan_to_num(err), marker="o",
                 ms=4, capsize=3, color=cmap(i % 10), label=r)
  ax2.set(xlabel="fp_weight (negatives' loss × (1 + fp_weight))", ylabel="bag test ROC AUC",
          title="\"before\" recipe, fp_weight sweep", xticks=[w for w, _ in sweep])
  ax2.grid(alpha=0.3)
  ax2.legend(title="ratio", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, frameon=False)

  line(ax3, [per_ratio[r]["instance_baseline"]["pool_auroc"] for r in ratios], 0.0, fmt="k--o", lw=1.6,
       label="medoid distance (no learning)")
  for i, n in enumerate(["before", "after"] + max_pool_recipes(recs)):
    if all(n in per_ratio[r]["recipes"] for r in ratios):
      line(ax3, [per_ratio[r]["recipes"][n]["instance"]["pool_auroc"] for r in ratios], 0.3 * (i - 1),
           color=styles.get(n, (cmap((6 + i) % 10), 0))[0], marker="o", lw=1.6, label=n)
  if all(rel):
    line(ax3, [per_ratio[r]["recipes"][n]["instance"]["pool_auroc"] for r, n in zip(ratios, rel)], 0.0,
         color="tab:blue", marker="s", lw=2.2, label="relation-aware (chosen on val)")
  ax3.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax3.set(xlabel="contamination ratio p (%)", ylabel="instance AUROC of pooling weights vs foreign labels",
          title="Does attention find the contaminants? (positive test bags)", xticks=xs)
  ax3.grid(alpha=0.3)
  ax3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def figure_attention(per_ratio, path: Path) -> None:
  """Instance weights of the first positive test bags (seed 0), foreign instances in red."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratios = list(per_ratio)
  rows = (["medoid distance (no learning)", "before", "after", "relation (chosen on val)"]
          + max_pool_recipes(per_ratio[ratios[0]]["recipes"]))
  fig, axes = plt.subplots(len(rows), len(ratios), figsize=(3.2 * len(ratios), 2.0 * len(rows)), squeeze=False)
  for j, r in enumerate(ratios):
    recs = per_ratio[r]["recipes"]
    for i, row in enumerate(rows):
      ax = axes[i, j]
      if row.startswith("medoid"):
        fb, ylab, label = per_ratio[r]["instance_baseline"]["figure_bags"], "distance", row
      else:
        n = relation_choice(per_ratio, r) if row.startswith("relation (") else row
        if n is None or n not in recs:
          ax.axis("off")
          continue
        fb = recs[n]["instance"]["figure_bags"]
        ylab = "α·n (1 = uniform)" if recs[n]["pooling"] == "attention" else "instance score s"
        label = row if n == row else f"{row}: {n}"
      for b, (w, f) in enumerate(zip(fb["weights"], fb["foreign"])):
        w, f = np.asarray(w), np.asarray(f) > 0
        jit = np.linspace(-0.25, 0.25, len(w))
        ax.scatter(b + jit[~f], w[~f], s=9, color="0.55", lw=0)
        ax.scatter(b + jit[f], w[f], s=22, color="tab:red", marker="D", lw=0)
      if ylab.startswith("α"):
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
      ax.set_xticks(range(len(fb["weights"])))
      ax.tick_params(labelsize=6)
      ax.set_title(f"{r} — {label}" if i else f"{r}\n{label}", fontsize=7)
      if j == 0:
        ax.set_ylabel(ylab, fontsize=7)
      if i == len(rows) - 1:
        ax.set_xlabel("positive test bag", fontsize=7)
  fig.suptitle("Instance weights in the first positive test bags (seed 0); red diamonds = foreign instances",
               fontsize=10)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def _baseline_label(config, name: str) -> str:
  return {"dispersion": "dispersion (no learning)", "medoid_max": "medoid distance, max (no learning)",
          "medoid_topk": f"medoid distance, top-{int(config.medoid_top_k)} mean (no learning)"}[name]


def write_report(config, per_ratio: Mapping[str, dict], ans: dict, data_info: dict, workdir: Path,
                 wall_s: float, computed: Sequence[str] = ()) -> str:
  """Renders report.md (answers, tables, figures) and returns its text."""
  ratios = list(per_ratio)
  recs = per_ratio[ratios[0]]["recipes"]
  main = _recipe_rows(recs)
  hdr = ["recipe"] + ratios
  L = ["# Study B diagnosis: attention-MIL on contaminated identity bags", ""]
  L.append(f"Seeds per cell: {int(config.num_seeds)}. Unless said otherwise a cell is the mean test ROC AUC over "
           "seeds with a 95 % interval that combines the seed spread and the test-set sampling error "
           "(`stats.seed_test_interval`: se² = max(se_seed² − se_inter², 0) + se_test², se_test from "
           f"{int(config.n_boot)} bootstrap resamples of the test bags stratified by label — the same resamples "
           "for every recipe, so differences are paired; se_inter², the seed × test-set interaction, is in both "
           "the seed spread and the bootstrap and is counted once — Welch–Satterthwaite t, on the logit scale of "
           "[0, 1] for an AUC or a share and of [−1, 1] for a difference, so no interval leaves its range). "
           "All recipes share each seed's initialisation, batch order and dropout masks. Wall time of "
           f"this invocation: {wall_s:.0f} s, computing {len(computed)} of {len(ratios)} ratios (the rest "
           "reused from the run record); time per ratio when computed: "
           + ", ".join(f"{r} {per_ratio[r].get('elapsed_s', float('nan')):.0f} s" for r in ratios) + ".")
  L += ["", "## Answers", ""]
  L += reporting.bullets(answer_text(config, per_ratio, ans))
  L += ["", "## Test AUC per ratio (bag level: no-learning baselines and learned pooling)", ""]
  rows = [[_baseline_label(config, b)] + [iv(per_ratio[r]["baselines"][b]["test"]) for r in ratios]
          for b in BASELINES]
  rows += [[n] + [iv(per_ratio[r]["recipes"][n]["test"]) for r in ratios] for n in main]
  L += reporting.table(hdr, rows)
  L += ["", "![AUC vs contamination ratio](auc_vs_ratio.png)", ""]

  L += ["## Baselines and pooling", "",
        "The same test bags; \"− dispersion\" is the paired difference to the study's no-learning baseline "
        "(seed + test-set interval). Attention pooling (Ilse et al.), max-instance pooling (DSMIL's critical "
        "instance: bag logit = max instance score) and the instance-level no-learning score (each instance's "
        "cosine distance to its bag's medoid, bag score = max or top-k mean).", ""]
  pooling_name = {"attention": "attention pooling", "max": "max-instance pooling"}
  pool_rows = [(b, None) for b in BASELINES] + [
      (n, f"{pooling_name[recs[n]['pooling']]}, {recs[n]['model']} model ({n})")
      for n in ["after", "relation_after"] + max_pool_recipes(recs) if n in recs]
  rows = []
  for key, label in pool_rows:
    if label is None:
      rows.append([_baseline_label(config, key)] + [iv(per_ratio[r]["baselines"][key]["test"]) for r in ratios])
    elif key in recs:
      rows.append([label] + [iv(per_ratio[r]["recipes"][key]["test"]) for r in ratios])
      rows.append([f"{label} − dispersion"] + [ivd(per_ratio[r]["recipes"][key]["vs_dispersion"]) for r in ratios])
  L += reporting.table(hdr, rows)
  L.append("")

  L += ["## Instance level: does attention find the contaminants?", "",
        "Instance AUROC over the valid instances of the positive test bags, foreign = positive; interval over "
        "seeds + a cluster bootstrap over positive test bags. *Pooling weights*: attention α·n (the critical-"
        "instance score for max pooling); *instance scores*: the classifier applied to each instance, "
        "s_i = cᵀh_i + b (for attention pooling the bag logit is Σ α_i s_i). Rule: uses the contamination signal "
        "iff the interval lies above 0.5. At 50 % the two identities of a positive bag are equally many: "
        "\"foreign\" is then a label without a relation behind it, and 0.5 is expected.", ""]
  rows = [["medoid distance (no learning)"] + [iv(per_ratio[r]["instance_baseline"]["pool_auroc"]) for r in ratios]]
  for n in main:
    rows.append([f"{n}: pooling weights"] + [iv(per_ratio[r]["recipes"][n]["instance"]["pool_auroc"])
                                             for r in ratios])
  for n in main:
    if recs[n]["model"] == "relation" or recs[n]["pooling"] == "max" or n in ("before", "after"):
      rows.append([f"{n}: instance scores"] + [iv(per_ratio[r]["recipes"][n]["instance"]["score_auroc"])
                                               for r in ratios])
  L += reporting.table(["instance AUROC"] + ratios, rows)
  L += ["", "Share of positive test bags whose highest-weighted instance is foreign (chance = mean foreign "
        "fraction of a bag):", ""]
  pct = lambda c: reporting.interval(c, scale=100, digits=0)
  rows = [["chance"] + [f"{100 * per_ratio[r]['chance_top1']:.0f}" for r in ratios],
          ["medoid distance (no learning)"] + [pct(per_ratio[r]["instance_baseline"]["top1"]) for r in ratios]]
  rows += [[n] + [pct(per_ratio[r]["recipes"][n]["instance"]["top1"]) for r in ratios] for n in main]
  L += reporting.table(["top-1 foreign (%)"] + ratios, rows)
  L += ["", "![attention vs instance label](attention_bags.png)", ""]

  L += ["## Paired difference vs \"before\"", "",
        "Cells: mean [seed-only t-interval] / [seed + test-set interval].", ""]
  L += reporting.table(hdr, [[f"{n} − before"] + [_both(per_ratio[r]["recipes"][n]["vs_before"], True)
                                                  for r in ratios] for n in main[1:]])
  L.append("")
  L += ["## Uncertainty components", "",
        "Standard errors of each test-AUC cell: seed / test set (bootstrap over test bags). Where the test-set "
        "term dominates, an interval over seeds alone is too narrow.", ""]
  se = lambda c: f"{reporting.num(c['se_seed'], '.3f')} / {reporting.num(c['se_test'], '.3f')}"
  rows = [[_baseline_label(config, b)] + [se(per_ratio[r]["baselines"][b]["test"]) for r in ratios]
          for b in BASELINES]
  rows += [[n] + [se(per_ratio[r]["recipes"][n]["test"]) for r in ratios] for n in main]
  L += reporting.table(hdr, rows)
  L.append("")

  L += ["## Chance-level checks", "",
        f"*Permutation runs*: the \"{NULL_RECIPE}\" recipe trained on permuted training and validation labels "
        f"({int(config.permutation_runs)} runs, one permutation and seed each); *shift*: the dispersion "
        "baseline's AUC on each split's bags (it needs no training, so the splits should agree).", ""]
  rows = [["permutation runs: test AUC"] + [iv(per_ratio[r]["null"]["test"]) for r in ratios]]
  for s in bags_lib.SPLITS:
    rows.append([f"dispersion AUC, {s} bags"] + [iv(per_ratio[r]["shift"]["dispersion_auc"][s]) for r in ratios])
  rows.append(["test − train"] + [ivd(per_ratio[r]["shift"]["test_minus_train"]) for r in ratios])
  L += reporting.table(["check"] + ratios, rows)
  L.append("")

  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in recs if n.startswith("fp_sweep_"))
  if sweep:
    L += ["## fp_weight sweep (\"before\" recipe, only fp_weight changed; 0 = plain BCE)", ""]
    L += reporting.table(["fp_weight"] + ratios, [[f"{w:g}"] + [iv(per_ratio[r]["recipes"][n]["test"])
                                                               for r in ratios] for w, n in sweep])
    L.append("")
  L.append("Verdict rules were fixed before the run (module docstring of `tailjax/studies/mil_diagnosis.py`); "
           "recipes are chosen on validation AUC; nothing was tuned on the test set.")
  L += ["", "## Recipes", ""]
  rows = []
  for n, v in recs.items():
    h = v["hparams"]
    loss = "WeightedBCE" if h["fp_weight"] > 0 else f"BCE (pos_weight {h['pos_weight']:.2f})"
    rows.append([n, v["model"], v["pooling"], v["layer_norm"], loss, f"{h['fp_weight']:g}",
                 f"{h['learning_rate']:g}", h["epochs"], h["patience"], f"{np.mean(v['epochs_run']):.1f}"])
  L += reporting.table(["recipe", "model", "pooling", "LayerNorm", "loss", "fp_weight", "lr", "epochs",
                        "patience", "mean epochs run (first ratio)"], rows)
  L += ["", "## Data", ""]
  L.append(f"Source: {data_info.get('source', '?')}. Bag size {data_info.get('bag_size')}, positive fraction "
           f"{data_info.get('positive_fraction')}, instance pools (split before bagging) "
           f"{data_info.get('pool_sizes')}.")
  q = data_info.get("heldout_quality")
  if q:
    L.append(f"Bag identities {q['identities']}: mean cosine within identity {q['intra_cos']:.3f}, between "
             f"{q['inter_cos']:.3f}; leave-one-out nearest-centroid identity accuracy {q['ncc_accuracy']:.3f}.")
  L.append("")
  rows = []
  for r in ratios:
    si = per_ratio[r]["split_info"]
    rows.append([r] + [f"{si[s]['count']}/{si[s]['positives']}" for s in bags_lib.SPLITS]
                + [reporting.num(per_ratio[r]["baselines"]["dispersion"]["val_auc"], ".3f")])
  L += reporting.table(["ratio"] + [f"{s} count/positives" for s in bags_lib.SPLITS] + ["val AUC baseline"], rows)
  return reporting.write_markdown(workdir / "report.md", L)
