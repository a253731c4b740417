import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailjax import flows


def _perturbed_params(params, key, scale=0.3):
  """Random non-zero weights everywhere (the zero-initialised last layers included),
  so the tests exercise a flow that is far from the identity."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def _model(kind, c, **kw):
  if kind == "fastflow":
    return flows.FastFlow2d(channels=c, num_steps=4, global_affine=True, **kw)
  if kind == "fastflow3x3":
    return flows.FastFlow2d(channels=c, num_steps=3, kernel_mode="3x3", hidden_ratio=0.5, **kw)
  return flows.PatchFlow(channels=c, num_steps=4, global_affine=True, **kw)


KINDS = ["fastflow", "fastflow3x3", "patch"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 5, 7), (3, 2, 6, 2)])
def test_inverse_of_forward_is_identity(kind, shape):
  model = _model(kind, shape[-1])
  x = 2.0 * jax.random.normal(jax.random.key(0), shape)
  params = _perturbed_params(model.init(jax.random.key(1), x), jax.random.key(2))
  z, ld_fwd = model.apply(params, x, method="forward")
  x_rec, ld_inv = model.apply(params, z, method="inverse")
  assert ld_fwd.shape == shape[:3]
  assert float(jnp.max(jnp.abs(z - x))) > 1e-2  # the flow is not the identity here
  np.testing.assert_allclose(x_rec, x, atol=1e-4)
  np.testing.assert_allclose(ld_fwd, -ld_inv, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_logdet_equals_slogdet_of_jacobian(kind):
  shape = (1, 2, 3, 4)  # 24 numbers: the full Jacobian is 24×24
  model = _model(kind, shape[-1])
  x = jax.random.normal(jax.random.key(3), shape)
  params = _perturbed_params(model.init(jax.random.key(4), x), jax.random.key(5), scale=0.5)

  def flat_forward(v):
    z, _ = model.apply(params, v.reshape(shape), method="forward")
    return z.reshape(-1)

  jac = jax.jacfwd(flat_forward)(x.reshape(-1))
  sign, brute = np.linalg.slogdet(np.asarray(jac, np.float64))
  _, ld = model.apply(params, x, method="forward")
  assert sign > 0
  np.testing.assert_allclose(float(jnp.sum(ld)), brute, atol=1e-4)


def test_patch_flow_keeps_patches_independent():
  shape = (1, 2, 3, 4)
  model = _model("patch", 4)
  x = jax.random.normal(jax.random.key(6), shape)
  params = _perturbed_params(model.init(jax.random.key(7), x), jax.random.key(8))
  jac = jax.jacfwd(lambda v: model.apply(params, v.reshape(shape), method="forward")[0].reshape(6, 4))(
      x.reshape(6, 4))  # [6 patches, 4, 6 patches, 4]
  off_diagonal = jac * (1.0 - jnp.eye(6))[:, None, :, None]
  assert float(jnp.max(jnp.abs(off_diagonal))) == 0.0
  # whereas the 3×3 flow mixes neighbouring patches
  model3 = _model("fastflow3x3", 4)
  params3 = _perturbed_params(model3.init(jax.random.key(7), x), jax.random.key(8))
  jac3 = jax.jacfwd(lambda v: model3.apply(params3, v.reshape(shape), method="forward")[0].reshape(6, 4))(
      x.reshape(6, 4))
  assert float(jnp.max(jnp.abs(jac3 * (1.0 - jnp.eye(6))[:, None, :, None]))) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_standard_normal_nll(kind):
  shape = (2, 3, 3, 6)
  model = _model(kind, shape[-1])
  x = jax.random.normal(jax.random.key(9), shape)
  params = model.init(jax.random.key(10), x)
  z, ld = model.apply(params, x, method="forward")
  np.testing.assert_array_equal(z, x)
  np.testing.assert_array_equal(ld, jnp.zeros(shape[:3]))
  nll = model.apply(params, x, method="nll")
  xs = np.asarray(x, np.float64)
  analytic = 0.5 * (xs ** 2).sum(-1) + 0.5 * shape[-1] * np.log(2 * np.pi)
  np.testing.assert_allclose(nll, analytic, rtol=1e-6)
  # and equal to scipy's multivariate normal
  from scipy import stats
  ref = -stats.multivariate_normal(np.zeros(6), np.eye(6)).logpdf(xs.reshape(-1, 6)).reshape(shape[:3])
  np.testing.assert_allclose(nll, ref, rtol=1e-5)


def test_subnet_kernels_follow_fastflow_schedule():
  model = flows.FastFlow2d(channels=4, num_steps=4)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)))["params"]
  sizes = [params[f"step_{i}"]["conv_in"]["kernel"].shape[0] for i in range(4)]
  assert sizes == [3, 1, 3, 1]
  assert flows.step_kernel_sizes(3, "3x3") == [3, 3, 3]
  # last subnet layer zero-initialised, permutations are not parameters
  assert all(float(jnp.abs(params[f"step_{i}"]["conv_out"]["kernel"]).max()) == 0.0 for i in range(4))
  assert not any("perm" in "/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(params))


def test_soft_clamp_bounds_the_log_scale():
  # With huge subnet weights the per-step log-scale stays within ±clamp per channel.
  model = flows.PatchFlow(channels=4, num_steps=1, clamp=2.0)
  x = 10.0 * jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
  params = _perturbed_params(model.init(jax.random.key(0), x), jax.random.key(2), scale=100.0)
  _, ld = model.apply(params, x, method="forward")
  assert float(jnp.max(jnp.abs(ld))) <= 2.0 * 2 + 1e-4  # 2 transformed channels × clamp


def test_layer_norm_modes():
  x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  img = flows.normalize_features(x, "image")
  np.testing.assert_allclose(jnp.mean(img, axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(img, axis=(1, 2, 3)), 1.0, atol=1e-3)
  patch = flows.normalize_features(x, "patch")
  np.testing.assert_allclose(jnp.mean(patch, axis=-1), 0.0, atol=1e-5)
  model = flows.FastFlow2d(channels=4, num_steps=2, layer_norm="image")
  params = model.init(jax.random.key(0), x)
  z, _ = model.apply(params, x)  # __call__ normalises first
  np.testing.assert_allclose(z, img, atol=1e-6)


def test_bad_configs_raise_named_errors():
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="kernel_mode"):
    flows.FastFlow2d(channels=4, kernel_mode="5x5").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="layer_norm"):
    flows.FastFlow2d(channels=4, layer_norm="batch").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="couple patches"):
    flows.PatchFlow(channels=4, layer_norm="image").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\[B, H, W, 4\]"):
    model = flows.FastFlow2d(channels=4, num_steps=1)
    model.apply(model.init(jax.random.key(0), x), jnp.zeros((1, 2, 2, 3)), method="forward")
  assert isinstance(flows.build_flow({"channels": 4, "kernel_mode": "1x1"}), flows.PatchFlow)


def test_permute_channels_is_the_gather_in_both_ad_modes():
  rng = np.random.default_rng(0)
  perm = rng.permutation(7)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 7)).astype(np.float32))
  np.testing.assert_array_equal(flows.permute_channels(x, perm), x[..., perm])
  t = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  _, jvp = jax.jvp(lambda v: flows.permute_channels(v, perm), (x,), (t,))
  np.testing.assert_array_equal(jvp, t[..., perm])
  w = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  g = jax.grad(lambda v: jnp.sum(jnp.sin(flows.permute_channels(v, perm)) * w))(x)
  np.testing.assert_allclose(g, jax.grad(lambda v: jnp.sum(jnp.sin(v[..., perm]) * w))(x), rtol=1e-6)


@pytest.mark.parametrize("global_affine", [False, True])
def test_composed_permutations_equal_step_by_step(global_affine):
  """FastFlow2d composes one step's un-permute with the next one's permute: same bijection."""
  model = flows.FastFlow2d(channels=9, num_steps=3, global_affine=global_affine)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 9)).astype(np.float32))
  params = model.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)),
                        params)

  def step_by_step(p, v):
    ld = 0.0
    for i in range(3):
      v, l = model.apply(p, v, method=lambda m, u, i=i: m.steps[i].forward(u))
      ld = ld + l
    return v, ld

  z, ld = model.apply(params, x, method="forward")
  z_ref, ld_ref = step_by_step(params, x)
  np.testing.assert_allclose(z, z_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ld, ld_ref, rtol=1e-6, atol=1e-6)
  back, ld_inv = model.apply(params, z, method="inverse")
  np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ld_inv, -ld, rtol=1e-5, atol=1e-5)
