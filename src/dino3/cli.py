"""The `dino3` command: the parser and thin commands over the library; every choice comes from the
module that owns it.

    dino3 embed photos/ -m vits16 -o features.npz          # CLS embeddings of every image in photos/
    dino3 info vitl16-sat493m                              # what a model is, without its weights
    dino3 convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth vits16-hf/   # Meta -> Hugging Face
    dino3 export vits16 -o vits16.onnx                     # ONNX with dynamic batch and size
    dino3 init-random vits16 checkpoints/vits16-random     # offline trials, random weights

Exit status: 0 when everything was done, 3 when some images could not be embedded (they are listed),
1 for an error that stopped the run, 2 for a mistake in the command, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- commands ---------------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from ._io import escape_field
    from .arguments import video_sampling
    from .embed import run

    if args.threads:
        torch.set_num_threads(args.threads)  # the command owns its process; the library never does this
    if args.engine == "ray":
        return _embed_on_ray(args)
    result = run(
        args.inputs,
        model=args.model,
        output=args.output,
        pool=args.pool,
        layers=args.layers,
        size=args.size,
        keep_aspect=args.keep_aspect,
        target=args.target,
        fit=args.fit,
        max_side=args.max_side,
        jpeg_draft=args.jpeg_draft,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        backend=args.backend,
        precision=args.precision,
        calibration=[args.calibration] if args.calibration else None,
        batch_size=args.batch_size,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        check_hash=not args.no_hash_check,
        progress=not args.quiet,
        shard=args.shard,
        video=video_sampling(args),
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    rate = f", {result.computed / result.seconds:.1f} images/s" if result.computed and result.seconds > 0 else ""
    print(f"wrote {result.output}: {_plural(result.count, 'image')}{rate}", file=sys.stderr)
    if result.ignored:
        print(
            f"ignored {_plural(result.ignored, 'file')} without an image suffix in the folders given", file=sys.stderr
        )
    if result.failures:
        count = len(result.failures)
        print(
            f"{_plural(count, 'image')} could not be embedded (also in {result.output.name}.failures.tsv):",
            file=sys.stderr,
        )
        for path, reason in result.failures[:20]:
            path, reason = escape_field(path), escape_field(reason)  # a name may hold a newline or non-UTF-8 bytes
            print(f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}", file=sys.stderr)
        if count > 20:
            print(f"  ... and {count - 20} more", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _embed_on_ray(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .features import parse_layers
    from .integrations.ray import run

    if args.shard or args.device or args.quantize or args.calibration or args.every or args.fps:
        raise UsageError("--shard, --device, --quantize, --calibration, --every and --fps are for the local engine")
    result = run(
        args.inputs,
        args.model,
        args.output,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
        shard_size=args.ray_shard_size,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        pool=args.pool,
        layers=parse_layers(args.layers),
        size=args.size,
        keep_aspect=args.keep_aspect,
        target=args.target,
        fit=args.fit,
        dtype=args.dtype,
        backend=args.backend,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
        check_hash=not args.no_hash_check,
    )
    print(
        f"wrote {result.output}: {_plural(result.count, 'image')} in {result.seconds:.1f} s "
        f"(Ray start-up {result.startup_seconds:.1f} s)",
        file=sys.stderr,
    )
    if result.failures:
        print(
            f"{_plural(len(result.failures), 'image')} failed (listed in {result.output}/failures.parquet)",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .arguments import (
        add_batch_arguments,
        add_model_arguments,
        add_processing_arguments,
        add_runtime_arguments,
        add_video_arguments,
        positive_int,
    )
    from .dense.commands import add_commands
    from .embed.writers import OUTPUT_SUFFIXES
    from .features import POOLS
    from .model_commands import add_commands as add_model_commands

    parser = argparse.ArgumentParser(
        prog="dino3",
        description="DINOv3 features from the command line. Run `dino3 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dino3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="embed images (files, folders, globs, list files) into one output file",
        description="Embed images with a DINOv3 model and write the features, with the image paths in order, to "
        f"one file ({', '.join(OUTPUT_SUFFIXES)}). Images that cannot be read are listed and skipped. An "
        "interrupted run can be resumed with --resume. Videos give their frames (--every N, --fps F), named "
        "clip.mp4#t=12.480.",
        epilog="examples:\n  dino3 embed photos/ -m vits16 -o features.npz\n"
        "  dino3 embed list.txt -m vitl16 --pool cls+mean --batch-size 32 -o features.safetensors\n"
        "  dino3 embed scans/ -m vits16 --pool patches --keep-aspect shorter --target 448 -o dense.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image and video files, folders, globs, list files (.txt), URLs"
    )
    add_model_arguments(embed)
    embed.add_argument(
        "-o", "--output", required=True, help=f"output file: {', '.join(OUTPUT_SUFFIXES)} (--engine ray: a folder)"
    )
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

    add_model_commands(commands)  # info, export, convert, init-random: dino3.model_commands

    from .serve.commands import add_commands as serve_commands

    serve_commands(commands)

    from .probe.commands import add_commands as add_probe_commands  # probe train, probe eval, classify

    add_probe_commands(commands)

    add_commands(commands)  # pca, foreground, match: dino3.dense.commands

    from .index.commands import add_commands as add_index_commands

    add_index_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import Dino3Error, UsageError

    try:
        status = args.run(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is answered below
        return status
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"dino3: error: {e}\n")
    except BrokenPipeError:  # the reader went away (`dino3 ... | head`): nothing more to say to it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit stays quiet
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ndino3: interrupted; work saved so far is kept (`--resume` continues an embed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Dino3Error, OSError, ValueError) as e:
        print(f"dino3: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
