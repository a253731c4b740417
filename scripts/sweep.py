"""A grid of flow trainings (λ × r × learning rate × seeds) as one sharded, resumable program.

  python scripts/sweep.py --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k [--distributed]

Same as `tailjax sweep ...` (every flag is passed through); `tailjax sweep --help`
lists the flags. The logic lives in `tailjax.cli` and the library it calls.
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["sweep", *sys.argv[1:]], exit_process=True, local_processes=True))
