r"""Study A with anomalib's FastFlow block: does the tail-aware effect keep its sign?

Command (`make robustness`, after `make demo`: beside the demo's run on its calibrated
categories; ``report.compare_runs`` = runs/demo adds the section that sets the two runs'
effects side by side):
  tailjax train --config=configs/fastflow_anomalib.py --workdir=runs/anomalib

The demo's pipeline, budget (``train.num_steps``, ``eval.budgets``, batch 16, 4
coupling steps, 3×3/1×1 kernels), optimiser, seeds and report on moon and tissue (the
demo's calibrated categories), mean-only and tail-aware (λ = 0.7, r = 0.02, exact
per-location NLL), 3 seeds each (12 rows), with the flow switched to anomalib's
FastFlow block
(``anomalib/models/image/fastflow/torch_model.py``, ``create_fast_flow_block`` with
anomalib's copy of FrEIA's ``AllInOneBlock``) wherever ours differs:

  * ``flow.layer_norm = "image_affine"``: anomalib's per-scale
    ``nn.LayerNorm([C, H, W], elementwise_affine=True)``, a learned γ, β per element
    (init 1, 0) trained with the flow and outside its log-det, so training can lower
    the NLL by shrinking the features (``flows.normalize_features``); the demo's
    LayerNorm is parameter-free. Measured on the cached moon features (mean-only, 300
    steps, 1 seed, this config's optimiser): this switch alone ends at a mean patch
    NLL of 28.2 nats against the demo flow's 83.6, and the learned scales' Σ log|γ|
    per patch is −53.8 nats: nearly all of the 55-nat difference is the shrinkage
    (median |γ| 0.61), not a better model; the NLLs of the two flows are not
    comparable, their detection metrics are.
  * ``flow.global_affine = "softplus"``: FrEIA's global affine after every coupling,
    γ = 0.2·log(1 + exp(g/2)) starting at 1, β starting at 0 (anomalib always has it);
    the demo has none.
  * ``flow.subnet_init = "torch_default"``: PyTorch's default init of both subnet
    convolutions (anomalib zero-initialises nothing), so the flow does not start as
    the identity and the report's step-0 row is a randomly initialised flow; the
    demo's last subnet conv is zero.

What already matches and is not switched: the kernel order (3×3 on the first step,
as anomalib's ``1 if i % 2 == 1 else 3``), the soft clamp clamp·tanh(0.1·a) (anomalib's
copy; FrEIA's own block has used clamp·tanh(0.1·a/clamp) since 2023), the split
(⌈C/2⌉ conditioning channels), "same" zero padding and, at hidden ratio 1.0, the
subnet width (anomalib floors C·ratio, we round). What still differs: the first
coupling splits the channels after a random permutation here, in the backbone's
order there (later steps: a random permutation each in both); anomalib's defaults
of 8 coupling steps, its backbones (ResNet-18 / WRN-50 at three scales, here
EfficientNet-Lite0 at one) and its anomaly map (−exp(−½·mean_c z²)) are left at the
demo's values, since the comparison is about the flow.

The loss: anomalib's mean-only loss is Σ_scales mean_batch(½‖z‖² − log|det J|) per
image, i.e. N·(our mean per-patch NLL) minus the constant N·(C/2)·log 2π, with N the
H·W patches per image. Its gradient is N times ours; Adam divides by the root of the
second moment, so a constant scale leaves Adam's updates unchanged except that ε acts
as ε/N (1e-8/196 instead of 1e-8, far below the moments here). So the mean-only arm is
anomalib's loss, up to gradient clipping. anomalib trains with Adam at lr 1e-3,
weight decay 1e-5 (L2 in the gradient) and no gradient clipping; this config keeps
the demo's optimiser (Adam, lr 2e-3, global-norm clipping at 10) so that the
comparison with the demo changes the flow only. The clipping is not idle: on the
cached moon and tissue features (batch 16, 1 seed), unclipped Adam at lr 2e-3 has
gradient norms above 10 on 78–98 % of the first 300 steps, for the demo's flow and
this one alike, mean-only and tail-aware (step 0: 8–15 mean-only, 18–73 tail-aware),
so the clipped runs reweight steps where anomalib would not; `:no_clip` is this
config without clipping.

The mechanism analyses are off: the windowed per-patch gradients
(``analysis.gradients.flow_spec``) know only the default flow's parameters.

Variants (each switch alone, on the demo's flow, so the report can name the choice
that carries an effect; none has the even-share arm):
  * `:ln_affine`: only the learned LayerNorm affine.
  * `:global_affine`: only the softplus global affine.
  * `:subnet_init`: only PyTorch's subnet init.
  * `:no_clip`: every anomalib switch and no gradient clipping (anomalib's optimiser
    but for its learning rate and weight decay).
  * `:smoke`: every switch on the demo's smoke run (one category of a tiny benchmark,
    2 seeds, 10 steps).
"""

import ml_collections

from tailjax.configs import fastflow_textures

# anomalib's FastFlow choices where the demo's flow differs (all on by default).
ANOMALIB_FLOW = {"layer_norm": "image_affine", "global_affine": "softplus",
                 "subnet_init": "torch_default"}
SWITCHES = {"ln_affine": "layer_norm", "global_affine": "global_affine",
            "subnet_init": "subnet_init"}
VARIANTS = ("smoke", "no_clip", *SWITCHES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", *VARIANTS):
    raise ValueError(f"configs/fastflow_anomalib.py: unknown variant {arg!r} "
                     f"(known: {', '.join(map(repr, VARIANTS))})")
  smoke = arg == "smoke"
  c = fastflow_textures.get_config("smoke" if smoke else None)
  if not smoke:
    c.data.categories = "moon,tissue"
  if "tail_even_share" in c.variants:
    del c.variants["tail_even_share"]
  fields = [SWITCHES[arg]] if arg in SWITCHES else list(ANOMALIB_FLOW)
  # A new block (global_affine is a name here, a bool in the demo's config); every field
  # not switched keeps the demo's value, so a run's settings differ from the demo's by
  # exactly the switched fields.
  c.flow = ml_collections.ConfigDict({**c.flow.to_dict(), **{f: ANOMALIB_FLOW[f] for f in fields}})
  if arg == "no_clip":
    c.optim.grad_clip_norm = 0.0     # train.make_optimizer: 0 = no clipping
  c.mechanisms.enabled = False
  if not smoke:   # the runs set beside this one (a run not yet finished is named as such)
    c.report.compare_runs = "runs/demo"
  return c
