r"""Study A on features extracted elsewhere (any backbone, grid and channel count).

Command:
  python scripts/train_flow.py --config=configs/fastflow_features.py \
      --config.data.path=/path/to/features --workdir=runs/features

`data.path` is a folder of `<category>.npz` files (`--config.data.categories=a,b`
picks some; default all) or a single `.npz` (one category, named by the file
stem). Each file holds exactly:

  train_features [N, H, W, C]  defect-free training samples (float; N ≥ 2)
  test_features  [M, H, W, C]  the same grid H×W and channel count C
  test_labels    [M]           0 good, 1 defective (both must occur)
  test_masks     [M, S, S]     pixel masks, 0/1 or 0/255; empty exactly for good samples

e.g. `np.savez("bottle.npz", train_features=..., test_features=..., test_labels=...,
test_masks=...)` from a PyTorch extractor (convert NCHW to NHWC first). Bad files
stop with an error naming the file and the array. No backbone runs, so this
config has no `backbone` block and the features are not cached or changed (the
flow's LayerNorm normalises them as usual). `data.val_fraction` of the training
samples are held out as in every study-A run (never trained on); `tailjax
predict` needs images and a backbone, so it does not apply to features runs. Maps are upsampled from H×W to `eval.size`
and the masks resized (nearest neighbour) to `eval.size`: pass
`--config.eval.size=S` to score at the masks' own resolution. Figures show the
masks instead of images. Prints and writes the same report as
`configs/fastflow_textures.py`.

`configs/fastflow_features.py:smoke` shrinks the run (2 seeds, 10 steps, 2
coupling steps) for a quick check of a features file.
"""

import ml_collections

from tailjax.configs import fastflow_textures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = fastflow_textures.get_config("smoke" if smoke else None)
  c.data = ml_collections.ConfigDict()
  c.data.kind = "features"
  c.data.path = ""                # required: --config.data.path=<folder of <cat>.npz | file.npz>
  c.data.categories = ""          # comma list; "" = every file in the folder
  c.data.val_fraction = 0.2       # training samples held out (never trained on)
  c.data.split_seed = 0
  del c["backbone"]               # features are given: no backbone field is read
  if smoke:
    c.flow.num_steps = 2
  return c
