"""The optional OpenVINO runtime: same outputs as onnxruntime, a clear error when missing."""
import builtins

import numpy as np
import pytest

from slimseg.errors import MissingDependencyError
from slimseg.hardware.runtime import get_runtime
from helpers import channel_vote_model


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
