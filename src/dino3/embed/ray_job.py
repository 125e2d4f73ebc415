"""The embed job on the Ray engine: a folder that is a Parquet dataset, written shard by shard.

    OUT/shard-00000.parquet ...   the rows, in input order (writers.parquet_table's schema: the same as
                                  the local engine's .parquet); images that failed are never among them
    OUT.manifest.json             beside it: how the features were made (the recipe's description),
                                  the inputs' digest, the shards done with their rows and failures
    OUT.failures.tsv              beside it: the inputs that could not be embedded, `path<TAB>reason`
    OUT.lock, OUT.partial/        beside it: held while a job writes OUT; a shard being written

OUT holds Parquet files and nothing else, so that pandas, pyarrow, polars (which refuses a folder with
any other file in it, hidden or not), DuckDB, Spark and `ray.data.read_parquet` read it as the dataset
it is; each file also carries the recipe in its schema metadata ("dino3"). A shard counts as done once
the manifest names it, written after its file; a resumed job (`resume=True`) does only the others, and
is refused, naming what changed, when the model's weights or anything else that decides the numbers
differ from the manifest's. A folder that holds anything but a dino3 output is never written into nor
emptied, `overwrite` included.

The inputs are listed and the model's identity is taken in this process (the model is loaded here once
to fingerprint it); the Ray Data plan (decoding tasks, model actors) is dino3.integrations.ray's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text, escape_field
from .._version import __version__
from ..errors import Dino3Error, UsageError
from ..recipe import Recipe, differences, digest
from .inputs import Inputs, expand_inputs
from .store import RunLock
from .writers import (
    DATASET_FORMAT,
    OUTPUT_SUFFIXES,
    SHARD_FILE,
    manifest_path,
    parquet_table,
    read_manifest,
    shard_file,
    sidecars,
    write_failures,
)


def run_on_ray(inputs, recipe: Recipe, output, options, batch_size, resume, overwrite, check_hash, progress, load):
    """`dino3 embed --engine ray`; see the module docstring and dino3.embed.run. Returns (output folder,
    rows, failures, seconds, ignored files, notes, Ray's start-up seconds)."""
    from ..integrations import ray as plan

    plan.require()
    output = Path(output)
    if output.suffix.lower() in OUTPUT_SUFFIXES or (output.exists() and not output.is_dir()):
        raise UsageError(f"{output}: the Ray engine writes a folder (a Parquet dataset); give a folder name")
    if recipe.ragged:
        raise UsageError("patch grids of kept aspect ratios (pool patches with keep_aspect) need the local engine")
    if not isinstance(options.shard_size, int) or options.shard_size < 1:
        raise UsageError(f"shard_size must be an integer >= 1, got {options.shard_size!r}")
    found = inputs if isinstance(inputs, Inputs) else expand_inputs([os.fspath(i) for i in inputs])
    if not found.paths:
        raise UsageError(found.none_found())
    paths = found.paths

    started = time.perf_counter()
    with RunLock(output):
        previous = _previous(output, resume, overwrite)
        # -- the model, once here: what it is goes into the manifest (the actors load it themselves) ---------
        made = recipe.load(check_hash=check_hash, load=load)
        settings = {**made.describe(), "dino3_version": __version__}
        del made
        job = {
            "format": DATASET_FORMAT,
            "dino3": settings,
            "inputs_sha256": digest(paths),
            "count": len(paths),
            "shard_size": options.shard_size,
            "shards": {},
        }
        if previous is not None and resume:
            _check_resumable(output, previous, job)
            job["shards"] = previous["shards"]
        elif previous is not None:  # overwrite: only what a dino3 job wrote is removed
            _clear(output)
        output.mkdir(parents=True, exist_ok=True)
        _remove_unfinished(output, job)
        atomic_write_text(manifest_path(output), json.dumps(job, indent=1) + "\n")

        startup = plan.start(options.address, progress)
        notes = []
        shards = [paths[i : i + options.shard_size] for i in range(0, len(paths), options.shard_size)]
        for k, shard in enumerate(shards):
            if str(k) in job["shards"]:
                notes.append(f"shard {k} was done already")
                continue
            dataset = plan.embed(
                shard,
                recipe,
                batch_size=batch_size,
                concurrency=options.concurrency,
                threads=options.threads,
                num_gpus=options.num_gpus,
                check_hash=check_hash,
                meta=settings,
            )
            try:
                rows, failed = _write_shard(output, k, dataset, settings)
            except Exception as e:  # noqa: BLE001  (a worker that died for good, a full disk...)
                raise Dino3Error(
                    f"the Ray job failed on shard {k}: {type(e).__name__}: {str(e).splitlines()[0]}"
                ) from e
            job["shards"][str(k)] = {"rows": rows, "first": shard[0], "last": shard[-1], "failed": failed}
            atomic_write_text(manifest_path(output), json.dumps(job, indent=1) + "\n")
        shutil.rmtree(_scratch(output), ignore_errors=True)
        failures = [tuple(f) for k in sorted(job["shards"], key=int) for f in job["shards"][k]["failed"]]
        failures += list(found.skipped)
        write_failures(sidecars(output)[0], failures)
        count = sum(s["rows"] for s in job["shards"].values())
    return output, count, failures, time.perf_counter() - started, found.ignored, notes, startup


def _previous(output: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the dino3 output already in `output`; refusals for anything else there."""
    has_files = output.is_dir() and any(output.iterdir())
    if not manifest_path(output).exists():
        if has_files:
            raise UsageError(
                f"{output} is not empty and holds no dino3 embeddings dataset; dino3 writes only into an empty or "
                "new folder, or its own output (give another folder)"
            )
        if resume:
            raise UsageError(f"{output} holds no interrupted job to resume; leave --resume out")
        return None
    manifest = read_manifest(output)
    foreign = [e.name for e in output.iterdir() if not SHARD_FILE.fullmatch(e.name)] if output.is_dir() else []
    if foreign:
        raise UsageError(f"{output} holds files that dino3 did not write ({', '.join(sorted(foreign)[:5])}); move them")
    if not (resume or overwrite):
        raise UsageError(f"{output} holds a dino3 output: pass --resume to continue its job, or --overwrite")
    return manifest


def _check_resumable(output: Path, previous: dict[str, Any], job: dict[str, Any]) -> None:
    changed = differences(previous["dino3"], job["dino3"])
    for key in ("inputs_sha256", "count", "shard_size"):
        if previous.get(key) != job[key]:
            changed.append(f"{key}: {previous.get(key)} -> {job[key]}")
    if changed:
        raise UsageError(
            f"cannot resume {output}: what decides its numbers changed since it began:\n  "
            + "\n  ".join(escape_field(c) for c in changed[:12])
            + "\nrun with what it began with, or start over with --overwrite"
        )


def _clear(output: Path) -> None:
    """Remove what a dino3 job wrote (its shard files and sidecars), and nothing else."""
    if output.is_dir():
        for entry in output.iterdir():
            if SHARD_FILE.fullmatch(entry.name):
                entry.unlink()
    for sidecar in sidecars(output):
        sidecar.unlink(missing_ok=True)


def _remove_unfinished(output: Path, job: dict[str, Any]) -> None:
    """Shard files that the manifest does not name (a job killed between writing and recording)."""
    for entry in output.iterdir():
        match = SHARD_FILE.fullmatch(entry.name)
        if match and str(int(match.group(1))) not in job["shards"]:
            entry.unlink()
    shutil.rmtree(_scratch(output), ignore_errors=True)


def _scratch(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _write_shard(output: Path, index: int, dataset, settings: dict[str, Any]) -> tuple[int, list[list[str]]]:
    """Run one shard's plan; write its good rows as one Parquet file, return (rows, failures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))  # in input order
    table = pa.concat_tables(blocks) if blocks else None
    if table is None or table.num_rows == 0:
        return 0, []
    errors = table.column("error").to_pylist()
    all_paths = table.column("path").to_pylist()
    failed = [[p, e] for p, e in zip(all_paths, errors) if e]
    good = [i for i, e in enumerate(errors) if not e]
    if not good:
        return 0, failed
    values = _rows(table.column("features"))  # (N, values of one image)
    shapes = table.column("shape").to_pylist()
    features = [values[i].reshape(shapes[i]) for i in good]
    grids = np.stack([table.column("grid_h").to_numpy(), table.column("grid_w").to_numpy()], axis=1)[good]
    target = output / shard_file(index)
    _scratch(output).mkdir(exist_ok=True)
    scratch = _scratch(output) / target.name  # beside the dataset, on its file system: no reader sees it
    pq.write_table(parquet_table([all_paths[i] for i in good], features, grids, settings), scratch)
    with open(scratch, "rb") as f:
        os.fsync(f.fileno())
    os.replace(scratch, target)
    return len(good), failed


def _rows(column) -> np.ndarray:
    """A fixed-size list column (null rows included, as zeros) -> (N, size) float32."""
    import pyarrow as pa

    column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        return np.asarray([np.asarray(v if v is not None else [], np.float32) for v in column.to_pylist()], object)
    size = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    start = column.offset * size
    return values[start : start + len(column) * size].reshape(len(column), size)
