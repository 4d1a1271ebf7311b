"""PaddleSeg-compatible transforms: same names, parameters, defaults and semantics.

Each transform is a small dataclass (its fields are the YAML parameters) registered by class
name, so ``{type: Resize, target_size: [192, 192]}`` becomes ``Resize(target_size=[192, 192])``.
Images travel through the pipeline as float32 HWC arrays in RGB (PaddleSeg keeps float after
``cv2.imread(...).astype('float32')``); labels as int64 HW arrays. Sizes are ``[W, H]`` as in
PaddleSeg. Random transforms draw only from the ``numpy.random.Generator`` handed to them, so a
seeded generator reproduces a run exactly.

cv2 is not a dependency: resizing is done by :func:`resize_image`, the one place that decides
how ``LINEAR`` etc. are computed (see there), and labels always use cv2's ``INTER_NEAREST`` rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from slimseg.errors import ConfigError, did_you_mean

INTERPS = ("NEAREST", "LINEAR", "CUBIC", "AREA", "LANCZOS4")
# How LINEAR resizes images by default: "pil" (PIL BILINEAR on uint8, antialiased when
# shrinking) or "cv2" (PaddleSeg's cv2.INTER_LINEAR, no antialias). The reference mIoUs of the
# mini_supervisely models (0.8637 val / 0.8411 test for pp_humanseg_lite_192) were measured, and
# reproduce exactly, with "pil"; "cv2" gives 0.8693 / 0.8528. `Resize(antialias=False)` picks
# "cv2" for one transform, to match a PaddleSeg/cv2 deployment bit for bit.
LINEAR_BACKEND = "pil"


# ----------------------------------------------------------------------------- resizing
def resize_image(im: np.ndarray, size: Sequence[int], interp: str = "LINEAR", *,
                 backend: str | None = None) -> np.ndarray:
    """Resize a float HWC image to ``size = (W, H)`` like ``cv2.resize`` on a float32 image.

    LINEAR is cv2's INTER_LINEAR: bilinear with half-pixel centres, ``src = (dst + 0.5) * in/out
    - 0.5`` clamped at the border, and *no* antialiasing when shrinking (PIL's BILINEAR would
    average over the footprint instead). That is ``F.interpolate(mode='bilinear',
    align_corners=False, antialias=False)`` on the float image, with no rounding to uint8, which
    is how the reference accuracies were measured. CUBIC is bicubic with a = -0.75 (cv2's
    kernel), AREA is box averaging (exact for integer factors), LANCZOS4 is approximated by
    PIL's 3-lobe Lanczos per channel, NEAREST is cv2's ``src = floor(dst * in/out)``.
    ``backend`` (default :data:`LINEAR_BACKEND`) = "pil" makes LINEAR use PIL's BILINEAR instead.
    """
    w, h = int(size[0]), int(size[1])
    if (h, w) == im.shape[:2]:
        return im.astype(np.float32, copy=True)
    backend = backend or LINEAR_BACKEND
    if backend not in ("cv2", "pil"):
        raise ValueError(f"resize backend must be 'cv2' or 'pil', got {backend!r}")
    if interp == "LINEAR" and backend == "pil":
        return _pil_resize(im, (w, h), Image.BILINEAR)
    if interp == "NEAREST":
        return resize_nearest(im, (w, h)).astype(np.float32)
    if interp == "LANCZOS4":
        return _pil_resize(im, (w, h), Image.LANCZOS)
    mode = {"LINEAR": "bilinear", "CUBIC": "bicubic", "AREA": "area"}[interp]
    t = torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)).permute(2, 0, 1)[None]
    kw = {} if mode == "area" else {"align_corners": False, "antialias": False}
    out = F.interpolate(t, size=(h, w), mode=mode, **kw)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def _pil_resize(im: np.ndarray, size: tuple[int, int], method) -> np.ndarray:
    """PIL resize: on uint8 RGB/L when the values are whole 0..255 (as PIL users feed it),
    else per channel in float mode 'F'."""
    c = im.shape[2]
    if c in (1, 3) and im.min() >= 0 and im.max() <= 255 and np.array_equal(im, np.round(im)):
        pil = Image.fromarray(im.astype(np.uint8) if c == 3 else im[:, :, 0].astype(np.uint8))
        return np.asarray(pil.resize(size, method), np.float32).reshape(size[1], size[0], c)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(im[:, :, i], np.float32), "F")
                        .resize(size, method)) for i in range(c)]
    return np.stack(chans, axis=2).astype(np.float32)


def resize_nearest(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """cv2 INTER_NEAREST for labels (any dtype, HW or HWC): ``src = min(floor(dst*in/out), in-1)``."""
    w, h = int(size[0]), int(size[1])
    ys = np.minimum((np.arange(h) * (arr.shape[0] / h)).astype(np.int64), arr.shape[0] - 1)
    xs = np.minimum((np.arange(w) * (arr.shape[1] / w)).astype(np.int64), arr.shape[1] - 1)
    return arr[ys[:, None], xs[None, :]]


def _resize_pair(im, label, size, interp="LINEAR"):
    im = resize_image(im, size, interp)
    return im, (None if label is None else resize_nearest(label, size))


def _scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(W, H) after scaling, rounded like PaddleSeg's ``resize_long``/``resize_short``."""
    return int(round(w * scale)), int(round(h * scale))


def _pad(arr: np.ndarray, top: int, bottom: int, left: int, right: int, value) -> np.ndarray:
    """Constant padding (cv2.copyMakeBorder BORDER_CONSTANT); ``value`` scalar or per channel."""
    h, w = arr.shape[:2]
    out = np.empty((h + top + bottom, w + left + right) + arr.shape[2:], dtype=arr.dtype)
    out[...] = value
    out[top:top + h, left:left + w] = arr
    return out


# ----------------------------------------------------------------------------- parameter checks
class _ParamError(ValueError):
    """A transform parameter is invalid; ``param`` names it so the config key can be reported."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


def _number(value, name: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _ParamError(name, f"expected a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _ParamError(name, f"expected a value in [{lo}, {hi}], got {value!r}")
    return value


def _int(value, name: str, *, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ParamError(name, f"expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise _ParamError(name, f"expected an integer >= {lo}, got {value!r}")
    return value


def _pair(value, name: str, *, kind=int, lo: float = 1) -> tuple:
    """A ``[W, H]`` pair; a single number means a square, as PaddleSeg's int ``target_size``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    ok_type = (int,) if kind is int else (int, float)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, ok_type) for v in value)):
        raise _ParamError(name, f"expected [width, height] of {kind.__name__}s, got {value!r}")
    if any(v < lo for v in value):
        raise _ParamError(name, f"expected values >= {lo}, got {value!r}")
    return tuple(kind(v) for v in value)


def _fill(value, name: str):
    """Padding value: a number or one number per channel."""
    if isinstance(value, (list, tuple)):
        return tuple(_number(v, name) for v in value)
    return _number(value, name)


# ----------------------------------------------------------------------------- registry
TRANSFORMS: dict[str, type["Transform"]] = {}


def register(cls):
    """Register a transform dataclass under its class name (the YAML ``type``)."""
    TRANSFORMS[cls.__name__] = cls
    return cls


class Transform:
    """Base: ``apply(im float32 HWC, label int64 HW | None, rng) -> (im, label)``.

    ``random`` marks augmentations that evaluation skips (see :meth:`Compose.deterministic`).
    """

    random: ClassVar[bool] = False

    def apply(self, im: np.ndarray, label, rng: np.random.Generator):
        raise NotImplementedError

    @property
    def uses_rng(self) -> bool:
        """Whether ``apply`` draws from ``rng``: the leading ops that don't give the same output
        every time, so datasets may cache it (see :meth:`Compose.static_prefix`)."""
        return self.random

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------- resizing ops
@register
@dataclass
class Resize(Transform):
    """Resize to ``target_size`` [W, H]; ``keep_ratio`` scales by ``min(max(T)/max(I),
    min(T)/min(I))`` (PaddleSeg's ``rescale_size``) instead. Labels always NEAREST."""

    target_size: Any = (512, 512)
    keep_ratio: bool = False
    interp: str = "LINEAR"
    antialias: bool = True  # slimseg's key: False = cv2-style LINEAR (see LINEAR_BACKEND)

    def __post_init__(self):
        self.target_size = _pair(self.target_size, "target_size")
        if not isinstance(self.antialias, bool):
            raise _ParamError("antialias", f"expected true/false, got {self.antialias!r}")
        if self.interp not in INTERPS + ("RANDOM",):
            raise _ParamError("interp", f"expected one of {INTERPS + ('RANDOM',)}, got "
                              f"{self.interp!r}{did_you_mean(str(self.interp), INTERPS)}")
        if not isinstance(self.keep_ratio, bool):
            raise _ParamError("keep_ratio", f"expected true/false, got {self.keep_ratio!r}")

    @property
    def uses_rng(self) -> bool:
        return self.interp == "RANDOM"

    def apply(self, im, label, rng):
        interp = str(rng.choice(INTERPS)) if self.interp == "RANDOM" else self.interp
        size = self.target_size
        if self.keep_ratio:
            h, w = im.shape[:2]
            scale = min(max(size) / max(h, w), min(size) / min(h, w))
            size = _scaled_size(h, w, scale)
        backend = LINEAR_BACKEND if self.antialias else "cv2"
        im = resize_image(im, size, interp, backend=backend)
        return im, (None if label is None else resize_nearest(label, size))


@register
@dataclass
class ResizeByLong(Transform):
    """Scale so that the long side becomes ``long_size``."""

    long_size: int

    def __post_init__(self):
        _int(self.long_size, "long_size", lo=1)

    def apply(self, im, label, rng):
        h, w = im.shape[:2]
        return _resize_pair(im, label, _scaled_size(h, w, self.long_size / max(h, w)))


@register
@dataclass
class ResizeByShort(Transform):
    """Scale so that the short side becomes ``short_size``."""

    short_size: int

    def __post_init__(self):
        _int(self.short_size, "short_size", lo=1)

    def apply(self, im, label, rng):
        h, w = im.shape[:2]
        return _resize_pair(im, label, _scaled_size(h, w, self.short_size / min(h, w)))


@register
@dataclass
class LimitLong(Transform):
    """Scale the long side into ``[min_long, max_long]`` only when it falls outside."""

    max_long: int | None = None
    min_long: int | None = None

    def __post_init__(self):
        for name in ("max_long", "min_long"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, lo=1)
        if self.max_long is not None and self.min_long is not None and self.min_long > self.max_long:
            raise _ParamError("min_long", f"min_long {self.min_long} > max_long {self.max_long}")

    def apply(self, im, label, rng):
        h, w = im.shape[:2]
        long_edge = target = max(h, w)
        if self.max_long is not None and long_edge > self.max_long:
            target = self.max_long
        elif self.min_long is not None and long_edge < self.min_long:
            target = self.min_long
        if target == long_edge:
            return im, label
        return _resize_pair(im, label, _scaled_size(h, w, target / long_edge))


@register
@dataclass
class ResizeRangeScaling(Transform):
    """Random long side in ``[min_value, max_value]`` (rounded), aspect kept."""

    min_value: int = 400
    max_value: int = 600
    random: ClassVar[bool] = True

    def __post_init__(self):
        _int(self.min_value, "min_value", lo=1)
        _int(self.max_value, "max_value", lo=1)
        if self.min_value > self.max_value:
            raise _ParamError("min_value", f"min_value {self.min_value} > max_value {self.max_value}")

    def apply(self, im, label, rng):
        size = self.max_value if self.min_value == self.max_value else \
            int(rng.uniform(self.min_value, self.max_value) + 0.5)
        h, w = im.shape[:2]
        return _resize_pair(im, label, _scaled_size(h, w, size / max(h, w)))


@register
@dataclass
class ResizeStepScaling(Transform):
    """Scale by a factor drawn from ``linspace(min, max, (max-min)/step + 1)`` (uniform when
    ``scale_step_size`` is 0)."""

    min_scale_factor: float = 0.75
    max_scale_factor: float = 1.25
    scale_step_size: float = 0.25
    random: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("min_scale_factor", "max_scale_factor", "scale_step_size"):
            _number(getattr(self, name), name, lo=0)
        if self.min_scale_factor > self.max_scale_factor:
            raise _ParamError("min_scale_factor", f"min_scale_factor {self.min_scale_factor} > "
                              f"max_scale_factor {self.max_scale_factor}")

    def apply(self, im, label, rng):
        lo, hi, step = self.min_scale_factor, self.max_scale_factor, self.scale_step_size
        if lo == hi:
            scale = lo
        elif step == 0:
            scale = rng.uniform(lo, hi)
        else:
            scale = float(rng.choice(np.linspace(lo, hi, int((hi - lo) / step + 1))))
        h, w = im.shape[:2]
        return _resize_pair(im, label, (max(1, int(round(scale * w))), max(1, int(round(scale * h)))))


# ----------------------------------------------------------------------------- value ops
@register
@dataclass
class Normalize(Transform):
    """``(x / 255 - mean) / std`` per channel."""

    mean: Any = (0.5, 0.5, 0.5)
    std: Any = (0.5, 0.5, 0.5)

    def __post_init__(self):
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise _ParamError(name, f"expected a list of numbers, got {value!r}")
            setattr(self, name, tuple(_number(v, name) for v in value))
        if len(self.mean) != len(self.std):
            raise _ParamError("std", f"mean has {len(self.mean)} values but std {len(self.std)}")
        if any(s == 0 for s in self.std):
            raise _ParamError("std", f"std must not contain 0, got {self.std}")

    def apply(self, im, label, rng):
        if len(self.mean) not in (1, im.shape[2]):
            raise ValueError(f"Normalize: {len(self.mean)} mean values for {im.shape[2]} channels")
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (im.astype(np.float32) / 255.0 - mean) / std, label


@register
@dataclass
class RandomDistort(Transform):
    """Brightness/contrast/saturation/hue/sharpness jitter in random order, each with its
    probability, via PIL ImageEnhance on the uint8 image (factor ~ U(1-range, 1+range); hue
    shifts PIL's 0..255 HSV hue by U(-hue_range, hue_range))."""

    brightness_range: float = 0.5
    brightness_prob: float = 0.5
    contrast_range: float = 0.5
    contrast_prob: float = 0.5
    saturation_range: float = 0.5
    saturation_prob: float = 0.5
    hue_range: float = 18
    hue_prob: float = 0.5
    sharpness_range: float = 0.5
    sharpness_prob: float = 0.0
    random: ClassVar[bool] = True
    _ENHANCE: ClassVar[dict] = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                                "saturation": ImageEnhance.Color, "sharpness": ImageEnhance.Sharpness}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            hi = 1 if f.name.endswith("_prob") else None
            _number(getattr(self, f.name), f.name, lo=0, hi=hi)

    def apply(self, im, label, rng):
        if im.shape[2] != 3:
            raise ValueError("RandomDistort needs a 3-channel image")
        pil = Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))
        for op in rng.permutation(["brightness", "contrast", "saturation", "hue", "sharpness"]):
            if rng.uniform(0, 1) >= getattr(self, f"{op}_prob"):
                continue
            r = getattr(self, f"{op}_range")
            if op == "hue":
                hsv = np.asarray(pil.convert("HSV")).copy()
                hsv[:, :, 0] = np.mod(hsv[:, :, 0] + rng.uniform(-r, r), 256).astype(np.uint8)
                pil = Image.fromarray(hsv, mode="HSV").convert("RGB")
            else:
                pil = self._ENHANCE[op](pil).enhance(rng.uniform(1 - r, 1 + r))
        return np.asarray(pil).astype(np.float32), label


def _blur_kernel(kind: str, size: int) -> np.ndarray:
    if kind == "box":
        return np.full(size, 1.0 / size)
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # cv2.getGaussianKernel with sigma <= 0
    k = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _separable(im: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Separable filter with cv2's default border (BORDER_REFLECT_101 = numpy 'reflect')."""
    px, py = len(kx) // 2, len(ky) // 2
    p = np.pad(im, ((py, py), (px, px), (0, 0)), mode="reflect")
    h, w = im.shape[:2]
    rows = sum(kx[i] * p[:, i:i + w] for i in range(len(kx)))
    return sum(ky[i] * rows[i:i + h] for i in range(len(ky))).astype(np.float32)


@register
@dataclass
class RandomBlur(Transform):
    """With probability ~``prob`` (PaddleSeg draws ``randint(0, int(1/prob)) == 0``) blur with
    an odd kernel of 3..9: gaussian (cv2 sigma rule), median, or box ``blur`` (radius x 5)."""

    prob: float = 0.1
    blur_type: str = "gaussian"
    random: ClassVar[bool] = True
    _TYPES: ClassVar[tuple] = ("gaussian", "median", "blur", "random")

    def __post_init__(self):
        _number(self.prob, "prob", lo=0, hi=1)
        if self.blur_type not in self._TYPES:
            raise _ParamError("blur_type", f"expected one of {self._TYPES}, got {self.blur_type!r}")

    def apply(self, im, label, rng):
        n = 0 if self.prob <= 0 else 1 if self.prob >= 1 else int(1.0 / self.prob)
        if n == 0 or rng.integers(0, n) != 0:
            return im, label
        radius = min(int(rng.integers(3, 10)) | 1, 9)
        kind = self.blur_type if self.blur_type != "random" else \
            str(rng.choice(["gaussian", "median", "blur"]))
        im = np.clip(im, 0, 255).astype(np.uint8).astype(np.float32)  # PaddleSeg blurs uint8
        if kind == "median":
            pil = Image.fromarray(im.astype(np.uint8).squeeze())
            im = np.asarray(pil.filter(ImageFilter.MedianFilter(radius)), np.float32).reshape(im.shape)
        elif kind == "gaussian":
            k = _blur_kernel("gaussian", radius)
            im = _separable(im, k, k)
        else:
            im = _separable(im, _blur_kernel("box", radius), _blur_kernel("box", 5))
        return np.round(im).astype(np.float32), label


# ----------------------------------------------------------------------------- geometric ops
@register
@dataclass
class RandomHorizontalFlip(Transform):
    """Mirror image and label left-right with probability ``prob``."""

    prob: float = 0.5
    random: ClassVar[bool] = True

    def __post_init__(self):
        _number(self.prob, "prob", lo=0, hi=1)

    def apply(self, im, label, rng):
        if rng.random() < self.prob:
            return im[:, ::-1], (None if label is None else label[:, ::-1])
        return im, label


@register
@dataclass
class RandomVerticalFlip(Transform):
    """Mirror image and label top-bottom with probability ``prob``."""

    prob: float = 0.1
    random: ClassVar[bool] = True

    def __post_init__(self):
        _number(self.prob, "prob", lo=0, hi=1)

    def apply(self, im, label, rng):
        if rng.random() < self.prob:
            return im[::-1], (None if label is None else label[::-1])
        return im, label


@register
@dataclass
class Padding(Transform):
    """Pad bottom/right up to ``target_size`` [W, H]; an image larger than it is an error."""

    target_size: Any
    im_padding_value: Any = 127.5
    label_padding_value: int = 255

    def __post_init__(self):
        self.target_size = _pair(self.target_size, "target_size")
        self.im_padding_value = _fill(self.im_padding_value, "im_padding_value")
        _int(self.label_padding_value, "label_padding_value", lo=0)

    def apply(self, im, label, rng):
        (tw, th), (h, w) = self.target_size, im.shape[:2]
        if th < h or tw < w:
            raise ValueError(f"Padding: image {w}x{h} is larger than target_size {tw}x{th}")
        return _pad_bottom_right(im, label, th - h, tw - w, self)


def _pad_bottom_right(im, label, ph: int, pw: int, op):
    if ph <= 0 and pw <= 0:
        return im, label
    im = _pad(im, 0, ph, 0, pw, op.im_padding_value)
    return im, (None if label is None else _pad(label, 0, ph, 0, pw, op.label_padding_value))


@register
@dataclass
class PaddingByAspectRatio(Transform):
    """Pad bottom/right so that width / height == ``aspect_ratio``."""

    aspect_ratio: float = 1
    im_padding_value: Any = 127.5
    label_padding_value: int = 255

    def __post_init__(self):
        _number(self.aspect_ratio, "aspect_ratio", lo=1e-6)
        self.im_padding_value = _fill(self.im_padding_value, "im_padding_value")
        _int(self.label_padding_value, "label_padding_value", lo=0)

    def apply(self, im, label, rng):
        h, w = im.shape[:2]
        if w / h > self.aspect_ratio:
            h = int(w / self.aspect_ratio)
        else:
            w = int(h * self.aspect_ratio)
        return _pad_bottom_right(im, label, h - im.shape[0], w - im.shape[1], self)


@register
@dataclass
class RandomPaddingCrop(Transform):
    """Pad bottom/right to at least ``crop_size`` [W, H], then crop a random window. With
    ``category_max_ratio`` < 1 it retries (``loop_times``) until no class covers more than that
    share of the non-ignored crop pixels."""

    crop_size: Any = (512, 512)
    im_padding_value: Any = 127.5
    label_padding_value: int = 255
    category_max_ratio: float = 1.0
    ignore_index: int = 255
    loop_times: int = 10
    random: ClassVar[bool] = True

    def __post_init__(self):
        self.crop_size = _pair(self.crop_size, "crop_size")
        self.im_padding_value = _fill(self.im_padding_value, "im_padding_value")
        _int(self.label_padding_value, "label_padding_value", lo=0)
        _number(self.category_max_ratio, "category_max_ratio", lo=0, hi=1)
        _int(self.ignore_index, "ignore_index")
        _int(self.loop_times, "loop_times", lo=1)

    def apply(self, im, label, rng):
        cw, ch = self.crop_size
        if im.shape[:2] == (ch, cw):
            return im, label
        im, label = _pad_bottom_right(im, label, ch - im.shape[0], cw - im.shape[1], self)
        h, w = im.shape[:2]
        tries = self.loop_times if (label is not None and self.category_max_ratio < 1) else 1
        for _ in range(tries):
            y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            crop = None if label is None else label[y:y + ch, x:x + cw]
            if tries == 1 or _max_class_ratio(crop, self.ignore_index) < self.category_max_ratio:
                break
        return im[y:y + ch, x:x + cw], crop


def _max_class_ratio(label: np.ndarray, ignore_index: int) -> float:
    _, counts = np.unique(label[label != ignore_index], return_counts=True)
    return float(counts.max() / counts.sum()) if counts.size > 1 else 1.0


@register
@dataclass
class RandomCenterCrop(Transform):
    """Crop a random window keeping at least ``retain_ratio`` [W, H] of each side."""

    retain_ratio: Any = (0.5, 0.5)
    random: ClassVar[bool] = True

    def __post_init__(self):
        self.retain_ratio = _pair(self.retain_ratio, "retain_ratio", kind=float, lo=0)
        if any(r > 1 for r in self.retain_ratio):
            raise _ParamError("retain_ratio", f"expected values in [0, 1], got {self.retain_ratio}")

    def apply(self, im, label, rng):
        h, w = im.shape[:2]
        cut_w = int(rng.integers(max(1, int(w * (1 - self.retain_ratio[0])))))
        cut_h = int(rng.integers(max(1, int(h * (1 - self.retain_ratio[1])))))
        x = int(rng.integers(cut_w)) if cut_w else 0
        y = int(rng.integers(cut_h)) if cut_h else 0
        box = (slice(y, h + y - cut_h), slice(x, w + x - cut_w))
        return im[box], (None if label is None else label[box])


def _warp_affine(arr: np.ndarray, inv: np.ndarray, out_hw, fill, nearest: bool) -> np.ndarray:
    """cv2.warpAffine with BORDER_CONSTANT: each output pixel samples ``inv @ (x, y, 1)``;
    neighbours outside the source read ``fill`` (bilinear) or the pixel is ``fill`` (nearest)."""
    h, w = out_hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    src = _pad(arr, 1, 1, 1, 1, fill)  # one ring of fill so border taps read it
    H, W = arr.shape[:2]
    if nearest:
        xi, yi = np.round(sx).astype(np.int64), np.round(sy).astype(np.int64)
        xi, yi = np.clip(xi, -1, W) + 1, np.clip(yi, -1, H) + 1
        return src[yi, xi]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0 = np.clip(x0.astype(np.int64), -1, W) + 1
    y0 = np.clip(y0.astype(np.int64), -1, H) + 1
    x1, y1 = np.minimum(x0 + 1, W + 1), np.minimum(y0 + 1, H + 1)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bot = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


@register
@dataclass
class RandomRotation(Transform):
    """Rotate by U(-max_rotation, max_rotation) degrees about the centre, growing the canvas to
    hold the whole rotated image (cv2.getRotationMatrix2D + warpAffine, as PaddleSeg)."""

    max_rotation: float = 15
    im_padding_value: Any = 127.5
    label_padding_value: int = 255
    random: ClassVar[bool] = True

    def __post_init__(self):
        _number(self.max_rotation, "max_rotation", lo=0)
        self.im_padding_value = _fill(self.im_padding_value, "im_padding_value")
        _int(self.label_padding_value, "label_padding_value", lo=0)

    def apply(self, im, label, rng):
        if self.max_rotation <= 0:
            return im, label
        h, w = im.shape[:2]
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        a, b = math.cos(angle), math.sin(angle)
        cx, cy = w // 2, h // 2
        nw, nh = int(h * abs(b) + w * abs(a)), int(h * abs(a) + w * abs(b))
        fwd = np.array([[a, b, (1 - a) * cx - b * cy + nw / 2 - cx],
                        [-b, a, b * cx + (1 - a) * cy + nh / 2 - cy], [0, 0, 1]])
        inv = np.linalg.inv(fwd)
        im = _warp_affine(im, inv, (nh, nw), self.im_padding_value, nearest=False)
        if label is not None:
            label = _warp_affine(label, inv, (nh, nw), self.label_padding_value, nearest=True)
        return im, label


@register
@dataclass
class RandomScaleAspect(Transform):
    """Up to 10 tries: crop area ~U(min_scale, 1) with aspect ~U(aspect_ratio, 1/aspect_ratio)
    (sides swapped half the time), then resize the crop back to the original size."""

    min_scale: float = 0.5
    aspect_ratio: float = 0.33
    random: ClassVar[bool] = True

    def __post_init__(self):
        _number(self.min_scale, "min_scale", lo=0, hi=1)
        _number(self.aspect_ratio, "aspect_ratio", lo=0, hi=1)

    def apply(self, im, label, rng):
        if self.min_scale == 0 or self.aspect_ratio == 0:
            return im, label
        h, w = im.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(self.min_scale, 1.0)
            ratio = rng.uniform(self.aspect_ratio, 1.0 / self.aspect_ratio)
            dw, dh = int(np.sqrt(area * ratio)), int(np.sqrt(area / ratio))
            if rng.integers(10) < 5:
                dw, dh = dh, dw
            if dh < h and dw < w:
                y, x = int(rng.integers(0, h - dh)), int(rng.integers(0, w - dw))
                crop = (slice(y, y + dh), slice(x, x + dw))
                lab = None if label is None else label[crop]
                return _resize_pair(im[crop], lab, (w, h))
        return im, label


# ----------------------------------------------------------------------------- compose
class Compose:
    """Run a list of transform specs (PaddleSeg YAML dicts) on one image (and label).

    Input: HWC (or HW) uint8 RGB image, optional HW label. Output: CHW float32 image (raw 0..255
    values unless a Normalize is in the list, as in PaddleSeg) and HW int64 label or None.
    """

    def __init__(self, transforms: list, *, source: str = "<config>", key: str = "transforms"):
        self.source = source
        self.key = key
        self.ops: list[Transform] = [
            t if isinstance(t, Transform) else _build_one(t, source, f"{key}[{i}]")
            for i, t in enumerate(_as_list(transforms, source, key))]

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None, *, rng=None):
        im, lab = self.run(*self.start(image, label), rng=rng)
        return self.finish(im, lab)

    # The three steps of __call__, for datasets that cache the static prefix's output.
    @staticmethod
    def start(image: np.ndarray, label: np.ndarray | None = None):
        """Input to the ops: HWC float32 image, int64 label."""
        im = np.asarray(image)
        im = (im[:, :, None] if im.ndim == 2 else im).astype(np.float32)
        return im, (None if label is None else np.asarray(label).astype(np.int64))

    def run(self, im: np.ndarray, lab, *, rng=None, first: int = 0, stop: int | None = None):
        """Ops ``first..stop`` on an HWC float32 image (output of :meth:`start` or of a prefix)."""
        rng = rng if rng is not None else np.random.default_rng()
        for op in self.ops[first:stop]:
            im, lab = op.apply(im, lab, rng)
        return im, lab

    @staticmethod
    def finish(im: np.ndarray, lab):
        """CHW float32 image, int64 label: what the model and the metrics take."""
        im = np.ascontiguousarray(im.transpose(2, 0, 1), dtype=np.float32)
        return im, (None if lab is None else np.ascontiguousarray(lab, dtype=np.int64))

    def static_prefix(self) -> int:
        """How many leading ops give the same output every time (no random draw): their
        output can be cached, and skipping them leaves the random stream of the rest as is."""
        count = 0
        for op in self.ops:
            if op.uses_rng:
                break
            count += 1
        return count

    def deterministic(self) -> "Compose":
        """The same pipeline without random augmentations (what evaluation runs)."""
        return Compose([op for op in self.ops if not op.random], source=self.source, key=self.key)

    def to_list(self) -> list[dict]:
        """The resolved specs (every parameter, defaults included) for reports/round trips."""
        return [op.to_dict() for op in self.ops]

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return f"Compose({[type(op).__name__ for op in self.ops]})"


def build_transforms(specs: list, *, source: str = "<config>", key: str = "transforms") -> Compose:
    """Build a :class:`Compose` from YAML-style dicts, validating every name and parameter."""
    return Compose(specs, source=source, key=key)


def _as_list(specs, source: str, key: str) -> list:
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"expected a list of transforms, got {type(specs).__name__}",
                          file=source, key=key)
    return list(specs)


def _build_one(spec, source: str, key: str) -> Transform:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"expected a mapping with a 'type', got {spec!r}", file=source, key=key)
    params = dict(spec)
    name = params.pop("type")
    cls = TRANSFORMS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown transform {name!r}{did_you_mean(str(name), TRANSFORMS)}; "
                          f"supported: {', '.join(sorted(TRANSFORMS))}", file=source, key=f"{key}.type")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for p in params:
        if p not in fields:
            raise ConfigError(f"unknown parameter of {name}{did_you_mean(p, fields)}; expected one "
                              f"of {', '.join(fields)}", file=source, key=f"{key}.{p}")
    for p, f in fields.items():
        if p not in params and f.default is dataclasses.MISSING:
            raise ConfigError(f"{name} needs the parameter {p!r}", file=source, key=f"{key}.{p}")
    try:
        return cls(**params)
    except _ParamError as err:
        raise ConfigError(f"{name}: {err}", file=source, key=f"{key}.{err.param}") from None
