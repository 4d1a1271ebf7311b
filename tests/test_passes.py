"""Canonicalizing passes, each on a tiny graph written as ONNX text, checked with onnx.checker
and numerically against onnxruntime (fixed seed) before and after."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slimseg.errors import ConfigError, ModelLoadError
from slimseg.model.passes import (
    PassResult, canonicalize, constants_to_initializers, fix_input_shape, fold_constants,
    infer_shapes, untie_shared_initializers, upgrade_opset,
)
from slimseg.model.passes._graph import input_dims


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float inputs; a dynamic dim gets `batch` on axis 0, else 4."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d if d is not None else (batch if i == 0 else 4) for i, d in enumerate(input_dims(value))]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, atol: float = 1e-6) -> None:
    onnx.checker.check_model(after)
    feeds = feeds_for(before)
    for want, got in zip(run_ort(before, feeds), run_ort(after, feeds)):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- upgrade_opset ---------------------------------------------------------------------------

OPSET11 = """
<ir_version: 6, opset_import: ["" : 11]>
g11 (float[N, 4] x) => (float[N, 1, 2] y) {
    s = ReduceSum <axes = [1], keepdims = 1> (x)
    a, b = Split <axis = 1, split = [2, 2]> (x)
    u = Unsqueeze <axes = [1]> (a)
    y = Mul (u, s)
}
"""


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every node after its first output (onnx text has no node names)."""
    for node in model.graph.node:
        node.name = f"node_{node.output[0]}"
    return model


def test_upgrade_opset_raises_old_models_to_13_keeping_names_and_values():
    before = named(parse(OPSET11))
    result = upgrade_opset.run(before)
    assert isinstance(result, PassResult) and result.modified
    after = result.model
    assert [o.version for o in after.opset_import if o.domain == ""] == [13]
    # axes moved from attributes to inputs (the converter adds Constants for them)
    kept = [(n.name, n.op_type, list(n.output)) for n in after.graph.node if n.op_type != "Constant"]
    assert kept == [(n.name, n.op_type, list(n.output)) for n in before.graph.node]
    assert not any(a.name == "axes" for n in after.graph.node for a in n.attribute)
    assert [i.name for i in after.graph.input] == ["x"] and [o.name for o in after.graph.output] == ["y"]
    assert_same_outputs(before, after)


def test_upgrade_opset_leaves_newer_models_alone():
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu (x) }""")
    result = upgrade_opset.run(model)
    assert not result.modified and result.model.opset_import[0].version == 17


# --- constants_to_initializers ---------------------------------------------------------------

CONSTANTS = """
<ir_version: 8, opset_import: ["" : 13]>
gc (float[N, 3] x) => (float[N, 3] y, float[1] c_out) {
    w = Constant <value = float[3] {0.5, -1.0, 2.0}> ()
    b = Constant <value_float = 0.25> ()
    shape = Constant <value_ints = [-1, 3]> ()
    k = Constant <value_int = 1> ()
    c_out = Constant <value = float[1] {7.0}> ()
    xw = Mul (x, w)
    xb = Add (xw, b)
    r = Reshape (xb, shape)
    kf = Cast <to = 1> (k)
    y = Add (r, kf)
}
"""


def test_constants_to_initializers_moves_values_under_their_output_names():
    before = parse(CONSTANTS)
    result = constants_to_initializers.run(before)
    after = result.model
    assert result.modified
    assert ops(after).count("Constant") == 1  # c_out is a graph output: stays a node
    values = inits(after)
    np.testing.assert_array_equal(values["w"], np.array([0.5, -1.0, 2.0], np.float32))
    assert values["b"].dtype == np.float32 and values["b"].shape == () and values["b"] == 0.25
    assert values["shape"].dtype == np.int64 and values["shape"].tolist() == [-1, 3]
    assert values["k"].dtype == np.int64 and values["k"] == 1
    assert ops(before).count("Constant") == 5  # the input proto is untouched
    assert_same_outputs(before, after)


# --- fold_constants --------------------------------------------------------------------------

FOLDABLE = """
<ir_version: 8, opset_import: ["" : 17]>
gf (float[N, 2, 4, 4] x, float[1, 2, 4, 4] s) => (float[N, 3, 4, 4] y, float[3] z, float[3, 2, 1, 1] ident_out) {
    zero = Constant <value_int = 0> ()
    shape4 = Constant <value_ints = [1, 3, 1, 1]> ()
    w = Transpose <perm = [1, 0, 2, 3]> (wt)
    w_alias = Identity (w)
    c1 = Conv (x, w, bias)
    c2 = Conv (x, w_alias, bias)
    sum = Add (c1, c2)
    shape_s = Shape (s)
    hw = Shape <start = 2> (x)
    dyn = Shape (x)
    n = Gather <axis = 0> (dyn, zero)
    deq = DequantizeLinear <axis = 0> (q, scale, zp)
    deq4 = Reshape (deq, shape4)
    scaled = Mul (sum, deq4)
    flat = Reshape (s, shape_s)
    fs = ReduceSum <keepdims = 0> (flat)
    hwf = Cast <to = 1> (hw)
    hws = ReduceSum <keepdims = 0> (hwf)
    nf = Cast <to = 1> (n)
    y1 = Add (scaled, fs)
    y2 = Add (y1, hws)
    y = Add (y2, nf)
    z = Add (bias, scale)
    ident_out = Identity (w)
}
"""


def _foldable() -> onnx.ModelProto:
    """FOLDABLE with its initializers (s is a graph input: `flat`/`fs` depend on it only by shape)."""
    model = onnx.parser.parse_model(FOLDABLE)
    rng = np.random.default_rng(0)
    values = {"wt": rng.standard_normal((2, 3, 1, 1)).astype(np.float32),
              "bias": rng.standard_normal(3).astype(np.float32), "unused": np.ones(3, np.float32),
              "scale": np.array([0.1, 0.2, 0.3], np.float32), "q": np.array([1, 2, 3], np.uint8),
              "zp": np.zeros(3, np.uint8)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
    model = constants_to_initializers.run(model).model
    onnx.checker.check_model(model)
    return model


def test_fold_constants_folds_constant_subgraphs_and_static_shapes():
    before = _foldable()
    result = fold_constants.run(before)
    after = result.model
    assert result.modified
    names = {n.output[0]: n.op_type for n in after.graph.node}
    # folded: weight transpose, its Identity alias (now its own copy), Shape of static s,
    # Shape(x)[2:] (H, W static), the shape math behind them
    for folded in ("w", "w_alias", "shape_s", "hw", "hwf", "hws"):
        assert folded not in names, folded
    values = inits(after)
    np.testing.assert_array_equal(values["w"], values["w_alias"])
    assert values["hws"] == 8.0 and values["shape_s"].tolist() == [1, 2, 4, 4]
    assert "hw" not in values and "hwf" not in values  # intermediates left unused are dropped
    # kept: Q/DQ, Shape with a dynamic batch, graph outputs, anything fed by x
    assert names["deq"] == "DequantizeLinear" and names["dyn"] == "Shape"
    assert names["z"] == "Add" and names["ident_out"] == "Identity"
    assert {"c1", "c2", "y"} <= set(names)
    # initializers nobody reads are gone
    assert "unused" not in values and "wt" not in values
    assert_same_outputs(before, after)


SHUFFLE = """
<ir_version: 8, opset_import: ["" : 13]>
shuffle (float[N, 4, 3, 5] x) => (float[N, 4, 3, 5] y, int64 n)
<int64[1] two = {2}, int64[1] four = {4}, int64[3] groups = {0, 2, 2}, int64[2] flat = {0, 4}, int64 zero = {0}> {
    s = Shape (x)
    s32 = Cast <to = 6> (s)
    hw32 = Slice (s32, two, four)
    hw = Cast <to = 7> (hw32)
    split_shape = Concat <axis = 0> (groups, hw)
    merged_shape = Concat <axis = 0> (flat, hw)
    r = Reshape (x, split_shape)
    t = Transpose <perm = [0, 2, 1, 3, 4]> (r)
    y = Reshape (t, merged_shape)
    n = Gather <axis = 0> (s, zero)
}
"""


def test_fold_constants_folds_the_static_part_of_a_dynamic_shape():
    before = parse(SHUFFLE)
    after = fold_constants.run(before).model
    # H/W come from Shape(x)[2:4] and fold; the batch (Gather index 0) stays dynamic
    assert ops(after) == ["Shape", "Reshape", "Transpose", "Reshape", "Gather"]
    values = inits(after)
    assert values["split_shape"].tolist() == [0, 2, 2, 3, 5] and values["merged_shape"].tolist() == [0, 4, 3, 5]
    assert "hw32" not in values and "two" not in values  # intermediates left unused are dropped
    assert_same_outputs(before, after)
    shapes = {v.name: input_dims(v) for v in infer_shapes.run(after).model.graph.value_info}
    assert shapes["t"] == (None, 2, 2, 3, 5)


def test_fold_constants_keeps_nodes_that_were_already_dead():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2] x) => (float[N, 2] y) { unused = Shape (x)  y = Relu (x) }""")
    result = fold_constants.run(model)
    assert not result.modified and ops(result.model) == ["Shape", "Relu"]


def test_fold_constants_never_folds_random_ops():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[2] x) => (float[2] y) {
            r = RandomNormal <shape = [2], seed = 1.0> ()
            r2 = Mul (r, r)
            y = Add (x, r2)
        }""")
    result = fold_constants.run(model)
    assert not result.modified and ops(result.model) == ["RandomNormal", "Mul", "Add"]


# --- untie_shared_initializers ---------------------------------------------------------------

SHARED = """
<ir_version: 8, opset_import: ["" : 13]>
gs (float[N, 2, 3, 3] x) => (float[N, 2, 3, 3] y)
<float[2, 2, 1, 1] w, float[2] b, float[2] one, float[2] zero, float[2, 2, 1, 1] w__1> {
    c1 = Conv (x, w, b)
    c2 = Conv (c1, w, b)
    n = BatchNormalization (c2, one, zero, zero, one)
    c3 = Conv (n, w__1)
    wb = Add (w, w)
    wbr = ReduceSum <keepdims = 0> (wb)
    y = Add (c3, wbr)
}
"""


def _shared() -> onnx.ModelProto:
    model = onnx.parser.parse_model(SHARED)
    rng = np.random.default_rng(1)
    shapes = {"w": (2, 2, 1, 1), "b": (2,), "one": (2,), "zero": (2,), "w__1": (2, 2, 1, 1)}
    del model.graph.initializer[:]
    for name, shape in shapes.items():
        value = {"one": np.ones(shape), "zero": np.zeros(shape)}.get(name, rng.standard_normal(shape))
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


def test_untie_gives_each_weight_slot_its_own_copy():
    before = _shared()
    result = untie_shared_initializers.run(before)
    after = result.model
    assert result.modified
    node = {n.output[0]: list(n.input) for n in after.graph.node}
    assert node["c1"] == ["x", "w", "b"]
    assert node["c2"] == ["c1", "w__2", "b__1"]  # w__1 already existed: the next free name
    assert node["n"] == ["c2", "one", "zero", "zero__1", "one__1"]
    assert node["wb"] == ["w", "w"]  # a non-weight use keeps the original
    values = inits(after)
    np.testing.assert_array_equal(values["w__2"], values["w"])
    weight_reads = [(n.op_type, i) for n in after.graph.node for i in n.input[1:] if n.op_type != "Add"]
    assert len(weight_reads) == len({i for _, i in weight_reads})
    assert_same_outputs(before, after)


def test_untie_leaves_unshared_weights_alone():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 2] x) => (float[1, 2] y) <float[2, 2] w = {1.0, 0.0, 0.0, 1.0}> { y = MatMul (x, w) }""")
    assert not untie_shared_initializers.run(model).modified


# --- fix_input_shape -------------------------------------------------------------------------

DYNAMIC = """
<ir_version: 8, opset_import: ["" : 13]>
gd (float[batch, 3, h, w] x) => (float[batch, 3, h, w] y) {
    y = Relu (x)
}
"""


def test_fix_input_shape_fixes_chw_and_keeps_a_dynamic_batch_named_n():
    before = parse(DYNAMIC)
    before.graph.value_info.append(onnx.helper.make_tensor_value_info("stale", onnx.TensorProto.FLOAT, [9]))
    result = fix_input_shape.run(before, (1, 3, 8, 10))
    after = result.model
    assert result.modified
    dims = after.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and input_dims(after.graph.input[0]) == (None, 3, 8, 10)
    assert len(after.graph.value_info) == 0
    assert input_dims(after.graph.output[0]) == (None,) * 4  # stale dims cleared, rank kept
    onnx.checker.check_model(after)
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 10)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(after, {"x": x})[0], np.maximum(x, 0))


def test_fix_input_shape_batch_is_fixed_when_static_or_asked():
    static = parse(DYNAMIC.replace("float[batch, 3, h, w] x", "float[4, 3, h, w] x"))
    assert input_dims(fix_input_shape.run(static, (2, 3, 8, 8)).model.graph.input[0]) == (2, 3, 8, 8)
    asked = fix_input_shape.run(parse(DYNAMIC), (2, 3, 8, 8), static_batch=True).model
    assert input_dims(asked.graph.input[0]) == (2, 3, 8, 8)
    kept = fix_input_shape.run(static, (None, 3, 8, 8)).model
    assert input_dims(kept.graph.input[0]) == (4, 3, 8, 8)


def test_fix_input_shape_rejects_bad_shapes():
    model = parse(DYNAMIC.replace("float[batch, 3, h, w] x", "float[batch, 3, 8, 8] x"))
    with pytest.raises(ConfigError, match="3 channels.*asks for 1"):
        fix_input_shape.run(model, (1, 1, 8, 8))
    with pytest.raises(ConfigError, match="rank 4"):
        fix_input_shape.run(model, (3, 8, 8))
    with pytest.raises(ConfigError, match="positive integer"):
        fix_input_shape.run(model, (1, 3, 0, 8))
    assert not fix_input_shape.run(model, None).modified
    renamed = fix_input_shape.run(model, (None, 3, 8, 8))  # only "batch" -> "N"
    assert renamed.modified and not fix_input_shape.run(renamed.model, (None, 3, 8, 8)).modified


# --- infer_shapes ----------------------------------------------------------------------------

def test_infer_shapes_annotates_values_through_shape_arithmetic():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2, 4, 4] x) => (float[N, 32] y) {
            s = Shape (x)
            n = Slice (s, zero, one)
            flat = Concat <axis = 0> (n, k)
            y = Reshape (x, flat)
        }""".replace("g (", "g (").replace("{\n", "<int64[1] zero = {0}, int64[1] one = {1}, int64[1] k = {32}> {\n", 1))
    result = infer_shapes.run(model)
    assert result.modified
    shapes = {v.name: input_dims(v) for v in result.model.graph.value_info}
    assert shapes["s"] == (4,) and shapes["flat"] == (2,)
    assert not infer_shapes.run(result.model).modified


# --- canonicalize ----------------------------------------------------------------------------

EXPORTED = """
<ir_version: 6, opset_import: ["" : 11]>
exported (float[batch, 3, h, w] x) => (float[batch, 2, h, w] prob) {
    w1 = Constant <value = float[2, 3, 1, 1] {0.1, 0.2, 0.3, -0.4, 0.5, -0.6}> ()
    b1 = Constant <value = float[2] {0.01, -0.02}> ()
    w2 = Identity (w1)
    c1 = Conv (x, w1, b1)
    c2 = Conv (x, w2)
    u = Unsqueeze <axes = [0]> (c2)
    sq = Squeeze <axes = [0]> (u)
    s = Add (c1, sq)
    prob = Softmax <axis = -1> (s)
}
"""


def _exported() -> onnx.ModelProto:
    return named(parse(EXPORTED))


def test_canonicalize_runs_the_whole_pipeline():
    before = _exported()
    after = canonicalize(before, input_shape=(1, 3, 6, 6))
    assert before.opset_import[0].version == 11 and "Constant" in ops(before)  # input untouched
    assert after.opset_import[0].version == 13
    assert "Constant" not in ops(after) and "Identity" not in ops(after)
    assert [n.name for n in after.graph.node] == [f"node_{o}" for o in ("c1", "c2", "u", "sq", "s", "prob")]
    conv_weights = [n.input[1] for n in after.graph.node if n.op_type == "Conv"]
    assert len(set(conv_weights)) == 2
    assert input_dims(after.graph.input[0]) == (None, 3, 6, 6)
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert input_dims(after.graph.output[0]) == (None, 2, 6, 6)  # re-inferred
    assert after.graph.output[0].name == "prob" and after.graph.node[-1].op_type == "Softmax"
    onnx.checker.check_model(after)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(after, {"x": x})[0], run_ort(before, {"x": x})[0], atol=1e-6, rtol=0)


def test_canonicalize_folds_shape_arithmetic_once_the_input_is_fixed():
    before = parse(SHUFFLE.replace("float[N, 4, 3, 5] x) => (float[N, 4, 3, 5] y", "float[N, 4, h, w] x) => (float[N, 4, h, w] y"))
    assert "Slice" in ops(fold_constants.run(before).model)  # h, w unknown: nothing to fold yet
    after = canonicalize(before, input_shape=(1, 4, 3, 5))
    assert ops(after) == ["Shape", "Reshape", "Transpose", "Reshape", "Gather"]
    assert input_dims(after.graph.output[0]) == (None, 4, 3, 5)
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(after, {"x": x})[0], run_ort(before, {"x": x})[0])


def test_canonicalize_rejects_an_invalid_graph():
    model = parse(DYNAMIC)
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelLoadError, match="not a valid ONNX graph"):
        canonicalize(model)
