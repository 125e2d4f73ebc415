"""The compiled-model cache: one folder per (weights, load options, backend graph version).

An entry holds `model.onnx` with its sidecars (`model.dino3.json`, `model.preprocessor_config.json`)
and whatever a runtime derives from it (ONNX Runtime's int8 model, OpenVINO's quantized model and
compiled blobs). The export is made in a scratch folder and renamed into place whole, so that an
interrupted first run leaves no half entry; an entry found broken (from an older dino3, or damaged)
is rebuilt. Two processes that build the same entry at once each make their own, and one wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from .export import GRAPH_VERSION, info_path

MODEL_FILE = "model.onnx"


def cache_root() -> Path:
    """Where compiled models live: $DINO3_CACHE/compiled (default ~/.cache/dino3/compiled)."""
    return Path(os.environ.get("DINO3_CACHE", Path.home() / ".cache" / "dino3")).expanduser() / "compiled"


def entry_key(source: str, config: dict[str, Any], weight_files: list[str], options: dict[str, Any]) -> str:
    """The weights' identity (files, sizes, modification times), the architecture, what changes the
    numbers among the load options, and the versions of dino3 and of its exported graph."""
    parts = [__version__, f"graph {GRAPH_VERSION}", source, json.dumps(config, sort_keys=True, default=str)]
    for file in weight_files:
        stat = os.stat(file)
        parts.append(f"{os.path.realpath(file)}:{stat.st_size}:{stat.st_mtime_ns}")
    parts += [f"{k}={options[k]!r}" for k in sorted(options)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def is_complete(folder: Path) -> bool:
    try:
        info = json.loads(info_path(folder / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (folder / MODEL_FILE).is_file() and info.get("graph_version") == GRAPH_VERSION


def ensure_entry(folder: Path, build: Callable[[Path], None]) -> Path:
    """The entry `folder`, built by `build(scratch_folder)` if it is missing or broken; returns the
    path of its model.onnx."""
    if is_complete(folder):
        return folder / MODEL_FILE
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # broken: rebuilt whole
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        build(scratch)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not is_complete(folder):  # another process won the race with a complete entry: keep it
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / MODEL_FILE
