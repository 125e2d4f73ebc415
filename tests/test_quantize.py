"""Quantization: each mode loads and runs, keeps the features close to fp32, and fails clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

import dino3
from dino3.quantization import QuantizationError, quantize
from helpers import randomize_

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.[jp][pn]g"))
VIT = dict(hidden_size=192, num_attention_heads=3, intermediate_size=768, num_hidden_layers=4, num_register_tokens=4)
GATED = dict(VIT, intermediate_size=512, use_gated_mlp=True, hidden_act="silu")  # SwiGLU: the fused [gate; up]

# The bounds claimed in the README for these modes, on random weights of realistic scale and the
# example photos (the measured values are in benchmarks/RESULTS.md).
BOUNDS = {"int8-dynamic": (0.995, 0.99), "int8-weight": (0.999, 0.999)}  # (CLS cosine, patch cosine)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VIT))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gated_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gated")
    randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**GATED))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos():
    return dino3.DINOv3ViTImageProcessor()(PHOTOS).pixel_values


def cosines(model, reference, pixels):
    with torch.inference_mode():
        a, b = model(pixels), reference(pixels)
    cos = torch.nn.functional.cosine_similarity
    return cos(a.cls_token, b.cls_token).min().item(), cos(a.patch_tokens, b.patch_tokens, dim=-1).min().item()


@pytest.mark.parametrize("mlp", ["plain", "gated"])
@pytest.mark.parametrize("mode", list(BOUNDS))
def test_mode_keeps_features_close_to_fp32(folder, gated_folder, photos, mode, mlp):
    folder = folder if mlp == "plain" else gated_folder
    reference = dino3.load(folder)
    model = dino3.load(folder, quantize=mode)
    assert model.quantization == mode
    assert (
        type(model.blocks[0].mlp.fc1) is not torch.nn.Linear
        or type(model.blocks[0].mlp.fc1.weight.data) is not torch.Tensor
    )
    assert type(model.patch_embed) is torch.nn.Conv2d and type(model.patch_embed.weight.data) is torch.Tensor
    cls_cos, patch_cos = cosines(model, reference, photos)
    assert cls_cos >= BOUNDS[mode][0] and patch_cos >= BOUNDS[mode][1]
    assert cls_cos < 1.0 - 1e-7  # the layers really are quantized


def test_int8_dynamic_on_convnext(tmp_path, photos):
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=[32, 64, 96, 128], depths=[1, 2, 1, 1])
    randomize_(transformers.DINOv3ConvNextModel(config)).save_pretrained(tmp_path)
    reference, model = dino3.load(tmp_path), dino3.load(tmp_path, quantize="int8-dynamic")
    cls_cos, patch_cos = cosines(model, reference, photos)
    assert cls_cos >= 0.99 and patch_cos >= 0.99


def test_int8_dynamic_needs_cpu_and_float32(folder):
    with pytest.raises(QuantizationError, match="load the model in float32"):
        dino3.load(folder, dtype=torch.bfloat16, quantize="int8-dynamic")


def test_int4_explains_where_it_runs(folder):
    if torch.cuda.is_available():
        pytest.skip("on a GPU int4-weight runs; this checks the CPU's message")
    with pytest.raises(QuantizationError, match="int4-weight runs on CUDA.*use int8-dynamic"):
        dino3.load(folder, dtype=torch.bfloat16, quantize="int4-weight")


def test_missing_backend_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizationError, match=r"int8-weight needs torchao.*pip install 'dino3\[torchao\]'"):
        dino3.load(folder, quantize="int8-weight")


def test_unknown_mode_and_double_quantization(folder):
    with pytest.raises(QuantizationError, match="unknown quantization mode 'int3'"):
        dino3.load(folder, quantize="int3")
    model = dino3.load(folder, quantize="int8-dynamic")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, "int8-weight")


def test_embed_command_quantized(folder, tmp_path):
    from dino3.cli import main

    out = tmp_path / "q.npz"
    assert main(["embed", str(PHOTOS[0]), "-m", str(folder), "-o", str(out), "-q", "--quantize", "int8-dynamic"]) == 0
    model = dino3.load(folder, quantize="int8-dynamic")
    with torch.inference_mode():
        expected = model(dino3.DINOv3ViTImageProcessor()(PHOTOS[0]).pixel_values).pooler_output
    got = torch.from_numpy(dino3.embed.read_embeddings(out).features)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    exact = dino3.load(folder)
    with torch.inference_mode():
        assert not torch.allclose(got, exact(dino3.DINOv3ViTImageProcessor()(PHOTOS[0]).pixel_values).pooler_output)
