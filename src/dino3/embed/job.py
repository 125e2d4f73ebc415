"""The embed job as a library: many images -> one embeddings file, resumable, never losing work.

    result = dino3.embed.run(["photos/"], model="vits16", output="features.npz", pool="cls+mean")

Every option is checked before any state is created and before the model is loaded; the output is
locked for the job's lifetime; progress is saved every `checkpoint_every` images (see store.py), so
that `resume=True` continues an interrupted job and writes the same file an uninterrupted one would
have; an image that cannot be embedded is listed with its reason and the job goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text, escape_field
from .._version import __version__
from ..errors import UsageError
from ..features import Layers, check_layers, check_pool, extract, parse_layers
from ..video import Sampling, frame_sources
from .inputs import Inputs, expand_inputs
from .store import Chunk, RunLock, Store, input_stat
from .writers import check_output, sidecars, write_embeddings


@dataclass
class EmbedResult:
    output: Path
    count: int  # images in the output
    computed: int  # of which embedded by this run (the rest came from an interrupted one)
    failures: list[tuple[str, str]]  # (input, reason), skipped inputs included
    seconds: float
    ignored: int  # files in the folders without an image suffix
    notes: list[str] = field(default_factory=list)


def _positive(name: str, value: Any, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def run(
    inputs: Sequence[str] | Inputs,
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pool: str = "cls",
    layers: Layers | str = None,
    size: int = 224,
    keep_aspect: str | None = None,
    target: int | None = None,
    fit: str | None = None,
    max_side: int | None = None,
    jpeg_draft: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    backend: str = "torch",
    precision: str | None = None,
    calibration: Sequence[str] | None = None,
    batch_size: int = 16,
    workers: int = 2,
    checkpoint_every: int = 256,
    resume: bool = False,
    overwrite: bool = False,
    check_hash: bool = True,
    progress: bool = True,
    shard: tuple[int, int] | str | None = None,
    load: Callable[..., Any] | None = None,
    video: Sampling | None = None,
) -> EmbedResult:
    """Embed images into one file; see the module docstring and `dino3 embed --help`. Videos among
    the inputs give their frames, as `video` samples them (default: every frame)."""
    from ..api import load as default_load
    from ..errors import BackendError
    from ..models.pretrained import resolve_device, resolve_dtype
    from ..processing import MAX_SIDE, DINOv3ViTImageProcessor
    from ..quantization import check_mode
    from ..runtime import check_backend

    # -- everything the job needs is checked before anything is created or loaded ---------------------
    try:
        check_pool(pool)
        layers = parse_layers(layers) if isinstance(layers, str) else layers
        _positive("batch_size", batch_size)
        _positive("workers", workers, zero_ok=True)
        _positive("checkpoint_every", checkpoint_every)
        precision = check_backend(backend, precision, calibration)
        if backend != "torch" and (dtype not in (None, "float32") or quantize is not None):
            raise UsageError(
                "with a runtime backend, choose the precision with precision= (--precision f32, bf16, int8)"
            )
        if backend != "torch" and layers is not None:
            raise UsageError("layers need the torch backend (the exported graph returns the final tokens)")
        dtype = resolve_dtype(dtype, allow_auto=False)
        resolve_device(device)
        if quantize is not None:
            check_mode(quantize)
        if keep_aspect is None and (target is not None or fit is not None):
            raise UsageError("target and fit apply with keep_aspect ('shorter' or 'longer'); give keep_aspect too")
        processing = {"jpeg_draft": jpeg_draft, "max_side": max_side or MAX_SIDE}
        if keep_aspect is not None:
            processing.update(keep_aspect=keep_aspect, target_size=target, fit=fit or "crop")
        else:
            processing["size"] = {"height": size, "width": size}
        DINOv3ViTImageProcessor(**processing)  # validates sizes (ConfigError) before any work
        shard = parse_shard(shard)
        if video is not None and not isinstance(video, Sampling):
            raise UsageError(f"video must be a dino3.video.Sampling, got {type(video).__name__}")
    except (ValueError, BackendError) as e:  # an option that cannot work: the command's mistake
        raise UsageError(str(e)) from None
    output = check_output(output, may_be_ragged=pool == "patches" and keep_aspect is not None)
    store_folder = output.with_name(output.name + ".partial")
    if resume and overwrite:
        raise UsageError("resume and overwrite contradict each other; choose one")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    if store_folder.exists() and not (resume or overwrite):
        raise UsageError(
            f"{store_folder} holds an interrupted run: pass --resume to continue it, or --overwrite to start over"
        )
    if calibration is not None:
        calibration = expand_inputs(list(calibration)).paths
    found = inputs if isinstance(inputs, Inputs) else expand_inputs(list(inputs), video=video or Sampling())
    if not found.paths:
        raise UsageError(found.none_found())
    paths, shard_meta = found.paths, None
    if shard is not None:  # this job's contiguous part of the whole list: the parts read back in order
        index, count = shard
        total = len(found.paths)
        begin, end = index * total // count, (index + 1) * total // count
        shard_meta = {"index": index, "count": count, "begin": begin, "end": end, "total": total}
        shard_meta["inputs_sha256"] = _digest(found.paths)
        paths = found.paths[begin:end]
        found = Inputs(paths, found.skipped if index == 0 else [], found.ignored if index == 0 else 0)
        if not paths:
            raise UsageError(f"shard {index}/{count} holds no image: there are only {total}")

    started = time.perf_counter()
    with RunLock(output):
        # -- the model (a typo or a missing extra fails here, and leaves nothing behind) ------------------
        load = load or default_load
        options: dict[str, Any] = {"check_hash": check_hash}
        if backend == "torch":
            options.update(dtype=dtype, device=device, quantize=quantize)
        else:
            options.update(backend=backend, precision=precision, calibration=calibration)
        loaded = load(model, **options)
        layers = check_layers(layers, loaded)
        processor = DINOv3ViTImageProcessor.for_model(loaded, **processing)
        settings = {
            "model": model_name(model),
            "model_identity": model_identity(loaded),
            "model_fingerprint": model_fingerprint(loaded),
            "pool": pool,
            "layers": layers,
            "dtype": str(dtype).removeprefix("torch."),
            "quantize": quantize,
            "backend": backend,
            "precision": precision if backend != "torch" else None,
            "calibration": _digest([str(c) for c in calibration]) if calibration else None,
            "processor": processor.to_dict(),
        }
        if shard_meta is not None:
            settings["shard"] = shard_meta
        store = Store(output, {**settings, "inputs_sha256": _digest(paths), "count": len(paths)})
        notes: list[str] = []
        chunks: list[Chunk] = []
        if overwrite:
            store.clear()
        elif resume and store.exists:
            store.check_resumable()
            chunks, notes = store.load(paths)

        # -- the work, chunk by chunk -----------------------------------------------------------------------
        done = set().union(*(c.covered for c in chunks)) if chunks else set()
        todo = [i for i in range(len(paths)) if i not in done]
        chunk_size = max(1, checkpoint_every // batch_size) * batch_size
        bar = _progress(len(paths), len(paths) - len(todo), progress)
        computed = 0
        try:
            for chunk in _embed(loaded, processor, paths, todo, pool, layers, batch_size, workers, chunk_size, bar):
                store.save(chunk)
                chunks.append(chunk)
                computed += len(chunk.indices)
        finally:
            bar.close()

        # -- the output ---------------------------------------------------------------------------------------
        features, grids, failures = {}, {}, []
        for chunk in chunks:
            for index, array, grid in zip(chunk.indices, chunk.features, chunk.grids):
                features[index], grids[index] = array, grid
            failures += chunk.failures
        order = sorted(features)
        meta = {**settings, "dino3_version": __version__, "failed": len(failures) + len(found.skipped)}
        write_embeddings(
            output, [paths[i] for i in order], [features[i] for i in order], [grids[i] for i in order], meta
        )
        failed = sorted(failures)
        report = [(paths[i], reason) for i, reason in failed] + list(found.skipped)
        failures_file = sidecars(output)[0]
        if report:
            lines = "".join(f"{escape_field(p)}\t{escape_field(r)}\n" for p, r in report)
            atomic_write_text(failures_file, lines)
        elif failures_file.exists():
            failures_file.unlink()  # from an earlier run: this one has no failures
        store.clear()
    return EmbedResult(output, len(order), computed, report, time.perf_counter() - started, found.ignored, notes)


def _embed(model, processor, paths, todo, pool, layers, batch_size, workers, chunk_size, bar):
    """The inputs `todo` through one stream of batches (the decoding never pauses between chunks),
    given back as chunks of about chunk_size images each, to be saved as they come."""
    from ..pipeline import iter_batches

    def fresh() -> Chunk:
        return Chunk([], [], [], [], {})

    chunk = fresh()

    def failed(position: int, source: Any, error: Exception) -> None:
        index = todo[position]
        chunk.failures.append((index, str(error)))
        chunk.stats[index] = input_stat(paths[index])
        bar.update(1)

    with frame_sources([paths[i] for i in todo]) as sources:  # video frames are decoded as they are read
        for batch in iter_batches(sources, processor, batch_size, workers, on_error=failed):
            values, grid = extract(model, batch.pixel_values, pool, layers)
            values = values.float().cpu().numpy()
            for row, position in enumerate(batch.indices):
                index = todo[position]
                chunk.indices.append(index)
                chunk.features.append(values[row])
                chunk.grids.append(tuple(grid))
                chunk.stats[index] = input_stat(paths[index])
            bar.update(len(batch.indices))
            if len(chunk.indices) + len(chunk.failures) >= chunk_size:
                yield chunk
                chunk = fresh()
    if chunk.indices or chunk.failures:
        yield chunk


def parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """A shard as (index, count): from "K/N" (0 <= K < N), as SLURM array jobs number their tasks."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            index, count = (int(part) for part in shard.split("/"))
        except ValueError:
            raise UsageError(f"shard {shard!r}: write it K/N, e.g. 0/8 for the first of 8 parts") from None
    else:
        index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise UsageError(f"shard {index}/{count}: K must lie in 0..N-1 and N be 1 or more")
    return index, count


def model_identity(model: Any) -> dict[str, Any]:
    """What says which weights and architecture a loaded model has: its config and the size and
    modification time of each weight file (new weights in the same folder count as another model)."""
    files = []
    for file in getattr(model, "weight_files", None) or []:
        size, mtime = input_stat(file)
        files.append([os.path.realpath(file), size, mtime])
    return {
        "config": model.config.to_dict(),
        "weight_files": files,
        "quantization": getattr(model, "quantization", None),
    }


def model_name(model: Any) -> str:
    """How a model is recorded: a local folder or file by its absolute path (so that the record still
    names it from another working folder), a preset or hub id as given."""
    text = os.fspath(model) if isinstance(model, (str, os.PathLike)) else str(model)
    local = Path(text).expanduser()
    return str(local.resolve()) if local.exists() else text


FINGERPRINT_SIZE = 32  # values kept of each patch's features
FINGERPRINT_COSINE = 0.99  # the least cosine of the same weights' fingerprints (bf16, int8, runtimes pass)


def model_fingerprint(model: Any) -> list[float]:
    """What the model computes, in a few numbers: the first values of each patch's last-layer
    features for a fixed 64 x 64 input (the patches, not the CLS token: models that differ little in
    their pooled output still differ there). The same weights give the same numbers wherever the
    files lie (a copied, moved or touched folder is the same model); other weights give others.
    Compare with same_fingerprint."""
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64, generator=generator)  # 64: a multiple of 16 (ViT) and 32 (ConvNeXt)
    with torch.inference_mode():
        grid, _ = extract(model, pixels, "patches")  # (1, h, w, D)
    values = grid.reshape(-1, grid.shape[-1])[:, :FINGERPRINT_SIZE].float().cpu().reshape(-1)
    return [round(float(v), 5) for v in values]


def same_fingerprint(recorded: Sequence[float], found: Sequence[float]) -> bool:
    """Whether two fingerprints come from the same weights: cosine >= FINGERPRINT_COSINE, which the
    same weights reach in another dtype, quantized, compiled or on another device, and other weights
    do not (the same test as the foreground classifier's, dino3.dense.model_probe)."""
    a, b = np.asarray(recorded, dtype=np.float64), np.asarray(found, dtype=np.float64)
    if a.shape != b.shape or not np.isfinite(a).all() or not np.isfinite(b).all():
        return False
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return norms > 0 and float(a @ b) / norms >= FINGERPRINT_COSINE


def _digest(items: list[str]) -> str:
    return hashlib.sha256(json.dumps(items).encode("utf-8", "surrogateescape")).hexdigest()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, show: bool):
    if not show:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
        return _NoProgress()
    return tqdm(total=total, initial=done, unit="img", desc="embedding", file=sys.stderr, smoothing=0.1)
