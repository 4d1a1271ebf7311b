"""ConfusionMatrix/SegMetrics against brute force and a hand-checked example (PaddleSeg rules)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimseg.errors import DataError
from slimseg.metrics import ConfusionMatrix


def brute_force(preds, labels, num_classes, ignore_index=255):
    """PaddleSeg's calculate_area + mean_iou/dice/class_measurement/kappa, class by class."""
    inter = np.zeros(num_classes)
    parea = np.zeros(num_classes)
    larea = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        mask = label != ignore_index
        for c in range(num_classes):
            p, lab = (pred == c) & mask, label == c
            inter[c] += (p & lab).sum()
            parea[c] += p.sum()
            larea[c] += lab.sum()
    div = lambda a, b: [a[i] / b[i] if b[i] else 0.0 for i in range(num_classes)]  # noqa: E731
    iou = div(inter, parea + larea - inter)
    dice = div(2 * inter, parea + larea)
    total = larea.sum()
    po, pe = inter.sum() / total, (parea * larea).sum() / total ** 2
    return dict(miou=np.mean(iou), class_iou=iou, acc=inter.sum() / parea.sum(),
                class_precision=div(inter, parea), class_recall=div(inter, larea),
                kappa=(po - pe) / (1 - pe), mdice=np.mean(dice), class_dice=dice)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_matches_brute_force_over_batches(num_classes):
    rng = np.random.default_rng(num_classes)
    preds, labels = [], []
    cm = ConfusionMatrix(num_classes)
    for _ in range(3):
        pred = rng.integers(0, num_classes, (2, 17, 23))
        label = rng.integers(0, num_classes, (2, 17, 23))
        label[rng.random(label.shape) < 0.1] = 255
        preds.append(pred)
        labels.append(label)
        cm.update(pred, label)
    got, want = cm.compute().to_dict(), brute_force(preds, labels, num_classes)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)


def test_hand_checked_example():
    pred = np.array([[0, 1], [1, 1]])
    label = np.array([[0, 1], [0, 255]])
    cm = ConfusionMatrix(2)
    cm.update(pred, label)
    m = cm.compute()
    # valid pixels: (l0,p0) (l1,p1) (l0,p1): I=[1,1], P=[1,2], L=[2,1]
    assert m.class_iou == pytest.approx([0.5, 0.5])
    assert m.miou == pytest.approx(0.5)
    assert m.acc == pytest.approx(2 / 3)
    assert m.class_precision == pytest.approx([1.0, 0.5])
    assert m.class_recall == pytest.approx([0.5, 1.0])
    assert m.class_dice == pytest.approx([2 / 3, 2 / 3])
    assert m.kappa == pytest.approx(0.4)  # po=2/3, pe=4/9


def test_absent_class_counts_zero_in_mean():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 1]))
    m = cm.compute()
    assert m.class_iou == [1.0, 1.0, 0.0]
    assert m.miou == pytest.approx(2 / 3)


def test_ignore_index_and_custom_ignore():
    cm = ConfusionMatrix(2, ignore_index=7)
    cm.update(np.array([1, 0, 1]), np.array([7, 0, 1]))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.compute().kappa == pytest.approx(1.0)


def test_torch_inputs_and_merge_equal_one_pass():
    rng = np.random.default_rng(0)
    pred, label = rng.integers(0, 4, (2, 8, 8)), rng.integers(0, 4, (2, 8, 8))
    whole = ConfusionMatrix(4)
    whole.update(torch.from_numpy(pred), torch.from_numpy(label))
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred[0], label[0])
    b.update(pred[1], label[1])
    assert (a.merge(b).matrix == whole.matrix).all()
    assert a.compute() == whole.compute()


def test_single_class_everywhere_has_kappa_one():
    cm = ConfusionMatrix(2)
    cm.update(np.zeros(4, int), np.zeros(4, int))
    assert cm.compute().kappa == 1.0


def test_empty_matrix_is_all_zero():
    m = ConfusionMatrix(2).compute()
    assert m.miou == 0.0 and m.acc == 0.0 and m.kappa == 0.0


def test_bad_inputs_raise():
    cm = ConfusionMatrix(2)
    with pytest.raises(DataError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(DataError, match=r"prediction values \[2\]"):
        cm.update(np.array([2, 0]), np.array([0, 0]))
    with pytest.raises(DataError, match=r"label values \[5\]"):
        cm.update(np.array([1, 0]), np.array([5, 0]))
