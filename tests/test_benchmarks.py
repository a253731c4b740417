"""benchmarks/run_all's markdown: the targets table reads the right figures."""

from benchmarks import run_all


def _grad_steps(ghost_s, peer_s):
  secs = {"ghost": ghost_s, "window": 2 * ghost_s, "loop": 10 * ghost_s,
          "backward 1 image": ghost_s / 50, "backward 196 images": 5 * ghost_s}
  return {"seconds": secs, "over_backward_196": {k: v / secs["backward 196 images"] for k, v in secs.items()},
          "speedup_vs_peer": {k: peer_s / v for k, v in secs.items()},
          "peer": {"best_s": peer_s}}


def test_per_patch_target_reads_the_fastest_method_not_a_backward_pass():
  res = {"by_steps": {4: _grad_steps(0.02, 0.8), 8: _grad_steps(0.4, 1.6)}}
  rows = run_all._gradients_targets(res)
  assert [r[3] for r in rows] == ["yes", "**no**"]            # 40× and 4×: the ghost method
  assert "best ghost: 40.0×" in rows[0][2] and "best ghost: 4.0×" in rows[1][2]
  md = "\n".join(run_all._gradients_md(res))
  assert "| ghost | 20 | 400 |" in md and "| PyTorch peer loop | 800 | 1,600 |" in md


def test_markdown_accepts_integer_keys_and_reports_the_targets():
  res = {"by_steps": {4: _grad_steps(0.02, 0.8)}}
  md = run_all.markdown({"gradients": {"result": res, "seconds": 1.0}}, 60.0)
  assert "could not tabulate" not in md
  assert "| per-patch gradient norms vs the PyTorch autograd loop, 4 coupling steps | ≥ 5× |" in md
  assert run_all._table([4, 8], [[1, 2]])[0] == "| 4 | 8 |"


def test_flop_lines_state_the_peer_over_ghost_flop_ratio_and_rates():
  t = _grad_steps(0.4, 1.6)
  t["flops"] = {"ghost": 15e9}
  t["gflops_per_s"] = {"ghost": 15e9 / 0.4 / 1e9}
  t["peer"].update(flops=60e9, gflops_per_s=60e9 / 1.6 / 1e9)
  line, = run_all.bench_gradients.flop_lines(t)
  assert "ghost 15.00 GFLOP at 38 GFLOP/s" in line and "peer loop 60.00 GFLOP at 38 GFLOP/s" in line
  assert "4.0× ghost's FLOPs" in line
  rows = run_all._gradients_targets({"by_steps": {8: t}})
  assert "FLOP ratio 4.0×" in rows[0][2]
  assert "8 coupling steps. FLOPs: ghost" in "\n".join(run_all._gradients_md({"by_steps": {8: t}}))
  assert run_all.bench_gradients.flop_lines(_grad_steps(0.4, 1.6)) == []   # no counts: no line


def test_peer_flop_count_is_forward_plus_one_backward_per_patch():
  import pytest
  pytest.importorskip("torch")
  pytest.importorskip("FrEIA")
  from benchmarks import peer_torch
  # Forward and one backward both scale with the H·W positions, and the loop runs H·W
  # backwards: 4× the positions is ≈16× the FLOPs (4× if the loop were counted once).
  small, big = (peer_torch.peer_per_patch_flops(2, channels=8, height=h, width=h) for h in (2, 4))
  assert 13 < big / small < 16.5


def test_engine_table_shows_the_peers_own_flops_and_the_flop_ratio():
  ours = {"flow_steps": 8, "ms": 100.0, "flops": 7e9, "gflops_per_s": 70.0, "conv_impl": "matmul",
          "row_mode": "map"}
  row = {"ours": ours, "peer": {"ms": 110.0, "flops": 8.19e9}, "speedup_vs_peer": 1.1,
         "peer_gflops_per_s": 8.19e9 / 0.11 / 1e9, "fraction_of_peak": 0.2}
  lines, targets = run_all._engine_md({"peak_gflops": 350.0, "rows": [row]})
  assert "| 8 | 100.0 | 7 | 70 | 20.0 % | 110.0 | 8.19 | 74.5 | 1.10× |" in "\n".join(lines)
  assert "FLOP ratio 1.17×" in targets[0][2] and targets[0][3] == "yes"


def test_bench_study_compares_records_and_verdicts(tmp_path):
  """The GPU script's check against the CPU run: the largest difference over every number
  of every unit, units the reference lacks, and verdicts that differ; then its table."""
  import json
  from benchmarks import bench_study
  a, b = tmp_path / "gpu", tmp_path / "cpu"
  for w, x, verdict in ((a, 0.5004, "SUPPORTED"), (b, 0.5, "NOT SUPPORTED")):
    (w / "units" / "brick" / "eval").mkdir(parents=True)
    (w / "units" / "brick" / "eval" / "10.json").write_text(json.dumps(
        [{"metrics": {"pixel_ap": x, "image_auroc": 0.9}, "val": {"p50": [1.0, 2.0]}}]))
    (w / "conclusions.json").write_text(json.dumps({"links": {"L2": {"verdict": verdict,
                                                                     "p": x}}}))
  (a / "units" / "brick" / "eval" / "30.json").write_text("[]")
  c = bench_study.compare_runs(a, b)
  assert c["units_compared"] == 1 and c["units_missing"] == ["units/brick/eval/30.json"]
  assert abs(c["max_abs_diff"] - 4e-4) < 1e-12
  assert c["max_abs_diff_at"] == "units/brick/eval/10.json:0/metrics/pixel_ap"
  assert c["labels_differ"] == {"links/L2/verdict": ("SUPPORTED", "NOT SUPPORTED")}
  res = {"device": "X", "backend": "gpu", "jax": "0", "device_count": 1, "config": "c.py",
         "workdir": "w", "reference": "r", "wall_s": 12.0, "matmul_precision": "highest",
         "phases": {"features": 1.0, "training": 2.0, "evaluation": 3.0},
         "reference_phases": {"features": 10.0, "training": 40.0, "evaluation": 30.0},
         "train_flops": 4e12, "steps": 100, "categories": 2, "ms_per_step": 10.0,
         "peak_flops": 50e12, "atol": 1e-3, "compare": c}
  text = "\n".join(bench_study.markdown(res))
  assert "| training | 2.0 | 40.0 | 20.0× |" in text
  assert "| **total** | 6.0 | 80.0 | 13.3× |" in text
  assert "2.000 TFLOP/s = 4.0 % of the 50.0 TFLOP/s float32 peak" in text
  assert "tolerance 0.001: within" in text and "verdicts DIFFER" in text


def test_grid_targets_read_the_best_of_each_side():
  entry = lambda wall, train, rs, **kw: {"wall_s": wall, "train_s": train, "row_steps_per_s": rs,
                                         **kw}
  res = {"rows": 6, "steps": 200, "precision": "float32", "cores": 2,
         "ours_1": entry(60.0, 55.0, 20.0, processes=1), "ours_n": entry(40.0, 35.0, 30.0, processes=2),
         "peer_1": entry(70.0, 69.0, 17.1, torch="2.13.0+cpu"), "peer_n": entry(50.0, 49.0, 24.0),
         "processes_speedup": 1.5, "speedup_vs_peer": 1.25}
  lines, targets = run_all._grid_md(res)
  assert targets[0][2] == "1.50× (2 processes)"
  assert targets[1][1:] == ["≥ 1.3×", "1.25×", "**no**"] and "2.13.0+cpu" in targets[1][0]
  assert "| ours, 2 local processes (train.processes=auto) | 40.0 | 35.0 | 30.00 |" in lines


def test_precision_table_reports_the_worst_category():
  cat = lambda own, rho: {"rows": 6, "patches": 100, "nll_abs_median": 0.04, "nll_abs_max": 9.0,
                          "nll_rel_iqr_median": 0.001, "nll_rel_iqr_max": 0.3,
                          "nll_rel_own_max": own, "logdet_abs_median": 0.02,
                          "logdet_abs_max": 0.2, "spearman_min": rho}
  lines, targets = run_all._precision_md(
      {"workdir": "runs/demo", "categories": {"brick": cat(0.009, 0.99999), "moon": cat(0.002, 0.9999)}})
  assert "0.90 % of the patch's NLL" in targets[0][2] and "0.99990" in targets[0][2]
  assert sum(l.startswith("| brick |") or l.startswith("| moon |") for l in lines) == 2


def test_op_profile_accounts_for_the_compiled_steps_ops():
  """A tiny 2-step flow: the trace's ops map onto every coupling, both directions, and
  the permutations; the matmuls are found; the shares add up to 100 %."""
  from benchmarks import bench_step_parts as bsp
  res = bsp.op_profile("float32", flow_steps=2, batch_size=4, steps=2, feats_shape=(8, 4, 4, 8))
  regions = {r["region"]: r for r in res["rows"]}
  for region in ("coupling 0 fwd", "coupling 0 bwd", "coupling 1 fwd", "coupling 1 bwd",
                 "permutations fwd"):
    assert region in regions, sorted(regions)
  assert regions["coupling 0 bwd"]["matmul"] > 0
  assert abs(sum(r["pct"] for r in res["rows"]) - 100) < 1e-6
  assert abs(sum(res["by_kind_pct"].values()) - 100) < 1e-6
  assert res["ops_ms"] > 0 and 1.0 <= res["ops_overlap"] < 2.0
