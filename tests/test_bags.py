"""Study B data: identity embeddings, contaminated bags, leak-free splits, file formats."""

from __future__ import annotations

import numpy as np
import pytest

from tailjax.data import bags
from tailjax.data import digits


def _identities(n_ident=5, per=48, d=8, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_ident, d))
  ident = np.repeat(np.arange(n_ident), per)
  emb = centres[ident] + 0.3 * rng.normal(size=(len(ident), d))
  return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), ident


@pytest.fixture(scope="module")
def dataset():
  emb, ident = _identities()
  return bags.build_bag_dataset(emb, ident, n_bags={"train": 40, "val": 20, "test": 30},
                                min_bag_size=6, max_bag_size=10, seed=3), emb, ident


def test_no_instance_is_shared_between_splits(dataset):
  ds, _, _ = dataset
  for r in ds.ratios:
    used = {s: set(ds.padded(r, s).instance_index_BxN[ds.padded(r, s).mask_BxN > 0].tolist()) for s in bags.SPLITS}
    assert all(len(u) > 0 for u in used.values())
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    for s in bags.SPLITS:  # never twice within a bag either
      sp = ds.padded(r, s)
      for b in range(len(sp.labels_B)):
        idx = sp.instance_index_BxN[b, sp.mask_BxN[b] > 0]
        assert len(np.unique(idx)) == len(idx)


def test_pools_are_disjoint_stratified_and_complete():
  _, ident = _identities()
  pools = bags.split_pools(ident, (0.5, 0.25, 0.25), seed=0)
  allidx = np.concatenate(list(pools.values()))
  assert len(allidx) == len(ident) == len(np.unique(allidx))
  for s in bags.SPLITS:
    assert set(np.unique(ident[pools[s]])) == set(np.unique(ident))  # every identity in every split
  with pytest.raises(ValueError, match="pool_fractions"):
    bags.split_pools(ident, (0.5, 0.5, 0.5), seed=0)


def test_split_info_counts(dataset):
  ds, _, _ = dataset
  info = ds.split_info("5p")
  assert info["train"] == {"count": 40, "positives": 20, "negatives": 20, "min_size": 6, "max_size": 10}
  assert (info["val"]["count"], info["val"]["positives"]) == (20, 10)
  assert (info["test"]["count"], info["test"]["positives"]) == (30, 15)
  for s in bags.SPLITS:
    _, labels, _, _ = ds.load_split("5p", s)
    assert info[s]["count"] == len(labels) and info[s]["positives"] == int(labels.sum())
  emb, ident = _identities()
  imb = bags.build_bag_dataset(emb, ident, ratios=["20p"], positive_fraction=0.25,
                               n_bags={"train": 40, "val": 20, "test": 20}, min_bag_size=6, max_bag_size=6)
  assert imb.split_info("20p")["train"]["positives"] == 10 and imb.split_info("20p")["train"]["negatives"] == 30


@pytest.mark.parametrize("ratio", list(bags.RATIOS))
def test_contamination_fraction_per_bag(dataset, ratio):
  ds, _, _ = dataset
  p = bags.ratio_value(ratio)
  for s in bags.SPLITS:
    sp = ds.padded(ratio, s)
    for b in range(len(sp.labels_B)):
      valid = sp.mask_BxN[b] > 0
      n = int(valid.sum())
      ids = sp.identity_BxN[b, valid]
      foreign = sp.instance_labels_BxN[b, valid] > 0
      if sp.labels_B[b]:
        assert foreign.sum() == bags.contamination_count(p, n) == max(1, int(np.floor(p * n + 0.5)))
        assert len(np.unique(ids[~foreign])) == 1 and len(np.unique(ids[foreign])) == 1
        assert ids[foreign][0] != ids[~foreign][0]
      else:
        assert foreign.sum() == 0 and len(np.unique(ids)) == 1
      assert np.all(sp.features_BxNxD[b, ~valid] == 0)  # padding is zeros, after the valid instances


def test_default_bag_size_gives_exactly_one_foreign_instance_at_5_percent():
  assert bags.contamination_count(0.05, 20) == 1
  assert bags.contamination_count(0.05, 30) == 2   # 1.5 rounds half up
  assert bags.contamination_count(0.05, 10) == 1   # the max(1, ·) floor: 10 % in effect
  assert bags.contamination_count(0.5, 20) == 10


def test_load_split_returns_unpadded_lists_and_unique_ids(dataset):
  ds, emb, _ = dataset
  feats, labels, inst, ids = ds.load_split("30p", "test")
  sp = ds.padded("30p", "test")
  assert [len(f) for f in feats] == sp.sizes_B.tolist() == [len(i) for i in inst]
  assert 6 <= min(map(len, feats)) and max(map(len, feats)) <= 10 and len(set(map(len, feats))) > 1
  np.testing.assert_array_equal(feats[3], emb[sp.instance_index_BxN[3, : len(feats[3])]])
  all_ids = np.concatenate([ds.padded(r, s).bag_ids_B for r in ds.ratios for s in bags.SPLITS])
  assert len(np.unique(all_ids)) == len(all_ids)
  assert np.array_equal(labels, [int(i.sum() > 0) for i in inst])


def test_prebuilt_round_trip_and_errors(dataset, tmp_path):
  ds, _, _ = dataset
  ds.save(tmp_path / "splits")
  back = bags.load_prebuilt(tmp_path / "splits")
  assert back.ratios == ds.ratios
  for key, s in ds.splits.items():
    for a, b in zip(s, back.splits[key]):
      np.testing.assert_array_equal(a, b)

  bad = tmp_path / "bad" / "5p"
  bad.mkdir(parents=True)
  sp = ds.padded("5p", "train")
  mask = sp.mask_BxN.copy()
  mask[4] = 0
  mask[4, 0] = 1
  for s in bags.SPLITS:
    np.savez(bad / f"{s}.npz", features=sp.features_BxNxD, labels=sp.labels_B, mask=mask)
  with pytest.raises(ValueError, match=r"5p/train\.npz: bag 4 has 1 valid instance"):
    bags.load_prebuilt(tmp_path / "bad")
  feats = sp.features_BxNxD.copy()
  feats[2, 0, 0] = np.inf
  np.savez(bad / "train.npz", features=feats, labels=sp.labels_B)
  with pytest.raises(ValueError, match=r"train\.npz: bag 2 has NaN/Inf"):
    bags.load_prebuilt(tmp_path / "bad")
  np.savez(bad / "train.npz", features=feats)
  with pytest.raises(ValueError, match=r"train\.npz: missing key 'labels'"):
    bags.load_prebuilt(tmp_path / "bad")
  with pytest.raises(FileNotFoundError, match="missing .*10p"):
    bags.load_prebuilt(tmp_path / "bad", ratios=["10p"])


def test_bad_configuration_errors_name_the_problem():
  emb, ident = _identities(per=30)
  with pytest.raises(ValueError, match=r"bags\[5p/train\]: 5 of 5 identities have fewer instances .* max_bag_size=20"):
    bags.build_bag_dataset(emb, ident, min_bag_size=20, max_bag_size=20)
  with pytest.raises(ValueError, match="min_bag_size"):
    bags.build_bag_dataset(emb, ident, min_bag_size=1, max_bag_size=4)
  with pytest.raises(ValueError, match="ratio must be named"):
    bags.ratio_value("5%")
  with pytest.raises(ValueError, match="positive_fraction"):
    bags.build_bag_dataset(emb, ident, positive_fraction=1.0)


def test_errors_stay_short_with_many_offenders(tmp_path):
  # 400 identities, all too small for bags of 20: the error names the split,
  # the first few identities and a count, not all 400.
  emb, ident = _identities(n_ident=400, per=12, d=4)
  with pytest.raises(ValueError) as err:
    bags.build_bag_dataset(emb, ident, ratios=["10p"], min_bag_size=20, max_bag_size=20)
  msg = str(err.value)
  assert len(msg) < 300, len(msg)
  assert msg.startswith("bags[10p/train]: 400 of 400 identities") and "(and 395 more)" in msg

  bad = emb.copy()
  bad[::2, 0] = np.nan  # 2,400 bad rows
  np.savez(tmp_path / "nan.npz", embeddings=bad, identity=ident)
  with pytest.raises(ValueError, match=r"NaN/Inf in 2400 row\(s\): 0, 2, 4, 6, 8 \(and 2395 more\)$"):
    digits.load_embeddings(tmp_path / "nan.npz")
  sp = bags.make_bags(emb[:200], ident[:200], np.arange(200), ratio=0.1, n_bags=30, min_size=4, max_size=4,
                      positive_fraction=0.5, rng=np.random.default_rng(0))
  sp = sp._replace(mask_BxN=np.zeros_like(sp.mask_BxN))
  with pytest.raises(ValueError) as err:
    bags.validate_split(sp, "x.npz")
  assert "30 such bag(s): 0, 1, 2, 3, 4 (and 25 more)" in str(err.value) and len(str(err.value)) < 200


def test_dataset_from_config_refuses_a_path_it_would_ignore():
  import ml_collections as mlc
  data = mlc.ConfigDict(dict(source="digits", path="my.npz", ratios=["5p"]))
  with pytest.raises(ValueError, match="data.path='my.npz' is only read with data.source='embeddings' or 'bags'"):
    bags.dataset_from_config(data)
  data.source = "faces"
  with pytest.raises(ValueError, match="data.source must be"):
    bags.dataset_from_config(data)


def test_user_embeddings_file(tmp_path):
  emb, ident = _identities()
  path = tmp_path / "emb.npz"
  np.savez(path, embeddings=3 * emb, identity=np.array([f"person{i}" for i in ident]))
  got = digits.load_embeddings(path)
  np.testing.assert_allclose(np.linalg.norm(got.embeddings_NxD, axis=1), 1.0, rtol=1e-5)
  assert len(np.unique(got.identity_N)) == 5
  np.savez(tmp_path / "nokey.npz", embeddings=emb)
  with pytest.raises(ValueError, match=r"nokey\.npz: missing key\(s\) \['identity'\]"):
    digits.load_embeddings(tmp_path / "nokey.npz")
  emb[7, 1] = np.nan
  np.savez(tmp_path / "nan.npz", embeddings=emb, identity=ident)
  with pytest.raises(ValueError, match=r"nan\.npz: 'embeddings' has NaN/Inf in 1 row\(s\): 7$"):
    digits.load_embeddings(tmp_path / "nan.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    digits.load_embeddings(tmp_path / "missing.npz")


def test_digits_embeddings_are_unseen_identities_and_cached(tmp_path, monkeypatch):
  s = digits.ArcFaceSettings(steps=30, fast_compile=True)
  first = digits.digits_embeddings(s, cache_dir=tmp_path)
  assert first.embeddings_NxD.shape[1] == 256
  np.testing.assert_allclose(np.linalg.norm(first.embeddings_NxD, axis=1), 1.0, rtol=1e-5)
  assert set(np.unique(first.identity_N)) == {6, 7, 8, 9}  # held-out digits only
  assert first.info["train_identity_accuracy"] > 0.8       # the ArcFace trainer learns (6 classes: chance 1/6)
  cached = list(tmp_path.glob("digits_arcface_*.npz"))
  assert len(cached) == 1
  monkeypatch.setattr(digits, "train_arcface", lambda *a: pytest.fail("retrained despite the cache"))
  again = digits.digits_embeddings(s, cache_dir=tmp_path)
  np.testing.assert_array_equal(again.embeddings_NxD, first.embeddings_NxD)
  assert again.info["cache_key"] == first.info["cache_key"]
  with pytest.raises(ValueError, match="data.embedder.train_classes and data.embedder.heldout_classes overlap"):
    digits.ArcFaceSettings(train_classes=(0, 1, 6), heldout_classes=(6, 7)).validate()
