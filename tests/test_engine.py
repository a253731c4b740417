"""The one flow driver: resume, evaluation hook, NaN halts, Ctrl-C, layout, sharding."""

import contextlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailjax import engine, io, runrecord, sharding
from tailjax import train as train_lib

FEATS = np.random.default_rng(0).normal(size=(16, 4, 4, 6)).astype(np.float32)


def _cfg(num_steps=6, segment_steps=3, rows="auto", layer_norm="image", kernel_mode="alternate",
         flow_steps=2):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": flow_steps, "kernel_mode": kernel_mode, "hidden_ratio": 1.0,
            "layer_norm": layer_norm}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 10.0}
  c.train = {"num_steps": num_steps, "batch_size": 4, "segment_steps": segment_steps,
             "row_mode": rows, "conv_impl": "auto", "batch_devices": 1}
  return c


ROWS = engine.Rows.from_dicts([
    {"tail_weight": 0.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
    {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
    {"tail_weight": 1.0, "top_k_ratio": 0.5, "learning_rate": 3e-3, "seed": 1}])
ONE_DEV = sharding.make_mesh(devices=jax.devices()[:1])


@contextlib.contextmanager
def _run(path, cfg):
  with runrecord.open_run(path, cfg, kind="test") as run:
    yield run


def _train(path, cfg, rows=ROWS, feats=FEATS, mesh=ONE_DEV, **kw):
  with _run(path, cfg) as run:
    return engine.run_rows(cfg, run, "cat", feats, rows, mesh=mesh, progress=False, **kw)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def test_rows_equal_the_pure_train_function(tmp_path):
  """Row i of the driver == train(hparams_i, key(seed_i), feats), the purejaxrl function."""
  cfg = _cfg(num_steps=6, segment_steps=4)          # segments of 4 + 2 steps
  res = _train(tmp_path / "r", cfg)
  train = jax.jit(train_lib.make_train(cfg, FEATS.shape))
  for i in range(3):
    h = {k: ROWS.hparams_R[k][i] for k in engine.HPARAM_NAMES}
    state, _ = train(h, train_lib.row_keys([ROWS.seeds_R[i]])[0], jnp.asarray(FEATS))
    for a, b in zip(_leaves(jax.tree.map(lambda x: x[i], res.params_R)), _leaves(state.params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_resume_is_bit_identical_and_logs_each_step_once(tmp_path):
  cfg = _cfg(num_steps=7)                            # segments 3, 3, 1
  full = _train(tmp_path / "full", cfg)
  part = _train(tmp_path / "cut", cfg, max_segments=1)
  assert (part.step, part.finished) == (3, False)
  done = _train(tmp_path / "cut", cfg)
  assert (done.resumed_from, done.step, done.finished) == (3, 7, True)
  assert _equal(done.params_R, full.params_R)
  logged = io.read_jsonl(tmp_path / "cut" / "cat" / "metrics.jsonl")
  assert [r["step"] for r in logged] == [3, 6, 7]
  assert logged == io.read_jsonl(tmp_path / "full" / "cat" / "metrics.jsonl")


def test_evaluation_ladder_rows_equal_runs_stopped_there(tmp_path):
  """The hook at steps (0, 2, 5) sees exactly the states of separate runs of 2 and 5 steps
  (one compiled segment program, so cutting the run changes nothing)."""
  seen = {}

  def evaluate(step, params_R, program):
    seen[step] = params_R
    return [{"sum": float(sum(np.sum(x[i]) for x in jax.tree.leaves(params_R)))} for i in range(3)]

  res = _train(tmp_path / "ladder", _cfg(num_steps=6, segment_steps=4), eval_steps=(0, 2, 5),
               evaluate=evaluate)
  assert sorted(res.evals) == [0, 2, 5] and len(res.evals[2]) == 3
  for budget in (2, 5):
    short = _train(tmp_path / f"stop{budget}", _cfg(num_steps=budget, segment_steps=4))
    assert _equal(seen[budget], short.params_R), budget
  init = jax.jit(jax.vmap(lambda h, k: train_lib.make_flow_program(_cfg(), FEATS.shape).init(h, k)))(
      {k: jnp.asarray(v) for k, v in ROWS.hparams_R.items()}, train_lib.row_keys(ROWS.seeds_R))
  assert _equal(seen[0], init.params)
  # A resumed run does not evaluate again: the saved units are reused.
  seen.clear()
  again = _train(tmp_path / "ladder", _cfg(num_steps=6, segment_steps=4), eval_steps=(0, 2, 5),
                 evaluate=evaluate)
  assert seen == {} and again.evals == res.evals


def test_layout_is_independent_of_row_mode(tmp_path):
  """Trained with lax.map (CPU's default), reloaded and resumed with vmap: restored, not retrained."""
  res = _train(tmp_path / "run", _cfg(rows="map"))
  program, params, step = engine.load_rows(_cfg(rows="vmap"), tmp_path / "run", "cat",
                                           FEATS.shape, ROWS)
  assert step == 6 and _equal(params, res.params_R)
  again = _train(tmp_path / "run", _cfg(rows="vmap"))
  assert again.resumed_from == 6 and _equal(again.params_R, res.params_R)


def test_changed_rows_or_data_are_refused(tmp_path):
  _train(tmp_path / "run", _cfg())
  with pytest.raises(runrecord.ConfigMismatchError, match="feats_sha256"):
    _train(tmp_path / "run", _cfg(), feats=FEATS + 1.0)
  rows = engine.Rows.from_dicts([dict(ROWS.row(0), seed=9)])
  with pytest.raises(runrecord.ConfigMismatchError, match="rows"):
    _train(tmp_path / "run", _cfg(), rows=rows)


def _poisoned(first_step_after=2):
  """FEATS with one image so large that its NLL overflows (layer_norm "none"), chosen as the
  first image drawn (by seed 0's batches) at a step ≥ ``first_step_after``."""
  key = train_lib.row_keys([0])[0]
  drawn = [set(np.asarray(jax.random.randint(
      jax.random.fold_in(jax.random.fold_in(key, 1), t), (4,), 0, 16)).tolist()) for t in range(40)]
  firsts = {j: next(t for t in range(40) if j in drawn[t]) for j in range(16)}
  j = min((j for j in firsts if firsts[j] >= first_step_after), key=firsts.get)
  feats = FEATS.copy()
  feats[j] = 1e25
  return feats, firsts[j]


def test_nan_later_keeps_a_state_whose_next_loss_is_finite(tmp_path):
  feats, t_bad = _poisoned(first_step_after=4)    # the batch of step t_bad + 1 holds the image
  cfg = _cfg(num_steps=12, segment_steps=2, layer_norm="none", kernel_mode="1x1")
  rows = engine.Rows.from_dicts([{"tail_weight": 0.5, "top_k_ratio": 0.25, "learning_rate": 1e-3,
                                  "seed": 0}])
  bad_step, good = t_bad + 1, t_bad - 1
  assert bad_step <= 12
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=rf"step {bad_step} in row 0 .*step {good}, whose loss on its next batch"):
    _train(tmp_path / "run", cfg, rows=rows, feats=feats)
  ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "cat" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert max(ckpts) == good
  program, params, step = engine.load_rows(cfg, tmp_path / "run", "cat", feats.shape, rows)
  assert step == good
  # The named state's loss on its own next batch (step good + 1) is finite; the next is not.
  loss_fn = train_lib.make_flow_loss(program.model)
  h = {"tail_weight": 0.5, "top_k_ratio": 0.25}
  p0 = jax.tree.map(lambda a: jnp.asarray(a[0]), params)
  batch = train_lib.sample_batch(jnp.asarray(feats), 4, train_lib.row_keys([0])[0], good)
  assert np.isfinite(float(loss_fn(p0, batch, h, None)[0]))


def test_nan_at_the_first_step_says_there_is_no_good_state(tmp_path):
  cfg = _cfg(num_steps=4, segment_steps=2, layer_norm="none", kernel_mode="1x1")
  with pytest.raises(train_lib.NonFiniteLossError, match="step 1 in row .*no good state"):
    _train(tmp_path / "run", cfg, feats=FEATS * 1e25)
  assert not any(p.name.isdigit() for p in (tmp_path / "run" / "cat" / "checkpoints").iterdir())


def test_ctrl_c_closes_cleanly_and_resumes(tmp_path, monkeypatch):
  cfg = _cfg(num_steps=6, segment_steps=2)
  full = _train(tmp_path / "full", cfg)
  real = engine._row_fns
  calls = []

  def interrupting(*a, **k):
    program, init, segment = real(*a, **k)

    def seg(*args):
      calls.append(1)
      if len(calls) == 2:
        raise KeyboardInterrupt
      return segment(*args)
    return program, init, seg

  monkeypatch.setattr(engine, "_row_fns", interrupting)
  with pytest.raises(engine.Interrupted, match=r"interrupted at step 2 .*resumes from step 2"):
    _train(tmp_path / "cut", cfg)
  monkeypatch.setattr(engine, "_row_fns", real)
  done = _train(tmp_path / "cut", cfg)
  assert done.resumed_from == 2 and _equal(done.params_R, full.params_R)


def test_sharded_rows_equal_unsharded_with_padding_and_resume(tmp_path):
  """3 rows on 1 device; on 4 devices (padded to 4 rows, the copy dropped); on a 2 × 2 mesh
  (rows over 2 devices, each row's batch split over 2) with vmapped rows; and cut on 4
  devices, resumed on 1: all the same training."""
  cfg = _cfg(num_steps=4, segment_steps=2)
  one = _train(tmp_path / "one", cfg)
  four = _train(tmp_path / "four", cfg, mesh=sharding.make_mesh())
  both = _train(tmp_path / "both", _cfg(num_steps=4, segment_steps=2, rows="vmap"),
                mesh=sharding.make_mesh(batch_devices=2))
  cut = _train(tmp_path / "cut", cfg, mesh=sharding.make_mesh(), max_segments=1)
  assert (cut.step, cut.finished) == (2, False)
  resumed = _train(tmp_path / "cut", cfg)
  assert (resumed.resumed_from, resumed.finished) == (2, True)
  for other in (four, both, resumed):
    for a, b in zip(_leaves(one.params_R), _leaves(other.params_R)):
      assert a.shape[0] == 3                       # padding dropped
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  rows = _leaves(one.params_R)[1]
  assert not np.allclose(rows[0], rows[2])         # λ = 0 and λ = 1 trained differently


def test_rows_validation_names_the_field():
  with pytest.raises(ValueError, match=r"^config\.loss\.tail_weight \(λ\) must lie in \[0, 1\]"):
    engine.Rows.from_dicts([{"tail_weight": 1.5, "top_k_ratio": 0.1, "learning_rate": 1e-3,
                             "seed": 0}], where="config.loss")
  with pytest.raises(ValueError, match=r"^rows\.learning_rate must be > 0"):
    engine.Rows.from_dicts([{"tail_weight": 0.5, "top_k_ratio": 0.1, "learning_rate": 0.0,
                             "seed": 0}])
  with pytest.raises(ValueError, match=r"^rows\.top_k_ratio is missing"):
    engine.Rows.from_dicts([{"tail_weight": 0.5, "seed": 0}])
  with pytest.raises(ValueError, match=r"^config\.seed: seeds must be non-negative integers"):
    engine.Rows.from_dicts([{"tail_weight": 0.5, "top_k_ratio": 0.1, "learning_rate": 1e-3,
                             "seed": -1}], seed_field="config.seed")


def _variants_cfg(**tail_aware):
  c = ml_collections.ConfigDict()
  c.seed, c.num_seeds = 3, 2
  c.optim = {"learning_rate": 1e-3}
  c.variants = {"mean_only": {"tail_weight": 0.0, "top_k_ratio": 0.02},
                "tail_aware": {"tail_weight": 0.7, "top_k_ratio": 0.02, "learning_rate": 3e-3,
                               "tail_nll": "even_share", **tail_aware}}
  return c


def test_rows_from_variants_are_variant_major_and_name_the_variant():
  rows = engine.Rows.from_variants(_variants_cfg())
  assert [(r["variant"], r["seed"], r["learning_rate"], r["tail_nll"]) for r in rows.rows] == [
      ("mean_only", 3, 1e-3, "exact"), ("mean_only", 4, 1e-3, "exact"),
      ("tail_aware", 3, 3e-3, "even_share"), ("tail_aware", 4, 3e-3, "even_share")]
  assert list(rows.row(0)) == ["variant", *engine.HPARAM_NAMES, "tail_nll", "seed"]
  for field, value, message in (("top_k_ratio", 0.0, r"\(r\) must lie in \(0, 1\]"),
                                ("learning_rate", -1.0, "must be > 0"),
                                ("tail_nll", "logdet_only", "must be one of")):
    with pytest.raises(ValueError, match=rf"^config\.variants\.tail_aware\.{field} {message}"):
      engine.Rows.from_variants(_variants_cfg(**{field: value}))


def test_rows_carry_the_tail_nll_definition():
  rows = engine.Rows.from_dicts([
      {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
      {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0,
       "tail_nll": "even_share"},
      {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0,
       "tail_nll": "sq_norm"}])
  assert [r["tail_nll"] for r in rows.to_json()] == ["exact", "even_share", "sq_norm"]
  h = rows.hparams_R
  np.testing.assert_array_equal(h["tail_logdet_weight"], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(h["tail_share_weight"], [0.0, 1.0, 0.0])
  with pytest.raises(ValueError, match=r"^config\.variants\.x\.tail_nll must be one of"):
    engine.Rows.from_dicts([{"tail_weight": 0.5, "top_k_ratio": 0.1, "learning_rate": 1e-3,
                             "seed": 0, "tail_nll": "logdet_only"}], where="config.variants.x")


def test_an_even_share_row_equals_its_pure_train_function(tmp_path):
  cfg = _cfg(num_steps=4, segment_steps=4)
  rows = engine.Rows.from_dicts([
      {"tail_weight": 1.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
      {"tail_weight": 1.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0,
       "tail_nll": "even_share"}])
  res = _train(tmp_path / "r", cfg, rows=rows)
  train = jax.jit(train_lib.make_train(cfg, FEATS.shape))
  h = {k: v[1] for k, v in rows.hparams_R.items()}
  state, _ = train(h, train_lib.row_keys([0])[0], jnp.asarray(FEATS))
  for a, b in zip(_leaves(jax.tree.map(lambda x: x[1], res.params_R)), _leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  first = _leaves(jax.tree.map(lambda x: x[0], res.params_R))
  assert not all(np.allclose(a, b) for a, b in zip(first, _leaves(state.params)))


def test_boundaries_cover_segments_and_evaluations():
  assert engine.boundaries(10, 4, (0, 3, 10)) == [3, 4, 8, 10]
  assert engine.boundaries(5, 10, ()) == [5]


def test_extended_run_equals_a_fresh_longer_run(tmp_path):
  """Trained to 5 steps (evaluated at 0, 2, 5), then extended to 8 (evaluating at 8): the
  parameters, the training log and every evaluation equal one 8-step run's, and nothing
  before step 5 is evaluated again."""
  calls = []

  def evaluate(step, params_R, program):
    calls.append(step)
    return [{"sum": float(sum(np.sum(x[i]) for x in jax.tree.leaves(params_R)))} for i in range(3)]

  def train(path, steps, budgets, on_change="error"):
    cfg = _cfg(num_steps=steps, segment_steps=4)
    cfg.eval = {"budgets": budgets}
    with runrecord.open_run(path, cfg, kind="test", on_change=on_change, extendable=True) as run:
      return engine.run_rows(cfg, run, "cat", FEATS, ROWS, mesh=ONE_DEV, progress=False,
                             eval_steps=budgets, evaluate=evaluate)

  full = train(tmp_path / "full", 8, (0, 2, 5, 8))
  train(tmp_path / "ext", 5, (0, 2, 5))
  with pytest.raises(runrecord.ConfigMismatchError, match="--extend"):
    train(tmp_path / "ext", 8, (0, 2, 5, 8))
  calls.clear()
  ext = train(tmp_path / "ext", 8, (0, 2, 5, 8), on_change="extend")
  assert calls == [8] and (ext.resumed_from, ext.step, ext.finished) == (5, 8, True)
  assert _equal(ext.params_R, full.params_R) and ext.evals == full.evals
  logged = io.read_jsonl(tmp_path / "ext" / "cat" / "metrics.jsonl")
  full_log = io.read_jsonl(tmp_path / "full" / "cat" / "metrics.jsonl")
  assert [r["step"] for r in logged] == [r["step"] for r in full_log] == [2, 4, 5, 8]
  assert logged == full_log
  assert json.loads((tmp_path / "ext" / "cat" / "rows.json").read_text())["num_steps"] == 8


def _events(run_dir):
  """(tag, step, value) of every scalar in a TensorBoard run folder, in file order, with
  TensorBoard's rule for a purge: a file's SessionLog START at step s hides every earlier
  file's events at steps ≥ s."""
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  for f in sorted(run_dir.glob("events.out.tfevents.*")):
    data, at = f.read_bytes(), 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      ev = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        out = [e for e in out if e[1] < ev.step]
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out


def test_tensorboard_scalars_per_row_and_a_resume_logs_each_step_once(tmp_path):
  cfg = _cfg(num_steps=6, segment_steps=2)
  evaluate = lambda step, params_R, program: [{"metrics": {"auc": 0.5 + step / 100 + i}, "tag": "x"}
                                     for i in range(3)]
  _train(tmp_path / "cut", cfg, eval_steps=(0, 4), evaluate=evaluate, max_segments=2)
  res = _train(tmp_path / "cut", cfg, eval_steps=(0, 4), evaluate=evaluate)
  runs = sorted(p.name for p in (tmp_path / "cut" / "tensorboard" / "cat").iterdir())
  assert runs == sorted(engine.row_labels(ROWS)) == [
      "tail_weight=0,top_k_ratio=0.25,learning_rate=0.01,seed=0",
      "tail_weight=0.7,top_k_ratio=0.25,learning_rate=0.01,seed=0",
      "tail_weight=1,top_k_ratio=0.5,learning_rate=0.003,seed=1"]
  log = io.read_jsonl(tmp_path / "cut" / "cat" / "metrics.jsonl")
  for i, name in enumerate(engine.row_labels(ROWS)):
    ev = _events(tmp_path / "cut" / "tensorboard" / "cat" / name)
    loss = [(s, v) for t, s, v in ev if t == "train/loss"]
    assert loss == [(r["step"], pytest.approx(r["loss"][i])) for r in log]   # 2, 4, 6 once
    assert [(s, v) for t, s, v in ev if t == "eval/metrics/auc"] == [
        (0, pytest.approx(0.5 + i)), (4, pytest.approx(0.54 + i))]
  assert res.finished


def test_rerunning_a_finished_grid_writes_nothing(tmp_path):
  cfg = _cfg(num_steps=4, segment_steps=2)
  _train(tmp_path / "w", cfg)
  files = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "w" / "cat").rglob("*")
           if p.is_file()} | {p: (p.stat().st_mtime_ns, p.stat().st_ino)
                              for p in (tmp_path / "w" / "tensorboard").rglob("*")}
  again = _train(tmp_path / "w", cfg)
  assert again.resumed_from == 4 and again.finished
  now = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "w" / "cat").rglob("*")
         if p.is_file()} | {p: (p.stat().st_mtime_ns, p.stat().st_ino)
                            for p in (tmp_path / "w" / "tensorboard").rglob("*")}
  assert now == files                      # metrics.jsonl and the event files untouched


def test_engine_functions_stay_short():
  """The driver reads as named steps (plan, rows record, grid, restore, segment loop,
  evaluation, halt): no function of the engine is longer than 60 lines."""
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(engine))
  long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
          and n.end_lineno - n.lineno + 1 > 60}
  assert long == {}
