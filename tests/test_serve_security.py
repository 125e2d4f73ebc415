"""What an attacker pass found in `dino3 serve` (issue 28, findings 5-9, 13, 14), each pinned by a
test on a real uvicorn server on 127.0.0.1 with bounded traffic: downloads in a pool of their own,
cancelled with their request; the body limit on chunked uploads; metrics by route; header and body
timeouts and the connection limit; invalid UTF-8; an empty API key.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import dino3
from dino3.errors import UsageError

pytest.importorskip("fastapi")
from dino3.serve import ServeSettings, create_app  # noqa: E402
from test_serve import Server, data_url, error_of  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def model(checkpoint):
    return dino3.load(checkpoint)


class Trickle(http.server.BaseHTTPRequestHandler):
    """/slow: promises 100 kB and sends one byte every 0.1 s; /missing: 404. Counts open downloads."""

    open_now = 0
    lock = threading.Lock()
    ending = threading.Event()  # set: the slow answers end at once (cut short)

    def do_GET(self):  # noqa: N802
        if self.path != "/slow":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with Trickle.lock:
            Trickle.open_now += 1
        try:
            for _ in range(600):  # a minute at most
                if Trickle.ending.is_set():
                    break
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client went away
            pass
        finally:
            with Trickle.lock:
                Trickle.open_now -= 1

    def log_message(self, *args):
        pass


def test_slow_urls_stall_no_other_request_and_stop_with_their_request(model):
    """Bug pinned (finding 8): one request of many slow URLs filled asyncio's shared default pool, so
    every other request (data URLs, thumbnails) waited minutes; and when that request failed, its
    other downloads went on. Now: downloads have their own pool, other inputs never wait for it,
    and a request's failure cancels its downloads."""
    Trickle.ending.clear()  # another test may have ended its own slow answers (test_serve_page's)
    trickle = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=trickle.serve_forever, daemon=True).start()
    slow = f"http://127.0.0.1:{trickle.server_port}/slow"
    settings = ServeSettings(allow_urls=True, allow_private_urls=True, max_images=64, url_timeout_s=60)
    server = Server(create_app(model, settings))
    url = f"{server.url}/v1/embeddings"
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        stuck = pool.submit(httpx.post, url, json={"input": [slow] * 32}, timeout=120)
        deadline = time.monotonic() + 30
        while Trickle.open_now < 4:  # its downloads are running
            assert time.monotonic() < deadline and not stuck.done()
            time.sleep(0.05)
        started = time.monotonic()
        quick = httpx.post(url, json={"input": [data_url(PHOTOS / "rocket.jpg")]}, timeout=60)
        assert quick.status_code == 200 and time.monotonic() - started < 5
        assert Trickle.open_now <= 8  # a few at a time per request, not all 32 at once
        # a request whose first URL fails: its slow downloads are stopped, not left running
        failing = httpx.post(url, json={"input": [f"{slow[:-5]}/missing"] + [slow] * 8}, timeout=60)
        assert failing.status_code == 400 and error_of(failing)["param"] == "input[0]"
        deadline = time.monotonic() + 5
        while Trickle.open_now > 4:  # the stuck request's own four are left
            assert time.monotonic() < deadline, f"{Trickle.open_now - 4} downloads of a failed request still run"
            time.sleep(0.05)
    finally:
        Trickle.ending.set()  # the stuck request's downloads end (cut short: a 400), and it with them
        assert stuck.result(timeout=60).status_code == 400
        pool.shutdown()
        server.stop()
        trickle.shutdown()


def test_a_chunked_upload_over_the_body_limit_is_refused(model):
    """Bug pinned (finding 5): /v1/embeddings/upload ignored --max-body-mb for a body sent without a
    Content-Length (chunked): 4 x 400 MB accepted. The limit counts the bytes as they arrive."""
    server = Server(create_app(model, ServeSettings(max_body_bytes=2**20, max_images=8)))
    boundary = "dino3boundary"

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n').encode()
        for _ in range(64):  # 4 MiB of file in 64 KiB chunks, against a 1 MiB limit
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        try:
            answer = httpx.post(f"{server.url}/v1/embeddings/upload", content=body(), headers=headers, timeout=60)
            assert answer.status_code == 413, answer.text
            assert "1048576" in error_of(answer)["message"]
        except httpx.TransportError:  # the server may close the connection while the client still sends
            pass
        files = [("files", (p.name, p.read_bytes())) for p in sorted(PHOTOS.glob("*.jpg"))[:2]]
        ok = httpx.post(f"{server.url}/v1/embeddings/upload", files=files, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2  # under the limit: served
    finally:
        server.stop()


def test_metrics_are_labelled_by_route_not_by_raw_path(model):
    """Bug pinned (finding 6): /metrics made a series per raw URL path; 20,000 made-up paths grew
    memory by 132 MB. Now 500 distinct paths add no series."""
    server = Server(create_app(model, ServeSettings(api_key="s3cret")))
    key = {"Authorization": "Bearer s3cret"}
    try:
        with httpx.Client(base_url=server.url) as client:
            for i in range(250):
                assert client.get(f"/nothing/here/{i}", headers=key).status_code == 404
                assert client.get(f"/v1/models/made-up-{i}").status_code == 401  # no key: refused, still counted
            client.get("/metrics", headers=key)  # its own series exists from here on
            before = client.get("/metrics", headers=key).text
            for i in range(250, 500):
                client.get(f"/nothing/here/{i}", headers=key)
            after = client.get("/metrics", headers=key).text
        series = [line for line in after.splitlines() if line.startswith("dino3_requests_total{")]
        assert len(series) <= 10, series
        assert 'route="unmatched"' in after and 'route="/v1/models/{name:path}"' in after
        assert "made-up" not in after and "/nothing/here" not in after
        assert len(after) < len(before) + 500  # the same series, only their counts moved
    finally:
        server.stop()


def test_invalid_utf8_in_a_json_body_is_a_400(model):
    """Bug pinned (finding 13): invalid UTF-8 in a JSON body answered 500."""
    server = Server(create_app(model, ServeSettings()))
    try:
        for route in ("/v1/embeddings", "/v1/patches", "/v1/pca"):
            answer = httpx.post(
                server.url + route, content=b'{"input": "\xff\xfe"}', headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400, (route, answer.text)
            assert "UTF-8" in error_of(answer)["message"]
    finally:
        server.stop()


def test_half_sent_headers_and_bodies_time_out_and_connections_are_limited(model):
    """Bug pinned (finding 9): no header or body timeout and no connection limit: 3,000 connections
    with partial headers were held for 60 s, and 1,100 idle ones made /healthz time out."""
    settings = ServeSettings(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=8)
    server = Server(create_app(model, settings))
    host, port = server.url.removeprefix("http://").split(":")
    try:
        partial = socket.create_connection((host, int(port)))
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        partial.settimeout(10)
        started = time.monotonic()
        assert partial.recv(1024) == b""  # closed by the server
        assert 0.5 < time.monotonic() - started < 5
        # a body that stops arriving: 408 once the body timeout is over
        body = socket.create_connection((host, int(port)))
        body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        body.sendall(b"Content-Length: 100\r\n\r\n{")
        body.settimeout(10)
        assert b" 408 " in body.recv(4096).split(b"\r\n", 1)[0]
        # more idle connections than the limit: a request is answered 503 at once, not left to hang
        idle = [socket.create_connection((host, int(port))) for _ in range(10)]
        refused = httpx.get(f"{server.url}/healthz", timeout=5)
        assert refused.status_code == 503
        time.sleep(1.5)  # the idle ones are closed by the header timeout
        assert all(s.recv(16) == b"" for s in idle)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        for s in [partial, body, *idle]:
            s.close()
    finally:
        server.stop()


def test_an_empty_api_key_is_refused(capsys):
    """Bug pinned (finding 14): `--api-key ""` silently turned authentication off."""
    from dino3.cli import main

    with pytest.raises(UsageError, match="api_key is empty"):
        ServeSettings(api_key="")
    with pytest.raises(SystemExit) as refused:  # a usage error, before any model is loaded
        main(["serve", "-m", "vits16", "--api-key", ""])
    assert refused.value.code == 2
    assert "--api-key is empty" in capsys.readouterr().err


def test_the_body_deadline_is_for_the_whole_body_and_its_size_limit_is_exact():
    """body_of: a body trickled in pieces, each within the timeout but all of them past it, is a 408
    (a slow client cannot hold a request open piece by piece); a body of exactly the limit is taken,
    one byte more is a 413. Planted: the timeout applied to each piece, `>` made `>=`."""
    import asyncio

    from dino3.serve.service import ApiError, body_of

    class Trickle:
        def __init__(self, pieces: list[bytes], gap: float):
            self.pieces, self.gap = pieces, gap

        async def stream(self):
            for piece in self.pieces:
                await asyncio.sleep(self.gap)
                yield piece

    slow = Trickle([b"x" * 10] * 6, gap=0.15)  # 0.9 s in all, 0.15 s a piece
    with pytest.raises(ApiError) as late:
        asyncio.run(body_of(slow, max_bytes=1000, timeout=0.5))
    assert late.value.status == 408
    assert asyncio.run(body_of(Trickle([b"ab", b"cd"], gap=0.01), max_bytes=1000, timeout=5)) == b"abcd"
    assert asyncio.run(body_of(Trickle([b"x" * 60, b"x" * 40], gap=0), max_bytes=100, timeout=5)) == b"x" * 100
    with pytest.raises(ApiError) as large:
        asyncio.run(body_of(Trickle([b"x" * 60, b"x" * 41], gap=0), max_bytes=100, timeout=5))
    assert large.value.status == 413
