"""Issue 9's acceptance check: `slimseg predict` masks score the model's own eval mIoU.

Predicts the val list of mini_supervisely (100 images) with a model (FP32 Paddle folder or a
compressed INT8 ONNX), scores the written label PNGs against the labels, and compares with
`slimseg.evaluate.evaluate` (what `slimseg eval` prints) on the same model and data.

    python benchmarks/predict_assets.py [--model ../shared/assets/models/pp_humanseg_lite_192]
        [--dataset_config examples/configs/dataset/mini_supervisely_192.yaml] [--threads 2]
        [--batch_size 1] [--preprocess deploy|dataset]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slimseg.evaluate import evaluate
from slimseg.model.importers import load_model
from slimseg.predict import predict, score_outputs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "assets" / "models" / "pp_humanseg_lite_192"))
    parser.add_argument("--dataset_config", type=Path,
                        default=ROOT / "examples" / "configs" / "dataset" / "mini_supervisely_192.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--preprocess", choices=("deploy", "dataset"), default="deploy",
                        help="predict with the model's deploy.yaml (falls back to the dataset's val "
                             "transforms when the model has none) or the dataset's val transforms")
    args = parser.parse_args()

    loaded = load_model(args.model)
    use_dataset = args.preprocess == "dataset" or not loaded.preprocess
    evaluated = evaluate(loaded, args.dataset_config, threads=args.threads, progress=False).metrics
    with tempfile.TemporaryDirectory(prefix="slimseg-predict-") as tmp:
        from slimseg.data import build_dataset

        spec = build_dataset(args.dataset_config, "val").spec
        result = predict(loaded, spec.list_paths.get("val", spec.list_path), out_dir=Path(tmp) / "out",
                         threads=args.threads, batch_size=args.batch_size,
                         preprocess=args.dataset_config if use_dataset else None, progress=False)
        scored = score_outputs(Path(tmp) / "out", args.dataset_config)
    print(f"model: {loaded.source}; preprocessing: {'dataset val transforms' if use_dataset else 'deploy.yaml'}")
    print("| images | eval mIoU | predict-PNG mIoU | diff | eval IoU person | PNG IoU person | images/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result.images} | {evaluated.miou:.4f} | {scored.miou:.4f} | {scored.miou - evaluated.miou:+.6f} | "
          f"{evaluated.class_iou[1]:.4f} | {scored.class_iou[1]:.4f} | {result.images_per_s:.1f} |")
    print(result.summary())


if __name__ == "__main__":
    main()
