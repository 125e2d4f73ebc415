"""The official checkpoints and the architectures: dino3's one registry of both.

Each preset is one keyword row: its short name, hub id, Meta file name, architecture, the config
fields that differ from the architecture's defaults, and its normalisation. The architectures map a
name ("vit", "convnext") to its config class; everything above (loading, converting, recognising a
bare file) looks them up here. Users can add their own rows with `register_preset`.

Architectures are those of Transformers' conversion scripts, cross-checked against Meta's
`dinov3/hub/backbones.py`. The weights are Meta's, gated on the Hugging Face hub under the DINOv3
License; dino3 never ships them.
"""

from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from .config import DINOv3ConvNextConfig, DINOv3TextConfig, DINOv3ViTConfig, _Config
from .errors import ConfigError, UnknownModelError

# name -> config class; the model_type of each class names the architecture in config.json files.
ARCHITECTURES: dict[str, type[_Config]] = {"vit": DINOv3ViTConfig, "convnext": DINOv3ConvNextConfig}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Meta's README prescribes these for the SAT-493M (satellite) checkpoints. The Hugging Face copies of
# those checkpoints ship ImageNet statistics in their preprocessor_config.json; dino3's presets follow
# Meta, and a processor loaded from a hub folder follows that folder.
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)
LVD, SAT = "LVD-1689M", "SAT-493M"
DINOV3_LICENSE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"
EUPE_LICENSE = (
    "FAIR Noncommercial Research License (see https://github.com/facebookresearch/eupe): not the DINOv3 License"
)

# Meta's file names end in the first 8 hex digits of the file's SHA-256, as torch.hub checks them.
_META_FILE = re.compile(r"^(?P<stem>.+)-(?P<hash>[0-9a-f]{8})\.pth$")


@dataclass(frozen=True)
class Preset:
    """One checkpoint: where its weights are, what architecture they have, how to feed it."""

    name: str  # dino3's short name, e.g. "vits16" or "vitl16-sat493m"
    hub_id: str  # e.g. "facebook/dinov3-vits16-pretrain-lvd1689m"
    architecture: str  # a key of ARCHITECTURES
    config: dict[str, Any]  # the config fields that differ from the architecture's defaults
    dataset: str = LVD  # what it was trained on
    family: str = "DINOv3"  # "DINOv3", or "EUPE" (distilled through a DINOv3-architecture proxy)
    meta_file: str | None = None  # Meta's original .pth file name, with its hash suffix
    params: str = ""  # parameter count, as the model card gives it
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224  # the processor's default square size
    license: str = DINOV3_LICENSE
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def meta_hash(self) -> str | None:
        """The 8 hex digits before `.pth` in Meta's file name: the start of the file's SHA-256."""
        match = _META_FILE.match(self.meta_file or "")
        return match.group("hash") if match else None

    @property
    def config_class(self) -> type[_Config]:
        return ARCHITECTURES[self.architecture]

    def make_config(self) -> _Config:
        return self.config_class(**self.config)


# -- the official rows ----------------------------------------------------------------------------------
# Shared by every DINOv3 ViT (Transformers' conversion script; Meta's backbones.py).
VIT_COMMON = dict(
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
PLAIN_MLP = dict(use_gated_mlp=False, hidden_act="gelu")
SWIGLU = dict(use_gated_mlp=True, hidden_act="silu")
NO_QV_BIAS = dict(query_bias=False, value_bias=False)
CONVNEXT_COMMON = dict(hidden_act="gelu", layer_norm_eps=1e-6, layer_scale_init_value=1e-6, image_size=224)


def _vit(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, intermediate_size: int, *more: dict):
    fields = dict(VIT_COMMON, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    fields.update(num_attention_heads=num_attention_heads, intermediate_size=intermediate_size)
    for extra in more:
        fields.update(extra)
    return fields


def _convnext(depths: list[int], hidden_sizes: list[int]) -> dict:
    return dict(CONVNEXT_COMMON, depths=depths, hidden_sizes=hidden_sizes)


SAT_NORM = dict(dataset=SAT, image_mean=SAT493M_MEAN, image_std=SAT493M_STD)
_OFFICIAL = [
    Preset(
        name="vits16",
        hub_id="facebook/dinov3-vits16-pretrain-lvd1689m",
        meta_file="dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        architecture="vit",
        config=_vit(384, 12, 6, 1536, PLAIN_MLP),
        params="21M",
    ),
    Preset(
        name="vits16plus",
        hub_id="facebook/dinov3-vits16plus-pretrain-lvd1689m",
        meta_file="dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
        architecture="vit",
        config=_vit(384, 12, 6, 1536, SWIGLU),
        params="29M",
    ),
    Preset(
        name="vitb16",
        hub_id="facebook/dinov3-vitb16-pretrain-lvd1689m",
        meta_file="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
        architecture="vit",
        config=_vit(768, 12, 12, 3072, PLAIN_MLP),
        params="86M",
    ),
    Preset(
        name="vitl16",
        hub_id="facebook/dinov3-vitl16-pretrain-lvd1689m",
        meta_file="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
        architecture="vit",
        config=_vit(1024, 24, 16, 4096, PLAIN_MLP),
        params="300M",
    ),
    Preset(
        name="vith16plus",
        hub_id="facebook/dinov3-vith16plus-pretrain-lvd1689m",
        meta_file="dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
        architecture="vit",
        config=_vit(1280, 32, 20, 5120, SWIGLU),
        params="840M",
    ),
    Preset(
        name="vit7b16",
        hub_id="facebook/dinov3-vit7b16-pretrain-lvd1689m",
        meta_file="dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth",
        architecture="vit",
        config=_vit(4096, 40, 32, 8192, SWIGLU, NO_QV_BIAS),
        params="6716M",
    ),
    Preset(
        name="vitl16-sat493m",
        hub_id="facebook/dinov3-vitl16-pretrain-sat493m",
        meta_file="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth",
        architecture="vit",
        config=_vit(1024, 24, 16, 4096, PLAIN_MLP),
        params="300M",
        **SAT_NORM,
    ),
    Preset(
        name="vit7b16-sat493m",
        hub_id="facebook/dinov3-vit7b16-pretrain-sat493m",
        meta_file="dinov3_vit7b16_pretrain_sat493m-a6675841.pth",
        architecture="vit",
        config=_vit(4096, 40, 32, 8192, SWIGLU, NO_QV_BIAS),
        params="6716M",
        **SAT_NORM,
    ),
    Preset(
        name="convnext-tiny",
        hub_id="facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
        meta_file="dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth",
        architecture="convnext",
        config=_convnext([3, 3, 9, 3], [96, 192, 384, 768]),
        params="29M",
    ),
    Preset(
        name="convnext-small",
        hub_id="facebook/dinov3-convnext-small-pretrain-lvd1689m",
        meta_file="dinov3_convnext_small_pretrain_lvd1689m-296db49d.pth",
        architecture="convnext",
        config=_convnext([3, 3, 27, 3], [96, 192, 384, 768]),
        params="50M",
    ),
    Preset(
        name="convnext-base",
        hub_id="facebook/dinov3-convnext-base-pretrain-lvd1689m",
        meta_file="dinov3_convnext_base_pretrain_lvd1689m-801f2ba9.pth",
        architecture="convnext",
        config=_convnext([3, 3, 27, 3], [128, 256, 512, 1024]),
        params="89M",
    ),
    Preset(
        name="convnext-large",
        hub_id="facebook/dinov3-convnext-large-pretrain-lvd1689m",
        meta_file="dinov3_convnext_large_pretrain_lvd1689m-61fa432d.pth",
        architecture="convnext",
        config=_convnext([3, 3, 27, 3], [192, 384, 768, 1536]),
        params="198M",
    ),
]


# Meta's EUPE models (Efficient Universal Perception Encoder, 2026): the DINOv3 architectures, distilled
# through a large DINOv3-architecture proxy from several teachers. timm registers them as
# vit_*_patch16_dinov3_qkvb.eupe_lvd1689m and convnext_*.eupe_lvd1689m; their processor takes 256 px
# images (timm's input_size, Transformers' conversion); layer scale starts at 1e-5 (Transformers'
# conversion; it only matters for random initialisation). The S and B ViTs and the ConvNeXts have the
# shapes of their DINOv3 namesakes: a bare file is told apart by its name ("eupe").
EUPE = dict(family="EUPE", license=EUPE_LICENSE, image_size=256)
_EUPE_VIT = dict(layerscale_value=1e-5)
_OFFICIAL += [
    Preset(
        name="eupe-vitt16",
        hub_id="facebook/EUPE-ViT-T",
        architecture="vit",
        config=_vit(192, 12, 3, 768, PLAIN_MLP, _EUPE_VIT),
        params="5.5M",
        aliases=("eupe-vit-t",),
        **EUPE,
    ),
    Preset(
        name="eupe-vits16",
        hub_id="facebook/EUPE-ViT-S",
        architecture="vit",
        config=_vit(384, 12, 6, 1536, PLAIN_MLP, _EUPE_VIT),
        params="22M",
        aliases=("eupe-vit-s",),
        **EUPE,
    ),
    Preset(
        name="eupe-vitb16",
        hub_id="facebook/EUPE-ViT-B",
        architecture="vit",
        config=_vit(768, 12, 12, 3072, PLAIN_MLP, _EUPE_VIT),
        params="86M",
        aliases=("eupe-vit-b",),
        **EUPE,
    ),
    Preset(
        name="eupe-convnext-tiny",
        hub_id="facebook/EUPE-ConvNeXt-T",
        architecture="convnext",
        config=_convnext([3, 3, 9, 3], [96, 192, 384, 768]),
        params="29M",
        aliases=("eupe-convnext-t",),
        **EUPE,
    ),
    Preset(
        name="eupe-convnext-small",
        hub_id="facebook/EUPE-ConvNeXt-S",
        architecture="convnext",
        config=_convnext([3, 3, 27, 3], [96, 192, 384, 768]),
        params="50M",
        aliases=("eupe-convnext-s",),
        **EUPE,
    ),
    Preset(
        name="eupe-convnext-base",
        hub_id="facebook/EUPE-ConvNeXt-B",
        architecture="convnext",
        config=_convnext([3, 3, 27, 3], [128, 256, 512, 1024]),
        params="89M",
        aliases=("eupe-convnext-b",),
        **EUPE,
    ),
]


# -- the registry -------------------------------------------------------------------------------------
class _Registry:
    """Presets by name, and every other spelling that names one (hub ids with or without the owner,
    "<name>-lvd1689m", a preset's own aliases). Guarded by a lock: users may register from any thread."""

    def __init__(self, presets: list[Preset]) -> None:
        self._lock = threading.Lock()
        self._presets: dict[str, Preset] = {}
        self._aliases: dict[str, str] = {}
        for preset in presets:
            self.add(preset)

    def add(self, preset: Preset, replace: bool = False) -> None:
        if preset.architecture not in ARCHITECTURES:
            raise ConfigError(f"preset {preset.name!r}: architecture must be one of {list(ARCHITECTURES)}")
        preset.make_config()  # raises ConfigError if the fields describe no model
        spellings = {preset.hub_id, preset.hub_id.split("/", 1)[-1], *preset.aliases}
        if preset.dataset == LVD:
            spellings.add(f"{preset.name}-lvd1689m")
        with self._lock:
            if preset.name in self._presets and not replace:
                raise ConfigError(f"a preset named {preset.name!r} exists; pass replace=True to replace it")
            presets = dict(self._presets)
            aliases = dict(self._aliases)
            presets[preset.name] = preset
            for spelling in spellings:
                aliases[spelling] = aliases[spelling.lower()] = preset.name
            self._presets, self._aliases = presets, aliases  # readers see the old or the new, whole

    def find(self, name: str) -> Preset | None:
        key = str(name).strip()
        presets, aliases = self._presets, self._aliases
        key = aliases.get(key, aliases.get(key.lower(), key.lower()))
        return presets.get(key)

    def all(self) -> list[Preset]:
        return list(self._presets.values())

    def spellings(self) -> list[str]:
        return list(self._presets) + list(self._aliases)


_REGISTRY = _Registry(_OFFICIAL)


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Add a checkpoint of your own (a fine-tune, a distilled size) so that its name loads like an
    official one: `dino3.load(name)`, `dino3 embed -m name`."""
    _REGISTRY.add(preset, replace=replace)
    return preset


def list_models(architecture: str | None = None, family: str | None = None) -> list[str]:
    """Short names of the known checkpoints, optionally only those of one architecture ("vit",
    "convnext") or family ("DINOv3", "EUPE")."""
    return [p.name for p in _REGISTRY.all() if architecture in (None, p.architecture) and family in (None, p.family)]


def all_presets() -> list[Preset]:
    return _REGISTRY.all()


def find_preset(name: str) -> Preset | None:
    """The preset a short name, alias or hub id refers to, or None."""
    return _REGISTRY.find(name)


def get_preset(name: str) -> Preset:
    """Like `find_preset`, but an unknown name is an error that suggests the closest names."""
    preset = find_preset(name)
    if preset is None and find_text_preset(name) is not None:
        raise UnknownModelError(
            f"{name!r} is a dino.txt model (images and texts), not a backbone: load it with "
            f"dino3.DINOv3TextModel.from_pretrained({find_text_preset(name).name!r})"
        )
    if preset is None:
        close = difflib.get_close_matches(str(name).lower(), _REGISTRY.spellings(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(list_models())
        raise UnknownModelError(f"unknown DINOv3 model {name!r}.{hint} Known: {known}")
    return preset


def preset_for_meta_file(file_name: str) -> Preset | None:
    """The preset whose Meta file this exact name is (hash suffix included), or None."""
    return next((p for p in _REGISTRY.all() if p.meta_file and p.meta_file == file_name), None)


def config_from_dict(data: dict[str, Any], source: str = "config") -> _Config:
    """A config of the class its `model_type` names."""
    model_type = data.get("model_type")
    classes = {cls.model_type: cls for cls in ARCHITECTURES.values()}
    if model_type == DINOv3TextConfig.model_type:
        raise ConfigError(
            f"{source} describes a dino.txt model (images and texts), not a backbone: load it with "
            "dino3.DINOv3TextModel.from_pretrained"
        )
    if model_type not in classes:
        raise ConfigError(
            f"{source} has model_type {model_type!r}; dino3 loads {sorted(classes)} "
            "(DINOv3 ViT and ConvNeXt checkpoints)"
        )
    return classes[model_type].from_dict(data)


def architecture_of(model_type: str) -> str:
    """The architecture name whose config class has this model_type."""
    for name, cls in ARCHITECTURES.items():
        if cls.model_type == model_type:
            return name
    raise ConfigError(f"model_type {model_type!r} is not a DINOv3 architecture dino3 knows")


# -- dino.txt: a backbone plus Meta's file of the vision head and text tower --------------------------------
# Meta distributes dino.txt's weights from its own servers after a request form (no hub holds them): the
# backbone's .pth and one .pth of the vision head and text encoder. dino.txt's tokenizer vocabulary
# (CLIP's, MIT) ships with dino3.
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class TextPreset:
    """A dino.txt model: its backbone (a backbone preset, loaded from Meta's file), Meta's file of the
    vision head and text tower, and their architecture (DINOv3TextConfig fields that differ from the
    defaults, which are the official model's)."""

    name: str  # e.g. "dinotxt-vitl16"
    backbone: str  # the backbone's preset name, e.g. "vitl16"
    text_file: str  # Meta's file name of the vision head and text encoder, with its hash suffix
    config: dict[str, Any] = field(default_factory=dict)
    dataset: str = "LVTD-2300M"  # the image-text pairs the head and text tower were trained on
    params: str = ""
    license: str = DINOV3_LICENSE
    download: str = DINOV3_DOWNLOADS  # where the files are requested
    aliases: tuple[str, ...] = field(default=(), compare=False)

    @property
    def backbone_preset(self) -> Preset:
        return get_preset(self.backbone)

    @property
    def files(self) -> tuple[str, str]:
        """Meta's file names: the backbone's, then the vision head and text encoder's."""
        return self.backbone_preset.meta_file, self.text_file

    @property
    def text_hash(self) -> str | None:
        match = _META_FILE.match(self.text_file)
        return match.group("hash") if match else None

    def make_config(self) -> DINOv3TextConfig:
        return DINOv3TextConfig(backbone_config=self.backbone_preset.make_config(), **self.config)


_TEXT_PRESETS = {
    preset.name: preset
    for preset in [
        TextPreset(
            name="dinotxt-vitl16",
            backbone="vitl16",
            text_file="dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth",
            params="866M",  # 303M backbone, 25M vision head, 538M text tower
            aliases=("dinov3_vitl16_dinotxt_tet1280d20h24l", "dinotxt"),
        )
    ]
}


def find_text_preset(name: str) -> TextPreset | None:
    """The dino.txt preset a name or alias refers to, or None."""
    key = str(name).strip().lower()
    return next((p for p in _TEXT_PRESETS.values() if key == p.name or key in p.aliases), None)


def list_text_models() -> list[str]:
    """Short names of the known dino.txt models."""
    return list(_TEXT_PRESETS)


def text_preset_for_file(file_name: str) -> TextPreset | None:
    """The dino.txt preset whose vision head and text file this exact name is, or None."""
    return next((p for p in _TEXT_PRESETS.values() if p.text_file == file_name), None)
