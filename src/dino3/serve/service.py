"""The state behind the routes: the settings, the model's names, the inputs (images fetched and
decoded off the event loop; texts tokenized there) and the batcher; the OpenAI error shape; bounded
body reading.

    service = Service(model, ServeSettings(max_batch=32))      # routes.py builds the app around it

Every mistake is an ApiError, answered in OpenAI's error shape {"error": {"message", "type", "param",
"code"}}: 400 for a bad input (naming which one and why), 401 without the API key, 404 for a model
this server does not serve, 408 for a body that stops arriving, 413 over a limit (body bytes, images
per request, pixels), 429 with Retry-After when the queue is full, 503 while shutting down.

Images are data URLs or base64 and, with allow_urls, http(s) URLs: those are downloaded by
dino3.fetch.fetch_bytes in a pool of their own (never the event loop's shared one), a few at a time
per request, within a deadline each, and cancelled with their request; from public addresses only
unless allow_private_urls. With a dino.txt model, the routes that take texts (embeddings, search)
read every other string (neither a data URL nor a URL) as a text: images must then come as data
URLs (or URLs), and a URL is always an image, refused without allow_urls rather than read as text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePath
from typing import Any

import numpy as np

from .._openmp import helper_thread
from ..errors import ImageError, ImageTooLargeError, UsageError
from ..fetch import decode_base64, decode_data_url, fetch_bytes, is_data_url, is_url
from ..images import MAX_PIXELS, MemoryBudget
from .batcher import TEXT, Batcher, QueueFull, Stopped
from .metrics import Metrics

EMBEDDING_POOLS = ("cls", "mean", "cls+mean")  # and TEXT for a dino.txt model (its default)
ENCODINGS = ("float", "base64")
SHUTTING_DOWN = "the server is shutting down; retry elsewhere"
DOWNLOADS_PER_REQUEST = 4  # URLs of one request fetched at once: one request cannot take the whole pool


@dataclass
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256  # images waiting for the model; beyond: 429
    max_images: int = 64  # per request; beyond: 413
    max_body_bytes: int = 32 * 2**20  # beyond: 413, with or without a Content-Length
    max_pixels: int = 40_000_000  # per image, refused before decoding; beyond: 413
    max_text_chars: int = 10_000  # per text (dino.txt reads its first 77 tokens, ~300 characters); beyond: 413
    api_key: str | None = None  # None: no key; "" is refused (it would look like a key and guard nothing)
    allow_urls: bool = False
    allow_private_urls: bool = False
    cors_origins: list[str] = field(default_factory=list)
    decode_threads: int = 2
    served_model_names: list[str] = field(default_factory=list)  # what clients name in "model" (vLLM's flag)
    download_threads: int = 16  # the pool that fetches URL inputs (allow_urls)
    url_timeout_s: float = 20.0  # one URL's whole download
    body_timeout_s: float = 60.0  # a request body must arrive within this; then 408
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this (server.py)
    keep_alive_s: int = 5  # an idle connection is closed after this (server.py)
    max_connections: int = 1000  # beyond: 503 at once (server.py)
    shutdown_timeout_s: float | None = None  # SIGTERM: wait this long for requests in flight (None: all)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("api_key is empty: give a real key, or None to serve without one")
        if any(not str(name).strip() for name in self.served_model_names):
            raise UsageError("served_model_names holds an empty name")


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def served_names(model: Any, names: list[str] | None = None) -> list[str]:
    """Every name a client may give in "model", the one answers carry first: the names given (or the
    name the model was loaded by, and its last path part), then the preset and hub id of the
    checkpoint served, where dino3 knows it is that checkpoint (see `checkpoint_names`)."""
    loaded = str(getattr(model, "name_or_path", None) or "dino3")
    found = list(names) if names else [loaded, PurePath(loaded.rstrip("/")).name or loaded]
    found += checkpoint_names(model)
    return list(dict.fromkeys(n for n in found if n))


def checkpoint_names(model: Any) -> list[str]:
    """The preset name and hub id of the checkpoint a model is known to be: one loaded by a preset
    name, a hub id or Meta's own file name (model.preset), or a folder of the hub's cache
    (.../models--ORG--NAME/snapshots/REV), which records its repo. A folder that merely has a preset's
    shapes is not given its names: a fine-tuned copy has the same shapes."""
    from ..presets import find_preset

    preset = getattr(model, "preset", None)
    hub_id = recorded_hub_id(str(getattr(model, "name_or_path", None) or ""))
    if preset is None and hub_id is not None:
        preset = find_preset(hub_id)
    names = [preset.name, getattr(preset, "hub_id", None)] if preset is not None else []  # dino.txt's: no hub id
    return [n for n in names if n] + ([hub_id] if hub_id else [])


def recorded_hub_id(path: str) -> str | None:
    """The repo id a folder of the Hugging Face cache records in its path, or None."""
    parts = PurePath(path).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def is_text_model(model: Any) -> bool:
    """Whether a model is dino.txt's (texts and images in one space)."""
    return hasattr(model, "encode_text")


class Service:
    """The model, its processor and names, the decoding and download pools, the batcher, the metrics.

    A dino.txt model also embeds texts, and its images in their space (pool "text", its default); its
    other pools are its backbone's, and its processor is Meta's dino.txt transform."""

    def __init__(self, model: Any, settings: ServeSettings, processor=None) -> None:
        from ..processing import DINOv3ViTImageProcessor

        self.model = model
        self.settings = settings
        self.texts = is_text_model(model)
        self.backbone = model.backbone if self.texts else model  # what makes the cls/mean/patch features
        if self.texts:
            model.tokenizer  # noqa: B018  (built now: without ftfy and regex, a clear error at start-up)
            processor = processor or DINOv3ViTImageProcessor.for_dinotxt()
        self.processor = processor or DINOv3ViTImageProcessor.for_model(model)
        self.pools = EMBEDDING_POOLS + ((TEXT,) if self.texts else ())
        self.default_pool = TEXT if self.texts else "cls"
        self.names = served_names(model, settings.served_model_names)
        self.name = self.names[0]
        self.created = int(time.time())
        self.decoders = ThreadPoolExecutor(  # one-thread torch ops on a CPU: the model keeps the only team
            settings.decode_threads, thread_name_prefix="dino3-serve-decode", initializer=helper_thread
        )
        self.downloads = ThreadPoolExecutor(settings.download_threads, thread_name_prefix="dino3-serve-fetch")
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
        """One forward at the processor's size (and, for dino.txt, one of a text), on the model's
        thread, so that the first request does not pay for it."""
        import torch

        size = self.processor.size if isinstance(self.processor.size, dict) else {}
        height, width = size.get("height") or 224, size.get("width") or 224
        # Made by numpy: a torch op this large would build an OpenMP team on the event loop's thread.
        pixels = torch.from_numpy(np.zeros((3, height, width), dtype=np.float32))
        await self.batcher.compute([pixels], self.default_pool)
        if self.texts:
            await self.batcher.compute_texts((await self.tokens([""], ["warm-up"]))[0])
        self.ready = True

    def on_model_thread(self, fn, *args: Any) -> Any:
        """fn(*args) on the model's thread, waited for (a check that runs the model: never on the
        event loop's or a pool's thread, which would keep an OpenMP team of their own)."""
        try:
            return self.batcher.run(partial(fn, *args))
        except Stopped:
            raise ApiError(503, SHUTTING_DOWN) from None

    def close(self) -> None:
        """After the requests in flight: finish the batch running (never leave torch running as the
        process exits), then stop the pools."""
        self.batcher.stop()
        self.downloads.shutdown(wait=False, cancel_futures=True)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def model_answered(self, asked: str | None) -> str:
        """The name an answer carries: the one asked for, when this server serves it (else a 404)."""
        if asked is None:
            return self.name
        if asked not in self.names:
            raise ApiError(
                404,
                f"model {asked!r} is not served here; this server answers to {self.names} (GET /v1/models)",
                "model",
                "model_not_found",
            )
        return asked

    # -- inputs ----------------------------------------------------------------------------------------
    def check_count(self, count: int, what: str = "image") -> None:
        if count == 0:
            raise ApiError(400, f"input holds no {what}", "input")
        if count > self.settings.max_images:
            raise ApiError(
                413, f"{count} inputs in one request; this server takes at most {self.settings.max_images}", "input"
            )

    def check_pool(self, pool: str | None, texts: bool = False) -> str:
        """The pool a request asked for (None: the model's default), one this model has; with texts
        among the inputs, only the one whose images share the texts' space."""
        pool = self.default_pool if pool is None else pool
        if pool == TEXT and not self.texts:
            raise ApiError(400, "pool 'text' (images in the space of texts) needs a dino.txt model", "pool")
        if pool not in self.pools:
            raise ApiError(400, f"pool must be one of {self.pools}", "pool")
        if texts and pool != TEXT:
            raise ApiError(
                400,
                f"texts are embedded in the space of pool 'text' (dino.txt's image embedding); images of pool "
                f"{pool!r} are backbone features that texts cannot be compared with: leave pool out",
                "pool",
            )
        return pool

    async def inputs(self, items: list[Any], texts: bool = False) -> tuple[list[bytes | str], list[str], set[int]]:
        """A JSON request's input strings, URLs fetched (see the module docstring); the others stay
        strings, decoded from base64 on a decoding thread by pixels(). With `texts` (a route that takes
        them) and a dino.txt model, the positions of the texts come third (an empty set otherwise)."""
        what = "input" if texts and self.texts else "image"
        self.check_count(len(items), what)
        names = [f"input[{i}]" for i in range(len(items))]
        kinds = "a text, a data URL or an image URL" if what == "input" else "a data URL or base64 image"
        found = set()
        for i, (item, name) in enumerate(zip(items, names)):
            if not isinstance(item, str):
                raise ApiError(400, f"{name} must be a string ({kinds}), got {type(item).__name__}", name)
            if is_url(item) and not self.settings.allow_urls:
                raise ApiError(400, f"{name}: URLs are not fetched by this server (start it with --allow-urls)", name)
            if what == "input" and not is_url(item) and not is_data_url(item):
                if len(item) > self.settings.max_text_chars:
                    raise ApiError(
                        413,
                        f"{name} is a text of {len(item)} characters; this server takes at most "
                        f"{self.settings.max_text_chars} (the model reads a text's first "
                        f"{self.model.config.context_length} tokens)",
                        name,
                    )
                found.add(i)
        urls = [i for i, item in enumerate(items) if is_url(item)]
        sources: list[bytes | str] = list(items)
        if urls:
            fetched = await self._download([items[i] for i in urls], [names[i] for i in urls])
            for i, data in zip(urls, fetched):
                sources[i] = data
        return sources, names, found

    async def _download(self, urls: list[str], names: list[str]) -> list[bytes]:
        """The URLs' bytes, a few at a time in the download pool; the first failure (or the request's
        cancellation) cancels the rest: queued ones at once, running ones at their next read."""
        cancel = threading.Event()
        turns = asyncio.Semaphore(DOWNLOADS_PER_REQUEST)
        fetch = partial(
            fetch_bytes,
            public_only=not self.settings.allow_private_urls,
            max_bytes=self.settings.max_body_bytes,
            timeout=self.settings.url_timeout_s,
            cancel=cancel,
        )

        async def one(url: str, name: str) -> bytes:
            async with turns:
                try:
                    return await self.submit(self.downloads, fetch, url)
                except ImageTooLargeError as e:
                    raise ApiError(413, f"{name}: {e}", name) from None
                except ImageError as e:
                    raise ApiError(400, f"{name}: {e}", name) from None

        tasks = [asyncio.ensure_future(one(url, name)) for url, name in zip(urls, names)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            cancel.set()  # the downloads still running stop; they are of no use to anyone now
            for task in tasks:
                task.cancel()

    def source_bytes(self, source: bytes | str, name: str) -> bytes:
        """The bytes of one input: uploaded bytes, a data URL, or base64."""
        if isinstance(source, bytes):
            return source
        try:
            return decode_data_url(source) if is_data_url(source) else decode_base64(source, name)
        except ImageError:
            raise ApiError(400, f"{name} is neither a data URL nor base64-encoded image bytes", name) from None

    async def pixels(self, sources: list[bytes | str], names: list[str], processor=None):
        """Decode and preprocess every image on the decoding threads (with the service's processor, or
        `processor`); the first bad one is a 400 (413 over a size limit) that names it."""
        processor = processor or self.processor

        def decode(source: bytes | str, name: str):
            data = self.source_bytes(source, name)
            return processor.pixels(data, memory=self.memory, max_pixels=self.settings.max_pixels)

        return await self.decode_all(sources, names, decode)

    async def decode_all(self, sources: list[bytes | str], names: list[str], decode) -> list[Any]:
        """decode(source, name) of every image on the decoding threads, each announced to the batcher
        (features() takes them in right after); the first bad one is a 400 (413 over a size limit)
        that names it."""
        self.batcher.expect(len(sources))  # the batcher waits for them (features() takes them in)
        try:
            tasks = [self.submit(self.decoders, decode, s, n) for s, n in zip(sources, names)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for name, result in zip(names, results):
                if isinstance(result, ApiError):
                    raise result
                if isinstance(result, ImageTooLargeError):
                    raise ApiError(413, f"{name}: {_reason(result)}", name)
                if isinstance(result, asyncio.CancelledError):  # the pool was shut down under it
                    raise ApiError(503, SHUTTING_DOWN)
                if isinstance(result, BaseException):
                    raise ApiError(400, f"{name}: {_reason(result)}", name)
        except BaseException:  # a bad image, a client gone: they will not come
            self.batcher.expect(-len(sources))
            raise
        return results

    async def features(self, pixels: list, pool: str):
        """The features of what pixels() decoded (and announced), right after it."""
        return await _queued(self.batcher.compute(pixels, pool, expected=len(pixels)))

    async def tokens(self, texts: list[str], names: list[str]) -> tuple[list[Any], int]:
        """dino.txt's token ids of each text ((L,) rows), tokenized on a decoding thread, and how many
        tokens the model reads of them: each text's up to its end-of-text (the largest id)."""

        def tokenize():
            ids = self.model.tokenize(texts)  # (T, L)
            return list(ids), int((ids.argmax(dim=-1) + 1).sum())

        try:
            return await self.submit(self.decoders, tokenize)
        except (TypeError, ValueError) as e:  # not expected of any string; said with the inputs' names
            raise ApiError(400, f"{', '.join(names)}: cannot be tokenized ({e})", names[0]) from None

    async def embeddings(
        self, sources: list[bytes | str], names: list[str], texts: set[int], pool: str, processor=None
    ) -> tuple[list[Any], int]:
        """Every input's vector, in input order: images pooled by `pool` (decoded with the service's
        processor, or `processor`), texts (their positions in `texts`) by dino.txt's text tower; both
        batched with the other requests'. And the tokens the model read: an image's prefix and patch
        tokens, a text's up to its end-of-text."""
        image_at = [i for i in range(len(sources)) if i not in texts]
        text_at = sorted(texts)
        tokens, count = (
            await self.tokens([sources[i] for i in text_at], [names[i] for i in text_at]) if text_at else ([], 0)
        )
        pixels = await self.pixels([sources[i] for i in image_at], [names[i] for i in image_at], processor)
        # one request's images and texts: queued together, or refused together (429)
        found = await _queued(self.batcher.compute(pixels, pool, expected=len(pixels), texts=tokens))
        vectors: list[Any] = [None] * len(sources)
        for i, vector in zip(image_at + text_at, found):
            vectors[i] = vector
        return vectors, count + sum(self.image_tokens(p) for p in pixels)

    def image_tokens(self, pixels) -> int:
        """The tokens the backbone reads for one image: its prefix (CLS, registers) and its patches."""
        config = self.backbone.config
        h, w = config.grid_size(*pixels.shape[-2:])
        return config.num_prefix_tokens + h * w

    def submit(self, pool: ThreadPoolExecutor, fn, *args) -> asyncio.Future:
        """`fn(*args)` on one of the service's pools, awaitable; a 503 once close() has shut them."""
        try:
            return asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except RuntimeError:  # cannot schedule new futures after shutdown
            raise ApiError(503, SHUTTING_DOWN) from None


async def _queued(work):
    """The batcher's answer to `work`, its refusals in the API's shape: a full queue is a 429 with
    Retry-After, a shutdown a 503."""
    try:
        return await work
    except QueueFull as e:
        raise ApiError(429, str(e), headers={"Retry-After": str(int(e.retry_after + 0.999))}) from None
    except Stopped:
        raise ApiError(503, SHUTTING_DOWN) from None


def _reason(error: BaseException) -> str:
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text  # "<123 bytes>: why"


async def body_of(request: Any, max_bytes: int, timeout: float) -> bytes:
    """The request body, refused once it passes the limit (a body sent without its length too: a
    chunked one), or once it has taken longer than `timeout` seconds to arrive (408)."""
    chunks, total = [], 0
    deadline = time.monotonic() + timeout
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body took longer than {timeout:.0f} s to arrive; send it faster") from None
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"the body is over {max_bytes} bytes, this server's limit")
        chunks.append(chunk)


async def parse(request: Any, model_class: type, settings: ServeSettings) -> Any:
    """A JSON body as `model_class` (a pydantic model); malformed JSON (invalid UTF-8 too) or a wrong
    field is a 400 that says where."""
    from pydantic import ValidationError

    raw = await body_of(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        return model_class.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at character {e.pos})") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "the body nests JSON too deeply") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else None  # the field, not pydantic's union branch
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], where) from None


def png_data_url(picture: np.ndarray) -> str:
    """An (H, W, 3) uint8 picture as a PNG data URL (what the page shows as it is)."""
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def encode(vector: np.ndarray, encoding: str) -> Any:
    """A float32 vector as a JSON list, or as base64 of its little-endian bytes (OpenAI's encoding)."""
    import base64

    array = np.ascontiguousarray(vector, dtype="<f4")
    return base64.b64encode(array.tobytes()).decode() if encoding == "base64" else array.tolist()
