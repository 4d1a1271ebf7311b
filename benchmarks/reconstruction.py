"""What the least-squares reconstruction recovers before any training (issue 4).

    python benchmarks/reconstruction.py [--images 64] [--grouped]

On pp_humanseg_lite_192 with mini_supervisely: 30 % of the channels removed (ChannelPrune,
l1_norm, round_to 4) and 75 % of the 1x1 conv weights zeroed by magnitude per layer
(UnstructurePrune's one-shot masks). Prints the val mIoU (onnxruntime) of each pruned model
untrained, then after :func:`slimseg.compress.prune.reconstruct.reconstruct_layers` on
``--images`` training images (val transforms), and the refit's time.
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

    from slimseg.compress.prune.channel import prune_channels
    from slimseg.compress.prune.masks import zero_smallest
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
    print(f"original: val mIoU {evaluate(loaded, val, progress=False).metrics.miou:.4f}")

    pruned, report = prune_channels(loaded.onnx, 0.3, criterion="l1_norm", round_to=4)
    pruned = fold_batchnorm.run(pruned).model
    sparse, _ = zero_smallest(folded, 0.75, params_type="conv1x1_only", local=True)
    cases = [("channel prune 30%", pruned, report.removed), ("75% of 1x1 weights zeroed", sparse, None)]
    for name, model, removed in cases:
        before = evaluate(model, val, progress=False).metrics.miou
        tic = time.perf_counter()
        refit, rec = reconstruct_model(model, loaded.onnx, batches, removed=removed, grouped=args.grouped)
        seconds = time.perf_counter() - tic
        after = evaluate(refit, val, progress=False).metrics.miou
        print(f"{name}: val mIoU {before:.4f} untrained, {after:.4f} reconstructed "
              f"({len(rec.layers)} convs, {rec.images} images, {seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
