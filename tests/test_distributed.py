"""Data-parallel training under torchrun (gloo, 2 CPU processes) takes the steps one process
takes with the same global batch; fake-quant scales stay identical on every rank; only rank 0
evaluates. The launch is real: ``python -m torch.distributed.run --standalone``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch

from slimseg import distributed as dist
from slimseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

def worker(model_path: Path, data: str, out: Path) -> None:
    """One training run (in every process): QAT of a perturbed tiny conv net, distilled from
    the original in onnxruntime; saves this rank's final state, losses and evaluations."""
    from slimseg.compress.distill import Distiller
    from slimseg.compress.finetune import distill_loader
    from slimseg.compress.quant.placement import plan_quantization
    from slimseg.compress.quant.simulator import QuantSimulator
    from slimseg.compress.teacher import OrtTeacher
    from slimseg.config import Distillation, TrainConfig
    from slimseg.config.train import OptimizerBuilder, OptimizerSpec
    from slimseg.data import build_dataset
    from slimseg.train import TrainSession, train

    ctx = dist.init("cpu")
    teacher = onnx.load(model_path)
    sim = QuantSimulator(teacher, plan_quantization(teacher, op_types={"Conv", "Relu"}))
    train_set = build_dataset(data, "train")
    sim.observe([torch.from_numpy(train_set[i].image)[None] for i in range(4)])
    sim.calibrate("minmax")
    sim.quantize(True)
    with torch.no_grad():
        torch.manual_seed(ctx.rank)          # ranks start apart: DDP must start them from rank 0
        for p in sim.graph.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    nodes = ["logits"]
    distiller = Distiller(sim, OrtTeacher(teacher, nodes, threads=1), Distillation(node=nodes), nodes=nodes)
    params = [p for p in sim.graph.parameters() if p.is_floating_point()]
    cfg = TrainConfig(train_iter=8, eval_iter=4, learning_rate=0.05, batch_size=4,
                      optimizer_builder=OptimizerBuilder(optimizer=OptimizerSpec(type="Momentum")))
    calls = []
    result = train(distiller, params, distill_loader(train_set, 4, 0, distiller), train_cfg=cfg, total_iters=8,
                   evaluate=lambda: calls.append(1) or 0.5, progress=False, session=TrainSession(device="cpu"))
    torch.save({"state": sim.state_dict(), "losses": [h["loss"] for h in result.history],
                "evaluations": len(calls), "metrics": [h.get("metric") for h in result.history]},
               out / f"rank{ctx.rank}.pt")
    dist.barrier()
    dist.shutdown()


WORKER = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {str(TESTS)!r})
    from test_distributed import worker
    worker(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from slimseg.demo import make_synthetic_dataset

    sys.path.insert(0, str(TESTS))
    from test_checkpoint_resume import tiny_convnet

    root = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_dataset(root / "data", train=16, val=2, size=16, seed=2)
    model = root / "model.onnx"
    onnx.save(tiny_convnet(seed=3), model)
    script = root / "worker.py"
    script.write_text(WORKER)
    return root, model, data, script


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_take_the_steps_of_one(setup, tmp_path):
    root, model, data, script = setup
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker(model, str(data), one)                                   # one process, here
    finally:
        torch.set_num_threads(threads)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
          str(model), str(data), str(two)], root)
    single = torch.load(one / "rank0.pt", weights_only=False)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert single["evaluations"] == 2 and [r["evaluations"] for r in ranks] == [2, 0]   # rank 0 evaluates
    assert ranks[1]["metrics"] == ranks[0]["metrics"] == single["metrics"]              # ... and tells the rest
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key          # weights, scales: identical on ranks
        if value.is_floating_point():
            torch.testing.assert_close(value, single["state"][key], rtol=1e-5, atol=1e-7, msg=key)
        else:
            assert torch.equal(value, single["state"][key]), key
    # each rank's loss is on its half of the batch: their mean is the one process's loss
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(single["losses"], rel=1e-4)
    assert single["losses"][-1] < single["losses"][0]


def test_shard_splits_a_global_batch_in_equal_contiguous_parts():
    batch = list(range(8))
    assert [dist.shard(batch, r, 2) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dist.shard(batch, 0, 1) == batch
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        dist.shard(batch, 0, 3)


def test_one_process_needs_no_process_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = dist.init("cpu")
    assert (ctx.rank, ctx.world, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.any_rank(True) and not dist.any_rank(False)
    dist.barrier()
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        dist.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto").type == "cpu"
