"""Embedding files: the writers of `dino3 embed`'s outputs and the readers that give them back.

Four formats, chosen by the suffix, each holding the features, the image paths in order, each image's
patch grid, and the settings that made them (`meta`):

- `.npz`: arrays `features`, `paths`, `grid_sizes`, `meta` (JSON) and, for patch grids of different
  sizes, `offsets`;
- `.npy`: the features array, with `NAME.paths.txt` (one path per line; backslash, tab and newline
  escaped as \\\\, \\t, \\n) and `NAME.meta.json` beside it;
- `.safetensors`: tensors `features`, `grid_sizes` (and `offsets`), paths and meta in the metadata;
- `.parquet`: one row per image: `path`, `features` (the flat float32 values: a fixed-size list when
  every image has as many, as DuckDB's array functions and Arrow's tensors want; a list otherwise),
  `shape`, `grid_h`, `grid_w`; meta in the schema metadata ("dino3"). The Ray engine writes the same
  schema, in a folder of such files (`PARQUET_SCHEMA`; read_embeddings reads a file or a folder).

Patch grids of different sizes (the aspect-preserving mode) are stored as the rows of all images one
after the other, `offsets[i]:offsets[i+1]` being image i's. Nothing is pickled; every file is
written atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, atomic_write_text, escape_field, unescape_field
from ..errors import UsageError

OUTPUT_SUFFIXES = (".npz", ".npy", ".safetensors", ".parquet")

# The Ray engine's output: a folder of Parquet files and nothing else (polars refuses a folder that
# holds any other file, hidden or not), with its manifest and failures beside it (ray_job.py).
DATASET_FORMAT = "dino3-embeddings-dataset"
SHARD_FILE = re.compile(r"shard-(\d{5})\.parquet")


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def manifest_path(folder: Path) -> Path:
    """Where a Ray engine output folder's manifest lies: beside it, `OUT.manifest.json`."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".manifest.json")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a Ray engine output folder, or a UsageError that says what the folder is not."""
    path = manifest_path(folder)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{folder}: a folder, but no dino3 embeddings dataset (there is no {path.name} beside it)"
        ) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}); embed again with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT or "dino3" not in manifest:
        raise UsageError(f"{path} is not a dino3 embeddings dataset's manifest")
    return manifest


def dataset_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The Parquet files of the shards done, in input order."""
    done = sorted(int(k) for k in manifest["shards"])
    return [str(Path(folder) / shard_file(k)) for k in done if manifest["shards"][str(k)]["rows"]]


@dataclass
class Embeddings:
    """What an embeddings file holds (see the module docstring)."""

    paths: list[str]
    features: np.ndarray  # (N, ...) or, ragged, (sum of h*w, D)
    grid_sizes: np.ndarray  # (N, 2)
    meta: dict[str, Any]
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int) -> np.ndarray:
        """Image i's features, in their own shape."""
        if self.offsets is None:
            return self.features[i]
        h, w = (int(v) for v in self.grid_sizes[i])
        return self.features[self.offsets[i] : self.offsets[i + 1]].reshape(h, w, -1)


def is_embeddings(path: str | os.PathLike) -> bool:
    """Whether `path` names a `dino3 embed` output: a file of one of its formats (by the suffix; a URL
    never), or a Ray engine output folder (its manifest beside it)."""
    from ..fetch import is_url

    text = os.fspath(path)
    if is_url(text):
        return False
    path = Path(text)
    return path.suffix.lower() in OUTPUT_SUFFIXES or (path.is_dir() and manifest_path(path).is_file())


def check_output(path: str | os.PathLike, may_be_ragged: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written at the end."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path}: the output must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError("writing .parquet needs pyarrow: pip install 'dino3[parquet]' (or pyarrow)") from None
    if suffix == ".npy" and may_be_ragged:
        raise UsageError(
            "patch grids of images of different shapes (--pool patches with --keep-aspect) do not fit one .npy "
            "array; write .npz, .safetensors or .parquet"
        )
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"{parent}: no permission to write there")
    return path


def sidecars(path: str | os.PathLike) -> list[Path]:
    """The files beside an output that belong to it (the failures first)."""
    path = Path(path)
    names = [".failures.tsv"] + ([".paths.txt", ".meta.json"] if path.suffix.lower() == ".npy" else [])
    if not path.suffix:  # a Ray engine output folder
        names.append(".manifest.json")
    return [path.with_name(path.name + n) for n in names]


def write_failures(path: Path, report: list[tuple[str, str]]) -> None:
    """The inputs that could not be embedded, a `path<TAB>reason` line each (names escaped as in
    .paths.txt); no file when there are none (one left by an earlier run is removed)."""
    if report:
        atomic_write_text(path, "".join(f"{escape_field(p)}\t{escape_field(r)}\n" for p, r in report))
    elif path.exists():
        path.unlink()


def write_embeddings(
    path: str | os.PathLike, paths: list[str], features: list[np.ndarray], grids: list, meta: dict[str, Any]
) -> None:
    """Write the embeddings with their image paths, atomically, in the format the suffix names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ragged = len({f.shape for f in features}) > 1  # patch grids of different sizes
    grid_sizes = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
    if ragged:
        counts = [int(f.shape[0] * f.shape[1]) for f in features]
        array = np.concatenate([f.reshape(c, *f.shape[2:]) for f, c in zip(features, counts)])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    else:
        array = np.stack(features) if features else np.zeros((0,), np.float32)
        offsets = None
    suffix = path.suffix.lower()
    if suffix == ".npy" and ragged:
        raise UsageError(
            "patch grids of different sizes do not fit one .npy array; write .npz, .safetensors or .parquet"
        )
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            arrays = {"features": array, "paths": np.asarray(paths, dtype=str).reshape(-1), "grid_sizes": grid_sizes}
            arrays["meta"] = np.asarray(json.dumps(meta))
            if offsets is not None:
                arrays["offsets"] = offsets
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, array)
        elif suffix == ".safetensors":
            import torch
            from safetensors.torch import save_file

            tensors = {
                "features": torch.from_numpy(np.ascontiguousarray(array)),
                "grid_sizes": torch.from_numpy(grid_sizes),
            }
            if offsets is not None:
                tensors["offsets"] = torch.from_numpy(offsets)
            save_file(tensors, str(tmp), metadata={"paths": json.dumps(paths), "meta": json.dumps(meta)})
        elif suffix == ".parquet":
            _write_parquet(tmp, paths, features, grid_sizes, meta)
        else:
            raise UsageError(f"{path}: the output must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if suffix == ".npy":
        atomic_write_text(sidecars(path)[1], "".join(escape_field(p) + "\n" for p in paths))
        atomic_write_text(sidecars(path)[2], json.dumps({**meta, "grid_sizes": grid_sizes.tolist()}) + "\n")


def parquet_table(paths: list[str], features: list[np.ndarray], grid_sizes: np.ndarray, meta: dict[str, Any]):
    """The one Parquet schema of every engine's output (module docstring)."""
    import pyarrow as pa

    sizes = {int(f.size) for f in features}
    flat = np.concatenate([f.reshape(-1) for f in features]).astype(np.float32, copy=False) if features else None
    if len(sizes) == 1:
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), sizes.pop())
    else:
        offsets = np.concatenate([[0], np.cumsum([f.size for f in features])]).astype(np.int32)
        values = flat if flat is not None else np.zeros(0, np.float32)
        column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.float32()))
    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "features": column,
            "shape": pa.array([list(f.shape) for f in features], pa.list_(pa.int64())),
            "grid_h": pa.array(np.asarray(grid_sizes).reshape(-1, 2)[:, 0], pa.int64()),
            "grid_w": pa.array(np.asarray(grid_sizes).reshape(-1, 2)[:, 1], pa.int64()),
        }
    )
    return table.replace_schema_metadata({"dino3": json.dumps(meta)})


def _write_parquet(tmp: Path, paths, features, grid_sizes, meta) -> None:
    import pyarrow.parquet as pq

    pq.write_table(parquet_table(paths, features, grid_sizes, meta), tmp)


def _from_table(table, meta: dict[str, Any]) -> Embeddings:
    """Embeddings from rows of the Parquet schema."""
    shapes = table.column("shape").to_pylist()
    column = table.column("features").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    paths = table.column("path").to_pylist()
    grids = np.stack([table.column("grid_h").to_numpy(), table.column("grid_w").to_numpy()], axis=1).reshape(-1, 2)
    sizes = [int(np.prod(s)) for s in shapes]
    if len({tuple(s) for s in shapes}) <= 1:  # one shape: one array
        shape = tuple(shapes[0]) if shapes else (0,)
        return Embeddings(paths, values.reshape(len(paths), *shape) if shapes else values, grids, meta)
    offsets_values = np.concatenate([[0], np.cumsum(sizes)])
    items = [values[a:b].reshape(s) for a, b, s in zip(offsets_values[:-1], offsets_values[1:], shapes)]
    counts = [int(f.shape[0] * f.shape[1]) for f in items]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    array = np.concatenate([f.reshape(c, *f.shape[2:]) for f, c in zip(items, counts)])
    return Embeddings(paths, array, grids, meta, offsets)


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """An embeddings file written by `dino3 embed`, in any of its formats."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_parquet_folder(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such embeddings file")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                offsets = data.get("offsets")
                return Embeddings(
                    [str(p) for p in data["paths"]],
                    data["features"],
                    data["grid_sizes"],
                    json.loads(str(data["meta"])),
                    offsets,
                )
        if suffix == ".npy":
            lines = sidecars(path)[1].read_text(encoding="utf-8").splitlines()
            meta_file = sidecars(path)[2]
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
            features = np.load(path, allow_pickle=False)
            grids = np.asarray(meta.get("grid_sizes") or [[0, 0]] * len(lines), dtype=np.int64)
            return Embeddings([unescape_field(line) for line in lines], features, grids, meta)
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                metadata = f.metadata() or {}
                offsets = f.get_tensor("offsets") if "offsets" in f.keys() else None  # noqa: SIM118
                return Embeddings(
                    json.loads(metadata["paths"]),
                    f.get_tensor("features"),
                    f.get_tensor("grid_sizes"),
                    json.loads(metadata.get("meta", "{}")),
                    offsets,
                )
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return _from_table(table, json.loads((table.schema.metadata or {}).get(b"dino3", b"{}")))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a readable dino3 embeddings file ({type(e).__name__}: {e})") from None
    raise UsageError(f"{path}: the suffix must be one of {', '.join(OUTPUT_SUFFIXES)}")


def _read_parquet_folder(folder: Path) -> Embeddings:
    """The rows of a `dino3 embed --engine ray` folder: its Parquet files, in input order."""
    manifest = read_manifest(folder)
    import pyarrow.dataset as pads

    table = pads.dataset(dataset_files(folder, manifest), format="parquet").to_table()
    return _from_table(table, manifest["dino3"])


def read_shards(paths: list[str | os.PathLike]) -> Embeddings:
    """The outputs of one job run as N shards (`dino3 embed --shard K/N`), read back as one, in input
    order. They must all come from the same job (the same inputs, model and settings) and be all there."""
    parts = sorted((read_embeddings(p) for p in paths), key=lambda e: (e.meta.get("shard") or {}).get("index", -1))
    if not parts:
        raise UsageError("no shard files given")
    shards = [part.meta.get("shard") for part in parts]
    if any(s is None for s in shards):
        raise UsageError("some of these files were not written with --shard; give the shards of one job")
    count = shards[0]["count"]
    if [s["index"] for s in shards] != list(range(count)):
        found = sorted(s["index"] for s in shards)
        raise UsageError(f"the job had {count} shards; these files hold shards {found}")
    same = {k: v for k, v in parts[0].meta.items() if k not in ("shard", "failed", "dino3_version")}
    for part, shard in zip(parts, shards):
        if shard["inputs_sha256"] != shards[0]["inputs_sha256"] or shard["count"] != count:
            raise UsageError(f"shard {shard['index']} comes from another list of inputs")
        other = {k: v for k, v in part.meta.items() if k not in ("shard", "failed", "dino3_version")}
        if other != same:
            changed = sorted(k for k in same.keys() | other.keys() if same.get(k) != other.get(k))
            raise UsageError(f"shard {shard['index']} was made with other settings ({', '.join(changed)})")
    paths_all = [p for part in parts for p in part.paths]
    grids = np.concatenate([part.grid_sizes for part in parts])
    meta = {**parts[0].meta, "shard": None, "failed": sum(part.meta.get("failed", 0) for part in parts)}
    if any(part.offsets is not None for part in parts) or len({part.features.shape[1:] for part in parts}) > 1:
        items = [part.item(i) for part in parts for i in range(len(part))]
        counts = [int(f.shape[0] * f.shape[1]) for f in items]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        features = np.concatenate([f.reshape(c, -1) for f, c in zip(items, counts)])
        return Embeddings(paths_all, features, grids, meta, offsets)
    return Embeddings(paths_all, np.concatenate([part.features for part in parts]), grids, meta)
