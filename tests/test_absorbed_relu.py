"""A Relu before a zero-point-0 fake quant is skipped in the simulator, with the same output."""
import copy

import torch

from slimseg.compress.api import GLUE_OPS
from slimseg.compress.quant.placement import plan_quantization
from slimseg.compress.quant.ptq import calibrate
from slimseg.compress.quant.simulator import QuantSimulator, _AbsorbedRelu
from slimseg.demo import TinySegNet
from slimseg.model.importers import load_model
from slimseg.model.passes import fold_batchnorm


def _simulator():
    torch.manual_seed(0)
    model = fold_batchnorm.run(load_model(TinySegNet(width=8), input_shape=(1, 3, 24, 24)).onnx).model
    sim = QuantSimulator(model, plan_quantization(model, op_types={"Conv"} | GLUE_OPS))
    batches = [torch.rand(4, 3, 24, 24) * 2 - 1 for _ in range(2)]
    calibrate(sim, batches, algo="minmax")
    return sim, torch.cat(batches)


def _relus(sim):
    return [s.fn for s in sim.graph._steps if isinstance(s.fn, _AbsorbedRelu)]


def _count_skips(relus, monkeypatch):
    calls = {"relu": 0}
    for op in relus:
        original = op.relu

        def counted(x, original=original):
            calls["relu"] += 1
            return original(x)
        monkeypatch.setattr(op, "relu", counted)
    return calls


def test_relus_are_skipped_with_bit_identical_outputs(monkeypatch):
    sim, images = _simulator()
    relus = _relus(sim)
    assert relus, "TinySegNet has Conv -> Relu -> quantized tensors"
    calls = _count_skips(relus, monkeypatch)
    sim.quantize(True)
    with torch.no_grad():
        absorbed = sim(images)
        assert calls["relu"] == 0
        for op in relus:  # force every Relu to run: the reference
            monkeypatch.setattr(op, "quantizer", None)
        reference = sim(images)
    assert calls["relu"] == len(relus)
    assert torch.equal(absorbed, reference)


def test_relu_runs_when_the_quantizer_is_off_or_replaced(monkeypatch):
    sim, images = _simulator()
    calls = _count_skips(_relus(sim), monkeypatch)
    with torch.no_grad():
        sim.quantize(False)(images)   # float model: every Relu must run
        assert calls["relu"] == len(_relus(sim))
        tensor = _relus(sim)[0].tensor
        sim.quantize(True)
        sim.graph.attach(tensor, torch.nn.Identity())   # e.g. a recorder in bias correction
        calls["relu"] = 0
        out = sim(images)
        assert calls["relu"] == 1
    assert torch.isfinite(out).all()


def test_a_copied_simulator_checks_its_own_quantizers():
    sim, images = _simulator()
    clone = copy.deepcopy(sim)
    ops = _relus(clone)
    assert ops and all(op.graph is clone.graph for op in ops)
    assert all(op.quantizer is clone.graph.attached(op.tensor) for op in ops)
