"""Export a zoo model with the classic (TorchScript) exporter, the way a user's model arrives."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from slimseg.errors import ModelLoadError

INPUT, OUTPUT, BATCH = "x", "logits", "N"


class _WithSoftmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), 1)


def export_onnx(module: nn.Module, path, input_shape, opset: int = 13, *, softmax: bool = False) -> Path:
    """Write ``module`` (eval mode) to ``path``: input "x" (N, C, H, W) with a dynamic batch,
    output "logits" (or softmax probabilities with ``softmax=True``).

    BatchNormalization stays a node (``TrainingMode.PRESERVE`` skips the exporter's Conv+BN
    fusion), as in paddle2onnx exports; slimseg folds BN itself. The file appears only once
    written completely.
    """
    path = Path(path)
    model = _WithSoftmax(module) if softmax else module
    was_training = module.training
    module.eval()
    dummy = torch.randn(*input_shape, device=next(module.parameters()).device)
    try:
        with tempfile.TemporaryDirectory(prefix="slimseg-zoo-", dir=path.parent) as tmp, torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part = Path(tmp) / path.name
            torch.onnx.export(model, (dummy,), str(part), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}},
                              training=torch.onnx.TrainingMode.PRESERVE)
            part.replace(path)
    except Exception as err:  # the exporter raises many types
        raise ModelLoadError(f"torch.onnx.export failed for {type(module).__name__} at {tuple(input_shape)}: "
                             f"{type(err).__name__}: {err}") from err
    finally:
        module.train(was_training)
    return path
