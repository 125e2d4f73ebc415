"""A preset name, hub id or local path -> the checkpoint's config and weight files on disk.

Hub access goes through huggingface_hub, so its cache, `HF_TOKEN` / `hf auth login`, `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` work as they do for Transformers. When the hub cannot be
reached at all, dino3 says so at once (from the cache if it can) instead of waiting through
huggingface_hub's retries. Every failure becomes a `HubAccessError` or `CheckpointError` that says
what to do.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import CONFIG_NAME, _Config, read_json_object
from ..errors import CheckpointError, ConfigError, HubAccessError
from ..presets import Preset, config_from_dict, find_preset, get_preset
from .files import header_dtype, header_shapes

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class HubOptions:
    """How to reach the hub: the options huggingface_hub takes, in one place."""

    token: str | bool | None = None
    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    force_download: bool = False

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> HubOptions:
        """Take the hub options out of a dict of keyword arguments (what is left is for the caller)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Checkpoint:
    """Where a checkpoint's files are, and what it is."""

    config: _Config | None  # None for a single weights file: its layout and shapes tell
    weight_files: list[str]
    source: str  # how to name it in messages: a hub id or a path
    preset: Preset | None = None  # the checkpoint it is, if known
    folder: str | None = None  # the local folder holding config.json
    repo_id: str | None = None  # the hub repo it came from, if it did


def resolve(name_or_path: str | os.PathLike, hub: HubOptions | None = None, *, need_weights: bool = True) -> Checkpoint:
    """Find the config and weight files of a preset name (`"vits16"`), hub id, local folder or file."""
    hub = hub or HubOptions()
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_folder(path, need_weights)
    if path.exists():
        if not path.is_file():
            raise CheckpointError(f"{path} is not a regular file")
        # Meta's .pth, timm's file, or a bare state dict in any layout
        return Checkpoint(None, [str(path)], source=str(path), folder=str(path.parent))
    preset = find_preset(text)
    if preset is not None:
        repo_id = preset.hub_id
    elif _looks_like_repo_id(text) and not text.lower().endswith(WEIGHT_SUFFIXES):
        repo_id = text
    elif os.sep in text or text.startswith((".", "~")) or text.lower().endswith(WEIGHT_SUFFIXES + (".json",)):
        raise CheckpointError(f"no such file or folder: {text}")
    else:
        get_preset(text)  # an unknown name: the error suggests close ones
        raise AssertionError("unreachable")  # pragma: no cover
    config_file = download(repo_id, CONFIG_NAME, hub)
    config = read_config(config_file, f"{repo_id}/{CONFIG_NAME}")
    files = _download_weights(repo_id, hub) if need_weights else []
    return Checkpoint(config, files, repo_id, preset, str(Path(config_file).parent), repo_id)


def load_config(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> _Config:
    """The config of a preset name, hub id or local folder (only config.json is fetched)."""
    checkpoint = resolve(name_or_path, HubOptions(**hub_kwargs), need_weights=False)
    if checkpoint.config is None:
        raise ConfigError(f"{name_or_path} is a weights file without a config.json beside it")
    return checkpoint.config


def read_config(path: str | os.PathLike, source: str | None = None) -> _Config:
    """A config.json file as the config class its model_type names."""
    return config_from_dict(read_json_object(path, source), source or str(path))


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (a DNS lookup and one connect; no request)."""
    import huggingface_hub.constants as constants

    url = urlparse(endpoint or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(repo_id: str) -> str:
    """What to do without the hub: where Meta's file goes, and random weights of the same shape."""
    preset = find_preset(repo_id)
    if preset is None:
        return ""
    meta = f" (Meta's `{preset.meta_file}` loads as it is: -m path/to/{preset.meta_file})" if preset.meta_file else ""
    return (
        f"{meta}; to try dino3 without the weights, `dino3 init-random {preset.name} DIR` writes random weights of "
        f"{preset.name}'s shape to DIR, which loads like any folder (-m DIR)"
    )


def download(repo_id: str, filename: str, hub: HubOptions | None = None) -> str:
    """One file of a hub repo, through huggingface_hub's cache. Errors say how to fix access."""
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = hub or HubOptions()
    options = hub.as_kwargs()
    unreachable = False
    if not options["local_files_only"] and not constants.HF_HUB_OFFLINE and not hub_reachable():
        options["local_files_only"] = unreachable = True  # the cache may still have it
    url = f"https://hf.barry1.top/{repo_id}"
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, **options)
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
        raise HubAccessError(f"{repo_id} has no revision {hub.revision!r}") from None
    except LocalEntryNotFoundError:
        why = (
            "the hub cannot be reached from this machine"
            if unreachable
            else "the hub cannot be reached (offline, HF_HUB_OFFLINE=1 or local_files_only=True)"
        )
        raise HubAccessError(
            f"{filename} of {repo_id} is not in the local cache and {why}. Download it once with network "
            f"access, or pass a local folder or weights file{_offline_hint(repo_id)}."
        ) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo_id} has no file {filename}") from None


def _download_weights(repo_id: str, hub: HubOptions) -> list[str]:
    try:
        return [download(repo_id, SAFETENSORS_NAME, hub)]
    except (CheckpointError, HubAccessError) as first:
        try:
            index = download(repo_id, SAFETENSORS_INDEX_NAME, hub)
        except (CheckpointError, HubAccessError):
            raise first from None
    return [download(repo_id, shard, hub) for shard in _shards_of(index)]


def _resolve_folder(folder: Path, need_weights: bool) -> Checkpoint:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}. A checkpoint folder holds config.json and model.safetensors, "
            "as save_pretrained() writes them (dino3 or Transformers)."
        )
    config = read_config(config_file)
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


def _shards_of(index_file: str | Path) -> list[str]:
    try:
        weight_map = read_json_object(index_file).get("weight_map")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file} is not a shard index: its weight_map must map tensor names to file names")
    shards = sorted(set(weight_map.values()))
    unsafe = [s for s in shards if Path(s).name != s]
    if unsafe:
        raise CheckpointError(f"{index_file} names shards outside its folder: {unsafe[:3]}")
    return shards


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# -- what the weights are, without reading (or downloading) them ---------------------------------------
@dataclass
class WeightsSummary:
    files: int
    dtype: Any  # torch.dtype, or None
    parameters: int
    where: str  # "local" or "hub (headers only)"


def weights_summary(checkpoint: Checkpoint, hub: HubOptions | None = None) -> WeightsSummary:
    """Dtype and parameter count of a checkpoint's weights, from the safetensors headers: read from
    the local files, or fetched from the hub by range requests (never the whole weights)."""
    import math

    if checkpoint.weight_files:
        shapes = header_shapes(checkpoint.weight_files)
        dtype = header_dtype(checkpoint.weight_files)
        return WeightsSummary(len(checkpoint.weight_files), dtype, sum(math.prod(s) for s in shapes.values()), "local")
    if checkpoint.repo_id is None:
        raise CheckpointError(f"{checkpoint.source} has no weight files")
    import huggingface_hub

    from .files import SAFETENSORS_DTYPES

    hub = hub or HubOptions()
    try:
        metadata = huggingface_hub.get_safetensors_metadata(checkpoint.repo_id, revision=hub.revision, token=hub.token)
    except Exception as e:  # noqa: BLE001  (offline, gated, ...: the summary is optional)
        raise HubAccessError(f"cannot read the weights' headers of {checkpoint.repo_id} ({type(e).__name__})") from None
    dtypes = [SAFETENSORS_DTYPES.get(d) for d in metadata.parameter_count]
    floating = [d for d in dtypes if d is not None and d.is_floating_point]
    return WeightsSummary(
        len(metadata.files_metadata), floating[0] if floating else None, sum(metadata.parameter_count.values()), "hub"
    )
