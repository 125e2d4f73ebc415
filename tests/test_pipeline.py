"""The feature-extraction pipeline against Transformers' pipeline, and the batched engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import dino3
from dino3.images import ImageError
from dino3.pipeline import iter_batches
from dino3.processing import DINOv3ViTImageProcessor
from helpers import max_diff, randomize_

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"
RGB_PHOTOS = [str(PHOTOS / n) for n in ("chelsea.png", "rocket.jpg", "coffee.png", "hubble_deep_field.jpg")]
VIT = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=2, num_register_tokens=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VIT))).save_pretrained(folder)
    transformers.DINOv3ViTImageProcessor().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_transformers_pipeline(folder, pool, batch_size):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder), batch_size=batch_size)
    ours = dino3.pipeline("image-feature-extraction", model=folder, batch_size=batch_size)
    expected = reference(RGB_PHOTOS, pool=pool, return_tensors=True)
    got = ours(RGB_PHOTOS, pool=pool, return_tensors=True)
    assert len(got) == len(expected) == len(RGB_PHOTOS)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape  # (1, 1 + R + N, D) or (1, D)
        assert max_diff(mine, theirs) <= 1e-4


def test_single_image_and_nested_lists(folder):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder))
    ours = dino3.pipeline(model=folder)
    expected, got = reference(RGB_PHOTOS[0]), ours(RGB_PHOTOS[0])
    assert isinstance(got, list) and len(got) == 1 and len(got[0]) == 201 and len(got[0][0]) == 128
    assert max_diff(torch.tensor(got), torch.tensor(expected)) <= 1e-4


def test_bf16_pipeline(folder):
    reference = transformers.pipeline("image-feature-extraction", model=str(folder), dtype=torch.bfloat16)
    ours = dino3.pipeline(model=folder, dtype=torch.bfloat16)
    exact = dino3.pipeline(model=folder)(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    got = ours(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    expected = reference(RGB_PHOTOS[:2], pool=True, return_tensors=True)
    for mine, theirs, truth in zip(got, expected, exact):
        assert mine.dtype == torch.bfloat16
        assert max_diff(mine, truth) <= 1.5 * max_diff(theirs, truth) + 1e-2


def test_convnext_pipeline(tmp_path):
    model = randomize_(
        transformers.DINOv3ConvNextModel(
            transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
        )
    )
    model.save_pretrained(tmp_path)
    transformers.DINOv3ViTImageProcessor().save_pretrained(tmp_path)
    expected = transformers.pipeline("image-feature-extraction", model=str(tmp_path))(
        RGB_PHOTOS[:2], return_tensors=True
    )
    got = dino3.pipeline(model=tmp_path, batch_size=2)(RGB_PHOTOS[:2], return_tensors=True)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape == (1, 50, 64)
        assert max_diff(mine, theirs) <= 1e-4


def test_pipeline_with_aspect_mode(folder):
    ours = dino3.pipeline(model=folder, batch_size=4)
    out = ours(RGB_PHOTOS, return_tensors=True, image_processor_kwargs=dict(keep_aspect="shorter", target_size=160))
    # (H, W) 300x451 -> 160x241, cropped to 160x240 (10x15 patches); 427x640 and 400x600 alike;
    # 872x1000 -> 160x183, cropped to 160x176 (10x11 patches)
    assert [o.shape[1] for o in out] == [1 + 4 + 150, 1 + 4 + 150, 1 + 4 + 150, 1 + 4 + 10 * 11]


def test_engine_batches_by_size_and_reports_bad_images(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    sources = [RGB_PHOTOS[0], str(tmp_path / "bad.jpg"), RGB_PHOTOS[1], RGB_PHOTOS[2]]
    processor = DINOv3ViTImageProcessor()
    errors = []
    batches = list(iter_batches(sources, processor, batch_size=2, workers=2, on_error=lambda *e: errors.append(e)))
    assert [b.indices for b in batches] == [[0, 2], [3]]
    assert errors[0][0] == 1 and isinstance(errors[0][2], ImageError)
    with pytest.raises(ImageError, match="bad.jpg"):
        list(iter_batches(sources, processor, batch_size=2, workers=0))


def test_the_decoding_threads_have_ended_when_the_batches_have():
    """A daemon thread still freeing its last tensor as the interpreter exits is killed inside
    torch's C++, which aborts the process (exit 134 after a complete run): the pipeline waits for
    its threads."""
    import threading

    photos = sorted(PHOTOS.glob("*.jpg"))
    for _ in range(3):
        batches = list(iter_batches(photos * 3, DINOv3ViTImageProcessor(), batch_size=4, workers=2))
        assert sum(len(b.indices) for b in batches) == 3 * len(photos)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("dino3-decode")]
