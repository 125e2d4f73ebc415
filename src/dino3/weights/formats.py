"""Checkpoint layouts: the one place that knows how other projects name and shape the weights.

dino3's modules use their own layout (fused qkv, fused SwiGLU gate+up). Each architecture has one
table that gives, for every dino3 tensor, how each foreign layout stores it; the same table converts
in both directions and says which tensors and shapes a file in that layout must hold. A cell is:

- a name: the same tensor under that name;
- `Joined(a, b, ...)`: the dino3 tensor is those tensors one after the other (Transformers' q, k, v);
- `PartOf(name, j, n)`: the dino3 tensor is part j of n of that tensor (Meta's q and v biases in one
  qkv bias, whose key part is ignored on reading and written as zeros);
- `Reshaped(name, shape)`: the same values in another shape (Meta's (1, D) mask token);
- `NonEmpty(name)`: stored only when it has elements (Meta's and timm's register tokens);
- `ABSENT`: not stored (timm's mask token, a training-only input): zeros on reading, dropped on writing.

Layouts may also hold tensors dino3 has no use for (`Extra`): Meta's key-bias mask, RoPE periods and
unused norms. They are checked or ignored on reading, and made on writing where the layout needs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DINOv3ConvNextConfig, DINOv3TextConfig, DINOv3ViTConfig, _Config
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]
Shape = tuple[int, ...]

LAYOUTS = ("hf", "meta", "timm")
LAYOUT_NAMES = {"hf": "Hugging Face", "meta": "Meta (original)", "timm": "timm"}

# Current Transformers keeps the blocks in a child module called "model" (model.layer.N / model.stages.N)
# and renames the hub's unprefixed keys on load. Both spellings are accepted.
_HF_ENCODER_PREFIX = re.compile(r"^model\.(?=layer\.|stages\.)")


# -- cells ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Joined:
    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        object.__setattr__(self, "names", names)


@dataclass(frozen=True)
class PartOf:
    name: str
    index: int
    count: int


@dataclass(frozen=True)
class Reshaped:
    name: str
    shape: Callable[[Shape], Shape]  # dino3's shape -> this layout's


@dataclass(frozen=True)
class NonEmpty:
    name: str


ABSENT = None
Cell = Any  # str | Joined | PartOf | Reshaped | NonEmpty | None


@dataclass(frozen=True)
class Row:
    ours: str
    cells: dict[str, Cell]  # layout -> cell; a layout missing here cannot store this tensor


@dataclass(frozen=True)
class Extra:
    """A tensor a layout holds that dino3 does not: `make` builds it when writing (None: never
    written); `check` validates it when reading (it is then dropped, or kept as an extra)."""

    name: str  # or, with prefix=True, the start of the names of a group of tensors
    make: Callable[[StateDict, _Config], torch.Tensor] | None = None
    check: Callable[[torch.Tensor, str], None] | None = None
    shape: Callable[[dict[str, Shape]], Shape] | None = None  # set for the ones a file must hold
    prefix: bool = False


class OptionalKeys:
    """Names a file may hold or not: exact names, and groups named by a prefix."""

    def __init__(self, names: set[str], prefixes: tuple[str, ...]) -> None:
        self.names, self.prefixes = names, prefixes

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self.names or key.startswith(self.prefixes))


# -- the ViT table -----------------------------------------------------------------------------------------
def _drop_middle_dim(shape: Shape) -> Shape:
    return (shape[0], shape[-1])


def _same(name: str) -> dict[str, str]:
    return {"meta": name, "timm": name}


_VIT_ROWS = [
    # ours                          Hugging Face                                 Meta / timm
    ("cls_token", {"hf": "embeddings.cls_token", **_same("cls_token")}),
    (
        "mask_token",
        {"hf": "embeddings.mask_token", "meta": Reshaped("mask_token", _drop_middle_dim), "timm": ABSENT},
    ),
    (
        "register_tokens",
        {"hf": "embeddings.register_tokens", "meta": NonEmpty("storage_tokens"), "timm": NonEmpty("reg_token")},
    ),
    ("patch_embed.weight", {"hf": "embeddings.patch_embeddings.weight", **_same("patch_embed.proj.weight")}),
    ("patch_embed.bias", {"hf": "embeddings.patch_embeddings.bias", **_same("patch_embed.proj.bias")}),
    ("norm.weight", {"hf": "norm.weight", **_same("norm.weight")}),
    ("norm.bias", {"hf": "norm.bias", **_same("norm.bias")}),
    ("blocks.{i}.norm1.weight", {"hf": "layer.{i}.norm1.weight", **_same("blocks.{i}.norm1.weight")}),
    ("blocks.{i}.norm1.bias", {"hf": "layer.{i}.norm1.bias", **_same("blocks.{i}.norm1.bias")}),
    ("blocks.{i}.norm2.weight", {"hf": "layer.{i}.norm2.weight", **_same("blocks.{i}.norm2.weight")}),
    ("blocks.{i}.norm2.bias", {"hf": "layer.{i}.norm2.bias", **_same("blocks.{i}.norm2.bias")}),
    (
        "blocks.{i}.attn.qkv.weight",
        {
            "hf": Joined(*(f"layer.{{i}}.attention.{n}_proj.weight" for n in "qkv")),
            **_same("blocks.{i}.attn.qkv.weight"),
        },
    ),
    (
        "blocks.{i}.attn.q_bias",
        {
            "hf": "layer.{i}.attention.q_proj.bias",
            "meta": PartOf("blocks.{i}.attn.qkv.bias", 0, 3),
            "timm": "blocks.{i}.attn.q_bias",
        },
    ),
    # Meta masks the key bias to zero and timm has none: only the Hugging Face layout can store one.
    ("blocks.{i}.attn.k_bias", {"hf": "layer.{i}.attention.k_proj.bias"}),
    (
        "blocks.{i}.attn.v_bias",
        {
            "hf": "layer.{i}.attention.v_proj.bias",
            "meta": PartOf("blocks.{i}.attn.qkv.bias", 2, 3),
            "timm": "blocks.{i}.attn.v_bias",
        },
    ),
    (
        "blocks.{i}.attn.proj.weight",
        {"hf": "layer.{i}.attention.o_proj.weight", **_same("blocks.{i}.attn.proj.weight")},
    ),
    ("blocks.{i}.attn.proj.bias", {"hf": "layer.{i}.attention.o_proj.bias", **_same("blocks.{i}.attn.proj.bias")}),
    (
        "blocks.{i}.ls1",
        {"hf": "layer.{i}.layer_scale1.lambda1", "meta": "blocks.{i}.ls1.gamma", "timm": "blocks.{i}.gamma_1"},
    ),
    (
        "blocks.{i}.ls2",
        {"hf": "layer.{i}.layer_scale2.lambda1", "meta": "blocks.{i}.ls2.gamma", "timm": "blocks.{i}.gamma_2"},
    ),
]
# The MLP: gated (SwiGLU: fc1 = [gate; up]) or plain.
_VIT_GATED_ROWS = [
    (
        f"blocks.{{i}}.mlp.fc1.{leaf}",
        {
            "hf": Joined(f"layer.{{i}}.mlp.gate_proj.{leaf}", f"layer.{{i}}.mlp.up_proj.{leaf}"),
            "meta": Joined(f"blocks.{{i}}.mlp.w1.{leaf}", f"blocks.{{i}}.mlp.w2.{leaf}"),
            "timm": Joined(f"blocks.{{i}}.mlp.fc1_g.{leaf}", f"blocks.{{i}}.mlp.fc1_x.{leaf}"),
        },
    )
    for leaf in ("weight", "bias")
] + [
    (
        f"blocks.{{i}}.mlp.fc2.{leaf}",
        {
            "hf": f"layer.{{i}}.mlp.down_proj.{leaf}",
            "meta": f"blocks.{{i}}.mlp.w3.{leaf}",
            "timm": f"blocks.{{i}}.mlp.fc2.{leaf}",
        },
    )
    for leaf in ("weight", "bias")
]
_VIT_PLAIN_ROWS = [
    (f"blocks.{{i}}.mlp.fc1.{leaf}", {"hf": f"layer.{{i}}.mlp.up_proj.{leaf}", **_same(f"blocks.{{i}}.mlp.fc1.{leaf}")})
    for leaf in ("weight", "bias")
] + [
    (
        f"blocks.{{i}}.mlp.fc2.{leaf}",
        {"hf": f"layer.{{i}}.mlp.down_proj.{leaf}", **_same(f"blocks.{{i}}.mlp.fc2.{leaf}")},
    )
    for leaf in ("weight", "bias")
]


def _meta_bias_mask(state_dict: StateDict, config: DINOv3ViTConfig, i: int) -> torch.Tensor:
    q = state_dict[f"blocks.{i}.attn.q_bias"]
    return torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)])


def _check_bias_mask(mask: torch.Tensor, name: str) -> None:
    third = mask.shape[0] // 3
    expected = torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)])
    if mask.device.type != "meta" and not torch.equal(mask.float().cpu(), expected):
        raise CheckpointError(
            f"{name} is not Meta's key-bias mask (ones for q and v, zeros for k): the checkpoint may be "
            "corrupt or from a variant dino3 does not know; it is not silently fixed"
        )


def meta_rope_periods(config: DINOv3ViTConfig, device=None) -> torch.Tensor:
    """Meta's RoPE `periods` buffer: base ** (2 j / (head_dim / 2)), angles = coordinate / period."""
    head_dim = config.head_dim
    return config.rope_theta ** (2 * torch.arange(head_dim // 4, dtype=torch.float32, device=device) / (head_dim // 2))


def _vit_extras(config: DINOv3ViTConfig, layout: str) -> list[Extra]:
    if layout != "meta":
        return []
    extras = [
        Extra("rope_embed.periods", make=lambda sd, c: meta_rope_periods(c, sd["cls_token"].device)),
        # The SAT ViT-L and the 7B models carry a second final norm that Meta never uses at inference.
        Extra("local_cls_norm.weight"),
        Extra("local_cls_norm.bias"),
        Extra("projectors.", prefix=True),  # EUPE's distillation heads, not part of the backbone
    ]
    if config.query_bias:
        for i in range(config.num_hidden_layers):
            extras.append(
                Extra(
                    f"blocks.{i}.attn.qkv.bias_mask",
                    make=lambda sd, c, i=i: _meta_bias_mask(sd, c, i),
                    check=_check_bias_mask,
                    shape=lambda required, i=i: required[f"blocks.{i}.attn.qkv.bias"],
                )
            )
    return extras


def _vit_rows(config: DINOv3ViTConfig) -> list[Row]:
    patterns = _VIT_ROWS + (_VIT_GATED_ROWS if config.use_gated_mlp else _VIT_PLAIN_ROWS)
    rows = []
    for ours, cells in patterns:
        blocks = range(config.num_hidden_layers) if "{i}" in ours else [None]
        for i in blocks:
            rows.append(Row(_fill(ours, i), {layout: _fill_cell(cell, i) for layout, cell in cells.items()}))
    return rows


def _fill(name: str, i: int | None) -> str:
    return name if i is None else name.replace("{i}", str(i))


def _fill_cell(cell: Cell, i: int | None) -> Cell:
    if isinstance(cell, str):
        return _fill(cell, i)
    if isinstance(cell, Joined):
        return Joined(*(_fill(n, i) for n in cell.names))
    if isinstance(cell, PartOf):
        return PartOf(_fill(cell.name, i), cell.index, cell.count)
    if isinstance(cell, (Reshaped, NonEmpty)):
        return type(cell)(_fill(cell.name, i), *([cell.shape] if isinstance(cell, Reshaped) else []))
    return cell


# -- the ConvNeXt table: all three layouts are renamings -----------------------------------------------------
# Inside a block: dino3 name -> (Transformers, Meta, timm) name.
_CONVNEXT_BLOCK = {
    "dwconv": ("depthwise_conv", "dwconv", "conv_dw"),
    "norm": ("layer_norm", "norm", "norm"),
    "fc1": ("pointwise_conv1", "pwconv1", "mlp.fc1"),
    "fc2": ("pointwise_conv2", "pwconv2", "mlp.fc2"),
}


def _convnext_rows(config: DINOv3ConvNextConfig) -> list[Row]:
    rows = []
    for s, depth in enumerate(config.depths):
        for j in range(2):  # the downsampling: stage 0 conv + norm (the stem), later stages norm + conv
            theirs = {
                "hf": f"stages.{s}.downsample_layers.{j}",
                "meta": f"downsample_layers.{s}.{j}",
                "timm": f"stem.{j}" if s == 0 else f"stages.{s}.downsample.{j}",
            }
            for leaf in ("weight", "bias"):
                rows.append(Row(f"stages.{s}.downsample.{j}.{leaf}", {k: f"{v}.{leaf}" for k, v in theirs.items()}))
        for b in range(depth):
            prefix = {"hf": f"stages.{s}.layers.{b}.", "meta": f"stages.{s}.{b}.", "timm": f"stages.{s}.blocks.{b}."}
            for mine, other in _CONVNEXT_BLOCK.items():
                for leaf in ("weight", "bias"):
                    cells = {layout: f"{prefix[layout]}{other[c]}.{leaf}" for c, layout in enumerate(LAYOUTS)}
                    rows.append(Row(f"stages.{s}.blocks.{b}.{mine}.{leaf}", cells))
            rows.append(Row(f"stages.{s}.blocks.{b}.gamma", {layout: prefix[layout] + "gamma" for layout in LAYOUTS}))
    final = {"hf": "layer_norm", "meta": "norm", "timm": "head.norm"}
    for leaf in ("weight", "bias"):
        rows.append(Row(f"norm.{leaf}", {layout: f"{name}.{leaf}" for layout, name in final.items()}))
    return rows


def _convnext_extras(config: DINOv3ConvNextConfig, layout: str) -> list[Extra]:
    if layout != "meta":
        return []
    # Meta's state dicts name the final norm twice: `norm` and `norms.3`; EUPE's carry distillation heads.
    extras = [Extra(f"norms.3.{leaf}", make=lambda sd, c, leaf=leaf: sd[f"norm.{leaf}"]) for leaf in ("weight", "bias")]
    return extras + [Extra("projectors.", prefix=True)]


# -- the dino.txt table: the vision head and the text tower (the backbone is a ViT, stored apart) --------------
# Meta's names are those of its `DINOTxt` module (dinov3/eval/text): one file holds the vision head and
# the text tower, the backbone is the ViT's own file. dino3 saves the head and text tower under the same
# names, so only the Meta layout exists.
DINOTXT_PERIODS = "visual_model.backbone.rope_embed.periods"  # the backbone's RoPE periods, when saved here


def _dinotxt_rows(config: DINOv3TextConfig) -> list[Row]:
    pairs = [("logit_scale", "logit_scale")]
    for i in range(config.vision_num_blocks):
        ours, meta = f"vision_head.blocks.{i}.", f"visual_model.head.blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"):
            pairs.append((ours + name, meta + name))
        for name in ("norm2.weight", "norm2.bias"):
            pairs.append((ours + name, meta + name))
        pairs += [(ours + "ls1", meta + "ls1.gamma"), (ours + "ls2", meta + "ls2.gamma")]
        for leaf in ("weight", "bias"):  # SwiGLU: fc1 = [gate (w1); up (w2)], fc2 = w3
            pairs.append((ours + f"mlp.fc1.{leaf}", Joined(meta + f"mlp.w1.{leaf}", meta + f"mlp.w2.{leaf}")))
            pairs.append((ours + f"mlp.fc2.{leaf}", meta + f"mlp.w3.{leaf}"))
    pairs += [(f"vision_head.norm.{leaf}", f"visual_model.head.ln_final.{leaf}") for leaf in ("weight", "bias")]
    pairs.append(("vision_head.projection.weight", "visual_model.head.linear_projection.weight"))
    text = "text_model.backbone."
    pairs += [("text.token_embedding.weight", text + "token_embedding.weight")]
    pairs += [("text.position_embedding", text + "positional_embedding")]
    block = {
        "norm1": "attention_norm",
        "qkv": "attention.qkv",
        "proj": "attention.proj",
        "norm2": "ffn_norm",
        "fc1": "feed_forward.fc1",
        "fc2": "feed_forward.fc2",
    }
    for j in range(config.text_num_hidden_layers):
        for ours, meta in block.items():
            for leaf in ("weight", "bias"):
                pairs.append((f"text.blocks.{j}.{ours}.{leaf}", f"{text}blocks.{j}.{meta}.{leaf}"))
        pairs += [(f"text.blocks.{j}.ls{k}", f"{text}blocks.{j}.ls{k}.gamma") for k in (1, 2)]
    pairs += [(f"text.norm.{leaf}", f"{text}ln_final.{leaf}") for leaf in ("weight", "bias")]
    pairs.append(("text.projection.weight", "text_model.head.linear_projection.weight"))
    return [Row(ours, {"meta": meta}) for ours, meta in pairs]


def _dinotxt_extras(config: DINOv3TextConfig, layout: str) -> list[Extra]:
    return [Extra(DINOTXT_PERIODS)] if layout == "meta" else []


# -- the tables, by architecture ----------------------------------------------------------------------------
_TABLES: dict[str, tuple[Callable[[Any], list[Row]], Callable[[Any, str], list[Extra]]]] = {
    DINOv3ViTConfig.model_type: (_vit_rows, _vit_extras),
    DINOv3ConvNextConfig.model_type: (_convnext_rows, _convnext_extras),
    DINOv3TextConfig.model_type: (_dinotxt_rows, _dinotxt_extras),
}


def _table(config: _Config, layout: str, ours: Mapping[str, Any]) -> tuple[list[Row], list[Extra]]:
    """The rows for the tensors this model has, and the layout's extras."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rows_of, extras_of = _TABLES[config.model_type]
    rows = [row for row in rows_of(config) if row.ours in ours]
    missing = set(ours) - {row.ours for row in rows}
    if missing:  # pragma: no cover (a table that lags behind its model)
        raise AssertionError(f"the {config.model_type} table has no row for {sorted(missing)[:5]}")
    return rows, extras_of(config, layout)


def _not_storable(row: Row, layout: str) -> CheckpointError:
    return CheckpointError(
        f"the {LAYOUT_NAMES[layout]} layout cannot store {row.ours} (this model has a tensor that layout has no "
        "place for, such as a key bias); write it in the Hugging Face layout"
    )


# -- shapes a file must hold ----------------------------------------------------------------------------------
def expected_shapes(ours: Mapping[str, Shape], config: _Config, layout: str) -> tuple[dict[str, Shape], OptionalKeys]:
    """(required keys -> shapes, optional keys) of a file in `layout` for a model whose own tensors
    have the shapes `ours`."""
    rows, extras = _table(config, layout, ours)
    required: dict[str, Shape] = {}
    for row in rows:
        if layout not in row.cells:
            continue  # the model has a tensor this layout cannot hold: an error only when writing
        shape, cell = tuple(ours[row.ours]), row.cells[layout]
        if isinstance(cell, str):
            required[cell] = shape
        elif isinstance(cell, Joined):
            part = (shape[0] // len(cell.names), *shape[1:])
            for name in cell.names:
                required[name] = part
        elif isinstance(cell, PartOf):
            required[cell.name] = (shape[0] * cell.count, *shape[1:])
        elif isinstance(cell, Reshaped):
            required[cell.name] = tuple(cell.shape(shape))
        elif isinstance(cell, NonEmpty) and _numel(shape):
            required[cell.name] = shape
    names, prefixes = set(), []
    for extra in extras:
        if extra.shape is not None:
            required[extra.name] = tuple(extra.shape(required))
        elif extra.prefix:
            prefixes.append(extra.name)
        else:
            names.add(extra.name)
    return required, OptionalKeys(names, tuple(prefixes))


def _numel(shape: Shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


# -- reading and writing -----------------------------------------------------------------------------------
def normalize_hf_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `model.` encoder prefix of current Transformers' in-memory names."""
    return {_HF_ENCODER_PREFIX.sub("", k): v for k, v in state_dict.items()}


def to_dino3(
    state_dict: Mapping[str, torch.Tensor],
    ours: Mapping[str, Shape],
    config: _Config,
    layout: str = "hf",
    consume: bool = False,
) -> tuple[StateDict, StateDict]:
    """A checked state dict in `layout` -> (dino3's state dict, the layout's extras it held).

    `ours` gives the shapes of dino3's tensors (a model built on the meta device tells them).
    consume=True empties `state_dict` as it goes, so that the parts of each fused tensor (q, k, v;
    gate, up) are freed as soon as it is made: loading then never holds two copies of the weights.
    """
    source = dict(normalize_hf_keys(state_dict) if layout == "hf" else state_dict)
    if consume and isinstance(state_dict, dict):
        state_dict.clear()
    rows, extras = _table(config, layout, ours)
    floating = next((t for t in source.values() if t.is_floating_point()), torch.empty(0))
    out: StateDict = {}
    for row in rows:
        if layout not in row.cells:
            raise _not_storable(row, layout)
        cell = row.cells[layout]
        shape = tuple(ours[row.ours])
        if isinstance(cell, str):
            out[row.ours] = source.pop(cell)
        elif isinstance(cell, Joined):
            out[row.ours] = torch.cat([source.pop(name) for name in cell.names])
        elif isinstance(cell, PartOf):
            whole = source[cell.name]
            out[row.ours] = whole.chunk(cell.count)[cell.index].clone()
        elif isinstance(cell, Reshaped):
            out[row.ours] = source.pop(cell.name).reshape(shape)
        elif isinstance(cell, NonEmpty) and _numel(shape):
            out[row.ours] = source.pop(cell.name)
        else:  # ABSENT, or an empty NonEmpty: zeros, Transformers' initial value
            out[row.ours] = torch.zeros(shape, dtype=floating.dtype, device=floating.device)
    for row in rows:  # the whole tensors that PartOf cells read from
        cell = row.cells.get(layout)
        if isinstance(cell, PartOf):
            source.pop(cell.name, None)
    kept: StateDict = {}
    for extra in extras:
        if extra.prefix:  # a group the backbone does not use: dropped
            for key in [k for k in source if k.startswith(extra.name)]:
                source.pop(key)
        elif extra.name in source:
            tensor = source.pop(extra.name)
            if extra.check is not None:
                extra.check(tensor, extra.name)
            kept[extra.name] = tensor
    return out, kept


def from_dino3(state_dict: Mapping[str, torch.Tensor], config: _Config, layout: str = "hf") -> StateDict:
    """dino3's own layout -> `layout` (with the extras that layout's own loaders expect)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    rows, extras = _table(config, layout, shapes)
    out: StateDict = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        if layout not in row.cells:
            raise _not_storable(row, layout)
        cell, tensor = row.cells[layout], state_dict[row.ours]
        if isinstance(cell, str):
            out[cell] = tensor
        elif isinstance(cell, Joined):
            for name, part in zip(cell.names, tensor.chunk(len(cell.names))):
                out[name] = part.clone()
        elif isinstance(cell, PartOf):
            parts.setdefault(cell.name, {})[cell.index] = tensor
            counts[cell.name] = cell.count
        elif isinstance(cell, Reshaped):
            out[cell.name] = tensor.reshape(cell.shape(tuple(tensor.shape)))
        elif isinstance(cell, NonEmpty) and tensor.numel():
            out[cell.name] = tensor
    for name, pieces in parts.items():  # parts no row gives (Meta's key bias) are zeros
        like = next(iter(pieces.values()))
        out[name] = torch.cat([pieces.get(j, torch.zeros_like(like)) for j in range(counts[name])])
    for extra in extras:
        if extra.make is not None and not extra.prefix:
            out[extra.name] = extra.make(dict(state_dict), config)
    return out


def to_hf(state_dict: Mapping[str, torch.Tensor], config: _Config) -> StateDict:
    return from_dino3(state_dict, config, "hf")
