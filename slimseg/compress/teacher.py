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
    """``teacher(images, taps=names) -> {name: Tensor}`` (graph outputs included).

    ``only_taps``: compute just the tapped tensors, not the graph outputs. Distillation taps
    usually sit before the head's full-resolution Resize and Softmax, which cost the teacher
    about a fifth of its time at batch 8 and serve no loss.
    """

    def __init__(self, model: onnx.ModelProto, taps: Sequence[str], *, threads: int | None = None,
                 only_taps: bool = False):
        super().__init__()
        from slimseg.hardware.runtime import OrtRuntime

        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
        if only_taps:
            _keep_only(augmented.graph, list(taps))
        present = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in taps if t not in present)
        self.names = [o.name for o in augmented.graph.output]
        # torch trains between its runs on the same cores: its threads must not spin meanwhile
        self.runtime = OrtRuntime(augmented, threads=threads or torch.get_num_threads(), spin=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, taps: Sequence[str] | None = None):
        values = self.runtime.run(np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32))
        out = {name: torch.from_numpy(v) for name, v in zip(self.names, values)}
        if taps is None:
            return out[self.names[0]]
        return out


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
