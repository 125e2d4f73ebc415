"""Training mode: RoPE augmentation, drop path, attention dropout, gradients, gradient checkpointing.

With the same seed, dino3 draws its random numbers in the same order and shapes as Transformers,
so even the stochastic training-mode forward passes can be compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DINOv3ViTConfig as HFConfig
from transformers import DINOv3ViTModel as HFModel

from dino3 import DINOv3ViTModel
from helpers import max_diff, randomize_

BASE = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=2, num_register_tokens=4)


def pair(tmp_path, attn="sdpa", **kwargs):
    reference = randomize_(HFModel(HFConfig(**BASE, **kwargs)))
    reference.save_pretrained(tmp_path)
    reference = HFModel.from_pretrained(tmp_path, attn_implementation=attn)
    ours = DINOv3ViTModel.from_pretrained(tmp_path, attn_implementation=attn)
    return reference.train(), ours.train()


def seeded(model, x, seed=7, **kwargs):
    torch.manual_seed(seed)
    return model(x, **kwargs)


@pytest.mark.parametrize(
    "augmentation",
    [dict(), dict(pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=1.5)],
    ids=["default-rescale", "shift-jitter-rescale"],
)
def test_rope_augmentation_in_train_mode(tmp_path, augmentation):
    reference, ours = pair(tmp_path, **augmentation)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = seeded(reference, x).last_hidden_state, seeded(ours, x).last_hidden_state
        other = seeded(ours, x, seed=8).last_hidden_state
        evaluated = ours.eval()(x).last_hidden_state
    assert max_diff(a, b) <= 1e-4
    assert max_diff(b, other) > 1e-3  # positions are random in training mode
    assert max_diff(b, evaluated) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_path_and_attention_dropout(tmp_path, attn):
    reference, ours = pair(tmp_path, attn=attn, drop_path_rate=0.4, attention_dropout=0.2, pos_embed_rescale=None)
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        a, b = seeded(reference, x).last_hidden_state, seeded(ours, x).last_hidden_state
        evaluated = ours.eval()(x).last_hidden_state
    assert max_diff(a, b) <= 1e-4
    assert max_diff(b, evaluated) > 1e-3


def test_gradients_match_reference(tmp_path):
    reference, ours = pair(tmp_path, use_gated_mlp=True, hidden_act="silu")
    x = torch.randn(2, 3, 64, 48)
    for model in (reference, ours):
        seeded(model, x).last_hidden_state.pow(2).mean().backward()
    ref = {k.removeprefix("model."): p.grad for k, p in reference.named_parameters()}
    got = dict(ours.named_parameters())
    pairs = {
        "cls_token": "embeddings.cls_token",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.weight": "embeddings.patch_embeddings.weight",
        "blocks.0.ls1": "layer.0.layer_scale1.lambda1",
        "blocks.1.attn.q_bias": "layer.1.attention.q_proj.bias",
        "blocks.1.attn.proj.weight": "layer.1.attention.o_proj.weight",
        "blocks.1.mlp.fc2.weight": "layer.1.mlp.down_proj.weight",
        "norm.weight": "norm.weight",
    }
    for mine, theirs in pairs.items():
        assert max_diff(got[mine].grad, ref[theirs]) <= 1e-5, mine
    qkv = torch.cat([ref[f"layer.0.attention.{n}_proj.weight"] for n in "qkv"])
    assert max_diff(got["blocks.0.attn.qkv.weight"].grad, qkv) <= 1e-5
    gate_up = torch.cat([ref["layer.0.mlp.gate_proj.weight"], ref["layer.0.mlp.up_proj.weight"]])
    assert max_diff(got["blocks.0.mlp.fc1.weight"].grad, gate_up) <= 1e-5
    assert got["mask_token"].grad is None or got["mask_token"].grad.abs().max() == 0


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, ours = pair(tmp_path, drop_path_rate=0.2)
    x = torch.randn(2, 3, 48, 48)
    seeded(ours, x).last_hidden_state.pow(2).mean().backward()
    plain = {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    seeded(ours, x).last_hidden_state.pow(2).mean().backward()
    for name, grad in plain.items():
        assert max_diff(dict(ours.named_parameters())[name].grad, grad) <= 1e-6, name


def test_training_after_inference_mode(tmp_path):
    # The RoPE tables cached by an inference_mode forward must serve a later forward with autograd.
    _, ours = pair(tmp_path, pos_embed_rescale=None)
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        ours(x)
    ours(x).last_hidden_state.sum().backward()
    assert ours.cls_token.grad is not None
