import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import fastflow_mvtec
from tailjax import io, study_a
from tailjax.data import textures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini_mvtec(tmp_path_factory):
  """A tiny MVTec-layout folder (two categories) made by the texture builder."""
  root = tmp_path_factory.mktemp("mvtec") / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=64, n_train=8, n_test=8,
                                   categories=("brick", "gravel"))
  return root


def _smoke_cfg(root, cache):
  cfg = fastflow_mvtec.get_config("smoke")
  cfg.data.root = str(root)
  cfg.data.categories = "brick,gravel"
  cfg.data.cache_dir = str(cache)
  cfg.eval.size = 64
  cfg.train.num_steps = 4
  cfg.train.log_every = 2
  cfg.report.n_examples = 2
  return cfg


def test_train_and_evaluate_end_to_end(mini_mvtec, tmp_path):
  cfg = _smoke_cfg(mini_mvtec, tmp_path / "cache")
  out = study_a.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  run = tmp_path / "run"
  report = (run / "report.md").read_text()
  assert "| brick | mean_only |" in report and "| **mean** | tail_aware − mean_only |" in report
  assert "PaDiM" in report and "Verdict" in report
  saved = json.loads((run / "metrics.json").read_text())
  for cat in ("brick", "gravel"):
    rows = saved["categories"][cat]["rows"]
    assert [r["variant"] for r in rows] == ["mean_only"] * 2 + ["tail_aware"] * 2
    assert [r["tail_weight"] for r in rows] == pytest.approx([0.0, 0.0, 0.7, 0.7])
    for r in rows:
      for k in study_a.METRIC_KEYS:
        assert 0.0 <= r["metrics"][k] <= 1.0
    assert (run / cat / "examples.png").stat().st_size > 0
    assert (run / cat / "flows" / "row_0" / "checkpoints" / "latest").is_dir()
  # resuming does no new training and reproduces the numbers exactly
  again = study_a.train_and_evaluate(cfg, run, progress=False)
  for cat in ("brick", "gravel"):
    assert ([r["metrics"] for r in again["results"][cat]["rows"]] ==
            [r["metrics"] for r in out["results"][cat]["rows"]])


def test_train_flow_script_smoke(mini_mvtec, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "scripts/train_flow.py", "--config=configs/fastflow_mvtec.py:smoke",
         f"--config.data.root={mini_mvtec}", "--config.data.categories=gravel",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.eval.size=64",
         "--config.train.num_steps=2", "--config.train.log_every=1", "--config.num_seeds=1",
         "--config.report.n_examples=0", f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[gravel] mean_only pixel AP" in proc.stdout
  assert (tmp_path / "run" / "report.md").exists()
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 2


def test_bad_data_config_is_named(tmp_path):
  cfg = _smoke_cfg(tmp_path / "nowhere", tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    study_a.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  cfg.data.root = ""
  with pytest.raises(ValueError, match="config.data.root"):
    study_a.train_and_evaluate(cfg, tmp_path / "run", progress=False)


def test_unknown_category_is_named(mini_mvtec, tmp_path):
  cfg = _smoke_cfg(mini_mvtec, tmp_path / "cache")
  cfg.data.categories = "brick,carpet"
  with pytest.raises(ValueError, match=r"config.data.categories: \['carpet'\]"):
    study_a.category_splits(cfg, mini_mvtec)


def test_summary_pairs_differences_by_seed():
  def rows(base, delta):
    return [{"variant": "mean_only", "seed": s, "metrics": {k: base[s] for k in study_a.METRIC_KEYS}}
            for s in range(3)] + [
        {"variant": "tail_aware", "seed": s, "metrics": {k: base[s] + delta[s] for k in study_a.METRIC_KEYS}}
        for s in range(3)]
  padim = {k: 0.5 for k in study_a.METRIC_KEYS}
  results = {"a": {"rows": rows([0.2, 0.5, 0.8], [0.1, 0.1, 0.1]), "padim": padim},
             "b": {"rows": rows([0.3, 0.3, 0.3], [0.0, 0.2, 0.1]), "padim": padim}}
  s = study_a.summarize(results, "mean_only", "tail_aware")
  d = s["categories"]["a"]["difference"]["pixel_ap"]
  # large seed-to-seed spread but a constant paired difference: the CI collapses on +0.1
  assert d["mean"] == pytest.approx(0.1) and d["hi"] - d["lo"] < 1e-9
  assert s["categories"]["a"]["mean_only"]["pixel_ap"]["std"] == pytest.approx(0.3)
  assert s["mean"]["difference"]["pixel_ap"]["values"] == pytest.approx([0.05, 0.15, 0.1])
  assert study_a.verdict(d).startswith("tail-aware better")


def test_load_trained_restores_rows_without_training(mini_mvtec, tmp_path):
  cfg = _smoke_cfg(mini_mvtec, tmp_path / "cache")
  cfg.data.categories = "gravel"
  cfg.num_seeds = 1
  out = study_a.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  loaded = study_a.load_trained(tmp_path / "run")
  cat = loaded["gravel"]
  assert [r["variant"] for r in cat.rows] == ["mean_only", "tail_aware"]
  import jax
  for i, row in enumerate(out["results"]["gravel"]["rows"]):
    params = jax.tree.map(lambda a: a[i], cat.params_R)
    scores = study_a.patch_scores(cat.model, params, cat.data.test_feats, cfg.eval.score)
    m, _ = study_a.evaluate_scores(cat.cfg, scores, cat.data)
    assert m == row["metrics"]
