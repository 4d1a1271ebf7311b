"""`evaluate(model, data)`: segmentation accuracy of an exported model, measured in a runtime.

The model runs in a real runtime (onnxruntime by default), never in the training module, so
the number is the one a deployment gets. Metrics follow PaddleSeg: the image goes through the
dataset's val transforms, the label stays at its original size, and the model's class scores
(softmax probabilities or logits) are resized *bilinearly* back to the label size before the
argmax; intersections and unions are summed over the whole split.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimseg.errors import DataError
from slimseg.metrics import ConfusionMatrix, SegMetrics

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: SegMetrics
    num_images: int
    seconds: float
    model: str
    dataset: str
    runtime: str
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None  # the inference precision the runtime chose (OpenVINO), if it says

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "runtime": self.runtime,
            **({"precision": self.precision} if self.precision else {}),
            "num_images": self.num_images,
            "seconds": round(self.seconds, 3),
            **self.metrics.to_dict(),
            **self.extra,
        }


def scores_to_labels(output: np.ndarray, label_hw: tuple[int, int], *, num_classes: int) -> np.ndarray:
    """Turn one model output into an (N, H, W) class map at the label's size.

    Float outputs of shape (N, C, h, w) are class scores: resized bilinearly (half-pixel, as
    PaddleSeg's `F.interpolate`) then argmax. Integer outputs, or (N, h, w) / (N, 1, h, w)
    maps, are already class ids (an ArgMax post-process): resized with nearest neighbour.
    """
    out = np.asarray(output)
    is_map = np.issubdtype(out.dtype, np.integer) or out.ndim == 3 or (out.ndim == 4 and out.shape[1] == 1)
    if is_map:
        ids = torch.from_numpy(out.reshape(out.shape[0], 1, *out.shape[-2:]).astype(np.float32))
        ids = F.interpolate(ids, size=label_hw, mode="nearest")
        return ids[:, 0].round().long().numpy()
    if out.ndim != 4:
        raise DataError(f"model output has shape {out.shape}; expected (N, C, H, W) class scores or (N, H, W) class ids")
    if out.shape[1] != num_classes:
        raise DataError(
            f"model outputs {out.shape[1]} classes but the dataset has num_classes={num_classes}"
        )
    scores = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    if tuple(scores.shape[-2:]) != tuple(label_hw):
        scores = F.interpolate(scores, size=label_hw, mode="bilinear", align_corners=False)
    return channel_argmax(scores)


def channel_argmax(scores) -> np.ndarray:
    """``scores.argmax(1)`` of an (N, C, H, W) array or tensor.

    torch reduces over the strided channel axis very slowly (measured 88 ms for 2 x 400 x 656)
    and numpy's argmax is 2x slower than a running maximum when there are few classes, so
    those are C - 1 vectorised compares. Ties keep the first class, as argmax does.
    """
    scores = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if scores.shape[1] > 4:
        return scores.argmax(1)
    best = scores[:, 0].copy()
    index = np.zeros(best.shape, dtype=np.int64)
    for c in range(1, scores.shape[1]):
        np.copyto(index, c, where=scores[:, c] > best)
        np.maximum(best, scores[:, c], out=best)
    return index


def evaluate(
    model,
    data,
    *,
    split: str = "val",
    runtime: str = "onnxruntime",
    threads: int | None = None,
    input_shape=None,
    limit: int | None = None,
    progress: bool = True,
    **runtime_options,
) -> EvalResult:
    """Score `model` (anything `load_model` accepts) on `data` (dataset YAML path,
    DatasetConfig or a dataset object such as SegDataset) through `runtime`; `runtime_options`
    go to the runtime (e.g. ``precision='bf16'`` for OpenVINO)."""
    from slimseg.data import build_dataset
    from slimseg.hardware.runtime import get_runtime
    from slimseg.model.importers import load_model

    loaded = load_model(model, input_shape=input_shape)
    # a dataset object (SegDataset or anything with .spec, len() and [i] -> Sample) is used as is
    dataset = data if hasattr(data, "spec") and hasattr(data, "__getitem__") else build_dataset(data, split)
    num_classes = dataset.spec.num_classes
    session = get_runtime(runtime, loaded.onnx, threads=threads or _default_threads(), **runtime_options)
    from slimseg.hardware.int8 import warn_if_saturates

    warn_if_saturates(loaded.onnx, runtime, loaded.source, log, runtime_options.get("optimization", "all"))
    matrix = ConfusionMatrix(num_classes, ignore_index=dataset.spec.ignore_index)

    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise DataError(f"dataset {dataset.spec.source} ({split}) holds no images")
    start = time.perf_counter()
    for i in _progress(range(count), progress, desc=f"eval {split}"):
        sample = dataset[i]
        if sample.label is None:
            raise DataError(f"{sample.path}: evaluation needs a label for every image")
        if i == 0:
            _check_input(sample.image.shape, loaded, dataset)
        output = session.run(sample.image[None].astype(np.float32))[0]
        if i == 0:
            _check_classes(output, num_classes, loaded, dataset)
        pred = scores_to_labels(output, sample.label.shape[-2:], num_classes=num_classes)
        matrix.update(pred[0], sample.label)
    seconds = time.perf_counter() - start
    return EvalResult(
        metrics=matrix.compute(),
        num_images=count,
        seconds=seconds,
        model=loaded.source,
        dataset=str(dataset.spec.source),
        runtime=runtime,
        precision=getattr(session, "precision", None),
    )


def _where(dataset) -> str:
    spec = dataset.spec
    section = getattr(spec, "section", "") or "val_dataset"
    return f"{section} of {spec.source}"


def _check_input(chw: tuple, loaded, dataset) -> None:
    """A fixed-size model fed another size fails deep in the runtime: name the transform to fix."""
    want = loaded.input_shape
    if not want or len(want) != 4 or len(chw) != 3:
        return
    if all(w is None or w == g for w, g in zip(want[1:], chw)):
        return
    fixed = "x".join("?" if d is None else str(d) for d in want[1:])
    if want[3] == chw[0] and want[1] != chw[0]:  # channels last, not just a Transpose away
        raise DataError(f"model {loaded.source} takes channels-last (NHWC, {fixed}) images at input "
                        f"{loaded.input_name!r} and uses them before any Transpose to NCHW; slimseg feeds "
                        f"NCHW: re-export it with an NCHW input (tf2onnx: --inputs-as-nchw {loaded.input_name})")
    hint = (f"set Resize target_size: [{want[3]}, {want[2]}] in its transforms" if None not in want[2:]
            else "fix its transforms")
    raise DataError(f"the {_where(dataset)} gives {'x'.join(map(str, chw))} (CxHxW) images but model "
                    f"{loaded.source} takes {fixed} at input {loaded.input_name!r}: {hint}")


def _check_classes(output, num_classes: int, loaded, dataset) -> None:
    """Class scores (N, C, H, W) must have C == num_classes; say which file to change."""
    out = np.asarray(output)
    scores = out.ndim == 4 and out.shape[1] > 1 and np.issubdtype(out.dtype, np.floating)
    if scores and out.shape[1] != num_classes:
        raise DataError(f"model {loaded.source} outputs {out.shape[1]} classes but the {_where(dataset)} "
                        f"has num_classes={num_classes}: set num_classes: {out.shape[1]} there, or use the "
                        f"model trained for these {num_classes} classes")


def _default_threads() -> int:
    import os

    return max(1, os.cpu_count() or 1)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="img", leave=False, dynamic_ncols=True)
