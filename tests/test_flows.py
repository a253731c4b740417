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


# anomalib's FastFlow choices (``configs/fastflow_anomalib.py``), all at once.
ANOMALIB = {"layer_norm": "image_affine", "global_affine": "softplus", "subnet_init": "torch_default"}


def _model(kind, c, **kw):
  if kind == "fastflow":
    return flows.FastFlow2d(channels=c, num_steps=4, global_affine=True, **kw)
  if kind == "fastflow3x3":
    return flows.FastFlow2d(channels=c, num_steps=3, kernel_mode="3x3", hidden_ratio=0.5, **kw)
  if kind == "softplus":
    return flows.FastFlow2d(channels=c, num_steps=4, global_affine="softplus", **kw)
  if kind == "torch_init":
    return flows.FastFlow2d(channels=c, num_steps=3, kernel_mode="3x3", subnet_init="torch_default", **kw)
  if kind == "anomalib":
    return flows.build_flow({"channels": c, "num_steps": 4, **ANOMALIB, **kw})
  return flows.PatchFlow(channels=c, num_steps=4, global_affine=True, **kw)


KINDS = ["fastflow", "fastflow3x3", "patch"]
# The anomalib switches; "torch_init" and "anomalib" do not start as the identity.
ANOMALIB_KINDS = ["softplus", "torch_init", "anomalib"]


@pytest.mark.parametrize("kind", KINDS + ANOMALIB_KINDS)
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


@pytest.mark.parametrize("kind", KINDS + ANOMALIB_KINDS)
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


@pytest.mark.parametrize("global_affine", [False, True, "softplus"])
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


# ----------------------------------------------------------------------------
# anomalib's FastFlow block: learned LayerNorm affine, FrEIA's softplus global affine,
# PyTorch's subnet init (each off by default)
# ----------------------------------------------------------------------------


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(la, lb)))


@pytest.mark.parametrize("base", [
    {"kernel_mode": "alternate", "layer_norm": "image"},
    {"kernel_mode": "3x3", "hidden_ratio": 0.5, "layer_norm": "none", "global_affine": True},
    {"kernel_mode": "1x1", "layer_norm": "patch", "global_affine": False},
])
def test_new_fields_at_their_defaults_are_the_flow_without_them(base):
  """subnet_init="zero" and global_affine "none"/"exp" (the names of False/True) build the
  flow built without those fields: same parameters, outputs and gradients, bit for bit."""
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 5, 7))
  plain = flows.build_flow({"channels": 7, "num_steps": 3, **base})
  named = flows.build_flow({"channels": 7, "num_steps": 3, **base, "subnet_init": "zero",
                            "global_affine": "exp" if base.get("global_affine") else "none"})
  assert named.global_affine is bool(base.get("global_affine"))   # the bool every consumer knows
  p_plain, p_named = plain.init(jax.random.key(1), x), named.init(jax.random.key(1), x)
  assert _tree_equal(p_plain, p_named)
  params = _perturbed_params(p_plain, jax.random.key(2))
  for method in ("__call__", "inverse", "nll"):
    assert _tree_equal(plain.apply(params, x, method=method), named.apply(params, x, method=method))
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x, method="nll")))(params)
  assert _tree_equal(grad(plain), grad(named))


def test_image_affine_layer_norm_starts_as_image_and_trains_its_scale_and_bias():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
  image = flows.FastFlow2d(channels=6, num_steps=2, layer_norm="image")
  affine = flows.FastFlow2d(channels=6, num_steps=2, layer_norm="image_affine")
  p_image, p_affine = image.init(jax.random.key(1), x), affine.init(jax.random.key(1), x)
  ln = p_affine["params"]["layer_norm"]
  assert ln["scale"].shape == ln["bias"].shape == (3, 4, 6)      # [H, W, C] of the init input
  np.testing.assert_array_equal(ln["scale"], np.ones((3, 4, 6)))
  np.testing.assert_array_equal(ln["bias"], np.zeros((3, 4, 6)))
  # The coupling steps draw the same parameters; with γ = 1, β = 0 the outputs are
  # bit-identical to "image" (u · 1 + 0 is exact), also for a flow far from the identity.
  steps = _perturbed_params(p_image, jax.random.key(2))
  both = {"params": {**steps["params"], "layer_norm": ln}}
  for method in ("__call__", "nll"):
    assert _tree_equal(image.apply(steps, x, method=method), affine.apply(both, x, method=method))
  # The affine is outside the log-det: __call__ is forward of the affinely normalised input.
  gamma = 1.0 + 0.3 * jax.random.normal(jax.random.key(3), (3, 4, 6))
  beta = 0.2 * jax.random.normal(jax.random.key(4), (3, 4, 6))
  learned = {"params": {**steps["params"], "layer_norm": {"scale": gamma, "bias": beta}}}
  u = flows.normalize_features(x, "image") * gamma[None] + beta[None]
  z, ld = affine.apply(learned, x)
  z_ref, ld_ref = image.apply(steps, u, method="forward")
  np.testing.assert_allclose(z, z_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ld, ld_ref, rtol=1e-6, atol=1e-6)
  # γ and β get non-zero gradients from the NLL (every element).
  g = jax.grad(lambda p: jnp.sum(affine.apply(p, x, method="nll")))(learned)["params"]["layer_norm"]
  assert float(jnp.min(jnp.abs(g["scale"]))) > 0.0 and float(jnp.min(jnp.abs(g["bias"]))) > 0.0


def test_image_affine_per_scale_and_trained_by_the_engine():
  """Each scale of a MultiScaleFlow has its own [H_s, W_s, C_s] scale and bias, and the
  training program moves them (they are in the parameter tree it optimises)."""
  import ml_collections
  from tailjax import train
  xs = (jax.random.normal(jax.random.key(0), (2, 4, 4, 6)), jax.random.normal(jax.random.key(1), (2, 2, 2, 4)))
  model = flows.build_multiscale_flow({"num_steps": 2, **ANOMALIB}, (6, 4))
  params = model.init(jax.random.key(2), xs)["params"]
  assert params["scale_0"]["layer_norm"]["scale"].shape == (4, 4, 6)
  assert params["scale_1"]["layer_norm"]["bias"].shape == (2, 2, 4)
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 2, "kernel_mode": "alternate", **ANOMALIB}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 0.0}
  c.train = {"num_steps": 3, "batch_size": 4}
  feats = np.random.default_rng(0).normal(size=(8, 4, 4, 6)).astype(np.float32)
  train_fn = train.make_train(c, feats.shape, conv_impl="xla")
  hp = {"tail_weight": jnp.asarray(0.0), "top_k_ratio": jnp.asarray(0.1), "learning_rate": jnp.asarray(1e-2)}
  state, _ = jax.jit(train_fn)(hp, train.row_keys([0])[0], jnp.asarray(feats))
  ln = state.params["params"]["layer_norm"]
  assert float(jnp.min(jnp.abs(ln["scale"] - 1.0))) > 0.0 and float(jnp.min(jnp.abs(ln["bias"]))) > 0.0


def test_kernel_order_is_anomalibs():
  """anomalib's create_fast_flow_block: kernel 1 if i % 2 == 1 (and not conv3x3_only) else 3."""
  for n in range(1, 10):
    assert flows.step_kernel_sizes(n, "alternate") == [1 if i % 2 == 1 else 3 for i in range(n)]
    assert flows.step_kernel_sizes(n, "3x3") == [3] * n


def test_softplus_global_affine_is_freias():
  # FrEIA: γ = 0.1 · Softplus(beta=0.5)(g) = 0.1 · 2 · log(1 + exp(g / 2)),
  # g initialised to 2 · log(exp(0.5 · 10 · 1) − 1) so that γ = 1.
  g = np.linspace(-30.0, 50.0, 81)
  ref = 0.1 * (1 / 0.5) * np.log1p(np.exp(0.5 * g))
  np.testing.assert_allclose(flows.freia_softplus_scale(jnp.asarray(g, jnp.float32)), ref, rtol=1e-5)
  g0 = 2.0 * np.log(np.exp(0.5 * 10.0 * 1.0) - 1.0)
  assert abs(flows.FREIA_SOFTPLUS_INIT - g0) < 1e-12
  # One step with a zero subnet is the global affine alone, in the step's channel order:
  # z_c = x_c · γ_{P⁻¹(c)} + β_{P⁻¹(c)}, logdet_i = Σ_c log γ_c (FrEIA: n_pixels · Σ log γ
  # per image).
  model = flows.FastFlow2d(channels=5, num_steps=1, global_affine="softplus")
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 5))
  params = model.init(jax.random.key(1), x)
  step = params["params"]["step_0"]
  assert set(step) == {"conv_in", "conv_out", "global_scale", "global_offset"}
  np.testing.assert_array_equal(step["global_scale"], np.full(5, np.float32(g0)))
  z0, ld0 = model.apply(params, x, method="forward")
  np.testing.assert_allclose(z0, x, rtol=1e-6, atol=1e-6)           # γ = 1 to float rounding
  np.testing.assert_allclose(ld0, 0.0, atol=1e-5)
  g_C = np.array([-3.0, 0.5, 4.0, 9.99, 30.0])
  b_C = np.array([0.1, -0.2, 0.3, 0.0, 1.0])
  step = {**step, "global_scale": jnp.asarray(g_C, jnp.float32), "global_offset": jnp.asarray(b_C, jnp.float32)}
  z, ld = model.apply({"params": {"step_0": step}}, x, method="forward")
  inv = np.argsort(model.bind(params).steps[0].permutation)
  gamma = 0.2 * np.log1p(np.exp(0.5 * g_C))
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(z, xs * gamma[inv] + b_C[inv], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ld, np.full((2, 3, 3), np.log(gamma).sum()), rtol=1e-5)


def test_torch_default_subnet_init():
  """PyTorch's nn.Conv2d init for both subnet convs: U(±1/√fan_in) weights and biases,
  fan_in = k·k·C_in; the new flow is not the identity (anomalib's)."""
  model = flows.FastFlow2d(channels=40, num_steps=2, subnet_init="torch_default", hidden_ratio=1.5)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 40))
  params = model.init(jax.random.key(1), x)["params"]
  for i, k in enumerate((3, 1)):
    for conv, c_in in (("conv_in", 20), ("conv_out", 30)):
      w, b = params[f"step_{i}"][conv]["kernel"], params[f"step_{i}"][conv]["bias"]
      bound = 1.0 / np.sqrt(k * k * c_in)
      assert w.shape[:3] == (k, k, c_in)
      assert float(jnp.max(jnp.abs(w))) <= bound and float(jnp.max(jnp.abs(b))) <= bound
      # uniform on ±bound: the largest draw is near the bound, the variance bound²/3
      assert float(jnp.max(jnp.abs(w))) > 0.9 * bound
      np.testing.assert_allclose(float(jnp.var(w)), bound ** 2 / 3, rtol=0.25)
  z, ld = model.apply({"params": params}, x, method="forward")
  assert float(jnp.max(jnp.abs(z - x))) > 1e-3 and float(jnp.max(jnp.abs(ld))) > 1e-4


def test_anomalib_options_raise_named_errors():
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="global_affine"):
    flows.build_flow({"channels": 4, "global_affine": "tanh"})
  with pytest.raises(ValueError, match="subnet_init"):
    flows.build_flow({"channels": 4, "subnet_init": "xavier"})
  with pytest.raises(ValueError, match="subnet_init"):
    flows.FastFlow2d(channels=4, subnet_init="xavier").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="couple patches"):
    flows.PatchFlow(channels=4, layer_norm="image_affine").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="image_affine.*learned scale and bias"):
    flows.normalize_features(x, "image_affine")
  model = flows.FastFlow2d(channels=4, num_steps=1, layer_norm="image_affine")
  params = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"flow.layer_norm='image_affine' learned .*\(2, 2, 4\)"):
    model.apply(params, jnp.zeros((1, 3, 2, 4)))
