"""The official DINOv3 checkpoints: short names, hub ids, Meta file names, architectures, normalisation.

Architectures are those of Transformers' conversion scripts, cross-checked against Meta's
`dinov3/hub/backbones.py`. The weights are Meta's, gated on the Hugging Face hub under the DINOv3
License; dino3 never ships them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from .errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Meta's README prescribes these for the SAT-493M (satellite) checkpoints. The Hugging Face copies of
# those checkpoints ship ImageNet statistics in their preprocessor_config.json; dino3's presets follow
# Meta, and a processor loaded from a hub folder follows that folder.
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

_VIT_COMMON = dict(
    patch_size=16,
    num_register_tokens=4,
    layer_norm_eps=1e-5,
    rope_theta=100.0,
    image_size=224,
    key_bias=False,
    proj_bias=True,
    mlp_bias=True,
    pos_embed_rescale=2.0,
)


@dataclass(frozen=True)
class Preset:
    """One official checkpoint."""

    name: str  # dino3's short name, e.g. "vits16" or "vitl16-sat493m"
    hub_id: str  # e.g. "facebook/dinov3-vits16-pretrain-lvd1689m"
    architecture: str  # "vit" or "convnext"
    config: dict[str, Any]  # the config fields that differ from the class defaults
    dataset: str  # "LVD-1689M" (web images) or "SAT-493M" (satellite images)
    meta_file: str  # the file name of Meta's original .pth, with its hash prefix
    params: str  # parameter count, as Meta's model card gives it
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    @property
    def meta_hash(self) -> str:
        """The 8 hex digits before `.pth`: the start of the file's SHA-256, as torch.hub checks."""
        return self.meta_file.rsplit("-", 1)[1].removesuffix(".pth")

    def make_config(self):
        from .config import DINOv3ConvNextConfig, DINOv3ViTConfig

        cls = DINOv3ViTConfig if self.architecture == "vit" else DINOv3ConvNextConfig
        return cls(**self.config)


def _vit(name, arch, dataset, file_hash, params, hidden, layers, heads, inter, gated, qv_bias=True):
    tag = "lvd1689m" if dataset == "LVD-1689M" else "sat493m"
    sat = dataset == "SAT-493M"
    return Preset(
        name=name,
        hub_id=f"facebook/dinov3-{arch}-pretrain-{tag}",
        architecture="vit",
        config=dict(
            _VIT_COMMON,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            use_gated_mlp=gated,
            hidden_act="silu" if gated else "gelu",
            query_bias=qv_bias,
            value_bias=qv_bias,
        ),
        dataset=dataset,
        meta_file=f"dinov3_{arch}_pretrain_{tag}-{file_hash}.pth",
        params=params,
        image_mean=SAT493M_MEAN if sat else IMAGENET_MEAN,
        image_std=SAT493M_STD if sat else IMAGENET_STD,
    )


def _convnext(size, file_hash, params, depths, hidden_sizes):
    return Preset(
        name=f"convnext-{size}",
        hub_id=f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m",
        architecture="convnext",
        config=dict(
            depths=depths,
            hidden_sizes=hidden_sizes,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            layer_scale_init_value=1e-6,
            image_size=224,
        ),
        dataset="LVD-1689M",
        meta_file=f"dinov3_convnext_{size}_pretrain_lvd1689m-{file_hash}.pth",
        params=params,
    )


LVD, SAT = "LVD-1689M", "SAT-493M"
_PRESETS = [
    _vit("vits16", "vits16", LVD, "08c60483", "21M", 384, 12, 6, 1536, gated=False),
    _vit("vits16plus", "vits16plus", LVD, "4057cbaa", "29M", 384, 12, 6, 1536, gated=True),
    _vit("vitb16", "vitb16", LVD, "73cec8be", "86M", 768, 12, 12, 3072, gated=False),
    _vit("vitl16", "vitl16", LVD, "8aa4cbdd", "300M", 1024, 24, 16, 4096, gated=False),
    _vit("vith16plus", "vith16plus", LVD, "7c1da9a5", "840M", 1280, 32, 20, 5120, gated=True),
    _vit("vit7b16", "vit7b16", LVD, "a955f4ea", "6716M", 4096, 40, 32, 8192, gated=True, qv_bias=False),
    _vit("vitl16-sat493m", "vitl16", SAT, "eadcf0ff", "300M", 1024, 24, 16, 4096, gated=False),
    _vit("vit7b16-sat493m", "vit7b16", SAT, "a6675841", "6716M", 4096, 40, 32, 8192, gated=True, qv_bias=False),
    _convnext("tiny", "21b726bb", "29M", [3, 3, 9, 3], [96, 192, 384, 768]),
    _convnext("small", "296db49d", "50M", [3, 3, 27, 3], [96, 192, 384, 768]),
    _convnext("base", "801f2ba9", "89M", [3, 3, 27, 3], [128, 256, 512, 1024]),
    _convnext("large", "61fa432d", "198M", [3, 3, 27, 3], [192, 384, 768, 1536]),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}

# Other spellings that name the same checkpoint: the hub repo name with or without "facebook/",
# and "<name>-lvd1689m".
_ALIASES: dict[str, str] = {}
for _p in _PRESETS:
    _repo = _p.hub_id.split("/", 1)[1]
    _ALIASES[_repo] = _ALIASES[_p.hub_id] = _p.name
    if _p.dataset == LVD:
        _ALIASES[f"{_p.name}-lvd1689m"] = _p.name


def list_models(architecture: str | None = None) -> list[str]:
    """Short names of the official checkpoints, optionally only "vit" or "convnext" ones."""
    return [p.name for p in _PRESETS if architecture in (None, p.architecture)]


def find_preset(name: str) -> Preset | None:
    """The preset a short name, alias or official hub id refers to, or None."""
    key = str(name).strip()
    key = _ALIASES.get(key, _ALIASES.get(key.lower(), key.lower()))
    return PRESETS.get(key)


def get_preset(name: str) -> Preset:
    """Like `find_preset`, but an unknown name is an error that suggests the closest names."""
    preset = find_preset(name)
    if preset is None:
        close = difflib.get_close_matches(str(name).lower(), list(PRESETS) + list(_ALIASES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown DINOv3 model {name!r}.{hint} Known: {', '.join(PRESETS)}")
    return preset
