"""The HTTP service: dino3's exact features behind an OpenAI-shaped embeddings API, on FastAPI.

    app = create_core_app(model, ServeSettings(max_batch=32))     # app.create_app adds the page, search

The service needs the `serve` extra (FastAPI, uvicorn); this module imports FastAPI.

Routes: POST /v1/embeddings (JSON: images as data URLs or base64; URLs with allow_urls),
POST /v1/embeddings/upload (multipart files), POST /v1/patches (the patch grid and its size),
GET /healthz, GET /readyz (loaded and warmed), GET /metrics (Prometheus), GET /docs (OpenAPI), and
the routes other rooms add (search, the page). Images are decoded off the event loop by a few
threads and batched across requests by one model thread (batcher.py).

Every mistake gets the OpenAI error shape, {"error": {"message", "type", "param", "code"}}: 400 for
a bad input (naming which one and why; the rest of the batch is unharmed), 401 without the API key,
413 over a limit (body bytes, images per request, pixels), 429 with Retry-After when the queue is
full. Safe by default: URLs in inputs are fetched only with allow_urls, and then never from the
server's own network unless allow_private_urls; CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._openmp import helper_thread
from .._version import __version__
from ..errors import ImageError, ImageTooLargeError
from ..images import MAX_PIXELS, MemoryBudget, download
from .batcher import Batcher, QueueFull

EMBEDDING_POOLS = ("cls", "mean", "cls+mean")
ENCODINGS = ("float", "base64")


@dataclass
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256  # images waiting for the model; beyond: 429
    max_images: int = 64  # per request; beyond: 413
    max_body_bytes: int = 32 * 2**20  # beyond: 413
    max_pixels: int = 40_000_000  # per image, refused before decoding; beyond: 413
    api_key: str | None = None
    allow_urls: bool = False
    allow_private_urls: bool = False
    cors_origins: list[str] = field(default_factory=list)
    decode_threads: int = 2
    model_name: str | None = None  # what clients may name in "model" (default: how it was loaded)


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 413: "request_too_large", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )


class Service:
    """The state behind the routes: the model, its processor, the batcher, the metrics."""

    def __init__(self, model: Any, settings: ServeSettings, processor=None) -> None:
        from ..processing import DINOv3ViTImageProcessor

        self.model = model
        self.settings = settings
        self.processor = processor or DINOv3ViTImageProcessor.for_model(model)
        self.name = settings.model_name or str(getattr(model, "name_or_path", None) or "dino3")
        self.decoders = ThreadPoolExecutor(  # one-thread torch ops on a CPU: the model keeps the only team
            settings.decode_threads, thread_name_prefix="dino3-serve-decode", initializer=helper_thread
        )
        self.memory = MemoryBudget(max(settings.max_pixels, MAX_PIXELS // 4))
        self.metrics = Metrics()
        self.batcher = Batcher(
            model, settings.max_batch, settings.max_wait_ms, settings.max_queue, on_batch=self.metrics.batch
        )
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.ready = False
        self.extras: dict[str, Any] = {}  # what other rooms attach (an index, ...)
        self.public_routes = {"/healthz", "/readyz"}  # open without the API key

    async def warm_up(self) -> None:
        """One forward at the processor's size, on the model's thread, so that the first request does
        not pay for it."""
        import torch

        size = self.processor.size if isinstance(self.processor.size, dict) else {}
        height, width = size.get("height") or 224, size.get("width") or 224
        # Made by numpy: a torch op this large would build an OpenMP team on the event loop's thread.
        pixels = torch.from_numpy(np.zeros((3, height, width), dtype=np.float32))
        await self.batcher.compute([pixels], "cls")
        self.ready = True

    def close(self) -> None:
        self.batcher.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)

    # -- inputs ----------------------------------------------------------------------------------------
    def check_count(self, count: int) -> None:
        if count == 0:
            raise ApiError(400, "input holds no image", "input")
        if count > self.settings.max_images:
            raise ApiError(
                413, f"{count} images in one request; this server takes at most {self.settings.max_images}", "input"
            )

    def image_bytes(self, item: Any, param: str) -> bytes:
        """The bytes an input string names: a data URL, base64, or (when allowed) an http(s) URL."""
        if not isinstance(item, str):
            raise ApiError(
                400, f"{param} must be a string (a data URL or base64 image), got {type(item).__name__}", param
            )
        if item.startswith(("http://", "https://")):
            if not self.settings.allow_urls:
                raise ApiError(400, f"{param}: URLs are not fetched by this server (start it with --allow-urls)", param)
            self._check_public(item, param)
            try:
                return download(item, max_bytes=self.settings.max_body_bytes, timeout=20)
            except ImageTooLargeError as e:
                raise ApiError(413, f"{param}: {e}", param) from None
            except ImageError as e:
                raise ApiError(400, f"{param}: {e}", param) from None
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param} is neither a data URL nor base64-encoded image bytes", param) from None

    def _check_public(self, url: str, param: str) -> None:
        if self.settings.allow_private_urls:
            return
        host = urlparse(url).hostname or ""
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            raise ApiError(400, f"{param}: cannot resolve {host!r}", param) from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global:
                raise ApiError(
                    400, f"{param}: {host} is on a private network; this server fetches only public URLs", param
                )

    async def pixels(self, blobs: list[bytes], names: list[str], processor=None):
        """Decode and preprocess every image off the event loop (with the service's processor, or
        `processor`); the first bad one is a 400 (413 over a size limit) that names it."""
        loop = asyncio.get_running_loop()
        processor = processor or self.processor

        def decode(data: bytes):
            return processor.pixels(data, memory=self.memory, max_pixels=self.settings.max_pixels)

        self.batcher.expect(len(blobs))  # the batcher waits for them (features() takes them in)
        try:
            tasks = [loop.run_in_executor(self.decoders, decode, data) for data in blobs]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for name, result in zip(names, results):
                if isinstance(result, ImageTooLargeError):
                    raise ApiError(413, f"{name}: {_reason(result)}", name)
                if isinstance(result, Exception):
                    raise ApiError(400, f"{name}: {_reason(result)}", name)
        except BaseException:  # a bad image, a client gone: they will not come
            self.batcher.expect(-len(blobs))
            raise
        return results

    async def images(self, items: list[Any]) -> tuple[list[bytes], list[str]]:
        """The bytes of each input string of a JSON request (see image_bytes), and their names."""
        self.check_count(len(items))
        names = [f"input[{i}]" for i in range(len(items))]
        blobs = await asyncio.gather(*(asyncio.to_thread(self.image_bytes, item, n) for item, n in zip(items, names)))
        return list(blobs), names

    async def features(self, pixels: list, pool: str):
        """The features of what pixels() decoded (and announced), right after it."""
        try:
            return await self.batcher.compute(pixels, pool, expected=len(pixels))
        except QueueFull as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(int(e.retry_after + 0.999))}) from None


def _reason(error: Exception) -> str:
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text  # "<123 bytes>: why"


async def body_of(request: Request, max_bytes: int) -> bytes:
    """The request body, refused once it passes the limit (a body sent without its length too)."""
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"the body is over {max_bytes} bytes, this server's limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model_class: type[BaseModel], max_bytes: int) -> Any:
    """A JSON body as `model_class`; malformed JSON or a wrong field is a 400 that says where."""
    import json

    raw = await body_of(request, max_bytes)
    try:
        return model_class.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise ApiError(400, "the body nests JSON too deeply") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else None  # the field, not pydantic's union branch
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], where) from None


def encode(vector: np.ndarray, encoding: str) -> Any:
    """A float32 vector as a JSON list, or as base64 of its little-endian bytes (OpenAI's encoding)."""
    array = np.ascontiguousarray(vector, dtype="<f4")
    return base64.b64encode(array.tobytes()).decode() if encoding == "base64" else array.tolist()


class Metrics:
    """Prometheus metrics of one service, in a registry of its own (no process-wide state)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("dino3_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "dino3_request_seconds",
            "Time to answer a request",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dino3_batch_size", "Images per forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )
        self.batch_seconds = Histogram("dino3_batch_seconds", "Time of one forward", registry=self.registry)
        self.queue_depth = Gauge("dino3_queue_depth", "Images waiting for the model", registry=self.registry)
        self.images = Counter("dino3_images", "Images embedded", registry=self.registry)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_core_app(model: Any, settings: ServeSettings | None = None, processor=None, warm: bool = True):
    """The FastAPI application serving `model` (a loaded dino3 model or runtime): the embedding routes,
    health and metrics; app.py adds the page and the search."""
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
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

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

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        route = request.url.path
        try:
            if settings.api_key and route not in service.public_routes:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                    raise ApiError(
                        401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key"
                    )
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                raise ApiError(
                    413, f"the body is {int(length)} bytes; this server takes at most {settings.max_body_bytes}"
                )
            response = await call_next(request)
        except ApiError as error:
            response = await api_error(request, error)
        service.metrics.requests.labels(route, str(response.status_code)).inc()
        service.metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    class EmbeddingRequest(BaseModel):
        input: str | list[str]
        model: str | None = None
        encoding_format: str = "float"
        pool: str = "cls"

    def check_request(payload: EmbeddingRequest, pools=EMBEDDING_POOLS) -> list[str]:
        if payload.model is not None and payload.model not in (service.name, _short(service.name)):
            raise ApiError(
                404,
                f"model {payload.model!r} is not served here; this server serves {service.name!r}",
                "model",
                "model_not_found",
            )
        if payload.encoding_format not in ENCODINGS:
            raise ApiError(400, f"encoding_format must be one of {ENCODINGS}", "encoding_format")
        if payload.pool not in pools:
            raise ApiError(400, f"pool must be one of {pools}", "pool")
        return [payload.input] if isinstance(payload.input, str) else list(payload.input)

    async def embed(blobs: list[bytes], names: list[str], pool: str, encoding: str) -> dict:
        pixels = await service.pixels(blobs, names)
        vectors = await service.features(pixels, pool)
        tokens = sum(service.model.config.num_prefix_tokens + _grid_count(service, p) for p in pixels)
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v.numpy(), encoding)} for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "images": len(blobs)}
        return {"object": "list", "data": data, "model": service.name, "usage": usage}

    @app.post("/v1/embeddings", summary="Embeddings of images (OpenAI's shape)")
    async def embeddings(request: Request):
        payload = await parse(request, EmbeddingRequest, settings.max_body_bytes)
        blobs, names = await service.images(check_request(payload))
        return await embed(blobs, names, payload.pool, payload.encoding_format)

    @app.post("/v1/embeddings/upload", summary="Embeddings of uploaded image files (multipart)")
    async def upload(request: Request):
        form = await request.form(max_files=settings.max_images + 1, max_part_size=settings.max_body_bytes)
        files = form.getlist("files") or form.getlist("file")
        pool, encoding = str(form.get("pool", "cls")), str(form.get("encoding_format", "float"))
        if pool not in EMBEDDING_POOLS:
            raise ApiError(400, f"pool must be one of {EMBEDDING_POOLS}", "pool")
        if encoding not in ENCODINGS:
            raise ApiError(400, f"encoding_format must be one of {ENCODINGS}", "encoding_format")
        service.check_count(len(files))
        blobs, names = [], []
        for i, upload in enumerate(files):
            if isinstance(upload, str):
                raise ApiError(400, f"files[{i}] is a text field, not a file", f"files[{i}]")
            blobs.append(await upload.read())
            names.append(f"files[{i}] ({upload.filename})")
        return await embed(blobs, names, pool, encoding)

    class PatchesRequest(BaseModel):
        input: str | list[str]
        model: str | None = None
        encoding_format: str = "float"

    @app.post("/v1/patches", summary="Patch features of images: each grid and its values")
    async def patches(request: Request):
        payload = await parse(request, PatchesRequest, settings.max_body_bytes)
        blobs, names = await service.images(check_request(EmbeddingRequest(**payload.model_dump(), pool="cls")))
        pixels = await service.pixels(blobs, names)
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
        return {"object": "list", "data": data, "model": service.name}

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


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _grid_count(service: Service, pixels) -> int:
    h, w = service.model.config.grid_size(*pixels.shape[-2:])
    return h * w
