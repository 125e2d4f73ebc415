"""From many images to features: the batched engine, and the `image-feature-extraction` pipeline.

`iter_batches` turns a stream of image sources into batches of pixel tensors. Decoding and
preprocessing run in a pool of threads (PIL and torch release the GIL), ahead of the model, in
input order; images of one size are batched together. A bad image is either raised or handed to
`on_error` and skipped, so that a long job goes on.

`pipeline("image-feature-extraction", model=...)` has Transformers' semantics: one image gives one
result, a list gives a list; each result is the image's `last_hidden_state` (pool=False) or
`pooler_output` (pool=True) with a batch dimension of 1, as nested lists unless return_tensors=True.
"""

from __future__ import annotations

import os
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .images import ImageError
from .processing import DINOv3ViTImageProcessor

TASK = "image-feature-extraction"


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
) -> Iterator[Batch]:
    """Batches of processed images, in input order within each image size.

    workers: threads that decode and preprocess ahead of the consumer (0: do it inline).
    on_error: called with (index, source, error) for an image that cannot be loaded, which is then
        skipped; without it, the error is raised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # images waiting for a full batch, by size
    for index, source, pixels in _processed(sources, processor, workers):
        if isinstance(pixels, Exception):
            if on_error is None:
                raise pixels
            on_error(index, source, pixels)
            continue
        waiting = pending.setdefault(tuple(pixels.shape), [])
        waiting.append((index, pixels))
        if len(waiting) == batch_size:
            del pending[tuple(pixels.shape)]
            yield _stack(waiting)
    for waiting in pending.values():
        yield _stack(waiting)


def _stack(items: list[tuple[int, torch.Tensor]]) -> Batch:
    return Batch([i for i, _ in items], torch.stack([pixels for _, pixels in items]))


def _processed(sources: Iterable[Any], processor: DINOv3ViTImageProcessor, workers: int):
    """(index, source, (3, H, W) pixels or the exception) for each source, in order."""

    def work(source):
        try:
            return processor.pixels(source)
        except (ImageError, OSError) as e:
            return e

    if workers <= 0:
        for index, source in enumerate(sources):
            yield index, source, work(source)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dino3-decode") as pool:
        window: deque = deque()
        for index, source in enumerate(sources):
            window.append((index, source, pool.submit(work, source)))
            if len(window) >= 4 * workers:
                i, s, future = window.popleft()
                yield i, s, future.result()
        while window:
            i, s, future = window.popleft()
            yield i, s, future.result()


class FeatureExtractionPipeline:
    """Images in, DINOv3 features out (see the module docstring for the output format)."""

    task = TASK

    def __init__(
        self, model: torch.nn.Module, processor: DINOv3ViTImageProcessor, batch_size: int = 1, workers: int = 0
    ):
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.workers = workers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(
        self,
        images: Any,
        pool: bool = False,
        return_tensors: bool = False,
        batch_size: int | None = None,
        image_processor_kwargs: dict[str, Any] | None = None,
    ):
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        processor = self.processor
        if image_processor_kwargs:
            processor = DINOv3ViTImageProcessor.from_dict(processor.to_dict(), **image_processor_kwargs)
        results: list[Any] = [None] * len(sources)
        batches = iter_batches(sources, processor, batch_size or self.batch_size, self.workers)
        with torch.inference_mode():
            for batch in batches:
                out = self.model(batch.pixel_values.to(device=self.device, dtype=self.dtype))
                features = out.pooler_output if pool else out.last_hidden_state
                for row, index in enumerate(batch.indices):
                    item = features[row : row + 1]
                    results[index] = item if return_tensors else item.tolist()
        return results[0] if single else results


def pipeline(
    task: str = TASK,
    model: str | os.PathLike | torch.nn.Module | None = None,
    *,
    processor: DINOv3ViTImageProcessor | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    workers: int = 0,
    **load_kwargs: Any,
) -> FeatureExtractionPipeline:
    """A feature-extraction pipeline, like `transformers.pipeline("image-feature-extraction", ...)`.

    model: a preset name, hub id, local folder, or an already loaded dino3 model.
    processor: defaults to the checkpoint's (with the preset's normalisation for official models).
    dtype / device: for the model; the pixels are cast to match.
    workers: threads that decode images ahead of the model (0: decode inline).
    load_kwargs: for dino3.load, e.g. quantize="int8-dynamic", or backend="openvino", precision="bf16".
    """
    if task != TASK:
        raise ValueError(f"dino3 provides the {TASK!r} task only, not {task!r}")
    if model is None:
        raise ValueError("pipeline() needs a model: a preset name (see dino3.list_models()), hub id or folder")
    if isinstance(model, torch.nn.Module):
        if dtype is not None or device is not None:
            from .models.pretrained import FP16_MESSAGE, parse_dtype

            if parse_dtype(dtype) == torch.float16:
                raise ValueError(FP16_MESSAGE)
            model = model.to(device=device, dtype=parse_dtype(dtype))
        name = getattr(model, "name_or_path", None)
    else:
        from .models import load

        name = model
        model = load(model, dtype=dtype, device=device, **load_kwargs)
    if processor is None:
        processor = DINOv3ViTImageProcessor.from_pretrained(name) if name is not None else DINOv3ViTImageProcessor()
    return FeatureExtractionPipeline(model, processor, batch_size=batch_size, workers=workers)


class _CallableModule(types.ModuleType):
    """Lets `dino3.pipeline(...)` work as Transformers' `pipeline(...)` does: the package attribute
    `dino3.pipeline` is this module once it is imported, so the module itself is made callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> FeatureExtractionPipeline:
        return pipeline(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
