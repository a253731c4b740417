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


# ----------------------------------------------------------------------------
# The per-patch NLL the tail is ranked by: the exact one, or what a PyTorch
# FastFlow user (the original study's likely top-k) can compute
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


def selection_shift(logdet, logdet_weight, share_weight) -> jax.Array:
  """``s_i − NLL_i = (1 − a) · logdet_i − b · mean_j logdet_j`` for ``logdet`` of shape
  [B, ...] (the mean over every axis but the batch axis): the selection score of
  ``tail_aware_loss_nll`` as a shift of the exact NLL, exactly 0.0 for (a, b) = (1, 0)."""
  a = jnp.asarray(logdet_weight, logdet.dtype)
  b = jnp.asarray(share_weight, logdet.dtype)
  share = jnp.mean(logdet, axis=tuple(range(1, logdet.ndim)), keepdims=True)
  return (1.0 - a) * logdet - b * share


# ----------------------------------------------------------------------------
# The tail-aware loss
# ----------------------------------------------------------------------------


def tail_aware_loss_nll(nll_BxN: jax.Array, logdet_BxN: jax.Array, tail_weight, top_k_ratio,
                        logdet_weight=1.0, share_weight=0.0) -> jax.Array:
  """The tail-aware loss, its top-k chosen and averaged by a per-patch NLL definition:
  the one entry point (the flow's training loss, ``train.make_flow_loss``, calls it).

  ``L = mean_b [ (1−λ) · mean_i NLL_bi + λ · mean_{i ∈ top-k(s_b)} s_bi ]``,
  ``k = max(1, round(r · N))``,

  with ``nll_BxN`` the exact per-location NLL (``patch_nll``, grid flattened),
  ``logdet_BxN`` the flow's per-location log|det J| and s the selection score

  ``s_i = ½‖z_i‖² − a · logdet_i − b · (1/N) Σ_j logdet_j + (C/2) log 2π
        = NLL_i + (1 − a) · logdet_i − b · (1/N) Σ_j logdet_j``

  (a = ``logdet_weight``, b = ``share_weight``; ``NLL_DEFINITIONS``). (a, b) = (1, 0)
  ranks by the exact NLL; (0, 0) by ½‖z‖² alone; (0, 1) subtracts an even share of the
  image log-det — what a user of anomalib/FrEIA FastFlow, whose flow returns one
  log-det per image, can compute. The mean term is the image-level NLL under every
  definition (a FastFlow user trains on ``mean ½‖z‖² − logdet_image / N``, which is
  ``mean_i NLL_i``), so only the tail differs: its selection and its average.
  "even_share" ranks exactly as "sq_norm" does (the share is constant within an image)
  but its tail term carries ``λ · logdet / N``; the image mean of s equals the mean NLL
  whenever a + b = 1.

  λ (``tail_weight``) ∈ [0, 1], r (``top_k_ratio``) ∈ (0, 1], a and b may all be traced:
  the top-k set is a rank mask (one stable sort, ties by index; ``top_k_indicator``),
  never a static ``lax.top_k(k)``, so one compiled program serves every (λ, r, a, b)
  (``nll_definition_weights`` gives (a, b) as arrays for ``jax.vmap``). λ = 0 is the
  usual mean-only loss; λ = 1 trains on the top-k patches only.

  Computed as ``mean_b Σ_i w_bi NLL_bi + λ · mean_b Σ_i t_bi (s_bi − NLL_bi)`` with
  ``t = top_k_indicator(s, r)`` and ``w = (1−λ)/N + λ·t = tail_patch_weights(s, λ, r)``.
  For the exact definition the shift is exactly 0.0, so s is NLL bit for bit, the first
  term is ``mean_b Σ_i tail_patch_weights(NLL, λ, r)_bi NLL_bi`` and the second (and its
  gradient) exactly zero: the exact loss's numbers do not depend on the definitions
  being traced alongside it.

  Returns:
    scalar loss.
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


def tail_aware_loss(nll_BxN: jax.Array, tail_weight, top_k_ratio) -> jax.Array:
  """The tail-aware loss ranked by the exact NLL, from ``nll_BxN`` [B, N] alone:
  ``tail_aware_loss_nll`` with (a, b) = (1, 0), where the log-det does not enter.

  ``L = mean_b [ (1−λ) · mean_i NLL_bi + λ · mean_{i ∈ top-k(b)} NLL_bi ]``,
  ``k = max(1, round(r · N))``; λ and r may be traced.
  """
  nll_BxN = jnp.asarray(nll_BxN)
  return tail_aware_loss_nll(nll_BxN, jnp.zeros_like(nll_BxN), tail_weight, top_k_ratio)


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
  """The original study's ``WeightedBCE``: plain BCE with every negative's loss × (1 +
  fp_weight).

  ``ℓ_i = BCE_i · (1 + fp_weight · [y_i = 0])``, averaged over the batch (the
  mean divides by B, not by the sum of weights, as the original study's code does).
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
