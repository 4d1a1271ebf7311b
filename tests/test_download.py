"""`slimseg download`: against a local HTTP server on 127.0.0.1 serving archives the test makes.

Nothing here reaches beyond loopback: proxies are switched off and every outgoing connection
is checked by a guard on socket.create_connection.
"""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slimseg import download as dl
from slimseg.cli import main
from slimseg.errors import ConfigError, DataError

PAYLOAD = bytes(range(256)) * 800  # 200 KiB: several read chunks


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), f"test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class Server:
    """A tiny file server: Range support, optional truncation or ignored Range, request log."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.truncate_next = 0
        self.ignore_range = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng and not server.ignore_range else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_next:
                    server.truncate_next -= 1
                    body = body[: len(body) // 3]
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def register(monkeypatch):
    def add(name, url, sha256=None):
        asset = dl.Asset(name, (url,), "test asset", sha256=sha256)
        monkeypatch.setitem(dl.ASSETS, name, asset)
        return asset
    return add


def test_download_checks_pins_and_extracts_a_tar_gz(tmp_path, register, caplog):
    archive = tar_gz({"model/model.pdmodel": PAYLOAD, "model/deploy.yaml": b"Deploy: {}\n"})
    with Server({"model.tar.gz": archive}) as server:
        register("tiny_model", server.url("model.tar.gz"))
        with caplog.at_level("INFO", logger="slimseg"):
            folder = dl.download("tiny_model", cache_dir=tmp_path, progress=False)
        assert folder == tmp_path / "tiny_model"
        assert (folder / "model.pdmodel").read_bytes() == PAYLOAD      # the top folder is unwrapped
        digest = hashlib.sha256(archive).hexdigest()
        assert (tmp_path / "downloads" / "model.tar.gz.sha256").read_text().split()[0] == digest
        assert digest in caplog.text
        assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.glob(".*partial"))
        # cached: no second request
        assert dl.download("tiny_model", cache_dir=tmp_path, progress=False) == folder
        assert len(server.requests) == 1


def test_zip_with_several_top_entries_and_cache_env(tmp_path, register, monkeypatch):
    monkeypatch.setenv("SLIMSEG_CACHE", str(tmp_path / "env_cache"))
    with Server({"data.zip": zip_bytes({"train.txt": b"a b\n", "img/a.png": b"x"})}) as server:
        register("tiny_data", server.url("data.zip"))
        folder = dl.download("tiny_data", progress=False)
    assert folder == tmp_path / "env_cache" / "tiny_data"
    assert (folder / "train.txt").read_bytes() == b"a b\n" and (folder / "img" / "a.png").is_file()


def test_a_truncated_transfer_is_resumed_with_a_range_request(tmp_path, register):
    archive = tar_gz({"m/w.bin": PAYLOAD})
    with Server({"m.tar.gz": archive}) as server:
        server.truncate_next = 1
        register("cut", server.url("m.tar.gz"), sha256=hashlib.sha256(archive).hexdigest())
        folder = dl.download("cut", cache_dir=tmp_path, progress=False)
    assert (folder / "w.bin").read_bytes() == PAYLOAD
    (first, r1), (second, r2) = server.requests
    assert r1 is None
    assert r2 == f"bytes={len(archive) // 3}-"


def test_a_part_file_from_an_earlier_run_is_resumed(tmp_path, register):
    archive = tar_gz({"m/w.bin": PAYLOAD})
    part = tmp_path / "downloads" / "m.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:1000])
    with Server({"m.tar.gz": archive}) as server:
        register("partial", server.url("m.tar.gz"), sha256=hashlib.sha256(archive).hexdigest())
        dl.download("partial", cache_dir=tmp_path, progress=False)
    assert server.requests == [("m.tar.gz", "bytes=1000-")]
    assert (tmp_path / "downloads" / "m.tar.gz").read_bytes() == archive


def test_a_server_that_ignores_range_makes_the_download_restart(tmp_path, register):
    archive = tar_gz({"m/w.bin": PAYLOAD})
    part = tmp_path / "downloads" / "m.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not stay in front")
    with Server({"m.tar.gz": archive}) as server:
        server.ignore_range = True
        register("norange", server.url("m.tar.gz"), sha256=hashlib.sha256(archive).hexdigest())
        folder = dl.download("norange", cache_dir=tmp_path, progress=False)
    assert (folder / "w.bin").read_bytes() == PAYLOAD


def test_wrong_checksum_is_an_error_and_deletes_the_file(tmp_path, register):
    with Server({"m.tar.gz": tar_gz({"m/w.bin": PAYLOAD})}) as server:
        url = server.url("m.tar.gz")
        register("bad", url, sha256="0" * 64)
        with pytest.raises(DataError, match="sha256 mismatch") as err:
            dl.download("bad", cache_dir=tmp_path, progress=False)
    assert url in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "downloads").iterdir())
    assert not (tmp_path / "bad").exists()


def test_a_pinned_checksum_catches_a_changed_file(tmp_path, register):
    files = {"m.tar.gz": tar_gz({"m/w.bin": PAYLOAD})}
    with Server(files) as server:
        register("pinned", server.url("m.tar.gz"))
        dl.download("pinned", cache_dir=tmp_path, progress=False)
        files["m.tar.gz"] = tar_gz({"m/w.bin": b"tampered"})
        with pytest.raises(DataError, match="sha256 mismatch.*m.tar.gz.sha256"):
            dl.download("pinned", cache_dir=tmp_path, force=True, progress=False)


def test_no_server_is_a_clear_error_naming_the_url(tmp_path, register, capsys):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m.tar.gz"
    register("offline", url)
    with pytest.raises(DataError, match=f"cannot download {url}.*--url"):
        dl.download("offline", cache_dir=tmp_path, progress=False)
    code = main(["download", "offline", "--cache_dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and url in err and len(err.strip().splitlines()) == 1


def test_url_override_points_at_a_mirror(tmp_path, register):
    archive = tar_gz({"m/w.bin": PAYLOAD})
    with Server({"mirror/m.tar.gz": archive}) as server:
        register("mirrored", server.url("missing/m.tar.gz"))
        with pytest.raises(DataError, match="HTTP 404"):
            dl.download("mirrored", cache_dir=tmp_path, progress=False)
        code = main(["download", "mirrored", "--cache_dir", str(tmp_path), "--url",
                     server.url("mirror/m.tar.gz"), "--quiet"])
    assert code == 0
    assert (tmp_path / "mirrored" / "w.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_archives_that_escape_the_cache_are_refused(tmp_path, register, member):
    with Server({"e.tar.gz": tar_gz({member: b"x"}), "e.zip": zip_bytes({member: b"x"})}) as server:
        for kind in ("tar.gz", "zip"):
            register(f"evil_{kind}", server.url(f"e.{kind}"))
            with pytest.raises(DataError, match="refusing member"):
                dl.download(f"evil_{kind}", cache_dir=tmp_path / "cache", progress=False)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (tmp_path / "cache" / "evil_zip").exists()


def test_symlinks_in_a_tar_are_refused(tmp_path, register):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("m/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with Server({"l.tar.gz": buf.getvalue()}) as server:
        register("links", server.url("l.tar.gz"))
        with pytest.raises(DataError, match="links and devices"):
            dl.download("links", cache_dir=tmp_path, progress=False)


def test_unknown_names_and_aliases():
    assert dl.resolve_asset("mini_humanseg").name == "mini_supervisely"
    with pytest.raises(ConfigError, match="did you mean 'mini_cityscapes'"):
        dl.resolve_asset("mini_cityscape")
    for asset in dl.ASSETS.values():
        assert asset.urls[0].startswith("https://") and asset.filename.endswith((".zip", ".tar", ".tar.gz"))


def test_cli_list_prints_the_registry(capsys):
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ppseg_lite_portrait_398x224_with_softmax", "mini_supervisely",
                                        "mini_cityscapes", "mini_humanseg"))
