"""torchvision's ResNet-18 and Wide-ResNet-50-2 in Flax linen, from the user's weight file.

Architecture (He et al. 2016 as torchvision builds it, "ResNet v1.5": the
stride of a bottleneck sits in its 3x3 conv)::

  stem    conv7x7/2 pad 3 (64) -> BN -> ReLU               -> stride 2
          maxpool 3x3/2 pad 1 (pads with -inf)
  layer1..layer4  (planes 64, 128, 256, 512; the first block of layer2..4 has stride 2)
    BasicBlock  (resnet18, [2, 2, 2, 2], expansion 1):
      conv3x3/s -> BN -> ReLU -> conv3x3 -> BN,  + shortcut, ReLU
    Bottleneck  (wide_resnet50_2, [3, 4, 6, 3], expansion 4, width = planes * 128 / 64):
      conv1x1 (width) -> BN -> ReLU -> conv3x3/s (width) -> BN -> ReLU
      -> conv1x1 (4 * planes) -> BN,  + shortcut, ReLU
    shortcut = identity, or conv1x1/s -> BN ("downsample") when the stride or
    channel count changes
  head    global average pool -> fc (1000)

Every conv is bias-free with symmetric padding k // 2 (PyTorch's
``padding=k//2``; output size floor((H + 2p - k) / s) + 1). BatchNorm runs in
inference mode with the running statistics, eps = 1e-5:
``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.
Input: RGB in [0, 1], normalised inside with the ImageNet mean/std
``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)`` that torchvision's
weights were trained with.

Outputs (an :class:`~tailjax.backbones.efficientnet_lite.Outputs` dict), at a
224x224 input:

  stride  module        resnet18       wide_resnet50_2
  2       stem (ReLU)   64 x 112^2     64 x 112^2
  4       layer1        64 x 56^2      256 x 56^2
  8       layer2        128 x 28^2     512 x 28^2
  16      layer3        256 x 14^2     1024 x 14^2
  32      layer4        512 x 7^2      2048 x 7^2
  "pooled"              [B, 512]       [B, 2048]
  "logits"              [B, 1000]      [B, 1000]

Weights come from a torchvision ``state_dict`` file (``conv1.weight``,
``bn1.running_mean``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ``fc.weight``, ...; zip or legacy
``torch.save`` format, read without PyTorch by :mod:`torch_pickle`); conv
kernels go from OIHW to HWIO, the fc weight is transposed. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tailjax.backbones import efficientnet_lite, torch_pickle
from tailjax.backbones.efficientnet_lite import NORMALIZATIONS, Outputs

__all__ = [
  "ARCHS",
  "BN_EPSILON",
  "ResNetSpec",
  "ResNet",
  "ResNetFeatures",
  "feature_channels",
  "resnet_variables_from_torch",
  "random_torchvision_state_dict",
  "resnet18",
  "wide_resnet50_2",
]

EXPANSION = {"basic": 1, "bottleneck": 4}
BN_EPSILON = 1e-5
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


class ResNetSpec(NamedTuple):
  """torchvision's ``ResNet(block, layers, width_per_group)``; ``planes[0]`` is also the stem width.

  A bottleneck's inner width is ``planes * width_per_group // 64``; its output,
  like a layer's, has ``planes * expansion`` channels (expansion 1 for "basic",
  4 for "bottleneck").
  """
  block: str  # "basic" | "bottleneck"
  layers: tuple[int, int, int, int]
  width_per_group: int = 64
  planes: tuple[int, int, int, int] = (64, 128, 256, 512)


ARCHS: dict[str, ResNetSpec] = {
  "resnet18": ResNetSpec("basic", (2, 2, 2, 2)),
  "wide_resnet50_2": ResNetSpec("bottleneck", (3, 4, 6, 3), width_per_group=128),
}


def _spec(arch: str | ResNetSpec) -> ResNetSpec:
  if isinstance(arch, ResNetSpec):
    if arch.block not in EXPANSION or len(arch.layers) != 4 or len(arch.planes) != 4:
      raise ValueError(f"bad ResNetSpec {arch}")
    return arch
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r}; expected one of {sorted(ARCHS)} or a ResNetSpec")
  return ARCHS[arch]


def feature_channels(arch: str | ResNetSpec) -> dict[int, int]:
  """Channels of the feature map at each stride: ``{2: stem, 4: layer1, ..., 32: layer4}``."""
  spec = _spec(arch)
  return {2: spec.planes[0],
          **{4 * 2 ** i: p * EXPANSION[spec.block] for i, p in enumerate(spec.planes)}}


class _ConvBN(nn.Module):
  """Bias-free kxk conv (stride s, padding k // 2 each side) -> inference BN -> optional ReLU."""
  features: int
  kernel: int
  stride: int = 1
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    p = self.kernel // 2
    y = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding=[(p, p), (p, p)], use_bias=False, dtype=self.dtype,
                name="conv")(x_BxHxWxC)
    y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype,
                     name="bn")(y)
    return nn.relu(y) if self.relu else y


class _Block(nn.Module):
  """A torchvision BasicBlock or Bottleneck (stride in the 3x3 conv); see the module docstring."""
  kind: str  # "basic" | "bottleneck"
  planes: int
  stride: int
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    out_channels = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      h = _ConvBN(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x_BxHxWxC)
      h = _ConvBN(self.planes, 3, relu=False, dtype=self.dtype, name="conv2")(h)
    else:
      width = self.planes * self.width_per_group // 64
      h = _ConvBN(width, 1, dtype=self.dtype, name="conv1")(x_BxHxWxC)
      h = _ConvBN(width, 3, self.stride, dtype=self.dtype, name="conv2")(h)
      h = _ConvBN(out_channels, 1, relu=False, dtype=self.dtype, name="conv3")(h)
    shortcut = x_BxHxWxC
    if self.stride != 1 or x_BxHxWxC.shape[-1] != out_channels:
      shortcut = _ConvBN(out_channels, 1, self.stride, relu=False, dtype=self.dtype,
                         name="downsample")(x_BxHxWxC)
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """torchvision ResNet (inference). Maps RGB ``[B, H, W, 3]`` in [0, 1] to a dict of outputs.

  ``arch``: a key of :data:`ARCHS` or a :class:`ResNetSpec`. Returns
  :class:`Outputs` ``{"logits": [B, classes], "pooled": [B, C_32], s: [B, H_s,
  W_s, C_s]}`` for strides s in 2, 4, 8, 16, 32 (see the module docstring; H_s
  follows PyTorch's floor rounding, so 224 gives 224 / s). ImageNet mean/std
  normalisation happens inside.
  """
  arch: str | ResNetSpec = "resnet18"
  num_classes: int = 1000
  normalization: str = "imagenet"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWx3):
    spec = _spec(self.arch)
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; expected one of "
                       f"{sorted(NORMALIZATIONS)}")
    if images_BxHxWx3.ndim != 4 or images_BxHxWx3.shape[-1] != 3:
      raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images_BxHxWx3.shape}")
    mean, std = NORMALIZATIONS[self.normalization]
    mean_1x1x1x3 = jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, 3)
    std_1x1x1x3 = jnp.asarray(std, jnp.float32).reshape(1, 1, 1, 3)
    x = (images_BxHxWx3.astype(jnp.float32) - mean_1x1x1x3) / std_1x1x1x3
    x = _ConvBN(spec.planes[0], 7, 2, dtype=self.dtype, name="stem")(x.astype(self.dtype))
    outputs = Outputs({2: x})
    # nn.max_pool pads with -inf, like torch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for layer, (planes, count) in enumerate(zip(spec.planes, spec.layers)):
      for i in range(count):
        stride = 2 if layer > 0 and i == 0 else 1
        x = _Block(spec.block, planes, stride, spec.width_per_group, dtype=self.dtype,
                   name=f"layer{layer + 1}_{i}")(x)
      outputs[4 * 2 ** layer] = x
    pooled_BxC = x.astype(jnp.float32).mean(axis=(1, 2))
    outputs["pooled"] = pooled_BxC
    outputs["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pooled_BxC)
    return outputs


def _torch_names(path: tuple[str, ...]) -> tuple[str, str]:
  """(torch conv prefix, torch BN prefix) of the :class:`_ConvBN` at Flax module ``path``."""
  if path == ("stem",):
    return "conv1", "bn1"
  block, unit = path  # ("layer2_0", "conv1" | "conv2" | "conv3" | "downsample")
  t = block.replace("_", ".")
  if unit == "downsample":
    return f"{t}.downsample.0", f"{t}.downsample.1"
  return f"{t}.{unit}", f"{t}.bn{unit[-1]}"


@functools.lru_cache(maxsize=8)
def _flax_shapes(spec: ResNetSpec, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  variables = jax.eval_shape(ResNet(spec, num_classes=num_classes).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}


def resnet_variables_from_torch(state_dict: Mapping[str, np.ndarray], arch: str | ResNetSpec,
                                source: str = "state dict",
                                num_classes: int = 1000) -> dict[str, Any]:
  """Converts a torchvision ResNet ``state_dict`` (``{name: array}``) to Flax variables of ``arch``.

  ``<conv>.weight`` [O, I, k, k] -> ``kernel`` [k, k, I, O]; BN ``weight``,
  ``bias``, ``running_mean``, ``running_var`` -> ``scale``, ``bias``, ``mean``,
  ``var``; ``fc.weight`` [classes, C] -> ``kernel`` [C, classes]. Every Flax leaf
  must be filled with exactly its shape and every tensor used
  (``num_batches_tracked`` aside); otherwise ``ValueError`` naming ``source``
  and the tensor.
  """
  expected = _flax_shapes(_spec(arch), num_classes)
  flax_to_torch: dict[tuple[str, ...], tuple[str, tuple[int, ...] | None]] = {}
  for key in expected:
    _, *modules, leaf = key
    if modules == ["fc"]:
      flax_to_torch[key] = ("fc.weight", (1, 0)) if leaf == "kernel" else ("fc.bias", None)
      continue
    conv, bn = _torch_names(tuple(modules[:-1]))
    flax_to_torch[key] = {
        "kernel": (f"{conv}.weight", (2, 3, 1, 0)),  # OIHW -> HWIO
        "scale": (f"{bn}.weight", None), "bias": (f"{bn}.bias", None),
        "mean": (f"{bn}.running_mean", None), "var": (f"{bn}.running_var", None),
    }[leaf]

  # Check in torchvision's order, so the first error is the first bad tensor of the file.
  order = {}
  for conv, bn, *_ in _torchvision_convs(arch):
    for name in (f"{conv}.weight", *(f"{bn}.{leaf}" for leaf in _BN_LEAVES)):
      order[name] = len(order)
  flat = {}
  for key, (name, transpose) in sorted(flax_to_torch.items(),
                                       key=lambda item: order.get(item[1][0], len(order))):
    if name not in state_dict:
      raise ValueError(f"{source}: missing tensor '{name}' (is this a torchvision {arch} "
                       "state dict?)")
    want = expected[key]
    torch_shape = want if transpose is None else tuple(want[i] for i in np.argsort(transpose))
    arr = np.asarray(state_dict[name])
    if arr.shape != torch_shape:
      raise ValueError(f"{source}: tensor '{name}' has shape {arr.shape}, {arch} needs "
                       f"{torch_shape}")
    arr = arr.astype(np.float32)
    flat[key] = arr if transpose is None else arr.transpose(transpose)
  used = {name for name, _ in flax_to_torch.values()}
  unused = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
  if unused:
    raise ValueError(f"{source}: {len(unused)} tensors that {arch} does not have, e.g. "
                     f"{unused[:5]}")
  return traverse_util.unflatten_dict(flat)


def _torchvision_convs(arch: str | ResNetSpec) -> Iterator[tuple[str, str, int, int, int]]:
  """(conv name, BN name, out channels, in channels, kernel) per conv+BN, in torchvision's order."""
  spec = _spec(arch)
  inplanes = spec.planes[0]
  yield "conv1", "bn1", inplanes, 3, 7
  for layer, (planes, count) in enumerate(zip(spec.planes, spec.layers)):
    out = planes * EXPANSION[spec.block]
    for i in range(count):
      t = f"layer{layer + 1}.{i}"
      if spec.block == "basic":
        yield f"{t}.conv1", f"{t}.bn1", planes, inplanes, 3
        yield f"{t}.conv2", f"{t}.bn2", planes, planes, 3
      else:
        width = planes * spec.width_per_group // 64
        yield f"{t}.conv1", f"{t}.bn1", width, inplanes, 1
        yield f"{t}.conv2", f"{t}.bn2", width, width, 3
        yield f"{t}.conv3", f"{t}.bn3", out, width, 1
      if i == 0 and (layer > 0 or inplanes != out):
        yield f"{t}.downsample.0", f"{t}.downsample.1", out, inplanes, 1
      inplanes = out


def random_torchvision_state_dict(arch: str | ResNetSpec, seed: int = 0,
                                  num_classes: int = 1000) -> dict[str, np.ndarray]:
  """A torchvision-named ``arch`` state dict with random weights (float32, plus int64 counters).

  Convs: He-normal with fan-out (torchvision's init), std sqrt(2 / (O k^2)).
  BatchNorm: weight ~ U(0.5, 1.5) -- U(0.1, 0.3) for the last BN of a residual
  branch, so activations stay O(1) through the sum of residuals instead of
  growing with depth -- bias ~ N(0, 0.1), running_mean ~ N(0, 0.1),
  running_var ~ U(0.5, 2), ``num_batches_tracked`` int64 scalars.
  fc: U(-1/sqrt(C), 1/sqrt(C)) (torch.nn.Linear's init). For tests and timing
  without a weight file; the same keys, shapes and order as torchvision's.
  """
  spec = _spec(arch)
  rng = np.random.default_rng(seed)
  f32 = np.float32
  last_bn = "bn2" if spec.block == "basic" else "bn3"  # closes each residual branch
  sd: dict[str, np.ndarray] = {}
  for conv, bn, out, inp, k in _torchvision_convs(spec):
    he_std = f32(np.sqrt(2 / (out * k * k)))
    sd[f"{conv}.weight"] = rng.standard_normal((out, inp, k, k), f32) * he_std
    lo, hi = (0.1, 0.3) if bn.endswith(last_bn) else (0.5, 1.5)
    sd[f"{bn}.weight"] = rng.uniform(lo, hi, out).astype(f32)
    sd[f"{bn}.bias"] = rng.standard_normal(out, f32) * f32(0.1)
    sd[f"{bn}.running_mean"] = rng.standard_normal(out, f32) * f32(0.1)
    sd[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, out).astype(f32)
    sd[f"{bn}.num_batches_tracked"] = np.array(rng.integers(1, 10_000), np.int64)
  c = spec.planes[-1] * EXPANSION[spec.block]
  bound = 1 / np.sqrt(c)
  sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, c)).astype(f32)
  sd["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(f32)
  return sd


class ResNetFeatures(efficientnet_lite.EfficientNetLite0Features):
  """A frozen torchvision ResNet: callable on batches, with the batched extractor.

  The same contract as :class:`EfficientNetLite0Features` (whose call and
  ``extract`` machinery it reuses; only the network differs):
  ``model(images_BxHxWx3)`` (RGB float in [0, 1], jitted) returns
  ``{"logits": [B, 1000], "pooled": [B, C], 2|4|8|16|32: [B, H/s, W/s, C_s]}``;
  ``model.extract(images, layers=(8, 16), batch_size=32, resize_to=224)`` runs
  many images in padded, jitted batches; ``model.apply(variables, images)`` is
  the pure function; ``model.variables`` holds ``{"params", "batch_stats"}``.
  """

  def __init__(self, variables: Mapping[str, Any], arch: str | ResNetSpec = "resnet18",
               dtype: Any = jnp.float32):
    _spec(arch)
    self.arch = arch
    self.name = arch if isinstance(arch, str) else "ResNet"
    self.module = ResNet(arch, dtype=dtype)
    self.variables = jax.tree.map(jnp.asarray, dict(variables))
    self.normalization = self.module.normalization
    self.strides = (4, 8, 16, 32)
    self.channels = feature_channels(arch)
    # Variables are a jit argument, not a closure, so the weights are not
    # baked into every compiled program as constants.
    self._forward = jax.jit(self.module.apply)
    self._extractors = {}

  def extract(self, images_NxHxWxC, layers=(16,), batch_size: int = 32,
              resize_to: int | tuple[int, int] | None = 224, progress: bool = True,
              desc: str | None = None) -> dict[Any, np.ndarray]:
    """See :meth:`EfficientNetLite0Features.extract`: same arguments, layers and return value."""
    return super().extract(images_NxHxWxC, layers=layers, batch_size=batch_size,
                           resize_to=resize_to, progress=progress,
                           desc=desc if desc is not None else f"{self.name} features")


def _from_file(arch: str, weights_path: str | os.PathLike, dtype: Any) -> ResNetFeatures:
  path = os.fspath(weights_path)
  state_dict = torch_pickle.load_torch_state_dict(path)
  return ResNetFeatures(resnet_variables_from_torch(state_dict, arch, source=path), arch, dtype)


def resnet18(weights_path: str | os.PathLike, dtype: Any = jnp.float32) -> ResNetFeatures:
  """torchvision ResNet-18 from the user's weight file (e.g. ``resnet18-f37072fd.pth``).

  weights_path: a torchvision ``state_dict`` saved with ``torch.save`` (zip or
    legacy format), read without PyTorch; never downloaded.
  dtype: compute dtype (e.g. ``jnp.bfloat16`` on GPU/TPU); logits are float32.
  Returns a :class:`ResNetFeatures` mapping ``[B, H, W, 3]`` RGB in [0, 1] to
  ``{"logits": [B, 1000], "pooled": [B, 512], 2: 64 ch, 4: 64, 8: 128, 16: 256,
  32: 512}`` (feature maps by stride). Errors name the file and the tensor.
  """
  return _from_file("resnet18", weights_path, dtype)


def wide_resnet50_2(weights_path: str | os.PathLike, dtype: Any = jnp.float32) -> ResNetFeatures:
  """torchvision Wide-ResNet-50-2 from the user's file (e.g. ``wide_resnet50_2-95faca4d.pth``).

  As :func:`resnet18`; outputs ``{"logits": [B, 1000], "pooled": [B, 2048],
  2: 64 ch, 4: 256, 8: 512, 16: 1024, 32: 2048}``.
  """
  return _from_file("wide_resnet50_2", weights_path, dtype)
