"""Command line: `slimseg compress|eval|bench|export|inspect|demo|predict|download|optimize`.

Each subcommand is a pair `_add_<name>(subparsers)` / `_cmd_<name>(args)`; the command only
hands arguments to the library. Every SlimsegError is caught once, in `main`, and printed as
one line (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from slimseg import __version__
from slimseg.errors import SlimsegError

log = logging.getLogger("slimseg")


# --- shared argument groups -------------------------------------------------------------

def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (an ONNX file, or a Paddle inference model as in PaddleSlim ACT)")
    group.add_argument("--model", help="ONNX file, or a folder holding a Paddle inference model / one .onnx")
    group.add_argument("--model_dir", help="Paddle inference model folder (seed flag)")
    group.add_argument("--model_filename", help="Paddle program file in --model_dir (default model.pdmodel)")
    group.add_argument("--params_filename", help="Paddle weights file in --model_dir (default model.pdiparams)")
    group.add_argument("--input_shape", type=_parse_shape, metavar="N,C,H,W",
                       help="fix the input shape, e.g. 1,3,192,192 (overrides deploy.yaml)")


def _add_runtime_args(parser: argparse.ArgumentParser, *, default_help: str) -> None:
    parser.add_argument("--runtime", default="onnxruntime",
                        help=f"onnxruntime (default), openvino or mnn; {default_help}")
    parser.add_argument("--precision", choices=("f32", "bf16", "f16"), default=None,
                        help="OpenVINO's inference precision (default f32: on CPUs with AMX OpenVINO "
                             "otherwise runs an FP32 model in bf16); the one it used is reported")


def _runtime_options(args) -> dict[str, Any]:
    """Keyword arguments for the runtime: --precision is OpenVINO's and an error elsewhere."""
    if args.precision is None:
        return {}
    if args.runtime != "openvino":
        raise SlimsegError(f"--precision applies to --runtime openvino only, not {args.runtime}")
    return {"precision": args.precision}


def _add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("table", "json"), default="table",
                        help="print a readable table (default) or JSON")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W integers, got {text!r}") from None
    if len(dims) != 4 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected 4 positive integers N,C,H,W, got {text!r}")
    return dims


def _load(args: argparse.Namespace):
    from slimseg.model.importers import load_model

    if not args.model and not args.model_dir:
        raise SlimsegError("no model given: pass --model FILE.onnx or --model_dir DIR (Paddle inference model)")
    return load_model(
        args.model,
        model_dir=args.model_dir,
        model_filename=args.model_filename,
        params_filename=args.params_filename,
        input_shape=args.input_shape,
    )


def _print(data: dict[str, Any], fmt: str, table: str) -> None:
    print(json.dumps(data, indent=2) if fmt == "json" else table)


# --- compress -----------------------------------------------------------------------------

def _add_compress(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help="prune and/or quantize a model, distilled from the original, measured",
                       description="Compress a model with a PaddleSlim ACT strategy YAML: ChannelPrune, "
                                   "UnstructurePrune or ASPPrune (each fine-tuned by distillation), then "
                                   "QuantPost (post-training INT8) or QuantAware + Distillation (QAT); exact "
                                   "graph rewrites for speed. Without a strategy file, or with one that has no "
                                   "compression section (only Global/TrainConfig), slimseg searches the strategy "
                                   "itself for --deploy_hardware: PTQ, QAT, sparsity and channel pruning (with "
                                   "and without INT8) are tried cheapest-first with short runs and the fastest "
                                   "within --max_metric_drop is trained fully. Writes save_dir/model.onnx, "
                                   "report.json, report.html, strategy.yaml and compress.log (with --quiet, "
                                   "the log file is the only place info lines go). Accuracy and latency are "
                                   "measured in onnxruntime; a sparse model's latency also in MNN (mnn extra), "
                                   "whose kernels use the zeros.")
    _add_model_args(p)
    p.add_argument("--strategy_config", "--config_path", dest="strategy_config", default=None,
                   help="ACT strategy YAML (Global, Distillation, QuantAware, QuantPost, TrainConfig); "
                        "omitted or without a compression section: automatic search")
    p.add_argument("--dataset_config", help="PaddleSeg dataset YAML (default: Global.reader_config)")
    p.add_argument("--save_dir", default="output", help="output folder (default ./output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_dir")
    p.add_argument("--no-rewrite", dest="rewrite", action="store_false",
                   help="keep the graph as it is (no channel-shuffle folding, 2-class softmax as sigmoid, "
                        "channel alignment); they speed up onnxruntime, not OpenVINO")
    p.add_argument("--placement", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="where Q/DQ nodes go: onnxruntime's QDQ style (default: also quantizes glue ops such as "
                        "residual Adds, Resize and pooling) or OpenVINO's (inputs of Conv/MatMul and joins "
                        "only: faster in OpenVINO, slower in onnxruntime)")
    auto = p.add_argument_group("automatic search (when the strategy has no compression section)")
    auto.add_argument("--deploy_hardware", default=None,
                      help="target whose latency the search minimizes (seed flag; default Global.deploy_hardware, "
                           "else cpu): cpu (measured here) or a profile such as SD710 (predicted); an unknown "
                           "name lists the known ones")
    auto.add_argument("--max_metric_drop", type=float, default=None,
                      help="largest accepted val mIoU drop (default 0.005 = 0.5 point, or "
                           "TrainConfig.target_metric when that is set)")
    auto.add_argument("--target_speedup", type=float, default=None,
                      help="accept only candidates at least this much faster than FP32 on the target (ACT's option)")
    auto.add_argument("--time_budget", default=None, metavar="SECONDS|20m|1h",
                      help="stop trying candidates when the next one (and the final training) would not fit")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <save_dir>.checkpoint (same model, strategy, data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where training runs (default auto: CUDA when present, with AMP); under torchrun "
                        "each process trains on its share of the batch")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_compress)
    return p


def _cmd_compress(args) -> int:
    from slimseg.compress.api import compress
    from slimseg.report.text import format_compress

    from slimseg.compress.auto import format_candidates, parse_duration, resolve_target

    if args.deploy_hardware is not None:
        resolve_target(args.deploy_hardware)  # an unknown name fails now, listing the known ones
    model = None
    if args.model or args.model_dir:
        model = _load(args)
    from slimseg import distributed

    try:
        result = compress(model, args.strategy_config, data=args.dataset_config, save_dir=args.save_dir,
                          overwrite=args.overwrite, progress=not args.quiet, input_shape=args.input_shape,
                          rewrite=args.rewrite, resume=args.resume, device=args.device, placement=args.placement,
                          log_fn=_silent if args.quiet else None, deploy_hardware=args.deploy_hardware,
                          max_metric_drop=args.max_metric_drop, target_speedup=args.target_speedup,
                          time_budget=parse_duration(args.time_budget))
        if distributed.is_main():  # under torchrun, rank 0 reports
            text = format_compress(result)
            if "candidates" in result.report:
                text += "\n\n" + format_candidates(result.report["candidates"], target=result.report["auto"]["target"])
            _print(result.report, args.output, text)
    finally:
        distributed.shutdown()
    return 0


def _silent(line: str) -> None:
    """--quiet: info lines go only to save_dir/compress.log."""


# --- eval ---------------------------------------------------------------------------------

def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="measure mIoU of a model on a dataset (onnxruntime or OpenVINO)",
                       description="Evaluate a model on a PaddleSeg dataset YAML: mIoU, per-class IoU, "
                                   "pixel accuracy, Kappa, Dice, measured in a runtime (onnxruntime by "
                                   "default).")
    _add_model_args(p)
    p.add_argument("--dataset_config", required=True, help="PaddleSeg dataset YAML (val_dataset is used)")
    p.add_argument("--split", default="val", choices=("val", "train", "test"), help="which split (default val)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    _add_runtime_args(p, default_help="the accuracy is the runtime's own")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_eval(args) -> int:
    from slimseg.evaluate import evaluate
    from slimseg.report.text import format_eval

    result = evaluate(_load(args), args.dataset_config, split=args.split, threads=args.threads,
                      limit=args.limit, progress=not args.quiet, runtime=args.runtime, **_runtime_options(args))
    _print(result.to_dict(), args.output, format_eval(result))
    return 0


# --- bench --------------------------------------------------------------------------------

def _add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure latency, size, parameters and MACs of a model",
                       description="Latency of a model in a runtime (onnxruntime by default; median, "
                                   "p90, min of many runs after warm-up), with size, parameter count and MACs.")
    _add_model_args(p)
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    _add_runtime_args(p, default_help="sparse 1x1 convs run sparse in mnn")
    p.add_argument("--profile", action="store_true",
                   help="also show time per op type from onnxruntime's profiler (its own runs)")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_bench)
    return p


def _cmd_bench(args) -> int:
    from slimseg.hardware.bench import benchmark
    from slimseg.report.text import format_bench

    loaded = _load(args)
    result = benchmark(loaded.onnx, threads=args.threads, warmup=args.warmup, runs=args.runs,
                       input_shape=loaded.input_shape, runtime=args.runtime, progress=not args.quiet,
                       **_runtime_options(args))
    data = {"model": loaded.source, **result.to_dict()}
    table = format_bench(loaded.source, result)
    if args.profile:
        from slimseg.hardware.profile import format_profile, profile_ops

        rows = profile_ops(loaded.onnx, threads=args.threads, warmup=min(args.warmup, 5),
                           runs=min(args.runs, 50), input_shape=loaded.input_shape)
        data["profile"] = [r.to_dict() for r in rows]
        table = f"{table}\n{format_profile(rows)}"
    _print(data, args.output, table)
    return 0


# --- optimize -----------------------------------------------------------------------------

def _add_optimize(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("optimize", help="exact graph rewrites that cut latency (no retraining)",
                       description="Rewrite a model's graph for speed with exact rewrites (BatchNorm "
                                   "folding, channel-shuffle folding, 2-class Softmax as Sigmoid, channel "
                                   "alignment): same outputs up to float rounding. Prints what changed "
                                   "and the latency before/after (interleaved, onnxruntime).")
    p.add_argument("model_path", metavar="MODEL", help="ONNX file, or a Paddle inference model folder")
    p.add_argument("-o", "--out", required=True, metavar="OUT.onnx", help="where to write the rewritten model")
    p.add_argument("--input_shape", type=_parse_shape, metavar="N,C,H,W", help="fix the input shape")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the latency comparison")
    p.add_argument("--threads", type=int, default=1, help="runtime threads for the comparison (default 1)")
    p.add_argument("--rounds", type=int, default=100, help="interleaved timed rounds (default 100)")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_optimize)
    return p


def _cmd_optimize(args) -> int:
    from slimseg.io import save_onnx
    from slimseg.model.importers import load_model
    from slimseg.model.optimize import optimize

    loaded = load_model(args.model_path, input_shape=args.input_shape)
    model, report = optimize(loaded.onnx)
    save_onnx(model, args.out)
    data: dict[str, Any] = {"model": loaded.source, "out": str(args.out), **report.to_dict()}
    lines = [f"{loaded.source} -> {args.out}", *(f"  {line}" for line in report.lines())]
    if args.bench:
        from slimseg.hardware.bench import compare

        timed = compare({"before": loaded.onnx, "after": model}, rounds=args.rounds, threads=args.threads,
                        input_shape=loaded.input_shape, progress=not args.quiet)
        before, after = timed["before"].median_ms, timed["after"].median_ms
        data["latency"] = {k: v.to_dict() for k, v in timed.items()}
        data["speedup"] = before / after
        lines.append(f"  latency (onnxruntime, {args.threads} thread(s), median of {args.rounds} interleaved "
                     f"rounds): {before:.2f} ms -> {after:.2f} ms ({before / after:.2f}x)")
    _print(data, args.output, "\n".join(lines))
    return 0


# --- export -------------------------------------------------------------------------------

def _add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a model as canonical ONNX or as MNN (sparse convs kept sparse)",
                       description="Import a model and write it as canonical ONNX, or convert it to MNN "
                                   "(needs slimseg[mnn]); with sparsity detection on, MNN stores and runs "
                                   "convs that are sparse enough with its sparse kernels.")
    p.add_argument("source", nargs="?", metavar="MODEL", help="ONNX file or model folder (same as --model)")
    _add_model_args(p)
    p.add_argument("-o", "--out", required=True, help="output file (.onnx or .mnn)")
    p.add_argument("--format", choices=("onnx", "mnn"), default=None, help="default: from the suffix of --out")
    p.add_argument("--no-sparse", dest="sparse", action="store_false", help="MNN: store every conv dense")
    p.add_argument("--block", choices=("1x1", "1x4"), default="1x1",
                   help="MNN: sparse blocks along output channels (1x4 needs blocks of 4 zeros; default 1x1)")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_export)
    return p


def _cmd_export(args) -> int:
    from pathlib import Path

    from slimseg.hardware.mnn import export_mnn, sparse_layers
    from slimseg.io import save_onnx

    args.model = args.model or args.source
    fmt = args.format or Path(args.out).suffix.lower().lstrip(".")
    if fmt not in ("onnx", "mnn"):
        raise SlimsegError(f"cannot tell the format of {args.out!r}: pass --format onnx or --format mnn")
    block = tuple(int(n) for n in args.block.split("x"))
    loaded = _load(args)
    writers = {"onnx": lambda: save_onnx(loaded.onnx, args.out),
               "mnn": lambda: export_mnn(loaded.onnx, args.out, sparse=args.sparse, block=block)}
    path = writers[fmt]()
    data = {"model": loaded.source, "format": fmt, "path": str(path), "size_bytes": path.stat().st_size}
    if fmt == "mnn" and args.sparse:
        data["sparse_convs"] = [layer.name for layer in sparse_layers(path)]
    lines = [f"wrote {path} ({fmt}, {data['size_bytes'] / 1024:.1f} KiB) from {loaded.source}"]
    if "sparse_convs" in data:
        names = data["sparse_convs"]
        lines.append(f"convs MNN runs sparse: {len(names)} ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''})"
                     if names else "convs MNN runs sparse: none (needs > 60% zeros, or > 30% zero 1x4 blocks)")
    _print(data, args.output, "\n".join(lines))
    return 0


# --- inspect ------------------------------------------------------------------------------

def _add_inspect(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show a model's inputs, outputs, ops, parameters and MACs",
                       description="Import a model the way compress does and summarise the canonical graph: "
                                   "I/O, ops, parameters, MACs, and what compress would touch: layers "
                                   "quantized, weights and channel groups prunable, distillation nodes.")
    _add_model_args(p)
    p.add_argument("--save", metavar="FILE.onnx", help="also write the canonical ONNX graph here")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_inspect)
    return p


def _cmd_inspect(args) -> int:
    from slimseg.model.inspect import format_compression, inspect_model
    from slimseg.report.text import format_inspect

    loaded = _load(args)
    if args.save:
        from slimseg.io import save_onnx

        save_onnx(loaded.onnx, args.save)
    data = inspect_model(loaded)
    _print(data, args.output, f"{format_inspect(data)}\n\n{format_compression(data)}")
    return 0


# --- demo ---------------------------------------------------------------------------------

def _add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="offline end-to-end demo on synthetic data (about a minute)",
                       description="Builds a small synthetic segmentation dataset, trains a tiny teacher "
                                   "on it, exports it to ONNX, then evaluates and benchmarks it. Needs no "
                                   "input and no network.")
    p.add_argument("--save_dir", default="slimseg_demo", help="where to write the demo's files (default ./slimseg_demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_dir")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_demo)
    return p


def _cmd_demo(args) -> int:
    from slimseg.demo import run_demo
    from slimseg.report.text import format_demo

    summary = run_demo(args.save_dir, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
                       progress=not args.quiet)
    _print(summary, args.output, format_demo(summary))
    return 0


# --- predict ------------------------------------------------------------------------------

def _add_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="segment images, a folder, a list or a video with any model",
                       description="Run a model (original or compressed; ONNX or Paddle folder) on an image, "
                                   "a folder (recursive), a PaddleSeg .txt list or a video, with the model's "
                                   "own preprocessing (deploy.yaml) or a dataset YAML's val transforms. Writes "
                                   "<name>.png (class ids, palette), <name>_overlay.jpg and, for 2-class "
                                   "models, <name>_matte.png / <name>_bg.jpg; a video gives _overlay.mp4 and "
                                   "_mask.mp4 (pip install 'slimseg[video]').")
    p.add_argument("model", metavar="MODEL_OR_DIR", help="ONNX file or Paddle inference model folder")
    p.add_argument("input", metavar="INPUT", help="image, folder, .txt list (first column) or video file")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--runtime", default="onnxruntime", help="runtime (default onnxruntime)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--batch_size", type=int, default=1, help="images per runtime call (default 1)")
    p.add_argument("--dataset_config", help="PaddleSeg dataset YAML: use its val transforms (and dataset_root "
                                            "for list entries) instead of the model's deploy.yaml")
    p.add_argument("--matte", action="store_true", help="2-class models: also write the alpha matte")
    p.add_argument("--bg", metavar="COLOR|IMAGE", help="2-class models: also write the image on this "
                                                       "background ('green', '#00ff00', 'R,G,B' or an image)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_predict)
    return p


def _cmd_predict(args) -> int:
    from slimseg.predict import predict

    result = predict(args.model, args.input, out_dir=args.out, runtime=args.runtime, threads=args.threads,
                     batch_size=args.batch_size, preprocess=args.dataset_config, matte=args.matte, bg=args.bg,
                     overwrite=args.overwrite, progress=not args.quiet)
    _print(result.to_dict(), args.output, result.summary())
    return 0


# --- download -----------------------------------------------------------------------------

def _add_download(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("download", help="download the seed's public model and datasets (cached)",
                       description="Download, check (sha256) and extract a public asset into the cache "
                                   "($SLIMSEG_CACHE or ~/.cache/slimseg); prints the folder. A partial "
                                   "download is resumed. --list shows the names.")
    p.add_argument("name", nargs="?", help="asset name (see --list)")
    p.add_argument("--list", action="store_true", help="list the known assets and exit")
    p.add_argument("--cache_dir", help="cache folder (default $SLIMSEG_CACHE or ~/.cache/slimseg)")
    p.add_argument("--force", action="store_true", help="download and extract again")
    p.add_argument("--url", help="download from this URL (a mirror) instead of the official one")
    p.set_defaults(func=_cmd_download)
    return p


def _cmd_download(args) -> int:
    from slimseg.download import ASSETS, download

    if args.list:
        for asset in ASSETS.values():
            aliases = f" (also: {', '.join(asset.aliases)})" if asset.aliases else ""
            print(f"{asset.name}{aliases}\n    {asset.description}\n    {asset.urls[0]}")
        return 0
    if not args.name:
        raise SlimsegError("download needs an asset NAME (slimseg download --list shows them)")
    print(download(args.name, cache_dir=args.cache_dir, force=args.force, progress=not args.quiet, url=args.url))
    return 0


# --- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimseg",
        description="slimseg: automatic compression of semantic-segmentation models "
                    "(ONNX or Paddle inference models), measured in real runtimes.",
    )
    parser.add_argument("--version", action="version", version=f"slimseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_compress, _add_eval, _add_bench, _add_export, _add_inspect, _add_demo,
                _add_predict, _add_download, _add_optimize):
        command = add(sub)
        command.add_argument("--quiet", action="store_true", help="no progress bars")
        command.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except SlimsegError as err:
        if args.debug:
            raise
        one_line = " ".join(str(err).split())  # a runtime's message may span lines
        print(f"slimseg {args.command}: error: {one_line}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # training says where its checkpoint is and how to resume
        print(f"slimseg {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
