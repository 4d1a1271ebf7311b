"""Progress and interruption: the bar shows iteration, ETA, loss and the last metric; Ctrl-C
stops after the step, checkpoints and says how to resume (exit code 130, save_dir untouched);
--quiet keeps the console silent while save_dir/compress.log keeps every line."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from slimseg.checkpoint import Checkpointer, checkpoint_dir
from slimseg.config import TrainConfig
from slimseg.config.train import OptimizerBuilder, OptimizerSpec
from slimseg.train import TrainingInterrupted, TrainSession, train

TESTS = Path(__file__).resolve().parent


class Quadratic:
    """loss = mean((w - target)^2) over a batch of targets: momentum makes the path depend
    on the optimizer state, so a resume that lost it would not end at the same weights."""

    def __init__(self):
        self.w = nn.Parameter(torch.zeros(3))

    def __call__(self, batch):
        return ((self.w - batch["target"]) ** 2).mean()


def loader(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    return [{"target": torch.randn(4, 3, generator=g)} for _ in range(4)]


CFG = TrainConfig(train_iter=12, eval_iter=3, logging_iter=3, learning_rate=0.1,
                  optimizer_builder=OptimizerBuilder(optimizer=OptimizerSpec(type="Momentum")))


def _run(session=None, after_step=None, best=None):
    model = Quadratic()
    metric = lambda: -float(model.w.detach().norm())  # noqa: E731
    best = {} if best is None else best
    result = train(model, [model.w], loader, train_cfg=CFG, total_iters=12, evaluate=metric, progress=False,
                   on_best=lambda it, m: best.update(it=it, w=model.w.detach().clone()),
                   after_step=after_step, session=session, state={"best": best})
    return model, result, best


def test_ctrl_c_checkpoints_after_the_step_and_resume_matches(tmp_path):
    want, want_result, want_best = _run()
    folder = tmp_path / "ckpt"
    session = TrainSession(checkpointer=Checkpointer(folder, fingerprint="k"), stage="demo")

    def ctrl_c_at_7(iteration):
        if iteration == 7:
            os.kill(os.getpid(), signal.SIGINT)   # the loop finishes this step, then stops

    with pytest.raises(TrainingInterrupted, match="iteration 7 of 12.*--resume"):
        _run(session, after_step=ctrl_c_at_7)
    assert torch.load(folder / "train-demo.pt", weights_only=False)["iteration"] == 7
    resumed = TrainSession(checkpointer=Checkpointer(folder, fingerprint="k", resume=True), stage="demo")
    got, got_result, got_best = _run(resumed)
    assert torch.equal(got.w, want.w)
    assert [h["loss"] for h in got_result.history] == [h["loss"] for h in want_result.history]
    assert (got_result.best_metric, got_result.best_iteration) == (want_result.best_metric, want_result.best_iteration)
    assert got_best["it"] == want_best["it"] and torch.equal(got_best["w"], want_best["w"])


def test_a_generic_loader_resumes_mid_epoch(tmp_path):
    """Without ``accepts_start`` the loop re-reads the epoch and drops the consumed batches."""
    want, _, _ = _run()
    folder = tmp_path / "ckpt"
    session = TrainSession(checkpointer=Checkpointer(folder, fingerprint="k"), stage="demo")

    def crash_at_8(iteration):
        if iteration == 8:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        _run(session, after_step=crash_at_8)
    state = torch.load(folder / "train-demo.pt", weights_only=False)
    assert (state["iteration"], state["epoch"], state["position"]) == (6, 1, 2)   # mid-epoch
    got, _, _ = _run(TrainSession(checkpointer=Checkpointer(folder, fingerprint="k", resume=True), stage="demo"))
    assert torch.equal(got.w, want.w)


def test_progress_bar_shows_iteration_eta_loss_and_metric(capsys):
    import re

    model = Quadratic()
    train(model, [model.w], loader, train_cfg=CFG, total_iters=12, evaluate=lambda: 0.25, progress=True,
          session=TrainSession(stage="qat"))
    err = capsys.readouterr().err
    assert re.search(r"qat: +\d+%.*\b([3-9]|1[0-2])/12 \[\d\d:\d\d<\d\d:\d\d", err)   # stage, iteration, ETA
    assert "loss=" in err and "metric=0.2500" in err                   # shown as soon as evaluated


def test_cli_ctrl_c_exits_130_with_a_resume_hint_and_quiet_console(tmp_path):
    sys.path.insert(0, str(TESTS))
    import onnx
    from test_checkpoint_resume import _child, _strategy_file, _wait_for, tiny_convnet

    from slimseg.demo import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", train=12, val=3, size=16, seed=1)
    model = tmp_path / "model.onnx"
    onnx.save(tiny_convnet(), model)
    out = tmp_path / "out"
    proc = _child(model, data, out, _strategy_file(tmp_path))
    _wait_for(checkpoint_dir(out) / "train-qat.pt", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("slimseg compress: interrupted: stopped at iteration") and "--resume" in last
    assert "QAT:" not in stderr and not stdout.strip()               # --quiet: no info lines, no bars
    assert not out.exists() and not list(tmp_path.glob(".out.*"))    # nothing half-written
    state = torch.load(checkpoint_dir(out) / "train-qat.pt", weights_only=False)
    assert f"iteration {state['iteration']} of 20" in last           # the final checkpoint is that step
    log = (checkpoint_dir(out) / "compress.log").read_text()
    assert "QAT: 20 iterations" in log and "stopped at iteration" in log
