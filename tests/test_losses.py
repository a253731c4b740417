import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailjax import losses


def _np_tail_aware(nll, lam, r):
  n = nll.shape[1]
  k = max(1, int(round(r * n)))
  top = -np.sort(-nll, axis=1)[:, :k]
  return float(np.mean((1 - lam) * nll.mean(1) + lam * top.mean(1)))


GRID = [(0.0, 0.02), (0.7, 0.02), (1.0, 0.02), (0.5, 0.1), (0.3, 1.0), (1.0, 0.5), (0.9, 0.004)]


@pytest.mark.parametrize("lam,r", GRID)
def test_tail_aware_matches_numpy(lam, r):
  nll = np.random.default_rng(0).normal(size=(5, 196)).astype(np.float32) * 3 + 100
  got = float(losses.tail_aware_loss(jnp.asarray(nll), lam, r))
  np.testing.assert_allclose(got, _np_tail_aware(nll.astype(np.float64), lam, r), rtol=1e-6)


def test_k_rounding():
  assert int(losses.top_k_count(0.02, 196)) == 4
  assert int(losses.top_k_count(0.001, 196)) == 1  # max(1, ·)
  assert int(losses.top_k_count(1.0, 196)) == 196
  assert int(losses.top_k_count(0.5, 5)) == 2  # round half to even, like Python's round


def test_tail_only_gradient_is_one_over_bk_on_topk():
  b, n, r = 3, 50, 0.1
  k = 5
  nll = jax.random.normal(jax.random.key(0), (b, n))
  g = jax.grad(losses.tail_aware_loss)(nll, 1.0, r)
  top = np.argsort(-np.asarray(nll), axis=1)[:, :k]
  expected = np.zeros((b, n), np.float32)
  np.put_along_axis(expected, top, 1.0 / (b * k), axis=1)
  np.testing.assert_allclose(g, expected, rtol=1e-6, atol=0)
  # mean-only: uniform 1/(B·N)
  g0 = jax.grad(losses.tail_aware_loss)(nll, 0.0, r)
  np.testing.assert_allclose(g0, np.full((b, n), 1.0 / (b * n)), rtol=1e-6)


def test_vmapped_grid_equals_single_values():
  nll = jax.random.normal(jax.random.key(1), (4, 196)) + 10
  lams, rs = zip(*itertools.product([0.0, 0.3, 0.7, 1.0], [0.01, 0.02, 0.1, 0.5, 1.0]))
  lam_G, r_G = jnp.asarray(lams), jnp.asarray(rs)
  sweep = jax.jit(jax.vmap(losses.tail_aware_loss, in_axes=(None, 0, 0)))
  got = sweep(nll, lam_G, r_G)
  want = [float(losses.tail_aware_loss(nll, l, r)) for l, r in zip(lams, rs)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # one compiled program serves every (λ, r): no retrace for new values
  f = jax.jit(losses.tail_aware_loss)
  f(nll, 0.1, 0.2)
  f(nll, 0.9, 0.05)
  assert f._cache_size() == 1


def test_weights_reproduce_loss_and_sum_to_one():
  nll = jax.random.normal(jax.random.key(2), (3, 20))
  w = losses.tail_patch_weights(nll, 0.7, 0.1)
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(jnp.sum(w * nll, -1)), losses.tail_aware_loss(nll, 0.7, 0.1), rtol=1e-6)


@pytest.mark.parametrize("lam,r,field", [(-0.1, 0.1, "tail_weight"), (1.5, 0.1, "tail_weight"),
                                         (0.5, 0.0, "top_k_ratio"), (0.5, 1.2, "top_k_ratio"),
                                         (float("nan"), 0.1, "tail_weight")])
def test_invalid_tail_params_raise(lam, r, field):
  with pytest.raises(ValueError, match=field):
    losses.tail_aware_loss(jnp.ones((2, 10)), lam, r)
  with pytest.raises(ValueError, match=field):
    losses.validate_tail_params(np.array([0.5, lam]), r)


def _np_bce(x, y, pw=1.0):
  x = x.astype(np.float64)
  log_sig = -np.logaddexp(0, -x)
  log_1m = -np.logaddexp(0, x)
  return -(pw * y * log_sig + (1 - y) * log_1m)


LOGITS = np.array([-60.0, -50.0, -3.0, -0.5, 0.0, 0.7, 4.0, 50.0, 60.0], np.float32)
LABELS = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0], np.float32)


@pytest.mark.parametrize("pw", [None, 1.0, 3.5])
def test_bce_with_logits_matches_formula(pw):
  got = losses.bce_with_logits(LOGITS, LABELS, pos_weight=pw)
  want = _np_bce(LOGITS, LABELS, 1.0 if pw is None else pw).mean()
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  g = jax.grad(losses.bce_with_logits)(jnp.asarray(LOGITS), LABELS, pw)
  assert np.all(np.isfinite(g))
  # extreme wrong logits: loss ≈ |x| (not inf)
  np.testing.assert_allclose(float(losses.bce_with_logits(jnp.array([-60.0]), jnp.array([1.0]))), 60.0, rtol=1e-6)


def test_pos_weight_scales_positive_term_only():
  neg_only = losses.bce_with_logits(jnp.array([0.3, -1.0]), jnp.array([0.0, 0.0]), pos_weight=7.0)
  np.testing.assert_allclose(neg_only, losses.bce_with_logits(jnp.array([0.3, -1.0]), jnp.array([0.0, 0.0])))


@pytest.mark.parametrize("fp", [0.0, 2.0, 0.5])
def test_weighted_bce_matches_formula(fp):
  got = losses.weighted_bce(LOGITS, LABELS, fp)
  per = _np_bce(LOGITS, LABELS)
  want = (per * np.where(LABELS == 0, 1 + fp, 1.0)).mean()
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # vmappable over fp_weight
  fps = jnp.array([0.0, 1.0, 2.0])
  np.testing.assert_allclose(jax.vmap(losses.weighted_bce, (None, None, 0))(LOGITS, LABELS, fps),
                             [losses.weighted_bce(LOGITS, LABELS, f) for f in [0.0, 1.0, 2.0]], rtol=1e-6)


def test_arcface_logits_and_loss():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 8)).astype(np.float32)
  w = rng.normal(size=(4, 8)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 0, 1])
  logits = np.asarray(losses.arcface_logits(emb, w, y, margin=0.4, scale=30.0), np.float64)
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  c = w / np.linalg.norm(w, axis=1, keepdims=True)
  theta = np.arccos(np.clip(e @ c.T, -1, 1))
  want = 30.0 * np.cos(theta)
  rows = np.arange(6)
  tgt = theta[rows, y]
  want[rows, y] = np.where(tgt + 0.4 <= np.pi, 30.0 * np.cos(tgt + 0.4),
                           30.0 * (np.cos(tgt) - 0.4 * np.sin(0.4)))
  np.testing.assert_allclose(logits, want, atol=2e-4)
  # margin makes the loss larger than plain normalised softmax at the same scale
  plain = losses.arcface_loss(emb, w, y, margin=0.0, scale=30.0)
  assert float(losses.arcface_loss(emb, w, y)) > float(plain)
  z = want - want.max(1, keepdims=True)
  ce = -(z[rows, y] - np.log(np.exp(z).sum(1)))
  np.testing.assert_allclose(float(losses.arcface_loss(emb, w, y)), ce.mean(), rtol=1e-4)


def test_patch_nll_constant():
  z = jnp.zeros((1, 2, 2, 3))
  np.testing.assert_allclose(losses.patch_nll(z, jnp.zeros((1, 2, 2))), 1.5 * np.log(2 * np.pi), rtol=1e-6)
  np.testing.assert_allclose(losses.patch_nll(z, jnp.ones((1, 2, 2))), 1.5 * np.log(2 * np.pi) - 1, rtol=1e-6)


@pytest.mark.parametrize("r", [0.02, 0.1, 0.25, 0.5, 1.0])
def test_tail_weights_break_ties_by_index_like_the_double_argsort(r):
  """The one-sort tail mask equals the rank mask argsort(argsort(−NLL)) < k, ties included
  (many equal NLLs, ties across the k-th place), also with r traced under vmap."""
  rng = np.random.default_rng(0)
  nll = jnp.asarray(np.round(rng.uniform(size=(8, 50)) * 4).astype(np.float32))   # 5 values: ties
  n = nll.shape[-1]

  def by_rank(r_):
    k = max(1, int(np.round(np.float32(r_) * n)))
    rank = np.argsort(np.argsort(-np.asarray(nll), axis=-1, kind="stable"), axis=-1, kind="stable")
    return 0.3 / n + 0.7 * (rank < k) / k

  np.testing.assert_allclose(losses.tail_patch_weights(nll, 0.7, r), by_rank(r), rtol=1e-6)
  many = jax.vmap(lambda r_: losses.tail_patch_weights(nll, 0.7, r_))(jnp.asarray([r, 0.3]))
  np.testing.assert_allclose(many[0], by_rank(r), rtol=1e-6)
  np.testing.assert_allclose(many[1], by_rank(0.3), rtol=1e-6)


# ----------------------------------------------------------------------------
# Per-patch NLL definitions of the tail (exact | sq_norm | even_share)
# ----------------------------------------------------------------------------


def _flow_outputs(seed=0, b=3, h=7, w=7, c=6):
  kz, kl = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(kz, (b, h, w, c))
  # Per-location log-dets that vary a lot, so the three rankings differ.
  logdet = 4.0 * jax.random.normal(kl, (b, h, w))
  return z, logdet


def _np_variant_loss(z, logdet, lam, r, definition):
  """Brute force: scores, their top-k by a full descending sort (stable, ties by index),
  mean term from the exact NLL."""
  z, logdet = np.asarray(z, np.float64), np.asarray(logdet, np.float64)
  b, h, w, c = z.shape
  n = h * w
  sq = 0.5 * (z ** 2).sum(-1).reshape(b, n)
  ld = logdet.reshape(b, n)
  const = 0.5 * c * np.log(2 * np.pi)
  nll = sq - ld + const
  score = {"exact": nll, "sq_norm": sq + const,
           "even_share": sq - ld.mean(1, keepdims=True) + const}[definition]
  k = max(1, int(round(r * n)))
  top = np.argsort(-score, axis=1, kind="stable")[:, :k]
  tail = np.take_along_axis(score, top, 1).mean(1)
  return float(np.mean((1 - lam) * nll.mean(1) + lam * tail)), top


def _from_flow(z, logdet, lam, r, a=1.0, b=0.0):
  """The loss entry point on a flow's outputs (z [B, H, W, C], logdet [B, H, W])."""
  bsz = z.shape[0]
  return losses.tail_aware_loss_nll(losses.patch_nll(z, logdet).reshape(bsz, -1),
                                    logdet.reshape(bsz, -1), lam, r, a, b)


def _weights_form(nll_BxN, lam, r):
  """The exact tail-aware loss as its patch weights state it: mean_b Σ_i w_bi NLL_bi."""
  return jnp.mean(jnp.sum(losses.tail_patch_weights(nll_BxN, lam, r) * nll_BxN, axis=-1))


@pytest.mark.parametrize("lam,r", GRID)
def test_exact_definition_is_the_weights_form_bit_for_bit(lam, r):
  """With (a, b) = (1, 0) the selection shift is exactly 0.0: the entry point gives the
  weights form of the exact loss bit for bit (eager and compiled), whatever the log-dets,
  and so does ``tail_aware_loss`` (no log-det at all)."""
  z, logdet = _flow_outputs(1)
  nll_BxN = losses.patch_nll(z, logdet).reshape(z.shape[0], -1)
  want = _weights_form(nll_BxN, lam, r)
  a, b = losses.nll_definition_weights("exact")
  for got in (_from_flow(z, logdet, lam, r, a, b), losses.tail_aware_loss(nll_BxN, lam, r)):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  # Compiled, both from the flow's outputs (as the training step computes the loss).
  jit_got = jax.jit(_from_flow)(z, logdet, lam, r, a, b)
  jit_want = jax.jit(lambda z, ld: _weights_form(
      losses.patch_nll(z, ld).reshape(z.shape[0], -1), lam, r))(z, logdet)
  assert np.asarray(jit_got).tobytes() == np.asarray(jit_want).tobytes()
  shift = losses.selection_shift(logdet, 1.0, 0.0)
  assert np.asarray(losses.patch_nll(z, logdet) + shift).tobytes() == np.asarray(
      losses.patch_nll(z, logdet)).tobytes()


@pytest.mark.parametrize("definition", ["exact", "sq_norm", "even_share"])
@pytest.mark.parametrize("lam,r", [(0.7, 0.02), (1.0, 0.1), (0.3, 0.5), (0.0, 0.1)])
def test_definitions_match_brute_force_including_selection(definition, lam, r):
  z, logdet = _flow_outputs(2)
  want, top_np = _np_variant_loss(z, logdet, lam, r, definition)
  a, b = losses.nll_definition_weights(definition)
  got = float(_from_flow(z, logdet, lam, r, a, b))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  score = (losses.patch_nll(z, logdet)
           + losses.selection_shift(logdet, a, b)).reshape(z.shape[0], -1)
  chosen = np.asarray(losses.tail_patch_weights(score, 1.0, r) > 0)
  expect = np.zeros_like(chosen)
  np.put_along_axis(expect, top_np, True, axis=1)
  np.testing.assert_array_equal(chosen, expect)


def test_definitions_really_select_different_patches_and_share_the_mean_term():
  z, logdet = _flow_outputs(3)
  r = 0.1
  tops = {}
  for d in losses.NLL_DEFINITIONS:
    _, tops[d] = _np_variant_loss(z, logdet, 1.0, r, d)
  # sq_norm and even_share rank identically (the share is constant per image) ...
  np.testing.assert_array_equal(tops["sq_norm"], tops["even_share"])
  # ... and differently from the exact NLL when log-dets vary across locations.
  assert (np.sort(tops["exact"], 1) != np.sort(tops["sq_norm"], 1)).any()
  # λ = 0: the loss is the mean NLL under every definition.
  base = float(jnp.mean(losses.patch_nll(z, logdet)))
  for d in losses.NLL_DEFINITIONS:
    a, b = losses.nll_definition_weights(d)
    np.testing.assert_allclose(float(_from_flow(z, logdet, 0.0, r, a, b)), base, rtol=1e-6)


def test_vmap_over_definitions_equals_separate_calls():
  z, logdet = _flow_outputs(4)
  names = list(losses.NLL_DEFINITIONS)
  a_V, b_V = losses.nll_definition_weights(names)
  lam_V = jnp.asarray([0.7, 0.5, 1.0])
  sweep = jax.jit(jax.vmap(_from_flow, in_axes=(None, None, 0, None, 0, 0)))
  got = sweep(z, logdet, lam_V, 0.05, a_V, b_V)
  want = [float(_from_flow(z, logdet, float(l), 0.05, *losses.nll_definition_weights(n)))
          for l, n in zip(lam_V, names)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_definition_gradients_are_finite_and_follow_the_definition():
  z, logdet = _flow_outputs(5)
  r, lam = 0.1, 1.0
  grads = {}
  for d in losses.NLL_DEFINITIONS:
    a, b = losses.nll_definition_weights(d)
    gz, gl = jax.grad(_from_flow, argnums=(0, 1))(z, logdet, lam, r, a, b)
    assert np.isfinite(gz).all() and np.isfinite(gl).all()
    grads[d] = np.asarray(gl)
  bsz, h, w = logdet.shape
  n, k = h * w, max(1, round(r * h * w))
  # λ = 1: sq_norm's tail has no log-det, even_share's gives every location −1/(B·N).
  np.testing.assert_allclose(grads["sq_norm"], 0.0, atol=0)
  np.testing.assert_allclose(grads["even_share"], -1.0 / (bsz * n), rtol=1e-6)
  # exact: −1/(B·k) on the top-k locations, 0 elsewhere.
  scaled = np.round(grads["exact"] * bsz * k, 6)
  assert set(np.unique(scaled).tolist()) == {-1.0, 0.0}
  assert int((scaled == -1.0).sum()) == bsz * k


def test_unknown_definition_raises():
  with pytest.raises(ValueError, match="per-patch NLL definition"):
    losses.nll_definition_weights("logdet_only")
