"""The DINOv3 ConvNeXt, computed as Hugging Face Transformers computes it.

Four stages at 1/4, 1/8, 1/16 and 1/32 of the input resolution. Each starts with a downsampling
(stage 0: 4x4 conv then LayerNorm; later stages: LayerNorm then 2x2 conv) followed by blocks of
depthwise 7x7 conv -> LayerNorm -> Linear(4x) -> GELU -> Linear -> layer scale, with a residual.
The head average-pools the last stage into one token, puts it before the h*w patch tokens and
normalises all of them with one LayerNorm: last_hidden_state is (B, 1 + h*w, C).

Activations are kept in channels-last memory (NHWC strides under NCHW shapes): the permutes around
each block's LayerNorm and Linears are then free, and oneDNN's depthwise convolution is fastest.
The numbers do not depend on the memory format beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DINOv3ConvNextConfig
from .layers import DropPath, apply_linear, cpu_chunk_size, last_or_chosen, resolve_indices, trunc_normal_
from .outputs import DINOv3Output
from .pretrained import PretrainedMixin


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNextBlock(nn.Module):
    """x + drop_path(gamma * fc2(act(fc1(norm(dwconv(x))))))."""

    def __init__(self, dim: int, config: DINOv3ConvNextConfig, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = config.hidden_act
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = apply_linear(self.fc1, self.norm(y), self.act)  # (B, H, W, 4C)
        y = apply_linear(self.fc2, y) * self.gamma  # (B, H, W, C)
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNextStage(nn.Module):
    def __init__(self, config: DINOv3ConvNextConfig, index: int, drop_paths: list[float]) -> None:
        super().__init__()
        out_dim = config.hidden_sizes[index]
        eps = config.layer_norm_eps
        if index == 0:
            conv = nn.Conv2d(config.num_channels, out_dim, kernel_size=4, stride=4)
            self.downsample = nn.Sequential(conv, ChannelsFirstLayerNorm(out_dim, eps=eps))
        else:
            in_dim = config.hidden_sizes[index - 1]
            conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
            self.downsample = nn.Sequential(ChannelsFirstLayerNorm(in_dim, eps=eps), conv)
        self.blocks = nn.ModuleList(ConvNextBlock(out_dim, config, rate) for rate in drop_paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class DINOv3ConvNextModel(PretrainedMixin, nn.Module):
    """The DINOv3 ConvNeXt backbone.

    `forward(pixel_values)` takes (B, C, H, W) images of any size (each stage floors odd sizes, as
    the reference does) and returns a `DINOv3Output` whose tokens are [pooled, patches of the last
    stage]: the same accessors as the ViT's (`cls_token`, `patch_tokens`, `patch_grid`).
    """

    config_class = DINOv3ConvNextConfig

    # On the CPU a large batch runs in chunks whose biggest activation (the first stage's 4x-wide MLP
    # output) stays under this many bytes: 4 images at 224 px ran 1.3x faster than a whole
    # batch of 32 at 224 px. Each image's numbers do not depend on the chunking. None turns it off.
    cpu_chunk_bytes: int | None = 20 * 2**20

    def __init__(self, config: DINOv3ConvNextConfig | None = None, channels_last: bool = True) -> None:
        super().__init__()
        config = config if config is not None else DINOv3ConvNextConfig()
        if not isinstance(config, DINOv3ConvNextConfig):
            raise TypeError(f"DINOv3ConvNextModel needs a DINOv3ConvNextConfig, got {type(config).__name__}")
        self.config = config
        self.channels_last = channels_last
        total = sum(config.depths)
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks (as numpy.linspace).
        step = config.drop_path_rate / (total - 1) if total > 1 else 0.0
        rates = [i * step for i in range(total)]
        starts = [sum(config.depths[:s]) for s in range(config.num_stages)]
        self.stages = nn.ModuleList(
            ConvNextStage(config, s, rates[starts[s] : starts[s] + config.depths[s]]) for s in range(config.num_stages)
        )
        self.norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        if self.norm.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation as Transformers does it."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ConvNextBlock):
                nn.init.constant_(module.gamma, self.config.layer_scale_init_value)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> DINOv3Output:
        """Run the backbone.

        pixel_values: (B, C, H, W), normalised images; cast to the model's dtype.
        output_hidden_states: also return (pixel_values, stage 1 .. stage 4 outputs), un-normed, NCHW.
        """
        x = _check_pixels(pixel_values, self.config.num_channels, self.norm.weight.dtype, self.config.stride[0])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        chunk = self._chunk_size(x)
        if chunk < x.shape[0]:
            return DINOv3Output.concat([self._forward(part, output_hidden_states) for part in x.split(chunk)])
        return self._forward(x, output_hidden_states)

    def _forward(self, x: torch.Tensor, output_hidden_states: bool) -> DINOv3Output:
        hidden_states = [x] if output_hidden_states else None
        for stage in self.stages:
            x = stage(x)
            if hidden_states is not None:
                hidden_states.append(x)
        B, C, h, w = x.shape
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        patches = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        tokens = self.norm(torch.cat((pooled[:, None], patches), dim=1))  # (B, 1 + h*w, C)
        return DINOv3Output(
            last_hidden_state=tokens,
            pooler_output=tokens[:, 0],
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            grid_size=(h, w),
        )

    # -- intermediate layers ------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Hidden states there are to choose from: the input pixels (0), then each stage's (1..4)."""
        return self.config.num_hidden_states

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of the last stage's map for an input of height x width pixels."""
        return self.config.grid_size(height, width)

    def hidden_states_at(self, pixel_values: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Un-normed (B, C, h, w) maps at the given indices (0 = the pixels, i = stage i's output;
        negative ones count from the end), running only the stages needed to reach them."""
        indices = resolve_indices(indices, self.num_stages)
        x = _check_pixels(pixel_values, self.config.num_channels, self.norm.weight.dtype, self.config.stride[0])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        states = {0: x}
        for i, stage in enumerate(self.stages[: max(indices)], start=1):
            x = stage(x)
            states[i] = x
        return [states[i] for i in indices]

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Meta's ConvNeXt `get_intermediate_layers`: the outputs of the last `n` stages, or of the
        stages whose 0-based indices `n` lists, as (B, h*w, C) tokens or (B, C, h, w) with `reshape`.

        Each stage's class token is its average-pooled map. norm applies the final LayerNorm to the
        last stage's tokens only (Meta's `norms` are the identity for the other stages). With
        `return_class_token` each entry is a tuple (patches, cls (B, C)).
        """
        S = self.config.num_stages
        stages = last_or_chosen(n, S, "stage")
        outputs = []
        for stage, x in zip(stages, self.hidden_states_at(pixel_values, [i + 1 for i in stages])):
            cls = x.mean((-2, -1))  # (B, C)
            patches = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
            if norm and stage == S - 1:
                cls, patches = self.norm(cls), self.norm(patches)
            if reshape:
                patches = patches.transpose(1, 2).unflatten(2, x.shape[-2:]).contiguous()
            outputs.append((patches, cls) if return_class_token else patches)
        return tuple(outputs)

    def _chunk_size(self, x: torch.Tensor) -> int:
        per_image = (x.shape[-2] // 4) * (x.shape[-1] // 4) * 4 * self.config.hidden_sizes[0] * x.element_size()
        return cpu_chunk_size(x, self.cpu_chunk_bytes, per_image)


def _check_pixels(pixel_values: torch.Tensor, channels: int, dtype: torch.dtype, stride: int) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a tensor of shape (B, {channels}, H, W), got {shape}")
    if min(pixel_values.shape[-2:]) < stride:
        raise ValueError(
            f"the image ({pixel_values.shape[-2]}x{pixel_values.shape[-1]}) is too small: the ConvNeXt "
            f"downsamples by {stride}, so each side needs at least {stride} pixels"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values has dtype {pixel_values.dtype}; the model takes normalised float pixels")
    return pixel_values.to(dtype)
