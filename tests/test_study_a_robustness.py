"""Robustness across flow implementations: the sign rule, the runs read from their
workdirs, the settings that differ and the report lines."""

import json

import ml_collections
import pytest

from tailjax.studies import study_a_robustness as R


def _ci(mean, half):
  return {"mean": mean, "lo": mean - half, "hi": mean + half}


def _cfg(**flow):
  return ml_collections.ConfigDict({"flow": {"layer_norm": "image", "global_affine": False,
                                             **flow},
                                    "report": {"compare_runs": ""}, "train": {"num_steps": 8}})


def _write_run(path, effects, cfg, levels=None):
  """A finished run's conclusions.json and config.json as study A writes them."""
  path.mkdir(parents=True)
  con = {"baseline": "mean_only", "treatment": "tail_aware",
         "verdicts": {k: {"categories": v} for k, v in effects.items()}}
  if levels:
    con["convergence"] = {c: {"mean_only": {"selected": [b, b]}, "tail_aware": {"selected": [t, t]}}
                          for c, (b, t) in levels.items()}
  (path / "conclusions.json").write_text(json.dumps(con))
  (path / "config.json").write_text(json.dumps(cfg.to_dict()))
  return str(path)


@pytest.mark.parametrize("cis, rule", [
    ([_ci(0.05, 0.02), _ci(0.08, 0.03)], R.KEEPS),
    ([_ci(-0.05, 0.02), _ci(-0.01, 0.005)], R.KEEPS),
    ([_ci(0.05, 0.02), _ci(-0.05, 0.02)], R.REVERSES),
    ([_ci(0.05, 0.02), _ci(0.01, 0.03)], R.UNDETERMINED),
    ([_ci(0.05, 0.02), _ci(-0.01, 0.03), _ci(-0.05, 0.02)], R.REVERSES),
])
def test_sign_rule(cis, rule):
  assert R.sign_rule(cis) == rule


def test_compare_reads_the_runs_names_the_differences_and_applies_the_rule(tmp_path):
  other = _write_run(tmp_path / "demo", {
      "pixel_ap": {"moon": _ci(0.07, 0.05), "tissue": _ci(0.09, 0.04), "brick": _ci(0, 0.04)},
      "image_auroc": {"moon": _ci(0.02, 0.03), "tissue": _ci(-0.03, 0.01),
                      "brick": _ci(0, 0.05)}},
      _cfg(), levels={"moon": (0.40, 0.47), "tissue": (0.31, 0.40)})
  mine = {"pixel_ap": {"moon": _ci(0.35, 0.08), "tissue": _ci(0.38, 0.08)},
          "image_auroc": {"moon": _ci(0.49, 0.14), "tissue": _ci(0.54, 0.13)},
          "levels": {"moon": [0.11, 0.46], "tissue": [0.05, 0.42]}}
  cmp = R.compare(_cfg(layer_norm="image_affine"), "this run", mine,
                  [other, str(tmp_path / "missing")])
  assert cmp["categories"] == ["moon", "tissue"]          # brick is not in this run
  assert cmp["missing"] == [str(tmp_path / "missing")]
  assert cmp["differs"] == {"flow.layer_norm": ["image_affine", "image"]}
  assert cmp["rule"]["pixel_ap"] == {"moon": R.KEEPS, "tissue": R.KEEPS}
  assert cmp["rule"]["image_auroc"] == {"moon": R.UNDETERMINED, "tissue": R.REVERSES}
  assert cmp["verdict"] == {"pixel_ap": R.KEEPS, "image_auroc": R.REVERSES}
  assert cmp["runs"][1]["levels"]["moon"] == [0.40, 0.47]
  text = "\n".join(R.section_lines(cmp, "tail_aware", "mean_only"))
  assert "| flow.layer_norm | \"image_affine\" | \"image\" |" in text
  assert "+35.00 [+27.00, +43.00] (11.0 → 46.0 %)" in text and "(40.0 → 47.0 %)" in text
  assert "Not finished (no `conclusions.json`)" in text and "**reverses**" in text


def test_no_compare_runs_means_no_section():
  assert R.compare_runs(_cfg()) == []
  assert R.compare(_cfg(), "this run", {"pixel_ap": {}, "image_auroc": {}}, []) is None
  cfg = _cfg()
  cfg.report.compare_runs = "runs/a, runs/b,"
  assert R.compare_runs(cfg) == ["runs/a", "runs/b"]
