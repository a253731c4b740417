"""GPU/TPU readiness: the train step, a vmapped sweep and per-patch gradients on this device,
with the PyTorch peer where it is importable, in one run → ``benchmarks/results-<device>.md``.

  python -m benchmarks.device_report                 # what benchmarks/device.sh runs
  python -m benchmarks.device_report --quick         # a CPU smoke of the same code

Sections (each benchmark's own module does the measuring; this only picks sizes for a
few-minute run on an accelerator and writes one markdown file):

* train step on the engine's path (``bench_engine``): 4 and 8 coupling steps,
  14×14×112, batch 16, ms/step, FLOPs, the peer's step and the ratio;
* sweep (``bench_sweep``): 8 tail weights λ as one vmapped program vs 8 sequential
  runs, FastFlow 3×3/1×1 on 14×14×112, batch 16;
* the train step part by part, float32 and bfloat16 (``bench_step_parts``,
  ``train.precision``), and the 3×3 convolution lowerings;
* per-patch parameter-gradient norms (``bench_gradients``): our exact methods vs the
  peer's autograd loop, 196 patches of one image, 4 and 8 coupling steps.
"""

from __future__ import annotations

import argparse
import datetime
import io as _io
import re
import sys
import time
import traceback
from contextlib import redirect_stdout
from typing import Sequence

import jax

from tailjax import io as tj_io


def _run(name: str, module: str, argv: list[str]) -> dict:
  import importlib
  buf = _io.StringIO()
  t = time.perf_counter()
  try:
    with redirect_stdout(buf):
      res = importlib.import_module(module).main(argv)
    out = {"result": res}
  except Exception as e:   # one failing benchmark must not hide the others
    out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
  out.update(seconds=time.perf_counter() - t, printed=buf.getvalue(), argv=argv, module=module)
  print(f"=== {name} ({out['seconds']:.0f} s)\n{out['printed']}", flush=True)
  if "error" in out:
    print(out["traceback"], file=sys.stderr)
  return out


def device_slug() -> str:
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return re.sub(r"[^a-z0-9]+", "-", f"{d.platform}-{kind}".lower()).strip("-")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke)")
  parser.add_argument("--out", default=None, help="default benchmarks/results-<device>.md")
  args = parser.parse_args(argv)
  steps = "5" if args.quick else "100"
  plan = {
      "train_step": ("benchmarks.bench_engine", [f"--steps={steps}", "--repeats=3"]),
      "sweep": ("benchmarks.bench_sweep", ["--rows=8", f"--steps={2 if args.quick else 50}",
                                           "--batch-size=16", "--settings=FastFlow 3x3/1x1",
                                           "--no-constant"]),
      "step_parts": ("benchmarks.bench_step_parts", [f"--steps={steps}", "--repeats=3"]),
      "gradients": ("benchmarks.bench_gradients",
                    ["--repeats=3", "--no-memory",
                     f"--peer-device={'cuda' if jax.default_backend() == 'gpu' else 'cpu'}"]),
  }
  t0 = time.perf_counter()
  results = {name: _run(name, m, a) for name, (m, a) in plan.items()}
  d = jax.devices()[0]
  lines = [f"# Benchmarks on {getattr(d, 'device_kind', d.platform)} ({d.platform})", "",
           f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `benchmarks/device.sh` "
           f"(`python -m benchmarks.device_report`) in {time.perf_counter() - t0:.0f} s; "
           f"JAX {jax.__version__}, {jax.device_count()} device(s).", ""]
  for name, r in results.items():
    lines += [f"## {name}: `python -m {r['module']} {' '.join(r['argv'])}`", ""]
    if "error" in r:
      lines += [f"Failed: {r['error']}", "", "```", r["traceback"], "```", ""]
    lines += ["```", r["printed"].rstrip(), "```", ""]
  out = args.out or f"benchmarks/results-{device_slug()}.md"
  tj_io.atomic_write_text(out, "\n".join(lines) + "\n")
  tj_io.atomic_write_json(out.replace(".md", ".json"),
                          {k: {kk: vv for kk, vv in v.items() if kk != "printed"}
                           for k, v in results.items()})
  print(f"wrote {out}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
