"""The routes of `dino3 serve` a client sees at their edges, through an in-process client (no port
bound): each refusal's status, parameter and words; the model list; CORS; readiness; the service's
refusals once shut; the open-file limit the server raises."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

import dino3
from dino3.errors import UsageError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dino3.serve import ServeSettings, create_app  # noqa: E402
from dino3.serve import server as serve_server  # noqa: E402
from dino3.serve.service import ApiError, Service, _queued  # noqa: E402

CAT = Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.png"
IMAGE = "data:image/png;base64," + base64.b64encode(CAT.read_bytes()).decode()
ORIGIN = "https://page.example"


@pytest.fixture(scope="module")
def model(checkpoint):
    return dino3.load(checkpoint)


@pytest.fixture(scope="module")
def client(model):
    settings = ServeSettings(served_model_names=["first", "second"], cors_origins=[ORIGIN], max_images=4)
    with TestClient(create_app(model, settings, warm=False)) as running:
        yield running


def error(response, status: int, param) -> str:
    assert response.status_code == status, response.text[:300]
    body = response.json()["error"]
    assert body["param"] == param
    return body["message"]


def test_dimensions_and_a_bad_encoding_are_refused_in_json_and_uploads(client):
    """`dimensions` (any value) is a 400 with its code; an encoding_format not float/base64 a 400 naming it."""
    response = client.post("/v1/embeddings", json={"input": IMAGE, "dimensions": 8})
    assert "dimensions" in error(response, 400, "dimensions")
    assert response.json()["error"]["code"] == "dimensions_not_supported"
    for route in ("/v1/embeddings", "/v1/patches"):
        message = error(client.post(route, json={"input": IMAGE, "encoding_format": "hex"}), 400, "encoding_format")
        assert message == "encoding_format must be one of ('float', 'base64')"
    files = [("files", ("cat.png", CAT.read_bytes()))]
    response = client.post("/v1/embeddings/upload", files=files, data={"dimensions": "8"})
    assert error(response, 400, "dimensions") and response.json()["error"]["code"] == "dimensions_not_supported"
    response = client.post("/v1/embeddings/upload", files=files, data={"encoding_format": "hex"})
    assert error(response, 400, "encoding_format") == "encoding_format must be one of ('float', 'base64')"
    response = client.post("/v1/embeddings/upload", files=files, data={"encoding_format": "base64"})
    assert response.status_code == 200 and isinstance(response.json()["data"][0]["embedding"], str)


def test_an_upload_whose_files_field_is_text_is_refused_naming_it(client):
    response = client.post("/v1/embeddings/upload", data={"files": "not a file"})
    assert error(response, 400, "files[0]") == "files[0] is a text field, not a file"


def test_the_model_list_and_each_model(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["first", "second"]
    assert {m["owned_by"] for m in models["data"]} == {"dino3"} and {m["object"] for m in models["data"]} == {"model"}
    card = client.get("/v1/models/second").json()
    assert card["id"] == "second" and card["object"] == "model" and isinstance(card["created"], int)
    response = client.get("/v1/models/third")
    assert "'third' is not served here" in error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"
    answer = client.post("/v1/embeddings", json={"input": IMAGE, "model": "second"})
    assert answer.status_code == 200 and answer.json()["model"] == "second"
    assert client.post("/v1/embeddings", json={"input": IMAGE}).json()["model"] == "first"  # the first name
    assert error(client.post("/v1/embeddings", json={"input": IMAGE, "model": "x"}), 404, "model")


def test_cors_answers_the_allowed_origin_only(client):
    allowed = client.get("/healthz", headers={"Origin": ORIGIN})
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = client.get("/healthz", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options("/v1/embeddings", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN


def test_no_cors_headers_without_origins(model):
    with TestClient(create_app(model, ServeSettings(), warm=False)) as plain:
        assert "access-control-allow-origin" not in plain.get("/healthz", headers={"Origin": ORIGIN}).headers


def test_ready_without_warming_only_once_started(model):
    """warm=False: ready once the app has started (no warm-up forward); before, /readyz is a 503."""
    app = create_app(model, ServeSettings(), warm=False)
    before = TestClient(app)  # no lifespan run: not started
    response = before.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["message"] == "warming up"
    with TestClient(app) as started:
        assert started.get("/readyz").json() == {"status": "ready", "model": app.state.service.name}


def test_an_empty_served_model_name_is_refused():
    with pytest.raises(UsageError, match="served_model_names holds an empty name"):
        ServeSettings(served_model_names=["ok", "  "])
    assert ServeSettings(served_model_names=["ok"]).served_model_names == ["ok"]


def test_a_closed_service_answers_503(model):
    """After close(): the pools refuse new work and the batcher is stopped: each is a 503 "shutting down"."""
    service = Service(model, ServeSettings())
    service.close()

    async def ask(work):
        try:
            await work()
        except ApiError as e:
            return e.status, e.message
        return None

    shut = asyncio.run(ask(lambda: service.pixels([CAT.read_bytes()], ["cat"])))
    assert shut is not None and shut[0] == 503 and "shutting down" in shut[1]
    queued = asyncio.run(ask(lambda: _queued(service.batcher.compute([], "cls", expected=0))))
    assert queued is not None and queued[0] == 503
    with pytest.raises(ApiError) as caught:
        service.on_model_thread(lambda: 1)
    assert caught.value.status == 503


class FakeResource:
    RLIMIT_NOFILE, RLIM_INFINITY = 7, -1

    def __init__(self, soft, hard):
        self.limits, self.set = (soft, hard), []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        self.set.append(limits)


@pytest.mark.parametrize(
    "soft, hard, wanted",
    [
        (1024, 4096, [(4096, 4096)]),  # raised to the hard limit
        (4095, 4096, [(4096, 4096)]),
        (4096, 4096, []),  # already there
        (1024, -1, [(1 << 20, -1)]),  # no hard limit: a million
        ((1 << 20) - 1, -1, [(1 << 20, -1)]),
        (1 << 20, -1, []),
        (-1, -1, []),  # no limit at all
    ],
)
def test_the_open_file_limit_is_raised_to_the_hard_one(monkeypatch, soft, hard, wanted):
    import sys

    fake = FakeResource(soft, hard)
    monkeypatch.setitem(sys.modules, "resource", fake)
    serve_server.raise_open_file_limit()
    assert fake.set == wanted


def test_serve_runs_uvicorn_with_the_limit_raised_and_sigterm_quiet(monkeypatch, model):
    import signal

    import uvicorn

    ran, handlers = [], {}

    class FakeServer:
        def __init__(self, config):
            self.config = config

        def run(self):
            ran.append(self.config)

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(serve_server, "raise_open_file_limit", lambda: ran.append("limit"))
    monkeypatch.setattr(signal, "signal", lambda which, handler: handlers.__setitem__(which, handler))
    settings = ServeSettings()
    app = create_app(model, settings, warm=False)
    try:
        serve_server.serve(app, "127.0.0.1", 0, settings)
    finally:
        app.state.service.close()
    assert ran[0] == "limit" and ran[1].host == "127.0.0.1" and ran[1].port == 0
    assert set(handlers) == {signal.SIGTERM} and handlers[signal.SIGTERM]() is None


def test_error_kinds_and_reasons_without_the_anonymous_name():
    """ApiError.kind: a 4xx is the client's (invalid_request_error, but 401, 413 and 429 by name), 500
    and up the server's; _reason drops only a "<N bytes>: " name, and keeps every later ": " of the
    reason. Planted: `status <= 500` (a 500 the client's); the reason split at every ": "; the name
    dropped from messages that do not start with "<"."""
    from dino3.serve.service import _reason

    kinds = {s: ApiError(s, "m").kind for s in (400, 401, 404, 413, 429, 499, 500, 503)}
    assert kinds == {
        400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
        413: "request_too_large", 429: "rate_limit_error", 499: "invalid_request_error",
        500: "server_error", 503: "server_error",
    }  # fmt: skip
    assert _reason(ValueError("<12 bytes>: truncated (OSError: image file is truncated)")) == (
        "truncated (OSError: image file is truncated)"
    )
    assert _reason(ValueError("cat.png: not an image")) == "cat.png: not an image"
    assert _reason(ValueError("<12 bytes> without a reason")) == "<12 bytes> without a reason"


def test_a_request_of_exactly_max_images_is_taken(client):
    """max_images is 4 here: 4 images are embedded, 5 are a 413 naming the limit. Planted: `count >=
    max_images` refused."""
    response = client.post("/v1/embeddings", json={"input": [IMAGE] * 4})
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["data"]) == 4
    message = error(client.post("/v1/embeddings", json={"input": [IMAGE] * 5}), 413, "input")
    assert message == "5 inputs in one request; this server takes at most 4"


def test_an_upload_in_a_field_named_file_is_taken_like_files(client):
    """`curl -F file=@cat.png` (the singular field name) embeds the image as `files` does, with the
    same vector. Planted: only the `files` field read (J-S6, issue 31's sixth mutation pass: a 400
    'no image')."""
    plural = client.post("/v1/embeddings/upload", files=[("files", ("cat.png", CAT.read_bytes()))])
    singular = client.post("/v1/embeddings/upload", files=[("file", ("cat.png", CAT.read_bytes()))])
    assert plural.status_code == singular.status_code == 200, singular.text[:300]
    assert singular.json()["data"][0]["embedding"] == plural.json()["data"][0]["embedding"]
