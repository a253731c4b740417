r"""Study A on a real MVTec AD (or VisA) copy on disk.

Command:
  python scripts/train_flow.py --config=configs/fastflow_mvtec.py \
      --config.data.root=/path/to/mvtec_anomaly_detection \
      --config.data.categories=bottle,carpet --workdir=runs/mvtec

VisA: add `--config.data.kind=visa` and point `data.root` at the folder that
holds `split_csv/1cls.csv`. Prints per category the pixel AP of mean-only,
tail-aware and PaDiM, then the report (`<workdir>/report.md`, same format as the
texture demo). Settings follow the study: 8 coupling steps, 3 seeds, 500 steps
of batch 32, Adam lr 1e-3. `configs/fastflow_mvtec.py:smoke` shrinks the run (2 seeds, 10
steps) for a quick check of a data folder.
"""

import ml_collections

from tailjax.configs import fastflow_textures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = fastflow_textures.get_config("smoke" if smoke else None)
  c.data.kind = "mvtec"
  for name in ("benchmark_seed", "image_size", "n_train", "n_test", "ladder"):  # textures only
    del c.data[name]
  c.data.root = ""                 # required: --config.data.root=...
  c.data.categories = ""           # comma list; "" = every category under root
  c.flow.num_steps = 4 if smoke else 8
  c.train.num_steps = 10 if smoke else 500
  if not smoke:
    c.eval.budgets = (0, 30, 100, 300, 400, 500)
  c.optim.learning_rate = 1e-3
  c.train.batch_size = 8 if smoke else 32
  return c
