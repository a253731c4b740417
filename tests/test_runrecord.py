"""The run record: manifest, config check before anything is written, lock, field checks."""

import json
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from tailjax import runrecord


def _cfg(lr=1e-3, steps=10, rows="auto"):
  c = ml_collections.ConfigDict()
  c.optim = {"name": "adam", "learning_rate": lr}
  c.train = {"num_steps": steps, "row_mode": rows}
  c.flow = {"num_steps": 4}
  return c


def test_manifest_records_config_code_environment(tmp_path):
  with runrecord.open_run(tmp_path / "w", _cfg(), kind="t") as run:
    assert run.fresh
    run.record(row_mode="map")
  m = runrecord.read_manifest(tmp_path / "w")
  assert m["kind"] == "t" and m["results_fields"]["optim.learning_rate"] == 1e-3
  assert "train.row_mode" not in m["results_fields"]         # execution, not results
  inv = m["invocations"][-1]
  assert inv["row_mode"] == "map" and inv["backend"] == "cpu"
  assert inv["packages"]["jax"] and inv["code"]["source_sha256"]
  assert set(inv["lock"]) >= {"lock_file", "sha256"}
  assert json.loads((tmp_path / "w" / "config.json").read_text())["train"]["num_steps"] == 10


def test_changed_config_is_refused_naming_fields_and_touching_nothing(tmp_path):
  w = tmp_path / "w"
  with runrecord.open_run(w, _cfg(), kind="t") as run:
    run.save_unit("cat/eval/10", {"x": 1})
  before = {p: p.read_bytes() for p in w.rglob("*") if p.is_file() and p.name != ".lock"}
  with pytest.raises(runrecord.ConfigMismatchError) as err:
    with runrecord.open_run(w, _cfg(lr=1e-2, steps=20), kind="t"):
      pass
  msg = str(err.value)
  assert "optim.learning_rate: ran with 0.001, now 0.01" in msg
  assert "train.num_steps: ran with 10, now 20" in msg
  after = {p: p.read_bytes() for p in w.rglob("*") if p.is_file() and p.name != ".lock"}
  assert after == before                                  # config.json not overwritten
  # Execution-only fields may change; the run resumes and records another invocation.
  with runrecord.open_run(w, _cfg(rows="vmap"), kind="t") as run:
    assert not run.fresh and run.load_unit("cat/eval/10") == {"x": 1}
  assert len(runrecord.read_manifest(w)["invocations"]) == 2


def test_restart_and_branch(tmp_path):
  w = tmp_path / "w"
  with runrecord.open_run(w, _cfg(), kind="t") as run:
    run.save_unit("u", {"x": 1})
  with runrecord.open_run(w, _cfg(lr=5e-3), kind="t", on_change="branch") as run:
    assert run.workdir != w and run.workdir.name.startswith("w-") and run.fresh
  assert runrecord.read_manifest(w)["results_fields"]["optim.learning_rate"] == 1e-3
  with runrecord.open_run(w, _cfg(lr=5e-3), kind="t", on_change="restart") as run:
    assert run.fresh and run.load_unit("u") is None
  assert runrecord.read_manifest(w)["results_fields"]["optim.learning_rate"] == 5e-3


def test_foreign_files_without_manifest_are_refused(tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(runrecord.ConfigMismatchError, match="no manifest.json"):
    with runrecord.open_run(tmp_path / "w", _cfg(), kind="t"):
      pass


def test_other_kind_is_refused(tmp_path):
  with runrecord.open_run(tmp_path / "w", _cfg(), kind="study_a"):
    pass
  with pytest.raises(runrecord.ConfigMismatchError, match="kind: ran 'study_a', now 'sweep'"):
    with runrecord.open_run(tmp_path / "w", _cfg(), kind="sweep"):
      pass


_HOLD = """
import sys, time, ml_collections
from tailjax import runrecord
c = ml_collections.ConfigDict({"a": 1})
with runrecord.open_run(sys.argv[1], c, kind="t"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_fails_fast_and_stale_lock_is_taken_over(tmp_path):
  w = tmp_path / "w"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(w)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    with pytest.raises(runrecord.WorkdirLockedError,
                       match=rf"in use by process {holder.pid} on .*one process per workdir"):
      with runrecord.open_run(w, ml_collections.ConfigDict({"a": 1}), kind="t"):
        pass
    assert time.time() - t0 < 2.0
  finally:
    holder.send_signal(signal.SIGKILL)      # a killed run leaves its lock file behind...
    holder.wait()
  assert (w / ".lock").exists()
  with runrecord.open_run(w, ml_collections.ConfigDict({"a": 1}), kind="t") as run:
    assert not run.fresh                     # ...and the next process takes it over
  assert json.loads((w / ".lock").read_text() or "{}") == {}


def test_check_fields_names_unknown_fields():
  c = ml_collections.ConfigDict({"a": 1, "loss": {"tail_weight": 1.5, "top_k_ratio": 0.1},
                                 "variants": {"x": {"tail_weight": 0.0}}})
  runrecord.check_fields(c, ("a", "loss.*", "variants.*.tail_weight"))
  with pytest.raises(runrecord.ConfigFieldError, match=r"config\.loss\.tail_weight, "
                                                       r"config\.loss\.top_k_ratio: no stage"):
    runrecord.check_fields(c, ("a", "variants.*.tail_weight"))


def test_unit_names_stay_inside_the_workdir(tmp_path):
  with runrecord.open_run(tmp_path / "w", _cfg(), kind="t") as run:
    with pytest.raises(ValueError, match="'..'"):
      run.save_unit("../escape", {})


def _ext_cfg(steps=10, budgets=(0, 5, 10), lr=1e-3):
  c = _cfg(lr=lr, steps=steps)
  c.eval = {"budgets": budgets}
  return c


def test_extend_accepts_only_a_longer_run_and_records_it(tmp_path):
  w = tmp_path / "w"
  with runrecord.open_run(w, _ext_cfg(), kind="t", extendable=True) as run:
    run.save_unit("cat/eval/10", {"x": 1})
  refused = {
      "optim.learning_rate: ran with 0.001, now 0.01": _ext_cfg(steps=20, lr=1e-2),
      "an extension trains longer": _ext_cfg(steps=8, budgets=(0, 5)),
      "drops [5]": _ext_cfg(steps=20, budgets=(0, 10, 20)),
      "adds [7], not beyond the old train.num_steps=10": _ext_cfg(steps=20,
                                                                  budgets=(0, 5, 7, 10, 20)),
  }
  before = (w / "manifest.json").read_bytes()
  for message, cfg in refused.items():
    with pytest.raises(runrecord.ConfigMismatchError, match=message.replace("[", r"\[")):
      with runrecord.open_run(w, cfg, kind="t", on_change="extend", extendable=True):
        pass
  assert (w / "manifest.json").read_bytes() == before
  # Without --extend, a pure extension is refused as any change, and the message offers it.
  with pytest.raises(runrecord.ConfigMismatchError, match="--extend"):
    with runrecord.open_run(w, _ext_cfg(steps=20, budgets=(0, 5, 10, 20)), kind="t",
                            extendable=True):
      pass
  with pytest.raises(ValueError, match="cannot be extended"):
    with runrecord.open_run(w, _ext_cfg(steps=20), kind="t", on_change="extend"):
      pass
  with runrecord.open_run(w, _ext_cfg(steps=20, budgets=(0, 5, 10, 20)), kind="t",
                          on_change="extend", extendable=True) as run:
    assert not run.fresh and run.load_unit("cat/eval/10") == {"x": 1}
  m = runrecord.read_manifest(w)
  assert m["results_fields"]["train.num_steps"] == 20
  ext, = m["extended"]
  assert (ext["from_train.num_steps"], ext["to_train.num_steps"]) == (10, 20)
  assert (ext["from_eval.budgets"], ext["to_eval.budgets"]) == ([0, 5, 10], [0, 5, 10, 20])
  assert m["invocations"][-1]["extended"] == ext and "extended" not in m["invocations"][0]
  # The extended config now resumes as itself; the extension stays on record.
  with runrecord.open_run(w, _ext_cfg(steps=20, budgets=(0, 5, 10, 20)), kind="t",
                          extendable=True):
    pass
  assert len(runrecord.read_manifest(w)["extended"]) == 1


def test_read_run_verifies_the_manifest_without_writing(tmp_path):
  w = tmp_path / "w"
  with runrecord.open_run(w, _cfg(), kind="t"):
    pass
  listing = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(w.rglob("*"))}
  m = runrecord.read_run(w, kind="t")
  assert m == runrecord.read_manifest(w) and m["config"]["optim"]["learning_rate"] == 1e-3
  with pytest.raises(ValueError, match="holds a 't' run, not a 'mil' run"):
    runrecord.read_run(w, kind="mil")
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(w.rglob("*"))} == listing
  # A hand-edited config no longer matches the hash the run was recorded under.
  m["config"]["optim"]["learning_rate"] = 0.5
  (w / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(runrecord.ConfigMismatchError, match="manifest.json: the stored config does not"):
    runrecord.read_run(w, kind="t")
  with pytest.raises(FileNotFoundError, match="manifest.json not found"):
    runrecord.read_run(tmp_path / "absent", kind="t")


def test_unwritable_workdir_is_one_line_naming_it(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(runrecord.WorkdirNotWritableError, match=r"file/w is not writable"):
    with runrecord.open_run(blocker / "w", _cfg(), kind="t"):
      pass
  # A read-only mount (root ignores chmod here, so the file system's answer is simulated).
  import errno
  import os
  real_open = os.open

  def read_only(path, *a, **k):
    if str(path).endswith(runrecord.LOCK):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, *a, **k)

  monkeypatch.setattr(runrecord.os, "open", read_only)
  with pytest.raises(runrecord.WorkdirNotWritableError) as err:
    with runrecord.open_run(tmp_path / "ro", _cfg(), kind="t"):
      pass
  assert str(err.value) == (f"{tmp_path / 'ro'} is not writable (Read-only file system); a run "
                            "writes its record there: give a writable --workdir")


def test_a_fresh_run_that_fails_before_any_result_leaves_no_record(tmp_path):
  w = tmp_path / "w"
  with pytest.raises(FileNotFoundError):
    with runrecord.open_run(w, _cfg(), kind="t") as run:
      (run.path("cat")).mkdir()                          # an empty folder is no result
      raise FileNotFoundError("data.root: /nope does not exist")
  assert sorted(p.name for p in w.iterdir()) == [".lock"]
  # The corrected command runs there as new, without --restart.
  with runrecord.open_run(w, _cfg(lr=5e-3), kind="t") as run:
    assert run.fresh
    run.save_unit("u", {"x": 1})
  # Once a result exists, a failure keeps the record (the run resumes).
  with pytest.raises(RuntimeError):
    with runrecord.open_run(w, _cfg(lr=5e-3), kind="t"):
      raise RuntimeError("later failure")
  assert runrecord.read_manifest(w)["results_fields"]["optim.learning_rate"] == 5e-3


def test_refusals_are_one_line(tmp_path):
  w = tmp_path / "w"
  with runrecord.open_run(w, _cfg(), kind="t", extendable=True):
    pass
  cases = ((_cfg(lr=1e-2, steps=20), "error", "optim.learning_rate: ran with 0.001, now 0.01"),
           (_cfg(lr=1e-2, steps=20), "extend", "only train.num_steps and eval.budgets can be"),
           (_cfg(steps=5), "extend", "train.num_steps: ran with 10, now 5; an extension trains"))
  for cfg, on_change, part in cases:
    with pytest.raises(runrecord.ConfigMismatchError) as err:
      with runrecord.open_run(w, cfg, kind="t", on_change=on_change, extendable=True):
        pass
    assert "\n" not in str(err.value) and str(err.value).startswith(str(w)), on_change
    assert part in str(err.value)


def test_a_run_written_before_a_field_rename_still_verifies_under_the_new_names(tmp_path):
  """A manifest whose config uses names from before ``RENAMED_FIELDS`` (``train.rows``,
  the ``analysis`` block), hashed with the exclusions of that time, is verified by
  ``read_run`` and read under today's names; a hand-edited one is still refused."""
  old_cfg = {"optim": {"name": "adam", "learning_rate": 1e-3},
             "train": {"num_steps": 10, "rows": "map"}, "analysis": {"enabled": True}}
  old_not_results = tuple(p for p in runrecord.NOT_RESULTS
                          if p not in ("train.row_mode", "mechanisms.*")) + (
                              "train.rows", "analysis.*")
  fields = runrecord.results_fields(old_cfg, old_not_results)
  assert "train.rows" not in fields and "analysis.enabled" not in fields
  w = tmp_path / "old"
  w.mkdir()
  manifest = {"kind": "t", "config": old_cfg, "config_hash": runrecord.config_hash(fields),
              "results_fields": fields}
  (w / runrecord.MANIFEST).write_text(json.dumps(manifest))
  m = runrecord.read_run(w, kind="t")
  assert m["config"]["train"] == {"num_steps": 10, "row_mode": "map"}
  assert m["config"]["mechanisms"] == {"enabled": True} and "analysis" not in m["config"]
  manifest["config"]["train"]["num_steps"] = 11
  (w / runrecord.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(runrecord.ConfigMismatchError, match="config_hash"):
    runrecord.read_run(w, kind="t")
