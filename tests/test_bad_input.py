"""Bad input as a new user meets it (issue 6, item 5): one test per row of docs/errors.md.

Every case goes through the real CLI (`slimseg.cli.main`, a few through `python -m slimseg`) and
must give ONE line naming the problem and the fix, a non-zero exit code, no traceback, and
leave nothing behind: an output folder is absent afterwards, or untouched when it existed.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper
from PIL import Image

import slimseg.io
import slimseg.model.importers as importers
from conftest import ROOT
from helpers import decisive_model, write_project
from slimseg.cli import main

PTQ = "QuantPost:\n  algo: minmax\n  batch_size: 2\n  batch_nums: 1\n"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def project(tmp_path):
    return write_project(tmp_path)


# --- how every case is judged ---------------------------------------------------------------

def fails_cleanly(argv, capsys, *expected: str) -> str:
    """Run the CLI; it must exit non-zero with one line on stderr holding every `expected` text."""
    code = main([*argv, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def nothing_left(save_dir: Path) -> None:
    """No save_dir and no temporary sibling (.<name>.*.partial) was left behind."""
    assert not save_dir.exists()
    assert not [p for p in save_dir.parent.glob(f".{save_dir.name}.*")]


def compress_argv(model, data, strategy: Path, save_dir: Path) -> list[str]:
    return ["compress", "--model", str(model), "--strategy_config", str(strategy),
            "--dataset_config", str(data), "--save_dir", str(save_dir)]


def ptq_yaml(tmp_path: Path, text: str = PTQ) -> Path:
    path = tmp_path / "strategy.yaml"
    path.write_text(text)
    return path


def _edit_yaml(path: Path, edit) -> None:
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))


def _deny_reading(monkeypatch, denied: Path) -> None:
    """As if `denied` were chmod 000 for a non-root user (root reads everything)."""
    real_open = open

    def guarded(file, *args, **kwargs):
        if Path(file).resolve() == denied.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(importers, "open", guarded, raising=False)


def _fake_paddle_dir(root: Path) -> Path:
    root.mkdir()
    (root / "model.pdmodel").write_bytes(b"\x08\x01 not really a program")
    (root / "model.pdiparams").write_bytes(b"\x00" * 64)
    return root


# --- the model ------------------------------------------------------------------------------

def test_missing_model_file(project, capsys, tmp_path):
    _, data = project
    fails_cleanly(["eval", "--model", str(tmp_path / "nope.onnx"), "--dataset_config", str(data)], capsys,
                  "nope.onnx", "no such model file or folder")


def test_folder_without_a_model(project, capsys, tmp_path):
    _, data = project
    (tmp_path / "empty").mkdir()
    fails_cleanly(["eval", "--model", str(tmp_path / "empty"), "--dataset_config", str(data)], capsys,
                  "no model.pdmodel", "no .onnx file")


def test_unreadable_model_file(project, capsys, monkeypatch):
    model, data = project
    _deny_reading(monkeypatch, model)
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys,
                  f"cannot read {model}", "Permission denied", "permissions")


@pytest.mark.skipif(IS_ROOT, reason="running as root: chmod 000 does not stop root from reading "
                                    "(test_unreadable_model_file simulates it instead)")
def test_unreadable_model_file_chmod(project, capsys):
    model, data = project
    model.chmod(0)
    try:
        fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys,
                      "Permission denied")
    finally:
        model.chmod(0o644)


def test_unreadable_paddle_params(capsys, monkeypatch, tmp_path):
    folder = _fake_paddle_dir(tmp_path / "paddle")
    _deny_reading(monkeypatch, folder / "model.pdiparams")
    fails_cleanly(["inspect", "--model_dir", str(folder)], capsys, "model.pdiparams", "Permission denied")


def test_missing_paddle_params(capsys, tmp_path):
    folder = _fake_paddle_dir(tmp_path / "paddle")
    (folder / "model.pdiparams").unlink()
    fails_cleanly(["inspect", "--model_dir", str(folder)], capsys, "model.pdiparams", "--params_filename")


def test_truncated_onnx(project, capsys, tmp_path):
    model, data = project
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model.read_bytes()[:200])
    fails_cleanly(["eval", "--model", str(cut), "--dataset_config", str(data)], capsys,
                  "cut.onnx", "not a readable ONNX model")


def test_paddle_model_without_paddle2onnx(capsys, monkeypatch, tmp_path):
    folder = _fake_paddle_dir(tmp_path / "paddle")
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # `import paddle2onnx` raises ImportError
    fails_cleanly(["inspect", "--model_dir", str(folder)], capsys,
                  "'paddle2onnx'", "pip install 'slimseg[paddle]'")


def test_custom_domain_op(project, capsys, tmp_path):
    _, data = project
    model = decisive_model(extra_node=helper.make_node("Magic", ["pre"], ["logits"], name="magic",
                                                       domain="com.acme"))
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    fails_cleanly(["eval", "--model", str(path), "--dataset_config", str(data)], capsys,
                  "'Magic'", "'magic'", "com.acme", "standard ONNX ops")


def test_op_compress_cannot_train_fails_before_any_work(project, capsys, tmp_path):
    _, data = project
    path = tmp_path / "lrn.onnx"
    onnx.save(decisive_model(extra_node=helper.make_node("LRN", ["pre"], ["logits"], name="lrn", size=3)), path)
    out = tmp_path / "out"
    fails_cleanly(compress_argv(path, data, ptq_yaml(tmp_path), out), capsys,
                  "'LRN'", "'lrn'", "cannot be trained")
    nothing_left(out)


def test_input_shape_with_wrong_channels(project, capsys):
    model, data = project
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data), "--input_shape", "1,4,16,16"],
                  capsys, "3 channels", "asks for 4")


# --- the dataset ------------------------------------------------------------------------------

def _break(data: Path, case: str) -> str:
    """Damage the dataset next to `data` the way `case` says; return a text the error must hold."""
    root = data.parent
    if case == "missing image":
        (root / "images" / "val1.png").unlink()
        return "val.txt:2: image file not found"
    if case == "missing label":
        (root / "labels" / "val2.png").unlink()
        return "val.txt:3: label file not found"
    if case == "truncated png":
        png = root / "images" / "val1.png"
        png.write_bytes(png.read_bytes()[:80])
        return "cannot read image"
    if case == "truncated jpeg":
        jpg = root / "images" / "val1.jpg"
        Image.open(root / "images" / "val1.png").save(jpg, quality=90)
        jpg.write_bytes(jpg.read_bytes()[:300])
        (root / "val.txt").write_text((root / "val.txt").read_text().replace("val1.png labels", "val1.jpg labels"))
        return "cannot read image"
    if case == "truncated label":
        label = root / "labels" / "val0.png"
        label.write_bytes(label.read_bytes()[:60])
        return "cannot read label"
    if case == "text file as image":
        (root / "images" / "val0.png").write_text("not an image")
        return "cannot read image"
    raise AssertionError(case)


@pytest.mark.parametrize("case, fix", [
    ("missing image", "fix that line, or dataset_root"),
    ("missing label", "fix that line, or dataset_root"),
    ("truncated png", "replace the file or remove it from the list"),
    ("truncated jpeg", "replace the file or remove it from the list"),
    ("truncated label", "replace the file or remove it from the list"),
    ("text file as image", "replace the file or remove it from the list"),
])
def test_broken_dataset_files(project, capsys, case, fix):
    model, data = project
    problem = _break(data, case)
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys, problem, fix)


def test_label_values_out_of_range(project, capsys):
    model, data = project
    label = data.parent / "labels" / "val2.png"
    values = np.array(Image.open(label))
    values[0, :3] = 7
    Image.fromarray(values).save(label)
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys,
                  "val2.png has values 7 outside [0, 3)", "num_classes / ignore_index")


def test_num_classes_not_matching_the_model(project, capsys, tmp_path):
    model, data = project
    _edit_yaml(data, lambda c: [c[s].update(num_classes=5) for s in ("train_dataset", "val_dataset")])
    out = tmp_path / "out"
    fails_cleanly(compress_argv(model, data, ptq_yaml(tmp_path), out), capsys,
                  "outputs 3 classes", "num_classes=5", "set num_classes: 3")
    nothing_left(out)


def test_images_not_the_size_the_model_takes(project, capsys):
    model, data = project
    _edit_yaml(data, lambda c: c["val_dataset"]["transforms"][0].update(target_size=[24, 24]))
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys,
                  "3x24x24", "takes 3x16x16", "Resize target_size: [16, 16]")


def test_empty_list_file(project, capsys, tmp_path):
    model, data = project
    (data.parent / "val.txt").write_text("\n")
    out = tmp_path / "out"
    fails_cleanly(compress_argv(model, data, ptq_yaml(tmp_path), out), capsys,
                  "val.txt lists no images", "add lines")
    nothing_left(out)


# --- the YAML files ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (PTQ.replace("batch_nums", "batch_nmus"), ("QuantPost.batch_nmus", "did you mean 'batch_nums'")),
    ("QuantAware: {}\nTrainConfig:\n  train_iter: \"abc\"\n", ("TrainConfig.train_iter", "expected an integer")),
    ("QuantPost:\n  algo: [minmax\n", ("invalid YAML: line 3, column 1",)),
    ("Quantpost:\n  algo: minmax\n", ("Quantpost", "did you mean 'QuantPost'")),
], ids=["typo", "wrong-type", "syntax", "section-typo"])
def test_bad_strategy_yaml(project, capsys, tmp_path, text, expected):
    model, data = project
    out = tmp_path / "out"
    fails_cleanly(compress_argv(model, data, ptq_yaml(tmp_path, text), out), capsys, "strategy.yaml", *expected)
    nothing_left(out)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["val_dataset"].update(num_class=c["val_dataset"].pop("num_classes")),
     ("val_dataset.num_class", "did you mean 'num_classes'")),
    (lambda c: c["val_dataset"].update(num_classes="three"), ("val_dataset.num_classes", "expected an integer")),
], ids=["typo", "wrong-type"])
def test_bad_dataset_yaml(project, capsys, edit, expected):
    model, data = project
    _edit_yaml(data, edit)
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(data)], capsys, "dataset.yaml", *expected)


def test_a_model_passed_where_a_yaml_goes(project, capsys, tmp_path):
    model, data = project
    fails_cleanly(["eval", "--model", str(model), "--dataset_config", str(model)], capsys,
                  "cannot read it as a YAML text file", "pass the dataset YAML here")
    out = tmp_path / "out"
    fails_cleanly(compress_argv(model, data, model, out), capsys, "pass the strategy YAML here")
    nothing_left(out)


# --- the output -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compress", "predict", "export"])
def test_output_under_a_file(project, capsys, tmp_path, command):
    model, data = project
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = blocker / "out"
    argv = {"compress": compress_argv(model, data, ptq_yaml(tmp_path), out),
            "predict": ["predict", str(model), str(data.parent / "images"), "-o", str(out),
                        "--dataset_config", str(data)],
            "export": ["export", str(model), "-o", str(out / "model.onnx")]}[command]
    fails_cleanly(argv, capsys, "a_file is a file, not a folder", "choose another")
    assert blocker.read_text() == "keep me"


def test_save_dir_is_a_file(project, capsys, tmp_path):
    model, data = project
    out = tmp_path / "out"
    out.write_text("keep me")
    fails_cleanly(compress_argv(model, data, ptq_yaml(tmp_path), out), capsys,
                  "is a file, not a folder", "choose another output folder")
    assert out.read_text() == "keep me"


@pytest.mark.skipif(IS_ROOT, reason="running as root: a chmod 555 folder is still writable for root "
                                    "(test_output_under_a_file covers a save_dir that cannot be made)")
def test_save_dir_parent_not_writable(project, capsys, tmp_path):
    model, data = project
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        fails_cleanly(compress_argv(model, data, ptq_yaml(tmp_path), parent / "out"), capsys,
                      "Permission denied", "choose a writable output location")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def _disk_full(monkeypatch) -> None:
    def full(path, data):
        Path(path).write_bytes(data[: len(data) // 2])  # half a file, as a real full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(slimseg.io, "write_bytes", full)


def test_disk_full_while_saving_compress(project, capsys, monkeypatch, tmp_path):
    model, data = project
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous result")
    _disk_full(monkeypatch)
    fails_cleanly([*compress_argv(model, data, ptq_yaml(tmp_path), out), "--overwrite"], capsys,
                  "No space left on device", "free some space")
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"the previous result"
    assert not [p for p in tmp_path.glob(".out.*")]


def test_disk_full_while_saving_export(project, capsys, monkeypatch, tmp_path):
    model, _ = project
    target = tmp_path / "exported.onnx"
    target.write_bytes(b"old")
    _disk_full(monkeypatch)
    fails_cleanly(["export", str(model), "-o", str(target)], capsys, "No space left on device", "free some space")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []


# --- the real entry point, in a child process ------------------------------------------------

def test_python_dash_m_gives_one_line(project, tmp_path):
    model, data = project
    argv = ["compress", "--model", str(model), "--strategy_config", str(model), "--dataset_config", str(data),
            "--save_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "slimseg", *argv, "--quiet"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "pass the strategy YAML here" in done.stderr
    assert not (tmp_path / "out").exists()
