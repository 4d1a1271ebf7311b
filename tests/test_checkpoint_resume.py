"""Checkpoint and resume: a compress run killed with SIGKILL mid-QAT and resumed ends where an
uninterrupted run ends; the checkpoint folder's rules (fingerprint, unfinished run, cleanup)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slimseg.checkpoint import Checkpointer, CheckpointMismatchError, checkpoint_dir, save_atomic
from slimseg.compress.api import compress
from slimseg.demo import make_synthetic_dataset
from slimseg.errors import SlimsegError

ROOT = Path(__file__).resolve().parents[1]
QAT = {"Distillation": {"alpha": 1.0, "loss": "l2"},
       "QuantAware": {"quantize_op_types": ["conv2d"]},
       "QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 1},
       "TrainConfig": {"train_iter": 20, "eval_iter": 5, "logging_iter": 5, "learning_rate": 0.02,
                       "batch_size": 4, "optimizer_builder": {"optimizer": {"type": "Momentum"},
                                                              "weight_decay": 1e-4}}}


def tiny_convnet(classes: int = 3, width: int = 6, seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> Conv 1x1 with random weights: logits without argmax ties."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (width, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, width).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (classes, width, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["logits"], name="conv2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", 1, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", 1, ["N", classes, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _no_html_report(target) -> None:
    """The HTML report (matplotlib) is not what these tests check; it would take most of their time."""
    try:
        import slimseg.report.html as html
    except ImportError:
        return
    for name in ("write_html_report", "sample_overlays"):
        if hasattr(html, name):
            target.setattr(html, name, lambda *a, **k: None)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    _no_html_report(patch)
    root = tmp_path_factory.mktemp("resume")
    data = make_synthetic_dataset(root / "data", train=12, val=3, size=16, seed=1)
    model = root / "model.onnx"
    onnx.save(tiny_convnet(), model)
    reference = compress(model, QAT, data=data, save_dir=root / "reference", progress=False, bench_rounds=2,
                         log_fn=lambda line: None, device="cpu")
    yield model, data, reference
    patch.undo()


CHILD = textwrap.dedent("""
    import sys, time
    import slimseg.train as T
    step = T._Run._step
    def slow_step(self, batch, tic):   # slow enough to be killed mid-training
        time.sleep(0.25)
        step(self, batch, tic)
    T._Run._step = slow_step
    try:   # not what is tested, and slow (matplotlib)
        import slimseg.report.html as H
        H.write_html_report = H.sample_overlays = lambda *a, **k: None
    except ImportError:
        pass
    from slimseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _child(model, data, save_dir, strategy_file) -> subprocess.Popen:
    args = ["compress", "--model", str(model), "--strategy_config", str(strategy_file), "--dataset_config",
            str(data), "--save_dir", str(save_dir), "--quiet", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.05)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _strategy_file(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(QAT))
    return path


def test_killed_run_resumes_to_the_uninterrupted_result(job, tmp_path, monkeypatch):
    model, data, reference = job
    _no_html_report(monkeypatch)
    out = tmp_path / "out"
    proc = _child(model, data, out, _strategy_file(tmp_path))
    _wait_for(checkpoint_dir(out) / "train-qat.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()                                   # nothing half-written in save_dir
    log = (checkpoint_dir(out) / "compress.log").read_text()
    assert "QAT: 20 iterations" in log

    resumed = compress(model, _strategy_file(tmp_path), data=data, save_dir=out, progress=False, bench_rounds=2,
                       log_fn=lambda line: None, resume=True, device="cpu")
    ref, got = reference.report["quantization"]["qat"], resumed.report["quantization"]["qat"]
    assert got["iterations"] == ref["iterations"] == 20
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in ref["history"]], rel=1e-5)
    assert got["best_metric"] == pytest.approx(ref["best_metric"], abs=1e-6)
    assert resumed.report["compressed"]["metrics"]["miou"] == \
        pytest.approx(reference.report["compressed"]["metrics"]["miou"], abs=1e-6)
    want, have = _initializers(reference.model_path), _initializers(resumed.model_path)
    assert want.keys() == have.keys()
    for name in want:
        np.testing.assert_allclose(have[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert not checkpoint_dir(out).exists()                   # removed after a successful finish
    text = (out / "compress.log").read_text()
    assert "QAT: 20 iterations" in text and "qat: resumed at iteration" in text


def _fake_progress(folder: Path, key: str) -> None:
    ckpt = Checkpointer(folder, fingerprint=key)
    ckpt.save_train_state("qat", {"iteration": 3})


def test_resume_with_other_inputs_is_a_clear_error(tmp_path):
    folder = tmp_path / "out.checkpoint"
    _fake_progress(folder, "aaa")
    with pytest.raises(CheckpointMismatchError, match="another run.*--overwrite"):
        Checkpointer(folder, fingerprint="bbb", resume=True)
    with pytest.raises(SlimsegError, match="--resume"):   # progress is never silently thrown away
        Checkpointer(folder, fingerprint="aaa")
    assert Checkpointer(folder, fingerprint="aaa", resume=True).load_train_state("qat") == {"iteration": 3}
    fresh = Checkpointer(folder, fingerprint="bbb", overwrite=True)
    assert not folder.exists() and fresh.load_train_state("qat") is None


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    ckpt = Checkpointer(tmp_path / "none.checkpoint", fingerprint="k", resume=True)
    assert not ckpt.resumed and ckpt.load_train_state("qat") is None


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_atomic({"v": 1}, path)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SlimsegError, match="No space left"):
        save_atomic({"v": 2}, path)
    import torch

    assert torch.load(path, weights_only=False) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
