"""dino3's ViT against the pinned Transformers DINOv3ViTModel, on the same random weights.

The reference model is built by Transformers, given random weights that exercise every path, saved
with its own save_pretrained and loaded by dino3 the way a user would. The last tests break dino3 on
purpose and check that this comparison notices.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ViTConfig as HFConfig
from transformers import DINOv3ViTModel as HFModel

import dino3
from dino3.models import vit
from helpers import max_diff, randomize_

FP32_TOL = 1e-4

# Each path in both states: plain / gated MLP, q/v bias or none (7B), 0 / 4 registers, head dim 64 / 128.
CONFIGS = {
    "plain-qvbias-reg4-dh64": dict(
        hidden_size=128, num_attention_heads=2, intermediate_size=256, num_register_tokens=4
    ),
    "gated-nobias-reg0-dh128": dict(
        hidden_size=256,
        num_attention_heads=2,
        intermediate_size=192,
        use_gated_mlp=True,
        hidden_act="silu",
        query_bias=False,
        value_bias=False,
    ),
    "gated-qkvbias-reg4-dh128": dict(
        hidden_size=256,
        num_attention_heads=2,
        intermediate_size=160,
        use_gated_mlp=True,
        hidden_act="silu",
        key_bias=True,
        num_register_tokens=4,
    ),
    "plain-nobiases-reg0-dh64": dict(
        hidden_size=128,
        num_attention_heads=2,
        intermediate_size=256,
        query_bias=False,
        value_bias=False,
        proj_bias=False,
        mlp_bias=False,
    ),
}
SIZES = [(224, 224), (96, 160), (100, 75)]  # square, non-square, not a multiple of 16


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    """(reference sdpa, reference eager, dino3) with the same random weights."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = randomize_(HFModel(HFConfig(num_hidden_layers=2, **CONFIGS[request.param])).eval())
    reference.save_pretrained(folder)
    eager = HFModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = dino3.DINOv3ViTModel.from_pretrained(folder)
    return reference, eager, ours


def pixels(batch: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_reference(models, size, batch):
    reference, _, ours = models
    x = pixels(batch, size)
    with torch.no_grad():
        ref = reference(x, output_hidden_states=True)
        out = ours(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.pooler_output, ref.pooler_output) <= FP32_TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(mine, theirs) <= FP32_TOL
    # The last hidden state is the pre-norm output of the last block, as in current Transformers.
    assert max_diff(ours.norm(out.hidden_states[-1]), out.last_hidden_state) == 0

    h, w = size[0] // 16, size[1] // 16
    R = ours.config.num_register_tokens
    assert out.grid_size == (h, w)
    assert torch.equal(out.cls_token, out.pooler_output)
    assert out.register_tokens.shape == (batch, R, ours.config.hidden_size)
    expected_grid = ref.last_hidden_state[:, 1 + R :].unflatten(1, (h, w))
    assert max_diff(out.patch_grid, expected_grid) <= FP32_TOL


def test_eager_attentions_match_reference(models):
    _, eager, ours = models
    x = pixels(3, (96, 160))
    with torch.no_grad():
        ref = eager(x, output_attentions=True)
        ours.attn_implementation = "eager"
        try:
            out = ours(x, output_attentions=True)
        finally:
            ours.attn_implementation = "sdpa"
        out_sdpa = ours(x, output_attentions=True)  # weights are computed on request under SDPA too
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert len(out.attentions) == len(ref.attentions) == ours.config.num_hidden_layers
    for mine, theirs in zip(out.attentions, ref.attentions):
        tokens = out.last_hidden_state.shape[1]
        assert mine.shape == theirs.shape == (3, ours.config.num_attention_heads, tokens, tokens)
        assert max_diff(mine, theirs) <= 1e-5
    for mine, theirs in zip(out_sdpa.attentions, ref.attentions):
        assert max_diff(mine, theirs) <= 1e-5


def test_bool_masked_pos_matches_reference(models):
    reference, _, ours = models
    x = pixels(3, (96, 160))
    mask = torch.rand(3, 6 * 10, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        ref = reference(x, bool_masked_pos=mask)
        out = ours(x, bool_masked_pos=mask)
        unmasked = ours(x)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.last_hidden_state, unmasked.last_hidden_state) > 1e-2  # the mask did something
    with torch.no_grad():  # a (B, h, w) mask means the same
        assert max_diff(ours(x, bool_masked_pos=mask.view(3, 6, 10)).last_hidden_state, out.last_hidden_state) == 0


def test_bf16_is_as_accurate_as_reference_bf16(models, tmp_path):
    """bf16 bound. bf16 keeps 8 mantissa bits, so two correct bf16 implementations differ by about the
    bf16 error itself; dino3 fuses bias and activation into its matmuls (one rounding where Transformers
    has two), so its bf16 output is not bitwise Transformers'. What must hold is that it is no less
    accurate: against the fp32 reference, its mean error is within 10% of Transformers-bf16's, its
    max error within 1.5x, and every token keeps a cosine >= 0.9999. (Measured on ViT-S-like
    models: mean errors 0.0057-0.0079 for dino3 against 0.0058-0.0080 for Transformers.)"""
    reference, _, ours = models
    reference.save_pretrained(tmp_path)
    ref16 = HFModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours16 = dino3.DINOv3ViTModel.from_pretrained(tmp_path, dtype="bfloat16")
    assert ours16.dtype == torch.bfloat16
    x = pixels(3, (96, 160))
    with torch.no_grad():
        r32 = reference(x).last_hidden_state
        r16 = ref16(x).last_hidden_state
        o16 = ours16(x).last_hidden_state
    assert o16.dtype == torch.bfloat16

    def mean_error(a):
        return (a.float() - r32).abs().mean().item()

    assert mean_error(o16) <= 1.1 * mean_error(r16)
    assert max_diff(o16, r32) <= 1.5 * max_diff(r16, r32)
    cosine = torch.nn.functional.cosine_similarity(o16.float(), r32, dim=-1).min().item()
    assert cosine >= 0.9999


# -- the comparison above notices a broken model --------------------------------------------------
def _parity_error(models) -> float:
    reference, _, ours = models
    ours.rope._cache.clear()
    x = pixels(2, (96, 160))
    with torch.no_grad():
        return max_diff(ours(x).last_hidden_state, reference(x).last_hidden_state)


def _interleaved_rope(x, cos, sin, num_prefix):
    # Pairs dims (0,1), (2,3), ... instead of (i, i + Dh/2): the other common RoPE convention.
    prefix, patches = x[:, :, :num_prefix], x[:, :, num_prefix:]
    rotated = torch.stack((-patches[..., 1::2], patches[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((prefix, patches * cos + rotated * sin), dim=2)


def _block_without_layer_scale(self, x, cos, sin, num_prefix, implementation="sdpa", need_weights=False):
    y, weights = self.attn(self.norm1(x), cos, sin, num_prefix, implementation, need_weights)
    x = x + y
    return x + self.mlp(self.norm2(x)), weights


def _scale_attention(mp, model):
    for module in model.modules():
        if isinstance(module, vit.Attention):
            mp.setattr(module, "scale", module.scale * 1.1)


_CENTRES = vit.RopeTables.patch_centres


def _break_rope(mp, rope):
    mp.setattr(vit, "apply_rope", rope)


BREAKAGES = {
    "no-rope": lambda mp, model: _break_rope(mp, lambda x, cos, sin, n: x),
    "rope-interleaved-pairs": lambda mp, model: _break_rope(mp, _interleaved_rope),
    "rope-axes-swapped": lambda mp, model: mp.setattr(
        vit.RopeTables, "patch_centres", staticmethod(lambda h, w, d: _CENTRES(h, w, d).flip(-1))
    ),
    "attention-scale": _scale_attention,
    "layer-scale-ignored": lambda mp, model: mp.setattr(vit.Block, "forward", _block_without_layer_scale),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_parity_check_catches_broken_model(models, monkeypatch, breakage):
    assert _parity_error(models) <= FP32_TOL
    BREAKAGES[breakage](monkeypatch, models[2])
    assert _parity_error(models) > 100 * FP32_TOL


def test_large_batch_runs_in_chunks_with_the_same_numbers(models):
    reference, _, ours = models
    x = pixels(5, (64, 48))
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(4)) < 0.3
    with torch.no_grad():
        whole = ours(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=True)
        ours.cpu_chunk_bytes = 1  # one image per chunk
        try:
            chunked = ours(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=True)
        finally:
            ours.cpu_chunk_bytes = dino3.DINOv3ViTModel.cpu_chunk_bytes
        expected = reference(x, bool_masked_pos=mask).last_hidden_state
    assert max_diff(chunked.last_hidden_state, whole.last_hidden_state) <= 1e-5
    assert max_diff(chunked.last_hidden_state, expected) <= FP32_TOL
    for a, b in zip(chunked.hidden_states + chunked.attentions, whole.hidden_states + whole.attentions, strict=True):
        assert max_diff(a, b) <= 1e-5


def test_rope_tables_follow_the_models_dtype(models):
    """The RoPE tables are cached per dtype and device: a model moved to bf16 after an fp32 forward
    computes what a model that was always bf16 computes."""
    import copy

    _, _, ours = models
    x = pixels(1, (96, 160))
    fresh = copy.deepcopy(ours)
    fresh.rope._cache.clear()
    with torch.no_grad():
        ours(x)  # fills the cache in fp32
        ours.to(torch.bfloat16)
        try:
            got = ours(x).last_hidden_state
        finally:
            ours.to(torch.float32)
        expected = fresh.to(torch.bfloat16)(x).last_hidden_state
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_flash_attention_implementation_matches_sdpa(models):
    _, _, ours = models
    x = pixels(2, (96, 160))
    with torch.no_grad():
        expected = ours(x).last_hidden_state
        ours.attn_implementation = "flash"
        try:
            got = ours(x).last_hidden_state
        finally:
            ours.attn_implementation = "sdpa"
    assert max_diff(got, expected) <= 1e-5
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        ours.attn_implementation = "flex"
