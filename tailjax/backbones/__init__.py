"""Frozen pretrained backbones, read from their published weight files without PyTorch.

``efficientnet_lite0()`` returns a callable mapping RGB ``[B, 224, 224, 3]`` in
[0, 1] to ``{"logits", "pooled", 2, 4, 8, 16, 32}`` (feature maps by stride) and
offers ``.extract(images, layers=(16,), ...)`` for batched feature extraction.
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
from tailjax.backbones.torch_pickle import (
  default_cache_dir,
  load_legacy_torch_pickle,
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
  "default_cache_dir",
  "load_legacy_torch_pickle",
  "load_torch_state_dict_cached",
]
