"""torchvision ResNet-18 / Wide-ResNet-50-2 in Flax, on random torchvision-named weights.

The reference is an independent NumPy float64 forward pass written from
torchvision's definition and driven by the torch tensor names alone, so a
wrong name, layout, stride, padding or BatchNorm convention shows up as a
numerical mismatch. Where torch and torchvision are installed, the last test
compares with torchvision itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailjax.backbones import resnet as rn
from test_torch_pickle import tensor, write_zip_checkpoint

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
# Every bottleneck code path (stride-1 downsample in layer1, plain blocks,
# stride-2 downsamples, width = planes * 128 / 64) at a few thousand parameters.
MINI_WIDE = rn.ResNetSpec("bottleneck", (2, 1, 1, 2), width_per_group=128, planes=(8, 16, 32, 64))


# --------------------------------------------------------------------------- NumPy reference

def _conv(x_BxHxWxC, w_OxIxKxK, stride, pad):
  k = w_OxIxKxK.shape[-1]
  xp = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
  taps = [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
          for i in range(k) for j in range(k)]
  cols = np.stack(taps, axis=3).reshape(*xp.shape[:1], oh, ow, -1)  # (tap, channel) order
  return cols @ w_OxIxKxK.transpose(2, 3, 1, 0).reshape(-1, w_OxIxKxK.shape[0])


def _bn(sd, name, x):
  return ((x - sd[f"{name}.running_mean"]) / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
          * sd[f"{name}.weight"] + sd[f"{name}.bias"])


def _maxpool_3x3_s2_p1(x):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  oh, ow = (xp.shape[1] - 3) // 2 + 1, (xp.shape[2] - 3) // 2 + 1
  return np.max([xp[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def reference_resnet(state_dict, images_BxHxWx3) -> dict:
  """torchvision's ResNet.forward in float64 NumPy, reading only ``state_dict``'s names."""
  sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  bottleneck = "layer1.0.conv3.weight" in sd
  x = (np.asarray(images_BxHxWx3, np.float64) - IMAGENET_MEAN) / IMAGENET_STD
  x = relu(_bn(sd, "bn1", _conv(x, sd["conv1.weight"], 2, 3)))
  out = {2: x}
  x = _maxpool_3x3_s2_p1(x)
  for layer in range(1, 5):
    i = 0
    while f"layer{layer}.{i}.conv1.weight" in sd:
      t, s = f"layer{layer}.{i}", 2 if layer > 1 and i == 0 else 1
      if bottleneck:
        h = relu(_bn(sd, f"{t}.bn1", _conv(x, sd[f"{t}.conv1.weight"], 1, 0)))
        h = relu(_bn(sd, f"{t}.bn2", _conv(h, sd[f"{t}.conv2.weight"], s, 1)))
        h = _bn(sd, f"{t}.bn3", _conv(h, sd[f"{t}.conv3.weight"], 1, 0))
      else:
        h = relu(_bn(sd, f"{t}.bn1", _conv(x, sd[f"{t}.conv1.weight"], s, 1)))
        h = _bn(sd, f"{t}.bn2", _conv(h, sd[f"{t}.conv2.weight"], 1, 1))
      shortcut = x
      if f"{t}.downsample.0.weight" in sd:
        shortcut = _bn(sd, f"{t}.downsample.1", _conv(x, sd[f"{t}.downsample.0.weight"], s, 0))
      x = relu(h + shortcut)
      i += 1
    out[2 ** (layer + 1)] = x
  out["pooled"] = x.mean(axis=(1, 2))
  out["logits"] = out["pooled"] @ sd["fc.weight"].T + sd["fc.bias"]
  return out


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def images():
  # Odd, non-square: exercises PyTorch's floor rounding at every stride-2 layer.
  return np.random.default_rng(0).uniform(size=(2, 61, 53, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def r18_state():
  return rn.random_torchvision_state_dict("resnet18", seed=0)


@pytest.fixture(scope="module")
def r18(r18_state):
  return rn.ResNetFeatures(rn.resnet_variables_from_torch(r18_state, "resnet18"), "resnet18")


@pytest.fixture(scope="module")
def r18_out(r18, images):
  return {k: np.asarray(v) for k, v in r18(images).items()}


@pytest.fixture(scope="module")
def mini_state():
  return rn.random_torchvision_state_dict(MINI_WIDE, seed=1)


@pytest.fixture(scope="module")
def mini(mini_state):
  return rn.ResNetFeatures(rn.resnet_variables_from_torch(mini_state, MINI_WIDE), MINI_WIDE)


# --------------------------------------------------------------------------- architecture

def _param_count(params) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


@pytest.mark.parametrize("arch, channels, n_params", [
    ("resnet18", (64, 64, 128, 256, 512), 11_689_512),           # torchvision's documented counts
    ("wide_resnet50_2", (64, 256, 512, 1024, 2048), 68_883_240),
])
def test_documented_shapes_and_parameter_counts_at_224(arch, channels, n_params):
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, variables = jax.eval_shape(rn.ResNet(arch).init_with_output, jax.random.key(0), x)
  for stride, c in zip((2, 4, 8, 16, 32), channels):
    assert out[stride].shape == (2, 224 // stride, 224 // stride, c)
  assert out["logits"].shape == (2, 1000) and out["pooled"].shape == (2, channels[-1])
  assert rn.feature_channels(arch) == dict(zip((2, 4, 8, 16, 32), channels))
  assert _param_count(variables["params"]) == n_params


def test_wide_resnet50_2_consumes_exactly_torchvisions_tensors():
  # Shape-only arrays (zero-stride views): no 69M random draws, same names and shapes.
  state = {}
  for conv, bn, out, inp, k in rn._torchvision_convs("wide_resnet50_2"):
    state[f"{conv}.weight"] = np.broadcast_to(np.float32(0), (out, inp, k, k))
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      state[f"{bn}.{leaf}"] = np.broadcast_to(np.float32(1), (out,))
    state[f"{bn}.num_batches_tracked"] = np.array(0, np.int64)
  state["fc.weight"] = np.broadcast_to(np.float32(0), (1000, 2048))
  state["fc.bias"] = np.broadcast_to(np.float32(0), (1000,))
  assert len(state) == 320  # len(torchvision.models.wide_resnet50_2().state_dict())
  assert state["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)  # width 2 x 64
  assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
  variables = rn.resnet_variables_from_torch(state, "wide_resnet50_2")
  assert variables["params"]["layer3_0"]["conv2"]["conv"]["kernel"].shape == (3, 3, 512, 512)


def test_random_state_dict_has_torchvisions_names_and_shapes(r18_state):
  assert len(r18_state) == 122  # len(torchvision.models.resnet18().state_dict())
  assert r18_state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  assert r18_state["layer4.1.bn2.running_var"].shape == (512,)
  assert r18_state["bn1.num_batches_tracked"].dtype == np.int64
  assert "layer1.0.downsample.0.weight" not in r18_state  # 64 -> 64 at stride 1: identity
  assert all(v.dtype == np.float32 for k, v in r18_state.items()
             if not k.endswith("num_batches_tracked"))


# --------------------------------------------------------------------------- numerics

def test_resnet18_matches_the_numpy_reference(r18_state, r18_out, images):
  ref = reference_resnet(r18_state, images)
  assert set(r18_out) == set(ref)
  for name, want in ref.items():
    assert r18_out[name].shape == want.shape, name
    np.testing.assert_allclose(r18_out[name], want, rtol=1e-4, atol=1e-4, err_msg=str(name))
  assert r18_out[32].shape == (2, 2, 2, 512)  # 61x53 -> 31x27 -> 16x14 -> 8x7 -> 4x4 -> 2x2


def test_bottleneck_blocks_match_the_numpy_reference(mini, mini_state, images):
  out = mini(images)
  ref = reference_resnet(mini_state, images)
  for name, want in ref.items():
    np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=1e-4, err_msg=str(name))
  assert out[4].shape == (2, 16, 14, 32) and out[32].shape == (2, 2, 2, 256)


def test_outputs_do_not_depend_on_batch_order_or_batchmates(r18, r18_out, images):
  reversed_out = r18(images[::-1])
  for name, want in r18_out.items():
    np.testing.assert_allclose(reversed_out[name], want[::-1], rtol=1e-5, atol=1e-5)
  # Inference BatchNorm: a different batchmate must not change image 0's outputs.
  noise = np.random.default_rng(5).uniform(size=images.shape[1:]).astype(np.float32)
  mixed = r18(np.stack([images[0], noise]))
  np.testing.assert_allclose(mixed["logits"][0], r18_out["logits"][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[8][0], r18_out[8][0], rtol=1e-5, atol=1e-5)


def test_extract_batches_and_replicates_grayscale(mini, images):
  gray_Nx61x53 = np.random.default_rng(6).integers(0, 256, (3, *images.shape[1:3]), np.uint8)
  feats = mini.extract(gray_Nx61x53, layers=(8, "pooled"), batch_size=2, resize_to=None,
                       progress=False)
  assert feats[8].shape == (3, 8, 7, 64) and feats["pooled"].shape == (3, 256)
  rgb = np.repeat(gray_Nx61x53[..., None], 3, -1).astype(np.float32) / 255
  # Batches of two, as extract ran them (the last one padded): same compiled shape as `images`.
  direct = [mini(rgb[:2]), mini(np.stack([rgb[2], rgb[2]]))]
  for layer in (8, "pooled"):
    want = np.concatenate([direct[0][layer], direct[1][layer][:1]])
    np.testing.assert_allclose(feats[layer], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- weight files

def test_zip_checkpoint_loads_like_the_state_dict(tmp_path, r18_state, r18):
  path = write_zip_checkpoint(tmp_path / "resnet18-test.pth",
                              {k: tensor(v) for k, v in r18_state.items()})
  loaded = rn.resnet18(path)
  assert isinstance(loaded, rn.ResNetFeatures) and loaded.channels[8] == 128
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, r18.variables)


def test_bad_weights_name_the_file_and_the_tensor(tmp_path, r18_state):
  missing = {k: v for k, v in r18_state.items() if k != "layer2.0.downsample.1.running_var"}
  with pytest.raises(ValueError, match=r"my\.pth: missing tensor "
                                       r"'layer2\.0\.downsample\.1\.running_var'"):
    rn.resnet_variables_from_torch(missing, "resnet18", source="my.pth")
  bad = dict(r18_state, **{"fc.bias": np.zeros(10, np.float32)})
  with pytest.raises(ValueError, match=r"my\.pth: tensor 'fc\.bias' has shape \(10,\), "
                                       r"resnet18 needs \(1000,\)"):
    rn.resnet_variables_from_torch(bad, "resnet18", source="my.pth")
  extra = dict(r18_state, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"my\.pth: 1 tensors that resnet18 does not have, e\.g\. "
                                       r"\['layer5\.0\.conv1\.weight'\]"):
    rn.resnet_variables_from_torch(extra, "resnet18", source="my.pth")

  # Through the public loaders: a file holding the other architecture.
  path = write_zip_checkpoint(tmp_path / "r18.pth", {k: tensor(v) for k, v in missing.items()})
  with pytest.raises(ValueError, match=r"r18\.pth: missing tensor 'layer2\.0\.downsample\.1"):
    rn.resnet18(path)
  with pytest.raises(ValueError, match=r"r18\.pth: tensor 'layer1\.0\.conv1\.weight' has shape "
                                       r"\(64, 64, 3, 3\), wide_resnet50_2 needs "
                                       r"\(128, 64, 1, 1\)"):
    rn.wide_resnet50_2(path)
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    rn.resnet18(tmp_path / "nowhere.pth")


# --------------------------------------------------------------- against torchvision (optional)

def _torchvision_features(torch, model, images_BxHxWx3):
  x = torch.from_numpy(((images_BxHxWx3 - IMAGENET_MEAN) / IMAGENET_STD)
                       .astype(np.float32).transpose(0, 3, 1, 2))
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    f8 = model.layer2(model.layer1(x))
    logits = model.fc(torch.flatten(model.avgpool(model.layer4(model.layer3(f8))), 1))
  return f8.numpy().transpose(0, 2, 3, 1), logits.numpy()


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_matches_torchvision(arch, r18, r18_state, r18_out, images, tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  if arch == "resnet18":
    state, ours, x = r18_state, r18_out, images
  else:  # 69M parameters: one small image keeps this affordable
    state, x = rn.random_torchvision_state_dict(arch, seed=3), images[:1, :40, :40]
    ours = rn.ResNetFeatures(rn.resnet_variables_from_torch(state, arch), arch)(x)
  model = getattr(torchvision.models, arch)(weights=None).eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                        strict=True)
  if arch == "resnet18":  # torchvision's own state_dict, saved by torch, read back by us
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    jax.tree.map(np.testing.assert_array_equal, rn.resnet18(tmp_path / "tv.pth").variables,
                 r18.variables)
  f8, logits = _torchvision_features(torch, model, x)
  diff = max(float(np.abs(np.asarray(ours["logits"]) - logits).max()),
             float(np.abs(np.asarray(ours[8]) - f8).max()))
  print(f"{arch}: max |ours - torchvision| over logits and stride-8 features = {diff:.2e}")
  np.testing.assert_allclose(ours["logits"], logits, rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours[8], f8, rtol=0, atol=1e-4)
