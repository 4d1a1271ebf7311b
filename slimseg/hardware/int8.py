"""Where int8 kernels (onnxruntime's, OpenVINO's) saturate, so slimseg quantizes weights they can multiply.

x86 CPUs without VNNI (AVX2; AVX-512 before Cascade Lake; AMD before Zen 4) multiply uint8
activations by int8 weights with ``vpmaddubsw``, which adds two products into an int16 and
saturates: ``2 * 255 * 127 = 64770`` does not fit in 32767. onnxruntime's GEMM-based kernels (Conv,
grouped Conv, MatMul, Gemm) use it there; its depthwise kernel sums in int32 and is exact. The Q/DQ
graph is still right, the runtime is not: on PP-HumanSeg-Lite (AMD EPYC, AVX2), 8-bit weights
scored 0.8293 val mIoU in onnxruntime against 0.8622 for the same graph run unfused. With weights on
-64..64 a pair stays within ``2 * 255 * 64 = 32640`` (onnxruntime's ``reduce_range`` advice): 0.8637.

Models with int8 activations (other tools write them) fare worse there: onnxruntime shifts them to
uint8 first, and a conv of 127s by 127s came out at 1 % of its value. slimseg writes uint8
activations; :func:`saturating_weights` flags both kinds, since -64..64 weights fix both.

Rather than guess from CPU flags which kernels a given onnxruntime build picks, slimseg asks it:
:func:`int8_saturates` runs one small int8 conv whose pair sums overflow an int16 (OpenVINO
gave the same numbers as onnxruntime there, depthwise exact included).
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimseg.model.passes._rewrite import attr

REDUCED_WEIGHT_MAX = 64  # 2 * 255 * 64 <= 32767
GEMM_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@functools.lru_cache(maxsize=None)
def int8_saturates(runtime: str = "onnxruntime") -> bool:
    """True when `runtime`'s int8 conv on this machine saturates uint8 x int8 pair sums.

    OpenVINO does too on such CPUs, with the same numbers (both use ``vpmaddubsw``); a runtime
    that is not installed is answered for by onnxruntime, the CPU being the cause."""
    from slimseg.errors import MissingDependencyError
    from slimseg.hardware.runtime import get_runtime

    model, x, out_scale = _probe()
    try:
        session = get_runtime(runtime, model, threads=1)  # onnxruntime: optimizations on, int8 kernels
        got = float(np.asarray(session.run(x)[0]).max()) / out_scale
    except MissingDependencyError:
        return runtime != "onnxruntime" and int8_saturates("onnxruntime")
    except Exception as err:  # noqa: BLE001 - a runtime without int8 convs: nothing to narrow for
        logging.getLogger("slimseg").debug("int8 probe in %s failed: %s", runtime, err)
        return False  # should its int8 be wrong anyway, the export check says so
    return abs(got - 200.0) > 1.0


def _probe() -> tuple[onnx.ModelProto, np.ndarray, float]:
    """A Q/DQ 1x1 conv, 8 channels of 255 x 127: exactly 200 on its output grid, ~101 saturated."""
    channels, pixel, weight = 8, 255.0, 127
    out_scale = pixel * weight * channels / 200.0
    x = np.full((1, channels, 2, 2), pixel, np.float32)
    consts = {
        "x_scale": np.array(1.0, np.float32), "x_zero": np.array(0, np.uint8),
        "w_q": np.full((channels, channels, 1, 1), weight, np.int8),
        "w_scale": np.ones(channels, np.float32), "w_zero": np.zeros(channels, np.int8),
        "y_scale": np.array(out_scale, np.float32), "y_zero": np.array(0, np.uint8),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_saturation_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), x, out_scale


def runs_in_gemm(node: onnx.NodeProto, weight_shape: Sequence[int] | None) -> bool:
    """Whether onnxruntime (or OpenVINO) multiplies `node`'s weight in a GEMM kernel (saturating on such CPUs):
    every Conv but a depthwise one (one input channel and one output channel per group),
    ConvTranspose, MatMul, Gemm. An unknown shape counts as GEMM (reducing is the safe side)."""
    if node.op_type not in GEMM_OPS:
        return False
    if node.op_type != "Conv" or weight_shape is None or len(weight_shape) < 2:
        return True
    group = attr(node, "group", 1)
    return not (group > 1 and weight_shape[1] == 1 and weight_shape[0] == group)


def gemm_weights(model: onnx.ModelProto, weights: Sequence[str]) -> set[str]:
    """Those of `weights` (initializer names) that may be multiplied in a GEMM kernel: all but
    the ones read only by depthwise convs (an Identity or other reader counts as GEMM: reducing
    a weight that did not need it costs a little precision, not reducing one costs correctness)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    readers = _readers(model.graph)
    return {name for name in set(weights) if not readers.get(name)
            or any(r.op_type != "Conv" or runs_in_gemm(r, shapes.get(name)) for r in readers[name])}


def saturating_weights(model: onnx.ModelProto) -> list[str]:
    """int8 weight initializers of a Q/DQ model that onnxruntime would multiply in a saturating
    kernel with values beyond +-64 (empty for a model quantized with reduced weights)."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers = _readers(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        if q.data_type != onnx.TensorProto.INT8:
            continue
        if not any(runs_in_gemm(c, list(q.dims)) for c in consumers.get(node.output[0], [])):
            continue
        if int(np.abs(numpy_helper.to_array(q).astype(np.int16)).max(initial=0)) > REDUCED_WEIGHT_MAX:
            found.append(node.input[0])
    return found


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of `graph` that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def saturation_warning(model: onnx.ModelProto, runtime: str = "onnxruntime") -> str | None:
    """A warning when `runtime` on this machine will not compute `model` as its Q/DQ says."""
    weights = saturating_weights(model)
    if not weights or not int8_saturates(runtime):
        return None
    return (f"{len(weights)} int8 weights of this model use values beyond +-64 in convs/matmuls that "
            f"{runtime}'s int8 kernels on this CPU (x86 without VNNI) compute with saturated sums: "
            "its results here differ from the model's Q/DQ semantics (quantize with "
            "reduce_range: true for such CPUs)")


def warn_if_saturates(model: onnx.ModelProto, runtime: str, source: str, logger, optimization: str = "all") -> None:
    """Log :func:`saturation_warning` for a model about to run in `runtime` (onnxruntime with its
    optimizations, or OpenVINO; others run no such int8 kernels)."""
    if runtime == "openvino" or (runtime == "onnxruntime" and optimization != "disable"):
        warning = saturation_warning(model, runtime)
        if warning:
            logger.warning("%s: %s", source, warning)
