"""See your features: PCA pictures, foreground masks and patch matches of the example photos.

    python examples/dense.py [MODEL]        # MODEL defaults to vits16; pictures go to out/dense/

With access to Meta's gated weights it uses them. Without, it says so and uses a checkpoint of the
same architecture with RANDOM weights: the pictures are then made the same way, but show what a
random network sees (texture and colour, little meaning), and every file name says "random".

What it writes:
- pca-joint-*.png: each photo beside the PCA colours of its patch features, one PCA over all the
  photos (Meta's recipe: height 768, aspect kept, 3 whitened components, sigmoid(2x));
- foreground-*.png: DINOv2's unsupervised foreground (first principal component) of each photo;
- match.png, matches.json: a crop of the coffee photo matched to the whole photo (mutual nearest
  patches, at least 32 px apart), lines between the matched points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from demo import random_checkpoint  # examples/demo.py: the same random-weights fallback

import dino3
from dino3 import dense
from dino3.dense import render
from dino3.errors import HubAccessError

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png"]
SHIFT = torch.tensor([48.0, 32.0], dtype=torch.float64)  # where the crop starts in the coffee photo (x, y)


def main(name: str = "vits16") -> int:
    out = ROOT / "out" / "dense"
    out.mkdir(parents=True, exist_ok=True)
    tag = ""
    try:
        dino3.load_config(name)  # config.json is gated like the weights: a quick test of access
    except HubAccessError as e:
        print(f"no access to the gated DINOv3 weights ({str(e).split('. ')[0]}); using RANDOM weights", file=sys.stderr)
        name, tag = str(random_checkpoint(name, ROOT / "out" / f"{name}-random")), "-random"
    model = dino3.load(name)

    images = [dense.load_dense(model, ROOT / "examples" / "images" / photo) for photo in PHOTOS]
    colours = dense.pca_rgb([image.features for image in images])  # one PCA: consistent colours
    for photo, image, rgb in zip(PHOTOS, images, colours):
        picture = render.pca_picture(image.image, rgb, tuple(image.pixels.shape[-2:]))
        render.save_png(picture, out / f"pca-joint{tag}-{Path(photo).stem}.png")
        mask = dense.unsupervised_foreground(image.features)
        render.save_png(render.mask_picture(mask, tuple(image.image.shape[-2:])), out / f"foreground{tag}-{photo}")

    coffee = images[PHOTOS.index("coffee.png")]
    crop = dense.load_dense(model, coffee.image[:, 32:, 48:])  # the photo, shifted by (48, 32) px
    matches = dense.match_patches(crop, coffee, mutual=True, spacing=32)
    render.save_png(render.match_picture(crop.image, coffee.image, matches.a, matches.b), out / f"match{tag}.png")
    (out / f"matches{tag}.json").write_text(json.dumps(matches.to_json()) + "\n")
    right = ((matches.a + SHIFT - matches.b).norm(dim=1) <= 16).float().mean()
    print(
        f"wrote {out}: {len(PHOTOS)} PCA pictures, {len(PHOTOS)} masks, {len(matches)} matches "
        f"({right:.0%} within 16 px of the true shift)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
