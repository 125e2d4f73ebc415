"""What a bare state dict is: its layout, its architecture, and whether it fits a model, strictly.

`unwrap` takes the tensors out of the usual checkpoint wrappers; `detect_layout` names the layout
from the key names; `signature` reads the architecture's sizes off the tensor shapes, which
`infer_config` matches against the presets (a file without a config.json), and `check_config`
compares with a config before any model is built or any tensor read; `check_shapes` compares a
file's keys and shapes with what the model needs and reports every difference at once.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import DINOv3ConvNextConfig, DINOv3ViTConfig, _Config
from ..errors import CheckpointError, ConfigError
from ..presets import LVD, Preset, all_presets, preset_for_meta_file
from .formats import LAYOUT_NAMES, normalize_hf_keys

Shape = tuple[int, ...]
_WRAPPERS = ("model", "state_dict", "teacher", "model_ema", "module")


def unwrap(checkpoint: Any) -> dict:
    """The tensors of a checkpoint, out of the usual wrappers ({"model": ...}, {"teacher": ...}) and
    prefixes ("backbone.", "module.")."""
    import torch

    while isinstance(checkpoint, Mapping):
        inner = [k for k in _WRAPPERS if isinstance(checkpoint.get(k), Mapping)]
        if not inner or any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            break
        checkpoint = checkpoint[inner[0]]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"the file holds a {type(checkpoint).__name__}, not a state dict of tensors")
    others = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if others:
        raise CheckpointError(f"the state dict holds entries that are not named tensors: {others[:10]}")
    if not checkpoint:
        raise CheckpointError("the file holds no tensors")
    state_dict = dict(checkpoint)
    for prefix in ("module.", "backbone.", "teacher.backbone."):
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    """(layout, model_type) of a state dict, from its key names."""
    keys = set(normalize_hf_keys(dict.fromkeys(keys)))
    vit, convnext = DINOv3ViTConfig.model_type, DINOv3ConvNextConfig.model_type
    if "embeddings.cls_token" in keys:
        return "hf", vit
    if "stages.0.downsample_layers.0.weight" in keys:
        return "hf", convnext
    if "cls_token" in keys and "blocks.0.ls1.gamma" in keys:
        return "meta", vit
    if "cls_token" in keys and "blocks.0.gamma_1" in keys:
        return "timm", vit
    if "downsample_layers.0.0.weight" in keys:
        return "meta", convnext
    if "stem.0.weight" in keys and "stages.0.blocks.0.conv_dw.weight" in keys:
        return "timm", convnext
    shown = ", ".join(sorted(keys)[:8])
    raise CheckpointError(
        f"not a DINOv3 checkpoint in a layout dino3 knows (Hugging Face, Meta or timm); its keys begin: {shown}"
    )


# -- sizes from shapes ------------------------------------------------------------------------------------------
_VIT_NAMES = {
    # what:     Hugging Face,                          Meta,                      timm
    "cls": ("embeddings.cls_token", "cls_token", "cls_token"),
    "registers": ("embeddings.register_tokens", "storage_tokens", "reg_token"),
    "patch": ("embeddings.patch_embeddings.weight", "patch_embed.proj.weight", "patch_embed.proj.weight"),
    "block": ("layer.", "blocks.", "blocks."),
    "up": (("mlp.up_proj.weight",), ("mlp.w2.weight", "mlp.fc1.weight"), ("mlp.fc1_x.weight", "mlp.fc1.weight")),
    "gate": ("mlp.gate_proj.weight", "mlp.w1.weight", "mlp.fc1_g.weight"),
    "q_bias": ("attention.q_proj.bias", "attn.qkv.bias", "attn.q_bias"),
}
_COLUMN = {"hf": 0, "meta": 1, "timm": 2}
_CONVNEXT_DWCONV = {
    "hf": re.compile(r"^stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.weight$"),
    "meta": re.compile(r"^stages\.(\d+)\.(\d+)\.dwconv\.weight$"),
    "timm": re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$"),
}


def signature(shapes: Mapping[str, Shape], layout: str, model_type: str) -> dict[str, Any]:
    """The architecture's sizes that a state dict's shapes show (all but the number of heads)."""
    shapes = normalize_hf_keys(shapes) if layout == "hf" else shapes
    if model_type == DINOv3ConvNextConfig.model_type:
        blocks: dict[int, list[Shape]] = {}
        for key, shape in shapes.items():
            match = _CONVNEXT_DWCONV[layout].match(key)
            if match:
                blocks.setdefault(int(match.group(1)), []).append(shape)
        stages = sorted(blocks)
        return {"depths": [len(blocks[s]) for s in stages], "hidden_sizes": [blocks[s][0][0] for s in stages]}
    name = {k: v[_COLUMN[layout]] for k, v in _VIT_NAMES.items()}
    first = name["block"] + "0."
    depth = len({k[len(name["block"]) :].split(".")[0] for k in shapes if k.startswith(name["block"])})
    try:
        up = next(shapes[first + k] for k in name["up"] if first + k in shapes)
        registers = shapes.get(name["registers"])
        return {
            "hidden_size": shapes[name["cls"]][-1],
            "num_hidden_layers": depth,
            "intermediate_size": up[0],
            "use_gated_mlp": first + name["gate"] in shapes,
            "query_bias": first + name["q_bias"] in shapes,
            "num_register_tokens": registers[1] if registers is not None and len(registers) == 3 else 0,
            "patch_size": shapes[name["patch"]][-1],
        }
    except (KeyError, StopIteration, IndexError):
        raise CheckpointError(
            f"the tensors do not describe a DINOv3 ViT in the {LAYOUT_NAMES[layout]} layout "
            "(no cls token, patch embedding or first block)"
        ) from None


def config_signature(config: _Config) -> dict[str, Any]:
    """The same sizes, as a config gives them."""
    if config.model_type == DINOv3ConvNextConfig.model_type:
        return {"depths": list(config.depths), "hidden_sizes": list(config.hidden_sizes)}
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "use_gated_mlp": config.use_gated_mlp,
        "query_bias": config.query_bias,
        "num_register_tokens": config.num_register_tokens,
        "patch_size": config.patch_size,
    }


def check_config(config: _Config, shapes: Mapping[str, Shape], layout: str, model_type: str, source: str) -> None:
    """Refuse at once a config of another architecture, or one that asks for far more blocks than the
    file holds: building such a model only to list what is missing would take minutes (a config.json
    that says a million blocks is refused in milliseconds). Smaller differences are reported in full
    by `check_shapes`."""
    if config.model_type != model_type:
        raise CheckpointError(
            f"{source} is a {model_type} checkpoint, not {config.model_type}; load it with dino3.load(), "
            "which picks the model class from the file"
        )
    found = signature(shapes, layout, model_type)
    if model_type == DINOv3ConvNextConfig.model_type:
        asked, held, what = sum(config.depths), sum(found["depths"]), "blocks (sum of depths)"
    else:
        asked, held, what = config.num_hidden_layers, found["num_hidden_layers"], "blocks (num_hidden_layers)"
    if asked > 4 * held + 8:
        raise CheckpointError(
            f"{source} does not match its config: the config asks for {asked} {what}, the file holds {held}"
        )


# Sizes a bare file does not show, from the DINOv3 family's own conventions.
_HEAD_DIM = 64  # every DINOv3 and EUPE ViT, but the 7B's
_WIDE_HEAD_DIM, _WIDE = 128, 4096  # the 7B: width 4096, 32 heads of 128


def infer_config(
    shapes: Mapping[str, Shape], layout: str, model_type: str, file_name: str = ""
) -> tuple[_Config, Preset | None]:
    """(config, preset) for a state dict without a config.json, from its tensor shapes.

    A known checkpoint whose architecture the shapes show gives its preset: an exact Meta file name
    picks its own; otherwise the file name picks between presets of one architecture (SAT-493M, EUPE),
    LVD-1689M DINOv3 first. timm's default DINOv3 files drop the q/v biases (they are zero): such a
    file matches its preset with the biases off. Shapes that match no preset but describe a valid
    DINOv3-architecture model (another distilled size, a fine-tune of another width) give a config
    built from the tensors alone, and no preset; see `config_from_tensors`.
    """
    found = signature(shapes, layout, model_type)
    candidates = [p for p in all_presets() if p.config_class.model_type == model_type]
    loose = _without_biases(found)
    matches = [p for p in candidates if _without_biases(config_signature(p.make_config())) == loose]
    if not matches:
        return config_from_tensors(shapes, layout, model_type, found), None
    name = Path(file_name).name.lower()
    exact = preset_for_meta_file(Path(file_name).name)

    def rank(p: Preset) -> tuple:  # the exact Meta name; a name that says EUPE or SAT; plain DINOv3 LVD
        family = p.family != "DINOv3" and p.family.lower() in name
        dataset = p.dataset != LVD and p.dataset.lower().replace("-", "") in name
        return (p is exact, family, dataset, p.family == "DINOv3" and p.dataset == LVD)

    preset = max(matches, key=rank)
    config = preset.make_config()
    if model_type == DINOv3ViTConfig.model_type and found["query_bias"] != config.query_bias:
        config = config.replace(query_bias=found["query_bias"], value_bias=found["query_bias"])
    return config, preset


def _without_biases(sizes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sizes.items() if k != "query_bias"}


def config_from_tensors(
    shapes: Mapping[str, Shape], layout: str, model_type: str, found: dict[str, Any] | None = None
) -> _Config:
    """A config built from the tensors alone. Everything but the number of heads shows in the shapes;
    the heads come from Meta's RoPE `periods` (head_dim / 4 values) when the file has them, else from
    the family's head size (64; 128 for width 4096, the 7B's). Pass config= to say otherwise."""
    found = found or signature(shapes, layout, model_type)
    try:
        if model_type == DINOv3ConvNextConfig.model_type:
            return DINOv3ConvNextConfig(depths=found["depths"], hidden_sizes=found["hidden_sizes"])
        width = found["hidden_size"]
        periods = shapes.get("rope_embed.periods")
        head_dim = 4 * periods[0] if periods else (_WIDE_HEAD_DIM if width >= _WIDE else _HEAD_DIM)
        gated = found["use_gated_mlp"]
        return DINOv3ViTConfig(
            **{k: v for k, v in found.items() if k != "query_bias"},
            num_attention_heads=width // head_dim if width % head_dim == 0 else 0,
            hidden_act="silu" if gated else "gelu",
            query_bias=found["query_bias"],
            value_bias=found["query_bias"],
            key_bias=False,
        )
    except (ConfigError, KeyError, TypeError, IndexError) as e:
        described = ", ".join(f"{k}={v}" for k, v in found.items())
        raise CheckpointError(
            f"the tensors ({described}) match no known DINOv3 model and describe no valid one ({e}); "
            "pass config=DINOv3ViTConfig(...) or DINOv3ConvNextConfig(...) (or a preset name) describing it"
        ) from None


def check_shapes(
    found: Mapping[str, Shape],
    expected: Mapping[str, Shape],
    optional: Container[str],
    source: str,
    hint: str = "",
) -> None:
    """Raise a CheckpointError naming every missing, unexpected and mis-shaped key, if any. Keys in
    `optional` may be there or not."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in optional]
    mismatched = [
        f"{k}: file {tuple(found[k])}, model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    matched = sum(1 for k in expected if k in found and tuple(found[k]) == tuple(expected[k]))
    extra = sum(1 for k in found if k not in expected and k in optional)  # known tensors the layout may hold
    lines = [f"{source} does not match the model: {matched + extra} of {len(expected) + extra} tensors fit."]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            shown = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            lines.append(f"  {len(keys)} {title}:\n    {shown}{more}")
    if hint:
        lines.append(hint)
    raise CheckpointError("\n".join(lines))
