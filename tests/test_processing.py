"""The image processor against the pinned Transformers DINOv3ViTImageProcessor, and the aspect mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DINOv3ViTImageProcessor as HFProcessor
from transformers.image_utils import load_image as hf_load_image

import dino3
from dino3 import ConfigError
from dino3.presets import IMAGENET_MEAN, SAT493M_MEAN, SAT493M_STD
from dino3.processing import DINOv3ViTImageProcessor
from helpers import max_diff

PHOTOS = sorted(Path(__file__).resolve().parents[1].joinpath("examples", "images").glob("*.[jp][pn]g"))
TOL = 1e-5


def synthetic(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_photos_are_there():
    assert len(PHOTOS) >= 8


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_real_photos_match_reference(photo):
    # The reference as a user runs it: Transformers' load_image (EXIF, RGB), then its processor.
    expected = HFProcessor()(hf_load_image(str(photo)), return_tensors="pt").pixel_values
    got = DINOv3ViTImageProcessor()(str(photo), alpha="drop").pixel_values  # load_image drops alpha
    assert got.shape == expected.shape == (1, 3, 224, 224)
    assert got.dtype == torch.float32
    assert max_diff(got, expected) <= TOL


def test_batch_of_mixed_sizes_matches_reference():
    images = [hf_load_image(str(p)) for p in PHOTOS]
    expected = HFProcessor()(images, return_tensors="pt").pixel_values
    assert max_diff(DINOv3ViTImageProcessor()(images).pixel_values, expected) <= TOL


@pytest.mark.parametrize(
    "shape", [(300, 451), (5, 3), (1, 1), (2000, 3000), (224, 224), (97, 1500)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_synthetic_sizes_match_reference(shape):
    image = synthetic(*shape)  # numpy arrays are HWC for dino3; the reference must be told for tiny ones
    expected = HFProcessor()(image, return_tensors="pt", input_data_format="channels_last").pixel_values
    assert max_diff(DINOv3ViTImageProcessor()(image).pixel_values, expected) <= TOL


OPTIONS = {
    "shortest-edge+crop": dict(
        size={"shortest_edge": 256}, do_center_crop=True, crop_size={"height": 224, "width": 224}
    ),
    "shortest+longest-edge": dict(size={"shortest_edge": 200, "longest_edge": 260}),
    "max-height-width": dict(size={"max_height": 180, "max_width": 300}),
    "crop-larger-than-image": dict(
        size={"height": 64, "width": 96}, do_center_crop=True, crop_size={"height": 80, "width": 90}
    ),
    "bicubic": dict(resample=3),
    "nearest": dict(resample=0, size={"height": 50, "width": 70}),
    "no-normalize": dict(do_normalize=False),
    "no-resize": dict(do_resize=False),
    "custom-stats": dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], size={"height": 128, "width": 160}),
    "rescale-factor": dict(rescale_factor=1 / 127.5),
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_options_match_reference(options):
    kwargs = OPTIONS[options]
    images = [synthetic(300, 451, 1), synthetic(640, 427, 2)]  # landscape and portrait
    expected = HFProcessor(**kwargs)(images, return_tensors=None).pixel_values
    got = DINOv3ViTImageProcessor(**kwargs)(images, return_tensors=None).pixel_values
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.shape == theirs.shape
        assert max_diff(mine, theirs) <= TOL


def test_unsupported_resample_is_refused():
    with pytest.raises(ConfigError, match="resample=1 is not supported"):
        DINOv3ViTImageProcessor(resample=1)


# -- aspect-preserving mode ----------------------------------------------------------------------
@pytest.mark.parametrize("fit", ["crop", "pad", "resize"])
@pytest.mark.parametrize("side", ["shorter", "longer"])
def test_aspect_mode_sizes(fit, side):
    processor = DINOv3ViTImageProcessor(keep_aspect=side, target_size=448, fit=fit)
    out = processor([synthetic(300, 451), synthetic(640, 427), synthetic(1000, 50)])
    assert isinstance(out.pixel_values, list)  # three sizes: not stackable
    for (h, w), pixels, original in zip(out.grid_sizes, out.pixel_values, [(300, 451), (640, 427), (1000, 50)]):
        assert pixels.shape == (3, 16 * h, 16 * w)
        target = min(original) if side == "shorter" else max(original)
        scale = 448 / target
        # every side is within a patch of the exactly scaled image, which keeps its aspect ratio
        assert abs(16 * h - original[0] * scale) < 16 and abs(16 * w - original[1] * scale) < 16


def test_aspect_mode_resize_equals_reference_at_that_size():
    image = synthetic(640, 427)
    processor = DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=448, fit="resize")
    height, width = processor.aspect_size(640, 427)
    assert (height, width) == (672, 448)
    expected = HFProcessor(size={"height": height, "width": width})(image, return_tensors="pt").pixel_values
    out = processor(image)
    assert out.grid_sizes == [(42, 28)]
    assert max_diff(out.pixel_values, expected) <= TOL


def test_aspect_mode_crop_equals_reference_resize_then_crop():
    image = synthetic(300, 451)
    processor = DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=250, fit="crop")
    height, width = processor.aspect_size(300, 451)  # 250 x 376, cropped to 240 x 368
    reference = HFProcessor(
        size={"height": height, "width": width}, do_center_crop=True, crop_size={"height": 240, "width": 368}
    )
    expected = reference(image, return_tensors="pt").pixel_values
    assert max_diff(processor(image).pixel_values, expected) <= TOL


def test_aspect_mode_pad_pads_with_zeros_after_normalising():
    image = synthetic(300, 451)
    processor = DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=250, fit="pad")
    height, width = processor.aspect_size(300, 451)
    resized = HFProcessor(size={"height": height, "width": width})(image, return_tensors="pt").pixel_values
    out = processor(image)
    assert out.grid_sizes == [(16, 24)]
    assert max_diff(out.pixel_values, F.pad(resized, (0, 384 - width, 0, 256 - height))) <= TOL


def test_aspect_mode_same_sizes_stack():
    out = DINOv3ViTImageProcessor(keep_aspect="longer", target_size=320)([synthetic(300, 400), synthetic(600, 800)])
    assert isinstance(out.pixel_values, torch.Tensor) and out.pixel_values.shape == (2, 3, 240, 320)
    assert out.grid_sizes == [(15, 20), (15, 20)]


def test_aspect_mode_needs_a_target():
    with pytest.raises(ConfigError, match="needs target_size"):
        DINOv3ViTImageProcessor(keep_aspect="shorter")
    with pytest.raises(ConfigError, match="fit must be one of"):
        DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=224, fit="squash")


# -- normalisation per checkpoint, config files -------------------------------------------------
def test_normalisation_follows_the_preset():
    assert DINOv3ViTImageProcessor.from_pretrained("vits16").image_mean == list(IMAGENET_MEAN)
    sat = DINOv3ViTImageProcessor.from_pretrained("vitl16-sat493m")
    assert (sat.image_mean, sat.image_std) == (list(SAT493M_MEAN), list(SAT493M_STD))
    assert DINOv3ViTImageProcessor.from_pretrained("facebook/dinov3-vit7b16-pretrain-sat493m").image_mean == list(
        SAT493M_MEAN
    )
    overridden = DINOv3ViTImageProcessor.from_pretrained("vitl16-sat493m", image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert overridden.image_mean == [0.5] * 3


def test_config_file_round_trips_with_transformers(tmp_path):
    ours = DINOv3ViTImageProcessor(size={"height": 256, "width": 320}, image_mean=[0.4, 0.4, 0.4])
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours")
    image = synthetic(300, 451)
    expected = theirs(image, return_tensors="pt").pixel_values
    assert expected.shape == (1, 3, 256, 320)
    assert max_diff(ours(image).pixel_values, expected) <= TOL

    HFProcessor(
        size={"height": 192, "width": 160}, do_center_crop=True, crop_size={"height": 160, "width": 160}
    ).save_pretrained(tmp_path / "theirs")
    loaded = DINOv3ViTImageProcessor.from_pretrained(tmp_path / "theirs")
    assert loaded.size == {"height": 192, "width": 160} and loaded.do_center_crop


def test_dino3_fields_round_trip(tmp_path):
    DINOv3ViTImageProcessor(keep_aspect="longer", target_size=512, fit="pad").save_pretrained(tmp_path)
    loaded = DINOv3ViTImageProcessor.from_pretrained(tmp_path)
    assert (loaded.keep_aspect, loaded.target_size, loaded.fit) == ("longer", 512, "pad")


# -- inputs and outputs ---------------------------------------------------------------------------
def test_return_types_and_batch_feature():
    image = synthetic(100, 120)
    as_np = DINOv3ViTImageProcessor()(image, return_tensors="np").pixel_values
    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, 3, 224, 224)
    as_list = DINOv3ViTImageProcessor()(image, return_tensors=None).pixel_values
    assert isinstance(as_list, list) and as_list[0].shape == (3, 224, 224)
    out = DINOv3ViTImageProcessor()([image, image])
    assert out["pixel_values"] is out.pixel_values and out.grid_sizes == [(14, 14), (14, 14)]
    assert list(out) == ["pixel_values"]  # so that model(**inputs) works
    moved = out.to(torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.grid_sizes == out.grid_sizes


def test_float_images_are_taken_as_already_rescaled():
    image = synthetic(60, 80)
    from_uint8 = DINOv3ViTImageProcessor()(image).pixel_values
    from_float = DINOv3ViTImageProcessor()(image.astype(np.float32) / 255).pixel_values
    assert max_diff(from_uint8, from_float) <= 1e-5


def test_accepts_what_the_loader_accepts():
    photo = PHOTOS[0]
    expected = DINOv3ViTImageProcessor()(str(photo)).pixel_values
    for source in (photo, photo.read_bytes(), io.BytesIO(photo.read_bytes())):
        assert torch.equal(DINOv3ViTImageProcessor()(source).pixel_values, expected)


def test_model_runs_on_processor_output():
    model = dino3.DINOv3ViTModel(dino3.DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1))
    inputs = DINOv3ViTImageProcessor(keep_aspect="shorter", target_size=64)(str(PHOTOS[0]))
    with torch.no_grad():
        out = model(**inputs)
    assert out.grid_size == inputs.grid_sizes[0]


@pytest.mark.parametrize("size", [(3000, 2000), (2000, 3000), (4000, 600)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["square", "shorter", "longer"])
def test_jpeg_draft_never_decodes_below_the_target(size, mode, monkeypatch):
    """jpeg_draft decodes a large JPEG at a reduced scale, but never smaller than what it is resized
    to, whatever the orientation and the mode."""
    from PIL import Image

    from dino3 import images

    width, height = size
    data = io.BytesIO()
    Image.fromarray(synthetic(height, width)).save(data, format="JPEG", quality=90)
    options = {
        "square": {},
        "shorter": dict(keep_aspect="shorter", target_size=448),
        "longer": dict(keep_aspect="longer", target_size=448),
    }[mode]
    processor = DINOv3ViTImageProcessor(jpeg_draft=True, **options)
    decoded = []
    real_decode = images.decode
    monkeypatch.setattr(
        "dino3.processing.decode", lambda opened, **k: decoded.append(opened.image.size) or real_decode(opened, **k)
    )
    processor.pixels(data.getvalue())
    ((w, h),) = decoded
    if mode == "square":
        assert (w, h) != (width, height)  # it did decode at a reduced scale
        assert min(w, h) >= 224
    else:
        target_h, target_w = processor.aspect_size(height, width)
        assert h >= target_h and w >= target_w
