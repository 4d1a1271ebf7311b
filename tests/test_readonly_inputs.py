"""Inputs are read-only and nothing phones home (issue 6, item 6).

Every command runs on a model folder and a dataset; their files (sha256, size, mtime, mode)
and their listing must be the same afterwards: a peer tool was seen rewriting its input
``model.pdmodel`` in place. While they run, a guard makes any non-loopback connection and any
child process that would install packages fail the test.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slimseg.cli import main
from helpers import write_project

QAT = """QuantPost:
  algo: minmax
  batch_size: 2
  batch_nums: 1
QuantAware:
  quantize_op_types: [conv2d]
TrainConfig:
  train_iter: 2
  eval_iter: 2
  batch_size: 2
  learning_rate: 0.0001
"""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under `roots`: content hash, size, mtime (ns) and mode."""
    state = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            state[str(path)] = (digest, st.st_size if path.is_file() else None, st.st_mtime_ns, st.st_mode)
    return state


class Guard:
    """Records what would leave the machine or install something, and refuses it."""

    def __init__(self, monkeypatch):
        self.connections: list = []
        self.children: list = []
        real_connect = socket.socket.connect
        real_create = socket.create_connection
        real_popen_init = subprocess.Popen.__init__
        guard = self

        def connect(sock, address):
            guard._check(address)
            return real_connect(sock, address)

        def create_connection(address, *args, **kwargs):
            guard._check(address)
            return real_create(address, *args, **kwargs)

        def popen_init(popen, args, *rest, **kwargs):
            guard.children.append(args)
            text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
            if "pip" in text.split() or "ensurepip" in text or "install" in text.split():
                raise AssertionError(f"a command tried to install packages: {text}")
            return real_popen_init(popen, args, *rest, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket, "create_connection", create_connection)
        monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)

    def _check(self, address) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK and not str(host).startswith("/"):  # unix sockets are local
            self.connections.append(address)
            raise AssertionError(f"a command tried to reach {address}")


@pytest.fixture
def guard(monkeypatch):
    return Guard(monkeypatch)


def test_the_guard_catches_a_connection_and_an_install(guard):
    with pytest.raises(AssertionError, match="tried to reach"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.01)  # TEST-NET-1: never routed
    with pytest.raises(AssertionError, match="install packages"):
        subprocess.run([sys.executable, "-m", "pip", "install", "nothing"])
    assert guard.connections and guard.children


def test_no_command_modifies_its_inputs_or_reaches_out(tmp_path, guard, capsys):
    model, data = write_project(tmp_path / "in")
    strategy = tmp_path / "qat.yaml"
    strategy.write_text(QAT)
    out = tmp_path / "out"
    modules_before = set(sys.modules)
    before = snapshot(model.parent, data.parent)
    m, d = str(model), str(data)
    commands = [
        ["compress", "--model", m, "--strategy_config", str(strategy), "--dataset_config", d,
         "--save_dir", str(out / "compressed")],
        ["eval", "--model", m, "--dataset_config", d],
        ["predict", m, str(data.parent / "images"), "-o", str(out / "pred"), "--dataset_config", d],
        ["bench", "--model", m, "--runs", "3", "--warmup", "1"],
        ["inspect", "--model", str(model.parent), "--save", str(out / "canonical.onnx")],
        ["export", m, "-o", str(out / "exported.onnx")],
        ["optimize", m, "-o", str(out / "optimized.onnx"), "--no-bench"],
    ]
    for argv in commands:
        code = main([*argv, "--quiet"])
        assert code == 0, (argv, capsys.readouterr().err)
    assert (out / "compressed" / "model.onnx").is_file() and (out / "pred").is_dir()
    assert snapshot(model.parent, data.parent) == before
    assert guard.connections == [] and guard.children == []
    assert not {name for name in set(sys.modules) - modules_before if name.split(".")[0] in ("pip", "ensurepip")}


def test_a_paddle_model_folder_stays_as_it_was(assets, tmp_path, guard, capsys):
    """paddle2onnx runs in a child process: that child must not touch model.pdmodel either."""
    folder = tmp_path / "paddle"
    shutil.copytree(assets / "models" / "pp_humanseg_lite_192", folder)
    for path in folder.iterdir():
        path.chmod(0o644)  # writable, so a rewrite would succeed if one were attempted
    before = snapshot(folder)
    assert main(["inspect", "--model_dir", str(folder), "--output", "json", "--quiet"]) == 0
    assert snapshot(folder) == before
    assert [c for c in guard.children if "paddle2onnx" in " ".join(map(str, c))]  # the converter ran
