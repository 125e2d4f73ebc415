"""`dino3 segment`: zero-shot segmentation with a dino.txt model (dino3.text.segment). Zero-shot
labels are `dino3 classify --labels` (cli/probe.py), text search `dino3 search --text` (cli/index.py).

    dino3 segment street.jpg -m dinotxt-vitl16 --labels "road,car,tree,sky,building" -o street-labels.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import EXIT_OK, add_model_arguments, positive_int, use_threads


def split_labels(text: str) -> list[str]:
    """--labels "cat,dog,a red car": the names, stripped; empty ones refused."""
    from ..errors import UsageError

    labels = [label.strip() for label in text.split(",")]
    if not labels or any(not label for label in labels):
        raise UsageError(f"--labels {text!r}: give comma-separated names, none empty (e.g. --labels cat,dog,car)")
    return labels


def load_text_model(args: argparse.Namespace):
    """The dino.txt model -m names, through the recipe's checks; a clear error for any other model."""
    from ..errors import UsageError
    from ..recipe import Recipe

    made = Recipe(args.model, pool="text", dtype=args.dtype).load(device=args.device, check_hash=not args.no_hash_check)
    if not hasattr(made.model, "encode_text"):
        raise UsageError(f"{args.model} is not a dino.txt model: zero-shot labels need one (-m dinotxt-vitl16)")
    return made


def cmd_segment(args: argparse.Namespace) -> int:
    from ..dense.render import save_png, segmentation_picture
    from ..images import load_image
    from ..text import segment

    use_threads(args)
    labels = split_labels(args.labels)
    templates = args.template or ["a photo of a {}."]
    made = load_text_model(args)
    image = load_image(args.image)
    found = segment(made.model, image, labels, templates, features=args.features, short_side=args.short_side)
    output = save_png(segmentation_picture(image, found), args.output)
    print(f"wrote {output}", file=sys.stderr)
    if args.masks:
        folder = Path(args.masks)
        folder.mkdir(parents=True, exist_ok=True)
        for i, mask in enumerate(found.masks().values()):
            picture = (mask.cpu().numpy()[..., None] * 255).repeat(3, axis=-1).astype("uint8")
            save_png(picture, folder / f"{i:02d}.png")
        names = {f"{i:02d}.png": label for i, label in enumerate(found.labels)}
        (folder / "labels.json").write_text(json.dumps(names, indent=1) + "\n")
        print(f"wrote a mask per label in {folder} (labels.json names them)", file=sys.stderr)
    for label, share in sorted(found.areas.items(), key=lambda kv: -kv[1]):
        print(f"{share:7.1%}  {label}")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    segment = commands.add_parser(
        "segment",
        help="label every pixel of an image with one of some names (zero-shot, dino.txt)",
        description="Zero-shot segmentation as Meta's dino.txt notebook does it: the image's patch tokens against "
        "the names' text embeddings, in sliding windows, upsampled to the image. Writes the image under its "
        "label map with a legend, and with --masks a mask per label.",
        epilog='example:\n  dino3 segment street.jpg -m dinotxt-vitl16 --labels "road,car,tree,sky" -o labels.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument("image", help="an image file or URL")
    add_model_arguments(segment)
    segment.add_argument("--labels", required=True, help="comma-separated names, e.g. road,car,tree,sky")
    segment.add_argument(
        "--template", action="append", help='a prompt with {} for the name (default: "a photo of a {}."); repeatable'
    )
    segment.add_argument("-o", "--output", required=True, help="the picture: the image, its label map, a legend (.png)")
    segment.add_argument("--masks", metavar="DIR", help="also write a black-and-white mask per label into DIR")
    segment.add_argument(
        "--features", choices=("backbone", "head"), default="backbone", help="patch tokens (default: the notebook's)"
    )
    segment.add_argument("--short-side", type=positive_int, default=512, help="the image's shorter side (default 512)")
    segment.add_argument("--dtype", choices=("float32", "bfloat16"), help="model dtype (default: float32)")
    segment.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    segment.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    segment.set_defaults(run=cmd_segment)
