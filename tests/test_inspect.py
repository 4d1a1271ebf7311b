"""`slimseg inspect`: what compress would quantize, prune and distill (issue 6, item 7)."""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import helper

from helpers import channel_vote_model
from slimseg.cli import main
from slimseg.model.importers import load_model
from slimseg.model.inspect import inspect_model
from helpers import decisive_model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "decisive.onnx"
    onnx.save(decisive_model(), path)
    return path


def test_sections_name_the_layers_compress_would_touch(model_path):
    data = inspect_model(load_model(model_path))
    assert data["trainable"] == {"ok": True}
    # BN folds into conv1, so both convs carry int8 weights; the softmax output stays float
    layers = data["quantization"]["layers"]
    assert [layer["node"] for layer in layers] == ["conv1", "head"]
    assert layers[1]["weight"] == "w2" and all(layer["axis"] == 0 for layer in layers)
    assert data["quantization"]["activation_groups"] >= 2
    assert all(isinstance(why, str) and why for why in data["quantization"]["float_nodes"].values())
    # both conv weights may be sparsified; w2 is 1x1 and its 3 input channels rule out 2:4
    weights = {w["weight"]: w for w in data["pruning"]["unstructured"]}
    assert set(weights) == {"w1", "w2"}
    assert weights["w2"]["conv1x1"] and not weights["w1"]["conv1x1"]
    assert not weights["w2"]["asp_2_4"]
    # conv1's channels can go (the head reads them); the head's feed a softmax over classes
    groups = {tuple(g["producers"]): g for g in data["pruning"]["channel_groups"]}
    assert groups[("conv1",)]["removable"] == 3
    assert groups[("head",)]["removable"] == 0 and "Softmax" in groups[("head",)]["kept_because"]


def test_distillation_candidates_have_shapes(model_path):
    data = inspect_model(load_model(model_path))
    distill = data["distillation"]
    assert distill["default"] == ["logits"]  # the last layer with weights before the output
    tensors = [c["tensor"] for c in distill["candidates"]]
    assert tensors == ["logits", "c1"]
    shapes = {c["tensor"]: c["shape"] for c in distill["candidates"]}
    assert shapes == {"logits": [1, 3, 16, 16], "c1": [1, 3, 16, 16]}
    assert [c["default"] for c in distill["candidates"]] == [True, False]


def test_cli_json_and_table(model_path, capsys):
    assert main(["inspect", "--model", str(model_path), "--output", "json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"inputs", "ops", "params", "macs", "quantization", "pruning", "distillation"} <= set(data)
    assert main(["inspect", "--model", str(model_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    for expected in ("2 layers with int8 weights", "channel groups (ChannelPrune)", "logits  (default)", "1x3x16x16"):
        assert expected in text


def test_a_section_that_cannot_be_computed_does_not_hide_the_others(tmp_path, capsys):
    """channel_vote_model has no layer with weights (no default distillation node) and an LRN
    that compress cannot train: inspect still shows everything else."""
    model = channel_vote_model()
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("LRN", ["pre"], ["prob"], name="lrn", size=3))
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    assert main(["inspect", "--model", str(path), "--output", "json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "LRN" in data["trainable"]["error"] and "'lrn'" in data["trainable"]["error"]
    assert "no layer with parameters" in data["distillation"]["error"]
    assert data["quantization"]["layers"] == [] and "lrn" in data["quantization"]["float_nodes"]
    assert data["pruning"] == {"unstructured": [], "channel_groups": []}
    assert main(["inspect", "--model", str(path), "--quiet"]) == 0
    assert "compress cannot train this graph" in capsys.readouterr().out
