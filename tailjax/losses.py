"""Losses as pure, jittable, vmappable functions.

Shapes are in the names: ``nll_BxN`` is a batch of B images with N patches.
Hyperparameters that sweeps vary (``tail_weight`` λ, ``top_k_ratio`` r,
``pos_weight``, ``fp_weight``) may be traced arrays, so ``jax.vmap`` over them
runs a whole sweep as one program.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------
# Flow likelihood
# ----------------------------------------------------------------------------


def patch_nll(z_BxHxWxC: jax.Array, logdet_BxHxW: jax.Array) -> jax.Array:
  """Per-patch negative log-likelihood under a standard-normal base density.

  ``NLL_i = 0.5 * ||z_i||^2 - logdet_i + (C/2) * log(2π)`` for every spatial
  location i, where ``z_i`` is the C-dim latent and ``logdet_i`` the flow's
  log|det J| at that location. Returns ``nll_BxHxW`` in nats.
  """
  c = z_BxHxWxC.shape[-1]
  sq_BxHxW = jnp.sum(jnp.square(z_BxHxWxC), axis=-1)
  return 0.5 * sq_BxHxW - logdet_BxHxW + 0.5 * c * LOG_2PI


def validate_tail_params(tail_weight, top_k_ratio, *, where: str = "loss") -> None:
  """Config-time check: λ ∈ [0, 1] and r ∈ (0, 1]; raises ValueError naming the field.

  Traced values cannot be checked here and are skipped; check the grid that
  produced them instead (``validate_tail_params`` accepts arrays too).
  """
  import numpy as np  # local: keeps the traced path free of NumPy conversions

  def _concrete(x):
    try:
      return np.asarray(x, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return None  # traced inside jit/vmap: validated where the grid was built

  lam = _concrete(tail_weight)
  if lam is not None and (not np.all(np.isfinite(lam)) or np.any(lam < 0) or np.any(lam > 1)):
    raise ValueError(
        f"{where}.tail_weight (λ) must lie in [0, 1]; got {lam.tolist()}")
  r = _concrete(top_k_ratio)
  if r is not None and (not np.all(np.isfinite(r)) or np.any(r <= 0) or np.any(r > 1)):
    raise ValueError(
        f"{where}.top_k_ratio (r) must lie in (0, 1]; got {r.tolist()}")


def top_k_count(top_k_ratio, n: int) -> jax.Array:
  """k = max(1, round(r · N)) as a (possibly traced) integer array; round half to even."""
  return jnp.maximum(1, jnp.round(jnp.asarray(top_k_ratio, jnp.float32) * n)).astype(jnp.int32)


def tail_patch_weights(nll_BxN: jax.Array, tail_weight, top_k_ratio) -> jax.Array:
  """Per-patch weights w_BxN of the tail-aware loss, so that loss = mean_b Σ_i w_bi · NLL_bi.

  ``w_i = (1-λ)/N + λ · [rank_i < k] / k`` where ``rank_i`` is patch i's rank
  by descending NLL within its image (ties broken by index, stable sort).
  The weights carry no gradient: selecting the top-k set is piecewise constant.

  One sort, no rank array: with ``j`` the index of the k-th patch in the stable
  descending order and ``v = NLL_j``, rank_i < k ⇔ NLL_i > v, or NLL_i = v and i ≤ j
  (tied patches keep index order, so the included ones are those up to j). Same
  set as ``argsort(argsort(−NLL)) < k``, at half the sorting (tested with ties).
  """
  n = nll_BxN.shape[-1]
  lam = jnp.asarray(tail_weight, nll_BxN.dtype)
  return (1.0 - lam) / n + lam * top_k_indicator(nll_BxN, top_k_ratio)


def top_k_indicator(score_BxN: jax.Array, top_k_ratio) -> jax.Array:
  """``[rank_i < k] / k`` by descending score within each row (stable: ties by index),
  k = max(1, round(r · N)); no gradient. ``tail_patch_weights`` at λ = 1."""
  n = score_BxN.shape[-1]
  k = top_k_count(top_k_ratio, n)
  v_BxN = jax.lax.stop_gradient(score_BxN)
  order_BxN = jnp.argsort(-v_BxN, axis=-1, stable=True)
  j_Bx1 = jax.lax.dynamic_slice_in_dim(order_BxN, k - 1, 1, axis=-1)
  v_Bx1 = jnp.take_along_axis(v_BxN, j_Bx1, axis=-1)
  i_1xN = jnp.arange(n, dtype=order_BxN.dtype)[None, :]
  in_tail_BxN = ((v_BxN > v_Bx1) | ((v_BxN == v_Bx1) & (i_1xN <= j_Bx1))).astype(score_BxN.dtype)
  return in_tail_BxN / k.astype(score_BxN.dtype)


def tail_aware_loss(nll_BxN: jax.Array, tail_weight, top_k_ratio) -> jax.Array:
  """Tail-aware NLL mixture, averaged over the batch.

  ``L = mean_b [ (1-λ) · mean_i NLL_bi + λ · mean_{i ∈ top-k(b)} NLL_bi ]`` with
  ``k = max(1, round(r · N))``. λ (``tail_weight``) and r (``top_k_ratio``) may
  be traced scalars: the top-k set is a rank mask (sort, then ``rank < k``),
  never a static ``lax.top_k(k)``, so one compiled program serves every (λ, r).
  λ = 0 is the usual mean-only loss; λ = 1 trains on the top-k patches only.

  Args:
    nll_BxN: per-patch NLL, [B, N] (flatten the spatial grid first).
    tail_weight: λ ∈ [0, 1].
    top_k_ratio: r ∈ (0, 1].
  Returns:
    scalar loss.
  """
  if nll_BxN.ndim != 2:
    raise ValueError(f"tail_aware_loss expects nll_BxN of rank 2, got shape {nll_BxN.shape}")
  validate_tail_params(tail_weight, top_k_ratio, where="tail_aware_loss")
  nll_BxN = jnp.asarray(nll_BxN)
  w_BxN = tail_patch_weights(nll_BxN, tail_weight, top_k_ratio)
  return jnp.mean(jnp.sum(w_BxN * nll_BxN, axis=-1))


# ----------------------------------------------------------------------------
# The per-patch NLL a PyTorch FastFlow user would rank by (the seed's likely top-k)
# ----------------------------------------------------------------------------

# (a, b) of the selection score ½‖z_i‖² − a·logdet_i − b·mean_j logdet_j + (C/2) log 2π.
NLL_DEFINITIONS = {"exact": (1.0, 0.0), "sq_norm": (0.0, 0.0), "even_share": (0.0, 1.0)}


def nll_definition_weights(definition) -> tuple[jax.Array, jax.Array]:
  """(logdet_weight a, share_weight b) of a per-patch NLL definition, or of a sequence
  of them (then two arrays [V], ready for ``jax.vmap``): "exact" (1, 0), "sq_norm"
  (0, 0), "even_share" (0, 1) (``NLL_DEFINITIONS``)."""
  names = [definition] if isinstance(definition, str) else list(definition)
  bad = [n for n in names if n not in NLL_DEFINITIONS]
  if bad:
    raise ValueError(f"per-patch NLL definition must be one of {tuple(NLL_DEFINITIONS)}, "
                     f"got {bad}")
  a_V, b_V = (jnp.asarray(v, jnp.float32) for v in zip(*(NLL_DEFINITIONS[n] for n in names)))
  return (a_V[0], b_V[0]) if isinstance(definition, str) else (a_V, b_V)


def selection_nll(z_BxHxWxC: jax.Array, logdet_BxHxW: jax.Array, logdet_weight,
                  share_weight) -> jax.Array:
  """Per-patch score a tail-aware loss may rank and average, ``[B, H, W]`` (nats):

    ``s_i = ½‖z_i‖² − a · logdet_i − b · (1/N) Σ_j logdet_j + (C/2) log 2π``

  with a = ``logdet_weight``, b = ``share_weight`` (traceable). (a, b) = (1, 0) is the
  exact per-location NLL (``patch_nll``, bit for bit); (0, 0) ranks by ½‖z‖² alone, and
  (0, 1) subtracts an even share of the image log-det — what a user of anomalib/FrEIA
  FastFlow, whose flow returns one log-det per image, can compute. The image mean
  ``(1/N) Σ_i s_i`` equals the mean NLL whenever a + b = 1 (exact and even share), since
  the mean of the per-patch log-dets is the even share.
  """
  return patch_nll(z_BxHxWxC, logdet_BxHxW) + selection_shift(logdet_BxHxW, logdet_weight,
                                                              share_weight)


def selection_shift(logdet, logdet_weight, share_weight) -> jax.Array:
  """``s_i − NLL_i = (1 − a) · logdet_i − b · mean_j logdet_j`` for ``logdet`` of shape
  [B, ...] (the mean over every axis but the batch axis): ``selection_nll`` as a shift
  of the exact NLL, exactly 0.0 for (a, b) = (1, 0)."""
  a = jnp.asarray(logdet_weight, logdet.dtype)
  b = jnp.asarray(share_weight, logdet.dtype)
  share = jnp.mean(logdet, axis=tuple(range(1, logdet.ndim)), keepdims=True)
  return (1.0 - a) * logdet - b * share


def tail_aware_loss_from_flow(z_BxHxWxC: jax.Array, logdet_BxHxW: jax.Array, tail_weight,
                              top_k_ratio, logdet_weight=1.0, share_weight=0.0) -> jax.Array:
  """The tail-aware loss with the top-k chosen and averaged by a per-patch NLL definition.

  ``L = mean_b [ (1−λ) · mean_i NLL_bi + λ · mean_{i ∈ top-k(s_b)} s_bi ]``

  with NLL the exact per-location NLL (``patch_nll``) and s the score of
  ``selection_nll`` (a = ``logdet_weight``, b = ``share_weight``). The mean term is
  the image-level NLL under every definition — a FastFlow user trains on
  ``mean ½‖z‖² − logdet_image / N``, which is ``mean_i NLL_i`` — so only the tail differs:
  its selection (which patches are the top k) and its average. "sq_norm" (0, 0) leaves
  the log-det out of the tail; "even_share" (0, 1) ranks exactly as "sq_norm" does (the
  share is constant within an image) but its tail term carries ``λ · logdet / N``.
  Flattens the grid and calls ``tail_aware_loss_nll``.

  Args:
    z_BxHxWxC: latents; logdet_BxHxW: per-location log|det J|.
    tail_weight: λ ∈ [0, 1]; top_k_ratio: r ∈ (0, 1] (k = max(1, round(r·H·W))).
    logdet_weight, share_weight: a, b of the selection score.
  Returns:
    scalar loss.
  """
  if z_BxHxWxC.ndim != 4 or logdet_BxHxW.shape != z_BxHxWxC.shape[:3]:
    raise ValueError(f"tail_aware_loss_from_flow expects z [B, H, W, C] and logdet [B, H, W], "
                     f"got {z_BxHxWxC.shape} and {logdet_BxHxW.shape}")
  b = z_BxHxWxC.shape[0]
  return tail_aware_loss_nll(patch_nll(z_BxHxWxC, logdet_BxHxW).reshape(b, -1),
                             logdet_BxHxW.reshape(b, -1), tail_weight, top_k_ratio,
                             logdet_weight, share_weight)


def tail_aware_loss_nll(nll_BxN: jax.Array, logdet_BxN: jax.Array, tail_weight, top_k_ratio,
                        logdet_weight=1.0, share_weight=0.0) -> jax.Array:
  """``tail_aware_loss_from_flow`` from the exact per-patch NLL and log-det, ``[B, N]``
  (what the training loss has at hand).

  The selection score is written as a shift of the NLL,
  ``s_i = NLL_i + (1 − a) · logdet_i − b · (1/N) Σ_j logdet_j`` (= ``selection_nll``),
  and the loss as ``mean_b Σ_i w_bi NLL_bi + λ · mean_b Σ_i t_bi (s_bi − NLL_bi)`` with
  ``w = tail_patch_weights(s, λ, r)`` and ``t = top_k_indicator(s, r)`` (the
  top-k indicator / k). For the exact definition (a, b) = (1, 0) the shift is exactly
  0.0, so s is NLL bit for bit, the first term is ``tail_aware_loss`` and the second
  (and its gradient) exactly zero: one compiled program serves every definition
  (λ, r, a, b may all be traced; ``nll_definition_weights``) without changing the
  exact loss's numbers.
  """
  if nll_BxN.ndim != 2 or logdet_BxN.shape != nll_BxN.shape:
    raise ValueError(f"tail_aware_loss_nll expects nll and logdet of one shape [B, N], "
                     f"got {nll_BxN.shape} and {logdet_BxN.shape}")
  validate_tail_params(tail_weight, top_k_ratio, where="tail_aware_loss_nll")
  shift_BxN = selection_shift(logdet_BxN, logdet_weight, share_weight)
  score_BxN = nll_BxN + shift_BxN
  lam = jnp.asarray(tail_weight, nll_BxN.dtype)
  t_BxN = top_k_indicator(score_BxN, top_k_ratio)            # one sort serves both terms
  w_BxN = (1.0 - lam) / nll_BxN.shape[-1] + lam * t_BxN      # = tail_patch_weights(s, λ, r)
  return (jnp.mean(jnp.sum(w_BxN * nll_BxN, axis=-1))
          + lam * jnp.mean(jnp.sum(t_BxN * shift_BxN, axis=-1)))


# ----------------------------------------------------------------------------
# Binary cross-entropy family (bag-level MIL losses)
# ----------------------------------------------------------------------------


def _bce_terms(logits_B, labels_B):
  """−log σ(x) and −log(1−σ(x)) computed stably as softplus(−x) and softplus(x)."""
  logits_B = jnp.asarray(logits_B, jnp.float32)
  labels_B = jnp.asarray(labels_B, logits_B.dtype)
  if logits_B.shape != labels_B.shape:
    raise ValueError(f"logits shape {logits_B.shape} != labels shape {labels_B.shape}")
  return labels_B, jax.nn.softplus(-logits_B), jax.nn.softplus(logits_B)


def bce_with_logits(logits_B, labels_B, pos_weight=None) -> jax.Array:
  """Mean binary cross-entropy on logits with PyTorch ``BCEWithLogitsLoss`` semantics.

  ``ℓ = −[ p · y · log σ(x) + (1 − y) · log(1 − σ(x)) ]`` averaged over the batch,
  where p = ``pos_weight`` (default 1) scales the positive term only. Computed
  with softplus, so logits of ±50 and beyond give finite losses and gradients.
  """
  y, neg_log_p, neg_log_1mp = _bce_terms(logits_B, labels_B)
  pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, neg_log_p.dtype)
  return jnp.mean(pw * y * neg_log_p + (1.0 - y) * neg_log_1mp)


def weighted_bce(logits_B, labels_B, fp_weight) -> jax.Array:
  """The study's ``WeightedBCE``: plain BCE with every negative's loss × (1 + fp_weight).

  ``ℓ_i = BCE_i · (1 + fp_weight · [y_i = 0])``, averaged over the batch (the
  mean divides by B, not by the sum of weights, as the study's code did).
  """
  y, neg_log_p, neg_log_1mp = _bce_terms(logits_B, labels_B)
  per_example = y * neg_log_p + (1.0 - y) * neg_log_1mp
  weight = 1.0 + jnp.asarray(fp_weight, per_example.dtype) * (1.0 - y)
  return jnp.mean(weight * per_example)


# ----------------------------------------------------------------------------
# ArcFace (additive angular margin) for identity embeddings
# ----------------------------------------------------------------------------


def arcface_logits(emb_BxD, weights_CxD, labels_B, margin=0.4, scale=30.0) -> jax.Array:
  """ArcFace logits: ``s · cos(θ_y + m)`` for the true class, ``s · cos θ_j`` otherwise.

  Embeddings and class centres are L2-normalised here, so ``cos θ_j = ê · ŵ_j``.
  Where ``θ_y + m > π`` the margin term stops being monotone in θ; as in
  InsightFace we then fall back to ``cos θ_y − m · sin m`` (keeps the logit
  decreasing in θ). Returns logits_BxC.
  """
  e = emb_BxD / (jnp.linalg.norm(emb_BxD, axis=-1, keepdims=True) + 1e-12)
  w = weights_CxD / (jnp.linalg.norm(weights_CxD, axis=-1, keepdims=True) + 1e-12)
  cos_BxC = jnp.clip(e @ w.T, -1.0 + 1e-7, 1.0 - 1e-7)
  sin_BxC = jnp.sqrt(1.0 - jnp.square(cos_BxC))
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  with_margin_BxC = cos_BxC * cos_m - sin_BxC * sin_m
  threshold = jnp.cos(jnp.pi - margin)
  with_margin_BxC = jnp.where(cos_BxC > threshold, with_margin_BxC, cos_BxC - margin * sin_m)
  onehot_BxC = jax.nn.one_hot(labels_B, weights_CxD.shape[0], dtype=cos_BxC.dtype)
  return scale * (onehot_BxC * with_margin_BxC + (1.0 - onehot_BxC) * cos_BxC)


def arcface_loss(emb_BxD, weights_CxD, labels_B, margin=0.4, scale=30.0) -> jax.Array:
  """Mean softmax cross-entropy over ArcFace logits (margin 0.4, scale 30 by default)."""
  logits_BxC = arcface_logits(emb_BxD, weights_CxD, labels_B, margin, scale)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B))
