"""Datasets: PaddleSeg list files (``image_path label_path`` per line) and plain image folders.

Images are read with PIL as RGB (what PaddleSeg feeds the model); labels are single-channel
PNGs whose stored index values are the classes (a palette 'P' image is *not* converted to RGB).

Modes follow PaddleSeg's evaluation protocol:
* ``train``: the transforms act on image and label together (label resized NEAREST), random
  augmentations on; each item draws from ``default_rng([seed, epoch, index])`` so a run is
  reproducible whatever the number of DataLoader workers (call ``set_epoch`` every epoch).
* ``val`` / ``test``: random augmentations are dropped, the transforms act on the image only
  and the label keeps its original size: predictions are resized back to it before scoring.

The ``edge`` key is accepted for compatibility and ignored (no edge maps are produced).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from slimseg.data.config import FOLDER_TYPES, DatasetConfig, DatasetSpec, load_dataset_config
from slimseg.data.transforms import Compose
from slimseg.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """One item: CHW float32 image, HW int64 label (or None when unlabeled), image path."""

    image: np.ndarray
    label: np.ndarray | None
    path: str


@dataclass(frozen=True)
class ListItem:
    image: Path
    label: Path | None


# ----------------------------------------------------------------------------- file reading
def load_image(path, channels: int = 3) -> np.ndarray:
    """HWC uint8 RGB (or HW1 gray for ``channels=1``); DataError for a missing/corrupt file."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err} (corrupt or not an image: replace the file "
                        "or remove it from the list)") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def load_label(path) -> np.ndarray:
    """HW int64 of the stored values ('P' palette indices or 'L'/'I' values, as they are)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"label not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot read label {path}: {err} (corrupt or not an image: replace the file "
                        "or remove it from the list)") from None
    if arr.ndim != 2:
        raise DataError(f"label {path} must be a single-channel image ('P' or 'L'), got mode {mode!r}")
    return arr.astype(np.int64)


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, path) -> None:
    """Every value must be a class in [0, num_classes) or ``ignore_index``."""
    values = np.unique(label)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise DataError(f"label {path} has values {shown} outside [0, {num_classes}) "
                        f"(num_classes={num_classes}, ignore_index={ignore_index}): fix the label, or set "
                        "num_classes / ignore_index in the dataset YAML to cover them")


def read_list(list_path: Path, dataset_root: Path, separator: str = " ") -> list[ListItem]:
    """Parse a list file; paths are relative to ``dataset_root``; every file must exist."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"list file not found: {list_path}")
    items = []
    with open(list_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.strip().split(separator) if line.strip() else []
            parts = [p.strip() for p in parts if p.strip()]
            if not parts:
                continue
            if len(parts) > 2:
                raise DataError(f"{list_path}:{lineno}: expected 'image_path{separator}label_path', "
                                f"got {len(parts)} fields in {line.strip()!r}")
            paths = [dataset_root / p for p in parts]
            for kind, p in zip(("image", "label"), paths):
                if not p.is_file():
                    raise DataError(f"{list_path}:{lineno}: {kind} file not found: {p} (fix that line, "
                                    "or dataset_root in the dataset YAML)")
            items.append(ListItem(paths[0], paths[1] if len(paths) == 2 else None))
    if not items:
        raise DataError(f"list file {list_path} lists no images: add lines 'image_path label_path' "
                        "(relative to dataset_root)")
    return items


def scan_images(root) -> list[Path]:
    """Image files under ``root`` (recursive, common extensions, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


# ----------------------------------------------------------------------------- datasets
class _Seeded:
    """Per-item random generators from (seed, epoch, index): reproducible, worker-independent."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


def _as_compose(transforms, spec_default: list, source: str, key: str) -> Compose:
    if isinstance(transforms, Compose):
        return transforms
    return Compose(spec_default if transforms is None else transforms, source=source, key=key)


class SegDataset(_Seeded, torch.utils.data.Dataset):
    """A PaddleSeg ``type: Dataset`` section as a torch Dataset of :class:`Sample`."""

    def __init__(self, spec: DatasetSpec, *, mode: str | None = None, transforms=None, seed: int = 0):
        self.spec = spec
        self.mode = mode or spec.mode
        self.seed = seed
        key = f"{spec.section}.transforms" if spec.section else "transforms"
        compose = _as_compose(transforms, spec.transforms, spec.source, key)
        self.transforms = compose if self.mode == "train" else compose.deterministic()
        self.items = self._items()

    def _items(self) -> list[ListItem]:
        spec = self.spec
        list_path = spec.list_paths.get(self.mode, spec.list_path if self.mode == spec.mode else None)
        if not Path(spec.dataset_root).is_dir():
            raise DataError(f"dataset_root not found: {spec.dataset_root} ({spec.section or 'dataset'} "
                            f"in {spec.source})")
        if spec.type in FOLDER_TYPES:  # e.g. Cityscapes: pairs found by scanning its layout
            return importlib.import_module(FOLDER_TYPES[spec.type]).list_items(spec, self.mode)
        if list_path is None:
            raise ConfigError(f"mode {self.mode!r} needs a list file: add {self.mode}_path "
                              "(for unlabeled images in a folder use ImageFolder)",
                              file=spec.source, key=f"{spec.section}.{self.mode}_path")
        return read_list(list_path, Path(spec.dataset_root), spec.separator)

    @property
    def labeled(self) -> bool:
        return all(item.label is not None for item in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def cache_decoded(self, max_bytes: int = 1 << 30) -> None:
        """Keep images (and labels) in memory (up to `max_bytes`), as they come out of the
        transforms' static prefix (decode + e.g. the Resize before the random augmentations),
        for loops that read every image many times: decoding and resizing a JPEG cost ~40 ms of
        a sample that then takes ~3 ms. The random stream of the remaining ops is unchanged,
        so cached samples equal uncached ones bit for bit."""
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._cache_room = int(max_bytes)

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        item = self.items[index]
        image = load_image(item.image, self.spec.img_channels)
        label = None
        if item.label is not None:
            label = load_label(item.label)
            check_label(label, self.spec.num_classes, self.spec.ignore_index, item.label)
            if label.shape != image.shape[:2]:
                raise DataError(f"label {item.label} is {label.shape[1]}x{label.shape[0]} but image "
                                f"{item.image} is {image.shape[1]}x{image.shape[0]}")
        return image, label

    def _prefixed(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """(HWC float32 image, int64 label, ops done): after the static prefix when cached."""
        cache = getattr(self, "_cache", None)
        done = self.transforms.static_prefix() if cache is not None else 0
        if cache is not None and index in cache:
            image, label = cache[index]
            return (image.astype(np.float32), None if label is None else label.astype(np.int64), done)
        image, label = self._decoded(index)
        im, lab = Compose.start(image, label)
        # train: the label goes through the transforms; val/test: it keeps its size
        im, moved = self.transforms.run(im, lab if self.mode == "train" else None, stop=done)
        lab = moved if self.mode == "train" else lab
        if cache is not None:
            # int64 labels fit uint8 almost always: 8x less memory cached
            small = None if lab is None else lab.astype(np.uint8 if 0 <= lab.min() and lab.max() <= 255
                                                        else np.int32)
            kept = _compact_image(im)
            size = kept.nbytes + (0 if small is None else small.nbytes)
            if size <= self._cache_room:
                kept.flags.writeable = False  # an op editing it in place would corrupt the cache
                cache[index] = (kept, small)
                self._cache_room -= size
        return im, lab, done

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        im, label, done = self._prefixed(index)
        if self.mode == "train":
            im, label = self.transforms.run(im, label, rng=self._rng(index), first=done)
            im, label = Compose.finish(im, label)
        else:
            im, _ = self.transforms.run(im, None, rng=self._rng(index), first=done)
            im, label = Compose.finish(im, label)
        return Sample(im, label, str(item.image))


def _compact_image(im: np.ndarray) -> np.ndarray:
    """uint8 when the values are whole numbers in 0..255 (decoded or resized pixels, before
    Normalize): 4x less memory, and converting back to float32 is exact."""
    if im.dtype == np.float32 and im.size and im.min() >= 0 and im.max() <= 255 \
            and np.array_equal(im, np.round(im)):
        return im.astype(np.uint8)
    return im


class ImageFolder(_Seeded, torch.utils.data.Dataset):
    """Unlabeled images under a folder (recursive, sorted): data for label-free distillation."""

    def __init__(self, root, transforms=None, *, seed: int = 0, channels: int = 3):
        self.root = Path(root)
        self.seed = seed
        self.channels = channels
        self.transforms = _as_compose(transforms, [], str(root), "transforms")
        self.files = scan_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        im, _ = self.transforms(load_image(path, self.channels), None, rng=self._rng(index))
        return Sample(im, None, str(path))


def collate(samples: list[Sample]) -> dict:
    """Batch samples: ``image`` NCHW float32, ``label`` NHW int64 (None if unlabeled), ``path``."""
    paths = [s.path for s in samples]
    _same_shapes([s.image for s in samples], paths, "image")
    labels = [s.label for s in samples]
    n_labeled = sum(lab is not None for lab in labels)
    if 0 < n_labeled < len(labels):
        raise DataError(f"batch mixes labeled and unlabeled samples: {paths}")
    if n_labeled:
        _same_shapes(labels, paths, "label")
    return {"image": torch.from_numpy(np.stack([s.image for s in samples])),
            "label": torch.from_numpy(np.stack(labels)).long() if n_labeled else None,
            "path": paths}


def _same_shapes(arrays, paths, what: str) -> None:
    for arr, path in zip(arrays[1:], paths[1:]):
        if arr.shape != arrays[0].shape:
            raise DataError(f"cannot batch {what}s of different shapes: {paths[0]} {arrays[0].shape} "
                            f"vs {path} {arr.shape}; use batch_size 1 or a Resize transform")


def calibration_batches(dataset: "SegDataset", val: "SegDataset", count: int, batch: int) -> list[torch.Tensor]:
    """The first ``count`` images of ``dataset`` through ``val``'s transforms (calibration and
    reconstruction want the deployed preprocessing, not augmentation), in stacks of ``batch``."""
    plain = SegDataset(dataset.spec, mode=dataset.mode, transforms=val.transforms)
    images = [torch.from_numpy(plain[i].image) for i in range(min(count, len(plain)))]
    return [torch.stack(images[i:i + batch]) for i in range(0, len(images), batch)]


def build_dataset(cfg_or_path, split: str = "val", *, transforms=None, seed: int = 0) -> SegDataset:
    """The ``split`` ('train', 'val' or 'test') of a dataset config or YAML path.

    'test' reads ``test_path`` of the val section (else the train section)."""
    cfg = cfg_or_path if isinstance(cfg_or_path, DatasetConfig) else load_dataset_config(cfg_or_path)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}; expected train, val or test", file=cfg.source)
    if split == "train":
        spec = cfg.train
    elif split == "val":
        spec = cfg.val
    else:
        spec = next((s for s in (cfg.val, cfg.train) if s is not None and "test" in s.list_paths),
                    cfg.val or cfg.train)
    if spec is None:
        raise ConfigError(f"no {split}_dataset section", file=cfg.source, key=f"{split}_dataset")
    return SegDataset(spec, mode=split, transforms=transforms, seed=seed)
