"""The README's Python examples run, against a local hub cache that stands in for the gated hub."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants as hub_constants
import torch
import transformers

import dino3
from dino3.models import pretrained
from dino3.weights import formats
from helpers import dinotxt_meta_files, randomize_

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40
NEEDS_A_SERVER = "# with `dino3 serve"  # how a README example that talks to a running server begins


def test_readme_python_examples_run(tmp_path, monkeypatch):
    # A small model with the vits16 layout (12 blocks, 4 registers, patch 16) under vits16's repo id.
    config = transformers.DINOv3ViTConfig(
        hidden_size=64, num_attention_heads=2, intermediate_size=128, num_register_tokens=4
    )
    snapshot = tmp_path / "hub" / "models--facebook--dinov3-vits16-pretrain-lvd1689m" / "snapshots" / COMMIT
    randomize_(transformers.DINOv3ViTModel(config)).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # Meta's file, as the README names it: ViT-S/16-shaped random weights (its name's hash cannot match)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    vits16 = dino3.DINOv3ViTModel(dino3.get_preset("vits16").make_config())
    meta = formats.from_dino3(vits16.state_dict(), vits16.config, "meta")
    torch.save(meta, work / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    monkeypatch.setattr(pretrained, "check_file_hash", lambda path, expected: None)
    # dino.txt's two files, as the README names them: the small pair of tests/golden (their hashes cannot match)
    from dino3.models import text

    for file, name in zip(dinotxt_meta_files(tmp_path), dino3.presets.find_text_preset("dinotxt-vitl16").files):
        file.rename(work / name)
    monkeypatch.setattr(text, "check_file_hash", lambda path, expected: None)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DINO3_CACHE", str(tmp_path / "cache"))

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    blocks = [b for b in blocks if not b.startswith(NEEDS_A_SERVER)]  # test_serve_clients.py runs those
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["patch_features"].shape == (1, 14, 14, 64)
    assert len(namespace["feature_maps"]) == 4
    assert (work / "vits16-timm.safetensors").is_file() and (work / "vits16.onnx").is_file()
    assert namespace["runtime_features"].shape == (1, 64)
    assert isinstance(namespace["pooled"][0], torch.Tensor)
    assert namespace["image"].grid == (48, 72) and namespace["rgb"].shape == (48, 72, 3)
    assert namespace["similarity"].shape == (2, 2) and namespace["found"].label_map.shape == (400, 600)
    assert (work / "dinotxt-saved" / "backbone" / "model.safetensors").is_file()
