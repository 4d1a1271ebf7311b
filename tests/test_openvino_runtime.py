"""The optional OpenVINO runtime: same outputs as onnxruntime, a clear error when missing."""
import builtins
import json

import numpy as np
import onnx
import pytest

from slimseg.cli import main
from slimseg.errors import MissingDependencyError
from slimseg.hardware.runtime import get_runtime
from helpers import channel_vote_model, write_vote_dataset


def test_missing_openvino_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(MissingDependencyError, match=r"slimseg\[openvino\]"):
        get_runtime("openvino", channel_vote_model())


def test_openvino_matches_onnxruntime():
    pytest.importorskip("openvino", reason="optional extra slimseg[openvino] not installed")
    model = channel_vote_model()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = get_runtime("onnxruntime", model).run(x)[0]
    got = get_runtime("openvino", model, threads=1).run(x)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _cpu_runs_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("asked", ["f32", "bf16"])
def test_openvino_says_which_precision_it_ran(asked):
    pytest.importorskip("openvino", reason="optional extra slimseg[openvino] not installed")
    session = get_runtime("openvino", channel_vote_model(), threads=1, precision=asked)
    # a CPU without bf16 (AVX2, AMD before Zen 4) runs f32 when asked for bf16: say so, not what was asked
    ran = asked if asked == "f32" or _cpu_runs_bf16() else "f32"
    assert session.precision == ran


def test_eval_and_bench_through_openvino_report_the_precision(tmp_path, capsys):
    pytest.importorskip("openvino", reason="optional extra slimseg[openvino] not installed")
    model = tmp_path / "vote.onnx"
    onnx.save(channel_vote_model(), model)
    config = write_vote_dataset(tmp_path / "data")
    assert main(["eval", "--model", str(model), "--dataset_config", str(config), "--runtime", "openvino",
                 "--output", "json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["runtime"], data["precision"], data["num_images"]) == ("openvino", "f32", 4)
    assert data["miou"] == pytest.approx(1.0)
    assert main(["bench", "--model", str(model), "--input_shape", "1,3,16,16", "--runs", "3", "--warmup", "1",
                 "--runtime", "openvino", "--precision", "bf16", "--quiet"]) == 0
    assert f"openvino ({'bf16' if _cpu_runs_bf16() else 'f32'} inference)" in capsys.readouterr().out


def test_precision_is_an_error_outside_openvino(tmp_path, capsys):
    model = tmp_path / "vote.onnx"
    onnx.save(channel_vote_model(), model)
    assert main(["bench", "--model", str(model), "--input_shape", "1,3,16,16", "--precision", "bf16",
                 "--quiet"]) != 0
    assert "--precision applies to --runtime openvino only" in capsys.readouterr().err
