"""Plain-text tables for the terminal; JSON output uses the results' `to_dict()` instead."""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Align columns; numbers right, text left."""
    cells = [[_cell(v) for v in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(widths))]
    lines = []
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and not (header and k == 0) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_eval(result) -> str:
    m = result.metrics
    head = (f"{result.model} on {result.dataset}: {result.num_images} images in "
            f"{result.seconds:.1f} s ({runtime_label(result)})")
    summary = table([("mIoU", f"{m.miou:.4f}"), ("Acc", f"{m.acc:.4f}"), ("Kappa", f"{m.kappa:.4f}"),
                     ("mDice", f"{m.mdice:.4f}")], header=("metric", "value"))
    per_class = table([(i, f"{iou:.4f}", f"{p:.4f}", f"{r:.4f}")
                       for i, (iou, p, r) in enumerate(zip(m.class_iou, m.class_precision, m.class_recall))],
                      header=("class", "IoU", "precision", "recall"))
    return f"{head}\n\n{summary}\n\n{per_class}"


def runtime_label(result) -> str:
    """'openvino (f32 inference)': a result says which precision its runtime really ran in."""
    precision = getattr(result, "precision", None)
    return f"{result.runtime} ({precision} inference)" if precision else result.runtime


def format_bench(source: str, result) -> str:
    r = result
    rows = [
        ("runtime", f"{runtime_label(r)}, {r.threads} thread(s)"),
        ("input", "x".join(str(d) for d in r.input_shape)),
        ("latency median", f"{r.median_ms:.3f} ms"),
        ("latency p90", f"{r.p90_ms:.3f} ms"),
        ("latency min", f"{r.min_ms:.3f} ms"),
        ("runs", f"{r.runs} (after {r.warmup} warm-up)"),
        ("parameters", f"{r.params:,}"),
        ("MACs", human_count(r.macs)),
        ("size", human_bytes(r.size_bytes)),
    ]
    return f"{source}\n\n" + table(rows, header=("", "value"))


def inspect_model(loaded) -> dict[str, Any]:
    """A JSON-able summary of a canonical graph: I/O, op histogram, opset, size."""
    from slimseg.model.stats import model_stats

    graph = loaded.onnx.graph
    stats = model_stats(loaded.onnx, input_shape=loaded.input_shape)

    def shape(value_info):
        dims = value_info.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]

    opset = next((o.version for o in loaded.onnx.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "model": loaded.source,
        "opset": opset,
        "inputs": {v.name: shape(v) for v in graph.input},
        "outputs": {v.name: shape(v) for v in graph.output},
        "nodes": len(graph.node),
        "ops": dict(Counter(n.op_type for n in graph.node).most_common()),
        "params": stats.params,
        "macs": stats.macs,
        "size_bytes": stats.size_bytes,
        "preprocess": loaded.preprocess,
    }


def format_inspect(data: dict[str, Any]) -> str:
    io_rows = [("input", name, "x".join(map(str, s))) for name, s in data["inputs"].items()]
    io_rows += [("output", name, "x".join(map(str, s))) for name, s in data["outputs"].items()]
    lines = [
        f"{data['model']}  (opset {data['opset']}, {data['nodes']} nodes)",
        "",
        table(io_rows, header=("", "name", "shape")),
        "",
        f"parameters {data['params']:,}   MACs {human_count(data['macs'])}   size {human_bytes(data['size_bytes'])}",
        "ops: " + ", ".join(f"{op} {n}" for op, n in data["ops"].items()),
    ]
    if data.get("preprocess"):
        lines.append("preprocess: " + ", ".join(t.get("type", "?") for t in data["preprocess"]))
    return "\n".join(lines)


def format_demo(summary: dict[str, Any]) -> str:
    ev, bench = summary["eval"], summary["bench"]
    rows = [
        ("synthetic dataset", f"{summary['train_images']} train / {summary['val_images']} val images, "
                              f"{summary['num_classes']} classes, {summary['image_size']}"),
        ("teacher training", f"{summary['epochs']} epochs in {summary['train_seconds']:.1f} s"),
        ("val mIoU (onnxruntime)", f"{ev['miou']:.4f}"),
        ("val pixel accuracy", f"{ev['acc']:.4f}"),
        ("latency median, 1 thread", f"{bench['median_ms']:.3f} ms"),
        ("parameters", f"{bench['params']:,}"),
        ("MACs", human_count(bench["macs"])),
        ("model", summary["model"]),
        ("dataset config", summary["dataset_config"]),
    ]
    return "slimseg demo\n\n" + table(rows, header=("", "result")) + (
        f"\n\nTry: slimseg eval --model {summary['model']} --dataset_config {summary['dataset_config']}")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_number(text: Any) -> bool:
    try:
        float(str(text).replace(",", "").split()[0])
        return True
    except (ValueError, IndexError):
        return False


def format_compress(result) -> str:
    r = result.report
    base, comp = r["baseline"], r["compressed"]
    rows = [("val mIoU", f"{base['metrics']['miou']:.4f}", f"{comp['metrics']['miou']:.4f}")]
    for threads in ("1_thread", "2_thread"):
        rows.append((f"latency median, {threads.replace('_', ' ')}", f"{base['latency'][threads]['median_ms']:.2f} ms",
                     f"{comp['latency'][threads]['median_ms']:.2f} ms  ({r['speedup'][threads]:.2f}x)"))
    mnn = r.get("latency_mnn") or {}
    if "speedup" in mnn:
        rows.append(("latency median, MNN 1 thread", f"{mnn['original']['median_ms']:.2f} ms",
                     f"{mnn['compressed']['median_ms']:.2f} ms  ({mnn['speedup']:.2f}x)"))
    if "stats" in base:
        rows.append(("MACs", f"{base['stats']['macs'] / 1e6:.1f} M", f"{comp['stats']['macs'] / 1e6:.1f} M"))
        rows.append(("parameters", f"{base['stats']['params']:,}", f"{comp['stats']['params']:,}"))
        if comp["stats"]["weight_zeros"] > 0.01:
            rows.append(("conv weights that are 0", f"{base['stats']['weight_zeros']:.1%}",
                         f"{comp['stats']['weight_zeros']:.1%}"))
    sizes = r["size_bytes"]
    rows.append(("size", human_bytes(sizes["original"]), human_bytes(sizes["compressed"])
                 + (f"  (zipped {human_bytes(sizes['compressed_zipped'])})" if "compressed_zipped" in sizes else "")))
    agreement = "" if r.get("agreement") is None else \
        f"runtime agrees with the training model on {r['agreement']:.2%} of val pixels; "
    lines = [f"{r['model']} -> {result.model_path}  ({' + '.join(r.get('stages', [])) or 'compressed'}, "
             f"{comp.get('precision', 'INT8')})", "",
             table(rows, header=("", "original", "compressed")), "",
             f"{agreement}{r['wall_seconds']:.0f} s, peak memory {r['peak_rss_mb']:.0f} MB"]
    if comp.get("scored_as"):
        lines.append(f"compressed model scored as {comp['scored_as']}")
    return "\n".join(lines)