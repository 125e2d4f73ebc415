"""Dense features at high resolution: time and peak memory of one image's patch features, by size.

    python benchmarks/dense.py             # prints a markdown table; --save puts it in RESULTS.md
    python benchmarks/dense.py --sizes 512,1024,2048,4096 --presets vitb16 --backends torch

ViT-S/16 and ViT-B/16 with random weights of realistic scale (tests/helpers.randomize_), on the
torch backend (PyTorch's SDPA: flash attention, no T x T scores) and OpenVINO (f32), for a square
photo (retina.jpg, resized) of 512, 1024 and 2048 px, and 4096 px where it is asked for (--sizes;
by default only ViT-S/16 on torch: on a 2-core CPU one ViT-B/16 forward at 4096 px takes about half
an hour). Each size runs in a fresh process. "peak MB": the process's peak resident memory (model,
runtime and forward passes included); "added MB": that peak over the memory once the model was
loaded, before any forward pass (the tiled run comes after the peak is read). Time: one forward
after a warm-up; at 2048 px and above a single first call (for OpenVINO it includes compiling the
model for that size, a few seconds). Unless --no-tiles, torch runs of 1024 px and up also run
Meta's sliding windows (512 px, stride 336 px) and report the patch cosine of the tiled features
to the full-attention ones (mean and lowest over the patches).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import save_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PHOTO = ROOT / "examples" / "images" / "retina.jpg"

PROBE = r"""
import json, sys, time
import torch
import dino3
from dino3.dense import Tiling, dense_features

folder, backend, size, tiles, cache, photo = sys.argv[1:7]
size, tiles = int(size), tiles == "1"

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

options = {} if backend == "torch" else {"backend": backend, "precision": "f32", "runtime_cache": cache}
model = dino3.load(folder, **options)
processor = dino3.DINOv3ViTImageProcessor.for_model(model, size={"height": size, "width": size})
pixels = processor.pixels(photo)
loaded = status("VmRSS:")  # the model and runtime, before any forward pass
dense_features(model, pixels[:, :224, :224])  # warm-up
first_call = size >= 2048
if not first_call:
    dense_features(model, pixels)
start = time.perf_counter()
grid = dense_features(model, pixels)
seconds = time.perf_counter() - start
peak = status("VmHWM:")
result = {"seconds": seconds, "peak": peak, "added": peak - loaded, "grid": list(grid.shape[:2]),
          "first_call": first_call}
if tiles:
    start = time.perf_counter()
    tiled = dense_features(model, pixels, tiles=Tiling())
    result["tiled_seconds"] = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(tiled, grid, dim=-1)
    result["cosine_mean"], result["cosine_min"] = float(cosine.mean()), float(cosine.min())
print(json.dumps(result))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_checkpoint(preset: str, folder: Path) -> Path:
    import dino3
    from helpers import randomize_

    model = randomize_(dino3.DINOv3ViTModel(dino3.get_preset(preset).make_config()))
    model.save_pretrained(folder)
    dino3.DINOv3ViTImageProcessor.for_preset(dino3.get_preset(preset)).save_pretrained(folder)
    return folder


def probe(folder: Path, backend: str, size: int, tiles: bool, cache: Path) -> dict:
    options = [str(folder), backend, str(size), "1" if tiles else "0", str(cache), str(PHOTO)]
    command = [sys.executable, "-c", PROBE, *options]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_runs(presets: list[str], backends: list[str], sizes: list[int]) -> list[tuple[str, str, int]]:
    """Every preset, backend and size; 4096 px on ViT-S/16 torch only unless asked for."""
    runs = []
    for preset in presets:
        for backend in backends:
            for size in sizes:
                if size == 4096 and (preset, backend) != ("vits16", "torch"):
                    continue
                runs.append((preset, backend, size))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="vits16,vitb16")
    parser.add_argument("--backends", default="torch,openvino")
    parser.add_argument("--sizes", help="comma-separated px (default: 512,1024,2048, and 4096 on ViT-S/16 torch)")
    parser.add_argument("--no-tiles", action="store_true", help="skip the tiled runs and their cosine")
    parser.add_argument("--save", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args()

    import dino3

    presets, backends = args.presets.split(","), args.backends.split(",")
    if args.sizes:
        runs = [(p, b, int(s)) for p in presets for b in backends for s in args.sizes.split(",")]
    else:
        runs = default_runs(presets, backends, [512, 1024, 2048, 4096])
    started = time.perf_counter()
    rows, tiled_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        folders = {p: write_checkpoint(p, Path(scratch) / p) for p in presets}
        for preset, backend, size in runs:
            tiles = backend == "torch" and not args.no_tiles and size >= 1024
            result = probe(folders[preset], backend, size, tiles, Path(scratch) / "cache")
            config = dino3.get_preset(preset).make_config()
            tokens = result["grid"][0] * result["grid"][1] + config.num_prefix_tokens
            note = " (first call)" if result["first_call"] else ""
            rows.append(
                f"| {preset} | {backend} | {size} | {tokens:,} | {result['seconds']:.2f}{note} | "
                f"{result['peak'] / 2**20:.0f} | {result['added'] / 2**20:.0f} |"
            )
            if tiles:
                tiled_rows.append(
                    f"| {preset} | {size} | {result['tiled_seconds']:.2f} | {result['seconds']:.2f} | "
                    f"{result['cosine_mean']:.4f} | {result['cosine_min']:.4f} |"
                )
            print(rows[-1], file=sys.stderr)
    lines = [
        f"Dense features of one square image (the last layer's patch tokens), fresh process per row, "
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__.split('+')[0]}, random weights of realistic scale:",
        "",
        "| model | backend | px | tokens | seconds | peak MB | added MB |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if tiled_rows:
        lines += [
            "",
            "Tiled (Meta's sliding window: 512 px crops, stride 336 px, overlaps averaged) against full "
            "attention, torch; patch cosine of the tiled features to the full ones (random weights: real "
            "weights mix context differently):",
            "",
            "| model | px | tiled s | full s | cosine mean | cosine lowest |",
            "|---|---|---|---|---|---|",
            *tiled_rows,
        ]
    lines += ["", f"The whole run took {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.save:
        save_section("Dense features", text)


if __name__ == "__main__":
    main()
