r"""Study A on the embedded texture benchmark: mean-only vs tail-aware FastFlow.

Command (the README's main job, `make demo`):
  tailjax train --config=configs/fastflow_textures.py --workdir=runs/demo

Builds (or reuses) the texture benchmark (``tailjax.data.textures``: all nine
categories at ``<data.root>-all``, ``pipeline.texture_build``) and its difficulty ladder
(``tailjax.data.ladder``, at ``<data.root>-ladder``), and runs three categories: brick
(hard tier: the original photograph, uncalibrated) and moon and tissue (calibrated:
defect strength set so PaDiM's image AUROC on a calibration split lies in 85–97 %, the
original study's regime) — the demo-sized set whose ladders keep at least two rungs
under the clipping limit, so the within-category dose–response is estimable. It
extracts EfficientNet-Lite0 stride-16 features (14×14 grid, cached) and trains, 3 seeds
each, mean-only (λ = 0) and tail-aware (λ = 0.7, r = 0.02, the tail ranked by the exact
per-location NLL): 6 rows per category. Every row is evaluated at the budgets
``eval.budgets`` on the benchmark's test set and, at the last one, on the 5 rungs of its
category's ladder. The report (`runs/demo/report.md`) gives the answer (headline
metrics with intervals over seeds and test images, the within-category dose–response
on the ladder, per defect kind, the cross-category description, convergence), the
tables and the mechanism analyses (`runs/demo/analysis/report.md`).

Why 800 steps: on the demo's categories the mean validation NLL per patch stops
falling by more than ``eval.plateau_tol`` = 1 nat between late budgets at about 400
(tissue, mean-only) to 1000–1500 steps (moon, mean-only); tail-aware rows plateau at
800–1000 (a measured curve to 2000 steps, 1 seed, 100–500-step budgets). 800 steps
with budgets every 100 steps from 500 on is what fits `make demo` in about 15 min on a
2-core CPU (training is about 60 % of it, the evaluations with their bootstrap and the
ladder most of the rest); the report counts the rows that reached the plateau and
reads the answer from them alone as a sensitivity. `make study` trains to 2000 steps.

Variants:
  * `:smoke` shrinks the run (one category of a tiny benchmark, 2 seeds, 10 steps;
    about 30 s after the install).
  * `:hard` is the demo on the hard tier alone (brick, grass, gravel).
  * `:even_share` adds the tail-aware loss with the tail ranked (and averaged) by the
    even-share per-patch NLL ``½‖z‖² − logdet_image / N`` (``tail_even_share``: what a
    user of a flow returning one log-det per image, as anomalib/FrEIA FastFlow,
    computes; ``losses.NLL_DEFINITIONS``): the exact-vs-even-share equivalence test.
  * `:all_nll` adds even-share and ½‖z‖² alone (``tail_sq_norm``; it ranks the tail as
    even_share does and differs only in the tail's average).
Any field can be overridden, e.g. `--config.num_seeds=5`, `--config.train.num_steps=400`,
`--config.variants.tail_aware.tail_weight=1.0`, `--config.data.categories=calibrated`
(categories, tiers or `all`, as `tailjax build-textures --categories` takes them).
A field no stage reads is an error, and rerunning a workdir with different
results-relevant fields is refused (`--restart`, `--branch`).
"""

import ml_collections

VARIANTS = ("smoke", "hard", "even_share", "all_nll")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", *VARIANTS):
    raise ValueError(f"configs/fastflow_textures.py: unknown variant {arg!r} "
                     f"(known: {', '.join(map(repr, VARIANTS))})")
  smoke, hard = arg == "smoke", arg == "hard"
  c = ml_collections.ConfigDict()
  c.seed = 0            # first seed; seeds are seed, seed+1, ...
  c.num_seeds = 2 if smoke else 3

  c.data = ml_collections.ConfigDict()
  c.data.kind = "textures"        # textures | mvtec | visa
  c.data.root = "data/textures-smoke" if smoke else ""   # "" = default_benchmark_root()
  # Comma list of categories, tiers (hard, calibrated) or "all" (textures.expand_categories);
  # "" = the default build, the hard tier.
  c.data.categories = "brick" if smoke else ("" if hard else "brick,moon,tissue")
  c.data.benchmark_seed = 0
  c.data.image_size = 256
  c.data.n_train = 24 if smoke else 120
  c.data.n_test = 16 if smoke else 80
  # The difficulty ladder (tailjax.data.ladder): the same trained rows are also scored, at
  # the last budget, on test sets of every category at 5 calibrated defect strengths.
  c.data.ladder = True
  c.data.cache_dir = ""           # "" = ~/.cache/tailjax/features (or $TAILJAX_CACHE)
  c.data.val_fraction = 0.2       # normal training images held out (model selection, thresholds)
  c.data.split_seed = 0           # which ones (never test images)

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = "efficientnet_lite0"
  c.backbone.normalization = "inception"   # what the weights expect; see tailjax/backbones
  c.backbone.resolution = 224
  c.backbone.layer = 16                    # stride 16: 14×14 × 112 channels
  c.backbone.batch_size = 16

  c.flow = ml_collections.ConfigDict()
  c.flow.num_steps = 4
  c.flow.kernel_mode = "alternate"   # FastFlow: 3×3 / 1×1
  c.flow.hidden_ratio = 1.0
  c.flow.clamp = 2.0
  c.flow.global_affine = False
  c.flow.layer_norm = "image"        # FastFlow's per-scale LayerNorm (parameter-free here)

  # Each variant is a row family: λ = tail_weight, r = top_k_ratio (k = max(1, round(r·N))),
  # optionally its own learning_rate (default optim.learning_rate).
  c.variants = ml_collections.ConfigDict()
  c.variants.mean_only = ml_collections.ConfigDict({"tail_weight": 0.0, "top_k_ratio": 0.02})
  c.variants.tail_aware = ml_collections.ConfigDict({"tail_weight": 0.7, "top_k_ratio": 0.02})
  # The same loss with the tail ranked (and averaged) by a PyTorch FastFlow user's per-patch
  # NLL: "even_share" = ½‖z‖² − logdet_image / N, "sq_norm" = ½‖z‖² (losses.NLL_DEFINITIONS).
  if arg in ("even_share", "all_nll"):
    c.variants.tail_even_share = ml_collections.ConfigDict(
        {"tail_weight": 0.7, "top_k_ratio": 0.02, "tail_nll": "even_share"})
  if arg == "all_nll":
    c.variants.tail_sq_norm = ml_collections.ConfigDict(
        {"tail_weight": 0.7, "top_k_ratio": 0.02, "tail_nll": "sq_norm"})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.learning_rate = 2e-3
  c.optim.grad_clip_norm = 10.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10 if smoke else 800
  c.train.batch_size = 8 if smoke else 16
  # How rows execute (never changes a number or the checkpoint layout):
  c.train.segment_steps = 5 if smoke else 100   # checkpoint / log / resume granularity
  c.train.row_mode = "auto"          # vmap | map | auto (map on CPU, vmap on GPU/TPU)
  c.train.conv_impl = "auto"     # xla | matmul | auto (matmul on CPU, xla on GPU/TPU)
  c.train.batch_devices = 1      # devices splitting one row's batch; the rest split rows
  c.train.profile_steps = 0      # > 0: jax.profiler trace of that many steps + ops.md, <category>/profile
  # 1: one process. n or "auto" (one per core on a CPU host): the rows in n local
  # processes, same numbers (tailjax.distributed.launch_local). Not the default: on a
  # 2-core CPU one process already runs a row's step 1.8x faster than one core does, and
  # the processes trained the demo's grid 1.01x as fast (docs/distributed.md).
  c.train.processes = 1
  # Changes numbers: "bfloat16" runs the flow's convolutions in bfloat16 (float32
  # parameters, log-dets, NLL, top-k and optimiser state); see tailjax/train.py.
  c.train.precision = "float32"  # float32 | bfloat16

  c.eval = ml_collections.ConfigDict()
  c.eval.score = "nll"               # nll | fastflow
  c.eval.size = 224                  # maps and masks compared at this resolution
  c.eval.smoothing_sigma = 4.0
  c.eval.image_score = "max"         # max | topk_mean
  c.eval.image_topk = 10
  c.eval.fpr_limit = 0.3
  # Every row is evaluated at each budget (steps; 0 = the untrained flow) without retraining.
  c.eval.budgets = (0, 5, 10) if smoke else (0, 100, 300, 500, 600, 700, 800)
  # Plateau rule: a row has plateaued at budget s when no later budget improves its mean
  # per-patch validation NLL by more than this many nats (absolute, so free of the
  # constant (C/2)·log 2π). 1 nat: above the spread of the validation NLL over 3 seeds
  # at one budget (at most 0.65 nats at 300 steps), and an order below what every row
  # still gains between 100 and 300 steps (7.6 to 17.7 nats).
  c.eval.plateau_tol = 1.0
  # Bootstrap resamples of the test images (stratified by label, the same for every row):
  # every per-category effect's interval counts the test images as well as the seeds.
  c.eval.n_boot = 20 if smoke else 200
  c.eval.boundary_px = 4             # L3: the defect border band, pixels at eval.size
  c.eval.fixed_tpr = 0.8             # L2/L3: FPR at this pixel TPR

  c.padim = ml_collections.ConfigDict()
  c.padim.eps = 0.01
  c.padim.n_channels = 100

  c.mechanisms = ml_collections.ConfigDict()
  c.mechanisms.enabled = not smoke     # mechanism analyses (H1/H3/H4/H7) after training
  c.mechanisms.num_images = 32         # training images for the gradient analysis (H3)
  c.mechanisms.num_param_images = 32   # of those, with exact per-patch parameter gradients
  c.mechanisms.sweeps = ""             # comma list of sweep workdirs (results.json) for H4 / ablations

  c.report = ml_collections.ConfigDict()
  c.report.baseline = "mean_only"
  c.report.treatment = "tail_aware"
  c.report.n_examples = 2 if smoke else 4
  # Exact vs even-share per-patch NLL: pixel-AP differences within ±this many pp count as
  # equivalent (TOST). 2 pp is small against the tail-aware − mean-only differences the
  # comparison is about (several pp in the calibrated tier), so an approximation
  # equivalent within it cannot account for them; fixed before the run.
  c.report.equivalence_margin_pp = 2.0
  # The ladder's dose–response: a pooled slope of Δ pixel AP on the rung covariate inside
  # ±this many pp per pp counts as "no dose–response" (TOST); 0.1 pp per pp moves Δ by
  # 3.7 pp over the ladder's span (60 → 97 % PaDiM AUROC). Fixed before the run.
  c.report.slope_margin = 0.1
  # Finished study-A workdirs (comma list) whose per-category effects the report sets
  # beside this run's (robustness across flow implementations; configs/fastflow_anomalib.py).
  c.report.compare_runs = ""
  return c
