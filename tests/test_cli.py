"""The CLI driven through its real entry point."""
import json
import subprocess
import sys

import onnx
import pytest

from slimseg.cli import main
from helpers import channel_vote_model, write_vote_dataset


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("compress", "eval", "bench", "inspect", "demo"):
        assert command in out


def test_python_dash_m_runs():
    done = subprocess.run([sys.executable, "-m", "slimseg", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("slimseg ")


def test_eval_prints_json(tmp_path, capsys):
    model = tmp_path / "vote.onnx"
    onnx.save(channel_vote_model(), model)
    config = write_vote_dataset(tmp_path / "data")
    code = main(["eval", "--model", str(model), "--dataset_config", str(config), "--output", "json", "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["miou"] == pytest.approx(1.0)
    assert data["num_images"] == 4


def test_bench_prints_json(tmp_path, capsys):
    model = tmp_path / "vote.onnx"
    onnx.save(channel_vote_model(), model)
    code = main(["bench", "--model", str(model), "--input_shape", "1,3,16,16", "--runs", "5", "--warmup", "1",
                 "--output", "json", "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == 5
    assert 0 < data["min_ms"] <= data["median_ms"] <= data["p90_ms"]


def test_inspect_summarises_and_saves(tmp_path, capsys):
    model = tmp_path / "vote.onnx"
    onnx.save(channel_vote_model(), model)
    saved = tmp_path / "canonical.onnx"
    assert main(["inspect", "--model", str(model), "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "Softmax" in out and "prob" in out
    onnx.checker.check_model(onnx.load(saved))


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--model", "missing.onnx", "--dataset_config", "x.yaml"], "missing.onnx"),
    (["bench"], "no model given"),
    (["bench", "--model_dir", "no_such_dir"], "no_such_dir"),
])
def test_bad_input_is_one_line_and_nonzero(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert expected in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_bad_input_shape_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "m.onnx", "--input_shape", "1,3,abc"])
    assert exit_info.value.code == 2
    assert "N,C,H,W" in capsys.readouterr().err


def test_seed_run_py_is_compress_with_the_seed_flags():
    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "examples" / "run.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--model_dir", "--model_filename", "--params_filename", "--save_dir", "--strategy_config",
                 "--dataset_config", "--deploy_hardware"):
        assert flag in done.stdout


def test_compress_refuses_unknown_deploy_hardware(capsys):
    code = main(["compress", "--model", "m.onnx", "--strategy_config", "s.yaml", "--deploy_hardware", "SD701"])
    assert code != 0
    err = capsys.readouterr().err
    assert "SD701" in err and "SD710" in err
