"""Attention-based multiple-instance learning on bags of identity embeddings.

A bag is a padded array ``bags_BxNxD`` with a validity mask ``mask_BxN``
(1 = real instance, 0 = padding). Every model here pools over the valid
instances only and is invariant to the order of the instances and to the
amount of padding. Padding is removed with ``where``, never by multiplying
with the mask: ``0 · NaN = NaN``, so a NaN/Inf in a padded slot would
otherwise reach every output (and every gradient).

* ``AttentionMIL``: Ilse, Tomczak & Welling (2018). Instances are embedded
  independently, ``h_i = ReLU(W x_i)``; attention logits
  ``a_i = wᵀ tanh(V h_i)`` (or the gated form ``wᵀ (tanh(V h_i) ⊙ σ(U h_i))``);
  ``α = masked_softmax(a)``; the bag logit is ``cᵀ Σ_i α_i h_i + b``.
  Because the classifier is linear in the pooled embedding, the bag logit is
  an attention-weighted average of the per-instance scores
  ``s_i = cᵀ h_i + b`` (exactly, when deterministic): the model can only see
  a relation between instances through the softmax weights.
* ``pooling="max"``: max-instance (critical-instance) pooling, the first
  stream of DSMIL (Li, Li & Eliceiri 2021): the bag logit is
  ``max_i s_i`` over the valid instances, and the "attention" is the one-hot
  vector of the critical instance ``argmax_i s_i``.
* ``RelationMIL``: the same pooling, but each instance is first compared with
  its bag's masked mean ``m``: the instance network sees
  ``[x_i, x_i − m, |x_i − m|]``. Contamination ("a few instances from another
  identity") is a relation between instances, which this makes expressible.
* No-learning baselines: ``bag_dispersion`` (the study's: mean pairwise cosine
  distance inside each bag, in closed form) and the instance-level
  ``medoid_distances`` (each instance's cosine distance to its bag's medoid)
  pooled with ``top_k_mean`` (k = 1: max).
* Instance-level evaluation: ``instance_auroc`` (instance scores against the
  foreign-instance labels, pooled over the valid instances of positive bags)
  and ``top_instance_is_foreign``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailjax import stats

POOLINGS = ("attention", "max")


def _check_bags(bags_BxNxD, mask_BxN, input_dim: int | None, where: str):
  if bags_BxNxD.ndim != 3:
    raise ValueError(f"{where}: bags must have shape [B, N, D]; got {bags_BxNxD.shape}")
  if input_dim is not None and bags_BxNxD.shape[-1] != input_dim:
    raise ValueError(
        f"{where}: input_dim={input_dim} but the bags have feature size {bags_BxNxD.shape[-1]}")
  if mask_BxN is None:
    return jnp.ones(bags_BxNxD.shape[:2], bags_BxNxD.dtype)
  if mask_BxN.shape != bags_BxNxD.shape[:2]:
    raise ValueError(f"{where}: mask shape {mask_BxN.shape} != bag shape {bags_BxNxD.shape[:2]}")
  return jnp.asarray(mask_BxN, bags_BxNxD.dtype)


def _concrete(x):
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None  # traced under jit/vmap: validated where the data was loaded


def zero_padding(x_BxNxD: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """``x`` with every padded instance set to exactly 0 (by ``where``: NaN/Inf-safe)."""
  return jnp.where(mask_BxN[:, :, None] > 0, x_BxNxD, 0.0)


def masked_softmax(logits_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Softmax over the valid entries of each row; padded entries get exactly 0.

  A row without any valid entry returns all zeros rather than NaN.
  """
  valid_BxN = mask_BxN > 0
  shifted_BxN = jnp.where(valid_BxN, logits_BxN, -jnp.inf)
  row_max_B = jnp.max(shifted_BxN, axis=-1)
  row_max_B = jnp.where(jnp.isfinite(row_max_B), row_max_B, 0.0)
  # exp(-inf) = 0 for padding, and its gradient is 0 too (no NaN from where()).
  exp_BxN = jnp.where(valid_BxN, jnp.exp(jnp.where(valid_BxN, logits_BxN, 0.0) - row_max_B[:, None]), 0.0)
  denom_B = jnp.sum(exp_BxN, axis=-1)
  return exp_BxN / jnp.where(denom_B > 0, denom_B, 1.0)[:, None]


def masked_mean(x_BxNxD: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Mean over the valid instances of each bag, [B, D]."""
  n_B = jnp.maximum(jnp.sum(mask_BxN, axis=-1), 1.0)
  return jnp.sum(zero_padding(x_BxNxD, mask_BxN), axis=1) / n_B[:, None]


class AttentionPool(nn.Module):
  """Ilse et al. (2018) attention pooling: tanh attention, optionally gated."""
  attention_dim: int = 64
  gated: bool = False

  @nn.compact
  def __call__(self, h_BxNxH, mask_BxN):
    v_BxNxA = jnp.tanh(nn.Dense(self.attention_dim, name="V")(h_BxNxH))
    if self.gated:
      v_BxNxA = v_BxNxA * jax.nn.sigmoid(nn.Dense(self.attention_dim, name="U")(h_BxNxH))
    # No bias: softmax ignores a shared shift, so a bias gets only rounding
    # noise as gradient, which Adam would turn into lr-sized random steps.
    logits_BxN = nn.Dense(1, use_bias=False, name="w")(v_BxNxA)[..., 0]
    alpha_BxN = masked_softmax(logits_BxN, mask_BxN)
    pooled_BxH = jnp.einsum("bn,bnh->bh", alpha_BxN, h_BxNxH)
    return pooled_BxH, alpha_BxN


class AttentionMIL(nn.Module):
  """Attention-MIL bag classifier (Ilse et al. 2018); returns (logits_B, attention_BxN).

  ``x → [LayerNorm] → Dense(hidden) → ReLU → dropout → pooling → dropout →
  Dense(1)``. ``layer_norm`` is the study's optional input normalisation.
  ``pooling``: ``"attention"`` (Ilse et al.) or ``"max"`` (critical instance:
  bag logit ``max_i s_i``, attention one-hot on the arg max). ``input_dim``
  is checked against the data (Flax infers it). Call with
  ``deterministic=False`` and a ``'dropout'`` rng to train; with
  ``instance_scores=True`` the call also returns the per-instance scores
  ``s_BxN = cᵀ h_i + b`` (0 at padding), for which
  ``logit_b = Σ_i α_bi s_bi`` (attention pooling, deterministic) or
  ``max_i s_bi`` (max pooling).
  """
  input_dim: int = 256
  hidden_dim: int = 128
  dropout: float = 0.1
  layer_norm: bool = False
  gated: bool = False
  attention_dim: int = 64
  pooling: str = "attention"

  def instance_features(self, x_BxNxD, mask_BxN):
    del mask_BxN
    return x_BxNxD

  @nn.compact
  def __call__(self, bags_BxNxD, mask_BxN=None, *, deterministic: bool = True,
               instance_scores: bool = False):
    if self.pooling not in POOLINGS:
      raise ValueError(f"{type(self).__name__}: pooling must be one of {POOLINGS}; got {self.pooling!r}")
    mask_BxN = _check_bags(bags_BxNxD, mask_BxN, self.input_dim, type(self).__name__)
    valid_BxN = mask_BxN > 0
    # Padding may hold anything (zeros, garbage, NaN); zero it before any
    # statistic (LayerNorm included) sees it, and again after LayerNorm.
    x_BxNxD = zero_padding(bags_BxNxD, mask_BxN)
    if self.layer_norm:
      x_BxNxD = zero_padding(nn.LayerNorm(name="input_norm")(x_BxNxD), mask_BxN)
    f_BxNxF = self.instance_features(x_BxNxD, mask_BxN)
    h_BxNxH = nn.relu(nn.Dense(self.hidden_dim, name="instance_fc")(f_BxNxF))
    h_BxNxH = nn.Dropout(self.dropout)(h_BxNxH, deterministic=deterministic)
    classifier = nn.Dense(1, name="classifier")
    if self.pooling == "attention":
      pooled_BxH, alpha_BxN = AttentionPool(self.attention_dim, self.gated, name="attention")(
          h_BxNxH, mask_BxN)
      pooled_BxH = nn.Dropout(self.dropout)(pooled_BxH, deterministic=deterministic)
      logits_B = classifier(pooled_BxH)[:, 0]
      s_BxN = jnp.where(valid_BxN, classifier(h_BxNxH)[..., 0], 0.0) if instance_scores else None
    else:
      s_BxN = jnp.where(valid_BxN, classifier(h_BxNxH)[..., 0], 0.0)
      masked_BxN = jnp.where(valid_BxN, s_BxN, -jnp.inf)
      logits_B = jnp.max(masked_BxN, axis=-1)
      logits_B = jnp.where(jnp.isfinite(logits_B), logits_B, 0.0)  # a bag with no valid instance
      alpha_BxN = jnp.where(valid_BxN, jax.nn.one_hot(jnp.argmax(masked_BxN, axis=-1), s_BxN.shape[1],
                                                      dtype=s_BxN.dtype), 0.0)
    if instance_scores:
      return logits_B, alpha_BxN, s_BxN
    return logits_B, alpha_BxN


class RelationMIL(AttentionMIL):
  """Relation-aware attention-MIL: each instance is compared with its bag's mean.

  With ``m`` the masked mean of the (optionally LayerNorm-ed) instances of a
  bag, the instance network sees ``[x_i, x_i − m, |x_i − m|]`` (3·D features).
  The mean is over valid instances only, so the model stays permutation and
  padding invariant; a contaminating instance shows up as a large
  ``|x_i − m|``, which attention can pick out.
  """

  def instance_features(self, x_BxNxD, mask_BxN):
    m_Bx1xD = masked_mean(x_BxNxD, mask_BxN)[:, None, :]
    diff_BxNxD = x_BxNxD - m_Bx1xD
    return jnp.concatenate([x_BxNxD, diff_BxNxD, jnp.abs(diff_BxNxD)], axis=-1)


MODELS = {"attention": AttentionMIL, "relation": RelationMIL}


def make_model(kind: str, **kwargs) -> AttentionMIL:
  """Builds a MIL model by name (``'attention'`` or ``'relation'``)."""
  if kind not in MODELS:
    raise ValueError(f"model.kind must be one of {sorted(MODELS)}; got {kind!r}")
  return MODELS[kind](**kwargs)


# ----------------------------------------------------------------------------
# No-learning baselines
# ----------------------------------------------------------------------------


def _check_concrete_bags(bags_BxNxD, mask_BxN, where: str):
  """Errors (only for concrete inputs) on bags below 2 valid instances and on
  NaN/Inf in *valid* instances (padding may hold anything)."""
  n_np = _concrete(jnp.sum(mask_BxN, axis=-1))
  if n_np is None:
    return
  small = np.flatnonzero(n_np < 2)
  if small.size:
    raise ValueError(
        f"{where}: bag {int(small[0])} has {int(n_np[small[0]])} valid instance(s); "
        f"needs at least 2 ({small.size} bag(s) affected, first: {small[:5].tolist()})")
  x = _concrete(bags_BxNxD)
  finite = np.all(np.isfinite(x) | (np.asarray(mask_BxN)[:, :, None] == 0), axis=(1, 2))
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"{where}: bag {int(bad[0])} has NaN/Inf features ({bad.size} bag(s) affected)")


def _unit(bags_BxNxD, mask_BxN, eps):
  x_BxNxD = zero_padding(bags_BxNxD, mask_BxN)
  return x_BxNxD / (jnp.linalg.norm(x_BxNxD, axis=-1, keepdims=True) + eps)


def bag_dispersion(bags_BxNxD, mask_BxN=None, eps: float = 1e-12) -> jax.Array:
  """Mean pairwise cosine distance inside each bag, in O(N·D) per bag.

  With x̂_i = x_i / ‖x_i‖ and n valid instances,
  ``Σ_{i≠j} x̂_i·x̂_j = ‖Σ_i x̂_i‖² − n``, so the mean over the n(n−1)/2 pairs of
  ``1 − cos(x_i, x_j)`` is ``1 − (‖Σ_i x̂_i‖² − n) / (n(n−1))``.

  Args:
    bags_BxNxD: instances, padded to N (padding may hold anything, NaN included).
    mask_BxN: 1 for valid instances (default: all valid).
    eps: added to ‖x_i‖ (an all-zero instance then contributes nothing).
  Returns:
    dispersion_B.
  Raises:
    ValueError naming the first bag with fewer than 2 valid instances, and on
    NaN/Inf in valid instances (only when the inputs are concrete, not under ``jit``).
  """
  bags_BxNxD = jnp.asarray(bags_BxNxD, jnp.float32)
  mask_BxN = _check_bags(bags_BxNxD, None if mask_BxN is None else jnp.asarray(mask_BxN),
                         None, "bag_dispersion")
  _check_concrete_bags(bags_BxNxD, mask_BxN, "bag_dispersion")
  return _dispersion(bags_BxNxD, mask_BxN, eps)


@jax.jit
def _dispersion(bags_BxNxD, mask_BxN, eps):
  n_B = jnp.sum(mask_BxN, axis=-1)
  sum_BxD = jnp.sum(_unit(bags_BxNxD, mask_BxN, eps), axis=1)
  return 1.0 - (jnp.sum(jnp.square(sum_BxD), axis=-1) - n_B) / (n_B * (n_B - 1.0))


def medoid_distances(bags_BxNxD, mask_BxN=None, eps: float = 1e-12) -> jax.Array:
  """Each instance's cosine distance to its bag's medoid, ``d_BxN`` (0 at padding).

  The medoid of a bag is its valid instance with the smallest mean cosine
  distance to the other valid instances,
  ``μ = argmin_i Σ_{j≠i} (1 − x̂_i·x̂_j)``; then ``d_i = 1 − x̂_i·x̂_μ``. With
  fewer than half of the instances foreign, the medoid is a majority
  instance, so a foreign instance sits far from it. Pool with ``top_k_mean``
  (k = 1: the bag score is the largest distance). O(N²·D) per bag.
  """
  bags_BxNxD = jnp.asarray(bags_BxNxD, jnp.float32)
  mask_BxN = _check_bags(bags_BxNxD, None if mask_BxN is None else jnp.asarray(mask_BxN),
                         None, "medoid_distances")
  _check_concrete_bags(bags_BxNxD, mask_BxN, "medoid_distances")
  return _medoid_distances(bags_BxNxD, mask_BxN, eps)


@jax.jit
def _medoid_distances(bags_BxNxD, mask_BxN, eps):
  valid_BxN = mask_BxN > 0
  unit_BxNxD = _unit(bags_BxNxD, mask_BxN, eps)
  dist_BxNxN = 1.0 - jnp.einsum("bid,bjd->bij", unit_BxNxD, unit_BxNxD)
  pair_BxNxN = valid_BxN[:, :, None] & valid_BxN[:, None, :]
  total_BxN = jnp.sum(jnp.where(pair_BxNxN, dist_BxNxN, 0.0), axis=-1)
  medoid_B = jnp.argmin(jnp.where(valid_BxN, total_BxN, jnp.inf), axis=-1)
  d_BxN = jnp.take_along_axis(dist_BxNxN, medoid_B[:, None, None], axis=2)[..., 0]
  return jnp.where(valid_BxN, d_BxN, 0.0)


def top_k_mean(scores_BxN, mask_BxN, k: int) -> jax.Array:
  """Mean of the ``min(k, n_b)`` largest valid scores of each bag, ``[B]`` (k = 1: max)."""
  if int(k) < 1:
    raise ValueError(f"top_k_mean: k must be >= 1; got {k}")
  scores_BxN = jnp.asarray(scores_BxN, jnp.float32)
  valid_BxN = jnp.asarray(mask_BxN) > 0
  ranked_BxN = -jnp.sort(-jnp.where(valid_BxN, scores_BxN, -jnp.inf), axis=-1)
  k_B = jnp.minimum(int(k), jnp.sum(valid_BxN, axis=-1))
  take_BxN = jnp.arange(scores_BxN.shape[1])[None, :] < k_B[:, None]
  return jnp.sum(jnp.where(take_BxN, ranked_BxN, 0.0), axis=-1) / jnp.maximum(k_B, 1)


# ----------------------------------------------------------------------------
# Instance-level evaluation (NumPy: runs on host copies of the outputs)
# ----------------------------------------------------------------------------


def flatten_instances(scores_BxN, instance_labels_BxN, mask_BxN, bag_labels_B=None):
  """The valid instances of the (positive, if ``bag_labels_B`` is given) bags as flat arrays.

  Returns ``(scores_I, labels_I, bag_I)`` with ``bag_I`` the 0-based index of
  each instance's bag among the kept bags (the cluster for bootstraps).
  """
  scores_BxN = np.asarray(scores_BxN, np.float64)
  valid_BxN = np.asarray(mask_BxN) > 0
  keep_B = np.ones(len(valid_BxN), bool) if bag_labels_B is None else np.asarray(bag_labels_B) > 0
  valid_BxN = valid_BxN & keep_B[:, None]
  bag_idx_BxN = np.broadcast_to((np.cumsum(keep_B) - 1)[:, None], valid_BxN.shape)
  return (scores_BxN[valid_BxN], (np.asarray(instance_labels_BxN)[valid_BxN] > 0).astype(np.int64),
          bag_idx_BxN[valid_BxN])


def instance_auroc(scores_BxN, instance_labels_BxN, mask_BxN, bag_labels_B=None) -> float:
  """ROC AUC of instance scores against the foreign-instance labels.

  Pooled over the valid instances of the positive bags (all bags when
  ``bag_labels_B`` is None): the probability that a random foreign instance
  scores above a random native one (ties count ½). NaN when either kind is
  absent. Attention weights are comparable across bags of one size; with
  variable sizes, prefer size-free scores (e.g. ``n_b · α_bi``).
  """
  s_I, y_I, _ = flatten_instances(scores_BxN, instance_labels_BxN, mask_BxN, bag_labels_B)
  return float(stats.weighted_auc(stats.auc_pair_counts(s_I, y_I)))


def top_instance_is_foreign(scores_BxN, instance_labels_BxN, mask_BxN) -> np.ndarray:
  """Per bag: 1 if its highest-scoring valid instance is foreign, else 0 (``[B]``)."""
  s = np.where(np.asarray(mask_BxN) > 0, np.asarray(scores_BxN, np.float64), -np.inf)
  top_B = np.argmax(s, axis=1)
  return (np.asarray(instance_labels_BxN)[np.arange(len(top_B)), top_B] > 0).astype(np.float64)
