"""Study B's report as one pipeline: the per-ratio results and the verdicts become one
``Conclusions`` (``conclusions``), the report's sections are functions of it
(``SECTIONS``, in order; the answer paragraphs in ``ANSWERS``), and ``write`` writes
``report.md``, ``results.json`` and the figures (``auc_vs_ratio.png``,
``attention_bags.png``) in one pass.

Rendering only: every number shown was computed by ``mil_diagnosis`` and every
verdict by ``mil_verdicts.answers``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from tailjax import io as tio
from tailjax import reporting
from tailjax.data import bags as bags_lib
from tailjax.studies.mil_verdicts import ABLATIONS
from tailjax.studies.mil_verdicts import BASELINES
from tailjax.studies.mil_verdicts import NULL_RECIPE
from tailjax.studies.mil_verdicts import max_pool_recipes
from tailjax.studies.mil_verdicts import relation_choice
from tailjax.studies.mil_verdicts import side_words

iv = reporting.interval
FP_SWEEP_PREFIX = "fp_sweep_"


def ivd(ci) -> str:
  return reporting.interval(ci, signed=True)


def _both(ci, signed: bool = False) -> str:
  """``mean [seed-only CI] / [seed + test-set CI]``."""
  fmt = "+.3f" if signed else ".3f"
  return (f"{reporting.interval(ci['seed_ci'], signed=signed)} / "
          f"[{reporting.num(ci['lo'], fmt)}, {reporting.num(ci['hi'], fmt)}]")


# ----------------------------------------------------------------------------
# Conclusions: everything the report shows, gathered once
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Conclusions:
  """What the report, the JSON and the figures show.

  ``per_ratio``: each ratio's JSON-ready unit (``mil_diagnosis.diagnose_ratio``);
  ``answers``: ``mil_verdicts.answers`` of them; ``computed``: the ratios this
  invocation computed (the rest came from the run record); ``recipes``: the first
  ratio's recipe entries (every ratio trains the same recipes); ``table_recipes``:
  the recipes the tables list ("before", "after", the one-change ablations, the rest;
  not the fp_weight sweep); ``fp_sweep``: ``(fp_weight, recipe name)`` by weight;
  ``relation``: per ratio the relation-aware recipe chosen on validation AUC (None
  when the config has none). The remaining fields are the config settings the report
  quotes and its verdict rules use.
  """
  per_ratio: Mapping[str, dict]
  answers: dict
  data_info: dict
  wall_s: float
  computed: tuple[str, ...]
  ratios: tuple[str, ...]
  recipes: Mapping[str, dict]
  table_recipes: tuple[str, ...]
  fp_sweep: tuple[tuple[float, str], ...]
  relation: Mapping[str, str | None]
  num_seeds: int
  n_boot: int
  permutation_runs: int
  baseline_threshold: float
  flat_range: float
  medoid_top_k: int


def _table_recipes(recipes: Mapping[str, dict]) -> list[str]:
  names = ["before", "after"] + [a for a in ABLATIONS if a in recipes]
  return names + [n for n in recipes if n not in names and not n.startswith(FP_SWEEP_PREFIX)]


def conclusions(config, per_ratio: Mapping[str, dict], answers: dict, data_info: dict,
                wall_s: float, computed: Sequence[str] = ()) -> Conclusions:
  """The run's ``Conclusions``: ``per_ratio`` as stored in the run record, ``answers``
  from ``mil_verdicts.answers``, ``wall_s`` this invocation's wall time."""
  ratios = tuple(per_ratio)
  recipes = per_ratio[ratios[0]]["recipes"]
  sweep = sorted((float(n[len(FP_SWEEP_PREFIX):]), n) for n in recipes if n.startswith(FP_SWEEP_PREFIX))
  return Conclusions(
      per_ratio=per_ratio, answers=answers, data_info=data_info, wall_s=wall_s,
      computed=tuple(computed), ratios=ratios, recipes=recipes,
      table_recipes=tuple(_table_recipes(recipes)), fp_sweep=tuple(sweep),
      relation={r: relation_choice(per_ratio, r) for r in ratios},
      num_seeds=int(config.num_seeds), n_boot=int(config.n_boot),
      permutation_runs=int(config.permutation_runs),
      baseline_threshold=float(config.baseline_threshold), flat_range=float(config.flat_range),
      medoid_top_k=int(config.medoid_top_k))


def _baseline(c: Conclusions, ratio: str, name: str) -> dict:
  return c.per_ratio[ratio]["baselines"][name]


def _recipe(c: Conclusions, ratio: str, name: str) -> dict:
  return c.per_ratio[ratio]["recipes"][name]


def _row(c: Conclusions, label: str, cell: Callable[[str], str]) -> list[str]:
  """A table row: ``label`` and one cell per ratio."""
  return [label] + [cell(r) for r in c.ratios]


def _baseline_label(c: Conclusions, name: str) -> str:
  return {"dispersion": "dispersion (no learning)", "medoid_max": "medoid distance, max (no learning)",
          "medoid_topk": f"medoid distance, top-{c.medoid_top_k} mean (no learning)"}[name]


def _names(ratios: Sequence[str], none: str = "no ratio") -> str:
  return ", ".join(ratios) or none


# ----------------------------------------------------------------------------
# Answers: one paragraph per question (``ANSWERS``)
# ----------------------------------------------------------------------------


def _answer_features(c: Conclusions) -> str:
  thr, br = c.baseline_threshold, c.answers["baseline_rule"]
  at = lambda kind, key: [r for r in c.ratios if br[r][key] == kind]
  return (f"**Do the features carry the signal?** Rule (the study's): dispersion-baseline test AUC ≥ {thr:.2f} "
          "⇒ the embeddings carry the contamination signal and a flat model AUC is the model's/training's fault; "
          f"below ⇒ the embeddings are weak. Point estimates: signal at {_names(at('signal', 'point'))}"
          + (f"; weak at {', '.join(at('weak', 'point'))}" if at("weak", "point") else "")
          + f". With the test-set interval (above / below {thr:.2f}): signal at "
          f"{_names(at('signal', 'interval'))}; weak at {_names(at('weak', 'interval'))}; "
          f"undetermined at {_names(at('undetermined', 'interval'))}. Baseline AUCs: "
          + "; ".join(f"{r} {iv(_baseline(c, r, 'dispersion')['test'])}" for r in c.ratios) + ".")


def _answer_flat(c: Conclusions) -> str:
  fl = c.answers["flat"]
  b = {r: _recipe(c, r, "before")["test"]["mean"] for r in c.ratios}
  return (f"**Is the \"before\" AUC flat?** Rule: flat if max − min of its mean test AUC over the ratios is "
          f"< {c.flat_range:.2f}. Here it runs from {min(b.values()):.3f} to {max(b.values()):.3f} "
          f"(spread {fl['spread']:.3f}) ⇒ **{fl['point']}**. With test-set error: AUC({fl['ends'][1]}) − "
          f"AUC({fl['ends'][0]}) = {ivd(fl['end_difference'])}; not flat if this excludes 0, flat if it lies within "
          f"±{c.flat_range:.2f} ⇒ **{fl['interval']}**.")


def _yes_no(x: bool) -> str:
  return "YES" if x else "NO"


def _answer_loss(c: Conclusions) -> str:
  lo = c.answers["loss"]
  words = {1: "higher", -1: "lower", 0: "no detectable change"}
  per = "; ".join(f"{r}: {_both(_recipe(c, r, 'loss_only')['vs_before'], True)} "
                  f"({words[lo['seed_side'][r]]} / {words[lo['side'][r]]})" for r in lo["side"])
  return ("**Did the loss weighting (WeightedBCE, fp_weight 2) cause the low/flat AUC?** Rule: compare \"before\" "
          "with the same recipe but plain BCE (loss only changed), paired over seeds; the weighting is a cause "
          "only if the 95 % interval of (BCE − WeightedBCE) lies above 0 at a majority of ratios. Differences "
          f"(seed-only CI / seed + test-set CI): {per}. ⇒ **{_yes_no(lo['cause_seeds'])}** over seeds; "
          f"**{_yes_no(lo['cause'])}** with test-set error.")


def _answer_attention(c: Conclusions) -> str:
  av = c.answers["attention_vs_baseline"]
  below = lambda key: [r for r in c.ratios if av[r][key] == -1]
  per = "; ".join(f"{r}: {av[r]['recipe']} {iv(av[r]['test'])} vs {iv(av[r]['baseline'])}, difference "
                  f"{_both(av[r]['diff'], True)}" for r in c.ratios)
  return ("**Is the plain attention-MIL itself the bottleneck?** Rule: at each ratio take the attention-MIL recipe "
          "(attention pooling) with the best mean validation AUC; it is below the no-learning baseline if the "
          "paired interval of (model − dispersion baseline) lies below 0. Here (seed-only / seed + test-set "
          f"interval of the difference): {per} ⇒ below the baseline at {len(below('side_seeds'))} of "
          f"{len(c.ratios)} ratios over seeds ({_names(below('side_seeds'), 'none')}), at "
          f"{len(below('side'))} with test-set error ({_names(below('side'), 'none')}).")


def _answer_gains(c: Conclusions) -> str | None:
  g = c.answers["gains"]
  if not g:
    return None
  txt = "; ".join(f"{k} {ivd(v)}" for k, v in g.items())
  lg = c.answers.get("largest_gain")
  tail = ""
  if lg and lg["runner_up"]:
    tail = (f" The largest single-change gain is **{lg['best']}**; its lead over {lg['runner_up']} is "
            f"{ivd(lg['difference'])} ⇒ **{'clear' if lg['clear'] else 'not distinguishable'}** with test-set error.")
  return ("**Which single change matters most?** Mean paired gain over \"before\" across ratios (seed + "
          f"test-set interval; ratios have independent test sets): {txt}.{tail}")


def _answer_relation(c: Conclusions) -> str | None:
  if "relation" not in c.answers:
    return None
  rr = c.answers["relation"]
  v = lambda s: {1: "YES", -1: "NO (it is worse)", 0: "NO (not shown)"}[s]
  return (f"**Did the relation-aware model beat the dispersion baseline at {rr['ratio']}?** Rule: yes only if "
          "the paired interval of (model − baseline) lies above 0; the relation recipe is chosen by validation "
          f"AUC. Chosen: {rr['recipe']}; test AUC {iv(rr['test'])} vs baseline {iv(rr['baseline'])}; difference "
          f"{_both(rr['diff'], True)} ⇒ **{v(rr['side_seeds'])}** over seeds, **{v(rr['side'])}** with test-set error.")


def _answer_contaminants(c: Conclusions) -> str:
  instances = c.answers["instances"]
  mark = {1: "uses", -1: "avoids", 0: "not shown"}
  parts = []
  for r in c.ratios:
    a = instances[r]
    models = "; ".join(f"{n} {iv(m['auroc'])} ({mark[m['uses']]}), top-1 foreign "
                       f"{100 * m['top1']['mean']:.0f} %" for n, m in a["models"].items())
    parts.append(f"{r}: {models}; medoid distance (no learning) {iv(a['baseline'])}, top-1 "
                 f"{100 * a['baseline_top1']['mean']:.0f} %; chance top-1 {100 * a['chance_top1']:.0f} %")
  uses = {n: [r for r in c.ratios if n in instances[r]["models"] and instances[r]["models"][n]["uses"] > 0]
          for n in ("before", "after")}
  claim = "refuted" if uses["before"] else "not refuted"
  half = [r for r in c.ratios if bags_lib.ratio_value(r) >= 0.5]
  caveat = (f" At {', '.join(half)} a positive bag holds as many \"foreign\" instances as native ones, so which "
            "identity is foreign is arbitrary and a relation-based score cannot exceed 0.5 there (the no-learning "
            "medoid distance shows it): the instance verdict is informative only below 50 %." if half else "")
  return ("**Does attention find the contaminants?** Rule (fixed before the run): a model \"uses the contamination "
          "signal\" at a ratio iff the seed + test-set interval of its instance AUROC — pooling weights (attention "
          "α·n; the critical-instance score for max pooling) against the foreign-instance labels, over the valid "
          "instances of the positive test bags — lies above 0.5 (\"avoids\" if below). Top-1 foreign: share of "
          f"positive test bags whose highest-weighted instance is foreign. Per ratio: {' | '.join(parts)}. "
          f"\"before\" uses the signal at {_names(uses['before'])}, \"after\" at "
          f"{_names(uses['after'])}: the original study's diagnosis \"the model is not using the "
          f"contamination signal\" is **{claim}** for the study's model"
          + (f" (at {', '.join(uses['before'])})" if uses["before"] else "") + "." + caveat)


def _answer_instance_baseline(c: Conclusions) -> str:
  vi = c.answers["vs_instance_baseline"]
  per = "; ".join(f"{r}: " + ", ".join(f"{n} {ivd(x['diff'])} "
                                      f"({side_words(x['side'], 'beats', 'worse', 'level')})" for n, x in vi[r].items())
                  for r in c.ratios)
  return ("**Does learned pooling beat the instance-level no-learning score?** Rule: model − (medoid distance, "
          "max) paired interval (seed + test set) above 0 ⇒ beats, below ⇒ worse, else level; relation recipe "
          f"chosen on validation. Here: {per}.")


def _answer_below_chance(c: Conclusions) -> str:
  ans = c.answers
  cells = ans["below_chance"]
  null_bad = [r for r, v in ans["null"].items() if v["side"] != 0]
  shifted = [r for r, v in ans["shift"].items() if v["shifted"]]
  noise = [x for x in cells if x["side"] == 0]
  real = [x for x in cells if x["side"] < 0]
  fmt = lambda x: f"{x['recipe']}@{x['ratio']} {iv(x['test']['seed_ci'])} → {iv(x['test'])}"
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
            f"{', '.join(fmt(x) for x in cells)}. Over seeds alone "
            f"{sum(x['seed_side'] < 0 for x in cells)} of them exclude 0.5; with test-set error "
            f"{len(real)} do ({', '.join(fmt(x) for x in real) or 'none'}) ⇒ "
            f"**{len(noise)} of {len(cells)} are noise**. ")
  txt += (f"Permutation runs: {null_txt} ⇒ "
          + (f"**biased at {', '.join(null_bad)}**" if null_bad else "**all contain 0.5**")
          + f". Shift (test − train dispersion AUC): {shift_txt} ⇒ "
          + (f"**shifted at {', '.join(shifted)}**." if shifted else "**no shift detected**."))
  return txt


# The answer paragraphs, in report order; a function returns None when its question
# does not arise in this run (no one-change ablations, no relation-aware recipe).
ANSWERS: tuple[Callable[[Conclusions], str | None], ...] = (
    _answer_features, _answer_flat, _answer_loss, _answer_attention, _answer_gains,
    _answer_relation, _answer_contaminants, _answer_instance_baseline, _answer_below_chance)


def answer_text(c: Conclusions) -> list[str]:
  """The answer paragraphs (``ANSWERS``) that apply to this run."""
  return [t for t in (answer(c) for answer in ANSWERS) if t is not None]


# ----------------------------------------------------------------------------
# Report sections: each returns its lines, ending with a blank line (``SECTIONS``)
# ----------------------------------------------------------------------------


def _title(c: Conclusions) -> list[str]:
  per_ratio_s = ", ".join(f"{r} {c.per_ratio[r].get('elapsed_s', float('nan')):.0f} s" for r in c.ratios)
  return ["# Study B diagnosis: attention-MIL on contaminated identity bags", "",
          f"Seeds per cell: {c.num_seeds}. Unless said otherwise a cell is the mean test ROC AUC over "
          "seeds with a 95 % interval that combines the seed spread and the test-set sampling error "
          "(`stats.seed_test_interval`: se² = max(se_seed² − se_inter², 0) + se_test², se_test from "
          f"{c.n_boot} bootstrap resamples of the test bags stratified by label — the same resamples "
          "for every recipe, so differences are paired; se_inter², the seed × test-set interaction, is in both "
          "the seed spread and the bootstrap and is counted once — Welch–Satterthwaite t, on the logit scale of "
          "[0, 1] for an AUC or a share and of [−1, 1] for a difference, so no interval leaves its range). "
          "All recipes share each seed's initialisation, batch order and dropout masks. Wall time of "
          f"this invocation: {c.wall_s:.0f} s, computing {len(c.computed)} of {len(c.ratios)} ratios (the rest "
          "reused from the run record); time per ratio when computed: " + per_ratio_s + ".", ""]


def _answers(c: Conclusions) -> list[str]:
  return ["## Answers", "", *reporting.bullets(answer_text(c)), ""]


def _test_auc(c: Conclusions) -> list[str]:
  table_rows = [_row(c, _baseline_label(c, b), lambda r: iv(_baseline(c, r, b)["test"])) for b in BASELINES]
  table_rows += [_row(c, n, lambda r: iv(_recipe(c, r, n)["test"])) for n in c.table_recipes]
  return ["## Test AUC per ratio (bag level: no-learning baselines and learned pooling)", "",
          *reporting.table(["recipe", *c.ratios], table_rows), "",
          "![AUC vs contamination ratio](auc_vs_ratio.png)", ""]


def _baselines_and_pooling(c: Conclusions) -> list[str]:
  pooling_name = {"attention": "attention pooling", "max": "max-instance pooling"}
  table_rows = [_row(c, _baseline_label(c, b), lambda r: iv(_baseline(c, r, b)["test"])) for b in BASELINES]
  for n in ["after", "relation_after"] + max_pool_recipes(c.recipes):
    if n in c.recipes:
      label = f"{pooling_name[c.recipes[n]['pooling']]}, {c.recipes[n]['model']} model ({n})"
      table_rows.append(_row(c, label, lambda r: iv(_recipe(c, r, n)["test"])))
      table_rows.append(_row(c, f"{label} − dispersion", lambda r: ivd(_recipe(c, r, n)["vs_dispersion"])))
  return ["## Baselines and pooling", "",
          "The same test bags; \"− dispersion\" is the paired difference to the study's no-learning baseline "
          "(seed + test-set interval). Attention pooling (Ilse et al.), max-instance pooling (DSMIL's critical "
          "instance: bag logit = max instance score) and the instance-level no-learning score (each instance's "
          "cosine distance to its bag's medoid, bag score = max or top-k mean).", "",
          *reporting.table(["recipe", *c.ratios], table_rows), ""]


def _instance_level(c: Conclusions) -> list[str]:
  base = lambda r: c.per_ratio[r]["instance_baseline"]
  inst = lambda r, n: _recipe(c, r, n)["instance"]
  auroc_rows = [_row(c, "medoid distance (no learning)", lambda r: iv(base(r)["pool_auroc"]))]
  auroc_rows += [_row(c, f"{n}: pooling weights", lambda r: iv(inst(r, n)["pool_auroc"]))
                 for n in c.table_recipes]
  auroc_rows += [_row(c, f"{n}: instance scores", lambda r: iv(inst(r, n)["score_auroc"]))
                 for n in c.table_recipes
                 if c.recipes[n]["model"] == "relation" or c.recipes[n]["pooling"] == "max"
                 or n in ("before", "after")]
  pct = lambda ci: reporting.interval(ci, scale=100, digits=0)
  top1_rows = [_row(c, "chance", lambda r: f"{100 * c.per_ratio[r]['chance_top1']:.0f}"),
               _row(c, "medoid distance (no learning)", lambda r: pct(base(r)["top1"]))]
  top1_rows += [_row(c, n, lambda r: pct(inst(r, n)["top1"])) for n in c.table_recipes]
  return ["## Instance level: does attention find the contaminants?", "",
          "Instance AUROC over the valid instances of the positive test bags, foreign = positive; interval over "
          "seeds + a cluster bootstrap over positive test bags. *Pooling weights*: attention α·n (the critical-"
          "instance score for max pooling); *instance scores*: the classifier applied to each instance, "
          "s_i = cᵀh_i + b (for attention pooling the bag logit is Σ α_i s_i). Rule: uses the contamination signal "
          "iff the interval lies above 0.5. At 50 % the two identities of a positive bag are equally many: "
          "\"foreign\" is then a label without a relation behind it, and 0.5 is expected.", "",
          *reporting.table(["instance AUROC", *c.ratios], auroc_rows), "",
          "Share of positive test bags whose highest-weighted instance is foreign (chance = mean foreign "
          "fraction of a bag):", "",
          *reporting.table(["top-1 foreign (%)", *c.ratios], top1_rows), "",
          "![attention vs instance label](attention_bags.png)", ""]


def _paired_vs_before(c: Conclusions) -> list[str]:
  table_rows = [_row(c, f"{n} − before", lambda r: _both(_recipe(c, r, n)["vs_before"], True))
                for n in c.table_recipes[1:]]
  return ["## Paired difference vs \"before\"", "",
          "Cells: mean [seed-only t-interval] / [seed + test-set interval].", "",
          *reporting.table(["recipe", *c.ratios], table_rows), ""]


def _uncertainty(c: Conclusions) -> list[str]:
  se = lambda ci: f"{reporting.num(ci['se_seed'], '.3f')} / {reporting.num(ci['se_test'], '.3f')}"
  table_rows = [_row(c, _baseline_label(c, b), lambda r: se(_baseline(c, r, b)["test"])) for b in BASELINES]
  table_rows += [_row(c, n, lambda r: se(_recipe(c, r, n)["test"])) for n in c.table_recipes]
  return ["## Uncertainty components", "",
          "Standard errors of each test-AUC cell: seed / test set (bootstrap over test bags). Where the test-set "
          "term dominates, an interval over seeds alone is too narrow.", "",
          *reporting.table(["recipe", *c.ratios], table_rows), ""]


def _chance_checks(c: Conclusions) -> list[str]:
  shift = lambda r: c.per_ratio[r]["shift"]
  table_rows = [_row(c, "permutation runs: test AUC", lambda r: iv(c.per_ratio[r]["null"]["test"]))]
  table_rows += [_row(c, f"dispersion AUC, {s} bags", lambda r: iv(shift(r)["dispersion_auc"][s]))
                 for s in bags_lib.SPLITS]
  table_rows.append(_row(c, "test − train", lambda r: ivd(shift(r)["test_minus_train"])))
  return ["## Chance-level checks", "",
          f"*Permutation runs*: the \"{NULL_RECIPE}\" recipe trained on permuted training and validation labels "
          f"({c.permutation_runs} runs, one permutation and seed each); *shift*: the dispersion "
          "baseline's AUC on each split's bags (it needs no training, so the splits should agree).", "",
          *reporting.table(["check", *c.ratios], table_rows), ""]


def _fp_weight_sweep(c: Conclusions) -> list[str]:
  if not c.fp_sweep:
    return []
  table_rows = [_row(c, f"{w:g}", lambda r: iv(_recipe(c, r, n)["test"])) for w, n in c.fp_sweep]
  return ["## fp_weight sweep (\"before\" recipe, only fp_weight changed; 0 = plain BCE)", "",
          *reporting.table(["fp_weight", *c.ratios], table_rows), ""]


def _rules_note(c: Conclusions) -> list[str]:
  del c
  return ["Verdict rules were fixed before the run (module docstring of `tailjax/studies/mil_diagnosis.py`); "
          "recipes are chosen on validation AUC; nothing was tuned on the test set.", ""]


def _recipe_table(c: Conclusions) -> list[str]:
  table_rows = []
  for n, v in c.recipes.items():
    h = v["hparams"]
    loss = "WeightedBCE" if h["fp_weight"] > 0 else f"BCE (pos_weight {h['pos_weight']:.2f})"
    table_rows.append([n, v["model"], v["pooling"], v["layer_norm"], loss, f"{h['fp_weight']:g}",
                       f"{h['learning_rate']:g}", h["epochs"], h["patience"], f"{np.mean(v['epochs_run']):.1f}"])
  header = ["recipe", "model", "pooling", "LayerNorm", "loss", "fp_weight", "lr", "epochs", "patience",
            "mean epochs run (first ratio)"]
  return ["## Recipes", "", *reporting.table(header, table_rows), ""]


def _data(c: Conclusions) -> list[str]:
  info = c.data_info
  lines = ["## Data", "",
           f"Source: {info.get('source', '?')}. Bag size {info.get('bag_size')}, positive fraction "
           f"{info.get('positive_fraction')}, instance pools (split before bagging) {info.get('pool_sizes')}."]
  q = info.get("heldout_quality")
  if q:
    lines.append(f"Bag identities {q['identities']}: mean cosine within identity {q['intra_cos']:.3f}, between "
                 f"{q['inter_cos']:.3f}; leave-one-out nearest-centroid identity accuracy {q['ncc_accuracy']:.3f}.")
  table_rows = []
  for r in c.ratios:
    split_info = c.per_ratio[r]["split_info"]
    table_rows.append([r] + [f"{split_info[s]['count']}/{split_info[s]['positives']}" for s in bags_lib.SPLITS]
                      + [reporting.num(_baseline(c, r, "dispersion")["val_auc"], ".3f")])
  header = ["ratio"] + [f"{s} count/positives" for s in bags_lib.SPLITS] + ["val AUC baseline"]
  return lines + ["", *reporting.table(header, table_rows)]


# The report, in order.
SECTIONS: tuple[Callable[[Conclusions], list[str]], ...] = (
    _title, _answers, _test_auc, _baselines_and_pooling, _instance_level, _paired_vs_before,
    _uncertainty, _chance_checks, _fp_weight_sweep, _rules_note, _recipe_table, _data)


def report_lines(c: Conclusions) -> list[str]:
  """``report.md`` as lines: the ``SECTIONS`` one after another."""
  return [line for section in SECTIONS for line in section(c)]


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------


def _errorbar(ax, xs, cis, off, **kw) -> None:
  """Means at ``xs + off`` with their interval as asymmetric error bars (none where undefined)."""
  y = [ci["mean"] for ci in cis]
  err = np.array([[ci["mean"] - ci["lo"] for ci in cis], [ci["hi"] - ci["mean"] for ci in cis]])
  ax.errorbar([x + off for x in xs], y, yerr=np.nan_to_num(err), capsize=3, ms=4, **kw)


_STYLES = {"before": ("tab:red", 2.2), "after": ("tab:green", 2.2)}


def _panel_bag_auc(c: Conclusions, ax, xs, cmap) -> None:
  for name, style in [("dispersion", "k--o"), ("medoid_max", "k-.s"), ("medoid_topk", "k:^")]:
    _errorbar(ax, xs, [_baseline(c, r, name)["test"] for r in c.ratios], 0.0, fmt=style, lw=1.6,
              label=_baseline_label(c, name))
  ax.axhline(c.baseline_threshold, color="grey", lw=0.8, ls=":")
  names = [n for n in c.table_recipes if c.recipes[n]["model"] == "attention" or c.recipes[n]["pooling"] == "max"]
  for i, n in enumerate(names):
    color, lw = _STYLES.get(n, (cmap((3 + i) % 10), 1.2))
    _errorbar(ax, xs, [_recipe(c, r, n)["test"] for r in c.ratios], 0.3 * (i - len(names) / 2), color=color,
              lw=lw, marker="o", ls="-" if n in _STYLES else "--", label=n)
  if all(c.relation.values()):
    _errorbar(ax, xs, [_recipe(c, r, c.relation[r])["test"] for r in c.ratios], 0.0, color="tab:blue", lw=2.2,
              marker="s", label="relation-aware (recipe chosen on val)")
  ax.set(xlabel="contamination ratio p (%)", ylabel="bag test ROC AUC (95 % interval: seeds + test set)",
         title="Bag-level test AUC", xticks=xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)


def _panel_fp_sweep(c: Conclusions, ax, cmap) -> None:
  weights = [w for w, _ in c.fp_sweep]
  for i, r in enumerate(c.ratios):
    off = 0.03 * (i - (len(c.ratios) - 1) / 2)
    _errorbar(ax, weights, [_recipe(c, r, n)["test"] for _, n in c.fp_sweep], off, marker="o",
              color=cmap(i % 10), label=r)
  ax.set(xlabel="fp_weight (negatives' loss × (1 + fp_weight))", ylabel="bag test ROC AUC",
         title="\"before\" recipe, fp_weight sweep", xticks=weights)
  ax.grid(alpha=0.3)
  ax.legend(title="ratio", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, frameon=False)


def _panel_instances(c: Conclusions, ax, xs, cmap) -> None:
  _errorbar(ax, xs, [c.per_ratio[r]["instance_baseline"]["pool_auroc"] for r in c.ratios], 0.0, fmt="k--o",
            lw=1.6, label="medoid distance (no learning)")
  for i, n in enumerate(["before", "after"] + max_pool_recipes(c.recipes)):
    if all(n in c.per_ratio[r]["recipes"] for r in c.ratios):
      _errorbar(ax, xs, [_recipe(c, r, n)["instance"]["pool_auroc"] for r in c.ratios], 0.3 * (i - 1),
                color=_STYLES.get(n, (cmap((6 + i) % 10), 0))[0], marker="o", lw=1.6, label=n)
  if all(c.relation.values()):
    _errorbar(ax, xs, [_recipe(c, r, c.relation[r])["instance"]["pool_auroc"] for r in c.ratios], 0.0,
              color="tab:blue", marker="s", lw=2.2, label="relation-aware (chosen on val)")
  ax.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax.set(xlabel="contamination ratio p (%)", ylabel="instance AUROC of pooling weights vs foreign labels",
         title="Does attention find the contaminants? (positive test bags)", xticks=xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


def figure_auc(c: Conclusions, path: Path) -> None:
  """Bag-level test AUC per ratio, the fp_weight sweep, and the instance AUROC of the pooling weights."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = [100 * bags_lib.ratio_value(r) for r in c.ratios]
  fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 6.4))
  cmap = plt.get_cmap("tab10")
  _panel_bag_auc(c, ax, xs, cmap)
  _panel_fp_sweep(c, ax2, cmap)
  _panel_instances(c, ax3, xs, cmap)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def figure_attention(c: Conclusions, path: Path) -> None:
  """Instance weights of the first positive test bags (seed 0), foreign instances in red."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (["medoid distance (no learning)", "before", "after", "relation (chosen on val)"]
            + max_pool_recipes(c.recipes))
  fig, axes = plt.subplots(len(panels), len(c.ratios), figsize=(3.2 * len(c.ratios), 2.0 * len(panels)),
                           squeeze=False)
  for j, r in enumerate(c.ratios):
    recs = c.per_ratio[r]["recipes"]
    for i, panel in enumerate(panels):
      ax = axes[i, j]
      if panel.startswith("medoid"):
        fb, ylab, label = c.per_ratio[r]["instance_baseline"]["figure_bags"], "distance", panel
      else:
        n = c.relation[r] if panel.startswith("relation (") else panel
        if n is None or n not in recs:
          ax.axis("off")
          continue
        fb = recs[n]["instance"]["figure_bags"]
        ylab = "α·n (1 = uniform)" if recs[n]["pooling"] == "attention" else "instance score s"
        label = panel if n == panel else f"{panel}: {n}"
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
      if i == len(panels) - 1:
        ax.set_xlabel("positive test bag", fontsize=7)
  fig.suptitle("Instance weights in the first positive test bags (seed 0); red diamonds = foreign instances",
               fontsize=10)
  fig.tight_layout()
  reporting.save_figure(fig, path)


# ----------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------


def write(c: Conclusions, workdir: Path) -> dict:
  """Writes the figures, ``report.md`` and ``results.json`` into ``workdir`` (each
  atomically); returns what ``results.json`` holds."""
  workdir = Path(workdir)
  figure_auc(c, workdir / "auc_vs_ratio.png")
  figure_attention(c, workdir / "attention_bags.png")
  reporting.write_markdown(workdir / "report.md", report_lines(c))
  results = {"wall_s": c.wall_s, "computed_ratios": list(c.computed), "answers": c.answers,
             "per_ratio": c.per_ratio, "data": c.data_info, "answer_text": answer_text(c),
             "workdir": str(workdir)}
  tio.atomic_write_json(workdir / "results.json", results)
  return results
