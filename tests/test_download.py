"""The NIH downloader against a local HTTP server on loopback, serving archives made here."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cxrlearn.cli.main import main
from cxrlearn.data.decoding.images import find_images
from cxrlearn.data.sources.download import (
    Archive,
    download_file,
    download_nih,
    extract_archive,
    parse_parts,
    read_archives,
)
from cxrlearn.errors import DataError


def make_archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Server:
    """Serves ``files`` with HTTP Range support; ``cut[path]`` = how many responses to cut in half."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header:
                    start = int(range_header.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut.get(self.path, 0) > 0:
                    server.cut[self.path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def real_pngs(sample_images):
    names = sorted(p.name for p in sample_images.glob("*.png"))[:6]
    return {name: (sample_images / name).read_bytes() for name in names}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_resumes_a_transfer_cut_off_half_way(server, tmp_path, real_pngs):
    data = make_archive({f"images/{n}": d for n, d in real_pngs.items()})
    server.files["/a.tar.gz"] = data
    server.cut["/a.tar.gz"] = 1
    path = download_file(f"{server.url}/a.tar.gz", tmp_path / "a.tar.gz", md5(data), backoff=0.01, progress=False)
    assert path.read_bytes() == data
    # The second request asked only for the missing half.
    assert server.requests[0] == ("/a.tar.gz", None)
    assert server.requests[1] == ("/a.tar.gz", f"bytes={len(data) // 2}-")
    assert not (tmp_path / "a.tar.gz.part").exists()


def test_resumes_a_partial_file_left_by_an_earlier_run(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["/b.bin"] = data
    (tmp_path / "b.bin.part").write_bytes(data[:300_000])
    download_file(f"{server.url}/b.bin", tmp_path / "b.bin", md5(data), progress=False)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert server.requests == [("/b.bin", "bytes=300000-")]


def test_wrong_checksum_is_retried_then_refused_keeping_the_file(server, tmp_path):
    data = b"not what NIH published" * 1000
    server.files["/c.tar.gz"] = data
    with pytest.raises(DataError, match=r"c\.tar\.gz: MD5 .* does not match the expected 0{32}, twice"):
        download_file(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", "0" * 32, progress=False)
    assert len(server.requests) == 2  # one fresh retry
    assert (tmp_path / "c.tar.gz.md5-mismatch").read_bytes() == data
    assert not (tmp_path / "c.tar.gz").exists()


def test_gives_up_after_retries_with_a_clear_message(server, tmp_path):
    data = b"x" * 100_000
    server.files["/d.bin"] = data
    server.cut["/d.bin"] = 10
    with pytest.raises(DataError, match=r"d\.bin: giving up after 3 tries .*run the same command again"):
        download_file(f"{server.url}/d.bin", tmp_path / "d.bin", md5(data), retries=2, backoff=0.01, progress=False)
    assert (tmp_path / "d.bin.part").stat().st_size > 0  # kept for the next run to resume


def test_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DataError, match=r"HTTP 404"):
        download_file(f"{server.url}/none.tar.gz", tmp_path / "none.tar.gz", "0" * 32, progress=False)
    assert len(server.requests) == 1


def test_extraction_refuses_path_escapes(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(make_archive({"images/ok.png": b"1", "../../escaped.png": b"2"}))
    with pytest.raises(DataError, match=r"refusing member '\.\./\.\./escaped\.png'"):
        extract_archive(evil, tmp_path / "out" / "images_001")
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "out" / "images_001").exists()
    absolute = tmp_path / "abs.tar.gz"
    absolute.write_bytes(make_archive({"/etc/cron.d/x": b"2"}))
    with pytest.raises(DataError, match=r"outside the folder"):
        extract_archive(absolute, tmp_path / "out" / "images_002")


def test_download_nih_end_to_end(server, tmp_path, real_pngs, nih_table, capsys):
    names = list(real_pngs)
    parts = [{n: real_pngs[n] for n in names[:3]}, {n: real_pngs[n] for n in names[3:]}]
    lines = ["archive\turl\tmd5"]
    for i, files in enumerate(parts, start=1):
        data = make_archive({f"images/{n}": d for n, d in files.items()})
        server.files[f"/images_{i:03d}.tar.gz"] = data
        lines.append(f"images_{i:03d}.tar.gz\t{server.url}/images_{i:03d}.tar.gz\t{md5(data)}")
    server.cut["/images_002.tar.gz"] = 1
    listing = tmp_path / "archives.tsv"
    listing.write_text("\n".join(lines) + "\n")
    to = tmp_path / "nih"
    assert main(["download", "nih", "--to", str(to), "--parts", "1-2", "--archives", str(listing)]) == 0
    found = find_images(to)
    assert sorted(found) == sorted(names)
    assert found[names[0]].read_bytes() == real_pngs[names[0]]
    assert found[names[4]] == to / "images_002" / "images" / names[4]
    assert not list(to.glob("*.tar.gz*"))  # archives removed once unpacked
    # A complete dataset: NIH's tables (shipped with cxrlearn) beside the images.
    from cxrlearn.data.sources import tables

    for name in tables.DATASET_FILES:
        assert (to / name).read_bytes() == tables.packaged(name).read_bytes(), name
    # A second run finds everything in place and downloads nothing.
    before = len(server.requests)
    assert download_nih(to, [1, 2], read_archives(listing), progress=False) == {
        "images_001.tar.gz": 3, "images_002.tar.gz": 3}
    assert len(server.requests) == before


def test_shipped_archive_list_is_nihs(data_dir):
    shipped = read_archives()
    assert shipped == read_archives(data_dir / "nih" / "archives.tsv")
    assert [a.name for a in shipped] == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert all(isinstance(a, Archive) and a.url.startswith("https://") for a in shipped)


def test_parse_parts():
    assert parse_parts("1-12", 12) == list(range(1, 13))
    assert parse_parts("1,3,5-6", 12) == [1, 3, 5, 6]
    with pytest.raises(DataError, match=r"outside 1-12"):
        parse_parts("0-13", 12)
    with pytest.raises(DataError, match=r"'x' is not a number"):
        parse_parts("x", 12)
