"""The frozen FP32 teacher, run in onnxruntime.

The teacher never trains, so it need not run in torch: onnxruntime computes the same tensors
several times faster on CPU, which matters when every QAT step runs it once. Its distillation
tensors are added as extra graph outputs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn


class OrtTeacher(nn.Module):
    """``teacher(images, taps=names) -> {name: Tensor}`` (graph outputs included)."""

    def __init__(self, model: onnx.ModelProto, taps: Sequence[str], *, threads: int | None = None):
        super().__init__()
        from slimseg.hardware.runtime import OrtRuntime

        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
        present = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in taps if t not in present)
        self.names = [o.name for o in augmented.graph.output]
        self.runtime = OrtRuntime(augmented, threads=threads or torch.get_num_threads())

    @torch.no_grad()
    def forward(self, images: torch.Tensor, taps: Sequence[str] | None = None):
        values = self.runtime.run(np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32))
        out = {name: torch.from_numpy(v) for name, v in zip(self.names, values)}
        if taps is None:
            return out[self.names[0]]
        return out
