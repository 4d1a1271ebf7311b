"""One training loop for every compression stage (QAT now, sparsity and pruning later).

The loop knows nothing about what is trained: it gets a loss (a
:class:`~slimseg.compress.distill.Distiller`, or any ``fn(batch) -> loss | (loss, parts)``),
the parameters to optimise and a ``loader_factory(epoch)`` giving one epoch of batches. Stage
specifics hook in through ``before_step(iteration)`` / ``after_step(iteration)`` (sparsity
masks, EMA, BN freezing) and ``on_best(iteration, metric)`` (the caller snapshots what it needs).

Iterations count from 1; iteration ``i`` runs at learning rate ``schedule(i - 1)``, so the first
step uses ``learning_rate``'s value at step 0 (as ACT steps its schedule once per iteration).
"""
from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slimseg.config import TrainConfig, build_lr_schedule, build_optimizer, clip_gradients
from slimseg.errors import DataError, SlimsegError

DEFAULT_TRAIN_ITERS = 300   # neither epochs nor train_iter: a short fine-tune; eval decides more
SMOOTHING = 0.9             # EMA factor of the loss shown in the progress bar and log


@dataclass
class TrainResult:
    """What happened: ``history`` has one ``{iteration, loss, lr, seconds}`` per iteration
    (``metric`` added where evaluated); ``seconds_per_iter`` is the median without evaluation;
    ``peak_rss_mb`` is the process's peak resident memory so far (not only this run)."""

    iterations: int
    best_metric: float | None
    best_iteration: int | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_iter: float = 0.0
    peak_rss_mb: float = 0.0
    stopped_early: bool = False


def default_total_iters(train_cfg: TrainConfig, dataset_len: int, batch_size: int, *,
                        drop_last: bool = False) -> int:
    """``train_iter``, else ``epochs * batches per epoch``, else :data:`DEFAULT_TRAIN_ITERS`."""
    if train_cfg.train_iter is not None:
        return train_cfg.train_iter
    if train_cfg.epochs is None:
        return DEFAULT_TRAIN_ITERS
    if dataset_len < 1 or batch_size < 1:
        raise DataError(f"cannot train {train_cfg.epochs} epoch(s) on {dataset_len} sample(s) "
                        f"in batches of {batch_size}")
    per_epoch = dataset_len // batch_size if drop_last else math.ceil(dataset_len / batch_size)
    if per_epoch < 1:
        raise DataError(f"{dataset_len} sample(s) make no full batch of {batch_size} (drop_last)")
    return train_cfg.epochs * per_epoch


def train(distiller_or_loss_fn, params: Iterable, loader_factory: Callable[[int], Iterable], *,
          train_cfg: TrainConfig, total_iters: int, evaluate: Callable[[], float] | None = None,
          on_best: Callable[[int, float], None] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None,
          before_step: Callable[[int], None] | None = None,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``params`` for ``total_iters`` iterations, cycling over epochs of batches.

    Evaluates every ``train_cfg.eval_iter`` iterations and at the end, keeps the best metric
    (higher is better), stops early once ``train_cfg.target_metric`` is reached. A NaN/inf loss
    stops training with a :class:`SlimsegError` naming the iteration.
    """
    if total_iters < 1:
        raise SlimsegError(f"total_iters must be a positive integer, got {total_iters}")
    run = _Run(distiller_or_loss_fn, params, train_cfg, total_iters, evaluate, on_best, log,
               before_step, after_step)
    bar = _progress_bar(total_iters, progress)
    try:
        run.loop(loader_factory, bar)
    finally:
        bar.close()
    return run.result()


class _Run:
    """The state of one :func:`train` call (kept out of the function to keep each step short)."""

    def __init__(self, fn, params, cfg: TrainConfig, total_iters, evaluate, on_best, log,
                 before_step, after_step):
        self.compute = getattr(fn, "batch_loss", fn)
        self.module = fn if isinstance(fn, nn.Module) else None
        self.params = list(params)
        self.flat = _flat_params(self.params)
        if not self.flat:
            raise SlimsegError("train() got no parameters to optimise")
        self.device = self.flat[0].device
        self.cfg, self.total = cfg, total_iters
        self.optimizer = build_optimizer(cfg, self.params)
        self.schedule = build_lr_schedule(cfg, self.optimizer, total_iters)
        self.evaluate, self.on_best, self.log = evaluate, on_best, log
        self.before_step, self.after_step = before_step, after_step
        self.iteration, self.smoothed, self.metric = 0, None, None
        self.best, self.best_iteration, self.stopped_early = None, None, False
        self.history: list[dict] = []
        self.step_seconds: list[float] = []
        self.start = time.perf_counter()

    # ---- loop -----------------------------------------------------------------------
    def loop(self, loader_factory, bar) -> None:
        epoch = 0
        if self.module is not None:
            self.module.train()
        while self.iteration < self.total and not self.stopped_early:
            batches = _epoch_batches(loader_factory, epoch)
            produced = False
            while self.iteration < self.total and not self.stopped_early:
                tic = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                produced = True
                self._step(batch, tic)
                bar.update(1)
                bar.set_postfix(self._postfix(), refresh=False)
                self._maybe_evaluate()
            if not produced:
                raise DataError(f"loader_factory({epoch}) yielded no batches; check the dataset "
                                "size against batch_size and drop_last")
            epoch += 1

    def _step(self, batch, tic: float) -> None:
        self.iteration = it = self.iteration + 1
        lr = self.optimizer.param_groups[0]["lr"]
        if self.before_step is not None:
            self.before_step(it)
        loss, parts = self._loss(_to_device(batch, self.device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SlimsegError(f"the training loss became {value} at iteration {it} (lr {lr:.3g}); "
                               "lower the learning rate or set optimizer_builder.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.cfg.optimizer_builder.grad_clip, self.flat)
        self.optimizer.step()
        self.schedule.step()
        if self.after_step is not None:
            self.after_step(it)
        seconds = time.perf_counter() - tic
        self.step_seconds.append(seconds)
        self.smoothed = value if self.smoothed is None else \
            SMOOTHING * self.smoothed + (1 - SMOOTHING) * value
        self.history.append({"iteration": it, "loss": value, "lr": lr, "seconds": seconds})
        if self.log is not None and it % self.cfg.logging_iter == 0:
            self.log(self._log_line(lr, parts))

    def _loss(self, batch) -> tuple[torch.Tensor, dict]:
        out = self.compute(batch)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise SlimsegError(f"the loss function returned {type(loss).__name__} "
                               f"{getattr(loss, 'shape', '')}, expected a scalar tensor")
        if not loss.requires_grad:
            raise SlimsegError(f"the loss at iteration {self.iteration} does not depend on any "
                               "trainable parameter (are the student's parameters frozen?)")
        return loss, parts

    def _maybe_evaluate(self) -> None:
        it = self.iteration
        if self.evaluate is None or (it % self.cfg.eval_iter and it != self.total):
            return
        tic = time.perf_counter()
        self.metric = metric = float(self.evaluate())
        if self.module is not None:
            self.module.train()
        self.history[-1]["metric"] = metric
        if self.best is None or metric > self.best:
            self.best, self.best_iteration = metric, it
            if self.on_best is not None:
                self.on_best(it, metric)
        target = self.cfg.target_metric
        self.stopped_early = target is not None and metric >= target and it < self.total
        if self.log is not None:
            stop = f"; target {target} reached, stopping" if self.stopped_early else ""
            self.log(f"eval at iter {it}: metric {metric:.4f} (best {self.best:.4f} at iter "
                     f"{self.best_iteration}, {time.perf_counter() - tic:.1f}s){stop}")

    # ---- reporting ------------------------------------------------------------------
    def _postfix(self) -> dict:
        out = {"loss": f"{self.smoothed:.4g}", "lr": f"{self.history[-1]['lr']:.3g}"}
        if self.metric is not None:
            out["metric"] = f"{self.metric:.4f}"
        return out

    def _log_line(self, lr: float, parts: dict) -> str:
        detail = " ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
        rate = statistics.median(self.step_seconds[-self.cfg.logging_iter:])
        return (f"iter {self.iteration}/{self.total} loss {self.smoothed:.4g} lr {lr:.3g} "
                f"{rate:.3f}s/it" + (f" [{detail}]" if detail else ""))

    def result(self) -> TrainResult:
        return TrainResult(
            iterations=self.iteration, best_metric=self.best, best_iteration=self.best_iteration,
            history=self.history, seconds=time.perf_counter() - self.start,
            seconds_per_iter=statistics.median(self.step_seconds) if self.step_seconds else 0.0,
            peak_rss_mb=peak_rss_mb(), stopped_early=self.stopped_early)


# ---- helpers --------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _flat_params(params: list) -> list[torch.Tensor]:
    """Tensors of a parameter list or of optimizer param groups (dicts with 'params')."""
    flat = []
    for p in params:
        if isinstance(p, dict):
            group = p["params"]
            flat.extend([group] if isinstance(group, torch.Tensor) else group)
        else:
            flat.append(p)
    return flat


def _epoch_batches(loader_factory, epoch: int):
    """An iterator over one epoch; ``set_epoch`` on the dataset/sampler first (reshuffle,
    new random augmentation) when the loader has one."""
    loader = loader_factory(epoch)
    owners = (loader, getattr(loader, "dataset", None), getattr(loader, "sampler", None))
    for owner in {id(o): o for o in owners if o is not None}.values():
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    return iter(loader)


def _to_device(batch: Any, device: torch.device):
    """Tensors of a batch dict (or a bare tensor) moved next to the parameters."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
    return batch


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="it", disable=not enabled, dynamic_ncols=True,
                leave=False)
