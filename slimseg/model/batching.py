"""Models exported with a fixed batch size, run on larger batches in slices of that size.

torch's dynamo exporter (``torch.onnx.export``'s default) writes a static batch of 1 unless
told otherwise, and bakes it into constants (Resize sizes, Reshape shapes); so does the classic
exporter without ``dynamic_axes``. Such a graph cannot take a batch of 8 in onnxruntime or in
TorchGraph, yet calibration and training want batches. Running it slice by slice and joining
the results along the batch axis computes exactly what the model would on each image, and the
join is differentiable, so a training step still sees the whole batch.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import onnx
import torch

from slimseg.errors import DataError

T = TypeVar("T", np.ndarray, torch.Tensor)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's inputs are fixed to, or None when any of them is dynamic."""
    constants = {i.name for i in model.graph.initializer}
    firsts = []
    for value in model.graph.input:
        if value.name not in constants:
            dims = value.type.tensor_type.shape.dim
            firsts.append(dims[0].dim_value if dims and dims[0].HasField("dim_value") else None)
    return shared_batch(firsts)


def shared_batch(firsts: Sequence) -> int | None:
    """The inputs' first dimensions as one fixed batch size, or None when any is dynamic
    (None, a name, <= 0) or they differ."""
    sizes = {int(d) if isinstance(d, int) and d > 0 else None for d in firsts}
    return sizes.pop() if len(sizes) == 1 else None


def slices(inputs: Sequence, fixed: int | None) -> list[slice] | None:
    """Slices of ``fixed`` images covering the batch of ``inputs`` (the first input's first
    dimension); None when the batch runs as it is."""
    batch = int(inputs[0].shape[0]) if len(inputs) and inputs[0].ndim else None
    if fixed is None or batch is None or batch == fixed:
        return None
    if batch % fixed:
        raise DataError(f"the model takes batches of exactly {fixed} (its input's first dimension is "
                        f"fixed), and a batch of {batch} does not split into them: use a batch size that "
                        f"is a multiple of {fixed}, or re-export the model with a dynamic batch")
    return [slice(start, start + fixed) for start in range(0, batch, fixed)]


def join(parts: Sequence[T], fixed: int) -> T:
    """One output from its per-slice values: joined along the batch axis when it has one,
    else the first slice's (a value that does not depend on the batch, e.g. a shape)."""
    first = parts[0]
    if first.ndim == 0 or first.shape[0] != fixed:
        return first
    return torch.cat(list(parts)) if isinstance(first, torch.Tensor) else np.concatenate(parts)


def run_feeds(run: Callable[[dict], list[np.ndarray]], feeds: dict[str, np.ndarray],
              fixed: int | None) -> list[np.ndarray]:
    """A runtime's ``run(feeds)``, slice by slice when the batch is larger than ``fixed``."""
    names = list(feeds)
    parts = slices([feeds[n] for n in names], fixed)
    if parts is None:
        return run(feeds)
    results = [run({n: feeds[n][s] for n in names}) for s in parts]
    return [join([r[k] for r in results], fixed) for k in range(len(results[0]))]
