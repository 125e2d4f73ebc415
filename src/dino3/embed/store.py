"""The resumable store of a job: `OUT.partial/`, one checked chunk file per group of inputs, and a lock.

- One job per output at a time: `OUT.lock` is locked (flock) for as long as the job runs; a second
  job on the same output is refused at once. The lock dies with its process (kill -9 included).
- `manifest.json` holds what decides the numbers: the model's identity (its config and weight files'
  sizes and modification times), the preprocessing, pooling, layers, dtype, backend, and the list of
  inputs. Resuming with any of them changed is refused, naming each with its old and new value; the
  batch size and chunk size change no number and may differ.
- Each chunk records, for every input it holds, the file's size and modification time. On resuming,
  a chunk whose inputs changed since, or that cannot be read whole (a power cut, a full disk), is
  done again; the rest is kept. Chunks are flushed to disk before they count as done.
- Nothing is created before the first chunk is written: a run that produced nothing leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, atomic_write_text, fsync_dir
from ..errors import RunLockedError, UsageError
from ..video import source_file

MANIFEST = "manifest.json"
STORE_VERSION = 2


def input_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a local input (a video frame's: its video's), (-1, -1) for a URL or a
    file that is not there."""
    try:
        st = os.stat(source_file(path))
    except (OSError, ValueError):
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


@dataclass
class Chunk:
    indices: list[int]  # inputs embedded
    features: list[np.ndarray]
    grids: list[tuple[int, int]]
    failures: list[tuple[int, str]]  # (index, reason)
    stats: dict[int, tuple[int, int]] = field(default_factory=dict)  # every input of the chunk

    @property
    def covered(self) -> set[int]:
        return set(self.indices) | {i for i, _ in self.failures}


class RunLock:
    """An exclusive lock on `OUT.lock`, held while a job writes OUT; see the module docstring."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(
                    f"another dino3 job is writing {self.path.with_suffix('').name} right now (it holds {self.path}); "
                    "wait for it to finish, or write to another output"
                ) from None
            # The file may have been removed (and re-created) by the previous holder meanwhile.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.fd = fd
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Store:
    """The partial results of one job (see the module docstring)."""

    def __init__(self, output: Path, manifest: dict[str, Any]) -> None:
        self.output = output
        self.folder = output.with_name(output.name + ".partial")
        self.manifest = {"store_version": STORE_VERSION, **manifest}

    @property
    def exists(self) -> bool:
        return self.folder.exists()

    def check_resumable(self) -> None:
        """Refuse to resume a run whose numbers would differ; say what changed, old and new."""
        try:
            found = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UsageError(
                f"{self.folder} holds no readable manifest; it is not a run that can be resumed: use --overwrite"
            ) from None
        changed = []
        for key in sorted(found.keys() | self.manifest.keys()):
            old, new = found.get(key), self.manifest.get(key)
            if old != new:
                changed.append(f"{key}: was {_short(old)}, now {_short(new)}")
        if changed:
            raise UsageError(
                f"cannot resume {self.folder}: what decides the numbers changed since it began:\n  "
                + "\n  ".join(changed)
                + "\nrun with the settings it began with, or start over with --overwrite"
            )

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def chunk_files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz")) if self.exists else []

    def save(self, chunk: Chunk) -> None:
        """Write a chunk, flushed to disk; the first one creates the store."""
        if not self.exists:
            self.folder.mkdir(parents=True)
            atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")
        number = max((int(f.stem.split("-")[1]) for f in self.chunk_files()), default=-1) + 1
        arrays = {
            "indices": np.asarray(chunk.indices, dtype=np.int64),
            "grids": np.asarray(chunk.grids, dtype=np.int64).reshape(-1, 2),
            "failed": np.asarray([i for i, _ in chunk.failures], dtype=np.int64),
            "reasons": np.asarray([r for _, r in chunk.failures], dtype=str).reshape(-1),
            "stat_index": np.asarray(list(chunk.stats), dtype=np.int64),
            "stat_value": np.asarray(list(chunk.stats.values()), dtype=np.int64).reshape(-1, 2),
        }
        for j, array in enumerate(chunk.features):
            arrays[f"f{j}"] = array
        with atomic_path(self.folder / f"chunk-{number:06d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        fsync_dir(self.folder)

    def load(self, paths: list[str]) -> tuple[list[Chunk], list[str]]:
        """The chunks that are whole and whose inputs are unchanged, and a note for each one that is
        not (it is deleted, so that its inputs are done again)."""
        kept, notes = [], []
        for file in self.chunk_files():
            chunk = _read_chunk(file)
            if chunk is None:
                notes.append(f"{file.name} was damaged (an interrupted write?); its images are done again")
                file.unlink()
                continue
            changed = [
                paths[i] for i, st in chunk.stats.items() if i < len(paths) and input_stat(paths[i]) != tuple(st)
            ]
            if changed:
                shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                notes.append(f"{shown} changed since the run began; done again")
                file.unlink()
                continue
            kept.append(chunk)
        return kept, notes


def _read_chunk(file: Path) -> Chunk | None:
    try:
        with np.load(file, allow_pickle=False) as data:
            indices = [int(i) for i in data["indices"]]
            features = [data[f"f{j}"] for j in range(len(indices))]
            grids = [tuple(int(g) for g in grid) for grid in data["grids"]]
            failures = [(int(i), str(r)) for i, r in zip(data["failed"], data["reasons"])]
            stats = {int(i): tuple(int(v) for v in st) for i, st in zip(data["stat_index"], data["stat_value"])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if len(grids) != len(indices):
        return None
    return Chunk(indices, features, grids, failures, stats)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
