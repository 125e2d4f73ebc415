"""The `dino3` command: the parser and thin commands over the library, one module per room; the
plumbing they share (exit codes, the failure report, threads, recipe options) is in common.py.

    dino3 embed photos/ -m vits16 -o features.npz          # CLS embeddings of every image in photos/
    dino3 info vitl16-sat493m                              # what a model is, without its weights
    dino3 info --system                                    # what this machine can do (for bug reports)
    dino3 convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth vits16-hf/   # Meta -> Hugging Face
    dino3 export vits16 -o vits16.onnx                     # ONNX with dynamic batch and size
    dino3 init-random vits16 checkpoints/vits16-random     # offline trials, random weights

Exit status: 0 when everything was done, 3 when some inputs could not be used (they are listed),
1 for an error that stopped the run, 2 for a mistake in the command, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE

# The command modules, in the order of `dino3 --help`; each has add_commands(subparsers).
ROOMS = ("embed", "models", "serve", "probe", "dense", "index", "anomaly", "text")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="dino3",
        description="DINOv3 features from the command line. Run `dino3 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dino3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for room in ROOMS:
        importlib.import_module(f"{__name__}.{room}").add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments in (["--version"], ["-V"]):  # at once: the commands' options import torch for their choices
        from .._version import __version__

        print(f"dino3 {__version__}")
        raise SystemExit(0)  # as argparse's own --version action
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import Dino3Error, UsageError

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
