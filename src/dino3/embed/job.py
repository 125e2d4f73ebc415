"""The embed job as a library: many images -> one embeddings output, resumable, never losing work.

    result = dino3.embed.run(["photos/"], model="vits16", output="features.npz", pool="cls+mean")
    result = dino3.embed.run(["s3://bucket/photos/"], recipe=recipe, output="features/", engine="ray")

One runner, two engines. Both take their inputs from one lister (inputs.py), make their features by
one recipe (dino3.recipe: checked before any state is created and before the model is loaded), record
the recipe's description in the output, lock the output for the job's lifetime, refuse to resume when
anything that decides the numbers changed, and list each image that could not be embedded, with its
reason, while the job goes on.

- "local": this machine; one file (.npz, .npy, .safetensors, .parquet; writers.py). Progress is saved
  every `checkpoint_every` images (store.py), so that `resume=True` continues an interrupted job and
  writes the file an uninterrupted one would have.
- "ray": Ray Data (dino3.integrations.ray, many machines); a folder that is a Parquet dataset, saved
  shard by shard (ray_job.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._progress import progress_bar
from .._version import __version__
from ..errors import UsageError
from ..features import Layers
from ..recipe import Recipe, digest, model_name
from ..video import Sampling, frame_sources
from .inputs import Inputs, expand_inputs
from .store import Chunk, RunLock, Store, input_stat
from .writers import check_output, sidecars, write_embeddings, write_failures


@dataclass
class EmbedResult:
    output: Path
    count: int  # images in the output
    computed: int  # of which embedded by this run (the rest came from an interrupted one)
    failures: list[tuple[str, str]]  # (input, reason), skipped inputs included
    seconds: float
    ignored: int  # files in the folders without an image suffix
    notes: list[str] = field(default_factory=list)
    startup_seconds: float = 0.0  # the Ray engine's start-up (connecting or starting Ray)


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs (`engine="ray"`)."""

    address: str | None = None  # a cluster's address; None: a local Ray
    concurrency: int | None = None  # model actors (default 1)
    shard_size: int = 1024  # images per shard: the unit of resumption
    threads: int | None = None  # torch threads of each model actor
    num_gpus: float | None = None  # per actor; None: 1 where the cluster has GPUs


ENGINES = ("local", "ray")


def _positive(name: str, value: Any, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def run(
    inputs: Sequence[str] | Inputs,
    model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    engine: str = "local",
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
    ray: RayOptions | None = None,
) -> EmbedResult:
    """Embed images into one output; see the module docstring and `dino3 embed --help`. How the
    features are made is `recipe` (a dino3.recipe.Recipe), or the model and options given here.
    engine="local" writes one file (.npz, .npy, .safetensors, .parquet) on this machine; engine="ray"
    a folder that is a Parquet dataset, on Ray Data (`ray` says where and how). Videos among the
    inputs give their frames, as `video` samples them (local engine; default: every frame)."""
    # -- everything the job needs is checked before anything is created or loaded ---------------------
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {ENGINES}, got {engine!r}")
    if recipe is None:
        if model is None:
            raise UsageError("give the model (or a recipe)")
        if calibration is not None:
            calibration = expand_inputs([os.fspath(c) for c in calibration]).paths
        recipe = Recipe(
            os.fspath(model),
            pool=pool,
            layers=layers,
            size=size,
            keep_aspect=keep_aspect,
            target=target,
            fit=fit,
            max_side=max_side,
            jpeg_draft=jpeg_draft,
            dtype=dtype,
            quantize=quantize,
            backend=backend,
            precision=precision,
            calibration=calibration,
        )
    elif model is not None and model_name(model) != recipe.model:
        raise UsageError(f"model {model} and the recipe's model {recipe.model} differ; give one of them")
    if output is None:
        raise UsageError("give the output")
    _positive("batch_size", batch_size)
    _positive("workers", workers, zero_ok=True)
    _positive("checkpoint_every", checkpoint_every)
    if device is not None:
        from ..models.pretrained import resolve_device

        try:
            resolve_device(device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if video is not None and not isinstance(video, Sampling):
        raise UsageError(f"video must be a dino3.video.Sampling, got {type(video).__name__}")
    if resume and overwrite:
        raise UsageError("resume and overwrite contradict each other; choose one")
    if engine == "ray":
        if shard is not None or device is not None or video is not None:
            raise UsageError("shard, device and video sampling are for the local engine (Ray places and splits work)")
        from .ray_job import run_on_ray

        done = run_on_ray(
            inputs, recipe, output, ray or RayOptions(), batch_size, resume, overwrite, check_hash, progress, load
        )
        folder, count, failures, seconds, ignored, notes, startup = done
        return EmbedResult(folder, count, count, failures, seconds, ignored, notes, startup_seconds=startup)
    if ray is not None:
        raise UsageError("ray options are for engine='ray'")
    return _run_local(
        inputs, recipe, output, device, batch_size, workers, checkpoint_every, resume, overwrite, check_hash,
        progress, parse_shard(shard), load, video,
    )  # fmt: skip


def _run_local(
    inputs, recipe, output, device, batch_size, workers, checkpoint_every, resume, overwrite, check_hash, progress,
    shard, load, video,
) -> EmbedResult:  # fmt: skip
    output = check_output(output, may_be_ragged=recipe.ragged)
    store_folder = output.with_name(output.name + ".partial")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    if store_folder.exists() and not (resume or overwrite):
        raise UsageError(
            f"{store_folder} holds an interrupted run: pass --resume to continue it, or --overwrite to start over"
        )
    found = inputs if isinstance(inputs, Inputs) else expand_inputs(list(inputs), video=video or Sampling())
    if not found.paths:
        raise UsageError(found.none_found())
    paths, shard_meta = found.paths, None
    if shard is not None:  # this job's contiguous part of the whole list: the parts read back in order
        index, count = shard
        total = len(found.paths)
        begin, end = index * total // count, (index + 1) * total // count
        shard_meta = {"index": index, "count": count, "begin": begin, "end": end, "total": total}
        shard_meta["inputs_sha256"] = digest(found.paths)
        paths = found.paths[begin:end]
        found = Inputs(paths, found.skipped if index == 0 else [], found.ignored if index == 0 else 0)
        if not paths:
            raise UsageError(f"shard {index}/{count} holds no image: there are only {total}")

    started = time.perf_counter()
    with RunLock(output):
        # -- the model (a typo or a missing extra fails here, and leaves nothing behind) ------------------
        made = recipe.load(device=device, check_hash=check_hash, load=load)
        settings = made.describe()
        if shard_meta is not None:
            settings["shard"] = shard_meta
        store = Store(output, {**settings, "inputs_sha256": digest(paths), "count": len(paths)})
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
        bar = progress_bar(len(paths), "embedding", "img", progress, initial=len(paths) - len(todo))
        computed = 0
        try:
            for chunk in _embed(made, paths, todo, batch_size, workers, chunk_size, bar):
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
        write_failures(sidecars(output)[0], report)
        store.clear()
    return EmbedResult(output, len(order), computed, report, time.perf_counter() - started, found.ignored, notes)


def _embed(made, paths, todo, batch_size, workers, chunk_size, bar):
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
        for batch in iter_batches(sources, made.processor, batch_size, workers, on_error=failed):
            values, grid = made.features(batch.pixel_values)
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
