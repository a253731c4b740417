"""Faults a cluster user meets, each handled in one line and losing nothing: --restart next
to a user's files, file modes under the umask, impossible sizes, a damaged checkpoint, a
read-only feature cache, and SIGTERM / SIGINT during training (a real subprocess)."""

import contextlib
import dataclasses
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tailjax import cli, engine, io, runrecord, sharding
from tailjax.configs import fastflow_mvtec
from tailjax.data import features as F
from tailjax.data import pipeline, textures

FEATS = np.random.default_rng(0).normal(size=(16, 4, 4, 6)).astype(np.float32)
ROWS = engine.Rows.from_dicts([
    {"tail_weight": 0.0, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 0},
    {"tail_weight": 0.7, "top_k_ratio": 0.25, "learning_rate": 1e-2, "seed": 1}])
ONE_DEV = sharding.make_mesh(devices=jax.devices()[:1])
REPO = Path(__file__).resolve().parents[1]


def _cfg(num_steps=6, lr=1e-2, batch_size=4):
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 2, "kernel_mode": "alternate", "hidden_ratio": 1.0,
            "layer_norm": "image"}
  c.optim = {"name": "adam", "learning_rate": lr, "grad_clip_norm": 10.0}
  c.train = {"num_steps": num_steps, "batch_size": batch_size, "segment_steps": 2,
             "rows": "map", "conv_impl": "auto", "batch_devices": 1}
  return c


def _train(path, cfg, on_change="error", **kw):
  with runrecord.open_run(path, cfg, kind="test", on_change=on_change) as run:
    return engine.run_rows(cfg, run, "cat", FEATS, ROWS, mesh=ONE_DEV, progress=False, **kw)


def _snapshot(root: Path) -> dict:
  return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob("*")) if p.name != runrecord.LOCK}


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


# ----------------------------------------------------------------------------
# 1. --restart removes only what tailjax wrote
# ----------------------------------------------------------------------------


def test_restart_refuses_a_workdir_with_user_files_and_removes_only_its_own(tmp_path):
  w = tmp_path / "w"
  _train(w, _cfg(num_steps=4))
  (w / "notes.md").write_text("my notes")                          # at the top
  (w / "cat" / "precious.txt").write_text("keep me")               # in a folder tailjax uses
  (w / "mine" / "deep").mkdir(parents=True)
  (w / "mine" / "deep" / "data.csv").write_text("1,2")             # a folder of the user's
  (w / "empty").mkdir()                                            # holds nothing: not refused
  (w / "cat" / ".rows.json.x1y2z3.tmp").write_text("{")            # a write cut by a kill
  before = _snapshot(w)
  with pytest.raises(runrecord.ForeignFilesError) as err:
    _train(w, _cfg(num_steps=4, lr=5e-3), on_change="restart")
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith(f"{w} holds files tailjax did not write: ")
  assert "cat/precious.txt, mine/, notes.md" in msg and "nothing was changed" in msg
  assert _snapshot(w) == before                                    # nothing removed
  # The user's files moved away, --restart removes every file the run wrote (the cut
  # write's temporary file included) and the folders it emptied; an empty one stays.
  for p in (w / "notes.md", w / "cat" / "precious.txt", w / "mine" / "deep" / "data.csv"):
    p.unlink()
  (w / "mine" / "deep").rmdir()
  (w / "mine").rmdir()
  res = _train(w, _cfg(num_steps=4, lr=5e-3), on_change="restart")
  assert res.resumed_from is None and res.finished
  assert (w / "empty").is_dir()
  assert not (w / "cat" / ".rows.json.x1y2z3.tmp").exists()
  assert runrecord.read_manifest(w)["results_fields"]["optim.learning_rate"] == 5e-3


def test_no_manifest_and_user_files_is_refused_even_with_restart(tmp_path):
  w = tmp_path / "home"
  (w / "projects").mkdir(parents=True)
  (w / "projects" / "thesis.tex").write_text("...")
  (w / "todo.txt").write_text("...")
  for on_change in ("error", "restart"):
    with pytest.raises(runrecord.ForeignFilesError, match=r"no manifest\.json") as err:
      with runrecord.open_run(w, _cfg(), kind="test", on_change=on_change):
        pass
    assert "projects/, todo.txt" in str(err.value)
  assert sorted(p.name for p in w.iterdir()) == [".lock", "projects", "todo.txt"]


def test_written_files_are_listed_where_a_run_keeps_its_list(tmp_path):
  """Atomic files, folders, JSON lines and TensorBoard runs below a listed folder are
  listed (once); nothing is listed outside one."""
  (tmp_path / "run").mkdir()
  io.start_ledger(tmp_path / "run")
  io.atomic_write_json(tmp_path / "run" / "a" / "b.json", {})
  io.atomic_write_json(tmp_path / "run" / "a" / "b.json", {"again": 1})
  with io.atomic_directory(tmp_path / "run" / "out") as d:
    (d / "x.txt").write_text("x")
  with io.atomic_directory(tmp_path / "run" / "out") as d:
    io.atomic_write_text(d / "y.txt", "y")                   # inside a folder listed whole
  io.JsonlWriter(tmp_path / "run" / "m.jsonl").write({"step": 1})
  tb = io.TensorBoardWriter(tmp_path / "run" / "tb", ["r0"])
  tb.scalars(1, [{"x": 1.0}])
  tb.close()
  io.atomic_write_json(tmp_path / "elsewhere.json", {})
  lines = (tmp_path / "run" / io.LEDGER).read_text().splitlines()
  assert lines == ["a/b.json", "out/", "m.jsonl", "tb/r0/"]


# ----------------------------------------------------------------------------
# 2. File modes follow the umask
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_of_a_run_follows_the_umask(tmp_path, mask):
  old = os.umask(mask)
  try:
    assert io.umask() == mask
    _train(tmp_path / "w", _cfg(num_steps=2))
    with io.atomic_directory(tmp_path / "w" / "report") as d:
      io.atomic_write_text(d / "r.md", "report")
  finally:
    os.umask(old)
  modes = {(p.is_dir(), stat.S_IMODE(p.lstat().st_mode))
           for p in (tmp_path / "w").rglob("*")}
  assert modes == {(False, 0o666 & ~mask), (True, 0o777 & ~mask)}
  assert stat.S_IMODE((tmp_path / "w" / "manifest.json").stat().st_mode) == 0o666 & ~mask


# ----------------------------------------------------------------------------
# 3. Impossible sizes, refused before work starts
# ----------------------------------------------------------------------------


def test_a_batch_larger_than_the_training_split_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError) as err:
    _train(tmp_path / "w", _cfg(batch_size=17))
  assert str(err.value) == ("config.train.batch_size=17 is larger than the 16 training images "
                            "of cat; it can be at most 16")
  assert not (tmp_path / "w" / "cat").exists()                    # nothing trained or saved


def test_a_grid_that_cannot_fit_the_device_memory_is_refused(tmp_path, monkeypatch):
  """With a device of (features + 5 images' activations) bytes: batch 5 passes the
  estimate, batch 6 is refused naming the field and the limit."""
  plan = engine._plan(_cfg(batch_size=5), "cat", FEATS, (), None, ONE_DEV, ROWS.num_rows)
  fixed, per_image = engine._step_bytes(plan, ROWS.num_rows)
  assert fixed == FEATS.nbytes and per_image == 4 * 16 * 2 * (6 + 3)   # H·W·K·(C + hidden)
  monkeypatch.setattr(engine, "_device_memory", lambda mesh: (fixed + 5 * per_image, "a test device"))
  engine._plan(_cfg(batch_size=5), "cat", FEATS, (), None, ONE_DEV, ROWS.num_rows)
  with pytest.raises(ValueError) as err:
    _train(tmp_path / "w", _cfg(batch_size=6))
  assert str(err.value).startswith("config.train.batch_size=6: one training step of cat needs "
                                   "at least ")
  assert str(err.value).endswith("of a test device; at most about 5 fits")
  assert "\n" not in str(err.value) and not (tmp_path / "w" / "cat").exists()
  monkeypatch.undo()
  have, what = engine._device_memory(sharding.make_mesh())   # 4 CPU devices share the host's
  assert what.startswith("host memory") and "4 CPU devices" in what and have > fixed


def test_sizes_are_checked_before_any_feature_is_extracted(tmp_path, monkeypatch):
  root = textures.build_texture_benchmark(tmp_path / "tree", seed=3, image_size=32, n_train=5,
                                          n_test=2, categories=("brick",))
  cfg = fastflow_mvtec.get_config("smoke")
  cfg.data.root, cfg.data.cache_dir = str(root), str(tmp_path / "cache")
  cfg.train.batch_size = 5                                   # 4 training images after 1 held out

  def no_extraction(cfg):
    raise AssertionError("features extracted before the sizes were checked")

  monkeypatch.setattr(pipeline, "make_extractor", no_extraction)
  ds = pipeline.Dataset(cfg)
  with pytest.raises(ValueError, match=r"^config\.train\.batch_size=5 is larger than the 4 "
                                       r"training images of brick; it can be at most 4$"):
    pipeline.load_once(ds, "brick")
  cfg.train.batch_size = 4
  cfg.eval.image_score, cfg.eval.size, cfg.eval.image_topk = "topk_mean", 8, 65
  with pytest.raises(ValueError, match=r"^config\.eval\.image_topk=65 must lie in \[1, 64\]"):
    pipeline.load_once(pipeline.Dataset(cfg), "brick")


# ----------------------------------------------------------------------------
# 4. A damaged checkpoint is named, moved aside, and the run resumes from an intact one
# ----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "orbax-read"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes(tmp_path, capfd, checksums):
  """The latest checkpoint loses half of a file (a full disk, a partial copy): the rerun
  names it in one line, keeps it as 4.damaged-1, resumes from step 2 and ends equal to
  an uninterrupted run. Without its checksums (a checkpoint from before them) orbax's
  own read fails, and its event-loop noise is silenced."""
  full = _train(tmp_path / "full", _cfg())
  _train(tmp_path / "cut", _cfg(), max_segments=2)
  ckpts = tmp_path / "cut" / "cat" / "checkpoints"
  if not checksums:
    for f in ckpts.glob(f"*/{engine.CHECKSUMS}"):
      f.unlink()
  # The state's OCDBT manifest: orbax fails on it every time, inside its asynchronous
  # reads (which is what printed "Event loop is closed" tracebacks). A truncated data
  # file, by contrast, is not always noticed by orbax (the checksums catch it).
  _truncate(ckpts / "4" / "state" / "manifest.ocdbt")
  capfd.readouterr()
  res = _train(tmp_path / "cut", _cfg())
  time.sleep(0.2)                       # late read callbacks of the failed restore, if any
  err = capfd.readouterr().err
  assert res.resumed_from == 2 and _equal(res.params_R, full.params_R)
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith(f"checkpoint {ckpts / '4'} cannot be read (")
  assert lines[0].endswith("; moved it aside to 4.damaged-1, resuming from step 2")
  assert ("missing or changed since it was saved" in lines[0]) == checksums
  assert sorted(p.name for p in ckpts.iterdir()) == ["4", "4.damaged-1", "6"]


def test_no_intact_checkpoint_trains_from_scratch_saying_so(tmp_path, capfd):
  full = _train(tmp_path / "full", _cfg(num_steps=4))
  _train(tmp_path / "cut", _cfg(num_steps=4), max_segments=2)
  ckpts = tmp_path / "cut" / "cat" / "checkpoints"
  for step in ("2", "4"):
    (ckpts / step / engine.CHECKSUMS).write_text("{not json")
  capfd.readouterr()
  res = _train(tmp_path / "cut", _cfg(num_steps=4))
  lines = capfd.readouterr().err.splitlines()
  assert res.resumed_from is None and _equal(res.params_R, full.params_R)
  assert [l.rpartition("moved it aside to ")[2] for l in lines] == [
      "4.damaged-1, no intact checkpoint is left: training starts from step 0",
      "2.damaged-1, no intact checkpoint is left: training starts from step 0"]
  # Reading a finished run (predict, analyses) names a damaged checkpoint the same way.
  (ckpts / "4" / engine.CHECKSUMS).write_text(json.dumps({"state/x": "0"}))
  with pytest.raises(engine.DamagedCheckpointError, match=(
      rf"^checkpoint {ckpts / '4'} cannot be read \(state/x is missing or changed since it "
      r"was saved\)$")):
    engine.load_rows(_cfg(num_steps=4), tmp_path / "cut", "cat", FEATS.shape, ROWS)


# ----------------------------------------------------------------------------
# 5. A feature cache that cannot be written
# ----------------------------------------------------------------------------


class _Extractor:
  calls = 0

  def __call__(self, images_NxHxWx3):
    self.calls += 1
    x = images_NxHxWx3.astype(np.float32) / 255.0
    return {4: x.reshape(len(x), 4, 4, 4, 4, 3).mean(axis=(2, 4))}


def _images(folder: Path, n: int, seed: int) -> list[Path]:
  from PIL import Image
  folder.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  return sorted(folder.iterdir())


def test_a_read_only_feature_cache_is_read_and_skipped_with_one_warning(tmp_path, monkeypatch,
                                                                         capsys):
  """The folder is made read-only (0o555). Tests run as root here, where permissions do
  not stop a write, so the write is also made to fail as the kernel fails it for a user
  (PermissionError from creating the temporary file)."""
  get = lambda paths, ex: F.cached_features(paths, ex, "fake-v1", 16, (4,), tmp_path / "cache")
  seen, unseen, other = (_images(tmp_path / n, 3, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
  ex = _Extractor()
  cached = get(seen, ex)[4]                                   # stored while writable
  (tmp_path / "cache").chmod(0o555)

  @contextlib.contextmanager
  def denied(path):
    raise PermissionError(errno.EACCES, "Permission denied", str(Path(path).parent))
    yield

  if os.geteuid() == 0:
    monkeypatch.setattr(F, "atomic_path", denied)
  monkeypatch.setattr(F, "_warned_unwritable", set())
  try:
    np.testing.assert_array_equal(get(seen, ex)[4], cached)   # a hit: read, nothing written
    assert ex.calls == 1 and capsys.readouterr().err == ""
    fresh = get(unseen, ex)[4]                                 # a miss: extracted, not stored
    again = get(other, ex)[4]
  finally:
    (tmp_path / "cache").chmod(0o755)
  assert ex.calls == 3 and fresh.shape == again.shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(fresh, _Extractor()(F.load_images(unseen, 16))[4])
  err = capsys.readouterr().err.splitlines()
  assert err == [f"warning: the feature cache {tmp_path / 'cache'} cannot be written "
                 "(Permission denied): features it lacks are extracted and used without being "
                 "stored; set data.cache_dir (or $TAILJAX_CACHE) to a writable folder to keep "
                 "them"]
  assert len(list((tmp_path / "cache").iterdir())) == 1      # the first entry, no temporary file


# ----------------------------------------------------------------------------
# 6. SIGTERM / SIGINT during training: a real `tailjax train` process
# ----------------------------------------------------------------------------

# The command as installed, with each segment made to last 0.3 s (sleeping before it
# runs) so that a signal arrives while one is in flight; nothing else changes.
_SLOW_TAILJAX = """
import sys, time
from tailjax import cli, engine
segment = engine._Grid.segment
def slow(self, state, n):
    time.sleep(0.3)
    return segment(self, state, n)
engine._Grid.segment = slow
sys.argv[0] = "tailjax"
sys.exit(cli.main())
"""


def _features_file(path: Path) -> Path:
  rng = np.random.default_rng(0)
  test = rng.normal(size=(4, 4, 4, 8)).astype(np.float32)
  test[2:, 1:3, 1:3] += 3.0
  masks = np.zeros((4, 16, 16), np.uint8)
  masks[2:, 4:12, 4:12] = 1
  with open(path, "wb") as f:
    np.savez(f, train_features=rng.normal(size=(10, 4, 4, 8)).astype(np.float32),
             test_features=test, test_labels=np.array([0, 0, 1, 1]), test_masks=masks)
  return path


def _train_args(data: Path, workdir: Path) -> list[str]:
  return ["train", f"--config={REPO / 'tailjax' / 'configs' / 'fastflow_features.py'}:smoke",
          f"--config.data.path={data}", f"--workdir={workdir}", "--config.num_seeds=1",
          "--config.train.num_steps=8", "--config.train.segment_steps=2",
          "--config.eval.budgets=(0,8)", "--config.eval.size=16", "--config.report.n_examples=0"]


def _final_state(workdir: Path):
  ckpts = workdir / "widgets" / "checkpoints"
  step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as c:
    return step, c.restore(ckpts / str(step) / "state")


def test_sigterm_during_training_checkpoints_the_segment_and_resumes_bit_for_bit(tmp_path):
  data = _features_file(tmp_path / "widgets.npz")
  cut = tmp_path / "cut"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_TAILJAX, *_train_args(data, cut)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=tmp_path)
  deadline = time.time() + 120
  while not (cut / "widgets" / "checkpoints" / "2").is_dir() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint after 120 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  stopped = runrecord.read_manifest(cut)["invocations"][-1]["stopped"]
  step = stopped["step"]
  assert stopped["signal"] == "SIGTERM" and stopped["prefix"] == "widgets" and 2 <= step < 8
  assert err.strip().splitlines()[-1] == (
      f"SIGTERM: widgets stopped at step {step}, the end of the compiled segment that was "
      f"running, with checkpoint {cut / 'widgets' / 'checkpoints' / str(step)}; rerunning the "
      "same command resumes from there")
  # The rerun resumes there and ends equal to an uninterrupted run, bit for bit.
  assert cli.main(_train_args(data, cut), exit_process=False) == 0
  assert cli.main(_train_args(data, tmp_path / "full"), exit_process=False) == 0
  (s_cut, state_cut), (s_full, state_full) = _final_state(cut), _final_state(tmp_path / "full")
  assert s_cut == s_full == 8 and _equal(state_cut, state_full)
  assert [r["step"] for r in io.read_jsonl(cut / "widgets" / "metrics.jsonl")] == [2, 4, 6, 8]


def _signalling_segments(monkeypatch, at_call: int, times: int = 1):
  """Segments that send this process SIGINT ``times`` times during call ``at_call``."""
  real, calls = engine._Grid.segment, []

  def segment(self, state, n):
    calls.append(n)
    if len(calls) == at_call:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)      # the handler runs in between
    return real(self, state, n)

  monkeypatch.setattr(engine._Grid, "segment", segment)


def test_ctrl_c_finishes_the_segment_and_a_second_one_stops_at_once(tmp_path, monkeypatch):
  # The handler this process had before (pytest's, or one an earlier test in the same
  # worker left): the run must put back exactly that one.
  before = signal.getsignal(signal.SIGINT)
  full = _train(tmp_path / "full", _cfg(num_steps=8))
  _signalling_segments(monkeypatch, at_call=2)
  with pytest.raises(engine.Interrupted) as err:
    _train(tmp_path / "w", _cfg(num_steps=8))
  ckpt = tmp_path / "w" / "cat" / "checkpoints" / "4"
  assert err.value.exit_code == 130 and str(err.value) == (
      f"SIGINT: cat stopped at step 4, the end of the compiled segment that was running, with "
      f"checkpoint {ckpt}; rerunning the same command resumes from there")
  assert runrecord.read_manifest(tmp_path / "w")["invocations"][-1]["stopped"]["step"] == 4
  assert signal.getsignal(signal.SIGINT) is before   # handlers restored
  _signalling_segments(monkeypatch, at_call=1, times=2)
  with pytest.raises(engine.Interrupted, match=r"^interrupted at step 4 of cat; .* from step 4"):
    _train(tmp_path / "w", _cfg(num_steps=8))
  monkeypatch.undo()
  res = _train(tmp_path / "w", _cfg(num_steps=8))
  assert res.resumed_from == 4 and _equal(res.params_R, full.params_R)


def test_sigterm_outside_training_ends_the_command_in_one_line(tmp_path, monkeypatch, capsys):
  def run(fv):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)

  monkeypatch.setitem(cli.COMMANDS, "toy", dataclasses.replace(cli.COMMANDS["toy"], run=run))
  assert cli.main(["toy", f"--workdir={tmp_path}"], exit_process=False) == 143
  assert capsys.readouterr().err == (f"terminated (SIGTERM); rerun the same command to resume "
                                     f"from {tmp_path}'s last checkpoint\n")
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
