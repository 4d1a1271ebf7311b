import json

import pytest

from slimseg.demo import make_synthetic_dataset, run_demo
from slimseg.data import build_dataset
from slimseg.errors import SlimsegError


def test_synthetic_dataset_loads_with_all_classes(tmp_path):
    config = make_synthetic_dataset(tmp_path, train=6, val=4, size=32, seed=1)
    val = build_dataset(config, "val")
    assert len(val) == 4
    labels = {int(v) for i in range(len(val)) for v in set(val[i].label.reshape(-1).tolist())}
    assert labels <= {0, 1, 2} and 0 in labels


def test_small_demo_end_to_end(tmp_path):
    save_dir = tmp_path / "demo"
    summary = run_demo(save_dir, epochs=2, train_images=32, val_images=8, progress=False)
    assert (save_dir / "model.onnx").is_file()
    assert json.loads((save_dir / "summary.json").read_text())["epochs"] == 2
    assert summary["torch_vs_onnxruntime_max_abs_diff"] <= 1e-4
    assert 0.0 <= summary["eval"]["miou"] <= 1.0
    assert summary["bench"]["median_ms"] > 0
    # the loss goes down while training
    assert summary["train_loss"][-1] < summary["train_loss"][0]
    # nothing half-written beside the result
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_demo_refuses_to_mix_with_an_existing_result(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("x")
    with pytest.raises(SlimsegError, match="--overwrite"):
        run_demo(tmp_path / "demo", epochs=1, train_images=4, val_images=2, progress=False)
    assert (tmp_path / "demo" / "keep.txt").read_text() == "x"
