"""Predicted vs published latency (slimseg.hardware.cost_model) -- issue 5's check.

PP-HumanSeg-Lite portrait 398x224 on SD710, 1 thread: FP32 (BN folded as Paddle-Lite fuses
it), INT8 (slimseg's min/max Q/DQ, the placement PTQ writes) and 75 % sparse (75 % of every
1x1 conv weight zeroed by magnitude, as ACT's UnstructurePrune conv1x1_only/local does),
against PaddleSlim ACT's published 56.363 / 49.656 / 37.712 ms. Those three numbers FIT the
three free constants (``--fit`` re-derives them); an out-of-sample check follows: MobileNetV1's
predicted INT8 speed-up vs PaddleSlim's model zoo ("1.6-2x" on SD835/SD855, Paddle-Lite).

    python benchmarks/latency_prediction.py [--assets ../shared/assets] [--fit]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PUBLISHED = {"fp32": 56.363, "int8": 49.656, "sparse75": 37.712}
SHAPE = (1, 3, 224, 398)
FIT = {"fp32": "eff_gemm", "int8": "int8_speedup", "sparse75": "eff_sparse"}


def portrait_variants(assets: Path) -> dict[str, onnx.ModelProto]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cost_model import portrait_variants as build  # one recipe for the test and this table

    return build(assets)


def fit(models: dict[str, onnx.ModelProto]) -> dict[str, float]:
    """Bisect each free constant so its variant's prediction equals the published number."""
    from slimseg.hardware.cost_model import predict_latency, with_constants

    found: dict[str, float] = {}
    for variant, key in FIT.items():
        lo, hi = 0.01, 10.0
        for _ in range(50):
            mid = (lo + hi) / 2
            ms = predict_latency(models[variant], with_constants("SD710", **found, **{key: mid}), input_shape=SHAPE).ms
            lo, hi = (mid, hi) if ms > PUBLISHED[variant] else (lo, mid)
        found[key] = mid
    return found


def mobilenet_v1() -> onnx.ModelProto:
    """MobileNetV1 1.0 at 224 (random weights: latency does not depend on their values)."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 3
    plan = [(32, 2, 1)] + [(o, s, 0) for o, s in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                                                    *((512, 1),) * 5, (1024, 2), (1024, 1))]
    for i, (out, stride, full) in enumerate(plan):
        if full:
            x, c = _conv(nodes, inits, rng, x, c, out, 3, stride, 1, f"c{i}"), out
            continue
        x = _conv(nodes, inits, rng, x, c, c, 3, stride, c, f"dw{i}")
        x, c = _conv(nodes, inits, rng, x, c, out, 1, 1, 1, f"pw{i}"), out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((1000, c)).astype(np.float32) * 0.01, "fc_w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "mobilenet_v1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(nodes, inits, rng, x, c_in, c_out, k, stride, group, name) -> str:
    w = rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32) * 0.1
    inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}_b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], group=group,
                                  strides=[stride] * 2, pads=[k // 2] * 4))
    nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--fit", action="store_true", help="re-derive the free constants from the published numbers")
    args = parser.parse_args()

    from slimseg.compress.quant.qdq import quantize_minmax
    from slimseg.hardware.cost_model import predict_latency

    models = portrait_variants(args.assets.resolve())
    if args.fit:
        print("fitted SD710 constants:", {k: round(v, 4) for k, v in fit(models).items()})
    print("| model | variant | target | predicted ms | published ms | error |\n|---|---|---|---|---|---|")
    for variant, model in models.items():
        ms = predict_latency(model, "SD710", input_shape=SHAPE).ms
        err = (ms - PUBLISHED[variant]) / PUBLISHED[variant]
        print(f"| PP-HumanSeg-Lite 398x224 | {variant} | SD710:1 | {ms:.1f} | {PUBLISHED[variant]} | {err:+.1%} |")
    for variant, model in models.items():
        for target, threads in (("SD710", 4), ("SD625", 1), ("SD625", 4), ("RK3288", 1), ("RK3288", 4), ("T4", 1)):
            ms = predict_latency(model, target, threads=threads, input_shape=SHAPE).ms
            print(f"| PP-HumanSeg-Lite 398x224 | {variant} | {target}:{threads} | {ms:.2f} | - | - |")
    mbv1 = mobilenet_v1()
    calib = [np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)]
    mbv1_int8 = quantize_minmax(mbv1, calib)
    fp32_ms, int8_ms = (predict_latency(m, "SD710").ms for m in (mbv1, mbv1_int8))
    print(f"\nMobileNetV1 224 on SD710:1 predicted FP32 {fp32_ms:.1f} ms, INT8 {int8_ms:.1f} ms: "
          f"speed-up {fp32_ms / int8_ms:.2f}x (published for Paddle-Lite on SD835/SD855: 1.6-2x; check only)")


if __name__ == "__main__":
    main()
