"""What the least-squares reconstruction recovers before any training (issue 4).

    python benchmarks/reconstruction.py [--images 64] [--grouped]

On pp_humanseg_lite_192 with mini_supervisely: 30 % of the channels removed (ChannelPrune,
l1_norm, round_to 4), 75 % of the 1x1 conv weights zeroed per layer and 80 % in 1x4 blocks
(UnstructurePrune's one-shot masks). Prints the val mIoU (onnxruntime) of each pruned model
untrained, then after :func:`slimseg.compress.prune.reconstruct.reconstruct_layers` on
``--images`` training images (val transforms), and the refit's time. The sparse cases run
three times: zeros by magnitude then refit, zeros chosen by OBS inside the refit (same count per
layer; ``criterion: obs``, the default for one-shot masks), and the same with every layer on
SparseGPT's column-by-column masks (what layers over ``obs.GREEDY_BUDGET`` get, e.g. ResNet-50's).
Last, ASPPrune's 2:4 on every eligible conv: magnitude patterns then refit, and patterns chosen
by SparseGPT inside the refit (``criterion: obs``, the default).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
DATASET = ROOT / "examples" / "configs" / "dataset" / "mini_supervisely_192.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--grouped", action="store_true", help="refit depthwise convs too")
    args = parser.parse_args()

    from slimseg.compress.prune import obs
    from slimseg.compress.prune.channel import prune_channels
    from slimseg.compress.prune.reconstruct import reconstruct_model
    from slimseg.data import build_dataset, calibration_batches, load_dataset_config
    from slimseg.evaluate import evaluate
    from slimseg.model.importers import load_model
    from slimseg.model.passes import fold_batchnorm

    loaded = load_model(model_dir=ASSETS / "models" / "pp_humanseg_lite_192", model_filename="model.pdmodel",
                        params_filename="model.pdiparams")
    data = load_dataset_config(DATASET)
    val, train = build_dataset(data, "val"), build_dataset(data, "train")
    batches = calibration_batches(train, val, args.images, 8)
    folded = fold_batchnorm.run(loaded.onnx).model
    greedy_budget = obs.GREEDY_BUDGET
    print(f"original: val mIoU {evaluate(loaded, val, progress=False).metrics.miou:.4f}")

    pruned, report = prune_channels(loaded.onnx, 0.3, criterion="l1_norm", round_to=4)
    pruned = fold_batchnorm.run(pruned).model
    cases = [("channel prune 30%", pruned, {"removed": report.removed})]
    for ratio, block in ((0.75, (1, 1)), (0.8, (1, 4))):
        sparse, prune = sparse_by_magnitude(folded, ratio, block)
        what = f"{ratio:.0%} of 1x1 weights" + ("" if block == (1, 1) else f" in {block[0]}x{block[1]} blocks")
        cases += [(f"{what}, zeros by magnitude", sparse, {}), (f"{what}, zeros by OBS", folded, {"prune": prune}),
                  (f"{what}, zeros by SparseGPT", folded, {"prune": prune, "greedy_budget": 0.0})]
    nm_model, nm_prune = nm_by_magnitude(folded)
    cases += [("2:4 of the eligible convs, patterns by magnitude", nm_model, {}),
              ("2:4 of the eligible convs, patterns by SparseGPT", folded, {"prune": nm_prune})]
    for name, model, options in cases:
        obs.GREEDY_BUDGET = options.pop("greedy_budget", greedy_budget)
        before = "" if "prune" in options else \
            f"{evaluate(model, val, progress=False).metrics.miou:.4f} untrained, "
        tic = time.perf_counter()
        refit, rec = reconstruct_model(model, loaded.onnx, batches, grouped=args.grouped, **options)
        seconds = time.perf_counter() - tic
        after = evaluate(refit, val, progress=False).metrics.miou
        print(f"{name}: val mIoU {before}{after:.4f} reconstructed "
              f"({len(rec.layers)} convs, {rec.images} images, {seconds:.1f} s)", flush=True)


def sparse_by_magnitude(folded, ratio: float, block: tuple[int, int]):
    """The model with ``ratio`` of every 1x1 weight zeroed by magnitude (per layer, in
    ``block``s), and the same zero counts as ``reconstruct_layers(prune=...)`` targets."""
    import torch
    from onnx import numpy_helper

    from slimseg.compress.prune.masks import eligible_weights, magnitude_masks, zero_blocks
    from slimseg.model.passes._graph import copy_model

    model = copy_model(folded)
    names = {w.name for w in eligible_weights(model, params_type="conv1x1_only")}
    inits = {t.name: t for t in model.graph.initializer if t.name in names}
    weights = {n: torch.from_numpy(numpy_helper.to_array(t).copy()) for n, t in inits.items()}
    prune = {}
    for name, mask in magnitude_masks(weights, ratio, local=True, block=block).items():
        inits[name].CopyFrom(numpy_helper.from_array((weights[name] * mask).numpy(), name))
        prune[name] = (zero_blocks(mask, block[1]), block[1])
    return model, prune


def nm_by_magnitude(folded):
    """The model with ASPPrune's magnitude 2:4 masks on every eligible weight, and the same
    weights as ``reconstruct_layers(prune=...)`` N:M targets."""
    import torch
    from onnx import numpy_helper

    from slimseg.compress.prune.masks import eligible_weights, nm_mask
    from slimseg.compress.prune.obs import NM
    from slimseg.model.passes._graph import copy_model

    model = copy_model(folded)
    names = {w.name for w in eligible_weights(model, nm=(2, 4))}
    for init in model.graph.initializer:
        if init.name in names:
            weight = torch.from_numpy(numpy_helper.to_array(init).copy())
            init.CopyFrom(numpy_helper.from_array((weight * nm_mask(weight)).numpy(), init.name))
    return model, {name: NM(2, 4) for name in names}


if __name__ == "__main__":
    main()
