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
from typing import Any

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


def cmd_info(args: argparse.Namespace) -> int:
    from .models.pretrained import inspect_checkpoint, parameter_shapes
    from .presets import all_presets, find_preset
    from .weights.formats import LAYOUT_NAMES
    from .weights.hub import HubOptions, resolve, weights_summary

    if args.model is None:
        print("known models (dino3 info NAME for one):")
        for p in all_presets():
            print(f"  {p.name:18} {p.architecture:9} {p.params:>6}  {p.dataset:10} {p.hub_id}")
        return EXIT_OK
    preset = find_preset(args.model)
    found = None
    try:
        found = inspect_checkpoint(args.model, check_hash=False, hub=HubOptions()) if _is_file(args.model) else None
        # a local folder's weight files are looked at (headers only); a hub repo's are not downloaded
        checkpoint = found.checkpoint if found else resolve(args.model, need_weights=_exists(args.model))
        config = found.config if found else checkpoint.config
        preset = preset or checkpoint.preset or (found.preset if found else None)
        if found is not None:  # a single file: what inspecting it found
            where = f"{LAYOUT_NAMES[found.layout]} layout, 1 file, {found.stored_dtype}"
        else:
            summary = weights_summary(checkpoint)
            where = f"{LAYOUT_NAMES['hf']} layout, {_plural(summary.files, 'file')}, {summary.dtype}"
    except Exception as e:  # noqa: BLE001  (a preset is described without its weights)
        if preset is None:
            raise
        config = preset.make_config()
        where = f"not available here ({str(e).splitlines()[0]})"
    count = sum(_numel(s) for s in parameter_shapes(config).values())
    kind = "ViT" if config.model_type == "dinov3_vit" else "ConvNeXt"
    lines = [f"{args.model}  ({preset.hub_id if preset else args.model})"]
    lines.append(f"  architecture   DINOv3 {kind}, {count / 1e6:.1f}M parameters")
    lines += [f"  {line}" for line in config.describe()]
    if found is not None and found.config_from == "tensors":
        lines.append("  (architecture inferred from the tensors: no preset has these shapes; config= overrides)")
    if preset is not None:
        lines.append(f"  trained on     {preset.dataset}")
        lines.append(f"  normalisation  mean {list(preset.image_mean)}, std {list(preset.image_std)}")
        lines.append(f"  licence        {preset.license}")
    lines.append(f"  weights        {where}")
    print("\n".join(lines))
    return EXIT_OK


def _is_file(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().is_file()


def _exists(name: str) -> bool:
    from pathlib import Path

    return Path(name).expanduser().exists()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_export(args: argparse.Namespace) -> int:
    from .api import export_onnx

    path = export_onnx(args.model, args.output, opset=args.opset, check_hash=not args.no_hash_check)
    print(
        f"wrote {path} (dynamic batch, height and width; outputs last_hidden_state, pooler_output), "
        f"with {path.stem}.preprocessor_config.json and {path.stem}.dino3.json beside it"
    )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert
    from .weights.formats import LAYOUT_NAMES

    kwargs: dict[str, Any] = {"check_hash": not args.no_hash_check}
    if args.config:
        kwargs["config"] = args.config
    layout = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, **kwargs)
    print(f"wrote {args.dst} in the {LAYOUT_NAMES[layout]} layout")
    return EXIT_OK


def cmd_init_random(args: argparse.Namespace) -> int:
    import torch

    from .models import model_class_for
    from .presets import get_preset
    from .processing import DINOv3ViTImageProcessor

    preset = get_preset(args.model)
    config = preset.make_config()
    torch.manual_seed(args.seed)
    model = model_class_for(config)(config)
    model.save_pretrained(args.folder)
    DINOv3ViTImageProcessor.for_preset(preset).save_pretrained(args.folder)
    print(f"wrote {args.folder}: {preset.name}'s architecture with RANDOM weights (for trials, not for features)")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .arguments import add_model_arguments, add_runtime_arguments, add_video_arguments, natural, positive_int
    from .dense.commands import add_commands
    from .embed.writers import OUTPUT_SUFFIXES
    from .features import POOLS
    from .processing import FITS, KEEP_ASPECT, MAX_SIDE

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
    embed.add_argument("--size", type=positive_int, default=224, help="square resize, as Transformers (default: 224)")
    embed.add_argument("--keep-aspect", choices=KEEP_ASPECT, help="keep the aspect ratio: scale this side to --target")
    embed.add_argument("--target", type=positive_int, help="with --keep-aspect: that side's size in pixels")
    embed.add_argument("--fit", choices=FITS, help="with --keep-aspect: how sides reach a multiple of the patch (crop)")
    embed.add_argument(
        "--max-side", type=positive_int, help=f"refuse images resized beyond this side (default {MAX_SIDE})"
    )
    embed.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)")
    add_runtime_arguments(embed)
    embed.add_argument("--workers", type=natural, default=2, help="threads decoding images ahead (default: 2; 0: none)")
    embed.add_argument("--threads", type=positive_int, help="torch threads for the model (default: torch's choice)")
    embed.add_argument("--jpeg-draft", action="store_true", help="decode large JPEGs at reduced scale: faster")
    embed.add_argument("--resume", action="store_true", help="continue an interrupted run from where it stopped")
    embed.add_argument("--overwrite", action="store_true", help="replace the output (and any interrupted run)")
    embed.add_argument("--checkpoint-every", type=positive_int, default=256, help="save progress every N images")
    embed.add_argument("--shard", metavar="K/N", help="embed only part K of N of the inputs (0-based; SLURM arrays)")
    embed.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default), or Ray Data")
    embed.add_argument("--ray-address", help="with --engine ray: the cluster (default: a local Ray)")
    embed.add_argument("--concurrency", type=positive_int, help="with --engine ray: model actors (default: 1)")
    embed.add_argument("--ray-shard-size", type=positive_int, default=1024, help="with --engine ray: images per shard")
    add_video_arguments(embed)
    embed.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=cmd_embed)

    info = commands.add_parser("info", help="describe a model (architecture, size, weights) without loading it")
    info.add_argument("model", nargs="?", help="preset name, hub id, checkpoint folder or weights file; none: list")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch and size, no control flow)",
        description="Export a model to ONNX for ONNX Runtime, OpenVINO, TensorRT and others: dynamic batch, "
        "height and width, no If/Loop nodes, outputs last_hidden_state and pooler_output. NAME.preprocessor_"
        "config.json and NAME.dino3.json are written beside NAME.onnx.",
    )
    export.add_argument("model", help="preset name, hub id, checkpoint folder or weights file")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=20, help="ONNX opset (default: 20; 17 and up work)")
    export.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")
    export.set_defaults(run=cmd_export)

    conv = commands.add_parser(
        "convert",
        help="convert a checkpoint between the Hugging Face, Meta and timm layouts",
        description="Read a checkpoint in any layout (a preset, hub id, folder or weights file), check it "
        "strictly, and write it in another layout: a Hugging Face folder, a Meta .pth or a timm file.",
        epilog="examples:\n  dino3 convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth vits16-hf/\n"
        "  dino3 convert vits16-hf/ vits16-timm.safetensors --to timm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src", help="preset name, hub id, checkpoint folder or weights file (.pth, .safetensors)")
    conv.add_argument("dst", help="a folder (Hugging Face) or a file (.pth: Meta, .safetensors: timm)")
    conv.add_argument("--to", choices=_layouts(), help="target layout (default: from DST's suffix)")
    conv.add_argument("--config", help="for a bare weights file: a preset name or config.json")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")
    conv.set_defaults(run=cmd_convert)

    init = commands.add_parser("init-random", help="write a preset's architecture with random weights (trials)")
    init.add_argument("model", help="preset name, e.g. vits16")
    init.add_argument("folder", help="where to write config.json, model.safetensors, preprocessor_config.json")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=cmd_init_random)

    from .serve.commands import add_commands as serve_commands

    serve_commands(commands)

    from .probe.commands import add_commands as add_probe_commands  # probe train, probe eval, classify

    add_probe_commands(commands)

    add_commands(commands)  # pca, foreground, match: dino3.dense.commands

    from .index.commands import add_commands as add_index_commands

    add_index_commands(commands)
    return parser


def _layouts() -> tuple[str, ...]:
    from .weights.formats import LAYOUTS

    return LAYOUTS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import Dino3Error, UsageError

    try:
        return args.run(args)
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"dino3: error: {e}\n")
    except KeyboardInterrupt:
        print("\ndino3: interrupted; work saved so far is kept (`--resume` continues an embed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Dino3Error, OSError, ValueError) as e:
        print(f"dino3: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
