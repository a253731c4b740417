"""Data sources of the pipeline: pre-extracted features as a data kind (study A end to end
on a 6×10 grid of 24 channels, validation errors) and backbone selection (ResNets from a
torchvision-named zip checkpoint written here)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from tailjax.configs import (fastflow_features, fastflow_mvtec_resnet18, fastflow_mvtec_wrn50,
                            fastflow_study, fastflow_textures)
from tailjax import backbones, runrecord
from tailjax.backbones import resnet as rn
from tailjax.data import pipeline, textures
from tailjax.data.mvtec import DatasetError, MissingDataError, load_images
from tailjax.studies import study_a

from config_reads import track_reads, unread
from test_torch_pickle import tensor, write_zip_checkpoint

H, W, C, S = 6, 10, 24, 30           # grid, channels, mask side (a cell is 5×3 mask pixels)


def _features(rng, n_train=8, n_good=4, n_bad=4) -> dict[str, np.ndarray]:
  """Normal features N(0, 1); a defective sample adds +3 on grid rows 2–3, columns 4–6,
  whose mask is exactly those cells (rows 10–19, columns 12–20 of the 30×30 mask)."""
  m = n_good + n_bad
  test = rng.normal(size=(m, H, W, C)).astype(np.float32)
  masks = np.zeros((m, S, S), np.uint8)
  labels = np.r_[np.zeros(n_good), np.ones(n_bad)].astype(np.int64)
  test[n_good:, 2:4, 4:7] += 3.0
  masks[n_good:, 10:20, 12:21] = 255
  return dict(train_features=rng.normal(size=(n_train, H, W, C)).astype(np.float32),
              test_features=test, test_labels=labels, test_masks=masks)


def _save(path, **arrays):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def _features_cfg(path, **eval_kw):
  cfg = fastflow_features.get_config("smoke")
  cfg.data.path = str(path)
  for k, v in eval_kw.items():
    cfg.eval[k] = v
  return cfg


# ----------------------------------------------------------------------------
# data.kind = features
# ----------------------------------------------------------------------------


def test_study_a_records_end_to_end_on_a_features_file(tmp_path):
  path = _save(tmp_path / "feats" / "widgets.npz", **_features(np.random.default_rng(0)))
  cfg = _features_cfg(path, size=60)
  cfg.train.batch_size = 6           # the 6 training images left after holding out 2
  with track_reads(cfg) as reads:
    out = study_a.main(cfg, tmp_path / "run", progress=False)
  assert [p for p in unread(cfg, reads) if not p.startswith("mechanisms.")] == []
  res = out["results"]["widgets"]
  assert res["grid"] == [H, W] and res["n_train"] == 6 and res["n_test"] == 8   # 2 held out
  assert res["n_defective"] == 4
  # The masks line up with the grid (no transposition): PaDiM finds the shifted cells.
  assert res["padim"]["pixel_auroc"] > 0.95 and res["padim"]["image_auroc"] == 1.0
  assert [r["variant"] for r in res["rows"]] == ["mean_only"] * 2 + ["tail_aware"] * 2
  for r in res["rows"]:
    assert all(np.isfinite(v) for v in r["metrics"].values())
  assert (tmp_path / "run" / "widgets" / "examples.png").read_bytes()[:4] == b"\x89PNG"
  assert "| widgets | tail_aware − mean_only |" in (tmp_path / "run" / "report.md").read_text()
  manifest = runrecord.read_manifest(tmp_path / "run")
  assert "backbone" not in manifest["config"] and manifest["config"]["data"]["kind"] == "features"


def test_features_dataset_splits_resizes_and_selects(tmp_path):
  rng = np.random.default_rng(1)
  a, b = _features(rng), _features(rng, n_train=5)
  _save(tmp_path / "dir" / "b.npz", **b)
  _save(tmp_path / "dir" / "a.npz", **a)
  cfg = _features_cfg(tmp_path / "dir", size=60)
  ds = pipeline.Dataset(cfg)
  assert ds.categories == ["a", "b"] and not ds.has_images
  d = ds.load("a")
  assert d.test_images is None and ds.train_images("a") is None and ds.split_paths("a") is None
  tr, va = pipeline.split_train_val(8, cfg.data.val_fraction, cfg.data.split_seed)
  np.testing.assert_array_equal(d.train_index, tr)
  np.testing.assert_array_equal(d.val_feats, a["train_features"][va])
  np.testing.assert_array_equal(d.train_feats, a["train_features"][tr])
  assert len(va) == 2 and not set(tr) & set(va)
  assert d.test_masks.shape == (8, 60, 60) and d.test_masks.dtype == np.uint8
  np.testing.assert_array_equal(d.test_masks[:, ::2, ::2], a["test_masks"] > 0)  # nearest ×2
  assert d.test_types == ("good",) * 4 + ("defective",) * 4
  cfg.eval.size = S
  np.testing.assert_array_equal(pipeline.Dataset(cfg).load("b").test_masks, b["test_masks"] > 0)
  cfg.data.categories = "b"
  assert pipeline.Dataset(cfg).categories == ["b"]
  cfg.data.categories = "c"
  with pytest.raises(ValueError, match=r"config.data.categories: \['c'\]"):
    pipeline.Dataset(cfg)
  cfg.data.categories = ""
  cfg.data.path = str(tmp_path / "dir" / "b.npz")
  assert pipeline.Dataset(cfg).categories == ["b"]


def test_features_path_errors_name_the_field(tmp_path):
  cfg = _features_cfg("")
  with pytest.raises(ValueError, match="config.data.path"):
    pipeline.Dataset(cfg)
  cfg.data.path = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    pipeline.Dataset(cfg)
  (tmp_path / "empty").mkdir()
  cfg.data.path = str(tmp_path / "empty")
  with pytest.raises(MissingDataError, match="config.data.path.*no <category>.npz"):
    pipeline.Dataset(cfg)
  _save(tmp_path / "one.npz", **_features(np.random.default_rng(0)))
  cfg.data.path = str(tmp_path / "one.npz")
  with pytest.raises(ValueError, match="no backbone"):
    pipeline.Dataset(cfg).image_features([tmp_path / "one.npz"])


def _break(a: dict, case: str) -> tuple[dict, str]:
  """A copy of valid arrays with one defect, and the field its error must name."""
  a = {k: v.copy() for k, v in a.items()}
  if case == "missing":
    del a["test_masks"]
    return a, "'test_masks'"
  if case == "unknown":
    a["test_mask"] = a["test_masks"]
    return a, "unknown arrays \\['test_mask'\\]"
  if case == "rank":
    a["train_features"] = a["train_features"][..., 0]
    return a, "'train_features' must be \\[n, H, W, C\\]"
  if case == "nan":
    a["test_features"][3, 1, 2, 5] = np.nan
    return a, "'test_features' holds 1 NaN/Inf values \\(first in sample 3\\)"
  if case == "inf":
    a["train_features"][0, 0, 0, 0] = -np.inf
    return a, "'train_features' holds 1 NaN/Inf"
  if case == "grid":
    a["test_features"] = a["test_features"][:, :, :8]
    return a, "'test_features' is a 6×8 grid of 24 channels but 'train_features' a 6×10"
  if case == "channels":
    a["test_features"] = a["test_features"][..., :20]
    return a, "'test_features' is a 6×10 grid of 20 channels"
  if case == "too_few":
    a["train_features"] = a["train_features"][:1]
    return a, "'train_features' needs at least 2 samples"
  if case == "label_values":
    a["test_labels"][0] = 2
    return a, "'test_labels' must be 0 \\(good\\) or 1"
  if case == "label_count":
    a["test_labels"] = a["test_labels"][:7]
    return a, "'test_labels' must have shape \\(8,\\)"
  if case == "one_class":
    a["test_labels"][:] = 0
    a["test_masks"][:] = 0
    return a, "'test_labels' has no defective sample"
  if case == "mask_count":
    a["test_masks"] = a["test_masks"][:6]
    return a, "'test_masks' must be \\[8, h, w\\]"
  if case == "non_square":
    a["test_masks"] = np.zeros((8, 32, 48), np.uint8)
    a["test_masks"][4:, 10:20, 12:21] = 255
    return a, re.escape("'test_masks' must hold square masks [8, S, S], got shape (8, 32, 48)")
  if case == "mask_values":
    a["test_masks"][5, 0, 0] = 128
    return a, "'test_masks' is not binary"
  if case == "label_without_mask":
    a["test_masks"][6] = 0
    return a, "'test_labels' labels sample 6 defective but its mask in 'test_masks' is empty"
  if case == "good_with_mask":
    a["test_masks"][1, 0, 0] = 255
    return a, "'test_masks' marks defect pixels in sample 1, which 'test_labels' labels good"
  raise AssertionError(case)


CASES = ("missing", "unknown", "rank", "nan", "inf", "grid", "channels", "too_few",
         "label_values", "label_count", "one_class", "mask_count", "non_square", "mask_values",
         "label_without_mask", "good_with_mask")


@pytest.mark.parametrize("case", CASES)
def test_bad_features_files_name_the_file_and_the_array(tmp_path, case):
  arrays, message = _break(_features(np.random.default_rng(2)), case)
  path = _save(tmp_path / f"{case}.npz", **arrays)
  with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*" + message):
    pipeline.Dataset(_features_cfg(path)).load(case)


def test_unreadable_features_file_is_named(tmp_path):
  path = tmp_path / "torn.npz"
  path.write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(DatasetError, match=re.escape(str(path))):
    pipeline.Dataset(_features_cfg(path)).load("torn")


def test_field_allow_lists_per_kind_and_backbone():
  feats = fastflow_features.get_config("smoke")
  assert pipeline.backbone_fields(feats) == ()
  assert pipeline.input_fields(feats) == pipeline.DATA_FIELDS["features"]
  others = [k for k in study_a.FIELDS if not k.startswith(("data.", "backbone."))]
  runrecord.check_fields(feats, others + list(pipeline.input_fields(feats)))
  feats.backbone = {"name": "resnet18"}           # a features run reads no backbone field
  with pytest.raises(runrecord.ConfigFieldError, match=r"config\.backbone\.name"):
    runrecord.check_fields(feats, others + list(pipeline.input_fields(feats)))
  for mod in (fastflow_mvtec_resnet18, fastflow_mvtec_wrn50):
    cfg = mod.get_config()
    assert "backbone.weights" in pipeline.backbone_fields(cfg)
    assert "backbone.normalization" not in pipeline.backbone_fields(cfg)
    runrecord.check_fields(cfg, others + list(pipeline.input_fields(cfg)))
    cfg.backbone.normalization = "imagenet"         # fixed inside the ResNets: not a field
    with pytest.raises(runrecord.ConfigFieldError, match=r"config\.backbone\.normalization"):
      runrecord.check_fields(cfg, others + list(pipeline.input_fields(cfg)))
  cfg = fastflow_mvtec_resnet18.get_config()
  cfg.backbone.weights = "/w/resnet18-f37072fd.pth"
  assert pipeline.describe_features(cfg) == \
      "ResNet-18 stride 8 at 256 px (weights resnet18-f37072fd.pth)"
  feats = fastflow_features.get_config()
  feats.data.path = "/x/widgets.npz"
  assert pipeline.describe_features(feats) == "pre-extracted features (widgets.npz)"
  cfg.backbone.name = "vgg16"
  with pytest.raises(ValueError, match="config.backbone.name"):
    pipeline.backbone_fields(cfg)


# ----------------------------------------------------------------------------
# data.kind = textures: which categories, which build
# ----------------------------------------------------------------------------


def _textures_cfg(root, categories):
  cfg = fastflow_textures.get_config("smoke")
  cfg.data.root = str(root)
  cfg.data.categories = categories
  cfg.data.image_size, cfg.data.n_train, cfg.data.n_test = 32, 3, 3
  return cfg


def test_texture_categories_choose_tiers_and_builds(tmp_path):
  root = tmp_path / "tex"
  default = pipeline.Dataset(_textures_cfg(root, ""))
  assert default.root == root and default.categories == ["brick", "grass", "gravel"]
  assert textures.read_manifest(root)["params"]["categories"] == list(textures.SOURCE_PHOTOS)
  marker = (root / "COMPLETE").read_bytes()
  assert pipeline.Dataset(_textures_cfg(root, "gravel,brick")).categories == ["gravel", "brick"]
  hard = pipeline.Dataset(_textures_cfg(root, "hard"))
  assert hard.root == root and hard.categories == list(textures.SOURCE_PHOTOS)
  # Reaching the calibrated tier builds all nine beside the default build, never over it.
  mixed = pipeline.Dataset(_textures_cfg(root, "moon,hard,brick"))
  assert mixed.root == tmp_path / "tex-all"
  assert mixed.categories == ["moon", "brick", "grass", "gravel"]     # order kept, no duplicate
  assert textures.read_manifest(mixed.root)["params"]["categories"] == list(textures.CATEGORIES)
  assert (root / "COMPLETE").read_bytes() == marker
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["brick", "grass", "gravel"]
  cal = pipeline.Dataset(_textures_cfg(root, "calibrated"))
  assert cal.root == mixed.root and cal.categories == list(textures.CALIBRATED_CATEGORIES)
  assert [textures.category_tier(c) for c in cal.categories] == ["calibrated"] * 6
  both = pipeline.requested_categories(_textures_cfg(root, "hard,calibrated"))
  assert both == list(textures.CATEGORIES)
  # A calibrated category's split is read like any other: good and defective test images.
  train, test = cal._splits["coins"]
  assert len(train.image_paths) == 3 and set(test.labels) == {0, 1}


def test_demo_reads_both_tiers_and_the_hard_variant_is_the_old_demo():
  demo, smoke = fastflow_textures.get_config(), fastflow_textures.get_config("smoke")
  hard = fastflow_textures.get_config("hard")
  assert pipeline.requested_categories(hard) is None and hard.data.categories == ""
  assert pipeline.texture_build(hard)[1] == textures.SOURCE_PHOTOS
  assert pipeline.texture_build(smoke)[1] == textures.SOURCE_PHOTOS   # smoke's brick: same build
  cats = pipeline.requested_categories(demo)
  assert [textures.category_tier(c) for c in cats] == ["hard"] + ["calibrated"] * 2
  root, built = pipeline.texture_build(demo)
  assert built == textures.CATEGORIES and root.name == "textures-all"
  assert pipeline.texture_build(hard)[0] == root.with_name("textures")
  assert pipeline.ladder_root(demo) == root.with_name("textures-ladder")
  assert list(demo.variants) == ["mean_only", "tail_aware"]
  even = fastflow_textures.get_config("even_share")
  assert list(even.variants) == ["mean_only", "tail_aware", "tail_even_share"]
  assert even.variants.tail_even_share.tail_nll == "even_share"
  assert {"tail_even_share", "tail_sq_norm"} <= set(fastflow_textures.get_config("all_nll").variants)
  # Only the categories differ from the hard variant, and the even-share arm from :even_share.
  del even.variants["tail_even_share"]
  assert even.to_json(sort_keys=True) == demo.to_json(sort_keys=True)
  demo.data.categories = hard.data.categories
  assert demo.to_json(sort_keys=True) == hard.to_json(sort_keys=True)
  with pytest.raises(ValueError, match="unknown variant 'tier'"):
    fastflow_textures.get_config("tier")


def test_study_is_the_demo_on_every_category_for_longer_and_arch8_only_deepens_it():
  demo, study = fastflow_textures.get_config(), fastflow_study.get_config()
  arch8, old = fastflow_study.get_config("arch8"), fastflow_study.get_config("hard")
  assert pipeline.requested_categories(study) == list(textures.CATEGORIES)
  assert pipeline.texture_build(study) == pipeline.texture_build(demo)   # one build
  assert (study.train.num_steps, tuple(study.eval.budgets)) == (
      2000, (0, 30, 100, 300, 600, 1000, 1250, 1500, 1750, 2000))
  even = fastflow_study.get_config("even_share")
  assert list(even.variants) == ["mean_only", "tail_aware", "tail_even_share"]
  del even.variants["tail_even_share"]
  assert even.to_json(sort_keys=True) == study.to_json(sort_keys=True)
  assert (study.flow.num_steps, arch8.flow.num_steps, old.flow.num_steps) == (4, 8, 8)
  assert list(old.variants) == ["mean_only", "tail_aware"] and old.train.num_steps == 2000
  arch8.flow.num_steps = 4
  assert arch8.to_json(sort_keys=True) == study.to_json(sort_keys=True)
  for c in (demo, study):   # only the categories, the step count and the ladder differ
    c.data.categories, c.train.num_steps, c.eval.budgets = "", 0, ()
    c.train.segment_steps = 0
  assert demo.to_json(sort_keys=True) == study.to_json(sort_keys=True)
  with pytest.raises(ValueError, match="unknown variant 'deep'"):
    fastflow_study.get_config("deep")


def test_anomalib_config_is_the_demo_with_anomalibs_flow_one_switch_at_a_time():
  from tailjax import flows
  from tailjax.configs import fastflow_anomalib

  def differing(a, b):
    fa, fb = runrecord.flatten(runrecord.to_plain(a)), runrecord.flatten(runrecord.to_plain(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)
            and not k.startswith("variants.tail_even_share.")}   # no even-share arm here

  demo, full = fastflow_textures.get_config(), fastflow_anomalib.get_config()
  assert pipeline.requested_categories(full) == ["moon", "tissue"]
  assert list(full.variants) == ["mean_only", "tail_aware"]
  runrecord.check_fields(full, study_a.FIELDS + pipeline.input_fields(full))
  assert isinstance(flows.build_flow({**full.flow.to_dict(), "channels": 8}), flows.FastFlow2d)
  rest = {"data.categories", "mechanisms.enabled", "report.compare_runs"}
  switched = {f"flow.{f}" for f in fastflow_anomalib.ANOMALIB_FLOW}
  assert differing(demo, full) == switched | rest
  for arg, field in fastflow_anomalib.SWITCHES.items():
    assert differing(demo, fastflow_anomalib.get_config(arg)) == {f"flow.{field}"} | rest, arg
  assert differing(full, fastflow_anomalib.get_config("no_clip")) == {"optim.grad_clip_norm"}
  smoke = fastflow_anomalib.get_config("smoke")
  assert differing(fastflow_textures.get_config("smoke"), smoke) == switched   # smoke: no mechanisms
  with pytest.raises(ValueError, match="unknown variant 'kernel_order'"):
    fastflow_anomalib.get_config("kernel_order")


def test_texture_category_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.categories: \['carpet'\] are neither"):
    pipeline.Dataset(_textures_cfg(tmp_path / "tex", "brick,carpet"))
  assert not (tmp_path / "tex").exists() and not (tmp_path / "tex-all").exists()  # nothing built
  # Tier names are a textures notion: another kind looks them up as folders.
  root = textures.build_texture_benchmark(tmp_path / "tree", seed=3, image_size=32, n_train=2,
                                          n_test=2, categories=("brick",))
  cfg = fastflow_mvtec_resnet18.get_config("smoke")
  cfg.data.root, cfg.data.categories = str(root), "hard"
  with pytest.raises(ValueError, match=r"config\.data\.categories: \['hard'\] not found"):
    pipeline.category_splits(cfg, root)


# ----------------------------------------------------------------------------
# Backbone selection
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_files(tmp_path_factory):
  """Two torchvision-named ResNet-18 zip checkpoints with different random weights."""
  tmp = tmp_path_factory.mktemp("weights")
  return [write_zip_checkpoint(tmp / f"resnet18-seed{s}.pth",
                               {k: tensor(v) for k, v in rn.random_torchvision_state_dict(
                                   "resnet18", seed=s).items()})
          for s in (0, 1)]


def _resnet_cfg(weights, root="", cache=""):
  cfg = fastflow_mvtec_resnet18.get_config("smoke")
  cfg.backbone.weights = str(weights)
  cfg.backbone.resolution = 32
  cfg.backbone.batch_size = 4
  cfg.data.root = str(root)
  cfg.data.cache_dir = str(cache)
  cfg.eval.size = 32
  return cfg


def test_resnet_cache_id_names_arch_layer_and_weight_content(r18_files, tmp_path):
  ids = {}
  for name, weights, layer in (("a", r18_files[0], 8), ("b", r18_files[1], 8),
                               ("a16", r18_files[0], 16)):
    cfg = _resnet_cfg(weights)
    cfg.backbone.layer = layer
    ids[name] = pipeline.make_extractor(cfg)[1]
  copy = shutil.copy(r18_files[0], tmp_path / "renamed.pth")
  ids["copy"] = pipeline.make_extractor(_resnet_cfg(copy))[1]
  assert ids["a"].startswith("resnet18-L8-w") and ids["a16"].startswith("resnet18-L16-w")
  assert ids["copy"] == ids["a"]                    # content, not the file name
  assert len({ids["a"], ids["b"], ids["a16"]}) == 3  # other weights or layer: other entry
  eff = pipeline.make_extractor(fastflow_mvtec_resnet18.fastflow_mvtec.get_config())[1]
  assert eff == "efficientnet_lite0-inception-v1"   # unchanged: existing caches stay valid


def test_resnet_extractor_gives_the_weight_files_features_through_the_dataset(
    r18_files, tmp_path, monkeypatch):
  built, original = [], backbones.resnet18          # the networks make_extractor builds

  def spy(path):
    built.append((path, original(path)))
    return built[-1][1]

  monkeypatch.setattr(backbones, "resnet18", spy)
  root = tmp_path / "tree"
  textures.build_texture_benchmark(root, seed=3, image_size=48, n_train=4, n_test=4,
                                   categories=("gravel",))   # one batch of 4: one compilation
  cfg = _resnet_cfg(r18_files[1], root, tmp_path / "cache")
  ds = pipeline.Dataset(cfg)
  data = ds.load("gravel")
  assert data.train_feats.shape == (3, 4, 4, 128) and data.val_feats.shape == (1, 4, 4, 128)
  assert data.test_feats.shape == (4, 4, 4, 128)
  assert [p for p, _ in built] == [r18_files[1]]   # built once, from backbone.weights
  # Rows are that network's stride-8 features of the split's images, read and resized as
  # training reads them (the port's numbers themselves: tests/test_resnet.py).
  paths = ds.split_paths("gravel")
  images = load_images(paths["train"] + paths["val"] + paths["test"], 32)
  want = built[0][1].extract(images, layers=(8,), batch_size=4, resize_to=None,
                             progress=False)[8]
  got = np.concatenate([data.train_feats, data.val_feats, data.test_feats])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  again = pipeline.Dataset(cfg)
  again._extractor = (None, pipeline.make_extractor(cfg)[1])   # a cache hit never extracts
  np.testing.assert_array_equal(again.load("gravel").train_feats, data.train_feats)
  assert len(built) == 1


def test_backbone_errors_name_the_field(r18_files, tmp_path):
  cfg = _resnet_cfg("")
  with pytest.raises(ValueError, match=r"config.backbone.weights.*resnet18-f37072fd.pth"):
    pipeline.make_extractor(cfg)
  cfg = fastflow_mvtec_wrn50.get_config("smoke")
  with pytest.raises(ValueError, match=r"config.backbone.weights.*wide_resnet50_2-95faca4d.pth"):
    pipeline.make_extractor(cfg)
  with pytest.raises(FileNotFoundError, match="config.backbone.weights"):
    pipeline.make_extractor(_resnet_cfg(tmp_path / "absent.pth"))
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"PK\x03\x04" + b"\0" * 64)
  fn, _ = pipeline.make_extractor(_resnet_cfg(garbage))   # read lazily, at the first call
  with pytest.raises(ValueError, match=r"config.backbone.weights: .*garbage.pth"):
    fn(np.zeros((1, 32, 32, 3), np.uint8))
  cfg = _resnet_cfg(r18_files[0])
  cfg.backbone.layer = 7
  with pytest.raises(ValueError, match="config.backbone.layer"):
    pipeline.make_extractor(cfg)
  cfg = _resnet_cfg(r18_files[0])
  cfg.backbone.name = "vgg16"
  with pytest.raises(ValueError, match="config.backbone.name"):
    pipeline.make_extractor(cfg)
