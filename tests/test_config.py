"""Configs: Transformers' fields and defaults, config.json I/O, validation; presets."""

from __future__ import annotations

import json

import pytest
import transformers

import dino3
from dino3 import ConfigError, DINOv3ConvNextConfig, DINOv3ViTConfig
from dino3.presets import IMAGENET_MEAN, SAT493M_MEAN, find_preset, get_preset


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (DINOv3ViTConfig, transformers.DINOv3ViTConfig),
        (DINOv3ConvNextConfig, transformers.DINOv3ConvNextConfig),
    ],
)
def test_fields_and_defaults_are_transformers(ours, theirs):
    reference = theirs()
    for name in ours.field_names():
        assert getattr(ours(), name) == getattr(reference, name), name
    assert ours.model_type == reference.model_type


def test_transformers_reads_our_config_json(tmp_path):
    config = DINOv3ViTConfig(hidden_size=256, num_attention_heads=4, num_register_tokens=4, use_gated_mlp=True)
    config.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, transformers.DINOv3ViTConfig)
    for name in DINOv3ViTConfig.field_names():
        assert getattr(theirs, name) == getattr(config, name), name


def test_unknown_fields_are_kept(tmp_path):
    data = DINOv3ViTConfig().to_dict()
    data.update(out_features=["stage12"], some_future_field={"a": 1})
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = DINOv3ViTConfig.from_json_file(tmp_path / "config.json")
    assert config.extra["some_future_field"] == {"a": 1}
    assert config.to_dict()["out_features"] == ["stage12"]


def test_wrong_model_type_for_class():
    with pytest.raises(ConfigError, match="model_type 'dinov3_convnext'"):
        DINOv3ViTConfig.from_dict(DINOv3ConvNextConfig().to_dict())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_size=100, num_attention_heads=6), "must be divisible by num_attention_heads"),
        (dict(hidden_size=60, num_attention_heads=6), "must be a multiple of 4"),
        (dict(hidden_size=-8), "hidden_size must be a positive integer"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(num_register_tokens=-1), "num_register_tokens must be >= 0"),
        (dict(patch_size=0), "patch_size must be a positive integer"),
        (dict(hidden_act="tanh"), "hidden_act='tanh' is not supported"),
        (dict(drop_path_rate=1.5), "drop_path_rate must be a number in"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be a positive number"),
        (dict(pos_embed_rescale=0.5), "pos_embed_rescale must be None or a number >= 1.0"),
        (dict(use_gated_mlp="yes"), "use_gated_mlp must be true or false"),
    ],
)
def test_vit_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        DINOv3ViTConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_sizes=[96, 192], depths=[3, 3, 9, 3]), "must have the same length"),
        (dict(depths=[3, 0, 9, 3]), "depths must be a non-empty list of positive integers"),
        (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a positive number"),
    ],
)
def test_convnext_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        DINOv3ConvNextConfig(**changes)


# -- presets ---------------------------------------------------------------------------------------
# (D, L, heads, intermediate, gated, q/v bias) from Transformers' conversion script and Meta's hub code.
VIT_ARCHITECTURES = {
    "vits16": (384, 12, 6, 1536, False, True),
    "vits16plus": (384, 12, 6, 1536, True, True),
    "vitb16": (768, 12, 12, 3072, False, True),
    "vitl16": (1024, 24, 16, 4096, False, True),
    "vith16plus": (1280, 32, 20, 5120, True, True),
    "vit7b16": (4096, 40, 32, 8192, True, False),
    "vitl16-sat493m": (1024, 24, 16, 4096, False, True),
    "vit7b16-sat493m": (4096, 40, 32, 8192, True, False),
}


# Settings shared by every ViT checkpoint, from Transformers' conversion script (spec 1.3), written out
# here rather than read from dino3: a preset that got one wrong loads garbage features silently.
VIT_SHARED = dict(
    patch_size=16,
    num_register_tokens=4,
    layer_norm_eps=1e-5,
    rope_theta=100.0,
    image_size=224,
    key_bias=False,
    proj_bias=True,
    mlp_bias=True,
    layerscale_value=1.0,
    pos_embed_rescale=2.0,
    pos_embed_shift=None,
    pos_embed_jitter=None,
    num_channels=3,
    attention_dropout=0.0,
    drop_path_rate=0.0,
)


@pytest.mark.parametrize("name", list(VIT_ARCHITECTURES))
def test_vit_presets(name):
    D, L, heads, inter, gated, qv_bias = VIT_ARCHITECTURES[name]
    preset = get_preset(name)
    config = preset.make_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (D, L, heads)
    assert (config.intermediate_size, config.use_gated_mlp) == (inter, gated)
    assert config.hidden_act == ("silu" if gated else "gelu")
    assert config.query_bias == config.value_bias == qv_bias and config.key_bias is False
    for field, value in VIT_SHARED.items():
        assert getattr(config, field) == value, (name, field)
    assert config.head_dim == (128 if "7b" in name else 64)
    sat = name.endswith("sat493m")
    assert preset.image_mean == (SAT493M_MEAN if sat else IMAGENET_MEAN)
    assert preset.hub_id.startswith("facebook/dinov3-") and preset.hub_id.endswith("sat493m" if sat else "lvd1689m")
    assert preset.meta_file.endswith(f"-{preset.meta_hash}.pth") and len(preset.meta_hash) == 8


def test_convnext_presets():
    expected = {
        "convnext-tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
        "convnext-small": ([3, 3, 27, 3], [96, 192, 384, 768]),
        "convnext-base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
        "convnext-large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    }
    assert dino3.list_models("convnext", family="DINOv3") == list(expected)
    for name, (depths, sizes) in expected.items():
        config = get_preset(name).make_config()
        assert (config.depths, config.hidden_sizes, config.layer_norm_eps) == (depths, sizes, 1e-6)
        assert (config.hidden_act, config.layer_scale_init_value, config.num_channels) == ("gelu", 1e-6, 3)


def test_list_models_and_aliases():
    assert dino3.list_models("vit", family="DINOv3") == list(VIT_ARCHITECTURES)
    assert dino3.list_models(family="EUPE") == [
        "eupe-vitt16",
        "eupe-vits16",
        "eupe-vitb16",
        "eupe-convnext-tiny",
        "eupe-convnext-small",
        "eupe-convnext-base",
    ]
    assert find_preset("facebook/EUPE-ViT-S").name == "eupe-vits16"
    assert find_preset("facebook/dinov3-vitl16-pretrain-sat493m").name == "vitl16-sat493m"
    assert find_preset("dinov3-vitb16-pretrain-lvd1689m").name == "vitb16"
    assert find_preset("VITB16").name == "vitb16"
    assert find_preset("vitb16-lvd1689m").name == "vitb16"
    assert find_preset("vitb17") is None


def test_preset_parameter_counts_match_model_card():
    # Counted on the meta device: no memory is used. Meta's card gives rounded counts.
    import torch

    for name, count in [("vits16", 21.6e6), ("vitb16", 85.7e6), ("vitl16", 303e6), ("vith16plus", 840e6)]:
        with torch.device("meta"):
            model = dino3.DINOv3ViTModel(get_preset(name).make_config())
        assert abs(model.num_parameters() - count) / count < 0.01, (name, model.num_parameters())
