"""``type: Cityscapes``: the Cityscapes folder layout, found by scanning instead of list files.

PaddleSeg's ``Cityscapes`` dataset (and the seed's ``mini_cityscapes`` sample) reads
``dataset_root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with labels in
``dataset_root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``: 19 train ids, 255 =
ignore (produced by cityscapesscripts' ``createTrainIdLabelImgs``). Pairs are matched by
``<city>/<name>``; an image without its label is an error, not a silent skip.
"""
from __future__ import annotations

from pathlib import Path

from slimseg.errors import DataError

NUM_CLASSES = 19
IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelTrainIds.png"
CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
           "motorcycle", "bicycle")


def list_items(spec, mode: str) -> list:
    """The (image, label) pairs of split ``mode`` under ``spec.dataset_root``, sorted by name."""
    from slimseg.data.datasets import ListItem  # datasets imports this module lazily

    root = Path(spec.dataset_root)
    images_dir, labels_dir = root / IMAGE_DIR / mode, root / LABEL_DIR / mode
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"Cityscapes split {mode!r}: folder not found: {folder} (expected "
                            f"{IMAGE_DIR}/{mode}/<city>/*{IMAGE_SUFFIX} and "
                            f"{LABEL_DIR}/{mode}/<city>/*{LABEL_SUFFIX} under dataset_root {root}, "
                            f"{spec.section or 'dataset'} in {spec.source})")
    images = {_key(p, IMAGE_SUFFIX): p for p in images_dir.glob(f"*/*{IMAGE_SUFFIX}")}
    labels = {_key(p, LABEL_SUFFIX): p for p in labels_dir.glob(f"*/*{LABEL_SUFFIX}")}
    if not images:
        raise DataError(f"Cityscapes split {mode!r}: no *{IMAGE_SUFFIX} under {images_dir}/<city>/")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"Cityscapes split {mode!r}: {len(missing)} image(s) without a "
                        f"*{LABEL_SUFFIX} label, e.g. {images[missing[0]]} (expected "
                        f"{labels_dir / (missing[0] + LABEL_SUFFIX)})")
    return [ListItem(images[k], labels[k]) for k in sorted(images)]


def _key(path: Path, suffix: str) -> str:
    return f"{path.parent.name}/{path.name[:-len(suffix)]}"
