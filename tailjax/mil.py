"""Attention-based multiple-instance learning on bags of identity embeddings.

A bag is a padded array ``bags_BxNxD`` with a validity mask ``mask_BxN``
(1 = real instance, 0 = padding). Every model here pools over the valid
instances only and is invariant to the order of the instances and to the
amount of padding.

* ``AttentionMIL``: Ilse, Tomczak & Welling (2018). Instances are embedded
  independently, ``h_i = ReLU(W x_i)``; attention logits
  ``a_i = wᵀ tanh(V h_i)`` (or the gated form ``wᵀ (tanh(V h_i) ⊙ σ(U h_i))``);
  ``α = masked_softmax(a)``; the bag logit is ``cᵀ Σ_i α_i h_i + b``.
  Because the classifier is linear in the pooled embedding, the bag logit is
  an attention-weighted average of per-instance scores ``cᵀ h_i``: the model
  can only see a relation between instances through the softmax weights.
* ``RelationMIL``: the same pooling, but each instance is first compared with
  its bag's masked mean ``m``: the instance network sees
  ``[x_i, x_i − m, |x_i − m|]``. Contamination ("a few instances from another
  identity") is a relation between instances, which this makes expressible.
* ``bag_dispersion``: the study's no-learning baseline, the mean pairwise
  cosine distance inside each bag, in closed form.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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
  return jnp.sum(x_BxNxD * mask_BxN[:, :, None], axis=1) / n_B[:, None]


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

  ``x → [LayerNorm] → Dense(hidden) → ReLU → dropout → attention pooling →
  dropout → Dense(1)``. ``layer_norm`` is the study's optional input
  normalisation. ``input_dim`` is checked against the data (Flax infers it).
  Call with ``deterministic=False`` and a ``'dropout'`` rng to train.
  """
  input_dim: int = 256
  hidden_dim: int = 128
  dropout: float = 0.1
  layer_norm: bool = False
  gated: bool = False
  attention_dim: int = 64

  def instance_features(self, x_BxNxD, mask_BxN):
    del mask_BxN
    return x_BxNxD

  @nn.compact
  def __call__(self, bags_BxNxD, mask_BxN=None, *, deterministic: bool = True):
    mask_BxN = _check_bags(bags_BxNxD, mask_BxN, self.input_dim, type(self).__name__)
    x_BxNxD = bags_BxNxD
    if self.layer_norm:
      x_BxNxD = nn.LayerNorm(name="input_norm")(x_BxNxD)
    # Padding may hold anything (zeros, garbage); zero it so no statistic sees it.
    x_BxNxD = x_BxNxD * mask_BxN[:, :, None]
    f_BxNxF = self.instance_features(x_BxNxD, mask_BxN)
    h_BxNxH = nn.relu(nn.Dense(self.hidden_dim, name="instance_fc")(f_BxNxF))
    h_BxNxH = nn.Dropout(self.dropout)(h_BxNxH, deterministic=deterministic)
    pooled_BxH, alpha_BxN = AttentionPool(self.attention_dim, self.gated, name="attention")(
        h_BxNxH, mask_BxN)
    pooled_BxH = nn.Dropout(self.dropout)(pooled_BxH, deterministic=deterministic)
    logits_B = nn.Dense(1, name="classifier")(pooled_BxH)[:, 0]
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
# The no-learning baseline
# ----------------------------------------------------------------------------


def bag_dispersion(bags_BxNxD, mask_BxN=None, eps: float = 1e-12) -> jax.Array:
  """Mean pairwise cosine distance inside each bag, in O(N·D) per bag.

  With x̂_i = x_i / ‖x_i‖ and n valid instances,
  ``Σ_{i≠j} x̂_i·x̂_j = ‖Σ_i x̂_i‖² − n``, so the mean over the n(n−1)/2 pairs of
  ``1 − cos(x_i, x_j)`` is ``1 − (‖Σ_i x̂_i‖² − n) / (n(n−1))``.

  Args:
    bags_BxNxD: instances, padded to N.
    mask_BxN: 1 for valid instances (default: all valid).
    eps: added to ‖x_i‖ (an all-zero instance then contributes nothing).
  Returns:
    dispersion_B.
  Raises:
    ValueError naming the first bag with fewer than 2 valid instances, and on
    NaN/Inf features (only when the inputs are concrete, not under ``jit``).
  """
  bags_BxNxD = jnp.asarray(bags_BxNxD, jnp.float32)
  mask_BxN = _check_bags(bags_BxNxD, None if mask_BxN is None else jnp.asarray(mask_BxN),
                         None, "bag_dispersion")
  n_B = jnp.sum(mask_BxN, axis=-1)
  n_np = _concrete(n_B)
  if n_np is not None:
    small = np.flatnonzero(n_np < 2)
    if small.size:
      raise ValueError(
          f"bag_dispersion: bag {int(small[0])} has {int(n_np[small[0]])} valid instance(s); "
          f"pairwise dispersion needs at least 2 ({small.size} bag(s) affected: "
          f"{small[:10].tolist()}{' ...' if small.size > 10 else ''})")
    finite = np.all(np.isfinite(np.asarray(bags_BxNxD)) | (np.asarray(mask_BxN)[:, :, None] == 0), axis=(1, 2))
    if not finite.all():
      raise ValueError(f"bag_dispersion: bag {int(np.flatnonzero(~finite)[0])} has NaN/Inf features")
  return _dispersion(bags_BxNxD, mask_BxN, eps)


@jax.jit
def _dispersion(bags_BxNxD, mask_BxN, eps):
  n_B = jnp.sum(mask_BxN, axis=-1)
  unit_BxNxD = bags_BxNxD / (jnp.linalg.norm(bags_BxNxD, axis=-1, keepdims=True) + eps)
  sum_BxD = jnp.sum(unit_BxNxD * mask_BxN[:, :, None], axis=1)
  return 1.0 - (jnp.sum(jnp.square(sum_BxD), axis=-1) - n_B) / (n_B * (n_B - 1.0))
