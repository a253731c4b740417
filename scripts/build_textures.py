"""Builds the embedded texture benchmark (MVTec AD layout) from scikit-image's photos.

  python scripts/build_textures.py --root=data/textures --seed=0

Prints the root and how long it took; a second run with the same flags reuses
the complete copy and returns at once (see ``tailjax.data.textures``).
"""

from __future__ import annotations

import time

from absl import app, flags

from tailjax.data import textures

_ROOT = flags.DEFINE_string("root", None, "output folder (default $TAILJAX_DATA/textures "
                            "or ./data/textures)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_SIZE = flags.DEFINE_integer("image_size", 256, "image side, pixels")
_N_TRAIN = flags.DEFINE_integer("n_train", 120, "train images per category")
_N_TEST = flags.DEFINE_integer("n_test", 80, "test images per category")
_CATEGORIES = flags.DEFINE_list("categories", list(textures.SOURCE_PHOTOS), "categories")


def main(argv):
  del argv
  start = time.perf_counter()
  root = textures.build_texture_benchmark(
      _ROOT.value, seed=_SEED.value, image_size=_SIZE.value, n_train=_N_TRAIN.value,
      n_test=_N_TEST.value, categories=_CATEGORIES.value, verbose=True)
  print(f"texture benchmark ready at {root} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
  app.run(main)
