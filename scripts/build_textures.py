"""Builds the embedded texture benchmark (MVTec AD layout) from scikit-image's photos.

  python scripts/build_textures.py --root=data/textures --seed=0

Same as `tailjax build-textures ...` (every flag is passed through); `tailjax build-textures --help`
lists the flags. The logic lives in `tailjax.cli` and the library it calls.
"""

import sys

from tailjax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["build-textures", *sys.argv[1:]], exit_process=True))
