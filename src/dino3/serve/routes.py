"""The embedding routes in OpenAI's shape, on FastAPI (this module imports it):

POST /v1/embeddings (JSON: images as data URLs or base64, http(s) URLs with allow_urls; with a
dino.txt model, texts too, as plain strings: texts and images come back in one space, in input order),
POST /v1/embeddings/upload (multipart files), POST /v1/patches (the patch grid and its size),
GET /v1/models and /v1/models/{name} (every name this server answers to), GET /healthz, GET /readyz
(loaded and warmed), GET /metrics (Prometheus, by route), GET /docs (OpenAPI); app.py adds the page
and the search.

    app = create_core_app(model, ServeSettings(max_batch=32))

OpenAI's clients work as they are: `encoding_format` float or base64; `dimensions` is refused with the
reason (DINOv3 is not trained for shortened embeddings, so a cut vector would be silently worse);
token arrays (LangChain's OpenAIEmbeddings sends them unless check_embedding_ctx_length=False) get a
400 that says so. Safe by default: CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from .metrics import route_label
from .service import ENCODINGS, SHUTTING_DOWN, ApiError, ServeSettings, Service, body_of, encode, parse

TOKEN_ARRAYS = (
    "input holds token arrays (numbers), the way OpenAI clients send text; this server takes strings: "
    "images as data URLs or base64 (and, served with a dino.txt model, texts as they are). LangChain's "
    "OpenAIEmbeddings sends token arrays unless told otherwise: pass check_embedding_ctx_length=False "
    "(and your images as data URLs)"
)
NO_DIMENSIONS = (
    "dimensions: DINOv3 is not trained to be truncated (no Matryoshka training), so a shortened embedding "
    "would be silently worse; this server returns the model's full vectors. Leave dimensions out, or "
    "reduce the vectors yourself (a PCA fitted on your own features keeps the most)"
)


class EmbeddingRequest(BaseModel):
    input: Any
    model: str | None = None
    encoding_format: str = "float"
    pool: str | None = None  # None: the model's default (cls; text for a dino.txt model)
    dimensions: int | None = None
    user: str | None = None  # OpenAI's; not used


class PatchesRequest(BaseModel):
    input: Any
    model: str | None = None
    encoding_format: str = "float"


def input_list(value: Any) -> list[Any]:
    """The images of an `input` field: one string or a list of them; token arrays refused with the
    setting that stops LangChain from sending them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(400, f"input must be a string or a list of strings, got {type(value).__name__}", "input")
    if value and all(isinstance(v, int) or (isinstance(v, list) and all(isinstance(t, int) for t in v)) for v in value):
        raise ApiError(400, TOKEN_ARRAYS, "input", "token_arrays")
    return value


def create_core_app(model: Any, settings: ServeSettings | None = None, processor=None, warm: bool = True):
    """The FastAPI application serving `model` (a loaded dino3 model or runtime): the embedding routes,
    the model list, health and metrics; app.py adds the page and the search."""
    settings = settings or ServeSettings()
    service = Service(model, settings, processor)

    async def lifespan(app):
        if warm:
            await service.warm_up()
        else:
            service.ready = True
        yield
        service.close()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="dino3", version=__version__, lifespan=lifespan)
    app.state.service = service
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # no such route, wrong method
        message = f"{request.method} {request.url.path}: {error.detail}"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        body = {"error": {"message": message, "type": "invalid_request_error", "param": where, "code": None}}
        return JSONResponse(body, status_code=400)

    app.add_middleware(Guard, service=service, router=app.router)

    def check_request(payload: EmbeddingRequest | PatchesRequest) -> tuple[list[Any], str]:
        """The inputs and the model name to answer with, once every field but the pool is checked."""
        name = service.model_answered(payload.model)
        if getattr(payload, "dimensions", None) is not None:
            raise ApiError(400, NO_DIMENSIONS, "dimensions", "dimensions_not_supported")
        if payload.encoding_format not in ENCODINGS:
            raise ApiError(400, f"encoding_format must be one of {ENCODINGS}", "encoding_format")
        if getattr(payload, "pool", None) is not None:
            service.check_pool(payload.pool)
        return input_list(payload.input), name

    async def embed(
        sources: list, names: list[str], texts: set[int], pool: str | None, encoding: str, model_name: str
    ) -> dict:
        pool = service.check_pool(pool, texts=bool(texts))
        vectors, tokens = await service.embeddings(sources, names, texts, pool)
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v.numpy(), encoding)} for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "images": len(sources) - len(texts)}
        if service.texts:
            usage["texts"] = len(texts)
        return {"object": "list", "data": data, "model": model_name, "usage": usage}

    @app.post("/v1/embeddings", summary="Embeddings of images (and, with a dino.txt model, texts): OpenAI's shape")
    async def embeddings(request: Request):
        payload = await parse(request, EmbeddingRequest, settings)
        items, model_name = check_request(payload)
        sources, names, texts = await service.inputs(items, texts=True)
        return await embed(sources, names, texts, payload.pool, payload.encoding_format, model_name)

    @app.post("/v1/embeddings/upload", summary="Embeddings of uploaded image files (multipart)")
    async def upload(request: Request):
        # The whole body is read within the byte limit and the deadline first (a chunked upload has
        # no Content-Length to refuse it by), then parsed.
        body = await body_of(request, settings.max_body_bytes, settings.body_timeout_s)
        form = await _replayed(request, body).form(max_files=settings.max_images + 1, max_fields=16)
        files = form.getlist("files") or form.getlist("file")
        pool, encoding = form.get("pool"), str(form.get("encoding_format", "float"))
        model_name = service.model_answered(str(form["model"]) if "model" in form else None)
        if "dimensions" in form:
            raise ApiError(400, NO_DIMENSIONS, "dimensions", "dimensions_not_supported")
        pool = service.check_pool(None if pool is None else str(pool))
        if encoding not in ENCODINGS:
            raise ApiError(400, f"encoding_format must be one of {ENCODINGS}", "encoding_format")
        service.check_count(len(files))
        sources, names = [], []
        for i, part in enumerate(files):
            if isinstance(part, str):
                raise ApiError(400, f"files[{i}] is a text field, not a file", f"files[{i}]")
            sources.append(await part.read())
            names.append(f"files[{i}] ({part.filename})")
        return await embed(sources, names, set(), pool, encoding, model_name)

    @app.post("/v1/patches", summary="Patch features of images: each grid and its values")
    async def patches(request: Request):
        payload = await parse(request, PatchesRequest, settings)
        items, model_name = check_request(payload)
        sources, names, _ = await service.inputs(items)
        pixels = await service.pixels(sources, names)
        grids = await service.features(pixels, "patches")  # each (h, w, D)
        data = [
            {
                "object": "patches",
                "index": i,
                "grid": list(g.shape[:2]),
                "dim": int(g.shape[2]),
                "embedding": encode(g.reshape(-1).numpy(), payload.encoding_format),
            }
            for i, g in enumerate(grids)
        ]
        return {"object": "list", "data": data, "model": model_name}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": service.created, "owned_by": "dino3"}

    @app.get("/v1/models", summary="Every model name this server answers to (OpenAI's list)")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in service.names]}

    @app.get("/v1/models/{name:path}", summary="One model name this server answers to")
    async def model(name: str):
        return model_card(service.model_answered(name))

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed")
    async def readyz():
        if not service.ready:
            raise ApiError(503, "warming up")
        return {"status": "ready", "model": service.name}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class Guard:
    """ASGI middleware in front of every route: the API key, the Content-Length limit, the metrics (by
    route), and a 503 for a request cancelled before its answer began (uvicorn's shutdown timeout):
    a plain ASGI layer, so that catching the cancellation here leaves no task group to re-raise it."""

    def __init__(self, app: Any, service: Service, router: Any) -> None:
        self.app, self.service, self.router = app, service, router

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, answering = time.perf_counter(), 500, False

        async def sent(message: dict) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
            await send(message)

        self.service.metrics.in_progress.inc()
        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await _answer(refusal, scope, receive, sent)
            else:
                await self.app(scope, receive, sent)
        except asyncio.CancelledError:
            if answering:
                raise
            await _answer(ApiError(503, SHUTTING_DOWN), scope, receive, sent)
        finally:
            self.service.metrics.in_progress.dec()
            seconds = time.perf_counter() - started
            self.service.metrics.request(route_label(self.router, scope), status, seconds)

    def refusal(self, scope: dict) -> ApiError | None:
        from starlette.datastructures import Headers

        settings, headers = self.service.settings, Headers(scope=scope)
        if settings.api_key is not None and scope["path"] not in self.service.public_routes:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return ApiError(
                413, f"the body is {int(length)} bytes; this server takes at most {settings.max_body_bytes}"
            )
        return None


async def _answer(error: ApiError, scope: dict, receive: Any, send: Any) -> None:
    await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


def _replayed(request: Request, body: bytes) -> Request:
    """A request whose body is `body`, already read."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)
