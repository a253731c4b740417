"""Study A end to end on a tiny MVTec-layout folder, through the one engine and run record."""

import json

import jax
import numpy as np
import pytest

from tailjax.configs import fastflow_mvtec
from tailjax import engine, evaluation, io, runrecord
from tailjax.data import pipeline, textures
from tailjax.studies import study_a
from tailjax.studies import study_a_conclusions, study_a_report
from tailjax.studies import study_a_record

from config_reads import track_reads, unread


@pytest.fixture(scope="module")
def mini_mvtec(tmp_path_factory):
  """A tiny MVTec-layout folder (two categories) made by the texture builder."""
  root = tmp_path_factory.mktemp("mvtec") / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=64, n_train=8, n_test=8,
                                   categories=("brick", "gravel"))
  return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _smoke_cfg(root, cache):
  cfg = fastflow_mvtec.get_config("smoke")
  cfg.data.root = str(root)
  cfg.data.categories = "brick,gravel"
  cfg.data.cache_dir = str(cache)
  cfg.eval.size = 64
  cfg.flow.num_steps = 2
  cfg.train.batch_size = 6           # the 6 training images left after holding out 2
  cfg.train.num_steps = 4
  cfg.train.segment_steps = 2
  cfg.eval.budgets = (0, 2, 4)
  cfg.report.n_examples = 2
  return cfg


@pytest.fixture(scope="module")
def trained(mini_mvtec, cache, tmp_path_factory):
  """One finished run, with the config fields it read."""
  cfg = _smoke_cfg(mini_mvtec, cache)
  run = tmp_path_factory.mktemp("study") / "run"
  with track_reads(cfg) as reads:
    out = study_a.main(cfg, run, progress=False)
  return cfg, run, out, set(reads)


def test_end_to_end_report_and_layout(trained):
  cfg, run, out, _ = trained
  report = (run / "report.md").read_text()
  assert "| brick | mean_only |" in report and "| **mean** | tail_aware − mean_only |" in report
  assert "PaDiM" in report and "Reading: **" in report
  for section in ("## Answer", "## Budget curve", "## Model selection without the test set",
                  "## The causal chain", "Does the answer depend on the training budget?",
                  "Both models at the same step"):
    assert section in report, section
  assert report.index("## Answer") < report.index("## Results at the last step")
  assert (run / "budget_curve.png").read_bytes()[:4] == b"\x89PNG"
  con = json.loads((run / "conclusions.json").read_text())
  assert con["primary"] == "val" and con["budgets"] == [0, 2, 4]
  assert set(con["links"]) >= {"L2", "L3", "L4"}
  saved = json.loads((run / "metrics.json").read_text())
  for cat in ("brick", "gravel"):
    rows = saved["categories"][cat]["rows"]
    assert [r["variant"] for r in rows] == ["mean_only"] * 2 + ["tail_aware"] * 2
    assert [r["tail_weight"] for r in rows] == pytest.approx([0.0, 0.0, 0.7, 0.7])
    for r in rows:
      for k in evaluation.METRIC_KEYS:
        assert 0.0 <= r["metrics"][k] <= 1.0
    assert (run / cat / "examples.png").stat().st_size > 0
    assert sorted(p.name for p in (run / cat / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["2", "4"]
  m = runrecord.read_manifest(run)
  inv = m["invocations"][-1]
  assert m["kind"] == "study_a" and (inv["row_mode"], inv["conv_impl"]) == ("map", "matmul")


def test_every_config_field_is_read(trained):
  cfg, _, _, reads = trained
  # mechanisms.* is read only when the analyses are enabled (tests/test_mechanisms.py runs them).
  assert [p for p in unread(cfg, reads) if not p.startswith("mechanisms.")] == []


def test_rerun_with_another_row_mode_restores_and_reproduces(trained, monkeypatch):
  cfg, run, out, _ = trained

  real = engine._row_fns

  def no_training(*a, **k):
    program, _, _ = real(*a, **k)

    def fail(*args):
      raise AssertionError("a finished run was initialised or trained again")
    return program, fail, fail
  monkeypatch.setattr(engine, "_row_fns", no_training)
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.train.row_mode = "vmap"                 # an execution choice: not part of the record
  again = study_a.main(cfg2, run, progress=False)
  for cat in ("brick", "gravel"):
    assert ([r["metrics"] for r in again["results"][cat]["rows"]] ==
            [r["metrics"] for r in out["results"][cat]["rows"]])
  loaded = study_a_record.load_trained(run, "gravel")["gravel"]
  assert [r["variant"] for r in loaded.rows] == ["mean_only"] * 2 + ["tail_aware"] * 2
  import jax
  for i, row in enumerate(out["results"]["gravel"]["rows"]):
    params = jax.tree.map(lambda a: a[i], loaded.params_R)
    scores = evaluation.patch_scores(loaded.model, params, loaded.data.test_feats, "nll")
    m, _ = evaluation.evaluate_scores(dict(cfg.eval), scores, loaded.data.test_masks,
                                      loaded.data.test_labels)
    for k in evaluation.METRIC_KEYS:     # the xla lowering vs the run's matmul: float rounding
      assert m[k] == pytest.approx(row["metrics"][k], abs=2e-3)


@pytest.mark.parametrize("field,value,shown", [
    ("optim.learning_rate", 1e-2, "optim.learning_rate: ran with 0.001, now 0.01"),
    ("train.num_steps", 8, "train.num_steps: ran with 4, now 8"),
    ("flow.num_steps", 3, "flow.num_steps: ran with 2, now 3")])
def test_rerun_with_changed_config_is_refused(trained, field, value, shown):
  cfg, run, _, _ = trained
  before = (run / "config.json").read_text(), (run / "report.md").read_text()
  cfg2 = cfg.copy_and_resolve_references()
  block, name = field.split(".")
  cfg2[block][name] = value
  with pytest.raises(runrecord.ConfigMismatchError, match=shown):
    study_a.main(cfg2, run, progress=False)
  assert ((run / "config.json").read_text(), (run / "report.md").read_text()) == before


def test_dead_or_unknown_field_is_an_error(mini_mvtec, cache, tmp_path):
  cfg = _smoke_cfg(mini_mvtec, cache)
  import ml_collections
  cfg.loss = ml_collections.ConfigDict({"tail_weight": 1.5})   # the old, never-read block
  with pytest.raises(runrecord.ConfigFieldError, match=r"config\.loss\.tail_weight"):
    study_a.main(cfg, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


def test_bad_variant_is_named(mini_mvtec, cache, tmp_path):
  cfg = _smoke_cfg(mini_mvtec, cache)
  cfg.variants.tail_aware.top_k_ratio = 0.0
  with pytest.raises(ValueError, match=r"config\.variants\.tail_aware\.top_k_ratio"):
    study_a.main(cfg, tmp_path / "run", progress=False)


def test_bad_data_config_is_named(cache, tmp_path):
  cfg = _smoke_cfg(tmp_path / "nowhere", cache)
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    study_a.main(cfg, tmp_path / "run", progress=False)
  cfg.data.root = ""
  with pytest.raises(ValueError, match="config.data.root"):
    study_a.main(cfg, tmp_path / "run2", progress=False)


def test_unknown_category_is_named(mini_mvtec, cache):
  cfg = _smoke_cfg(mini_mvtec, cache)
  cfg.data.categories = "brick,carpet"
  with pytest.raises(ValueError, match=r"config.data.categories: \['carpet'\]"):
    pipeline.category_splits(cfg, mini_mvtec)


def test_summary_pairs_differences_by_seed():
  def rows(base, delta):
    return [{"variant": "mean_only", "seed": s,
             "metrics": {k: base[s] for k in evaluation.METRIC_KEYS}} for s in range(3)] + [
        {"variant": "tail_aware", "seed": s,
         "metrics": {k: base[s] + delta[s] for k in evaluation.METRIC_KEYS}} for s in range(3)]
  padim = {k: 0.5 for k in evaluation.METRIC_KEYS}
  results = {"a": {"rows": rows([0.2, 0.5, 0.8], [0.1, 0.1, 0.1]), "padim": padim},
             "b": {"rows": rows([0.3, 0.3, 0.3], [0.0, 0.2, 0.1]), "padim": padim}}
  s = study_a_conclusions.summarize(results, "mean_only", "tail_aware")
  d = s["categories"]["a"]["difference"]["pixel_ap"]
  # large seed-to-seed spread but a constant paired difference: the CI collapses on +0.1
  assert d["mean"] == pytest.approx(0.1) and d["hi"] - d["lo"] < 1e-9
  assert s["categories"]["a"]["mean_only"]["pixel_ap"]["std"] == pytest.approx(0.3)
  assert s["mean"]["difference"]["pixel_ap"]["values"] == pytest.approx([0.05, 0.15, 0.1])


def test_validation_split_comes_from_training_images_only(trained):
  cfg, run, _, _ = trained
  data = pipeline.Dataset(study_a_record.load_config(run)).load("gravel")
  n = len(data.train_index) + len(data.val_index)
  assert len(data.val_index) == round(cfg.data.val_fraction * n) > 0
  assert set(data.train_index).isdisjoint(data.val_index)
  assert sorted([*data.train_index, *data.val_index]) == list(range(n))
  flat = lambda a: {a[i].tobytes() for i in range(len(a))}
  assert flat(data.val_feats).isdisjoint(flat(data.test_feats))
  assert flat(data.val_feats).isdisjoint(flat(data.train_feats))
  with pytest.raises(ValueError, match=r"config.data.val_fraction must lie in \[0, 1\)"):
    pipeline.split_train_val(10, 1.0, 0)


def test_extended_run_equals_the_longer_run_and_says_so(trained, mini_mvtec, cache, tmp_path):
  """Trained to 2 steps, then `--extend`ed to 4 (budget 4 added): every budget's record equals
  the 4-step run's, and the report and manifest say the run was extended."""
  cfg, _, out, _ = trained
  short = _smoke_cfg(mini_mvtec, cache)
  short.train.num_steps, short.eval.budgets = 2, (0, 2)
  run = tmp_path / "run"
  study_a.main(short, run, progress=False)
  with pytest.raises(runrecord.ConfigMismatchError, match="--extend"):
    study_a.main(cfg, run, progress=False)
  ext = study_a.main(cfg, run, on_change="extend", progress=False)
  for cat in ("brick", "gravel"):
    for step in ("0", "2", "4"):
      for got, want in zip(ext["results"][cat]["budgets"][step],
                           out["results"][cat]["budgets"][step], strict=True):
        assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6), (cat, step)
  assert "trained to 2 steps first, then extended to 4" in (run / "report.md").read_text()
  assert runrecord.read_manifest(run)["extended"][0]["from_train.num_steps"] == 2


def test_rows_with_identical_scores_share_one_evaluation_with_the_same_numbers(trained):
  """evaluate_rows computes the host metrics once per distinct set of scores; a duplicated
  row gets the record its own evaluation would give, and a distinct row its own."""
  cfg, run, _, _ = trained
  tc = study_a_record.load_trained(run, "brick")["brick"]
  pick = lambda idx: jax.tree.map(lambda a: np.asarray(a)[np.asarray(idx)], tc.params_R)
  alone = [evaluation.evaluate_rows(cfg, tc.program, pick([i]), tc.data)[0] for i in (0, 2)]
  calls = []
  real = evaluation._evaluate
  def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
  evaluation._evaluate = counting
  try:
    recs = evaluation.evaluate_rows(cfg, tc.program, pick([0, 2, 0, 0]), tc.data)
  finally:
    evaluation._evaluate = real
  assert len(calls) == 2
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN too
  assert same(recs[0], alone[0]) and same(recs[2], alone[0]) and same(recs[3], alone[0])
  assert same(recs[1], alone[1]) and not same(recs[0], recs[1])
  recs[0]["metrics"]["pixel_ap"] = -1.0      # copies, not one shared dict
  assert recs[2]["metrics"]["pixel_ap"] == alone[0]["metrics"]["pixel_ap"]


def test_every_row_has_the_same_step_0_record(trained):
  """The flow starts as the identity map whatever the seed (``flows``), so every row's
  step-0 scores, hence records, are the same; after training they differ."""
  cfg, run, _, _ = trained
  budgets = json.loads((run / "metrics.json").read_text())["categories"]["brick"]["budgets"]
  dump = lambda r: json.dumps(r, sort_keys=True)
  assert len({dump(r) for r in budgets["0"]}) == 1 and len(budgets["0"]) == 4
  assert len({dump(r["metrics"]) for r in budgets["4"]}) == 4


def test_reopened_run_rewrites_the_same_report(trained, tmp_path):
  """The report written by ``main`` from the results in memory and the one rewritten from
  the finished run's saved records are the same bytes (one pipeline, two entries)."""
  import shutil
  _, run, out, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(run, copy)
  lines = study_a_report.rewrite_report(copy)
  for name in ("report.md", "conclusions.json"):
    assert (copy / name).read_text() == (run / name).read_text(), name
  assert (copy / "report.md").read_text() == "\n".join(lines).rstrip("\n") + "\n"
  con = json.loads((run / "conclusions.json").read_text())
  dump = lambda x: json.dumps(json.loads(io.to_json(x)), sort_keys=True)   # NaN-safe
  assert dump(con["final"]) == dump(out["summary"])
  assert "seconds" not in con["setup"]           # no wall time: runs compare byte for byte


# ----------------------------------------------------------------------------
# The difficulty ladder (data.ladder): the same rows scored on every rung
# ----------------------------------------------------------------------------


def _ladder_cfg(tmp_path, cache):
  from tailjax.configs import fastflow_textures
  cfg = fastflow_textures.get_config("smoke")
  cfg.data.root = str(tmp_path / "data" / "textures")
  cfg.data.categories = "brick,moon"
  cfg.data.image_size, cfg.data.n_train, cfg.data.n_test = 64, 8, 8
  cfg.data.cache_dir = str(cache)
  cfg.eval.size = 64
  cfg.eval.n_boot = 10
  cfg.flow.num_steps = 2
  cfg.train.batch_size, cfg.train.num_steps, cfg.train.segment_steps = 6, 4, 2
  cfg.eval.budgets = (0, 2, 4)
  cfg.report.n_examples = 0
  return cfg


@pytest.fixture(scope="module")
def laddered(tmp_path_factory, cache):
  tmp = tmp_path_factory.mktemp("laddered")
  cfg = _ladder_cfg(tmp, cache)
  run = tmp / "run"
  study_a.main(cfg, run, progress=False)
  return cfg, run


def test_every_rung_is_scored_once_at_the_last_budget(laddered):
  cfg, run = laddered
  saved = json.loads((run / "metrics.json").read_text())["categories"]
  for c in ("brick", "moon"):
    res = saved[c]
    assert [r["name"] for r in res["ladder"]] == [f"rung{j}" for j in range(5)]
    assert len(res["padim_rungs"]) == 5
    for step, recs in res["budgets"].items():
      for rec in recs:
        assert ("rungs" in rec) == (step == "4")
        assert len(rec["boot"]["pixel_ap"]) == 10 and rec["by_kind"]
    last = res["budgets"]["4"]
    assert all(len(rec["rungs"]) == 5 for rec in last)
    # Rungs differ only in strength: the strongest rung is at least as easy for PaDiM.
    assert res["padim_rungs"][-1]["image_auroc"] >= res["padim_rungs"][0]["image_auroc"]
  con = json.loads((run / "conclusions.json").read_text())
  assert len(con["ladder"]["rungs"]) == 10 and con["ladder"]["step"] == 4
  assert set(con["ladder"]["dose"]) == {"pixel_ap", "image_auroc"}
  report = (run / "report.md").read_text()
  assert "## Dose–response within categories (the difficulty ladder)" in report
  assert "## By defect kind" in report and "Does the effect grow with detectability?" in report


def test_a_ladder_whose_train_split_differs_from_the_texture_build_is_refused(laddered,
                                                                              tmp_path):
  cfg, _ = laddered
  lad = pipeline.ladder_root(cfg)
  victim = sorted((lad / "moon" / "train" / "good").glob("*.png"))[0]
  original = victim.read_bytes()
  try:
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"ladder .*moon/train differs from the texture build"):
      pipeline.Dataset(cfg)
  finally:
    victim.write_bytes(original)
