"""The process group of a ``torchrun`` launch, and a no-op everywhere else.

``torchrun --nproc_per_node=N -m slimseg compress ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set. :func:`init` joins them
(gloo on CPU, nccl on CUDA); without those variables it returns a one-process context and every
helper here does nothing, so the rest of slimseg never asks whether it runs distributed.

Data parallelism keeps one model per process and averages gradients: with the global batch
``B`` split into ``W`` equal shards and a loss that is a mean over the batch,
``mean_r grad(mean over shard r) = grad(mean over B)``, so W processes take the step one
process takes on the whole batch (up to float summation order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from slimseg.errors import ConfigError, SlimsegError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_CONTEXT = Context()


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    name = name or "auto"
    if name not in DEVICES:
        raise ConfigError(f"--device {name!r}: expected one of {', '.join(DEVICES)}", key="device")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SlimsegError("--device cuda: no CUDA device is visible to torch (use --device cpu)")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init(device: str | None = "auto") -> Context:
    """Join the ``torchrun`` process group when launched by it; set this process's device."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    backend = None
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    _CONTEXT = Context(rank=rank, world=world, local_rank=local, device=dev, backend=backend)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (after the last barrier) and forget the context."""
    global _CONTEXT
    if _CONTEXT.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CONTEXT = Context()


def context() -> Context:
    return _CONTEXT


def rank() -> int:
    return _CONTEXT.rank


def world_size() -> int:
    return _CONTEXT.world


def is_main() -> bool:
    return _CONTEXT.is_main


def barrier() -> None:
    if _CONTEXT.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for metrics, flags and ONNX protos)."""
    if not _CONTEXT.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (masks, scales)."""
    if not _CONTEXT.distributed:
        return
    import torch.distributed as dist

    for t in tensors:
        buf = t.detach().to(_comm_device())
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one (e.g. a Ctrl-C seen by one process)."""
    if not _CONTEXT.distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


@torch.no_grad()
def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """``grad <- mean over ranks`` for a loss that is not an ``nn.Module`` (DDP's job otherwise)."""
    if not _CONTEXT.distributed:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(_CONTEXT.world)


def shard(batch: Sequence[int], rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's contiguous share of one global batch of indices (equal sizes)."""
    rank_ = _CONTEXT.rank if rank_ is None else rank_
    world = _CONTEXT.world if world is None else world
    if len(batch) % world:
        raise ConfigError(f"the batch of {len(batch)} does not split into {world} equal parts: "
                          f"make TrainConfig.batch_size a multiple of the {world} processes",
                          key="TrainConfig.batch_size")
    per = len(batch) // world
    return list(batch[rank_ * per:(rank_ + 1) * per])


def _comm_device() -> torch.device:
    return _CONTEXT.device if _CONTEXT.backend == "nccl" else torch.device("cpu")
