"""Bias correction: the one-pass form equals the layer-by-layer loop, and it reduces the shift."""
import torch

from slimseg.compress.api import GLUE_OPS
from slimseg.compress.quant import simulator
from slimseg.compress.quant.placement import plan_quantization
from slimseg.compress.quant.ptq import calibrate
from slimseg.compress.quant.simulator import QuantSimulator, biases_by_node, correct_biases
from slimseg.demo import TinySegNet
from slimseg.model.importers import load_model
from slimseg.model.passes import fold_batchnorm


def _simulator(seed=0):
    torch.manual_seed(seed)
    net = TinySegNet(width=8)
    for m in net.modules():  # BN statistics that make the folded convs differ from identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = fold_batchnorm.run(load_model(net, input_shape=(1, 3, 24, 24)).onnx).model
    sim = QuantSimulator(model, plan_quantization(model, op_types={"Conv"} | GLUE_OPS))
    batches = [torch.rand(4, 3, 24, 24) * 2 - 1 for _ in range(3)]
    calibrate(sim, batches, algo="minmax")
    return sim, batches


def _biases(sim):
    return {b: sim.graph.parameter(b).detach().clone() for b in biases_by_node(sim.model).values()}


def test_one_pass_equals_layer_by_layer(monkeypatch):
    one, batches = _simulator()
    shifts_one = correct_biases(one, batches)
    loop, _ = _simulator()
    monkeypatch.setattr(simulator, "ONE_PASS_INPUT_ELEMENTS", 0)
    shifts_loop = correct_biases(loop, batches)
    assert shifts_one.keys() == shifts_loop.keys() and len(shifts_one) >= 3
    for name, bias in _biases(one).items():
        torch.testing.assert_close(bias, _biases(loop)[name], atol=1e-5, rtol=1e-4)
    assert max(shifts_one.values()) > 0


@torch.no_grad()
def test_correction_removes_the_mean_shift_of_the_output():
    sim, batches = _simulator(seed=1)
    images = torch.cat(batches)
    reference = sim.quantize(False)(images)
    before = (sim.quantize(True)(images) - reference).mean(dim=(0, 2, 3)).abs().mean()
    correct_biases(sim, batches)
    after = (sim.quantize(True)(images) - reference).mean(dim=(0, 2, 3)).abs().mean()
    assert after < before


def test_the_hooks_are_restored():
    sim, batches = _simulator()
    hooks = dict(sim.graph.tensor_hooks)
    correct_biases(sim, batches)
    assert dict(sim.graph.tensor_hooks) == hooks
