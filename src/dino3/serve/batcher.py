"""Dynamic batching: images from concurrent requests go through the model together.

Requests put their decoded images (pixel tensors) in one bounded queue; a single worker thread takes
the first waiting image, then everything that arrives within `max_wait_ms` (up to `max_batch`),
runs the images of one size as one forward, and hands each image its own pooled features. It waits
only while more images are on their way (requests announce the images they are decoding): a lone
request does not sit out max_wait_ms for companions that cannot come. The
queue's bound is the server's back-pressure: a request that does not fit is refused at once
(QueueFull: the service answers 429), never queued without limit. A request cancelled while its
images wait (its client gone) takes them out of the queue; once its batch runs, the batch finishes
for the others and its results are dropped.
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

from ..features import pool_tokens


class QueueFull(Exception):
    """The queue holds as many images as it may; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the server is at capacity; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """The batcher is stopping (the server shuts down): it takes no more images."""


@dataclass
class Job:
    pixels: torch.Tensor  # (3, H, W)
    pool: str  # cls, mean, cls+mean or patches
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """One worker thread that runs the model on batches of queued images (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with (batch size, seconds) after each forward
        self.jobs: list[Job] = []
        self.expected = 0  # images being decoded for this queue now: worth waiting for
        self.condition = threading.Condition()
        self.stopping = False
        self.seconds_per_image = 0.05  # a running estimate, for Retry-After
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

    async def compute(self, images: list[torch.Tensor], pool: str, expected: int = 0) -> list[torch.Tensor]:
        """Each image's pooled features, computed with whatever else is queued; `expected`: how many
        of these images were announced with expect()."""
        jobs = [Job(pixels, pool) for pixels in images]
        with self.condition:
            self.expected = max(0, self.expected - expected)
            if self.stopping:
                raise Stopped("the server is shutting down")
            if len(self.jobs) + len(jobs) > self.max_queue:
                raise QueueFull(max(1.0, (len(self.jobs) + len(jobs)) * self.seconds_per_image))
            self.jobs += jobs
            self.condition.notify()
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs)))
        except BaseException:  # cancelled (a client gone, a shutdown) or failed: what still waits goes
            self.withdraw(jobs)
            raise

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
        """The next batch: the oldest job, and what joins it within max_wait, of the same size."""
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
            shape = self.jobs[0].pixels.shape
            batch = [job for job in self.jobs if job.pixels.shape == shape][: self.max_batch]
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
            started = time.perf_counter()
            try:
                pixels = torch.stack([job.pixels for job in batch]).to(device=self.model.device, dtype=self.model.dtype)
                with torch.inference_mode():
                    out = self.model(pixels)
                    for i, job in enumerate(batch):
                        row = pool_tokens(
                            out.patch_tokens[i : i + 1], out.cls_token[i : i + 1], job.pool, out.grid_size
                        )
                        job.future.set_result(row[0].float().cpu())
            except Exception as e:  # noqa: BLE001  (handed to the requests, the worker goes on)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            seconds = time.perf_counter() - started
            self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
