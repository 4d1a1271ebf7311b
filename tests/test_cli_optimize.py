"""`slimseg optimize` and `slimseg bench --profile` through the real entry point, on tiny models."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from slimseg.cli import main

RNG = np.random.default_rng(0)


def _t(name: str, shape) -> str:
    values = RNG.uniform(-1, 1, size=shape).astype(np.float32)
    return f"float[{','.join(map(str, shape))}] {name} = {{{','.join(f'{v:.6f}' for v in values.ravel())}}}"


def _tiny(path) -> str:
    """Conv -> BatchNorm -> Relu -> Resize x2 -> Softmax over 2 classes."""
    text = f"""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 2, 16, 16] y)
      <{_t('w', [2, 3, 3, 3])}, {_t('g', [2])}, {_t('b', [2])}, {_t('m', [2])},
       float[2] v = {{1.0, 2.0}}, float[4] scales = {{1.0, 1.0, 2.0, 2.0}}> {{
      c = Conv <pads = [1, 1, 1, 1]> (x, w)
      n = BatchNormalization (c, g, b, m, v)
      r = Relu (n)
      up = Resize <mode = "linear"> (r, , scales)
      y = Softmax <axis = 1> (up)
    }}"""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _outputs(path: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_optimize_writes_exact_model_and_reports(tmp_path, capsys):
    src, out = _tiny(tmp_path / "m.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", src, "-o", str(out), "--no-bench", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "softmax2: -1 Softmax" in printed and "fold_batchnorm" in printed and "latency" not in printed
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Softmax" not in ops and "BatchNormalization" not in ops
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert np.abs(_outputs(src, x) - _outputs(str(out), x)).max() < 1e-5


def test_optimize_json_with_interleaved_latency(tmp_path, capsys):
    src, out = _tiny(tmp_path / "m.onnx"), tmp_path / "out.onnx"
    assert main(["optimize", src, "-o", str(out), "--rounds", "5", "--quiet", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"] == str(out) and data["speedup"] > 0
    assert set(data["latency"]) == {"before", "after"}
    assert {p["name"] for p in data["passes"]} >= {"softmax2", "fold_channel_shuffle"}


def test_optimize_missing_model_is_one_line_error(tmp_path, capsys):
    code = main(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx"), "--no-bench"])
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("slimseg optimize: error:") and "nope.onnx" in err
    assert not (tmp_path / "o.onnx").exists()


def test_bench_profile_table_and_json(tmp_path, capsys):
    src = _tiny(tmp_path / "m.onnx")
    assert main(["bench", "--model", src, "--runs", "3", "--warmup", "1", "--profile", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "time per op type" in table and "Softmax" in table and "share" in table
    assert main(["bench", "--model", src, "--runs", "3", "--warmup", "1", "--profile", "--quiet",
                 "--output", "json"]) == 0
    profile = json.loads(capsys.readouterr().out)["profile"]
    assert {"Softmax", "Conv"} <= {row["op_type"] for row in profile}
    assert profile == sorted(profile, key=lambda row: -row["ms"])
