"""Study A: train mean-only and tail-aware flows, evaluate, analyse, write the report.

  python scripts/train_flow.py --config=configs/fastflow_textures.py --workdir=runs/demo

Same as `tailjax train ...` (every flag is passed through); `tailjax train --help`
lists the flags. The logic lives in `tailjax.cli` and the library it calls.
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["train", *sys.argv[1:]], exit_process=True, local_processes=True))
