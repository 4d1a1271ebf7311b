"""`report.html`: what `compress` did, readable in any browser without a network.

One self-contained file: CSS inline, plots as inline SVG (:mod:`slimseg.report.plots`), images
as base64 PNG, no script and no URL. It is rendered from report.json's dict alone (so an old
report can be re-rendered), plus optionally the compressed ONNX model (per-layer precision and
measured zeros) and a few val images run through both models (:func:`sample_overlays`).

Sections are a registry of small renderers, in page order; each one says what is missing
instead of failing, so a PTQ-only run (no training), a run without candidates or a dataset
without labels still gives a valid page.
"""
from __future__ import annotations

import datetime
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from slimseg.report import plots

MISSING = "—"
DISPLAY_SIZE = 192  # long side of one overlay panel in pixels
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> index of its weight


# ---- overlay samples ------------------------------------------------------------------------

@dataclass
class OverlaySample:
    """One val image with both models' class maps, all at the label's (original) size."""

    name: str
    image: np.ndarray            # HWC uint8 RGB
    label: np.ndarray | None     # HW class ids (ignore_index allowed), None when unlabeled
    baseline: np.ndarray         # HW class ids of the original model
    compressed: np.ndarray       # HW class ids of the compressed model
    ignore_index: int = 255

    @property
    def disagreement(self) -> np.ndarray:
        return self.baseline != self.compressed


def sample_overlays(baseline_model, compressed_model, val_set, n: int = 4, *, limit: int = 32,
                    threads: int | None = None) -> list[OverlaySample]:
    """The `n` images (of the first `limit`) where the compressed model disagrees most with the
    original, both run in onnxruntime; ties go to more errors against the label, then to the
    earlier image, so the choice is deterministic. Class maps are made as :func:`evaluate`
    makes them (scores resized bilinearly to the label size, then argmax)."""
    from slimseg.hardware.runtime import OrtRuntime

    threads = threads or max(1, os.cpu_count() or 1)
    runtimes = [OrtRuntime(m, threads=threads) for m in (baseline_model, compressed_model)]
    spec = getattr(val_set, "spec", None)
    ignore = getattr(spec, "ignore_index", 255)
    ranked: list[tuple[tuple[int, int, int], OverlaySample]] = []
    for i in range(min(limit, len(val_set))):
        sample = val_set[i]
        hw = sample.label.shape[-2:] if sample.label is not None else _image_hw(sample.path)
        base, comp = (_class_map(rt, sample.image, hw, getattr(spec, "num_classes", None)) for rt in runtimes)
        wrong = 0 if sample.label is None else int(((comp != sample.label) & (sample.label != ignore)).sum())
        item = OverlaySample(Path(sample.path).name, np.empty(0, np.uint8), sample.label, base, comp, ignore)
        ranked.append(((-int(item.disagreement.sum()), -wrong, i), item))
        ranked = sorted(ranked, key=lambda r: r[0])[:n]
    for (_, _, index), item in ranked:
        item.image = _display_image(val_set[index].path, item.baseline.shape)
    return [item for _, item in ranked]


def _class_map(runtime, image: np.ndarray, hw, num_classes: int | None) -> np.ndarray:
    from slimseg.evaluate import scores_to_labels

    out = runtime.run(image[None].astype(np.float32))[0]
    classes = num_classes or (out.shape[1] if out.ndim == 4 else 0)
    return scores_to_labels(out, tuple(hw), num_classes=classes)[0]


def _image_hw(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _display_image(path, hw) -> np.ndarray:
    """The original image as HWC uint8 RGB at `hw` (the class maps' size)."""
    from PIL import Image

    from slimseg.data.datasets import load_image

    image = load_image(path)
    if image.shape[:2] != tuple(hw):
        image = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))
    return image


# ---- page -------------------------------------------------------------------------------------

@dataclass
class _Context:
    samples: Sequence[OverlaySample] = ()
    model: Any = None  # the compressed onnx.ModelProto, when given


@dataclass
class _Section:
    key: str
    title: str
    render: Callable[[dict, _Context], str]


SECTIONS: list[_Section] = []


def _section(key: str, title: str):
    def register(fn):
        SECTIONS.append(_Section(key, title, fn))
        return fn
    return register


def write_report_for_run(report: dict, path, *, baseline, model, val_set, say) -> bool:
    """report.html for a finished compress run, never its undoing: the model and report.json
    are already complete, so a failure here (an odd report, a plotting backend problem) is one
    warning line and no report.html, not a lost run. Returns whether it was written."""
    try:
        write_html_report(report, path, model=model, samples=sample_overlays(baseline, model, val_set))
        return True
    except Exception as err:  # noqa: BLE001 -- any failure of an optional view of the results
        say(f"warning: report.html not written ({type(err).__name__}: {' '.join(str(err).split())}); "
            "model.onnx and report.json are complete")
        return False


def write_html_report(report: dict, path, *, samples: Sequence[OverlaySample] | None = None,
                      model=None) -> Path:
    """Write :func:`render_html` to `path` atomically; `model` is the compressed ONNX model."""
    from slimseg.io import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(render_html(report, samples=samples, model=model), encoding="utf-8")
    return path


def render_html(report: dict, *, samples: Sequence[OverlaySample] | None = None, model=None) -> str:
    """The whole page as one string; `model`: the compressed model (ModelProto or path)."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)  # shapes and int8 weights suffice
    ctx = _Context(samples=list(samples or ()), model=model)
    nav = " · ".join(f'<a href="#{s.key}">{s.title}</a>' for s in SECTIONS)
    body = "\n".join(f'<section id="{s.key}"><h2>{s.title}</h2>\n{s.render(report, ctx)}\n</section>'
                     for s in SECTIONS)
    title = f"slimseg report: {Path(str(report.get('model', 'model'))).name}"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{_e(title)}</h1>{_header(report)}<nav>{nav}</nav></header>\n"
            f"<main>\n{body}\n</main>\n<footer>{_footer(report)}</footer>\n</body>\n</html>\n")


def _header(report: dict) -> str:
    items = [("model", report.get("model")), ("dataset", report.get("dataset")),
             ("stages", " + ".join(report.get("stages") or []) or None),
             ("precision", _get(report, "compressed", "precision"))]
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{_e(v)}</dd>" for k, v in items if v is not None) + "</dl>"


def _footer(report: dict) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"written by slimseg {_e(report.get('slimseg', ''))} on {when}"


# ---- summary ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    """One summary line: how to format the values and how to read the change."""

    label: str
    original: Any
    compressed: Any
    fmt: Callable[[Any], str] = field(default=lambda v: f"{v:.4f}")
    change: str = "diff"          # "diff" (absolute), "ratio" (x faster), "percent" or "" (none)
    higher_is_better: bool = True


@_section("summary", "Summary")
def _summary(report: dict, ctx: _Context) -> str:
    rows = _metric_rows(report) + _latency_rows(report) + _size_rows(report)
    table = _table(("", "original", "compressed", "change"), [_summary_cells(r) for r in rows])
    extra = [("precision", _get(report, "compressed", "precision")),
             ("runtime agrees with the training model", _pct(report.get("agreement"))),
             ("wall time", _seconds(report.get("wall_seconds"))),
             ("peak memory", _mb(report.get("peak_rss_mb")))]
    extra_table = _table(("", "value"), [(k, _e(v)) for k, v in extra if v not in (None, MISSING)])
    return table + extra_table + _per_class(report)


def _metric_rows(report: dict) -> list[_Row]:
    base, comp = _get(report, "baseline", "metrics") or {}, _get(report, "compressed", "metrics") or {}
    names = (("miou", "val mIoU"), ("acc", "pixel accuracy"), ("mdice", "mDice"), ("kappa", "Kappa"))
    return [_Row(label, base.get(key), comp.get(key)) for key, label in names if key in base or key in comp]


def _latency_rows(report: dict) -> list[_Row]:
    base, comp = _get(report, "baseline", "latency") or {}, _get(report, "compressed", "latency") or {}
    rows = []
    for key in sorted(set(base) | set(comp)):
        threads = key.split("_")[0]
        rows.append(_Row(f"latency median, {threads} thread{'s' if threads != '1' else ''}",
                         _get(base, key, "median_ms"), _get(comp, key, "median_ms"),
                         fmt=lambda v: f"{v:.3f} ms", change="ratio", higher_is_better=False))
    mnn = report.get("latency_mnn") or {}
    if "speedup" in mnn:  # a sparse model, in the runtime whose kernels use its zeros
        rows.append(_Row("latency median, MNN 1 thread", _get(mnn, "original", "median_ms"),
                         _get(mnn, "compressed", "median_ms"), fmt=lambda v: f"{v:.3f} ms", change="ratio",
                         higher_is_better=False))
    return rows


def _size_rows(report: dict) -> list[_Row]:
    from slimseg.report.text import human_bytes, human_count

    sizes = report.get("size_bytes") or {}
    base, comp = _get(report, "baseline", "stats") or {}, _get(report, "compressed", "stats") or {}
    rows = [_Row("size", sizes.get("original"), sizes.get("compressed"), fmt=human_bytes, change="percent",
                 higher_is_better=False)]
    if "compressed_zipped" in sizes:
        rows.append(_Row("size zipped", None, sizes["compressed_zipped"], fmt=human_bytes, change=""))
    rows += [_Row("parameters", base.get("params"), comp.get("params"), fmt=lambda v: f"{v:,}",
                  change="percent", higher_is_better=False),
             _Row("MACs", base.get("macs"), comp.get("macs"), fmt=human_count, change="percent",
                  higher_is_better=False),
             _Row("conv weights that are 0", base.get("weight_zeros"), comp.get("weight_zeros"),
                  fmt=lambda v: f"{v:.1%}", change="")]
    return [r for r in rows if r.original is not None or r.compressed is not None]


def _summary_cells(row: _Row) -> tuple[str, str, str, str]:
    show = [MISSING if v is None else _e(row.fmt(v)) for v in (row.original, row.compressed)]
    return (_e(row.label), *show, _change(row))


def _change(row: _Row) -> str:
    a, b = row.original, row.compressed
    if not row.change or not _num(a) or not _num(b):
        return ""
    if row.change == "diff":
        text, delta = f"{b - a:+.4f}", b - a
    elif row.change == "ratio":
        if not b:
            return ""
        text, delta = f"{a / b:.2f}x {'faster' if a >= b else 'slower'}", b - a
    else:
        if not a:
            return ""
        text, delta = f"{(b - a) / a:+.1%}", b - a
    better = delta > 0 if row.higher_is_better else delta < 0
    cls = "same" if delta == 0 else ("better" if better else "worse")
    return f'<span class="{cls}">{_e(text)}</span>'


def _per_class(report: dict) -> str:
    base = _get(report, "baseline", "metrics", "class_iou") or []
    comp = _get(report, "compressed", "metrics", "class_iou") or []
    if not base and not comp:
        return "<p class='note'>No per-class IoU: the dataset has no labels.</p>"
    names = report.get("class_names") or []
    rows = []
    for c in range(max(len(base), len(comp))):
        row = _Row(names[c] if c < len(names) else f"class {c}", _at(base, c), _at(comp, c))
        rows.append(_summary_cells(row))
    return "<h3>Per-class IoU</h3>" + _table(("class", "original", "compressed", "change"), rows)


# ---- latency vs mIoU ------------------------------------------------------------------------

@_section("tradeoff", "Latency vs mIoU")
def _tradeoff(report: dict, ctx: _Context) -> str:
    points, xlabel = _model_points(report)
    candidates = report.get("candidates") or []
    points += [plots.Point(str(c.get("name")), c["latency_ms"], c["miou"], accepted=bool(c.get("accepted")),
                           predicted=bool(c.get("predicted")))
               for c in candidates if _num(c.get("latency_ms")) and _num(c.get("miou"))]
    if not points:
        return "<p class='note'>No model has both a latency and an mIoU to plot.</p>"
    text = f'<figure class="plot">{plots.latency_vs_miou(points, xlabel=xlabel)}</figure>'
    if not candidates:
        return text + "<p class='note'>No strategy search ran: only the original and the compressed model.</p>"
    estimates = any(_num(c.get("estimated_ms")) for c in candidates)
    rows = [(_e(c.get("name")), _fmt(c.get("latency_ms"), "{:.3f} ms"))
            + ((_fmt(c.get("estimated_ms"), "{:.3f} ms"),) if estimates else ())
            + (_fmt(c.get("miou"), "{:.4f}"), "yes" if c.get("accepted") else "no",
               "predicted" if c.get("predicted") else "measured", _e(c.get("reason") or ""))
            for c in candidates]
    header = ("candidate", "latency") + (("estimate before training",) if estimates else ()) \
        + ("mIoU (short run)", "accepted", "latency is", "reason")
    return text + "<h3>Candidates</h3>" + _table(header, rows)


def _model_points(report: dict) -> tuple[list[plots.Point], str]:
    """The original and the compressed model, and the x axis they share: the search target's
    latency when a search ran (its candidates were timed there), else onnxruntime at 1 thread."""
    auto, candidates = report.get("auto") or {}, report.get("candidates") or []
    final_miou = _get(report, "compressed", "metrics", "miou")
    if isinstance(auto.get("baseline"), dict) and candidates:
        base = auto["baseline"]
        chosen = next((c for c in candidates if c.get("name") == auto.get("chosen")), {})
        found = [("original", "baseline", base.get("latency_ms"), base.get("miou"), base.get("predicted")),
                 ("compressed", "compressed", chosen.get("latency_ms"), final_miou, chosen.get("predicted"))]
        xlabel = f"latency on {auto.get('target', 'the target')}, ms"
    else:
        found = [("original", "baseline", _get(report, "baseline", "latency", "1_thread", "median_ms"),
                  _get(report, "baseline", "metrics", "miou"), False),
                 ("compressed", "compressed", _get(report, "compressed", "latency", "1_thread", "median_ms"),
                  final_miou, False)]
        xlabel = "latency, median ms (onnxruntime, 1 thread)"
    points = [plots.Point(name, ms, miou, kind=kind, predicted=bool(predicted))
              for name, kind, ms, miou, predicted in found if _num(ms) and _num(miou)]
    return points, xlabel


# ---- training curves ---------------------------------------------------------------------

@_section("training", "Training")
def _training(report: dict, ctx: _Context) -> str:
    found = list(_histories(report))
    if not found:
        return "<p class='note'>No training stage ran (post-training quantization or pruning only).</p>"
    parts, reference = [], _get(report, "baseline", "metrics", "miou")
    for where, stage in found:
        best = stage.get("best_metric")
        note = (f"{len(stage['history'])} iterations in {_seconds(stage.get('seconds'))}"
                + (f"; best val mIoU {best:.4f} at iteration {stage.get('best_iteration')}" if _num(best) else ""))
        parts.append(f"<h3>{_e(where)}</h3><p>{_e(note)}</p>"
                     f'<figure class="plot">{plots.training_curves(stage["history"], where, reference=reference)}</figure>')
    return "\n".join(parts)


def _histories(node: Any, where: str = "", depth: int = 0):
    """(dotted place, stage dict) of every dict with a non-empty `history` list, in report order."""
    if not isinstance(node, dict) or depth > 3:
        return
    if isinstance(node.get("history"), list) and node["history"]:
        yield where, node
    for key, value in node.items():
        if key not in ("baseline", "compressed", "strategy", "candidates", "history"):
            yield from _histories(value, f"{where} › {key}" if where else key, depth + 1)


# ---- layers -----------------------------------------------------------------------------------

@_section("layers", "Layers")
def _layers(report: dict, ctx: _Context) -> str:
    parts = []
    rows = layer_rows(report, ctx.model)
    if rows:
        parts.append(_table(("layer", "op", "weight shape", "precision", "weights that are 0", "target sparsity"),
                            [(_e(r.node), _e(r.op), _e("x".join(map(str, r.shape)) or MISSING), _e(r.precision),
                              _fmt(r.zeros, "{:.1%}"), _fmt(r.target, "{:.1%}")) for r in rows], scroll=True))
    floats = _get(report, "quantization", "float_nodes") or {}
    if floats:
        parts.append("<h3>Nodes kept in float</h3>"
                     + _table(("node", "why"), [(_e(k), _e(v)) for k, v in floats.items()], scroll=True))
    groups = _get(report, "channel_prune", "groups") or []
    if groups:
        parts.append("<h3>Channel pruning</h3>" + _table(
            ("producers", "channels before", "channels after", "note"),
            [(_e(", ".join(g.get("producers") or [])), _e(g.get("channels_before")), _e(g.get("channels_after")),
              _e(g.get("pinned_reason") or "")) for g in groups], scroll=True))
    return "\n".join(parts) or "<p class='note'>No per-layer information in this report.</p>"


@dataclass(frozen=True)
class LayerRow:
    node: str
    op: str
    shape: tuple[int, ...]
    precision: str          # "INT8", "INT8 weights" (float input), "float" or MISSING; "(-64..64)" added
                            # for the weights the report says were quantized with reduce_range
    zeros: float | None     # measured share of exact zeros in the weight
    target: float | None    # the sparsity stage's sparsity for this layer


def layer_rows(report: dict, model=None) -> list[LayerRow]:
    """One row per weighted layer: from the compressed ONNX `model` when given (precision read
    off its Q/DQ nodes, zeros counted), else from the report's sparsity layers."""
    targets = {}
    for layer in _get(report, "sparsity", "layers") or []:
        for key in (layer.get("node"), layer.get("name")):
            if key:
                targets[key] = layer.get("sparsity")
    if model is None:
        floats = _get(report, "quantization", "float_nodes") or {}
        return [LayerRow(layer.get("node") or layer.get("name", "?"), MISSING, tuple(layer.get("shape") or ()),
                         "float" if layer.get("node") in floats else MISSING, None, layer.get("sparsity"))
                for layer in _get(report, "sparsity", "layers") or []]
    reduced = set(_get(report, "quantization", "reduce_range", "weights") or [])
    return _model_layer_rows(model, targets, reduced)


def _model_layer_rows(model, targets: dict, reduced: set[str]) -> list[LayerRow]:
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    rows = []
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        weight = node.input[index]
        source = dq[weight].input[0] if weight in dq else weight
        if source not in inits:
            continue  # a weight computed at run time
        values = numpy_helper.to_array(inits[source])
        quantized_input = node.input[1 - index] in dq
        precision = ("INT8" if quantized_input else "INT8 weights") if weight in dq else "float"
        if weight in dq and source.removesuffix("_quantized") in reduced:
            precision += " (-64..64)"
        target = targets.get(node.name, targets.get(source.removesuffix("_quantized")))
        rows.append(LayerRow(node.name or weight, node.op_type, tuple(values.shape), precision,
                             float((values == 0).mean()) if values.size else None, target))
    return rows


# ---- sample overlays ----------------------------------------------------------------------

@_section("samples", "Val images")
def _samples(report: dict, ctx: _Context) -> str:
    if not ctx.samples:
        return "<p class='note'>No val images were rendered.</p>"
    legend = ("<p>Each row: the image, the ground truth, the original and the compressed model's "
              "prediction, and <span class='disagree'>pixels where the compressed model disagrees with "
              "the original</span>.</p>")
    return legend + "\n".join(_sample_row(s) for s in ctx.samples)


def _sample_row(s: OverlaySample) -> str:
    from slimseg.report.plots import difference, overlay, png_data_uri

    differ = s.disagreement
    panels = [("image", s.image),
              ("ground truth", None if s.label is None else overlay(s.image, s.label, s.ignore_index)),
              ("original", overlay(s.image, s.baseline)), ("compressed", overlay(s.image, s.compressed)),
              (f"disagreement: {int(differ.sum())} px ({differ.mean():.2%})", difference(s.image, differ))]
    cells = []
    for caption, rgb in panels:
        content = ('<div class="empty">no label</div>' if rgb is None
                   else f'<img alt="{_e(caption)}" src="{png_data_uri(rgb, DISPLAY_SIZE)}">')
        cells.append(f"<figure>{content}<figcaption>{_e(caption)}</figcaption></figure>")
    return f'<div class="sample"><h3>{_e(s.name)}</h3><div class="panels">{"".join(cells)}</div></div>'


# ---- small helpers ----------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, scroll: bool = False) -> str:
    """Cells are HTML already (escaped by the caller)."""
    if not rows:
        return ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if _numeric(c) else f"<td>{c}</td>" for c in row)
                   + "</tr>" for row in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


def _numeric(cell: str) -> bool:
    """A cell that reads as a number (right-aligned): '0.7738', '-35.1%', '3,299', '2.1 ms', '—'."""
    text = re.sub(r"<[^>]+>", "", cell).strip()
    return text == MISSING or re.match(r"[+-]?\d", text) is not None


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _at(values: Sequence, i: int):
    return values[i] if i < len(values) else None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _fmt(v: Any, pattern: str) -> str:
    return _e(pattern.format(v)) if _num(v) else MISSING


def _pct(v: Any) -> str | None:
    return f"{v:.2%}" if _num(v) else None


def _seconds(v: Any) -> str | None:
    return f"{v:.1f} s" if _num(v) else None


def _mb(v: Any) -> str | None:
    return f"{v:.0f} MB" if _num(v) else None


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#fafafa}
header,main,footer{max-width:1100px;margin:0 auto;padding:0 16px}
header{padding-top:12px}h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:4px 0 8px}
dt{color:#666}dd{margin:0;word-break:break-all}nav a{color:#0b62a4;text-decoration:none}
section{background:#fff;border:1px solid #e4e4e4;border-radius:6px;padding:4px 16px 12px;margin:16px 0}
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3;font-weight:600}
.scroll{max-height:420px;overflow:auto}.note{color:#666;font-style:italic}
.better{color:#18803c}.worse{color:#c62828}.same{color:#666}
.plot svg{max-width:100%;height:auto}figure{margin:0}
.panels{display:flex;flex-wrap:wrap;gap:8px}.panels figure{text-align:center;font-size:12px;color:#555}
.panels img{display:block;max-width:192px;height:auto;border:1px solid #ddd}
.empty{width:160px;height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.disagree{background:#ff00ff;color:#fff;padding:0 3px}footer{color:#888;font-size:12px;padding-bottom:24px}
"""
