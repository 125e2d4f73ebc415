"""dino3's ConvNeXt against the pinned Transformers DINOv3ConvNextModel, on the same random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ConvNextConfig as HFConfig
from transformers import DINOv3ConvNextModel as HFModel

import dino3
from dino3 import DINOv3ConvNextConfig, DINOv3ConvNextModel
from dino3.models import convnext
from helpers import max_diff, randomize_

FP32_TOL = 1e-4
CONFIGS = {  # reduced depths, real widths
    "tiny-widths": dict(hidden_sizes=[96, 192, 384, 768], depths=[2, 1, 2, 1]),
    "base-widths": dict(hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 2, 1]),
}
SIZES = [(224, 224), (96, 160), (97, 131)]  # square, non-square, odd


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = randomize_(HFModel(HFConfig(**CONFIGS[request.param])).eval())  # gamma near 1, not 1e-6
    reference.save_pretrained(folder)
    return reference, DINOv3ConvNextModel.from_pretrained(folder)


def pixels(batch, size, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_reference(models, size, batch):
    reference, ours = models
    x = pixels(batch, size)
    with torch.no_grad():
        ref = reference(x, output_hidden_states=True)
        out = ours(x, output_hidden_states=True)
    h, w = ref.hidden_states[-1].shape[-2:]
    assert (
        out.last_hidden_state.shape == ref.last_hidden_state.shape == (batch, 1 + h * w, ours.config.hidden_sizes[-1])
    )
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.pooler_output, ref.pooler_output) <= FP32_TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert mine.shape == theirs.shape
        assert max_diff(mine, theirs) <= FP32_TOL
    # The ViT's accessors work: the pooled token first, then the last stage's patches.
    assert out.grid_size == (h, w) and out.num_prefix_tokens == 1
    assert out.register_tokens.shape[1] == 0
    assert torch.equal(out.cls_token, out.pooler_output)
    assert max_diff(out.patch_grid, ref.last_hidden_state[:, 1:].unflatten(1, (h, w))) <= FP32_TOL


def test_large_batch_runs_in_chunks_with_the_same_numbers(models):
    _, ours = models
    x = pixels(6, (64, 64))
    with torch.no_grad():
        whole = ours(x, output_hidden_states=True)
        per_image = 64 // 4 * 64 // 4 * 4 * ours.config.hidden_sizes[0] * 4
        ours.cpu_chunk_bytes = 2 * per_image  # chunks of 2
        try:
            chunked = ours(x, output_hidden_states=True)
        finally:
            ours.cpu_chunk_bytes = DINOv3ConvNextModel.cpu_chunk_bytes
    assert max_diff(chunked.last_hidden_state, whole.last_hidden_state) <= 1e-5
    for a, b in zip(chunked.hidden_states, whole.hidden_states):
        assert max_diff(a, b) <= 1e-5


def test_memory_format_does_not_change_the_numbers(models):
    _, ours = models
    x = pixels(2, (96, 160))
    with torch.no_grad():
        channels_last = ours(x).last_hidden_state
        ours.channels_last = False
        try:
            plain = ours(x).last_hidden_state
        finally:
            ours.channels_last = True
    assert max_diff(channels_last, plain) <= 1e-5


def test_training_mode_drop_path_matches_reference(tmp_path):
    reference = randomize_(HFModel(HFConfig(hidden_sizes=[16, 32, 48, 64], depths=[2, 2, 2, 2], drop_path_rate=0.5)))
    reference.save_pretrained(tmp_path)
    ours = DINOv3ConvNextModel.from_pretrained(tmp_path).train()
    reference.train()
    x = pixels(4, (64, 64))
    torch.manual_seed(3)
    a = reference(x).last_hidden_state
    torch.manual_seed(3)
    b = ours(x).last_hidden_state
    assert max_diff(a, b) <= FP32_TOL
    b.pow(2).mean().backward()  # gradients flow through the training path
    assert ours.stages[0].blocks[0].fc1.weight.grad is not None


def test_dino3_checkpoint_loads_in_transformers(tmp_path):
    ours = randomize_(DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1])))
    ours.eval().save_pretrained(tmp_path)
    theirs = HFModel.from_pretrained(tmp_path).eval()
    x = pixels(2, (64, 96))
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, theirs(x).last_hidden_state) <= 1e-5
    assert dino3.load(tmp_path).config.depths == [1, 2, 1, 1]


def test_wrong_class_for_checkpoint(tmp_path):
    DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])).save_pretrained(
        tmp_path
    )
    with pytest.raises(dino3.CheckpointError, match="is a dinov3_convnext checkpoint, not dinov3_vit"):
        dino3.DINOv3ViTModel.from_pretrained(tmp_path)


def test_too_small_input_is_refused(models):
    _, ours = models
    with pytest.raises(ValueError, match="at least 32 pixels"):
        ours(torch.randn(1, 3, 31, 64))


def test_parity_check_catches_broken_block(models, monkeypatch):
    reference, ours = models
    x = pixels(1, (96, 96))
    monkeypatch.setattr(convnext.ConvNextBlock, "forward", lambda self, x: x + self.dwconv(x))
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, reference(x).last_hidden_state) > 100 * FP32_TOL
