"""report.html: sections, self-containedness, overlays, the compress() wiring, and a real browser."""
from __future__ import annotations

import html
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from slimseg.data import build_dataset
from slimseg.report import plots
from slimseg.report.html import SECTIONS, OverlaySample, layer_rows, render_html, sample_overlays, \
    write_html_report

from helpers import channel_vote_model, trained_tiny_project, write_vote_dataset

CHROMIUM = Path("/usr/bin/chromium")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ---- inputs the tests make ------------------------------------------------------------------

def _metrics(rng, classes: int, labels: bool = True) -> dict:
    iou = rng.uniform(0.3, 0.95, classes).tolist()
    out = {"miou": float(np.mean(iou)), "acc": float(rng.uniform(0.8, 1)), "mdice": float(rng.uniform(0.5, 1)),
           "kappa": float(rng.uniform(0.5, 1))}
    return {**out, "class_iou": iou} if labels else out


def _history(rng, iters: int, eval_every: int) -> list[dict]:
    out = [{"iteration": i, "loss": float(rng.uniform(0.01, 1)), "lr": 1e-3, "seconds": 0.1}
           for i in range(1, iters + 1)]
    for h in out[eval_every - 1::eval_every]:
        h["metric"] = float(rng.uniform(0.5, 0.8))
    return out


def _report(*, classes: int = 3, history: bool = True, candidates: bool = True, labels: bool = True) -> dict:
    rng = np.random.default_rng(7)
    latency = {f"{t}_thread": {"median_ms": float(rng.uniform(1, 5)), "p90_ms": 6.0, "min_ms": 0.9} for t in (1, 2)}
    report = {
        "slimseg": "0.1.0", "model": "/models/<tiny>&net.onnx", "dataset": "/data/ds.yaml",
        "stages": ["sparsity", "quantization"],
        "baseline": {"metrics": _metrics(rng, classes, labels), "latency": latency,
                     "stats": {"params": 3299, "macs": 261120, "weight_zeros": 0.0}},
        "compressed": {"metrics": _metrics(rng, classes, labels), "latency": latency, "precision": "INT8",
                       "stats": {"params": 2915, "macs": 261120, "weight_zeros": 0.3}},
        "size_bytes": {"original": 24661, "compressed": 16000, "compressed_zipped": 7000},
        "agreement": 0.999, "wall_seconds": 12.5, "peak_rss_mb": 420.0,
        "sparsity": {"layers": [{"name": "w1", "node": "conv1", "shape": [2, 1, 1, 1], "sparsity": 0.5}]},
        "quantization": {"weights": 1, "float_nodes": {"conv2": "excluded by not_quant_pattern"}},
    }
    if history:
        report["sparsity"]["history"] = _history(rng, 6, 3)
        report["quantization"]["qat"] = {"history": _history(rng, 4, 2), "best_metric": 0.7, "best_iteration": 2}
    if candidates:
        report["candidates"] = [{"name": f"cand<{i}>", "latency_ms": float(rng.uniform(1, 5)),
                                 "miou": float(rng.uniform(0.5, 0.8)) if i != 3 else None,
                                 "accepted": bool(i % 2), "reason": f"reason {i}", "predicted": i == 1}
                                for i in range(5)]
    return report


def _samples(count: int, *, labels: bool = True, size: int = 12) -> list[OverlaySample]:
    rng = np.random.default_rng(3)
    return [OverlaySample(f"img{i}.png", rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8),
                          rng.integers(0, 3, (size, size + 4)) if labels else None,
                          rng.integers(0, 3, (size, size + 4)), rng.integers(0, 3, (size, size + 4)))
            for i in range(count)]


def _quantized_model() -> onnx.ModelProto:
    """conv1: int8 weight and input through DequantizeLinear; conv2: float weight, half zeros."""
    w1 = numpy_helper.from_array(np.array([3, 0], np.int8).reshape(2, 1, 1, 1), "w1_quantized")
    w2 = numpy_helper.from_array(np.array([1.0, 0.0, 0.0, 2.0], np.float32).reshape(2, 2, 1, 1), "w2")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["w1_quantized", "s", "z"], ["w1"], name="dqw"),
             helper.make_node("Conv", ["xd", "w1"], ["h"], name="conv1"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                              initializer=[w1, w2, scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class _Structure(HTMLParser):
    """Fails on a closing tag that does not match the open element (SVG's <x/> are fine)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.ids += [v for k, v in attrs if k == "id" and tag == "section"]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _parse(text: str) -> _Structure:
    parser = _Structure()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed elements {parser.stack}"
    return parser


# ---- the page ----------------------------------------------------------------------------------

def test_full_report_has_every_section_and_no_url():
    report, samples = _report(), _samples(3)
    text = render_html(report, samples=samples, model=_quantized_model())
    page = _parse(text)
    assert page.ids == [s.key for s in SECTIONS] == ["summary", "tradeoff", "training", "layers", "samples"]
    assert not re.search(r"https?://", text), "the page must not reference the network"
    assert "<script" not in text and not re.search(r"url\((?!#)", text)  # only in-page url(#clip) refs
    # the user's strings are escaped, never markup
    assert "&lt;tiny&gt;&amp;net.onnx" in text and "cand&lt;0&gt;" in text
    # one plot per training history plus the trade-off plot, all inline
    assert page.tags.get("svg") == 1 + 2
    assert "quantization › qat" in text and "sparsity" in text
    # per-class IoU: one row per class with the change between the two models
    base, comp = report["baseline"]["metrics"]["class_iou"], report["compressed"]["metrics"]["class_iou"]
    plain = re.sub(r"<td [^>]*>", "<td>", text)  # without the cells' alignment classes
    for c, (a, b) in enumerate(zip(base, comp)):
        cells = "".join(f"<td>{v}</td>" for v in (f"class {c}", f"{a:.4f}", f"{b:.4f}"))
        assert re.search(re.escape(cells) + r'<td><span class="\w+">' + re.escape(f"{b - a:+.4f}"), plain)
    # every candidate is listed, also the one without an mIoU
    assert all(f"reason {i}" in text for i in range(5))
    # five panels per sample, all images inline PNG
    assert page.tags["img"] == 5 * len(samples)
    assert len(re.findall(r'src="data:image/png;base64,', text)) == page.tags["img"]


def test_minimal_report_is_still_a_valid_page(tmp_path):
    report = _report(history=False, candidates=False, labels=False)
    del report["sparsity"], report["quantization"]
    path = write_html_report(report, tmp_path / "report.html", samples=_samples(2, labels=False))
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    assert page.ids == [s.key for s in SECTIONS]
    assert "No training stage ran" in text and "No strategy search ran" in text
    assert "no per-class iou" in text.lower() and text.count(">no label<") == 2
    assert page.tags["img"] == 4 * 2
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left


def test_empty_report_renders():
    text = render_html({})
    assert _parse(text).ids == [s.key for s in SECTIONS]
    assert "No model has both a latency and an mIoU" in text and "No val images" in text


def test_search_results_share_the_targets_latency_axis():
    """With a search, the original and compressed points use the target's latencies (where the
    candidates were timed), the compressed one at the chosen candidate's latency."""
    report = _report(history=False)
    chosen = report["candidates"][1]
    report["auto"] = {"target": "arm-phone", "chosen": chosen["name"],
                      "baseline": {"miou": 0.71, "latency_ms": 9.5, "predicted": True}}
    text = render_html(report)
    assert ">latency on arm-phone, ms</text>" in text  # the plot's text stays searchable text
    assert all(f">{html.escape(c['name'])}</text>" in text for c in report["candidates"] if c["miou"] is not None)
    from slimseg.report.html import _model_points

    points, _ = _model_points(report)
    assert [(p.kind, p.latency_ms, p.miou, p.predicted) for p in points] == [
        ("baseline", 9.5, 0.71, True),
        ("compressed", chosen["latency_ms"], report["compressed"]["metrics"]["miou"], chosen["predicted"])]


def test_summary_marks_changes_as_better_or_worse():
    report = _report(candidates=False, history=False)
    report["compressed"]["latency"] = {k: {"median_ms": v["median_ms"] / 2}
                                       for k, v in report["baseline"]["latency"].items()}
    report["compressed"]["metrics"]["miou"] = report["baseline"]["metrics"]["miou"] - 0.01
    text = render_html(report)
    assert re.search(r'latency median, 1 thread</td>.*?<span class="better">2\.00x faster', text)
    assert re.search(r'val mIoU</td>.*?<span class="worse">-0\.0100', text)
    assert re.search(r'size</td>.*?<span class="better">-35\.1%', text)  # 24661 -> 16000 bytes


# ---- parts -----------------------------------------------------------------------------------

def test_pareto_front_is_exactly_the_undominated_points():
    rng = np.random.default_rng(0)
    points = [plots.Point(str(i), float(lat), float(miou))
              for i, (lat, miou) in enumerate(zip(rng.integers(1, 20, 60), rng.integers(0, 15, 60) / 20))]
    front = plots.pareto_front(points)

    def dominates(a, b):
        return a.latency_ms <= b.latency_ms and a.miou >= b.miou and (a.latency_ms, a.miou) != (b.latency_ms, b.miou)

    assert all(not any(dominates(q, p) for q in points) for p in front)
    assert all(any(dominates(q, p) for q in front) or (p.latency_ms, p.miou) in {(f.latency_ms, f.miou)
                                                                                for f in front} for p in points)
    assert [p.latency_ms for p in front] == sorted(p.latency_ms for p in front)
    assert plots.latency_vs_miou(points[:5]) == plots.latency_vs_miou(points[:5])  # deterministic SVG


def test_layer_rows_read_precision_and_zeros_off_the_model(tmp_path):
    report = _report()
    rows = {r.node: r for r in layer_rows(report, _quantized_model())}
    assert set(rows) == {"conv1", "conv2"}
    assert rows["conv1"].precision == "INT8" and rows["conv2"].precision == "float"
    assert rows["conv1"].zeros == pytest.approx(0.5) and rows["conv2"].zeros == pytest.approx(0.5)
    assert rows["conv1"].shape == (2, 1, 1, 1) and rows["conv1"].target == 0.5 and rows["conv2"].target is None
    # without the model: the report's sparsity layers
    assert [(r.node, r.target) for r in layer_rows(report)] == [("conv1", 0.5)]
    # the model may be given as a file
    onnx.save(_quantized_model(), tmp_path / "m.onnx")
    text = render_html(_report(history=False, candidates=False), model=tmp_path / "m.onnx")
    assert re.search(r"<td>conv1</td><td>Conv</td>.*?<td>INT8</td>", text)


def test_overlay_panels_keep_the_classes_and_mark_disagreement():
    image = np.full((4, 6, 3), 100, np.uint8)
    labels = np.arange(24).reshape(4, 6) % 3
    mixed = plots.overlay(image, labels)
    colours = plots.colorize(labels)
    assert np.array_equal(mixed, np.round(0.5 * image + 0.5 * colours).astype(np.uint8))
    mask = labels == 1
    diff = plots.difference(image, mask)
    assert (diff[mask] == plots.DISAGREE_RGB).all() and not (diff[~mask] == plots.DISAGREE_RGB).all(axis=1).any()
    uri = plots.png_data_uri(mixed, 24)  # enlarged 4x with nearest neighbour
    import base64
    import io

    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert decoded.shape == (16, 24, 3) and np.array_equal(decoded[::4, ::4], mixed)


def _blue_vote_model() -> onnx.ModelProto:
    """Class 1 where blue > red: disagrees with `channel_vote_model` where (G > R) != (B > R)."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[N, 3, 16, 16] x) => (float[N, 2, 16, 16] prob) {
        idx = Constant <value = int64[2] {0, 2}> ()
        rb = Gather <axis = 1> (x, idx)
        prob = Softmax <axis = 1> (rb)
    }
    """
    return onnx.parser.parse_model(text)


def test_sample_overlays_pick_the_most_disagreeing_images(tmp_path):
    data = write_vote_dataset(tmp_path / "data", count=6, seed=5)
    val = build_dataset(data, "val")
    samples = sample_overlays(channel_vote_model(), _blue_vote_model(), val, n=3, threads=1)
    # the expected choice, computed from the PNGs themselves
    counts = []
    for i, item in enumerate(val.items):
        rgb = np.asarray(Image.open(item.image).convert("RGB")).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        counts.append((-int(((g > r) != (b > r)).sum()), i))
    expected = [Path(val.items[i].image).name for _, i in sorted(counts)[:3]]
    assert [s.name for s in samples] == expected
    for s in samples:
        rgb = np.asarray(Image.open(Path(data).parent / "img" / s.name).convert("RGB"))
        assert np.array_equal(s.image, rgb)
        assert np.array_equal(s.baseline, (rgb[..., 1] > rgb[..., 0]).astype(int))  # model is exact
        assert np.array_equal(s.label, s.baseline)
        assert -s.disagreement.sum() == dict((Path(val.items[i].image).name, c) for c, i in counts)[s.name]
    # deterministic
    again = sample_overlays(channel_vote_model(), _blue_vote_model(), val, n=3, threads=1)
    assert [s.name for s in again] == [s.name for s in samples]


# ---- compress() writes it, and a browser shows it -----------------------------------------

@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A real compress (sparsity trained by distillation, the quickest stage with a training
    history) of a tiny model: report.html next to report.json."""
    from slimseg.compress.api import compress
    from slimseg.demo import TinySegNet, make_synthetic_dataset
    from slimseg.io import save_onnx
    from slimseg.model.importers import load_model

    root = tmp_path_factory.mktemp("html")
    data = make_synthetic_dataset(root / "data", train=8, val=4, size=32, seed=3)
    torch.manual_seed(0)
    model = root / "model.onnx"
    save_onnx(load_model(TinySegNet(width=4).eval(), input_shape=(1, 3, 32, 32)).onnx, model)
    strategy = {"UnstructurePrune": {"prune_strategy": "gmp", "prune_mode": "ratio", "ratio": 0.5},
                "TrainConfig": {"train_iter": 2, "eval_iter": 2, "learning_rate": 1e-4, "batch_size": 4,
                                "optimizer_builder": {"optimizer": {"type": "SGD"}}}}
    return compress(model, strategy, data=data, save_dir=root / "out", progress=False, bench_rounds=3)


def test_compress_writes_report_html(compressed):
    text = (compressed.save_dir / "report.html").read_text(encoding="utf-8")
    page = _parse(text)
    assert page.ids == [s.key for s in SECTIONS]
    assert not re.search(r"https?://", text)
    report = json.loads((compressed.save_dir / "report.json").read_text())
    assert f"{report['compressed']['metrics']['miou']:.4f}" in text
    assert "<h3>sparsity</h3>" in text  # its training curves
    layers = report["sparsity"]["layers"]
    assert layers and all(f"<td>{html.escape(layer['node'])}</td>" in text for layer in layers)
    assert page.tags["img"] == 5 * 4  # the 4 val images, 5 panels each
    names = {p.name for p in compressed.save_dir.iterdir()}
    assert {"model.onnx", "report.json", "report.html"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]  # no temporary file left


# records script errors, failed loads and console.error into the DOM, for --dump-dom to read
RECORDER = """<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  var t = e.target; window.__errs.push(e.message || ('failed to load ' + (t && (t.src || t.href || t.tagName))));
}, true);
var __ce = console.error;
console.error = function () { window.__errs.push([].join.call(arguments, ' ')); __ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var broken = [].filter.call(document.images, function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.documentElement.setAttribute('data-check', JSON.stringify(
      {errors: window.__errs, images: document.images.length, broken: broken.length}));
});
</script>"""


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.iterdir()))}"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               # any network request fails (and so is reported as an error) instead of leaving
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def _browser_check(page: Path, tmp: Path) -> dict:
    checked = tmp / f"checked-{page.name}"
    checked.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + RECORDER, 1), encoding="utf-8")
    run = _chromium(checked, tmp, "--dump-dom")
    found = re.search(r'data-check="([^"]*)"', run.stdout)
    assert found, f"chromium did not finish loading the page: {run.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                   "(apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(compressed, tmp_path):
    page = compressed.save_dir / "report.html"
    check = _browser_check(page, tmp_path)
    assert check["errors"] == [] and check["broken"] == 0 and check["images"] > 0, check

    shot = tmp_path / "shot.png"
    run = _chromium(page, tmp_path, "--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}")
    assert shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(np.int32)
    colours, counts = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2], return_counts=True)
    assert len(colours) > 100, "the screenshot is blank"
    assert counts.max() / len(pixels) < 0.9, "the screenshot is almost one colour"

    # the check can fail: a page with a script error and a broken image is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                   "<script>undefined_function()</script></body></html>")
    check = _browser_check(bad, tmp_path)
    assert check["broken"] == 1 and any("undefined_function" in e for e in check["errors"]), check



def test_a_failing_report_html_does_not_lose_the_run(tmp_path, monkeypatch):
    """The model and report.json are complete before report.html: a rendering failure is one
    warning line, not a failed compress."""
    from slimseg.compress.api import compress
    from slimseg.report import html as report_html

    def broken(*args, **kwargs):
        raise ValueError("a plotting backend problem")

    monkeypatch.setattr(report_html, "write_html_report", broken)
    model, data = trained_tiny_project(tmp_path)
    lines = []
    result = compress(model, {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 1}}, data=data,
                      save_dir=tmp_path / "out", progress=False, bench_rounds=2, log_fn=lines.append)
    names = {p.name for p in result.save_dir.iterdir()}
    assert {"model.onnx", "report.json"} <= names and "report.html" not in names
    assert any("report.html not written" in line and "plotting backend" in line for line in lines)
