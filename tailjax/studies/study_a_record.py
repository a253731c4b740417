"""What a study-A run is, for those who train it and those who read it: its kind, its
reference scale and the finished categories reloaded from the workdir
(``load_trained``); its row table is ``engine.Rows.from_variants``.

Imported by ``study_a`` (which trains the rows) and by ``analysis`` and ``predict``
(which reload them): the layer below all three, so ``study_a`` can run the analyses
without the two importing each other (``tests/test_layering.py`` forbids any circle).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tailjax import engine, flows, runrecord
from tailjax import train as train_lib
from tailjax.data import pipeline

KIND = "study_a"


def reference_scale(cfg, data: pipeline.CategoryData) -> int:
  """Index of ``backbone.layer`` among a multi-scale run's scales."""
  return data.layers.index(int(cfg.backbone.layer))


@dataclasses.dataclass
class TrainedCategory:
  """A finished study-A category, reloaded from its workdir (for analyses)."""
  cfg: Any
  data: pipeline.CategoryData
  model: flows.FastFlow2d
  program: train_lib.FlowProgram
  params_R: Any                 # every leaf has a leading row axis (host arrays)
  rows: list[dict]              # per row: variant, seed, tail_weight, top_k_ratio, learning_rate
  dataset: pipeline.Dataset     # for image-space analyses (``dataset.train_images``)
  # Multi-scale runs: model/program/params_R above are the reference scale's flow
  # (``backbone.layer``); these hold every scale (None for a single-scale run).
  full_program: train_lib.FlowProgram | None = None
  full_params_R: Any = None


def load_config(workdir: str | Path):
  """The config a workdir ran, from its verified manifest (``runrecord.read_run``: read
  only, no lock)."""
  import ml_collections
  return ml_collections.ConfigDict(runrecord.read_run(workdir, kind=KIND)["config"])


def load_trained(workdir: str | Path, categories=None) -> dict[str, TrainedCategory]:
  """Reloads features, masks and the trained rows of every (or the given) category.

  Nothing is trained: the rows are restored from their final checkpoints (whatever row
  mode or backend trained them); an unfinished category is an error. For a multi-scale
  run (``backbone.layers``), ``model``, ``program`` and ``params_R`` are those of the
  reference scale ``backbone.layer`` alone (the flow of that scale is exactly the
  sub-module ``scale_<s>`` of the multi-scale model), so the per-patch analyses run on
  it with ``data.train_feats`` unchanged; ``full_program`` / ``full_params_R`` hold all
  scales.
  """
  workdir = Path(workdir)
  cfg = load_config(workdir)
  dataset = pipeline.Dataset(cfg)
  wanted = pipeline.parse_categories(categories) or dataset.categories
  rows = engine.Rows.from_variants(cfg)
  out = {}
  for name in wanted:
    data = dataset.load(name)
    program, params_R, step = engine.load_rows(
        cfg, workdir, name, train_lib.feats_shape_of(data.flow_feats("train")), rows)
    if step != int(cfg.train.num_steps):
      raise ValueError(f"category {name!r} in {workdir} stopped at step {step} of "
                       f"{cfg.train.num_steps}: rerun the training command to finish it")
    if not data.multiscale:
      out[name] = TrainedCategory(cfg, data, program.model, program, params_R, rows.to_json(),
                                  dataset)
      continue
    s = reference_scale(cfg, data)
    ref_program = train_lib.make_flow_program(cfg, data.train_feats.shape,
                                              conv_impl=program.conv_impl)
    ref_params_R = {"params": params_R["params"][f"scale_{s}"]}
    out[name] = TrainedCategory(cfg, data, ref_program.model, ref_program, ref_params_R,
                                rows.to_json(), dataset, full_program=program,
                                full_params_R=params_R)
  return out
