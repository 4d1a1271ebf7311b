"""Video in and out for `slimseg predict`, through imageio (optional extra ``slimseg[video]``).

Reading uses imageio's v3 API with its ffmpeg plugin (``imageio.v3.imiter``): frames stream one
at a time as RGB uint8 HWC arrays, so a long video never sits in memory. Writing streams too,
through ``imageio_ffmpeg.write_frames`` (the encoder the ffmpeg plugin itself drives): imageio's
v3 ``imwrite`` wants the whole clip as one array, which for a minute of 1080p is ~10 GB.
Both packages are imported lazily; without them a MissingDependencyError says how to install.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from slimseg.errors import DataError, MissingDependencyError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
PURPOSE = "reading and writing video"


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(package, "video", PURPOSE) from None


@dataclass
class VideoInfo:
    fps: float
    size: tuple[int, int]        # (W, H)
    frames: int | None           # as the container declares it (may be missing or approximate)


def video_info(path) -> VideoInfo:
    """fps, frame size and declared frame count of a video file."""
    iio = _require("imageio.v3", "imageio")
    _require("imageio_ffmpeg", "imageio-ffmpeg")
    try:
        meta = iio.immeta(path, plugin="FFMPEG")
    except Exception as err:  # imageio/ffmpeg raise OSError, RuntimeError, ... for bad files
        raise DataError(f"cannot read video {path}: {err}") from err
    fps = float(meta.get("fps") or 0) or 25.0
    size = tuple(int(s) for s in meta.get("size") or (0, 0))
    duration = meta.get("duration")
    frames = meta.get("nframes")
    if not isinstance(frames, int) or frames <= 0 or frames == float("inf"):
        frames = int(round(duration * fps)) if duration and duration != float("inf") else None
    return VideoInfo(fps, size, frames)


def read_frames(path) -> Iterator[np.ndarray]:
    """The frames of `path`, one RGB uint8 (H, W, 3) array at a time."""
    iio = _require("imageio.v3", "imageio")
    _require("imageio_ffmpeg", "imageio-ffmpeg")
    try:
        for frame in iio.imiter(path, plugin="FFMPEG"):
            yield np.ascontiguousarray(frame[..., :3])
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"cannot decode video {path}: {err}") from err


@contextmanager
def video_writer(path, *, fps: float, size: tuple[int, int], quality: int = 8):
    """Yield ``write(frame)`` that appends RGB uint8 (H, W, 3) frames to an H.264 file.

    ``macro_block_size=2``: yuv420p needs even sizes only; the default 16 would rescale a
    64x48 or 1920x1080 clip. Odd sizes are padded by one pixel by ffmpeg's own filter.
    """
    ffmpeg = _require("imageio_ffmpeg", "imageio-ffmpeg")
    width, height = int(size[0]), int(size[1])
    gen = ffmpeg.write_frames(str(path), (width, height), fps=fps, quality=quality,
                              macro_block_size=2, pix_fmt_in="rgb24", ffmpeg_log_level="error")
    gen.send(None)

    def write(frame: np.ndarray) -> None:
        if frame.shape[:2] != (height, width):
            raise DataError(f"video frame is {frame.shape[1]}x{frame.shape[0]}, expected {width}x{height}")
        gen.send(np.ascontiguousarray(frame, dtype=np.uint8))

    try:
        yield write
    finally:
        gen.close()
