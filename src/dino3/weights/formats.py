"""Checkpoint layouts: the one place that knows how other projects name and shape the weights.

dino3's modules use their own layout (fused qkv, fused SwiGLU gate+up). Each foreign layout has one
function per direction that converts a whole state dict; nothing else in dino3 knows foreign names.
Loading is strict: `check_state_dict` compares a file's keys and shapes with what the config needs
and reports every missing, unexpected and mis-shaped tensor before anything is converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import DINOv3ConvNextConfig, DINOv3ViTConfig, _Config
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]
Converter = Callable[[Mapping[str, torch.Tensor], _Config], StateDict]

# Current Transformers keeps the blocks in a child module called "model" (model.layer.N / model.stages.N)
# and renames the hub's unprefixed keys on load. Both spellings are accepted.
_HF_ENCODER_PREFIX = re.compile(r"^model\.(?=layer\.|stages\.)")


# -- Hugging Face Transformers: ViT ---------------------------------------------------------------
def vit_from_hf(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """Transformers' DINOv3ViTModel layout -> dino3's. Expects a checked, complete state dict."""
    sd = state_dict
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


# -- ConvNeXt: all three layouts are renamings -----------------------------------------------------
# Inside a block: dino3 name -> (Transformers, Meta, timm) name.
_CONVNEXT_BLOCK = {
    "dwconv": ("depthwise_conv", "dwconv", "conv_dw"),
    "norm": ("layer_norm", "norm", "norm"),
    "fc1": ("pointwise_conv1", "pwconv1", "mlp.fc1"),
    "fc2": ("pointwise_conv2", "pwconv2", "mlp.fc2"),
}
_LAYOUT_COLUMN = {"hf": 0, "meta": 1, "timm": 2}


def _convnext_names(config: DINOv3ConvNextConfig, layout: str) -> list[tuple[str, str]]:
    """(dino3 key, key in `layout`) for every tensor of a ConvNeXt."""
    column = _LAYOUT_COLUMN[layout]
    names = []
    for s, depth in enumerate(config.depths):
        for j in range(2):  # the downsampling: stage 0 conv + norm (the stem), later stages norm + conv
            theirs = {
                "hf": f"stages.{s}.downsample_layers.{j}",
                "meta": f"downsample_layers.{s}.{j}",
                "timm": f"stem.{j}" if s == 0 else f"stages.{s}.downsample.{j}",
            }[layout]
            names += [(f"stages.{s}.downsample.{j}.{leaf}", f"{theirs}.{leaf}") for leaf in ("weight", "bias")]
        for b in range(depth):
            ours = f"stages.{s}.blocks.{b}."
            theirs = {"hf": f"stages.{s}.layers.{b}.", "meta": f"stages.{s}.{b}.", "timm": f"stages.{s}.blocks.{b}."}[
                layout
            ]
            for mine, other in _CONVNEXT_BLOCK.items():
                names += [(f"{ours}{mine}.{leaf}", f"{theirs}{other[column]}.{leaf}") for leaf in ("weight", "bias")]
            names.append((ours + "gamma", theirs + "gamma"))
    final = {"hf": "layer_norm", "meta": "norm", "timm": "head.norm"}[layout]
    names += [("norm.weight", f"{final}.weight"), ("norm.bias", f"{final}.bias")]
    return names


def convnext_from(layout: str) -> Converter:
    """ConvNeXt: `layout` -> dino3's, a renaming (Meta's `norms.3`, its second name for the final
    norm, is left out)."""

    def convert(state_dict: Mapping[str, torch.Tensor], config: DINOv3ConvNextConfig) -> StateDict:
        return {ours: state_dict[theirs] for ours, theirs in _convnext_names(config, layout)}

    return convert


def convnext_to(layout: str) -> Converter:
    """ConvNeXt: dino3's -> `layout` (with Meta's `norms.3` beside `norm`, as its state dicts have)."""

    def convert(state_dict: Mapping[str, torch.Tensor], config: DINOv3ConvNextConfig) -> StateDict:
        out = {theirs: state_dict[ours] for ours, theirs in _convnext_names(config, layout)}
        if layout == "meta":
            out["norms.3.weight"], out["norms.3.bias"] = out["norm.weight"], out["norm.bias"]
        return out

    return convert


# -- Meta's original layout: ViT ------------------------------------------------------------------
def vit_from_meta(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """Meta's DinoVisionTransformer layout -> dino3's.

    The qkv bias is stored whole with a `bias_mask` that zeroes its key part: the key part is
    dropped whatever it holds, and a mask that is not ones / zeros / ones is refused. The RoPE
    `periods` buffer and `local_cls_norm` (unused at inference) are not needed.
    """
    sd = state_dict
    D = config.hidden_size
    cls = sd["cls_token"]
    out: StateDict = {
        "cls_token": cls,
        "mask_token": sd["mask_token"].reshape(1, 1, D),
        "register_tokens": sd["storage_tokens"] if config.num_register_tokens else cls.new_zeros(1, 0, D),
        "patch_embed.weight": sd["patch_embed.proj.weight"],
        "patch_embed.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(config.num_hidden_layers):
        m, d3 = f"blocks.{i}.", f"blocks.{i}."
        out[d3 + "attn.qkv.weight"] = sd[m + "attn.qkv.weight"]
        if config.query_bias:
            _check_bias_mask(sd[m + "attn.qkv.bias_mask"], D, m + "attn.qkv.bias_mask")
            q, _, v = sd[m + "attn.qkv.bias"].chunk(3)
            out[d3 + "attn.q_bias"], out[d3 + "attn.v_bias"] = q, v
        _copy_linear(sd, m + "attn.proj", out, d3 + "attn.proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[d3 + n + ".weight"], out[d3 + n + ".bias"] = sd[m + n + ".weight"], sd[m + n + ".bias"]
        out[d3 + "ls1"], out[d3 + "ls2"] = sd[m + "ls1.gamma"], sd[m + "ls2.gamma"]
        if config.use_gated_mlp:  # w1 = gate, w2 = up, w3 = down
            out[d3 + "mlp.fc1.weight"] = torch.cat([sd[m + "mlp.w1.weight"], sd[m + "mlp.w2.weight"]])
            if config.mlp_bias:
                out[d3 + "mlp.fc1.bias"] = torch.cat([sd[m + "mlp.w1.bias"], sd[m + "mlp.w2.bias"]])
            _copy_linear(sd, m + "mlp.w3", out, d3 + "mlp.fc2", config.mlp_bias)
        else:
            _copy_linear(sd, m + "mlp.fc1", out, d3 + "mlp.fc1", config.mlp_bias)
            _copy_linear(sd, m + "mlp.fc2", out, d3 + "mlp.fc2", config.mlp_bias)
    return out


def vit_to_meta(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """dino3's ViT layout -> Meta's, with the `bias_mask` and RoPE `periods` buffers Meta's code loads."""
    _require_meta_biases(config)
    sd = state_dict
    D, head_dim = config.hidden_size, config.head_dim
    cls = sd["cls_token"]
    out: StateDict = {
        "cls_token": cls,
        "mask_token": sd["mask_token"].reshape(1, D),
        "patch_embed.proj.weight": sd["patch_embed.weight"],
        "patch_embed.proj.bias": sd["patch_embed.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        # Meta's RoPE: angles = coordinate / period, periods = base ** (2 j / (head_dim / 2))
        "rope_embed.periods": config.rope_theta
        ** (2 * torch.arange(head_dim // 4, dtype=torch.float32, device=cls.device) / (head_dim // 2)),
    }
    if config.num_register_tokens:
        out["storage_tokens"] = sd["register_tokens"]
    for i in range(config.num_hidden_layers):
        m, d3 = f"blocks.{i}.", f"blocks.{i}."
        out[m + "attn.qkv.weight"] = sd[d3 + "attn.qkv.weight"]
        if config.query_bias:
            q, v = sd[d3 + "attn.q_bias"], sd[d3 + "attn.v_bias"]
            out[m + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            ones = torch.ones_like(q)
            out[m + "attn.qkv.bias_mask"] = torch.cat([ones, torch.zeros_like(q), ones])
        _copy_linear(sd, d3 + "attn.proj", out, m + "attn.proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[m + n + ".weight"], out[m + n + ".bias"] = sd[d3 + n + ".weight"], sd[d3 + n + ".bias"]
        out[m + "ls1.gamma"], out[m + "ls2.gamma"] = sd[d3 + "ls1"], sd[d3 + "ls2"]
        if config.use_gated_mlp:
            gate, up = sd[d3 + "mlp.fc1.weight"].chunk(2)
            out[m + "mlp.w1.weight"], out[m + "mlp.w2.weight"] = gate.clone(), up.clone()
            if config.mlp_bias:
                gate, up = sd[d3 + "mlp.fc1.bias"].chunk(2)
                out[m + "mlp.w1.bias"], out[m + "mlp.w2.bias"] = gate.clone(), up.clone()
            _copy_linear(sd, d3 + "mlp.fc2", out, m + "mlp.w3", config.mlp_bias)
        else:
            _copy_linear(sd, d3 + "mlp.fc1", out, m + "mlp.fc1", config.mlp_bias)
            _copy_linear(sd, d3 + "mlp.fc2", out, m + "mlp.fc2", config.mlp_bias)
    return out


def _check_bias_mask(mask: torch.Tensor, dim: int, name: str) -> None:
    expected = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    if mask.device.type != "meta" and not torch.equal(mask.float().cpu(), expected):
        raise CheckpointError(
            f"{name} is not Meta's key-bias mask (ones for q and v, zeros for k): the checkpoint may be "
            "corrupt or from a variant dino3 does not know; it is not silently fixed"
        )


def _require_meta_biases(config: DINOv3ViTConfig) -> None:
    if config.key_bias or config.query_bias != config.value_bias:
        raise CheckpointError(
            "Meta's layout stores q/k/v biases together with the key part masked to zero; this model "
            f"(query_bias={config.query_bias}, key_bias={config.key_bias}, value_bias={config.value_bias}) "
            "cannot be written in it"
        )


# -- timm's layout: ViT (timm/models/eva.py, vit_*_patch16_dinov3*) ------------------------------
def vit_from_timm(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """timm's DINOv3 Eva layout -> dino3's. timm keeps no mask token (it only serves masked
    training); dino3 sets it to zeros, Transformers' initial value."""
    sd = state_dict
    D = config.hidden_size
    cls = sd["cls_token"]
    out: StateDict = {
        "cls_token": cls,
        "mask_token": cls.new_zeros(1, 1, D),
        "register_tokens": sd["reg_token"] if config.num_register_tokens else cls.new_zeros(1, 0, D),
        "patch_embed.weight": sd["patch_embed.proj.weight"],
        "patch_embed.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(config.num_hidden_layers):
        t = d3 = f"blocks.{i}."
        out[d3 + "attn.qkv.weight"] = sd[t + "attn.qkv.weight"]
        if config.query_bias:
            out[d3 + "attn.q_bias"], out[d3 + "attn.v_bias"] = sd[t + "attn.q_bias"], sd[t + "attn.v_bias"]
        _copy_linear(sd, t + "attn.proj", out, d3 + "attn.proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[d3 + n + ".weight"], out[d3 + n + ".bias"] = sd[t + n + ".weight"], sd[t + n + ".bias"]
        out[d3 + "ls1"], out[d3 + "ls2"] = sd[t + "gamma_1"], sd[t + "gamma_2"]
        if config.use_gated_mlp:  # fc1_g = gate, fc1_x = up
            out[d3 + "mlp.fc1.weight"] = torch.cat([sd[t + "mlp.fc1_g.weight"], sd[t + "mlp.fc1_x.weight"]])
            if config.mlp_bias:
                out[d3 + "mlp.fc1.bias"] = torch.cat([sd[t + "mlp.fc1_g.bias"], sd[t + "mlp.fc1_x.bias"]])
        else:
            _copy_linear(sd, t + "mlp.fc1", out, d3 + "mlp.fc1", config.mlp_bias)
        _copy_linear(sd, t + "mlp.fc2", out, d3 + "mlp.fc2", config.mlp_bias)
    return out


def vit_to_timm(state_dict: Mapping[str, torch.Tensor], config: DINOv3ViTConfig) -> StateDict:
    """dino3's ViT layout -> timm's (the mask token, a training-only input, has no place there)."""
    if config.key_bias or config.query_bias != config.value_bias:
        raise CheckpointError("timm's DINOv3 layout has q and v biases (or none) and no key bias; this model differs")
    sd = state_dict
    out: StateDict = {
        "cls_token": sd["cls_token"],
        "patch_embed.proj.weight": sd["patch_embed.weight"],
        "patch_embed.proj.bias": sd["patch_embed.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if config.num_register_tokens:
        out["reg_token"] = sd["register_tokens"]
    for i in range(config.num_hidden_layers):
        t = d3 = f"blocks.{i}."
        out[t + "attn.qkv.weight"] = sd[d3 + "attn.qkv.weight"]
        if config.query_bias:
            out[t + "attn.q_bias"], out[t + "attn.v_bias"] = sd[d3 + "attn.q_bias"], sd[d3 + "attn.v_bias"]
        _copy_linear(sd, d3 + "attn.proj", out, t + "attn.proj", config.proj_bias)
        for n in ("norm1", "norm2"):
            out[t + n + ".weight"], out[t + n + ".bias"] = sd[d3 + n + ".weight"], sd[d3 + n + ".bias"]
        out[t + "gamma_1"], out[t + "gamma_2"] = sd[d3 + "ls1"], sd[d3 + "ls2"]
        if config.use_gated_mlp:
            gate, up = sd[d3 + "mlp.fc1.weight"].chunk(2)
            out[t + "mlp.fc1_g.weight"], out[t + "mlp.fc1_x.weight"] = gate.clone(), up.clone()
            if config.mlp_bias:
                gate, up = sd[d3 + "mlp.fc1.bias"].chunk(2)
                out[t + "mlp.fc1_g.bias"], out[t + "mlp.fc1_x.bias"] = gate.clone(), up.clone()
        else:
            _copy_linear(sd, d3 + "mlp.fc1", out, t + "mlp.fc1", config.mlp_bias)
        _copy_linear(sd, d3 + "mlp.fc2", out, t + "mlp.fc2", config.mlp_bias)
    return out


def _copy_linear(src: Mapping, src_name: str, dst: dict, dst_name: str, bias: bool) -> None:
    dst[dst_name + ".weight"] = src[src_name + ".weight"]
    if bias:
        dst[dst_name + ".bias"] = src[src_name + ".bias"]


# -- registry ---------------------------------------------------------------------------------------
LAYOUTS = ("hf", "meta", "timm")
LAYOUT_NAMES = {"hf": "Hugging Face", "meta": "Meta (original)", "timm": "timm"}
# (model_type, layout) -> (that layout -> dino3's, dino3's -> that layout)
_CONVERTERS: dict[tuple[str, str], tuple[Converter, Converter]] = {
    ("dinov3_vit", "hf"): (vit_from_hf, vit_to_hf),
    ("dinov3_vit", "meta"): (vit_from_meta, vit_to_meta),
    ("dinov3_vit", "timm"): (vit_from_timm, vit_to_timm),
    **{("dinov3_convnext", layout): (convnext_from(layout), convnext_to(layout)) for layout in ("hf", "meta", "timm")},
}
# Keys a layout may carry that dino3 knows it does not need: they are checked by name and dropped.
_OPTIONAL = {
    "meta": re.compile(r"^(local_cls_norm\.(weight|bias)|rope_embed\.periods|norms\.3\.(weight|bias))$"),
}


def to_dino3(
    state_dict: Mapping[str, torch.Tensor], config: _Config, layout: str = "hf", consume: bool = False
) -> StateDict:
    """A checked state dict in `layout` -> dino3's own layout.

    consume=True empties `state_dict` as it goes, so that the parts of each fused tensor (q, k, v;
    gate, up) are freed as soon as it is made: loading then never holds two copies of the weights.
    """
    if not consume:
        state_dict = dict(state_dict)
    if layout == "hf":
        for key in [k for k in state_dict if _HF_ENCODER_PREFIX.match(k)]:
            state_dict[_HF_ENCODER_PREFIX.sub("", key)] = state_dict.pop(key)
    return _CONVERTERS[(config.model_type, layout)][0](_Taking(state_dict), config)


class _Taking(dict):
    """A view of a state dict whose lookups remove the entry (see to_dino3's consume)."""

    def __init__(self, source: dict) -> None:
        super().__init__()
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self.source

    def keys(self):
        return self.source.keys()

    def items(self):
        return self.source.items()


def from_dino3(state_dict: Mapping[str, torch.Tensor], config: _Config, layout: str = "hf") -> StateDict:
    """dino3's own layout -> `layout`."""
    return _CONVERTERS[(config.model_type, layout)][1](state_dict, config)


def from_hf(state_dict: Mapping[str, torch.Tensor], config: _Config) -> StateDict:
    return to_dino3(state_dict, config, "hf")


def to_hf(state_dict: Mapping[str, torch.Tensor], config: _Config) -> StateDict:
    return from_dino3(state_dict, config, "hf")


def is_optional(key: str, layout: str) -> bool:
    pattern = _OPTIONAL.get(layout)
    return bool(pattern and pattern.match(key))


def normalize_hf_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `model.` encoder prefix of current Transformers' in-memory names."""
    return {_HF_ENCODER_PREFIX.sub("", k): v for k, v in state_dict.items()}


# -- strict checking --------------------------------------------------------------------------------
def check_state_dict(
    found: Mapping[str, torch.Size | tuple[int, ...]],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    source: str,
    hint: str = "",
    layout: str = "hf",
) -> None:
    """Raise a CheckpointError naming every missing, unexpected and mis-shaped key, if any. Keys the
    layout may or may not carry (`is_optional`) are neither missing nor unexpected."""
    missing = [k for k in expected if k not in found and not is_optional(k, layout)]
    unexpected = [k for k in found if k not in expected and not is_optional(k, layout)]
    mismatched = [
        f"{k}: file {tuple(found[k])}, model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    matched = sum(1 for k in expected if k in found and tuple(found[k]) == tuple(expected[k]))
    lines = [f"{source} does not match the model: {matched} of {len(expected)} tensors fit."]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            shown = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            lines.append(f"  {len(keys)} {title}:\n    {shown}{more}")
    if hint:
        lines.append(hint)
    raise CheckpointError("\n".join(lines))


# -- recognising a bare state dict ----------------------------------------------------------------
_WRAPPERS = ("model", "state_dict", "teacher", "model_ema", "module")


def unwrap(checkpoint: Mapping) -> StateDict:
    """The tensors of a checkpoint, out of the usual wrappers ({"model": ...}, {"teacher": ...}) and
    prefixes ("backbone.", "module.")."""
    while isinstance(checkpoint, Mapping):
        inner = [k for k in _WRAPPERS if isinstance(checkpoint.get(k), Mapping)]
        if not inner or any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            break
        checkpoint = checkpoint[inner[0]]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"the file holds a {type(checkpoint).__name__}, not a state dict of tensors")
    others = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"the state dict holds entries that are not tensors: {others[:10]}")
    state_dict = dict(checkpoint)
    for prefix in ("module.", "backbone.", "teacher.backbone."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(keys) -> tuple[str, str]:
    """(layout, model_type) of a state dict, from its key names."""
    keys = set(normalize_hf_keys(dict.fromkeys(keys)))
    if "embeddings.cls_token" in keys:
        return "hf", "dinov3_vit"
    if "stages.0.downsample_layers.0.weight" in keys:
        return "hf", "dinov3_convnext"
    if "cls_token" in keys and "blocks.0.ls1.gamma" in keys:
        return "meta", "dinov3_vit"
    if "cls_token" in keys and "blocks.0.gamma_1" in keys:
        return "timm", "dinov3_vit"
    if "downsample_layers.0.0.weight" in keys:
        return "meta", "dinov3_convnext"
    if "stem.0.weight" in keys and "stages.0.blocks.0.conv_dw.weight" in keys:
        return "timm", "dinov3_convnext"
    shown = ", ".join(sorted(keys)[:8])
    raise CheckpointError(
        f"not a DINOv3 checkpoint in a layout dino3 knows (Hugging Face, Meta or timm); its keys begin: {shown}"
    )


def infer_config(state_dict: Mapping[str, torch.Tensor], layout: str, model_type: str, name: str = ""):
    """(config, preset) of the official checkpoint whose architecture the tensor shapes show.

    Shapes give the width, depth, MLP kind and biases but not the number of heads, so a state dict
    without a config must match an official model; `name` (the file name) picks between the LVD
    and SAT variants of one architecture.
    """
    from ..presets import PRESETS

    sd = normalize_hf_keys(state_dict) if layout == "hf" else state_dict
    signature = _vit_signature(sd, layout) if model_type == "dinov3_vit" else _convnext_signature(sd, layout)
    matches = [p for p in PRESETS.values() if _preset_signature(p) == signature]
    if not matches:
        described = ", ".join(f"{k}={v}" for k, v in signature.items())
        raise CheckpointError(
            f"the tensors ({described}) match no official DINOv3 model, and there is no config.json: "
            "pass config=DINOv3ViTConfig(...) or DINOv3ConvNextConfig(...) (or a preset name) describing it"
        )
    lowered = name.lower()
    preset = next((p for p in matches if p.meta_file.lower() == lowered), None)
    preset = preset or next((p for p in matches if "sat493m" in p.name and "sat493m" in lowered), None)
    preset = preset or next(p for p in matches if p.dataset == "LVD-1689M")
    return preset.make_config(), preset


def _vit_signature(sd: Mapping[str, torch.Tensor], layout: str) -> dict:
    cls = {"hf": "embeddings.cls_token"}.get(layout, "cls_token")
    registers = {"hf": "embeddings.register_tokens", "meta": "storage_tokens", "timm": "reg_token"}[layout]
    block = {"hf": "layer.{}."}.get(layout, "blocks.{}.")
    first = block.format(0)
    up = {
        "hf": ["mlp.up_proj.weight"],
        "meta": ["mlp.w2.weight", "mlp.fc1.weight"],
        "timm": ["mlp.fc1_x.weight", "mlp.fc1.weight"],
    }[layout]
    gated = {"hf": "mlp.gate_proj.weight", "meta": "mlp.w1.weight", "timm": "mlp.fc1_g.weight"}[layout]
    bias = {"hf": "attention.q_proj.bias", "meta": "attn.qkv.bias", "timm": "attn.q_bias"}[layout]
    patch = {"hf": "embeddings.patch_embeddings.weight"}.get(layout, "patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in sd if k.startswith(first.split(".")[0] + ".")})
    return {
        "hidden_size": sd[cls].shape[-1],
        "num_hidden_layers": depth,
        "intermediate_size": next(sd[first + k].shape[0] for k in up if first + k in sd),
        "use_gated_mlp": first + gated in sd,
        "query_bias": first + bias in sd,
        "num_register_tokens": sd[registers].shape[1] if registers in sd else 0,
        "patch_size": sd[patch].shape[-1],
    }


_CONVNEXT_DWCONV = {
    "hf": re.compile(r"^stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.weight$"),
    "meta": re.compile(r"^stages\.(\d+)\.(\d+)\.dwconv\.weight$"),
    "timm": re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$"),
}


def _convnext_signature(sd: Mapping[str, torch.Tensor], layout: str) -> dict:
    blocks: dict[int, list[torch.Tensor]] = {}
    for key, value in sd.items():
        match = _CONVNEXT_DWCONV[layout].match(key)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(value)
    stages = sorted(blocks)
    return {"depths": [len(blocks[s]) for s in stages], "hidden_sizes": [blocks[s][0].shape[0] for s in stages]}


def _preset_signature(preset) -> dict:
    config = preset.make_config()
    if config.model_type == "dinov3_vit":
        return {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "intermediate_size": config.intermediate_size,
            "use_gated_mlp": config.use_gated_mlp,
            "query_bias": config.query_bias,
            "num_register_tokens": config.num_register_tokens,
            "patch_size": config.patch_size,
        }
    return {"depths": config.depths, "hidden_sizes": config.hidden_sizes}
