"""INT8 on the real PP-HumanSeg-Lite models: FP32 vs onnxruntime's quantize_static vs slimseg
PTQ vs slimseg QAT+distillation (issue 3's table).

Each slimseg run is `slimseg compress` in a child process (wall time and peak memory are the
child's own); quantize_static is done right (BN folded, quant_pre_process, QDQ, per-channel,
MinMax, 64 calibration images, reduce_range where onnxruntime's int8 kernels saturate). All
models are then timed together, interleaved, in onnxruntime at 1 and 2 threads, and scored on
the val split.

    python benchmarks/quant_assets.py [--model pp_humanseg_lite_192] [--rounds 300] [--skip qat]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"pp_humanseg_lite_192": ("mini_supervisely_192.yaml", "pp_humanseg_ptq.yaml", "pp_humanseg_qat.yaml"),
           "pp_humanseg_lite_portrait_398x224": ("mini_supervisely_398x224.yaml", "pp_humanseg_portrait_ptq.yaml",
                                                 "pp_humanseg_portrait_qat.yaml")}


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one child process, from its own rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def ort_quantize_static(model: onnx.ModelProto, images, folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from slimseg.model.passes import fold_batchnorm

    folded = folder / "folded.onnx"
    onnx.save(fold_batchnorm.run(model).model, folded)
    prepared = folder / "prepared.onnx"
    quant_pre_process(str(folded), str(prepared))
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: im[None]} for im in images])

        def get_next(self):
            return next(self.items, None)

    out = folder / "ort_int8.onnx"
    # done right includes onnxruntime's advice for CPUs whose int8 kernels saturate (no VNNI)
    from slimseg.hardware.int8 import int8_saturates

    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=int8_saturates("onnxruntime"))
    return onnx.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pp_humanseg_lite_192", choices=sorted(CONFIGS))
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ptq", "qat", "ort"])
    args = parser.parse_args()

    from slimseg.data import build_dataset
    from slimseg.evaluate import evaluate
    from slimseg.hardware.bench import compare, machine_info
    from slimseg.model.importers import load_model

    dataset_yaml, ptq_yaml, qat_yaml = CONFIGS[args.model]
    data = ROOT / "examples" / "configs" / "dataset" / dataset_yaml
    loaded = load_model(model_dir=args.assets / "models" / args.model)
    models = {"FP32": loaded.onnx}
    rows: dict[str, dict] = {"FP32": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "ort" not in args.skip:
            train = build_dataset(data, "train", transforms=build_dataset(data, "val").transforms)
            start = time.perf_counter()
            models["onnxruntime quantize_static"] = ort_quantize_static(loaded.onnx, [train[i].image for i in range(64)], tmp)
            rows["onnxruntime quantize_static"] = {"wall_s": time.perf_counter() - start}
        for key, config in (("ptq", ptq_yaml), ("qat", qat_yaml)):
            if key in args.skip:
                continue
            save = tmp / key
            cmd = [sys.executable, "-m", "slimseg", "compress", "--model_dir", str(args.assets / "models" / args.model),
                   "--strategy_config", str(ROOT / "examples" / "configs" / config), "--dataset_config", str(data),
                   "--save_dir", str(save), "--output", "json", "--quiet"]
            wall, peak, out = run_child(cmd)
            report = json.loads(out)
            label = f"slimseg {key.upper()}"
            models[label] = onnx.load(save / "model.onnx")
            rows[label] = {"wall_s": wall, "peak_mb": peak, "qat": report["quantization"].get("qat")}
        val = build_dataset(data, "val")
        for label, model in models.items():
            rows[label]["miou"] = evaluate(model, val, progress=False).metrics.miou
            rows[label]["size"] = model.ByteSize()
        latency = {t: compare(models, rounds=args.rounds, threads=t, input_shape=(1, *loaded.input_shape[1:]))
                   for t in (1, 2)}
    fp32 = {t: latency[t]["FP32"].median_ms for t in (1, 2)}
    print(f"machine: {json.dumps(machine_info())}")
    skip = f" --skip {' '.join(args.skip)}" if args.skip else ""
    print(f"command: python benchmarks/quant_assets.py --model {args.model} --rounds {args.rounds}{skip}\n")
    print("| method | val mIoU | 1 thread ms (speedup) | 2 threads ms (speedup) | size KiB | wall s | peak MB | s/iter |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        lat = " | ".join(f"{latency[t][label].median_ms:.2f} ({fp32[t] / latency[t][label].median_ms:.2f}x)" for t in (1, 2))
        qat = row.get("qat") or {}
        per_iter = f"{qat['seconds_per_iter']:.2f}" if qat.get("seconds_per_iter") else "-"
        wall = f"{row['wall_s']:.0f}" if "wall_s" in row else "-"
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else "-"
        print(f"| {label} | {row['miou']:.4f} | {lat} | {row['size'] / 1024:.0f} | {wall} | {peak} | {per_iter} |")


if __name__ == "__main__":
    main()
