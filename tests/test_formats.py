"""Every checkpoint layout loads strictly: Meta's .pth and timm's files, against the Hugging Face layout.

Meta's layout is written here from Transformers' weights by a mapping spelled out independently of
dino3's (from Transformers' conversion script, read backwards); timm's layout is made by timm itself,
from that Meta state dict, with its own checkpoint_filter_fn.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import dino3
from dino3 import CheckpointError
from dino3.cli import main as cli
from helpers import max_diff, randomize_

TOL = 1e-5


# -- Meta's layout, written from Transformers' weights ---------------------------------------------
def meta_vit_state_dict(hf_model) -> dict:
    sd = {k.removeprefix("model."): v.clone() for k, v in hf_model.state_dict().items()}
    config = hf_model.config
    D = config.hidden_size
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, D),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        "rope_embed.periods": (
            100.0 ** (2 * torch.arange(D // config.num_attention_heads // 4) / (D // config.num_attention_heads // 2))
        ).bfloat16(),
    }
    if config.num_register_tokens:
        out["storage_tokens"] = sd["embeddings.register_tokens"]
    for i in range(config.num_hidden_layers):
        h, m = f"layer.{i}.", f"blocks.{i}."
        out[m + "attn.qkv.weight"] = torch.cat([sd[h + f"attention.{n}_proj.weight"] for n in "qkv"])
        if config.query_bias:
            q, v = sd[h + "attention.q_proj.bias"], sd[h + "attention.v_proj.bias"]
            out[m + "attn.qkv.bias"] = torch.cat([q, torch.randn(D), v])  # the key part is masked away
            out[m + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
        out[m + "attn.proj.weight"], out[m + "attn.proj.bias"] = (
            sd[h + "attention.o_proj.weight"],
            sd[h + "attention.o_proj.bias"],
        )
        for n in ("norm1", "norm2"):
            out[m + n + ".weight"], out[m + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
        out[m + "ls1.gamma"], out[m + "ls2.gamma"] = sd[h + "layer_scale1.lambda1"], sd[h + "layer_scale2.lambda1"]
        names = (
            {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
            if config.use_gated_mlp
            else {"up_proj": "fc1", "down_proj": "fc2"}
        )
        for theirs, mine in names.items():
            out[m + f"mlp.{mine}.weight"], out[m + f"mlp.{mine}.bias"] = (
                sd[h + f"mlp.{theirs}.weight"],
                sd[h + f"mlp.{theirs}.bias"],
            )
    return out


def meta_convnext_state_dict(hf_model) -> dict:
    sd = {k.removeprefix("model."): v.clone() for k, v in hf_model.state_dict().items()}
    out = {}
    for key, value in sd.items():
        if key.startswith("layer_norm."):
            out[key.replace("layer_norm", "norm")] = value
            out[key.replace("layer_norm", "norms.3")] = value
            continue
        s = key.split(".")[1]
        if ".downsample_layers." in key:
            j = key.split(".")[3]
            out[f"downsample_layers.{s}.{j}.{key.split('.')[-1]}"] = value
        else:  # stages.s.layers.b.name.leaf
            b, rest = key.split(".")[3], ".".join(key.split(".")[4:])
            rest = (
                rest.replace("depthwise_conv", "dwconv")
                .replace("pointwise_conv", "pwconv")
                .replace("layer_norm", "norm")
            )
            out[f"stages.{s}.{b}.{rest}"] = value
    return out


# -- models ------------------------------------------------------------------------------------------
VIT_TIMM = {  # small versions of timm's DINOv3 models, and the Transformers config they correspond to
    "plain": ("vit_small_patch16_dinov3_qkvb", dict(embed_dim=128, depth=2, num_heads=2)),
    "swiglu": ("vit_small_plus_patch16_dinov3", dict(embed_dim=128, depth=2, num_heads=2)),
}


def timm_vit(kind):
    name, kwargs = VIT_TIMM[kind]
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def hf_vit_like(timm_model):
    """A Transformers ViT with the architecture of a (small) timm DINOv3 model, random weights."""
    sd = timm_model.state_dict()
    gated = "blocks.0.mlp.fc1_g.weight" in sd
    up = sd["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"]
    config = transformers.DINOv3ViTConfig(
        hidden_size=sd["cls_token"].shape[-1],
        num_attention_heads=timm_model.blocks[0].attn.num_heads,
        num_hidden_layers=len(timm_model.blocks),
        intermediate_size=up.shape[0],
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias="blocks.0.attn.q_bias" in sd,
        value_bias="blocks.0.attn.q_bias" in sd,
        num_register_tokens=sd["reg_token"].shape[1],
    )
    return randomize_(transformers.DINOv3ViTModel(config)).eval()


def pixels(size=(64, 96)):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))


def outputs(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state


# -- ViT ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(VIT_TIMM))
def test_vit_meta_and_timm_files_load_like_the_hf_layout(kind, tmp_path):
    timm_model = timm_vit(kind)
    reference = hf_vit_like(timm_model)
    reference.save_pretrained(tmp_path / "hf")
    expected = outputs(dino3.load(tmp_path / "hf"), pixels())
    assert max_diff(expected, outputs(reference, pixels())) <= 1e-4

    meta = meta_vit_state_dict(reference)
    torch.save(meta, tmp_path / "meta.pth")
    config = tmp_path / "hf" / "config.json"
    from_meta = dino3.load(tmp_path / "meta.pth", config=str(config))
    assert from_meta.source_layout == "meta"
    assert max_diff(outputs(from_meta, pixels()), expected) <= TOL

    # timm's own conversion of Meta's layout, then timm's own layout on disk, as timm saves it
    timm_model.load_state_dict(timm.models.eva.checkpoint_filter_fn(meta, timm_model), strict=True)
    save_file(timm_model.state_dict(), tmp_path / "timm.safetensors")
    from_timm = dino3.load(tmp_path / "timm.safetensors", config=str(config))
    assert from_timm.source_layout == "timm"
    assert max_diff(outputs(from_timm, pixels()), expected) <= TOL
    with torch.no_grad():  # and timm itself computes the same features (its RoPE is built apart)
        theirs = timm_model.forward_features(pixels())
    assert max_diff(theirs, expected) <= 1e-4


def test_meta_key_bias_is_masked_whatever_it_holds(tmp_path):
    reference = hf_vit_like(timm_vit("plain"))
    meta = meta_vit_state_dict(reference)
    reference.save_pretrained(tmp_path)
    torch.save(meta, tmp_path / "a.pth")
    meta["blocks.0.attn.qkv.bias"][128:256] = 1e6  # the key part
    torch.save(meta, tmp_path / "b.pth")
    config = str(tmp_path / "config.json")
    assert torch.equal(
        outputs(dino3.load(tmp_path / "a.pth", config=config), pixels()),
        outputs(dino3.load(tmp_path / "b.pth", config=config), pixels()),
    )


def test_meta_bias_mask_must_be_the_expected_pattern(tmp_path):
    reference = hf_vit_like(timm_vit("plain"))
    reference.save_pretrained(tmp_path)
    meta = meta_vit_state_dict(reference)
    meta["blocks.1.attn.qkv.bias_mask"][200] = 1.0  # a key position unmasked
    torch.save(meta, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="blocks.1.attn.qkv.bias_mask is not Meta's key-bias mask"):
        dino3.load(tmp_path / "m.pth", config=str(tmp_path / "config.json"))


def test_meta_rope_periods_option(tmp_path):
    reference = hf_vit_like(timm_vit("plain"))
    reference.save_pretrained(tmp_path)
    torch.save(meta_vit_state_dict(reference), tmp_path / "m.pth")
    config = str(tmp_path / "config.json")
    exact = dino3.load(tmp_path / "m.pth", config=config)
    meta_like = dino3.load(tmp_path / "m.pth", config=config, rope_periods="checkpoint")
    difference = max_diff(outputs(exact, pixels()), outputs(meta_like, pixels()))
    assert 1e-5 < difference < 1e-2  # bf16-rounded periods move the outputs a little
    # Meta's formula: angle = 2 pi * coordinate / period, cos over [Y | X | Y | X]
    periods = torch.load(tmp_path / "m.pth")["rope_embed.periods"].float()
    cos, _ = meta_like.rope(2, 3, torch.float32, torch.device("cpu"))
    coords = meta_like.rope.patch_centres(2, 3, torch.device("cpu"))
    angles = (2 * torch.pi * coords[:, :, None] / periods).flatten(1)
    assert max_diff(cos, torch.cos(torch.cat([angles, angles], -1))) <= 1e-6


# -- ConvNeXt ----------------------------------------------------------------------------------------
def test_convnext_meta_and_timm_files_load_like_the_hf_layout(tmp_path):
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1])
    reference = randomize_(transformers.DINOv3ConvNextModel(config)).eval()
    reference.save_pretrained(tmp_path / "hf")
    x = pixels((96, 128))
    expected = outputs(dino3.load(tmp_path / "hf"), x)
    assert max_diff(expected, outputs(reference, x)) <= 1e-4
    config_file = str(tmp_path / "hf" / "config.json")

    meta = meta_convnext_state_dict(reference)
    torch.save(meta, tmp_path / "meta.pth")
    assert max_diff(outputs(dino3.load(tmp_path / "meta.pth", config=config_file), x), expected) <= TOL

    timm_model = timm.create_model(
        "convnext_tiny", pretrained=False, num_classes=0, depths=[1, 2, 1, 1], dims=[16, 32, 48, 64]
    )
    timm_model.load_state_dict(timm.models.convnext.checkpoint_filter_fn(meta, timm_model), strict=True)
    save_file(timm_model.state_dict(), tmp_path / "timm.safetensors")
    from_timm = dino3.load(tmp_path / "timm.safetensors", config=config_file)
    assert from_timm.source_layout == "timm"
    assert max_diff(outputs(from_timm, x), expected) <= TOL


# -- official architectures from shapes and names, hashes ---------------------------------------------
@pytest.fixture(scope="module")
def vits16_meta(tmp_path_factory):
    """A ViT-S/16-shaped Meta checkpoint with random weights, named as Meta names it (correct hash)."""
    folder = tmp_path_factory.mktemp("meta")
    # The architecture as Transformers' conversion script gives it (spec 1.3), not from dino3's preset:
    # a wrong preset field (rope_theta, say) then shows as a parity failure below.
    config = transformers.DINOv3ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        num_register_tokens=4,
        patch_size=16,
        rope_theta=100.0,
        layer_norm_eps=1e-5,
        query_bias=True,
        key_bias=False,
        value_bias=True,
        hidden_act="gelu",
    )
    reference = randomize_(transformers.DINOv3ViTModel(config)).eval()
    path = folder / "tmp.pth"
    torch.save(meta_vit_state_dict(reference), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    named = folder / f"dinov3_vits16_pretrain_lvd1689m-{digest[:8]}.pth"
    path.rename(named)
    return named, reference


def test_bare_meta_file_gets_its_preset_from_shapes_and_name(vits16_meta):
    path, reference = vits16_meta
    model = dino3.load(path)
    assert model.preset.name == "vits16" and model.config.num_attention_heads == 6
    x = pixels((32, 48))
    assert max_diff(outputs(model, x), outputs(reference, x)) <= 1e-4


def test_wrong_hash_is_reported(vits16_meta, tmp_path):
    path, _ = vits16_meta
    renamed = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"its name says its SHA-256 starts with 08c60483, but it starts with"):
        dino3.load(renamed)
    assert dino3.load(renamed, check_hash=False).preset.name == "vits16"


def test_sat_name_picks_the_sat_preset():
    from dino3.weights import formats, recognize

    with torch.device("meta"):  # ViT-L/16-shaped tensors, without memory
        ours = dino3.DINOv3ViTModel(dino3.get_preset("vitl16").make_config())
    meta = formats.from_dino3(ours.state_dict(), ours.config, "meta")
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    for name, expected in [
        ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", "vitl16-sat493m"),
        ("vitl16-sat493m-finetuned.pth", "vitl16-sat493m"),
        ("vitl16.pth", "vitl16"),
    ]:
        _, preset = recognize.infer_config(shapes, "meta", "dinov3_vit", name)
        assert preset.name == expected


def test_unofficial_architecture_without_config_loads_from_its_tensors(tmp_path):
    reference = hf_vit_like(timm_vit("plain"))  # width 128: no preset has it
    torch.save(meta_vit_state_dict(reference), tmp_path / "m.pth")
    model = dino3.load(tmp_path / "m.pth")
    assert model.preset is None and model.config.num_attention_heads == reference.config.num_attention_heads
    x = pixels((32, 48))
    assert max_diff(outputs(model, x), outputs(reference, x)) <= 1e-4


# -- bad files ------------------------------------------------------------------------------------------
def test_truncated_pth(vits16_meta, tmp_path):
    path, _ = vits16_meta
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pth is not a readable PyTorch checkpoint.*truncated or corrupt"):
        dino3.load(tmp_path / "cut.pth")


def test_file_of_another_architecture(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a DINOv3 checkpoint in a layout dino3 knows"):
        dino3.load(tmp_path / "resnet.pth")


def test_convnext_file_with_vit_config(tmp_path):
    config = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    torch.save(meta_convnext_state_dict(transformers.DINOv3ConvNextModel(config)), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="is a dinov3_convnext checkpoint, not dinov3_vit"):
        dino3.DINOv3ViTModel.from_pretrained(
            tmp_path / "c.pth", config=dino3.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
        )


def test_partial_state_dict(tmp_path):
    reference = hf_vit_like(timm_vit("plain"))
    reference.save_pretrained(tmp_path)
    meta = meta_vit_state_dict(reference)
    kept = {k: v for k, v in meta.items() if not k.startswith("blocks.1.")}  # "loaded 23 of 38 tensors"
    torch.save(kept, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as e:
        dino3.load(tmp_path / "partial.pth", config=str(tmp_path / "config.json"))
    message = str(e.value)
    assert "partial.pth does not match the model: 23 of 38 tensors fit" in message
    assert "15 missing" in message and "blocks.1.mlp.fc2.bias" in message
    assert "Meta (original) layout" in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_a_non_tensor_object_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": Payload()}, f)
    torch.save({"model": {"cls_token": torch.zeros(1)}, "hook": Payload()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="holds objects other than tensors.*never unpickles"):
            dino3.load(tmp_path / name)


# -- conversion round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_convert_round_trips_through_every_pair_of_layouts(arch, tmp_path):
    if arch == "vit":
        source = hf_vit_like(timm_vit("swiglu"))
        x = pixels()
    else:
        config = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1])
        source = randomize_(transformers.DINOv3ConvNextModel(config)).eval()
        x = pixels((96, 128))
    source.save_pretrained(tmp_path / "start")
    config_file = str(tmp_path / "start" / "config.json")
    original = dino3.load(tmp_path / "start")
    expected = outputs(original, x)
    places = {"hf": "{}", "meta": "{}.pth", "timm": "{}.safetensors"}
    for a, b in itertools.permutations(["hf", "meta", "timm"], 2):
        first = tmp_path / places[a].format(f"{a}-{b}-1")
        second = tmp_path / places[b].format(f"{a}-{b}-2")
        assert dino3.convert(tmp_path / "start", first, to=a) == a
        kwargs = {} if a == "hf" else {"config": config_file}
        assert dino3.convert(first, second, to=b, **kwargs) == b
        back = dino3.load(second, **({} if b == "hf" else {"config": config_file}))
        assert back.source_layout == b
        for (k, v), (k2, v2) in zip(back.state_dict().items(), original.state_dict().items(), strict=True):
            if k == "mask_token" and "timm" in (a, b):  # timm keeps no mask token (training only)
                assert not v.any()
                continue
            assert k == k2 and torch.equal(v, v2), (a, b, k)
        assert torch.equal(outputs(back, x), expected)
    # Transformers reads the Hugging Face folder written from the timm file
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "timm-hf-2").eval()
    assert max_diff(outputs(theirs, x), expected) <= 1e-4


def test_convert_command(vits16_meta, tmp_path, capsys):
    path, reference = vits16_meta
    assert cli(["convert", str(path), str(tmp_path / "hf")]) == 0
    assert "in the Hugging Face layout" in capsys.readouterr().out
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = pixels((32, 32))
    assert max_diff(outputs(theirs, x), outputs(reference, x)) <= 1e-4
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "t.safetensors")]) == 0
    assert dino3.load(tmp_path / "t.safetensors").source_layout == "timm"
