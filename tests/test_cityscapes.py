"""``type: Cityscapes``: the leftImg8bit/gtFine layout loads without list files."""
import numpy as np
import pytest
import yaml
from PIL import Image

from slimseg.data import build_dataset, load_dataset_config
from slimseg.data.cityscapes import CLASSES, NUM_CLASSES
from slimseg.errors import ConfigError, DataError

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def _tree(root, *, per_city=2, size=(24, 12), seed=0, skip_label=None):
    """A tiny Cityscapes tree: random images, trainId labels in 0..18 plus 255."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split, cities in CITIES.items():
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(per_city):
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                label = rng.choice([*range(NUM_CLASSES), 255], (h, w)).astype(np.uint8)
                if stem != skip_label:
                    Image.fromarray(label, mode="L").save(root / "gtFine" / split / city /
                                                          f"{stem}_gtFine_labelTrainIds.png")
                # the other gtFine files of the real set must not be mistaken for labels
                Image.fromarray(label, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def _config(tmp_path, root, **val_extra):
    section = {"type": "Cityscapes", "dataset_root": str(root),
               "transforms": [{"type": "Resize", "target_size": [16, 8]}, {"type": "Normalize"}]}
    cfg = {"train_dataset": {**section, "mode": "train",
                             "transforms": [{"type": "RandomHorizontalFlip"}, {"type": "Normalize"}]},
           "val_dataset": {**section, "mode": "val", **val_extra}}
    path = tmp_path / "cityscapes.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cityscapes_tree_loads_with_19_classes(tmp_path):
    root = _tree(tmp_path / "cityscapes")
    cfg = load_dataset_config(_config(tmp_path, root))
    assert cfg.num_classes == NUM_CLASSES == len(CLASSES) == 19
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 4 and len(val) == 2
    assert [p.image.name for p in val.items] == ["frankfurt_000000_000019_leftImg8bit.png",
                                                 "frankfurt_000001_000019_leftImg8bit.png"]
    for item in val.items:
        assert item.label.name.endswith("_gtFine_labelTrainIds.png")
        assert item.label.parent.parts[-3:] == ("gtFine", "val", "frankfurt")
    sample = val[0]
    assert sample.image.shape == (3, 8, 16) and sample.label.shape == (12, 24)  # val label keeps its size
    values = set(np.unique(np.concatenate([train[i].label.ravel() for i in range(len(train))])))
    assert values <= set(range(19)) | {255} and 255 in values and len(values) > 10
    # the spec round-trips through its YAML form
    again = load_dataset_config(_write(tmp_path / "again.yaml", cfg.to_dict()))
    assert len(build_dataset(again, "val")) == 2 and again.val.type == "Cityscapes"


def test_out_of_range_train_id_is_an_error(tmp_path):
    root = _tree(tmp_path / "cityscapes")
    bad = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((12, 24), 19, np.uint8), mode="L").save(bad)  # a labelId, not a trainId
    val = build_dataset(_config(tmp_path, root), "val")
    with pytest.raises(DataError, match="outside"):
        val[0]


def test_missing_label_and_layout_errors(tmp_path):
    root = _tree(tmp_path / "cityscapes", skip_label="frankfurt_000001_000019")
    with pytest.raises(DataError, match="frankfurt_000001_000019_gtFine_labelTrainIds.png"):
        build_dataset(_config(tmp_path, root), "val")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="leftImg8bit"):
        build_dataset(_config(tmp_path, empty), "val")


def test_num_classes_may_only_repeat_19(tmp_path):
    root = _tree(tmp_path / "cityscapes")
    assert load_dataset_config(_config(tmp_path, root, num_classes=19)).num_classes == 19
    with pytest.raises(ConfigError, match="19 classes"):
        load_dataset_config(_config(tmp_path, root, num_classes=11))


def test_example_yaml_parses():
    from pathlib import Path

    cfg = load_dataset_config(Path(__file__).parents[1] / "examples/configs/dataset/cityscapes_1024x512.yaml")
    assert cfg.train.type == cfg.val.type == "Cityscapes" and cfg.num_classes == 19


def test_camvid_yaml_loads_the_shared_copy(assets):
    from pathlib import Path

    cfg = load_dataset_config(Path(__file__).parents[1] / "examples/configs/dataset/camvid_360x480.yaml")
    assert cfg.num_classes == 11
    val = build_dataset(cfg, "val")
    assert len(val) == 101 and len(build_dataset(cfg, "train")) == 367 and len(build_dataset(cfg, "test")) == 233
    sample = val[0]
    assert sample.image.shape == (3, 360, 480) and sample.label.shape == (360, 480)
    assert set(np.unique(sample.label)) <= set(range(11)) | {255}


def _write(path, mapping):
    path.write_text(yaml.safe_dump(mapping))
    return path
