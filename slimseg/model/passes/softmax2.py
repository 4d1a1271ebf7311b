"""Rewrite a 2-class Softmax over the channel axis as a Sigmoid of the logit difference.

Why: segmentation models end in ``Resize -> Softmax(axis=1)`` over 2 classes at full output
resolution. onnxruntime's Softmax on a non-last axis transposes, then normalises rows of
length 2: on PP-HumanSeg it costs as much as a quarter of all its convolutions.

Math: for two logits ``x0, x1``::

    softmax(x)_1 = e^x1 / (e^x0 + e^x1) = 1 / (1 + e^(x0 - x1)) = sigmoid(x1 - x0)
    softmax(x)_0 = sigmoid(x0 - x1)

so ``Softmax(x) = Sigmoid(D x)`` with the 1x1 convolution ``D = [[1, -1], [-1, 1]]``. Ties
stay ties (both 0.5), so the argmax is unchanged.

Softmax and Resize do not commute in general: ``softmax(resize(x)) != resize(softmax(x))``
because softmax is not linear (an interpolated probability is not the probability of the
interpolated logits). But the *difference* of logits commutes with any resampling that is
linear and channel-independent: every output pixel is ``sum_i w_i x[c, i]`` with weights that
do not depend on the channel, hence ``resize(x)_1 - resize(x)_0 = resize(x_1 - x_0)``. So ``D``
moves above a chain of such Resizes (nearest, linear, cubic, with any coordinate mode except
``tf_crop_and_resize``, whose ``extrapolation_value`` is a constant fill and not linear)
and only the Sigmoid runs at full resolution::

    x -> Resize -> Softmax(axis=1)   ==>   x -> Conv(D, 1x1) -> Resize -> Sigmoid

Exact up to float rounding. Left alone: Softmax over another axis or another channel count,
opset < 13 (Softmax then normalises the flattened C*H*W), inputs that are not 4-D.
"""
from __future__ import annotations

import numpy as np
import onnx

from slimseg.model.passes import infer_shapes
from slimseg.model.passes._graph import FLOAT_TYPES, PassResult, copy_model
from slimseg.model.passes._rewrite import GraphIndex, attr, finish, is_op

DIFFERENCE = np.array([[1, -1], [-1, 1]]).reshape(2, 2, 1, 1)


def run(model: onnx.ModelProto) -> PassResult:
    """Rewrite every 2-class channel Softmax; returns a new model."""
    model = infer_shapes.run(copy_model(model)).model  # exported QDQ graphs may lack shapes
    index = GraphIndex(model)
    if index.opset < 13:
        return PassResult(model, False)
    targets = [n for n in model.graph.node if is_op(n, "Softmax") and _two_classes(n, index)]
    for softmax in targets:
        _rewrite(softmax, index)
    if not targets:
        return PassResult(model, False)
    return PassResult(finish(index), True)


def _two_classes(node: onnx.NodeProto, index: GraphIndex) -> bool:
    dims = index.shapes.get(node.input[0])
    if not dims or len(dims) != 4 or index.types.get(node.input[0]) not in FLOAT_TYPES:
        return False
    return attr(node, "axis", -1) % 4 == 1 and dims[1] == 2


def _linear_resize(node, index: GraphIndex) -> bool:
    """A Resize that maps each channel on its own, linearly, and keeps the 2 channels."""
    if not is_op(node, "Resize"):
        return False
    if attr(node, "coordinate_transformation_mode", b"half_pixel") == b"tf_crop_and_resize":
        return False
    dims_in, dims_out = index.shapes.get(node.input[0]), index.shapes.get(node.output[0])
    return bool(dims_in and dims_out and len(dims_in) == 4 and dims_in[1] == dims_out[1] == 2)


def _rewrite(softmax: onnx.NodeProto, index: GraphIndex) -> None:
    top = softmax  # the node whose input receives the logit difference
    while True:
        producer = index.producer.get(top.input[0])
        if not (_linear_resize(producer, index) and index.sole_reader(producer.output[0]) is top):
            break
        top = producer
    logits = top.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(index.types[softmax.input[0]])
    label = softmax.name or softmax.output[0]
    weight = index.add_array(f"{label}_difference", DIFFERENCE.astype(dtype))
    diff = index.fresh(f"{logits}_difference")
    index.add_node("Conv", [logits, weight], [diff], f"{label}_difference", kernel_shape=[1, 1])
    index.rewire(top, 0, diff)
    index.add_node("Sigmoid", [softmax.input[0]], list(softmax.output), softmax.name or "softmax2")
    index.drop(softmax)
