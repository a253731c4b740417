"""Train a coupling flow on a toy two-moons feature-map density (see configs/toy_flow.py).

  python scripts/train_toy.py --config=configs/toy_flow.py --workdir=runs/toy

Same as `tailjax toy ...` (every flag is passed through); `tailjax toy --help`
lists the flags. The logic lives in `tailjax.cli` and the library it calls.
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["toy", *sys.argv[1:]], exit_process=True))
