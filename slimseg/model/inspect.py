"""What `compress` would do to a model, shown before it does it (``slimseg inspect``).

Each section runs the very function the compression stage runs, on the same graph it sees:

* quantization: :func:`plan_quantization` on the BN-folded graph with QuantPost's default op
  types plus the glue ops (as ``compress.api._quantize``): which layers get int8 weights, how
  many activation scales, which nodes stay float and why;
* pruning: :func:`eligible_weights` (UnstructurePrune / ASPPrune 2:4) and the channel groups of
  :func:`channel.analyze` (ChannelPrune removes channels of a group together);
* distillation: the default node (:func:`find_distill_nodes`) plus the last few conv outputs,
  with their static shapes: names to put in ``Distillation.node``.

A section that cannot be computed holds ``{"error": message}`` instead: inspect is the tool for
odd models, so one failing analysis must not hide the others.
"""
from __future__ import annotations

from typing import Any, Callable

import onnx

from slimseg.errors import SlimsegError

DISTILL_CANDIDATES = 4   # conv outputs listed besides the default distillation node
SHOWN = 12               # rows per table in the text form (JSON lists everything)


def inspect_model(loaded, *, candidates: int = DISTILL_CANDIDATES) -> dict[str, Any]:
    """The summary of ``report.text.inspect_model`` plus what compression would touch."""
    from slimseg.model.passes import fold_batchnorm
    from slimseg.report.text import inspect_model as summary

    data = summary(loaded)
    data["trainable"] = _guard(lambda: _trainable(loaded.onnx))
    folded = _guard(lambda: fold_batchnorm.run(loaded.onnx).model)
    data["quantization"] = folded if isinstance(folded, dict) else _guard(lambda: quantization(folded))
    data["pruning"] = _guard(lambda: pruning(loaded.onnx))
    data["distillation"] = _guard(lambda: distillation(loaded.onnx, loaded.input_shape, candidates))
    return data


def _guard(section: Callable[[], Any]) -> Any:
    try:
        return section()
    except SlimsegError as err:
        return {"error": str(err)}


def _trainable(model: onnx.ModelProto) -> dict[str, Any]:
    from slimseg.model.torch_graph import check_supported

    check_supported(model)
    return {"ok": True}


def quantization(folded: onnx.ModelProto) -> dict[str, Any]:
    """Q/DQ placement with QuantPost's defaults (what `compress` does with a bare QuantPost)."""
    from slimseg.compress.api import GLUE_OPS
    from slimseg.compress.quant.placement import plan_quantization
    from slimseg.config.quant import DEFAULT_PTQ_OPS, onnx_op_types

    op_types = onnx_op_types(DEFAULT_PTQ_OPS) | GLUE_OPS
    plan = plan_quantization(folded, op_types=op_types)
    return {
        "layers": [{"node": w.node, "weight": w.initializer, "axis": w.axis} for w in plan.weights],
        "activation_groups": len(plan.activations),
        "float_nodes": dict(plan.float_nodes),
    }


def pruning(model: onnx.ModelProto) -> dict[str, Any]:
    """Conv weights sparsity may zero, and groups of channels ChannelPrune removes together."""
    from slimseg.compress.prune.channel import analyze
    from slimseg.compress.prune.masks import eligible_weights

    two_four = {w.name for w in eligible_weights(model, nm=(2, 4))}
    weights = [{"weight": w.name, "node": w.node, "shape": list(w.shape), "conv1x1": w.is_1x1,
                "asp_2_4": w.name in two_four} for w in eligible_weights(model)]
    groups = [{"producers": g.producers, "params": g.params, "channels": len(g.units) + g.pinned,
               "removable": len(g.units), "kept_because": g.pin_reason if not g.units else None}
              for g in analyze(model).groups]
    return {"unstructured": weights, "channel_groups": groups}


def distillation(model: onnx.ModelProto, input_shape, count: int = DISTILL_CANDIDATES) -> dict[str, Any]:
    """The default distillation node(s) and the outputs of the last `count` convs, with shapes."""
    from slimseg.compress.distill import find_distill_nodes

    default = find_distill_nodes(model)
    convs = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") and n.output]
    names = list(dict.fromkeys([*default, *reversed(convs[-count:])])) if count > 0 else list(default)
    shapes = _shapes(model, input_shape, set(names))
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return {"default": default,
            "candidates": [{"tensor": t, "op": producer.get(t), "shape": list(shapes[t]) if t in shapes else None,
                            "default": t in default} for t in names]}


def _shapes(model: onnx.ModelProto, input_shape, needed: set[str]) -> dict[str, tuple[int, ...]]:
    from slimseg.model.stats import infer_static_shapes, with_static_inputs

    try:
        model = with_static_inputs(model, input_shape)
    except SlimsegError:  # dynamic H/W and no --input_shape: shapes stay partly unknown
        pass
    return infer_static_shapes(model, needed)


# --- text form ------------------------------------------------------------------------------

def format_compression(data: dict[str, Any], shown: int = SHOWN) -> str:
    """The quantization / pruning / distillation sections as short tables."""
    from slimseg.report.text import table

    parts = []
    trainable = data.get("trainable", {})
    if "error" in trainable:
        parts.append(f"compress cannot train this graph: {trainable['error']}")
    q = data.get("quantization", {})
    if "error" in q:
        parts.append(f"quantization: {q['error']}")
    else:
        parts.append(f"quantized with QuantPost defaults: {len(q['layers'])} layers with int8 weights, "
                     f"{q['activation_groups']} activation scales, {len(q['float_nodes'])} nodes stay float")
        parts.append(_rows(table, [(w["node"], w["weight"]) for w in q["layers"]], ("layer", "weight"), shown))
    p = data.get("pruning", {})
    if "error" in p:
        parts.append(f"pruning: {p['error']}")
    else:
        weights = p["unstructured"]
        parts.append(f"prunable conv weights (UnstructurePrune): {len(weights)}, of them 1x1: "
                     f"{sum(w['conv1x1'] for w in weights)}, 2:4-able (ASPPrune): {sum(w['asp_2_4'] for w in weights)}")
        groups = p["channel_groups"]
        rows = [(_names(g["producers"]), g["channels"], g["removable"], g["kept_because"] or "") for g in groups]
        parts.append(f"channel groups (ChannelPrune): {len(groups)}, "
                     f"{sum(g['removable'] > 0 for g in groups)} prunable")
        parts.append(_rows(table, rows, ("convs", "channels", "removable", "kept because"), shown))
    d = data.get("distillation", {})
    if "error" in d:
        parts.append(f"distillation: {d['error']}")
    else:
        rows = [(c["tensor"] + ("  (default)" if c["default"] else ""), c["op"] or "?",
                 "x".join(map(str, c["shape"])) if c["shape"] else "?") for c in d["candidates"]]
        parts.append("distillation nodes (Distillation.node):")
        parts.append(_rows(table, rows, ("tensor", "op", "shape"), shown))
    return "\n".join(p for p in parts if p)


def _names(names: list[str], shown: int = 3) -> str:
    more = f" +{len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _rows(table, rows: list, header: tuple, shown: int) -> str:
    if not rows:
        return ""
    text = table(rows[:shown], header=header)
    return text + (f"\n... {len(rows) - shown} more (--output json lists all)" if len(rows) > shown else "")
