"""Similar images and near-duplicates on the example photos: build an index, search it, find the copies.

    python examples/index_demo.py [MODEL]        # MODEL defaults to vits16

Copies the example photos to out/index-demo/photos/, with a JPEG re-encode at quality 40 and a
half-size copy of three of them; builds an index of them (out/index-demo/photos.index); searches it
with a photo and writes out/index-demo/search.html; finds the near-duplicate groups and writes
out/index-demo/groups.html; then adds a new photo and deletes one, and brings the index up to date.
Without access to Meta's gated weights it uses the same architecture with RANDOM weights (as
examples/demo.py does), where copies still score ~0.999 and different photos below ~0.98.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from demo import random_checkpoint  # examples/demo.py: the same random-weights fallback
from PIL import Image

import dino3
import dino3.index
from dino3.errors import HubAccessError

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"


def main(model: str = "vits16") -> int:
    out = ROOT / "out" / "index-demo"
    shutil.rmtree(out, ignore_errors=True)
    photos = out / "photos"
    photos.mkdir(parents=True)
    for photo in sorted(PHOTOS.glob("*.*")):
        if photo.suffix in (".png", ".jpg"):
            shutil.copy(photo, photos / photo.name)
    for name in ("chelsea.png", "rocket.jpg", "coffee.png"):
        image = Image.open(photos / name).convert("RGB")
        image.save(photos / f"{Path(name).stem}_q40.jpg", quality=40)
        image.resize((image.width // 2, image.height // 2)).save(photos / f"{Path(name).stem}_half.png")

    try:
        dino3.load_config(model)  # config.json is gated like the weights: a quick test of access
    except HubAccessError as e:
        print(f"no access to the gated DINOv3 weights ({str(e).split('. ')[0]}); using RANDOM weights", file=sys.stderr)
        model = str(random_checkpoint(model, ROOT / "out" / f"{model}-random"))

    folder = out / "photos.index"
    update = dino3.index.build([str(photos)], model=model, folder=folder)
    print(f"built {folder}: {update.count} images in {update.seconds:.1f} s")

    index = dino3.index.open(folder)
    results = index.search(str(photos / "chelsea.png"), k=4)
    for neighbour in results[0]["neighbors"]:
        print(f"  {neighbour['score']:.4f}  {Path(neighbour['path']).name}")
    _write(out / "search.html", "search", {"results": results})

    duplicates = index.dedup(threshold=0.99)
    for group in duplicates["groups"]:
        print("duplicates:", ", ".join(Path(p).name for p in group["paths"]))
    _write(out / "groups.html", "dedup", duplicates)

    Image.open(photos / "horse.png").rotate(90).save(photos / "horse_rotated.png")
    (photos / "coffee_half.png").unlink()
    update = index.add([str(photos)])
    print(f"add: {update.added} new, {update.dropped} gone, {update.embedded} embedded; {len(index)} images now")
    return 0


def _write(path: Path, kind: str, data: dict) -> None:
    from dino3.index.report import dedup_page, search_page

    path.write_text(search_page(data["results"]) if kind == "search" else dedup_page(data))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
