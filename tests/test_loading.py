"""Checkpoint I/O: round trips with Transformers in both directions, strictness, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTConfig as HFConfig
from transformers import DINOv3ViTModel as HFModel

import dino3
from dino3 import CheckpointError, DINOv3ViTConfig, DINOv3ViTModel
from dino3.models import pretrained
from helpers import max_diff, randomize_

SMALL = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, num_hidden_layers=2, num_register_tokens=4)
GATED = dict(SMALL, use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False)


def reference_folder(tmp_path, **kwargs):
    model = randomize_(HFModel(HFConfig(**kwargs)).eval())
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch", [SMALL, GATED], ids=["plain", "gated"])
def test_dino3_checkpoint_loads_in_transformers(tmp_path, arch):
    ours = randomize_(DINOv3ViTModel(DINOv3ViTConfig(**arch)).eval())
    ours.save_pretrained(tmp_path)
    theirs = HFModel.from_pretrained(tmp_path).eval()  # Transformers warns on nothing missing or unexpected
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, theirs(x).last_hidden_state) <= 1e-5
    keys = set(load_file(tmp_path / "model.safetensors"))
    # The hub's layout: Transformers' parameter names without its in-memory "model." encoder prefix.
    assert keys == {k.removeprefix("model.") for k in theirs.state_dict()}


def test_round_trip_through_both_libraries(tmp_path):
    reference = reference_folder(tmp_path / "hf", **SMALL)
    ours = DINOv3ViTModel.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "d3")
    again = HFModel.from_pretrained(tmp_path / "d3").eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    saved = json.loads((tmp_path / "d3" / "config.json").read_text())
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in original:  # every field of Transformers' config.json survives, unknown ones included
        if key != "transformers_version":
            assert saved[key] == original[key], key


def test_sharded_checkpoint_loads(tmp_path):
    reference = reference_folder(tmp_path, **SMALL)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = DINOv3ViTModel.from_pretrained(tmp_path / "sharded")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, reference(x).last_hidden_state) <= 1e-5


def test_in_memory_transformers_state_dict_loads():
    # Current Transformers names blocks model.layer.N in memory; the hub files say layer.N.
    reference = randomize_(HFModel(HFConfig(**SMALL)).eval())
    assert any(k.startswith("model.layer.") for k in reference.state_dict())
    ours = DINOv3ViTModel.from_state_dict(reference.state_dict(), DINOv3ViTConfig(**SMALL))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, reference(x).last_hidden_state) <= 1e-5


def test_loaded_model_is_in_eval_mode(tmp_path):
    # Training mode would randomly rescale the RoPE coordinates (pos_embed_rescale=2.0).
    reference_folder(tmp_path, **SMALL)
    model = DINOv3ViTModel.from_pretrained(tmp_path)
    assert not model.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


def _edit_checkpoint(tmp_path, edit):
    reference_folder(tmp_path, **SMALL)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.pop("layer.1.attention.v_proj.bias"))
    with pytest.raises(CheckpointError) as e:
        DINOv3ViTModel.from_pretrained(tmp_path)
    assert "1 missing" in str(e.value) and "layer.1.attention.v_proj.bias" in str(e.value)


def test_unexpected_tensor_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.update({"layer.0.attention.k_proj.bias": torch.zeros(128)}))
    with pytest.raises(CheckpointError) as e:
        DINOv3ViTModel.from_pretrained(tmp_path)
    assert "1 unexpected" in str(e.value) and "layer.0.attention.k_proj.bias" in str(e.value)


def test_misshaped_tensor_is_named(tmp_path):
    _edit_checkpoint(tmp_path, lambda t: t.update({"norm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError) as e:
        DINOv3ViTModel.from_pretrained(tmp_path)
    assert "norm.weight: file (64,), model (128,)" in str(e.value)


def test_config_of_another_size_reports_every_mismatch(tmp_path, monkeypatch):
    reference_folder(tmp_path, **SMALL)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        DINOv3ViTModel.from_pretrained(tmp_path)
    assert "17 missing" in str(e.value) and "layer.2.norm1.weight" in str(e.value)
    # An absurd config is refused from the file's header alone: no model is built, no tensor read.
    config["num_hidden_layers"] = 1_000_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(DINOv3ViTModel, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(pretrained, "read_safetensors", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(CheckpointError, match="the config asks for 1000000 blocks .*, the file holds 2"):
        dino3.load(tmp_path)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(None, torch.float32), ("bfloat16", torch.bfloat16), ("auto", torch.bfloat16)],
)
def test_dtype_on_load(tmp_path, dtype, expected):
    reference = randomize_(HFModel(HFConfig(**SMALL)))
    reference.to(torch.bfloat16).save_pretrained(tmp_path)
    model = DINOv3ViTModel.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_float16_is_refused_with_the_reason(tmp_path):
    reference_folder(tmp_path, **SMALL)
    for dtype in (torch.float16, "float16", "fp16"):
        with pytest.raises(ValueError, match="float16 is refused: DINOv3's activations overflow.*bfloat16"):
            DINOv3ViTModel.from_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(ValueError, match="float16 is refused"):
        dino3.pipeline(model=DINOv3ViTModel(DINOv3ViTConfig(**SMALL)), dtype=torch.float16)


def test_float16_checkpoint_loads_as_float32_with_auto(tmp_path):
    randomize_(HFModel(HFConfig(**SMALL))).to(torch.float16).save_pretrained(tmp_path)
    assert DINOv3ViTModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32


def test_device_map_auto(tmp_path):
    reference_folder(tmp_path, **SMALL)
    model = DINOv3ViTModel.from_pretrained(tmp_path, device_map="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="places a whole model on one device"):
        DINOv3ViTModel.from_pretrained(tmp_path, device_map={"blocks.0": 0})


def test_unknown_dtype_is_refused(tmp_path):
    reference_folder(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        DINOv3ViTModel.from_pretrained(tmp_path, dtype="float8")


def test_load_picks_the_class(tmp_path):
    reference_folder(tmp_path, **SMALL)
    model = dino3.load(tmp_path)
    assert isinstance(model, DINOv3ViTModel)
    assert model.config.num_register_tokens == 4
