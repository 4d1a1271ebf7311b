import numpy as np
import pytest
import torch

from slimseg.errors import DataError
from slimseg.evaluate import evaluate, scores_to_labels
from helpers import channel_vote_model, write_vote_dataset


def test_perfect_model_scores_one(tmp_path):
    config = write_vote_dataset(tmp_path)
    result = evaluate(channel_vote_model(), config, progress=False, threads=1)
    assert result.num_images == 4
    assert result.metrics.miou == pytest.approx(1.0)
    assert result.metrics.acc == pytest.approx(1.0)


def test_wrong_labels_lower_miou_by_the_expected_amount(tmp_path):
    # 8 of 256 pixels per image disagree; the exact mIoU follows from the confusion matrix.
    config = write_vote_dataset(tmp_path, flip_label_pixels=8)
    result = evaluate(channel_vote_model(), config, progress=False, threads=1)
    assert result.metrics.acc == pytest.approx(1 - 8 / 256)
    assert 0.85 < result.metrics.miou < 0.99


def test_scores_are_resized_bilinearly_to_the_label_size():
    # class 0 scores 0.2 everywhere, class 1 scores 0 (left column) and 1 (right column).
    # Half-pixel bilinear puts output column 1 at source x=0.25: class 1 scores 0.25 > 0.2 there,
    # where nearest-neighbour would still say class 0.
    scores = np.zeros((1, 2, 2, 2), np.float32)
    scores[0, 0] = 0.2
    scores[0, 1, :, 1] = 1.0
    labels = scores_to_labels(scores, (4, 4), num_classes=2)
    assert labels.shape == (1, 4, 4)
    np.testing.assert_array_equal(labels[0, :, 0], 0)
    np.testing.assert_array_equal(labels[0, :, 1:], 1)


def test_class_id_maps_are_resized_nearest():
    ids = np.array([[[0, 2], [1, 1]]], dtype=np.int64)
    labels = scores_to_labels(ids, (4, 4), num_classes=3)
    assert labels.tolist()[0][0] == [0, 0, 2, 2]


def test_class_count_mismatch_is_an_error():
    with pytest.raises(DataError, match="num_classes=3"):
        scores_to_labels(np.zeros((1, 2, 4, 4), np.float32), (4, 4), num_classes=3)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_channel_argmax_equals_argmax_ties_included(classes):
    from slimseg.evaluate import channel_argmax

    scores = np.random.default_rng(classes).integers(0, 3, size=(2, classes, 9, 11)).astype(np.float32)
    np.testing.assert_array_equal(channel_argmax(scores), scores.argmax(1))
    np.testing.assert_array_equal(channel_argmax(torch.from_numpy(scores)), scores.argmax(1))
