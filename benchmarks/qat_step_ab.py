"""QAT seconds per iteration of two versions of slimseg, interleaved (issue 3's step time).

Checks out `--old` (a commit) into a temporary git worktree and alternates short QAT runs of it
and of this checkout: `compress()` with `examples/configs/pp_humanseg_qat.yaml` cut to `--iters`
iterations, each in a child process with its own PYTHONPATH. Prints each run's median s/iter
(from the report) and the medians per version. Run it alone: the point is the A/B, not the
absolute numbers, which move with the machine's load.

    python benchmarks/qat_step_ab.py --old 05c6c6f [--iters 50] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "pp_humanseg_qat.yaml"
CHILD = """
import sys
from slimseg.compress.api import compress
r = compress(None, sys.argv[1], save_dir=sys.argv[2], overwrite=True, progress=False, bench_rounds=20)
print("SECONDS_PER_ITER", r.report["quantization"]["qat"]["seconds_per_iter"])
"""


def short_config(folder: Path, iters: int) -> Path:
    """The QAT example with absolute paths, `iters` iterations and no evaluation until the end."""
    cfg = yaml.safe_load(CONFIG.read_text())
    base = CONFIG.parent
    cfg["Global"]["reader_config"] = str((base / cfg["Global"]["reader_config"]).resolve())
    cfg["Global"]["model_dir"] = str((base / cfg["Global"]["model_dir"]).resolve())
    cfg["TrainConfig"].update(train_iter=iters, eval_iter=10 * iters, logging_iter=10)
    path = folder / "qat_short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(code: Path, config: Path, out: Path) -> float:
    env = {"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(config), str(out)], cwd=code, env=env,
                          capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("SECONDS_PER_ITER")]
    if done.returncode != 0 or not line:
        raise SystemExit(f"run in {code} failed:\n{done.stderr[-2000:]}")
    return float(line[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="commit to compare against")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(old), args.old], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            config = short_config(tmp, args.iters)
            times: dict[str, list[float]] = {args.old: [], "this checkout": []}
            for r in range(args.rounds):
                for name, code in ((args.old, old), ("this checkout", ROOT)):
                    seconds = run(code, config, tmp / f"out_{r}")
                    times[name].append(seconds)
                    print(f"round {r + 1}: {name}: {seconds:.3f} s/iter", flush=True)
            for name, values in times.items():
                print(f"{name}: median {statistics.median(values):.3f} s/iter over {len(values)} runs")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
