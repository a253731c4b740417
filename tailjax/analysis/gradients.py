"""Exact per-patch gradients of a trained flow (hypothesis H3, gradient concentration).

Notation: image b has N patches with NLLs ``NLL_bi``; the tail-aware loss is

    L = mean_b L_b,   L_b = Σ_i w_bi · NLL_bi,   w_bi = (1-λ)/N + λ·[i ∈ T_b]/k,

where T_b is the set of image b's k = max(1, round(r·N)) largest NLLs
(``losses.tail_patch_weights``). The weights depend on the ranking, which is
piecewise constant in θ and x, so — exactly as the loss does — they are
constants (no gradient flows through the selection).

Two senses of "the gradient of patch i":

* input space: ``‖∂L_b/∂x_bi‖`` for every patch feature vector x_bi, from one
  VJP of Σ_b L_b. With k×k couplings (or an image-level LayerNorm) a patch's
  input also feeds its neighbours' NLLs, so a non-tail patch receives gradient
  from the tail patches around it; with the per-patch flow it does not.
* parameter space: ``g_bi = ∂(w_bi·NLL_bi)/∂θ = w_bi · ∂NLL_bi/∂θ``, the exact
  contribution of patch i to the update, ``∂L/∂θ = (1/B) Σ_b Σ_i g_bi``.

Per-patch parameter gradients are N cotangents through one image's network.
Five exact implementations are kept selectable, because their speed depends on
the backend and the flow (``benchmarks/bench_gradients.py``); ``method="auto"``
(the default) takes the fastest measured one, ``default_method()``, where it takes the
flow (``resolve_method``: the windowed methods re-state FastFlow2d only):

* ``"ghost"`` (default for norms): receptive-field windows + ghost norms, below;
* ``"window"`` (default when the gradients themselves are requested):
  receptive-field windows, each patch's gradient by autodiff of its crop;
* ``"jacrev"``: one forward per image and patch chunk, then the VJP vmapped
  over a chunk of one-hot cotangents (chunk = N is exactly ``jax.jacrev``);
* ``"vmap_grad"``: ``jax.vmap(jax.grad(lambda θ, i: w_i·NLL_i(θ)))`` over a chunk
  of patch indices;
* ``"loop"``: a Python loop of one jitted single-patch gradient per patch.

Receptive-field windows. A k×k convolution (padding SAME) makes its output at
position p depend on its input within Chebyshev distance (k−1)/2 of p. A
coupling step is conv_in(k) → ReLU → conv_out(k) on half the channels plus
per-location operations (affine coupling, global affine, permutation), so
step j widens the dependence by k_j − 1, and with K steps

    R = Σ_{j=1..K} (k_j − 1)        (3×3/1×1 FastFlow: R = K for even K;
                                     all 3×3: R = 2K; per-patch flow: R = 0):

NLL_i depends on the flow's input only within radius R of i, and on step j's
output only within ρ_j = Σ_{l>j} (k_l − 1) (``receptive_radius``, ``_out_radii``;
a smaller R would make the windowed methods differ from ``jacrev``, which the
tests compare patch by patch). The LayerNorm before the flow is parameter-free
(``flows.normalize_features``): NLL_i(θ) = f_i(θ, u) with u = LN(x) constant
in θ, so ∂NLL_i/∂θ = ∂f_i/∂θ at u, and f_i reads u only inside i's window —
even for ``layer_norm="image"``, whose statistics couple every position of x
(that coupling matters for input-space gradients, never for parameter
gradients). Both windowed methods therefore normalise the whole image once and
work on u. At image borders the window extends past the image; every k×k
conv's input there is zero, exactly what SAME padding reads, so border and
corner patches are exact too (tests check all of them against ``jacrev``).

* ``"window"`` crops u to the (2R+1)² window around i (zeros outside the
  image), runs the flow with VALID convolutions, each conv's input multiplied
  by the image-validity mask (so positions outside the image read as zeros,
  whatever the crop computed there), until one position — the centre — is
  left, and differentiates its NLL with ``jax.grad``: a gradient per patch at
  the cost of a network on the window instead of the image.
* ``"ghost"`` never forms the gradients. One forward over the whole image
  keeps each step's activations; then for every patch a hand-written backward
  carries the cotangent of NLL_i only over its windows (radius ρ_j after step
  j, ρ_j + (k_j−1)/2 between the two convs), and per conv layer with unfolded
  inputs A (im2col, P_l × d, d = k²·c_in) and the patch's output cotangents
  G_i (P_l × m), zero outside the window,

      ‖∂NLL_i/∂W‖²_F = ‖Aᵀ G_i‖²_F = Σ_{p,q} (A Aᵀ)_{pq} (G_i G_iᵀ)_{pq}    (ghost norm),
      ‖∂NLL_i/∂b‖²   = ‖Σ_p G_i[p]‖²,

  with A Aᵀ computed once per image and the sum taken over the window, or
  over the image as ⟨Ĝ_i, (A Aᵀ) Ĝ_i⟩ with one matmul shared by all patches,
  or Aᵀ G_i materialised — per layer whichever costs least
  (``_kernel_norm_choice``; all three exact). A global affine y' = y·e^g + β
  adds ∂NLL_i/∂β = Σ_p G'_i[p] and ∂NLL_i/∂g = Σ_p G'_i[p]⊙y[p]⊙e^g − 1
  (the −1: logdet_i contains Σ_c g_c), both exact C-vectors. The windowed
  methods re-state the flow's forward (``flow_spec`` reads the structure from
  the bound model and refuses anything else); every call checks the
  re-stated NLLs against the model's own and raises if they disagree.

Measured (``python -m benchmarks.bench_gradients``, the 196 norms of one
14×14×112 image; the tables, on a GPU and on CPUs, beside the PyTorch peer, are in
``benchmarks/README.md``): "ghost" is the
fastest for norms everywhere (on the GPU at 4 steps "window" is within noise
of it) and "window" the fastest exact way to the gradients themselves, hence
``default_method``. What bounds the ratio is work, not only speed: "ghost"
needs 1.23 / 14.65 GFLOP for the 196 norms at 4 / 8 steps (XLA's cost analysis),
the peer's loop 30.7 / 63.6 GFLOP (torch's FlopCounterMode: one forward and 196
whole-image backwards), 25× / 4.3× more. At 8 steps the windows are nearly the
image (radius 6 after step 0: 13×13 of 14×14), so a patch's windowed backward
costs about a third of a whole-image one, and ≥ 5× over the peer there needs
a higher FLOP rate than the peer's, which the measured CPUs do not reliably
give. Compilation is not included: "ghost" compiles in about
twice jacrev's time (XLA:CPU, ~10–20 s at 8 steps).

Memory: jacrev/vmap_grad hold ``image_chunk · patch_chunk`` gradients per
call, each the size of θ; "window" the same for its patch chunk; "ghost" holds
no gradient, only per patch its window activations, and per conv layer and
image one Gram (N² floats, or (H+2ρ)²(W+2ρ)² padded for window slices). The
analysis keeps only the norms (B × N floats) unless the full gradients are
requested.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import flows, losses

METHODS = ("ghost", "window", "jacrev", "vmap_grad", "loop")
INPUT_SPACES = ("features", "flow_input")


# ----------------------------------------------------------------------------
# Helpers shared by the implementations
# ----------------------------------------------------------------------------


def _image_nll(model: flows.FastFlow2d, params, x_HxWxC: jax.Array) -> jax.Array:
  """NLL_N of one image (the model normalises its features first, as in training)."""
  return flows.flat_nll(model, params, x_HxWxC[None])[0]


def _sq_norm_rows(tree, lead: int) -> jax.Array:
  """Σ over every leaf of the squared entries beyond the first ``lead`` axes."""
  leaves = jax.tree.leaves(tree)
  return sum(jnp.sum(jnp.square(l.reshape(l.shape[:lead] + (-1,))), axis=-1) for l in leaves)


def tail_mask(nll_BxN: jax.Array, top_k_ratio) -> np.ndarray:
  """bool [B, N]: each image's top-k NLL patches, ranked exactly as the loss ranks them."""
  return np.asarray(losses.tail_patch_weights(jnp.asarray(nll_BxN), 1.0, top_k_ratio) > 0)


def loss_weights(nll_BxN: jax.Array, tail_weight, top_k_ratio) -> np.ndarray:
  """w_BxN of the tail-aware loss (``losses.tail_patch_weights``), as a NumPy constant."""
  return np.asarray(losses.tail_patch_weights(jnp.asarray(nll_BxN), tail_weight, top_k_ratio))


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(model, params, x_BxHxWxC):
  return flows.flat_nll(model, params, x_BxHxWxC)


def batch_nll(model: flows.FastFlow2d, params, feats_BxHxWxC, chunk: int = 64) -> np.ndarray:
  """nll_BxN of any number of images, evaluated in chunks (padded: one compilation)."""
  feats = np.asarray(feats_BxHxWxC)
  b = len(feats)
  out = []
  for s in range(0, b, chunk):
    x = feats[s:s + chunk]
    n = len(x)
    if n < chunk and b > chunk:
      x = np.concatenate([x, np.repeat(x[-1:], chunk - n, axis=0)])
    out.append(np.asarray(_batch_nll(model, params, jnp.asarray(x)))[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------
# Input space
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _input_grads(model, params, x_BxHxWxC, w_BxN, wrt):
  def total_loss(x):
    # Σ_b L_b rather than the batch mean: images do not interact, so each image
    # gets the gradient of its own loss, independent of how many are analysed.
    if wrt == "flow_input":
      z, logdet = model.apply(params, x, method="forward")
      nll_BxN = losses.patch_nll(z, logdet).reshape(x.shape[0], -1)
    else:
      nll_BxN = flows.flat_nll(model, params, x)
    return jnp.sum(w_BxN * nll_BxN)
  return jax.grad(total_loss)(x_BxHxWxC)


def input_grad_norms(model: flows.FastFlow2d, params, feats_BxHxWxC, weights_BxN, *,
                     wrt: str = "features", chunk: int = 32) -> np.ndarray:
  """Per-patch input-gradient norms ``‖∂L_b/∂x_bi‖_2`` (over channels), [B, N].

  ``L_b = Σ_i w_bi·NLL_bi`` with the given constant weights (the batch loss's
  gradient is this one divided by B). ``wrt="features"``: x are the backbone
  features the model receives (before its parameter-free LayerNorm);
  ``"flow_input"``: x are the normalised features the coupling steps see.
  """
  if wrt not in INPUT_SPACES:
    raise ValueError(f"wrt must be one of {INPUT_SPACES}, got {wrt!r}")
  feats = np.asarray(feats_BxHxWxC)
  w = np.asarray(weights_BxN, feats.dtype)
  if w.shape != (feats.shape[0], feats.shape[1] * feats.shape[2]):
    raise ValueError(f"weights_BxN must have shape {(feats.shape[0], feats.shape[1] * feats.shape[2])},"
                     f" got {w.shape}")
  if wrt == "flow_input":
    feats = np.asarray(flows.normalize_features(jnp.asarray(feats), model.layer_norm))
  out = []
  for s in range(0, len(feats), chunk):
    g = _input_grads(model, params, jnp.asarray(feats[s:s + chunk]), jnp.asarray(w[s:s + chunk]), wrt)
    out.append(np.asarray(jnp.linalg.norm(g.reshape(g.shape[0], -1, g.shape[-1]), axis=-1)))
  return np.concatenate(out)


# ----------------------------------------------------------------------------
# Parameter space
# ----------------------------------------------------------------------------


class PatchGrads(NamedTuple):
  """Per-patch parameter gradients: norms [B, N] and, on request, the gradients
  themselves (the params pytree with every leaf ``[B, N, *leaf.shape]``)."""
  norm_BxN: np.ndarray
  grads: Any = None


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _chunk_grads(model, params, x_cxHxWxC, idx_P, w_cxP, method, return_grads):
  """Gradients of w_bp·NLL_{b, idx_p} for c images × P patch indices."""
  n = x_cxHxWxC.shape[1] * x_cxHxWxC.shape[2]

  if method == "jacrev":
    def one_image(x, w_P):
      nll_N, vjp = jax.vjp(lambda p: _image_nll(model, p, x), params)
      cot_PxN = jax.nn.one_hot(idx_P, n, dtype=nll_N.dtype) * w_P[:, None]
      return jax.vmap(lambda c: vjp(c)[0])(cot_PxN)
  elif method == "vmap_grad":
    grad_one = jax.grad(lambda p, x, i, w: w * _image_nll(model, p, x)[i])
    one_image = lambda x, w_P: jax.vmap(grad_one, in_axes=(None, None, 0, 0))(params, x, idx_P, w_P)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  g = jax.vmap(one_image)(x_cxHxWxC, jax.lax.stop_gradient(w_cxP))
  norm = jnp.sqrt(_sq_norm_rows(g, 2))
  return norm, (g if return_grads else None)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _single_patch_grad(model, params, x_HxWxC, i, w, return_grads):
  g = jax.grad(lambda p: w * _image_nll(model, p, x_HxWxC)[i])(params)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(l)) for l in jax.tree.leaves(g)))
  return norm, (g if return_grads else None)


# ----------------------------------------------------------------------------
# Parameter space through receptive-field windows: "window" and "ghost"
# ----------------------------------------------------------------------------


class StepSpec(NamedTuple):
  """Static structure of one coupling step (hashable: a jit static argument)."""
  name: str
  kernel: int
  perm: tuple[int, ...]
  c1: int
  c2: int
  clamp: float
  global_affine: bool


def flow_spec(model: flows.FastFlow2d, params) -> tuple[StepSpec, ...]:
  """The coupling steps of ``model`` as the windowed methods see them, checked against ``params``.

  Read from the bound model itself (its permutations, kernel sizes, clamp), not
  re-derived. Anything but FastFlow2d's step structure — conv(k×k) → ReLU →
  conv(k×k) subnets with biases, an optional global affine and nothing else —
  raises TypeError: the windowed methods re-state that forward pass,
  so a flow they do not know must fail loudly (the generic "jacrev", "vmap_grad" and
  "loop" methods take any flow).
  """
  if not isinstance(model, flows.FastFlow2d):
    raise TypeError(f"windowed per-patch gradients need a flows.FastFlow2d, got {type(model).__name__}")
  tree = params["params"]
  specs = []
  for step in model.bind(params).steps:
    k, c = int(step.kernel_size), int(step.channels)
    c1, c2 = c - c // 2, c // 2
    expected = {"conv_in", "conv_out"} | ({"global_log_scale", "global_offset"} if step.global_affine else set())
    sub = tree.get(step.name, {})
    ok = set(sub) == expected and k % 2 == 1 and all(set(sub[n]) == {"kernel", "bias"} for n in ("conv_in", "conv_out"))
    if ok:
      kin, kout = sub["conv_in"]["kernel"].shape, sub["conv_out"]["kernel"].shape
      ok = kin[:3] == (k, k, c1) and kout[:2] == (k, k) and kout[2] == kin[3] and kout[3] == 2 * c2
    if not ok:
      raise TypeError(f"{step.name}: unexpected parameters for the windowed per-patch gradients "
                                f"({jax.tree.map(jnp.shape, sub)}); use method='jacrev'")
    specs.append(StepSpec(step.name, k, tuple(int(i) for i in step.permutation), c1, c2, float(step.clamp),
                          bool(step.global_affine)))
  if set(tree) != {s.name for s in specs}:
    raise TypeError(f"parameters outside the coupling steps: {sorted(set(tree) - {s.name for s in specs})}")
  return tuple(specs)


def receptive_radius(specs: Sequence[StepSpec]) -> int:
  """R = Σ_j (k_j − 1): NLL_i depends on flow inputs within Chebyshev distance R of i.

  Each k×k conv (padding SAME) widens the dependence by (k−1)/2 and a step has
  two of them (the coupling and the global affine act per location), so a
  step adds k_j − 1: 2 for 3×3, 0 for 1×1. FastFlow 3×3/1×1: R = K (K even);
  all 3×3: R = 2K; per-patch flow: R = 0.
  """
  return int(sum(s.kernel - 1 for s in specs))


def _out_radii(specs: Sequence[StepSpec]) -> list[int]:
  """ρ_j: patch i's NLL depends on step j's output within radius ρ_j = Σ_{l>j} (k_l − 1)."""
  radii = [0] * len(specs)
  for j in range(len(specs) - 2, -1, -1):
    radii[j] = radii[j + 1] + specs[j + 1].kernel - 1
  return radii


def _last(v: jax.Array, ndim: int) -> jax.Array:
  """A per-channel vector shaped to broadcast against an ``ndim`` array (rank promotion stays off)."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _im2col(x: jax.Array, k: int) -> jax.Array:
  """[..., S, T, c] → [..., S−k+1, T−k+1, k·k·c]: VALID patches, rows ordered as an HWIO kernel's."""
  if k == 1:
    return x
  s, t = x.shape[-3] - k + 1, x.shape[-2] - k + 1
  return jnp.concatenate([x[..., dy:dy + s, dx:dx + t, :] for dy in range(k) for dx in range(k)], axis=-1)


def _conv_valid(x, kernel, bias):
  k, _, cin, cout = kernel.shape
  y = _im2col(x, k) @ kernel.reshape(k * k * cin, cout)
  return y + _last(bias, y.ndim)


def _pad_hw(x: jax.Array, r: int) -> jax.Array:
  return jnp.pad(x, ((r, r), (r, r), (0, 0))) if r else x


def _conv_transpose(g, kernel):
  """Transpose of the VALID conv with ``kernel`` w.r.t. its input: [S, T, m] → [S+k−1, T+k−1, cin].

  One matmul to the k² taps (S·T·m·k²·c_in multiply-adds), then each tap's
  block added at its offset (col2im); a transposed convolution would also
  multiply the zero border, (S+k−1)(T+k−1)/(S·T) times the work (XLA:CPU ran
  both in the same time at the benchmark's sizes; the matmul keeps the layout
  of everything else here).
  """
  k, _, cin, cout = kernel.shape
  if k == 1:
    return g @ kernel[0, 0].T
  taps = g @ kernel.reshape(k * k * cin, cout).T
  out = None
  for t, (dy, dx) in enumerate((dy, dx) for dy in range(k) for dx in range(k)):
    block = jnp.pad(taps[..., t * cin:(t + 1) * cin], ((dy, k - 1 - dy), (dx, k - 1 - dx), (0, 0)))
    out = block if out is None else out + block
  return out


def _full_forward(specs, p, u_HxWxC):
  """The flow on one whole (normalised) image, keeping what the windowed backward needs."""
  x, logdet = u_HxWxC, jnp.zeros(u_HxWxC.shape[:2], u_HxWxC.dtype)
  saved = []
  for spec in specs:
    q = p[spec.name]
    r = (spec.kernel - 1) // 2
    xp = x[..., np.asarray(spec.perm)]
    x1, x2 = xp[..., :spec.c1], xp[..., spec.c1:]
    hpre = _conv_valid(_pad_hw(x1, r), q["conv_in"]["kernel"], q["conv_in"]["bias"])
    h = jax.nn.relu(hpre)
    a = 0.1 * _conv_valid(_pad_hw(h, r), q["conv_out"]["kernel"], q["conv_out"]["bias"])
    th = jnp.tanh(a[..., :spec.c2])
    es = jnp.exp(spec.clamp * th)
    ypre = jnp.concatenate([x1, x2 * es + a[..., spec.c2:]], axis=-1)
    logdet = logdet + spec.clamp * jnp.sum(th, axis=-1)
    y = ypre
    if spec.global_affine:
      y = ypre * _last(jnp.exp(q["global_log_scale"]), 3) + _last(q["global_offset"], 3)
      logdet = logdet + jnp.sum(q["global_log_scale"])
    x = y[..., np.argsort(spec.perm)]
    saved.append({"x1": x1, "h": h, "hpos": (hpre > 0).astype(x.dtype), "th": th, "es": es, "x2": x2,
                  "ypre": ypre})
  return x, losses.patch_nll(x[None], logdet[None])[0], saved


KERNEL_NORMS = ("auto", "ghost", "ghost_image", "materialise")


def _map_chunks(f, xs):
  """``lax.map(f, xs)`` over the leading (chunk) axis; a single chunk skips the loop (faster to compile)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda l: l[None], f(jax.tree.map(lambda l: l[0], xs)))
  return jax.lax.map(f, xs)


def _kernel_norm_choice(rho: int, k: int, d_in: int, m: int, h: int, w: int, mode: str) -> str:
  """Per conv layer, how "ghost" gets ‖∂NLL_i/∂W‖: the cheapest of three exact ways.

  With P = (2ρ+1)² output positions in patch i's window, d = k²·c_in, m = c_out,
  N = H·W, per patch (multiply-adds):
    materialise   Aᵢᵀ Gᵢ (d × m), then its squared sum              P·d·m
    ghost         Σ_pq (AAᵀ)_pq (GᵢGᵢᵀ)_pq over the window            P²·m, plus P² Gram entries gathered
    ghost_image   the same sum over the whole image, Gᵢ zero-padded   N²·m as one shared matmul (AAᵀ) Ĝ
  ``auto`` weighs them as measured on XLA:CPU (a multiply-add inside a
  per-patch batched product costs ≈ 2 of a large shared matmul's, a gathered
  Gram entry ≈ 40); all three are exact, only the time differs.
  """
  if mode != "auto":
    return mode
  p, d, n = (2 * rho + 1) ** 2, k * k * d_in, h * w
  cost = {"materialise": 2 * p * d * m, "ghost": 2 * p * p * m + 40 * p * p, "ghost_image": n * n * m}
  return min(cost, key=cost.get)


def _window_sq_norms(specs, kernel_norms, p, u_HxWxC, idx_CxPx2):
  """Squared norms ‖∂NLL_i/∂θ‖² [C·P] for the patches ``idx_CxPx2`` (C chunks of P rows (a, b)) of one image.

  One forward over the whole image, then per patch a hand-written backward
  restricted to the patch's receptive-field windows, with a ghost or
  materialised norm per layer (see ``per_patch_param_grads``).
  """
  h, w, _ = u_HxWxC.shape
  n = h * w
  big_r = receptive_radius(specs)
  radii = _out_radii(specs)
  z, nll_N, saved = _full_forward(specs, p, u_HxWxC)
  pad = lambda x: _pad_hw(x, big_r)
  valid_pad = pad(jnp.ones((h, w, 1), z.dtype))
  saved_pad = [{k: pad(v) for k, v in s.items()} for s in saved]
  # z in the last step's channel order: the backward starts there (see the composed permutations below)
  z_last_pad = pad(z[..., np.asarray(specs[-1].perm)])

  # Per layer: (kernel, the conv input's name, output radius, choice, Gram or None)
  layers = []
  for spec, rho, s in zip(specs, radii, saved):
    q = p[spec.name]
    r = (spec.kernel - 1) // 2
    for name, src, rho_out in (("conv_out", "h", rho), ("conv_in", "x1", rho + r)):
      kern = q[name]["kernel"]
      choice = _kernel_norm_choice(rho_out, spec.kernel, kern.shape[2], kern.shape[3], h, w, kernel_norms)
      gram = None
      if choice != "materialise":
        a_Nxd = _im2col(_pad_hw(s[src], r), spec.kernel).reshape(n, -1)
        gram = a_Nxd @ a_Nxd.T                                 # (AAᵀ)_pq over the image's positions
        if choice == "ghost":                                  # [H+2ρ, W+2ρ, H+2ρ, W+2ρ]: windows are slices
          gram = jnp.pad(gram.reshape(h, w, h, w), [(rho_out, rho_out), (rho_out, rho_out)] * 2)
      layers.append((kern, src, rho_out, choice, gram))

  def layer_sq(g_SxSxm, layer, spec_idx, a, b, crop):
    kern, src, rho_out, choice, gram = layer
    k, size, m = kern.shape[0], 2 * rho_out + 1, g_SxSxm.shape[-1]
    g_Pxm = g_SxSxm.reshape(size * size, m)
    sq = jnp.sum(jnp.square(jnp.sum(g_Pxm, axis=0)))                     # bias: Σ_p G_p
    if choice == "ghost":                                                # Σ_pq (AAᵀ)_pq (GGᵀ)_pq, window
      gram_PxP = jax.lax.dynamic_slice(gram, (a, b, a, b), (size,) * 4).reshape(size * size, size * size)
      sq = sq + jnp.sum(gram_PxP * (g_Pxm @ g_Pxm.T))
    elif choice == "ghost_image":                                        # the same over the image
      g_big = _pad_hw(g_SxSxm, max(h, w) - 1)
      off = rho_out + max(h, w) - 1
      g_Nxm = jax.lax.dynamic_slice(g_big, (off - a, off - b, jnp.zeros_like(a)), (h, w, m)).reshape(n, m)
      sq = sq + jnp.sum(g_Nxm * (gram @ g_Nxm))
    else:                                                                # ‖AᵀG‖²_F
      a_Pxd = _im2col(crop(saved_pad[spec_idx][src], rho_out + (k - 1) // 2), k).reshape(size * size, -1)
      sq = sq + jnp.sum(jnp.square(a_Pxd.T @ g_Pxm))
    return sq

  def one_patch(ab):
    a, b = ab[0], ab[1]
    crop = lambda arr, rho: jax.lax.dynamic_slice(arr, (a + big_r - rho, b + big_r - rho, jnp.zeros_like(a)),
                                                  (2 * rho + 1, 2 * rho + 1, arr.shape[-1]))
    # Cotangents are carried in the channel order of the step being differentiated: step j's
    # output order is natural, its coupling order is perm_j, so between steps j and j−1 the
    # one gather argsort(perm_j)[perm_{j−1}] replaces two.
    d_y = crop(z_last_pad, 0)                  # ∂NLL_i/∂z_i = z_i; zero elsewhere
    sq = jnp.zeros((), z.dtype)
    for j in reversed(range(len(specs))):
      spec, rho, s, q = specs[j], radii[j], saved_pad[j], p[specs[j].name]
      r = (spec.kernel - 1) // 2
      size = 2 * rho + 1
      centre = np.zeros((size, size, 1), np.float32)
      centre[rho, rho] = 1.0                   # ∂NLL_i/∂logdet_p = −[p = i]
      if spec.global_affine:
        gamma = _last(jnp.exp(q["global_log_scale"]), 3)
        d_beta = jnp.sum(d_y, axis=(0, 1))
        d_g = jnp.sum(d_y * crop(s["ypre"], rho) * gamma, axis=(0, 1)) - 1.0
        sq = sq + jnp.sum(jnp.square(d_g)) + jnp.sum(jnp.square(d_beta))
        d_y = d_y * gamma
      d_y1, d_y2 = d_y[..., :spec.c1], d_y[..., spec.c1:]
      es, th = crop(s["es"], rho), crop(s["th"], rho)
      d_s = d_y2 * crop(s["x2"], rho) * es - jnp.asarray(centre, z.dtype)
      g_out = 0.1 * jnp.concatenate([d_s * spec.clamp * (1.0 - jnp.square(th)), d_y2], axis=-1)
      sq = sq + layer_sq(g_out, layers[2 * j], j, a, b, crop)
      g_in = _conv_transpose(g_out, q["conv_out"]["kernel"]) * crop(s["hpos"], rho + r)
      sq = sq + layer_sq(g_in, layers[2 * j + 1], j, a, b, crop)
      if j > 0:                                # the input's cotangent is not needed for step 0
        d_x1 = _pad_hw(d_y1, 2 * r) + _conv_transpose(g_in, q["conv_in"]["kernel"])
        d_x1 = d_x1 * crop(valid_pad, rho + 2 * r)   # SAME padding: no cotangent outside the image
        d_xp = jnp.concatenate([d_x1, _pad_hw(d_y2 * es, 2 * r)], axis=-1)
        d_y = d_xp[..., np.argsort(spec.perm)[np.asarray(specs[j - 1].perm)]]
    return sq

  return _map_chunks(jax.vmap(one_patch), idx_CxPx2).reshape(-1), nll_N.reshape(-1)


def _crop_nll(specs, p, x_SxSxC, valid_SxSx1):
  """NLL of the centre patch of a (2R+1)² crop of the normalised input.

  VALID convolutions shrink the crop by k−1 per conv; every k×k conv's input is
  multiplied by the image-validity mask first, so positions outside the image
  read as the zeros a SAME convolution pads with, whatever the crop computed
  there. After all K steps one position is left: the centre.
  """
  x, m = x_SxSxC, valid_SxSx1
  logdet = jnp.zeros((), x.dtype)
  for spec in specs:
    q = p[spec.name]
    k, r, size = spec.kernel, (spec.kernel - 1) // 2, x.shape[0]
    xp = x[..., np.asarray(spec.perm)]
    x1, x2 = xp[..., :spec.c1], xp[..., spec.c1:]
    hid = jax.nn.relu(_conv_valid(x1 * m if k > 1 else x1, q["conv_in"]["kernel"], q["conv_in"]["bias"]))
    m_h = m[r:size - r, r:size - r]
    a = 0.1 * _conv_valid(hid * m_h if k > 1 else hid, q["conv_out"]["kernel"], q["conv_out"]["bias"])
    c = 2 * r
    s = spec.clamp * jnp.tanh(a[..., :spec.c2])
    y = jnp.concatenate([x1[c:size - c, c:size - c], x2[c:size - c, c:size - c] * jnp.exp(s) + a[..., spec.c2:]],
                        axis=-1)
    centre = (size - 2 * c) // 2
    logdet = logdet + jnp.sum(s[centre, centre])
    if spec.global_affine:
      y = y * _last(jnp.exp(q["global_log_scale"]), 3) + _last(q["global_offset"], 3)
      logdet = logdet + jnp.sum(q["global_log_scale"])
    x, m = y[..., np.argsort(spec.perm)], m[c:size - c, c:size - c]
  return losses.patch_nll(x[None], logdet.reshape(1, 1, 1))[0, 0, 0]


def _window_grads(specs, params, u_HxWxC, idx_CxPx2, w_CxP):
  """∂(w·NLL_i)/∂θ by autodiff of ``_crop_nll`` on each patch's (2R+1)² crop."""
  big_r = receptive_radius(specs)
  h, w, _ = u_HxWxC.shape
  u_pad = _pad_hw(u_HxWxC, big_r)
  valid_pad = _pad_hw(jnp.ones((h, w, 1), u_HxWxC.dtype), big_r)

  def one_patch(ab, wi):
    crop = lambda arr: jax.lax.dynamic_slice(arr, (ab[0], ab[1], jnp.zeros_like(ab[0])),
                                             (2 * big_r + 1, 2 * big_r + 1, arr.shape[-1]))
    x, m = crop(u_pad), crop(valid_pad)
    nll, g = jax.value_and_grad(lambda q: _crop_nll(specs, q["params"], x, m))(params)
    return nll, jax.tree.map(lambda l: wi * l, g)

  nll_CxP, g = _map_chunks(lambda a: jax.vmap(one_patch)(*a), (idx_CxPx2, w_CxP))
  return nll_CxP.reshape(-1), jax.tree.map(lambda l: l.reshape((-1,) + l.shape[2:]), g)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _windowed_chunk(model, specs, method, kernel_norms, return_grads, params, x_cxHxWxC, idx_CxPx2, w_cxCxP):
  """c images, all their patches in C chunks of P, by "window" or "ghost".

  Returns (norms [c, C·P], NLLs of the re-stated forward [c, N] or [c, C·P],
  the model's own NLLs [c, N] for the consistency check, gradients
  [c, C·P, ...] or None).
  """
  u = flows.normalize_features(x_cxHxWxC, model.layer_norm)   # parameter-free: outside the θ graph

  def one_image(u_HxWxC, w_CxP):
    if method == "ghost":
      sq, nll = _window_sq_norms(specs, kernel_norms, params["params"], u_HxWxC, idx_CxPx2)
      return jnp.sqrt(sq) * jnp.abs(w_CxP.reshape(-1)), nll, None
    nll, g = _window_grads(specs, params, u_HxWxC, idx_CxPx2, w_CxP)
    return jnp.sqrt(_sq_norm_rows(g, 1)), nll, (g if return_grads else None)

  nrm, nll, g = jax.vmap(one_image)(u, jax.lax.stop_gradient(w_cxCxP))
  return nrm, nll, flows.flat_nll(model, params, x_cxHxWxC), g


# Fastest exact method per backend, measured with benchmarks/bench_gradients.py
# (numbers in the module docstring): norms only, and with the gradients themselves.
_FASTEST = {"cpu": ("ghost", "window"), "gpu": ("ghost", "window")}


def default_method(return_grads: bool = False, backend: str | None = None) -> str:
  """The method ``method="auto"`` resolves to on ``backend`` (default: JAX's default backend)."""
  norms, grads = _FASTEST.get(backend or jax.default_backend(), _FASTEST["gpu"])
  return grads if return_grads else norms


# The generic exact method "auto" falls back to for a flow the windowed methods do not
# re-state (bench_gradients: vmap_grad is the faster of the two generic ones on CPU).
_GENERIC = "vmap_grad"


def resolve_method(model, params, method: str = "auto", return_grads: bool = False) -> str:
  """The method a call with ``method`` runs for this flow.

  "auto" is ``default_method`` when the windowed methods know the flow (``flow_spec``),
  else the generic exact method (the windowed methods re-state FastFlow2d's forward with
  an "exp" global affine and a parameter-free LayerNorm; a flow with a softplus global
  affine or LayerNorm parameters takes the generic path, exact too, slower). Any other
  value is returned unchanged.
  """
  if method != "auto":
    return method
  best = default_method(return_grads)
  if best in ("ghost", "window"):
    try:
      flow_spec(model, params)
    except TypeError:
      return _GENERIC
  return best


def _check_restated_forward(nll_restated, nll_model, what: str) -> None:
  """The windowed methods re-state the flow's forward: it must give the model's NLLs."""
  ref = np.asarray(nll_model, np.float64)
  diff = float(np.max(np.abs(np.asarray(nll_restated, np.float64) - ref)))
  # float32 (TF32 matmuls on some GPUs) rounding is far below a structural mismatch (O(1) nats)
  tol = (1e-8 if np.asarray(nll_model).dtype == np.float64 else 1e-2) * (1.0 + float(np.max(np.abs(ref))))
  if not diff <= tol:
    raise RuntimeError(f"per-patch gradients ({what}): the windowed forward disagrees with the model's NLL "
                       f"by {diff:.3g} (tolerance {tol:.3g}); has flows.py changed? Use method='jacrev'.")


def per_patch_param_grads(model: flows.FastFlow2d, params, feats_BxHxWxC, weights_BxN=None, *,
                          method: str = "auto", patch_chunk: int | None = None, image_chunk: int = 1,
                          return_grads: bool = False, kernel_norms: str = "auto") -> PatchGrads:
  """Exact ``g_bi = ∂(w_bi · NLL_bi)/∂θ`` (or only its norm) for every image b and patch i.

  Args:
    model, params: the flow and one row's parameters.
    feats_BxHxWxC: backbone features (the model applies its LayerNorm itself).
    weights_BxN: constant per-patch weights w_bi (e.g. ``loss_weights``); None
      gives the unweighted ``∂NLL_bi/∂θ``. Because w is a constant,
      ``‖g_bi‖ = |w_bi| · ‖∂NLL_bi/∂θ‖``.
    method: "auto" (default: the fastest exact method on this backend that
      takes this flow, ``resolve_method``), "ghost", "window", "jacrev", "vmap_grad" or "loop"
      (module docstring). "ghost" gives norms only.
    patch_chunk, image_chunk: patches × images per compiled call (per vmapped
      block for "window"/"ghost", which run all of an image's patches in one
      call); None: 28 for jacrev/vmap_grad, all patches for ghost, 49 for
      window. Short chunks are padded (zero weight), so every call reuses one
      compilation.
    return_grads: also return the full gradients (B·N·|θ| floats: small cases only).
    kernel_norms: "auto" | "ghost" | "ghost_image" | "materialise": how "ghost"
      gets each conv kernel's norm (``_kernel_norm_choice``; auto: the cheapest
      per layer; all exact).
  Returns:
    PatchGrads(norm_BxN, grads or None); ``(1/B) Σ_bi g_bi = ∂L/∂θ``.
  """
  method = resolve_method(model, params, method, return_grads)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS + ('auto',)}, got {method!r}")
  if method == "ghost" and return_grads:
    raise ValueError("method='ghost' computes norms without forming the gradients; use 'window' or 'jacrev' "
                     "for return_grads=True")
  if kernel_norms not in KERNEL_NORMS:
    raise ValueError(f"kernel_norms must be one of {KERNEL_NORMS}, got {kernel_norms!r}")
  feats = np.asarray(feats_BxHxWxC)
  b, h, w_, _ = feats.shape
  n = h * w_
  if patch_chunk is None:
    patch_chunk = {"ghost": n, "window": 49}.get(method, 28)
  if patch_chunk < 1 or image_chunk < 1:
    raise ValueError(f"patch_chunk and image_chunk must be ≥ 1, got {patch_chunk}, {image_chunk}")
  weights = np.ones((b, n), feats.dtype) if weights_BxN is None else np.asarray(weights_BxN, feats.dtype)
  if weights.shape != (b, n):
    raise ValueError(f"weights_BxN must have shape {(b, n)}, got {weights.shape}")
  norm_BxN = np.zeros((b, n), feats.dtype)
  grads_rows: list = []

  if method == "loop":
    for bi in range(b):
      x = jnp.asarray(feats[bi])
      row = []
      for i in range(n):
        nrm, g = _single_patch_grad(model, params, x, jnp.int32(i), jnp.asarray(weights[bi, i]),
                                    return_grads)
        norm_BxN[bi, i] = float(nrm)
        row.append(g)
      if return_grads:
        grads_rows.append(jax.tree.map(lambda *ls: np.stack([np.asarray(l) for l in ls]), *row))
    grads = jax.tree.map(lambda *ls: np.stack(ls), *grads_rows) if return_grads else None
    return PatchGrads(norm_BxN, grads)

  patch_chunk = min(patch_chunk, n)
  image_chunk = min(image_chunk, b)
  n_pad = -n % patch_chunk
  idx_pad = np.concatenate([np.arange(n), np.zeros(n_pad, np.int64)]).astype(np.int32)
  w_pad = np.concatenate([weights, np.zeros((b, n_pad), weights.dtype)], axis=1)
  windowed = method in ("ghost", "window")
  if windowed:
    specs = flow_spec(model, params)
    ab_pad = np.stack(np.divmod(idx_pad, w_), axis=-1).astype(np.int32)     # patch i = a·W + b
    ab_CxPx2 = jnp.asarray(ab_pad.reshape(-1, patch_chunk, 2))
  for s in range(0, b, image_chunk):
    x = feats[s:s + image_chunk]
    wc = w_pad[s:s + image_chunk]
    c = len(x)
    if c < image_chunk:  # pad with copies of the last image, weight 0, dropped below
      x = np.concatenate([x, np.repeat(x[-1:], image_chunk - c, axis=0)])
      wc = np.concatenate([wc, np.zeros((image_chunk - c, wc.shape[1]), wc.dtype)])
    if windowed:
      nrm, nll, nll_model, g = _windowed_chunk(model, specs, method, kernel_norms, return_grads, params,
                                               jnp.asarray(x), ab_CxPx2,
                                               jnp.asarray(wc.reshape(len(x), -1, patch_chunk)))
      _check_restated_forward(np.asarray(nll)[:c, :n], np.asarray(nll_model)[:c], method)
      norm_BxN[s:s + c] = np.asarray(nrm)[:c, :n]
      if return_grads:
        grads_rows.append(jax.tree.map(lambda l: np.asarray(l)[:c, :n], g))
      continue
    pieces_n, pieces_g = [], []
    for p in range(0, n + n_pad, patch_chunk):
      nrm, g = _chunk_grads(model, params, jnp.asarray(x), jnp.asarray(idx_pad[p:p + patch_chunk]),
                            jnp.asarray(wc[:, p:p + patch_chunk]), method, return_grads)
      pieces_n.append(np.asarray(nrm)[:c])
      if return_grads:
        pieces_g.append(jax.tree.map(lambda l: np.asarray(l)[:c], g))
    norm_BxN[s:s + c] = np.concatenate(pieces_n, axis=1)[:, :n]
    if return_grads:
      grads_rows.append(jax.tree.map(lambda *ls: np.concatenate(ls, axis=1)[:, :n], *pieces_g))
  grads = jax.tree.map(lambda *ls: np.concatenate(ls), *grads_rows) if return_grads else None
  return PatchGrads(norm_BxN, grads)


@functools.partial(jax.jit, static_argnums=0)
def _weighted_grad(model, params, x_BxHxWxC, w_BxN):
  return jax.grad(lambda p: jnp.mean(jnp.sum(w_BxN * flows.flat_nll(model, p, x_BxHxWxC), -1)))(params)


def _tree_dot(a, b) -> float:
  return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def update_tail_share(model: flows.FastFlow2d, params, feats_BxHxWxC, weights_BxN,
                      tail_BxN) -> dict:
  """How much of the parameter update the tail patches make, cancellations included.

  With ``G = ∂/∂θ mean_b Σ_i w_bi NLL_bi`` (the update direction) and ``G_T``
  the same sum restricted to the tail patches, ``G = G_T + G_¬T`` and

    share = ⟨G_T, G⟩ / ⟨G, G⟩     (tail share + non-tail share = 1),
    cos   = ⟨G_T, G⟩ / (‖G_T‖ ‖G‖),  norm_ratio = ‖G_T‖ / ‖G‖.

  Per-patch norms say how large each contribution is; the share also counts
  how much non-tail contributions cancel each other. If tail patches were
  typical, the mean-only share would be ≈ k/N.
  """
  x = jnp.asarray(feats_BxHxWxC)
  w = jnp.asarray(weights_BxN, x.dtype)
  g_all = _weighted_grad(model, params, x, w)
  g_tail = _weighted_grad(model, params, x, w * jnp.asarray(tail_BxN, x.dtype))
  gg = _tree_dot(g_all, g_all)
  tg = _tree_dot(g_tail, g_all)
  tt = _tree_dot(g_tail, g_tail)
  return {"share": tg / gg if gg > 0 else float("nan"),
          "cos": tg / np.sqrt(tt * gg) if tt > 0 and gg > 0 else float("nan"),
          "norm_ratio": float(np.sqrt(tt / gg)) if gg > 0 else float("nan"),
          "update_norm": float(np.sqrt(gg))}


# ----------------------------------------------------------------------------
# Concentration statistics
# ----------------------------------------------------------------------------


def gini(values, axis: int = -1) -> np.ndarray:
  """Gini coefficient of non-negative values along ``axis``.

  ``G = Σ_i Σ_j |x_i − x_j| / (2 n² μ)``, computed from the ascending order
  statistics as ``G = Σ_i (2i − n − 1) x_(i) / (n Σ_i x_i)`` (i = 1..n). 0 when
  all values are equal, (n−1)/n when one value holds everything; NaN for an
  all-zero row.
  """
  x = np.sort(np.asarray(values, np.float64), axis=axis)
  x = np.moveaxis(x, axis, -1)
  if np.any(x < 0):
    raise ValueError("gini needs non-negative values")
  n = x.shape[-1]
  coef = 2.0 * np.arange(1, n + 1) - n - 1
  total = x.sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, (x * coef).sum(-1) / (n * total), np.nan)


def concentration_stats(norm_BxN, tail_BxN) -> dict:
  """Mean tail norm, mean non-tail norm, their ratio and the mean per-image Gini.

  Means are over all (image, patch) pairs of each set. ``ratio`` is None when
  the non-tail norms are all exactly 0 (λ = 1 in parameter space: the loss
  gives non-tail patches zero weight). The Gini is of each image's N norms,
  averaged over images: it measures how unevenly one image's update is spread.
  """
  g = np.asarray(norm_BxN, np.float64)
  t = np.asarray(tail_BxN, bool)
  tail, non = float(g[t].mean()), float(g[~t].mean())
  return {"tail": tail, "non_tail": non, "ratio": tail / non if non > 0 else None,
          "gini": float(np.nanmean(gini(g, axis=-1)))}


def gradient_concentration(model: flows.FastFlow2d, params, feats_BxHxWxC, tail_weights: Sequence[float],
                           top_k_ratio: float, *, num_param_images: int | None = None,
                           method: str = "auto", patch_chunk: int | None = None, image_chunk: int = 1,
                           input_wrt: str = "features") -> dict:
  """H3 for one trained model on a batch of training images, for several λ.

  For every λ in ``tail_weights`` (include 0 for the amplification) and both
  senses (input, parameter): tail / non-tail mean norm, ratio, Gini,
  amplification = ratio(λ)/ratio(0), tail-norm amplification
  = tail(λ)/tail(0), the theoretical N/k, and in parameter space the tail share
  of the update (``update_tail_share``). Parameter-space gradients are exact
  per patch on the first ``num_param_images`` images (all if None); the
  unweighted ``‖∂NLL_bi/∂θ‖`` are computed once and scaled by ``w_bi(λ)``
  (exact, w is a constant). The tail set is the same for every λ.
  Returns a JSON-ready dict (also the per-patch norms, as lists).
  """
  feats = np.asarray(feats_BxHxWxC)
  b, h, w_, _ = feats.shape
  n = h * w_
  k = int(losses.top_k_count(top_k_ratio, n))
  nll_BxN = batch_nll(model, params, feats)
  tail_BxN = tail_mask(nll_BxN, top_k_ratio)
  lams = list(dict.fromkeys(float(l) for l in tail_weights))
  if 0.0 not in lams:
    lams = [0.0] + lams
  bp = b if num_param_images is None else max(1, min(int(num_param_images), b))
  method = resolve_method(model, params, method)
  unweighted = per_patch_param_grads(model, params, feats[:bp], None, method=method,
                                     patch_chunk=patch_chunk, image_chunk=image_chunk).norm_BxN
  out: dict[str, Any] = {
      "n_patches": n, "k": k, "top_k_ratio": float(top_k_ratio), "theoretical_amplification": n / k,
      "n_images_input": b, "n_images_param": bp, "input_wrt": input_wrt,
      "method": method,
      "unweighted_param": concentration_stats(unweighted, tail_BxN[:bp]),
      "conditions": [],
  }
  for lam in lams:
    w_BxN = loss_weights(nll_BxN, lam, top_k_ratio)
    inp = input_grad_norms(model, params, feats, w_BxN, wrt=input_wrt)
    par = w_BxN[:bp] * unweighted
    cond = {"tail_weight": lam,
            "input": concentration_stats(inp, tail_BxN),
            "param": concentration_stats(par, tail_BxN[:bp]),
            "update": update_tail_share(model, params, feats[:bp], w_BxN[:bp], tail_BxN[:bp]),
            "input_norm_BxN": inp.tolist(), "param_norm_BxN": par.tolist()}
    out["conditions"].append(cond)
  base = out["conditions"][0]
  for cond in out["conditions"]:
    for space in ("input", "param"):
      r, r0 = cond[space]["ratio"], base[space]["ratio"]
      cond[space]["amplification"] = r / r0 if r is not None and r0 else None
      cond[space]["tail_amplification"] = (cond[space]["tail"] / base[space]["tail"]
                                           if base[space]["tail"] > 0 else None)
  out["tail_BxN"] = tail_BxN.tolist()
  out["nll_BxN"] = nll_BxN.tolist()
  return out
