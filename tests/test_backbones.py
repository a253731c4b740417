"""EfficientNet-Lite0 port and the restricted legacy-pickle reader."""

from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from tailjax.backbones import efficientnet_lite as enl
from tailjax.backbones import torch_pickle as tp

WEIGHTS = enl.default_weights_path()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  # A private cache keeps the test run from writing into the user's ~/.cache.
  return enl.efficientnet_lite0(cache_dir=tmp_path_factory.mktemp("weights"))


def _photo_224(img: np.ndarray) -> np.ndarray:
  """Square centre crop, bilinear antialiased resize to 224, RGB float in [0, 1]."""
  h, w = img.shape[:2]
  s = min(h, w)
  crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  x = jax.image.resize(crop.astype(np.float32) / 255.0, (224, 224, 3), "linear", antialias=True)
  return np.clip(np.asarray(x), 0.0, 1.0)


@pytest.fixture(scope="module")
def photo_outputs(model):
  images = np.stack([_photo_224(skimage.data.chelsea()), _photo_224(skimage.data.coffee())])
  return images, model(images)


# --------------------------------------------------------------------------- pretrained weights

def test_chelsea_is_a_cat_and_coffee_is_espresso(photo_outputs):
  _, out = photo_outputs
  probs = np.asarray(jax.nn.softmax(out["logits"], axis=-1))
  assert 281 <= probs[0].argmax() <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
  assert probs[1].argmax() == 967  # espresso
  # Both photos are easy: a port with a wrong layout/padding gives diffuse outputs.
  assert probs[0, 281:286].sum() > 0.5 and probs[1, 967] > 0.5


def test_outputs_have_documented_strides_and_channels(photo_outputs):
  _, out = photo_outputs
  assert out["logits"].shape == (2, 1000) and out["pooled"].shape == (2, 1280)
  for stride, channels in {4: 24, 8: 40, 16: 112, 32: 320}.items():
    assert out[stride].shape == (2, 224 // stride, 224 // stride, channels)
  # ReLU6 bounds the pooled head activation; project-conv outputs are unbounded.
  assert 0.0 <= float(out["pooled"].min()) and float(out["pooled"].max()) <= 6.0
  assert float(out[16].min()) < 0.0


def test_outputs_are_a_pytree_with_int_and_str_keys(photo_outputs):
  _, out = photo_outputs
  doubled = jax.tree.map(lambda a: 2 * a, out)
  assert isinstance(doubled, enl.Outputs) and set(doubled) == set(out)
  np.testing.assert_allclose(doubled[16], 2 * np.asarray(out[16]))


def test_default_normalisation_matches_the_stem_batchnorm_statistics(model, photo_outputs):
  images, _ = photo_outputs
  fit = {name: enl.stem_statistics_fit(model.variables, images, name)
         for name in enl.NORMALIZATIONS}
  best = fit[enl.DEFAULT_NORMALIZATION]
  other = fit["imagenet"]
  assert best["mean_corr"] > other["mean_corr"]
  assert abs(np.log(best["median_var_ratio"])) < abs(np.log(other["median_var_ratio"]))


def test_extract_batches_resizes_and_replicates_grayscale(model, photo_outputs):
  images_224, out = photo_outputs
  rng = np.random.default_rng(0)
  gray_Nx64x80 = rng.integers(0, 256, (3, 64, 80), np.uint8)
  feats = model.extract(gray_Nx64x80, layers=(8, 16), batch_size=2, progress=False)
  assert feats[8].shape == (3, 28, 28, 40) and feats[16].shape == (3, 14, 14, 112)
  assert feats[16].dtype == np.float32

  resized = jax.image.resize(np.repeat(gray_Nx64x80[..., None], 3, -1) / 255.0,
                             (3, 224, 224, 3), "linear", antialias=True)
  ref_a = model(resized[:2])[16]
  # Image 2 sits alone in a zero-padded batch; its features must not depend on that.
  ref_b = model(jnp.stack([resized[2], images_224[0]]))[16]
  np.testing.assert_allclose(feats[16][:2], ref_a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats[16][2], ref_b[0], rtol=1e-4, atol=1e-4)


def test_extract_rejects_out_of_range_floats_and_unknown_layers(model):
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    model.extract(np.full((2, 32, 32, 3), 255.0, np.float32), batch_size=2, progress=False)
  with pytest.raises(ValueError, match="layers"):
    model.extract(np.zeros((1, 32, 32, 3), np.uint8), layers=(64,), progress=False)


# --------------------------------------------------------------------------- architecture pieces

@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, (0, 1)), (112, 5, 2, (1, 2)), (14, 5, 1, (2, 2)), (7, 3, 2, (1, 1)),
])
def test_tf_same_padding_puts_the_odd_pixel_after(size, kernel, stride, expected):
  assert enl.tf_same_padding(size, kernel, stride) == expected


def test_tf_same_padding_gives_ceil_output_size():
  for size in range(1, 40):
    for kernel in (1, 3, 5):
      for stride in (1, 2):
        lo, hi = enl.tf_same_padding(size, kernel, stride)
        assert (size + lo + hi - kernel) // stride + 1 == -(-size // stride)
        assert 0 <= hi - lo <= 1


@pytest.mark.parametrize("kernel, stride, hw", [(3, 1, (9, 7)), (5, 2, (10, 11)), (3, 2, (8, 8))])
def test_depthwise_shift_sum_equals_grouped_conv(kernel, stride, hw):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = rng.normal(size=(2, *hw, 6)).astype(np.float32)
  variables = {"params": {"kernel": rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32)}}
  conv = enl._DepthwiseConv(kernel, stride, impl="conv")
  shifts = enl._DepthwiseConv(kernel, stride, impl="shifts")
  # jit: op-by-op execution of the k*k slices would dominate the test's runtime.
  np.testing.assert_allclose(jax.jit(shifts.apply)(variables, x),
                             jax.jit(conv.apply)(variables, x), rtol=1e-5, atol=1e-5)


def test_weight_conversion_names_missing_and_misshaped_tensors():
  state = tp.load_legacy_torch_pickle(WEIGHTS)
  missing = {k: v for k, v in state.items() if k != "_blocks.3._depthwise_conv.weight"}
  with pytest.raises(ValueError, match=r"my\.pth.*_blocks\.3\._depthwise_conv\.weight"):
    enl.variables_from_torch(missing, source="my.pth")
  bad = dict(state, **{"_fc.bias": np.zeros(10, np.float32)})
  with pytest.raises(ValueError, match=r"my\.pth: tensor '_fc\.bias'.*\(10,\).*\(1000,\)"):
    enl.variables_from_torch(bad, source="my.pth")


# --------------------------------------------------------------------------- legacy pickle reader

def test_reads_all_shipped_tensors_with_their_layouts():
  state = tp.load_legacy_torch_pickle(WEIGHTS)
  assert len(state) == 296
  assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_bn0.num_batches_tracked"].dtype == np.int64
  assert all(np.isfinite(v).all() for v in state.values())
  assert (state["_bn1.running_var"] > 0).all()


class _Payload:
  """Pickles to a call of os.system: what a malicious checkpoint would contain."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["state_dict", "header"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, where):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  parts = [tp._LEGACY_MAGIC_NUMBER, tp._LEGACY_PROTOCOL_VERSION, {"little_endian": True},
           {"w": _Payload(marker)}, []]
  if where == "header":
    parts[0], parts[3] = _Payload(marker), {}
  path.write_bytes(b"".join(pickle.dumps(p, protocol=2) for p in parts))
  with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth.*refused.*(posix|os)\.system"):
    tp.load_legacy_torch_pickle(path)
  assert not marker.exists()


def _write_fake_legacy(path, monkeypatch, storages, tensors):
  """Writes a legacy torch.save file with stand-in torch globals (torch is not installed).

  storages: {key: np.ndarray 1-D}; tensors: {name: (key, offset, shape, stride)}.
  """
  fake_torch = types.ModuleType("torch")
  fake_utils = types.ModuleType("torch._utils")
  fake_torch._utils = fake_utils
  kinds = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}
  for name in kinds.values():
    setattr(fake_torch, name, type(name, (), {"__module__": "torch"}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

  class StorageRef:
    def __init__(self, key):
      self.key = key

  class TensorRef:
    def __init__(self, key, offset, shape, stride):
      self.args = (StorageRef(key), offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
      return _rebuild_tensor_v2, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, StorageRef):
        arr = storages[obj.key]
        return ("storage", getattr(fake_torch, kinds[arr.dtype]), obj.key, "cpu", arr.size, None)
      return None

  state = collections.OrderedDict(
      (name, TensorRef(*spec)) if not isinstance(spec, dict)
      else (name, {k: TensorRef(*v) for k, v in spec.items()}) for name, spec in tensors.items())
  with open(path, "wb") as f:
    for header in (tp._LEGACY_MAGIC_NUMBER, tp._LEGACY_PROTOCOL_VERSION,
                   {"little_endian": True}):
      pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump(state)
    pickle.dump(list(storages), f, protocol=2)
    for arr in storages.values():
      f.write(int(arr.size).to_bytes(8, "little", signed=True))
      f.write(arr.tobytes())


def test_strided_views_offsets_and_nesting_are_rebuilt_exactly(tmp_path, monkeypatch):
  path = tmp_path / "fake.pth"
  storages = {"0": np.arange(12, dtype=np.float32), "1": np.array([7, -3], np.int64)}
  _write_fake_legacy(path, monkeypatch, storages, {
      "transposed": ("0", 0, (3, 4), (1, 3)),  # column-major view of the storage
      "offset": ("0", 5, (2, 3), (3, 1)),
      "nested": {"count": ("1", 1, (), ())},
  })
  state = tp.load_legacy_torch_pickle(path)
  np.testing.assert_array_equal(state["transposed"], np.arange(12.0).reshape(4, 3).T)
  np.testing.assert_array_equal(state["offset"], np.arange(5.0, 11.0).reshape(2, 3))
  assert state["nested.count"].dtype == np.int64 and state["nested.count"] == -3
  assert state["transposed"].flags["C_CONTIGUOUS"]


def test_out_of_bounds_view_and_truncation_are_errors_naming_the_file(tmp_path, monkeypatch):
  path = tmp_path / "oob.pth"
  _write_fake_legacy(path, monkeypatch, {"0": np.zeros(4, np.float32)},
                     {"w": ("0", 2, (3,), (1,))})
  with pytest.raises(pickle.UnpicklingError, match=r"oob\.pth.*past the end"):
    tp.load_legacy_torch_pickle(path)
  cut = tmp_path / "cut.pth"
  cut.write_bytes(open(WEIGHTS, "rb").read()[:1_000_000])
  with pytest.raises(pickle.UnpicklingError, match=r"cut\.pth.*truncated"):
    tp.load_legacy_torch_pickle(cut)


def test_weights_are_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TAILJAX_CACHE", str(tmp_path / "cache"))
  first = enl.efficientnet_lite0()
  cached = list((tmp_path / "cache").glob("efficientnet-lite0-*.npz"))
  assert len(cached) == 1

  def fail(path):
    raise AssertionError(f"re-parsed {path} despite the cache")

  monkeypatch.setattr(tp, "load_legacy_torch_pickle", fail)
  second = enl.efficientnet_lite0()
  jax.tree.map(np.testing.assert_array_equal, first.variables, second.variables)

  # A corrupt cache file is rebuilt from the .pth, not trusted or fatal.
  monkeypatch.undo()
  monkeypatch.setenv("TAILJAX_CACHE", str(tmp_path / "cache"))
  cached[0].write_bytes(b"not an npz")
  third = enl.efficientnet_lite0()
  jax.tree.map(np.testing.assert_array_equal, first.variables, third.variables)
  assert np.load(cached[0])["_fc.bias"].shape == (1000,)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.delenv("TAILJAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert tp.default_cache_dir() == tmp_path / "tailjax"
  monkeypatch.setenv("TAILJAX_CACHE", str(tmp_path / "mine"))
  assert tp.default_cache_dir() == tmp_path / "mine"


def test_missing_weights_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    tp.load_torch_state_dict_cached(tmp_path / "nowhere.pth", cache_dir=tmp_path)
