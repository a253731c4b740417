"""The ``tailjax`` command: one entry point with a subcommand per job.

  tailjax train --config=configs/fastflow_textures.py[:smoke] --workdir=runs/demo [--config.a.b=v]
  tailjax sweep --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k
  tailjax train|sweep|mil ... --distributed [--coordinator_address=host:port
      --num_processes=N --process_id=i]     (one process of several; README "Running on a cluster")
  tailjax analyze --workdir=runs/demo --sweeps=runs/sweep_lambda,runs/sweep_top_k
  tailjax mil --config=configs/mil_diagnosis.py --workdir=runs/mil
  tailjax build-textures --root=data/textures
  tailjax toy --config=configs/toy_flow.py --workdir=runs/toy
  tailjax <command> --help

Every command parses its own absl flags (``--config`` is an ml_collections
config file, with ``:arg`` variants and ``--config.a.b=v`` overrides) and
calls one library function, imported only when the command runs, so
``tailjax --help`` stays fast. A ``--config=configs/x.py`` path that does not
exist under the current directory is taken from the packaged folder ``tailjax/configs``,
so the documented commands work from any directory.

Behaviour shared by all commands:

* A workdir remembers the results-relevant config it ran; a rerun with a
  different one stops with an error listing the differing fields. ``--restart``
  starts the workdir over, ``--branch`` runs in a new sibling workdir, and
  ``--extend`` (train, sweep, toy) trains a run on to a larger
  ``train.num_steps`` (and later ``eval.budgets``), keeping what ran and
  recording the extension in the manifest (``tailjax.runrecord``).
* Ctrl-C (SIGINT) and SIGTERM print one line and exit 130 / 143. While a grid trains,
  the compiled segment in flight finishes and is checkpointed first, and the manifest
  records the stop (``tailjax.engine``); rerunning the same command resumes there.
* Known errors (bad config or flag values, missing files, a locked workdir, a
  non-finite loss: ``ValueError``, ``FileNotFoundError`` and the error types
  defined in ``tailjax``) print ``error: <message>`` and exit 2;
  ``--traceback`` (or ``TAILJAX_TRACEBACK=1``) shows the full trace instead.

``scripts/*.py`` are shims over :func:`main` (``scripts/train_flow.py ARGS`` is
``tailjax train ARGS``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

PROG = "tailjax"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM
TRACEBACK_ENV = "TAILJAX_TRACEBACK"


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: ``define(fv, argv)`` adds its flags to a fresh FlagValues (``argv``:
  the command line, which ml_collections reads to register --config.* overrides);
  ``run(fv)`` does the job. ``grid(config) -> (rows, row-steps)``, for the commands that
  train a grid of rows, lets ``train.processes`` run them as local processes."""
  summary: str
  define: Callable[[flags.FlagValues, list[str]], None]
  run: Callable[[flags.FlagValues], None]
  grid: Callable[[Any], tuple[int, int]] | None = None


# ----------------------------------------------------------------------------
# Shared flags
# ----------------------------------------------------------------------------


def _configs_dir() -> Path:
  # The packaged configs (tailjax/configs), found without importing them: importing a
  # config is the job of the config flag, and `tailjax --help` stays fast.
  return Path(__file__).resolve().parent / "configs"


def _default_config(name: str) -> str:
  return str(_configs_dir() / name)


def _define_run_flags(fv: flags.FlagValues, argv: list[str], config: str, workdir: str, *,
                      lock_config: bool = True) -> None:
  config_flags.DEFINE_config_file(
      "config", _default_config(config),
      f"Config file (get_config(arg)); `path.py:arg` picks a variant, --config.a.b=v overrides "
      f"a field. Default: configs/{config}.", flag_values=fv, lock_config=lock_config,
      sys_argv=argv)
  flags.DEFINE_string("workdir", workdir, "Run directory (resumed if it exists).", flag_values=fv)
  flags.DEFINE_bool("restart", False, "If the workdir ran a different config: delete its results "
                    "and start over.", flag_values=fv)
  flags.DEFINE_bool("branch", False, "If the workdir ran a different config: run in a new sibling "
                    "workdir <workdir>-<hash>.", flag_values=fv)
  flags.DEFINE_bool("extend", False, "If the workdir ran the same config with fewer "
                    "train.num_steps (eval.budgets may add later steps): train on from its last "
                    "checkpoint, keeping every evaluation (train, sweep, toy).", flag_values=fv)
  flags.register_multi_flags_validator(
      ["restart", "branch", "extend"], lambda v: sum(map(bool, v.values())) <= 1,
      "--restart, --branch and --extend exclude each other", flag_values=fv)


def _define_distributed_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("distributed", False, "Run as one process of several (tailjax.distributed): "
                    "jax.distributed.initialize() from the three flags below, or from the "
                    "cluster environment (SLURM, Open MPI, TPU pods) when they are not given. "
                    "Start the same command on every process.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                      "(any free port on its host).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 .. "
                       "num_processes - 1 (0 writes the run record).", flag_values=fv)
  flags.DEFINE_float("distributed_timeout", 300, "With --distributed: seconds to wait for every "
                     "process to join before giving up with an error.", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout", 100, "With --distributed: seconds without a heartbeat "
                       "after which a dead process stops the others.", flag_values=fv)


def _maybe_initialize(fv: flags.FlagValues) -> None:
  """``jax.distributed.initialize`` first, when asked (before any other JAX call)."""
  explicit = [n for n in ("coordinator_address", "num_processes", "process_id")
              if fv[n].value is not None]
  if not fv.distributed:
    if explicit:
      raise ValueError(f"--{explicit[0]} needs --distributed")
    return
  from tailjax import distributed
  distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                         timeout_s=fv.distributed_timeout,
                         heartbeat_timeout_s=fv.heartbeat_timeout)


def _on_change(fv: flags.FlagValues) -> str:
  """The runner's ``on_change``: "restart", "branch", "extend" or (default) "error"."""
  return ("restart" if fv.restart else "branch" if fv.branch else
          "extend" if fv.extend else "error")


def _resolve_config_args(args: Sequence[str]) -> list[str]:
  """``--config=configs/x.py[:arg]`` -> the packaged ``tailjax/configs/x.py`` when the
  path does not exist under the current directory (so the documented commands work
  from the repository root and from any cwd; a ``configs/x.py`` of your own wins)."""
  d = _configs_dir()
  out = list(args)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      j, prefix = i, "--config="
    elif a == "--config" and i + 1 < len(out):
      j, prefix = i + 1, ""
    else:
      continue
    path, sep, arg = out[j][len(prefix):].partition(":")
    rel = Path(path)
    if rel.exists() or rel.parts[:1] != ("configs",):
      continue
    packaged = d.joinpath(*rel.parts[1:])
    if packaged.is_file():
      out[j] = f"{prefix}{packaged}{sep}{arg}"
  return out


# ----------------------------------------------------------------------------
# The commands (each imports its library code only when it runs)
# ----------------------------------------------------------------------------


def _train_flags(fv, argv):
  _define_run_flags(fv, argv, "fastflow_textures.py", "runs/demo")
  _define_distributed_flags(fv)


def _train(fv):
  _maybe_initialize(fv)
  from tailjax.studies import study_a
  study_a.main(fv.config, fv.workdir, on_change=_on_change(fv))


def _study_grid(cfg) -> tuple[int, int]:
  from tailjax import engine
  rows = engine.Rows.from_variants(cfg).num_rows
  return rows, rows * int(cfg.train.num_steps)


def _sweep_grid(cfg) -> tuple[int, int]:
  from tailjax import engine
  rows = engine.Rows.from_grid(cfg.sweep).num_rows
  return rows, rows * int(cfg.train.num_steps)


def _local_launch(name: str, fv: flags.FlagValues, args: Sequence[str]) -> int | None:
  """``train.processes`` > 1 (or "auto" resolving so; ``distributed.local_process_count``)
  without ``--distributed``: the command runs as that many local processes
  (``distributed.launch_local``) and this returns their exit code; else None."""
  grid = COMMANDS[name].grid
  if grid is None or fv.distributed or "config" not in fv:
    return None
  train = fv.config.get("train") or {}
  setting = train.get("processes", 1)
  if setting == 1:
    return None
  n_rows, row_steps = grid(fv.config)
  from tailjax import distributed
  n = distributed.local_process_count(setting, n_rows, row_steps,
                                      batch_devices=int(train.get("batch_devices", 1)))
  return distributed.launch_local([name, *args], n) if n > 1 else None


def _sweep_flags(fv, argv):
  _define_run_flags(fv, argv, "sweep_tail_weight.py", "runs/sweep_lambda")
  _define_distributed_flags(fv)


def _sweep(fv):
  on_change = _on_change(fv)
  _maybe_initialize(fv)
  from tailjax.studies import sweeps
  sweeps.run_and_evaluate(fv.config, fv.workdir, on_change=on_change)


def _analyze_flags(fv, argv):
  del argv
  flags.DEFINE_string("workdir", None, "A finished `tailjax train` workdir.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_list("category", [], "Categories to analyse; empty = every trained one.", flag_values=fv)
  flags.DEFINE_integer("num_images", 32, "Training images for H3 (input space).", flag_values=fv)
  flags.DEFINE_integer("num_param_images", None, "Of those, images with exact per-patch parameter "
                       "gradients (default: all of them).", flag_values=fv)
  flags.DEFINE_list("sweeps", [], "Directories holding a sweep's results.json (for H4).", flag_values=fv)
  flags.DEFINE_string("method", None, "Per-patch parameter-gradient implementation (one of "
                      "tailjax.analysis.gradients.METHODS); default: the library's.", flag_values=fv)
  flags.DEFINE_integer("patch_chunk", None, "Patches per compiled per-patch-gradient call "
                       "(default: the method's own).", flag_values=fv)
  flags.DEFINE_bool("append", True, "Add the hypothesis table to <workdir>/report.md.", flag_values=fv)


def _analyze(fv):
  from tailjax.studies import mechanisms
  method = {"method": fv.method} if fv.method else {}
  out = mechanisms.analyze_run(fv.workdir, fv.category or None, num_images=fv.num_images,
                               sweeps=fv.sweeps or None, num_param_images=fv.num_param_images,
                               patch_chunk=fv.patch_chunk, **method)
  if fv.append:
    mechanisms.append_to_report(fv.workdir, out)
  print("\n".join(mechanisms.summary_table(out)))
  print(f"\nwrote {Path(fv.workdir) / 'analysis' / 'report.md'}")


def _mil_flags(fv, argv):
  _define_run_flags(fv, argv, "mil_diagnosis.py", "runs/mil", lock_config=False)
  _define_distributed_flags(fv)


def _mil(fv):
  _maybe_initialize(fv)
  from tailjax.studies import mil_diagnosis
  results = mil_diagnosis.run_diagnosis(fv.config, fv.workdir, on_change=_on_change(fv))
  print("\n".join(results["answer_text"]))
  print(f"\nreport: {results['workdir']}/report.md  (wall time {results['wall_s']:.0f} s)")


def _textures_flags(fv, argv):
  del argv
  flags.DEFINE_string("root", None, "Output folder. Default: where `tailjax train` reads the "
                      "selection (textures.shared_build): the hard tier at $TAILJAX_DATA/textures "
                      "(or ./data/textures) when every requested category is in it, else all "
                      "nine at that folder's sibling textures-all.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.DEFINE_integer("image_size", 256, "Image side, pixels.", flag_values=fv)
  flags.DEFINE_integer("n_train", 120, "Train images per category.", flag_values=fv)
  flags.DEFINE_integer("n_test", 80, "Test images per category.", flag_values=fv)
  flags.DEFINE_list("categories", [], "Categories, tiers (hard, calibrated) or all, as "
                    "--config.data.categories takes them; empty = all nine.", flag_values=fv)


def _textures(fv):
  import time
  from tailjax.data import textures
  start = time.perf_counter()
  categories = textures.expand_categories(fv.categories, where="--categories")
  if fv.root:
    root = Path(fv.root)
  else:
    root, categories = textures.shared_build(textures.default_benchmark_root(), categories)
  root = textures.build_texture_benchmark(root, seed=fv.seed, image_size=fv.image_size,
                                          n_train=fv.n_train, n_test=fv.n_test,
                                          categories=categories, verbose=True)
  print(f"texture benchmark ready at {root} ({time.perf_counter() - start:.1f}s)")


def _toy_flags(fv, argv):
  _define_run_flags(fv, argv, "toy_flow.py", "runs/toy")


def _toy(fv):
  from tailjax import toy
  toy.run_toy(fv.config, fv.workdir, on_change=_on_change(fv))


def _predict_flags(fv, argv):
  del argv
  flags.DEFINE_string("workdir", None, "A finished `tailjax train` workdir.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_string("images", None, "An image, a folder of images, or an MVTec-layout test "
                      "split to score.", flag_values=fv)
  flags.mark_flag_as_required("images", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default <workdir>/predict).", flag_values=fv)
  flags.DEFINE_string("category", None, "The run's category (needed when it trained several).",
                      flag_values=fv)
  flags.DEFINE_string("variant", None, "Which variant's model (default report.treatment).",
                      flag_values=fv)
  flags.DEFINE_integer("seed", None, "Which seed's model (default the variant's first).",
                       flag_values=fv)
  flags.DEFINE_enum("threshold", "val_quantile", ["val_quantile", "f1"],
                    "val_quantile: a quantile of the run's held-out normal images' scores; f1: "
                    "F1-optimal on --labelled_dir.", flag_values=fv)
  flags.DEFINE_float("quantile", 0.99, "The quantile for --threshold=val_quantile.",
                     flag_values=fv)
  flags.DEFINE_string("labelled_dir", None, "A labelled validation folder (MVTec test layout) "
                      "for --threshold=f1; never the test split.", flag_values=fv)


def _predict(fv):
  from tailjax.studies import predict
  predict.main(fv.workdir, fv.images, fv.out or str(Path(fv.workdir) / "predict"),
               category=fv.category, variant=fv.variant, seed=fv.seed, threshold=fv.threshold,
               quantile=fv.quantile, labelled_dir=fv.labelled_dir)


COMMANDS: dict[str, Command] = {
    "train": Command("study A: mean-only vs tail-aware flows, evaluation, analyses, report",
                     _train_flags, _train, _study_grid),
    "sweep": Command("a grid of flow trainings (λ × r × lr × seeds) as one sharded, resumable program",
                     _sweep_flags, _sweep, _sweep_grid),
    "analyze": Command("mechanism analyses (H1, H3, H4, H7) of a finished `train` workdir",
                       _analyze_flags, _analyze),
    "mil": Command("study B: the attention-MIL diagnosis", _mil_flags, _mil),
    "build-textures": Command("build the embedded texture benchmark (MVTec layout)",
                              _textures_flags, _textures),
    "toy": Command("a flow learns a two-moons feature-map density (training-core check)",
                   _toy_flags, _toy),
    "predict": Command("score new images with a finished `train` run: maps, masks, decisions, "
                       "thresholds from held-out normal images", _predict_flags, _predict),
}


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"usage: {PROG} <command> [--flag=value ...]", "", "commands:"]
  lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
  lines += ["", f"`{PROG} <command> --help` lists a command's flags. Every command also takes",
            f"--traceback (or {TRACEBACK_ENV}=1): show the full trace of an error instead of one line."]
  return "\n".join(lines)


def _command_help(name: str, fv: flags.FlagValues) -> str:
  body = [l for l in fv.get_help(include_special_flags=False).splitlines()
          if l.startswith(" ")]  # drop absl's per-module headings
  return f"usage: {PROG} {name} [--flag=value ...]\n\n{COMMANDS[name].summary}\n\nflags:\n" + "\n".join(body)


def _no_such_field(args: Sequence[str], e: BaseException) -> str:
  """One line naming the bad ``--config.a.b`` override (ml_collections nests the
  field name, and maybe a did-you-mean hint, in layers of quoting)."""
  msg = e.args[0] if e.args else ""
  while isinstance(msg, BaseException) and msg.args:
    msg = msg.args[0]
  field, _, hint = str(msg).strip("\"'").partition("\n")
  field = field.strip("\"'")
  names = [a.partition("=")[0] for a in args if a.startswith("--config.")]
  name = next((n for n in names if n.split(".")[-1] == field or f".{field}." in n), f"--config.…{field}")
  return f"{name}: the config has no field {field!r}" + (f" ({hint})" if hint else "")


def _close_progress_bars() -> None:
  """Ends any open tqdm bar with its newline, so the Ctrl-C message gets a line of its own."""
  tqdm_module = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
    bar.close()


def _is_known_error(e: BaseException) -> bool:
  """ValueError / FileNotFoundError, or any error type defined inside ``tailjax``
  (ConfigMismatchError, WorkdirLockedError, ConfigFieldError, NonFiniteLossError, ...)."""
  return isinstance(e, (ValueError, FileNotFoundError)) or any(
      c.__module__.partition(".")[0] == "tailjax" for c in type(e).__mro__)


class Terminated(KeyboardInterrupt):
  """SIGTERM outside a training loop (which stops at its next boundary by itself)."""
  exit_code = EXIT_TERMINATED


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated


def main(argv: Sequence[str] | None = None, *, exit_process: bool | None = None,
         local_processes: bool | None = None) -> int:
  """Runs ``tailjax <command> [flags]``; ``argv`` excludes the program name. Returns the exit code.

  ``local_processes`` (default: ``argv is None``, i.e. run as the program) lets
  ``train.processes`` start local processes (``_local_launch``); a call from Python with
  an ``argv`` runs in this process.

  ``exit_process`` (default: ``argv is None``, i.e. run as the program) makes an
  interrupted run end the process right after its message, with ``os._exit(130)``:
  finalising the interpreter while XLA threads are still busy can segfault (seen
  here on about 1 in 5 Ctrl-Cs during the first compiled segment), which would
  turn exit 130 into 139. Every ``with`` block (run lock, checkpoint managers)
  has already been unwound by then.
  """
  exit_process = argv is None if exit_process is None else exit_process
  local_processes = argv is None if local_processes is None else local_processes
  argv = list(sys.argv[1:] if argv is None else argv)
  show_trace = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
  argv = [a for a in argv if a != "--traceback"]
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else EXIT_USAGE
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return EXIT_USAGE

  flags.FLAGS.mark_as_parsed()  # absl logging: no "logging before flag parsing" notice
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  fv = flags.FlagValues()
  cmdline = [f"{PROG} {name}", *_resolve_config_args(rest)]
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in rest):
    COMMANDS[name].define(fv, cmdline[:1])
    print(_command_help(name, fv))
    return 0
  try:
    COMMANDS[name].define(fv, cmdline)  # loads a default config and registers --config.* flags
    extra = fv(cmdline)[1:]
    if extra:
      raise flags.Error(f"unexpected argument(s) {' '.join(extra)!r} (flags are --name=value)")
    if "config" in fv:
      fv.config.keys()  # a config file that failed to load raises its OSError here
  except (flags.Error, OSError, ImportError, AttributeError, KeyError) as e:
    # Bad flags, a config file that cannot load, or (AttributeError / KeyError from
    # ml_collections) a --config.a.b=v override naming no field.
    if show_trace:
      raise
    msg = _no_such_field(rest, e) if isinstance(e, (AttributeError, KeyError)) else str(e)
    print(f"error: {msg}\n(`{PROG} {name} --help` lists the flags)", file=sys.stderr)
    return EXIT_USAGE

  # SIGTERM (what a cluster's scheduler sends before it kills a job) ends the command like
  # Ctrl-C, in one line; the training loop installs its own handler while it runs.
  main_thread = threading.current_thread() is threading.main_thread()
  sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
  try:
    code = (_local_launch(name, fv, cmdline[1:] + (["--traceback"] if show_trace else []))
            if local_processes else None)
    if code is not None:
      return code
    COMMANDS[name].run(fv)
  except KeyboardInterrupt as e:
    if show_trace:
      raise
    _close_progress_bars()
    code = int(getattr(e, "exit_code", EXIT_INTERRUPTED))
    where = fv["workdir"].value if "workdir" in fv else None
    hint = f"resume from {where}'s last checkpoint" if where else "finish the job"
    # The engine's Interrupted carries the step and checkpoint it resumes from.
    what = "terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted"
    msg = str(e).strip().replace("\n", " ") or f"{what}; rerun the same command to {hint}"
    print(msg, file=sys.stderr)
    if exit_process:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    return code
  except Exception as e:  # noqa: BLE001 -- known errors become one line; others keep their trace
    if show_trace or not _is_known_error(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)
  return 0


if __name__ == "__main__":
  sys.exit(main())
