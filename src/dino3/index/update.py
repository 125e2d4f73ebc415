"""Building and updating an index: images (embedded by the embed job, with the index's recipe) or
`dino3 embed` outputs (which record theirs) in; one transaction per change, so that an interrupted
build or add (SIGKILL included) leaves the index as it was; the writer lock, one writer at a time.

An add sorts its inputs into unchanged (same size and modification time), touched (same bytes, new
time), changed and new, embeds only the last two (a file with the same bytes as an indexed one takes
its vector), and drops indexed files that are gone from the disk (a video frame, `clip.mp4#t=1.000`,
when its video is). Its embedding job saves its work every ADD_CHECKPOINT images: an add interrupted
while it embeds continues where it stopped when run again with the same inputs.

A `dino3 embed` output is trusted only as far as it can be checked: its paths must be absolute (an
older dino3 wrote them as given; `relative_to` names the folder they were relative to), and an image
modified after the output was written is left out (listed with the failures; `index add` embeds it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import BadIndexError, UsageError
from ..fetch import REMOTE_PREFIXES
from ..recipe import DECIDING, Made, Recipe, check_model, differences, digest, model_name
from ..video import source_file
from . import maintenance, store
from .maintenance import maintain, write_ann
from .store import Entry
from .vectors import unit, vectors_of

INDEX_POOLS = ("cls", "mean", "cls+mean", "text")  # one vector per image ("text": a dino.txt model's)
OWN_NAMES = {store.VECTORS, store.ANN, store.WORK, "index.lock"}  # what an index folder holds besides its database
ADD_CHECKPOINT = 256  # images an add embeds between two saves of its work (what an interrupted add keeps)


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


# -- building and updating ----------------------------------------------------------------------------------
def build(
    inputs: Sequence[str],
    model: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    pool: str | None = None,
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
    relative_to: str | os.PathLike | None = None,
) -> Update:
    """A new index in `folder` from images (embedded by `recipe`, or by `model` with the recipe's options
    given here: dino3.recipe.Recipe's; pool "text" by default for a dino.txt model, else "cls") or from
    `dino3 embed` outputs (which name their model; `relative_to`: the folder that an older
    output's relative paths are relative to). An interrupted build is continued by running it again;
    with overwrite=True, an index already in the folder is replaced, and stays usable until the new
    one is complete (an index opened on it then refuses to read on: see Index.refresh)."""
    if folder is None:
        raise UsageError("give the index folder (--index DIR)")
    folder = Path(folder)
    if recipe is not None:
        if model is not None and model_name(model) != recipe.model:
            raise UsageError(f"model {model} and the recipe's model {recipe.model} differ; give one of them")
        model, pool = recipe.model, recipe.pool
    if pool is None:  # a dino.txt model's image embeddings (searchable by text), else the CLS token
        from ..models.text import is_text_checkpoint

        pool = "text" if model is not None and is_text_checkpoint(model) else "cls"
    if pool not in INDEX_POOLS:
        raise UsageError(f"an index holds one vector per image: pool must be one of {INDEX_POOLS}, got {pool!r}")
    files = _embedding_files(inputs)
    if files:
        recipe = None  # the files name the recipe that made them
    elif recipe is None and model is not None:  # checked before anything is created
        from ..embed import expand_inputs

        recipe = Recipe(
            os.fspath(model), pool=pool, size=size, keep_aspect=keep_aspect, target=target, fit=fit,
            max_side=max_side, jpeg_draft=jpeg_draft, dtype=dtype, quantize=quantize, backend=backend,
            precision=precision, calibration=expand_inputs(list(calibration)).paths if calibration else None,
        )  # fmt: skip
    options = dict(
        device=device, batch_size=batch_size, workers=workers, resume=not overwrite, overwrite=overwrite,
        check_hash=check_hash, progress=progress, relative_to=relative_to,
    )  # fmt: skip
    if store.db_path(folder).exists() and not overwrite:
        raise UsageError(
            f"{folder} holds an index already: add images to it with `dino3 index add`, or pass --overwrite "
            "to build a new one in its place"
        )
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; give a folder for the index")
    if folder.is_dir() and not store.db_path(folder).exists():
        foreign = sorted(
            p.name for p in folder.iterdir() if p.name not in OWN_NAMES and not store.LEFTOVER.fullmatch(p.name)
        )
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
        _build_in(folder, files, model, recipe, inputs, update, options)
    except _NothingToIndex as e:  # nothing was made: leave no half-made folder behind
        shutil.rmtree(folder / store.WORK, ignore_errors=True)
        if created and not store.db_path(folder).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(str(e)) from None
    except UsageError:  # refused (an embeddings file given with a model, ...): nothing was made either
        shutil.rmtree(folder / store.WORK, ignore_errors=True)
        if created and not store.db_path(folder).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    update.seconds = time.perf_counter() - started
    return update


class _NothingToIndex(Exception):
    pass


def _build_in(folder: Path, files, model, recipe, inputs, update: Update, options: dict[str, Any]) -> None:
    from ..embed import expand_inputs, run

    workers = options["workers"]
    relative_to = options.pop("relative_to")
    with _writer_lock(folder):
        store.remove_leftovers(folder)  # a killed build's or add's temporary files
        if files:
            if model is not None:
                raise UsageError("embeddings files name the model that made them: give them without -m/--model")
            settings, rows, vectors = _ingest(files, update, relative_to)
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
            result = run(_inputs(paths, found.skipped), output=output, recipe=recipe, **options)
            update.notes += result.notes
            update.failures = list(result.failures)
            if not result.count:
                raise _NothingToIndex(
                    "no image could be embedded, so there is nothing to index"
                    + "".join(f"\n  {p}: {r}" for p, r in update.failures[:10])
                    + (f"\n  ... and {len(update.failures) - 10} more" if len(update.failures) > 10 else "")
                )
            data = _read(output)
            settings = _settings(data.meta)
            rows = [Entry(0, p, *stats[p][:2], stats[p][2], _grid(g)) for p, g in zip(data.paths, data.grid_sizes)]
            vectors = unit(_features(data, output))
            update.embedded = result.computed
        if not rows:
            raise _NothingToIndex("the embeddings files hold no image, so there is nothing to index")
        _create(folder, settings, rows, vectors)
        update.added = update.count = len(rows)
        shutil.rmtree(folder / store.WORK, ignore_errors=True)


def _create(folder: Path, settings: dict[str, Any], rows: list[Entry], vectors: np.ndarray) -> None:
    """Write a whole new index: its vector file and approximate index, then its database (store.create:
    renamed into place, so that an index there before stays whole until that instant)."""
    (folder / store.VECTORS).mkdir(parents=True, exist_ok=True)
    (folder / store.ANN).mkdir(exist_ok=True)
    generation = 1
    segment = store.write_vectors(folder, vectors, generation)
    first = store.first_id(folder)
    ann = None
    if vectors.size > maintenance.EXACT_LIMIT:
        from .ann import HNSW

        ids = np.arange(first, first + len(rows), dtype=np.int64)
        ann = write_ann(folder, HNSW.build(vectors, ids), int(ids.max()), generation)
    meta = {"generation": generation, "embedding": settings, "dim": int(vectors.shape[1]), "ann": ann}
    store.create(folder, meta, rows, segment, first)
    con = store.connect(folder)
    try:
        store.collect_garbage(folder, con)
    finally:
        con.close()


def update_index(
    folder: Path,
    inputs: Sequence[str],
    *,
    batch_size,
    workers,
    device,
    check_hash,
    progress,
    model=None,
    relative_to=None,
) -> Update:
    from ..embed import expand_inputs

    started = time.perf_counter()
    update = Update(folder)
    files = _embedding_files(inputs)
    with _writer_lock(folder):
        store.remove_leftovers(folder)  # a killed build's or add's temporary files
        con = store.connect(folder)
        try:
            state = store.read_state(folder, con)
            meta, settings = state.meta, state.meta["embedding"]
            with store.reading(con, folder):
                known = {e.path: e for e in store.entries(con)}
            by_hash = {e.sha256: e for e in known.values() if e.sha256}

            # -- what is gone, what changed, what is new ------------------------------------------------
            removed: list[int] = []
            local = [e for e in known.values() if not e.path.startswith(REMOTE_PREFIXES)]
            gone = [e for e in local if _is_gone(e.path)]
            if gone and len(gone) == len(local) and len(local) > 1:
                raise UsageError(
                    f"none of the {len(local)} files of the index {folder} exists any more (a disk not mounted? the "
                    "files moved?); nothing was changed. If they are really gone, build a new index"
                )
            removed += [e.id for e in gone]
            update.dropped = len(gone)
            if files:
                new_settings, candidates, candidate_vectors = _ingest(files, update, relative_to)
                _check_same_settings(settings, new_settings, f"the index {folder}")
                for row in candidates:
                    old = known.get(row.path)
                    if old is not None:
                        removed.append(old.id)
                        update.replaced += 1
                    else:
                        update.added += 1
                fresh, vectors = candidates, candidate_vectors.reshape(-1, state.dim)
                touched: list[tuple[int, int, int]] = []
            else:
                found = expand_inputs(list(inputs))
                update.ignored = found.ignored
                update.failures += list(found.skipped)
                paths = _unique_local(found.paths, update)
                plan = _plan(paths, known, by_hash, workers, update)
                removed += plan.removed
                touched = plan.touched
                fresh, vectors = plan.reused, vectors_of(state, plan.reused_from)
                if plan.todo:
                    options = dict(batch_size=batch_size, workers=workers, device=device, check_hash=check_hash)
                    result, data = _embed_new(folder, plan.todo, settings, model, options, progress, update)
                    stats = plan.stats
                    embedded = [
                        Entry(0, p, *stats[p][:2], stats[p][2], _grid(g)) for p, g in zip(data.paths, data.grid_sizes)
                    ]
                    fresh = fresh + embedded
                    vectors = (
                        np.concatenate([vectors, unit(_features(data, folder / store.WORK))]) if embedded else vectors
                    )
                    update.embedded = result.computed
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
            maintain(folder, con)
            store.collect_garbage(folder, con)
        except sqlite3.DatabaseError as e:
            raise BadIndexError(f"{folder}/{store.DB_NAME} is damaged ({e}); build the index again") from None
        finally:
            con.close()
        shutil.rmtree(folder / store.WORK, ignore_errors=True)
    update.seconds = time.perf_counter() - started
    return update


def _embed_new(folder: Path, todo: list[str], settings, model, options: dict[str, Any], progress: bool, update):
    """Embed an add's new and changed images with the index's recipe, in DIR/work/add.npz; an
    interrupted add with the same images to embed is resumed (the embed job's saved chunks), any
    other left work is started over. Returns the job's result and its output."""
    from ..embed import run

    output = folder / store.WORK / "add.npz"
    partial = output.with_name(output.name + ".partial")
    if output.exists():  # killed after its embedding, before its commit: embedded again
        output.unlink()
    resume = partial.exists() and _saved_inputs(partial) == (digest(todo), len(todo))
    if partial.exists() and not resume:
        update.notes.append("the images to embed changed since an interrupted add: its work is started over")
    what = f"the index {folder}"
    job = dict(
        output=output, recipe=_replayed(settings, model, what), load=_checked_loader(settings, what),
        progress=progress, checkpoint_every=ADD_CHECKPOINT, **options,
    )  # fmt: skip
    try:
        result = run(_inputs(todo, []), resume=resume, overwrite=not resume, **job)
    except UsageError as e:  # the interrupted add's work cannot be resumed (the model moved, ...): start over
        if not resume:
            raise
        update.notes.append(
            f"the work of an interrupted add cannot be resumed ({str(e).splitlines()[0]}): started over"
        )
        result = run(_inputs(todo, []), overwrite=True, **job)
    update.notes += result.notes
    update.failures += list(result.failures)
    if result.computed < result.count:
        update.notes.append(f"{result.count - result.computed} images were embedded by an interrupted add already")
    return result, _read(output)


def _saved_inputs(partial: Path) -> tuple[str, int] | None:
    """(digest, count) of the inputs of the embedding job saved in `partial`, or None."""
    import json

    try:
        manifest = json.loads((partial / "manifest.json").read_text(encoding="utf-8"))
        return (manifest["inputs_sha256"], manifest["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        if old is not None and (path.startswith(REMOTE_PREFIXES) or (old.size, old.mtime_ns) == input_stat(path)):
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


# -- the recipe, and what must agree ------------------------------------------------------------------------
def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """What the index records of an embeddings output's description (dino3.recipe)."""
    return {key: meta.get(key) for key in ("model", "model_fingerprint", "recipe", *DECIDING)}


def _check_same_settings(old: dict[str, Any], new: dict[str, Any], where: Any) -> None:
    changed = differences(old, new)
    if changed:
        raise UsageError(f"these embeddings were not made as those of {where}:\n  " + "\n  ".join(changed[:12]))


def _replayed(settings: dict[str, Any], model: str | None, what: str) -> Recipe:
    """The index's recipe (with the model where it lies now, if given)."""
    name = settings.get("model")
    if model is None and name and os.path.isabs(name) and not os.path.exists(name):
        raise UsageError(f"{what}'s model {name} is not there any more; give where it lies now (-m DIR, or model=...)")
    return Recipe.from_meta(settings, model=model)


def _checked_loader(settings: dict[str, Any], what: str):
    """dino3.load, refusing a model that would not make the index's vectors (before any image)."""
    from ..api import load

    def checked(name, **options):
        model = load(name, **options)
        recipe = Recipe.from_meta(settings, model=name)
        check_model(settings, Made(recipe, model, recipe.processor_for(model)), what)
        return model

    return checked


# -- inputs ---------------------------------------------------------------------------------------------------
def _embedding_files(inputs: Sequence[str]) -> list[str]:
    """The inputs when they are all `dino3 embed` outputs; [] when none is; mixing is refused."""
    from ..embed import is_embeddings

    inputs = [os.fspath(i) for i in inputs]
    files = [i for i in inputs if is_embeddings(i)]
    if files and len(files) != len(inputs):
        raise UsageError(
            "give either images or `dino3 embed` outputs (.npz, .npy, .safetensors, .parquet, or a Ray engine's "
            "folder), not both"
        )
    return files


def _ingest(
    files: list[str], update: Update, relative_to: str | os.PathLike | None = None
) -> tuple[dict[str, Any], list[Entry], np.ndarray]:
    """Rows and unit vectors of `dino3 embed` outputs (one vector per image, made with one model),
    checked as far as they can be (see the module docstring)."""
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
            settings = _settings(data.meta)
        else:
            _check_same_settings(settings, _settings(data.meta), files[0])
        if not len(data.paths):  # an embed run that found no image (its features have no width)
            continue
        features = _features(data, file)
        paths = _absolute_paths(file, [str(p) for p in data.paths], relative_to)
        keep = [i for i, p in enumerate(paths) if not (p in seen or seen.add(p))]
        if len(keep) < len(paths):
            update.notes.append(f"{file}: {len(paths) - len(keep)} images listed twice; the first kept")
        stats = _stats_and_hashes([paths[i] for i in keep], 4)
        local = [i for i in keep if not paths[i].startswith(REMOTE_PREFIXES)]
        missing = sum(1 for i in local if stats[paths[i]][0] < 0)
        if missing:
            update.notes.append(f"{file}: {missing} of its images are not on this disk; `dino3 index add` drops them")
        written = _written_at(file)
        changed = {i for i in local if stats[paths[i]][1] > written}  # modified after their vector was made
        update.failures += [
            (paths[i], f"modified after {file} was written (its vector may be an older version's): left out; "
             "`dino3 index add` embeds it")
            for i in sorted(changed)
        ]  # fmt: skip
        keep = [i for i in keep if i not in changed]
        for i in keep:
            size, mtime, sha = stats[paths[i]]
            rows.append(Entry(0, paths[i], size, mtime, sha, _grid(data.grid_sizes[i])))
        parts.append(features[keep])
    vectors = unit(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)
    return settings, rows, vectors


def _absolute_paths(file: str, paths: list[str], relative_to: str | os.PathLike | None) -> list[str]:
    """The paths of an embeddings file, absolute: a relative one (an older dino3 wrote them as given)
    only against `relative_to`, never against whatever folder this runs in. URLs (http, s3, ...) stay."""
    as_is = [p.startswith(REMOTE_PREFIXES) or "://" in p or os.path.isabs(p) for p in paths]
    relative = [p for p, kept in zip(paths, as_is) if not kept]
    if relative and relative_to is None:
        raise UsageError(
            f"{file} names {len(relative)} images by relative paths ({relative[0]}, ...: written by an older dino3), "
            "which would be read against this folder, maybe not the one they were embedded from: give that folder "
            "(--relative-to DIR, or relative_to=), or embed them again (dino3 now records absolute paths)"
        )
    base = os.path.abspath(os.fspath(relative_to)) if relative_to is not None else ""
    return [p if kept and "://" in p else os.path.normpath(os.path.join(base, p)) for p, kept in zip(paths, as_is)]


def _written_at(file: str) -> int:
    """When an embeddings output was written (ns): its file's modification time, or its newest file's
    (a Parquet dataset folder)."""
    path = Path(file)
    times = [path.stat().st_mtime_ns]
    if path.is_dir():
        times += [p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()]
    return max(times)


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
    out = list(dict.fromkeys(p if p.startswith(REMOTE_PREFIXES) else os.path.abspath(p) for p in paths))
    if len(out) < len(paths):
        update.notes.append(f"{len(paths) - len(out)} inputs named an image already listed; each is indexed once")
    return out


def _is_gone(path: str) -> bool:
    """Whether an indexed file is gone from the disk (a video frame's: its video)."""
    try:
        os.stat(source_file(path))
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
        if path.startswith(REMOTE_PREFIXES):
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
