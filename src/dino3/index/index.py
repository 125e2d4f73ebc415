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
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..recipe import Made, Recipe, check_model, replay
from . import store
from .store import Entry, State
from .update import Update, update_index
from .vectors import as_vectors, is_vectors, live_after, unit

DEDUP_EXACT_LIMIT = 20_000  # images: exact all-pairs dedup up to here, the approximate index beyond


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
        """
        k = self._check_k(k)
        if is_vectors(queries):
            vectors = as_vectors(queries, self.dim)
            names = list(names) if names is not None else [f"vector {i}" for i in range(len(vectors))]
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
        k = self._check_k(k)
        queries = unit(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))
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
        if model is not None and not isinstance(model, (str, os.PathLike)):
            recipe = Recipe.from_meta(self.settings)
            made = Made(recipe, model, recipe.processor_for(model))
            check_model(self.settings, made, what)
            return made
        with self._lock:
            key = f"{os.fspath(model) if model is not None else ''}|{device}"
            if key not in self._models:
                self._models[key] = replay(self.settings, what, model=model, device=device)
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
        update = update_index(
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
