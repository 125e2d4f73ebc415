"""Intermediate layers and the backbone view, against Transformers' hidden states and Backbone classes."""

from __future__ import annotations

import pytest
import torch
import transformers

import dino3
from helpers import max_diff, randomize_

TOL = 1e-4
VIT = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=4, num_register_tokens=4)
CONVNEXT = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    reference = randomize_(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VIT)).eval())
    reference.save_pretrained(folder)
    return folder, reference, dino3.load(folder)


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convnext")
    reference = randomize_(transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**CONVNEXT)).eval())
    reference.save_pretrained(folder)
    return folder, reference, dino3.load(folder)


def pixels(batch=2, size=(64, 96)):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "options",
    [
        dict(out_indices=[0, 2, -1]),
        dict(out_indices=[1, 3], apply_layernorm=False),
        dict(out_features=["stage2", "stage4"], reshape_hidden_states=False),
        dict(out_indices=[2, 4], return_class_token=True),
        dict(),
    ],
)
def test_vit_backbone_matches_transformers(vit, options):
    folder, _, _ = vit
    hf_options = {k: v for k, v in options.items() if k != "return_class_token"}
    reference = transformers.DINOv3ViTBackbone.from_pretrained(folder, **hf_options).eval()
    reference.config.return_class_token = options.get("return_class_token", False)
    ours = dino3.DINOv3Backbone.from_pretrained(folder, **options)
    assert ours.out_features == reference.out_features and ours.num_features == reference.num_features
    x = pixels()
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert len(got.feature_maps) == len(expected.feature_maps)
    for mine, theirs in zip(got.feature_maps, expected.feature_maps):
        assert mine.shape == theirs.shape
        assert max_diff(mine, theirs) <= TOL
    if options.get("return_class_token"):
        for mine, theirs in zip(got.cls_tokens, expected.cls_tokens):
            assert max_diff(mine, theirs) <= TOL


@pytest.mark.parametrize("out_indices", [[0, 1, 2, 3, 4], [2], [-1]])
def test_convnext_backbone_matches_transformers(convnext, out_indices):
    folder, _, _ = convnext
    reference = transformers.DINOv3ConvNextBackbone.from_pretrained(folder, out_indices=out_indices).eval()
    ours = dino3.DINOv3Backbone.from_pretrained(folder, out_indices=out_indices)
    assert ours.num_features == reference.num_features
    x = pixels(size=(96, 128))
    with torch.no_grad():
        expected, got = reference(x), ours(x, output_hidden_states=True)
    for mine, theirs in zip(got.feature_maps, expected.feature_maps, strict=True):
        assert max_diff(mine, theirs) <= TOL
    assert len(got.hidden_states) == 5


def test_backbone_options_from_config_json(vit):
    folder, _, _ = vit
    transformers.DINOv3ViTBackbone.from_pretrained(folder, out_indices=[1, 3]).save_pretrained(folder / "backbone")
    ours = dino3.DINOv3Backbone.from_pretrained(folder / "backbone")
    assert ours.out_indices == [1, 3]


def test_vit_intermediate_layers(vit):
    _, reference, ours = vit
    x = pixels()
    with torch.no_grad():
        states = reference(x, output_hidden_states=True).hidden_states  # L + 1, un-normed
        last_two = ours.get_intermediate_layers(x, n=2)
        chosen = ours.get_intermediate_layers(
            x, n=[0, 2], reshape=True, return_class_token=True, return_extra_tokens=True
        )
        raw = ours.get_intermediate_layers(x, n=[3], norm=False)
    assert len(last_two) == 2
    for got, state in zip(last_two, states[-2:]):
        assert max_diff(got, reference.norm(state)[:, 5:]) <= TOL
    for (patches, cls, registers), state in zip(chosen, [states[1], states[3]]):
        normed = reference.norm(state)
        assert patches.shape == (2, 128, 4, 6)
        assert max_diff(patches, normed[:, 5:].unflatten(1, (4, 6)).permute(0, 3, 1, 2)) <= TOL
        assert max_diff(cls, normed[:, 0]) <= TOL and max_diff(registers, normed[:, 1:5]) <= TOL
    assert max_diff(raw[0], states[4][:, 5:]) <= TOL
    with pytest.raises(ValueError, match=r"n must be 1..4"):
        ours.get_intermediate_layers(x, n=5)


def test_convnext_intermediate_layers(convnext):
    _, reference, ours = convnext
    x = pixels(size=(96, 128))
    with torch.no_grad():
        states = reference(x, output_hidden_states=True).hidden_states  # pixels + 4 stages
        out = ours.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
        flat = ours.get_intermediate_layers(x, n=[1])
    (p2, c2), (p3, c3) = out
    assert max_diff(p2, states[3]) <= TOL and max_diff(c2, states[3].mean((-2, -1))) <= TOL  # no norm before the last
    last = states[4]
    tokens = reference.layer_norm(last.flatten(2).transpose(1, 2))
    assert max_diff(p3, tokens.transpose(1, 2).unflatten(2, last.shape[-2:])) <= TOL
    assert max_diff(c3, reference.layer_norm(last.mean((-2, -1)))) <= TOL
    assert max_diff(flat[0], states[2].flatten(2).transpose(1, 2)) <= TOL


def test_hidden_states_at_runs_only_what_it_needs(vit, monkeypatch):
    _, _, ours = vit
    calls = []
    for block in ours.blocks:
        monkeypatch.setattr(block, "forward", lambda *a, _f=block.forward, **k: calls.append(1) or _f(*a, **k))
    with torch.no_grad():
        ours.hidden_states_at(pixels(), [0, 2])
    assert len(calls) == 2
