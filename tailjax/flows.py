"""Coupling-layer normalizing flows over patch-feature maps (FastFlow style).

A flow is a bijection f: x ↦ z on feature maps ``x_BxHxWxC`` whose Jacobian
log-determinant is kept *per spatial location*, ``logdet_BxHxW``, because the
tail-aware loss and the mechanism analyses rank locations by their term of the
joint NLL:

    NLL(x) = −log p(x) = Σ_i NLL_i,   NLL_i = −log N(z_i; 0, I) − logdet_i,   i = (h, w).

The sum is exact because every step acts on channels (a 1×1 coupling,
permutation or global affine) or, for k×k couplings, conditions on channels
that the step leaves unchanged: the Jacobian is block-triangular with
per-location diagonal blocks, so log|det J| = Σ_i logdet_i. ``NLL_i`` is one
location's share of the joint NLL, not a likelihood of patch i alone: with 3×3
couplings z_i and logdet_i depend on the neighbouring locations, and with
image-level LayerNorm (``layer_norm="image"``) on the whole image. (The
"even-share" split of ``losses.NLL_DEFINITIONS``, ½‖z_i‖² − mean_j logdet_j + const,
divides the same joint NLL over locations another way.) Only the per-patch flow
(all 1×1, ``layer_norm`` "none" or "patch") makes NLL_i a patch's own likelihood;
``layer_norm="image_affine"`` couples the locations as "image" does.

Each step follows FrEIA's ``AllInOneBlock`` as FastFlow/anomalib use it:

    [x1, x2] = P · x                     (fixed channel permutation P, then halves,
                                          |x1| = C − ⌊C/2⌋)
    a = 0.1 · subnet(x1)                 subnet = conv(k) → ReLU → conv(k)
    s = clamp · tanh(a_s),  t = a_t      (soft-clamped log-scale, clamp 2.0)
    y2 = x2 · exp(s) + t,   logdet_i = Σ_c s_ic + Σ_c log γ_c
    y = Pᵀ · (γ ⊙ [x1, y2] + β)          optional global affine, then back

with inverse ``x2 = (y2 − t) · exp(−s)``. The global affine (``global_affine``) is
off (False), γ = exp(g) (True or "exp", g initialised to 0), or FrEIA's default form
"softplus": γ = 0.1 · softplus_{β=0.5}(g) = 0.2 · log(1 + exp(g/2)), g initialised to
2·log(e⁵ − 1) so that γ = 1 (``freia_softplus_scale``; anomalib's FastFlow always has
it). β starts at 0 in every form. The soft clamp is anomalib's (its copy of
``AllInOneBlock``); FrEIA's own block has used clamp · tanh(a_s / clamp) since 2023.

Each step draws its own constant permutation (a different split of the channels
into conditioning and transformed halves, as FrEIA's permute-after-each-block
does) but returns to the original channel order, so FrEIA's flow and this one
differ by fixed permutations of x and z, which leave the standard-normal NLL
unchanged; the one structural difference is that FrEIA's first step splits the
channels in the input's own order, this flow's first step after a random
permutation. Kernels alternate 3×3 / 1×1 between steps starting with 3×3 (FastFlow,
and anomalib's ``create_fast_flow_block``), or are all 3×3, or all 1×1 (the
per-patch flow, whose patches are independent).

With ``subnet_init="zero"`` (the default) the last conv of every subnet is
zero-initialised, so with the global affine off or "exp" (γ = 1, β = 0) a new flow
is exactly the identity: z = x and logdet = 0 ("softplus" starts at γ = 1 up to
float rounding). ``subnet_init="torch_default"`` initialises both convs as
PyTorch's ``nn.Conv2d`` does (anomalib's subnets): the new flow is not the identity.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailjax import losses

KERNEL_MODES = ("alternate", "3x3", "1x1")
LAYER_NORM_MODES = ("none", "image", "patch", "image_affine")
# The global affine after each coupling: off, γ = exp(g), or FrEIA's softplus form.
# ``flow.global_affine`` also takes False (= "none") and True (= "exp").
GLOBAL_AFFINE_MODES = ("none", "exp", "softplus")
# Initialisation of the coupling subnets: "zero" (last conv zero: the flow starts as the
# identity) or "torch_default" (PyTorch's nn.Conv2d default for both convs, as anomalib).
SUBNET_INITS = ("zero", "torch_default")
# Compute precision of the subnets' convolutions (``train.precision``): "float32", or
# "bfloat16" convolutions on float32 parameters (see ``AffineCouplingStep``).
PRECISIONS = ("float32", "bfloat16")


def conv_dtype(precision: str):
  """The ``nn.Conv`` compute dtype of a precision: None (the inputs' dtype) for "float32",
  so that the float32 flow is the same program as one built without a precision."""
  if precision not in PRECISIONS:
    raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
  return None if precision == "float32" else jnp.bfloat16


def normalize_features(x_BxHxWxC: jax.Array, mode: str, eps: float = 1e-5,
                       scale_HxWxC: jax.Array | None = None,
                       bias_HxWxC: jax.Array | None = None) -> jax.Array:
  """LayerNorm of backbone features before the flow (outside the flow's log-det).

  ``"image"`` normalises each image over (H, W, C), as FastFlow's per-scale
  LayerNorm; ``"patch"`` normalises each location over C (keeps patches
  independent); ``"none"`` is the identity. These three are parameter-free on
  purpose: the normalisation is outside the bijection (it adds nothing to the
  log-det), so a learned scale could shrink the features and drive the NLL
  towards −∞ without modelling anything.

  ``"image_affine"`` is "image" followed by a learned elementwise affine,
  ``u ⊙ scale + bias`` with ``scale_HxWxC``, ``bias_HxWxC`` (parameters of the flow,
  ``ImageLayerNormAffine``; initialised to 1 and 0). It exists only to match
  anomalib's FastFlow, whose per-scale ``nn.LayerNorm([C, H, W],
  elementwise_affine=True)`` is trained with the flow while its log-det is not in
  the loss: training can then lower the NLL by shrinking the features (a smaller
  scale) without modelling them better, so NLL values of this mode are not
  likelihoods of the backbone features and are comparable only within the mode.
  """
  if mode == "image_affine":
    if scale_HxWxC is None or bias_HxWxC is None:
      raise ValueError("flow.layer_norm='image_affine' has learned scale and bias: apply the "
                       "flow to the features (model(x)) or pass scale_HxWxC and bias_HxWxC")
    u = normalize_features(x_BxHxWxC, "image", eps)
    return u * scale_HxWxC[None] + bias_HxWxC[None]
  if scale_HxWxC is not None or bias_HxWxC is not None:
    raise ValueError(f"flow.layer_norm={mode!r} has no learned scale or bias")
  if mode == "none":
    return x_BxHxWxC
  axes = {"image": (1, 2, 3), "patch": (3,)}.get(mode)
  if axes is None:
    raise ValueError(f"flow.layer_norm must be one of {LAYER_NORM_MODES}, got {mode!r}")
  mean = jnp.mean(x_BxHxWxC, axis=axes, keepdims=True)
  var = jnp.var(x_BxHxWxC, axis=axes, keepdims=True)
  return (x_BxHxWxC - mean) * jax.lax.rsqrt(var + eps)


class ImageLayerNormAffine(nn.Module):
  """``normalize_features(x, "image_affine")`` with its scale and bias as parameters.

  The parameters ``scale`` (init 1) and ``bias`` (init 0) have the shape [H, W, C] of
  the features the flow is initialised on (anomalib: ``nn.LayerNorm([C, H, W])``), so
  the flow then takes feature maps of that grid only.
  """

  @nn.compact
  def __call__(self, x_BxHxWxC):
    shape = tuple(x_BxHxWxC.shape[1:])
    for name in ("scale", "bias"):
      if self.has_variable("params", name) and self.get_variable("params", name).shape != shape:
        raise ValueError(f"flow.layer_norm='image_affine' learned its scale and bias on "
                         f"{self.get_variable('params', name).shape} feature maps, got {shape}")
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    return normalize_features(x_BxHxWxC, "image_affine", scale_HxWxC=scale, bias_HxWxC=bias)


def global_affine_mode(value) -> str:
  """``flow.global_affine`` as one of ``GLOBAL_AFFINE_MODES``: False → "none",
  True → "exp", the names themselves unchanged."""
  if isinstance(value, (bool, np.bool_)):
    return "exp" if value else "none"
  if isinstance(value, str) and value in GLOBAL_AFFINE_MODES:
    return value
  raise ValueError(f"flow.global_affine must be False, True or one of {GLOBAL_AFFINE_MODES}, "
                   f"got {value!r}")


# FrEIA's SOFTPLUS global affine: γ = 0.1 · softplus_β(g) with β = 0.5, and the raw
# parameter's initial value 2·log(exp(0.5 · 10 · init) − 1) for γ = init = 1.
FREIA_SOFTPLUS_INIT = float(2.0 * np.log(np.expm1(5.0)))


def freia_softplus_scale(g_C: jax.Array) -> jax.Array:
  """FrEIA's ``AllInOneBlock`` global scale for ``global_affine_type='SOFTPLUS'``:
  γ = 0.1 · (1/β) · log(1 + exp(β·g)) with β = 0.5 (``nn.Softplus(beta=0.5)``; torch's
  switch to the identity above β·g = 20 differs from this by < e⁻²⁰ relative)."""
  return 0.1 * (jax.nn.softplus(0.5 * g_C) / 0.5)


def _torch_default_bias_init(fan_in: int):
  """PyTorch's ``nn.Conv2d`` bias init, U(−1/√fan_in, 1/√fan_in). Hand-written: Flax's
  bias initialisers see only the bias shape, not the layer's fan-in."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# PyTorch's nn.Conv2d weight init, kaiming_uniform(a=√5): U(−b, b) with b = 1/√fan_in,
# i.e. variance 1/(3·fan_in) over fan_in = k·k·C_in.
_TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def permute_channels(x_BxHxWxC: jax.Array, perm_C: np.ndarray) -> jax.Array:
  """``x[..., perm]`` for a constant permutation of the channel axis.

  The one place the flows permute channels (a gather forward, a scatter-add in
  every backward pass). ``FastFlow2d`` composes each step's un-permute with the
  next step's permute, so K steps take K + 1 of these instead of 2K. (A
  transpose → row-gather → transpose form was also tried: no difference beyond
  this machine's ±10 % run-to-run noise in the train step.)
  """
  return x_BxHxWxC[..., perm_C]


class AffineCouplingStep(nn.Module):
  """One coupling step: affine coupling of x2 given x1, global affine, fixed permutation.

  ``global_affine``: False / True / a name of ``GLOBAL_AFFINE_MODES`` (see the module
  docstring); parameters ``global_log_scale`` (g of "exp") or ``global_scale`` (g of
  "softplus", FrEIA's name) and ``global_offset`` (β). ``subnet_init``: ``SUBNET_INITS``.

  ``precision`` "bfloat16" runs the subnet's two convolutions in bfloat16 (inputs and
  kernels cast, float32 parameters: ``nn.Conv(dtype=bfloat16, param_dtype=float32)``);
  the subnet's output is cast back to the input's dtype before the soft clamp, so s, t,
  the affine coupling and the log-determinant are computed in float32. (Lowered as
  matmuls, ``train.conv_as_matmul``, only the matmuls' operands are bfloat16.)
  """

  channels: int
  kernel_size: int
  permutation: tuple[int, ...]
  hidden_ratio: float = 1.0
  clamp: float = 2.0
  global_affine: bool | str = False
  precision: str = "float32"
  subnet_init: str = "zero"

  def setup(self):
    c1 = self.channels - self.channels // 2
    c2 = self.channels // 2
    hidden = max(1, int(round(c1 * self.hidden_ratio)))
    k = (self.kernel_size, self.kernel_size)
    dtype = conv_dtype(self.precision)
    if self.subnet_init == "zero":
      init_in = {}
      init_out = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    elif self.subnet_init == "torch_default":
      init_in = dict(kernel_init=_TORCH_DEFAULT_KERNEL_INIT,
                     bias_init=_torch_default_bias_init(self.kernel_size ** 2 * c1))
      init_out = dict(kernel_init=_TORCH_DEFAULT_KERNEL_INIT,
                      bias_init=_torch_default_bias_init(self.kernel_size ** 2 * hidden))
    else:
      raise ValueError(f"flow.subnet_init must be one of {SUBNET_INITS}, got {self.subnet_init!r}")
    self.conv_in = nn.Conv(hidden, k, padding="SAME", dtype=dtype, param_dtype=jnp.float32,
                           name="conv_in", **init_in)
    self.conv_out = nn.Conv(2 * c2, k, padding="SAME", dtype=dtype,
                            param_dtype=jnp.float32, name="conv_out", **init_out)
    self._affine = global_affine_mode(self.global_affine)
    if self._affine == "exp":
      self.log_gamma = self.param("global_log_scale", nn.initializers.zeros, (self.channels,))
      self.beta = self.param("global_offset", nn.initializers.zeros, (self.channels,))
    elif self._affine == "softplus":
      self.g = self.param("global_scale", nn.initializers.constant(FREIA_SOFTPLUS_INIT),
                          (self.channels,))
      self.beta = self.param("global_offset", nn.initializers.zeros, (self.channels,))
    self._c1, self._c2 = c1, c2
    self._perm = np.asarray(self.permutation, dtype=np.int32)
    self._inv_perm = np.argsort(self._perm).astype(np.int32)

  def _scale_shift(self, x1):
    # Back to the coupling's dtype before the clamp: a no-op in float32, and with bfloat16
    # convolutions it keeps s, t and the log-det in float32.
    a = 0.1 * self.conv_out(nn.relu(self.conv_in(x1))).astype(x1.dtype)
    s = self.clamp * jnp.tanh(a[..., :self._c2])
    return s, a[..., self._c2:]

  def coupling(self, xp_BxHxWxC):
    """The step in its own channel order (input already permuted by P): (P·y, logdet)."""
    x1, x2 = xp_BxHxWxC[..., :self._c1], xp_BxHxWxC[..., self._c1:]
    s, t = self._scale_shift(x1)
    y = jnp.concatenate([x1, x2 * jnp.exp(s) + t], axis=-1)
    logdet_BxHxW = jnp.sum(s, axis=-1)
    if self._affine == "exp":
      y = y * jnp.exp(self.log_gamma)[None, None, None, :] + self.beta[None, None, None, :]
      logdet_BxHxW = logdet_BxHxW + jnp.sum(self.log_gamma)
    elif self._affine == "softplus":
      gamma_C = freia_softplus_scale(self.g)
      y = y * gamma_C[None, None, None, :] + self.beta[None, None, None, :]
      logdet_BxHxW = logdet_BxHxW + jnp.sum(jnp.log(gamma_C))
    return y, logdet_BxHxW

  def uncoupling(self, yp_BxHxWxC):
    """``coupling``'s inverse in the step's channel order: (P·x, log|det ∂x/∂y|)."""
    y = yp_BxHxWxC
    logdet_BxHxW = jnp.zeros(y.shape[:-1], y.dtype)
    if self._affine == "exp":
      y = (y - self.beta[None, None, None, :]) * jnp.exp(-self.log_gamma)[None, None, None, :]
      logdet_BxHxW = logdet_BxHxW - jnp.sum(self.log_gamma)
    elif self._affine == "softplus":
      gamma_C = freia_softplus_scale(self.g)
      y = (y - self.beta[None, None, None, :]) / gamma_C[None, None, None, :]
      logdet_BxHxW = logdet_BxHxW - jnp.sum(jnp.log(gamma_C))
    x1, y2 = y[..., :self._c1], y[..., self._c1:]
    s, t = self._scale_shift(x1)
    x = jnp.concatenate([x1, (y2 - t) * jnp.exp(-s)], axis=-1)
    return x, logdet_BxHxW - jnp.sum(s, axis=-1)

  def forward(self, x_BxHxWxC):
    y, logdet_BxHxW = self.coupling(permute_channels(x_BxHxWxC, self._perm))
    return permute_channels(y, self._inv_perm), logdet_BxHxW

  def inverse(self, y_BxHxWxC):
    x, logdet_BxHxW = self.uncoupling(permute_channels(y_BxHxWxC, self._perm))
    return permute_channels(x, self._inv_perm), logdet_BxHxW


def step_kernel_sizes(num_steps: int, kernel_mode: str) -> list[int]:
  """FastFlow's schedule: 3×3 on even steps, 1×1 on odd ones, the first step 3×3, as
  anomalib's ``create_fast_flow_block`` (``1 if i % 2 == 1 else 3``); or all 3×3 / all 1×1."""
  if kernel_mode == "alternate":
    return [3 if i % 2 == 0 else 1 for i in range(num_steps)]
  if kernel_mode == "3x3":
    return [3] * num_steps
  if kernel_mode == "1x1":
    return [1] * num_steps
  raise ValueError(f"flow.kernel_mode must be one of {KERNEL_MODES}, got {kernel_mode!r}")


class FastFlow2d(nn.Module):
  """FastFlow-style 2-D coupling flow on ``[B, H, W, C]`` feature maps.

  Methods (use ``model.apply(params, x, method="forward")`` etc.):
    forward(x) -> (z, logdet_BxHxW)   the bijection, log|det ∂z/∂x| per location;
    inverse(z) -> (x, logdet_BxHxW)   its inverse, logdet = log|det ∂x/∂z| = −forward's;
    __call__(x) -> (z, logdet)        ``forward(normalize_features(x, layer_norm))`` (for
                                      "image_affine" with the flow's learned scale, bias);
    nll(x) -> nll_BxHxW               per-patch NLL of the (normalised) features.

  Attributes:
    channels: C (≥ 2).
    num_steps: K coupling steps (default 8).
    kernel_mode: "alternate" (3×3/1×1, FastFlow), "3x3", or "1x1" (per-patch flow).
    hidden_ratio: subnet width = hidden_ratio · ⌈C/2⌉.
    clamp: soft-clamp of the log-scale, s = clamp · tanh(0.1 · a).
    global_affine: learned per-channel scale/offset after each coupling: False / True
      (= "exp", γ = exp(g)) / "softplus" (FrEIA's default form), ``GLOBAL_AFFINE_MODES``.
    layer_norm: "none" | "image" | "patch" | "image_affine", see ``normalize_features``;
      "image_affine" adds the parameters ``params["layer_norm"]`` ({"scale", "bias"},
      [H, W, C] of the features at ``init``), trained with the flow, outside its log-det.
    permutation_seed: seed of the fixed channel permutations (constants).
    precision: "float32" or "bfloat16" subnet convolutions (``AffineCouplingStep``); the
      LayerNorm, the couplings, z and the log-dets stay in the inputs' dtype.
    subnet_init: "zero" (the flow starts as the identity) | "torch_default" (anomalib's
      PyTorch conv init), ``SUBNET_INITS``.
  """

  channels: int
  num_steps: int = 8
  kernel_mode: str = "alternate"
  hidden_ratio: float = 1.0
  clamp: float = 2.0
  global_affine: bool | str = False
  layer_norm: str = "none"
  permutation_seed: int = 0
  precision: str = "float32"
  subnet_init: str = "zero"

  def setup(self):
    if self.channels < 2:
      raise ValueError(f"flow.channels must be ≥ 2 to split into halves, got {self.channels}")
    if self.num_steps < 1:
      raise ValueError(f"flow.num_steps must be ≥ 1, got {self.num_steps}")
    if self.layer_norm not in LAYER_NORM_MODES:
      raise ValueError(f"flow.layer_norm must be one of {LAYER_NORM_MODES}, got {self.layer_norm!r}")
    rng = np.random.default_rng(self.permutation_seed)
    self.steps = [
        AffineCouplingStep(
            channels=self.channels, kernel_size=k,
            permutation=tuple(int(p) for p in rng.permutation(self.channels)),
            hidden_ratio=self.hidden_ratio, clamp=self.clamp,
            global_affine=self.global_affine, precision=self.precision,
            subnet_init=self.subnet_init, name=f"step_{i}")
        for i, k in enumerate(step_kernel_sizes(self.num_steps, self.kernel_mode))
    ]
    if self.layer_norm == "image_affine":
      self.norm = ImageLayerNormAffine(name="layer_norm")

  def _check(self, x):
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise ValueError(f"flow expects [B, H, W, {self.channels}] inputs, got shape {x.shape}")

  def forward(self, x_BxHxWxC):
    self._check(x_BxHxWxC)
    # Step by step this is x ← Pₖᵀ·coupling_k(Pₖ·x); between two steps the un-permute
    # of one and the permute of the next are composed into one gather (K+1, not 2K).
    perms = [np.asarray(step.permutation) for step in self.steps]
    logdet_BxHxW = jnp.zeros(x_BxHxWxC.shape[:-1], x_BxHxWxC.dtype)
    x = permute_channels(x_BxHxWxC, perms[0])
    for i, step in enumerate(self.steps):
      x, ld = step.coupling(x)
      logdet_BxHxW = logdet_BxHxW + ld
      inv = np.argsort(perms[i])
      x = permute_channels(x, inv[perms[i + 1]] if i + 1 < len(perms) else inv)
    return x, logdet_BxHxW

  def inverse(self, z_BxHxWxC):
    self._check(z_BxHxWxC)
    perms = [np.asarray(step.permutation) for step in self.steps]
    logdet_BxHxW = jnp.zeros(z_BxHxWxC.shape[:-1], z_BxHxWxC.dtype)
    z = permute_channels(z_BxHxWxC, perms[-1])
    for i in reversed(range(len(self.steps))):
      z, ld = self.steps[i].uncoupling(z)
      logdet_BxHxW = logdet_BxHxW + ld
      inv = np.argsort(perms[i])
      z = permute_channels(z, inv[perms[i - 1]] if i > 0 else inv)
    return z, logdet_BxHxW

  def __call__(self, x_BxHxWxC):
    if self.layer_norm == "image_affine":
      return self.forward(self.norm(x_BxHxWxC))
    return self.forward(normalize_features(x_BxHxWxC, self.layer_norm))

  def nll(self, x_BxHxWxC):
    z, logdet = self(x_BxHxWxC)
    return losses.patch_nll(z, logdet)


class PatchFlow(FastFlow2d):
  """Per-patch flow: 1×1 subnets only, so every patch is transformed independently.

  With ``layer_norm`` "none" or "patch", ∂z_i/∂x_j = 0 for i ≠ j: the per-patch
  NLLs are functions of their own feature vector alone.
  """

  kernel_mode: str = "1x1"

  def setup(self):
    if self.kernel_mode != "1x1":
      raise ValueError(f"PatchFlow needs kernel_mode '1x1', got {self.kernel_mode!r}")
    if self.layer_norm in ("image", "image_affine"):
      raise ValueError(f"PatchFlow with layer_norm={self.layer_norm!r} would couple patches; "
                       "use 'patch' or 'none'")
    super().setup()


def _global_affine_field(value) -> bool | str:
  """The module field for ``flow.global_affine``: False / True for "none" / "exp" (the
  values every consumer of a bool ``global_affine`` knows), "softplus" as is."""
  mode = global_affine_mode(value)
  return mode if mode == "softplus" else mode == "exp"


def build_flow(cfg) -> FastFlow2d:
  """Flow from a config block with fields channels, num_steps, kernel_mode, hidden_ratio,
  clamp, global_affine, layer_norm, permutation_seed, precision, subnet_init (missing
  fields take defaults; ``train.make_flow_program`` sets precision from
  ``train.precision``). ``global_affine`` "none"/"exp" become False/True."""
  get = lambda name, default: cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  kwargs = dict(
      channels=int(get("channels", 0)),
      num_steps=int(get("num_steps", 8)),
      kernel_mode=str(get("kernel_mode", "alternate")),
      hidden_ratio=float(get("hidden_ratio", 1.0)),
      clamp=float(get("clamp", 2.0)),
      global_affine=_global_affine_field(get("global_affine", False)),
      layer_norm=str(get("layer_norm", "none")),
      permutation_seed=int(get("permutation_seed", 0)),
      precision=str(get("precision", "float32")),
      subnet_init=str(get("subnet_init", "zero")),
  )
  conv_dtype(kwargs["precision"])   # validates it
  if kwargs["subnet_init"] not in SUBNET_INITS:
    raise ValueError(f"flow.subnet_init must be one of {SUBNET_INITS}, got {kwargs['subnet_init']!r}")
  if kwargs["kernel_mode"] not in KERNEL_MODES:
    raise ValueError(f"flow.kernel_mode must be one of {KERNEL_MODES}, got {kwargs['kernel_mode']!r}")
  return PatchFlow(**kwargs) if kwargs["kernel_mode"] == "1x1" else FastFlow2d(**kwargs)


class MultiScaleFlow(nn.Module):
  """FastFlow's multi-scale model: one independent ``FastFlow2d`` per feature scale.

  Inputs are a tuple of per-scale maps ``(x_BxH_sxW_sxC_s for s in scales)`` of the
  same B images; every method returns a tuple with one entry per scale, each
  exactly what the scale's own flow returns (``forward``/``inverse``/``__call__``:
  ``(z_s, logdet_s)``; ``nll``: ``nll_BxH_sxW_s``). Each scale normalises its own
  features (``layer_norm`` "image" is FastFlow's per-scale LayerNorm, "image_affine"
  anomalib's, with each scale's own learned scale and bias) and has its
  own parameters, the subtree ``params["params"]["scale_<s>"]``, which is a
  complete ``FastFlow2d`` parameter tree: ``flow_of_scale(s)`` with
  ``{"params": params["params"][f"scale_{s}"]}`` is scale s alone. The scales share
  every other field, including ``permutation_seed``.
  """

  channels: tuple[int, ...]
  num_steps: int = 8
  kernel_mode: str = "alternate"
  hidden_ratio: float = 1.0
  clamp: float = 2.0
  global_affine: bool | str = False
  layer_norm: str = "none"
  permutation_seed: int = 0
  precision: str = "float32"
  subnet_init: str = "zero"

  def _scale_kwargs(self, s: int) -> dict:
    kw = {f: getattr(self, f) for f in ("num_steps", "kernel_mode", "hidden_ratio", "clamp",
                                        "global_affine", "layer_norm", "permutation_seed",
                                        "precision", "subnet_init")}
    return {"channels": int(self.channels[s]), **kw}

  def flow_of_scale(self, s: int) -> FastFlow2d:
    """The flow of scale ``s`` as a stand-alone module (call on an unbound model); its
    parameters are ``{"params": params["params"][f"scale_{s}"]}``."""
    cls = PatchFlow if self.kernel_mode == "1x1" else FastFlow2d
    return cls(**self._scale_kwargs(s), parent=None)

  def setup(self):
    if len(self.channels) < 1:
      raise ValueError("MultiScaleFlow needs at least one scale")
    cls = PatchFlow if self.kernel_mode == "1x1" else FastFlow2d
    self.flows = [cls(**self._scale_kwargs(s), name=f"scale_{s}")
                  for s in range(len(self.channels))]

  def _check(self, xs):
    if not isinstance(xs, (tuple, list)) or len(xs) != len(self.flows):
      raise ValueError(f"multi-scale flow expects a tuple of {len(self.flows)} feature maps, "
                       f"got {type(xs).__name__}")

  def forward(self, xs):
    self._check(xs)
    return tuple(f.forward(x) for f, x in zip(self.flows, xs))

  def inverse(self, zs):
    self._check(zs)
    return tuple(f.inverse(z) for f, z in zip(self.flows, zs))

  def __call__(self, xs):
    self._check(xs)
    return tuple(f(x) for f, x in zip(self.flows, xs))

  def nll(self, xs):
    self._check(xs)
    return tuple(f.nll(x) for f, x in zip(self.flows, xs))


def build_multiscale_flow(cfg, channels: Sequence[int]) -> MultiScaleFlow:
  """``MultiScaleFlow`` with one flow per entry of ``channels``; the other fields as
  ``build_flow`` reads them (validated there, once per scale)."""
  get = lambda name, default: cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  for c in channels:
    build_flow({**dict(cfg), "channels": int(c)})
  return MultiScaleFlow(
      channels=tuple(int(c) for c in channels),
      num_steps=int(get("num_steps", 8)),
      kernel_mode=str(get("kernel_mode", "alternate")),
      hidden_ratio=float(get("hidden_ratio", 1.0)),
      clamp=float(get("clamp", 2.0)),
      global_affine=_global_affine_field(get("global_affine", False)),
      layer_norm=str(get("layer_norm", "none")),
      permutation_seed=int(get("permutation_seed", 0)),
      precision=str(get("precision", "float32")),
      subnet_init=str(get("subnet_init", "zero")))


def flat_nll(model: FastFlow2d, params, x_BxHxWxC) -> jax.Array:
  """Per-patch NLL flattened to ``[B, H·W]`` (row-major over the grid); for a
  ``MultiScaleFlow`` a tuple of ``[B, H_s·W_s]``, one per scale."""
  nll = model.apply(params, x_BxHxWxC, method="nll")
  if isinstance(nll, tuple):
    return tuple(n.reshape(n.shape[0], -1) for n in nll)
  return nll.reshape(nll.shape[0], -1)


__all__: Sequence[str] = (
    "AffineCouplingStep", "FastFlow2d", "ImageLayerNormAffine", "MultiScaleFlow", "PatchFlow",
    "build_flow", "build_multiscale_flow", "conv_dtype", "flat_nll", "freia_softplus_scale",
    "global_affine_mode", "normalize_features", "step_kernel_sizes",
)
