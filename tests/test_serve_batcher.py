"""The server's queue and batches (dino3.serve.batcher), made deterministic by a model stand-in whose
forwards wait at a gate until the test opens it: nothing here depends on how fast the machine is.

Each test names, in its docstring, the bug it pins (issue 31's serve mutants).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import dino3

pytest.importorskip("fastapi")
from dino3.serve import ServeSettings, create_app  # noqa: E402
from dino3.serve.batcher import Batcher, QueueFull  # noqa: E402
from test_serve import Server, data_url, error_of  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


class Gate:
    """Holds forwards until opened: `arrivals` counts the forwards that reached it."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.arrivals = threading.Semaphore(0)

    def close(self) -> None:
        while self.arrivals.acquire(blocking=False):  # forget the forwards that went through before
            pass
        self.opened.clear()

    def wait_for_a_forward(self) -> None:
        assert self.arrivals.acquire(timeout=60), "no forward reached the gate"

    def pass_through(self) -> None:
        self.arrivals.release()
        assert self.opened.wait(60), "the test never opened the gate"


class CountingModel:
    """Stands in for a model in the batcher: records each forward's batch, waits at its gate."""

    device, dtype = "cpu", None

    def __init__(self) -> None:
        self.batches: list[list[float]] = []  # each forward's images, by their first pixel
        self.gate = Gate()

    def __call__(self, pixels):
        self.batches.append(pixels[:, 0, 0, 0].tolist())
        self.gate.pass_through()
        tokens = pixels.mean(dim=(2, 3))[:, None, :]  # (B, 1, 3)
        return SimpleNamespace(cls_token=tokens[:, 0], patch_tokens=tokens, grid_size=(1, 1))


class GatedModel:
    """A real dino3 model whose forwards wait at a gate."""

    def __init__(self, model) -> None:
        self.model = model
        self.gate = Gate()
        self.shapes: list[tuple[int, ...]] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, pixels):
        self.shapes.append(tuple(pixels.shape))
        self.gate.pass_through()
        return self.model(pixels)


def image(value: float, size: int = 4) -> torch.Tensor:
    return torch.full((3, size, size), float(value))


async def until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_the_queue_admits_exactly_max_queue_images():
    """Bug pinned: the queue admitting one image more (or one fewer) than --max-queue. With one image
    held in a forward, a request of exactly max_queue images is queued, and one more image is refused."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=1, max_wait_ms=0, max_queue=3)

    async def scenario():
        model.gate.close()
        running = asyncio.ensure_future(batcher.compute([image(1)], "cls"))
        await asyncio.to_thread(model.gate.wait_for_a_forward)  # taken out of the queue, held
        assert batcher.depth == 0
        full = asyncio.ensure_future(batcher.compute([image(2), image(3), image(4)], "cls"))  # exactly N
        await until(lambda: batcher.depth == 3)
        with pytest.raises(QueueFull) as refused:  # N + 1
            await asyncio.wait_for(batcher.compute([image(5)], "cls"), 10)  # refused at once, not queued
        assert refused.value.retry_after >= 1
        model.gate.opened.set()
        return await running, await full

    try:
        first, rest = asyncio.run(scenario())
    finally:
        model.gate.opened.set()
        batcher.stop()
    assert [float(v[0]) for v in first + rest] == [1, 2, 3, 4]
    assert model.batches == [[1], [2], [3], [4]]


def test_a_request_cancelled_while_queued_leaves_its_batch_unharmed():
    """Bug pinned: a client that goes away while its image waits fails the whole batch for everyone
    (its cancelled future given a result: InvalidStateError for all), or its image stays queued and
    counts against --max-queue. The cancelled image leaves the queue at once and is never run."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=8, max_wait_ms=0, max_queue=8)

    async def scenario():
        model.gate.close()
        running = asyncio.ensure_future(batcher.compute([image(1)], "cls"))
        await asyncio.to_thread(model.gate.wait_for_a_forward)
        leaving = asyncio.ensure_future(batcher.compute([image(2)], "cls"))
        staying = asyncio.ensure_future(batcher.compute([image(3), image(4)], "cls"))
        await until(lambda: batcher.depth == 3)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert batcher.depth == 2  # it no longer holds a place in the queue
        model.gate.opened.set()
        return await running, await staying

    try:
        first, rest = asyncio.run(scenario())
    finally:
        model.gate.opened.set()
        batcher.stop()
    assert [float(v[0]) for v in first + rest] == [1, 3, 4]
    assert model.batches == [[1], [3, 4]]  # the cancelled image never reached the model


def test_a_request_cancelled_as_its_batch_forms_leaves_the_batch_unharmed():
    """Bug pinned (issue 31): a client that goes away just as its image is taken into a batch (out of
    the queue, before the forward), so that withdrawing it finds nothing to take out: its cancelled
    future was given a result (InvalidStateError) and every request of that batch failed. The worker
    drops a job cancelled by then. The moment is made deterministic: the client leaves inside _take."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=8, max_wait_ms=0, max_queue=8)
    take = batcher._take

    def take_then_leave():
        batch = take()
        for job in batch:
            if job.kind == "image" and float(job.data[0, 0, 0]) == 2:
                job.future.cancel()  # the client of image 2 leaves now
        return batch

    batcher._take = take_then_leave  # the worker looks it up before each batch

    async def scenario():
        model.gate.close()
        running = asyncio.ensure_future(batcher.compute([image(1)], "cls"))
        await asyncio.to_thread(model.gate.wait_for_a_forward)
        leaving = asyncio.ensure_future(batcher.compute([image(2)], "cls"))  # first of the next batch
        staying = asyncio.ensure_future(batcher.compute([image(3), image(4)], "cls"))
        await until(lambda: batcher.depth == 3)
        model.gate.opened.set()
        (gone,) = await asyncio.gather(leaving, return_exceptions=True)
        return await running, await staying, gone

    try:
        first, rest, gone = asyncio.run(scenario())
    finally:
        model.gate.opened.set()
        batcher.stop()
    assert isinstance(gone, asyncio.CancelledError)
    assert [float(v[0]) for v in first + rest] == [1, 3, 4]
    assert model.batches == [[1], [3, 4]]  # the image of the client gone never reached the model


def test_the_batcher_waits_only_for_images_on_their_way():
    """Bug pinned: a lone request sitting out max_wait_ms for companions that cannot come."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=8, max_wait_ms=3000)
    one = torch.ones(3, 4, 4)

    async def scenario():
        # a lone request: nothing else is being decoded, so no waiting out the 3 s for companions
        started = time.perf_counter()
        batcher.expect(1)
        await batcher.compute([one], "cls", expected=1)
        alone = time.perf_counter() - started
        # two requests decoding at once: the first one in the queue waits for the second
        batcher.expect(2)
        first = asyncio.ensure_future(batcher.compute([one], "cls", expected=1))
        await asyncio.sleep(0.3)
        assert not first.done()
        await batcher.compute([one * 2], "cls", expected=1)
        await first
        # an announced image that fails to decode: the waiting one goes at once
        batcher.expect(2)
        started = time.perf_counter()
        waiting = asyncio.ensure_future(batcher.compute([one], "cls", expected=1))
        await asyncio.sleep(0.05)
        batcher.expect(-1)
        await waiting
        return alone, time.perf_counter() - started

    try:
        alone, withdrawn = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert alone < 1.0 and withdrawn < 1.0
    assert [len(b) for b in model.batches] == [1, 2, 1]


@pytest.fixture(scope="module")
def real_model(checkpoint):
    return dino3.load(checkpoint)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=120)


def test_a_full_queue_answers_429_with_retry_after(real_model):
    """Bug pinned: a flaky test (on a 2-core AVX2 machine timing never filled the queue). Now
    deterministic: with one image held in a forward and one waiting, a request of two images does
    not fit a queue of two (429, Retry-After), and a request of one image, which fills it exactly,
    is served once the forward is let go."""
    model = GatedModel(real_model)
    server = Server(create_app(model, ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2, max_images=8)))
    service = server.server.config.app.state.service
    url = f"{server.url}/v1/embeddings"
    two = {"input": [data_url(PHOTOS / "rocket.jpg")] * 2}
    one = {"input": [data_url(PHOTOS / "coffee.png")]}
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        model.gate.close()
        first = pool.submit(post, url, two)
        model.gate.wait_for_a_forward()  # one image of it in the forward, the other queued
        wait_until(lambda: service.batcher.depth == 1)
        refused = pool.submit(post, url, two).result(timeout=20)  # 1 + 2 > 2: answered at once
        fits = pool.submit(post, url, one)  # 1 + 1 = 2: exactly full
        wait_until(lambda: service.batcher.depth == 2 or fits.done())
        assert not fits.done(), fits.result().text
        model.gate.opened.set()
        assert first.result().status_code == 200 and fits.result().status_code == 200
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and error_of(refused)["type"] == "rate_limit_error"
    finally:
        model.gate.opened.set()
        pool.shutdown()
        server.stop()


def test_a_request_with_a_bad_image_leaves_nothing_announced(real_model):
    """Bug pinned (issue 31, fresh pass 4, G-S5): a request refused for a bad image left its images
    announced to the batcher, which then waited for them (up to --max-wait-ms) before every later
    batch: each bad request made the server slower for everyone, for good."""
    server = Server(create_app(real_model, ServeSettings(max_batch=8, max_wait_ms=3000, max_images=8)))
    service = server.server.config.app.state.service
    url = f"{server.url}/v1/embeddings"
    good = data_url(PHOTOS / "rocket.jpg")
    try:
        for _ in range(2):
            refused = post(url, {"input": [good, "data:image/png;base64,iVBORw0KGgo="]})  # a PNG cut short
            assert refused.status_code == 400, refused.text
        assert service.batcher.expected == 0
        started = time.perf_counter()
        assert post(url, {"input": [good]}).status_code == 200
        assert time.perf_counter() - started < 2.5  # not held for images that will never come
    finally:
        server.stop()


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_concurrent_requests_of_different_sizes_each_get_their_own_features(real_model, tmp_path):
    """Bug pinned: images of different sizes (the aspect-preserving processor keeps each image's
    shape) stacked into one forward: every request of that batch got a 500. Sent all at once behind a
    held forward, they queue together; each must get exactly what its image gives alone."""
    from dino3.features import extract
    from dino3.processing import DINOv3ViTImageProcessor

    processor = DINOv3ViTImageProcessor.for_model(real_model, keep_aspect="longer", target_size=160, fit="resize")
    model = GatedModel(real_model)
    settings = ServeSettings(max_batch=16, max_wait_ms=0, max_queue=64, max_images=8)
    server = Server(create_app(model, settings, processor=processor))
    service = server.server.config.app.state.service
    from PIL import Image

    photos = [PHOTOS / n for n in ("chelsea.png", "rocket.jpg", "hubble_deep_field.jpg")]
    with Image.open(photos[0]) as wide:
        wide.transpose(Image.Transpose.TRANSPOSE).save(tmp_path / "tall.png")  # 451 x 300: portrait
        wide.crop((0, 0, 300, 300)).save(tmp_path / "square.png")
    photos += [tmp_path / "tall.png", tmp_path / "square.png"]
    expected = {}
    for photo in photos:
        pixels = processor(str(photo), return_tensors="pt")["pixel_values"]  # (1, 3, H, W)
        with torch.inference_mode():
            expected[photo.name] = (extract(real_model, pixels, "cls")[0][0], tuple(pixels.shape[-2:]))
    assert len({shape for _, shape in expected.values()}) >= 3  # several sizes among them
    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        model.gate.close()
        holder = pool.submit(post, f"{server.url}/v1/embeddings", {"input": [data_url(photos[0])]})
        model.gate.wait_for_a_forward()
        futures = {p.name: pool.submit(post, f"{server.url}/v1/embeddings", {"input": [data_url(p)]}) for p in photos}
        wait_until(lambda: service.batcher.depth == len(photos))  # all queued together, behind the held forward
        model.gate.opened.set()
        answers = {name: f.result() for name, f in futures.items()}
        assert holder.result().status_code == 200
        for name, answer in answers.items():
            assert answer.status_code == 200, (name, answer.text)
            got = torch.tensor(answer.json()["data"][0]["embedding"])
            assert (got - expected[name][0]).abs().max() <= 1e-4, name
        assert len({shape[2:] for shape in model.shapes}) >= 3  # each size had a forward of its own
    finally:
        model.gate.opened.set()
        pool.shutdown()
        server.stop()


def test_requests_batched_together_each_get_the_pooling_they_asked_for(real_model):
    """Bug pinned (issue 31, fresh pass 3, F-S1): concurrent /v1/embeddings requests of one image size
    that asked for different poolings ("cls", "mean", "cls+mean") and ran in one forward were all
    pooled as the batch's first request asked: a client asking for "mean" got CLS vectors, one asking
    for "cls+mean" got vectors of half the length. Queued together behind a held forward, each must
    get what it gets alone."""
    model = GatedModel(real_model)
    server = Server(create_app(model, ServeSettings(max_batch=8, max_wait_ms=0, max_queue=16, max_images=8)))
    service = server.server.config.app.state.service
    url = f"{server.url}/v1/embeddings"
    photo = data_url(PHOTOS / "rocket.jpg")
    pools = ["cls", "mean", "cls+mean"]
    executor = concurrent.futures.ThreadPoolExecutor(4)
    try:
        alone = {}
        for pool in pools:
            answer = post(url, {"input": [photo], "pool": pool})
            assert answer.status_code == 200, answer.text
            alone[pool] = torch.tensor(answer.json()["data"][0]["embedding"])
        assert not torch.allclose(alone["cls"], alone["mean"], atol=1e-3)
        model.gate.close()
        holder = executor.submit(post, url, {"input": [photo]})
        model.gate.wait_for_a_forward()
        futures = {}
        for pool in pools:  # queued one after the other: "cls" first in the batch
            futures[pool] = executor.submit(post, url, {"input": [photo], "pool": pool})
            wait_until(lambda: service.batcher.depth == len(futures))
        model.gate.opened.set()
        assert holder.result().status_code == 200
        for pool, future in futures.items():
            answer = future.result()
            assert answer.status_code == 200, (pool, answer.text)
            got = torch.tensor(answer.json()["data"][0]["embedding"])
            assert got.shape == alone[pool].shape and (got - alone[pool]).abs().max() <= 1e-4, pool
        assert model.shapes[-1][0] == 3  # the three requests ran in one forward
    finally:
        model.gate.opened.set()
        executor.shutdown()
        server.stop()


class TextModel:
    """Stands in for a dino.txt model in the batcher: its text tower records each forward's texts (by
    their first token after start-of-text) and the thread it ran on, and waits at its gate; its
    backbone is a CountingModel."""

    device, dtype = "cpu", None

    def __init__(self) -> None:
        self.backbone = CountingModel()
        self.gate = Gate()
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def encode_text(self, tokens):
        self.batches.append(tokens[:, 1].tolist())
        self.threads.add(threading.current_thread().name)
        self.gate.pass_through()
        return tokens[:, :4].float()  # (B, 4)


def text(value: int) -> torch.Tensor:
    return torch.tensor([49406, value, 49407] + [0] * 74)


def test_texts_queue_with_images_and_go_through_the_text_tower_together():
    """Bug pinned: texts encoded one at a time (never batched with other requests' texts), on another
    thread than the model's (a second OpenMP team), stacked into an image forward, or not counted
    against --max-queue. Behind a held forward, three texts of two requests run as one batch; the
    image queued between them gets a forward of its own; a request that does not fit is refused."""
    model = TextModel()
    batcher = Batcher(model, max_batch=8, max_wait_ms=0, max_queue=5)

    async def scenario():
        model.gate.close()
        held = asyncio.ensure_future(batcher.compute_texts([text(1)]))
        await asyncio.to_thread(model.gate.wait_for_a_forward)
        two = asyncio.ensure_future(batcher.compute_texts([text(2), text(3)]))
        picture = asyncio.ensure_future(batcher.compute([image(7)], "cls"))
        one = asyncio.ensure_future(batcher.compute_texts([text(4)]))
        await until(lambda: batcher.depth == 4)
        with pytest.raises(QueueFull):  # 4 + 2 > 5: texts count against the queue too
            await asyncio.wait_for(batcher.compute_texts([text(5), text(6)]), 10)
        model.gate.opened.set()
        return await held, await two, await picture, await one

    try:
        held, two, picture, one = asyncio.run(scenario())
        on_thread = batcher.run(lambda: threading.current_thread().name)  # start-up checks: the model's thread
    finally:
        model.gate.opened.set()
        batcher.stop()
    assert model.batches == [[1], [2, 3, 4]] and model.backbone.batches == [[7]]
    assert [int(row[1]) for row in held + two + one] == [1, 2, 3, 4]  # each text its own row
    assert float(picture[0][0]) == 7
    assert model.threads == {"dino3-batcher"} and on_thread == "dino3-batcher"


def test_texts_on_a_model_without_a_text_tower_are_refused():
    """compute(texts=...) on an image-only model: a TypeError saying texts need dino.txt, nothing queued."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=4, max_wait_ms=0, max_queue=4)
    try:
        with pytest.raises(TypeError, match="texts need a dino.txt model"):
            asyncio.run(batcher.compute([image(1)], "cls", texts=[torch.zeros(3, dtype=torch.long)]))
        assert batcher.depth == 0 and model.batches == []
    finally:
        batcher.stop()


def test_a_call_runs_on_the_models_thread_and_returns_its_result():
    """call() and run(): fn runs on the batcher's own thread (the model's), its result handed back; a
    call is admitted even when the queue is full (a weight check is never refused with a 429)."""
    model = CountingModel()
    batcher = Batcher(model, max_batch=1, max_wait_ms=0, max_queue=1)

    async def scenario():
        model.gate.close()
        held = asyncio.ensure_future(batcher.compute([image(1)], "cls"))
        await asyncio.to_thread(model.gate.wait_for_a_forward)
        queued = asyncio.ensure_future(batcher.compute([image(2)], "cls"))
        await until(lambda: batcher.depth == 1)  # the queue is full
        called = asyncio.ensure_future(batcher.call(lambda: (threading.current_thread().name, 42)))
        await asyncio.sleep(0.05)
        model.gate.opened.set()
        return await called, await held, await queued

    try:
        called, _, _ = asyncio.run(scenario())
        assert called == ("dino3-batcher", 42)
        assert batcher.run(lambda: threading.current_thread().name) == "dino3-batcher"
    finally:
        model.gate.opened.set()
        batcher.stop()


@pytest.mark.parametrize("seconds, header", [(0.2, "1"), (1.0, "1"), (1.2, "2"), (2.0, "2"), (2.001, "3")])
def test_retry_after_is_the_wait_rounded_up_to_whole_seconds(seconds, header):
    """A full queue's 429 says Retry-After: the estimated wait rounded up (never down: the client would
    come back too early), at least 1 s."""
    from dino3.serve.service import ApiError, _queued

    async def full():
        raise QueueFull(max(1.0, seconds))

    with pytest.raises(ApiError) as refused:
        asyncio.run(_queued(full()))
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": header}
    assert "at capacity" in refused.value.message
