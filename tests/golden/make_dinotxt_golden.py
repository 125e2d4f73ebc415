"""Golden tensors for dino.txt: Meta's own code, run on small random weights saved as Meta saves them.

The reference is Meta's public repository (facebookresearch/dinov3; it is not on the package index),
at commit 6876159a11b4df116f30f667f8c9888617df0751. To make the files again:

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3
    git -C /tmp/dinov3 checkout 6876159a11b4df116f30f667f8c9888617df0751
    # a venv with dino3's test dependencies and its `text` extra (torch, torchvision, ftfy, regex):
    PYTHONPATH=/tmp/dinov3:src .venv/bin/python tests/golden/make_dinotxt_golden.py

(the files committed were made with torch 2.14.1, torchvision 0.29.1, ftfy 6.3.1 and regex 2026.12.2).
The script builds Meta's `DINOTxt` at a small dino.txt shape (a 2-block ViT of width 64 with 4
registers and Meta's ViT-L options; a vision head of two blocks; a 2-layer text transformer of width
128; a 128-dimensional space), gives every tensor a random value of realistic scale (layer scales near
1, non-zero biases and tokens; the RoPE periods rounded to bf16 and stored in bf16, as in Meta's
files), saves the backbone's state dict and the DINOTxt state dict without the backbone (what Meta's
`dinov3_vitl16_dinotxt_tet1280d20h24l` loads from its two files), loads both back into a fresh model
the way Meta's hub function does, and runs it on photos preprocessed by Meta's dino.txt transform
(`make_classification_eval_transform`) and on a corpus of hostile texts tokenized by Meta's tokenizer.
It also runs the zero-shot segmentation of Meta's notebook (`notebooks/dinotxt_segmentation_inference.ipynb`:
its own functions, executed from the notebook file with "cuda" replaced by "cpu") on one photo, at a
small size (shorter side 96, windows of 64 every 32 pixels) with two prompt templates.

Writes tests/golden/dinotxt/:
  backbone.pth.gz, head_and_text.pth.gz  the two .pth files, gzipped to fit the repository (the values
                                         are rounded to bf16 and most vocabulary rows are zero, so
                                         they compress; the tests unzip them byte for byte)
  golden.safetensors                     the transform's uint8 crops and Meta's outputs (float32), and
                                         the notebook's pixels, label features and window probabilities
  texts.json                             the corpus and Meta's token ids of each text; the segmentation's
                                         labels and templates
  official_shapes.json                   the name and shape of every tensor of Meta's two official files,
                                         from Meta's hub function's model built on the meta device
"""

from __future__ import annotations

import gzip
import io
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "dinotxt"
META_COMMIT = "6876159a11b4df116f30f667f8c9888617df0751"
BPE = ROOT / "src" / "dino3" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
PHOTOS = ["chelsea.png", "rocket.jpg"]  # at 224 px, Meta's transform
ASPECT_PHOTO, ASPECT_SIDE = "coffee.png", 112  # shorter side 112, not cropped: a 7 x 10 patch grid

TEXTS = [
    "a photo of a cat",
    "a photo of a dog.",
    "A PHOTO OF A RED BICYCLE!!!",
    "",
    " ",
    "\t\n  \r\n",
    "naïve café — “quoted” ‘single’ «guillemets»",
    "Straße İstanbul ǅ ﬁne ＦＵＬＬ ｗｉｄｔｈ",
    "日本語のテキストと中文",
    "Ελληνικά και русский текст",
    "عربى שלום हिन्दी",
    "😀🐈‍⬛👩‍👩‍👧 🇫🇷 1️⃣",
    "spaces    between\t\ttabs\n\nnewlines\u00a0nbsp\u2003em\u3000ideographic",
    "\u200bzero\u200bwidth\ufeffbom",
    "&amp;lt;b&amp;gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39; &nbsp;z",
    "Ã©tÃ© Ã  la plage, cafÃ©",
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x85 controls\x1c\x1d\x1e\x1f",
    "It's, we're, they've, I'm, you'll, he'd; IT'S 'ſ",
    "a1b22c333 3.14159 1,000,000 2024-12-31 ½ ² ٣",
    "!!!???...,,,;;;:::---___***###@@@$$$%%%^^^&&&",
    "<|startoftext|> inside <|endoftext|> markers",  # Meta's special tokens
    "<start_of_text> open_clip's markers <end_of_text>",  # open_clip's
    "</w> and <|endoftext and |>",
    "a\ud800b lone surrogate, \ud83d\ude00 a pair",
    "a " * 75,  # 75 tokens: exactly the context with start and end of text
    "a " * 76,  # one too many: truncated, end of text last
    " ".join(f"word{i}" for i in range(100)),
    "x" * 1000,
    "supercalifragilisticexpialidocious " * 12,
    "the quick brown fox jumps over the lazy dog",
]
# Strings that open_clip tokenizes differently from Meta (it spells its special tokens otherwise).
NOT_OPEN_CLIP = [20, 21]
SEGMENT_PHOTO, SEGMENT_SIDE, SEGMENT_WINDOW, SEGMENT_STRIDE = "chelsea.png", 96, 64, 32
SEGMENT_LABELS = ["cat", "dog", "a rocket in the sky"]
SEGMENT_TEMPLATES = ["a photo of a {0}.", "a bad photo of the {0}."]


def main() -> None:
    import numpy as np
    from dinov3.data.transforms import make_classification_eval_transform, make_eval_transform
    from dinov3.eval.text.tokenizer import get_tokenizer
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(str(BPE))
    tokens = tokenizer.tokenize(TEXTS)  # (N, 77)
    model = build_model()
    randomize(model, used_tokens=tokens.unique())
    backbone_sd = backbone_state_dict(model)
    head_sd = {k: v for k, v in model.state_dict().items() if not k.startswith("visual_model.backbone.")}
    write_gz(backbone_sd, OUT / "backbone.pth.gz")
    write_gz(head_sd, OUT / "head_and_text.pth.gz")

    # Load the files back as Meta's hub function does, into a fresh model: the goldens come from that one.
    model = build_model()
    model.visual_model.backbone.load_state_dict(read_gz(OUT / "backbone.pth.gz"), strict=True)
    result = model.load_state_dict(read_gz(OUT / "head_and_text.pth.gz"), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith("visual_model.backbone.") for k in result.missing_keys), result.missing_keys
    model.eval()

    transform = make_classification_eval_transform()
    aspect = make_eval_transform(resize_size=ASPECT_SIDE, crop_size=None)
    images = [Image.open(ROOT / "examples" / "images" / name).convert("RGB") for name in PHOTOS]
    crops = torch.stack([uint8_stage(transform, im) for im in images])  # (2, 3, 224, 224) uint8
    pixels = torch.stack([transform(im) for im in images])
    assert torch.allclose(pixels, normalize(crops), atol=1e-6, rtol=0), "the transform is not resize-crop-normalize"
    aspect_image = Image.open(ROOT / "examples" / "images" / ASPECT_PHOTO).convert("RGB")
    aspect_crop = uint8_stage(aspect, aspect_image)[None]  # (1, 3, 112, 168)
    aspect_pixels = aspect(aspect_image)[None]
    assert torch.allclose(aspect_pixels, normalize(aspect_crop), atol=1e-6, rtol=0)

    with torch.no_grad():
        features, patches, backbone_patches = model.encode_image_with_patch_tokens(pixels)
        a_features, a_patches, a_backbone_patches = model.encode_image_with_patch_tokens(aspect_pixels)
        text_features = model.encode_text(tokens)
        image_logits, _ = model.get_logits(pixels, tokens)
    segmentation = notebook_segmentation(model, tokenizer)
    golden = {
        "crops": crops.contiguous(),
        "aspect_crop": aspect_crop.contiguous(),
        "image_features": features,
        "patch_tokens": patches,
        "backbone_patch_tokens": backbone_patches,
        "aspect_image_features": a_features,
        "aspect_patch_tokens": a_patches,
        "aspect_backbone_patch_tokens": a_backbone_patches,
        "text_features": text_features,
        "image_logits": image_logits,
        **segmentation,
    }
    versions = {"meta_commit": META_COMMIT, "torch": torch.__version__, "numpy": np.__version__}
    for name in ("torchvision", "ftfy", "regex"):
        versions[name] = getattr(__import__(name), "__version__", "?")
    save_file({k: v.contiguous() for k, v in golden.items()}, OUT / "golden.safetensors", metadata=versions)
    rows = [row[: int((row != 0).sum())].tolist() for row in tokens]
    texts = {"texts": TEXTS, "meta_tokens": rows, "not_open_clip": NOT_OPEN_CLIP, "versions": versions}
    texts["segment"] = {
        "photo": SEGMENT_PHOTO,
        "short_side": SEGMENT_SIDE,
        "window": SEGMENT_WINDOW,
        "stride": SEGMENT_STRIDE,
        "labels": SEGMENT_LABELS,
        "templates": SEGMENT_TEMPLATES,
    }
    (OUT / "texts.json").write_text(json.dumps(texts, indent=1) + "\n", encoding="utf-8")
    (OUT / "official_shapes.json").write_text(json.dumps(official_shapes(), indent=0) + "\n", encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}
    print(json.dumps(sizes, indent=1), f"total {sum(sizes.values()) / 2**20:.2f} MiB")


def official_shapes() -> dict:
    """{"backbone": {name: shape}, "head_and_text": {name: shape}} of the official model, as Meta's hub
    function builds it (on the meta device: no weights, no download)."""
    from dinov3.hub.dinotxt import dinov3_vitl16_dinotxt_tet1280d20h24l

    with torch.device("meta"):
        model, _ = dinov3_vitl16_dinotxt_tet1280d20h24l(pretrained=False, bpe_path_or_url=str(BPE))
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    prefix = "visual_model.backbone."
    return {
        "backbone": {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
        "head_and_text": {k: v for k, v in state.items() if not k.startswith(prefix)},
    }


def notebook_segmentation(model, tokenizer) -> dict:
    """Meta's segmentation notebook, its own code: the text features of its inference cell, its transform
    (ShortSideResize, ToTensor, Normalize) and its predict_slide."""
    import dinov3
    import torch.nn.functional as F
    import torchvision.transforms as TVT
    import torchvision.transforms.functional as TVTF
    from PIL import Image
    from torch import Tensor, nn

    notebook = Path(dinov3.__file__).resolve().parents[1] / "notebooks" / "dinotxt_segmentation_inference.ipynb"
    namespace = {"math": math, "torch": torch, "F": F, "TVT": TVT, "TVTF": TVTF, "nn": nn, "Tensor": Tensor}
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and ("def encode_image" in source or "def predict_slide" in source):
            exec(source.replace('device="cuda"', 'device="cpu"'), namespace)
    transform = TVT.Compose(
        [
            namespace["ShortSideResize"](SEGMENT_SIDE, TVT.InterpolationMode.BICUBIC),
            TVT.ToTensor(),
            TVT.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    image = transform(Image.open(ROOT / "examples" / "images" / SEGMENT_PHOTO).convert("RGB"))
    features = []
    with torch.no_grad():
        for name in SEGMENT_LABELS:  # the notebook's loop
            feats = model.encode_text(tokenizer.tokenize([t.format(name) for t in SEGMENT_TEMPLATES]))
            feats = F.normalize(feats[:, feats.shape[1] // 2 :], p=2, dim=-1)
            features.append(F.normalize(feats.mean(dim=0), p=2, dim=-1))
        features = torch.stack(features)
        probabilities = namespace["predict_slide"](model, image, features, SEGMENT_WINDOW, SEGMENT_STRIDE)
    return {"segment_pixels": image, "segment_label_features": features, "segment_probabilities": probabilities}


def build_model():
    """Meta's DINOTxt at a small dino.txt shape, built as `dinov3_vitl16_dinotxt_tet1280d20h24l` builds it."""
    from dinov3.eval.text.dinotxt_model import DINOTxt, DINOTxtConfig
    from dinov3.eval.text.text_transformer import TextTransformer
    from dinov3.hub.backbones import _make_dinov3_vit

    backbone = _make_dinov3_vit(  # dinov3_vitl16's options, at width 64, 2 heads, 2 blocks
        img_size=224,
        patch_size=16,
        in_chans=3,
        pos_embed_rope_base=100,
        pos_embed_rope_normalize_coords="separate",
        pos_embed_rope_rescale_coords=2,
        pos_embed_rope_dtype="fp32",
        embed_dim=64,
        depth=2,
        num_heads=2,
        ffn_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.0,
        layerscale_init=1.0e-05,
        norm_layer="layernormbf16",
        ffn_layer="mlp",
        ffn_bias=True,
        proj_bias=True,
        n_storage_tokens=4,
        mask_k_bias=True,
        pretrained=False,
    )
    text = TextTransformer(
        context_length=77,
        vocab_size=49408,
        dim=128,
        num_heads=2,
        num_layers=2,
        ffn_ratio=4,
        is_causal=True,
        ls_init_value=None,
        dropout_prob=0.0,
    )
    config = DINOTxtConfig(  # the hub function's, with a 2 x 64 = 128-dimensional space
        embed_dim=128,
        vision_model_freeze_backbone=True,
        vision_model_train_img_size=224,
        vision_model_use_class_token=True,
        vision_model_use_patch_tokens=True,
        vision_model_num_head_blocks=2,
        vision_model_head_blocks_drop_path=0.3,
        vision_model_use_linear_projection=False,
        vision_model_patch_tokens_pooler_type="mean",
        vision_model_patch_token_layer=1,
        text_model_freeze_backbone=False,
        text_model_num_head_blocks=0,
        text_model_head_blocks_is_causal=False,
        text_model_head_blocks_drop_prob=0.0,
        text_model_tokens_pooler_type="argmax",
        text_model_use_linear_projection=True,
        init_logit_scale=math.log(1 / 0.07),
        init_logit_bias=None,
        freeze_logit_scale=False,
    )
    model = DINOTxt(model_config=config, vision_backbone=backbone, text_backbone=text)
    model.visual_model.backbone = backbone
    return model.eval()


def randomize(model, used_tokens: torch.Tensor, seed: int = 0) -> None:
    """Random values of realistic scale, rounded to bf16 (stored as float32: they compress)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and ("norm" in name or "ln_final" in name):
                value = 1.0 + 0.2 * r
            elif leaf == "gamma":  # layer scales near 1
                value = 0.6 + 0.4 * torch.rand(p.shape, generator=g)
            elif leaf == "bias":
                value = 0.1 * r
            elif name == "logit_scale":
                value = torch.full(p.shape, 2.3)
            elif name.endswith("token_embedding.weight"):  # only the rows of the corpus' tokens
                value = torch.zeros(p.shape)
                value[used_tokens] = 0.5 * r[used_tokens]
            elif name.endswith("positional_embedding"):
                value = 0.3 * r
            elif p.ndim >= 2 and "token" not in name:
                value = r / math.sqrt(math.prod(p.shape[1:]))
            else:  # cls, register and mask tokens
                value = r
            p.copy_(value.to(torch.bfloat16).float())
        backbone = model.visual_model.backbone
        for block in backbone.blocks:  # Meta's key-bias mask: ones for q and v, zeros for k
            mask = block.attn.qkv.bias_mask
            third = mask.shape[0] // 3
            mask.copy_(torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)]))
        rope = backbone.rope_embed
        rope.periods.copy_(rope.periods.to(torch.bfloat16).float())  # as Meta's files store them


def backbone_state_dict(model) -> dict:
    state = dict(model.visual_model.backbone.state_dict())
    state["rope_embed.periods"] = state["rope_embed.periods"].to(torch.bfloat16)  # Meta's files keep bf16
    return state


def uint8_stage(transform, image) -> torch.Tensor:
    """The transform's output before ToDtype and Normalize: the resized (and cropped) uint8 image."""
    steps = [t for t in transform.transforms if type(t).__name__ in ("ToImage", "Resize", "CenterCrop")]
    out = image
    for step in steps:
        out = step(out)
    assert out.dtype == torch.uint8
    return out.as_subclass(torch.Tensor).contiguous()


def normalize(crops: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (crops.float() * (1 / 255) - mean) / std


def write_gz(state_dict: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))


def read_gz(path: Path) -> dict:
    return torch.load(io.BytesIO(gzip.decompress(path.read_bytes())), weights_only=True)


if __name__ == "__main__":
    try:
        import dinov3  # noqa: F401
    except ImportError:
        sys.exit("Meta's dinov3 package is not importable: put its repository on PYTHONPATH (see the docstring)")
    main()
