"""Sweeps: the grid, the results table, and a smoke sweep through the engine."""

import json

import ml_collections
import numpy as np
import pytest

from tailjax.configs import sweep_tail_weight
from tailjax import engine, runrecord
from tailjax.data import textures
from tailjax.studies import sweeps

from config_reads import track_reads, unread


def _cfg(**grid):
  c = ml_collections.ConfigDict()
  c.train = {"num_steps": 6, "batch_size": 4}
  c.flow = {"num_steps": 2, "kernel_mode": "alternate"}
  c.sweep = {"tail_weight": (0.0, 0.7), "top_k_ratio": (0.25,), "learning_rate": (1e-2,),
             "seeds": (0, 1)}
  c.sweep.update(grid)
  return c


@pytest.mark.parametrize("field,value", [
    ("tail_weight", (0.0, 1.5)), ("tail_weight", (-0.1,)), ("top_k_ratio", (0.0,)),
    ("top_k_ratio", (1.2,)), ("learning_rate", (0.0,)), ("learning_rate", (-1e-3, 1e-3)),
    ("seeds", ()), ("seeds", (0, 0)), ("seeds", (1.5,)), ("seeds", (-1,)),
    ("tail_weight", "(0.1, x)")])
def test_grid_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=rf"^config\.sweep\.{field}\b"):
    engine.Rows.from_grid({**_cfg().sweep.to_dict(), field: value})


def test_grid_rows_are_point_major():
  grid = engine.Rows.from_grid(_cfg(tail_weight=(0.0, 1.0), top_k_ratio=(0.02, 0.5),
                                    seeds=(3, 4, 5)).sweep)
  rows = grid.to_json()
  assert grid.num_rows == len(rows) == 12
  assert [r["seed"] for r in rows[:3]] == [3, 4, 5]
  assert [(r["tail_weight"], r["top_k_ratio"]) for r in rows[::3]] == [
      (0.0, 0.02), (0.0, 0.5), (1.0, 0.02), (1.0, 0.5)]
  np.testing.assert_array_equal(grid.hparams_R["tail_weight"], [0.0] * 6 + [1.0] * 6)
  # A command-line flag gives the lists as strings: read as Python literals.
  flags = engine.Rows.from_grid({**_cfg().sweep.to_dict(), "tail_weight": "(0.0, 1.0)",
                                 "top_k_ratio": "(0.02, 0.5)", "seeds": "3, 4, 5"})
  assert flags == grid


def test_grid_tail_nll_axis():
  grid = engine.Rows.from_grid(_cfg(tail_nll=("exact", "even_share"), seeds=(0,)).sweep)
  assert [(r["tail_weight"], r["tail_nll"]) for r in grid.rows] == [
      (0.0, "exact"), (0.0, "even_share"), (0.7, "exact"), (0.7, "even_share")]
  np.testing.assert_array_equal(grid.hparams_R["tail_share_weight"], [0, 1, 0, 1])
  assert [r["tail_nll"] for r in engine.Rows.from_grid(_cfg().sweep).rows] == ["exact"] * 4
  for bad in (("exact", "exact"), ("logdet_only",)):
    with pytest.raises(ValueError, match=r"config\.sweep\.tail_nll"):
      engine.Rows.from_grid(_cfg(tail_nll=bad).sweep)


def test_sweep_smoke_end_to_end(tmp_path):
  root = tmp_path / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=64, n_train=8, n_test=8,
                                   categories=("gravel",))
  cfg = sweep_tail_weight.get_config("smoke")
  cfg.data.kind = "mvtec"
  for name in ("benchmark_seed", "image_size", "n_train", "n_test"):
    del cfg.data[name]
  cfg.data.root, cfg.data.categories = str(root), "gravel"
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.eval.size = 64
  cfg.train.num_steps, cfg.train.segment_steps = 4, 2
  cfg.sweep.top_k_ratio = (0.02, 0.5)
  cfg.flow.num_steps = 1
  cfg.train.batch_size = 6           # the 6 training images left after holding out 2
  with track_reads(cfg) as reads:
    out = sweeps.run_and_evaluate(cfg, tmp_path / "run", progress=False)
  assert unread(cfg, reads) == []
  run = tmp_path / "run"
  rows = json.loads((run / "results.json").read_text())["rows"]
  assert rows == out["rows"] and len(rows) == 2 * 2 * 2   # λ {0, 0.7} × r {0.02, 0.5} × seeds {0, 1}
  for r in rows:
    assert set(r) == {"category", "tail_weight", "top_k_ratio", "learning_rate", "tail_nll", "seed",
                      "metrics"}
    assert r["category"] == "gravel" and 0.0 <= r["metrics"]["pixel_ap"] <= 1.0
  assert [(r["tail_weight"], r["top_k_ratio"], r["seed"]) for r in rows[:3]] == [
      (0.0, 0.02, 0), (0.0, 0.02, 1), (0.0, 0.5, 0)]
  md = (run / "results.md").read_text()
  lr = cfg.optim.learning_rate
  assert "| λ | r | k | lr |" in md and f"| 0.7 | 0.5 | 98 | {lr:g} |" in md
  assert (run / "gravel" / "checkpoints" / "4").is_dir()
  assert len(json.loads((run / "gravel" / "rows.json").read_text())["rows"]) == 8
  # A finished sweep rerun with other steps is refused, not relabelled.
  cfg.train.num_steps = 6
  with pytest.raises(runrecord.ConfigMismatchError, match="train.num_steps: ran with 4, now 6"):
    sweeps.run_and_evaluate(cfg, run, progress=False)
  assert json.loads((run / "results.json").read_text())["rows"] == rows


def test_results_markdown_means_over_seeds_and_categories():
  cfg = _cfg(tail_weight=(0.0, 1.0), seeds=(0, 1))
  cfg.data = {"kind": "mvtec"}
  grid = engine.Rows.from_grid(cfg.sweep)
  ap = {("a", 0.0): (0.10, 0.20), ("a", 1.0): (0.30, 0.50), ("b", 0.0): (0.30, 0.40),
        ("b", 1.0): (0.10, 0.10)}
  rows = [{"category": c, **r, "metrics": {"image_auroc": 0.5, "pixel_auroc": 0.5, "aupro": 0.5,
                                           "pixel_ap": ap[(c, r["tail_weight"])][r["seed"]]}}
          for c in ("a", "b") for r in grid.to_json()]
  md = sweeps.results_markdown(cfg, rows, grid, n_patches=16)
  a, b, mean = (md.split(f"## {s}")[1].split("##")[0] for s in ("a", "b", "mean over categories"))
  assert "| 1 | 0.25 | 4 | 0.01 | exact | 50.00 ± 0.00 | 50.00 ± 0.00 | **40.00 ± 14.14** |" in a
  assert "| 0 | 0.25 | 4 | 0.01 | exact | 50.00 ± 0.00 | 50.00 ± 0.00 | **35.00 ± 7.07** |" in b
  # mean over categories: per seed first (λ = 0: 0.2, 0.3; λ = 1: 0.2, 0.3), then over seeds
  assert mean.count("25.00 ± 7.07") == 2 and mean.count("**") == 2
