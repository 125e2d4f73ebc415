"""An index of image embeddings: search it, find its near-duplicates (building and adding: update.py).

Images are embedded by the embed engine (`dino3.embed.run`: inputs, decoding threads, failures
listed, resumable) into a temporary file in the index folder, then stored (see store.py) as unit
vectors, so that a dot product is the cosine. The index keeps the recipe of its vectors
(dino3.recipe: the model's identity and fingerprint, the pooling, the preprocessing). Queries are
embedded by that recipe, and a model that would make other numbers (other weights, config or
preprocessing) is refused with what differs.

Search is exact (matrix products in pieces, exact.py) while the vectors take at most EXACT_LIMIT
floats; a larger index keeps an approximate index (ann.py) and searches with it. Either can be asked
for; both give the same results format.

An opened index reads one committed state (a view): a later add by someone else is seen after
`refresh()`, which costs one small query when nothing changed (a server calls it before each
request). A rebuild in its folder (`index build --overwrite`) is never mixed with it: reading item
rows of another build raises StaleIndexError until `refresh()`.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadIndexError, UsageError
from ..recipe import Made, Recipe, check_model, replay
from . import store
from .store import Entry, State
from .update import Update, update_index
from .vectors import as_vectors, is_vectors, live_after, unit

DEDUP_EXACT_LIMIT = 20_000  # images: exact all-pairs dedup up to here, the approximate index beyond
SCORE_TOLERANCE = 1e-5  # float32 rounding of a cosine (a vector with itself: 0.9999996-1.0000002 at 384-d)
MAX_ID = 2**63 - 1  # item ids are SQLite integers


# -- opening --------------------------------------------------------------------------------------------
def open_index(folder: str | os.PathLike) -> Index:
    """The index in `folder`, as it is now (a later change by someone else is seen after `refresh()`)."""
    folder = Path(folder)
    return Index(folder, store.read_current(folder))


class _View:
    """One committed state of the index and, once asked for, its approximate search."""

    def __init__(self, state: State, graph: Any = None) -> None:
        self.state = state
        self.graph = graph  # the graph file read (ann.HNSW), before the removed items are filtered out
        self._ann = None
        self._lock = threading.Lock()
        weakref.finalize(self, state.close)  # the graph file is closed once no search uses this view

    def approximate(self):
        """The approximate search as of this state: the graph on disk, its removed items filtered out,
        and what was added since it was written searched exactly beside it (or, for an index without
        a graph, one built now)."""
        from .ann import HNSW, Approximate

        with self._lock:
            if self._ann is None:
                info, state = self.state.meta.get("ann"), self.state
                if info:
                    if self.graph is None:
                        self.graph = HNSW.read(state.ann_file, state.ann_ids, info, state.folder, state.dim)
                    graph = dataclasses.replace(self.graph)  # the same graph, its own filter
                    graph.keep_only(state.live_ids())
                    recent, recent_ids = live_after(state, int(info["max_id"]))
                else:
                    vectors, ids = state.live_vectors()
                    graph = HNSW.build(vectors, ids)
                    recent, recent_ids = np.zeros((0, state.dim), np.float32), np.zeros(0, np.int64)
                self._ann = Approximate(graph, recent, recent_ids)
            return self._ann


class Index:
    """An opened index; see the module docstring. Safe to search from several threads."""

    def __init__(self, folder: Path, state: State) -> None:
        self.folder = folder
        self._view = _View(state)
        self._lock = threading.Lock()  # the models
        self._models: dict[str, Any] = {}  # loaded once per device, for the queries
        self._db_lock = threading.Lock()  # one thread at a time on the connection (not held while a model loads)
        self._db: sqlite3.Connection | None = None  # for the rows of results, opened on first use
        self._db_file: tuple[int, int] | None = None  # which database file it is connected to

    def __len__(self) -> int:
        return self._view.state.count

    def __repr__(self) -> str:
        return (
            f"<dino3 index {self.folder}: {len(self)} images, {self.settings['model']}, pool {self.settings['pool']}>"
        )

    @property
    def settings(self) -> dict[str, Any]:
        """How the vectors were made: model, model_identity, pool, processor, dtype, ..."""
        return self._view.state.meta["embedding"]

    @property
    def dim(self) -> int:
        return self._view.state.dim

    @property
    def approximate(self) -> bool:
        """Whether the index keeps an approximate index (and searches with it by default)."""
        return bool(self._view.state.meta.get("ann"))

    def info(self) -> dict[str, Any]:
        state = self._view.state
        meta, settings = state.meta, state.meta["embedding"]
        return {
            "folder": str(self.folder),
            "images": state.count,
            "dim": state.dim,
            "model": settings["model"],
            "pool": settings["pool"],
            "processor": settings["processor"],
            "format": meta["format"],
            "dino3_version": meta.get("dino3_version"),
            "approximate_index": meta.get("ann"),
            "vector_files": len(state.segments),
        }

    def entries(self) -> list[Entry]:
        """Every image's entry, in the order of `vectors()` (of the same state: no refresh between)."""
        state = self._view.state
        return self._entries(state, state.live_ids().tolist())

    def vectors(self) -> np.ndarray:
        """Every image's unit vector, (N, D) float32, in the order of `entries()`."""
        return self._view.state.live_vectors()[0]

    def refresh(self) -> bool:
        """Read the index again if it changed on disk since it was opened or last refreshed (an add by
        someone else, or a rebuild by `index build --overwrite`); True if it did. Cheap when nothing
        changed: one small query. After a rebuild, check that the model still fits (`settings`)."""
        current = self._read(None, store.read_identity)
        view = self._view
        if current == view.state.identity:
            return False
        state = store.read_current(self.folder)
        old, new = view.state.meta.get("ann"), state.meta.get("ann")
        same_graph = old and new and old.get("file") == new.get("file") and view.state.build == state.build
        with self._lock:
            if state.meta["embedding"] != view.state.meta["embedding"]:
                self._models.clear()
            self._view = _View(state, view.graph if same_graph else None)
        return True

    def close(self) -> None:
        self._view.state.close()
        with self._db_lock:
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
        names: Sequence[str] | None = None,
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
        Raises StaleIndexError when the folder was built again since this state was read (refresh()).
        """
        view = self._view
        k = _check_k(k, view.state)
        if is_vectors(queries):
            vectors = as_vectors(queries, view.state.dim)
            names = list(names) if names is not None else [f"vector {i}" for i in range(len(vectors))]
        else:
            vectors, names = self.embed(
                queries, model=model, device=device, batch_size=batch_size, workers=workers, on_error=on_error
            )
        if len(vectors) == 0:
            return []
        scores, ids = _nearest(view, vectors, k, exact)
        paths = {e.id: e.path for e in self._entries(view.state, np.unique(ids[ids >= 0]).tolist())}
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

    def search_text(
        self,
        texts: str | Sequence[str],
        k: int = 10,
        *,
        exact: bool | None = None,
        model: Any = None,
        device: str | None = None,
    ) -> list[dict[str, Any]]:
        """The k indexed images nearest to each text, best first, in search()'s format: for an index
        of a dino.txt model's image embeddings (pool "text"), whose text embeddings share their space."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UsageError("give one text or a list of texts to search by")
        if self.settings.get("pool") != "text":
            raise UsageError(
                f"the index {self.folder} holds {self.settings.get('pool')!r} features, not a dino.txt model's image "
                "embeddings: build it with a dino.txt model (-m dinotxt-vitl16, pool text) to search it by text"
            )
        made = self._made(model, device)
        import torch

        with torch.inference_mode():
            vectors = made.model.encode_text(texts, normalize=True).float().cpu().numpy()  # (Q, D)
        return self.search(vectors, k, exact=exact, names=texts)

    def nearest(self, vectors: np.ndarray, k: int, exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest items of each vector (Q, D), best first; id -1: none found."""
        view = self._view
        return _nearest(view, vectors, _check_k(k, view.state), exact)

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
        """Images -> their unit vectors (Q, D), made by the index's recipe, and their names (the images
        that failed, reported to on_error, are left out)."""
        from ..pipeline import iter_batches

        sources, names = _sources(images)
        made = self._made(model, device)
        found: dict[int, np.ndarray] = {}
        for batch in iter_batches(sources, made.processor, batch_size, workers, on_error=on_error):
            values, _ = made.features(batch.pixel_values)  # (B, D)
            values = values.float().cpu().numpy().reshape(len(batch.indices), -1)
            for row, position in enumerate(batch.indices):
                found[position] = values[row]
        order = sorted(found)
        vectors = np.stack([found[i] for i in order]) if order else np.zeros((0, self.dim), np.float32)
        return unit(vectors), [names[i] for i in order]

    def _made(self, model: Any, device: str | None) -> Made:
        """The index's recipe with its model: loaded once per place and device (`model`: where the
        index's model lies now, if it moved), or `model` itself if it is a loaded one; checked."""
        what = f"the index {self.folder}"
        settings = self.settings
        if model is not None and not isinstance(model, (str, os.PathLike)):
            recipe = Recipe.from_meta(settings)
            made = Made(recipe, model, recipe.processor_for(model))
            check_model(settings, made, what)
            return made
        with self._lock:
            key = f"{os.fspath(model) if model is not None else ''}|{device}"
            if key not in self._models:
                self._models[key] = replay(settings, what, model=model, device=device)
            return self._models[key]

    def entry(self, item_id: int) -> Entry | None:
        """The entry of one item (the `id` a search gives), or None when the index holds no such item
        (any number: a server passes on what a client asked for)."""
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)) or not 0 < item_id <= MAX_ID:
            return None
        found = self._entries(self._view.state, [int(item_id)])
        return found[0] if found else None

    def _entries(self, state: State, ids: list[int]) -> list[Entry]:
        return self._read(state, lambda con: store.entries(con, ids))

    def _read(self, state: State | None, read: Callable[[sqlite3.Connection], Any]) -> Any:
        """`read(connection)` in one read transaction, refused (StaleIndexError) if the database holds
        another build than `state`'s (None: any). The connection follows the database file when a
        build replaced it (the old file's connection would never see the new one)."""
        with self._db_lock:
            found = store.file_identity(self.folder)
            if self._db is None or found != self._db_file:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                self._db, self._db_file = store.connect(self.folder, shared=True), found
            with store.reading(self._db, self.folder):
                if state is not None:
                    store.check_build(self._db, self.folder, state.build)
                return read(self._db)

    # -- near-duplicates ------------------------------------------------------------------------------
    def dedup(self, threshold: float = 0.95, *, exact: bool | None = None) -> dict[str, Any]:
        """Groups of near-duplicates: {"threshold", "groups": [{"paths", "scores"}], "histogram"}; see dedup.py.
        Largest groups first; in a group the most central image first, each score its cosine to it.
        A pair counts when its cosine reaches the threshold within float rounding (SCORE_TOLERANCE):
        byte-identical images are duplicates at threshold 1."""
        from . import dedup

        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise UsageError(f"the threshold is a cosine in (0, 1], got {threshold!r}")
        view = self._view
        state = view.state
        if state.count == 0:
            raise UsageError(f"the index {self.folder} holds no images; add some with `dino3 index add`")
        vectors, ids = state.live_vectors()
        if not np.isfinite(vectors).all():
            raise BadIndexError(_damaged_vectors(self.folder))
        cut = float(threshold) - SCORE_TOLERANCE
        use_exact = (state.count <= DEDUP_EXACT_LIMIT) if exact is None else exact
        if use_exact:
            from .exact import pairs_above

            first, second, _, nearest = pairs_above(vectors, cut)
        else:
            first, second, _, nearest = dedup.approximate_pairs(view.approximate(), vectors, ids, cut)
        found = dedup.groups(vectors, ids, first, second)
        members = np.unique(np.concatenate([np.asarray(g.ids) for g in found])).tolist() if found else []
        paths = {e.id: e.path for e in self._entries(state, members)}
        out = [{"paths": [paths[i] for i in g.ids], "scores": [round(s, 6) for s in g.scores]} for g in found]
        out.sort(key=lambda g: (-len(g["paths"]), g["paths"][0]))
        return {
            "threshold": threshold,
            "images": state.count,
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
        relative_to: str | os.PathLike | None = None,
    ) -> Update:
        """Bring the index up to date with `inputs` (files, folders, globs, lists, URLs, or embeddings
        files): new and changed images are embedded (changed: other size or modification time, and
        other bytes), vectors of files with the same bytes as an indexed one are reused, and
        indexed files that are gone from the disk are dropped. One transaction: an add that is
        interrupted, even by SIGKILL, leaves the index as it was, and what it embedded is kept for
        the next add of the same images. `model`: where the index's model lies now, when it has
        moved (checked to be the same weights). `relative_to`: see `build`."""
        update = update_index(
            self.folder,
            inputs,
            model=os.fspath(model) if model is not None else None,
            batch_size=batch_size,
            workers=workers,
            device=device,
            check_hash=check_hash,
            progress=progress,
            relative_to=relative_to,
        )
        self.refresh()
        return update


def _check_k(k: int, state: State) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a whole number >= 1, got {k!r}")
    if state.count == 0:
        raise UsageError(f"the index {state.folder} holds no images; add some with `dino3 index add`")
    if k > state.count:
        raise UsageError(
            f"k={k} is more than the {state.count} images in the index {state.folder}; ask for at most {state.count}"
        )
    return int(k)


def _nearest(view: _View, vectors: np.ndarray, k: int, exact: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k nearest items of each vector (Q, D) in one state of the index (k checked)."""
    state = view.state
    queries = np.asarray(vectors, dtype=np.float32).reshape(-1, state.dim)  # (Q, D)
    if not np.isfinite(queries).all():
        raise UsageError("query vectors hold NaN or infinite values")
    queries = unit(queries)
    use_exact = not state.meta.get("ann") if exact is None else exact
    if not use_exact:
        return view.approximate().search(queries, k)
    from .exact import top_k

    scores, ids = top_k(queries, state.blocks, k)
    if (ids < 0).any():  # k <= the live vectors, each with a finite score, unless a vector is not a number
        raise BadIndexError(_damaged_vectors(state.folder))
    return scores, ids


def _damaged_vectors(folder: Path) -> str:
    return f"{folder}: its vector files hold values that are not numbers (NaN): they are damaged; build the index again"


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
