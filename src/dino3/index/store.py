"""The index on disk: SQLite holds what the index is; immutable .npy files hold the vectors.

    DIR/index.sqlite3    the commit point: settings, one row per image, the list of vector files
    DIR/vectors/*.npy    float32 (n, D) unit vectors, written once and never changed
    DIR/ann/*            the approximate index (see ann.py) when the index is large: the graph
                         (.faiss) and the item id of each of its vectors (.ids.npy)
    DIR/work/            the embedding job of a build or add in progress (resumed by the next one)
    DIR/index.lock       held while a build or add writes (one writer at a time)

Why the split: SQLite gives atomic, durable transactions (a writer killed at any instant leaves the
previous state, rolled back from the journal at the next open) and the path lookups of `add`; but
it reads large blobs at ~200 MB/s (measured: 6-10 s for 1M 384-d vectors), so the vectors live in
.npy files that are memory-mapped in no time. A vector file or approximate index is written under a
temporary name, flushed to disk and renamed into place before the transaction that names it, and
never changed after; files that no committed state names (left by a killed writer, or replaced by a
compaction), and the temporary files of a killed writer (`.NAME.<pid>.<hex>.tmp`, a SQLite journal
beside a temporary database), are deleted by the next writer. The transaction is thus the one step
that changes an index, and a reader always sees one whole state: it maps the files it needs inside
its read transaction, during which no writer can commit.

Each build gets a random `build` token, and its item ids start after those of the index it replaces
(`index build --overwrite`). An opened index checks the token whenever it reads item rows, so that it
never pairs its vectors with the rows of another build (StaleIndexError; `Index.refresh()` reopens).

Tables:
    meta(key, value)        JSON values: format, versions, build, generation, embedding settings,
                            dim, next_id, ann
    items(id, path, size, mtime_ns, sha256, grid_h, grid_w)    one row per image; ids never reused
    segments(name, ids)     each vector file, with the item id of each of its rows (an int64 blob)
    tombstones(id)          removed items whose rows are still in a vector file (until compaction)

For FAISS users: the graph file `ann/*.faiss` is a plain `faiss.IndexHNSWFlat` (inner product) whose
labels are positions in `ann/*.ids.npy` (the item id of each). An HNSW graph cannot drop a vector, so
it still holds removed images (their ids are in `tombstones` until the vector files are merged, and
never again in `items`), and dino3 filters them out of every search: a program that searches the
graph with FAISS itself must keep only the ids that `items` lists. The graph is built again once a
quarter of it is removed, and holds no image added after it was written (ids above `ann.max_id`,
which dino3 searches exactly beside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, fsync_dir
from .._version import __version__
from ..errors import BadIndexError, StaleIndexError, UsageError

FORMAT = 1  # the index format this dino3 reads and writes; raise it on any incompatible change
DB_NAME = "index.sqlite3"
VECTORS, ANN, WORK = "vectors", "ann", "work"
REQUIRED_META = {"format": int, "dim": int, "embedding": dict, "next_id": int, "generation": int}
LEFTOVER = re.compile(r"\..+\.\d+\.[0-9a-f]+\.tmp(-journal|-wal|-shm)?")  # a killed writer's temporary file

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    grid_h INTEGER NOT NULL,
    grid_w INTEGER NOT NULL
);
CREATE INDEX items_by_sha256 ON items (sha256);
CREATE TABLE segments (name TEXT PRIMARY KEY, ids BLOB NOT NULL);
CREATE TABLE tombstones (id INTEGER PRIMARY KEY);
"""


@dataclass(frozen=True)
class Entry:
    """What the index knows of one image (besides its vector)."""

    id: int
    path: str
    size: int  # bytes; -1 for a URL
    mtime_ns: int  # -1 for a URL
    sha256: str | None  # of the file's bytes; None for a URL
    grid: tuple[int, int]  # the patch grid the image was embedded at


@dataclass
class Segment:
    name: str
    vectors: np.ndarray  # (n, D) float32, memory-mapped
    ids: np.ndarray  # (n,) int64, the item of each row
    alive: np.ndarray | None  # (n,) bool, or None when every row is alive


@dataclass
class State:
    """One committed state of an index, as a reader sees it."""

    folder: Path
    meta: dict[str, Any]
    segments: list[Segment]
    tombstones: np.ndarray  # (t,) int64
    count: int  # live items
    ann_file: Any = None  # the approximate index's graph file, opened inside the read transaction
    ann_ids: np.ndarray | None = None  # and the item id of each of its vectors (mapped)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def build(self) -> str | None:
        """The build's random token (None in an index written before dino3 recorded one)."""
        return self.meta.get("build")

    @property
    def identity(self) -> tuple[str | None, int]:
        """(build, generation): changes with every committed change to the index."""
        return (self.build, int(self.meta["generation"]))

    def blocks(self, rows: int = 32768) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(vectors (m, D), ids (m,), alive (m,) or None) in pieces of at most `rows` rows."""
        for segment in self.segments:
            for start in range(0, len(segment.ids), rows):
                end = start + rows
                alive = None if segment.alive is None else segment.alive[start:end]
                yield segment.vectors[start:end], segment.ids[start:end], alive

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All live vectors in memory, (N, D) float32, and their ids (N,), in storage order."""
        vectors = np.empty((self.count, self.dim), np.float32)
        ids = np.empty(self.count, np.int64)
        at = 0
        for block, block_ids, alive in self.blocks():
            if alive is not None:
                block, block_ids = block[alive], block_ids[alive]
            vectors[at : at + len(block_ids)] = block
            ids[at : at + len(block_ids)] = block_ids
            at += len(block_ids)
        return vectors, ids

    def live_ids(self) -> np.ndarray:
        """The ids of the live items, in storage order (which is id order)."""
        parts = [s.ids if s.alive is None else s.ids[s.alive] for s in self.segments]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def close(self) -> None:
        if self.ann_file is not None:
            self.ann_file.close()
            self.ann_file = None


def db_path(folder: Path) -> Path:
    return Path(folder) / DB_NAME


def connect(folder: Path, shared: bool = False) -> sqlite3.Connection:
    """A connection to an existing index (never creates one). Read-write when the folder allows, so
    that a transaction left by a killed writer can be rolled back by whoever opens the index next.
    shared: usable from several threads (the caller then lets one use it at a time)."""
    path = db_path(folder)
    if not Path(folder).exists():
        raise UsageError(f"{folder}: no such index folder (create one with `dino3 index build`)")
    if not path.is_file():
        raise BadIndexError(
            f"{folder} holds no dino3 index ({DB_NAME} is missing): give the folder of an index, or build one "
            "with `dino3 index build`"
            + ("; a build is running there or was interrupted (run it again to continue)" if _has_work(folder) else "")
        )
    uri = path.resolve().as_uri()
    mode = "rw" if os.access(path, os.W_OK) and os.access(folder, os.W_OK) else "ro"
    try:
        con = sqlite3.connect(
            f"{uri}?mode={mode}", uri=True, timeout=60, isolation_level=None, check_same_thread=not shared
        )
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        raise BadIndexError(f"{path} is damaged ({e}); build the index again with `dino3 index build`") from None
    return con


def _has_work(folder: Path) -> bool:
    return (Path(folder) / WORK).is_dir()


def read_meta(con: sqlite3.Connection, folder: Path) -> dict[str, Any]:
    try:
        meta = {key: json.loads(value) for key, value in con.execute("SELECT key, value FROM meta")}
    except (sqlite3.DatabaseError, ValueError) as e:
        raise BadIndexError(
            f"{folder}/{DB_NAME} is not a dino3 index or is damaged ({e}); build it again with `dino3 index build`"
        ) from None
    check_format(meta, folder)
    for key, kind in REQUIRED_META.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "is missing" if key not in meta else f"is {value!r}"
            raise BadIndexError(f"{folder}/{DB_NAME} is damaged: its setting {key!r} {what}; build the index again")
    missing = [k for k in ("model", "pool", "processor") if k not in meta["embedding"]]
    if missing or meta["dim"] < 1:
        raise BadIndexError(
            f"{folder}/{DB_NAME} is damaged: its embedding settings lack {', '.join(missing) or 'a dimension'}; "
            "build the index again"
        )
    return meta


def check_format(meta: dict[str, Any], folder: Path) -> None:
    found, writer = meta.get("format"), meta.get("dino3_version", "an unknown version")
    if found == FORMAT:
        return
    if isinstance(found, int) and found > FORMAT:
        raise BadIndexError(
            f"{folder} was written by dino3 {writer} in index format {found}; this dino3 ({__version__}) reads "
            f"format {FORMAT}: upgrade dino3, or build a new index with this one"
        )
    raise BadIndexError(
        f"{folder} was written by dino3 {writer} in index format {found!r}; this dino3 ({__version__}) reads format "
        f"{FORMAT}: build the index again with `dino3 index build` (the images are embedded again)"
    )


def read_state(folder: Path, con: sqlite3.Connection | None = None) -> State:
    """The committed state of the index in `folder`, its vector files mapped (see the module docstring)."""
    folder = Path(folder)
    own = con is None
    con = con or connect(folder)
    ann_file = None
    try:
        with reading(con, folder):
            meta = read_meta(con, folder)
            tombstones = np.fromiter((r[0] for r in con.execute("SELECT id FROM tombstones")), np.int64)
            segments = [
                _map_segment(folder, name, _ids(ids, folder, name), int(meta["dim"]), tombstones)
                for name, ids in con.execute("SELECT name, ids FROM segments ORDER BY rowid")
            ]
            count = con.execute("SELECT count(*) FROM items").fetchone()[0]
            ann_ids = None
            if meta.get("ann"):
                ann_file, ann_ids = _open_ann(folder, meta["ann"])
        live = sum(len(s.ids) if s.alive is None else int(s.alive.sum()) for s in segments)
        if live != count:
            raise BadIndexError(
                f"{folder} is inconsistent: {count} images listed but {live} live vectors stored; build the index again"
            )
    except BaseException:
        if ann_file is not None:
            ann_file.close()
        raise
    finally:
        if own:
            con.close()
    return State(folder, meta, segments, tombstones, count, ann_file, ann_ids)


def read_current(folder: Path, attempts: int = 3) -> State:
    """read_state, again when the index was built again meanwhile (`index build --overwrite` replaces
    the database, then deletes the old one's files, which a reader of the old one may not have mapped
    yet): damage seen while the database file changed is that, not damage."""
    for attempt in range(attempts):
        before = file_identity(folder)
        try:
            return read_state(folder)
        except BadIndexError:
            if attempt == attempts - 1 or file_identity(folder) == before:
                raise
    raise AssertionError("unreachable")


def file_identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the database file: another one once a build replaced it."""
    try:
        st = os.stat(db_path(folder))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def read_identity(con: sqlite3.Connection) -> tuple[str | None, int | None]:
    """(build, generation) of the committed state, in one small query (see State.identity)."""
    query = "SELECT key, value FROM meta WHERE key IN ('build', 'generation')"
    try:
        found = {key: json.loads(value) for key, value in con.execute(query)}
    except ValueError as e:
        raise sqlite3.DatabaseError(str(e)) from None
    return (found.get("build"), found.get("generation"))


def check_build(con: sqlite3.Connection, folder: Path, build: str | None) -> None:
    """Refuse to read item rows of another build than `build` (inside the caller's read transaction)."""
    if read_identity(con)[0] != build:
        raise StaleIndexError(
            f"the index {folder} was built again since it was opened (`dino3 index build --overwrite`): its "
            "vectors and item ids are another index's now; reopen it (Index.refresh(), or dino3.index.open)"
        )


@contextlib.contextmanager
def reading(con: sqlite3.Connection, folder: Path) -> Iterator[sqlite3.Connection]:
    """One read transaction (no writer can commit meanwhile), SQLite's errors given as BadIndexError."""
    try:
        con.execute("BEGIN")
        try:
            yield con
        finally:
            con.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise BadIndexError(f"{folder}/{DB_NAME} is damaged ({e}); build the index again") from None


def _ids(blob: Any, folder: Path, name: str) -> np.ndarray:
    if not isinstance(blob, bytes) or len(blob) % 8:
        raise BadIndexError(f"{folder}/{DB_NAME} is damaged: the ids of {VECTORS}/{name} are cut; build it again")
    return np.frombuffer(blob, np.int64)


def _open_ann(folder: Path, info: Any) -> tuple[Any, np.ndarray]:
    """The approximate index's graph file (kept open: see State) and its ids (mapped), checked."""
    where = f"{folder}: the approximate index in {ANN}/"
    try:
        count = int(info["count"])
        ids = np.load(folder / ANN / info["ids_file"], mmap_mode="r", allow_pickle=False)
        file = open(folder / ANN / info["file"], "rb")  # noqa: SIM115  (kept open: see State)
    except (OSError, KeyError, TypeError, ValueError, EOFError) as e:
        raise BadIndexError(f"{where} cannot be read ({e}); build the index again") from None
    size = os.fstat(file.fileno()).st_size
    if info.get("bytes") is not None and size != info["bytes"]:
        file.close()
        raise BadIndexError(
            f"{where} is damaged: {info['file']} holds {size} bytes, not the {info['bytes']} written; build it again"
        )
    if ids.dtype != np.int64 or ids.shape != (count,):
        file.close()
        raise BadIndexError(
            f"{where} is damaged: {info['ids_file']} holds {ids.dtype} {ids.shape}, expected int64 ({count},); "
            "build the index again"
        )
    return file, ids


def _map_segment(folder: Path, name: str, ids: np.ndarray, dim: int, tombstones: np.ndarray) -> Segment:
    path = folder / VECTORS / name
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadIndexError(
            f"{folder}: the vector file {VECTORS}/{name} is missing or damaged ({e}); build the index again"
        ) from None
    if vectors.dtype != np.float32 or vectors.shape != (len(ids), dim):
        raise BadIndexError(
            f"{folder}: the vector file {VECTORS}/{name} holds {vectors.dtype} {vectors.shape}, "
            f"expected float32 ({len(ids)}, {dim}); build the index again"
        )
    if len(ids):  # a few rows, in no time: a file of zeros or NaN (damaged, or written by hand) is refused
        sample = np.asarray(vectors[np.unique([0, len(ids) // 2, len(ids) - 1])], dtype=np.float64)
        norms = np.linalg.norm(sample, axis=1)
        if not (np.isfinite(norms).all() and np.all(np.abs(norms - 1) < 1e-3)):
            raise BadIndexError(
                f"{folder}: the vector file {VECTORS}/{name} holds vectors that are not unit length (NaN, zeros or "
                "other numbers than dino3 writes): it is damaged; build the index again"
            )
    alive = np.isin(ids, tombstones, invert=True) if len(tombstones) else None
    if alive is not None and alive.all():
        alive = None
    return Segment(name, vectors, ids, alive)


def entries(con: sqlite3.Connection, ids: Sequence[int] | None = None) -> list[Entry]:
    """The entries of these item ids (in that order; missing ones left out), or of all items by id."""
    query = "SELECT id, path, size, mtime_ns, sha256, grid_h, grid_w FROM items"
    if ids is None:
        rows = con.execute(query + " ORDER BY id").fetchall()
        return [Entry(r[0], r[1], r[2], r[3], r[4], (r[5], r[6])) for r in rows]
    found: dict[int, Entry] = {}
    unique = list(dict.fromkeys(int(i) for i in ids))
    for start in range(0, len(unique), 500):  # SQLite's limit on the number of parameters
        part = unique[start : start + 500]
        marks = ",".join("?" * len(part))
        for r in con.execute(f"{query} WHERE id IN ({marks})", part):
            found[r[0]] = Entry(r[0], r[1], r[2], r[3], r[4], (r[5], r[6]))
    return [found[int(i)] for i in ids if int(i) in found]


# -- writing (the caller holds the index's writer lock) --------------------------------------------------------
def create(folder: Path, meta: dict[str, Any], rows: Sequence[Entry], segment: str, first: int) -> None:
    """Write a whole new index database whose items are `rows`, with ids from `first` on (see
    `first_id`), their vectors the rows of the vector file `segment` (written already): made under a
    temporary name and renamed into place, so that a folder never holds half a database and an index
    there before stays whole until that instant. `meta` holds the embedding settings, dim and ann;
    the format, version and a new build token are added here."""
    meta = {"format": FORMAT, "dino3_version": __version__, "generation": 1, **meta, "build": secrets.token_hex(8)}
    meta["next_id"] = first
    with atomic_path(db_path(folder)) as tmp:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.executescript(SCHEMA)
            with transaction(con):
                set_meta(con, **meta)
                insert_items(con, meta, rows, segment)
        finally:
            con.close()


def first_id(folder: Path) -> int:
    """The first item id of a new build in `folder`: after those of the index it replaces, if any,
    so that an id never names two images of one folder (a server's thumbnail link stays right)."""
    if not db_path(folder).is_file():
        return 1
    try:
        con = connect(Path(folder))
        try:
            found = con.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
        finally:
            con.close()
        return max(1, int(json.loads(found[0])))
    except (sqlite3.DatabaseError, BadIndexError, TypeError, ValueError):  # the index replaced is damaged
        return 1


def leftovers(folder: Path) -> list[Path]:
    """The temporary files that a killed writer left in the index folder (a database being made, its
    journal; vector and graph files being written: see LEFTOVER)."""
    folder = Path(folder)
    found = []
    for sub in (folder, folder / VECTORS, folder / ANN):
        with contextlib.suppress(OSError):
            found += [f for f in sub.iterdir() if LEFTOVER.fullmatch(f.name) and f.is_file()]
    return found


def remove_leftovers(folder: Path) -> None:
    """Delete what `leftovers` finds (the caller holds the writer lock: no writer is alive to own them)."""
    for file in leftovers(folder):
        with contextlib.suppress(OSError):
            file.unlink()


def write_vectors(folder: Path, vectors: np.ndarray, generation: int) -> str:
    """A new vector file holding `vectors` (n, D) float32, flushed to disk; returns its name."""
    name = f"{generation:08d}-{secrets.token_hex(4)}.npy"
    with atomic_path(Path(folder) / VECTORS / name) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
    return name


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: all of it is committed, or none of it."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def set_meta(con: sqlite3.Connection, **values: Any) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])


def remove_items(con: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Remove items; their vectors stay in their files, marked dead, until a compaction."""
    rows = [(int(i),) for i in ids]
    con.executemany("DELETE FROM items WHERE id = ?", rows)
    con.executemany("INSERT OR IGNORE INTO tombstones VALUES (?)", rows)


def insert_items(con: sqlite3.Connection, meta: dict[str, Any], rows: Sequence[Entry], segment: str) -> np.ndarray:
    """Insert items (their `id` fields are ignored) whose vectors are the rows of the vector file
    `segment`, in order; returns the new ids."""
    first = int(meta["next_id"])
    ids = np.arange(first, first + len(rows), dtype=np.int64)
    con.executemany(
        "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(int(i), e.path, e.size, e.mtime_ns, e.sha256, e.grid[0], e.grid[1]) for i, e in zip(ids, rows)],
    )
    con.execute("INSERT INTO segments VALUES (?, ?)", (segment, ids.tobytes()))
    meta["next_id"] = first + len(rows)
    set_meta(con, next_id=meta["next_id"])
    return ids


def update_stats(con: sqlite3.Connection, stats: Sequence[tuple[int, int, int]]) -> None:
    """(id, size, mtime_ns) of items whose file was touched but whose bytes are the same."""
    con.executemany("UPDATE items SET size = ?, mtime_ns = ? WHERE id = ?", [(s, m, i) for i, s, m in stats])


def replace_segments(con: sqlite3.Connection, segment: str, ids: np.ndarray) -> None:
    """A compaction: one vector file holding every live vector replaces all others; no tombstones."""
    con.execute("DELETE FROM segments")
    con.execute("DELETE FROM tombstones")
    con.execute("INSERT INTO segments VALUES (?, ?)", (segment, np.asarray(ids, np.int64).tobytes()))


def collect_garbage(folder: Path, con: sqlite3.Connection) -> None:
    """Delete the files that the committed state does not name (a killed writer's, replaced ones),
    and a killed writer's temporary files."""
    folder = Path(folder)
    remove_leftovers(folder)
    keep = {name for (name,) in con.execute("SELECT name FROM segments")}
    ann = json.loads(con.execute("SELECT value FROM meta WHERE key = 'ann'").fetchone()[0])
    if ann:
        keep.update((ann["file"], ann["ids_file"]))
    for sub in (VECTORS, ANN):
        removed = False
        for file in (folder / sub).glob("*"):
            if file.name not in keep and file.is_file():
                with contextlib.suppress(OSError):
                    file.unlink()
                    removed = True
        if removed:
            fsync_dir(folder / sub)
