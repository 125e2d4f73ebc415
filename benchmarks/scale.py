"""Embedding at scale on one machine: is `dino3 embed` at the limit its model and preprocessing allow?

    python benchmarks/scale.py            # prints the tables; --save puts them in RESULTS.md
    python benchmarks/scale.py --ray      # also Ray Data on this machine against the local job

On a machine where the model and the preprocessing share the cores, files-to-features cannot beat
1 / (1/M + 1/P): M the model alone on ready pixels, P the preprocessing alone (decoding the JPEGs
and resizing them, with the job's decoding threads), each measured here in the same run. The job
is timed with the model already loaded (its `load` is given the loaded model), so that the figure is
its steady state, not start-up; median of --reps runs over --images JPEG photos (ViT-S/16, random
weights of realistic scale, batch 16). The Ray row runs 1,000 of the photos, then
--ray-images of them, through the local command and `dino3 embed --engine ray` on the same cores: the
whole runs (Ray's own start-up given apart), and the rate of the images beyond the first 1,000, which
sets every fixed cost (start-up, loading, the first batches) apart for both.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import save_section
from preprocess import make_jpegs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PATHS = [
    ("torch", "fp32", dict(dtype="float32")),
    ("torch", "bf16", dict(dtype="bfloat16")),
    ("openvino", "f32", dict(backend="openvino", precision="f32")),
    ("openvino", "bf16", dict(backend="openvino", precision="bf16")),
    ("openvino", "int8", dict(backend="openvino", precision="int8")),
]


def median_seconds(run, reps: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, checkpoint: Path, paths: list[str], options: dict, out: Path, args) -> tuple[float, float, float]:
    """(model alone, preprocessing alone, the embed job), each in images/s."""
    import dino3
    from dino3.features import extract
    from dino3.pipeline import iter_batches

    processor = dino3.DINOv3ViTImageProcessor.for_model(model)
    pixels = torch.stack([processor.pixels(p) for p in paths[:16]])

    def model_alone():
        for _ in range(len(paths) // 16):
            extract(model, pixels, "cls")

    def preprocessing_alone():
        for _ in iter_batches(paths, processor, 16, args.workers):
            pass

    def job():
        dino3.embed.run(
            paths, model=checkpoint, output=out, overwrite=True, progress=False, batch_size=16,
            workers=args.workers, load=lambda *a, **k: model, **options,
        )  # fmt: skip

    m = len(paths) // 16 * 16 / median_seconds(model_alone, args.reps)
    p = len(paths) / median_seconds(preprocessing_alone, args.reps)
    e = len(paths) / median_seconds(job, args.reps)
    return m, p, e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also time the Ray engine (>= 1,000 images)")
    parser.add_argument("--ray-images", type=int, default=3000, help="the larger run of the Ray comparison")
    parser.add_argument("--save", action="store_true", help="put the tables in benchmarks/RESULTS.md")
    parser.add_argument("--only", default="", help="only the paths whose name contains this")
    args = parser.parse_args()

    import dino3
    from dino3.cli import main as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        paths = [str(p) for p in make_jpegs(photos, args.images)]
        checkpoint = tmp / "vits16"
        cli(["init-random", "vits16", str(checkpoint)])
        for backend, precision, options in PATHS:
            name = f"{backend} {precision}"
            if args.only and args.only not in name:
                continue
            model = dino3.load(checkpoint, **options)
            m, p, e = measure(model, checkpoint, paths, options, tmp / "f.npz", args)
            bound = 1 / (1 / m + 1 / p)
            rows.append((name, m, p, bound, e))
            print(f"{name}: model {m:.1f}, preprocessing {p:.1f}, bound {bound:.1f}, embed {e:.1f} ({e / bound:.0%})")

        ray_text = ""
        if args.ray:
            ray_text = ray_rows(tmp, checkpoint, photos, args)

    machine = f"{platform.processor() or platform.machine()}, torch {torch.get_num_threads()} threads"
    lines = [
        f"Files to features on one machine ({machine}; torch {torch.__version__}, dino3 {dino3.__version__}): "
        f"{args.images} JPEG photos (300x451 to 1411x1411) -> ViT-S/16 CLS embeddings, batch 16, "
        f"{args.workers} decoding threads, median of {args.reps}; the model already loaded. Bound = "
        "1 / (1/model + 1/preprocessing), each measured alone in this run:",
        "",
        "| path | model alone, img/s | preprocessing alone, img/s | bound, img/s | dino3 embed, img/s | of the bound |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {m:.1f} | {p:.1f} | {b:.1f} | {e:.1f} | {e / b:.0%} |" for n, m, p, b, e in rows],
    ]
    text = "\n".join(lines) + ("\n\n" + ray_text if ray_text else "")
    print(text)
    if args.save:
        save_section("Embedding at scale", text)


def ray_rows(tmp: Path, checkpoint: Path, photos: Path, args) -> str:
    """The local job and the Ray engine on the same inputs and cores, at 1,000 images and at more:
    the whole runs, and the rate of the images beyond the first 1,000 (all fixed costs apart)."""
    import subprocess

    small, large = 1000, max(args.ray_images, 2000)
    many = tmp / "many"
    many.mkdir()
    for i, path in enumerate(make_jpegs(many, large)):
        path.rename(many / f"{i:05d}.jpg")
    first = tmp / "first"
    first.mkdir()
    for path in sorted(many.iterdir())[:small]:
        (first / path.name).symlink_to(path)
    timings = {}
    for engine in ("local", "ray"):
        for count, folder in ((small, first), (large, many)):
            out = tmp / ("local.npz" if engine == "local" else "ray")
            command = [sys.executable, "-m", "dino3.cli", "embed", str(folder), "-m", str(checkpoint), "-o", str(out)]
            command += ["-q", "--overwrite", "--batch-size", "16"]
            if engine == "ray":
                command += ["--engine", "ray", "--ray-shard-size", str(large)]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            total = time.perf_counter() - start
            startup = None
            if engine == "ray":
                line = next(line for line in done.stderr.splitlines() if "Ray start-up" in line)
                startup = float(line.rsplit("start-up ", 1)[1].split(" s")[0])
            timings[engine, count] = (total, startup)
    local, (ray_total, startup) = timings["local", small][0], timings["ray", small]
    extra = large - small
    local_rate = extra / (timings["local", large][0] - local)
    ray_rate = extra / (timings["ray", large][0] - ray_total)
    return "\n".join(
        [
            f"Ray Data on this machine (the same 2 cores, fresh processes, model loading included). {small} images: "
            f"local `dino3 embed` {small / local:.1f} images/s; `--engine ray` {small / ray_total:.1f} images/s "
            f"({local / ray_total:.2f}x), or {small / (ray_total - startup):.1f} images/s "
            f"({local / (ray_total - startup):.2f}x) without Ray's start-up of {startup:.1f} s. {large} images: local "
            f"{timings['local', large][0]:.1f} s, Ray {timings['ray', large][0]:.1f} s; the {extra} images beyond the "
            f"first {small} (every fixed cost apart: start-up, loading, the first batches): local {local_rate:.1f} "
            f"images/s, Ray {ray_rate:.1f} images/s ({ray_rate / local_rate:.2f}x).",
        ]
    )


if __name__ == "__main__":
    main()
