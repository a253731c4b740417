"""Test helper: which config fields a pipeline actually reads.

``track_reads(cfg)`` records every leaf of ``cfg`` read through ``cfg.a.b``,
``cfg["a"]``, ``.get`` or ``.items()`` while the context is open (reads made by
``to_dict``/``to_json``, e.g. to write the manifest, do not count). A pipeline
whose allow-list (``FIELDS``) holds a field it never reads fails
``assert_all_read``: accepted fields must be used fields.
"""

import contextlib

import ml_collections

from tailjax import runrecord

_C = ml_collections.ConfigDict


@contextlib.contextmanager
def track_reads(cfg):
  paths = {}

  def walk(node, prefix):
    paths[id(node)] = prefix
    for k in node.keys():
      v = node._fields[k]
      if isinstance(v, _C):
        walk(v, f"{prefix}{k}.")

  walk(cfg, "")
  reads: set[str] = set()
  quiet = [0]
  get, items, to_dict = _C.__getitem__, _C.items, _C.to_dict

  def getitem(self, key):
    if not quiet[0] and id(self) in paths:
      reads.add(f"{paths[id(self)]}{key}")
    return get(self, key)

  def items_(self, *a, **k):
    out = items(self, *a, **k)
    if not quiet[0] and id(self) in paths:
      reads.update(f"{paths[id(self)]}{kk}" for kk, _ in out)
    return out

  def to_dict_(self, *a, **k):
    quiet[0] += 1
    try:
      return to_dict(self, *a, **k)
    finally:
      quiet[0] -= 1

  _C.__getitem__, _C.items, _C.to_dict = getitem, items_, to_dict_
  try:
    yield reads
  finally:
    _C.__getitem__, _C.items, _C.to_dict = get, items, to_dict


def unread(cfg, reads) -> list[str]:
  """Leaves of ``cfg`` never read (a leaf counts as read when it or a parent block was
  iterated/read as a whole through ``items``)."""
  leaves = runrecord.flatten(runrecord.to_plain(cfg))
  return sorted(p for p in leaves if p not in reads)
