"""One training loop for every compression stage (QAT, distillation fine-tuning, sparsity).

The loop knows nothing about what is trained: it gets a loss (a
:class:`~slimseg.compress.distill.Distiller`, or any ``fn(batch) -> loss | (loss, parts)``),
the parameters to optimise and a ``loader_factory(epoch)`` giving one epoch of batches. Stage
specifics hook in through ``before_step(iteration)`` / ``after_step(iteration)`` (sparsity
masks, EMA, BN freezing) and ``on_best(iteration, metric)`` (the caller snapshots what it needs).

Iterations count from 1; iteration ``i`` runs at learning rate ``schedule(i - 1)``, so the first
step uses ``learning_rate``'s value at step 0 (as ACT steps its schedule once per iteration).

A :class:`TrainSession` says how the loop runs inside a job: every ``eval_iter`` iterations, at
the end and on Ctrl-C it saves its whole state (see :mod:`slimseg.checkpoint`) and, resumed,
continues bit for bit: same weights, optimizer moments, schedule step, RNG, epoch and position
in it (the loader is seeded per epoch, so the consumed batches are skipped). Launched by
``torchrun``, the loss module runs in DistributedDataParallel; only rank 0 evaluates (the metric
is broadcast), logs and checkpoints. On CUDA the forward pass runs under autocast (bf16, or
fp16 with a gradient scaler).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import resource
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slimseg import distributed as dist
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


@dataclass
class TrainSession:
    """How :func:`train` runs inside a job: ``checkpointer`` (folder, resume) and the ``stage``
    name its state is saved under; ``device`` (None: where the parameters are); ``amp``:
    autocast on CUDA (never on CPU)."""

    checkpointer: Any = None
    stage: str = "train"
    device: torch.device | str | None = None
    amp: bool = True

    def for_stage(self, stage: str) -> "TrainSession":
        return replace(self, stage=stage)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the state was checkpointed (when a session has a folder)."""


def train(distiller_or_loss_fn, params: Iterable, loader_factory: Callable[[int], Iterable], *,
          train_cfg: TrainConfig, total_iters: int, evaluate: Callable[[], float] | None = None,
          on_best: Callable[[int, float], None] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None,
          before_step: Callable[[int], None] | None = None,
          after_step: Callable[[int], None] | None = None,
          session: TrainSession | None = None, state: dict[str, Any] | None = None) -> TrainResult:
    """Train ``params`` for ``total_iters`` iterations, cycling over epochs of batches.

    Evaluates every ``train_cfg.eval_iter`` iterations and at the end, keeps the best metric
    (higher is better), stops early once ``train_cfg.target_metric`` is reached. A NaN/inf loss
    stops training with a :class:`SlimsegError` naming the iteration. ``state``: the caller's
    own objects to checkpoint with the loop (dicts, or objects with ``state_dict`` /
    ``load_state_dict``: a best snapshot, sparsity masks). Ctrl-C stops after the current
    step, saves, and raises :class:`TrainingInterrupted`.
    """
    if total_iters < 1:
        raise SlimsegError(f"total_iters must be a positive integer, got {total_iters}")
    run = _Run(distiller_or_loss_fn, params, train_cfg, total_iters, evaluate, on_best, log,
               before_step, after_step, session or TrainSession(), state or {})
    show = progress and dist.is_main()
    bar = _progress_bar(total_iters, show, run.session.stage, run.iteration)
    try:
        with _StopOnSigint() as stop, _log_above_bar(show):
            run.loop(loader_factory, bar, stop)
    finally:
        bar.close()
        run.release()
    return run.result()


class _Run:
    """The state of one :func:`train` call (kept out of the function to keep each step short)."""

    def __init__(self, fn, params, cfg: TrainConfig, total_iters, evaluate, on_best, log,
                 before_step, after_step, session: TrainSession, state: dict):
        self.compute = getattr(fn, "batch_loss", fn)
        self.module = fn if isinstance(fn, nn.Module) else None
        self.params = list(params)
        self.flat = _flat_params(self.params)
        if not self.flat:
            raise SlimsegError("train() got no parameters to optimise")
        self.session, self.extra = session, state
        self.home = self.flat[0].device
        self.device = torch.device(session.device) if session.device is not None else self.home
        if self.module is not None and self.device != self.home:
            self.module.to(self.device)
        self.cfg, self.total = cfg, total_iters
        self.optimizer = build_optimizer(cfg, self.params)
        self.schedule = build_lr_schedule(cfg, self.optimizer, total_iters)
        self.autocast, self.scaler = _amp(self.device, session.amp)
        self.evaluate, self.on_best = evaluate, on_best
        self.log = log if dist.is_main() else None
        self.before_step, self.after_step = before_step, after_step
        self.iteration, self.epoch, self.position = 0, 0, 0
        self.smoothed, self.metric = None, None
        self.best, self.best_iteration, self.stopped_early = None, None, False
        self.history: list[dict] = []
        self.step_seconds: list[float] = []
        self.start, self.earlier_seconds = time.perf_counter(), 0.0
        self.saved_at: int | None = None
        self._resume()
        self.ddp = _data_parallel(self.module, self.device)
        if self.ddp is not None:
            self.compute = self.ddp

    # ---- loop -----------------------------------------------------------------------
    def loop(self, loader_factory, bar, stop) -> None:
        if self.module is not None:
            self.module.train()
        while not self._done():
            produced = self.position > 0
            batches = _epoch_batches(loader_factory, self.epoch, self.position)
            try:
                for batch in batches:
                    tic = time.perf_counter()
                    produced = True
                    self.position += 1
                    self._step(batch, tic)
                    bar.update(1)
                    evaluated = self._maybe_evaluate()
                    bar.set_postfix(self._postfix(), refresh=evaluated)  # a new metric shows at once
                    self._maybe_interrupt(stop)
                    if self._done():
                        break
                else:
                    self.epoch, self.position = self.epoch + 1, 0
            finally:
                _close(batches)
            if not produced:
                raise DataError(f"loader_factory({self.epoch}) yielded no batches; check the dataset "
                                "size against batch_size and drop_last")
        if self.saved_at != self.iteration:
            self._save()

    def _done(self) -> bool:
        return self.iteration >= self.total or self.stopped_early

    def _step(self, batch, tic: float) -> None:
        self.iteration = it = self.iteration + 1
        lr = self.optimizer.param_groups[0]["lr"]
        if self.before_step is not None:
            self.before_step(it)
        with self.autocast():
            loss, parts = self._loss(_to_device(batch, self.device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SlimsegError(f"the training loss became {value} at iteration {it} (lr {lr:.3g}); "
                               "lower the learning rate or set optimizer_builder.grad_clip")
        self._backward_and_step(loss)
        if self.after_step is not None:
            self.after_step(it)
        seconds = time.perf_counter() - tic
        self.step_seconds.append(seconds)
        self.smoothed = value if self.smoothed is None else \
            SMOOTHING * self.smoothed + (1 - SMOOTHING) * value
        self.history.append({"iteration": it, "loss": value, "lr": lr, "seconds": seconds})
        if self.log is not None and it % self.cfg.logging_iter == 0:
            self.log(self._log_line(lr, parts))

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        if self.ddp is None:
            dist.average_gradients(self.flat)
        clip_gradients(self.cfg.optimizer_builder.grad_clip, self.flat)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.schedule.step()

    def _loss(self, batch) -> tuple[torch.Tensor, dict]:
        out = self.compute(batch)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise SlimsegError(f"the loss function returned {type(loss).__name__} "
                               f"{getattr(loss, 'shape', '')}, expected a scalar tensor")
        if not loss.requires_grad:
            raise SlimsegError(f"the loss at iteration {self.iteration} does not depend on any "
                               "trainable parameter (are the student's parameters frozen?)")
        return loss.float(), parts

    def _maybe_evaluate(self) -> bool:
        """Every ``eval_iter`` and at the end: evaluate (if given) and checkpoint."""
        it = self.iteration
        if it % self.cfg.eval_iter and it != self.total:
            return False
        if self.evaluate is not None:
            self._evaluate()
        self._save()
        return self.evaluate is not None

    def _evaluate(self) -> None:
        it, tic = self.iteration, time.perf_counter()
        metric = float(self.evaluate()) if dist.is_main() else None
        self.metric = metric = dist.broadcast_object(metric)
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

    def _maybe_interrupt(self, stop: "_StopOnSigint") -> None:
        if not dist.any_rank(stop.requested):
            return
        path = self._save()
        where = f"checkpoint saved in {path.parent}; run the same command with --resume to continue" \
            if path is not None else "no checkpoint (run compress with a save_dir to get one)"
        message = f"stopped at iteration {self.iteration} of {self.total} ({self.session.stage}); {where}"
        if self.log is not None:
            self.log(message)
        raise TrainingInterrupted(message)

    # ---- checkpoint -----------------------------------------------------------------
    def _save(self):
        ckpt = self.session.checkpointer
        if ckpt is None:
            return None
        self.saved_at = self.iteration
        if not ckpt.writer:
            return ckpt.train_path(self.session.stage)
        return ckpt.save_train_state(self.session.stage, self.state_dict())

    def state_dict(self) -> dict:
        from slimseg.checkpoint import rng_state

        model = self.module.state_dict() if self.module is not None else [p.detach() for p in self.flat]
        return {
            "iteration": self.iteration, "epoch": self.epoch, "position": self.position,
            "model": model, "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(), "smoothed": self.smoothed, "metric": self.metric, "best": self.best,
            "best_iteration": self.best_iteration, "stopped_early": self.stopped_early,
            "history": self.history, "step_seconds": self.step_seconds,
            "seconds": self.earlier_seconds + time.perf_counter() - self.start,
            "extra": {name: _get_state(obj) for name, obj in self.extra.items()},
        }

    def _resume(self) -> None:
        ckpt = self.session.checkpointer
        state = ckpt.load_train_state(self.session.stage) if ckpt is not None else None
        if state is None:
            return
        from slimseg.checkpoint import set_rng_state

        if self.module is not None:
            self.module.load_state_dict(state["model"])
        else:
            with torch.no_grad():
                for p, saved in zip(self.flat, state["model"]):
                    p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        for key in ("iteration", "epoch", "position", "smoothed", "metric", "best", "best_iteration",
                    "stopped_early", "history", "step_seconds"):
            setattr(self, key, state[key])
        self.earlier_seconds = state["seconds"]
        for name, obj in self.extra.items():
            _set_state(obj, state["extra"][name])
        if self.log is not None:
            self.log(f"{self.session.stage}: resumed at iteration {self.iteration} of {self.total} "
                     f"(epoch {self.epoch}, batch {self.position})")

    def release(self) -> None:
        """Back to where the caller had the model (evaluation and export run on CPU)."""
        if self.module is not None and self.device != self.home:
            self.module.to(self.home)

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
            history=self.history, seconds=self.earlier_seconds + time.perf_counter() - self.start,
            seconds_per_iter=statistics.median(self.step_seconds) if self.step_seconds else 0.0,
            peak_rss_mb=peak_rss_mb(), stopped_early=self.stopped_early)


class _StopOnSigint:
    """While training, the first Ctrl-C asks the loop to stop after the current step (so the
    checkpoint holds a whole step); a second one interrupts at once. Only in the main thread."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self) -> "_StopOnSigint":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if dist.is_main():
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _BatchLoss(nn.Module):
    """``forward(batch) = fn.batch_loss(batch)``: what DDP wraps (it hooks only ``forward``)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, batch):
        return getattr(self.fn, "batch_loss", self.fn)(batch)


def _data_parallel(module: nn.Module | None, device: torch.device):
    """The loss module in DistributedDataParallel when launched by torchrun (buffers such as
    fake-quant scales and masks are broadcast from rank 0 at start and at every forward)."""
    if module is None or not dist.context().distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    # static_graph: the same parameters take part every step (also those that get no gradient,
    # like a Resize's float scales), so DDP learns them once instead of searching each step
    sync = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(_BatchLoss(module), device_ids=ids, static_graph=True, **{sync: True})


def _amp(device: torch.device, enabled: bool):
    """(autocast context factory, GradScaler or None): bf16 where the GPU has it, else fp16."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _get_state(obj):
    return obj.state_dict() if hasattr(obj, "state_dict") else dict(obj)


def _set_state(obj, saved) -> None:
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(saved)
    else:
        obj.clear()
        obj.update(saved)

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


def _epoch_batches(loader_factory, epoch: int, start: int = 0):
    """An iterator over one epoch from its ``start``-th batch; ``set_epoch`` on the
    dataset/sampler first (reshuffle, new random augmentation) when the loader has one. A
    factory with ``accepts_start`` skips the batches itself (no loading, no teacher); any
    other loader is read and the first ``start`` batches dropped."""
    skips = start > 0 and getattr(loader_factory, "accepts_start", False)
    loader = loader_factory(epoch, start=start) if skips else loader_factory(epoch)
    owners = (loader, getattr(loader, "dataset", None), getattr(loader, "sampler", None))
    for owner in {id(o): o for o in owners if o is not None}.values():
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    batches = iter(loader)
    if start and not skips:
        batches = itertools.islice(batches, start, None)
    return batches


def _close(batches) -> None:
    """Stop an abandoned epoch's generator now (a prefetch thread ends with it)."""
    close = getattr(batches, "close", None)
    if callable(close):
        close()


def _to_device(batch: Any, device: torch.device):
    """Tensors of a batch (dicts nested, e.g. the teacher's) moved next to the parameters."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _log_above_bar(enabled: bool):
    """Log lines printed above the bar instead of through it (tqdm.write for logging)."""
    if not enabled:
        return contextlib.nullcontext()
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger()])


def _progress_bar(total: int, enabled: bool, stage: str = "train", initial: int = 0):
    """iteration/total, rate, ETA, then the postfix: smoothed loss, lr, last val metric."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit="it", disable=not enabled,
                dynamic_ncols=True, leave=False)
