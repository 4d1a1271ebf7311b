"""Every registered op (and its important attribute variants) against onnxruntime.

Each case is a one-node graph: ``feeds`` are graph inputs drawn with a fixed seed, ``consts``
are initializers (weights, shapes, axes). TorchGraph must match onnxruntime to 1e-5 (floats)
or exactly (integers, booleans).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from slimseg.errors import UnsupportedOpError
from slimseg.model.torch_graph import TorchGraph

F32, I64 = np.float32, np.int64
INT_MAX = np.iinfo(np.int64).max


@dataclass
class Case:
    id: str
    op: str
    ins: list[str]
    feeds: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    opset: int = 13
    outs: int = 1
    out_type: int = TensorProto.FLOAT


def rnd(*shape, seed=0, lo=-2.0, hi=2.0):
    return np.random.default_rng(seed + len(shape)).uniform(lo, hi, shape).astype(F32)


def ints(*v):
    return np.array(v, dtype=I64)


def unary(op, x=None, opset=13, **attrs):
    return Case(f"{op}-{opset}", op, ["x"], {"x": rnd(2, 3, 4, 5) if x is None else x}, attrs=attrs, opset=opset)


def binary(op, a, b, out_type=TensorProto.FLOAT, tag=""):
    return Case(f"{op}{tag}", op, ["a", "b"], {"a": a, "b": b}, out_type=out_type)


X = rnd(2, 3, 9, 11)
POS = np.abs(rnd(2, 3, 4, 5)) + 0.1
BOOL_A, BOOL_B = rnd(3, 4) > 0, rnd(1, 4, seed=5) > 0
SPECIAL = np.array([[0.0, np.nan, np.inf], [-np.inf, -1.5, np.nan]], F32)


def conv(id, w_shape, x=X, bias=True, **attrs):
    consts = {"w": rnd(*w_shape, seed=1)}
    if bias:
        out_channels = w_shape[1] * attrs.get("group", 1) if id.startswith("convT") else w_shape[0]
        consts["b"] = rnd(out_channels, seed=2)
    op = "ConvTranspose" if id.startswith("convT") else "Conv"
    return Case(id, op, ["x", *consts], {"x": x}, consts, attrs)


def pool(id, op, x=X, **attrs):
    return Case(id, op, ["x"], {"x": x}, attrs=attrs)


def resize(id, *, scales=None, sizes=None, x=None, opset=13, **attrs):
    x = rnd(1, 2, 5, 7) if x is None else x
    consts = {"roi": np.zeros(0, F32)}
    if scales is not None:
        consts["scales"] = np.array(scales, F32)
    else:
        consts["scales"] = np.zeros(0, F32)
        consts["sizes"] = ints(*sizes)
    return Case(f"resize-{id}", "Resize", ["x", *consts], {"x": x}, consts, attrs, opset=opset)


CASES = [
    *(unary(op) for op in ["Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Floor", "Ceil", "Erf",
                           "Identity", "Softplus", "Elu"]),
    *(unary(op, POS) for op in ["Log", "Sqrt", "Reciprocal"]),
    Case("Not", "Not", ["x"], {"x": BOOL_A}, out_type=TensorProto.BOOL),
    unary("LeakyRelu", alpha=0.2),
    unary("HardSigmoid", alpha=0.3, beta=0.4),
    unary("HardSwish", rnd(2, 3, 4, 5, lo=-5, hi=5), opset=14),
    unary("Gelu", opset=20),
    Case("Gelu-tanh", "Gelu", ["x"], {"x": rnd(3, 4)}, attrs={"approximate": "tanh"}, opset=20),
    Case("PRelu", "PRelu", ["x", "s"], {"x": rnd(2, 3, 4, 5)}, {"s": rnd(3, 1, 1, seed=3)}),
    Case("Clip-13", "Clip", ["x", "lo", "hi"], {"x": X}, {"lo": np.array(-0.5, F32), "hi": np.array(1.0, F32)}),
    Case("Clip-13-min-only", "Clip", ["x", "lo"], {"x": X}, {"lo": np.array(-0.5, F32)}),
    Case("Clip-13-max-only", "Clip", ["x", "", "hi"], {"x": X}, {"hi": np.array(0.3, F32)}),
    Case("Clip-6", "Clip", ["x"], {"x": X}, attrs={"min": -0.2, "max": 0.7}, opset=6),
    *(binary(op, rnd(2, 3, 4), rnd(3, 1, seed=4)) for op in ["Add", "Sub", "Mul", "Div"]),
    binary("Div", ints(7, -7, 9, -9, 5), ints(2, 2, -4, -4, 5), TensorProto.INT64, "-int"),
    binary("Pow", POS, rnd(4, 5, seed=6)),
    binary("Pow", POS, ints(2), tag="-int-exp"),
    *(binary(op, ints(1, 2, 3, 4), ints(3, 2, 1, 4), TensorProto.BOOL) for op in ["Equal", "Less", "Greater"]),
    *(binary(op, BOOL_A, BOOL_B, TensorProto.BOOL) for op in ["And", "Or", "Xor"]),
    Case("Where", "Where", ["c", "a", "b"], {"c": BOOL_A, "a": rnd(3, 4), "b": rnd(1, 4, seed=9)}),
    Case("Max", "Max", ["a", "b", "c"], {"a": rnd(2, 3), "b": rnd(3, seed=1), "c": rnd(2, 1, seed=2)}),
    Case("Min", "Min", ["a", "b"], {"a": rnd(2, 3), "b": rnd(3, seed=1)}),
    Case("Concat-1", "Concat", ["a", "b"], {"a": rnd(2, 3, 4), "b": rnd(2, 5, 4)}, attrs={"axis": 1}),
    Case("Concat-neg", "Concat", ["a", "b"], {"a": rnd(2, 3, 4), "b": rnd(2, 3, 1)}, attrs={"axis": -1}),
    Case("Split-13-input", "Split", ["x", "s"], {"x": X}, {"s": ints(4, 7)}, {"axis": 3}, outs=2),
    Case("Split-11-attr", "Split", ["x"], {"x": X}, attrs={"axis": 1, "split": [1, 2]}, opset=11, outs=2),
    Case("Split-13-equal", "Split", ["x"], {"x": rnd(2, 6, 3)}, attrs={"axis": 1}, outs=3),
    Case("Split-18-num-outputs", "Split", ["x"], {"x": rnd(2, 8, 3)}, attrs={"axis": 1, "num_outputs": 3},
         opset=18, outs=3),
    Case("Slice-13", "Slice", ["x", "s", "e", "a", "st"], {"x": X},
         {"s": ints(1, -9), "e": ints(INT_MAX, -1), "a": ints(2, 3), "st": ints(2, 3)}),
    Case("Slice-13-neg-step", "Slice", ["x", "s", "e", "a", "st"], {"x": X},
         {"s": ints(-1, 100), "e": ints(-INT_MAX, 2), "a": ints(2, -1), "st": ints(-2, -3)}),
    Case("Slice-13-clamp", "Slice", ["x", "s", "e"], {"x": rnd(4, 5)}, {"s": ints(-100, 2), "e": ints(100, 1000)}),
    Case("Slice-9-attrs", "Slice", ["x"], {"x": X}, attrs={"starts": [1], "ends": [-1], "axes": [2]}, opset=9),
    Case("Transpose", "Transpose", ["x"], {"x": X}, attrs={"perm": [0, 2, 3, 1]}),
    Case("Transpose-default", "Transpose", ["x"], {"x": rnd(2, 3, 4)}),
    Case("Reshape-0-neg1", "Reshape", ["x", "s"], {"x": X}, {"s": ints(0, -1, 11)}),
    Case("Reshape-14-allowzero", "Reshape", ["x", "s"], {"x": rnd(2, 3, 4)}, {"s": ints(4, 6)},
         attrs={"allowzero": 1}, opset=14),
    *(Case(f"Flatten-{a}", "Flatten", ["x"], {"x": X}, attrs={"axis": a}) for a in (0, 2, -1)),
    Case("Squeeze-13", "Squeeze", ["x", "a"], {"x": rnd(2, 1, 3, 1)}, {"a": ints(1, -1)}),
    Case("Squeeze-11-attr", "Squeeze", ["x"], {"x": rnd(2, 1, 3, 1)}, attrs={"axes": [1]}, opset=11),
    Case("Squeeze-all", "Squeeze", ["x"], {"x": rnd(2, 1, 3, 1)}),
    Case("Unsqueeze-13", "Unsqueeze", ["x", "a"], {"x": rnd(2, 3)}, {"a": ints(0, -1)}),
    Case("Unsqueeze-11-attr", "Unsqueeze", ["x"], {"x": rnd(2, 3)}, attrs={"axes": [1, 3]}, opset=11),
    Case("Shape", "Shape", ["x"], {"x": X}, out_type=TensorProto.INT64),
    Case("Shape-15-start-end", "Shape", ["x"], {"x": X}, attrs={"start": 1, "end": -1}, opset=15,
         out_type=TensorProto.INT64),
    Case("Gather-0", "Gather", ["x", "i"], {"x": rnd(5, 4)}, {"i": ints(0, -1, 2)}),
    Case("Gather-1-2d", "Gather", ["x", "i"], {"x": rnd(3, 5, 2)}, {"i": ints(4, 0, -2, 1).reshape(2, 2)},
         attrs={"axis": 1}),
    Case("Gather-scalar", "Gather", ["x", "i"], {"x": ints(7, 8, 9)}, {"i": np.array(-1, I64)},
         out_type=TensorProto.INT64),
    Case("Cast-f2i", "Cast", ["x"], {"x": X * 3}, attrs={"to": TensorProto.INT64}, out_type=TensorProto.INT64),
    Case("Cast-i2f", "Cast", ["x"], {"x": ints(-3, 0, 5)}, attrs={"to": TensorProto.FLOAT}),
    Case("Cast-f2b", "Cast", ["x"], {"x": np.array([0, 1.5, -2], F32)}, attrs={"to": TensorProto.BOOL},
         out_type=TensorProto.BOOL),
    Case("Pad-constant", "Pad", ["x", "p", "v"], {"x": X}, {"p": ints(0, 0, 1, 2, 0, 0, 3, 0), "v": np.array(1.5, F32)}),
    Case("Pad-reflect", "Pad", ["x", "p"], {"x": X}, {"p": ints(0, 0, 2, 3, 0, 0, 1, 2)}, {"mode": "reflect"}),
    Case("Pad-edge", "Pad", ["x", "p"], {"x": X}, {"p": ints(0, 1, 2, 3, 0, 0, 4, 1)}, {"mode": "edge"}),
    Case("Pad-negative", "Pad", ["x", "p"], {"x": X}, {"p": ints(0, 0, -1, 2, 0, 0, 3, -2)}),
    Case("Pad-18-axes", "Pad", ["x", "p", "", "a"], {"x": X}, {"p": ints(1, 2, 3, 4), "a": ints(-1, 2)}, opset=18),
    Case("Pad-2-attrs", "Pad", ["x"], {"x": X}, attrs={"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "edge"}, opset=10),
    Case("MatMul", "MatMul", ["a", "w"], {"a": rnd(2, 3, 4)}, {"w": rnd(4, 5, seed=1)}),
    Case("Gemm", "Gemm", ["a", "b", "c"], {"a": rnd(4, 3)}, {"b": rnd(5, 4, seed=1), "c": rnd(5, seed=2)},
         {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    Case("Gemm-plain", "Gemm", ["a", "b"], {"a": rnd(3, 4)}, {"b": rnd(4, 2, seed=1)}),
    Case("ConstantOfShape", "ConstantOfShape", ["s"], {}, {"s": ints(2, 3)},
         {"value": helper.make_tensor("v", TensorProto.INT64, [1], [7])}, out_type=TensorProto.INT64),
    Case("Expand", "Expand", ["x", "s"], {"x": rnd(3, 1)}, {"s": ints(2, 1, 4)}),
    Case("Tile", "Tile", ["x", "r"], {"x": rnd(2, 3)}, {"r": ints(2, 3)}),
    Case("Range-int", "Range", ["a", "b", "c"], {}, {"a": np.array(1, I64), "b": np.array(10, I64),
                                                     "c": np.array(3, I64)}, out_type=TensorProto.INT64),
    Case("Range-float", "Range", ["a", "b", "c"], {}, {"a": np.array(0.5, F32), "b": np.array(-2, F32),
                                                       "c": np.array(-0.7, F32)}),
    Case("ReduceMean-13-attr", "ReduceMean", ["x"], {"x": X}, attrs={"axes": [2, 3]}),
    Case("ReduceMean-18-input", "ReduceMean", ["x", "a"], {"x": X}, {"a": ints(1)}, {"keepdims": 0}, opset=18),
    Case("ReduceSum-13", "ReduceSum", ["x", "a"], {"x": X}, {"a": ints(-1)}, {"keepdims": 0}),
    Case("ReduceSum-13-all", "ReduceSum", ["x"], {"x": X}),
    Case("ReduceMax-13", "ReduceMax", ["x"], {"x": X}, attrs={"axes": [1], "keepdims": 1}),
    Case("Softmax-13", "Softmax", ["x"], {"x": X}, attrs={"axis": 1}),
    Case("Softmax-13-default", "Softmax", ["x"], {"x": X}),
    Case("Softmax-11-flatten", "Softmax", ["x"], {"x": X}, attrs={"axis": 1}, opset=11),
    Case("LogSoftmax", "LogSoftmax", ["x"], {"x": X}, attrs={"axis": 1}),
    Case("ArgMax", "ArgMax", ["x"], {"x": X}, attrs={"axis": 1, "keepdims": 0}, out_type=TensorProto.INT64),
    Case("ArgMax-last-ties", "ArgMax", ["x"], {"x": np.round(X)}, attrs={"axis": -1, "select_last_index": 1},
         out_type=TensorProto.INT64),
    Case("ArgMax-first-ties", "ArgMax", ["x"], {"x": np.round(X)}, attrs={"axis": 2}, out_type=TensorProto.INT64),
    Case("BatchNormalization", "BatchNormalization", ["x", "s", "b", "m", "v"], {"x": X},
         {"s": rnd(3, seed=1), "b": rnd(3, seed=2), "m": rnd(3, seed=3), "v": np.abs(rnd(3, seed=4)) + 0.5},
         {"epsilon": 1e-3}, opset=15),
    Case("LayerNormalization", "LayerNormalization", ["x", "s", "b"], {"x": rnd(2, 5, 6)},
         {"s": rnd(6, seed=1), "b": rnd(6, seed=2)}, opset=17),
    conv("conv-basic", (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    conv("conv-group-dil", (6, 1, 3, 3), x=rnd(2, 6, 9, 11), group=6, dilations=[2, 2]),
    conv("conv-stride-asym", (4, 3, 3, 2), bias=False, strides=[2, 3], pads=[0, 1, 2, 1]),
    conv("conv-same-upper", (4, 3, 4, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    conv("conv-same-lower", (4, 3, 4, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    conv("conv-valid", (4, 3, 3, 3), auto_pad="VALID"),
    conv("conv-1d", (4, 3, 3), x=rnd(2, 3, 10), pads=[1, 2]),
    conv("convT-basic", (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),
    conv("convT-group", (3, 1, 3, 3), x=X, group=3, strides=[2, 1], pads=[0, 1, 2, 0], dilations=[1, 2]),
    conv("convT-output-shape-grow", (3, 2, 3, 3), strides=[2, 2], output_shape=[20, 23]),
    conv("convT-output-shape-crop", (3, 2, 3, 3), strides=[2, 2], output_shape=[18, 20]),
    conv("convT-same-upper", (3, 2, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    conv("convT-same-lower", (3, 2, 3, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    pool("maxpool", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool("maxpool-ceil", "MaxPool", kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1),
    pool("maxpool-ceil-drop-last", "MaxPool", x=rnd(1, 2, 5, 5), kernel_shape=[2, 2], strides=[2, 2],
         pads=[1, 1, 1, 1], ceil_mode=1),
    pool("maxpool-dil-asym", "MaxPool", kernel_shape=[2, 3], dilations=[2, 1], pads=[0, 1, 1, 0]),
    pool("maxpool-same", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    pool("avgpool", "AveragePool", kernel_shape=[3, 3], strides=[2, 2]),
    pool("avgpool-pad-exclude", "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool("avgpool-pad-include", "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 2, 1, 0],
         count_include_pad=1),
    pool("avgpool-ceil-include", "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         ceil_mode=1, count_include_pad=1),
    pool("avgpool-ceil-exclude", "AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    pool("avgpool-same-lower", "AveragePool", kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    pool("globalavg", "GlobalAveragePool"),
    pool("globalmax", "GlobalMaxPool"),
    *(resize(f"nearest-{ctm}-{nm}-{s}", scales=[1, 1, s, s], mode="nearest", coordinate_transformation_mode=ctm,
             nearest_mode=nm)
      for ctm in ("asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn")
      for nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil") for s in (2.0, 0.6, 1.7)),
    *(resize(f"linear-{ctm}-{s}", scales=[1, 1, s, s * 1.1], mode="linear", coordinate_transformation_mode=ctm)
      for ctm in ("asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel") for s in (2.0, 0.5, 1.7)),
    *(resize(f"linear-sizes-{ctm}-{h}x{w}", sizes=[1, 2, h, w], mode="linear", coordinate_transformation_mode=ctm)
      for ctm in ("half_pixel", "align_corners", "pytorch_half_pixel", "asymmetric") for h, w in ((10, 14), (3, 1), (8, 9))),
    *(resize(f"nearest-sizes-{h}x{w}", sizes=[1, 2, h, w], mode="nearest") for h, w in ((10, 14), (3, 4), (13, 5))),
    resize("default-half-pixel-nearest", scales=[1, 1, 2, 3]),
    resize("18-axes", sizes=[9, 4], opset=18, mode="linear", axes=[2, 3]),
    resize("18-not-larger", sizes=[1, 2, 9, 9], opset=18, mode="linear", keep_aspect_ratio_policy="not_larger"),
    Case("resize-10", "Resize", ["x", "s"], {"x": rnd(1, 2, 4, 5)}, {"s": np.array([1, 1, 2, 1.5], F32)},
         attrs={"mode": "nearest"}, opset=10),
    Case("upsample-9-nearest", "Upsample", ["x", "s"], {"x": rnd(1, 2, 4, 5)}, {"s": np.array([1, 1, 2, 3], F32)},
         opset=9),
    Case("upsample-9-linear", "Upsample", ["x", "s"], {"x": rnd(1, 2, 4, 5)}, {"s": np.array([1, 1, 2, 2.5], F32)},
         attrs={"mode": "linear"}, opset=9),
    # cubic: inference runs torch's bicubic where it matches (a = -0.75, no exclusion, a half-pixel mode or
    # align_corners, scale == out / in: the sizes cases, cubic-x2), the interpolation matrices otherwise
    *(resize(f"cubic-{ctm}-{s}", scales=[1, 1, s, s * 1.1], mode="cubic", coordinate_transformation_mode=ctm)
      for ctm in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
      for s in (2.0, 0.5, 1.7)),
    *(resize(f"cubic-sizes-{ctm}-{h}x{w}", sizes=[1, 2, h, w], mode="cubic", coordinate_transformation_mode=ctm)
      for ctm in ("half_pixel", "pytorch_half_pixel", "align_corners") for h, w in ((10, 14), (3, 4), (1, 3))),
    *(resize(f"cubic-tf-{ctm}-{s}", scales=[1, 1, s, s], mode="cubic", coordinate_transformation_mode=ctm,
             cubic_coeff_a=-0.5, exclude_outside=1)
      for ctm in ("half_pixel", "asymmetric") for s in (2.0, 0.6)),
    resize("cubic-x2", scales=[1, 1, 2, 2], mode="cubic"),
    resize("cubic-exclude-0.75", sizes=[1, 2, 12, 4], mode="cubic", exclude_outside=1),
    resize("cubic-a-0.5-keep-outside", scales=[1, 1, 1.5, 2.5], mode="cubic", cubic_coeff_a=-0.5),
    resize("cubic-19-symmetric", scales=[1, 1, 1.7, 0.8], opset=19, mode="cubic",
           coordinate_transformation_mode="half_pixel_symmetric"),
    resize("cubic-18-axes", sizes=[9, 4], opset=18, mode="cubic", axes=[2, 3]),
    resize("cubic-2d", sizes=[9, 4], x=rnd(5, 7), mode="cubic"),
    resize("cubic-nhwc-up", scales=[1, 2, 1.5, 1], x=rnd(1, 5, 7, 2), mode="cubic"),
    # activations and maths
    *(unary(op) for op in ["Atan", "Sinh", "Cosh"]),
    *(unary(op, rnd(2, 3, 4, 5, lo=-0.99, hi=0.99)) for op in ["Tan", "Asin", "Acos"]),
    unary("Mish", rnd(2, 3, 4, 5, lo=-8, hi=8), opset=18),
    unary("Selu", rnd(2, 3, 4, 5, lo=-5, hi=5), opset=6),
    Case("Selu-attrs", "Selu", ["x"], {"x": X}, attrs={"alpha": 2.0, "gamma": 0.5}),
    unary("Celu", opset=12, alpha=0.7),
    unary("ThresholdedRelu", opset=10, alpha=0.4),
    Case("ThresholdedRelu-default", "ThresholdedRelu", ["x"], {"x": X}, opset=10),
    binary("Mod", ints(7, -7, 7, -7, 6, 0), ints(3, 3, -3, -3, 3, 5), TensorProto.INT64, "-int"),
    Case("Mod-int-fmod", "Mod", ["a", "b"], {"a": ints(7, -7, 7, -7, 6), "b": ints(3, 3, -3, -3, 3)},
         attrs={"fmod": 1}, out_type=TensorProto.INT64),
    Case("Mod-float-fmod", "Mod", ["a", "b"], {"a": rnd(2, 3, 4, lo=-9, hi=9), "b": rnd(3, 1, seed=4) + 2.5},
         attrs={"fmod": 1}),
    Case("IsNaN", "IsNaN", ["x"], {"x": SPECIAL}, out_type=TensorProto.BOOL),
    *(Case(f"IsInf-{neg}{pos}", "IsInf", ["x"], {"x": SPECIAL}, attrs={"detect_negative": neg, "detect_positive": pos},
           opset=10, out_type=TensorProto.BOOL) for neg, pos in ((1, 1), (0, 1), (1, 0), (0, 0))),
    # normalizations
    Case("InstanceNormalization", "InstanceNormalization", ["x", "s", "b"], {"x": X},
         {"s": rnd(3, seed=1), "b": rnd(3, seed=2)}, {"epsilon": 1e-3}, opset=6),
    Case("InstanceNormalization-3d", "InstanceNormalization", ["x", "s", "b"], {"x": rnd(2, 4, 7)},
         {"s": rnd(4, seed=1), "b": rnd(4, seed=2)}),
    Case("GroupNormalization-18-per-group", "GroupNormalization", ["x", "s", "b"], {"x": rnd(2, 6, 4, 5)},
         {"s": rnd(3, seed=1), "b": rnd(3, seed=2)}, {"num_groups": 3, "epsilon": 1e-3}, opset=18),
    Case("GroupNormalization-21-per-channel", "GroupNormalization", ["x", "s", "b"], {"x": rnd(2, 6, 4, 5)},
         {"s": rnd(6, seed=1), "b": rnd(6, seed=2)}, {"num_groups": 2}, opset=21),
    Case("GroupNormalization-21-one-group-3d", "GroupNormalization", ["x", "s", "b"], {"x": rnd(2, 4, 9)},
         {"s": rnd(4, seed=1), "b": rnd(4, seed=2)}, {"num_groups": 1}, opset=21),
    Case("GroupNormalization-21-stash-double", "GroupNormalization", ["x", "s", "b"], {"x": rnd(2, 6, 4, 5) * 100},
         {"s": rnd(6, seed=1), "b": rnd(6, seed=2)}, {"num_groups": 6, "stash_type": TensorProto.DOUBLE}, opset=21),
    Case("GroupNormalization-21-stash-half", "GroupNormalization", ["x", "s", "b"], {"x": rnd(2, 6, 4, 5)},
         {"s": rnd(6, seed=1), "b": rnd(6, seed=2)}, {"num_groups": 3, "stash_type": TensorProto.FLOAT16}, opset=21),
    # layout and indexing
    Case("DepthToSpace-DCR", "DepthToSpace", ["x"], {"x": rnd(2, 12, 3, 4)}, attrs={"blocksize": 2}),
    Case("DepthToSpace-CRD", "DepthToSpace", ["x"], {"x": rnd(2, 18, 3, 4)}, attrs={"blocksize": 3, "mode": "CRD"}),
    Case("DepthToSpace-1", "DepthToSpace", ["x"], {"x": rnd(1, 8, 2, 3)}, attrs={"blocksize": 2}, opset=1),
    Case("SpaceToDepth", "SpaceToDepth", ["x"], {"x": rnd(2, 3, 6, 4)}, attrs={"blocksize": 2}),
    Case("GatherElements-0", "GatherElements", ["x", "i"], {"x": rnd(3, 4)}, {"i": ints(0, 2, -1, 1, 2, 0).reshape(2, 3)}),
    Case("GatherElements-neg-axis", "GatherElements", ["x", "i"], {"x": rnd(2, 3, 5)},
         {"i": np.random.default_rng(1).integers(-5, 5, (2, 3, 7))}, {"axis": -1}),
    Case("ScatterElements-0", "ScatterElements", ["d", "i", "u"], {"d": rnd(3, 4), "u": rnd(2, 4, seed=1)},
         {"i": ints(2, 0, -1, 1, 0, 1, 0, -3).reshape(2, 4)}),
    Case("ScatterElements-1-int", "ScatterElements", ["d", "i", "u"], {"d": ints(1, 2, 3, 4, 5, 6).reshape(2, 3),
         "u": ints(-1, -2, -3, -4).reshape(2, 2)}, {"i": ints(2, 0, -1, 1).reshape(2, 2)}, {"axis": 1},
         out_type=TensorProto.INT64),
    *(Case(f"ScatterElements-{r}", "ScatterElements", ["d", "i", "u"], {"d": rnd(3, 4), "u": rnd(3, 5, seed=1)},
           {"i": ints(0, 1, 1, 3, 0, -1, 2, 2, 2, 0, 1, 1, 3, 3, 0).reshape(3, 5)}, {"axis": -1, "reduction": r},
           opset=16 if r in ("add", "mul") else 18) for r in ("add", "mul", "max", "min")),
    Case("ScatterND-slices", "ScatterND", ["d", "i", "u"], {"d": rnd(4, 3, 5), "u": rnd(2, 3, 5, seed=1)},
         {"i": ints(2, -4).reshape(2, 1)}),
    Case("ScatterND-elements", "ScatterND", ["d", "i", "u"], {"d": rnd(4, 3, 5), "u": rnd(2, 2, seed=1)},
         {"i": ints(0, 1, 4, -1, -1, 0, 3, 2, 1, 2, 0, 0).reshape(2, 2, 3)}),
    Case("ScatterND-int", "ScatterND", ["d", "i", "u"], {"d": ints(*range(8)).reshape(2, 4), "u": ints(-5, -6)},
         {"i": ints(1, 2, 0, 0).reshape(2, 2)}, out_type=TensorProto.INT64),
    *(Case(f"ScatterND-{r}", "ScatterND", ["d", "i", "u"], {"d": rnd(4, 3), "u": rnd(3, 3, seed=1)},
           {"i": ints(1, -3, 3).reshape(3, 1)}, {"reduction": r}, opset=16 if r in ("add", "mul") else 18)
      for r in ("add", "mul", "max", "min")),
    Case("Trilu-upper", "Trilu", ["x"], {"x": rnd(2, 4, 5)}, opset=14),
    Case("Trilu-lower-k", "Trilu", ["x", "k"], {"x": rnd(2, 4, 5)}, {"k": np.array(-1, I64)}, {"upper": 0}, opset=14),
    Case("Trilu-upper-k-int", "Trilu", ["x", "k"], {"x": ints(*range(12)).reshape(3, 4)}, {"k": np.array(2, I64)},
         opset=14, out_type=TensorProto.INT64),
    Case("Einsum-batch-matmul", "Einsum", ["a", "b"], {"a": rnd(2, 3, 4), "b": rnd(2, 4, 5, seed=1)},
         attrs={"equation": "bij,bjk->bik"}, opset=12),
    Case("Einsum-ellipsis-weight", "Einsum", ["a", "w"], {"a": rnd(2, 3, 4)}, {"w": rnd(5, 4, seed=1)},
         attrs={"equation": "...j, kj -> ...k"}, opset=12),
    Case("Einsum-implicit", "Einsum", ["a", "b"], {"a": rnd(3, 4), "b": rnd(4, 2, seed=1)}, attrs={"equation": "ij,jk"},
         opset=12),
    Case("Einsum-trace-transpose", "Einsum", ["a"], {"a": rnd(3, 3, 2)}, attrs={"equation": "iij->j"}, opset=12),
]


def make_model(case: Case) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in case.feeds.items()]
    outputs = [helper.make_tensor_value_info(f"y{i}", case.out_type, None) for i in range(case.outs)]
    node = helper.make_node(case.op, case.ins, [o.name for o in outputs], name=f"the_{case.op}", **case.attrs)
    inits = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in case.consts.items()]
    graph = helper.make_graph([node], "g", inputs, outputs, inits)
    ir = 8 if case.opset < 21 else 10
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=ir)


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: Case):
    model = make_model(case)
    expected = run_ort(model, case.feeds)
    graph = TorchGraph(model)
    got = graph(*(torch.from_numpy(v) for v in case.feeds.values()))
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = g.detach().numpy()
        assert g.shape == e.shape, (g.shape, e.shape)
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, e)



SMOOTH_RESIZES = [c for c in CASES if c.op in ("Resize", "Upsample") and c.attrs.get("mode") in ("linear", "cubic")]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", SMOOTH_RESIZES, ids=[c.id for c in SMOOTH_RESIZES])
def test_smooth_resize_training_path_matches(case: Case, channels_last: bool):
    """While training, linear and cubic resize run as matrix products (torch's bilinear backward
    is slow on CPU): same values as onnxruntime, same gradient as the inference path. A
    channels-last input (what the convs produce) gives a channels-last output."""
    model = make_model(case)
    expected = run_ort(model, case.feeds)[0]
    graph = TorchGraph(model)
    feeds = [torch.from_numpy(v) for v in case.feeds.values()]
    x = feeds[0].clone()
    if channels_last:
        if x.dim() != 4 or x.shape[1] == 1:
            pytest.skip("channels-last only differs for a 4-D input with channels")
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = graph(x, *feeds[1:])
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-5)
    if channels_last and y.shape[:2] == x.shape[:2] and y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    weights = torch.from_numpy(rnd(*expected.shape, seed=3))
    (y * weights).sum().backward()
    with torch.no_grad():  # the reference gradient: the inference path is linear in x
        basis = torch.eye(x.numel()).reshape(x.numel(), *x.shape)
        jac = torch.stack([graph(b, *feeds[1:]).reshape(-1) for b in basis])
    np.testing.assert_allclose(x.grad.reshape(-1).numpy(), (jac @ weights.reshape(-1)).numpy(), rtol=0, atol=1e-4)


def test_constant_node():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2] x) => (float[2] y) {
        c = Constant <value_floats = [1.5, -2.0]> ()
        y = Add (x, c)
    }"""
    model = onnx.parser.parse_model(text)
    x = np.array([1.0, 2.0], F32)
    np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(x)).numpy(), run_ort(model, {"x": x})[0])


def _one_node(op: str, opset: int = 13, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="n7", **attrs)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, [1, 2, 3, 4])], [vi("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_names_op_and_node():
    with pytest.raises(UnsupportedOpError) as err:
        TorchGraph(_one_node("LRN", size=3))
    assert err.value.op_type == "LRN" and err.value.node_name == "n7"
    assert "'LRN'" in str(err.value) and "'n7'" in str(err.value)


@pytest.mark.parametrize("opset, attrs, named", [
    (18, {"antialias": 1}, "antialias"),
    (13, {"coordinate_transformation_mode": "tf_crop_and_resize"}, "tf_crop_and_resize"),
    (10, {}, "cubic"),  # Resize-10 has no cubic mode
])
def test_unsupported_cubic_resize_is_a_clear_error(opset, attrs, named):
    ins = ["x", "s"] if opset < 11 else ["x", "", "s"]
    node = helper.make_node("Resize", ins, ["y"], name="up", mode="cubic", **attrs)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, [1, 1, 2, 2])], [vi("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], F32), "s")])
    with pytest.raises(UnsupportedOpError, match=named) as err:
        TorchGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    assert err.value.node_name == "up"


def test_group_norm_with_bfloat16_statistics_is_a_clear_error():
    case = next(c for c in CASES if c.id == "GroupNormalization-21-per-channel")
    model = make_model(Case(**{**case.__dict__, "attrs": {**case.attrs, "stash_type": TensorProto.BFLOAT16}}))
    with pytest.raises(UnsupportedOpError, match="stash_type=16"):
        TorchGraph(model)


GRAD_OPS = {"InstanceNormalization", "GroupNormalization", "DepthToSpace", "SpaceToDepth", "GatherElements",
            "ScatterElements", "ScatterND", "Trilu", "Einsum", "Mish", "Selu", "Celu", "ThresholdedRelu",
            "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh"}
GRAD_CASES = [c for c in CASES if c.op in GRAD_OPS and c.out_type == TensorProto.FLOAT]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradients_reach_float_inputs_and_weights(case: Case):
    """TorchGraph trains these ops: every float input and every parameter (InstanceNormalization
    and GroupNormalization scale/bias, Einsum's constant operand) gets a finite gradient."""
    graph = TorchGraph(make_model(case)).train()
    feeds = [torch.from_numpy(v).requires_grad_(v.dtype == F32) for v in case.feeds.values()]
    y = graph(*feeds)
    (y * torch.from_numpy(rnd(*y.shape, seed=7))).sum().backward()
    grads = [f.grad for f in feeds if f.requires_grad] + [p.grad for p in graph.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if case.op in ("InstanceNormalization", "GroupNormalization", "Einsum") and case.consts:
        assert len(list(graph.parameters())) == len(case.consts)


def test_unknown_attribute_is_unsupported():
    with pytest.raises(UnsupportedOpError, match="bogus"):
        TorchGraph(_one_node("LeakyRelu", bogus=1))
