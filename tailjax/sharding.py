"""Spreading a sweep (and a mini-batch) over every device with ``jax.sharding``.

A sweep is R independent training runs (rows) stacked on a leading axis. Rows
never talk to each other, so the natural layout is a 2-D device mesh

    mesh axes ("sweep", "batch"), shape (D / b, b)

with the row axis split over "sweep" and, optionally, each row's mini-batch
split over "batch" (its gradients are then averaged across the b devices that
share the row: see ``tailjax.sweep.make_flow_program(batch_axis=...)``). With
b = 1 (the default) every device trains R / D whole rows and no collective
runs at all. The row count is padded to a multiple of the "sweep" axis by
repeating the last row (same hyperparameters, same key, so the copy trains
exactly like the original and stays finite); ``unpad_rows`` drops the copies.

Single host: nothing to set up; ``make_mesh()`` takes ``jax.devices()``. To
test on a laptop, fake devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts.

Multi-host (several GPU/TPU hosts, one process per host): call

    jax.distributed.initialize()   # or (coordinator_address, num_processes, process_id)

before any other JAX call in *every* process, and run the same command (same
config, same data) on every host. ``jax.devices()`` then lists the devices of
all hosts and ``make_mesh`` spans them. The helpers here are multi-host safe:
``put_rows``/``put_replicated`` build global arrays from the host copy every
process holds (each process supplies only its own shards, via
``jax.make_array_from_callback``), and ``to_host`` gathers a global array to
every process (``multihost_utils.process_allgather``). Orbax checkpoints of
such arrays are written cooperatively by all processes. Put the workdir on a
file system every host sees.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

SWEEP_AXIS = "sweep"
BATCH_AXIS = "batch"


def make_mesh(batch_devices: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("sweep", "batch") mesh over ``devices`` (default: all devices of all hosts).

  Args:
    batch_devices: devices that share one row and split its mini-batch (b);
      must divide the device count. The remaining factor D / b shards rows.
    devices: explicit device list (e.g. ``jax.devices()[:1]`` for one device).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  b = int(batch_devices)
  if b < 1 or n % b:
    raise ValueError(f"sharding.batch_devices must be ≥ 1 and divide the {n} devices, got {b}")
  return Mesh(np.asarray(devices, dtype=object).reshape(n // b, b), (SWEEP_AXIS, BATCH_AXIS))


def num_row_shards(mesh: Mesh) -> int:
  return int(mesh.shape[SWEEP_AXIS])


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is ≥ n (and ≥ multiple)."""
  if n < 1 or multiple < 1:
    raise ValueError(f"padded_size needs n ≥ 1 and multiple ≥ 1, got n={n}, multiple={multiple}")
  return max(1, math.ceil(n / multiple)) * multiple


def pad_rows(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
  """Pads every leaf's leading (row) axis to a multiple of ``multiple`` by repeating
  the last row. Returns (padded tree, original row count)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("pad_rows: empty pytree")
  n = int(leaves[0].shape[0])
  for leaf in leaves:
    if leaf.shape[:1] != (n,):
      raise ValueError(f"pad_rows: every leaf needs the same leading row axis ({n}), "
                       f"got shape {leaf.shape}")
  extra = padded_size(n, multiple) - n
  if extra == 0:
    return tree, n

  def pad(x):
    xp = jnp if isinstance(x, jax.Array) else np
    tail = xp.repeat(x[-1:], extra, axis=0)
    return xp.concatenate([x, tail], axis=0)

  return jax.tree.map(pad, tree), n


def unpad_rows(tree: PyTree, n: int) -> PyTree:
  """Drops the padding rows added by ``pad_rows`` (keeps the first ``n``)."""
  return jax.tree.map(lambda x: x[:n], tree)


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis over "sweep", replicated over "batch" (and over trailing axes)."""
  return NamedSharding(mesh, P(SWEEP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _global_array(x, sharding: NamedSharding) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_rows(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays (identical on every process) → global arrays sharded by rows.

  The row count must already be a multiple of the "sweep" axis (``pad_rows``).
  """
  shards = num_row_shards(mesh)
  for leaf in jax.tree.leaves(tree):
    if np.shape(leaf)[0] % shards:
      raise ValueError(f"put_rows: {np.shape(leaf)[0]} rows do not split over {shards} devices; "
                       "pad them first (sharding.pad_rows)")
  return jax.tree.map(lambda x: _global_array(x, row_sharding(mesh)), tree)


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays (identical on every process) → global arrays replicated on every device."""
  return jax.tree.map(lambda x: _global_array(x, replicated(mesh)), tree)


def to_host(tree: PyTree) -> PyTree:
  """Global (possibly sharded, possibly multi-host) arrays → NumPy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def with_row_sharding(abstract: PyTree, mesh: Mesh) -> PyTree:
  """``jax.ShapeDtypeStruct`` tree (e.g. from ``jax.eval_shape``) with the row sharding
  attached: the restore target for an orbax checkpoint of a row-sharded state."""
  sharding = row_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)


def with_replicated_sharding(abstract: PyTree, mesh: Mesh) -> PyTree:
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)


__all__ = ("SWEEP_AXIS", "BATCH_AXIS", "make_mesh", "num_row_shards", "padded_size", "pad_rows",
           "unpad_rows", "row_sharding", "replicated", "put_rows", "put_replicated", "to_host",
           "with_row_sharding", "with_replicated_sharding")
