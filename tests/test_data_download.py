"""The real download / verify / unpack code, run against a local HTTP server on 127.0.0.1.

The server (a thread in this process) serves a small archive in the official layout,
and can send it intact, cut short, stalled, or as a 404. After every failure the
target folder must hold nothing a later run could mistake for the archive.
"""

import http.server
import io
import socket
import tarfile
import threading

import numpy as np
import pytest

from npsoftmax.data import (COARSE_OF_FINE, DatasetCorruptError, DatasetNotFoundError,
                            download_archive, extract_archive, load_cifar100,
                            make_cifar100_archive, write_cifar100_files)
from npsoftmax.data import download as download_module


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, mode)``; mode: ok, truncate, stall, missing."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body, mode = self.server.routes.get(self.path, (b"", "missing"))
        if mode == "missing":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "stall":  # headers sent, then nothing until the test ends
            self.server.release.wait(10)
            return
        self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True  # 'truncate' closes with half the announced bytes sent

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(bytes, size, md5, train, test) of a small archive in the official layout."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(11)
    splits = []
    for n in (9, 4):
        fine = rng.integers(0, 100, n)
        splits.append((rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), fine, COARSE_OF_FINE[fine]))
    write_cifar100_files(root, train=splits[0], test=splits[1])
    path, size, md5 = make_cifar100_archive(root)
    return path.read_bytes(), size, md5, splits[0], splits[1]


@pytest.fixture
def server(archive):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.release = [], threading.Event()
    body = archive[0]
    httpd.routes = {"/good.tar.gz": (body, "ok"), "/cut.tar.gz": (body, "truncate"),
                    "/stall.tar.gz": (body, "stall")}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("NPSOFTMAX_OFFLINE", raising=False)
    monkeypatch.delenv("NPSOFTMAX_DATA", raising=False)


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_is_verified_and_renamed(server, archive, tmp_path):
    body, size, md5, _, _ = archive
    path = download_archive(tmp_path, url=server.url + "/good.tar.gz", size=size, md5=md5,
                            timeout=5, progress=False)
    assert path == tmp_path / "cifar-100-python.tar.gz" and path.read_bytes() == body
    assert listing(tmp_path) == ["cifar-100-python.tar.gz"]  # no temporary file left


def test_load_downloads_unpacks_and_reads(server, archive, tmp_path, monkeypatch):
    _, size, md5, train, test = archive
    monkeypatch.setattr(download_module, "ARCHIVE_SIZE", size)
    monkeypatch.setattr(download_module, "ARCHIVE_MD5", md5)
    target = tmp_path / "new" / "folder"  # created on demand
    data = load_cifar100(target, url=server.url + "/good.tar.gz", timeout=5, progress=False)
    np.testing.assert_array_equal(data.train.images, train[0])
    np.testing.assert_array_equal(data.test.labels, test[1])
    np.testing.assert_array_equal(data.test.coarse_labels, test[2])
    assert listing(target) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    assert server.requests == ["/good.tar.gz"]
    # A second call finds the unpacked folder and never contacts the server.
    load_cifar100(target, url=server.url + "/good.tar.gz", timeout=5, progress=False)
    assert server.requests == ["/good.tar.gz"]


def test_wrong_checksum_leaves_nothing(server, archive, tmp_path):
    _, size, md5, _, _ = archive
    with pytest.raises(DatasetNotFoundError) as info:
        download_archive(tmp_path, url=server.url + "/good.tar.gz", size=size, md5="f" * 32,
                         timeout=5, progress=False)
    message = str(info.value)
    assert f"expected md5 {'f' * 32}, found md5 {md5}" in message
    assert str(tmp_path / "cifar-100-python.tar.gz") in message and server.url in message
    assert listing(tmp_path) == []


def test_wrong_announced_size_fails_before_reading(server, archive, tmp_path):
    _, size, md5, _, _ = archive
    with pytest.raises(DatasetNotFoundError, match=f"announces {size:,} bytes, expected {size + 1:,}"):
        download_archive(tmp_path, url=server.url + "/good.tar.gz", size=size + 1, md5=md5,
                         timeout=5, progress=False)
    assert listing(tmp_path) == []


def test_truncated_body_leaves_nothing(server, archive, tmp_path):
    _, size, md5, _, _ = archive
    with pytest.raises(DatasetNotFoundError, match="cut.tar.gz") as info:
        download_archive(tmp_path, url=server.url + "/cut.tar.gz", size=size, md5=md5,
                         timeout=5, progress=False)
    assert f"of {size:,} bytes" in str(info.value) or "IncompleteRead" in str(info.value)
    assert listing(tmp_path) == []


def test_http_error_is_reported(server, archive, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="HTTP 404"):
        download_archive(tmp_path, url=server.url + "/nothing-here", size=archive[1], md5=archive[2],
                         timeout=5, progress=False)
    assert listing(tmp_path) == []


def test_stalled_server_times_out(server, archive, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"timeout 0.3 s.*(timed out|TimeoutError)"):
        download_archive(tmp_path, url=server.url + "/stall.tar.gz", size=archive[1], md5=archive[2],
                         timeout=0.3, progress=False)
    assert listing(tmp_path) == []


def test_unreachable_port_fails_with_instructions(archive, tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar100(tmp_path, url=url, timeout=2, progress=False)
    message = str(info.value)
    assert "could not download" in message and url in message and "md5sum" in message
    assert listing(tmp_path) == []


def test_offline_env_never_contacts_the_server(server, archive, tmp_path, monkeypatch):
    monkeypatch.setenv("NPSOFTMAX_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="NPSOFTMAX_OFFLINE='1'"):
        download_archive(tmp_path, url=server.url + "/good.tar.gz", size=archive[1], md5=archive[2],
                         progress=False)
    assert server.requests == [] and listing(tmp_path) == []


def test_interrupted_download_removes_its_temporary_file(server, archive, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(download_module, "verify_file", interrupt)  # Ctrl-C after the body arrived
    with pytest.raises(KeyboardInterrupt):
        download_archive(tmp_path, url=server.url + "/good.tar.gz", size=archive[1], md5=archive[2],
                         timeout=5, progress=False)
    assert listing(tmp_path) == []


# --------------------------------------------------------------- unpacking
def make_tar(path, members):
    """Write a .tar.gz from (name, kind, payload) with kind 'file', 'dir', 'symlink' or 'hardlink'."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = payload or ""
            tar.addfile(info)


GOOD = [("cifar-100-python", "dir", None), ("cifar-100-python/train", "file", b"t"),
        ("cifar-100-python/test", "file", b"s"), ("cifar-100-python/meta", "file", b"m")]


@pytest.mark.parametrize("bad_member, reason", [
    (("cifar-100-python/../../escaped", "file", b"x"), "climbs out"),
    (("../escaped", "file", b"x"), "climbs out"),
    (("/tmp/npsoftmax-escaped-absolute", "file", b"x"), "absolute path"),
    (("cifar-100-python/link", "symlink", "/etc/passwd"), "is a link"),
    (("cifar-100-python/hard", "hardlink", "/etc/passwd"), "is a link"),
])
def test_unsafe_archives_are_refused_before_writing(tmp_path, bad_member, reason):
    path = tmp_path / "evil.tar.gz"
    make_tar(path, GOOD + [bad_member])
    target = tmp_path / "data"
    with pytest.raises(DatasetCorruptError, match=reason):
        extract_archive(path, target)
    assert listing(target) == []  # no staging folder, no cifar-100-python/
    assert not (tmp_path / "escaped").exists()


def test_safe_archive_unpacks_into_place(tmp_path):
    path = tmp_path / "ok.tar.gz"
    make_tar(path, GOOD)
    folder = extract_archive(path, tmp_path / "data")
    assert listing(folder) == ["meta", "test", "train"] and (folder / "train").read_bytes() == b"t"
    assert listing(tmp_path / "data") == ["cifar-100-python"]


def test_archive_without_required_files_is_refused(tmp_path):
    path = tmp_path / "partial.tar.gz"
    make_tar(path, GOOD[:2])
    with pytest.raises(DatasetCorruptError, match="missing cifar-100-python/test, cifar-100-python/meta"):
        extract_archive(path, tmp_path / "data")
    assert listing(tmp_path / "data") == []


def test_truncated_archive_on_disk_is_refused(archive, tmp_path):
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(archive[0][: len(archive[0]) // 2])
    with pytest.raises(DatasetCorruptError, match="truncated or not a .tar.gz"):
        extract_archive(path, tmp_path / "data")
    assert listing(tmp_path / "data") == []
