"""Dynamic batching: images and texts from concurrent requests go through the model together.

Requests put their decoded images (pixel tensors) and, for a dino.txt model, their tokenized texts
in one bounded queue; a single worker thread, the model's thread, takes the first waiting job, then
everything that arrives within `max_wait_ms` (up to `max_batch`), runs the jobs of one kind (texts;
or images of one size, through the backbone or, pool "text", through dino.txt's image tower) as one
forward, and hands each job its own features. It waits only while more images are on their way
(requests announce the images they are decoding): a lone request does not sit out max_wait_ms for
companions that cannot come. The queue's bound is the server's back-pressure: a request that does
not fit is refused at once (QueueFull: the service answers 429), never queued without limit. A
request cancelled while its jobs wait (its client gone) takes them out of the queue; once its batch
runs, the batch finishes for the others and its results are dropped.

Every torch forward of the server runs on this thread, so that it keeps the process's only OpenMP
team (dino3._openmp): the batches, and the few calls that check a model against an index or a
detector (`call`, `run`), which go through the same queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..features import extract, pool_tokens

TEXT = "text"  # the pool of a dino.txt model's image embedding, in the space of its texts
SECONDS_PER_JOB = {"image": 0.05, "text": 0.005, "call": 0.05}  # first guesses, for Retry-After


class QueueFull(Exception):
    """The queue holds as many jobs as it may; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the server is at capacity; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """The batcher is stopping (the server shuts down): it takes no more jobs."""


@dataclass
class Job:
    kind: str  # "image", "text" or "call"
    data: Any  # (3, H, W) pixels; (L,) token ids of one text; or a function to call
    pool: str | None = None  # an image's: cls, mean, cls+mean, patches or text
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> tuple:
        """Jobs of one group run as one forward: texts; images of one size and tower; a call alone."""
        if self.kind == "image":
            return ("image", tuple(self.data.shape), self.pool == TEXT)
        return ("text",) if self.kind == "text" else ("call", id(self))


class Batcher:
    """One worker thread that runs the model on batches of queued jobs (see the module docstring).

    model: a dino3 model or runtime; a dino.txt model (one with encode_text) also takes texts and
    pool "text", and runs its other pools on its backbone."""

    def __init__(
        self,
        model: Any,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.texts = hasattr(model, "encode_text")
        self.backbone = model.backbone if self.texts else model
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (kind, batch size, seconds) after each forward
        self.jobs: list[Job] = []
        self.expected = 0  # images being decoded for this queue now: worth waiting for
        self.condition = threading.Condition()
        self.stopping = False
        self.seconds_per_job = dict(SECONDS_PER_JOB)  # running estimates, for Retry-After
        self.thread = threading.Thread(target=self._run, name="dino3-batcher", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return len(self.jobs)

    def expect(self, count: int) -> None:
        """`count` images are being decoded for this queue (negative: they will not come after all)."""
        with self.condition:
            self.expected = max(0, self.expected + count)
            self.condition.notify()

    async def compute(
        self, images: list[torch.Tensor], pool: str | None, expected: int = 0, texts: list[torch.Tensor] = ()
    ) -> list[torch.Tensor]:
        """Each image's pooled features, then each text's embedding (a dino.txt model's encode_text of
        its (L,) token ids), computed with whatever else is queued; all queued at once, or all refused.
        `expected`: how many of these images were announced with expect()."""
        if texts and not self.texts:
            raise TypeError("texts need a dino.txt model")
        jobs = [Job("image", pixels, pool) for pixels in images] + [Job("text", row) for row in texts]
        return await self._submit(jobs, expected)

    async def compute_texts(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each text's embedding (see compute)."""
        return await self.compute([], None, texts=tokens)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the model's thread, between batches (it may run the model: a check of weights)."""
        (result,) = await self._submit([Job("call", fn)], admit_all=True)
        return result

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() on the model's thread, waited for here (for start-up, before any event loop runs)."""
        job = Job("call", fn)
        self._enqueue([job], admit_all=True)
        return job.future.result()

    async def _submit(self, jobs: list[Job], expected: int = 0, admit_all: bool = False) -> list[Any]:
        self._enqueue(jobs, expected, admit_all)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs)))
        except BaseException:  # cancelled (a client gone, a shutdown) or failed: what still waits goes
            self.withdraw(jobs)
            raise

    def _enqueue(self, jobs: list[Job], expected: int = 0, admit_all: bool = False) -> None:
        with self.condition:
            self.expected = max(0, self.expected - expected)
            if self.stopping:
                raise Stopped("the server is shutting down")
            if not admit_all and len(self.jobs) + len(jobs) > self.max_queue:
                seconds = sum(self.seconds_per_job[job.kind] for job in self.jobs + jobs)
                raise QueueFull(max(1.0, seconds))
            self.jobs += jobs
            self.condition.notify()

    def withdraw(self, jobs: list[Job]) -> None:
        """Take these jobs out of the queue (those not yet taken into a batch) and cancel them."""
        with self.condition:
            gone = set(map(id, jobs))
            self.jobs = [job for job in self.jobs if id(job) not in gone]
        for job in jobs:
            job.future.cancel()  # refused once running: that batch finishes for the others

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker. Waits for the forward that is running (by
        default without a bound): a process that exits while torch runs on this thread aborts."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout)

    def _take(self) -> list[Job]:
        """The next batch: the oldest job, and what joins it within max_wait, of the same group."""
        with self.condition:
            while not self.jobs:
                if self.stopping:
                    return []
                self.condition.wait(0.5)
            deadline = self.jobs[0].queued + self.max_wait
            while len(self.jobs) < self.max_batch and self.expected > 0 and not self.stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.condition.wait(left)
            group = self.jobs[0].group
            batch = [job for job in self.jobs if job.group == group][: self.max_batch]
            chosen = set(map(id, batch))
            self.jobs = [job for job in self.jobs if id(job) not in chosen]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            # From here a job cannot be cancelled: a client that leaves changes nothing for the others.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            kind = batch[0].kind
            started = time.perf_counter()
            try:
                if kind == "call":
                    batch[0].future.set_result(batch[0].data())
                else:
                    rows = self._texts(batch) if kind == "text" else self._images(batch)
                    for job, row in zip(batch, rows):
                        job.future.set_result(row)
            except Exception as e:  # noqa: BLE001  (handed to the requests, the worker goes on)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            seconds = time.perf_counter() - started
            self.seconds_per_job[kind] = 0.8 * self.seconds_per_job[kind] + 0.2 * seconds / len(batch)
            if self.on_batch is not None and kind != "call":
                self.on_batch(kind, len(batch), seconds)

    def _images(self, batch: list[Job]) -> list[torch.Tensor]:
        """One forward of a batch of images of one size: each image's features, pooled as it asked."""
        pixels = torch.stack([job.data for job in batch])  # (B, 3, H, W)
        if batch[0].pool == TEXT:  # dino.txt's image embedding: backbone and vision head
            features, _ = extract(self.model, pixels, TEXT)  # (B, embed_dim)
            return [row.float().cpu() for row in features]
        pixels = pixels.to(device=self.backbone.device, dtype=self.backbone.dtype)
        with torch.inference_mode():
            out = self.backbone(pixels)
            return [
                pool_tokens(out.patch_tokens[i : i + 1], out.cls_token[i : i + 1], job.pool, out.grid_size)[0]
                .float()
                .cpu()
                for i, job in enumerate(batch)
            ]

    def _texts(self, batch: list[Job]) -> list[torch.Tensor]:
        """One forward of dino.txt's text tower on a batch of texts: each one's embedding (embed_dim,)."""
        tokens = torch.stack([job.data for job in batch]).to(self.model.device)  # (B, L)
        with torch.inference_mode():
            return [row.float().cpu() for row in self.model.encode_text(tokens)]
