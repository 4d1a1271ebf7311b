"""Time and memory of the one-shot sparsity refit on a ResNet-50-size model (issue 4).

    /usr/bin/time -v python benchmarks/refit_scale.py [--size 128] [--batches 2]

Builds slimseg's zoo DeepLabv3-ResNet50 (full width, random weights, 19 classes), exports it
at ``--size`` x ``--size``, folds BN and runs
:func:`slimseg.compress.prune.reconstruct.reconstruct_layers` with 75 % of every 1x1 weight
zeroed by OBS (SparseGPT for the layers over ``obs.GREEDY_BUDGET``) on ``--batches`` random
batches of 4, as the one-shot ``UnstructurePrune`` stage does. Prints each conv's refit time,
the total and what was skipped; peak memory is /usr/bin/time's.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()

    import onnx
    import torch

    from slimseg.compress.prune import reconstruct
    from slimseg.model.passes import fold_batchnorm
    from slimseg.model.torch_graph import TorchGraph
    from slimseg.zoo.export import export_onnx
    from slimseg.zoo.registry import build

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(build("deeplabv3_resnet50", 19).eval(), Path(tmp) / "m.onnx", (1, 3, args.size, args.size))
        model = onnx.load(str(path))
    student = TorchGraph(fold_batchnorm.run(model).model)
    batches = [torch.randn(4, 3, args.size, args.size) for _ in range(args.batches)]
    prune = {}
    for node in student.onnx_graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in student.onnx_parameter_names:
            weight = student.parameter(node.input[1])
            if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
                prune[node.input[1]] = (int(0.75 * weight.numel()), 1)

    refit = reconstruct._refit

    def timed(node, graph, *rest):
        tic = time.perf_counter()
        result = refit(node, graph, *rest)
        shape = tuple(graph.parameter(node.input[1]).shape)
        print(f"{node.output[0]} {shape}{' OBS' if node.input[1] in prune else ''}: "
              f"{time.perf_counter() - tic:.2f} s", flush=True)
        return result

    reconstruct._refit = timed
    tic = time.perf_counter()
    report = reconstruct.reconstruct_layers(student, model, batches, prune=prune)
    print(f"{len(report.layers)} convs refitted ({len(prune)} 1x1 convs pruned to 75 %) in "
          f"{time.perf_counter() - tic:.1f} s; skipped: {report.skipped}")


if __name__ == "__main__":
    main()
