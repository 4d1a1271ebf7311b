"""Fake quantization: bit-exact with onnxruntime Q/DQ, STE/LSQ gradients, AdaRound, checkpoints."""
from __future__ import annotations

import io
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimseg.compress.quant.fake_quant import (ActivationFakeQuant, WeightFakeQuant, _layout_like, adaround_beta,
                                               fake_quantize)
from slimseg.compress.quant.observers import MinMaxObserver
from slimseg.errors import ConfigError, SlimsegError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ort_qdq(x: np.ndarray, scale, zero_point: np.ndarray, axis: int | None = None):
    """Run QuantizeLinear -> DequantizeLinear in onnxruntime; returns (q, x')."""
    zp_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zp_type, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), "s"),
         numpy_helper.from_array(zero_point, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _data_with_ties(rng, scale: float, n: int = 4000, spread: float = 6.0) -> np.ndarray:
    """Random values, values beyond the range, and exact .5 ties (power-of-two scale)."""
    x = rng.normal(0.0, spread, n).astype(np.float32)
    ties = (rng.integers(-300, 300, 400) + 0.5).astype(np.float32) * np.float32(scale)
    return np.concatenate([x, ties, np.float32([0.0, -0.0, 1e6, -1e6])])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("lo, hi", [(-4.0, 12.0), (-7.3, 3.1), (-8.0, 7.9375)])
def test_activation_matches_onnxruntime_bit_exact(signed, lo, hi):
    rng = np.random.default_rng(0)
    fq = ActivationFakeQuant(signed=signed).eval()  # evaluation/export path: exact
    fq.set_range(lo, hi)
    fq.state = "quantize"
    scale, zp = fq.qparams()
    x = _data_with_ties(rng, scale).reshape(4, -1)
    zp_arr = np.array(zp, dtype=np.int8 if signed else np.uint8)
    q_ref, y_ref = _ort_qdq(x, scale, zp_arr)
    y = fq(torch.from_numpy(x)).numpy()
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y_ref)
    assert int(q_ref.min()) == (-128 if signed else 0)  # saturation was exercised


@pytest.mark.parametrize("signed", [False, True])
def test_training_path_is_the_same_quantizer_up_to_ties(signed):
    """Training uses torch's vectorised kernels; they may only differ at exact ties."""
    torch.manual_seed(0)
    fq = ActivationFakeQuant(signed=signed)
    fq.set_range(-3.0, 5.0)
    fq.state = "quantize"
    scale, zp = fq.qparams()
    x = (torch.randn(4, 8, 16, 16) * 3).requires_grad_()
    fast = fq.train()(x)
    exact = fq.eval()(x.detach())
    differs = (fast.detach() - exact).abs()
    assert float(differs.max()) <= scale * 1.001
    assert float((differs > 0).float().mean()) < 1e-3
    fast.sum().backward()
    qmin, qmax = (-128, 127) if signed else (0, 255)
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x.detach() > lo - scale / 2 + 1e-4) & (x.detach() < hi + scale / 2 - 1e-4)
    outside = (x.detach() < lo - scale) | (x.detach() > hi + scale)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)


@pytest.mark.parametrize("x_layout", [torch.channels_last, torch.contiguous_format])
def test_training_gradient_is_the_same_whatever_layout_the_gradient_arrives_in(x_layout):
    """A Concat's backward hands a strided slice of a larger gradient: the straight-through
    gradient must not change, and it comes back in the input's own layout."""
    torch.manual_seed(0)
    fq = ActivationFakeQuant()
    fq.set_range(-1.0, 2.0)
    fq.state = "quantize"
    fq.train()
    base = (torch.randn(2, 6, 5, 7) * 2).contiguous(memory_format=x_layout)
    upstream = torch.randn(2, 10, 5, 7)
    grads = []
    for g in (upstream[:, 2:8], upstream[:, 2:8].contiguous(memory_format=x_layout)):
        x = base.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        fq(x).backward(g)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and int((grads[0] == 0).sum()) > 0
    assert grads[0].stride() == base.stride()
    # the copy that keeps hardtanh's backward on its fast path (3-5x slower on mixed layouts)
    assert _layout_like(upstream[:, 2:8], base).stride() == base.stride()
    strided = upstream[:, 2:8]  # x a strided view too: no layout to match, left alone
    assert _layout_like(strided, upstream[:, 1:7]) is strided


def test_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert fake_quantize(x, 1.0, 0, -128, 127).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


@pytest.mark.parametrize("shape, axis", [((6, 3, 3, 3), 0), ((4, 5, 2, 2), 1), ((7, 9), 0)])
def test_weight_per_channel_matches_onnxruntime(shape, axis):
    rng = np.random.default_rng(1)
    w = rng.standard_t(4, size=shape).astype(np.float32)
    spread = rng.uniform(0.01, 3.0, size=shape[axis])
    w *= spread.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    w = torch.from_numpy(w)
    fq = WeightFakeQuant(w, axis=axis)
    scale, q = fq.quantized()
    assert scale.shape == (shape[axis],) and q.dtype == np.int8
    assert q.min() >= -127 and q.max() <= 127
    q_ref, y_ref = _ort_qdq(w.numpy(), scale, np.zeros(shape[axis], dtype=np.int8), axis=axis)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(fq(w).detach().numpy(), y_ref)


def test_ste_gradient_is_one_inside_zero_outside():
    fq = ActivationFakeQuant()
    fq.set_range(-1.0, 3.0)
    fq.state = "quantize"
    x = torch.tensor([-3.0, -1.5, -0.5, 0.0, 1.0, 2.9, 3.5, 10.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_scale_gradient_sign_and_learning_reduces_error():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    fq = ActivationFakeQuant(signed=True, scale_mode="lsq")
    fq.set_range(-80.0, 80.0)  # far too wide: rounding error dominates
    fq.state = "quantize"
    loss0 = ((fq(x) - x) ** 2).mean()
    loss0.backward()
    assert fq.scale.grad is not None and fq.scale.grad.item() > 0  # shrinking the scale helps
    opt = torch.optim.Adam([fq.scale], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        loss = ((fq(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
    final = ((fq(x) - x) ** 2).mean().item()
    assert final < 0.5 * loss0.item()
    assert fq.qparams()[0] < 80.0 / 127


def test_lsq_scale_grows_when_clipping_dominates():
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((5000,))
    s = torch.nn.Parameter(torch.tensor(0.5 / 127))  # range +-0.5: most values clipped
    loss = ((fake_quantize(x, s, 0, -128, 127) - x) ** 2).mean()
    loss.backward()
    assert s.grad.item() < 0


def test_qparams_zero_range_and_widening():
    fq = ActivationFakeQuant()
    fq.set_range(0.0, 0.0)
    assert fq.qparams() == (1.0, 0)
    fq.set_range(2.0, 5.0)  # widened to [0, 5]
    scale, zp = fq.qparams()
    assert zp == 0 and scale == pytest.approx(5.0 / 255, rel=1e-6)
    fq.set_range(-5.0, -1.0)  # widened to [-5, 0]
    assert fq.qparams()[1] == 255
    sym = ActivationFakeQuant(signed=True)
    sym.set_range(-2.0, 6.35)
    assert sym.qparams() == (pytest.approx(6.35 / 127, rel=1e-6), 0)


def test_states_observe_off_quantize_and_errors():
    fq = ActivationFakeQuant(observer=MinMaxObserver(), name="relu_1.tmp_0")
    x = torch.linspace(-1.0, 2.0, 31)
    assert torch.equal(fq(x), x)  # observe is pass-through
    assert fq.observer.minmax() == (-1.0, 2.0)
    fq.state = "quantize"
    with pytest.raises(SlimsegError, match="relu_1.tmp_0"):
        fq(x)
    assert fq.calibrate("minmax") == (-1.0, 2.0)
    assert not torch.equal(fq(x), x)
    fq.state = "off"
    assert torch.equal(fq(x), x)
    with pytest.raises(ConfigError, match="did you mean 'quantize'"):
        fq.state = "quantise"


def test_fixed_range_is_kept_by_calibration_and_ema():
    fq = ActivationFakeQuant(fixed_range=(0.0, 1.0), scale_mode="ema")
    assert fq.qparams() == (pytest.approx(1 / 255), 0)
    fq(torch.rand(100) * 5)  # observe
    fq.calibrate("minmax")
    fq.state = "quantize"
    fq.train()
    out = fq(torch.rand(100) * 5)
    assert fq.qparams() == (pytest.approx(1 / 255), 0) and out.max().item() <= 1.0


def test_ema_follows_moving_average_abs_max():
    fq = ActivationFakeQuant(signed=True, scale_mode="ema", moving_rate=0.9)
    fq.state = "quantize"
    fq.train()
    state = acc = 0.0
    for peak in (1.0, 3.0, 2.0):
        fq(torch.tensor([-0.5 * peak, peak]))
        state, acc = 0.9 * state + 1, 0.9 * acc + peak
    assert fq.qparams()[0] == pytest.approx(acc / state / 127, rel=1e-6)
    fq.eval()
    before = fq.qparams()
    fq(torch.tensor([100.0]))
    assert fq.qparams() == before  # eval does not move the range


def _adaround_setup(seed: int = 0):
    """Correlated inputs: with isotropic ones the output error is separable per weight and
    round-to-nearest is already optimal, so AdaRound would have nothing to gain."""
    torch.manual_seed(seed)
    w = torch.randn(16, 32) * 0.2
    x = torch.randn(512, 6) @ torch.randn(6, 32) + 0.05 * torch.randn(512, 32)
    return w, x, x @ w.T


def test_adaround_beats_round_to_nearest():
    w, x, y = _adaround_setup()
    rtn = WeightFakeQuant(w)
    err_rtn = ((x @ rtn(w).T - y) ** 2).mean().item()
    fq = WeightFakeQuant(w, adaround=True)
    assert torch.allclose(fq(w), w, atol=1e-6)  # h(V) starts at frac(w / s)
    opt = torch.optim.Adam([fq.alpha], lr=0.05)
    steps = 200
    for step in range(steps):
        opt.zero_grad()
        rec = ((x @ fq(w).T - y) ** 2).mean()
        beta = adaround_beta(step, steps)
        reg = fq.adaround_reg(beta) if step >= 0.2 * steps else torch.zeros(())
        (rec / err_rtn + reg / w.numel()).backward()
        opt.step()
    fq.freeze_rounding()
    err_ada = ((x @ fq(w).T - y) ** 2).mean().item()
    assert err_ada < 0.7 * err_rtn
    scale, q = fq.quantized()
    assert np.array_equal(q.astype(np.float32) * scale[:, None], fq(w).detach().numpy())
    assert q.min() >= -127 and q.max() <= 127
    base = np.floor(w.numpy() / scale[:, None])
    assert set(np.unique(q - base).tolist()) <= {0.0, 1.0}  # floor or ceil, nothing else
    assert fq.adaround_reg(2.0).item() == 0.0  # hard decisions


def test_mask_keeps_zeros_with_adaround_and_lsq():
    w, _, _ = _adaround_setup(1)
    mask = (torch.rand_like(w) > 0.5).float()
    fq = WeightFakeQuant(w, adaround=True, learn_scale=True, mask=mask)
    with torch.no_grad():
        fq.alpha.fill_(5.0)  # h(V) = 1 everywhere: would round zeros up
    out = fq(w)
    assert torch.all(out[mask == 0] == 0)
    assert np.all(fq.quantized()[1][mask.numpy() == 0] == 0)


def test_weight_scale_methods_and_lsq_gradient():
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((8, 2304))  # a 3x3x256 conv's rows
    err = {m: ((WeightFakeQuant(w, scale_method=m)(w) - w) ** 2).sum().item() for m in ("absmax", "mse")}
    assert err["mse"] < err["absmax"]
    fq = WeightFakeQuant(w, learn_scale=True)
    ((fq(w) - w) ** 2).sum().backward()
    assert fq.scale.grad.shape == (8,) and torch.count_nonzero(fq.scale.grad) == 8
    with pytest.raises(ConfigError, match="did you mean 'absmax'"):
        WeightFakeQuant(w, scale_method="absmx")


def test_state_dict_and_pickle_round_trip():
    torch.manual_seed(4)
    act = ActivationFakeQuant(scale_mode="lsq")
    act(torch.randn(3, 4, 5))
    act.calibrate("mse")
    act.state = "quantize"
    w = torch.randn(6, 10)
    wfq = WeightFakeQuant(w, adaround=True, mask=(w.abs() > 0.3).float(), scale_method="mse")
    fresh_act = ActivationFakeQuant(scale_mode="lsq")
    fresh_act.load_state_dict(act.state_dict())
    fresh_act.state = "quantize"
    assert fresh_act.qparams() == act.qparams()
    assert torch.equal(fresh_act.observer.hist, act.observer.hist)
    fresh_w = WeightFakeQuant(torch.zeros(6, 10), adaround=True, mask=torch.ones(6, 10))
    fresh_w.load_state_dict(wfq.state_dict())
    assert torch.equal(fresh_w(w), wfq(w))
    buffer = io.BytesIO()
    torch.save({"a": act.state_dict(), "w": wfq.state_dict()}, buffer)
    clone = pickle.loads(pickle.dumps(act))
    x = torch.randn(2, 3)
    assert torch.equal(clone(x), act(x))


def test_parametrization_and_batch_agnostic():
    from torch.nn.utils import parametrize
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", WeightFakeQuant(conv.weight))
    out = conv(torch.randn(1, 3, 8, 8))
    assert out.shape == (1, 4, 6, 6)
    assert conv(torch.randn(5, 3, 8, 8)).shape == (5, 4, 6, 6)
    scale, q = conv.parametrizations.weight[0].quantized()
    assert np.array_equal(q * scale[:, None, None, None], conv.weight.detach().numpy())


def test_weights_are_quantized_once_without_gradients_and_again_when_they_change():
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.randn(4, 9))
    fq = WeightFakeQuant(w.detach(), scale_method="absmax")
    with torch.no_grad():
        first = fq(w)
        assert fq(w) is first  # cached
        w.mul_(0.5)  # an optimizer step or load_state_dict changes the weight in place
        changed = fq(w)
        assert changed is not first and torch.equal(changed, fake_quantize(w, fq._scale_view(w), 0, -127, 127))
        fq.scale.mul_(2.0)
        assert not torch.equal(fq(w), changed)
        other = w.detach().clone()  # another tensor with equal values is quantized afresh
        assert fq(other) is not fq(w)
    fresh = fq(w)  # with gradients: computed every time, differentiable
    assert fresh.requires_grad and fq(w) is not fresh
    assert "_no_grad_cache" not in pickle.loads(pickle.dumps(fq)).__dict__
