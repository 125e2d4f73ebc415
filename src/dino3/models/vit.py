"""The DINOv3 Vision Transformer, computed as Hugging Face Transformers computes it.

Tokens are [CLS, registers (R), patches (h*w, row-major)]. There is no absolute position embedding:
a 2D rotary embedding (RoPE) turns the query and key of every patch token by angles taken from the
patch centre's normalised (y, x) position; CLS and registers are never turned. Blocks are pre-norm
with layer scale; the final LayerNorm is applied to every token and the pooled output is the normed
CLS token.

The module layout is dino3's own, chosen for speed: one fused qkv projection per block and one fused
gate+up projection in the SwiGLU MLP. `dino3.weights.formats` converts the Hugging Face (and other)
layouts to this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DINOv3ViTConfig
from .layers import (
    ACTIVATION_FUNCTIONS,
    DropPath,
    apply_linear,
    cpu_chunk_size,
    is_plain_linear,
    last_or_chosen,
    linear,
    linear_mul,
    resolve_indices,
    trunc_normal_,
)
from .outputs import DINOv3Output
from .pretrained import PretrainedMixin
from .rope import RopeTables, apply_rope

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and RoPE on the patch tokens.

    It keeps no state between calls: threads may run one model at once.
    """

    def __init__(self, config: DINOv3ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: q, k, v
        # Separate biases so that an absent one (the key's, or all three on 7B) stays exactly zero.
        self.q_bias = nn.Parameter(torch.empty(dim)) if config.query_bias else None
        self.k_bias = nn.Parameter(torch.empty(dim)) if config.key_bias else None
        self.v_bias = nn.Parameter(torch.empty(dim)) if config.value_bias else None
        self.proj = nn.Linear(dim, dim, bias=config.proj_bias)

    def qkv_bias(self) -> torch.Tensor | None:
        biases = (self.q_bias, self.k_bias, self.v_bias)
        present = [b for b in biases if b is not None]
        if not present:
            return None
        return torch.cat([b if b is not None else torch.zeros_like(present[0]) for b in biases])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of (B, T, D) tokens, each (B, heads, T, Dh)."""
        B, T, _ = x.shape
        bias = self.qkv_bias()
        if torch.onnx.is_in_onnx_export():  # (quantized models are not exported)
            # Three projections (views of the fused weight) in an ONNX export: ONNX Runtime, and
            # OpenVINO after NNCF quantization, run three MatMuls 3-5% faster than one and a split.
            biases = bias.chunk(3) if bias is not None else (None, None, None)
            heads = [F.linear(x, w, b) for w, b in zip(self.qkv.weight.chunk(3), biases)]
            return tuple(h.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for h in heads)
        qkv = apply_linear(self.qkv, x, bias=bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, Dh)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        num_prefix: int,
        implementation: str = "sdpa",
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        q, k, v = self.project_qkv(x)
        if cos is not None:  # None: tokens without positions (dino.txt's vision head)
            q = apply_rope(q, cos, sin, num_prefix)
            k = apply_rope(k, cos, sin, num_prefix)
        dropout = self.dropout if self.training else 0.0

        weights = None
        if need_weights or implementation == "eager":
            # The explicit computation; softmax in the input dtype, as the reference's latest eager path.
            weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, nh, T, T)
            weights = F.dropout(weights, p=dropout, training=self.training)
            out = torch.matmul(weights, v)
        elif implementation == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return apply_linear(self.proj, out), weights


class Mlp(nn.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, config: DINOv3ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.fc2, apply_linear(self.fc1, x, self.act))


class SwiGLU(nn.Module):
    """fc2(act(gate) * up), with gate and up computed by one fused projection fc1 = [gate; up]."""

    def __init__(self, config: DINOv3ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_plain_linear(self.fc1):
            w_gate, w_up = self.fc1.weight.chunk(2)
            b_gate, b_up = self.fc1.bias.chunk(2) if self.fc1.bias is not None else (None, None)
            hidden = linear_mul(x, w_up, b_up, linear(x, w_gate, b_gate, self.act))  # act(gate) * up
        else:  # quantized: one projection, then split
            gate, up = self.fc1(x).chunk(2, dim=-1)
            hidden = ACTIVATION_FUNCTIONS[self.act](gate) * up
        return apply_linear(self.fc2, hidden)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: DINOv3ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ls1 = nn.Parameter(torch.empty(dim))
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = SwiGLU(config) if config.use_gated_mlp else Mlp(config)
        self.ls2 = nn.Parameter(torch.empty(dim))
        self.drop_path = DropPath(config.drop_path_rate)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        num_prefix: int,
        implementation: str = "sdpa",
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), cos, sin, num_prefix, implementation, need_weights)
        x = x + self.drop_path(y * self.ls1)
        x = x + self.drop_path(self.mlp(self.norm2(x)) * self.ls2)
        return x, weights


class DINOv3ViTModel(PretrainedMixin, nn.Module):
    """The DINOv3 ViT backbone.

    `forward(pixel_values)` takes (B, C, H, W) images of any size (H and W are floored to the patch
    size, as the reference does) and returns a `DINOv3Output`.
    """

    config_class = DINOv3ViTConfig
    # On the CPU a large batch runs in chunks whose widest activation (qkv or MLP) stays under this
    # many bytes, so that it stays in the cache: ViT-S/16 at batch 32 ran up to 1.15x faster in fp32
    # than unchunked, and in bf16 1.1x faster than with twice this budget, with a third less memory.
    # Each image's numbers do not depend on the chunking. None turns it off.
    cpu_chunk_bytes: int | None = 10 * 2**20

    def __init__(self, config: DINOv3ViTConfig | None = None, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        config = config if config is not None else DINOv3ViTConfig()
        if not isinstance(config, DINOv3ViTConfig):
            raise TypeError(f"DINOv3ViTModel needs a DINOv3ViTConfig, got {type(config).__name__}")
        self.config = config
        self.attn_implementation = attn_implementation
        dim = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, dim, kernel_size=config.patch_hw, stride=config.patch_hw)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.empty(1, config.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim))
        self.rope = RopeTables(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        if self.cls_token.device.type != "meta":
            self.reset_parameters()

    # -- set-up -----------------------------------------------------------------------------------
    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {value!r}")
        self._attn_implementation = value

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def reset_parameters(self) -> None:
        """Random initialisation as Transformers does it (truncated normal, zero biases, layer scale)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention):
                for bias in (module.q_bias, module.k_bias, module.v_bias):
                    if bias is not None:
                        nn.init.zeros_(bias)
            elif isinstance(module, Block):
                nn.init.constant_(module.ls1, self.config.layerscale_value)
                nn.init.constant_(module.ls2, self.config.layerscale_value)
        trunc_normal_(self.cls_token, std)
        if self.config.num_register_tokens:
            trunc_normal_(self.register_tokens, std)
        nn.init.zeros_(self.mask_token)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # -- forward ----------------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns for an input of height x width pixels."""
        return self.config.grid_size(height, width)

    def embed(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, 1 + R + h*w, D) tokens, before the first block."""
        B = pixel_values.shape[0]
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        if bool_masked_pos is not None:
            mask = _check_mask(bool_masked_pos, B, patches.shape[1])
            patches = torch.where(mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls = self.cls_token.expand(B, -1, -1)
        registers = self.register_tokens.expand(B, -1, -1)
        return torch.cat((cls, registers, patches), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> DINOv3Output:
        """Run the backbone.

        pixel_values: (B, C, H, W), normalised images; cast to the model's dtype.
        bool_masked_pos: optional (B, h*w) (or (B, h, w)) bool; True replaces that patch by the mask token.
        output_hidden_states: also return the L+1 un-normed hidden states (the embedding output,
            then each block's output; the last one is pre-norm, as in current Transformers).
        output_attentions: also return each block's attention weights (B, heads, T, T). These are
            computed explicitly (the "eager" math) for this call whatever attn_implementation is.
        """
        pixel_values = self._check_pixels(pixel_values)
        chunk = self._chunk_size(pixel_values, output_attentions)
        if chunk < pixel_values.shape[0]:
            masks = bool_masked_pos.split(chunk) if bool_masked_pos is not None else [None] * pixel_values.shape[0]
            parts = zip(pixel_values.split(chunk), masks)
            return DINOv3Output.concat([self._forward(p, m, output_hidden_states, output_attentions) for p, m in parts])
        return self._forward(pixel_values, bool_masked_pos, output_hidden_states, output_attentions)

    def _forward(self, pixel_values, bool_masked_pos, output_hidden_states, output_attentions) -> DINOv3Output:
        h, w = self.grid_size(*pixel_values.shape[-2:])
        x = self.embed(pixel_values, bool_masked_pos)  # (B, T, D)
        cos, sin = self.rope(h, w, x.dtype, x.device)  # (N, Dh) each

        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block in self.blocks:
            x, weights = self._run_block(block, x, cos, sin, output_attentions)
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:
                attentions.append(weights)

        x = self.norm(x)
        return DINOv3Output(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            num_register_tokens=self.config.num_register_tokens,
            grid_size=(h, w),
        )

    def _chunk_size(self, pixel_values: torch.Tensor, output_attentions: bool) -> int:
        """Images per chunk when a large CPU batch runs in pieces (see cpu_chunk_bytes)."""
        h, w = self.grid_size(*pixel_values.shape[-2:])
        tokens, config = self.num_prefix_tokens + h * w, self.config
        widest = max(3 * config.hidden_size, config.intermediate_size * (2 if config.use_gated_mlp else 1))
        per_image = tokens * widest * pixel_values.element_size()
        if output_attentions:
            per_image += config.num_attention_heads * tokens * tokens * pixel_values.element_size()
        # int8-dynamic layers quantize each input as a whole: 4 images of ViT-S/16 at 224 px ran
        # 1.5x faster than 16 (fp32 and bf16 do not care).
        budget = self.cpu_chunk_bytes
        if budget is not None and getattr(self, "quantization", None) == "int8-dynamic":
            budget //= 4
        return cpu_chunk_size(pixel_values, budget, per_image)

    def _run_block(self, block: Block, x, cos, sin, need_weights: bool = False):
        args = (x, cos, sin, self.num_prefix_tokens, self.attn_implementation, need_weights)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- intermediate layers ------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Hidden states there are to choose from: the embedding output (0), then each block's (1..L)."""
        return self.config.num_hidden_states

    def hidden_states_at(self, pixel_values: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Un-normed hidden states (B, T, D) at the given indices (0 = embedding output, i = block i's
        output; negative ones count from the end), running only the blocks needed to reach them."""
        indices = resolve_indices(indices, self.num_stages)
        pixel_values = self._check_pixels(pixel_values)
        h, w = self.grid_size(*pixel_values.shape[-2:])
        x = self.embed(pixel_values)
        cos, sin = self.rope(h, w, x.dtype, x.device)
        states = {0: x}
        for i, block in enumerate(self.blocks[: max(indices)], start=1):
            x = self._run_block(block, x, cos, sin)[0]
            states[i] = x
        return [states[i] for i in indices]

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Meta's `get_intermediate_layers`: the patch tokens after the last `n` blocks, or after the
        blocks whose 0-based indices `n` lists; each (B, h*w, D), or (B, D, h, w) with `reshape`.

        norm applies the final LayerNorm to each. With `return_class_token` / `return_extra_tokens`
        each entry is a tuple (patches, cls (B, D)[, registers (B, R, D)]), as in Meta's code.
        Blocks after the last one asked for are not run.
        """
        blocks = last_or_chosen(n, self.config.num_hidden_layers, "block")
        outputs = self.hidden_states_at(pixel_values, [i + 1 for i in blocks])
        if norm:
            outputs = [self.norm(out) for out in outputs]
        prefix = self.num_prefix_tokens
        classes = [out[:, 0] for out in outputs]
        extras = [out[:, 1:prefix] for out in outputs]
        patches = [out[:, prefix:] for out in outputs]
        if reshape:
            h, w = self.grid_size(*pixel_values.shape[-2:])
            patches = [p.unflatten(1, (h, w)).permute(0, 3, 1, 2).contiguous() for p in patches]
        parts = [patches] + ([classes] if return_class_token else []) + ([extras] if return_extra_tokens else [])
        return tuple(patches) if len(parts) == 1 else tuple(zip(*parts))

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor of shape (B, C, H, W), got {type(pixel_values).__name__}; "
                "use dino3's image processor to turn images into pixel tensors"
            )
        if pixel_values.ndim == 3:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}: add a batch dimension "
                "(pixel_values[None]) to get (B, C, H, W)"
            )
        ph, pw = self.config.patch_hw
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (B, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-2] < ph or pixel_values.shape[-1] < pw:
            raise ValueError(
                f"the image ({pixel_values.shape[-2]}x{pixel_values.shape[-1]}) is smaller than one {ph}x{pw} patch"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}; the model takes normalised float pixels "
                "(use dino3's image processor)"
            )
        return pixel_values.to(self.patch_embed.weight.dtype)


def _check_mask(mask: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"bool_masked_pos must be a bool tensor, got {mask.dtype}")
    if mask.ndim == 3:
        mask = mask.flatten(1)
    if tuple(mask.shape) != (batch, num_patches):
        raise ValueError(
            f"bool_masked_pos must have shape (B, h*w) = ({batch}, {num_patches}) or (B, h, w), got {tuple(mask.shape)}"
        )
    return mask
