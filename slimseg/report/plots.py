"""The report's pictures: matplotlib figures as inline SVG strings, and val-image overlays as
PNG `data:` URIs.

SVG keeps the HTML self-contained and sharp at any zoom. Text stays text: searchable, drawn in
a local sans-serif font (nothing to fetch), user strings never parsed as mathtext. The XML
prolog, DOCTYPE, RDF metadata and namespace declarations are stripped, so the page holds no
URL at all (an HTML parser needs none of them for inline `<svg>`). Ids are
hashed with a fixed salt and the date is left out: the same data gives the same SVG bytes.

matplotlib is imported lazily and only through `Figure` (never pyplot): no figure manager, no
GUI backend, nothing to close.
"""
from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_RC = {"svg.fonttype": "none", "svg.hashsalt": "slimseg", "font.size": 9, "axes.grid": True,
       "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
# (pattern, how many to remove; 0 = all): prolog + DOCTYPE, RDF metadata, namespace declarations
_STRIP = [(re.compile(r"^.*?(?=<svg)", re.S), 1), (re.compile(r"<metadata>.*?</metadata>\s*", re.S), 1),
          (re.compile(r'\s+xmlns(:\w+)?="[^"]*"'), 0)]


@dataclass(frozen=True)
class Point:
    """One model on the latency-vs-mIoU plane."""

    name: str
    latency_ms: float
    miou: float
    kind: str = "candidate"       # "baseline", "compressed" or "candidate"
    accepted: bool | None = None  # candidates only
    predicted: bool = False       # latency predicted by a profile, not measured


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both axes (lower latency AND higher mIoU), by latency.

    Sweep by increasing latency (ties: best mIoU first) keeping each point whose mIoU exceeds
    every faster point's: O(n log n)."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.latency_ms, -p.miou)):
        if not front or p.miou > front[-1].miou:
            front.append(p)
    return front


def _styled(fn):
    """Run `fn` under the report's rcParams (read when axes are made, and when saved)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


@_styled
def training_curves(history: Sequence[dict], title: str, *, reference: float | None = None) -> str:
    """Loss per iteration (log scale when positive) beside val mIoU at each evaluation, with
    the original model's mIoU (`reference`) as a dashed line: the level training must recover."""
    steps = [h for h in history if _finite(h.get("loss"))]
    evals = [h for h in history if _finite(h.get("metric"))]
    fig, (left, right) = _figure(ncols=2, size=(8.0, 2.6))
    fig.suptitle(title, fontsize=10, parse_math=False)
    left.plot([h["iteration"] for h in steps], [h["loss"] for h in steps], lw=1.2, color="#1f77b4")
    if steps and min(h["loss"] for h in steps) > 0:
        left.set_yscale("log")
    left.set(xlabel="iteration", ylabel="training loss")
    right.plot([h["iteration"] for h in evals], [h["metric"] for h in evals], "o-", color="#2ca02c", ms=4)
    if reference is not None and _finite(reference):
        right.axhline(reference, color="#555555", ls="--", lw=1, label="original")
        right.legend(fontsize=7, loc="lower right")
    right.set(xlabel="iteration", ylabel="val mIoU")
    if not evals:
        right.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=right.transAxes)
    return _svg(fig)


@_styled
def latency_vs_miou(points: Sequence[Point], *, xlabel: str = "latency, median ms (onnxruntime, 1 thread)") -> str:
    """Every model as a point; the Pareto front of them as a staircase. Candidates: filled
    when accepted, crosses when rejected, hollow when their latency was predicted."""
    fig, (ax,) = _figure(ncols=1, size=(6.4, 4.0))
    styles = {"baseline": dict(marker="s", color="#555555", s=60, zorder=4),
              "compressed": dict(marker="*", color="#d62728", s=160, zorder=5)}
    for p in points:
        style = styles.get(p.kind) or _candidate_style(p)
        ax.scatter([p.latency_ms], [p.miou], **style)
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p.latency_ms for p in front], [p.miou for p in front], where="post", color="#ff7f0e",
                lw=1.2, ls="--", label="Pareto front", zorder=3)
    labelled = points if len(points) <= 12 else [p for p in points if p.kind != "candidate"]
    for p in labelled:
        ax.annotate(p.name, (p.latency_ms, p.miou), xytext=(4, 4), textcoords="offset points", fontsize=7,
                    parse_math=False)
    ax.margins(x=0.2, y=0.15)  # room for the names next to the outermost points
    _legend(ax, points)
    ax.set(xlabel=xlabel, ylabel="val mIoU")
    return _svg(fig)


def _candidate_style(p: Point) -> dict:
    color = "#2ca02c" if p.accepted else "#7f7f7f"
    if not p.accepted:
        return dict(marker="x", color=color, s=36, zorder=2)
    if p.predicted:
        return dict(marker="o", facecolors="none", edgecolors=color, s=36, zorder=2)
    return dict(marker="o", color=color, s=36, zorder=2)


def _legend(ax, points: Sequence[Point]) -> None:
    """Proxy artists for the kinds present (scatter calls are one per point)."""
    from matplotlib.lines import Line2D

    entries = {"original": Line2D([], [], marker="s", color="#555555", ls=""),
               "compressed": Line2D([], [], marker="*", color="#d62728", ls="", ms=10),
               "accepted candidate": Line2D([], [], marker="o", color="#2ca02c", ls=""),
               "accepted (predicted latency)": Line2D([], [], marker="o", mfc="none", color="#2ca02c", ls=""),
               "rejected candidate": Line2D([], [], marker="x", color="#7f7f7f", ls="")}
    present = {_label(p) for p in points}
    handles = [(h, name) for name, h in entries.items() if name in present]
    handles += [(h, h.get_label()) for h in ax.get_lines() if h.get_label() == "Pareto front"]
    if handles:
        ax.legend([h for h, _ in handles], [n for _, n in handles], fontsize=7, loc="best")


def _label(p: Point) -> str:
    if p.kind != "candidate":
        return "original" if p.kind == "baseline" else p.kind
    if not p.accepted:
        return "rejected candidate"
    return "accepted (predicted latency)" if p.predicted else "accepted candidate"


def _figure(*, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    for pattern, count in _STRIP:
        text = pattern.sub("", text, count=count)
    return text.strip()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- raster panels (val image overlays) ---------------------------------------------------

OVERLAY_WEIGHT = 0.5             # share of the image in a class-colour overlay
DISAGREE_RGB = (255, 0, 255)     # magenta: absent from PaddleSeg's palette for the first classes


def colorize(labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Class ids -> PaddleSeg's palette colours (HWC uint8); `ignore_index` pixels black."""
    from slimseg.predict import color_map

    palette = np.asarray(color_map(256), np.uint8).reshape(256, 3)
    rgb = palette[np.clip(labels, 0, 255).astype(np.uint8)]
    if ignore_index is not None:
        rgb[labels == ignore_index] = 0
    return rgb


def overlay(image: np.ndarray, labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """``w * image + (1 - w) * colour`` with w = OVERLAY_WEIGHT, HWC uint8."""
    mixed = OVERLAY_WEIGHT * image.astype(np.float32) + (1 - OVERLAY_WEIGHT) * colorize(labels, ignore_index)
    return np.round(mixed).astype(np.uint8)


def difference(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image faded to light grey, `mask` pixels magenta: where two predictions differ."""
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)
    out = np.repeat(np.round(160 + grey * 0.35), 3, axis=2).astype(np.uint8)
    out[mask] = DISAGREE_RGB
    return out


def png_data_uri(rgb: np.ndarray, size: int) -> str:
    """A `data:` URI of `rgb` with its long side fitted to about `size` pixels: enlarged by a
    whole factor with nearest neighbour (label edges stay crisp), shrunk with a box filter."""
    import base64

    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    long_side = max(image.size)
    if long_side * 2 <= size:
        factor = size // long_side
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
    elif long_side > size:
        scale = size / long_side
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.BOX)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
