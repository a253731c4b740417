"""Study B diagnosis: is the flat attention-MIL AUC the loss, the optimiser or the features,
and does attention find the contaminants?

Run (full: 5 ratios × 14 recipes × 5 seeds, plus label-permutation runs; measured
time in the README):

  python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py --workdir=runs/mil

Quick check (2 ratios, 2 seeds, tiny bags, well under a minute):

  python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py:smoke --workdir=runs/mil_smoke

It prints the answers section of ``<workdir>/report.md``: the dispersion
baseline against the study's 0.70 rule, whether the "before" AUC is flat,
whether WeightedBCE(fp_weight=2) caused it, whether the plain attention-MIL is
the bottleneck, the gain of each one-change ablation, whether the
relation-aware model beats the baseline at 5 %, whether attention finds the
contaminants (instance AUROC of the attention weights against the
foreign-instance labels), whether learned pooling beats the instance-level
no-learning score, and whether below-chance cells are noise. Every verdict is
given with intervals over seeds and with intervals that add the test-set
sampling error (bootstrap over test bags). ``results.json`` holds every
number; ``auc_vs_ratio.png`` and ``attention_bags.png`` the figures. A rerun
in the same workdir reuses finished ratios; a changed config is refused
(``--restart`` / ``--branch``).

Data: ArcFace (margin 0.4, scale 30) embeddings of sklearn digits, embedder
trained on digits 0–5, bags from the unseen digits 6–9; bags of 20 so that
5 % contamination is exactly one foreign instance. Override e.g.
``--config.data.source=embeddings --config.data.path=my.npz`` (keys
``embeddings [n, d]``, ``identity [n]``) or ``--config.data.source=bags
--config.data.path=<dir with <ratio>/<split>.npz>``; imbalanced bags with
``--config.data.positive_fraction=0.2`` (the BCE recipes then use
``pos_weight = n_neg / n_pos``).
"""

from __future__ import annotations

import ml_collections as mlc


def _recipe(model="attention", pooling="attention", layer_norm=False, loss="weighted_bce", fp_weight=2.0,
            learning_rate=1e-3, epochs=10, patience=3):
  return dict(model=model, pooling=pooling, layer_norm=layer_norm, loss=loss, fp_weight=fp_weight,
              learning_rate=learning_rate, epochs=epochs, patience=patience)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.num_seeds = 5

  c.data = mlc.ConfigDict()
  c.data.source = "digits"        # 'digits' | 'embeddings' | 'bags'
  c.data.path = ""                # .npz (embeddings) or directory (bags); must be '' for digits
  c.data.cache_dir = ""           # '' → <workdir>/cache
  c.data.ratios = ["5p", "10p", "20p", "30p", "50p"]
  c.data.n_bags = {"train": 256, "val": 128, "test": 256}
  c.data.min_bag_size = 20        # ≥ 20 keeps 5 % = one foreign instance (not more)
  c.data.max_bag_size = 20        # > min_bag_size gives variable sizes (padding + mask)
  c.data.positive_fraction = 0.5  # balanced by default
  c.data.pool_fractions = (0.5, 0.25, 0.25)  # instance pools, split before bagging
  c.data.seed = 0
  c.data.embedder = mlc.ConfigDict(dict(
      train_classes=(0, 1, 2, 3, 4, 5), heldout_classes=(6, 7, 8, 9), hidden_dim=256, embed_dim=256,
      steps=600, batch_size=128, learning_rate=1e-3, margin=0.4, scale=30.0, seed=0, fast_compile=False))

  c.model = mlc.ConfigDict(dict(input_dim=256, hidden_dim=128, attention_dim=64, dropout=0.1, gated=False))
  # hparam_axis 'map': recipe rows run in sequence inside the one compiled
  # program (seeds stay vmapped), so 10-epoch rows do not pay for 30-epoch ones.
  c.train = mlc.ConfigDict(dict(batch_size=32, max_epochs=30, fast_compile=False, hparam_axis="map"))

  before = _recipe()
  after = _recipe(layer_norm=True, loss="bce", learning_rate=1e-4, epochs=30, patience=5)
  c.recipes = mlc.ConfigDict({
      "before": before,                                   # the study's original setting
      "after": after,                                     # all of the study's fixes at once
      "loss_only": {**before, "loss": "bce"},             # one change at a time from "before"
      "lr_only": {**before, "learning_rate": 1e-4},
      "epochs_only": {**before, "epochs": 30, "patience": 5},
      "layer_norm_only": {**before, "layer_norm": True},
      # Relation-aware model with the "after" recipe and with lr 1e-3; the
      # answers use whichever has the higher validation AUC.
      "relation_after": {**after, "model": "relation"},
      "relation_lr1e-3": {**after, "model": "relation", "learning_rate": 1e-3},
      # Max-instance pooling (DSMIL's critical-instance stream): "after" with
      # only the pooling changed.
      "max_after": {**after, "pooling": "max"},
  })
  c.fp_sweep = [0.0, 0.5, 1.0, 2.0, 4.0]  # "before" with only fp_weight changed
  c.baseline_threshold = 0.70             # the study's rule for the dispersion baseline
  c.flat_range = 0.05                     # "flat": max − min of mean AUC over ratios below this
  c.medoid_top_k = 3                      # instance baseline: bag score = mean of the k largest distances
  c.n_boot = 1000                         # bootstrap resamples of the test bags
  c.permutation_runs = 10                 # "before" trained on permuted labels (the chance-level check)

  if arg == "smoke":
    c.num_seeds = 2
    c.data.ratios = ["5p", "50p"]
    c.data.n_bags = {"train": 32, "val": 32, "test": 32}
    c.data.embedder.steps = 40
    c.data.embedder.fast_compile = True
    c.train = mlc.ConfigDict(dict(batch_size=16, max_epochs=3, fast_compile=True, hparam_axis="vmap"))
    # Shrink budgets by a fixed map so "one change at a time" stays true.
    for name in c.recipes:
      c.recipes[name].epochs = {10: 2, 30: 3}[c.recipes[name].epochs]
      c.recipes[name].patience = {3: 1, 5: 2}[c.recipes[name].patience]
    c.fp_sweep = [0.0, 2.0]
    c.n_boot = 200
    c.permutation_runs = 2
  elif arg:
    raise ValueError(f"configs/mil_diagnosis.py: unknown variant {arg!r} (known: 'smoke')")
  return c
