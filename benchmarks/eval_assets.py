"""Accuracy of the real PP-HumanSeg-Lite models on mini_supervisely, through `slimseg.evaluate`.

Reproduces the reference numbers of ../shared/assets/README.md (issue 2's acceptance bar):
pp_humanseg_lite_192 val mIoU 0.8637, pp_humanseg_lite_portrait_398x224 val mIoU 0.8275.

    python benchmarks/eval_assets.py [--assets ../shared/assets] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from slimseg.evaluate import evaluate
from slimseg.model.importers import load_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {  # (model, split): mIoU from ../shared/assets/README.md
    ("pp_humanseg_lite_192", "val"): 0.8637,
    ("pp_humanseg_lite_192", "test"): 0.8411,
    ("pp_humanseg_lite_portrait_398x224", "val"): 0.8275,
}


def dataset_config(data_root: Path, width: int, height: int, split: str, folder: Path) -> Path:
    """A PaddleSeg dataset YAML for one split, with the deploy.yaml preprocessing."""
    spec = {"type": "Dataset", "dataset_root": str(data_root), "val_path": str(data_root / f"{split}.txt"),
            "num_classes": 2, "mode": "val",
            "transforms": [{"type": "Resize", "target_size": [width, height]}, {"type": "Normalize"}]}
    path = folder / f"{split}_{width}x{height}.yaml"
    path.write_text(yaml.safe_dump({"val_dataset": spec}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (name, split), reference in REFERENCE.items():
            loaded = load_model(model_dir=args.assets / "models" / name)
            _, _, height, width = loaded.input_shape
            config = dataset_config(args.assets / "data" / "mini_supervisely", width, height, split, Path(tmp))
            result = evaluate(loaded, config, threads=args.threads, progress=False)
            m = result.metrics
            rows.append(f"| {name} | {split} | {result.num_images} | {m.miou:.4f} | {reference:.4f} | "
                        f"{m.miou - reference:+.4f} | {m.class_iou[1]:.4f} | {m.acc:.4f} | {m.kappa:.4f} |")
    print("| model | split | images | mIoU | reference | diff | IoU person | Acc | Kappa |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
