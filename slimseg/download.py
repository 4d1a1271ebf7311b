"""`download(name)`: the seed's public model and datasets, cached, checked and extracted.

A registry (:data:`ASSETS`) names each asset with its official URL(s) from PaddleSlim's
``example/auto_compression/semantic_segmentation`` and PaddleSeg's ``contrib/PP-HumanSeg``.
Only the standard library talks to the network (``urllib``), and only to those URLs or a
``url=`` mirror the user gives.

Steps, each safe to interrupt:

1. fetch ``<cache>/downloads/<file>.part``; an existing ``.part`` is resumed with an HTTP
   ``Range: bytes=<size>-`` request (a server that ignores it answers 200: start over);
   a connection cut mid-transfer is resumed the same way, a few times;
2. check sha256: against the registry's value, or, when the registry has none (its value
   could not be known when the entry was written), against ``<file>.sha256`` pinned by the
   first download (trust on first use; the value is printed). A mismatch deletes the file;
3. rename ``.part`` to ``<file>``, extract (.zip/.tar/.tar.gz) into a temporary folder
   (members that would land outside it, links and devices are refused) and rename that to
   ``<cache>/<name>``. The cache is ``$SLIMSEG_CACHE`` or ``~/.cache/slimseg``.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from slimseg.errors import ConfigError, DataError, SlimsegError, did_you_mean

log = logging.getLogger("slimseg")

CHUNK = 1 << 16
TIMEOUT_S = 30
RESUME_ATTEMPTS = 3


@dataclass(frozen=True)
class Asset:
    name: str
    urls: tuple[str, ...]      # official URL first, then mirrors
    description: str
    sha256: str | None = None  # None: pinned on first download (see module docstring)
    aliases: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return PurePosixPath(self.urls[0].split("?")[0]).name


ASSETS: dict[str, Asset] = {}


def register_asset(asset: Asset) -> Asset:
    ASSETS[asset.name] = asset
    return asset


register_asset(Asset(
    "ppseg_lite_portrait_398x224_with_softmax",
    ("https://paddleseg.bj.bcebos.com/dygraph/ppseg/ppseg_lite_portrait_398x224_with_softmax.tar.gz",
     "https://bj.bcebos.com/v1/paddlemodels/PaddleSlim/analysis/ppseg_lite_portrait_398x224_with_softmax.tar.gz"),
    "PP-HumanSeg-Lite portrait inference model (Paddle, 1x3x224x398, softmax, 2 classes)",
    aliases=("pp_humanseg_lite_portrait", "pp_humanseg_lite")))
register_asset(Asset(
    "mini_supervisely",
    ("https://paddleseg.bj.bcebos.com/humanseg/data/mini_supervisely.zip",),
    "PaddleSeg's mini Supervisely Person sample (human segmentation, 2 classes, list files)",
    aliases=("mini_humanseg",)))
register_asset(Asset(
    "mini_cityscapes",
    ("https://bj.bcebos.com/v1/paddle-slim-models/data/mini_cityscapes/mini_cityscapes.tar",),
    "PaddleSlim's mini Cityscapes subset (19 classes)"))


def resolve_asset(name: str) -> Asset:
    """The registered asset called `name` (or one of its aliases)."""
    for asset in ASSETS.values():
        if name == asset.name or name in asset.aliases:
            return asset
    names = [*ASSETS, *(a for asset in ASSETS.values() for a in asset.aliases)]
    raise ConfigError(f"unknown asset {name!r}{did_you_mean(name, names)}; known: {', '.join(ASSETS)} "
                      "(slimseg download --list)", key="name")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLIMSEG_CACHE") or Path.home() / ".cache" / "slimseg")


def download(name: str, *, cache_dir=None, force: bool = False, progress: bool = True,
             url: str | None = None) -> Path:
    """Download, check and extract asset `name`; returns its folder in the cache.

    An asset already extracted is returned at once unless `force`. `url` replaces the
    registry's URLs (a mirror); the sha256 check still applies.
    """
    asset = resolve_asset(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / asset.name
    if target.is_dir() and not force:
        return target
    archive = cache / "downloads" / asset.filename
    if force:
        archive.unlink(missing_ok=True)
    if not archive.is_file():
        fetch_any((url,) if url else asset.urls, archive, sha256=asset.sha256, progress=progress)
    else:
        verify(archive, asset.sha256)
    return extract(archive, target)


# --- fetching -------------------------------------------------------------------------------

def fetch_any(urls, dest: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """:func:`fetch` from the first of `urls` that answers; the error names every URL tried."""
    errors = []
    for url in urls:
        try:
            return fetch(url, dest, sha256=sha256, progress=progress)
        except _Unreachable as err:
            errors.append(str(err))
    raise DataError("; ".join(errors) + ". Check the network connection, or pass a mirror with --url")


class _Unreachable(DataError):
    """The server could not be reached or refused the file (another mirror may work)."""


def fetch(url: str, dest: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download `url` to `dest` through ``dest.part`` (resumed), check sha256, rename."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SlimsegError(f"cannot create cache folder {dest.parent}: {err.strerror or err}") from err
    for attempt in range(RESUME_ATTEMPTS + 1):
        try:
            _transfer(url, part, progress)
            break
        except _Truncated as err:
            if attempt == RESUME_ATTEMPTS:
                raise DataError(f"download of {url} keeps breaking off ({err}); run the command again to "
                                f"resume from {part.stat().st_size} bytes") from None
            log.info("%s: %s; resuming", url, err)
    verify(part, sha256, pinned=dest.with_name(dest.name + ".sha256"), url=url)
    os.replace(part, dest)
    return dest


class _Truncated(Exception):
    """The connection ended before the announced length; the .part file is kept for a resume."""


def _transfer(url: str, part: Path, progress: bool) -> None:
    """One HTTP request: append to `part` (206 answer to a Range request) or restart it (200)."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "slimseg", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part is already complete (or stale): start over
            part.unlink()
            return _transfer(url, part, progress)
        raise _Unreachable(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise _Unreachable(f"cannot download {url}: {reason}") from None
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = offset and response.status == 206 and content_range.startswith(f"bytes {offset}-")
        if offset and not resumed:
            if response.status == 206:  # a range we did not ask for: ask for everything
                part.unlink()
                return _transfer(url, part, progress)
            log.info("%s: the server ignored the resume request; starting over", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        _copy(response, part, offset, total, progress, url)


def _copy(response, part: Path, offset: int, total: int | None, progress: bool, url: str) -> None:
    from tqdm import tqdm

    done = offset
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=PurePosixPath(url).name, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.IncompleteRead, OSError) as err:
                raise _Truncated(f"connection lost after {done} bytes: {err}") from None
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    if total is not None and done < total:
        raise _Truncated(f"connection closed after {done} of {total} bytes")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, sha256: str | None, *, pinned: Path | None = None, url: str | None = None) -> str:
    """Check `path` against `sha256`, else against the hash pinned in `pinned` (default
    ``<path>.sha256``); with neither, pin the file's hash there. A mismatch deletes `path`."""
    path = Path(path)
    pinned = pinned or path.with_name(path.name + ".sha256")
    actual = file_sha256(path)
    expected = sha256 or (pinned.read_text().split()[0] if pinned.is_file() else None)
    if expected is None:
        pinned.write_text(f"{actual}  {path.name.removesuffix('.part')}\n")
        log.info("sha256 %s  %s (no published checksum: pinned in %s, later downloads must match)",
                 actual, pinned.name.removesuffix(".sha256"), pinned)
    elif actual != expected.lower():
        path.unlink(missing_ok=True)
        where = "the registry" if sha256 else str(pinned)
        raise DataError(f"sha256 mismatch for {url or path}: expected {expected} ({where}), got {actual}; "
                        f"the file was deleted (delete {pinned} if the upstream file really changed)")
    return actual


# --- extracting -----------------------------------------------------------------------------

def extract(archive: Path, target: Path) -> Path:
    """Unpack `archive` (.zip, .tar, .tar.gz/.tgz) to `target`, atomically; an archive holding
    one top folder is unpacked without it, so `target` holds the files themselves."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _unpack(archive, tmp / "x")
        entries = list((tmp / "x").iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp / "x"
        if target.exists():
            shutil.rmtree(target)
        os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DataError(f"{archive}: refusing symbolic link {info.filename!r}")
                zf.extractall(dest)
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_member(member.name, archive)
                    if not (member.isfile() or member.isdir()):
                        raise DataError(f"{archive}: refusing {member.name!r} (links and devices are not extracted)")
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(dest, **kwargs)
        else:
            raise DataError(f"{archive}: unknown archive type (expected .zip, .tar, .tar.gz or .tgz)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{archive}: corrupt archive ({err}); run again with --force to download it anew") from err


def _check_member(member: str, archive: Path) -> None:
    """Refuse absolute paths and '..': a member must land inside the extraction folder."""
    path = PurePosixPath(member.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise DataError(f"{archive}: refusing member {member!r} that would be written outside the cache folder")
