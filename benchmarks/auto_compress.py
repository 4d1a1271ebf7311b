"""Issue 5's acceptance: the automatic strategy search on PP-HumanSeg-Lite 192x192.

Runs `slimseg compress` without a strategy file (`examples/configs/pp_humanseg_auto.yaml` gives
only Global + TrainConfig) in a child process for each --deploy_hardware (default: cpu, measured
in onnxruntime; SD710, predicted by the cost model), then prints each run's candidate table
(estimate, measured or predicted latency, mIoU, drop, seconds, verdict), its choice, wall time
and peak memory. Acceptance: cpu finishes in <= 20 minutes on 2 cores, the result is >= 1.3x
faster (1 thread, measured) with a val mIoU drop <= 0.5 point. Run it alone on a quiet machine.

    python benchmarks/auto_compress.py [--targets cpu SD710] [--time_budget 20m] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "pp_humanseg_auto.yaml"
DATASET = ROOT / "examples" / "configs" / "dataset" / "mini_supervisely_192.yaml"
MODEL = ROOT / ".." / "shared" / "assets" / "models" / "pp_humanseg_lite_192"


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process; its output streams through."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["cpu", "SD710"])
    parser.add_argument("--time_budget", default=None, help="passed to slimseg compress (e.g. 20m)")
    parser.add_argument("--max_metric_drop", default="0.005")
    parser.add_argument("--out", default=None, help="keep the outputs here (default: a temp folder)")
    args = parser.parse_args()
    if not MODEL.is_dir():
        raise SystemExit(f"model not found: {MODEL} (../shared/assets)")
    from slimseg.compress.auto import format_candidates

    with tempfile.TemporaryDirectory(prefix="slimseg-auto-bench-") as tmp:
        out_root = Path(args.out) if args.out else Path(tmp)
        for target in args.targets:
            save_dir = out_root / f"auto_{target}"
            cmd = [sys.executable, "-m", "slimseg", "compress", "--model_dir", str(MODEL),
                   "--strategy_config", str(CONFIG), "--dataset_config", str(DATASET), "--deploy_hardware", target,
                   "--max_metric_drop", args.max_metric_drop, "--save_dir", str(save_dir), "--overwrite", "--quiet"]
            if args.time_budget:
                cmd += ["--time_budget", args.time_budget]
            print(f"$ {' '.join(cmd)}", flush=True)
            wall, peak = run_child(cmd)
            report = json.loads((save_dir / "report.json").read_text())
            auto, speed = report["auto"], report["speedup"]
            print(f"\n{format_candidates(report['candidates'], target=target)}\n")
            print(f"{target}: chose {auto['chosen']} ({auto['final']}); val mIoU "
                  f"{report['baseline']['metrics']['miou']:.4f} -> {report['compressed']['metrics']['miou']:.4f} "
                  f"(drop {report['metric_drop'] * 100:.2f} points); onnxruntime speedup 1 thread "
                  f"{speed['1_thread']:.2f}x, 2 threads {speed['2_thread']:.2f}x; on {target}: "
                  f"{auto['baseline']['latency_ms']:.2f} -> {auto['final']['latency_ms']:.2f} ms"
                  f"{' (predicted)' if auto['final']['predicted'] else ''}; wall {wall:.0f} s, peak {peak:.0f} MB\n",
                  flush=True)


if __name__ == "__main__":
    main()
