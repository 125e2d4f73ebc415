"""Keeping an index fast after it changed: vector files merged when there are many or they hold many
removed rows, and the approximate index's graph built, extended, rebuilt or dropped as the index
grows and shrinks. Runs inside a build's or add's writer lock, after its transaction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import store
from .vectors import live_after

EXACT_LIMIT = 20_000_000  # floats (images x dim), 80 MB: exact search up to here (52k 384-d images)
MAX_SEGMENTS = 32  # vector files before a compaction merges them into one
COMPACT_DEAD_FRACTION = 0.25  # dead rows in the vector files before a compaction
RECENT_FRACTION = 0.01  # images added since the graph was written (searched exactly) before they join it
REBUILD_DEAD_FRACTION = 0.25  # removed items in the graph before it is built again


def maintain(folder: Path, con) -> None:
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
                ann = write_ann(folder, HNSW.build(vectors, ids), int(ids.max()), generation)
        elif extend:
            graph = HNSW.read(state.ann_file, state.ann_ids, info, folder, state.dim)
            added, added_ids = live_after(state, int(info["max_id"]))
            graph.add(added, added_ids)
            ann = write_ann(folder, graph, max(int(info["max_id"]), *added_ids.tolist()), generation)
    finally:
        state.close()
    with store.transaction(con):
        if segment is not None:
            store.replace_segments(con, segment, ids)
        store.set_meta(con, ann=ann, generation=generation)


def write_ann(folder: Path, graph, max_id: int, generation: int) -> dict[str, Any]:
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
        file.flush()
        size = os.fstat(file.fileno()).st_size  # checked when read: a cut file is named, not given to FAISS
    info = {"file": f"{name}.faiss", "ids_file": f"{name}.ids.npy", "max_id": max_id, "count": graph.count}
    info["bytes"] = size
    return {**graph.info(), **info}
