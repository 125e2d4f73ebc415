"""What the backbones return: Transformers' output fields plus token accessors.

Both backbones put one global token first and the patch tokens, row-major, last:
ViT: [CLS, registers..., patches...]; ConvNeXt: [pooled, patches...]. The accessors below work the
same for both, so code written for one runs on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TENSOR_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


@dataclass
class DINOv3Output:
    """Backbone output. Indexing (`out[0]`, `out["pooler_output"]`) works as on Transformers' outputs."""

    last_hidden_state: torch.Tensor  # (B, T, D), normed; T = 1 + R + h*w
    pooler_output: torch.Tensor  # (B, D): the normed CLS (ViT) or pooled (ConvNeXt) token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # un-normed, input first
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, heads, T, T) per layer
    num_register_tokens: int = 0
    grid_size: tuple[int, int] = (0, 0)  # (h, w): patch rows and columns

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @property
    def cls_token(self) -> torch.Tensor:
        """(B, D): the normed global token (CLS for the ViT, the average-pooled token for ConvNeXt)."""
        return self.last_hidden_state[:, 0]

    @property
    def register_tokens(self) -> torch.Tensor:
        """(B, R, D): the normed register tokens (none for ConvNeXt)."""
        return self.last_hidden_state[:, 1 : self.num_prefix_tokens]

    @property
    def patch_tokens(self) -> torch.Tensor:
        """(B, h*w, D): the normed patch tokens, row-major."""
        return self.last_hidden_state[:, self.num_prefix_tokens :]

    @property
    def patch_grid(self) -> torch.Tensor:
        """(B, h, w, D): the patch tokens laid out on the image's patch grid."""
        return self.patch_tokens.unflatten(1, self.grid_size)

    @classmethod
    def concat(cls, outputs: list[DINOv3Output]) -> DINOv3Output:
        """The outputs of consecutive chunks of one batch, as one output."""
        first = outputs[0]

        def cat_each(name):
            if getattr(first, name) is None:
                return None
            return tuple(torch.cat(parts) for parts in zip(*[getattr(o, name) for o in outputs]))

        return cls(
            last_hidden_state=torch.cat([o.last_hidden_state for o in outputs]),
            pooler_output=torch.cat([o.pooler_output for o in outputs]),
            hidden_states=cat_each("hidden_states"),
            attentions=cat_each("attentions"),
            num_register_tokens=first.num_register_tokens,
            grid_size=first.grid_size,
        )

    def to_tuple(self) -> tuple:
        """The fields that are set, in Transformers' order."""
        return tuple(getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None)

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, str):
            if key not in _TENSOR_FIELDS:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def keys(self) -> list[str]:
        return [name for name in _TENSOR_FIELDS if getattr(self, name) is not None]
