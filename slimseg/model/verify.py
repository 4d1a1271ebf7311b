"""Every export is checked: the runtime and TorchGraph must agree on the same input."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from slimseg.errors import SlimsegError


class ExportMismatchError(SlimsegError):
    """TorchGraph and the runtime disagree on an exported model."""


def check_torch_vs_runtime(model, input_shape: Sequence[int], *, seed: int = 0, atol: float = 1e-4,
                           runtime: str = "onnxruntime") -> float:
    """Run `model` in TorchGraph and in `runtime` on one random input; return the max abs
    difference of the first output, raising ExportMismatchError above `atol`."""
    from slimseg.hardware.runtime import get_runtime
    from slimseg.model.torch_graph import TorchGraph

    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    expected = get_runtime(runtime, model, threads=1).run(x)[0]
    graph = TorchGraph(model).eval()
    with torch.no_grad():
        out = graph(torch.from_numpy(x))
    got = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
    if got.shape != expected.shape or diff > atol:
        raise ExportMismatchError(
            f"TorchGraph and {runtime} disagree: shapes {got.shape} vs {expected.shape}, max abs diff {diff:.3g} > {atol}"
        )
    return diff
