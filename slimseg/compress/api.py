"""`compress(model, config, *, data, save_dir)`: the whole INT8 pipeline in one call.

import -> baseline (mIoU and latency of the original, measured in onnxruntime) -> fold BN ->
plan Q/DQ -> PTQ (calibration, optional bias correction and reconstruction) -> optional QAT
distilled from the original model -> export Q/DQ into the user's graph -> verify the runtime
agrees with the training model -> final mIoU and latency -> save_dir (written atomically).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slimseg import __version__
from slimseg.compress.quant.placement import PLACEMENTS, placement_style
from slimseg.data import calibration_batches
from slimseg.errors import ConfigError, SlimsegError
from slimseg.hardware.int8 import int8_saturates, saturation_warning

log = logging.getLogger("slimseg")

# Ops that only glue quantized layers together: quantized whatever quantize_op_types lists,
# because a float op between two int8 layers costs a dequantize/quantize pair and, measured
# in onnxruntime, the whole speedup (see the README's "Where Q/DQ go"). Per placement style:
# PLACEMENTS[name].glue_ops (OpenVINO's style quantizes only the joins, Add and Concat).
GLUE_OPS = PLACEMENTS["onnxruntime"].glue_ops
MIN_AGREEMENT = 0.995


class ExportAgreementError(SlimsegError):
    """onnxruntime's output of the exported model disagrees with the training model."""


@dataclass
class CompressResult:
    save_dir: Path
    report: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.save_dir / "model.onnx"


def compress(model=None, config=None, *, data=None, save_dir="output", overwrite: bool = False,
             progress: bool = True, bench_rounds: int = 200, log_fn: Callable[[str], None] | None = None,
             input_shape=None, rewrite: bool = True, placement: str = "onnxruntime",
             deploy_hardware: str | None = None, max_metric_drop: float | None = None,
             target_speedup: float | None = None, time_budget: float | str | None = None,
             resume: bool = False, device: str | None = "auto", html: bool = True) -> CompressResult:
    """Compress `model` (anything `load_model` takes; default: the config's Global.model_dir)
    with the strategy `config` (ACT YAML path, dict or StrategyConfig) on `data` (dataset YAML;
    default: Global.reader_config). Writes model.onnx, report.json, report.html and strategy.yaml.
    `rewrite`: apply the exact latency rewrites of :mod:`slimseg.model.optimize` (for onnxruntime).
    `placement`: Q/DQ placement style, "onnxruntime" or "openvino" (see quant.placement).
    A strategy without a compression section (None, or only Global/TrainConfig) runs the automatic
    search :func:`slimseg.compress.auto.auto_compress` for `deploy_hardware` (default
    Global.deploy_hardware, else "cpu") with `max_metric_drop`, `target_speedup`, `time_budget`.
    `resume`: continue from `<save_dir>.checkpoint` (see :mod:`slimseg.checkpoint`); `device`:
    auto|cpu|cuda for training. Under torchrun, training is data-parallel and rank 0 writes.
    `html`: also write report.html (the automatic search draws it once, for the chosen run)."""
    from slimseg.compress.distill import strategy_distill_nodes
    from slimseg.config import load_strategy_config
    from slimseg.data import DatasetConfig, build_dataset, load_dataset_config
    from slimseg.evaluate import evaluate
    from slimseg.io import save_onnx
    from slimseg.model.batching import fixed_batch
    from slimseg.model.importers import load_model
    from slimseg.model.torch_graph import check_supported
    from slimseg.train import peak_rss_mb

    say = log_fn or log.info
    started = time.perf_counter()
    strategy = config if hasattr(config, "quant_aware") else load_strategy_config(config if config is not None else {})
    placement_style(placement)
    if not _compression_sections(strategy) and strategy.transformer_prune is None:
        from slimseg.compress.auto import auto_compress

        return auto_compress(model, strategy, data=data, save_dir=save_dir, deploy_hardware=deploy_hardware,
                             max_metric_drop=max_metric_drop, target_speedup=target_speedup,
                             time_budget=time_budget, overwrite=overwrite, progress=progress,
                             bench_rounds=bench_rounds, log_fn=log_fn, input_shape=input_shape, rewrite=rewrite)
    _check_supported(strategy)
    loaded = load_model(**_model_args(model, strategy), input_shape=input_shape)
    check_supported(loaded.onnx)  # an op we cannot train fails now, not after the baseline
    data = load_dataset_config(data if data is not None else _reader_config(strategy)) \
        if not isinstance(data, DatasetConfig) else data
    val = build_dataset(data, "val")
    val.cache_decoded()  # evaluated 3 times or more (baseline, agreement, final, during QAT)
    loaded, shape_note = fix_open_dims(loaded, val)
    train_spec = build_dataset(data, "train") if data.train is not None else None
    ctx, ckpt, session = _open_run(save_dir, loaded, strategy, data, resume=resume, overwrite=overwrite,
                                   device=device)
    progress = progress and ctx.is_main

    with _work_dir(save_dir, overwrite, ctx.is_main) as work:
        say = _log_to_files(log_fn or log.info, work, ckpt, ctx.is_main)
        say(f"model {loaded.source}: {val.spec.num_classes} classes, val set {len(val)} images"
            + (f"; resuming from {ckpt.folder}" if ckpt.resumed else ""))
        if shape_note:
            say(shape_note)
        batch = fixed_batch(loaded.onnx)
        if batch is not None:
            say(f"the model's batch size is fixed to {batch}: larger batches run {batch} image(s) at a time "
                "(slower; re-export with a dynamic batch dimension to train faster)")
        if ctx.is_main:  # only rank 0 evaluates
            baseline = evaluate(loaded, val, progress=progress)
            say(f"baseline val mIoU {baseline.metrics.miou:.4f} (onnxruntime, FP32)")
        nodes = strategy_distill_nodes(strategy, loaded.onnx)
        model, stages, masks = loaded.onnx, {}, None
        if strategy.channel_prune is not None:
            model, stages["channel_prune"] = _stage(ckpt, "channel_prune", say, lambda: _channel_prune(
                loaded.onnx, strategy, val, train_spec, nodes, progress=progress, say=say, session=session))
        sparsity = strategy.unstructure_prune or strategy.asp_prune
        if sparsity is not None:
            from slimseg.compress.prune.stage import sparsify

            model, stages["sparsity"] = _stage(ckpt, "sparsity", say, lambda: sparsify(
                model, sparsity, strategy=strategy, train_set=train_spec, val_set=val, progress=progress,
                say=say, nodes=nodes, teacher=loaded.onnx, session=session))
            masks = [layer["name"] for layer in stages["sparsity"]["layers"]]
        agreement, plain_qdq = None, False
        quantized = strategy.quant_aware is not None or strategy.quant_post is not None
        if rewrite and not quantized:
            model, stages["rewrites"] = _rewrite(model, say)
        if strategy.quant_aware is not None or strategy.quant_post is not None:
            stage = _quantize(model, loaded.onnx, strategy, val, train_spec, nodes, masked=masks,
                              rewrite=rewrite, placement=placement, progress=progress, say=say, session=session)
            model, stages["quantization"] = stage["model"], stage["summary"]
            if ctx.is_main:
                # onnxruntime-style Q/DQ is checked as onnxruntime runs it (its fusions included).
                # Other placements leave float convs fed by Q/DQ, which onnxruntime's optimizer
                # rewrites at any level (conv outputs 0.9-4.5% off on PP-HumanSeg-Lite): they are checked
                # against plain Q/DQ semantics, as OpenVINO reads them.
                level = "all" if placement == "onnxruntime" else "disable"
                # 8-bit GEMM weights (reduce_range false, or a predicted target) on a CPU whose
                # onnxruntime kernels saturate them: the model is meant for CPUs that compute it
                # exactly, so it is checked and scored as plain Q/DQ, not as this CPU runs it
                plain_qdq = level == "all" and saturation_warning(model) is not None
                if plain_qdq:
                    level = "disable"
                    say("onnxruntime's int8 kernels on this CPU saturate the model's 8-bit weights "
                        "(reduce_range false): checking and scoring it as plain Q/DQ, as the CPUs it is "
                        "meant for compute it")
                agreement = verify_agreement(stage["simulator"], model, val, progress=progress,
                                             optimization=level)
                say(f"onnxruntime ({'optimized' if level == 'all' else 'plain Q/DQ'}) vs training model: "
                    f"argmax agrees on {agreement:.2%} of val pixels")
        if not ctx.is_main:  # training is over: rank 0 verifies, measures and writes save_dir
            return _wait_for_main(save_dir)
        final = evaluate(model, val, progress=progress, **({"optimization": "disable"} if plain_qdq else {}))
        say(f"compressed val mIoU {final.metrics.miou:.4f} (onnxruntime{', plain Q/DQ' if plain_qdq else ''}, "
            f"{_precision(stages)})")
        latency = measure_latency(loaded.onnx, model, loaded.input_shape, rounds=bench_rounds)
        latency_mnn = None
        if "sparsity" in stages:
            latency_mnn = measure_sparse_latency(loaded.onnx, model, loaded.input_shape, _mnn_block(strategy),
                                                 rounds=bench_rounds)
            say(_describe_mnn(latency_mnn))
        save_onnx(model, work / "model.onnx")
        (work / "strategy.yaml").write_text(strategy.to_yaml())
        report = {
            "slimseg": __version__,
            "model": loaded.source,
            "dataset": str(val.spec.source),
            "strategy": strategy.resolved(),
            "stages": list(stages),
            "baseline": {"metrics": baseline.metrics.to_dict(), "latency": latency["original"],
                         "stats": _stats(loaded.onnx, loaded.input_shape)},
            "compressed": {"metrics": final.metrics.to_dict(), "latency": latency["compressed"],
                           "precision": _precision(stages), "stats": _stats(model, loaded.input_shape),
                           **({"scored_as": "plain Q/DQ (onnxruntime, graph optimizations off): this CPU's "
                                            "int8 kernels saturate its 8-bit weights"} if plain_qdq else {})},
            "metric_drop": round(baseline.metrics.miou - final.metrics.miou, 6),
            "speedup": latency["speedup"],
            "latency_rounds": latency["rounds"],
            "size_bytes": {"original": loaded.onnx.ByteSize(), "compressed": model.ByteSize(),
                           "compressed_zipped": _zipped_size(model)},
            "agreement": agreement,
            **({"latency_mnn": latency_mnn} if latency_mnn is not None else {}),
            **stages,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        (work / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
        if html:
            from slimseg.report.html import write_report_for_run

            html = write_report_for_run(json.loads((work / "report.json").read_text()), work / "report.html",
                                        baseline=loaded.onnx, model=model, val_set=val, say=say)
    ckpt.finish()
    say(f"wrote {Path(save_dir) / 'model.onnx'}, report.json" + (" and report.html" if html else ""))
    _distributed().barrier()
    return CompressResult(Path(save_dir), report)


# ---- stages ------------------------------------------------------------------------------

def _quantize(model, teacher, strategy, val, train_set, nodes, *, masked=None, rewrite: bool = True,
              placement: str = "onnxruntime", progress: bool, say, session=None) -> dict[str, Any]:
    """PTQ, then QAT when QuantAware is configured, of `model` (the original or a pruned/sparse
    version of it), distilled from `teacher` (the original); `masked` weights keep their zeros.
    Returns the exported model, the simulator and a summary."""
    from slimseg.compress.quant.placement import plan_quantization
    from slimseg.compress.quant.ptq import bias_correct, calibrate, reconstruct
    from slimseg.compress.quant.simulator import QuantSimulator
    from slimseg.config import QuantPost
    from slimseg.model.passes import fold_batchnorm

    quant = strategy.quant_aware or strategy.quant_post
    # QAT without a QuantPost section: MSE ranges from 32 images only initialise the scales
    post = strategy.quant_post or QuantPost(algo="mse", batch_size=8, batch_nums=4)
    # the rewrites come first so that Q/DQ is placed on the graph that will run
    prepared = fold_batchnorm.run(model).model
    rewrites = None
    if rewrite:
        rewritten, report = _rewrite(prepared, say)
        produced = {out for node in rewritten.graph.node for out in node.output}
        missing = [n for n in nodes if n not in produced]
        if missing:  # a channel permutation renamed them: distillation needs the original tensors
            say(f"graph rewrites skipped: they rename the distillation tensors {missing}")
        else:
            prepared, rewrites = rewritten, report
    op_types = set(quant.onnx_op_types()) | placement_style(placement).glue_ops
    skip = set(getattr(post, "skip_tensor_list", None) or [])
    exclude_nodes = _not_quant_nodes(prepared, getattr(strategy.quant_aware, "not_quant_pattern", None))
    plan = plan_quantization(prepared, op_types=op_types, exclude_nodes=exclude_nodes, exclude_tensors=skip,
                             placement=placement)
    say(f"quantizing {len(plan.weights)} weights and {len(plan.activations)} activation groups; "
        f"{len(plan.float_nodes)} nodes stay float")
    weight_method = "mse" if strategy.quant_post is not None or strategy.quant_aware is None else "absmax"
    reduce, why = _reduces_range(quant.reduce_range, placement)
    sim = QuantSimulator(prepared, plan, weight_scale_method=weight_method, reduce_range=reduce)
    reduced = sim.reduced_weights
    if reduce:
        say(f"{len(reduced)} of {len(plan.weights)} weights quantized on -64..64 ({why}); depthwise convs keep -127..127")
    if masked:
        from slimseg.compress.prune.gmp import keep_masks_in
        from slimseg.compress.prune.masks import masks_from_zeros

        keep_masks_in(sim, masks_from_zeros({n: sim.graph.parameter(n).detach() for n in masked}))

    calib_source = train_set if train_set is not None else val
    batch = max(1, post.batch_size)
    count = len(calib_source) if post.batch_nums is None else min(len(calib_source), batch * post.batch_nums)
    batches = calibration_batches(calib_source, val, min(count, 256), batch)
    report = calibrate(sim, batches, algo=post.algo.value, hist_percent=post.hist_percent)
    say(f"calibrated {report.calibration_images} images with {report.algo} ranges "
        f"in {report.calibration_seconds:.1f} s")
    if strategy.quant_post is not None and post.bias_correct:
        bias_correct(sim, batches, report)
        say(f"bias correction in {report.bias_correction_seconds:.1f} s")
    if strategy.quant_post is not None and post.recon_level:
        from slimseg.compress.teacher import OrtTeacher

        if post.regions:
            say("QuantPost.regions is ignored: slimseg reconstructs all layers jointly")
        iterations = max(1, post.epochs) * len(batches)
        reconstruct(sim, OrtTeacher(teacher, nodes), batches, nodes, report,
                    iterations=iterations, lr=post.lr if post.lr < 1 else 1e-2, progress=progress)
        say(f"reconstruction ({iterations} steps) in {report.reconstruction['seconds']:.1f} s")
    summary: dict[str, Any] = {
        "weights": len(plan.weights), "activation_groups": len(plan.activations),
        "float_nodes": plan.float_nodes, "ptq": report.to_dict(), "distill_nodes": nodes,
        "reduce_range": {"weights": sorted(reduced), "why": why},
    }
    if rewrites is not None:
        summary["rewrites"] = rewrites
    if strategy.quant_aware is not None:
        summary["qat"] = _qat(sim, teacher, strategy, val, train_set, nodes, progress=progress, say=say,
                              session=session)
    sim.quantize(True)
    return {"model": sim.export(), "simulator": sim, "summary": summary}


def _reduces_range(setting, placement: str) -> tuple[bool, str]:
    """(quantize GEMM weights on -64..64?, why): ``reduce_range: auto`` resolved on this machine,
    by asking the runtime the Q/DQ is placed for (OpenVINO saturates where onnxruntime does)."""
    if setting != "auto":
        return bool(setting), f"reduce_range: {str(setting).lower()}"
    runtime = "openvino" if placement == "openvino" else "onnxruntime"
    if int8_saturates(runtime):
        return True, f"{runtime}'s int8 kernels on this CPU saturate 8-bit weights, as on x86 without VNNI"
    return False, f"{runtime}'s int8 kernels on this CPU do not saturate"


def _qat(sim, teacher_model, strategy, val, train_set, nodes, *, progress: bool, say,
         session=None) -> dict[str, Any]:
    """Quantization-aware training distilled from the original model (teacher in onnxruntime)."""
    from slimseg.compress.distill import Distiller
    from slimseg.compress.teacher import OrtTeacher
    from slimseg.config import TrainConfig
    from slimseg.compress.finetune import distill_loader
    from slimseg.evaluate import evaluate
    from slimseg.train import default_total_iters, train

    if train_set is None:
        raise ConfigError("QuantAware needs training images: the dataset config has no train_dataset",
                          file=str(val.spec.source))
    cfg = strategy.train_config or TrainConfig()
    batch_size = strategy.train_batch_size(8)
    total = default_total_iters(cfg, len(train_set), batch_size)
    distiller = Distiller(sim, OrtTeacher(teacher_model, nodes, only_taps=True), strategy.distillation, nodes=nodes)
    if hasattr(train_set, "cache_decoded"):
        train_set.cache_decoded()  # every image is read once per epoch for many epochs
    sim.quantize(True)
    sim.train()
    for p in sim.parameters():
        p.requires_grad_(p.is_floating_point())
    for fq in sim.activations.values():  # ranges stay as calibrated
        for p in fq.parameters(recurse=False):
            p.requires_grad_(False)
    params = [p for p in sim.graph.parameters() if p.requires_grad]

    # next batch and its teacher tensors prepared in a background thread
    loader = distill_loader(train_set, batch_size, cfg.seed, distiller)

    best: dict[str, Any] = {}

    def evaluate_now() -> float:
        was_training = sim.training
        sim.eval()
        miou = evaluate(sim.export(), val, progress=False).metrics.miou
        sim.train(was_training)
        return miou

    def on_best(iteration: int, metric: float) -> None:
        best.update(iteration=iteration, metric=metric, state=copy.deepcopy(sim.state_dict()))

    say(f"QAT: {total} iterations at batch {batch_size}, distilling {nodes}")
    result = train(distiller, params, loader, train_cfg=cfg, total_iters=total, evaluate=evaluate_now,
                   on_best=on_best, progress=progress, log=say, session=session and session.for_stage("qat"),
                   state={"best": best})
    if best:
        sim.load_state_dict(best["state"])
    sim.eval()
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    summary["history"] = result.history
    summary["batch_size"] = batch_size
    return summary


# ---- verification and latency -------------------------------------------------------------

@torch.no_grad()
def verify_agreement(sim, exported, dataset, *, limit: int | None = None, progress: bool = False,
                     minimum: float = MIN_AGREEMENT, optimization: str = "all") -> float:
    """Share of val pixels where onnxruntime's argmax equals the fake-quant model's; below
    `minimum` the export is wrong (a mismatched scale, a fused op that rounds differently).
    `optimization`: onnxruntime's graph optimization level; "disable" checks the plain Q/DQ
    semantics, which is what an export placed for another runtime has to match."""
    from slimseg.hardware.runtime import OrtRuntime

    runtime = OrtRuntime(exported, threads=torch.get_num_threads(), optimization=optimization)
    sim.eval()
    sim.quantize(True)
    same = total = 0
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(count):
        image = dataset[i].image[None].astype(np.float32)
        ours = sim(torch.from_numpy(image))
        ours = (ours[0] if isinstance(ours, tuple) else ours).numpy()
        theirs = runtime.run(image)[0]
        a, b = _class_map(ours), _class_map(theirs)
        same += int((a == b).sum())
        total += a.size
    agreement = same / max(total, 1)
    if agreement < minimum:
        hint = saturation_warning(exported) if optimization != "disable" else None
        raise ExportAgreementError(
            f"the exported model disagrees with the training model on {1 - agreement:.2%} of val pixels "
            f"(argmax agreement {agreement:.4f} < {minimum}); refusing to write it"
            + (f". Likely cause: {hint}" if hint else ""))
    return round(agreement, 6)


LATENCY_SECONDS = 60.0  # about this long per thread count; at least MIN_LATENCY_ROUNDS rounds
MIN_LATENCY_ROUNDS = 10


def measure_latency(original, compressed, input_shape, *, rounds: int = 200,
                    max_seconds: float = LATENCY_SECONDS, runtime: str = "onnxruntime",
                    thread_counts: tuple[int, ...] = (1, 2), **runtime_options) -> dict[str, Any]:
    """Interleaved original/compressed medians in `runtime` (onnxruntime) at 1 and 2 threads.

    A full-size DeepLabv3 takes seconds per image on 2 cores: 200 rounds would take longer than
    its compression, so the rounds (and warm-up) are cut to what fits in `max_seconds`, never
    below ten."""
    from slimseg.hardware.bench import compare

    shape = tuple(1 if d is None else d for d in input_shape) if input_shape else None
    models = {"original": original, "compressed": compressed}
    out: dict[str, Any] = {"original": {}, "compressed": {}, "speedup": {}, "rounds": {}}
    for threads in thread_counts:
        results = compare(models, rounds=rounds, threads=threads, input_shape=shape, max_seconds=max_seconds,
                          min_rounds=MIN_LATENCY_ROUNDS, runtime=runtime, **runtime_options)
        out["rounds"][f"{threads}_thread"] = results["original"].runs
        for name, r in results.items():
            out[name][f"{threads}_thread"] = {"median_ms": round(r.median_ms, 3), "p90_ms": round(r.p90_ms, 3),
                                              "min_ms": round(r.min_ms, 3)}
        out["speedup"][f"{threads}_thread"] = round(results["original"].median_ms / results["compressed"].median_ms, 3)
    return out


def measure_sparse_latency(original, compressed, input_shape, block=(1, 1), *, rounds: int = 200,
                           max_seconds: float = LATENCY_SECONDS) -> dict[str, Any]:
    """Interleaved original/compressed medians in MNN at 1 thread, for a sparse model: onnxruntime
    and OpenVINO have no sparse kernels, MNN's 1x1 convs use the zeros (`block` (1, 4): its
    SIMD_OC=4 kernel). Without MNN, or where MNN cannot run the model (Q/DQ INT8), says why."""
    from slimseg.errors import MissingDependencyError

    try:
        timed = measure_latency(original, compressed, input_shape, rounds=rounds, max_seconds=max_seconds,
                                runtime="mnn", thread_counts=(1,), block=tuple(block))
    except MissingDependencyError as err:
        return {"skipped": str(err)}
    except SlimsegError as err:  # MNN cannot run Q/DQ INT8 models: it returns nothing
        return {"error": str(err).splitlines()[0]}
    return {"threads": 1, "block": list(block), "rounds": timed["rounds"]["1_thread"],
            **{key: timed[key]["1_thread"] for key in ("original", "compressed", "speedup")}}


def _mnn_block(strategy) -> tuple[int, int]:
    block = getattr(strategy.unstructure_prune, "block", None) if strategy.unstructure_prune else None
    return tuple(block) if block else (1, 1)


def _describe_mnn(latency: dict[str, Any]) -> str:
    if "speedup" in latency:
        return (f"MNN (sparse kernels, 1 thread): {latency['original']['median_ms']:.2f} -> "
                f"{latency['compressed']['median_ms']:.2f} ms ({latency['speedup']:.2f}x)")
    return f"MNN latency not measured: {latency.get('skipped') or latency.get('error')}"


def _channel_prune(original, strategy, val, train_set, nodes, *, progress: bool, say, session=None):
    """Remove channels (ChannelPrune), then recover accuracy by distillation from the original."""
    from slimseg.compress.finetune import distill_finetune
    from slimseg.compress.prune.channel import prune_channels

    cfg = strategy.channel_prune
    pruned, report = prune_channels(original, cfg.pruned_ratio, criterion=cfg.criterion,
                                    params=cfg.prune_params_name, round_to=cfg.round_to)
    summary = report.to_dict()
    say(f"channel pruning ({cfg.criterion}, ratio {cfg.pruned_ratio}, multiples of {cfg.round_to}): "
        f"MACs {summary['macs_before'] / 1e6:.1f} M -> {summary['macs_after'] / 1e6:.1f} M, "
        f"parameters {summary['params_before']:,} -> {summary['params_after']:,}")
    from slimseg.model.passes import fold_batchnorm

    pruned = fold_batchnorm.run(pruned).model  # fewer ops to train; bn_scale has already ranked
    if cfg.reconstruct and train_set is not None:
        from slimseg.compress.prune.reconstruct import RECONSTRUCT_BATCH, RECONSTRUCT_IMAGES, reconstruct_model

        batches = calibration_batches(train_set, val, RECONSTRUCT_IMAGES, RECONSTRUCT_BATCH)
        pruned, rec = reconstruct_model(pruned, original, batches, removed=report.removed, log=say)
        summary["reconstruction"] = rec.to_dict()
    tuned, summary["finetune"] = distill_finetune(pruned, original, strategy=strategy, train_set=train_set,
                                                  val_set=val, nodes=nodes, progress=progress, say=say,
                                                  session=session)
    return tuned, summary


def _rewrite(model, say) -> tuple[Any, dict[str, Any]]:
    """The exact latency rewrites (:func:`slimseg.model.optimize.optimize`) and what they did."""
    from slimseg.model.optimize import optimize

    rewritten, report = optimize(model)
    lines = report.lines()
    if lines:
        say("graph rewrites: " + "; ".join(lines))
    return rewritten, report.to_dict()


def _precision(stages: dict) -> str:
    return "INT8" if "quantization" in stages else "FP32"


def _stats(model, input_shape) -> dict[str, Any]:
    """Parameters, MACs and how many conv weights are exactly zero."""
    from slimseg.model.stats import model_stats

    stats = model_stats(model, input_shape=input_shape)
    return {"params": stats.params, "macs": stats.macs, "weight_zeros": _weight_zeros(model)}


def _weight_zeros(model) -> float:
    """Share of exact zeros among the Conv weights (float or int8 initializers)."""
    from onnx import numpy_helper

    weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    sources = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    names = {sources.get(w, w) for w in weights}
    zeros = total = 0
    for init in model.graph.initializer:
        if init.name in names:
            values = numpy_helper.to_array(init)
            zeros, total = zeros + int((values == 0).sum()), total + values.size
    return round(zeros / total, 6) if total else 0.0


def _zipped_size(model) -> int:
    """Bytes of the model compressed with zlib: what zeros save in a download or a package."""
    import zlib

    return len(zlib.compress(model.SerializeToString(), 6))


# ---- helpers ------------------------------------------------------------------------------

def _distributed():
    from slimseg import distributed

    return distributed


def _open_run(save_dir, loaded, strategy, data, *, resume: bool, overwrite: bool, device):
    """(process context, checkpointer, TrainSession): torchrun's group joined, the checkpoint
    folder of this (model, strategy, dataset) opened (see :mod:`slimseg.checkpoint`)."""
    from slimseg.checkpoint import Checkpointer, checkpoint_dir, fingerprint
    from slimseg.train import TrainSession

    ctx = _distributed().init(device)
    key = fingerprint(loaded.onnx.SerializeToString(), strategy.resolved(), data.to_dict())
    ckpt = Checkpointer(checkpoint_dir(save_dir), fingerprint=key, resume=resume, overwrite=overwrite,
                        writer=ctx.is_main)
    return ctx, ckpt, TrainSession(checkpointer=ckpt, device=ctx.device)


@contextmanager
def _work_dir(save_dir, overwrite: bool, main: bool):
    """save_dir written atomically by rank 0; other ranks get a folder that is thrown away."""
    import tempfile

    from slimseg.io import atomic_dir

    if main:
        with atomic_dir(save_dir, overwrite=overwrite) as work:
            yield work
    else:
        with tempfile.TemporaryDirectory(prefix="slimseg-rank-") as work:
            yield Path(work)


def _log_to_files(echo, work: Path, ckpt, main: bool):
    """Every line to the console, save_dir/compress.log and a copy in the checkpoint folder
    (earlier runs' lines first when resuming); other ranks say nothing."""
    from slimseg.checkpoint import LOG_NAME, LineLog

    if not main:
        return lambda line: None
    return LineLog(echo, [work / LOG_NAME, ckpt.log_path], preamble=ckpt.previous_log())


def _stage(ckpt, name: str, say, run):
    """A stage's (model, summary): stored by a finished earlier run, or run now and stored;
    rank 0's result on every rank."""
    return tuple(_distributed().broadcast_object(ckpt.run_stage(name, run, say)))


def _wait_for_main(save_dir) -> CompressResult:
    _distributed().barrier()
    return CompressResult(Path(save_dir), {})



def _check_supported(strategy) -> None:
    if strategy.transformer_prune is not None:
        raise ConfigError("TransformerPrune is not supported (segmentation CNNs have no attention heads "
                          "to prune); use ChannelPrune", file=strategy.source, key="TransformerPrune")
    if strategy.unstructure_prune is not None and strategy.asp_prune is not None:
        raise ConfigError("UnstructurePrune and ASPPrune both set: choose one sparsity pattern",
                          file=strategy.source, key="ASPPrune")


def _compression_sections(strategy) -> list[str]:
    """The compression sections the strategy sets (none: the automatic search chooses)."""
    fields = ("quant_aware", "quant_post", "unstructure_prune", "asp_prune", "channel_prune")
    return [name for name in fields if getattr(strategy, name) is not None]


def fix_open_dims(loaded, val) -> tuple[Any, str | None]:
    """A model whose image H/W (or C) are dynamic, fixed to the size of the val images after
    their transforms, and a note saying so; unchanged (note None) when nothing is open.
    Latency, MAC counts and the folding of shape arithmetic need one size; the data's is the
    size the model is evaluated at. Val images of several sizes are a DataError."""
    from slimseg.errors import DataError
    from slimseg.model.importers import open_image_dims, with_input_shape

    if not open_image_dims(loaded):
        return loaded, None
    picks = sorted({0, len(val) // 2, len(val) - 1})
    shapes = {tuple(val[i].image.shape) for i in picks}
    if len(shapes) != 1:
        raise DataError(f"model {loaded.source} takes images of any size at input {loaded.input_name!r}, and the "
                        f"val images come in several sizes {sorted(shapes)}: add a Resize with target_size to the "
                        "val transforms, or pass input_shape (--input_shape 1,C,H,W)")
    chw = shapes.pop()
    fixed = with_input_shape(loaded, chw)
    return fixed, (f"model input {loaded.input_name!r} has dynamic dims; using {'x'.join(map(str, chw))} (CxHxW), "
                   "the size of the val images (pass input_shape to choose another)")


def _model_args(model, strategy) -> dict[str, Any]:
    if model is not None:
        return {"model": model}
    g = strategy.global_
    if g is None or g.model_dir is None:
        raise SlimsegError("no model given: pass --model/--model_dir or set Global.model_dir in the strategy")
    return {"model": None, "model_dir": g.model_dir, "model_filename": g.model_filename,
            "params_filename": g.params_filename}


def _reader_config(strategy):
    if strategy.global_ is None or strategy.global_.reader_config is None:
        raise SlimsegError("no dataset given: pass --dataset_config or set Global.reader_config in the strategy")
    return strategy.global_.reader_config


def _not_quant_nodes(model, patterns) -> list[str]:
    """Nodes whose name contains one of `patterns` (ACT's not_quant_pattern / name_scope)."""
    if not patterns:
        return []
    return [n.name for n in model.graph.node if any(p and p in n.name for p in patterns)]


def _class_map(output: np.ndarray) -> np.ndarray:
    from slimseg.evaluate import channel_argmax

    out = np.asarray(output)
    is_scores = out.ndim == 4 and out.shape[1] > 1 and np.issubdtype(out.dtype, np.floating)
    return channel_argmax(out) if is_scores else out


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)
