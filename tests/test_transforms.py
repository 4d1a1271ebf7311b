"""PaddleSeg-compatible transforms: sizes, values, label handling, determinism, errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slimseg.data.transforms import TRANSFORMS, Compose, build_transforms, resize_image
from slimseg.errors import ConfigError

# Minimal parameters for transforms that have required ones (the rest use defaults).
REQUIRED = {"Padding": {"target_size": [64, 64]}, "ResizeByLong": {"long_size": 24},
            "ResizeByShort": {"short_size": 16}}


def _image(h=30, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label(h=30, w=40, seed=0, n=3):
    return np.random.default_rng(seed + 1).integers(0, n, (h, w))


def run(specs, im, label=None, seed=0):
    return build_transforms(specs, source="t.yml")(im, label, rng=np.random.default_rng(seed))


def cv2_bilinear(im, w, h):
    """cv2.INTER_LINEAR on float written out: half-pixel centres, clamped, no antialias."""
    def taps(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, fy = taps(h, im.shape[0])
    x0, x1, fx = taps(w, im.shape[1])
    im = im.astype(np.float64)
    rows = im[y0] * (1 - fy)[:, None, None] + im[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("size", [(17, 11), (80, 64), (40, 30), (13, 50)])
def test_resize_linear_is_cv2_bilinear_without_antialias(size):
    im = _image().astype(np.float32)
    np.testing.assert_allclose(resize_image(im, size, backend="cv2"), cv2_bilinear(im, *size), atol=1e-3)


def test_resize_default_is_pil_bilinear():
    # the reference mIoUs of ../shared/assets were measured with PIL's (antialiased) bilinear
    im = _image()
    want = np.asarray(Image.fromarray(im).resize((17, 11), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(resize_image(im.astype(np.float32), (17, 11)), want)
    assert not np.allclose(resize_image(im.astype(np.float32), (17, 11), backend="cv2"), want, atol=1)


def test_resize_antialias_false_is_cv2_style():
    im = _image()
    out, _ = run([{"type": "Resize", "target_size": [17, 11], "antialias": False}], im)
    np.testing.assert_allclose(out.transpose(1, 2, 0), cv2_bilinear(im.astype(np.float32), 17, 11), atol=1e-3)
    with pytest.raises(ConfigError, match="antialias"):
        run([{"type": "Resize", "target_size": [17, 11], "antialias": "no"}], im)


def test_resize_sizes_and_nearest_label():
    im, lab = _image(), _label()
    out, olab = run([{"type": "Resize", "target_size": [24, 18]}], im, lab)
    assert out.shape == (3, 18, 24) and out.dtype == np.float32
    assert olab.shape == (18, 24) and olab.dtype == np.int64
    ys = (np.arange(18) * 30 / 18).astype(int)
    xs = (np.arange(24) * 40 / 24).astype(int)
    np.testing.assert_array_equal(olab, lab[ys[:, None], xs[None, :]])  # cv2 INTER_NEAREST


def test_resize_keep_ratio_and_by_side():
    im = _image(30, 60)
    assert run([{"type": "Resize", "target_size": [20, 20], "keep_ratio": True}], im)[0].shape == (3, 10, 20)
    assert run([{"type": "ResizeByLong", "long_size": 30}], im)[0].shape == (3, 15, 30)
    assert run([{"type": "ResizeByShort", "short_size": 15}], im)[0].shape == (3, 15, 30)
    assert run([{"type": "LimitLong", "max_long": 40}], im)[0].shape == (3, 20, 40)
    assert run([{"type": "LimitLong", "min_long": 10}], im)[0].shape == (3, 30, 60)


def test_normalize_values():
    im = np.array([[[0, 255, 51]]], dtype=np.uint8)
    out, _ = run([{"type": "Normalize"}], im)
    np.testing.assert_allclose(out[:, 0, 0], [-1.0, 1.0, (0.2 - 0.5) / 0.5], atol=1e-6)
    out, _ = run([{"type": "Normalize", "mean": [0.2, 0.2, 0.2], "std": [0.1, 0.1, 0.1]}], im)
    np.testing.assert_allclose(out[:, 0, 0], [-2.0, 8.0, 0.0], atol=1e-5)


def test_without_normalize_values_stay_raw():
    im = _image()
    out, _ = run([], im)
    np.testing.assert_array_equal(out, im.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("name,axis", [("RandomHorizontalFlip", 1), ("RandomVerticalFlip", 0)])
def test_flips_flip_label_too(name, axis):
    im, lab = _image(), _label()
    out, olab = run([{"type": name, "prob": 1.0}], im, lab)
    np.testing.assert_array_equal(out, np.flip(im, axis).transpose(2, 0, 1))
    np.testing.assert_array_equal(olab, np.flip(lab, axis))
    out, olab = run([{"type": name, "prob": 0.0}], im, lab)
    np.testing.assert_array_equal(olab, lab)


def test_random_padding_crop_pads_with_values():
    im, lab = _image(8, 10), _label(8, 10)
    out, olab = run([{"type": "RandomPaddingCrop", "crop_size": [12, 11]}], im, lab)
    assert out.shape == (3, 11, 12) and olab.shape == (11, 12)
    np.testing.assert_array_equal(out[:, :8, :10], im.transpose(2, 0, 1))
    assert (out[:, 8:, :] == 127.5).all() and (out[:, :, 10:] == 127.5).all()
    assert (olab[8:, :] == 255).all() and (olab[:, 10:] == 255).all()


def test_random_padding_crop_window_is_aligned():
    im = np.arange(30 * 40 * 3).reshape(30, 40, 3).astype(np.uint8)
    lab = np.arange(30 * 40).reshape(30, 40)
    out, olab = run([{"type": "RandomPaddingCrop", "crop_size": [16, 12]}], im, lab, seed=3)
    y, x = divmod(int(olab[0, 0]), 40)
    np.testing.assert_array_equal(olab, lab[y:y + 12, x:x + 16])
    np.testing.assert_array_equal(out, im[y:y + 12, x:x + 16].transpose(2, 0, 1))


def test_padding_and_padding_by_aspect_ratio():
    im, lab = _image(10, 20), _label(10, 20)
    out, olab = run([{"type": "Padding", "target_size": [24, 16], "im_padding_value": [1, 2, 3],
                      "label_padding_value": 9}], im, lab)
    assert out.shape == (3, 16, 24) and (out[:, 10:, 0] == np.array([[1], [2], [3]])).all()
    assert (olab[10:] == 9).all()
    out, olab = run([{"type": "PaddingByAspectRatio", "aspect_ratio": 1}], im, lab)
    assert out.shape == (3, 20, 20) and olab.shape == (20, 20)
    with pytest.raises(ValueError, match="larger than target_size"):
        run([{"type": "Padding", "target_size": [5, 5]}], im)


def test_resize_step_scaling_picks_a_step():
    im = _image(40, 40)
    sides = {run([{"type": "ResizeStepScaling", "min_scale_factor": 0.5, "max_scale_factor": 1.0,
                   "scale_step_size": 0.25}], im, seed=s)[0].shape[1] for s in range(30)}
    assert sides == {20, 30, 40}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_keeps_image_and_label_aligned(name):
    spec = {"type": name, **REQUIRED.get(name, {})}
    if "prob" in {f for f in TRANSFORMS[name].__dataclass_fields__}:
        spec["prob"] = 1.0
    im, lab = _image(30, 40), _label(30, 40)
    out, olab = run([spec], im, lab, seed=1)
    assert out.dtype == np.float32 and olab.dtype == np.int64
    assert out.shape[0] == 3 and out.shape[1:] == olab.shape
    assert set(np.unique(olab)) <= {0, 1, 2, 255}
    out2, _ = run([spec], im, lab, seed=1)
    np.testing.assert_array_equal(out, out2)  # same seed, same result
    assert build_transforms(Compose([spec]).to_list()).to_list() == Compose([spec]).to_list()


def test_random_distort_is_seeded_and_varies():
    im = _image()
    spec = [{"type": "RandomDistort", "brightness_prob": 1, "contrast_prob": 1}]
    a, b, c = (run(spec, im, seed=s)[0] for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_deterministic_drops_random_ops():
    c = Compose([{"type": "Resize", "target_size": [8, 8]}, {"type": "RandomHorizontalFlip"},
                 {"type": "RandomDistort"}, {"type": "Normalize"}])
    assert [op["type"] for op in c.deterministic().to_list()] == ["Resize", "Normalize"]


def test_static_prefix_stops_at_the_first_random_draw():
    c = Compose([{"type": "Resize", "target_size": [8, 8]}, {"type": "Normalize"},
                 {"type": "RandomHorizontalFlip"}, {"type": "Normalize"}])
    assert c.static_prefix() == 2
    random_interp = Compose([{"type": "Resize", "target_size": [8, 8], "interp": "RANDOM"}])
    assert random_interp.static_prefix() == 0


def test_running_in_two_parts_equals_one_call():
    c = Compose([{"type": "Resize", "target_size": [8, 6]}, {"type": "RandomHorizontalFlip"},
                 {"type": "RandomDistort", "brightness_prob": 1}, {"type": "Normalize"}])
    im, lab = _image(20, 14), np.arange(14 * 20).reshape(14, 20) % 2
    whole = c(im, lab, rng=np.random.default_rng(3))
    head = c.run(*Compose.start(im, lab), stop=c.static_prefix())
    tail = Compose.finish(*c.run(*head, rng=np.random.default_rng(3), first=c.static_prefix()))
    np.testing.assert_array_equal(whole[0], tail[0])
    np.testing.assert_array_equal(whole[1], tail[1])


def test_rotation_grows_canvas_and_pads_label():
    im, lab = _image(20, 20), np.zeros((20, 20), int)
    out, olab = run([{"type": "RandomRotation", "max_rotation": 30}], im, lab, seed=2)
    assert olab.shape[0] >= 20 and (olab[0, 0] == 255) and (olab == 0).sum() > 300


def test_errors_name_source_key_and_suggest():
    with pytest.raises(ConfigError, match=r"t\.yml.*transforms\[0\]\.type.*did you mean 'Resize'"):
        build_transforms([{"type": "Resze"}], source="t.yml")
    with pytest.raises(ConfigError, match=r"transforms\[1\]\.target_sze.*did you mean 'target_size'"):
        build_transforms([{"type": "Normalize"}, {"type": "Resize", "target_sze": [1, 2]}], source="t.yml")
    with pytest.raises(ConfigError, match=r"transforms\[0\]\.target_size.*width, height"):
        build_transforms([{"type": "Resize", "target_size": "big"}], source="t.yml")
    with pytest.raises(ConfigError, match=r"transforms\[0\]\.prob"):
        build_transforms([{"type": "RandomHorizontalFlip", "prob": "half"}], source="t.yml")
    with pytest.raises(ConfigError, match=r"needs the parameter 'long_size'"):
        build_transforms([{"type": "ResizeByLong"}], source="t.yml")
    with pytest.raises(ConfigError, match="interp"):
        build_transforms([{"type": "Resize", "interp": "BILINEAR"}], source="t.yml")
    with pytest.raises(ConfigError, match="expected a list"):
        build_transforms({"type": "Resize"}, source="t.yml")
