r"""Study A on MVTec AD with FastFlow's Wide-ResNet-50-2 setup (one or three scales), from your weight file.

Command:
  python scripts/train_flow.py --config=configs/fastflow_mvtec_wrn50.py \
      --config.data.root=/path/to/mvtec_anomaly_detection \
      --config.backbone.weights=/path/to/wide_resnet50_2-95faca4d.pth --workdir=runs/mvtec_wrn50

What you need: MVTec AD on disk (or any folder in its layout; VisA with
`--config.data.kind=visa`) and torchvision's ImageNet Wide-ResNet-50-2 weight
file, `wide_resnet50_2-95faca4d.pth` (torchvision's
`Wide_ResNet50_2_Weights.IMAGENET1K_V1`, the weights FastFlow and anomalib use;
`IMAGENET1K_V2`'s file has the same layout and loads too, but gives other
features). It is read without PyTorch and never downloaded; its content hash is
part of the feature-cache key.

Setup as `configs/fastflow_mvtec_resnet18.py` (256 px inputs, 8 coupling steps,
hidden ratio 1.0, Adam lr 1e-3, batch 32, FastFlow's anomaly map without
smoothing, image score = map maximum) except the flow alternates 3×3 and 1×1
convolutions (FastFlow's setting for this backbone in gathierry/FastFlow). **One
scale by default**: stride 8 (layer2, 512 channels, a 32×32 grid at 256 px), the
middle of the paper's three scales: stride 8 localises more finely than stride 16
(1024 channels, 16×16) and costs a quarter of stride 4's patches (256 channels,
64×64). Numbers from one scale are not the paper's setup; expect them below it.

**The paper's three scales**: `--config=configs/fastflow_mvtec_wrn50.py:multiscale`
(or `:smoke,multiscale`) sets `backbone.layers = (4, 8, 16)` (256/512/1024
channels): one flow per scale, each normalising its own features, trained
together on the sum of the scales' tail-aware losses, maps averaged over scales
after upsampling; `backbone.layer` (8) stays the reference scale of PaDiM, the
validation statistics and the analyses (see `configs/fastflow_mvtec_resnet18.py`).

Published MVTec AD means for comparison (image AUROC / pixel AUROC, %):
  FastFlow paper (Yu et al. 2021, arXiv:2111.07677), Wide-ResNet-50-2 (3 scales):
    pixel AUROC 98.1 (as quoted in the "Paper" row of gathierry/FastFlow's README
    performance table); the paper's image AUROC for this backbone could not be
    confirmed here — see the paper's MVTec tables before quoting one. (The
    paper's best, CaiT: 99.4 / 98.5.)
  anomalib's own reproduction (src/anomalib/models/image/fastflow/README.md,
    seed 0, early stopping): Wide-ResNet-50-2 96.3 / 97.9.
Prints per category the pixel AP of both variants and PaDiM, then the report;
`configs/fastflow_mvtec_wrn50.py:smoke` shrinks the run (2 seeds, 10 steps).
Extraction costs several times ResNet-18's (torchvision lists 11.4 vs 1.8
GFLOPs at 224 px): use a GPU for the full MVTec AD.
"""

import ml_collections

from tailjax.configs import fastflow_mvtec_resnet18


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return fastflow_mvtec_resnet18.literature_config(arg, "wide_resnet50_2", kernel_mode="alternate")
