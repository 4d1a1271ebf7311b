"""Distillation fine-tuning of a float student: what recovers accuracy after channel pruning.

The student is any ONNX graph (here: the pruned model) run as a TorchGraph; the teacher is the
original model in onnxruntime, and the loss is taken on distillation tensors both graphs have
with the same shape (the default node, the last layer before the head's resize, is never pruned:
its channels are the classes). Batches and their teacher tensors are prepared in a background
thread; the best checkpoint by val mIoU (exported ONNX, onnxruntime) is kept.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import onnx
import torch

from slimseg.errors import ConfigError


def distill_finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, *, strategy, train_set, val_set,
                     nodes: Sequence[str], progress: bool = True,
                     say: Callable[[str], None] = print, session=None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Train ``student`` to reproduce ``teacher``'s ``nodes``; returns (best model, summary).
    ``session``: a :class:`~slimseg.train.TrainSession` (checkpoints, device)."""
    from slimseg.compress.distill import Distiller
    from slimseg.compress.prune.stage import safe_train_config
    from slimseg.compress.teacher import OrtTeacher
    from slimseg.evaluate import evaluate
    from slimseg.model.torch_graph import TorchGraph
    from slimseg.train import default_total_iters, train

    if train_set is None:
        raise ConfigError("fine-tuning needs training images: the dataset config has no train_dataset",
                          file=str(val_set.spec.source))
    _check_nodes(student, teacher, nodes)
    graph = TorchGraph(student)
    cfg, clip_note = safe_train_config(strategy.train_config)
    batch_size = strategy.train_batch_size(8)
    total = default_total_iters(cfg, len(train_set), batch_size)
    distiller = Distiller(graph, OrtTeacher(teacher, list(nodes), only_taps=True), strategy.distillation, nodes=list(nodes))
    if hasattr(train_set, "cache_decoded"):
        train_set.cache_decoded()
    params = [p for p in graph.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    best: dict[str, Any] = {}

    def evaluate_now() -> float:
        graph.eval()
        miou = evaluate(graph.to_onnx(), val_set, progress=False).metrics.miou
        graph.train()
        return miou

    def on_best(iteration: int, metric: float) -> None:
        best.update(iteration=iteration, metric=metric,
                    state={k: v.detach().clone() for k, v in graph.state_dict().items()})

    say(f"fine-tuning: {total} iterations at batch {batch_size}, distilling {list(nodes)}; {clip_note}")
    result = train(distiller, params, distill_loader(train_set, batch_size, cfg.seed, distiller),
                   train_cfg=cfg, total_iters=total, evaluate=evaluate_now, on_best=on_best,
                   progress=progress, log=say, session=session and session.for_stage("finetune"),
                   state={"best": best})
    if best:
        graph.load_state_dict(best["state"])
    graph.eval()
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    summary.update(history=result.history, batch_size=batch_size, distill_nodes=list(nodes), grad_clip=clip_note)
    return graph.to_onnx(), summary


def distill_loader(train_set, batch_size: int, seed: int, distiller) -> "DistillLoader":
    """``loader_factory(epoch)`` for train(): shuffled full batches loaded ahead in a background
    thread (see :mod:`slimseg.data.prefetch`); the teacher's tensors too when the student trains
    on a GPU (see :meth:`DistillLoader.teacher_ahead`)."""
    if len(train_set) < batch_size:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {batch_size}; "
                          "lower TrainConfig.batch_size")
    return DistillLoader(train_set, batch_size, seed, distiller)


class DistillLoader:
    """Epoch ``e`` visits ``randperm(n, seed + e)`` in full global batches of ``batch_size``
    (the order of a shuffling DataLoader seeded so); under torchrun each process takes its
    equal contiguous share of every global batch, so W processes see the batch one would.
    ``start`` skips whole batches without loading them (resuming mid-epoch)."""

    accepts_start = True

    def __init__(self, train_set, batch_size: int, seed: int, distiller):
        self.train_set, self.batch_size, self.seed, self.distiller = train_set, batch_size, seed, distiller

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        from slimseg import distributed as dist

        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed + epoch))
        order, b = order.tolist(), self.batch_size
        return [dist.shard(order[i * b:(i + 1) * b]) for i in range(start, len(order) // b)]

    def __call__(self, epoch: int, start: int = 0):
        from slimseg.data import collate
        from slimseg.data.prefetch import Prefetcher

        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=self.batches(epoch, start),
                                             collate_fn=collate, generator=torch.Generator().manual_seed(epoch))
        return Prefetcher(loader, self._with_teacher if self.teacher_ahead() else None)

    def teacher_ahead(self) -> bool:
        """Run the teacher in the loading thread only when the student trains off the CPU. On
        2 CPU cores, onnxruntime's threads next to torch's made a QAT step slower (interleaved
        runs: 1.02 s with the teacher ahead, 0.90 s with it in line before the step); the
        Distiller runs it in line when a batch has no ``teacher`` entry."""
        student = getattr(self.distiller, "student", None)
        param = next(iter(student.parameters()), None) if student is not None else None
        return param is not None and param.device.type != "cpu"

    def _with_teacher(self, batch: dict) -> dict:
        return {**batch, "teacher": self.distiller.teach(batch["image"])}


def _check_nodes(student: onnx.ModelProto, teacher: onnx.ModelProto, nodes: Sequence[str]) -> None:
    """Every distillation tensor exists in both graphs with the same channel count."""
    s_channels, t_channels = _channels(student), _channels(teacher)
    for name in nodes:
        if name not in s_channels:
            raise ConfigError(f"distillation node {name!r} is not in the pruned model; name a tensor "
                              "that pruning keeps (e.g. the last conv before the output)", key="Distillation.node")
        s, t = s_channels[name], t_channels.get(name)
        if s is not None and t is not None and s != t:
            raise ConfigError(f"distillation node {name!r} has {s} channels after pruning and {t} in "
                              "the original: distill on a tensor whose channels are not pruned",
                              key="Distillation.node")


def _channels(model: onnx.ModelProto) -> dict[str, int | None]:
    """Every node output -> its dim 1 when shape inference knows it."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    known = {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        known[value.name] = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    return {out: known.get(out) for node in model.graph.node for out in node.output}
