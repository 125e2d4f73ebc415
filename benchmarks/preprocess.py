"""Preprocessing throughput (decode included) of dino3 against Transformers on real JPEG photos, and
what dino3's opt-in reduced-scale JPEG decoding (`jpeg_draft=True`) changes in the features.

    python benchmarks/preprocess.py           # prints a markdown table; --save puts it in RESULTS.md

The photos in examples/images are re-encoded as JPEG (quality 92) and repeated to 64 files. Each
library turns the 64 paths into a (64, 3, 224, 224) batch: Transformers with its pipeline's
`load_image` then its image processor, dino3 with its processor alone. The runs are interleaved;
the table gives the median of several.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from common import interleaved_seconds, save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_jpegs(folder: Path, count: int = 64) -> list[Path]:
    photos = sorted((ROOT / "examples" / "images").glob("*.[jp][pn]g"))
    paths = []
    for i in range(count):
        source = photos[i % len(photos)]
        path = folder / f"{i:03d}_{source.stem}.jpg"
        Image.open(source).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()

    import transformers
    from transformers.image_utils import load_image

    import dino3
    from dino3.processing import DINOv3ViTImageProcessor
    from helpers import randomize_

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp))
        names = [str(p) for p in paths]
        reference = transformers.DINOv3ViTImageProcessor()
        ours, draft = DINOv3ViTImageProcessor(), DINOv3ViTImageProcessor(jpeg_draft=True)
        runs = {
            "transformers (load_image + processor)": lambda: (
                reference([load_image(n) for n in names], return_tensors="pt").pixel_values
            ),
            "dino3 processor": lambda: ours(names).pixel_values,
            "dino3 processor, jpeg_draft=True": lambda: draft(names).pixel_values,
        }
        speed = {name: len(names) / s for name, s in interleaved_seconds(runs, args.reps).items()}

        # What draft decoding changes: pixels, and the features of a ViT-S with realistic random weights.
        exact, reduced = ours(names).pixel_values, draft(names).pixel_values
        torch.manual_seed(0)
        model = randomize_(dino3.DINOv3ViTModel(dino3.get_preset("vits16").make_config())).eval()
        with torch.inference_mode():
            a, b = model(exact), model(reduced)
        cos = torch.nn.functional.cosine_similarity
        cls_cos = cos(a.cls_token, b.cls_token, dim=-1)
        patch_cos = cos(a.patch_tokens, b.patch_tokens, dim=-1)
        pixel_diff = (exact - reduced).abs().mean().item()

    base = speed["transformers (load_image + processor)"]
    lines = [
        f"Preprocessing, {len(names)} JPEG photos (300x451 to 1411x1411) -> (64, 3, 224, 224), "
        f"torch {torch.get_num_threads()} threads, median of {args.reps}:",
        "",
        "| pipeline | images/s | vs Transformers |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s:.1f} | {s / base:.2f}x |" for name, s in speed.items()]
    lines += [
        "",
        f"jpeg_draft=True against full decoding: mean |pixel difference| {pixel_diff:.4f} (normalised units); "
        f"ViT-S/16 (random weights of realistic scale) CLS cosine min {cls_cos.min():.5f} / mean {cls_cos.mean():.5f}, "
        f"patch-token cosine min {patch_cos.min():.4f} / mean {patch_cos.mean():.5f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Preprocessing", text)


if __name__ == "__main__":
    main()
