"""Exact per-patch gradients (tailjax.analysis.gradients): sums, equivalences, zeros, Gini."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailjax import flows, losses
from tailjax.analysis import gradients as G

B, H, W, C = 3, 4, 5, 6
N = H * W


def _trained_like(model, key=0, scale=0.3, dtype=jnp.float64):
  """Initialised params plus noise: the zero-initialised last layers would otherwise
  make every gradient w.r.t. the first layers vanish. Jitted: op-by-op init is slow."""
  @jax.jit
  def make(k):
    x = jax.random.normal(jax.random.fold_in(k, 0), (B, H, W, C), dtype)
    params = model.init(jax.random.fold_in(k, 1), x[:1])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(k, 2), len(leaves))
    leaves = [(l + scale * jax.random.normal(kk, l.shape)).astype(dtype) for l, kk in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves), x
  params, x = make(jax.random.key(key))
  return params, np.asarray(x)


def _flat(tree):
  return np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(tree)])


def _flat_rows(tree, lead):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(l).reshape(l.shape[:lead] + (-1,)) for l in leaves], axis=-1)


@pytest.fixture(scope="module")
def fastflow():
  with jax.enable_x64(True):
    model = flows.FastFlow2d(channels=C, num_steps=2, kernel_mode="alternate", layer_norm="image")
    params, x = _trained_like(model)
    yield model, params, x


def test_per_patch_grads_sum_to_the_loss_gradient(fastflow):
  model, params, x = fastflow
  lam, r = 0.7, 0.1
  with jax.enable_x64(True):
    nll = G.batch_nll(model, params, x)
    w = G.loss_weights(nll, lam, r)
    per = G.per_patch_param_grads(model, params, x, w, return_grads=True)
    full = jax.grad(lambda p: losses.tail_aware_loss(flows.flat_nll(model, p, jnp.asarray(x)), lam, r))(params)
  # the loss is a mean over images: (1/B) Σ_b Σ_i g_bi = ∂L/∂θ
  summed = _flat_rows(per.grads, 2).sum(axis=(0, 1)) / B
  ref = _flat(full)
  assert np.linalg.norm(summed - ref) <= 1e-5 * np.linalg.norm(ref)
  assert np.linalg.norm(ref) > 0
  np.testing.assert_allclose(per.norm_BxN, np.linalg.norm(_flat_rows(per.grads, 2), axis=-1), rtol=1e-10)


@pytest.fixture(scope="module")
def loop_reference(fastflow):
  """Weights and the explicit per-patch gradients ∂(w_bi·NLL_bi)/∂θ, one jax.grad per (b, i)."""
  model, params, x = fastflow
  with jax.enable_x64(True):
    w = np.random.default_rng(0).uniform(0.1, 2.0, (B, N))
    one = jax.jit(lambda p, b, i: jax.grad(
        lambda q: jnp.asarray(w)[b, i] * flows.flat_nll(model, q, jnp.asarray(x)[b][None])[0, i])(p))
    ref = np.stack([np.stack([_flat(one(params, b, i)) for i in range(N)]) for b in range(B)])
  return w, ref


@pytest.mark.parametrize("method", [m for m in G.METHODS if m != "ghost"])
def test_every_method_equals_a_python_loop_of_single_patch_grads(fastflow, loop_reference, method):
  model, params, x = fastflow
  w, ref = loop_reference
  with jax.enable_x64(True):
    got = G.per_patch_param_grads(model, params, x, w, method=method, patch_chunk=7, return_grads=True)
  np.testing.assert_allclose(_flat_rows(got.grads, 2), ref, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(got.norm_BxN, np.linalg.norm(ref, axis=-1), rtol=1e-9)


def test_ghost_norms_equal_the_loop_with_every_kernel_norm(fastflow, loop_reference):
  # ghost (window Gram), ghost_image (image Gram), materialised AᵀG: three exact ways per layer;
  # "auto" mixes all three on this flow, the forced ones run each on every layer
  model, params, x = fastflow
  w, ref = loop_reference
  specs = G.flow_spec(model, params)
  auto_plan = {G._kernel_norm_choice(rho, s.kernel, c_in, c_out, H, W, "auto")
               for s, rho in zip(specs, G._out_radii(specs))
               for rho, c_in, c_out in ((rho, C - C // 2, 2 * (C // 2)), (rho + s.kernel // 2, C - C // 2, C - C // 2))}
  assert auto_plan == {"ghost", "ghost_image", "materialise"}
  with jax.enable_x64(True):
    got = {kn: G.per_patch_param_grads(model, params, x, w, method="ghost", kernel_norms=kn).norm_BxN
           for kn in ("auto", "ghost", "materialise")}
    with pytest.raises(ValueError, match="norms without forming"):
      G.per_patch_param_grads(model, params, x, w, method="ghost", return_grads=True)
  for kn, norm in got.items():
    np.testing.assert_allclose(norm, np.linalg.norm(ref, axis=-1), rtol=1e-10, err_msg=kn)


def test_chunked_equals_unchunked(fastflow):
  model, params, x = fastflow
  with jax.enable_x64(True):
    one = G.per_patch_param_grads(model, params, x, patch_chunk=N, image_chunk=B, return_grads=True)
    # 7 ∤ 20 patches and 2 ∤ 3 images: both paddings are exercised
    chunked = G.per_patch_param_grads(model, params, x, patch_chunk=7, image_chunk=2, return_grads=True)
  np.testing.assert_allclose(chunked.norm_BxN, one.norm_BxN, rtol=1e-12)
  np.testing.assert_allclose(_flat_rows(chunked.grads, 2), _flat_rows(one.grads, 2), rtol=1e-12, atol=1e-15)


def test_weighted_norm_is_weight_times_unweighted_norm(fastflow):
  model, params, x = fastflow
  with jax.enable_x64(True):
    nll = G.batch_nll(model, params, x)
    w = G.loss_weights(nll, 0.7, 0.1)
    weighted = G.per_patch_param_grads(model, params, x, w).norm_BxN
    plain = G.per_patch_param_grads(model, params, x).norm_BxN
  np.testing.assert_allclose(weighted, w * plain, rtol=1e-10)


def test_patch_flow_tail_only_gives_exact_zeros_off_the_top_k():
  with jax.enable_x64(True):
    model = flows.PatchFlow(channels=C, num_steps=2, layer_norm="patch")
    params, x = _trained_like(model, key=5)
    nll = G.batch_nll(model, params, x)
    w = G.loss_weights(nll, 1.0, 0.1)
    tail = G.tail_mask(nll, 0.1)
    inp = G.input_grad_norms(model, params, x, w)
    par = G.per_patch_param_grads(model, params, x, w).norm_BxN
  assert tail.sum(1).tolist() == [2] * B                    # k = round(0.1 · 20)
  assert np.all(inp[~tail] == 0.0) and np.all(inp[tail] > 0)
  assert np.all(par[~tail] == 0.0) and np.all(par[tail] > 0)


def test_conv_flow_input_gradient_stays_inside_the_receptive_field():
  # one 3×3 coupling step: conv_in and conv_out are 3×3, so NLL_i depends on inputs
  # within Chebyshev distance 2; with λ = 1 and k = 1 gradient reaches exactly that window.
  with jax.enable_x64(True):
    model = flows.FastFlow2d(channels=C, num_steps=1, kernel_mode="3x3", layer_norm="none")
    params, _ = _trained_like(model, key=9)
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 9, 9, C), jnp.float64))
    nll = G.batch_nll(model, params, x)
    w = G.loss_weights(nll, 1.0, 1 / 81)
    inp = G.input_grad_norms(model, params, x, w).reshape(2, 9, 9)
  for b in range(2):
    ti, tj = divmod(int(np.argmax(nll[b])), 9)
    yy, xx = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    far = np.maximum(np.abs(yy - ti), np.abs(xx - tj)) > 2
    assert np.all(inp[b][far] == 0.0)
    assert np.count_nonzero(inp[b][~far]) > 1   # neighbours of the tail patch get gradient


def test_input_space_wrt_flow_input_matches_direct_grad(fastflow):
  model, params, x = fastflow
  with jax.enable_x64(True):
    w = np.random.default_rng(1).uniform(size=(B, N))
    got = G.input_grad_norms(model, params, x, w, wrt="flow_input", chunk=2)
    xn = flows.normalize_features(jnp.asarray(x), "image")
    g = jax.grad(lambda v: jnp.sum(w * losses.patch_nll(*model.apply(params, v, method="forward"))
                                   .reshape(B, N)))(xn)
  np.testing.assert_allclose(got, np.linalg.norm(np.asarray(g).reshape(B, N, C), axis=-1), rtol=1e-10)


def test_update_tail_share_is_one_for_tail_only_and_between_for_mixtures(fastflow):
  model, params, x = fastflow
  with jax.enable_x64(True):
    nll = G.batch_nll(model, params, x)
    tail = G.tail_mask(nll, 0.1)
    only = G.update_tail_share(model, params, x, G.loss_weights(nll, 1.0, 0.1), tail)
    mean = G.update_tail_share(model, params, x, G.loss_weights(nll, 0.0, 0.1), tail)
  assert only["share"] == pytest.approx(1.0) and only["cos"] == pytest.approx(1.0)
  assert mean["share"] < 1.0 and mean["norm_ratio"] < 1.0


def test_gini_matches_the_pairwise_definition():
  rng = np.random.default_rng(0)
  x = rng.exponential(size=(5, 37))
  pairwise = np.abs(x[:, :, None] - x[:, None, :]).sum((1, 2)) / (2 * 37 ** 2 * x.mean(1))
  np.testing.assert_allclose(G.gini(x), pairwise, rtol=1e-12)
  np.testing.assert_allclose(G.gini(x.T, axis=0), pairwise, rtol=1e-12)
  assert G.gini(np.full(10, 3.0)) == 0.0
  assert G.gini(np.eye(1, 10)[0]) == pytest.approx(0.9)      # (n−1)/n
  assert np.isnan(G.gini(np.zeros(4)))
  with pytest.raises(ValueError, match="non-negative"):
    G.gini(np.array([1.0, -1.0]))


def test_concentration_stats_and_infinite_ratio():
  norm = np.array([[4.0, 1.0, 1.0, 0.0], [2.0, 1.0, 3.0, 0.0]])
  tail = np.array([[True, False, False, False], [False, False, True, False]])
  s = G.concentration_stats(norm, tail)
  assert s["tail"] == pytest.approx(3.5) and s["non_tail"] == pytest.approx(5 / 6)
  assert s["ratio"] == pytest.approx(3.5 / (5 / 6))
  assert G.concentration_stats(norm * tail, tail)["ratio"] is None


def test_gradient_concentration_tail_amplification_is_n_over_k_in_parameter_space(fastflow):
  model, params, x = fastflow
  with jax.enable_x64(True):
    out = G.gradient_concentration(model, params, x, (0.7, 1.0), 0.1, num_param_images=2)
  conds = {c["tail_weight"]: c for c in out["conditions"]}
  assert list(conds) == [0.0, 0.7, 1.0] and out["k"] == 2 and out["n_images_param"] == 2
  # w_tail(λ=1)/w_tail(λ=0) = (1/k)/(1/N): per-patch parameter norms scale exactly so
  assert conds[1.0]["param"]["tail_amplification"] == pytest.approx(N / 2)
  assert conds[1.0]["param"]["ratio"] is None and conds[1.0]["update"]["share"] == pytest.approx(1.0)
  assert conds[0.0]["input"]["amplification"] == pytest.approx(1.0)
  # tail patches are ranked by NLL, identically for every λ
  assert np.asarray(out["tail_BxN"]).sum() == 2 * B


# ----------------------------------------------------------------------------
# Receptive-field windows and ghost norms against jacrev, borders and corners included
# ----------------------------------------------------------------------------

WIN_H, WIN_W, WIN_C = 6, 7, 8   # non-square: a mixed-up H/W fails


def _random_like(model, key, dtype=jnp.float64, b=2):
  """Features, "trained-like" parameters (shapes from ``eval_shape``, values from NumPy: nothing to
  compile) and signed weights (a negative w_i must give |w_i|·‖∂NLL_i/∂θ‖)."""
  rng = np.random.default_rng(key)
  x = rng.normal(size=(b, WIN_H, WIN_W, WIN_C)).astype(dtype)
  with jax.enable_x64(dtype == jnp.float64):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x[:1]))
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(dtype), shapes)
  w = rng.uniform(-1.0, 2.0, (b, WIN_H * WIN_W)).astype(dtype)
  return params, x, w


WINDOW_CASES = {
    # R = 2 < the 6×7 grid: interior patches see a whole window, border and corner ones a clipped one
    "alternate-2-image": dict(kernel_mode="alternate", num_steps=2, layer_norm="image"),
    "3x3-2-patch-affine": dict(kernel_mode="3x3", num_steps=2, layer_norm="patch", global_affine=True),  # R = 4
    "patchflow-2-none-affine": dict(kernel_mode="1x1", num_steps=2, layer_norm="none", global_affine=True),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_and_ghost_equal_jacrev_at_borders_and_corners(case):
  cfg = WINDOW_CASES[case]
  model = flows.build_flow(dict(channels=WIN_C, **cfg))
  params, x, w = _random_like(model, key=len(case))
  radius = {"alternate": (cfg["num_steps"] + 1) // 2 * 2, "3x3": 2 * cfg["num_steps"], "1x1": 0}[cfg["kernel_mode"]]
  assert G.receptive_radius(G.flow_spec(model, params)) == radius
  grads = case == "alternate-2-image"        # window's gradients themselves, not only their norms
  with jax.enable_x64(True):
    ref = G.per_patch_param_grads(model, params, x, w, method="jacrev", patch_chunk=WIN_H * WIN_W,
                                  return_grads=grads)
    got = {"ghost": G.per_patch_param_grads(model, params, x, w, method="ghost")}
    if case != "3x3-2-patch-affine":         # (compile time: window's crops are checked in the other two)
      got["window"] = win = G.per_patch_param_grads(model, params, x, w, method="window", return_grads=grads)
  assert np.all(ref.norm_BxN > 0)
  corners = [0, WIN_W - 1, (WIN_H - 1) * WIN_W, WIN_H * WIN_W - 1]
  for name, norm in ((k, v.norm_BxN) for k, v in got.items()):
    np.testing.assert_allclose(norm[:, corners], ref.norm_BxN[:, corners], rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(norm, ref.norm_BxN, rtol=1e-10, err_msg=name)
  if grads:
    np.testing.assert_allclose(_flat_rows(win.grads, 2), _flat_rows(ref.grads, 2), rtol=1e-10, atol=1e-12)


def test_ghost_float32_matches_jacrev_to_1e5():
  model = flows.build_flow(dict(channels=WIN_C, kernel_mode="alternate", num_steps=2, layer_norm="none"))
  params, x, w = _random_like(model, key=3, dtype=jnp.float32)
  ref = G.per_patch_param_grads(model, params, x, w, method="jacrev", patch_chunk=WIN_H * WIN_W).norm_BxN
  got = G.per_patch_param_grads(model, params, x, w).norm_BxN
  assert got.dtype == np.float32 and G.default_method() == "ghost"
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_auto_picks_an_exact_method_and_windowed_methods_check_the_model(fastflow, loop_reference):
  model, params, x = fastflow
  w, ref = loop_reference
  assert G.default_method(return_grads=True) == "window" and G.default_method() == "ghost"
  with jax.enable_x64(True):
    auto = G.per_patch_param_grads(model, params, x, w, return_grads=True)
    np.testing.assert_allclose(_flat_rows(auto.grads, 2), ref, rtol=1e-10, atol=1e-12)
    # a re-stated forward that drifted from the model (here: the clamp) is refused, not used
    drifted = tuple(s._replace(clamp=s.clamp + 0.5) for s in G.flow_spec(model, params))
    orig = G.flow_spec
    try:
      G.flow_spec = lambda *a: drifted
      with pytest.raises(RuntimeError, match="disagrees with the model"):
        G.per_patch_param_grads(model, params, x, w, method="window")
    finally:
      G.flow_spec = orig
  with pytest.raises(TypeError, match="FastFlow2d"):
    G.flow_spec(object(), params)


@pytest.mark.parametrize("flow", [dict(global_affine="softplus"), dict(layer_norm="image_affine")])
def test_auto_takes_the_generic_method_for_a_flow_the_windowed_methods_do_not_restate(flow):
  """anomalib's softplus global affine and LayerNorm parameters are outside what
  ``flow_spec`` re-states: "auto" runs the generic exact method there instead of raising
  (``tailjax analyze`` on such a run), and the result is still exact (= jacrev)."""
  model = flows.build_flow({"channels": WIN_C, "kernel_mode": "alternate", "num_steps": 2,
                            "layer_norm": "image", **flow})
  params, x, w = _random_like(model, key=5, dtype=jnp.float32)
  with pytest.raises(TypeError, match="unexpected parameters|outside the coupling steps"):
    G.flow_spec(model, params)
  assert G.resolve_method(model, params) == "vmap_grad"
  assert G.resolve_method(model, params, "jacrev") == "jacrev"
  got = G.per_patch_param_grads(model, params, x, w).norm_BxN
  ref = G.per_patch_param_grads(model, params, x, w, method="jacrev", patch_chunk=WIN_H * WIN_W).norm_BxN
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  h3 = G.gradient_concentration(model, params, x, [0.7], 0.1, num_param_images=1)
  assert h3["method"] == "vmap_grad"
