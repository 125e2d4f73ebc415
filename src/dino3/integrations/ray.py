"""Embedding at scale on Ray Data: many machines, the same numbers as `dino3 embed`.

    ds = dino3.ray.embed(["s3://bucket/photos/"], model="vitb16", pool="cls")   # a ray.data.Dataset
    ds.write_parquet("s3://bucket/features/")

The plan Ray runs: a dataset of image paths or URIs -> CPU tasks that read (local files, or object
storage through pyarrow's filesystems), decode and preprocess them exactly as the local job does ->
an actor pool (`map_batches` with a callable class; GPUs asked for when the cluster has them) that
runs the model and pools -> rows `path`, `features` (a fixed-size list of float32 when every image
has the same feature shape), `shape`, `grid_h`, `grid_w`, `error`. A row whose image failed keeps
its path and the reason in `error`; its features are empty.

`run` is the command's job (`dino3 embed --engine ray`): the inputs are cut into shards, each
written to the output folder as Parquet under its own name and then marked done by a manifest; an
interrupted job resumed with `resume=True` skips the shards that landed. The settings travel in
each file's schema metadata ("dino3") and in the folder's manifest.json; failures, with their
reasons, go to failures.parquet. Needs the `ray` extra: pip install "dino3[ray]".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from .._version import __version__
from ..embed.inputs import expand_inputs
from ..errors import Dino3Error, UsageError

SHARD_SIZE = 1024  # images per shard: a unit of resumption
MANIFEST = "manifest.json"
FAILURES = "failures.parquet"
DECODE_CPUS = 0.5  # what one decoding task reserves (the model actor: 1, or a GPU)
URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")


def _require():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("the Ray engine needs Ray Data: pip install 'dino3[ray]'") from None


# -- the stages ---------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    if path.startswith(URI_SCHEMES):
        import pyarrow.fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    if path.startswith(("http://", "https://")):
        from ..images import download

        return download(path)
    with open(path, "rb") as f:
        return f.read()


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
    model: str,
    *,
    pool: str = "cls",
    layers=None,
    size: int = 224,
    keep_aspect: str | None = None,
    target: int | None = None,
    fit: str | None = None,
    dtype: str | None = None,
    backend: str = "torch",
    precision: str | None = None,
    batch_size: int = 16,
    concurrency: int | None = None,
    threads: int | None = None,
    num_gpus: float | None = None,
    check_hash: bool = True,
    meta: dict[str, Any] | None = None,
):
    """A ray.data.Dataset of the features of `inputs` (paths or URIs, or a Dataset with a `path`
    column); see the module docstring. Ray must be initialised (ray.init) or it starts a local one."""
    _require()
    import ray
    import ray.data

    from ..features import check_pool, feature_shape
    from ..models.pretrained import inspect_checkpoint
    from ..processing import MAX_SIDE, DINOv3ViTImageProcessor

    check_pool(pool)
    size_hw = size
    processing: dict[str, Any] = {"max_side": MAX_SIDE}
    if keep_aspect is not None:
        processing.update(keep_aspect=keep_aspect, target_size=target, fit=fit or "crop")
    else:
        processing["size"] = {"height": size, "width": size}
    found = inspect_checkpoint(model, check_hash=check_hash)
    if layers is not None:
        import torch

        from ..features import check_layers
        from ..models.pretrained import model_class_for

        with torch.device("meta"):
            check_layers(layers, model_class_for(found.config)(found.config))
    processor = DINOv3ViTImageProcessor.for_checkpoint(found.config, found.preset, str(model), **processing)
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
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and backend == "torch" else 0
    load_options: dict[str, Any] = {"check_hash": check_hash}
    if backend == "torch":
        load_options.update(dtype=dtype, device="cuda" if num_gpus else None)
    else:
        load_options.update(backend=backend, precision=precision)
    # Decoding in tasks of half a CPU each: their own processes, beside the model actor rather than
    # fused into it (Ray fuses operators that reserve alike), so that decoding overlaps the forwards.
    decoded = paths.map_batches(
        _decode, fn_kwargs={"processor": processor.to_dict()}, batch_size=batch_size, num_cpus=DECODE_CPUS
    )
    settings = json.dumps({**(meta or {}), "processor": processor.to_dict(), "pool": pool, "layers": layers})
    size = None
    if not (pool == "patches" and keep_aspect is not None):
        shape = feature_shape(_Described(found.config), pool, layers, found.config.grid_size(size_hw, size_hw))
        size = int(np.prod(shape))
    constructor = {"model": str(model), "load_options": load_options, "pool": pool, "layers": layers}
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


# -- the command's job ---------------------------------------------------------------------------------------
@dataclass
class RayResult:
    output: Path
    count: int
    failures: list[tuple[str, str]]
    seconds: float
    startup_seconds: float
    notes: list[str] = field(default_factory=list)


def read_table_inputs(path: str) -> list[str]:
    """The `path` (or `uri`) column of a Parquet or CSV table of inputs."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.endswith(".parquet") else pacsv.read_csv(path)
    for name in ("path", "uri", "url"):
        if name in table.column_names:
            return [str(v) for v in table.column(name).to_pylist() if v]
    raise UsageError(f"{path}: the table has no path column (found {table.column_names}); name it 'path'")


def expand(items: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Local inputs as `dino3 embed` takes them, plus object-storage URIs (files or prefixes) and tables."""
    paths, skipped, local = [], [], []
    for item in map(str, items):
        if item.endswith((".parquet", ".csv")) and not item.startswith(URI_SCHEMES):
            paths += read_table_inputs(item)
        elif item.startswith(URI_SCHEMES):
            paths += _list_uri(item)
        else:
            local.append(item)
    if local:
        found = expand_inputs(local)
        paths += found.paths
        skipped += found.skipped
    return paths, skipped


def _list_uri(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    from ..embed.inputs import IMAGE_SUFFIXES

    filesystem, inner = pafs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(inner)
    scheme = uri.split("://", 1)[0] + "://"
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"{uri}: no such object or prefix")
    selector = pafs.FileSelector(inner, recursive=True)
    files = [f.path for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]
    return sorted(scheme + f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)


def run(
    inputs: Sequence[str],
    model: str,
    output: str | os.PathLike,
    *,
    ray_address: str | None = None,
    concurrency: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
    **options: Any,
) -> RayResult:
    """`dino3 embed --engine ray`: every input's features in a Parquet dataset under `output`."""
    _require()
    import ray

    output = Path(output)
    if output.suffix and not output.is_dir():
        raise UsageError(f"{output}: the Ray engine writes a folder of Parquet files; give a folder name")
    if resume and overwrite:
        raise UsageError("resume and overwrite contradict each other; choose one")
    paths, skipped = expand(inputs)
    if not paths:
        raise UsageError("no images found in the inputs")
    settings = {
        "model": str(model),
        "options": {k: v for k, v in options.items() if k not in ("batch_size", "threads")},
        "inputs_sha256": hashlib.sha256(json.dumps(paths).encode("utf-8", "surrogateescape")).hexdigest(),
        "count": len(paths),
        "shard_size": shard_size,
        "dino3_version": __version__,
    }
    manifest_path = output / MANIFEST
    if output.exists() and any(output.iterdir()):
        if overwrite:
            shutil.rmtree(output)
        elif not resume:
            raise UsageError(f"{output} is not empty: pass --resume to continue the job that wrote it, or --overwrite")
        else:
            try:
                found = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                raise UsageError(f"{output} holds no dino3 Ray job (no readable {MANIFEST}); use --overwrite") from None
            changed = sorted(
                k for k in found.keys() | settings.keys() if k != "dino3_version" and found.get(k) != settings.get(k)
            )
            if changed:
                raise UsageError(
                    f"{output} holds another job's shards (it differs in {', '.join(changed)}); use --overwrite"
                )
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest_path, json.dumps(settings, indent=1) + "\n")

    started = time.perf_counter()
    if ray_address not in (None, "auto", "local"):
        _check_reachable(ray_address)
    try:
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise Dino3Error(f"cannot reach the Ray cluster at {ray_address!r}: {e}") from None
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.execution_options.preserve_order = True  # rows in input order: the same files every run
    startup = time.perf_counter() - started
    notes = []
    shards = [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]
    for k, shard in enumerate(shards):
        folder = output / f"shard-{k:05d}"
        if (folder / MANIFEST).is_file():
            notes.append(f"shard {k} was done already")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        scratch = output / f".shard-{k:05d}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        dataset = embed(shard, model, concurrency=concurrency, meta=settings, **options)
        try:
            dataset.write_parquet(str(scratch))
        except Exception as e:  # noqa: BLE001  (a worker that died for good, a full disk...)
            raise Dino3Error(f"the Ray job failed on shard {k}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        shard_manifest = {"index": k, "count": len(shard), "first": shard[0], "last": shard[-1]}
        atomic_write_text(scratch / MANIFEST, json.dumps(shard_manifest) + "\n")
        os.rename(scratch, folder)
    rows, failures = _summarise(output)
    failures += skipped
    _write_failures(output, failures)
    return RayResult(output, rows, failures, time.perf_counter() - started, startup, notes)


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


def read_dataset(output: str | os.PathLike):
    """The job's rows as a pyarrow dataset (the shards' Parquet files; not failures.parquet)."""
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in Path(output).glob("shard-*/*.parquet"))
    return pads.dataset(files, format="parquet")


def _summarise(output: Path) -> tuple[int, list[tuple[str, str]]]:
    table = read_dataset(output).to_table(columns=["path", "error"])
    errors = table.column("error").to_pylist()
    failures = [(p, e) for p, e in zip(table.column("path").to_pylist(), errors) if e]
    return len(errors) - len(failures), failures


def _write_failures(output: Path, failures: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = output / FAILURES
    if not failures:
        path.unlink(missing_ok=True)
        return
    table = pa.table({"path": [p for p, _ in failures], "reason": [r for _, r in failures]})
    tmp = output / f".{FAILURES}.partial"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
