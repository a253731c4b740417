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
Three exact implementations are kept selectable because their speed depends on
the backend (see ``benchmarks/bench_gradients.py``):

* ``"jacrev"`` (default): one forward per image and patch chunk, then the VJP
  vmapped over a chunk of one-hot cotangents — ``jax.jacrev`` of the NLL
  vector restricted to a chunk of rows (chunk = N is exactly ``jacrev``);
* ``"vmap_grad"``: ``jax.vmap(jax.grad(lambda θ, i: w_i·NLL_i(θ)))`` over a chunk
  of patch indices;
* ``"loop"``: a Python loop of one jitted single-patch gradient per patch.

Memory: a chunk call holds ``image_chunk · patch_chunk`` gradients, each the
size of θ; the analysis keeps only their norms (B × N floats) unless the full
gradients are requested.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import flows, losses

METHODS = ("jacrev", "vmap_grad", "loop")
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


def per_patch_param_grads(model: flows.FastFlow2d, params, feats_BxHxWxC, weights_BxN=None, *,
                          method: str = "jacrev", patch_chunk: int = 28, image_chunk: int = 1,
                          return_grads: bool = False) -> PatchGrads:
  """Exact ``g_bi = ∂(w_bi · NLL_bi)/∂θ`` for every image b and patch i.

  Args:
    model, params: the flow and one row's parameters.
    feats_BxHxWxC: backbone features (the model applies its LayerNorm itself).
    weights_BxN: constant per-patch weights w_bi (e.g. ``loss_weights``); None
      gives the unweighted ``∂NLL_bi/∂θ``. Because w is a constant,
      ``‖g_bi‖ = w_bi · ‖∂NLL_bi/∂θ‖``.
    method: "jacrev" | "vmap_grad" | "loop" (module docstring).
    patch_chunk, image_chunk: patches × images per compiled call; a call holds
      ``patch_chunk · image_chunk`` parameter-sized gradients. Short chunks are
      padded (zero weight) so every call reuses one compilation.
    return_grads: also return the full gradients (B·N·|θ| floats: small cases only).
  Returns:
    PatchGrads(norm_BxN, grads or None); ``(1/B) Σ_bi g_bi = ∂L/∂θ``.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if patch_chunk < 1 or image_chunk < 1:
    raise ValueError(f"patch_chunk and image_chunk must be ≥ 1, got {patch_chunk}, {image_chunk}")
  feats = np.asarray(feats_BxHxWxC)
  b, h, w_, _ = feats.shape
  n = h * w_
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
  for s in range(0, b, image_chunk):
    x = feats[s:s + image_chunk]
    wc = w_pad[s:s + image_chunk]
    c = len(x)
    if c < image_chunk:  # pad with copies of the last image, weight 0, dropped below
      x = np.concatenate([x, np.repeat(x[-1:], image_chunk - c, axis=0)])
      wc = np.concatenate([wc, np.zeros((image_chunk - c, wc.shape[1]), wc.dtype)])
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
                           method: str = "jacrev", patch_chunk: int = 28, image_chunk: int = 1,
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
  unweighted = per_patch_param_grads(model, params, feats[:bp], None, method=method,
                                     patch_chunk=patch_chunk, image_chunk=image_chunk).norm_BxN
  out: dict[str, Any] = {
      "n_patches": n, "k": k, "top_k_ratio": float(top_k_ratio), "theoretical_amplification": n / k,
      "n_images_input": b, "n_images_param": bp, "method": method, "input_wrt": input_wrt,
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
