"""An index of image embeddings: build it, add to it, search it, find its near-duplicates.

Images are embedded by the embed engine (`dino3.embed.run`: inputs, decoding threads, failures
listed, resumable) into a temporary file in the index folder, then stored (see store.py) as unit
vectors, so that a dot product is the cosine. The index keeps what made its vectors: the model's
identity, the pooling and the preprocessing. Queries are embedded exactly so, and a model whose
identity differs (other weights, other config) is refused with what differs.

Search is exact (matrix products in pieces, exact.py) while the vectors take at most EXACT_LIMIT
floats; a larger index keeps an approximate index (ann.py) and searches with it. Either can be asked
for; both give the same results format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import UsageError
from . import store
from .store import Entry, State

EXACT_LIMIT = 20_000_000  # floats (images x dim), 80 MB: exact search up to here (52k 384-d images)
DEDUP_EXACT_LIMIT = 20_000  # images: exact all-pairs dedup up to here, the approximate index beyond
MAX_SEGMENTS = 32  # vector files before a compaction merges them into one
COMPACT_DEAD_FRACTION = 0.25  # dead rows in the vector files before a compaction
RECENT_FRACTION = 0.01  # images added since the graph was written (searched exactly) before they join it
REBUILD_DEAD_FRACTION = 0.25  # removed items in the graph before it is built again
INDEX_POOLS = ("cls", "mean", "cls+mean")  # one vector per image
URL_PREFIXES = ("http://", "https://")
OWN_NAMES = {store.VECTORS, store.ANN, store.WORK, "index.lock"}  # what an index folder holds besides its database

# The settings of an embeddings file that decide its numbers: what must agree to be in one index.
DECIDING = ("model_identity", "pool", "layers", "processor", "dtype", "quantize", "backend", "precision", "calibration")


@dataclass
class Update:
    """What a build or add did."""

    folder: Path
    count: int = 0  # images in the index afterwards
    added: int = 0  # images new to the index
    replaced: int = 0  # changed files, embedded again
    unchanged: int = 0  # files as they were
    touched: int = 0  # files with a new modification time but the same bytes (not embedded again)
    reused: int = 0  # vectors taken from an indexed file with the same bytes, not embedded again
    dropped: int = 0  # files gone from the disk, removed from the index
    embedded: int = 0  # images that went through the model
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    ignored: int = 0  # files without an image suffix in the folders given
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# -- opening --------------------------------------------------------------------------------------------
def open_index(folder: str | os.PathLike) -> Index:
    """The index in `folder`, as it is now (a later add by someone else is seen by opening it again)."""
    folder = Path(folder)
    return Index(folder, store.read_state(folder))


class Index:
    """An opened index; see the module docstring. Safe to search from several threads."""

    def __init__(self, folder: Path, state: State) -> None:
        self.folder = folder
        self._state = state
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}  # loaded once per device, for the queries
        self._ann = None
        self._db = None  # a connection for the paths of results, opened on first use

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        return (
            f"<dino3 index {self.folder}: {len(self)} images, {self.settings['model']}, pool {self.settings['pool']}>"
        )

    @property
    def settings(self) -> dict[str, Any]:
        """How the vectors were made: model, model_identity, pool, processor, dtype, ..."""
        return self._state.meta["embedding"]

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def approximate(self) -> bool:
        """Whether the index keeps an approximate index (and searches with it by default)."""
        return bool(self._state.meta.get("ann"))

    def info(self) -> dict[str, Any]:
        meta = self._state.meta
        return {
            "folder": str(self.folder),
            "images": len(self),
            "dim": self.dim,
            "model": self.settings["model"],
            "pool": self.settings["pool"],
            "processor": self.settings["processor"],
            "format": meta["format"],
            "dino3_version": meta.get("dino3_version"),
            "approximate_index": meta.get("ann"),
            "vector_files": len(self._state.segments),
        }

    def entries(self) -> list[Entry]:
        """Every image's entry, in the order of `vectors()`."""
        return self._entries(self._state.live_ids().tolist())

    def vectors(self) -> np.ndarray:
        """Every image's unit vector, (N, D) float32, in the order of `entries()`."""
        return self._state.live_vectors()[0]

    def close(self) -> None:
        self._state.close()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- search ---------------------------------------------------------------------------------------
    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        exact: bool | None = None,
        model: Any = None,
        device: str | None = None,
        batch_size: int = 16,
        workers: int = 2,
        on_error: Callable[[int, Any, Exception], None] | None = None,
    ) -> list[dict[str, Any]]:
        """The k nearest images of each query, best first:
        [{"query": name, "neighbors": [{"id": item, "path": p, "score": cosine}, ...]}, ...].

        queries: image paths, folders, globs, URLs, PIL images, image arrays (a list of them, or one),
            or vectors: a float array or tensor of shape (D,) or (Q, D) (an image array must then be
            put in a list). Images are embedded as the indexed ones were, with the index's model or
            `model`: a loaded model, or where the index's model lies now if it moved (either refused
            if it computes other numbers). An image that cannot be read raises its
            ImageError, unless `on_error(position, source, error)` is given: it is then left out.
        exact: True for the exact search, False for the approximate one; None: the index's default.
        """
        k = self._check_k(k)
        if _is_vectors(queries):
            vectors = _as_vectors(queries, self.dim)
            names = [f"vector {i}" for i in range(len(vectors))]
        else:
            vectors, names = self.embed(
                queries, model=model, device=device, batch_size=batch_size, workers=workers, on_error=on_error
            )
        if len(vectors) == 0:
            return []
        scores, ids = self.nearest(vectors, k, exact=exact)
        paths = self._paths(np.unique(ids[ids >= 0]))
        return [
            {
                "query": name,
                "neighbors": [
                    {"id": int(i), "path": paths[int(i)], "score": round(float(s), 6)}
                    for s, i in zip(row_s, row_i)
                    if int(i) in paths  # -1: none found; an item removed since the index was opened
                ],
            }
            for name, row_s, row_i in zip(names, scores, ids)
        ]

    def nearest(self, vectors: np.ndarray, k: int, exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest items of each vector (Q, D), best first; id -1: none found."""
        k = self._check_k(k)
        queries = _unit(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))
        use_exact = (not self.approximate) if exact is None else exact
        if use_exact:
            from .exact import top_k

            return top_k(queries, self._state.blocks, k)
        return self._approximate().search(queries, k)

    def embed(
        self,
        images: Any,
        *,
        model: Any = None,
        device: str | None = None,
        batch_size: int = 16,
        workers: int = 2,
        on_error: Callable[[int, Any, Exception], None] | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """Images -> their unit vectors (Q, D), made exactly as the indexed images' were, and their
        names (the images that failed, reported to on_error, are left out)."""
        from ..features import extract
        from ..pipeline import iter_batches
        from ..processing import DINOv3ViTImageProcessor

        sources, names = _sources(images)
        model = self._query_model(model, device)
        processor = DINOv3ViTImageProcessor.from_dict(self.settings["processor"])
        found: dict[int, np.ndarray] = {}
        for batch in iter_batches(sources, processor, batch_size, workers, on_error=on_error):
            values, _ = extract(model, batch.pixel_values, self.settings["pool"])  # (B, D)
            values = values.float().cpu().numpy().reshape(len(batch.indices), -1)
            for row, position in enumerate(batch.indices):
                found[position] = values[row]
        order = sorted(found)
        vectors = np.stack([found[i] for i in order]) if order else np.zeros((0, self.dim), np.float32)
        return _unit(vectors), [names[i] for i in order]

    def _query_model(self, model: Any, device: str | None) -> Any:
        if isinstance(model, (str, os.PathLike)):  # where the index's model lies now, when it has moved
            with self._lock:
                key = f"{os.fspath(model)}|{device}"
                if key not in self._models:
                    self._models[key] = load_model(self.settings, self.folder, device, name=os.fspath(model))
                return self._models[key]
        if model is not None:
            check_model(model, self.settings, self.folder)
            return model
        with self._lock:
            key = str(device)
            if key not in self._models:
                self._models[key] = load_model(self.settings, self.folder, device=device)
            return self._models[key]

    def _approximate(self):
        """The approximate search as of this state: the graph on disk, its removed items filtered out,
        and what was added since it was written searched exactly beside it (or, for an index without
        a graph, one built now)."""
        from .ann import HNSW, Approximate

        with self._lock:
            if self._ann is None:
                info, state = self._state.meta.get("ann"), self._state
                if info:
                    graph = HNSW.read(state.ann_file, state.ann_ids, info)
                    graph.keep_only(state.live_ids())
                    recent, recent_ids = live_after(state, int(info["max_id"]))
                else:
                    vectors, ids = state.live_vectors()
                    graph = HNSW.build(vectors, ids)
                    recent, recent_ids = np.zeros((0, state.dim), np.float32), np.zeros(0, np.int64)
                self._ann = Approximate(graph, recent, recent_ids)
            return self._ann

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UsageError(f"k must be a whole number >= 1, got {k!r}")
        if len(self) == 0:
            raise UsageError(f"the index {self.folder} holds no images; add some with `dino3 index add`")
        if k > len(self):
            raise UsageError(
                f"k={k} is more than the {len(self)} images in the index {self.folder}; ask for at most {len(self)}"
            )
        return int(k)

    def entry(self, item_id: int) -> Entry | None:
        """The entry of one item (the `id` a search gives), or None when the index holds no such item."""
        found = self._entries([int(item_id)])
        return found[0] if found else None

    def _paths(self, ids: np.ndarray) -> dict[int, str]:
        return {e.id: e.path for e in self._entries([int(i) for i in ids])}

    def _entries(self, ids: list[int]) -> list[Entry]:
        with self._lock:  # one thread at a time on the connection
            if self._db is None:
                self._db = store.connect(self.folder, shared=True)
            return store.entries(self._db, ids)

    # -- near-duplicates ------------------------------------------------------------------------------
    def dedup(self, threshold: float = 0.95, *, exact: bool | None = None) -> dict[str, Any]:
        """Groups of near-duplicates: {"threshold", "groups": [{"paths", "scores"}], "histogram"}; see dedup.py.
        Largest groups first; in a group the most central image first, each score its cosine to it."""
        from . import dedup

        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise UsageError(f"the threshold is a cosine in (0, 1], got {threshold!r}")
        if len(self) == 0:
            raise UsageError(f"the index {self.folder} holds no images; add some with `dino3 index add`")
        vectors, ids = self._state.live_vectors()
        use_exact = (len(self) <= DEDUP_EXACT_LIMIT) if exact is None else exact
        if use_exact:
            from .exact import pairs_above

            first, second, _, nearest = pairs_above(vectors, threshold)
        else:
            first, second, _, nearest = dedup.approximate_pairs(self._approximate(), vectors, ids, threshold)
        found = dedup.groups(vectors, ids, first, second)
        paths = self._paths(np.unique(np.concatenate([np.asarray(g.ids) for g in found]))) if found else {}
        out = [{"paths": [paths[i] for i in g.ids], "scores": [round(s, 6) for s in g.scores]} for g in found]
        out.sort(key=lambda g: (-len(g["paths"]), g["paths"][0]))
        return {
            "threshold": threshold,
            "images": len(self),
            "pairs": int(len(first)),
            "exact": bool(use_exact),
            "groups": out,
            "histogram": {"edges": list(dedup.HISTOGRAM_EDGES), "counts": dedup.histogram(nearest)},
        }

    # -- adding ---------------------------------------------------------------------------------------
    def add(
        self,
        inputs: Sequence[str],
        *,
        batch_size: int = 16,
        workers: int = 2,
        device: str | None = None,
        check_hash: bool = True,
        progress: bool = True,
        model: str | os.PathLike | None = None,
    ) -> Update:
        """Bring the index up to date with `inputs` (files, folders, globs, lists, URLs, or embeddings
        files): new and changed images are embedded (changed: other size or modification time, and
        other bytes), vectors of files with the same bytes as an indexed one are reused, and
        indexed files that are gone from the disk are dropped. One transaction: an add that is
        interrupted, even by SIGKILL, leaves the index as it was. `model`: where the index's model
        lies now, when it has moved (checked to be the same weights)."""
        update = _update(
            self.folder,
            inputs,
            model=os.fspath(model) if model is not None else None,
            batch_size=batch_size,
            workers=workers,
            device=device,
            check_hash=check_hash,
            progress=progress,
        )
        self.close()
        self._state = store.read_state(self.folder)
        self._ann = None
        return update


# -- building and updating ----------------------------------------------------------------------------------
def build(
    inputs: Sequence[str],
    model: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    *,
    pool: str = "cls",
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
    overwrite: bool = False,
    check_hash: bool = True,
    progress: bool = True,
) -> Update:
    """A new index in `folder` from images (embedded with `model`; the options are `dino3.embed.run`'s)
    or from `dino3 embed` outputs (which name their model). An interrupted build is continued by
    running it again; with overwrite=True, an index already in the folder is replaced, and stays
    usable until the new one is complete."""
    if folder is None:
        raise UsageError("give the index folder (--index DIR)")
    folder = Path(folder)
    if pool not in INDEX_POOLS:
        raise UsageError(f"an index holds one vector per image: pool must be one of {INDEX_POOLS}, got {pool!r}")
    files = _embedding_files(inputs)
    options = dict(
        pool=pool, size=size, keep_aspect=keep_aspect, target=target, fit=fit, max_side=max_side,
        jpeg_draft=jpeg_draft, dtype=dtype, device=device, quantize=quantize, backend=backend, precision=precision,
        calibration=calibration, batch_size=batch_size, workers=workers, resume=not overwrite, overwrite=overwrite,
        check_hash=check_hash, progress=progress,
    )  # fmt: skip
    if store.db_path(folder).exists() and not overwrite:
        raise UsageError(
            f"{folder} holds an index already: add images to it with `dino3 index add`, or pass --overwrite "
            "to build a new one in its place"
        )
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; give a folder for the index")
    if folder.is_dir() and not store.db_path(folder).exists():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in OWN_NAMES and not p.name.endswith(".tmp"))
        if foreign:
            raise UsageError(
                f"{folder} is not empty and holds no index ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): give a new or empty folder for the index"
            )
    started = time.perf_counter()
    update = Update(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _build_in(folder, files, model, inputs, update, options)
    except _NothingToIndex as e:  # nothing was made: leave no half-made folder behind
        shutil.rmtree(folder / store.WORK, ignore_errors=True)
        if created and not store.db_path(folder).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(str(e)) from None
    update.seconds = time.perf_counter() - started
    return update


class _NothingToIndex(Exception):
    pass


def _build_in(folder: Path, files, model, inputs, update: Update, options: dict[str, Any]) -> None:
    from ..embed import expand_inputs, run

    workers, calibration = options["workers"], options["calibration"]
    with _writer_lock(folder):
        if files:
            if model is not None:
                raise UsageError("embeddings files name the model that made them: give them without -m/--model")
            settings, rows, vectors = _ingest(files, update)
        else:
            if model is None:
                raise UsageError("give the model to embed the images with (-m/--model)")
            found = expand_inputs(list(inputs))
            paths = _unique_local(found.paths, update)
            if not paths:
                raise _NothingToIndex(found.none_found())
            update.ignored = found.ignored
            stats = _stats_and_hashes(paths, workers)
            work = folder / store.WORK
            output = work / "build.npz"
            if output.exists():  # an interrupted build, killed after its embedding: embed again
                output.unlink()
            result = run(_inputs(paths, found.skipped), model=model, output=output, **options)
            update.notes += result.notes
            update.failures = list(result.failures)
            if not result.count:
                raise _NothingToIndex(
                    "no image could be embedded, so there is nothing to index"
                    + "".join(f"\n  {p}: {r}" for p, r in update.failures[:10])
                    + (f"\n  ... and {len(update.failures) - 10} more" if len(update.failures) > 10 else "")
                )
            data = _read(output)
            settings = _settings(data.meta, calibration)
            rows = [Entry(0, p, *stats[p][:2], stats[p][2], _grid(g)) for p, g in zip(data.paths, data.grid_sizes)]
            vectors = _unit(_features(data, output))
            update.embedded = len(rows)
        if not rows:
            raise _NothingToIndex("the embeddings files hold no image, so there is nothing to index")
        _create(folder, settings, rows, vectors)
        update.added = update.count = len(rows)
        shutil.rmtree(folder / store.WORK, ignore_errors=True)


def _create(folder: Path, settings: dict[str, Any], rows: list[Entry], vectors: np.ndarray) -> None:
    """Write a whole new index: its vector file and approximate index, then its database under a
    temporary name, renamed into place (an index there before stays whole until that instant)."""
    from .._io import atomic_path

    (folder / store.VECTORS).mkdir(parents=True, exist_ok=True)
    (folder / store.ANN).mkdir(exist_ok=True)
    generation = 1
    segment = store.write_vectors(folder, vectors, generation)
    ids = np.arange(1, len(rows) + 1, dtype=np.int64)
    ann = None
    if vectors.size > EXACT_LIMIT:
        from .ann import HNSW

        ann = _write_ann(folder, HNSW.build(vectors, ids), int(ids.max()), generation)
    meta = {"format": store.FORMAT, "dino3_version": __version__, "generation": generation, "next_id": 1}
    meta.update(embedding=settings, dim=int(vectors.shape[1]), ann=ann)
    with atomic_path(store.db_path(folder)) as tmp:
        import sqlite3

        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.executescript(store.SCHEMA)
            with store.transaction(con):
                store.set_meta(con, **meta)
                store.insert_items(con, meta, rows, segment)
        finally:
            con.close()
    con = store.connect(folder)
    try:
        store.collect_garbage(folder, con)
    finally:
        con.close()


def _update(
    folder: Path, inputs: Sequence[str], *, batch_size, workers, device, check_hash, progress, model=None
) -> Update:
    from ..embed import expand_inputs, run

    started = time.perf_counter()
    update = Update(folder)
    files = _embedding_files(inputs)
    with _writer_lock(folder):
        con = store.connect(folder)
        try:
            state = store.read_state(folder, con)
            meta, settings = state.meta, state.meta["embedding"]
            known = {e.path: e for e in store.entries(con)}
            by_hash = {e.sha256: e for e in known.values() if e.sha256}

            # -- what is gone, what changed, what is new ------------------------------------------------
            removed: list[int] = []
            local = [e for e in known.values() if not e.path.startswith(URL_PREFIXES)]
            gone = [e for e in local if _is_gone(e.path)]
            if gone and len(gone) == len(local) and len(local) > 1:
                raise UsageError(
                    f"none of the {len(local)} files of the index {folder} exists any more (a disk not mounted? the "
                    "files moved?); nothing was changed. If they are really gone, build a new index"
                )
            removed += [e.id for e in gone]
            update.dropped = len(gone)
            if files:
                new_settings, candidates, candidate_vectors = _ingest(files, update)
                _check_same_settings(settings, new_settings, folder)
                fresh: list[Entry] = []
                fresh_vectors = []
                for row, vector in zip(candidates, candidate_vectors):
                    old = known.get(row.path)
                    if old is not None:
                        removed.append(old.id)
                        update.replaced += 1
                    else:
                        update.added += 1
                    fresh.append(row)
                    fresh_vectors.append(vector)
                vectors = np.stack(fresh_vectors) if fresh else np.zeros((0, state.dim), np.float32)
                touched: list[tuple[int, int, int]] = []
            else:
                found = expand_inputs(list(inputs))
                update.ignored = found.ignored
                update.failures += list(found.skipped)
                paths = _unique_local(found.paths, update)
                plan = _plan(paths, known, by_hash, workers, update)
                removed += plan.removed
                touched = plan.touched
                fresh, vectors = plan.reused, _vectors_of(state, plan.reused_from)
                if plan.todo:
                    work = folder / store.WORK
                    output = work / "add.npz"
                    options = replay_options(settings)
                    result = run(
                        _inputs(plan.todo, []),
                        model=model or settings["model"],
                        output=output,
                        batch_size=batch_size,
                        workers=workers,
                        device=device,
                        check_hash=check_hash,
                        progress=progress,
                        overwrite=True,
                        load=_checked_loader(settings, folder),
                        **options,
                    )
                    update.notes += result.notes
                    update.failures += list(result.failures)
                    data = _read(output)
                    stats = plan.stats
                    embedded = [
                        Entry(0, p, *stats[p][:2], stats[p][2], _grid(g)) for p, g in zip(data.paths, data.grid_sizes)
                    ]
                    fresh = fresh + embedded
                    vectors = np.concatenate([vectors, _unit(_features(data, output))]) if embedded else vectors
                    update.embedded = len(embedded)
                    failed = {p for p, _ in result.failures}
                    update.added -= len([p for p in plan.new if p in failed])
                    update.replaced -= len([p for p in plan.changed if p in failed])
            if vectors.shape[1:] != (state.dim,):
                raise UsageError(f"the new vectors have {vectors.shape[1:]} values, the index {state.dim}")

            # -- the one step that changes the index ------------------------------------------------------
            generation = int(meta["generation"]) + 1
            segment = store.write_vectors(folder, vectors, generation) if len(fresh) else None
            with store.transaction(con):
                store.remove_items(con, sorted(set(removed)))
                if segment is not None:
                    store.insert_items(con, meta, fresh, segment)
                store.update_stats(con, touched)
                store.set_meta(con, generation=generation, written_by=__version__)
            state.close()
            update.count = con.execute("SELECT count(*) FROM items").fetchone()[0]
            _maintain(folder, con)
            store.collect_garbage(folder, con)
        finally:
            con.close()
        shutil.rmtree(folder / store.WORK, ignore_errors=True)
    update.seconds = time.perf_counter() - started
    return update


@dataclass
class _Plan:
    todo: list[str] = field(default_factory=list)  # to embed
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # ids replaced
    touched: list[tuple[int, int, int]] = field(default_factory=list)  # (id, size, mtime_ns)
    reused: list[Entry] = field(default_factory=list)  # new rows whose vector is an indexed one's
    reused_from: list[int] = field(default_factory=list)  # ... that one's id
    stats: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)


def _plan(paths: list[str], known: dict[str, Entry], by_hash: dict[str, Entry], workers, update) -> _Plan:
    """Sort the inputs into unchanged, touched, changed and new (see Index.add)."""
    from ..embed.store import input_stat

    plan = _Plan()
    need_hash = []
    for path in paths:
        old = known.get(path)
        if old is not None and (path.startswith(URL_PREFIXES) or (old.size, old.mtime_ns) == input_stat(path)):
            update.unchanged += 1
        else:
            need_hash.append(path)
    plan.stats = _stats_and_hashes(need_hash, workers)
    for path in need_hash:
        size, mtime, digest = plan.stats[path]
        old = known.get(path)
        if old is not None and digest is not None and digest == old.sha256:
            plan.touched.append((old.id, size, mtime))
            update.touched += 1
            continue
        if old is not None:
            plan.removed.append(old.id)
            plan.changed.append(path)
            update.replaced += 1
        else:
            plan.new.append(path)
            update.added += 1
        twin = by_hash.get(digest) if digest else None  # the same bytes: the same vector, even if that file is gone
        if twin is not None:
            plan.reused.append(Entry(0, path, size, mtime, digest, twin.grid))
            plan.reused_from.append(twin.id)
            update.reused += 1
        else:
            plan.todo.append(path)
    return plan


def _maintain(folder: Path, con) -> None:
    """After a change: merge the vector files when there are many or they hold many dead rows; keep
    the approximate index's graph close to the index (built when the index grows past EXACT_LIMIT,
    extended when much was added since it was written, built again when many of its items were
    removed, dropped when the index shrinks below the limit)."""
    from .ann import HNSW

    state = store.read_state(folder, con)
    try:
        meta, info = state.meta, state.meta.get("ann")
        rows = sum(len(s.ids) for s in state.segments)
        compact = len(state.segments) > MAX_SEGMENTS or len(state.tombstones) > COMPACT_DEAD_FRACTION * max(rows, 1)
        want_ann = state.count * state.dim > EXACT_LIMIT
        live = state.live_ids()
        rebuild = extend = False
        if want_ann and info:
            max_id, in_graph = int(info["max_id"]), int(info["count"])
            dead = in_graph - int((live <= max_id).sum())  # every live id up to max_id is in the graph
            recent = int((live > max_id).sum())
            rebuild = dead > REBUILD_DEAD_FRACTION * in_graph
            extend = not rebuild and recent > RECENT_FRACTION * state.count
        elif want_ann:
            rebuild = True
        if not (compact or rebuild or extend or (info and not want_ann)):
            return
        generation = int(meta["generation"]) + 1
        segment, ann = None, info if want_ann else None
        if compact or rebuild:
            vectors, ids = state.live_vectors()
            if compact:
                segment = store.write_vectors(folder, vectors, generation)
            if rebuild:
                ann = _write_ann(folder, HNSW.build(vectors, ids), int(ids.max()), generation)
        elif extend:
            graph = HNSW.read(state.ann_file, state.ann_ids, info)
            added, added_ids = live_after(state, int(info["max_id"]))
            graph.add(added, added_ids)
            ann = _write_ann(folder, graph, max(int(info["max_id"]), *added_ids.tolist()), generation)
    finally:
        state.close()
    with store.transaction(con):
        if segment is not None:
            store.replace_segments(con, segment, ids)
        store.set_meta(con, ann=ann, generation=generation)


def _write_ann(folder: Path, graph, max_id: int, generation: int) -> dict[str, Any]:
    """Write the approximate index's graph, which holds every live item up to `max_id`; returns what
    the index records of it (`count`: the items in the graph, removed ones included)."""
    import secrets

    from .._io import atomic_path

    name = f"{generation:08d}-{secrets.token_hex(4)}"
    with (
        atomic_path(folder / store.ANN / f"{name}.faiss") as tmp,
        open(tmp, "wb") as file,
        atomic_path(folder / store.ANN / f"{name}.ids.npy") as ids_tmp,
        open(ids_tmp, "wb") as ids_file,
    ):
        graph.write(file, ids_file)
    info = {"file": f"{name}.faiss", "ids_file": f"{name}.ids.npy", "max_id": max_id, "count": graph.count}
    return {**graph.info(), **info}


# -- the model, and what must agree ------------------------------------------------------------------------
def replay_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The `dino3.embed.run` options that embed images as the index's were."""
    if settings.get("calibration") and not settings.get("calibration_paths"):
        raise UsageError(
            "the index was made with an OpenVINO int8 model calibrated on images it did not record; build it again"
        )
    options = {
        "pool": settings["pool"],
        "dtype": settings.get("dtype"),
        "quantize": settings.get("quantize"),
        "backend": settings.get("backend") or "torch",
        "precision": settings.get("precision"),
        "calibration": settings.get("calibration_paths"),
    }
    if options["backend"] != "torch":
        options["dtype"] = None
    processor = settings["processor"]
    options["jpeg_draft"] = bool(processor.get("jpeg_draft", False))
    options["max_side"] = processor.get("max_side")
    if processor.get("keep_aspect"):
        options.update(
            keep_aspect=processor["keep_aspect"], target=processor.get("target_size"), fit=processor.get("fit", "crop")
        )
    else:
        size = processor.get("size") or {}
        if size.get("height") is None or size.get("height") != size.get("width"):
            raise UsageError(f"the index's preprocessing (size {size}) cannot be made by `dino3 embed`; build it again")
        options["size"] = size["height"]
    return options


def load_model(
    settings: dict[str, Any], folder: Path, device: str | None = None, check_hash: bool = True, name: str | None = None
) -> Any:
    """The index's model, as it embedded the indexed images (from `name` when it lies elsewhere now);
    refused if it is not the same one."""
    from ..api import load

    options: dict[str, Any] = {"check_hash": check_hash}
    if (settings.get("backend") or "torch") == "torch":
        options.update(dtype=settings.get("dtype"), device=device, quantize=settings.get("quantize"))
    else:
        options.update(backend=settings["backend"], precision=settings.get("precision"))
        if settings.get("calibration_paths"):
            options["calibration"] = settings["calibration_paths"]
    recorded = settings["model"]
    if name is None and os.path.isabs(recorded) and not os.path.exists(recorded):
        raise UsageError(
            f"the index's model {recorded} is not there any more; give where it lies now (-m DIR, or model=...)"
        )
    model = load(name or recorded, **options)
    check_model(model, settings, folder)
    return model


def _checked_loader(settings: dict[str, Any], folder: Path):
    from ..api import load

    def checked(name, **options):
        model = load(name, **options)
        check_model(model, settings, folder)
        return model

    return checked


def check_model(model: Any, settings: dict[str, Any], folder: Path) -> None:
    """Refuse a model that is not the one that made the index's vectors, saying what differs."""
    from ..embed import model_identity
    from ..processing import MAX_SIDE, DINOv3ViTImageProcessor

    found = json.loads(json.dumps(model_identity(model), default=str))
    recorded = settings["model_identity"]
    if settings.get("model_fingerprint"):  # the weights by what they compute: wherever their files lie now
        recorded, found = dict(recorded), dict(found)
        recorded.pop("weight_files", None), found.pop("weight_files", None)
    differences = _differences(recorded, found)
    if not differences and settings.get("model_fingerprint"):
        from ..embed import model_fingerprint, same_fingerprint

        if not same_fingerprint(settings["model_fingerprint"], model_fingerprint(model)):
            differences = ["weights: the same architecture computes other numbers (other weights)"]
    if not differences:
        options = replay_options(settings)
        processing = {"jpeg_draft": options["jpeg_draft"], "max_side": options["max_side"] or MAX_SIDE}
        if options.get("keep_aspect"):
            processing.update(keep_aspect=options["keep_aspect"], target_size=options["target"], fit=options["fit"])
        else:
            processing["size"] = {"height": options["size"], "width": options["size"]}
        made = json.loads(json.dumps(DINOv3ViTImageProcessor.for_model(model, **processing).to_dict()))
        differences = [f"preprocessing {d}" for d in _differences(settings["processor"], made)]
    if differences:
        shown = "\n  ".join(differences[:12]) + (
            f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
        )
        raise UsageError(
            f"the index {folder} was built with another model than this one ({settings['model']} then); "
            f"what differs (index -> this model):\n  {shown}\n"
            "use the model the index was built with, or build a new index with this one"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def _settings(meta: dict[str, Any], calibration: Sequence[str] | None) -> dict[str, Any]:
    """What the index records of an embeddings file's settings."""
    settings = {key: meta.get(key) for key in ("model", "model_fingerprint", *DECIDING)}
    settings["calibration_paths"] = [str(c) for c in calibration] if calibration else None
    return settings


def _check_same_settings(old: dict[str, Any], new: dict[str, Any], where: Any) -> None:
    differences = [d for key in DECIDING for d in _differences({key: old.get(key)}, {key: new.get(key)})]
    if differences:
        raise UsageError(f"these embeddings were not made as those of {where}:\n  " + "\n  ".join(differences[:12]))


# -- inputs ---------------------------------------------------------------------------------------------------
def _embedding_files(inputs: Sequence[str]) -> list[str]:
    """The inputs when they are all `dino3 embed` outputs; [] when none is; mixing is refused."""
    from ..embed import OUTPUT_SUFFIXES

    inputs = [os.fspath(i) for i in inputs]
    files = [i for i in inputs if Path(i).suffix.lower() in OUTPUT_SUFFIXES and not i.startswith(URL_PREFIXES)]
    if files and len(files) != len(inputs):
        raise UsageError("give either images or `dino3 embed` outputs (.npz, .npy, .safetensors, .parquet), not both")
    return files


def _ingest(files: list[str], update: Update) -> tuple[dict[str, Any], list[Entry], np.ndarray]:
    """Rows and unit vectors of `dino3 embed` outputs (one vector per image, made with one model)."""
    settings = None
    rows: list[Entry] = []
    parts = []
    seen: set[str] = set()
    for file in files:
        data = _read(file)
        if "model_identity" not in data.meta or "processor" not in data.meta:
            raise UsageError(f"{file} does not record the model that made it (written by an older dino3?); embed again")
        if data.meta.get("pool") not in INDEX_POOLS or data.meta.get("layers") is not None:
            raise UsageError(
                f"{file} holds pool={data.meta.get('pool')!r}, layers={data.meta.get('layers')!r}: an index holds one "
                f"vector per image (pool {', '.join(INDEX_POOLS)}, no layers)"
            )
        if settings is None:
            settings = _settings(data.meta, None)
        else:
            _check_same_settings(settings, _settings(data.meta, None), files[0])
        features = _features(data, file)
        paths = [os.path.abspath(p) if not p.startswith(URL_PREFIXES) else p for p in data.paths]
        keep = [i for i, p in enumerate(paths) if not (p in seen or seen.add(p))]
        if len(keep) < len(paths):
            update.notes.append(f"{file}: {len(paths) - len(keep)} images listed twice; the first kept")
        stats = _stats_and_hashes([paths[i] for i in keep], 4)
        missing = sum(1 for i in keep if stats[paths[i]][0] < 0 and not paths[i].startswith(URL_PREFIXES))
        if missing:
            update.notes.append(f"{file}: {missing} of its images are not on this disk; `dino3 index add` drops them")
        for i in keep:
            size, mtime, digest = stats[paths[i]]
            rows.append(Entry(0, paths[i], size, mtime, digest, _grid(data.grid_sizes[i])))
        parts.append(features[keep])
    vectors = _unit(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)
    return settings, rows, vectors


def _read(path: str | os.PathLike):
    from ..embed import read_embeddings

    return read_embeddings(path)


def _features(data, where: Any) -> np.ndarray:
    features = np.asarray(data.features, dtype=np.float32)
    if features.ndim != 2 or data.offsets is not None:
        raise UsageError(f"{where}: features of shape {features.shape}; an index holds one vector per image")
    broken = np.flatnonzero(~np.isfinite(features).all(axis=1) | ~(np.abs(features).max(axis=1) > 0))
    if len(broken):  # such a vector has no direction: it would match nothing, silently
        named = ", ".join(str(data.paths[i]) for i in broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise UsageError(f"{where}: {len(broken)} vectors are zero or not finite (NaN or inf): {named}")
    return features


def _inputs(paths: list[str], skipped: list):
    from ..embed import Inputs

    return Inputs(paths=list(paths), skipped=list(skipped))


def _unique_local(paths: list[str], update: Update) -> list[str]:
    """Absolute paths (so that the index means the same from any folder), each once, in order."""
    out = list(dict.fromkeys(p if p.startswith(URL_PREFIXES) else os.path.abspath(p) for p in paths))
    if len(out) < len(paths):
        update.notes.append(f"{len(paths) - len(out)} inputs named an image already listed; each is indexed once")
    return out


def _is_gone(path: str) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False  # there, but not readable now: not dropped
    return False


def _stats_and_hashes(paths: list[str], workers: int) -> dict[str, tuple[int, int, str | None]]:
    """(size, mtime_ns, sha256) of each path, read before it is embedded; (-1, -1, None) for a URL or
    a file that cannot be read (the embedding then reports it)."""
    from ..embed.store import input_stat

    def one(path: str) -> tuple[int, int, str | None]:
        if path.startswith(URL_PREFIXES):
            return (-1, -1, None)
        size, mtime = input_stat(path)
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return (size, mtime, None)
        return (size, mtime, digest.hexdigest())

    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and file reads release the GIL
        return dict(zip(paths, pool.map(one, paths)))


def _grid(grid: Any) -> tuple[int, int]:
    h, w = (int(v) for v in np.asarray(grid).reshape(-1)[:2])
    return (h, w)


# -- vectors ------------------------------------------------------------------------------------------------
def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.size == 0:
        return vectors if vectors.ndim == 2 else np.zeros((len(vectors), 0), np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _is_vectors(queries: Any) -> bool:
    if isinstance(queries, np.ndarray):
        return queries.ndim <= 2 and np.issubdtype(queries.dtype, np.floating)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(queries, torch.Tensor) and queries.ndim <= 2 and queries.is_floating_point()


def _as_vectors(queries: Any, dim: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray):
        queries = queries.detach().float().cpu().numpy()
    vectors = np.asarray(queries, dtype=np.float32)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.shape[1] != dim:
        raise UsageError(f"query vectors have {vectors.shape[1]} values; the index's have {dim}")
    if not np.isfinite(vectors).all():
        raise UsageError("query vectors hold NaN or infinite values")
    return _unit(vectors)


def _sources(images: Any) -> tuple[list[Any], list[str]]:
    """The images to embed and their names: paths, folders and globs are expanded as the embed job's."""
    from ..embed import expand_inputs

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    sources, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            found = expand_inputs([os.fspath(item)])
            if found.skipped:
                name, why = found.skipped[0]
                from ..errors import ImageError

                raise ImageError(f"{name}: {why}")
            sources += found.paths
            names += found.paths
        else:
            sources.append(item)
            names.append(f"image {i}")
    return sources, names


def live_after(state: State, max_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The live vectors and ids with id > max_id (added since the approximate index was written)."""
    vectors, ids = [], []
    for block, block_ids, alive in state.blocks():
        keep = block_ids > max_id
        if alive is not None:
            keep &= alive
        if keep.any():
            vectors.append(np.asarray(block[keep]))
            ids.append(block_ids[keep])
    if not ids:
        return np.zeros((0, state.dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vectors), np.concatenate(ids)


def _vectors_of(state: State, wanted: list[int]) -> np.ndarray:
    """The vectors of these item ids, in that order (an id may be asked for more than once)."""
    out = np.zeros((len(wanted), state.dim), np.float32)
    positions: dict[int, list[int]] = {}
    for position, item in enumerate(wanted):
        positions.setdefault(int(item), []).append(position)
    if not positions:
        return out
    want = np.fromiter(positions, np.int64)
    for block, block_ids, _ in state.blocks():
        for row in np.nonzero(np.isin(block_ids, want))[0]:
            out[positions[int(block_ids[row])]] = block[row]
    return out


class _writer_lock:
    """The index's writer lock (DIR/index.lock): one build or add at a time."""

    def __init__(self, folder: Path) -> None:
        from ..embed.store import RunLock

        self.lock = RunLock(folder / "index")

    def __enter__(self):
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
