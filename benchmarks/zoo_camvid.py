"""INT8 on the seed's other architectures: CamVid teachers of slimseg.zoo, FP32 vs PTQ vs QAT
(issue 7's table).

For every architecture whose teacher ``benchmarks/train_teacher.py`` left in the cache
(``<cache>/<arch>_small_camvid_240x180/model.onnx``): slimseg PTQ (``camvid_ptq.yaml``) and
QAT + distillation (``<model>_qat.yaml``), each a ``slimseg compress`` child process whose
output is kept in ``--out`` and reused by a rerun (wall time and peak memory are from its
report.json); val mIoU of every model in onnxruntime and OpenVINO;
latency FP32 vs INT8, interleaved, in onnxruntime and OpenVINO (INFERENCE_PRECISION_HINT=f32)
at 1 and 2 threads; file sizes.

    python benchmarks/zoo_camvid.py [--arch unet hrnet_w18] [--skip qat] [--rounds 200] [--out out/zoo]

``--full ARCH`` times the full-size architecture instead (no CamVid teacher of that size can be
trained on 2 cores): random weights with batch-norm statistics from 16 CamVid images, so the
activations have realistic ranges, then slimseg PTQ with onnxruntime's and OpenVINO's Q/DQ
placement; accuracy is meaningless there and not reported, only latency.

    python benchmarks/zoo_camvid.py --full deeplabv3_resnet50 --input-size 480 360 --rounds 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import onnx
from quant_assets import run_child  # wall time and peak memory of a child process

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
DATASET = CONFIGS / "dataset" / "camvid_240x180.yaml"
CACHE = Path(os.environ.get("SLIMSEG_CACHE", Path.home() / ".cache" / "slimseg")) / "teachers"
QAT_CONFIGS = {"pp_liteseg": "pp_liteseg_qat.yaml", "hrnet_w18": "hrnet_qat.yaml", "unet": "unet_qat.yaml",
               "deeplabv3_resnet50": "deeplabv3_qat.yaml"}
RUNTIMES = ("onnxruntime", "openvino")


def compress_child(model: Path, config: Path, save: Path, dataset: Path = DATASET, extra=()) -> dict:
    cmd = [sys.executable, "-m", "slimseg", "compress", "--model", str(model), "--strategy_config", str(config),
           "--dataset_config", str(dataset), "--save_dir", str(save), "--output", "json", "--quiet", *extra]
    wall, peak, out = run_child(cmd)
    return {"wall_s": wall, "peak_mb": peak, "report": json.loads(out)}


def latency_table(models: dict, rounds: int, shape) -> dict:
    """{(runtime, threads): {label: BenchResult}}, every runtime's models interleaved."""
    from slimseg.hardware.bench import compare

    return {(runtime, threads): compare(models, rounds=rounds, threads=threads, runtime=runtime, input_shape=shape)
            for runtime in RUNTIMES for threads in (1, 2)}


def print_latency(latency: dict, base: str = "FP32") -> None:
    labels = list(next(iter(latency.values())))
    print("| runtime | threads | " + " | ".join(f"{label} ms" for label in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for (runtime, threads), results in latency.items():
        fp32 = results[base].median_ms
        cells = [f"{r.median_ms:.2f}" + ("" if label == base else f" ({fp32 / r.median_ms:.2f}x)")
                 for label, r in results.items()]
        print(f"| {runtime} ({results[base].precision or 'as exported'}) | {threads} | " + " | ".join(cells) + " |")
    ort_fp32 = latency[("onnxruntime", 1)][base].median_ms
    for label, r in latency[("openvino", 1)].items():
        if label != base:
            print(f"\n{label} in OpenVINO vs FP32 in onnxruntime, 1 thread: {ort_fp32 / r.median_ms:.2f}x")


def zoo_rows(args) -> None:
    from slimseg.evaluate import evaluate

    records = []
    for arch in args.arch:
        run = CACHE / f"{arch}_small_camvid_240x180"
        teacher = run / "model.onnx"
        if not teacher.is_file():
            print(f"skipping {arch}: no teacher at {teacher} (python benchmarks/train_teacher.py --arch {arch} ...)")
            continue
        trained = json.loads((run / "result.json").read_text())
        models, rows = {"FP32": onnx.load(teacher)}, {"FP32": {}}
        for key, config in (("PTQ", CONFIGS / "camvid_ptq.yaml"), ("QAT", CONFIGS / QAT_CONFIGS[arch])):
            if key.lower() in args.skip:
                continue
            save = Path(args.out).resolve() / f"{arch}_{key.lower()}"
            if not (save / "report.json").is_file():
                compress_child(teacher, config, save)
            report = json.loads((save / "report.json").read_text())
            models[key] = onnx.load(save / "model.onnx")
            qat = report["quantization"].get("qat") or {}
            rows[key] = {"wall_s": report["wall_seconds"], "peak_mb": report["peak_rss_mb"],
                         "s_per_iter": qat.get("seconds_per_iter")}
        for label, model in models.items():
            rows[label]["size_kib"] = model.ByteSize() / 1024
            for runtime in RUNTIMES:
                result = evaluate(model, DATASET, runtime=runtime, threads=2, progress=False)
                rows[label][f"miou_{runtime}"] = result.metrics.miou
        shape = (1, *[d.dim_value for d in models["FP32"].graph.input[0].type.tensor_type.shape.dim][1:])
        latency = latency_table(models, args.rounds, shape)
        fp32 = rows["FP32"]["miou_onnxruntime"]
        print(f"\n### {arch} (small preset, {trained['params'] / 1e6:.2f} M parameters; teacher: "
              f"{trained['iterations']} iterations in {trained['train_seconds'] / 60:.1f} min)\n")
        print("| model | val mIoU onnxruntime (vs FP32) | val mIoU OpenVINO | size KiB | wall s | peak MB | s/iter |")
        print("|---|---|---|---|---|---|---|")
        for label, row in rows.items():
            drop = "" if label == "FP32" else f" ({row['miou_onnxruntime'] - fp32:+.4f})"
            print(f"| {label} | {row['miou_onnxruntime']:.4f}{drop} | {row['miou_openvino']:.4f} | "
                  f"{row['size_kib']:.0f} | {_fmt(row.get('wall_s'), '.0f')} | {_fmt(row.get('peak_mb'), '.0f')} | "
                  f"{_fmt(row.get('s_per_iter'), '.2f')} |")
        print()
        print_latency(latency)
        records.append({"arch": arch, "teacher": trained, "rows": rows,
                        "latency": {f"{rt}/{t}": {k: r.median_ms for k, r in res.items()}
                                    for (rt, t), res in latency.items()}})
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


def full_size(args) -> None:
    """Latency of the full-size architecture, FP32 vs slimseg PTQ (both placements)."""
    import torch

    from slimseg.data import build_dataset
    from slimseg.zoo import build, export_onnx

    w, h = args.input_size
    data = CONFIGS / "dataset" / "camvid_360x480.yaml"
    torch.manual_seed(0)
    model = build(args.full, 11)
    train = build_dataset(data, "train", transforms=[{"type": "Resize", "target_size": [w, h]}, {"type": "Normalize"}])
    images = torch.stack([torch.from_numpy(train[i].image) for i in range(16)])
    with torch.no_grad():  # batch-norm statistics from real images: realistic activation ranges
        model.train()
        for chunk in images.split(4):
            model(chunk)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(model, tmp / "fp32.onnx", (1, 3, h, w))
        dataset = _few_images_dataset(data, tmp, (w, h))
        strategy = tmp / "ptq.yaml"
        strategy.write_text("QuantPost:\n  algo: minmax\n  batch_size: 4\n  batch_nums: 2\n  onnx_format: true\n")
        models = {"FP32": onnx.load(fp32)}
        for placement in args.placements:
            child = compress_child(fp32, strategy, tmp / placement, dataset, extra=("--placement", placement))
            models[f"INT8 ({placement} placement)"] = onnx.load(tmp / placement / "model.onnx")
            print(f"PTQ with {placement} placement: {child['wall_s']:.0f} s wall, {child['peak_mb']:.0f} MB peak")
        params = sum(p.numel() for p in model.parameters())
        print(f"\n### {args.full} full size ({params / 1e6:.1f} M parameters at 11 classes), 1x3x{h}x{w}, "
              f"median of {args.rounds} interleaved rounds\n")
        print_latency(latency_table(models, args.rounds, (1, 3, h, w)))


def _few_images_dataset(data: Path, folder: Path, size) -> Path:
    """The CamVid YAML with 4 val images at `size`: the full-size run scores untrained weights,
    whose accuracy means nothing, and an OS8 ResNet-50 takes seconds per image on 2 cores."""
    import yaml

    from slimseg.data import load_dataset_config

    cfg = load_dataset_config(data).to_dict()
    val_list = Path(cfg["val_dataset"]["val_path"])
    short = folder / "val4.txt"
    short.write_text("".join(val_list.read_text().splitlines(keepends=True)[:4]))
    cfg["val_dataset"]["val_path"] = str(short)
    cfg["val_dataset"]["transforms"] = [{"type": "Resize", "target_size": list(size)}, {"type": "Normalize"}]
    out = folder / "camvid_few.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    from slimseg.hardware.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(QAT_CONFIGS), choices=sorted(QAT_CONFIGS))
    parser.add_argument("--skip", nargs="*", default=[], choices=["ptq", "qat"])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved latency rounds")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--out", default="out/zoo", help="compressed models, reused when there (default out/zoo)")
    parser.add_argument("--full", choices=sorted(QAT_CONFIGS), help="time the full-size architecture only")
    parser.add_argument("--input-size", type=int, nargs=2, default=(480, 360), metavar=("W", "H"))
    parser.add_argument("--placements", nargs="+", default=["onnxruntime", "openvino"],
                        choices=["onnxruntime", "openvino"], help="Q/DQ placements to time with --full")
    args = parser.parse_args()
    print(f"machine: {json.dumps(machine_info())}")
    print(f"command: python {' '.join(sys.argv)}")
    full_size(args) if args.full else zoo_rows(args)


if __name__ == "__main__":
    main()
