"""Study B diagnosis (attention-MIL on contaminated identity bags); same as `tailjax mil ...`.

  python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py --workdir=runs/mil
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["mil", *sys.argv[1:]], exit_process=True))
