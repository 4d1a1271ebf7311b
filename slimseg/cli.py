"""Command line: `slimseg compress|eval|bench|inspect|demo`.

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
    p = sub.add_parser("compress", help="quantize a model to INT8 (PTQ or QAT + distillation), measured",
                       description="Compress a model with a PaddleSlim ACT strategy YAML (QuantPost for "
                                   "post-training quantization, QuantAware + Distillation for QAT) and "
                                   "write save_dir/model.onnx (Q/DQ, INT8 weights), report.json and "
                                   "strategy.yaml. Accuracy and latency are measured in onnxruntime.")
    _add_model_args(p)
    p.add_argument("--strategy_config", "--config_path", dest="strategy_config", required=True,
                   help="ACT strategy YAML (Global, Distillation, QuantAware, QuantPost, TrainConfig)")
    p.add_argument("--dataset_config", help="PaddleSeg dataset YAML (default: Global.reader_config)")
    p.add_argument("--save_dir", default="output", help="output folder (default ./output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_dir")
    p.add_argument("--deploy_hardware", default=None,
                   help="deploy target (seed flag); only the local CPU (onnxruntime) is measured so far")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_compress)
    return p


def _cmd_compress(args) -> int:
    from slimseg.compress.api import compress
    from slimseg.report.text import format_compress

    if args.deploy_hardware not in (None, "cpu", "onnxruntime"):
        raise SlimsegError(f"--deploy_hardware {args.deploy_hardware!r}: only 'cpu' (onnxruntime on this "
                           "machine) is supported in this release")
    model = None
    if args.model or args.model_dir:
        model = _load(args)
    result = compress(model, args.strategy_config, data=args.dataset_config, save_dir=args.save_dir,
                      overwrite=args.overwrite, progress=not args.quiet, input_shape=args.input_shape)
    _print(result.report, args.output, format_compress(result))
    return 0


# --- eval ---------------------------------------------------------------------------------

def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="measure mIoU of a model on a dataset (onnxruntime)",
                       description="Evaluate a model on a PaddleSeg dataset YAML: mIoU, per-class IoU, "
                                   "pixel accuracy, Kappa, Dice, measured in onnxruntime.")
    _add_model_args(p)
    p.add_argument("--dataset_config", required=True, help="PaddleSeg dataset YAML (val_dataset is used)")
    p.add_argument("--split", default="val", choices=("val", "train", "test"), help="which split (default val)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_eval(args) -> int:
    from slimseg.evaluate import evaluate
    from slimseg.report.text import format_eval

    result = evaluate(_load(args), args.dataset_config, split=args.split, threads=args.threads,
                      limit=args.limit, progress=not args.quiet)
    _print(result.to_dict(), args.output, format_eval(result))
    return 0


# --- bench --------------------------------------------------------------------------------

def _add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure latency, size, parameters and MACs of a model",
                       description="Latency of a model in onnxruntime (median, p90, min of many runs "
                                   "after warm-up), with size, parameter count and MACs.")
    _add_model_args(p)
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    p.add_argument("--runtime", default="onnxruntime", help="runtime (default onnxruntime)")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_bench)
    return p


def _cmd_bench(args) -> int:
    from slimseg.hardware.bench import benchmark
    from slimseg.report.text import format_bench

    loaded = _load(args)
    result = benchmark(loaded.onnx, threads=args.threads, warmup=args.warmup, runs=args.runs,
                       input_shape=loaded.input_shape, runtime=args.runtime, progress=not args.quiet)
    data = {"model": loaded.source, **result.to_dict()}
    _print(data, args.output, format_bench(loaded.source, result))
    return 0


# --- inspect ------------------------------------------------------------------------------

def _add_inspect(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show a model's inputs, outputs, ops, parameters and MACs",
                       description="Import a model the way compress does and summarise the canonical graph.")
    _add_model_args(p)
    p.add_argument("--save", metavar="FILE.onnx", help="also write the canonical ONNX graph here")
    _add_output_arg(p)
    p.set_defaults(func=_cmd_inspect)
    return p


def _cmd_inspect(args) -> int:
    from slimseg.report.text import format_inspect, inspect_model

    loaded = _load(args)
    if args.save:
        from slimseg.io import save_onnx

        save_onnx(loaded.onnx, args.save)
    data = inspect_model(loaded)
    _print(data, args.output, format_inspect(data))
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


# --- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimseg",
        description="slimseg: automatic compression of semantic-segmentation models "
                    "(ONNX or Paddle inference models), measured in real runtimes.",
    )
    parser.add_argument("--version", action="version", version=f"slimseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_compress, _add_eval, _add_bench, _add_inspect, _add_demo):
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
        print(f"slimseg {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"slimseg {args.command}: interrupted", file=sys.stderr)
        return 130
