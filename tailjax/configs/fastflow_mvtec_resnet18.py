r"""Study A on MVTec AD with FastFlow's ResNet-18 setup (one or three scales), from your weight file.

Command:
  python scripts/train_flow.py --config=configs/fastflow_mvtec_resnet18.py \
      --config.data.root=/path/to/mvtec_anomaly_detection \
      --config.backbone.weights=/path/to/resnet18-f37072fd.pth --workdir=runs/mvtec_r18

What you need: MVTec AD on disk (or any folder in its layout; VisA with
`--config.data.kind=visa`) and torchvision's ImageNet ResNet-18 weight file,
`resnet18-f37072fd.pth` (torchvision's `ResNet18_Weights.IMAGENET1K_V1`; older
torchvision releases' legacy-format `resnet18-5c106cde.pth` is read too). It is read without PyTorch and never downloaded; its content hash
is part of the feature-cache key.

Setup, after the FastFlow paper (Yu et al. 2021, arXiv:2111.07677) as
implemented by gathierry/FastFlow (the code anomalib's FastFlow derives from):
256 px inputs, 8 coupling steps with 3×3 convolutions only, hidden ratio 1.0,
Adam lr 1e-3, batch 32, FastFlow's anomaly map (−exp(−½·mean z²), bilinear
upsampling to 256 px, no smoothing), image score = map maximum; mean-only and
tail-aware variants, 3 seeds. **One scale by default**: stride 8 (layer2, 128
channels, a 32×32 grid at 256 px), the middle of the paper's three scales:
stride 8 keeps finer localisation than stride 16 at a quarter of the patches of
stride 4. `--config.backbone.layer=16` (256 ch, 16×16) or `=4` switches the scale.
Numbers from one scale are not the paper's setup; expect them below it.

**The paper's three scales**: `--config=configs/fastflow_mvtec_resnet18.py:multiscale`
(or `:smoke,multiscale`) sets `backbone.layers = (4, 8, 16)` (layer1–3: 64/128/256
channels, 64×64/32×32/16×16 grids at 256 px): one flow per scale, each with its
own LayerNorm over its own features, trained together on the sum of the scales'
tail-aware losses (anomalib's combination), maps = every scale's scores upsampled
to 256 px and averaged. `backbone.layer` (8) stays the reference scale for PaDiM,
the validation statistics and the per-patch analyses. The field exists only in
the multi-scale variant (so a single-scale config carries no field it does not
read); `--config.backbone.layers=(8,16)` then picks other strides.

Published MVTec AD means for comparison (image AUROC / pixel AUROC, %):
  FastFlow paper, ResNet-18 (3 scales): pixel AUROC 97.2 (as quoted in the
    "Paper" row of gathierry/FastFlow's README performance table); the paper's
    image AUROC for ResNet-18 could not be confirmed here — see the paper's
    MVTec tables before quoting one. (The paper's best, CaiT: 99.4 / 98.5.)
  anomalib's own reproduction (src/anomalib/models/image/fastflow/README.md,
    seed 0, early stopping): ResNet-18 90.7 / 96.8.
Prints per category the pixel AP of both variants and PaDiM, then the report
(`<workdir>/report.md`); `configs/fastflow_mvtec_resnet18.py:smoke` shrinks the
run (2 seeds, 10 steps, 4 coupling steps) for a quick check of the data and the
weight file.
"""

import ml_collections

from tailjax.configs import fastflow_mvtec


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return literature_config(arg, "resnet18", kernel_mode="3x3")


def literature_config(arg: str | None, arch: str, kernel_mode: str) -> ml_collections.ConfigDict:
  """fastflow_mvtec with a torchvision ResNet backbone and FastFlow's evaluation.

  ``arg``: comma-separated variants, "smoke" (fastflow_mvtec's) and "multiscale"
  (strides 4, 8, 16, one flow each; reference scale ``backbone.layer`` = 8)."""
  parts = {p.strip() for p in (arg or "").split(",") if p.strip()}
  unknown = parts - {"smoke", "multiscale"}
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; use smoke and/or multiscale")
  c = fastflow_mvtec.get_config("smoke" if "smoke" in parts else None)
  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = arch
  c.backbone.weights = ""          # required: --config.backbone.weights=/path/to/<file>.pth
  c.backbone.resolution = 256
  c.backbone.layer = 8             # stride 8 (layer2): one of the paper's three scales
  c.backbone.batch_size = 16
  if "multiscale" in parts:
    c.backbone.layers = (4, 8, 16)  # the FastFlow paper's three scales, one flow each
  c.flow.kernel_mode = kernel_mode
  c.flow.hidden_ratio = 1.0
  c.eval.score = "fastflow"        # FastFlow's map: -exp(-0.5 mean_c z^2)
  c.eval.size = 256
  c.eval.smoothing_sigma = 0.0     # FastFlow/anomalib do not smooth the map
  c.eval.image_score = "max"
  return c
