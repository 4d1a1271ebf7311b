"""Segmentation metrics exactly as PaddleSeg computes them (``paddleseg/utils/metrics.py``).

One confusion matrix ``M[label, pred]`` is accumulated over the whole split (pixels whose label
is ``ignore_index`` are skipped), so areas are summed over all images before any ratio:

    I_c = M[c, c]          P_c = sum_l M[l, c] (predicted area)    L_c = sum_p M[c, p] (label area)
    IoU_c = I_c / (P_c + L_c - I_c)        mIoU = mean over ALL classes of IoU_c
    Dice_c = 2 I_c / (P_c + L_c)           mDice = mean over all classes
    precision_c = I_c / P_c   recall_c = I_c / L_c   Acc = sum_c I_c / sum_c P_c
    Kappa = (po - pe) / (1 - pe),  po = sum I / N,  pe = sum_c P_c L_c / N^2

Like PaddleSeg, a ratio whose denominator is 0 counts as 0 (a class absent from both labels and
predictions has IoU 0 and still takes part in the mean). Kappa is 1 when pe == 1 (both sides
all one class, i.e. perfect agreement), where PaddleSeg would divide by zero.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from slimseg.errors import DataError


@dataclass
class SegMetrics:
    miou: float
    class_iou: list[float]
    acc: float
    class_precision: list[float]
    class_recall: list[float]
    kappa: float
    mdice: float
    class_dice: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (PaddleSeg's convention)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates ``M[label, pred]`` over batches; ``compute()`` gives :class:`SegMetrics`."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, label) -> None:
        """Add class-index predictions and labels of equal shape (numpy or torch, any shape)."""
        pred, label = _to_numpy(pred), _to_numpy(label)
        if pred.shape != label.shape:
            raise DataError(f"prediction shape {pred.shape} != label shape {label.shape}")
        pred, label = pred.reshape(-1).astype(np.int64), label.reshape(-1).astype(np.int64)
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        for name, arr in (("label", label), ("prediction", pred)):
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                bad = np.unique(arr[(arr < 0) | (arr >= n)])[:10].tolist()
                raise DataError(f"{name} values {bad} outside [0, {n}) "
                                f"(num_classes={n}, ignore_index={self.ignore_index})")
        self.matrix += np.bincount(label * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (e.g. from another process); returns self."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> SegMetrics:
        m = self.matrix
        inter, pred_area, label_area = np.diag(m), m.sum(axis=0), m.sum(axis=1)
        iou = _ratio(inter, pred_area + label_area - inter)
        dice = _ratio(2 * inter, pred_area + label_area)
        total = float(label_area.sum())
        po = inter.sum() / total if total else 0.0
        pe = float((pred_area.astype(np.float64) * label_area).sum() / total ** 2) if total else 0.0
        kappa = 1.0 if pe == 1.0 else (po - pe) / (1 - pe)
        return SegMetrics(
            miou=float(iou.mean()), class_iou=iou.tolist(),
            acc=float(_ratio(inter.sum(), pred_area.sum())),
            class_precision=_ratio(inter, pred_area).tolist(),
            class_recall=_ratio(inter, label_area).tolist(),
            kappa=float(kappa), mdice=float(dice.mean()), class_dice=dice.tolist())
