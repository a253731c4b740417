"""Study A mechanism analyses (H1, H3, H4, H7) of a finished run.

  python scripts/analyze.py --workdir=runs/demo --sweeps=runs/sweep_lambda,runs/sweep_top_k

Same as `tailjax analyze ...` (every flag is passed through); `tailjax analyze --help`
lists the flags. The logic lives in `tailjax.cli` and the library it calls.
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["analyze", *sys.argv[1:]], exit_process=True))
