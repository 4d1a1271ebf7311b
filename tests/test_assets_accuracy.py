"""Issue 2's acceptance bar on the real models: val mIoU reproduced through `slimseg eval`."""
import json

import pytest

from slimseg.cli import main

CONFIGS = {"pp_humanseg_lite_192": "mini_supervisely_192.yaml",
           "pp_humanseg_lite_portrait_398x224": "mini_supervisely_398x224.yaml"}
REFERENCE_VAL_MIOU = {"pp_humanseg_lite_192": 0.8637, "pp_humanseg_lite_portrait_398x224": 0.8275}


@pytest.mark.parametrize("name", sorted(REFERENCE_VAL_MIOU))
def test_val_miou_matches_reference(name, assets, capsys):
    from conftest import ROOT

    code = main(["eval", "--model_dir", str(assets / "models" / name),
                 "--dataset_config", str(ROOT / "examples" / "configs" / "dataset" / CONFIGS[name]),
                 "--output", "json", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 100
    assert result["miou"] == pytest.approx(REFERENCE_VAL_MIOU[name], abs=0.002)


def test_bgr_input_costs_accuracy(assets):
    """The assets README's sanity check: BGR instead of RGB costs points, so channel order matters."""
    import numpy as np
    from conftest import ROOT
    from slimseg.data import build_dataset
    from slimseg.evaluate import evaluate

    dataset = build_dataset(ROOT / "examples" / "configs" / "dataset" / "mini_supervisely_192.yaml", "val")

    class SwappedChannels:
        spec = dataset.spec

        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            sample = dataset[i]
            sample.image = np.ascontiguousarray(sample.image[::-1])
            return sample

    model = assets / "models" / "pp_humanseg_lite_192"
    rgb = evaluate(model, dataset, limit=30, progress=False).metrics.miou
    bgr = evaluate(model, SwappedChannels(), limit=30, progress=False).metrics.miou
    assert rgb - bgr > 0.03
