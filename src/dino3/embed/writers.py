"""Embedding files: the writers of `dino3 embed`'s outputs and the readers that give them back.

Four formats, chosen by the suffix, each holding the features, the image paths in order, each image's
patch grid, and the settings that made them (`meta`):

- `.npz`: arrays `features`, `paths`, `grid_sizes`, `meta` (JSON) and, for patch grids of different
  sizes, `offsets`;
- `.npy`: the features array, with `NAME.paths.txt` (one path per line; backslash, tab and newline
  escaped as \\\\, \\t, \\n) and `NAME.meta.json` beside it;
- `.safetensors`: tensors `features`, `grid_sizes` (and `offsets`), paths and meta in the metadata;
- `.parquet`: one row per image: `path`, `features` (flat float32 list), `shape`, `grid_h`, `grid_w`;
  meta in the schema metadata.

Patch grids of different sizes (the aspect-preserving mode) are stored as the rows of all images one
after the other, `offsets[i]:offsets[i+1]` being image i's. Nothing is pickled; every file is
written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, atomic_write_text, escape_field, unescape_field
from ..errors import UsageError

OUTPUT_SUFFIXES = (".npz", ".npy", ".safetensors", ".parquet")


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
    """The files beside an output that belong to it."""
    path = Path(path)
    names = [".failures.tsv"] + ([".paths.txt", ".meta.json"] if path.suffix.lower() == ".npy" else [])
    return [path.with_name(path.name + n) for n in names]


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


def _write_parquet(tmp: Path, paths, features, grid_sizes, meta) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "features": pa.array([f.reshape(-1) for f in features], pa.list_(pa.float32())),
            "shape": pa.array([list(f.shape) for f in features], pa.list_(pa.int64())),
            "grid_h": pa.array(grid_sizes[:, 0], pa.int64()),
            "grid_w": pa.array(grid_sizes[:, 1], pa.int64()),
        }
    )
    pq.write_table(table.replace_schema_metadata({"dino3": json.dumps(meta)}), tmp)


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """An embeddings file written by `dino3 embed`, in any of its formats."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() and list(path.glob("shard-*/*.parquet")):
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
            shapes = table.column("shape").to_pylist()
            flat = table.column("features").to_pylist()
            features = [np.asarray(v, np.float32).reshape(s) for v, s in zip(flat, shapes)]
            grids = np.stack([table.column("grid_h").to_numpy(), table.column("grid_w").to_numpy()], axis=1)
            meta = json.loads((table.schema.metadata or {}).get(b"dino3", b"{}"))
            ragged = len({f.shape for f in features}) > 1
            if ragged:
                counts = [int(f.shape[0] * f.shape[1]) for f in features]
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                array = np.concatenate([f.reshape(c, *f.shape[2:]) for f, c in zip(features, counts)])
                return Embeddings(table.column("path").to_pylist(), array, grids, meta, offsets)
            array = np.stack(features) if features else np.zeros((0,), np.float32)
            return Embeddings(table.column("path").to_pylist(), array, grids, meta)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a readable dino3 embeddings file ({type(e).__name__}: {e})") from None
    raise UsageError(f"{path}: the suffix must be one of {', '.join(OUTPUT_SUFFIXES)}")


def _read_parquet_folder(folder: Path) -> Embeddings:
    """The rows of a `dino3 embed --engine ray` folder (its shards, in order; failed rows left out)."""
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in folder.glob("shard-*/*.parquet"))
    table = pads.dataset(files, format="parquet").to_table()
    errors = table.column("error").to_pylist()
    keep = [i for i, e in enumerate(errors) if not e]
    shapes = table.column("shape").to_pylist()
    flat = table.column("features").to_pylist()
    features = [np.asarray(flat[i], np.float32).reshape(shapes[i]) for i in keep]
    grids = np.asarray([[table.column("grid_h")[i].as_py(), table.column("grid_w")[i].as_py()] for i in keep], np.int64)
    meta = json.loads((pads.dataset(files[0], format="parquet").schema.metadata or {}).get(b"dino3", b"{}"))
    paths = [table.column("path")[i].as_py() for i in keep]
    if len({f.shape for f in features}) > 1:
        counts = [int(f.shape[0] * f.shape[1]) for f in features]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        array = np.concatenate([f.reshape(c, *f.shape[2:]) for f, c in zip(features, counts)])
        return Embeddings(paths, array, grids.reshape(-1, 2), meta, offsets)
    array = np.stack(features) if features else np.zeros((0,), np.float32)
    return Embeddings(paths, array, grids.reshape(-1, 2), meta)


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
