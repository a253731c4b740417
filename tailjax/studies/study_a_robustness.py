"""Does study A's tail-aware effect keep its sign across flow implementations?

A run names finished study-A runs to compare with (``report.compare_runs``: their
workdirs), typically the default flow and a flow that differs in one or more
implementation choices (``configs/fastflow_anomalib.py``: anomalib's FastFlow block).
For every category the runs share, each run's per-category effect (treatment −
baseline, pixel AP and image AUROC at its primary point, the interval of its per-category
verdicts: seeds and, when recorded, test images) is read from its ``conclusions.json``,
and the flow and training settings that differ between the runs are listed from their
stored configs.

Rule, fixed before the run, per category and metric: the effect **keeps its sign** when
every run's interval excludes 0 on the same side, **reverses** when two runs' intervals
exclude 0 on opposite sides, and is **not determined** otherwise (some interval
contains 0). Over categories: "keeps its sign" iff it does in every shared category,
"reverses" iff it reverses in at least one, else "not determined".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tailjax import reporting
from tailjax.evaluation import METRIC_NAMES

METRICS = ("pixel_ap", "image_auroc")
# The settings listed when they differ between the compared runs.
SETTINGS = ("flow.num_steps", "flow.kernel_mode", "flow.hidden_ratio", "flow.clamp",
            "flow.global_affine", "flow.layer_norm", "flow.subnet_init", "optim.name",
            "optim.learning_rate", "optim.grad_clip_norm", "train.num_steps",
            "train.batch_size", "train.precision", "num_seeds", "seed", "backbone.name",
            "backbone.layer")

KEEPS, REVERSES, UNDETERMINED = "keeps its sign", "reverses", "not determined"


def compare_runs(cfg) -> list[str]:
  """``report.compare_runs`` as a list of workdirs (empty: no comparison)."""
  raw = cfg.report.get("compare_runs", "") if "report" in cfg else ""
  if isinstance(raw, str):
    return [p.strip() for p in raw.split(",") if p.strip()]
  return [str(p) for p in raw]


def _get(cfg: dict, dotted: str):
  node: Any = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _run_effects(con: dict) -> dict:
  """{metric: {category: interval}} of a run's per-category verdicts, and under "levels"
  {category: (baseline, treatment) pixel AP at the primary point, mean over seeds}."""
  out = {k: {c: {f: v[f] for f in ("mean", "lo", "hi")}
             for c, v in con["verdicts"][k]["categories"].items()} for k in METRICS}
  out["levels"] = levels(con.get("convergence") or {}, con["baseline"], con["treatment"])
  return out


def levels(convergence: dict, base: str, treat: str) -> dict:
  """{category: [baseline, treatment] pixel AP at the primary point, mean over seeds}
  from a run's ``convergence`` record (empty without one)."""
  mean = lambda cell: float(sum(cell["selected"]) / len(cell["selected"]))
  return {c: [mean(v[base]), mean(v[treat])] for c, v in convergence.items()
          if base in v and treat in v and v[base].get("selected")}


def _side(ci: dict) -> int:
  return reporting.side_of_zero(ci)


def sign_rule(cis: Sequence[dict]) -> str:
  """The per-category rule of the module docstring on the runs' intervals."""
  sides = {_side(ci) for ci in cis}
  if sides == {1} or sides == {-1}:
    return KEEPS
  if {1, -1} <= sides:
    return REVERSES
  return UNDETERMINED


def compare(cfg, self_label: str, self_effects: dict, workdirs: Sequence[str]) -> dict | None:
  """The comparison of this run (``self_effects``: {metric: {category: interval}} and
  optionally "levels" as ``levels`` gives them; its config ``cfg``) with the finished
  runs at ``workdirs``; None without any.

  Returns ``{"runs": [{"label", "workdir", "effects", "levels"}], "differs": {setting:
  [value per run]}, "categories": shared categories, "rule": {metric: {category: rule}},
  "verdict": {metric: over categories}, "missing": [workdirs without conclusions]}``."""
  if not workdirs:
    return None
  runs = [{"label": self_label, "workdir": ".", "config": cfg.to_dict(),
           "effects": self_effects}]
  missing = []
  for w in workdirs:
    path = Path(w) / "conclusions.json"
    cfg_path = Path(w) / "config.json"
    if not (path.is_file() and cfg_path.is_file()):
      missing.append(str(w))
      continue
    con = json.loads(path.read_text())
    runs.append({"label": Path(w).name, "workdir": str(w),
                 "config": json.loads(cfg_path.read_text()), "effects": _run_effects(con)})
  shared = [c for c in self_effects["pixel_ap"]
            if all(c in r["effects"]["pixel_ap"] for r in runs)]
  rule = {k: {c: sign_rule([r["effects"][k][c] for r in runs]) for c in shared}
          for k in METRICS}
  verdict = {}
  for k in METRICS:
    v = set(rule[k].values())
    verdict[k] = (REVERSES if REVERSES in v else KEEPS if v == {KEEPS} else UNDETERMINED)
  values = {s: [_get(r["config"], s) for r in runs] for s in SETTINGS}
  differs = {s: v for s, v in values.items() if len({json.dumps(x) for x in v}) > 1}
  return {"runs": [{"label": r["label"], "workdir": r["workdir"],
                    "effects": {k: {c: r["effects"][k][c] for c in shared} for k in METRICS},
                    "levels": {c: r["effects"].get("levels", {}).get(c) for c in shared}}
                   for r in runs],
          "differs": differs, "categories": shared, "rule": rule, "verdict": verdict,
          "missing": missing}


def section_lines(cmp: dict, treat: str, base: str) -> list[str]:
  """"Robustness across flow implementations": the runs' settings that differ, the
  per-category effects side by side with the rule, and the verdict per metric."""
  lines = ["## Robustness across flow implementations", "",
           f"{treat} − {base} per category (pp, each run at its own primary point; "
           "intervals as in each run's per-category verdicts; for pixel AP the two arms' "
           f"levels, {base} → {treat}, mean over seeds), this run beside "
           + ", ".join(f"`{r['workdir']}`" for r in cmp["runs"][1:]) + ". Rule (fixed before "
           "the run): the effect keeps its sign when every run's interval excludes 0 on the "
           "same side, reverses when two exclude 0 on opposite sides, else not determined.",
           ""]
  if cmp["missing"]:
    lines += [f"Not finished (no `conclusions.json`): {', '.join(cmp['missing'])}.", ""]
  if cmp["differs"]:
    lines += reporting.table(["setting"] + [r["label"] for r in cmp["runs"]],
                             [[s] + [json.dumps(x) for x in v] for s, v in cmp["differs"].items()])
    lines.append("")
  else:
    lines += ["The compared runs have the same flow and training settings.", ""]
  body = []
  level = lambda lv: "" if not lv else f" ({100 * lv[0]:.1f} → {100 * lv[1]:.1f} %)"
  for c in cmp["categories"]:
    for k in METRICS:
      body.append([c, METRIC_NAMES[k]]
                  + [reporting.interval(r["effects"][k][c], scale=100, digits=2, signed=True)
                     + (level(r["levels"].get(c)) if k == "pixel_ap" else "")
                     for r in cmp["runs"]] + [cmp["rule"][k][c]])
  lines += reporting.table(["category", "metric"] + [r["label"] for r in cmp["runs"]] + ["rule"],
                           body) + [""]
  lines += reporting.bullets([f"{METRIC_NAMES[k]}: the tail-aware effect "
                              f"**{cmp['verdict'][k]}** across the runs "
                              f"({len(cmp['categories'])} shared categories)." for k in METRICS])
  return lines + [""]
