"""A backbone view of either model: multi-scale feature maps with Transformers' semantics.

`DINOv3Backbone` returns what Transformers' `DINOv3ViTBackbone` / `DINOv3ConvNextBackbone` return
for the same weights: the stages named "stem", "stage1", ... are the embedding output (ViT) or the
input pixels (ConvNeXt), then each block's (ViT) or stage's (ConvNeXt) output; `out_indices` /
`out_features` pick some. ViT feature maps drop the CLS and register tokens, are normed with the
final LayerNorm (always for the last stage, for the others when `apply_layernorm`) and are
reshaped to (B, D, h, w) when `reshape_hidden_states`. ConvNeXt feature maps are the raw stage
outputs. Stages after the last one asked for are not computed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convnext import DINOv3ConvNextModel
from .vit import DINOv3ViTModel


@dataclass
class BackboneOutput:
    feature_maps: tuple[torch.Tensor, ...]  # one per selected stage
    cls_tokens: tuple[torch.Tensor, ...] | None = None  # ViT with return_class_token: (B, D) per stage
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every stage computed, un-normed


class DINOv3Backbone(nn.Module):
    def __init__(
        self,
        model: DINOv3ViTModel | DINOv3ConvNextModel,
        out_indices: Sequence[int] | None = None,
        out_features: Sequence[str] | None = None,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        return_class_token: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.is_vit = isinstance(model, DINOv3ViTModel)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, model.num_stages)]
        if out_indices is None and out_features is None:
            out_indices = [len(self.stage_names) - 1]
        if out_indices is None:
            unknown = [f for f in out_features if f not in self.stage_names]
            if unknown:
                raise ValueError(f"unknown out_features {unknown}; the stages are {self.stage_names}")
            out_indices = [self.stage_names.index(f) for f in out_features]
        count = len(self.stage_names)
        self.out_indices = [i + count if i < 0 else i for i in out_indices]
        if any(not 0 <= i < count for i in self.out_indices):
            raise ValueError(f"out_indices {list(out_indices)} out of range for {count} stages")
        self.out_features = [self.stage_names[i] for i in self.out_indices]
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.return_class_token = return_class_token

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> DINOv3Backbone:
        """Load a model (any checkpoint `dino3.load` takes) and view it as a backbone. The backbone
        options come from the keyword arguments, else from the checkpoint's config.json."""
        from .pretrained import load_pretrained

        names = ("out_indices", "out_features", "apply_layernorm", "reshape_hidden_states", "return_class_token")
        options = {k: kwargs.pop(k) for k in names if k in kwargs}
        model = load_pretrained(name_or_path, **kwargs)
        extra = model.config.extra
        if "out_indices" not in options and "out_features" not in options and "out_indices" in extra:
            options["out_indices"] = extra["out_indices"]  # config.json carries both, aligned
        for key in names[2:]:
            if key not in options and key in extra:
                options[key] = extra[key]
        return cls(model, **options)

    @property
    def num_features(self) -> list[int]:
        if self.is_vit:
            return [self.model.config.hidden_size] * len(self.stage_names)
        return [self.model.config.num_channels] + list(self.model.config.hidden_sizes)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BackboneOutput:
        last_needed = len(self.stage_names) - 1 if output_hidden_states else max(self.out_indices)
        states = self.model.hidden_states_at(pixel_values, list(range(last_needed + 1)))
        if not self.is_vit:
            maps = tuple(states[i] for i in self.out_indices)
            return BackboneOutput(feature_maps=maps, hidden_states=tuple(states) if output_hidden_states else None)

        h, w = self.model.grid_size(*pixel_values.shape[-2:])
        prefix = self.model.num_prefix_tokens
        last = len(self.stage_names) - 1
        maps, classes = [], []
        for i in self.out_indices:
            state = states[i]
            if i == last or self.apply_layernorm:
                state = self.model.norm(state)
            classes.append(state[:, 0])
            patches = state[:, prefix:]  # (B, h*w, D)
            if self.reshape_hidden_states:
                patches = patches.unflatten(1, (h, w)).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
            maps.append(patches)
        return BackboneOutput(
            feature_maps=tuple(maps),
            cls_tokens=tuple(classes) if self.return_class_token else None,
            hidden_states=tuple(states) if output_hidden_states else None,
        )
