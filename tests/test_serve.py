"""`dino3 serve`: a real uvicorn server on 127.0.0.1, real HTTP clients, bounded traffic.

The features a client gets equal what `dino3 embed` computes; every bad request gets its 4xx in
OpenAI's error shape and the server keeps serving; a full queue answers 429; SIGTERM lets the
requests in flight finish.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

import dino3
from dino3.cli import main

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from dino3.serve import ServeSettings, create_app  # noqa: E402
from dino3.serve.server import uvicorn_config  # noqa: E402

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.[jp][pn]g"))


class Server:
    """A uvicorn server for one app, on a free port of 127.0.0.1, in a thread, configured as
    `dino3 serve` configures it (dino3.serve.server: timeouts, connection limit)."""

    def __init__(self, app) -> None:
        settings = app.state.service.settings
        self.config = uvicorn_config(app, "127.0.0.1", 0, settings, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(checkpoint):
    model = dino3.load(checkpoint)
    running = Server(create_app(model, ServeSettings(max_batch=8, max_wait_ms=20, max_images=8, max_body_bytes=2**23)))
    yield running
    running.stop()


def data_url(path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_sixteen_concurrent_clients_get_what_embed_computes(server, checkpoint, tmp_path):
    out = tmp_path / "f.npz"
    assert main(["embed", *map(str, PHOTOS), "-m", str(checkpoint), "-o", str(out), "-q", "--pool", "cls+mean"]) == 0
    expected = dino3.embed.read_embeddings(out).features

    def ask(i):
        photo = PHOTOS[i % len(PHOTOS)]
        body = {"input": [data_url(photo)], "pool": "cls+mean", "encoding_format": "base64" if i % 2 else "float"}
        response = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=120)
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        vector = item["embedding"]
        if isinstance(vector, str):
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
        return i % len(PHOTOS), np.asarray(vector, dtype=np.float32)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(48)))
    for index, vector in results:
        assert np.abs(vector - expected[index]).max() <= 1e-4
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = [line for line in metrics.splitlines() if line.startswith("dino3_batch_size_count")]
    sums = [line for line in metrics.splitlines() if line.startswith("dino3_batch_size_sum")]
    assert batches and float(sums[0].split()[-1]) / float(batches[0].split()[-1]) > 1.0  # requests were batched


def test_openai_shape_and_other_routes(server):
    body = {"input": data_url(PHOTOS[0]), "model": None}
    response = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()
    assert response["object"] == "list" and response["data"][0]["object"] == "embedding"
    assert len(response["data"][0]["embedding"]) == 64 and response["usage"]["images"] == 1
    patches = httpx.post(f"{server.url}/v1/patches", json={"input": data_url(PHOTOS[0])}, timeout=60).json()
    item = patches["data"][0]
    assert item["grid"] == [14, 14] and item["dim"] == 64 and len(item["embedding"]) == 14 * 14 * 64
    files = [("files", (p.name, p.read_bytes())) for p in PHOTOS[:2]]
    uploaded = httpx.post(f"{server.url}/v1/embeddings/upload", files=files, data={"pool": "mean"}, timeout=60)
    assert uploaded.status_code == 200 and len(uploaded.json()["data"]) == 2
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    assert "/v1/embeddings" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_bad_request_gets_its_4xx_and_the_server_goes_on(server):
    url = f"{server.url}/v1/embeddings"
    good = data_url(PHOTOS[0])
    small = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small, "PNG")
    tiny = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    truncated = "data:image/jpeg;base64," + base64.b64encode(PHOTOS[1].read_bytes()[:2000]).decode()
    bomb = "data:image/png;base64," + base64.b64encode(png_header(100_000, 100_000)).decode()
    cases = [
        ({"input": [good, "data:image/png;base64," + base64.b64encode(b"not an image").decode()]}, 400, "input[1]"),
        ({"input": [good, truncated]}, 400, "input[1]"),
        ({"input": [bomb]}, 413, "input[0]"),
        ({"input": ["%%% not base64 %%%"]}, 400, "input[0]"),
        ({"input": [tiny] * 9}, 413, "input"),  # max_images is 8
        ({"input": []}, 400, "input"),
        ({"input": 42}, 400, "input"),
        ({"input": [good], "pool": "patches"}, 400, "pool"),
        ({"input": [good], "encoding_format": "hex"}, 400, "encoding_format"),
        ({"input": [good], "model": "someone/else"}, 404, "model"),
        ({"input": ["https://example.com/cat.png"]}, 400, "input[0]"),  # URLs need --allow-urls
    ]
    for body, status, param in cases:
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == status, (body if len(str(body)) < 200 else param, response.text)
        assert error_of(response)["param"] == param
    for raw in (b"{not json", b"[" * 100_000, b'{"input": '):
        response = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400 and error_of(response)["type"] == "invalid_request_error"
    big = httpx.post(url, content=b"x" * (2**23 + 10), timeout=60)
    assert big.status_code == 413 and "8388608" in error_of(big)["message"]

    def chunked():
        for _ in range(140):
            yield b"y" * 65536

    assert httpx.post(url, content=chunked(), timeout=60).status_code == 413  # no Content-Length either
    assert httpx.post(url, json={"input": [good]}, timeout=60).status_code == 200  # still serving


def test_api_key_and_urls(checkpoint):
    model = dino3.load(checkpoint)
    guarded = Server(create_app(model, ServeSettings(api_key="s3cret", allow_urls=True)))
    try:
        body = {"input": [data_url(PHOTOS[0])]}
        assert httpx.post(f"{guarded.url}/v1/embeddings", json=body).status_code == 401
        assert httpx.get(f"{guarded.url}/metrics").status_code == 401
        assert httpx.get(f"{guarded.url}/healthz").status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{guarded.url}/v1/embeddings", json=body, headers=auth, timeout=60).status_code == 200
        private = {"input": [f"{guarded.url}/openapi.json"]}  # the server's own network
        response = httpx.post(f"{guarded.url}/v1/embeddings", json=private, headers=auth, timeout=60)
        assert response.status_code == 400 and "private network" in error_of(response)["message"]
    finally:
        guarded.stop()


def test_a_client_that_leaves_breaks_nothing(server):
    body = {"input": [data_url(p) for p in PHOTOS[:8]]}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=0.05)
    response = httpx.post(f"{server.url}/v1/embeddings", json={"input": [data_url(PHOTOS[0])]}, timeout=60)
    assert response.status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grace", [None, 0.2])
def test_sigterm_under_load_lets_requests_finish_and_exits_0(checkpoint, grace):
    """Bug pinned (attacker finding 7): SIGTERM under load (32 requests x 8 images) gave 19-23
    requests a 500 after uvicorn's 30 s grace cancelled them, then "terminate called without an
    active exception" and exit 134 (the process ended while the model thread ran). Now the requests
    in flight finish (no grace set), or, past a grace that is set, get a 503 that says why; the
    running forward finishes; exit 0."""
    port = free_port()
    command = [sys.executable, "-m", "dino3.cli", "serve", "-m", str(checkpoint), "--port", str(port)]
    command += ["--max-batch", "4", "--max-queue", "512", "--decode-threads", "2"]
    if grace is not None:
        command += ["--timeout-graceful-shutdown", str(grace)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"input": [data_url(PHOTOS[i % len(PHOTOS)]) for i in range(16)]}
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/embeddings", json=body, timeout=120) for _ in range(24)]
            deadline = time.time() + 60
            while True:  # every request sent (answered or in flight), the model at work
                text = httpx.get(f"{url}/metrics", timeout=60).text
                in_flight = metric(text, "dino3_requests_in_progress") - 1  # less this one
                done = metric(text, 'dino3_requests_total{route="/v1/embeddings",status="200"}')
                if in_flight + done >= 24 and metric(text, "dino3_images_total") >= 2:
                    break
                assert time.time() < deadline, "the load never reached the model"
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert in_flight >= 4, "too few requests were in flight to tell"
        statuses = sorted(a.status_code for a in answers)
        if grace is None:
            assert statuses == [200] * 24
        else:
            assert set(statuses) <= {200, 503}, statuses
            assert all("shutting down" in a.json()["error"]["message"] for a in answers if a.status_code == 503)
        assert process.wait(timeout=120) == 0
        output = process.stdout.read().decode(errors="replace")
        assert "terminate called" not in output and "Traceback" not in output, output[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus' text format (0 when it has none yet)."""
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_bad_command_lines(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "-m", "x", "--max-batch", "0"])
    assert e.value.code == 2
    assert main(["serve", "-m", "vits61"]) == 1
    assert "Did you mean vits16" in capsys.readouterr().err


def test_decoding_is_done_off_the_event_loop(server):
    """While one request waits on a long decode, another is answered (the loop is not blocked)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)).save(buffer, "PNG")
    big = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, f"{server.url}/v1/embeddings", json={"input": [big]}, timeout=120)
        time.sleep(0.1)
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200
        quick = time.perf_counter() - started
        assert slow.result().status_code in (200, 413)
    assert quick < 1.0
    assert json.loads(httpx.get(f"{server.url}/readyz").text)["status"] == "ready"


# -- the fresh mutation pass (issue 31) ---------------------------------------------------------------------
def test_a_body_of_exactly_the_limit_is_taken_one_byte_more_is_not(server):
    """Bug pinned: the Content-Length check refused a body at the limit (`>=` for `>`): a client that
    sized its request to --max-body-bytes got a 413 for a body the server takes."""
    limit = 2**23  # the server fixture's max_body_bytes
    body = json.dumps({"input": data_url(PHOTOS[0])}).encode()
    body += b" " * (limit - len(body))  # JSON allows the trailing spaces
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/embeddings", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    response = httpx.post(f"{server.url}/v1/embeddings", content=body + b" ", headers=headers, timeout=60)
    assert response.status_code == 413 and str(limit) in error_of(response)["message"]


def test_usage_counts_every_token_the_model_sees(server, checkpoint):
    """Bug pinned: `usage.prompt_tokens` counted the patches only, not the CLS and register tokens
    each image also costs the model: clients accounting by OpenAI's usage field undercounted."""
    config = dino3.load(checkpoint).config
    body = {"input": [data_url(PHOTOS[0]), data_url(PHOTOS[1])]}
    usage = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()["usage"]
    per_image = config.num_prefix_tokens + 14 * 14  # 1 CLS + 4 registers + the 224 px grid's patches
    assert usage == {"prompt_tokens": 2 * per_image, "total_tokens": 2 * per_image, "images": 2}
