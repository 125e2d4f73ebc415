"""A preset name, hub id or local folder -> the checkpoint's config and weight files on disk.

Hub access goes through huggingface_hub, so its cache, `HF_TOKEN` / `hf auth login`, `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` work as they do for Transformers. Every failure becomes a
`HubAccessError` or `CheckpointError` that says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONFIG_NAME, _Config, config_from_dict
from ..errors import CheckpointError, ConfigError, HubAccessError
from ..presets import Preset, find_preset, get_preset

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """Where a checkpoint's files are, and what it is."""

    config: _Config | None  # None for a single weights file: its layout and shapes tell
    weight_files: list[str]
    source: str  # how to name it in messages: a hub id or a path
    preset: Preset | None = None  # the official checkpoint it is, if known
    folder: str | None = None  # the local folder holding config.json


def resolve(
    name_or_path: str | os.PathLike,
    *,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    need_weights: bool = True,
) -> Checkpoint:
    """Find the config and weight files of a preset name (`"vits16"`), hub id or local folder."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return _resolve_folder(path, need_weights)
    if path.is_file():  # Meta's .pth, timm's file, or a bare state dict in any layout
        return Checkpoint(None, [str(path)], source=str(path), folder=str(path.parent))
    name = str(name_or_path)
    preset = find_preset(name)
    if preset is not None:
        repo_id = preset.hub_id
    elif _looks_like_repo_id(name):
        repo_id = name
    else:
        # Not a folder, not a repo: an unknown preset name (the error suggests close ones) or a typo'd path.
        if os.sep in name or name.startswith("."):
            raise CheckpointError(f"no such file or folder: {name}")
        get_preset(name)
        raise AssertionError("unreachable")  # pragma: no cover
    hub = dict(token=token, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config_file = download(repo_id, CONFIG_NAME, **hub)
    config = read_config(config_file, f"{repo_id}/{CONFIG_NAME}")
    files = _download_weights(repo_id, hub) if need_weights else []
    return Checkpoint(config, files, source=repo_id, preset=preset, folder=str(Path(config_file).parent))


def resolve_config(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> _Config:
    return resolve(name_or_path, need_weights=False, **hub_kwargs).config


def download(repo_id: str, filename: str, **hub_kwargs: Any) -> str:
    """One file of a hub repo, through huggingface_hub's cache. Errors say how to fix access."""
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"https://hf.barry1.top/{repo_id}"
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, **hub_kwargs)
    except GatedRepoError:
        raise HubAccessError(
            f"{repo_id} is gated: its weights are Meta's, under the DINOv3 License. Request access at {url} "
            "(log in, accept the licence), then give dino3 a token: set HF_TOKEN, run `hf auth login`, "
            "or pass token=..."
        ) from None
    except RepositoryNotFoundError:
        raise HubAccessError(
            f"{repo_id} was not found on the hub, or you are not authorised to see it (HTTP 401/404). "
            f"Check the name (dino3.list_models() lists the official ones); if it is private or gated, "
            "set HF_TOKEN or run `hf auth login`."
        ) from None
    except RevisionNotFoundError:
        raise HubAccessError(f"{repo_id} has no revision {hub_kwargs.get('revision')!r}") from None
    except LocalEntryNotFoundError:
        raise HubAccessError(
            f"{filename} of {repo_id} is not in the local cache and the hub cannot be reached "
            "(offline, HF_HUB_OFFLINE=1 or local_files_only=True). Download it once with network access, "
            "or pass a local folder."
        ) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo_id} has no file {filename}") from None


def _download_weights(repo_id: str, hub: dict[str, Any]) -> list[str]:
    try:
        return [download(repo_id, SAFETENSORS_NAME, **hub)]
    except (CheckpointError, HubAccessError) as first:
        try:
            index = download(repo_id, SAFETENSORS_INDEX_NAME, **hub)
        except (CheckpointError, HubAccessError):
            raise first from None
    shards = _shards_of(index)
    return [download(repo_id, shard, **hub) for shard in shards]


def _resolve_folder(folder: Path, need_weights: bool) -> Checkpoint:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}. A checkpoint folder holds config.json and model.safetensors, "
            "as save_pretrained() writes them (dino3 or Transformers)."
        )
    config = read_config(config_file, str(config_file))
    files: list[str] = []
    if need_weights:
        if (folder / SAFETENSORS_NAME).is_file():
            files = [str(folder / SAFETENSORS_NAME)]
        elif (folder / SAFETENSORS_INDEX_NAME).is_file():
            files = [str(folder / shard) for shard in _shards_of(folder / SAFETENSORS_INDEX_NAME)]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise CheckpointError(f"{folder}: the shard index names files that are not there: {absent}")
        else:
            raise CheckpointError(
                f"{folder} has no {SAFETENSORS_NAME} (nor a sharded {SAFETENSORS_INDEX_NAME}); "
                "save the weights with save_pretrained()"
            )
    return Checkpoint(config, files, source=str(folder), folder=str(folder))


def read_config(path: str | Path, source: str) -> _Config:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); the file may be truncated") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} does not hold a JSON object")
    return config_from_dict(data, source)


def _shards_of(index_file: str | Path) -> list[str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a valid shard index ({e!r})") from None
    return sorted(set(weight_map.values()))


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
