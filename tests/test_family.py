"""The whole DINOv3 family loads: every DINOv3-architecture model timm registers (its bias-free
defaults, the _qkvb variants, Meta's EUPE models) and the ConvNeXts, from the state dict timm
saves, without a hint, with timm's own numbers; and files of sizes no preset knows, from their
tensors alone."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from safetensors.torch import save_file

import dino3
from dino3.cli import main
from dino3.weights import formats
from helpers import max_diff, randomize_

# timm name -> (depth to build it with (None: its own), the preset dino3 should recognise, or None)
VITS = {
    "vit_tiny_patch16_dinov3_qkvb": (None, "eupe-vitt16"),
    "vit_small_patch16_dinov3": (None, "vits16"),  # timm's default: no q/v biases
    "vit_small_patch16_dinov3_qkvb": (None, "vits16"),
    "vit_small_plus_patch16_dinov3": (None, "vits16plus"),
    "vit_small_plus_patch16_dinov3_qkvb": (None, "vits16plus"),
    "vit_base_patch16_dinov3": (None, "vitb16"),
    "vit_base_patch16_dinov3_qkvb": (None, "vitb16"),
    "vit_large_patch16_dinov3": (2, None),  # few blocks, for memory: a size no preset has
    "vit_large_patch16_dinov3_qkvb": (2, None),
    "vit_huge_plus_patch16_dinov3": (2, None),
    "vit_huge_plus_patch16_dinov3_qkvb": (2, None),
    "vit_7b_patch16_dinov3": (1, None),
}
CONVNEXTS = {
    "convnext_tiny": "convnext-tiny",
    "convnext_small": "convnext-small",
    "convnext_base": "convnext-base",
    "convnext_large": "convnext-large",
}


def test_every_timm_dinov3_model_is_covered():
    assert set(timm.list_models("*dinov3*")) == set(VITS)


def timm_file(name, tmp_path, depth=None, file_name=None):
    kwargs = {"depth": depth} if depth else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    randomize_(model)
    path = tmp_path / (file_name or f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)  # as timm saves it
    return model, path


def compare(theirs, ours, x):
    with torch.no_grad():
        expected = theirs.forward_features(x)  # (B, T, D) normed tokens, prefix included
        got = ours(x).last_hidden_state
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("name", [n for n, (depth, _) in VITS.items() if depth is None])
def test_timm_vit_files_load_without_a_hint(name, tmp_path):
    _, preset = VITS[name]
    theirs, path = timm_file(name, tmp_path)
    ours = dino3.load(path)
    assert ours.source_layout == "timm" and ours.preset is not None and ours.preset.name == preset
    assert ours.config.query_bias == ("qkvb" in name) == (ours.blocks[0].attn.q_bias is not None)
    compare(theirs, ours, torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, (depth, _) in VITS.items() if depth is not None])
def test_large_timm_vits_with_few_blocks_load_from_their_tensors(name, tmp_path):
    depth, _ = VITS[name]
    theirs, path = timm_file(name, tmp_path, depth=depth)
    ours = dino3.load(path)
    assert ours.preset is None  # no preset has so few blocks: the architecture came from the tensors
    assert ours.config.num_attention_heads == theirs.blocks[0].attn.num_heads
    compare(theirs, ours, torch.randn(1, 3, 48, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", list(CONVNEXTS))
def test_timm_convnext_files_load_without_a_hint(name, tmp_path):
    theirs, path = timm_file(name, tmp_path, file_name=f"{name}.dinov3_lvd1689m.safetensors")
    ours = dino3.load(path)
    assert ours.source_layout == "timm" and ours.preset.name == CONVNEXTS[name]
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs.forward_features(x)  # (B, C, h, w), the last stage before any norm
        got = ours(x, output_hidden_states=True).hidden_states[-1]
    assert max_diff(got, expected) <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize(
    ("name", "file_name", "preset"),
    [
        ("vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3_qkvb.eupe_lvd1689m.safetensors", "eupe-vits16"),
        ("vit_base_patch16_dinov3_qkvb", "EUPE-ViT-B.safetensors", "eupe-vitb16"),
        ("convnext_tiny", "convnext_tiny.eupe_lvd1689m.safetensors", "eupe-convnext-tiny"),
    ],
)
def test_eupe_files_are_told_apart_by_name(name, file_name, preset, tmp_path):
    theirs, path = timm_file(name, tmp_path, file_name=file_name)
    ours = dino3.load(path)
    assert ours.preset.name == preset and ours.preset.family == "EUPE"
    assert "Research License" in ours.preset.license and ours.preset.image_size == 256
    processor = dino3.DINOv3ViTImageProcessor.for_model(ours)
    assert processor.size == {"height": 256, "width": 256}


def test_eupe_meta_files_drop_their_distillation_heads(tmp_path):
    model = randomize_(dino3.DINOv3ViTModel(dino3.get_preset("eupe-vitt16").make_config())).eval()
    meta = formats.from_dino3(model.state_dict(), model.config, "meta")
    meta["projectors.0.weight"] = torch.randn(1024, 192)  # as EUPE's original files carry them
    meta["projectors.0.bias"] = torch.randn(1024)
    torch.save(meta, tmp_path / "eupe_vitt16.pth")
    loaded = dino3.load(tmp_path / "eupe_vitt16.pth")
    assert loaded.preset.name == "eupe-vitt16"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)


def test_unknown_widths_load_from_their_tensors_and_info_says_so(tmp_path, capsys):
    config = dino3.DINOv3ViTConfig(
        hidden_size=320, num_attention_heads=5, intermediate_size=640, num_hidden_layers=3, num_register_tokens=2
    )
    model = randomize_(dino3.DINOv3ViTModel(config)).eval()
    torch.save(formats.from_dino3(model.state_dict(), config, "meta"), tmp_path / "finetune.pth")
    loaded = dino3.load(tmp_path / "finetune.pth")  # Meta's RoPE periods give the head size exactly
    assert loaded.preset is None and loaded.config.num_attention_heads == 5
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert main(["info", str(tmp_path / "finetune.pth")]) == 0
    out = capsys.readouterr().out
    assert "3 blocks, width 320, 5 heads of 64" in out and "inferred from the tensors" in out
    with pytest.raises(dino3.CheckpointError, match="describe no valid one"):
        bad = dict(formats.from_dino3(model.state_dict(), config, "timm"))
        bad["cls_token"] = torch.zeros(1, 1, 100)  # a width no head size divides
        save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
        dino3.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("variant", ["bias-free", "eupe-vitt16"])
def test_conversions_round_trip_bitwise_for_the_new_variants(variant, tmp_path):
    if variant == "bias-free":
        config = dino3.get_preset("vits16").make_config().replace(query_bias=False, value_bias=False)
    else:
        config = dino3.get_preset(variant).make_config()
    config = config.replace(num_hidden_layers=2)
    original = randomize_(dino3.DINOv3ViTModel(config)).eval()
    original.save_pretrained(tmp_path / "start")
    places = {"hf": "{}", "meta": "{}.pth", "timm": "{}.safetensors"}
    config_file = str(tmp_path / "start" / "config.json")
    for a, b in itertools.permutations(["hf", "meta", "timm"], 2):
        first = tmp_path / places[a].format(f"{a}-{b}-1")
        second = tmp_path / places[b].format(f"{a}-{b}-2")
        dino3.convert(tmp_path / "start", first, to=a)
        dino3.convert(first, second, to=b, **({} if a == "hf" else {"config": config_file}))
        back = dino3.load(second, **({} if b == "hf" else {"config": config_file}))
        for (k, v), (k2, v2) in zip(back.state_dict().items(), original.state_dict().items(), strict=True):
            if k == "mask_token" and "timm" in (a, b):
                continue  # timm keeps no mask token (training only)
            assert k == k2 and torch.equal(v, v2), (variant, a, b, k)
