"""Each precision and quantization mode: speed, model memory, and closeness of the features to fp32.

    python benchmarks/quantization.py          # prints a markdown table; --save puts it in RESULTS.md

ViT-S/16 and ViT-B/16 with random weights of realistic scale (tests/helpers.randomize_; real
weights may behave differently), at 224 px, batch 32. Speed: median images/s of --reps runs,
interleaved, with Transformers' fp32 and bf16 in the same run. Closeness: the cosine similarity of
the CLS token and of every patch token to dino3's fp32 output, on the example photos (the lowest
over all images and tokens). Model memory: parameter bytes, with int8 weights counted at 1 byte
plus their per-channel fp32 scales.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

from common import interleaved_seconds, save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODES = ["fp32", "bf16", "int8-dynamic", "int8-weight"]


def model_megabytes(model, mode: str) -> float:
    total = 0
    for module in model.modules():
        linear = hasattr(module, "in_features") and hasattr(module, "out_features")  # quantized ones too
        if linear and mode.startswith("int8"):
            out_features, in_features = module.out_features, module.in_features
            total += out_features * in_features + 4 * out_features * 2  # int8 weight, scale, bias
            continue
        for p in module.parameters(recurse=False):
            total += p.numel() * p.element_size()
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="vits16,vitb16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import transformers

    import dino3
    from dino3.quantization import quantize
    from dino3.weights.formats import to_hf
    from helpers import randomize_

    photos = dino3.DINOv3ViTImageProcessor()(sorted((ROOT / "examples" / "images").glob("*.[jp][pn]g"))).pixel_values
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lines = [
        f"Precision and quantization, batch 32 at 224 px, CPU ({torch.get_num_threads()} threads), "
        f"median of {args.reps}; cosine to dino3 fp32 on the {len(photos)} example photos (lowest CLS / "
        "lowest patch token):",
        "",
        "| model | mode | images/s | vs Transformers fp32 | model MB | CLS cosine | patch cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in args.presets.split(","):
        config = dino3.get_preset(preset).make_config()
        torch.manual_seed(0)
        base = randomize_(dino3.DINOv3ViTModel(config)).eval()
        hf_config = transformers.DINOv3ViTConfig(**dino3.get_preset(preset).config)
        reference = transformers.DINOv3ViTModel(hf_config).eval()
        weights = to_hf(base.state_dict(), config)  # Transformers names its blocks model.layer.N in memory
        reference.load_state_dict({("model." + k if k.startswith("layer.") else k): v for k, v in weights.items()})
        models = {
            "fp32": base,
            "bf16": copy.deepcopy(base).to(torch.bfloat16),
            "int8-dynamic": quantize(copy.deepcopy(base), "int8-dynamic"),
            "int8-weight": quantize(copy.deepcopy(base), "int8-weight"),
            "Transformers fp32": reference,
            "Transformers bf16": copy.deepcopy(reference).to(torch.bfloat16),
        }
        inputs = {name: x.to(torch.bfloat16) if "bf16" in name else x for name in models}
        runs = {name: (lambda model=model, x=inputs[name]: model(x)) for name, model in models.items()}
        with torch.inference_mode():
            speed = {name: 32 / s for name, s in interleaved_seconds(runs, args.reps).items()}
            truth = base(photos)
        cos = torch.nn.functional.cosine_similarity
        for name, model in models.items():
            mode = {"Transformers fp32": "fp32", "Transformers bf16": "bf16"}.get(name, name)
            with torch.inference_mode():
                out = model(photos.to(torch.bfloat16) if mode == "bf16" else photos)
            if hasattr(out, "cls_token"):  # dino3's output
                cls, patches = out.cls_token, out.patch_tokens
            else:  # Transformers': [CLS, registers, patches]
                hidden = out.last_hidden_state
                cls, patches = hidden[:, 0], hidden[:, 1 + config.num_register_tokens :]
            cls_cos = cos(cls.float(), truth.cls_token).min().item()
            patch_cos = cos(patches.float(), truth.patch_tokens, dim=-1).min().item()
            label = name if name.startswith("Transformers") else f"dino3 {name}"
            lines.append(
                f"| {preset} | {label} | {speed[name]:.1f} | {speed[name] / speed['Transformers fp32']:.2f}x | "
                f"{model_megabytes(model, mode):.0f} | {cls_cos:.5f} | {patch_cos:.5f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Precision and quantization", text)


if __name__ == "__main__":
    main()
