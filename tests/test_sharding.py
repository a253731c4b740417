import jax
import ml_collections
import numpy as np
import pytest

from tailjax import sharding, train

FEATS = np.random.default_rng(1).normal(size=(16, 4, 4, 6)).astype(np.float32)


def _cfg():
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": 1, "kernel_mode": "3x3", "hidden_ratio": 1.0, "layer_norm": "image"}
  c.optim = {"name": "adam", "learning_rate": 1e-2, "grad_clip_norm": 10.0}
  c.train = {"num_steps": 4, "batch_size": 4}
  return c


def test_four_fake_devices():
  assert jax.device_count() == 4, "tests/conftest.py sets --xla_force_host_platform_device_count=4"


def test_padded_size_and_pad_unpad_rows():
  assert [sharding.padded_size(n, 4) for n in (1, 3, 4, 5, 8)] == [4, 4, 4, 8, 8]
  tree = {"a": np.arange(3.0), "b": np.arange(6).reshape(3, 2)}
  padded, n = sharding.pad_rows(tree, 4)
  assert n == 3
  np.testing.assert_array_equal(padded["a"], [0.0, 1.0, 2.0, 2.0])      # last row repeated
  np.testing.assert_array_equal(padded["b"][3], tree["b"][2])
  back = sharding.unpad_rows(padded, n)
  for k in tree:
    np.testing.assert_array_equal(back[k], tree[k])
  same, _ = sharding.pad_rows(tree, 3)
  assert same["a"].shape == (3,)
  with pytest.raises(ValueError, match="leading row axis"):
    sharding.pad_rows({"a": np.zeros(3), "b": np.zeros(2)}, 4)


def test_put_rows_shards_the_leading_axis():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"sweep": 4, "batch": 1}
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  arr = sharding.put_rows(x, mesh)
  assert len(arr.addressable_shards) == 4
  for shard in arr.addressable_shards:
    assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  np.testing.assert_array_equal(sharding.to_host(arr), x)
  with pytest.raises(ValueError, match="pad them first"):
    sharding.put_rows(np.zeros((6, 3)), mesh)
  with pytest.raises(ValueError, match="batch_devices"):
    sharding.make_mesh(3)


def test_batch_sharding_needs_divisible_batch():
  # (the sharded training itself: tests/test_engine.py)
  with pytest.raises(ValueError, match="config.train.batch_size"):
    train.make_flow_program(_cfg(), FEATS.shape, batch_axis="batch", batch_shards=3)
