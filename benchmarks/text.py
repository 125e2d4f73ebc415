"""dino.txt on the CPU: dino3's DINOv3TextModel against Meta's code, the official shapes, random weights.

    PYTHONPATH=/path/to/facebookresearch/dinov3 python benchmarks/text.py   # --save puts it in RESULTS.md

Meta's code is its public repository (not on the package index; tests/golden/make_dinotxt_golden.py says
which commit). Both models are built at the official dino.txt shape (ViT-L/16 backbone, a vision head of
two blocks, a 24-layer text transformer of width 1280) with the same random weights (dino3's, written
into Meta's modules through dino3's Meta layout; the outputs are checked to agree), in float32.

Images: a batch of 8 at 224 px (Meta's transform on the example photos): Meta's `encode_image`, dino3's
`encode_image`, and dino3's backbone alone (the goal: the embedding costs the backbone plus the head).
Texts: a batch of 64 zero-shot prompts ("a photo of a {label}.", 7-12 tokens), and 64 texts that fill the
77-token context, through `encode_text` (tokenized beforehand, the same tokens for both).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from common import interleaved_seconds, save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import dino3  # noqa: E402
from dino3.weights import formats  # noqa: E402

# 64 labels for zero-shot prompts.
LABELS = [
    *("cat", "dog", "car", "bicycle", "airplane", "ship", "truck", "horse", "bird", "frog", "deer", "tree", "house"),
    *("road", "river", "mountain", "beach", "person", "chair", "table", "bottle", "cup", "laptop", "phone", "book"),
    *("clock", "lamp", "sofa", "bed", "window", "door", "flower", "apple", "banana", "orange", "pizza", "cake"),
    *("sandwich", "train", "bus", "motorcycle", "boat", "traffic light", "stop sign", "bench", "umbrella", "kite"),
    *("skateboard", "surfboard", "tennis racket", "guitar", "piano", "violin", "drum", "camera", "television"),
    *("keyboard", "mouse", "remote", "oven", "toaster", "sink", "fork", "spoon"),
]


def meta_model(model: dino3.DINOv3TextModel):
    """Meta's DINOTxt at the official shape, holding the dino3 model's weights."""
    from dinov3.eval.text.dinotxt_model import DINOTxt, DINOTxtConfig
    from dinov3.eval.text.text_transformer import TextTransformer
    from dinov3.hub.backbones import dinov3_vitl16

    backbone = dinov3_vitl16(pretrained=False)
    text = TextTransformer(77, 49408, 1280, 20, 24, 4, True, None, dropout_prob=0.0)
    config = DINOTxtConfig(
        embed_dim=2048,
        vision_model_use_class_token=True,
        vision_model_use_patch_tokens=True,
        vision_model_num_head_blocks=2,
        vision_model_patch_tokens_pooler_type="mean",
        text_model_tokens_pooler_type="argmax",
        text_model_use_linear_projection=True,
        init_logit_scale=math.log(1 / 0.07),
    )
    meta = DINOTxt(model_config=config, vision_backbone=backbone, text_backbone=text)
    meta.visual_model.backbone = backbone
    state = model.state_dict()
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    backbone.load_state_dict(formats.from_dino3(backbone_state, model.backbone.config, "meta"))
    own = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    missing, unexpected = meta.load_state_dict(formats.from_dino3(own, model.config, "meta"), strict=False)
    assert not unexpected and all(k.startswith("visual_model.backbone.") for k in missing)
    return meta.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = dino3.DINOv3TextModel().eval()  # the official shape, random weights
    meta = meta_model(model)
    processor = dino3.DINOv3ViTImageProcessor.for_dinotxt()
    photos = sorted((ROOT / "examples" / "images").glob("*.[jp][pn]g"))[:8]
    pixels = processor(photos).pixel_values  # (8, 3, 224, 224)
    assert len(LABELS) == 64
    prompts = model.tokenize([f"a photo of a {label}." for label in LABELS])
    long = model.tokenize([" ".join(LABELS[i:] + LABELS[:i]) for i in range(64)])  # each fills the context

    with torch.inference_mode():
        ours, theirs = model.encode_image(pixels), meta.encode_image(pixels)
        image_diff = (ours - theirs).abs().max().item()
        text_diff = (model.encode_text(prompts) - meta.encode_text(prompts)).abs().max().item()
        images = interleaved_seconds(
            {
                "Meta encode_image": lambda: meta.encode_image(pixels),
                "dino3 encode_image": lambda: model.encode_image(pixels),
                "dino3 backbone alone": lambda: model.backbone(pixels),
            },
            args.reps,
        )
        texts = interleaved_seconds(
            {
                "Meta encode_text, prompts": lambda: meta.encode_text(prompts),
                "dino3 encode_text, prompts": lambda: model.encode_text(prompts),
                "Meta encode_text, 77 tokens": lambda: meta.encode_text(long),
                "dino3 encode_text, 77 tokens": lambda: model.encode_text(long),
            },
            max(1, args.reps - 1),
        )
    lengths = (prompts != 0).sum(-1)
    rows = ["| what | batch | seconds | per item ms | vs Meta |", "|---|---|---|---|---|"]
    for name, seconds in images.items():
        rows.append(
            f"| {name} | 8 images | {seconds:.2f} | {seconds / 8 * 1e3:.0f} | "
            f"{images['Meta encode_image'] / seconds:.2f}x |"
        )
    for name, seconds in texts.items():
        reference = texts["Meta " + name.split(" ", 1)[1]]
        rows.append(f"| {name} | 64 texts | {seconds:.2f} | {seconds / 64 * 1e3:.1f} | {reference / seconds:.2f}x |")
    head = images["dino3 encode_image"] - images["dino3 backbone alone"]
    cpu = _cpu()
    text = "\n".join(
        [
            f"Date: {date.today()}; {cpu}, {torch.get_num_threads()} threads, shared with other work; "
            f"Python {platform.python_version()}, torch {torch.__version__}, dino3 {dino3.__version__}",
            "",
            "Official dino.txt shape (ViT-L/16 + 2-block vision head; 24-layer text transformer of width 1280), "
            "random weights, float32; images at 224 px (Meta's transform on the example photos); "
            f"prompts of {int(lengths.min())}-{int(lengths.max())} tokens. The same weights in both: "
            f"largest difference {image_diff:.1e} (image embeddings), {text_diff:.1e} (text).",
            "",
            *rows,
            "",
            f"The vision head costs {head:.2f} s on top of the backbone ({head / images['dino3 backbone alone']:.0%}).",
            "`python benchmarks/text.py --save` (Meta's repository on PYTHONPATH).",
        ]
    )
    print(text)
    if args.save:
        save_section("dino.txt: image and text embeddings against Meta's code", text)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
