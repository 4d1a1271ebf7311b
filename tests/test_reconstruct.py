"""Layer-wise least-squares reconstruction after pruning (slimseg.compress.prune.reconstruct).

A tiny conv net (3x3, 1x1, depthwise, 1x1) is pruned two ways: magnitude zeros in the 1x1
weights, and whole channels removed. Reconstruction must bring the student's final output
much closer to the original's on images it did not see, keep every zero a zero, and leave
the graph's shapes alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import Builder
from slimseg.compress.prune.channel import prune_channels
from slimseg.compress.prune.masks import zero_smallest
from slimseg.compress.prune.reconstruct import reconstruct_layers
from slimseg.model.torch_graph import TorchGraph

HW = 12


def tiny_net():
    b = Builder(c_in=3, seed=1, hw=HW)
    h = b.op("Relu", [b.conv("x", 3, 16, k=3)])[0]
    h = b.op("Relu", [b.conv(h, 16, 24)])[0]
    h = b.conv(h, 24, 24, k=3, group=24)
    out = b.conv(h, 24, 4)
    return b.model(out), out


def images(count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, 3, HW, HW)).astype(np.float32))


def relative_error(student: TorchGraph, teacher: TorchGraph, x: torch.Tensor) -> float:
    with torch.no_grad():
        s, t = student(x), teacher(x)
    return float((s - t).norm() / t.norm())


def test_sparse_weights_move_toward_the_teacher_and_zeros_stay():
    model, _ = tiny_net()
    teacher = TorchGraph(model)
    sparse, _ = zero_smallest(model, 0.75, params_type="conv1x1_only")
    student = TorchGraph(sparse)
    names = [n for n in student.onnx_parameter_names if student.parameter(n).dim() == 4
             and tuple(student.parameter(n).shape[2:]) == (1, 1)]
    zeros = {n: student.parameter(n).detach() == 0 for n in names}
    assert all(z.float().mean() > 0.7 for z in zeros.values())
    held_out = images(16, seed=99)
    before = relative_error(student, teacher, held_out)

    report = reconstruct_layers(student, model, [images(16, seed=s) for s in range(4)], grouped=True)

    after = relative_error(student, teacher, held_out)
    assert after < 0.6 * before, (before, after)
    for n in names:
        assert torch.all(student.parameter(n).detach()[zeros[n]] == 0), n
    assert len(report.layers) == 4 and not report.skipped
    assert all(layer["error_after"] <= layer["error_before"] for layer in report.layers)
    assert report.images == 64


def test_rows_sharing_a_support_get_the_same_fit_as_whole_rows():
    """One weight zeroed in one row: that row keeps its zero, and every other row (solved
    together, as one support) gets exactly what the unconstrained refit gives it."""
    model, _ = tiny_net()
    batches = [images(16, seed=s) for s in range(2)]
    fits = {}
    for keep_zeros in (True, False):
        student = TorchGraph(model)
        name = next(n for n in student.onnx_parameter_names if tuple(student.parameter(n).shape) == (24, 16, 1, 1))
        with torch.no_grad():
            student.parameter(name)[0, 0] = 0.0
        reconstruct_layers(student, model, batches, keep_zeros=keep_zeros)
        fits[keep_zeros] = student.parameter(name).detach().clone()
    assert fits[True][0, 0] == 0 and fits[False][0, 0] != 0
    torch.testing.assert_close(fits[True][1:], fits[False][1:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fits[True][0], fits[False][0])


def test_keep_zeros_false_may_fill_them():
    model, _ = tiny_net()
    sparse, _ = zero_smallest(model, 0.75, params_type="conv1x1_only")
    student = TorchGraph(sparse)
    reconstruct_layers(student, model, [images(16, seed=s) for s in range(4)], keep_zeros=False)
    weights = [student.parameter(n).detach() for n in student.onnx_parameter_names
               if student.parameter(n).dim() == 4 and tuple(student.parameter(n).shape[2:]) == (1, 1)]
    assert all(float((w == 0).float().mean()) < 0.1 for w in weights)


def test_channel_pruned_student_matches_the_kept_teacher_channels():
    model, out = tiny_net()
    pruned, report = prune_channels(model, 0.5, round_to=1)
    assert report.removed, "the net must have prunable channels"
    student, teacher = TorchGraph(pruned), TorchGraph(model)
    shapes = {n: tuple(student.parameter(n).shape) for n in student.onnx_parameter_names}
    held_out = images(16, seed=7)
    before = relative_error(student, teacher, held_out)

    result = reconstruct_layers(student, teacher, [images(16, seed=s) for s in range(4)], removed=report.removed)

    assert relative_error(student, teacher, held_out) < 0.7 * before
    assert {n: tuple(student.parameter(n).shape) for n in student.onnx_parameter_names} == shapes
    assert out not in report.removed  # the output keeps its channels: the comparison above is fair
    assert len(result.layers) == 3  # the depthwise conv is left alone by default
    assert list(result.skipped.values()) == ["grouped or depthwise conv (grouped=False)"]


def test_tensors_the_teacher_lacks_are_skipped_with_a_reason():
    model, _ = tiny_net()
    other = Builder(c_in=3, seed=5, hw=HW)
    other.k = 100  # other tensor names
    unrelated = other.model(other.conv("x", 3, 4))
    student = TorchGraph(model)
    result = reconstruct_layers(student, unrelated, [images(4, seed=0)], grouped=True)
    assert not result.layers
    assert set(result.skipped.values()) == {"the teacher has no tensor of that name"}


def test_convs_too_wide_to_refit_are_skipped_and_keep_their_weights(monkeypatch):
    """A conv with more inputs per output channel than MAX_REFIT_INPUTS (here the first 3x3
    conv: 27) is left as it is, with the reason, and is not offered to OBS."""
    from slimseg.compress.prune import reconstruct

    monkeypatch.setattr(reconstruct, "MAX_REFIT_INPUTS", 20)
    model, _ = tiny_net()
    student = TorchGraph(model)
    wide = next(n for n in student.onnx_graph.node if n.op_type == "Conv" and n.input[0] == "x")
    before = student.parameter(wide.input[1]).detach().clone()
    result = reconstruct_layers(student, model, [images(4, seed=0)])
    assert "too wide to refit (27 inputs" in result.skipped[wide.output[0]]
    assert torch.equal(student.parameter(wide.input[1]).detach(), before)
    assert reconstruct.refittable(student, [wide.input[1]]) == {}
    assert result.layers  # the 16-input 1x1 conv is still refitted


def test_no_batches_is_an_error():
    model, _ = tiny_net()
    with pytest.raises(ValueError, match="calibration batch"):
        reconstruct_layers(TorchGraph(model), model, [])


def test_prune_lets_obs_choose_the_zeros_with_exact_counts():
    model, _ = tiny_net()
    teacher = TorchGraph(model)
    held_out, batches = images(16, seed=99), [images(16, seed=s) for s in range(4)]
    magnitude = TorchGraph(zero_smallest(model, 0.75, params_type="conv1x1_only")[0])
    reconstruct_layers(magnitude, model, batches)
    names = [n for n in magnitude.onnx_parameter_names if magnitude.parameter(n).dim() == 4
             and tuple(magnitude.parameter(n).shape[2:]) == (1, 1)]
    zeros = {n: int((magnitude.parameter(n).detach() == 0).sum()) for n in names}

    student = TorchGraph(model)
    report = reconstruct_layers(student, model, batches, prune={n: (k, 1) for n, k in zeros.items()})

    assert set(report.masks) == set(names)
    for n in names:
        w, mask = student.parameter(n).detach(), report.masks[n]
        assert mask.shape == w.shape and int((mask == 0).sum()) == zeros[n]
        assert torch.all(w[mask == 0] == 0)
    assert {layer["zeros"] for layer in report.layers if "zeros" in layer} == set(zeros.values())
    assert "mask" not in str(report.to_dict())
    assert relative_error(student, teacher, held_out) < relative_error(magnitude, teacher, held_out)


def test_output_gains_measure_how_much_of_an_error_reaches_the_taps():
    """conv_b writes the tap (gain 1); conv_a's output is scaled by 3 and passed through
    conv_b's identity weights, so an error there arrives 9 times as large; the tensor that
    only a discarded branch reads moves nothing."""
    from onnx import TensorProto, helper, numpy_helper

    from slimseg.compress.prune.reconstruct import output_gains

    eye = np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "wa"),
             numpy_helper.from_array(eye, "wb"), numpy_helper.from_array(eye.copy(), "wc"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Mul", ["a", "three"], ["a3"]),
             helper.make_node("Conv", ["a3", "wb"], ["y"]), helper.make_node("Conv", ["a", "wc"], ["side"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("side", TensorProto.FLOAT, None)], inits)
    model = TorchGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    batches = [torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    gains = output_gains(model, batches, ["wa", "wb", "wc"], ["y"])
    assert gains["wb"] == pytest.approx(1.0, rel=1e-5)
    assert gains["wa"] == pytest.approx(9.0, rel=1e-4)
    assert gains["wc"] == 0.0
    assert not model._hooked  # the noise is gone again
