"""`dino3 embed`: images -> one embeddings output, on this machine or on Ray Data (dino3.embed.run)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    EXIT_OK,
    add_batch_arguments,
    add_model_arguments,
    add_processing_arguments,
    add_runtime_arguments,
    add_video_arguments,
    plural,
    positive_int,
    recipe_from_args,
    report_failures,
    use_threads,
    video_sampling,
)


def cmd_embed(args: argparse.Namespace) -> int:
    from ..embed import RayOptions, run

    use_threads(args)
    recipe = recipe_from_args(args)
    ray = None
    if args.engine == "ray":
        if args.shard or args.device or args.every or args.fps:
            from ..errors import UsageError

            raise UsageError("--shard, --device, --every and --fps are for the local engine (Ray places the work)")
        ray = RayOptions(args.ray_address, args.concurrency, args.ray_shard_size, args.threads)
    elif args.ray_address or args.concurrency:
        from ..errors import UsageError

        raise UsageError("--ray-address and --concurrency are for --engine ray")
    result = run(
        args.inputs,
        output=args.output,
        recipe=recipe,
        engine=args.engine,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        check_hash=not args.no_hash_check,
        progress=not args.quiet,
        shard=args.shard,
        video=video_sampling(args) if args.engine == "local" else None,
        ray=ray,
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    rate = f", {result.computed / result.seconds:.1f} images/s" if result.computed and result.seconds > 0 else ""
    startup = f" (Ray start-up {result.startup_seconds:.1f} s)" if args.engine == "ray" else ""
    print(f"wrote {result.output}: {plural(result.count, 'image')}{rate}{startup}", file=sys.stderr)
    if result.ignored:
        print(f"ignored {plural(result.ignored, 'file')} without an image suffix in the folders given", file=sys.stderr)
    listed = f"{result.output.name}.failures.tsv"
    return report_failures(result.failures, f"images could not be embedded (also in {listed})") or EXIT_OK


def add_commands(commands: Any) -> None:
    from ..features import POOLS

    outputs = ".npz, .npy, .safetensors, .parquet"  # dino3.embed.OUTPUT_SUFFIXES (not imported: no torch here)
    embed = commands.add_parser(
        "embed",
        help="embed images (files, folders, globs, list files, tables) into one output",
        description="Embed images with a DINOv3 model and write the features, with the image paths in order, to "
        f"one file ({outputs}) or, with --engine ray, a folder that is a Parquet dataset. Images that "
        "cannot be read are listed and skipped. An interrupted run can be resumed with --resume. Videos give "
        "their frames (--every N, --fps F), named clip.mp4#t=12.480.",
        epilog="examples:\n  dino3 embed photos/ -m vits16 -o features.npz\n"
        "  dino3 embed list.txt -m vitl16 --pool cls+mean --batch-size 32 -o features.safetensors\n"
        "  dino3 embed scans/ -m vits16 --pool patches --keep-aspect shorter --target 448 -o dense.npz\n"
        "  dino3 embed s3://bucket/photos/ -m vitb16 --engine ray -o features/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image and video files, folders, globs, list files (.txt), tables (.parquet/.csv with a path column), "
        "URLs, object storage (s3://...)",
    )
    add_model_arguments(embed)
    embed.add_argument("-o", "--output", required=True, help=f"output file: {outputs} (--engine ray: a folder)")
    embed.add_argument(
        "--pool",
        choices=POOLS,
        default="cls",
        help="cls token, mean of patch tokens, both (Meta's linear-probe input), or the patch grids (default: cls)",
    )
    embed.add_argument(
        "--layers",
        help="intermediate blocks (ConvNeXt: stages) instead of the output: a count of last ones (4) "
        "or 0-based indices (2,5,8,11; one index: 7,); adds a layer axis",
    )
    add_processing_arguments(embed)  # --size, --keep-aspect, --target, --fit, --max-side, --jpeg-draft
    add_runtime_arguments(embed)
    add_batch_arguments(embed)  # --batch-size, --workers, --threads, -q
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run from where it stopped")
    embed.add_argument("--overwrite", action="store_true", help="replace the output (and any interrupted run)")
    embed.add_argument("--checkpoint-every", type=positive_int, default=256, help="save progress every N images")
    embed.add_argument("--shard", metavar="K/N", help="embed only part K of N of the inputs (0-based; SLURM arrays)")
    embed.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default), or Ray Data")
    embed.add_argument("--ray-address", help="with --engine ray: the cluster (default: a local Ray)")
    embed.add_argument("--concurrency", type=positive_int, help="with --engine ray: model actors (default: 1)")
    embed.add_argument("--ray-shard-size", type=positive_int, default=1024, help="with --engine ray: images per shard")
    add_video_arguments(embed)
    embed.set_defaults(run=cmd_embed)
