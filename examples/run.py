"""The seed's entry point, with the seed's flags: PaddleSlim ACT's `run.py` for segmentation.

    python examples/run.py --model_dir ../shared/assets/models/pp_humanseg_lite_192 \\
        --model_filename model.pdmodel --params_filename model.pdiparams \\
        --strategy_config examples/configs/pp_humanseg_qat.yaml --save_dir output/qat

It is `slimseg compress` under another name: every flag is handed over unchanged.
"""
import sys

from slimseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
