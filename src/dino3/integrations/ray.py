"""Embedding at scale on Ray Data: many machines, the same numbers as `dino3 embed`.

    ds = dino3.ray.embed(["s3://bucket/photos/"], model="vitb16", pool="cls")   # a ray.data.Dataset
    ds.write_parquet("s3://bucket/features/")

The plan Ray runs: a dataset of image paths or URIs -> CPU tasks that read (local files, or object
storage through pyarrow's filesystems), decode and preprocess them exactly as the local job does ->
an actor pool (`map_batches` with a callable class; GPUs asked for when the cluster has them) that
runs the model and pools -> rows `path`, `features` (a fixed-size list of float32 when every image
has the same feature shape), `shape`, `grid_h`, `grid_w`, `error`. A row whose image failed keeps
its path and the reason in `error`; its features are empty.

This module is the plan only. The job around it (`dino3 embed --engine ray`: inputs, shards, resume,
the output folder) is the embed job's, shared with the local engine (dino3.embed.job, ray_job.py).
Needs the `ray` extra: pip install "dino3[ray]".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import Dino3Error, UsageError
from ..recipe import Recipe

DECODE_CPUS = 0.5  # what one decoding task reserves (the model actor: 1, or a GPU)


def require() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("the Ray engine needs Ray Data: pip install 'dino3[ray]'") from None


# -- the stages ---------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    """A file, URL or object-store URI's bytes, through dino3's one fetcher."""
    from ..fetch import fetch_bytes

    return fetch_bytes(path)


def _decode(batch: dict[str, np.ndarray], processor: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU task: paths -> float32 pixels (as bytes, with their height and width), or the error."""
    from ..processing import DINOv3ViTImageProcessor

    proc = DINOv3ViTImageProcessor.from_dict(processor)
    pixels, heights, widths, errors = [], [], [], []
    for path in batch["path"]:
        path = str(path)
        try:
            values = proc.pixels(_read_bytes(path)).numpy()  # (3, H, W)
            pixels.append(values.tobytes())
            heights.append(values.shape[1])
            widths.append(values.shape[2])
            errors.append("")
        except Exception as e:  # noqa: BLE001  (one image's failure is that image's row)
            pixels.append(b"")
            heights.append(0)
            widths.append(0)
            errors.append(f"{path}: {e}" if path not in str(e) else str(e))
    return {
        "path": np.asarray([str(p) for p in batch["path"]], dtype=object),
        "pixels": np.asarray(pixels, dtype=object),
        "height": np.asarray(heights, dtype=np.int64),
        "width": np.asarray(widths, dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
    }


class _Embedder:
    """Actor: loads the model once, then turns batches of pixels into pooled features."""

    def __init__(
        self,
        model: str,
        load_options: dict[str, Any],
        pool: str,
        layers,
        meta: str,
        size: int | None,
        threads: int | None = None,
        actors: int = 1,
    ) -> None:
        import os

        import torch

        from .._openmp import on_passing_thread
        from ..api import load

        # This process is the actor's own; Ray starts it with OMP_NUM_THREADS=1 (one thread per CPU
        # it reserves), which leaves the model on one core while the decoding tasks take the others
        # only part of the time. Like the local job, let the model use the node's cores (shared).
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, actors)))
        self.torch = torch
        # Ray Data calls the actor on another thread than this one: loaded here, the model would
        # leave this thread an OpenMP team, and the forwards would run beside it, slower (_openmp).
        self.model = on_passing_thread(load, model, **load_options)
        self.pool, self.layers, self.meta = pool, layers, meta
        self.size = size  # values per image when every image has as many (then a fixed-size list column)

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        from ..features import extract

        torch = self.torch
        count = len(batch["path"])
        features: list[np.ndarray | None] = [None] * count
        grids = [(0, 0)] * count
        errors = [str(e) for e in batch["error"]]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(count):
            if not errors[i]:
                groups.setdefault((int(batch["height"][i]), int(batch["width"][i])), []).append(i)
        for (h, w), rows in groups.items():
            pixels = torch.stack(
                [torch.from_numpy(np.frombuffer(batch["pixels"][i], dtype=np.float32).reshape(3, h, w)) for i in rows]
            )
            try:
                values, grid = extract(self.model, pixels, self.pool, self.layers)
            except Exception as e:  # noqa: BLE001
                for i in rows:
                    errors[i] = f"{batch['path'][i]}: {type(e).__name__}: {e}"
                continue
            values = values.float().cpu().numpy()
            for j, i in enumerate(rows):
                features[i], grids[i] = values[j], grid
        shapes = [list(f.shape) if f is not None else [] for f in features]
        if self.size is not None:  # one schema for every block: failed rows hold nulls
            values = np.concatenate(
                [f.reshape(-1) if f is not None else np.zeros(self.size, np.float32) for f in features]
            )
            mask = pa.array([f is None for f in features])
            column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), self.size, mask=mask)
        else:
            column = pa.array([f.reshape(-1) if f is not None else None for f in features], pa.list_(pa.float32()))
        table = pa.table(
            {
                "path": pa.array([str(p) for p in batch["path"]], pa.string()),
                "features": column,
                "shape": pa.array(shapes, pa.list_(pa.int64())),
                "grid_h": pa.array([g[0] for g in grids], pa.int64()),
                "grid_w": pa.array([g[1] for g in grids], pa.int64()),
                "error": pa.array(errors, pa.string()),
            }
        )
        return table.replace_schema_metadata({"dino3": self.meta})


def embed(
    inputs: Sequence[str] | Any,
    model: str | Recipe,
    *,
    batch_size: int = 16,
    concurrency: int | None = None,
    threads: int | None = None,
    num_gpus: float | None = None,
    check_hash: bool = True,
    meta: dict[str, Any] | None = None,
    **options: Any,
):
    """A ray.data.Dataset of the features of `inputs` (paths or URIs, or a Dataset with a `path`
    column), made by `model`: a dino3.recipe.Recipe, or a model name with the recipe's options
    (pool=, layers=, size=, dtype=, ...). Ray must be initialised (ray.init) or it starts a local one."""
    require()
    import ray
    import ray.data

    from ..features import check_layers, feature_shape
    from ..models.pretrained import inspect_checkpoint, model_class_for
    from ..processing import DINOv3ViTImageProcessor

    recipe = model if isinstance(model, Recipe) else Recipe(str(model), **options)
    if isinstance(model, Recipe) and options:
        raise UsageError(f"give the options in the recipe, not beside it: {sorted(options)}")
    found = inspect_checkpoint(recipe.model, check_hash=check_hash)
    if recipe.layers is not None:
        import torch

        with torch.device("meta"):
            check_layers(recipe.layers, model_class_for(found.config)(found.config))
    processor = DINOv3ViTImageProcessor.for_checkpoint(found.config, found.preset, recipe.model, **recipe.processing)
    if isinstance(inputs, ray.data.Dataset):
        if "path" not in inputs.schema().names:
            raise UsageError(f"the input dataset has no 'path' column (its columns: {inputs.schema().names})")
        paths = inputs.select_columns(["path"])
    else:
        items = [{"path": str(p)} for p in inputs]
        if not items:
            raise UsageError("no inputs to embed")
        paths = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 32, 256)))
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and recipe.backend == "torch" else 0
    # Decoding in tasks of half a CPU each: their own processes, beside the model actor rather than
    # fused into it (Ray fuses operators that reserve alike), so that decoding overlaps the forwards.
    decoded = paths.map_batches(
        _decode, fn_kwargs={"processor": processor.to_dict()}, batch_size=batch_size, num_cpus=DECODE_CPUS
    )
    settings = json.dumps(meta if meta is not None else {"recipe": recipe.options(), "processor": processor.to_dict()})
    size = None
    if not recipe.ragged:
        grid = found.config.grid_size(recipe.size, recipe.size)
        shape = feature_shape(_Described(found.config), recipe.pool, recipe.layers, grid)
        size = int(np.prod(shape))
    load_options = recipe.load_options(device="cuda" if num_gpus else None, check_hash=check_hash)
    constructor = {"model": recipe.model, "load_options": load_options, "pool": recipe.pool, "layers": recipe.layers}
    constructor.update(threads=threads, actors=concurrency or 1)  # torch threads of each model actor
    return decoded.map_batches(
        _Embedder,
        fn_constructor_kwargs={**constructor, "meta": settings, "size": size},
        compute=ray.data.ActorPoolStrategy(size=concurrency or 1),
        batch_size=batch_size,
        num_gpus=num_gpus,  # Ray Data restarts an actor that dies and does its batches again
    )


class _Described:
    """What feature_shape reads of a model, for a checkpoint not loaded here (the actors load it)."""

    def __init__(self, config) -> None:
        self.config = config


# -- starting Ray -------------------------------------------------------------------------------------------
def start(address: str | None, progress: bool) -> float:
    """Connect to the cluster at `address` (or start a local Ray); the seconds it took."""
    require()
    import ray

    started = time.perf_counter()
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    if not ray.is_initialized():
        try:
            context = ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise Dino3Error(f"cannot reach the Ray cluster at {address!r}: {e}") from None
        # A local Ray started here ends with this process even when it is killed (SIGKILL, out of memory);
        # a cluster given by its address, or a Ray the caller initialised, is not ours to stop.
        from .ray_watchdog import guard

        guard(context.address_info["session_dir"])
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.execution_options.preserve_order = True  # rows in input order: the same files every run
    return time.perf_counter() - started


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes of Ray's retries, when nothing listens at a cluster's address."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError):
        raise Dino3Error(
            f"cannot reach the Ray cluster at {address!r} (nothing answers there); start it with `ray start --head` "
            "or leave --ray-address out to run on a local Ray"
        ) from None
