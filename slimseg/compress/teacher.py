"""The frozen FP32 teacher, run in an inference runtime.

The teacher never trains, so it need not run in torch: an inference runtime computes the same
tensors several times faster on CPU, which matters when every QAT step runs it once. Its
distillation tensors are added as extra graph outputs.

Which runtime: OpenVINO when it is installed (the ``openvino`` extra), else onnxruntime.
OpenVINO ran PP-HumanSeg-Lite's teacher at batch 8 and 2 threads in 46 ms against
onnxruntime's 76 ms, a tenth of a QAT iteration (BENCHMARKS.md). It is trusted only after it
agrees with onnxruntime on the first batch (it reads some graphs differently or not at all);
otherwise onnxruntime runs the teacher, as it does when OpenVINO is absent.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

TEACHER_RUNTIMES = ("auto", "onnxruntime", "openvino")
# OpenVINO's outputs may differ from onnxruntime's by float rounding (5e-6 of 8.5 seen); more
# than this share of the reference's largest magnitude means it computed something else
AGREEMENT = 1e-3


class RuntimeTeacher(nn.Module):
    """``teacher(images, taps=names) -> {name: Tensor}`` (graph outputs included).

    ``only_taps``: compute just the tapped tensors, not the graph outputs. Distillation taps
    usually sit before the head's full-resolution Resize and Softmax, which cost the teacher
    about a fifth of its time at batch 8 and serve no loss. ``runtime``: ``auto`` (OpenVINO
    if installed and it agrees with onnxruntime on the first batch), ``onnxruntime`` or
    ``openvino`` (no check). The runtime in use is ``self.runtime_name``.
    """

    def __init__(self, model: onnx.ModelProto, taps: Sequence[str], *, threads: int | None = None,
                 only_taps: bool = False, runtime: str = "auto"):
        super().__init__()
        from slimseg.errors import ConfigError
        from slimseg.hardware.runtime import OrtRuntime

        if runtime not in TEACHER_RUNTIMES:
            raise ConfigError(f"teacher runtime {runtime!r}: expected one of {TEACHER_RUNTIMES}", key="runtime")
        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
        if only_taps:
            _keep_only(augmented.graph, list(taps))
        present = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in taps if t not in present)
        self.names = [o.name for o in augmented.graph.output]
        threads = threads or torch.get_num_threads()
        self._reference = None  # onnxruntime, kept until OpenVINO has agreed with it once
        if runtime != "onnxruntime":
            self.runtime = _openvino(augmented, threads, self.names, required=runtime == "openvino")
            if self.runtime is not None:
                self.runtime_name = "openvino"
                if runtime == "auto":
                    self._reference = OrtRuntime(augmented, threads=threads)
                return
        self.runtime, self.runtime_name = OrtRuntime(augmented, threads=threads), "onnxruntime"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, taps: Sequence[str] | None = None):
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        values = self.runtime.run(x) if self._reference is None else self._checked_run(x)
        out = {name: torch.from_numpy(v) for name, v in zip(self.names, values)}
        if taps is None:
            return out[self.names[0]]
        return out

    def _checked_run(self, x: np.ndarray) -> list[np.ndarray]:
        """The first batch: onnxruntime's values; OpenVINO stays only if it computed the same."""
        reference, self._reference = self._reference, None
        expected = reference.run(x)
        try:
            got = self.runtime.run(x)
            worst = max(float(np.abs(g - e).max()) / max(float(np.abs(e).max()), 1e-6)
                        for g, e in zip(got, expected))
        except Exception as err:  # noqa: BLE001 - any OpenVINO failure means: use onnxruntime
            worst, detail = float("inf"), f"failed ({err})"
        else:
            detail = f"differs from onnxruntime by {worst:.2g} of the largest value"
        if not worst <= AGREEMENT:
            warnings.warn(f"teacher: OpenVINO {detail}; running the teacher in onnxruntime", stacklevel=2)
            self.runtime, self.runtime_name = reference, "onnxruntime"
        return expected


def _openvino(model: onnx.ModelProto, threads: int, names: list[str], *, required: bool):
    """An OpenVinoRuntime whose outputs come in ``names`` order, or None where OpenVINO is
    missing or cannot compile the model (an error instead when ``required``)."""
    from slimseg.hardware.runtime import OpenVinoRuntime

    try:
        runtime = OpenVinoRuntime(model, threads=threads)
    except Exception:  # noqa: BLE001 - not installed, or a graph it cannot read: onnxruntime will do
        if required:
            raise
        return None
    if runtime.output_names != names:
        if required:
            from slimseg.errors import SlimsegError
            raise SlimsegError(f"OpenVINO names the teacher's outputs {runtime.output_names}, expected {names}")
        return None
    return runtime


def _keep_only(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Make ``outputs`` the graph's only outputs and drop the nodes and initializers they
    do not need (walking back from them; ONNX node lists are topologically sorted)."""
    from slimseg.model.passes._graph import subgraphs, used_names
    from slimseg.model.passes.fold_constants import remove_unused_initializers

    needed, kept = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for sub in subgraphs(node):  # names a subgraph reads from the outer scope
                needed |= used_names(sub)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
    remove_unused_initializers(graph)
