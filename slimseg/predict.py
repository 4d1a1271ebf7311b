"""`predict(model, inputs, out_dir=...)`: segment images, folders, lists or videos with any model.

The model (original or compressed; ONNX or a Paddle inference folder) runs in a real runtime
with its own preprocessing (deploy.yaml, or the val transforms of a dataset YAML), and class
maps are computed exactly as :func:`slimseg.evaluate.evaluate` computes them: the scores are
resized bilinearly to the image's own size, then argmax. So the mIoU of the written PNGs equals
the model's eval mIoU on the same images.

Per image ``<name>`` (its path relative to the input folder or list, without extension):

* ``<name>.png``: the class map, a palette ("P") PNG with PaddleSeg's colours: pixel values
  are class ids, so the file is both a visual and a label file;
* ``<name>_overlay.jpg``: ``0.6 * image + 0.4 * colour`` (PaddleSeg's ``visualize``);
* 2-class models only: ``<name>_matte.png`` = ``round(255 * p1)`` with ``p1`` the class-1
  (foreground) probability, and ``<name>_bg.jpg`` = ``p1 * image + (1 - p1) * background``
  (PP-HumanSeg's background replacement).

A video gives ``<stem>_overlay.mp4`` and ``<stem>_mask.mp4`` (colour class map), plus
``_matte.mp4`` / ``_bg.mp4`` when asked. The output folder appears only when everything was
written (:func:`slimseg.io.atomic_dir`).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from slimseg.errors import ConfigError, DataError, SlimsegError, did_you_mean
from slimseg.evaluate import scores_to_labels

log = logging.getLogger("slimseg")

OVERLAY_WEIGHT = 0.6   # weight of the image in the overlay (PaddleSeg's visualize default)
JPEG_QUALITY = 92
PNG_LEVEL = 1          # zlib level: class maps compress well even at 1, and 5x faster than 6
LIST_SUFFIXES = (".txt", ".lst")


# --- results ------------------------------------------------------------------------------

@dataclass
class PredictResult:
    """What a predict run did, and how fast (``images_per_s`` counts video frames too)."""

    out_dir: str
    model: str
    runtime: str
    threads: int
    batch_size: int
    images: int = 0
    videos: int = 0
    frames: int = 0
    seconds: float = 0.0            # wall time: decode, preprocess, run, write
    model_seconds: float = 0.0      # time inside the runtime only
    files: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.images + self.frames) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(seconds=round(self.seconds, 3), model_seconds=round(self.model_seconds, 3),
                    images_per_s=round(self.images_per_s, 2), files=len(self.files))
        return data

    def summary(self) -> str:
        parts = ([f"{self.images} images"] if self.images or not self.videos else []) + \
            ([f"{self.frames} frames of {self.videos} video{'s' * (self.videos > 1)}"] if self.videos else [])
        what = ", ".join(parts)
        return (f"predicted {what} in {self.seconds:.2f} s ({self.images_per_s:.1f} images/s; "
                f"{self.model_seconds:.2f} s in {self.runtime}, {self.threads} threads, "
                f"batch {self.batch_size}) -> {self.out_dir}")


# --- colours ------------------------------------------------------------------------------

def color_map(num_classes: int = 256) -> list[int]:
    """PaddleSeg's ``get_color_map_list``: the PASCAL VOC bit-interleaved colours, shifted by
    one so that class 0 is (128, 0, 0), class 1 (0, 128, 0), ... Flat [r0, g0, b0, r1, ...].

    VOC colour of k: bit b of k's 3-bit groups sets bit (7 - group) of r (b=0), g (b=1), b (b=2).
    """
    flat = []
    for k in range(1, num_classes + 1):
        rgb, j, lab = [0, 0, 0], 0, k
        while lab:
            for c in range(3):
                rgb[c] |= ((lab >> c) & 1) << (7 - j)
            j += 1
            lab >>= 3
        flat.extend(rgb)
    return flat


_PALETTE = np.asarray(color_map(256), np.uint8).reshape(256, 3)


def label_image(labels: np.ndarray) -> Image.Image:
    """A 'P'-mode PNG image of class ids with PaddleSeg's palette."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DataError(f"class ids must be 0..255 to be stored as a PNG, got {labels.min()}..{labels.max()}")
    h, w = labels.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return image


def colorize(labels: np.ndarray) -> np.ndarray:
    return _PALETTE[labels.astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, weight: float = OVERLAY_WEIGHT) -> np.ndarray:
    """``weight * image + (1 - weight) * colour``, uint8 RGB (PIL's C blend: ~10x numpy's speed)."""
    return np.asarray(Image.blend(Image.fromarray(colorize(labels)), Image.fromarray(image), weight))


def composite(image: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``a * image + (1 - a) * background`` per pixel with ``a = round(255 alpha) / 255``, uint8 RGB."""
    mask = Image.fromarray(matte_image(alpha))
    return np.asarray(Image.composite(Image.fromarray(image), Image.fromarray(np.ascontiguousarray(background)), mask))


def matte_image(alpha: np.ndarray) -> np.ndarray:
    return np.clip(np.round(alpha * 255), 0, 255).astype(np.uint8)


class Background:
    """``--bg``: a colour ('green', '#00ff00', '0,255,0') or an image file, at any frame size."""

    def __init__(self, spec: str | os.PathLike | Sequence[int]):
        self.spec = spec
        self.color: tuple[int, int, int] | None = None
        self.image: Image.Image | None = None
        self._sized: dict[tuple[int, int], np.ndarray] = {}
        if isinstance(spec, (tuple, list)):
            self.color = _rgb(spec, spec)
        elif Path(spec).is_file():
            from slimseg.data import load_image

            self.image = Image.fromarray(load_image(spec))
        else:
            self.color = _parse_color(str(spec))

    def at(self, hw: tuple[int, int]) -> np.ndarray:
        """The background as an (H, W, 3) uint8 array (an image is resized bilinearly)."""
        if hw not in self._sized:
            if self.image is not None:
                self._sized[hw] = np.asarray(self.image.resize((hw[1], hw[0]), Image.BILINEAR))
            else:
                self._sized[hw] = np.broadcast_to(np.asarray(self.color, np.uint8), (*hw, 3))
        return self._sized[hw]


def _parse_color(text: str) -> tuple[int, int, int]:
    if "," in text:
        try:
            return _rgb([int(v) for v in text.split(",")], text)
        except ValueError:
            pass
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ConfigError(f"expected a colour (a name such as 'green', '#00ff00' or 'R,G,B') or an existing "
                          f"image file, got {text!r}", key="bg") from None


def _rgb(values, original) -> tuple[int, int, int]:
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ConfigError(f"expected three integers 0..255 (R,G,B), got {original!r}", key="bg")
    return tuple(values)


# --- inputs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputItem:
    path: Path
    name: str    # output name: relative path without extension, '/'-separated


def collect_inputs(inputs, *, dataset_root=None) -> tuple[list[InputItem], list[InputItem]]:
    """(images, videos) from an image, a folder (recursive, sorted), a list file or a video."""
    from slimseg.data.datasets import IMAGE_EXTENSIONS, scan_images
    from slimseg.video import VIDEO_EXTENSIONS, is_video

    path = Path(inputs)
    if path.is_dir():
        return _named([(p, p.relative_to(path)) for p in scan_images(path)]), []
    if not path.is_file():
        raise DataError(f"input not found: {path}")
    if path.suffix.lower() in LIST_SUFFIXES:
        return _named(_read_image_list(path, dataset_root)), []
    if is_video(path):
        return [], [InputItem(path, path.stem)]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [InputItem(path, path.stem)], []
    raise DataError(f"{path}: expected an image ({', '.join(IMAGE_EXTENSIONS)}), a folder, a .txt list "
                    f"or a video ({', '.join(VIDEO_EXTENSIONS)})")


def _read_image_list(list_path: Path, dataset_root) -> list[tuple[Path, Path]]:
    """PaddleSeg list: the first column is the image, relative to the list's folder or dataset_root."""
    roots = [list_path.parent] + ([Path(dataset_root)] if dataset_root is not None else [])
    found = []
    for lineno, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rel = Path(line.split()[0])
        hit = next((root for root in roots if (root / rel).is_file()), None)
        if hit is None:
            tried = " or ".join(str(root / rel) for root in roots)
            raise DataError(f"{list_path}:{lineno}: image not found: {tried}")
        found.append((hit / rel, rel))
    if not found:
        raise DataError(f"list file {list_path} lists no images")
    return found


def _named(pairs: Iterable[tuple[Path, Path]]) -> list[InputItem]:
    """Output names from relative paths; paths leaving the root ('..', absolute) keep their
    stem only, and repeated names get a '_<n>' suffix so that no output is overwritten."""
    items, seen = [], set()
    for path, rel in pairs:
        parts = rel.with_suffix("").parts
        name = "/".join(parts) if parts and not rel.is_absolute() and ".." not in parts else path.stem
        base, n = name, 1
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        items.append(InputItem(path, name))
    return items


# --- preprocessing ------------------------------------------------------------------------

@dataclass
class Preprocess:
    transforms: Any            # slimseg.data.Compose
    source: str
    dataset_root: Path | None = None
    channels: int = 3


def resolve_preprocess(preprocess, loaded=None) -> Preprocess | None:
    """An explicit `preprocess` (transform list, Compose, dataset YAML path or DatasetConfig:
    its val transforms), else the model's deploy.yaml; None when neither is known yet."""
    from slimseg.data import Compose, DatasetConfig, load_dataset_config

    if isinstance(preprocess, Compose):
        return Preprocess(preprocess.deterministic(), "transforms")
    if isinstance(preprocess, (list, tuple)):
        return Preprocess(Compose(list(preprocess), source="preprocess").deterministic(), "transforms")
    if isinstance(preprocess, (str, os.PathLike, DatasetConfig)):
        cfg = preprocess if isinstance(preprocess, DatasetConfig) else load_dataset_config(preprocess)
        spec = cfg.val or cfg.train
        key = "val_dataset.transforms" if cfg.val else "train_dataset.transforms"
        compose = Compose(spec.transforms, source=cfg.source, key=key).deterministic()
        return Preprocess(compose, f"{cfg.source} ({key})", Path(spec.dataset_root), spec.img_channels)
    if preprocess is not None:
        raise ConfigError(f"expected a transform list, a Compose or a dataset YAML path, got "
                          f"{type(preprocess).__name__}", key="preprocess")
    if loaded is not None and loaded.preprocess:
        return Preprocess(Compose(loaded.preprocess, source="deploy.yaml").deterministic(), "deploy.yaml")
    if loaded is not None:
        raise ConfigError(f"{loaded.source}: no deploy.yaml next to the model, so its preprocessing is "
                          "unknown: pass a dataset YAML (--dataset_config) whose val transforms match "
                          "how the model was trained", key="preprocess")
    return None


# --- running the model --------------------------------------------------------------------

@dataclass
class Prediction:
    labels: np.ndarray           # (H, W) class ids at the image's size
    alpha: np.ndarray | None     # (H, W) class-1 probability (2-class models, when asked)


class Segmenter:
    """Images (HWC uint8 RGB, any sizes) -> predictions at each image's own size."""

    def __init__(self, session, preprocess: Preprocess, *, alpha: bool = False):
        self.session = session
        self.preprocess = preprocess
        self.alpha = alpha
        self.model_seconds = 0.0

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        inputs = [self.preprocess.transforms(im)[0] for im in images]
        preds: list[Prediction] = []
        for start, stop in _same_shape_runs(inputs):
            t0 = time.perf_counter()
            out = self.session.run(np.stack(inputs[start:stop]).astype(np.float32))[0]
            self.model_seconds += time.perf_counter() - t0
            preds.extend(self._post(out[i:i + 1], images[start + i].shape[:2]) for i in range(stop - start))
        return preds

    def _post(self, out: np.ndarray, hw: tuple[int, int]) -> Prediction:
        scores = out.ndim == 4 and out.shape[1] > 1 and np.issubdtype(out.dtype, np.floating)
        num_classes = out.shape[1] if scores else 256
        labels = scores_to_labels(out, hw, num_classes=num_classes)[0]
        return Prediction(labels, foreground_probability(out, hw) if self.alpha else None)


def _same_shape_runs(arrays: Sequence[np.ndarray]) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of consecutive arrays that share a shape (one runtime batch each)."""
    start = 0
    for i in range(1, len(arrays) + 1):
        if i == len(arrays) or arrays[i].shape != arrays[start].shape:
            yield start, i
            start = i


def foreground_probability(out: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Class-1 probability of a (1, 2, h, w) output, resized bilinearly to `hw`.

    Softmax outputs (``with_softmax`` exports: values in [0, 1] summing to 1 over classes) are
    used as they are; anything else is taken as logits and softmaxed.
    """
    if out.ndim != 4 or out.shape[1] != 2 or not np.issubdtype(out.dtype, np.floating):
        raise ConfigError(f"a matte / background replacement needs a 2-class model with float scores "
                          f"(N, 2, H, W); this model outputs {out.dtype} {tuple(out.shape)}", key="matte")
    out = out.astype(np.float32, copy=False)
    is_prob = out.min() >= 0 and out.max() <= 1 and np.abs(out.sum(1) - 1).max() < 1e-3
    probs = torch.from_numpy(np.ascontiguousarray(out))
    probs = probs if is_prob else torch.softmax(probs, dim=1)
    p1 = probs[:, 1:2]
    if tuple(p1.shape[-2:]) != tuple(hw):
        p1 = F.interpolate(p1, size=hw, mode="bilinear", align_corners=False)
    return p1[0, 0].clamp(0, 1).numpy()


# --- writing ------------------------------------------------------------------------------

@dataclass
class Outputs:
    """Which optional outputs to write."""

    matte: bool = False
    background: Background | None = None

    @property
    def alpha(self) -> bool:
        return self.matte or self.background is not None


def save_image_outputs(out_dir: Path, name: str, image: np.ndarray, pred: Prediction,
                       outputs: Outputs) -> list[str]:
    """Write the files of one image; returns their paths relative to `out_dir`."""
    stem = out_dir / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {f"{name}.png": lambda p: label_image(pred.labels).save(p, compress_level=PNG_LEVEL),
             f"{name}_overlay.jpg": lambda p: Image.fromarray(overlay(image, pred.labels)).save(p, quality=JPEG_QUALITY)}
    if outputs.matte:
        files[f"{name}_matte.png"] = lambda p: Image.fromarray(matte_image(pred.alpha)).save(
            p, compress_level=PNG_LEVEL)
    if outputs.background is not None:
        bg = outputs.background.at(image.shape[:2])
        files[f"{name}_bg.jpg"] = lambda p: Image.fromarray(composite(image, pred.alpha, bg)).save(
            p, quality=JPEG_QUALITY)
    for rel, save in files.items():
        save(out_dir / rel)
    return list(files)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _predict_images(items: list[InputItem], segmenter: Segmenter, out_dir: Path, outputs: Outputs,
                    batch_size: int, channels: int, bar) -> list[str]:
    from slimseg.data import load_image

    files = []
    for batch in _batches(items, batch_size):
        images = [_rgb_image(load_image(item.path, channels)) for item in batch]
        for item, image, pred in zip(batch, images, segmenter(images)):
            files += save_image_outputs(out_dir, item.name, image, pred, outputs)
        bar.update(len(batch))
    return files


def _rgb_image(image: np.ndarray) -> np.ndarray:
    """HWC uint8 for drawing: a 1-channel image is shown as gray RGB."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _predict_video(item: InputItem, segmenter: Segmenter, out_dir: Path, outputs: Outputs,
                   batch_size: int, progress: bool) -> tuple[int, list[str]]:
    """Frames in -> one output video per kind; returns (frames, files)."""
    from slimseg.video import read_frames, video_info, video_writer

    info = video_info(item.path)
    kinds = ["overlay", "mask"] + (["matte"] if outputs.matte else []) + (["bg"] if outputs.background else [])
    files = [f"{item.name}_{kind}.mp4" for kind in kinds]
    count = 0
    with ExitStack() as stack:
        writers = {kind: stack.enter_context(video_writer(out_dir / f, fps=info.fps, size=info.size))
                   for kind, f in zip(kinds, files)}
        bar = stack.enter_context(_bar(progress, info.frames, f"predict {item.path.name}", "frame"))
        for batch in _chunks(read_frames(item.path), batch_size):
            for image, pred in zip(batch, segmenter(batch)):
                _write_frame(writers, image, pred, outputs)
            count += len(batch)
            bar.update(len(batch))
    if count == 0:
        raise DataError(f"video {item.path} holds no frames")
    return count, files


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    while batch := list(itertools.islice(frames, size)):
        yield batch


def _write_frame(writers: dict, image: np.ndarray, pred: Prediction, outputs: Outputs) -> None:
    writers["overlay"](overlay(image, pred.labels))
    writers["mask"](colorize(pred.labels))
    if "matte" in writers:
        writers["matte"](np.repeat(matte_image(pred.alpha)[..., None], 3, axis=2))
    if "bg" in writers:
        writers["bg"](composite(image, pred.alpha, outputs.background.at(image.shape[:2])))


def _bar(enabled: bool, total: int | None, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


# --- the verb -----------------------------------------------------------------------------

def predict(model, inputs, *, out_dir, runtime: str = "onnxruntime", threads: int | None = None,
            batch_size: int = 1, preprocess=None, matte: bool = False, bg=None, dataset_root=None,
            overwrite: bool = False, progress: bool = True) -> PredictResult:
    """Segment `inputs` (image, folder, .txt list or video) with `model`; write to `out_dir`.

    `preprocess`: transform list, Compose, or dataset YAML (its val transforms; its
    dataset_root also resolves list entries); default the model's deploy.yaml. `matte` and
    `bg` (colour or image) need a 2-class model. `out_dir` appears only when all is written.
    """
    from slimseg.hardware.int8 import warn_if_saturates
    from slimseg.hardware.runtime import get_runtime, known_runtimes
    from slimseg.model.importers import load_model

    known = known_runtimes()
    if runtime not in known:
        raise ConfigError(f"unknown runtime {runtime!r}{did_you_mean(runtime, known)}; registered: "
                          f"{', '.join(known)}", key="runtime")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"expected an integer >= 1, got {batch_size!r}", key="batch_size")
    pre = resolve_preprocess(preprocess)
    images, videos = collect_inputs(inputs, dataset_root=dataset_root or (pre and pre.dataset_root))
    if videos:
        from slimseg.video import video_info

        video_info(videos[0].path)  # fails now, before the model loads, without imageio
    outputs = Outputs(matte=matte, background=None if bg is None else Background(bg))
    loaded = load_model(model)
    pre = pre or resolve_preprocess(None, loaded)
    threads = threads or max(1, os.cpu_count() or 1)
    segmenter = Segmenter(get_runtime(runtime, loaded.onnx, threads=threads), pre, alpha=outputs.alpha)
    warn_if_saturates(loaded.onnx, runtime, loaded.source, log)
    result = PredictResult(str(out_dir), loaded.source, runtime, threads, batch_size)
    start = time.perf_counter()
    with _atomic_out(out_dir, overwrite) as tmp:
        with _bar(progress and bool(images), len(images), "predict", "img") as bar:
            result.files += _predict_images(images, segmenter, tmp, outputs, batch_size, pre.channels, bar)
        result.images = len(images)
        for item in videos:
            frames, files = _predict_video(item, segmenter, tmp, outputs, batch_size, progress)
            result.frames += frames
            result.files += files
        result.videos = len(videos)
    result.seconds = time.perf_counter() - start
    result.model_seconds = segmenter.model_seconds
    return result


def _atomic_out(out_dir, overwrite: bool):
    from slimseg.io import atomic_dir

    if out_dir is None or str(out_dir) == "":
        raise SlimsegError("predict needs an output folder (-o / out_dir)")
    return atomic_dir(out_dir, overwrite=overwrite)


def score_outputs(out_dir, data, *, split: str = "val"):
    """mIoU etc. of the class-map PNGs that :func:`predict` wrote for `split`'s list file of
    dataset `data` (YAML path or DatasetConfig), against the dataset's labels."""
    from slimseg.data import build_dataset, load_label
    from slimseg.metrics import ConfusionMatrix

    dataset = build_dataset(data, split)
    spec = dataset.spec
    list_path = spec.list_paths.get(split, spec.list_path)
    items, _ = collect_inputs(list_path, dataset_root=spec.dataset_root)
    matrix = ConfusionMatrix(spec.num_classes, ignore_index=spec.ignore_index)
    for item, pair in zip(items, dataset.items, strict=True):
        if pair.label is None:
            raise DataError(f"{pair.image}: scoring needs a label for every image")
        png = Path(out_dir) / f"{item.name}.png"
        if not png.is_file():
            raise DataError(f"no prediction {png} for {pair.image}")
        matrix.update(load_label(png), load_label(pair.label))
    return matrix.compute()
