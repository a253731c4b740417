import json

import numpy as np
import pytest

from tailjax import io


def test_read_npz_roundtrip_and_corrupt_files(tmp_path):
  good = tmp_path / "good.npz"
  np.savez(good, a=np.arange(3), b=np.ones((2, 2)))
  arrays = io.read_npz(good)
  assert sorted(arrays) == ["a", "b"] and arrays["a"].tolist() == [0, 1, 2]
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"truncated\.npz: not a readable \.npz"):
    io.read_npz(truncated)
  garbage = tmp_path / "garbage.npz"
  garbage.write_text("not a zip")
  with pytest.raises(KeyError, match="garbage.npz"):
    io.read_npz(garbage, error=KeyError)


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
  target = tmp_path / "out.json"
  io.atomic_write_json(target, {"x": 1})
  with pytest.raises(RuntimeError):
    with io.atomic_path(target) as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash mid-write")
  assert json.loads(target.read_text()) == {"x": 1}  # the old file is untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_directory_keeps_old_copy_on_failure(tmp_path):
  d = tmp_path / "tree"
  with io.atomic_directory(d) as tmp:
    (tmp / "a.txt").write_text("v1")
  with pytest.raises(RuntimeError):
    with io.atomic_directory(d) as tmp:
      (tmp / "a.txt").write_text("v2")
      raise RuntimeError("crash")
  assert (d / "a.txt").read_text() == "v1"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_jsonl_truncate_after(tmp_path):
  w = io.JsonlWriter(tmp_path / "m.jsonl")
  for s in (10, 20, 30):
    w.write({"step": s})
  w.truncate_after(20)
  assert [r["step"] for r in io.read_jsonl(tmp_path / "m.jsonl")] == [10, 20]


def test_first_few_lists_a_few_then_counts_the_rest():
  assert io.first_few(range(3)) == "0, 1, 2" and io.first_few(range(9), 2) == "0, 1 (and 7 more)"


def test_tensorboard_writers_opened_in_the_same_second_keep_both_files(tmp_path):
  from tailjax import io as tio
  for step in (1, 2):
    w = tio.TensorBoardWriter(tmp_path, ["run"], purge_step=step)
    w.scalars(step, [{"x": float(step)}])
    w.close()
  files = sorted((tmp_path / "run").glob("events.out.tfevents.*"))
  assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)
