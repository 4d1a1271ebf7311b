"""Does sparsity pay off in MNN? Dense vs 80%-sparse 1x1 convs, 1x1 and 1x4 blocks, 1 thread.

    python benchmarks/mnn_sparse.py [--model_dir ../shared/assets/models/pp_humanseg_lite_192]
        [--ratio 0.8] [--rounds 200] [--threads 1] [--trained out/block/model.onnx]

The model's BN is folded, then every 1x1 conv weight (group 1) is magnitude-pruned with numpy,
per layer, to `ratio` zeros: unstructured (smallest |w|), and in 1x4 blocks (4 consecutive
output channels at one input position, scored by mean |w|, the last partial block included).
No training: this measures speed only. Each variant is exported to MNN with sparse detection
(1x4 with a SIMD_OC compression-params file); the dense model is exported without it and also
timed in onnxruntime for reference. All sessions run interleaved, one run each per round,
in an order that rotates every round.
``--trained``: a trained 1x4-block-sparse model from ``slimseg compress`` (which applies the
exact graph rewrites); it runs next to the dense model with the same rewrites, so that the
speedup is the zeros' alone.
Needs `pip install 'slimseg[mnn]'`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"


def conv1x1_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers that are the weight of a group-1 1x1 Conv."""
    inits = {t.name: t for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = inits.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and list(weight.dims[2:]) == [1, 1] and group == 1:
            names.append(weight.name)
    return names


def prune_unstructured(w: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the `ratio` smallest-magnitude weights."""
    k = int(round(ratio * w.size))
    order = np.argsort(np.abs(w), axis=None, kind="stable")
    out = w.copy().reshape(-1)
    out[order[:k]] = 0
    return out.reshape(w.shape)


def prune_blocks(w: np.ndarray, ratio: float, oc_block: int = 4) -> np.ndarray:
    """Zero the `ratio` weakest blocks of `oc_block` output channels x one input position."""
    out_ch = w.shape[0]
    flat = w.reshape(out_ch, -1)
    starts = range(0, out_ch, oc_block)
    scores = np.stack([np.abs(flat[s:s + oc_block]).mean(axis=0) for s in starts])  # (blocks, inputs)
    k = int(round(ratio * scores.size))
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:k]] = False
    keep = keep.reshape(scores.shape)
    mask = np.concatenate([np.repeat(keep[i:i + 1], min(oc_block, out_ch - s), axis=0)
                           for i, s in enumerate(starts)])
    return (flat * mask).reshape(w.shape).astype(w.dtype)


def pruned(model: onnx.ModelProto, names: list[str], fn, ratio: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init), ratio), init.name))
    return out


def sparsity(model: onnx.ModelProto, names: list[str]) -> float:
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names]
    return 1 - sum(np.count_nonzero(w) for w in weights) / sum(w.size for w in weights)


def timed(sessions: dict, feed: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timing: each round runs every session once; the order rotates every round so
    that no session always runs right after the same neighbour (cache, clock effects)."""
    for _ in range(warmup):
        for session in sessions.values():
            session.run(feed)
    keys = list(sessions)
    times = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            sessions[key].run(feed)
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=ASSETS / "models" / "pp_humanseg_lite_192")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trained", type=Path, help="a trained block-sparse ONNX from slimseg compress")
    args = parser.parse_args()

    from slimseg.hardware.bench import machine_info, random_inputs
    from slimseg.hardware.mnn import MnnRuntime, export_mnn, sparse_layers
    from slimseg.hardware.runtime import get_runtime
    from slimseg.model.importers import load_model
    from slimseg.model.passes import fold_batchnorm

    loaded = load_model(model_dir=args.model_dir)
    dense = fold_batchnorm.run(loaded.onnx).model
    names = conv1x1_weights(dense)
    variants = {  # key -> (model, export options)
        "dense": (dense, {"sparse": False}),
        "sparse 1x1": (pruned(dense, names, prune_unstructured, args.ratio), {"block": (1, 1)}),
        "sparse 1x4": (pruned(dense, names, prune_blocks, args.ratio), {"block": (1, 4)}),
    }
    if args.trained is not None:
        from slimseg.model.optimize import optimize

        trained = onnx.load(args.trained)
        variants["dense, rewritten"] = (optimize(dense)[0], {"sparse": False})
        variants["trained 1x4, rewritten"] = (trained, {"block": (1, 4)})
    shape = tuple(d if d else 1 for d in (loaded.input_shape or (1, 3, 192, 192)))
    feed = random_inputs(dense, shape, seed=0)
    sessions, info = {"onnxruntime dense": get_runtime("onnxruntime", dense, threads=args.threads)}, {}
    with tempfile.TemporaryDirectory(prefix="slimseg_mnn_bench_") as tmp:
        for key, (model, options) in variants.items():
            path = export_mnn(model, Path(tmp) / f"{key.replace(' ', '_')}.mnn", **options)
            sessions[f"mnn {key}"] = MnnRuntime(path, threads=args.threads)
            reference = get_runtime("onnxruntime", model, threads=args.threads).run(feed)[0]
            diff = float(np.abs(sessions[f"mnn {key}"].run(feed)[0] - reference).max())
            info[f"mnn {key}"] = {"1x1 sparsity": sparsity(model, conv1x1_weights(model)),
                                  "sparse convs": len(sparse_layers(path)),
                                  "max |mnn - ort|": diff, "file KiB": path.stat().st_size / 1024}
        times = timed(sessions, feed, args.rounds, args.warmup)

    print(f"machine: {json.dumps(machine_info())}")
    print(f"model: {args.model_dir.name}, input {shape}, {len(names)} 1x1 convs pruned to {args.ratio:.0%}, "
          f"threads {args.threads}, {args.rounds} interleaved rounds after {args.warmup} warm-up\n")
    base = float(np.median(times["mnn dense"]))
    print("| session | 1x1 sparsity | convs run sparse | file KiB | max abs diff vs ORT | median ms | min ms "
          "| p90 ms | speedup vs MNN dense (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, t in times.items():
        row = info.get(key)
        cells = (f"{row['1x1 sparsity']:.1%} | {row['sparse convs']} | {row['file KiB']:.0f} | "
                 f"{row['max |mnn - ort|']:.2g}") if row else "0.0% | - | - | -"
        median = float(np.median(t))
        print(f"| {key} | {cells} | {median:.2f} | {min(t):.2f} | {float(np.percentile(t, 90)):.2f} | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()
