"""From many images to features: the batched engine, and the `image-feature-extraction` pipeline.

`iter_batches` turns a stream of image sources into batches of pixel tensors. Decoding and
preprocessing run in daemon threads (PIL and torch release the GIL) ahead of the model, in input
order, within one memory budget for all of them; images of one size are batched together. Whatever
goes wrong with one image is handed to `on_error` (or raised), never lost: a long job goes on. A
consumer that stops (an exception, Ctrl-C, closing the generator) stops the threads' work; they
never hold up the process's exit.

`pipeline("image-feature-extraction", model=...)` has Transformers' semantics: one image gives one
result, a list gives a list; each result is the image's `last_hidden_state` (pool=False) or
`pooler_output` (pool=True) with a batch dimension of 1, as nested lists unless return_tensors=True.
`pool` also takes dino3's pooling names ("cls", "mean", "cls+mean", "patches"; see dino3.features).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from . import images as _images
from ._openmp import helper_thread
from .errors import ImageError, UsageError
from .features import POOLS, extract
from .processing import DINOv3ViTImageProcessor

TASK = "image-feature-extraction"
ZERO_SHOT = "zero-shot-image-classification"  # with a dino.txt model (dino3.text.classify)
SHUTDOWN_SECONDS = 10.0  # how long a finished (or interrupted) pipeline waits for its threads to end


@dataclass
class Batch:
    indices: list[int]  # positions of these images in the input stream
    pixel_values: torch.Tensor  # (B, 3, H, W)


def iter_batches(
    sources: Iterable[Any],
    processor: DINOv3ViTImageProcessor,
    batch_size: int = 8,
    workers: int = 2,
    on_error: Callable[[int, Any, Exception], None] | None = None,
    memory_pixels: int | None = None,
    timeout: float | None = None,
) -> Iterator[Batch]:
    """Batches of processed images, in input order within each image size.

    workers: threads that decode and preprocess ahead of the consumer (0: do it inline).
    on_error: called with (index, source, error) for an image that cannot be loaded, which is then
        skipped; without it, the error is raised. Every failure of one image is an ImageError.
    memory_pixels: how many pixels all threads may be decoding at once (default: MAX_PIXELS, so
        that one image of the largest allowed size runs alone).
    timeout: seconds for each URL's whole download (default dino3.fetch.URL_TIMEOUT_SECONDS).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers!r}")
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # images waiting for a full batch, by size
    waiting = 0
    max_waiting = 4 * batch_size  # mixed sizes: beyond this, the oldest group goes as a partial batch
    for index, source, pixels in _processed(sources, processor, workers, memory_pixels, timeout):
        if isinstance(pixels, Exception):
            if on_error is None:
                raise pixels
            on_error(index, source, pixels)
            continue
        group = pending.setdefault(tuple(pixels.shape), [])
        group.append((index, pixels))
        waiting += 1
        if len(group) == batch_size:
            del pending[tuple(pixels.shape)]
            waiting -= len(group)
            yield _stack(group)
        elif waiting > max_waiting:
            oldest = min(pending, key=lambda shape: pending[shape][0][0])
            waiting -= len(pending[oldest])
            yield _stack(pending.pop(oldest))
    for group in sorted(pending.values(), key=lambda g: g[0][0]):
        yield _stack(group)


def _stack(items: list[tuple[int, torch.Tensor]]) -> Batch:
    return Batch([i for i, _ in items], torch.stack([pixels for _, pixels in items]))


def _processed(
    sources: Iterable[Any],
    processor: DINOv3ViTImageProcessor,
    workers: int,
    memory_pixels: int | None,
    timeout: float | None = None,
):
    """(index, source, (3, H, W) pixels or the ImageError) for each source, in order."""
    memory = _images.MemoryBudget(memory_pixels or _images.MAX_PIXELS)
    cancel = threading.Event()

    def work(source):
        try:
            return processor.pixels(source, memory=memory, cancel=cancel, timeout=timeout)
        except ImageError as e:
            return e
        except Exception as e:  # noqa: BLE001  (anything else about one image is that image's failure)
            return ImageError(f"{_images._describe(source)}: {type(e).__name__}: {str(e)[:300]}")

    if workers <= 0:
        for index, source in enumerate(sources):
            yield index, source, work(source)
        return
    pool = _DaemonPool(workers)
    try:
        window: deque = deque()
        for index, source in enumerate(sources):
            window.append((index, source, pool.submit(work, source)))
            if len(window) >= 4 * workers:
                i, s, future = window.popleft()
                yield i, s, future.result()
        while window:
            i, s, future = window.popleft()
            yield i, s, future.result()
    finally:
        cancel.set()  # downloads stop, waiting reservations give up
        pool.shutdown()


class _DaemonPool:
    """A few daemon threads running submitted calls: unlike ThreadPoolExecutor's, they never hold up
    the interpreter's exit (a download that hangs cannot keep Ctrl-C from ending the program)."""

    def __init__(self, workers: int) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, name=f"dino3-decode-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        self.tasks.put((future, fn, args))
        return future

    def _run(self) -> None:
        helper_thread()  # the consumer's model keeps the only OpenMP team (see _openmp)
        while True:
            task = self.tasks.get()
            if task is None:
                return
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer)
                future.set_exception(e)

    def shutdown(self) -> None:
        while True:  # drop what has not started
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self.threads:
            self.tasks.put(None)
        # Wait (a bounded while) for them to end: a daemon thread still freeing its last tensor when
        # the interpreter exits is killed inside torch's C++, which aborts the process (exit 134).
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class FeatureExtractionPipeline:
    """Images in, DINOv3 features out (see the module docstring for the output format)."""

    task = TASK

    def __init__(
        self,
        model: torch.nn.Module,
        processor: DINOv3ViTImageProcessor,
        batch_size: int = 1,
        workers: int = 0,
        call_defaults: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.workers = workers
        self.call_defaults = dict(call_defaults or {})  # pool=, timeout=, ... given to pipeline() itself

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(
        self,
        images: Any,
        pool: bool | str | None = None,
        return_tensors: bool | None = None,
        batch_size: int | None = None,
        image_processor_kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        num_workers: int | None = None,
    ):
        """pool: False (the default), True or a dino3 pooling name; timeout: seconds to fetch each
        image given as a URL (Transformers' meaning); num_workers: threads decoding images for this
        call (Transformers' name for `workers`). Those left out take what pipeline() was given."""
        defaults = self.call_defaults
        pool = defaults.get("pool", False) if pool is None else pool
        return_tensors = defaults.get("return_tensors", False) if return_tensors is None else return_tensors
        if image_processor_kwargs is None:
            image_processor_kwargs = defaults.get("image_processor_kwargs")
        if timeout is None:
            timeout = defaults.get("timeout")
        if not isinstance(pool, bool) and pool not in POOLS:
            raise UsageError(f"pool must be True, False or one of {POOLS}, got {pool!r}")
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        processor = self.processor
        if image_processor_kwargs:
            processor = DINOv3ViTImageProcessor.from_dict(processor.to_dict(), **image_processor_kwargs)
        results: list[Any] = [None] * len(sources)
        workers = self.workers if num_workers is None else num_workers
        batches = iter_batches(sources, processor, batch_size or self.batch_size, workers, timeout=timeout)
        for batch in batches:
            if isinstance(pool, str):
                features, _ = extract(self.model, batch.pixel_values, pool)
            else:
                with torch.inference_mode():
                    out = self.model(batch.pixel_values.to(device=self.device, dtype=self.dtype))
                features = out.pooler_output if pool else out.last_hidden_state
            for row, index in enumerate(batch.indices):
                item = features[row : row + 1]
                results[index] = item if return_tensors else item.tolist()
        return results[0] if single else results


# Transformers' pipeline() arguments that dino3 refuses, and why; every other one it takes (tested
# against the pinned Transformers' signature, so that a new one is noticed).
NOT_IN_DINO3 = {
    "config": "dino3 reads the checkpoint's config.json; to change it, load the model and pass it as model=",
    "tokenizer": "an image model has no tokenizer",
    "feature_extractor": "pass the image processor as processor= (or image_processor=)",
    "video_processor": "video frames are images here: see dino3's video inputs",
    "pipeline_class": "dino3 has one pipeline class",
    "binary_output": "the results are tensors or nested lists",
}


CALL_OPTIONS = ("pool", "return_tensors", "image_processor_kwargs", "timeout")  # pipeline() takes them too


def pipeline(
    task: str = TASK,
    model: str | os.PathLike | torch.nn.Module | None = None,
    *,
    processor: DINOv3ViTImageProcessor | None = None,
    dtype: str | torch.dtype | None = None,
    device: int | str | torch.device | None = None,
    batch_size: int = 1,
    workers: int = 0,
    image_processor: DINOv3ViTImageProcessor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    num_workers: int | None = None,
    framework: str | None = None,
    **load_kwargs: Any,
) -> FeatureExtractionPipeline:
    """A feature-extraction pipeline, like `transformers.pipeline("image-feature-extraction", ...)`.

    model: a preset name, hub id, local folder, or an already loaded dino3 model.
    processor: defaults to the checkpoint's (with the preset's normalisation for official models);
        image_processor= is Transformers' name for it.
    dtype / device: for the model; the pixels are cast to match. device also takes Transformers'
        integers: -1 leaves the model where it is (a new one on the CPU), 0, 1, ... the first,
        second, ... GPU (the CPU where there is none, as Transformers does).
    workers: threads that decode images ahead of the model (0: decode inline); num_workers= is
        Transformers' name for it.
    load_kwargs: for dino3.load, e.g. quantize="int8-dynamic", or backend="openvino", precision="bf16",
        and Transformers' token=, revision=, device_map=, torch_dtype= (deprecated, as there);
        model_kwargs= holds them as a dict, as in Transformers. framework= may only be "pt", and
        use_fast= and trust_remote_code= change nothing here (one processor; no code is downloaded).
        pool=, return_tensors=, image_processor_kwargs=, timeout= become the calls' defaults.
    """
    from .api import load
    from .models.pretrained import resolve_dtype

    if task == ZERO_SHOT:
        return _zero_shot(model, processor or image_processor, dtype, transformers_device(device), load_kwargs)
    if task != TASK:
        raise ValueError(f"dino3 provides the {TASK!r} and {ZERO_SHOT!r} tasks, not {task!r}")
    if model is None:
        raise ValueError("pipeline() needs a model: a preset name (see dino3.list_models()), hub id or folder")
    if framework not in (None, "pt"):
        raise ValueError(f"framework={framework!r}: dino3 runs PyTorch models only (framework='pt')")
    for name, reason in NOT_IN_DINO3.items():
        if load_kwargs.get(name) is not None:
            raise TypeError(f"{name}= is an argument of Transformers' pipeline() that dino3 does not take: {reason}")
        load_kwargs.pop(name, None)
    load_kwargs.pop("use_fast", None)
    load_kwargs.pop("trust_remote_code", None)
    defaults = {name: load_kwargs.pop(name) for name in CALL_OPTIONS if name in load_kwargs}  # as Transformers
    overlap = sorted(set(model_kwargs or {}) & set(load_kwargs))
    if overlap:
        raise ValueError(f"{overlap} given both directly and in model_kwargs; use one")
    load_kwargs = {**(model_kwargs or {}), **load_kwargs}
    if (dtype is not None and "dtype" in load_kwargs) or (device is not None and "device" in load_kwargs):
        raise ValueError("dtype or device given both as an argument and in model_kwargs; use one")
    dtype = load_kwargs.pop("dtype", dtype)  # model_kwargs={"dtype": ...}, as Transformers allows
    device = load_kwargs.pop("device", device)
    if image_processor is not None:
        if processor is not None:
            raise ValueError("give processor= or image_processor= (the same thing), not both")
        processor = image_processor
    if num_workers is not None:
        workers = num_workers
    if "torch_dtype" in load_kwargs:  # Transformers' old name; a model given as an object needs it too
        from .models.pretrained import transformers_arguments

        load_kwargs = transformers_arguments({"dtype": dtype, **load_kwargs})
        dtype = load_kwargs.pop("dtype")
    device = transformers_device(device)
    if isinstance(model, (str, os.PathLike)):
        model = load(model, dtype=dtype, device=device, **load_kwargs)
    elif dtype is not None or device is not None:
        from .models.pretrained import resolve_device

        model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype, allow_auto=False))
    if processor is None:
        processor = DINOv3ViTImageProcessor.for_model(model)
    return FeatureExtractionPipeline(model, processor, batch_size=batch_size, workers=workers, call_defaults=defaults)


class ZeroShotImageClassificationPipeline:
    """Transformers' `zero-shot-image-classification` pipeline's call, over a dino.txt model:
    `pipe(images, candidate_labels=[...], hypothesis_template="This is a photo of {}.")` ->
    [{"score", "label"}, ...] best first, for one image; a list of those for a list."""

    def __init__(self, model: Any, processor: DINOv3ViTImageProcessor | None = None) -> None:
        self.model, self.processor = model, processor

    def __call__(
        self,
        images: Any,
        candidate_labels: Sequence[str] | str | None = None,
        hypothesis_template: str | Sequence[str] = "This is a photo of {}.",
        top_k: int | None = None,
        batch_size: int = 8,
    ) -> list:
        from .text import classify

        if candidate_labels is None:
            raise ValueError("give candidate_labels: the names to choose among")
        labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
        return classify(
            self.model, images, labels, hypothesis_template, processor=self.processor, batch_size=batch_size,
            top_k=top_k,
        )  # fmt: skip


def _zero_shot(model, processor, dtype, device, load_kwargs) -> ZeroShotImageClassificationPipeline:
    from .api import load

    if isinstance(model, (str, os.PathLike)):
        model = load(model, dtype=dtype, device=device, **load_kwargs)
    if not hasattr(model, "encode_text"):
        raise ValueError(f"the {ZERO_SHOT!r} task needs a dino.txt model (e.g. model='dinotxt-vitl16')")
    return ZeroShotImageClassificationPipeline(model, processor)


def transformers_device(device: int | str | torch.device | None) -> str | torch.device | None:
    """A device as Transformers' pipeline reads it: an integer n >= 0 is the n-th accelerator (the CPU
    where there is none), -1 (or any negative) leaves the model where it is; anything else as is."""
    if isinstance(device, bool) or not isinstance(device, int):
        return device
    if device < 0:
        return None
    if torch.cuda.is_available():
        return f"cuda:{device}"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return f"xpu:{device}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class _CallableModule(types.ModuleType):
    """Lets `dino3.pipeline(...)` work as Transformers' `pipeline(...)` does: the package attribute
    `dino3.pipeline` is this module once it is imported, so the module itself is made callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> FeatureExtractionPipeline:
        return pipeline(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
