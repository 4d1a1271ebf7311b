"""INT8 latency of slimseg's Q/DQ placement vs onnxruntime's own ``quantize_static``, and FP32.

pp_humanseg_lite_192 after ``fold_batchnorm``; both int8 models are calibrated with min/max
on the same real images (mini_supervisely train, RGB, bilinear resize, (x/255-0.5)/0.5).
onnxruntime's is QDQ, per-channel, after ``quant_pre_process``. All three run interleaved
(`slimseg.hardware.bench.compare`), 1 thread by default; argmax agreement with FP32 on val
images is printed too.

    python benchmarks/qdq_placement.py [--assets ../shared/assets] [--rounds 300] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from slimseg.compress.quant import quantize_minmax
from slimseg.hardware.bench import compare, machine_info
from slimseg.model.importers import load_model
from slimseg.model.passes import fold_batchnorm

ROOT = Path(__file__).resolve().parents[1]
SIZE = 192


def images(data_root: Path, split: str, count: int) -> list[np.ndarray]:
    lines = (data_root / f"{split}.txt").read_text().split("\n")
    out = []
    for line in [ln for ln in lines if ln.strip()][:count]:
        img = Image.open(data_root / line.split()[0]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
        out.append(x.transpose(2, 0, 1)[None])
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of arrays."""

    def __init__(self, name: str, arrays: list[np.ndarray]):
        self._items = iter([{name: a} for a in arrays])

    def get_next(self):
        return next(self._items, None)


def ort_static(model: onnx.ModelProto, calib: list[np.ndarray], folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, out = folder / "fp32.onnx", folder / "pre.onnx", folder / "ort_int8.onnx"
    onnx.save(model, src)
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(out), _Reader(model.graph.input[0].name, calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(out)


def agreement(reference: onnx.ModelProto, model: onnx.ModelProto, data: list[np.ndarray]) -> float:
    def argmax(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return [s.run(None, {m.graph.input[0].name: x})[0].argmax(1) for x in data]
    return float(np.mean([np.mean(a == b) for a, b in zip(argmax(reference), argmax(model))]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib", type=int, default=32)
    args = parser.parse_args()
    fp32 = load_model(model_dir=args.assets / "models" / "pp_humanseg_lite_192").onnx
    folded = fold_batchnorm.run(fp32).model
    data_root = args.assets / "data" / "mini_supervisely"
    calib, val = images(data_root, "train", args.calib), images(data_root, "val", 20)
    with tempfile.TemporaryDirectory(prefix="slimseg-bench-") as tmp:
        models = {"fp32": fp32, "fp32_folded": folded, "slimseg_int8": quantize_minmax(folded, calib),
                  "ort_int8": ort_static(folded, calib, Path(tmp))}
    results = compare(models, rounds=args.rounds, threads=args.threads, input_shape=(1, 3, SIZE, SIZE))
    base = results["fp32"].median_ms
    print(f"machine: {machine_info()}")
    print("| model | median ms | p90 ms | speedup vs fp32 | argmax agreement vs fp32 (20 val) |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        agree = agreement(fp32, models[key], val)
        print(f"| {key} | {r.median_ms:.3f} | {r.p90_ms:.3f} | {base / r.median_ms:.2f}x | {agree:.4f} |")
    print(f"threads={args.threads} rounds={args.rounds} calib={args.calib}; "
          f"command: python benchmarks/qdq_placement.py --rounds {args.rounds} --threads {args.threads}")


if __name__ == "__main__":
    main()
