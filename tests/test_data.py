"""PaddleSeg dataset YAML, list-file datasets, image folders and collate."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from slimseg.data import (DatasetConfig, ImageFolder, SegDataset, build_dataset, collate,
                          load_dataset_config)
from slimseg.errors import ConfigError, DataError

SEED_YAML = """
batch_size: 4
iters: 1000
train_dataset:
  type: Dataset
  dataset_root: data/mini
  train_path: data/mini/train.txt
  num_classes: 2
  transforms:
    - type: Resize
      target_size: [16, 12]
    - type: RandomHorizontalFlip
    - type: RandomDistort
      brightness_range: 0.4
      contrast_range: 0.4
      saturation_range: 0.4
    - type: Normalize
  mode: train
val_dataset:
  type: Dataset
  dataset_root: data/mini
  val_path: data/mini/val.txt
  num_classes: 2
  transforms:
    - type: Resize
      target_size: [16, 12]
    - type: Normalize
  mode: val
"""


def make_data(root: Path, n=3, size=(20, 14), num_classes=2, palette=False) -> Path:
    """``root/data/mini`` with Images/*.jpg, Annotations/*.png, train.txt and val.txt."""
    mini = root / "data" / "mini"
    (mini / "Images" / "sub").mkdir(parents=True)
    (mini / "Annotations").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(img).save(mini / "Images" / "sub" / f"im{i}.jpg")
        lab = Image.fromarray(rng.integers(0, num_classes, (size[1], size[0]), dtype=np.uint8),
                              mode="L")
        if palette:
            lab = lab.convert("P")
            lab.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
        lab.save(mini / "Annotations" / f"im{i}.png")
        lines.append(f"Images/sub/im{i}.jpg Annotations/im{i}.png")
    (mini / "train.txt").write_text("\n".join(lines) + "\n")
    (mini / "val.txt").write_text("\n".join(lines[:2]) + "\n\n")
    return mini


def write_cfg(path: Path, text: str = SEED_YAML) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cfg_path(tmp_path) -> Path:
    make_data(tmp_path)
    return write_cfg(tmp_path / "seg.yml")


def test_seed_yaml_loads_and_round_trips(cfg_path, tmp_path):
    cfg = load_dataset_config(cfg_path)
    assert cfg.num_classes == 2 and cfg.batch_size == 4 and cfg.iters == 1000
    assert cfg.train.list_path == tmp_path / "data/mini/train.txt"
    assert cfg.val.dataset_root == tmp_path / "data/mini" and cfg.val.mode == "val"
    assert cfg.val.transforms[0] == {"type": "Resize", "target_size": [16, 12]}
    again = write_cfg(tmp_path / "again.yml", yaml.safe_dump(cfg.to_dict()))
    assert load_dataset_config(again) == cfg


def test_paths_resolve_beside_yaml_first_then_cwd(tmp_path, monkeypatch):
    make_data(tmp_path / "proj")
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    monkeypatch.chdir(tmp_path / "proj")  # PaddleSeg style: paths relative to the cwd
    cfg = load_dataset_config(write_cfg(cfg_dir / "seg.yml"))
    assert cfg.val.list_path == tmp_path / "proj/data/mini/val.txt"
    make_data(cfg_dir)  # now they exist beside the YAML: those win
    cfg = load_dataset_config(cfg_dir / "seg.yml")
    assert cfg.val.list_path == cfg_dir / "data/mini/val.txt"


@pytest.mark.parametrize("old,new,key,hint", [
    ("val_dataset:", "val_datset:", "val_datset", "val_dataset"),
    ("    - type: Normalize\n  mode: val", "    - type: Normalize\n  tranforms: []\n  mode: val",
     "val_dataset.tranforms", "transforms"),
    ("  num_classes: 2\n  transforms:\n    - type: Resize\n      target_size: [16, 12]\n    - type: Normalize",
     "  num_classes: 2\n  transforms:\n    - type: Resize\n      target_sze: [16, 12]\n    - type: Normalize",
     "val_dataset.transforms[0].target_sze", "target_size"),
])
def test_unknown_keys_name_file_dotted_key_and_suggest(tmp_path, old, new, key, hint):
    assert old in SEED_YAML
    path = write_cfg(tmp_path / "bad.yml", SEED_YAML.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    assert str(path) in str(err.value) and key in str(err.value)
    assert f"did you mean {hint!r}" in str(err.value)


@pytest.mark.parametrize("old,new,key", [
    ("num_classes: 2\n  transforms:\n    - type: Resize\n      target_size: [16, 12]\n    - type: Normalize",
     "num_classes: two\n  transforms:\n    - type: Resize\n      target_size: [16, 12]\n    - type: Normalize",
     "val_dataset.num_classes"),
    ("mode: val", "mode: eval", "val_dataset.mode"),
    ("batch_size: 4", "batch_size: [4]", "batch_size"),
    ("  mode: train", "  mode: train\n  ignore_index: true", "train_dataset.ignore_index"),
    ("  mode: train", "  mode: train\n  transforms: Resize", "train_dataset.transforms"),
])
def test_wrong_types_name_the_key(tmp_path, old, new, key):
    assert old in SEED_YAML
    path = write_cfg(tmp_path / "bad.yml", SEED_YAML.replace(old, new, 1))
    with pytest.raises(ConfigError, match="expected") as err:
        load_dataset_config(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_other_dataset_types_are_rejected(tmp_path):
    path = write_cfg(tmp_path / "c.yml", SEED_YAML.replace("type: Dataset", "type: ADE20K", 1))
    with pytest.raises(ConfigError, match=r"train_dataset\.type.*supported: .*Dataset"):
        load_dataset_config(path)


def test_base_inheritance(cfg_path, tmp_path):
    child = write_cfg(tmp_path / "child.yml", """
        _base_: seg.yml
        batch_size: 8
        val_dataset:
          num_classes: 2
          ignore_index: 0
    """)
    cfg = load_dataset_config(child)
    assert cfg.batch_size == 8 and cfg.val.ignore_index == 0
    assert cfg.val.transforms == load_dataset_config(cfg_path).val.transforms


def test_val_mode_keeps_label_size_train_mode_transforms_it(cfg_path):
    val = build_dataset(cfg_path, "val")
    assert len(val) == 2
    s = val[0]
    assert s.image.shape == (3, 12, 16) and s.label.shape == (14, 20) and s.label.dtype == np.int64
    assert s.path.endswith("im0.jpg")
    raw = np.asarray(Image.open(Path(s.path).parents[2] / "Annotations/im0.png"))
    np.testing.assert_array_equal(s.label, raw)
    train = build_dataset(cfg_path, "train")
    t = train[1]
    assert t.image.shape == (3, 12, 16) and t.label.shape == (12, 16)
    assert np.array_equal(train[1].image, t.image)  # seeded per (seed, epoch, index)
    train.set_epoch(1)
    assert not np.array_equal(train[1].image, t.image)


def test_palette_labels_keep_indices(tmp_path):
    make_data(tmp_path, palette=True)
    s = build_dataset(write_cfg(tmp_path / "seg.yml"), "val")[0]
    assert set(np.unique(s.label)) == {0, 1}


def test_label_out_of_range_names_file(tmp_path):
    make_data(tmp_path, num_classes=4)
    ds = build_dataset(write_cfg(tmp_path / "seg.yml"), "val")
    with pytest.raises(DataError, match=r"im0\.png has values 2, 3 outside \[0, 2\)"):
        ds[0]


def test_missing_file_names_list_and_line(cfg_path, tmp_path):
    (tmp_path / "data/mini/Annotations/im1.png").unlink()
    with pytest.raises(DataError, match=r"val\.txt:2: label file not found: .*im1\.png"):
        build_dataset(cfg_path, "val")


def test_empty_list_and_corrupt_image(cfg_path, tmp_path):
    (tmp_path / "data/mini/Images/sub/im0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*im0\.jpg"):
        build_dataset(cfg_path, "val")[0]
    (tmp_path / "data/mini/val.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"val\.txt lists no images"):
        build_dataset(cfg_path, "val")


def test_unlabeled_lines_separator_and_collate(tmp_path):
    mini = make_data(tmp_path)
    (mini / "val.txt").write_text("Images/sub/im0.jpg\nImages/sub/im1.jpg\n")
    cfg = load_dataset_config(write_cfg(tmp_path / "seg.yml"))
    ds = SegDataset(cfg.val)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 12, 16) and batch["label"] is None
    (mini / "val.txt").write_text("Images/sub/im0.jpg,Annotations/im0.png\nImages/sub/im1.jpg\n")
    cfg.val.separator = ","
    ds = SegDataset(cfg.val)
    assert ds[0].label is not None and ds[1].label is None
    with pytest.raises(DataError, match="mixes labeled and unlabeled"):
        collate([ds[0], ds[1]])


def test_collate_labels_and_shape_mismatch(cfg_path):
    train = build_dataset(cfg_path, "train")
    batch = collate([train[0], train[1]])
    assert batch["label"].shape == (2, 12, 16) and str(batch["label"].dtype) == "torch.int64"
    val = build_dataset(cfg_path, "val", transforms=[{"type": "Resize", "target_size": [8, 8]}])
    assert val[0].image.shape == (3, 8, 8)
    other = build_dataset(cfg_path, "val", transforms=[])
    with pytest.raises(DataError, match="different shapes"):
        collate([val[0], other[0]])


def test_missing_list_path_is_an_error_naming_the_key(tmp_path):
    make_data(tmp_path)
    path = write_cfg(tmp_path / "seg.yml", SEED_YAML.replace("  val_path: data/mini/val.txt\n", ""))
    assert load_dataset_config(path).val.list_path is None
    with pytest.raises(ConfigError, match=r"val_dataset\.val_path"):
        build_dataset(path, "val")
    with pytest.raises(ConfigError, match=r"val_dataset\.test_path"):
        build_dataset(path, "test")


def test_test_split_uses_test_path(tmp_path):
    make_data(tmp_path)
    path = write_cfg(tmp_path / "seg.yml", SEED_YAML.replace(
        "  val_path: data/mini/val.txt\n", "  val_path: data/mini/val.txt\n  test_path: data/mini/train.txt\n"))
    ds = build_dataset(path, "test")
    assert len(ds) == 3 and ds.mode == "test" and ds[2].label.shape == (14, 20)


def test_image_folder(tmp_path):
    make_data(tmp_path)
    (tmp_path / "data/mini/Images/notes.txt").write_text("skip me")
    ds = ImageFolder(tmp_path / "data/mini/Images", [{"type": "Resize", "target_size": [10, 10]}])
    assert [Path(p).name for p in ds.files] == ["im0.jpg", "im1.jpg", "im2.jpg"]
    s = ds[2]
    assert s.image.shape == (3, 10, 10) and s.label is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolder(tmp_path / "nowhere")


def test_real_mini_supervisely(assets, tmp_path):
    root = assets / "data" / "mini_supervisely"
    cfg = write_cfg(tmp_path / "seg.yml", SEED_YAML.replace("data/mini", str(root))
                    .replace("[16, 12]", "[192, 192]"))
    val = build_dataset(load_dataset_config(cfg), "val")
    assert isinstance(load_dataset_config(cfg), DatasetConfig) and len(val) == 100
    for i in (0, 57, 99):
        s = val[i]
        assert s.image.shape == (3, 192, 192) and s.image.dtype == np.float32
        assert -1.0 <= s.image.min() and s.image.max() <= 1.0
        assert set(np.unique(s.label)) <= {0, 1}


def test_gray_images_with_img_channels_1(tmp_path):
    make_data(tmp_path)
    text = SEED_YAML.replace("  mode: val", "  mode: val\n  img_channels: 1").replace(
        "    - type: Normalize\n  mode: val", "    - type: Normalize\n      mean: [0.5]\n      std: [0.5]\n  mode: val")
    s = build_dataset(write_cfg(tmp_path / "seg.yml", text), "val")[0]
    assert s.image.shape == (1, 12, 16)


def test_val_cache_keeps_labels_at_their_own_size(cfg_path):
    plain = build_dataset(cfg_path, "val")
    cached = build_dataset(cfg_path, "val")
    cached.cache_decoded()
    for _ in range(2):
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.label, b.label)
            assert b.label.shape == (14, 20) and b.image.shape == (3, 12, 16)


def test_decoded_cache_changes_nothing_but_the_cost(cfg_path, monkeypatch):
    plain = build_dataset(cfg_path, "train")
    cached = build_dataset(cfg_path, "train")
    cached.cache_decoded()
    for epoch in (0, 1, 0):  # random transforms must not alter what the cache holds
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.label, b.label)
    import slimseg.data.datasets as datasets

    def no_more_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(datasets, "load_image", no_more_decoding)
    cached[0]  # served from memory
    assert not cached._cache[0][0].flags.writeable  # an in-place op fails instead of corrupting
    small = build_dataset(cfg_path, "train")
    small.cache_decoded(max_bytes=0)  # over budget: decoded every time, nothing kept
    with pytest.raises(AssertionError, match="decoded again"):
        small[0]
