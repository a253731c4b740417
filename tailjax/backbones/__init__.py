"""Frozen pretrained backbones, read from their published weight files without PyTorch.

``efficientnet_lite0()``, ``resnet18(weights_path)`` and
``wide_resnet50_2(weights_path)`` return callables mapping RGB ``[B, H, W, 3]``
in [0, 1] to ``{"logits", "pooled", 2, 4, 8, 16, 32}`` (feature maps by stride)
that offer ``.extract(images, layers=(16,), ...)`` for batched feature
extraction. ``load_torch_state_dict(path)`` reads any ``torch.save`` state dict
(zip or legacy format) as NumPy arrays without running pickle code.
"""

from tailjax.backbones.efficientnet_lite import (
  DEFAULT_NORMALIZATION,
  FEATURE_CHANNELS,
  NORMALIZATIONS,
  EfficientNetLite0,
  EfficientNetLite0Features,
  Outputs,
  efficientnet_lite0,
  stem_statistics_fit,
  tf_same_padding,
  variables_from_torch,
)
from tailjax.backbones.resnet import (
  ResNet,
  ResNetFeatures,
  ResNetSpec,
  random_torchvision_state_dict,
  resnet18,
  resnet_variables_from_torch,
  wide_resnet50_2,
)
from tailjax.backbones.torch_pickle import (
  default_cache_dir,
  load_legacy_torch_pickle,
  load_torch_state_dict,
  load_torch_state_dict_cached,
)

__all__ = [
  "DEFAULT_NORMALIZATION",
  "FEATURE_CHANNELS",
  "NORMALIZATIONS",
  "EfficientNetLite0",
  "EfficientNetLite0Features",
  "Outputs",
  "efficientnet_lite0",
  "stem_statistics_fit",
  "tf_same_padding",
  "variables_from_torch",
  "ResNet",
  "ResNetFeatures",
  "ResNetSpec",
  "random_torchvision_state_dict",
  "resnet18",
  "resnet_variables_from_torch",
  "wide_resnet50_2",
  "default_cache_dir",
  "load_legacy_torch_pickle",
  "load_torch_state_dict",
  "load_torch_state_dict_cached",
]
