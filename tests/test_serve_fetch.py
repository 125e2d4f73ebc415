"""dino3.fetch, the fetcher `dino3 serve` downloads its clients' URLs with: every boundary (size limit,
redirect count, deadline) sat on, and each refusal's error naming the input and the reason. The HTTP
servers here bind 127.0.0.1; a "public" name is resolved to a public address and dialled to them."""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from dino3 import fetch
from dino3.errors import ImageError, ImageTooLargeError

CAT = Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.png"
PUBLIC = "93.184.216.34"  # a public address; dialled to the local server instead


class Answers(http.server.BaseHTTPRequestHandler):
    """/loop/N: a 302 to /loop/N-1, /loop/0 the cat; /status/N: that status; /to?URL: a 302 to URL;
    /stall: nothing for 3 s; /slow: the cat in ten pieces 0.25 s apart; /badlength: the cat with a
    Content-Length that is no number; anything else: the cat."""

    def do_GET(self):  # noqa: N802
        path = self.path
        if path.startswith("/loop/") and int(path.rsplit("/", 1)[1]) > 0:
            return self.redirect(f"/loop/{int(path.rsplit('/', 1)[1]) - 1}")
        if path.startswith("/to?"):
            return self.redirect(path[4:])
        if path.startswith("/status/"):
            self.send_response(int(path.rsplit("/", 1)[1]))
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"oops")
            return
        if path == "/stall":
            time.sleep(3)
        body = CAT.read_bytes()
        if path == "/badlength":  # a length that is no number: the body runs to the connection's end
            self.send_response(200)
            self.send_header("Content-Length", "soon")
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        pieces = 10 if path == "/slow" else 1
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            self.wfile.write(body[start : start + step])
            self.wfile.flush()
            if pieces > 1:
                time.sleep(0.25)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def public(local, monkeypatch):
    """The local server as http://public.test:PORT, a name that resolves to a public address."""
    port = int(local.rsplit(":", 1)[1])
    real_resolve, real_connect = socket.getaddrinfo, socket.create_connection

    def resolve(host, port, *args, **kwargs):
        if host == "public.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]
        return real_resolve(host, port, *args, **kwargs)

    def connect(address, *args, **kwargs):
        if address[0] == PUBLIC:
            address = ("127.0.0.1", port)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    return f"http://public.test:{port}"


def test_exactly_max_redirects_are_followed_one_more_is_refused(public):
    """A chain of MAX_REDIRECTS (5) hops is followed; 6 is refused, naming the URL and the count."""
    assert fetch.MAX_REDIRECTS == 5
    assert fetch.fetch_bytes(f"{public}/loop/5", public_only=True) == CAT.read_bytes()
    with pytest.raises(ImageError, match=r"/loop/6: more than 5 redirects; gave up"):
        fetch.fetch_bytes(f"{public}/loop/6", public_only=True)


@pytest.mark.parametrize("status", [400, 404, 500])
def test_an_http_error_status_is_an_error_naming_the_status(public, local, status):
    """4xx and 5xx answers (400 included) are errors with the status, never returned as image bytes."""
    for url, guarded in ((f"{public}/status/{status}", True), (f"{local}/status/{status}", False)):
        with pytest.raises(ImageError, match=rf"/status/{status}: download failed with HTTP {status} "):
            fetch.fetch_bytes(url, public_only=guarded)


def test_a_redirect_to_another_scheme_or_a_bad_port_is_refused(public):
    with pytest.raises(ImageError, match=r"/to\?ftp://x/y: redirected to ftp://x/y, which is not an http\(s\) URL"):
        fetch.fetch_bytes(f"{public}/to?ftp://x/y", public_only=True)
    with pytest.raises(ImageError, match=r"http://public.test:99999/ has an invalid port"):
        fetch.fetch_bytes(f"{public}/to?http://public.test:99999/", public_only=True)


def test_a_name_that_does_not_resolve_is_refused(monkeypatch):
    """A resolver error, and an empty answer, are both "cannot resolve" (no connection tried)."""

    def fails(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fails)
    with pytest.raises(ImageError, match=r"http://nowhere.test/a.png: cannot resolve 'nowhere.test'"):
        fetch.fetch_bytes("http://nowhere.test/a.png", public_only=True)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    with pytest.raises(ImageError, match=r"cannot resolve 'nowhere.test'"):
        fetch.public_addresses("nowhere.test", 80, "http://nowhere.test/a.png")


def test_a_server_that_sends_nothing_times_out_with_the_idle_limit(local, public, monkeypatch):
    monkeypatch.setattr(fetch, "IDLE_SECONDS", 1.0)
    for url, guarded in ((f"{local}/stall", False), (f"{public}/stall", True)):
        started = time.monotonic()
        with pytest.raises(ImageError, match=r"/stall: the server sent nothing for 1 s; gave up$"):
            fetch.fetch_bytes(url, public_only=guarded, timeout=10)
        assert time.monotonic() - started < 2.5


def test_a_download_slower_than_its_deadline_is_given_up(local, public):
    """The deadline holds for the whole transfer, however steadily the server sends (0.25 s a piece)."""
    for url, guarded in ((f"{local}/slow", False), (f"{public}/slow", True)):
        with pytest.raises(ImageError, match=r"/slow: download took longer than 1 s; gave up"):
            fetch.fetch_bytes(url, public_only=guarded, timeout=1)
        assert fetch.fetch_bytes(url, public_only=guarded, timeout=20) == CAT.read_bytes()


def test_an_announced_length_of_exactly_the_limit_is_taken(local):
    size = CAT.stat().st_size
    assert fetch.fetch_bytes(f"{local}/cat.png", max_bytes=size) == CAT.read_bytes()
    with pytest.raises(ImageTooLargeError, match=rf"/cat.png: larger than {size - 1} bytes, the download limit"):
        fetch.fetch_bytes(f"{local}/cat.png", max_bytes=size - 1)


def test_the_size_limit_on_files_and_data_urls_sits_on_its_boundary(tmp_path):
    """A file or data URL of exactly max_bytes is read; one byte over is refused, named; the limit is
    said in MiB from 1 MiB up, in bytes below."""
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 10)
    assert fetch.fetch_bytes(path, max_bytes=10) == b"x" * 10
    with pytest.raises(ImageTooLargeError, match=rf"{path}: larger than 9 bytes, the download limit"):
        fetch.fetch_bytes(path, max_bytes=9)
    url = "data:text/plain,xxxxxxxxxx"
    assert fetch.fetch_bytes(url, max_bytes=10) == b"x" * 10
    with pytest.raises(ImageTooLargeError, match=r"^the data URL: larger than 9 bytes"):
        fetch.fetch_bytes(url, max_bytes=9)
    path.write_bytes(b"x" * (2**20 + 1))
    with pytest.raises(ImageTooLargeError, match=r"larger than 1 MiB, the download limit"):
        fetch.fetch_bytes(path, max_bytes=2**20)
    with pytest.raises(ImageTooLargeError, match=r"larger than 1048575 bytes"):
        fetch.fetch_bytes(path, max_bytes=2**20 - 1)


def test_prefixes_are_matched_whatever_their_case(local, tmp_path):
    """HTTP://, DATA: and ;BASE64 in capitals are what they are in lower case; S3:// is an object URI."""
    port = local.rsplit(":", 1)[1]
    assert fetch.fetch_bytes(f"HTTP://127.0.0.1:{port}/cat.png") == CAT.read_bytes()
    assert fetch.fetch_bytes("DATA:TEXT/PLAIN;BASE64,aGk=") == b"hi"
    assert fetch.fetch_bytes("data:,a%2Cb") == b"a,b"
    assert fetch.is_object_uri("S3://bucket/key") and fetch.is_object_uri("gs://b/k")
    assert not fetch.is_object_uri(str(tmp_path / "s3:" / "key")) and not fetch.is_object_uri(b"s3://b/k")
    assert fetch.is_url("HtTpS://x") and not fetch.is_url("ftp://x") and not fetch.is_data_url("dat:,x")


def test_a_bytes_path_is_read_as_the_path_it_spells():
    assert fetch.fetch_bytes(os.fsencode(str(CAT))) == CAT.read_bytes()


def test_download_takes_http_urls_only(local):
    for text in ("ftp://host/a.png", str(CAT), "data:,x"):
        with pytest.raises(ImageError, match=rf"^{text}: not an http\(s\) URL$"):
            fetch.download(text)
    assert fetch.download(f"{local}/cat.png") == CAT.read_bytes()
    with pytest.raises(ImageTooLargeError, match=r"larger than 10 bytes"):  # its limit is passed on
        fetch.download(f"{local}/cat.png", max_bytes=10)


def test_a_data_url_without_its_comma_is_refused_with_the_expected_shape():
    with pytest.raises(ImageError, match=r"a data URL without a comma: expected data:\[<type>\]\[;base64\],<data>"):
        fetch.fetch_bytes("data:image/png;base64")


def test_files_that_are_not_regular_or_cannot_be_read_are_named(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)  # a read would see EOF
    writer.start()
    with pytest.raises(ImageError, match=rf"^{fifo}: not a regular file \(a pipe, socket or device\)$"):
        fetch.fetch_bytes(fifo)
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go when nothing read the pipe
    writer.join(5)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ImageError, match=r"file/x.png: cannot be read \(Not a directory\)$"):
        fetch.fetch_bytes(tmp_path / "file" / "x.png")
    with pytest.raises(ImageError, match=rf"^{tmp_path}: is a folder, not an image file$"):
        fetch.fetch_bytes(tmp_path)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ImageError, match=r"file: cannot be read \(Permission denied\)$"):
        fetch.fetch_bytes(tmp_path / "file")


def test_object_storage_without_pyarrow_or_unreachable_says_what_to_do(monkeypatch):
    pytest.importorskip("pyarrow.fs")
    from types import SimpleNamespace

    import pyarrow

    def unreachable(uri):
        raise OSError("no credentials\nsecond line")

    monkeypatch.setattr(pyarrow, "fs", SimpleNamespace(FileSystem=SimpleNamespace(from_uri=unreachable)))
    with pytest.raises(ImageError, match=r"^s3://b/k.png: cannot be reached \(OSError: no credentials\)$"):
        fetch.fetch_bytes("s3://b/k.png")
    with pytest.raises(KeyError, match="cannot be reached"):
        fetch.object_store("s3://b/k.png", error=KeyError)
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)
    with pytest.raises(ImageError, match=r"^gs://b/k.png: object storage is read through pyarrow: pip install"):
        fetch.fetch_bytes("gs://b/k.png")


def test_an_object_of_unknown_size_is_held_to_the_limit_and_read_errors_are_named(monkeypatch):
    """A store that gives no size in its listing: the stream is still held to max_bytes (exactly the
    limit read, one byte over refused); a store error while reading is an ImageError naming the URI;
    a listed size of exactly the limit is read. Planted: `info.size >= max_bytes`."""
    pafs = pytest.importorskip("pyarrow.fs")
    import io
    from types import SimpleNamespace

    import pyarrow

    body = b"y" * (3 << 20)  # three reads of 1 MiB

    class Store:
        def get_file_info(self, inner):
            return SimpleNamespace(type=pafs.FileType.File, size=len(body) if inner == "sized" else None)

        def open_input_stream(self, inner):
            if inner == "broken":
                raise OSError("bucket gone")
            return io.BytesIO(body)

    stand_in = SimpleNamespace(
        FileSystem=SimpleNamespace(from_uri=lambda uri: (Store(), uri.rsplit("/", 1)[1])), FileType=pafs.FileType
    )
    monkeypatch.setattr(pyarrow, "fs", stand_in)
    assert fetch.fetch_bytes("s3://b/ok", max_bytes=len(body)) == body
    with pytest.raises(ImageTooLargeError, match=r"^s3://b/ok: larger than 2 MiB"):
        fetch.fetch_bytes("s3://b/ok", max_bytes=len(body) - 1)
    with pytest.raises(ImageError, match=r"^s3://b/broken: cannot be read \(OSError: bucket gone\)$"):
        fetch.fetch_bytes("s3://b/broken")
    assert fetch.fetch_bytes("s3://b/sized", max_bytes=len(body)) == body  # a listed size of exactly the limit
    with pytest.raises(ImageTooLargeError, match=r"^s3://b/sized: larger than 2 MiB"):
        fetch.fetch_bytes("s3://b/sized", max_bytes=len(body) - 1)


def test_first_line_of_an_error():
    assert fetch.first_line(ValueError("  \n")) == "no details"
    assert fetch.first_line(ValueError("one\ntwo")) == "one"
    assert fetch.first_line(ValueError("x" * 300)) == "x" * 200


def test_the_port_checked_is_the_schemes_default_or_the_one_given(monkeypatch):
    """A public-only download resolves the host on 443 for https, 80 for http, or the port the URL
    names (whatever the scheme's case). Planted: the default port 80 for https too."""
    asked = []

    def refuse(host, port, name):
        asked.append((host, port))
        raise ImageError(f"{name}: stopped here")

    monkeypatch.setattr(fetch, "public_addresses", refuse)
    for url in ("https://example.com/a.png", "HTTPS://example.com/a.png", "http://example.com/a.png",
                "https://example.com:8443/a.png"):  # fmt: skip
        with pytest.raises(ImageError, match="stopped here"):
            fetch.fetch_bytes(url, public_only=True)
    assert asked == [("example.com", 443), ("example.com", 443), ("example.com", 80), ("example.com", 8443)]


def test_a_redirect_status_without_a_location_is_an_answer_not_a_hop(public):
    """A public-only download reads a 302 (or a 399) that names no Location as the answer: its body.
    Planted: the redirect followed without a Location (back to the same URL until the hop limit)."""
    for status in (302, 399):
        assert fetch.fetch_bytes(f"{public}/status/{status}", public_only=True) == b"oops"


def test_a_content_length_that_is_no_number_is_ignored_not_an_error(local, public):
    """ "Content-Length: soon" is no announced size: the body is read (within the limit) as http.client
    reads it, to the end of the connection. Planted: the length's isdigit() check dropped (int("soon"))."""
    for url, guarded in ((f"{public}/badlength", True), (f"{local}/badlength", False)):
        assert fetch.fetch_bytes(url, public_only=guarded) == CAT.read_bytes()
