"""dino.txt: DINOv3 images and texts in one space, computed as Meta's code computes it.

Meta's dino.txt (`dinov3/hub/dinotxt.py`, `dinov3/eval/text/`) puts two towers on one space:

- images: the DINOv3 ViT backbone's final normed tokens [CLS, registers, patches] go through a vision
  head (self-attention blocks without RoPE, SwiGLU MLPs and layer scale, then a LayerNorm); the image
  embedding is the head's CLS token and the mean of the head's patch tokens, side by side (2048
  dimensions for the official ViT-L/16 model, 1024 each);
- texts: CLIP's BPE tokens (`dino3.models.tokenizer`) go through a causal transformer (learned
  position embeddings, pre-norm blocks with a GELU MLP, a final LayerNorm); the text embedding is
  the end-of-text token's output (the position of the largest id, as Meta pools), linearly mapped.

The first half of a text embedding is aligned to the image's CLS half, the second half to the mean
patch half: dense maps compare the head's (or, as Meta's segmentation notebook does, the backbone's)
patch tokens with the second half.

The backbone is dino3's `DINOv3ViTModel`, loaded as dino3 loads backbones; the head's blocks are
dino3's ViT blocks run without positions. Causal attention makes a text's embedding independent of
the tokens after its end-of-text, so a batch runs only up to its longest text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CONFIG_NAME, DINOv3TextConfig, DINOv3ViTConfig, read_json_object
from ..errors import CheckpointError, ConfigError
from ..presets import TextPreset, find_text_preset, text_preset_for_file
from ..weights import formats, recognize
from ..weights.files import (
    check_file_hash,
    header_shapes,
    read_safetensors,
    read_torch_file,
    write_safetensors,
)
from .layers import apply_linear, cpu_chunk_size
from .pretrained import inspect_checkpoint, load_pretrained, resolve_device, resolve_dtype
from .tokenizer import DEFAULT_BPE_FILE, CLIPTokenizer
from .vit import Block, DINOv3ViTModel

SAFETENSORS_NAME = "model.safetensors"  # the head and text tower, under Meta's names
BACKBONE_FOLDER = "backbone"  # the backbone, as dino3 saves backbones (Hugging Face layout)
BPE_NAME = DEFAULT_BPE_FILE.name
_META_SOURCE_HINT = "(read as Meta's dino.txt file of the vision head and text encoder)"


class VisionHead(nn.Module):
    """Blocks on the backbone's tokens, then a LayerNorm (none without blocks) and an optional linear map."""

    def __init__(self, config: DINOv3TextConfig) -> None:
        super().__init__()
        block_config = config.head_block_config()
        self.blocks = nn.ModuleList(Block(block_config) for _ in range(config.vision_num_blocks))
        width = config.vision_width
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.vision_num_blocks else None
        self.projection = nn.Linear(width, config.embed_dim // 2, bias=False) if config.vision_projection else None

    def forward(self, tokens: torch.Tensor, attn_implementation: str = "sdpa") -> torch.Tensor:
        """(B, T, W) backbone tokens -> (B, T, embed_dim / 2)."""
        for block in self.blocks:
            tokens, _ = block(tokens, None, None, 0, attn_implementation)  # no positions: no RoPE
        if self.norm is not None:
            tokens = self.norm(tokens)
        return apply_linear(self.projection, tokens) if self.projection is not None else tokens


class CausalBlock(nn.Module):
    """Pre-norm text block: x + ls1 * attn(norm1(x)) with causal attention, then x + ls2 * mlp(norm2(x)).
    q, k and v come from one projection without bias; the MLP is fc2(gelu(fc1(x)))."""

    def __init__(self, config: DINOv3TextConfig) -> None:
        super().__init__()
        width = config.text_hidden_size
        self.num_heads = config.text_num_attention_heads
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(width, 3 * width, bias=False)  # rows: q, k, v
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(width, config.text_intermediate_size)
        self.fc2 = nn.Linear(config.text_intermediate_size, width)
        self.ls1 = nn.Parameter(torch.empty(width)) if config.text_layer_scale else None
        self.ls2 = nn.Parameter(torch.empty(width)) if config.text_layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = apply_linear(self.qkv, self.norm1(x))  # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = apply_linear(self.proj, y.transpose(1, 2).reshape(B, L, D))
        x = x + (y * self.ls1 if self.ls1 is not None else y)
        y = apply_linear(self.fc2, apply_linear(self.fc1, self.norm2(x), "gelu"))
        return x + (y * self.ls2 if self.ls2 is not None else y)


class TextTransformer(nn.Module):
    """CLIP-style causal text transformer pooled at the end-of-text token."""

    def __init__(self, config: DINOv3TextConfig) -> None:
        super().__init__()
        width = config.text_hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.blocks = nn.ModuleList(CausalBlock(config) for _ in range(config.text_num_hidden_layers))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.projection = nn.Linear(width, config.embed_dim, bias=False) if config.text_projection else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim)."""
        end = tokens.argmax(dim=-1)  # (B,): the end-of-text token, CLIP's largest id
        length = int(end.max()) + 1  # later positions cannot reach any end-of-text through causal attention
        x = self.token_embedding(tokens[:, :length]) + self.position_embedding[:length]  # (B, L', W)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[torch.arange(x.shape[0], device=x.device), end])  # (B, W)
        return apply_linear(self.projection, x) if self.projection is not None else x


class DINOv3TextModel(nn.Module):
    """dino.txt: `encode_image` and `encode_text` map images and texts into one space (see the module
    docstring). Meta's method names and outputs; `tokenize` is CLIP's tokenizer.

        model = dino3.DINOv3TextModel.from_pretrained("dinotxt-vitl16")  # Meta's two files, see from_pretrained
        image = model.encode_image(pixel_values, normalize=True)        # (B, 2048)
        text = model.encode_text(model.tokenize(["a cat"]), normalize=True)
        probs = (model.logit_scale.exp() * image @ text.T).softmax(-1)
    """

    config_class = DINOv3TextConfig
    # On the CPU a large image batch runs backbone and head in chunks whose widest head activation stays
    # under this many bytes (as the backbone's own cpu_chunk_bytes). None turns it off.
    cpu_chunk_bytes: int | None = 16 * 2**20

    def __init__(
        self,
        config: DINOv3TextConfig | None = None,
        attn_implementation: str = "sdpa",
        bpe_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        config = config if config is not None else DINOv3TextConfig()
        if not isinstance(config, DINOv3TextConfig):
            raise TypeError(f"DINOv3TextModel needs a DINOv3TextConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = DINOv3ViTModel(config.backbone_config, attn_implementation=attn_implementation)
        self.vision_head = VisionHead(config)
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.empty(1))  # log of the softmax temperature's inverse
        self.bpe_file = Path(bpe_file) if bpe_file is not None else DEFAULT_BPE_FILE
        self._tokenizer: CLIPTokenizer | None = None
        self.preset: TextPreset | None = None
        self.name_or_path: str | None = None
        if self.logit_scale.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation as Meta's code does it (the backbone as dino3 initialises its ViTs)."""
        with torch.no_grad():
            self.logit_scale.fill_(self.config.logit_scale_init)
            for module in self.vision_head.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
                elif isinstance(module, Block):
                    module.ls1.fill_(1e-5)
                    module.ls2.fill_(1e-5)
            if self.vision_head.projection is not None:
                nn.init.normal_(self.vision_head.projection.weight, std=self.config.vision_width**-0.5)
            text, width = self.text, self.config.text_hidden_size
            nn.init.normal_(text.token_embedding.weight, std=0.02)
            nn.init.normal_(text.position_embedding, std=0.01)
            proj_std = width**-0.5 * (2 * len(text.blocks)) ** -0.5
            for block in text.blocks:
                nn.init.normal_(block.qkv.weight, std=width**-0.5)
                nn.init.normal_(block.proj.weight, std=proj_std)
                nn.init.normal_(block.fc1.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.fc2.weight, std=proj_std)
                for linear in (block.proj, block.fc1, block.fc2):
                    nn.init.zeros_(linear.bias)
                block.norm1.reset_parameters()
                block.norm2.reset_parameters()
                for scale in (block.ls1, block.ls2):
                    if scale is not None:
                        scale.fill_(1.0)
            text.norm.reset_parameters()
            if text.projection is not None:
                nn.init.normal_(text.projection.weight, std=width**-0.5)

    # -- texts ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CLIPTokenizer:
        """CLIP's tokenizer with this model's vocabulary file (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer(self.bpe_file, context_length=self.config.context_length)
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) int64 token ids (CLIP's tokenizer, as Meta's)."""
        return self.tokenizer(texts)

    def encode_text(self, text: torch.Tensor | str | Sequence[str], normalize: bool = False) -> torch.Tensor:
        """(N, L) token ids (or the texts themselves) -> (N, embed_dim) text embeddings."""
        tokens = self.tokenize(text) if isinstance(text, str) or _is_text_list(text) else text
        tokens = self._check_tokens(tokens)
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def _check_tokens(self, tokens: Any) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                "encode_text takes the (N, L) integer token ids of model.tokenize(texts), or the texts themselves; "
                f"got {type(tokens).__name__ if not isinstance(tokens, torch.Tensor) else tokens.dtype}"
            )
        limit = self.config.context_length
        if tokens.ndim != 2 or not 0 < tokens.shape[1] <= limit or tokens.shape[0] == 0:
            raise ValueError(
                f"token ids must have shape (N, L) with N >= 1 and 1 <= L <= {limit}, got {tuple(tokens.shape)}"
            )
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}"
            )
        return tokens.to(self.text.position_embedding.device)

    # -- images -----------------------------------------------------------------------------------
    def encode_image_with_patch_tokens(
        self, pixel_values: torch.Tensor, normalize: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As Meta's: (image embeddings (B, embed_dim), the head's patch tokens (B, h*w, embed_dim / 2),
        the backbone's final normed patch tokens (B, h*w, W)). Only the embeddings are normalised."""
        pixel_values = self.backbone._check_pixels(pixel_values)  # a clear error for anything else; cast
        parts = [self._encode_image(chunk) for chunk in pixel_values.split(self._chunk_size(pixel_values))]
        features, patches, backbone_patches = (torch.cat(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]
        return (F.normalize(features, dim=-1) if normalize else features), patches, backbone_patches

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image embeddings."""
        return self.encode_image_with_patch_tokens(pixel_values, normalize=normalize)[0]

    def _encode_image(self, pixel_values: torch.Tensor):
        tokens = self.backbone(pixel_values).last_hidden_state  # (B, 1 + R + h*w, W), normed
        head = self.vision_head(tokens, self.backbone.attn_implementation)  # (B, T, embed_dim / 2)
        prefix = self.backbone.num_prefix_tokens
        patches = head[:, prefix:]
        return torch.cat([head[:, 0], patches.mean(dim=1)], dim=-1), patches, tokens[:, prefix:]

    def _chunk_size(self, pixel_values: torch.Tensor) -> int:
        h, w = self.backbone.grid_size(*pixel_values.shape[-2:])
        widest = max(3 * self.config.vision_width, 2 * self.config.vision_intermediate_size)
        per_image = (self.backbone.num_prefix_tokens + h * w) * widest * self.dtype.itemsize
        return cpu_chunk_size(pixel_values, self.cpu_chunk_bytes, per_image)

    # -- both (Meta's) ----------------------------------------------------------------------------------
    def get_logits(self, pixel_values: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits (B_img, B_text), text logits (B_text, B_img)): scaled cosine similarities."""
        text_features = self.encode_text(text, normalize=True)
        image_features = self.encode_image(pixel_values, normalize=True)
        image_logits = self.logit_scale.exp() * image_features @ text_features.T
        return image_logits, image_logits.T

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor):
        """As Meta's: (image embeddings, text embeddings, both normalised; logit_scale.exp(); the head's
        patch tokens; the backbone's patch tokens)."""
        text_features = self.encode_text(text, normalize=True)
        image_features, patches, backbone_patches = self.encode_image_with_patch_tokens(pixel_values, normalize=True)
        return image_features, text_features, self.logit_scale.exp(), patches, backbone_patches

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- loading and saving ------------------------------------------------------------------------------
    @classmethod
    def from_meta(
        cls,
        backbone_file: str | os.PathLike,
        head_and_text_file: str | os.PathLike,
        bpe_file: str | os.PathLike | None = None,
        *,
        config: DINOv3TextConfig | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        check_hash: bool = True,
        rope_periods: str = "checkpoint",
        attn_implementation: str = "sdpa",
    ) -> DINOv3TextModel:
        """Load Meta's two dino.txt files, strictly: the backbone's .pth (through dino3's backbone loader)
        and the .pth of the vision head and text encoder, every tensor of which must be used, with its
        shape; the errors name the keys.

        The architecture comes from the tensors (any dino.txt-shaped pair); the text tower's number of
        heads does not show in them and is taken as width / 64 (CLIP's head size; 20 for the official
        model): pass config= to say otherwise. bpe_file: the tokenizer's vocabulary (None: the copy
        shipped with dino3). rope_periods="checkpoint" computes the backbone's RoPE from the periods
        stored in its file, as Meta's code does ("exact" recomputes them in fp32, as Transformers).
        check_hash checks Meta's file names' SHA-256 prefixes, as torch.hub does.
        """
        dtype, device = resolve_dtype(dtype, allow_auto=False), resolve_device(device)
        path = Path(head_and_text_file).expanduser()
        if not path.is_file():
            raise CheckpointError(f"no such file: {path} (Meta's dino.txt vision head and text encoder file)")
        official = text_preset_for_file(path.name)
        if check_hash and official is not None:
            check_file_hash(path, official.text_hash)
        try:
            state_dict = recognize.unwrap(read_torch_file(path))
        except CheckpointError as e:
            message = str(e)
            raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        # Both files are understood and checked from their shapes before the backbone's tensors are read.
        inspected = inspect_checkpoint(
            backbone_file, config=config.backbone_config if config else None, check_hash=check_hash
        )
        found = config if config is not None else infer_config(shapes, inspected.config, str(path))
        found = found.replace(backbone_config=inspected.config)
        cls._check(found, shapes, str(path))
        backbone = load_pretrained(
            backbone_file,
            cls=DINOv3ViTModel,
            config=inspected.config,
            dtype=dtype,
            check_hash=False,  # checked above
            rope_periods=rope_periods,
            attn_implementation=attn_implementation,
        )
        model = cls._assemble(found, backbone, state_dict, str(path), dtype, attn_implementation, bpe_file)
        model.preset = official
        model.name_or_path = str(path)
        return model.to(device) if device is not None else model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        folder: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        check_hash: bool = True,
        attn_implementation: str = "sdpa",
    ) -> DINOv3TextModel:
        """A dino.txt preset name ("dinotxt-vitl16": Meta's two files, looked up in `folder`, else in
        $DINO3_CACHE/dinotxt and torch.hub's checkpoint folder) or a folder written by save_pretrained."""
        local = Path(name_or_path).expanduser()
        preset = find_text_preset(str(name_or_path)) if not local.exists() else None
        if preset is not None:
            backbone_file, text_file = find_preset_files(preset, folder)
            model = cls.from_meta(
                backbone_file,
                text_file,
                config=preset.make_config(),
                dtype=dtype,
                device=device,
                check_hash=check_hash,
                attn_implementation=attn_implementation,
            )
            model.preset, model.name_or_path = preset, preset.name
            return model
        if not local.is_dir():
            raise CheckpointError(
                f"{name_or_path} is neither a dino.txt preset ({', '.join(_text_names())}) nor a folder written by "
                "DINOv3TextModel.save_pretrained; Meta's own files load with DINOv3TextModel.from_meta"
            )
        dtype, device = resolve_dtype(dtype, allow_auto=False), resolve_device(device)
        config_file, weights = local / CONFIG_NAME, local / SAFETENSORS_NAME
        for needed in (config_file, weights, local / BACKBONE_FOLDER):
            if not needed.exists():
                raise CheckpointError(f"{local} is not a saved dino.txt model: it has no {needed.name}")
        config = DINOv3TextConfig.from_dict(read_json_object(config_file))
        shapes = header_shapes([weights])
        cls._check(config, shapes, str(weights))  # before anything is read
        backbone = load_pretrained(
            local / BACKBONE_FOLDER, cls=DINOv3ViTModel, dtype=dtype, attn_implementation=attn_implementation
        )
        if backbone.config != config.backbone_config:
            raise CheckpointError(f"{local}: the backbone folder does not hold the backbone config.json describes")
        bpe = local / BPE_NAME
        state_dict = read_safetensors([weights])
        model = cls._assemble(config, backbone, state_dict, str(weights), dtype, attn_implementation, bpe)
        model.name_or_path = str(local)
        return model.to(device) if device is not None else model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json, model.safetensors (the vision head and text tower under Meta's names, with
        the backbone's RoPE periods when it has its own), the backbone in backbone/ (as dino3 saves
        backbones: the Hugging Face layout) and the tokenizer's vocabulary."""
        from .._io import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder / BACKBONE_FOLDER)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        tensors = formats.from_dino3(own, self.config, "meta")
        if self.backbone.rope.periods is not None:
            tensors[formats.DINOTXT_PERIODS] = self.backbone.rope.periods
        write_safetensors(tensors, folder / SAFETENSORS_NAME)
        config = self.config.replace(extra={**self.config.extra, "dtype": str(self.dtype).removeprefix("torch.")})
        atomic_write_text(folder / CONFIG_NAME, config.to_json_string())
        atomic_write_bytes(folder / BPE_NAME, self.bpe_file.read_bytes())

    @classmethod
    def _check(cls, config: DINOv3TextConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> dict:
        """Every name and shape of the head-and-text tensors against the model's (errors name the keys);
        returns the shapes of the model's own tensors (the backbone's apart)."""
        with torch.device("meta"):
            model = cls(config)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        expected, optional = formats.expected_shapes(ours, config, "meta")
        recognize.check_shapes(shapes, expected, optional, source, hint=_META_SOURCE_HINT)
        return ours

    @classmethod
    def _assemble(cls, config, backbone, state_dict, source, dtype, attn_implementation, bpe_file) -> DINOv3TextModel:
        """The model: the loaded backbone, and the head and text tower from a checked Meta-layout state dict."""
        ours = cls._check(config, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
        weights, extras = formats.to_dino3(state_dict, ours, config, "meta", consume=True)
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation, bpe_file=bpe_file)
        model.backbone = backbone
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or any(not k.startswith("backbone.") for k in missing):  # pragma: no cover (checked above)
            raise CheckpointError(f"{source}: internal mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
        if formats.DINOTXT_PERIODS in extras:
            backbone.rope.use_periods(extras[formats.DINOTXT_PERIODS])
        return model.eval()


def is_text_checkpoint(name_or_path: str | os.PathLike) -> bool:
    """Whether a name is a dino.txt model: a dino.txt preset, or a folder its save_pretrained wrote."""
    local = Path(name_or_path).expanduser()
    if not local.exists():
        return find_text_preset(str(name_or_path)) is not None
    config = local / CONFIG_NAME
    if not local.is_dir() or not config.is_file():
        return False
    try:
        return read_json_object(config).get("model_type") == DINOv3TextConfig.model_type
    except Exception:  # noqa: BLE001  (a damaged config is the loader's to report)
        return False


def _is_text_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _text_names() -> list[str]:
    from ..presets import list_text_models

    return list_text_models()


# -- the architecture of a file of Meta's ------------------------------------------------------------------------
TEXT_HEAD_DIM = 64  # CLIP's, and Meta's official text tower's (1280 / 20)


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], backbone_config: DINOv3ViTConfig, source: str = "the file"
) -> DINOv3TextConfig:
    """The DINOv3TextConfig that a Meta dino.txt head-and-text state dict's shapes describe, on a backbone."""
    head, text = "visual_model.head.", "text_model.backbone."
    unsupported = [k for k in shapes if k.startswith("text_model.head.blocks.")]
    if unsupported:
        raise CheckpointError(
            f"{source} has text-head blocks ({unsupported[0]}, ...): a dino.txt variant dino3 does not implement"
        )
    try:
        vision_blocks = _count(shapes, head + "blocks.")
        vocab, width = shapes[text + "token_embedding.weight"]
        vision_projection = head + "linear_projection.weight" in shapes
        text_projection = "text_model.head.linear_projection.weight" in shapes
        if vision_projection:
            embed_dim = 2 * shapes[head + "linear_projection.weight"][0]
        elif text_projection:
            embed_dim = shapes["text_model.head.linear_projection.weight"][0]
        else:
            embed_dim = width
        return DINOv3TextConfig(
            backbone_config=backbone_config,
            embed_dim=embed_dim,
            vision_num_blocks=vision_blocks,
            vision_intermediate_size=shapes[head + "blocks.0.mlp.w1.weight"][0] if vision_blocks else 1,
            vision_projection=vision_projection,
            text_hidden_size=width,
            text_num_hidden_layers=_count(shapes, text + "blocks."),
            text_num_attention_heads=max(1, width // TEXT_HEAD_DIM),
            text_intermediate_size=shapes[text + "blocks.0.feed_forward.fc1.weight"][0],
            text_layer_scale=text + "blocks.0.ls1.gamma" in shapes,
            text_projection=text_projection,
            context_length=shapes[text + "positional_embedding"][0],
            vocab_size=vocab,
        )
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise CheckpointError(f"{source}: the tensors describe no dino.txt model on this backbone ({e})") from None
        raise CheckpointError(
            f"{source} is not Meta's dino.txt vision head and text encoder (no {e}); its keys begin: "
            f"{', '.join(sorted(shapes)[:6])}"
        ) from None


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    indices = {k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)}
    return len({int(i) for i in indices if i.isdigit()})


# -- where a preset's files are --------------------------------------------------------------------------------
def preset_folders() -> list[Path]:
    """Where dino.txt presets look for Meta's files: $DINO3_CACHE/dinotxt (default ~/.cache/dino3/dinotxt),
    then torch.hub's checkpoint folder (where Meta's own torch.hub code downloads them)."""
    cache = Path(os.environ.get("DINO3_CACHE", Path.home() / ".cache" / "dino3")).expanduser()
    return [cache / "dinotxt", Path(torch.hub.get_dir()) / "checkpoints"]


def find_preset_files(preset: TextPreset, folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(backbone file, head-and-text file) of a preset, or one line that says what to download and where."""
    folders = [Path(folder).expanduser()] if folder is not None else preset_folders()
    found = []
    for name in preset.files:
        path = next((f / name for f in folders if (f / name).is_file()), None)
        found.append(path)
    if all(found):
        return found[0], found[1]
    missing = " and ".join(name for name, path in zip(preset.files, found) if path is None)
    where = folders[0]
    raise CheckpointError(
        f"{preset.name} needs Meta's {missing}, not found in {' or '.join(str(f) for f in folders)}: request them at "
        f"{preset.download} ({preset.license.split(' (')[0]}) and put them in {where}"
        + ("" if folder is not None else " (or pass folder=)")
    )
