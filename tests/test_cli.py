"""The `tailjax` command: dispatch, flags, error and Ctrl-C handling, configs from any cwd, the lock."""

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tailjax import _requirements, cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch):
  """Replaces every command's `run` by a recorder; returns the list of (name, flag values)."""
  seen = []
  for name, c in list(cli.COMMANDS.items()):
    monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(
        c, run=lambda fv, name=name: seen.append((name, fv))))
  return seen


def _raising(monkeypatch, name, exc):
  def run(fv):
    raise exc
  monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(cli.COMMANDS[name], run=run))


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in ("train", "sweep", "analyze", "mil", "build-textures", "toy"):
    assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_help(name, capsys):
  assert cli.main([name, "--help"]) == 0
  assert f"usage: tailjax {name}" in capsys.readouterr().out


def test_no_or_unknown_command_is_a_usage_error(capsys):
  assert cli.main([]) == 2
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


def test_flags_reach_the_command(calls, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/… paths resolve to the installed package
  assert cli.main(["sweep", "--config=configs/sweep_top_k.py:smoke", "--config.sweep.seeds=(3,4)",
                   f"--workdir={tmp_path}", "--branch"]) == 0
  (name, fv), = calls
  assert name == "sweep" and fv.workdir == str(tmp_path) and not fv.distributed
  assert tuple(fv.config.sweep.seeds) == (3, 4)
  assert cli._on_change(fv) == "branch"


def test_restart_and_branch_exclude_each_other(calls, tmp_path, capsys):
  assert cli.main(["toy", f"--workdir={tmp_path}", "--restart"]) == 0
  assert cli._on_change(calls[-1][1]) == "restart"
  assert cli.main(["toy", f"--workdir={tmp_path}"]) == 0
  assert cli._on_change(calls[-1][1]) == "error"
  n = len(calls)
  assert cli.main(["toy", f"--workdir={tmp_path}", "--restart", "--branch"]) == 2
  assert "exclude each other" in capsys.readouterr().err and len(calls) == n
  assert cli.main(["toy", f"--workdir={tmp_path}", "--extend"]) == 0
  assert cli._on_change(calls[-1][1]) == "extend"
  assert cli.main(["toy", f"--workdir={tmp_path}", "--extend", "--branch"]) == 2


@pytest.mark.parametrize("args, message", [
    (["toy", "--config.sed=1"], "--config.sed: the config has no field 'sed'"),
    (["toy", "--config.seed=abc"], "--config.seed=abc"),
    (["toy", "--nope=1"], "Unknown command line flag 'nope'"),
    (["toy", "stray"], "unexpected argument(s) 'stray'"),
    (["toy", "--config=configs/missing.py"], "configs/missing.py"),
    (["analyze"], "--workdir"),
])
def test_bad_flags_are_one_line_usage_errors(args, message, calls, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and "Traceback" not in err
  assert not calls


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, tmp_path, capsys):
  _raising(monkeypatch, "toy", KeyboardInterrupt())
  assert cli.main(["toy", f"--workdir={tmp_path}"]) == 130
  err = capsys.readouterr().err
  assert err == (f"interrupted; rerun the same command to resume from {tmp_path}'s "
                 "last checkpoint\n")
  # An interrupt that says where it resumes (the engine's) is printed as it is.
  _raising(monkeypatch, "toy", KeyboardInterrupt("interrupted at step 7; rerunning resumes from step 5"))
  assert cli.main(["toy", f"--workdir={tmp_path}"]) == 130
  assert capsys.readouterr().err == "interrupted at step 7; rerunning resumes from step 5\n"


KnownError = type("KnownError", (RuntimeError,), {"__module__": "tailjax.fake"})


@pytest.mark.parametrize("exc", [ValueError("bad lr"), FileNotFoundError("no x.npz"),
                                 KnownError("workdir is locked by pid 7")])
def test_known_errors_print_one_line_and_exit_2(exc, monkeypatch, tmp_path, capsys):
  _raising(monkeypatch, "toy", exc)
  assert cli.main(["toy", f"--workdir={tmp_path}"]) == 2
  assert capsys.readouterr().err == f"error: {exc}\n"
  with pytest.raises(type(exc)):  # --traceback: the real exception, trace and all
    cli.main(["toy", f"--workdir={tmp_path}", "--traceback"])


def test_unknown_errors_keep_their_traceback(monkeypatch, tmp_path):
  _raising(monkeypatch, "toy", ZeroDivisionError("bug"))
  with pytest.raises(ZeroDivisionError):
    cli.main(["toy", f"--workdir={tmp_path}"])


def test_cli_imports_fast_and_configs_import_from_any_cwd(tmp_path):
  """No sys.path edits: the packaged configs (configs importing configs) load from an
  unrelated directory, nothing named `configs` is installed top-level (it would shadow
  any other project's), and importing the CLI pulls in no JAX."""
  code = ("import sys, importlib.util, tailjax.cli; assert 'jax' not in sys.modules, 'cli imports jax';"
          "from tailjax.configs import fastflow_textures, fastflow_mvtec, sweep_top_k;"
          "assert sweep_top_k.get_config('smoke').sweep.seeds;"
          "assert importlib.util.find_spec('configs') is None, 'a top-level configs is installed'")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)


def test_config_paths_map_to_the_packaged_configs_unless_the_file_exists_here(tmp_path, monkeypatch):
  packaged = Path(cli.__file__).resolve().parent / "configs"
  for cwd in (REPO, tmp_path):   # the README's commands, from the repository root and elsewhere
    monkeypatch.chdir(cwd)
    assert cli._resolve_config_args(["--config=configs/sweep_top_k.py:smoke", "--workdir=w"]) == [
        f"--config={packaged / 'sweep_top_k.py'}:smoke", "--workdir=w"]
    assert cli._resolve_config_args(["--config", "configs/toy_flow.py"]) == [
        "--config", str(packaged / "toy_flow.py")]
  assert cli._default_config("toy_flow.py") == str(packaged / "toy_flow.py")
  # A configs/ folder of your own in the current directory wins; other paths are untouched.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "toy_flow.py").write_text("")
  assert cli._resolve_config_args(["--config=configs/toy_flow.py", "--config=mine/x.py"]) == [
      "--config=configs/toy_flow.py", "--config=mine/x.py"]


def test_lock_info_names_the_checkout_lock():
  info = _requirements.lock_info()
  lock = REPO / "requirements.lock"
  assert info["lock_file"] == str(lock)
  assert info["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
  assert isinstance(info["mismatches"], list)
  pins = _requirements.read_pins(lock)
  assert pins["jax"] and pins["jaxlib"] == pins["jax"] and "tailjax" not in pins


def test_read_pins(tmp_path):
  f = tmp_path / "r.lock"
  f.write_text("# c\nScikit_Learn==1.9.1 \\\n    --hash=sha256:ab\n    # via x\n"
               "numpy==2.4.6 ; python_version >= '3.11'\n")
  assert _requirements.read_pins(f) == {"scikit-learn": "1.9.1", "numpy": "2.4.6"}


def test_a_run_that_fails_loading_data_can_be_rerun_corrected(tmp_path, capsys):
  """A wrong data path fails in one line and leaves no run record, so the corrected
  command (another data.path) is not refused as a changed config."""
  work = tmp_path / "run"
  base = ["train", "--config=configs/fastflow_features.py", f"--workdir={work}"]
  assert cli.main(base + [f"--config.data.path={tmp_path / 'nope'}"]) == 2
  first = capsys.readouterr().err.strip().splitlines()
  assert len(first) == 1 and "nope" in first[0]
  assert not (work / "manifest.json").exists() and not (work / "config.json").exists()
  assert cli.main(base + [f"--config.data.path={tmp_path / 'still_nope'}"]) == 2
  second = capsys.readouterr().err.strip()
  assert "still_nope" in second and "ran a different config" not in second


@pytest.mark.parametrize("selection", [None, "all", "hard", "calibrated", "brick,gravel", "moon,brick"])
def test_build_textures_builds_what_train_reads_for_the_same_selection(selection, tmp_path, monkeypatch):
  """`build-textures --categories=X` and `--config.data.categories=X` share one vocabulary
  (categories, tiers, "all"; no flag = all nine), and without --root the command builds
  exactly the build that `train` reads for X (folder and categories)."""
  from tailjax.configs import fastflow_textures
  from tailjax.data import pipeline, textures
  monkeypatch.setenv("TAILJAX_DATA", str(tmp_path))
  built = []
  monkeypatch.setattr(textures, "build_texture_benchmark",
                      lambda root, categories, **kw: built.append((root, tuple(categories))) or root)
  args = [] if selection is None else [f"--categories={selection}"]
  assert cli.main(["build-textures", *args]) == 0
  cfg = fastflow_textures.get_config()
  cfg.data.categories = selection or "all"
  assert built == [pipeline.texture_build(cfg)]
  if selection in (None, "all", "calibrated", "moon,brick"):
    assert built[0] == (tmp_path / "textures-all", textures.CATEGORIES) and len(textures.CATEGORIES) == 9
  else:
    assert built[0] == (tmp_path / "textures", textures.HARD_CATEGORIES)
  # An explicit --root builds exactly the selection there.
  assert cli.main(["build-textures", f"--root={tmp_path / 'mine'}", *args]) == 0
  assert built[1] == (tmp_path / "mine", textures.expand_categories(selection))


def test_build_textures_refuses_an_unknown_category_in_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("TAILJAX_DATA", str(tmp_path))
  assert cli.main(["build-textures", "--categories=brick,carpet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --categories: ['carpet'] are neither texture categories (brick, grass, gravel, "
                 "moon, tissue, page, notes, retina, coins) nor tiers (hard, calibrated) nor 'all'"]
  assert not (tmp_path / "textures").exists() and not (tmp_path / "textures-all").exists()
