"""Checkpoint layouts: the one place that knows how other projects name and shape the weights.

dino3's modules use their own layout (fused qkv, fused SwiGLU gate+up). Each foreign layout has one
function per direction that converts a whole state dict; nothing else in dino3 knows foreign names.
Loading is strict: `check_state_dict` compares a file's keys and shapes with what the config needs
and reports every missing, unexpected and mis-shaped tensor before anything is converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from ..config import DINOv3ConvNextConfig, DINOv3ViTConfig, _Config
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# Current Transformers keeps the blocks in a child module called "model" (model.layer.N / model.stages.N)
# and renames the hub's unprefixed keys on load. Both spellings are accepted.
_HF_ENCODER_PREFIX = re.compile(r"^model\.(?=layer\.|stages\.)")


# -- Hugging Face Transformers: ViT ---------------------------------------------------------------
def vit_from_hf(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """Transformers' DINOv3ViTModel layout -> dino3's. Expects a checked, complete state dict."""
    sd = normalize_hf_keys(state_dict)
    out: StateDict = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "register_tokens": sd["embeddings.register_tokens"],
        "patch_embed.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(config.num_hidden_layers):
        hf, d3 = f"layer.{i}.", f"blocks.{i}."
        att = hf + "attention."
        out[d3 + "attn.qkv.weight"] = torch.cat([sd[att + f"{n}_proj.weight"] for n in "qkv"])
        for n, present in zip("qkv", (config.query_bias, config.key_bias, config.value_bias)):
            if present:
                out[d3 + f"attn.{n}_bias"] = sd[att + f"{n}_proj.bias"]
        _copy_linear(sd, att + "o_proj", out, d3 + "attn.proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[d3 + n + ".weight"] = sd[hf + n + ".weight"]
            out[d3 + n + ".bias"] = sd[hf + n + ".bias"]
        out[d3 + "ls1"] = sd[hf + "layer_scale1.lambda1"]
        out[d3 + "ls2"] = sd[hf + "layer_scale2.lambda1"]
        mlp = hf + "mlp."
        if config.use_gated_mlp:
            out[d3 + "mlp.fc1.weight"] = torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]])
            if config.mlp_bias:
                out[d3 + "mlp.fc1.bias"] = torch.cat([sd[mlp + "gate_proj.bias"], sd[mlp + "up_proj.bias"]])
        else:
            _copy_linear(sd, mlp + "up_proj", out, d3 + "mlp.fc1", config.mlp_bias)
        _copy_linear(sd, mlp + "down_proj", out, d3 + "mlp.fc2", config.mlp_bias)
    return out


def vit_to_hf(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """dino3's ViT layout -> Transformers' (the hub's unprefixed keys)."""
    sd = state_dict
    out: StateDict = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.register_tokens": sd["register_tokens"],
        "embeddings.patch_embeddings.weight": sd["patch_embed.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(config.num_hidden_layers):
        hf, d3 = f"layer.{i}.", f"blocks.{i}."
        att = hf + "attention."
        for n, weight in zip("qkv", sd[d3 + "attn.qkv.weight"].chunk(3)):
            out[att + f"{n}_proj.weight"] = weight.clone()
        for n, present in zip("qkv", (config.query_bias, config.key_bias, config.value_bias)):
            if present:
                out[att + f"{n}_proj.bias"] = sd[d3 + f"attn.{n}_bias"]
        _copy_linear(sd, d3 + "attn.proj", out, att + "o_proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[hf + n + ".weight"] = sd[d3 + n + ".weight"]
            out[hf + n + ".bias"] = sd[d3 + n + ".bias"]
        out[hf + "layer_scale1.lambda1"] = sd[d3 + "ls1"]
        out[hf + "layer_scale2.lambda1"] = sd[d3 + "ls2"]
        mlp = hf + "mlp."
        if config.use_gated_mlp:
            gate, up = sd[d3 + "mlp.fc1.weight"].chunk(2)
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = gate.clone(), up.clone()
            if config.mlp_bias:
                gate, up = sd[d3 + "mlp.fc1.bias"].chunk(2)
                out[mlp + "gate_proj.bias"], out[mlp + "up_proj.bias"] = gate.clone(), up.clone()
        else:
            _copy_linear(sd, d3 + "mlp.fc1", out, mlp + "up_proj", config.mlp_bias)
        _copy_linear(sd, d3 + "mlp.fc2", out, mlp + "down_proj", config.mlp_bias)
    return out


# -- Hugging Face Transformers: ConvNeXt ----------------------------------------------------------
# (dino3 name, Transformers name) inside one block, and in the downsampling layers.
_CONVNEXT_BLOCK = [
    ("dwconv", "depthwise_conv"),
    ("norm", "layer_norm"),
    ("fc1", "pointwise_conv1"),
    ("fc2", "pointwise_conv2"),
]


def _convnext_names(config: DINOv3ConvNextConfig) -> list[tuple[str, str]]:
    """(dino3 key, Transformers key) for every tensor of a ConvNeXt."""
    names = []
    for s, depth in enumerate(config.depths):
        for j in range(2):
            for leaf in ("weight", "bias"):
                names.append((f"stages.{s}.downsample.{j}.{leaf}", f"stages.{s}.downsample_layers.{j}.{leaf}"))
        for b in range(depth):
            ours, theirs = f"stages.{s}.blocks.{b}.", f"stages.{s}.layers.{b}."
            for mine, hf in _CONVNEXT_BLOCK:
                for leaf in ("weight", "bias"):
                    names.append((f"{ours}{mine}.{leaf}", f"{theirs}{hf}.{leaf}"))
            names.append((ours + "gamma", theirs + "gamma"))
    names += [("norm.weight", "layer_norm.weight"), ("norm.bias", "layer_norm.bias")]
    return names


def convnext_from_hf(state_dict: Mapping[str, torch.Tensor], config: DINOv3ConvNextConfig) -> StateDict:
    """Transformers' DINOv3ConvNextModel layout -> dino3's: a renaming, no tensor changes."""
    sd = normalize_hf_keys(state_dict)
    return {ours: sd[theirs] for ours, theirs in _convnext_names(config)}


def convnext_to_hf(state_dict: Mapping[str, torch.Tensor], config: DINOv3ConvNextConfig) -> StateDict:
    return {theirs: state_dict[ours] for ours, theirs in _convnext_names(config)}


def _copy_linear(src: Mapping, src_name: str, dst: dict, dst_name: str, bias: bool) -> None:
    dst[dst_name + ".weight"] = src[src_name + ".weight"]
    if bias:
        dst[dst_name + ".bias"] = src[src_name + ".bias"]


# -- registry ---------------------------------------------------------------------------------------
Converter = Callable[[Mapping[str, torch.Tensor], _Config], StateDict]
_HF_CONVERTERS: dict[str, tuple[Converter, Converter]] = {
    "dinov3_vit": (vit_from_hf, vit_to_hf),
    "dinov3_convnext": (convnext_from_hf, convnext_to_hf),
}


def from_hf(state_dict: Mapping[str, torch.Tensor], config: _Config) -> StateDict:
    return _HF_CONVERTERS[config.model_type][0](state_dict, config)


def to_hf(state_dict: Mapping[str, torch.Tensor], config: _Config) -> StateDict:
    return _HF_CONVERTERS[config.model_type][1](state_dict, config)


def normalize_hf_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop the `model.` encoder prefix of current Transformers' in-memory names."""
    return {_HF_ENCODER_PREFIX.sub("", k): v for k, v in state_dict.items()}


# -- strict checking --------------------------------------------------------------------------------
def check_state_dict(
    found: Mapping[str, torch.Size | tuple[int, ...]],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    source: str,
    hint: str = "",
) -> None:
    """Raise a CheckpointError naming every missing, unexpected and mis-shaped key, if any."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {tuple(found[k])}, model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    matched = len(expected) - len(missing) - len(mismatched)
    lines = [f"{source} does not match the model: {matched} of {len(expected)} tensors fit."]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            shown = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            lines.append(f"  {len(keys)} {title}:\n    {shown}{more}")
    if hint:
        lines.append(hint)
    raise CheckpointError("\n".join(lines))
