"""The plumbing every command shares, written once: exit codes, the failure report, threads,
argument types, and the recipe options (model, runtime, preprocessing) with the one function that
turns them into a dino3.recipe.Recipe. Each command module (embed, dense, index, probe, serve, ...)
uses them, so that one option reads and checks the same everywhere; the choices come from the library
modules that own them. Nothing heavy is imported at parse time (`dino3 --version` stays instant).

Exit status: 0 when everything was done, 3 when some inputs could not be used (they are listed), 1 for
an error that stopped the run, 2 for a mistake in the command, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def report_failures(failures: list[tuple[str, str]], what: str, shown: int = 20) -> int:
    """Print the inputs that could not be used (`what` says what befell them: "images could not be
    embedded"), the first `shown` of them; the exit status: EXIT_SOME_FAILED if any, else EXIT_OK."""
    from .._io import escape_field

    if not failures:
        return EXIT_OK
    print(f"{len(failures)} {what}:", file=sys.stderr)
    for path, reason in failures[:shown]:
        path, reason = escape_field(path), escape_field(reason)  # a name may hold a newline or non-UTF-8 bytes
        print(f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}", file=sys.stderr)
    if len(failures) > shown:
        print(f"  ... and {len(failures) - shown} more", file=sys.stderr)
    return EXIT_SOME_FAILED


def use_threads(args: argparse.Namespace) -> None:
    """--threads: the command owns its process, so it may set torch's threads (the library never does)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def recipe_from_args(args: argparse.Namespace, **fixed: Any):
    """The dino3.recipe.Recipe that a command's recipe options ask for (`fixed`: what the command
    decides itself, e.g. pool="patches"); a bad combination is a UsageError, the same one everywhere."""
    from ..embed.inputs import expand_inputs
    from ..features import parse_layers
    from ..recipe import Recipe

    options = {
        "pool": getattr(args, "pool", None),
        "layers": parse_layers(getattr(args, "layers", None)),
        "size": getattr(args, "size", None),
        "keep_aspect": getattr(args, "keep_aspect", None),
        "target": getattr(args, "target", None),
        "fit": getattr(args, "fit", None),
        "max_side": getattr(args, "max_side", None),
        "jpeg_draft": getattr(args, "jpeg_draft", None),
        "dtype": getattr(args, "dtype", None),
        "quantize": getattr(args, "quantize", None),
        "backend": getattr(args, "backend", None),
        "precision": getattr(args, "precision", None),
    }
    options = {k: v for k, v in options.items() if v is not None}
    recipe = Recipe(args.model, **{**options, **fixed})
    calibration = getattr(args, "calibration", None)
    if calibration:  # checked with the backend first (a folder given where it does not apply), then listed
        Recipe(args.model, **{**options, **fixed, "calibration": (calibration,)})
        recipe = Recipe(args.model, **{**options, **fixed, "calibration": expand_inputs([calibration]).paths})
    return recipe


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """-m/--model and --no-hash-check."""
    parser.add_argument("-m", "--model", required=required, help="preset name (`dino3 info`), hub id, folder or file")
    parser.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: --device, --dtype, --quantize, --backend, --precision, --calibration."""
    from ..models.pretrained import DTYPE_NAMES
    from ..quantization import MODES
    from ..runtime.model import BACKENDS, PRECISIONS

    precisions = sorted({p for values in PRECISIONS.values() for p in values})
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default: float32); float16 breaks DINOv3")
    parser.add_argument("--quantize", choices=MODES, help="quantize the linear layers (see the README)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="inference engine (default: torch)")
    parser.add_argument("--precision", choices=precisions, help="with --backend onnxruntime/openvino (default: f32)")
    parser.add_argument("--calibration", help="with --backend openvino --precision int8: a folder of images")


def add_processing_arguments(parser: argparse.ArgumentParser) -> None:
    """How images become pixels: --size, --keep-aspect, --target, --fit, --max-side, --jpeg-draft."""
    from ..processing import FITS, KEEP_ASPECT, MAX_SIDE

    parser.add_argument("--size", type=positive_int, default=224, help="square resize, as Transformers (default: 224)")
    parser.add_argument("--keep-aspect", choices=KEEP_ASPECT, help="keep the aspect ratio: scale this side to --target")
    parser.add_argument("--target", type=positive_int, help="with --keep-aspect: that side's size in pixels")
    parser.add_argument(
        "--fit", choices=FITS, help="with --keep-aspect: how sides reach a multiple of the patch (crop)"
    )
    parser.add_argument(
        "--max-side", type=positive_int, help=f"refuse images resized beyond this side (default {MAX_SIDE})"
    )
    parser.add_argument("--jpeg-draft", action="store_true", help="decode large JPEGs at reduced scale: faster")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """How a job runs through many images: --batch-size, --workers, --threads, -q."""
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--workers", type=natural, default=2, help="threads decoding images ahead (default: 2; 0: none)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch threads for the model (default: torch's choice)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """--every N / --fps F: which frames of the video inputs to take (default: every frame)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--every", type=positive_int, metavar="N", help="videos: take every Nth frame (default: 1)")
    group.add_argument("--fps", type=positive_float, metavar="F", help="videos: take F frames per second")


def video_sampling(args: argparse.Namespace):
    """The dino3.video.Sampling that --every / --fps ask for."""
    from ..video import Sampling

    return Sampling(every=args.every, fps=args.fps)
