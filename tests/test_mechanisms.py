"""End to end: a tiny trained study-A run → analyze_run → analysis.json, figures, report.md;
the analyses of ``study_a.main`` (trained rows in memory) equal those of the reloaded run."""

import json

import numpy as np
import pytest

from tailjax.analysis import hypotheses as H
from tailjax.data import pipeline, textures
from tailjax import io
from tailjax.studies import mechanisms as report
from tailjax.studies import study_a

from fakes import cellstats_extractor
from test_study_a import _smoke_cfg

_fake_extractor = cellstats_extractor((8, 8), 8, "fake-cellstats-v1")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setattr(pipeline, "make_extractor", _fake_extractor)
  tmp = tmp_path_factory.mktemp("analysis")
  root = tmp / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=64, n_train=8, n_test=8,
                                   categories=("gravel",))
  cfg = _smoke_cfg(root, tmp / "cache")   # study A's tiny run, on one category
  cfg.data.categories = "gravel"
  cfg.mechanisms.enabled = True
  cfg.mechanisms.num_images, cfg.mechanisms.num_param_images = 4, 2
  run = tmp / "run"
  trained = study_a.main(cfg, run, progress=False)
  sweep = tmp / "sweep"
  sweep.mkdir()
  rows = [{"category": "gravel", "tail_weight": lam, "top_k_ratio": r, "learning_rate": 1e-3,
           "seed": s, "metrics": {"pixel_ap": 0.5 - r + 0.01 * s + 0.05 * lam, "image_auroc": 0.8}}
          for s in range(3) for lam, r in [(0.7, 0.02), (0.7, 0.1), (0.7, 0.5), (0.0, 0.02), (1.0, 0.02)]]
  (sweep / "results.json").write_text(json.dumps({"rows": rows}))
  yield run, sweep, trained
  mp.undo()


def _numbers(tree, path=()):
  """Every leaf of a JSON-ready tree by path, wall times left out."""
  if isinstance(tree, dict):
    return {p: v for k, x in tree.items() if k not in ("seconds", "timings", "workdir")
            for p, v in _numbers(x, path + (k,)).items()}
  if isinstance(tree, list):
    return {p: v for i, x in enumerate(tree) for p, v in _numbers(x, path + (i,)).items()}
  return {path: tree}


def test_analyses_in_memory_equal_the_reloaded_run(tiny_run):
  """main hands the trained rows to the analyses in memory; reloading the finished run's
  checkpoints gives the same numbers, bit for bit."""
  run, _, trained = tiny_run
  reloaded = report.analyze_run(run, num_images=4, num_param_images=2, write=False,
                                verbose=False)
  in_memory = json.loads(io.to_json(trained["analysis"]))
  again = json.loads(io.to_json(reloaded))
  assert in_memory["settings"] == again["settings"]
  want, got = _numbers(again["categories"]), _numbers(in_memory["categories"])
  assert len(want) > 1000 and set(got) == set(want)
  assert [p for p in want if json.dumps(got[p]) != json.dumps(want[p])] == []
  # The run's report carries the analyses as a section and L1 in the causal chain.
  text = (run / "report.md").read_text()
  assert text.count("## Mechanism analyses") == 1 and "L1 gravel" in text


def test_analyze_run_writes_json_figures_and_report(tiny_run):
  run, sweep, _ = tiny_run
  out = report.analyze_run(run, num_images=4, sweeps=str(sweep), num_param_images=2,
                           patch_chunk=16, verbose=False)
  res = out["categories"]["gravel"]
  assert res["analysed_row"]["variant"] == "tail_aware" and res["grid"] == [8, 8]
  h3 = res["h3"]
  assert h3["k"] == 1 and h3["n_images_input"] == 4 and h3["n_images_param"] == 2
  assert [c["tail_weight"] for c in h3["conditions"]] == pytest.approx([0.0, 0.7, 1.0])
  assert np.asarray(h3["conditions"][0]["param_norm_BxN"]).shape == (2, 64)
  assert res["h1"]["distance_test"]["n"] == 6   # all training images (8 minus 2 held out), k = 1
  assert len(res["h7"]["rows"]) == 4 and res["h7"]["paired_seeds"] == [0, 1]
  assert [e["top_k_ratio"] for e in res["h4"]["sweep_r_axis"]] == [0.02, 0.1, 0.5]
  assert res["h4"]["performance"]["holds"]             # the synthetic sweep favours r = 0.02
  for h in ("h1", "h3", "h4", "h7"):
    assert res[h]["verdict"] in (H.SUPPORTED, H.PARTIAL, H.NOT_SUPPORTED, H.NOT_TESTED)
  saved = json.loads((run / "analysis" / "analysis.json").read_text())
  assert saved["overall"] == out["overall"] and saved["settings"]["num_param_images"] == 2
  assert "param_norm_BxN" not in saved["categories"]["gravel"]["h3"]["conditions"][1]
  per_patch = np.load(run / "analysis" / "gravel_per_patch.npz")
  np.testing.assert_allclose(per_patch["param_norm_BxN_lambda=0.7"], h3["conditions"][1]["param_norm_BxN"],
                             rtol=1e-6)
  assert per_patch["tail_BxN"].shape == (4, 64) and per_patch["tail_BxN"].sum() == 4
  for name in ("gradient_concentration", "latent_calibration", "topk_dilution", "tail_location",
               "tail_weight_ablation"):
    png = run / "analysis" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert "sweep results at r = 0.02" in saved["ablation"]["source"]
  text = (run / "analysis" / "report.md").read_text()
  for needle in ("| hypothesis | claim | verdict (ours) | key evidence | original study's verdict |",
                 "## H1", "## H3", "## H4", "## H7", "| *original study* | mean-only (λ=0)", "49.99×",
                 "| 1 % |", "Verdict rules", "../gravel/examples.png"):
    assert needle in text, needle


def test_without_sweeps_h4_is_not_tested_and_report_section_is_idempotent(tiny_run):
  run, _, _ = tiny_run
  out = report.analyze_run(run, "gravel", num_images=4, num_param_images=2, verbose=False)
  assert out["categories"]["gravel"]["h4"]["verdict"] == H.NOT_TESTED
  text = (run / "analysis" / "report.md").read_text()
  assert "No sweep results were given" in text
  assert "the run's variants" in out["ablation"]["source"]
  before = (run / "report.md").read_text()
  report.append_to_report(run)
  once = (run / "report.md").read_text()
  report.append_to_report(run, out)
  assert (run / "report.md").read_text() == once
  assert once.count("## Mechanism analyses") == 1 and "<!--" not in once
  # The report is rewritten whole: what does not depend on the analyses is unchanged.
  assert before.split("## The causal chain")[0] == once.split("## The causal chain")[0]
  assert f"**{out['overall']['H4']}**" in once


def test_bad_sweep_path_is_named(tiny_run, tmp_path):
  run, _, _ = tiny_run
  with pytest.raises(FileNotFoundError, match="results.json"):
    report.analyze_run(run, sweeps=[tmp_path / "nothing"], verbose=False)


def test_nll_overlap_is_in_the_analyses_of_the_tiny_run(tiny_run):
  """The exact vs even-share manipulation check: per tail-aware variant, every seed's
  top-k overlap on the validation images (and, labelled, the test images)."""
  from tailjax import evaluation, flows
  from tailjax.analysis import causal
  from tailjax.studies import study_a_record
  run, _, trained = tiny_run
  ov = trained["analysis"]["categories"]["gravel"]["nll_overlap"]
  assert set(ov) == {"tail_aware"}                       # the one variant with λ > 0
  v = ov["tail_aware"]
  assert v["tail_nll"] == "exact" and v["k"] == 1 and v["seeds"] == [0, 1]
  assert v["val"]["n_images"] == 2 * 2 and v["test"]["n_images"] == 2 * 8
  for split in ("val", "test"):
    assert 0.0 <= v[split]["p10"] <= v[split]["median"] <= 1.0
    assert len(v[split]["seed_means"]) == 2
  saved = json.loads((run / "analysis" / "analysis.json").read_text())
  assert saved["categories"]["gravel"]["nll_overlap"]["tail_aware"]["val"]["median"] == (
      pytest.approx(v["val"]["median"]))
  # The scores behind it: exact = the flow's per-patch NLL; even_share and sq_norm differ by
  # a constant per image (so they rank alike); the overlap recomputes from them.
  tc = study_a_record.load_trained(run, "gravel")["gravel"]
  i = next(j for j, r in enumerate(tc.rows) if r["variant"] == "tail_aware" and r["seed"] == 0)
  params = evaluation.row_params(tc.params_R, i)
  sc = report.definition_scores(tc.model, params, tc.data.val_feats)
  np.testing.assert_allclose(sc["exact"], np.asarray(flows.flat_nll(tc.model, params,
                                                                    tc.data.val_feats)),
                             rtol=1e-5, atol=1e-4)
  gap = sc["even_share"] - sc["sq_norm"]
  np.testing.assert_allclose(gap, gap[:, :1] * np.ones_like(gap), atol=1e-4)
  j = causal.topk_jaccard(sc["exact"], sc["even_share"], 0.02)
  assert v["val"]["seed_means"][0] == pytest.approx(float(j.mean()))
