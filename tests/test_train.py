"""The training loop: distillation converges, eval cadence, best tracking, early stop, NaN,
learning-rate schedule as applied by the optimizer, gradient clipping, epochs, hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimseg.compress.distill import Distiller
from slimseg.config import Distillation, TrainConfig
from slimseg.config.lr import PiecewiseDecay
from slimseg.config.train import GradClip, OptimizerBuilder, OptimizerSpec
from slimseg.errors import DataError, SlimsegError
from slimseg.model.torch_graph import TorchGraph
from slimseg.train import DEFAULT_TRAIN_ITERS, TrainResult, default_total_iters, train
from test_distill import TWO_CONV, with_weights


def sgd(lr=0.1, **kw) -> TrainConfig:
    return TrainConfig(learning_rate=lr, optimizer_builder=OptimizerBuilder(**kw), **_iters())


def _iters():
    return {"train_iter": 10, "eval_iter": 3, "logging_iter": 2}


class Scalar:
    """loss(batch) = slope * w (gradient = slope): each SGD step moves w by exactly lr * slope."""

    def __init__(self, slope=1.0, nan_at=None):
        self.w = nn.Parameter(torch.zeros(()))
        self.slope, self.nan_at, self.calls = slope, nan_at, 0

    def __call__(self, batch):
        self.calls += 1
        value = self.slope * self.w
        return value * float("nan") if self.calls == self.nan_at else value


def batches(n=4):
    return lambda epoch: [{"image": torch.zeros(1), "label": None} for _ in range(n)]


def test_distillation_loss_falls_toward_the_teacher():
    torch.manual_seed(0)
    teacher = TorchGraph(with_weights(TWO_CONV))
    student = TorchGraph(with_weights(TWO_CONV))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    distiller = Distiller(student, teacher, Distillation(node=["h", "logits"]))
    images = [torch.randn(4, 3, 8, 8) for _ in range(5)]
    factory = lambda epoch: [{"image": x, "label": None} for x in images]  # noqa: E731
    probe = torch.randn(4, 3, 8, 8)
    before = distiller(probe)[0].item()
    adam = OptimizerBuilder(optimizer=OptimizerSpec(type="Adam"))
    cfg = TrainConfig(learning_rate=0.01, optimizer_builder=adam)
    result = train(distiller, student.parameters(), factory, train_cfg=cfg, total_iters=50, progress=False)
    after = distiller(probe)[0].item()
    assert result.iterations == 50 and len(result.history) == 50
    assert after < 0.3 * before
    assert all(p.grad is None for p in teacher.parameters())


def test_evaluates_every_eval_iter_and_at_the_end():
    seen = []
    model = Scalar()
    result = train(model, [model.w], batches(), train_cfg=sgd(), total_iters=10, progress=False,
                   evaluate=lambda: seen.append(model.calls) or 0.0)
    assert seen == [3, 6, 9, 10]
    assert [h["iteration"] for h in result.history if "metric" in h] == [3, 6, 9, 10]


def test_best_metric_and_on_best():
    metrics = iter([0.1, 0.5, 0.3, 0.4])
    best = []
    model = Scalar()
    result = train(model, [model.w], batches(), train_cfg=sgd(), total_iters=10, progress=False,
                   evaluate=lambda: next(metrics), on_best=lambda it, m: best.append((it, m)))
    assert best == [(3, 0.1), (6, 0.5)]
    assert (result.best_metric, result.best_iteration) == (0.5, 6)
    assert not result.stopped_early and result.iterations == 10


def test_early_stop_at_target_metric():
    metrics = iter([0.1, 0.5, 0.9])
    model = Scalar()
    cfg = TrainConfig(train_iter=10, eval_iter=3, target_metric=0.45)
    result = train(model, [model.w], batches(), train_cfg=cfg, total_iters=10, progress=False,
                   evaluate=lambda: next(metrics))
    assert result.stopped_early and result.iterations == 6 and model.calls == 6
    assert result.best_metric == 0.5


def test_nan_loss_names_the_iteration():
    model = Scalar(nan_at=4)
    with pytest.raises(SlimsegError, match="iteration 4.*learning rate.*grad_clip"):
        train(model, [model.w], batches(), train_cfg=sgd(), total_iters=10, progress=False)


def test_learning_rate_schedule_is_what_the_optimizer_applies():
    cfg = TrainConfig(learning_rate=PiecewiseDecay(boundaries=[2, 4], values=[0.1, 0.01, 0.001]))
    model = Scalar()
    weights = [0.0]
    result = train(model, [model.w], batches(), train_cfg=cfg, total_iters=6, progress=False,
                   after_step=lambda it: weights.append(model.w.item()))
    steps = [a - b for a, b in zip(weights, weights[1:])]   # SGD: w -= lr * 1
    expected = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert steps == pytest.approx(expected, rel=1e-4)   # float32 weights
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_gradient_clipping_applies():
    clip = GradClip(type="ClipGradByValue", max=0.5)
    model = Scalar(slope=100.0)
    train(model, [model.w], batches(), train_cfg=sgd(lr=0.1, grad_clip=clip), total_iters=3,
          progress=False)
    assert model.w.item() == pytest.approx(-3 * 0.1 * 0.5)


def test_epochs_hooks_and_set_epoch():
    class Loader(list):
        def __init__(self, epoch, log):
            super().__init__({"image": torch.zeros(1)} for _ in range(3))
            self.dataset, self.log = self, log

        def set_epoch(self, epoch):
            self.log.append(epoch)

    epochs, before, after = [], [], []
    model = Scalar()
    total = default_total_iters(TrainConfig(epochs=3), dataset_len=9, batch_size=4)
    assert total == 9   # ceil(9 / 4) = 3 batches per epoch
    result = train(model, [model.w], lambda e: Loader(e, epochs), train_cfg=TrainConfig(epochs=3),
                   total_iters=7, progress=False, before_step=before.append, after_step=after.append)
    assert epochs == [0, 1, 2] and before == after == list(range(1, 8))
    assert isinstance(result, TrainResult) and result.iterations == 7
    assert result.seconds_per_iter > 0 and result.seconds >= result.seconds_per_iter
    assert result.peak_rss_mb > 10


def test_default_total_iters():
    assert default_total_iters(TrainConfig(train_iter=123), 10, 2) == 123
    assert default_total_iters(TrainConfig(), 10, 2) == DEFAULT_TRAIN_ITERS
    assert default_total_iters(TrainConfig(epochs=2), 10, 4, drop_last=True) == 4
    with pytest.raises(DataError):
        default_total_iters(TrainConfig(epochs=2), 0, 4)


def test_log_lines_and_empty_loader():
    lines = []
    model = Scalar()
    train(model, [model.w], batches(), train_cfg=sgd(), total_iters=4, progress=False, log=lines.append)
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    with pytest.raises(DataError, match="no batches"):
        train(model, [model.w], lambda e: [], train_cfg=sgd(), total_iters=4, progress=False)


def test_loss_without_trainable_parameters_is_an_error():
    w = nn.Parameter(torch.zeros(()))
    with pytest.raises(SlimsegError, match="trainable"):
        train(lambda b: torch.tensor(1.0), [w], batches(), train_cfg=sgd(), total_iters=2, progress=False)
