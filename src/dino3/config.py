"""Model configurations: pure data with the Transformers field names and defaults.

The defaults are those of Transformers' `DINOv3ViTConfig` / `DINOv3ConvNextConfig` (they describe
ViT-S/16 and ConvNeXt-tiny, except that the ViT default has no registers). Fields that a
`config.json` carries but dino3 does not use (`architectures`, `out_features`, `dtype`, ...) are kept
in `extra` and written back, so a file round-trips through dino3 unchanged.

Both classes answer the same questions about their tokens (`stride`, `grid_size`, `feature_dim`,
`num_register_tokens`, `num_hidden_states`, `describe`), so that code above the models never asks
which architecture it has. Reading a config by model name is `dino3.load_config` (the hub lives above).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

CONFIG_NAME = "config.json"

# Activations the models implement, by their Transformers names.
ACTIVATIONS = ("gelu", "relu", "selu", "silu", "swish", "gelu_new", "gelu_pytorch_tanh", "quick_gelu")


@dataclass
class _Config:
    """Shared behaviour: dict / JSON conversion that keeps unknown fields, and validation."""

    model_type: ClassVar[str]
    architecture_name: ClassVar[str]

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden
        pass

    # -- dict / JSON ------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Config:
        """Build from a `config.json` dict. Unknown keys are kept in `extra`, never fatal."""
        data = dict(data)
        found = data.get("model_type")
        if found is not None and found != cls.model_type:
            raise ConfigError(
                f"config has model_type {found!r}, but {cls.__name__} needs {cls.model_type!r}. "
                "Load it with dino3.load(), which picks the right model class."
            )
        data.pop("model_type", None)
        names = set(cls.field_names())
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content: Transformers' fields, `model_type`, and the kept extras."""
        out: dict[str, Any] = {"architectures": [self.architecture_name]}
        out.update(self.extra)
        out.update({name: _jsonable(getattr(self, name)) for name in self.field_names()})
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> _Config:
        data = read_json_object(path, str(path))
        return cls.from_dict(data)

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        """Write `config.json` into `folder` (created if needed); return its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def replace(self, **changes: Any) -> _Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- validation helpers -----------------------------------------------------------------------
    def _positive_int(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def _probability(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")

    def _positive_number(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

    def _bool(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _activation(self, name: str) -> None:
        if getattr(self, name) not in ACTIVATIONS:
            raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; use one of {ACTIVATIONS}")


@dataclass
class DINOv3ViTConfig(_Config):
    """Configuration of a DINOv3 ViT. Field names and defaults are Transformers' (ViT-S/16-like)."""

    model_type: ClassVar[str] = "dinov3_vit"
    architecture_name: ClassVar[str] = "DINOv3ViTModel"

    patch_size: int = 16
    hidden_size: int = 384
    intermediate_size: int = 1536  # MLP width; for the gated MLP the stored (already reduced) width
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    hidden_act: str = "gelu"  # exact erf GELU; the gated (SwiGLU) checkpoints use "silu"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    image_size: int = 224  # informative only: the model runs at any size
    num_channels: int = 3
    query_bias: bool = True
    key_bias: bool = False  # Meta masks the key bias to zero, so the checkpoints have none
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale_value: float = 1.0  # initial layer scale; checkpoints overwrite it
    drop_path_rate: float = 0.0  # the same rate in every layer, as the reference
    use_gated_mlp: bool = False
    num_register_tokens: int = 0  # the official checkpoints have 4
    # RoPE coordinate augmentation, applied only in training mode when not None.
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_hw(self) -> tuple[int, int]:
        p = self.patch_size
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    # -- what every config answers ------------------------------------------------------------------
    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per output token along (height, width): the patch size."""
        return self.patch_hw

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns of the output for an input of height x width pixels."""
        ph, pw = self.patch_hw
        return height // ph, width // pw

    @property
    def feature_dim(self) -> int:
        """Width of every output token."""
        return self.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return 1 + self.num_register_tokens

    @property
    def num_hidden_states(self) -> int:
        """Hidden states to choose from: the embedding output (0), then each block's (1..L)."""
        return self.num_hidden_layers + 1

    def describe(self) -> list[str]:
        """Lines that say what this architecture is, for `dino3 info`."""
        mlp = "SwiGLU" if self.use_gated_mlp else "MLP"
        biases = "q/v biases" if self.query_bias else "no q/k/v biases"
        return [
            f"layers         {self.num_hidden_layers} blocks, width {self.hidden_size}, {self.num_attention_heads} "
            f"heads of {self.head_dim}, {mlp} {self.intermediate_size} ({self.hidden_act}), {biases}",
            f"tokens         1 CLS + {self.num_register_tokens} registers + one per {self.patch_size}px patch",
        ]

    def validate(self) -> None:
        if isinstance(self.patch_size, (list, tuple)):
            if len(self.patch_size) != 2 or any(not isinstance(p, int) or p <= 0 for p in self.patch_size):
                raise ConfigError(f"patch_size must be a positive integer or a pair, got {self.patch_size!r}")
        else:
            self._positive_int("patch_size")
        if isinstance(self.image_size, (list, tuple)):
            if len(self.image_size) != 2:
                raise ConfigError(f"image_size must be an integer or a pair, got {self.image_size!r}")
        else:
            self._positive_int("image_size")
        self._positive_int(
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels"
        )
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int):
            raise ConfigError(f"num_register_tokens must be an integer, got {self.num_register_tokens!r}")
        if self.num_register_tokens < 0:
            raise ConfigError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"the head dimension hidden_size / num_attention_heads = {self.head_dim} must be a multiple "
                "of 4: 2D RoPE rotates pairs of dimensions, half of them by the y and half by the x position"
            )
        self._activation("hidden_act")
        self._probability("attention_dropout", "drop_path_rate")
        self._positive_number("layer_norm_eps", "rope_theta", "initializer_range")
        if not _is_number(self.layerscale_value):
            raise ConfigError(f"layerscale_value must be a number, got {self.layerscale_value!r}")
        self._bool("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp")
        for name, low in (("pos_embed_shift", 0.0), ("pos_embed_jitter", 1.0), ("pos_embed_rescale", 1.0)):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < low):
                raise ConfigError(f"{name} must be None or a number >= {low}, got {value!r}")


@dataclass
class DINOv3ConvNextConfig(_Config):
    """Configuration of a DINOv3 ConvNeXt. Field names and defaults are Transformers' (tiny)."""

    model_type: ClassVar[str] = "dinov3_convnext"
    architecture_name: ClassVar[str] = "DINOv3ConvNextModel"

    num_channels: int = 3
    hidden_sizes: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0  # linear schedule from 0 to this rate over all blocks
    image_size: int = 224  # informative only

    def __post_init__(self) -> None:
        # Transformers accepts None for the lists and fills in the tiny sizes.
        if self.hidden_sizes is None:
            self.hidden_sizes = [96, 192, 384, 768]
        if self.depths is None:
            self.depths = [3, 3, 9, 3]
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        super().__post_init__()

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    # -- what every config answers ------------------------------------------------------------------
    num_register_tokens: ClassVar[int] = 0
    num_prefix_tokens: ClassVar[int] = 1  # the average-pooled token

    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per output token along (height, width): the stem's 4, then 2 per later stage."""
        s = 4 * 2 ** (self.num_stages - 1)
        return s, s

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of the last stage for an input of height x width pixels (each stage
        floors, and nested floor divisions are one floor division)."""
        s = self.stride[0]
        return height // s, width // s

    @property
    def feature_dim(self) -> int:
        """Width of every output token: the last stage's."""
        return self.hidden_sizes[-1]

    @property
    def num_hidden_states(self) -> int:
        """Hidden states to choose from: the input pixels (0), then each stage's (1..S)."""
        return self.num_stages + 1

    def describe(self) -> list[str]:
        """Lines that say what this architecture is, for `dino3 info`."""
        return [
            f"stages         depths {self.depths}, widths {self.hidden_sizes}",
            f"tokens         1 pooled token + one per {self.stride[0]}px patch of the last stage",
        ]

    def validate(self) -> None:
        self._positive_int("num_channels", "image_size")
        for name in ("hidden_sizes", "depths"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ConfigError(f"{name} must be a non-empty list of positive integers, got {values!r}")
        if len(self.hidden_sizes) != len(self.depths):
            raise ConfigError(
                f"hidden_sizes ({len(self.hidden_sizes)} stages) and depths ({len(self.depths)} stages) "
                "must have the same length"
            )
        self._activation("hidden_act")
        self._probability("drop_path_rate")
        self._positive_number("layer_norm_eps", "initializer_range")
        if not _is_number(self.layer_scale_init_value):
            raise ConfigError(f"layer_scale_init_value must be a number, got {self.layer_scale_init_value!r}")


def read_json_object(path: str | os.PathLike, source: str | None = None) -> dict[str, Any]:
    """The JSON object in a file, or a ConfigError that names the file and what is wrong with it."""
    source = source or str(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}); it may be corrupt") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); the file may be truncated") from None
    except RecursionError:
        raise ConfigError(f"{source} nests JSON too deeply to be a configuration") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} holds a JSON {type(data).__name__}, not an object")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _vitl16_backbone() -> DINOv3ViTConfig:
    # DINOv3 ViT-L/16 (the `vitl16` preset; a test keeps the two equal): dino.txt's official backbone.
    return DINOv3ViTConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_register_tokens=4
    )


@dataclass
class DINOv3TextConfig(_Config):
    """Configuration of a dino.txt model: a DINOv3 ViT backbone, a vision head on its tokens and a
    causal text transformer, which embed images and texts in one space.

    The defaults are Meta's official model (`dinov3_vitl16_dinotxt_tet1280d20h24l` in Meta's
    `dinov3/hub/dinotxt.py`): ViT-L/16, a head of two blocks, a 24-layer text transformer of width
    1280 with 20 heads, and a 2048-dimensional space (the head's CLS token and the mean of its patch
    tokens, 1024 each). The head and the text tower have no biases on q, k and v, biases elsewhere,
    and LayerNorms with eps 1e-5, as Meta's layers.
    """

    model_type: ClassVar[str] = "dinov3_dinotxt"
    architecture_name: ClassVar[str] = "DINOv3TextModel"

    backbone_config: DINOv3ViTConfig = field(default_factory=_vitl16_backbone)
    # The joint space: [head CLS ; mean of head patches], each embed_dim / 2 wide.
    embed_dim: int = 2048
    # The vision head: blocks (self-attention without RoPE, SwiGLU MLP, layer scale) on the backbone's
    # final normed tokens, with the backbone's width and number of heads; then a LayerNorm.
    vision_num_blocks: int = 2
    vision_intermediate_size: int = 2752  # SwiGLU width: int(2/3 x 4 x 1024) = 2730, rounded up to a multiple of 64
    vision_projection: bool = False  # a linear map (no bias) of the head's tokens to embed_dim / 2
    # The text transformer: token and position embeddings, pre-norm causal blocks with a GELU MLP,
    # a final LayerNorm, the end-of-text token (the largest id) pooled, then a linear map (no bias).
    text_hidden_size: int = 1280
    text_num_hidden_layers: int = 24
    text_num_attention_heads: int = 20  # not visible in the weights: CLIP's head size 64 is assumed
    text_intermediate_size: int = 5120  # 4 x width
    text_layer_scale: bool = False  # Meta's official text tower has none
    text_projection: bool = True  # without it the text width must be embed_dim
    context_length: int = 77  # CLIP's
    vocab_size: int = 49408  # CLIP's BPE vocabulary
    layer_norm_eps: float = 1e-5  # PyTorch's default, which Meta's head and text tower use
    logit_scale_init: float = math.log(1 / 0.07)  # the initial logit scale of a randomly initialised model

    def __post_init__(self) -> None:
        if isinstance(self.backbone_config, dict):
            self.backbone_config = DINOv3ViTConfig.from_dict(self.backbone_config)
        super().__post_init__()

    @property
    def vision_width(self) -> int:
        return self.backbone_config.hidden_size

    def head_block_config(self) -> DINOv3ViTConfig:
        """The vision head's blocks, described as blocks of a ViT (dino3 runs them with its ViT blocks)."""
        backbone = self.backbone_config
        return DINOv3ViTConfig(
            hidden_size=backbone.hidden_size,
            num_attention_heads=backbone.num_attention_heads,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=max(self.vision_num_blocks, 1),
            use_gated_mlp=True,
            hidden_act="silu",
            query_bias=False,
            key_bias=False,
            value_bias=False,
            layer_norm_eps=self.layer_norm_eps,
        )

    # -- dict / JSON: the backbone's config nests ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict() | {"backbone_config": self.backbone_config.to_dict()}
        return dict(sorted(out.items()))

    def describe(self) -> list[str]:
        """Lines that say what this architecture is."""
        text_heads = f"{self.text_num_attention_heads} heads"
        return [
            *self.backbone_config.describe(),
            f"vision head    {self.vision_num_blocks} blocks on the backbone's tokens, "
            f"SwiGLU {self.vision_intermediate_size}",
            f"text           {self.text_num_hidden_layers} causal blocks, width {self.text_hidden_size}, {text_heads}, "
            f"context {self.context_length}, vocabulary {self.vocab_size}",
            f"space          {self.embed_dim} dimensions (head CLS + mean of head patches)",
        ]

    def validate(self) -> None:
        if not isinstance(self.backbone_config, DINOv3ViTConfig):
            raise ConfigError(
                f"backbone_config must be a DINOv3ViTConfig (or its dict), got {type(self.backbone_config).__name__}"
            )
        self._positive_int(
            "embed_dim",
            "vision_intermediate_size",
            "text_hidden_size",
            "text_num_hidden_layers",
            "text_num_attention_heads",
            "text_intermediate_size",
            "context_length",
            "vocab_size",
        )
        if isinstance(self.vision_num_blocks, bool) or not isinstance(self.vision_num_blocks, int):
            raise ConfigError(f"vision_num_blocks must be an integer, got {self.vision_num_blocks!r}")
        if self.vision_num_blocks < 0:
            raise ConfigError(f"vision_num_blocks must be >= 0, got {self.vision_num_blocks}")
        self._bool("vision_projection", "text_layer_scale", "text_projection")
        self._positive_number("layer_norm_eps")
        if not _is_number(self.logit_scale_init) or not math.isfinite(self.logit_scale_init):
            raise ConfigError(f"logit_scale_init must be a finite number, got {self.logit_scale_init!r}")
        if self.text_hidden_size % self.text_num_attention_heads:
            raise ConfigError(
                f"text_hidden_size ({self.text_hidden_size}) must be divisible by text_num_attention_heads "
                f"({self.text_num_attention_heads})"
            )
        if self.embed_dim % 2:
            raise ConfigError(f"embed_dim ({self.embed_dim}) must be even: half CLS token, half mean patch token")
        if not self.vision_projection and self.embed_dim != 2 * self.vision_width:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must be twice the backbone's width ({self.vision_width}) when the "
                "vision head has no projection (vision_projection=False)"
            )
        if not self.text_projection and self.embed_dim != self.text_hidden_size:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must equal text_hidden_size ({self.text_hidden_size}) when the text "
                "tower has no projection (text_projection=False)"
            )
