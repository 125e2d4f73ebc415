"""What a probe learns from, or is evaluated on: labelled images or labelled features.

- a folder per class (the ImageFolder layout: DATASET/cat/*.jpg, DATASET/dog/*.jpg; each class
  folder searched recursively, as `dino3 embed` searches folders);
- a CSV of `path,label` (a header row `path,label` is optional; paths relative to the CSV's folder);
- a `dino3 embed` output (.npz, .npy, .safetensors, .parquet) with a labels CSV: the features are
  used as they are, matched to the labels by path.

Classes are the sorted label names. Everything wrong with a dataset (an empty class folder, a CSV
naming files that are not there, labels for features that are not in the file) is a UsageError that
names the thing, before any image is embedded. `stratified_split` holds out a seeded share of each
class to choose C or k.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..embed import OUTPUT_SUFFIXES, expand_inputs, is_embeddings, read_embeddings
from ..errors import UsageError
from ..fetch import REMOTE_PREFIXES

SHOWN = 5  # how many offending items an error message lists


@dataclass
class Dataset:
    source: str
    paths: list[str]
    labels: list[str]
    features: np.ndarray | None = None  # (N, D) for an embeddings file, else None (images to embed)
    meta: dict[str, Any] | None = None  # the embeddings' settings (model, pool, processor, ...)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) found but not usable
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def targets(self, classes: list[str]) -> np.ndarray:
        """The labels as indices into `classes`, (N,) int64."""
        index = {name: i for i, name in enumerate(classes)}
        return np.asarray([index[label] for label in self.labels], dtype=np.int64)


def is_embeddings_file(path: str | os.PathLike) -> bool:
    """A `dino3 embed` output that is there: a file, or a Ray engine's folder."""
    return is_embeddings(path) and Path(path).exists()


def read_dataset(dataset: str | os.PathLike, labels: str | os.PathLike | None = None) -> Dataset:
    """A folder per class, a CSV of path,label, or an embeddings file with `labels` (a CSV)."""
    path = Path(dataset).expanduser()
    if is_embeddings_file(path):
        if labels is None:
            raise UsageError(f"{path} is an embeddings file: give its labels too (--labels labels.csv)")
        return _read_labelled_embeddings(path, Path(labels).expanduser())
    if labels is not None:
        raise UsageError(
            f"labels ({labels}) go with an embeddings file; {path} is not one (a folder per class or a CSV "
            "carries its own labels)"
        )
    if path.is_dir():
        return _read_image_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        rows = read_labels_csv(path)
        missing = [(line, p) for line, p, _ in rows if not p.startswith(REMOTE_PREFIXES) and not Path(p).is_file()]
        if missing:
            shown = ", ".join(f"{p} (line {line})" for line, p in missing[:SHOWN])
            more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
            raise UsageError(
                f"{path} names {len(missing)} image file(s) that do not exist: {shown}{more}. Paths are relative to "
                "the CSV's folder; fix or remove those rows"
            )
        return Dataset(str(path), [p for _, p, _ in rows], [label for _, _, label in rows])
    if not path.exists():
        raise UsageError(f"{path}: no such folder or file")
    raise UsageError(
        f"{path}: a dataset is a folder with a folder per class, a CSV of path,label (.csv), or an embeddings "
        f"file ({', '.join(OUTPUT_SUFFIXES)}) with --labels"
    )


def _read_image_folder(root: Path) -> Dataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UsageError(
            f"{root} has no class folders: put each class's images in a folder named after the class "
            f"({root}/cat/..., {root}/dog/...), or give a CSV of path,label"
        )
    found = Dataset(str(root), [], [])
    empty = []
    for folder in folders:
        inputs = expand_inputs([str(folder)])
        if not inputs.paths:
            empty.append(folder.name + (f" ({inputs.ignored} other files)" if inputs.ignored else ""))
        found.paths += inputs.paths
        found.labels += [folder.name] * len(inputs.paths)
        found.skipped += inputs.skipped
    if empty:
        raise UsageError(
            f"{root}: class folder(s) with no images: {', '.join(empty)}. Add images or remove the folder(s)"
        )
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        found.notes.append(f"{len(loose)} file(s) directly in {root} are in no class folder and were left out")
    return found


def read_labels_csv(path: Path) -> list[tuple[int, str, str]]:
    """(line number, path, label) for each row of a labels CSV; relative paths are made relative to
    the CSV's folder. A first row `path,label` is a header; other columns are allowed after a header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such labels file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: a labels CSV must be UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UsageError(f"{path}: not a readable CSV ({e})") from None
    path_column, label_column, start = 0, 1, 0
    if rows and {"path", "label"} <= {c.strip().lower() for c in rows[0]}:
        header = [c.strip().lower() for c in rows[0]]
        path_column, label_column, start = header.index("path"), header.index("label"), 1
    out: list[tuple[int, str, str]] = []
    seen: dict[str, tuple[int, str]] = {}
    for number, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if start == 0 and len(row) != 2:
            raise UsageError(
                f"{path}, line {number}: expected two fields, path and label, got {len(row)} "
                "(a header row `path,label` allows more columns)"
            )
        if max(path_column, label_column) >= len(row):
            raise UsageError(f"{path}, line {number}: the row has no {'path' if path_column >= len(row) else 'label'}")
        name, label = row[path_column].strip(), row[label_column].strip()
        if not name or not label:
            raise UsageError(f"{path}, line {number}: the {'path' if not name else 'label'} is empty")
        if not name.startswith(REMOTE_PREFIXES) and not os.path.isabs(os.path.expanduser(name)):
            name = str(path.parent / name)
        if name in seen:
            first_line, first_label = seen[name]
            if first_label != label:
                raise UsageError(
                    f"{path}: {name} has two labels, {first_label!r} (line {first_line}) and {label!r} (line {number})"
                )
            continue
        seen[name] = (number, label)
        out.append((number, name, label))
    if not out:
        raise UsageError(f"{path}: the labels CSV has no rows (expected rows of path,label)")
    return out


def _read_labelled_embeddings(path: Path, labels_file: Path) -> Dataset:
    data = read_embeddings(path)
    meta = data.meta or {}
    if data.offsets is not None or meta.get("pool") == "patches" or data.features.ndim != 2:
        raise UsageError(
            f"{path} holds features of shape {tuple(data.features.shape[1:])} per image (pool "
            f"{meta.get('pool')!r}{', layers ' + str(meta['layers']) if meta.get('layers') else ''}); a probe "
            "takes one vector per image: embed with --pool cls+mean (or cls, mean) and no --layers"
        )
    rows = read_labels_csv(labels_file)
    where: dict[str, int] = {}
    for i, p in enumerate(data.paths):  # by the path as written, and as it resolves from here
        where.setdefault(p, i)
        if not p.startswith(REMOTE_PREFIXES):
            where.setdefault(os.path.normpath(os.path.abspath(p)), i)
    picked, labels, missing = [], [], []
    for line, p, label in rows:
        i = where.get(p)
        if i is None and not p.startswith(REMOTE_PREFIXES):
            i = where.get(os.path.normpath(os.path.abspath(p)))
        if i is None:
            missing.append((line, p))
        else:
            picked.append(i)
            labels.append(label)
    if missing:
        shown = ", ".join(f"{p} (line {line})" for line, p in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise UsageError(
            f"{labels_file} labels {len(missing)} image(s) that are not in {path}: {shown}{more}. Remove those rows, "
            "or embed those images (images that failed to embed are listed in the .failures.tsv beside the file)"
        )
    if len(set(picked)) != len(picked):
        raise UsageError(f"{labels_file} labels some images of {path} twice (under two spellings of their path)")
    found = Dataset(str(path), [data.paths[i] for i in picked], labels, data.features[picked], meta)
    unlabelled = len(data.paths) - len(picked)
    if unlabelled:
        found.notes.append(f"{unlabelled} image(s) of {path} have no label in {labels_file} and were left out")
    return found


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): in each class a seeded random `fraction` of its images (rounded,
    at least one when the class has two or more, never all of them) is held out."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"the held-out fraction must lie in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        rng.shuffle(members)
        count = len(members)
        n_held = min(max(round(fraction * count), 1 if fraction > 0 and count >= 2 else 0), count - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
