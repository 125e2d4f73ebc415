"""Reading and writing weight files: safetensors (single or sharded), tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]


def read_safetensors(
    files: Iterable[str | os.PathLike], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> StateDict:
    """All tensors of one or more safetensors files, floating ones cast to `dtype` as each is read,
    so that no full-precision copy of the whole checkpoint is ever held."""
    from safetensors import SafetensorError, safe_open

    out: StateDict = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    out[key] = tensor
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({e}). It may be truncated or corrupt: "
                "delete it and download or save it again."
            ) from None
    return out


def safetensors_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored in the files (read from the header only)."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in names:
                return names[info["dtype"]]
    return None


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as Transformers does (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = f"{os.fspath(path)}.partial"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
