"""Seconds per QAT student step (forward to the distillation tensor + backward, batch 8), alone.

    python benchmarks/qat_student_step.py [--rounds 6] [--steps 20]

Builds the QAT student of examples/configs/pp_humanseg_qat.yaml exactly as `compress` does
(folded BN, rewrites, Q/DQ plan, calibration) by stopping `compress` where QAT would start,
then times forward + backward of an L2 loss on the distillation tensor for a random batch of 8,
with fake quantization on and off, alternating, ``--rounds`` rounds of ``--steps`` steps (the
first two of each round are warm-up). No teacher, no data loading, no optimizer: the floor a
QAT iteration cannot go below with this model in torch on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "pp_humanseg_qat.yaml"


class _Captured(Exception):
    pass


def qat_student():
    """(QuantSimulator, distillation tensors) as `compress` hands them to QAT."""
    from slimseg.compress import api

    captured = {}

    def capture(sim, teacher_model, strategy, val, train_set, nodes, **kwargs):
        captured.update(sim=sim, nodes=nodes)
        raise _Captured

    original, api._qat = api._qat, capture
    try:
        with tempfile.TemporaryDirectory() as tmp:
            api.compress(None, str(CONFIG), save_dir=Path(tmp) / "out", progress=False)
    except _Captured:
        pass
    finally:
        api._qat = original
    return captured["sim"], captured["nodes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    sim, nodes = qat_student()
    sim.train()
    for p in sim.graph.parameters():
        p.requires_grad_(p.is_floating_point())
    x = torch.randn(8, 3, 192, 192)  # pp_humanseg_lite_192's input, batch 8

    def step() -> None:
        out = sim(x, taps=nodes, only_taps=True)
        sum(v.float().pow(2).mean() for v in out.values()).backward()

    times: dict[str, list[float]] = {"fake quant on": [], "fake quant off": []}
    for r in range(args.rounds):
        for name in times:
            sim.quantize(name == "fake quant on")
            seconds = []
            for _ in range(args.steps):
                tic = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - tic)
            times[name].append(statistics.median(seconds[2:]))
            print(f"round {r + 1}: {name}: {times[name][-1]:.3f} s/step", flush=True)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} s per step of 8 over {len(values)} rounds")


if __name__ == "__main__":
    main()
