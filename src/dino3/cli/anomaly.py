"""`dino3 anomaly fit` and `dino3 anomaly score`: few-shot anomaly detection (dino3.anomaly).

dino3 anomaly fit good/ -m vits16 -o detector/
dino3 anomaly score new/ --detector detector/ --json scores.json -o maps/
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    EXIT_OK,
    add_model_arguments,
    plural,
    positive_float,
    positive_int,
    report_failures,
    use_threads,
)


def _images(items: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    from ..embed.inputs import expand_inputs
    from ..errors import UsageError

    found = expand_inputs(items)
    if not found.paths:
        raise UsageError(found.none_found())
    return found.paths, list(found.skipped)


def cmd_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..anomaly import fit
    from ..errors import UsageError

    use_threads(args)
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()):
        if not (output / "detector.json").exists():
            raise UsageError(f"{output} is not empty and holds no detector; give a new or empty folder")
        if not args.overwrite:
            raise UsageError(f"{output} holds a detector; pass --overwrite to replace it")
    paths, skipped = _images(args.images)
    if skipped:
        report_failures(skipped, "inputs were skipped")
    detector = fit(
        paths,
        args.model,
        resolution=args.resolution,
        rotate=not args.no_rotate,
        masking=args.masking,
        threshold=args.threshold if args.threshold is not None else "auto",
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    detector.save(output)
    threshold = "none (one good image: give --threshold)" if detector.threshold is None else f"{detector.threshold:.4f}"
    print(f"wrote {output}: {plural(len(paths), 'good image')}, threshold {threshold}", file=sys.stderr)
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from ..anomaly import load, write_scores
    from ..errors import ImageError

    use_threads(args)
    detector = load(args.detector)
    if args.threshold is not None:
        detector.set_threshold(args.threshold)
    paths, failures = _images(args.images)
    results = []
    chunk = max(1, args.batch_size)
    from .._progress import progress_bar

    bar = progress_bar(len(paths), "scoring", "img", not args.quiet)
    try:
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            try:
                results += detector.score(part, model=args.model, maps=args.maps)
            except ImageError:  # one bad image: score the others one by one, list the bad ones
                for path in part:
                    try:
                        results += detector.score([path], model=args.model, maps=args.maps)
                    except ImageError as e:
                        failures.append((path, str(e)))
            bar.update(len(part))
    finally:
        bar.close()
    if args.json:
        write_scores(results, args.json, detector.threshold)
    flagged = sum(1 for r in results if r.anomalous)
    for r in results:
        mark = "" if r.anomalous is None else ("  ANOMALOUS" if r.anomalous else "")
        print(f"{r.score:.4f}  {r.name}{mark}")
    where = f"; overlays in {args.maps}" if args.maps else ""
    print(f"scored {plural(len(results), 'image')}, {flagged} anomalous{where}", file=sys.stderr)
    return report_failures(failures, "images could not be scored")


def add_commands(commands: Any) -> None:
    anomaly = commands.add_parser(
        "anomaly",
        help="few-shot anomaly detection: fit on good images, score new ones (AnomalyDINO)",
        description="Fit a detector on a few good images (their patch features are its memory), then score "
        "new images: each patch by its distance to the nearest good patch, the image by the mean of its top 1%%. "
        "A threshold is chosen from the good images (leave-one-out) unless you give one.",
        epilog="examples:\n  dino3 anomaly fit good/ -m vits16 -o detector/\n"
        "  dino3 anomaly score new/ --detector detector/ --json scores.json -o maps/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steps = anomaly.add_subparsers(dest="step", required=True, metavar="STEP")
    fit = steps.add_parser("fit", help="fit a detector on good images")
    fit.add_argument("images", nargs="+", metavar="GOOD", help="good images: files, folders, globs, list files")
    add_model_arguments(fit)
    fit.add_argument("-o", "--output", required=True, help="the detector's folder (safetensors + JSON)")
    fit.add_argument("--resolution", type=positive_int, default=448, help="shorter side in pixels (default: 448)")
    fit.add_argument("--no-rotate", action="store_true", help="no rotated copies of the good images in the memory")
    fit.add_argument("--masking", action="store_true", help="mask the background (objects on a plain background)")
    fit.add_argument(
        "--threshold", type=positive_float, help="flag images scoring above this (default: from the good images)"
    )
    fit.add_argument("--dtype", choices=("float32", "bfloat16"), help="model dtype (default: float32)")
    fit.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    fit.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    fit.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    fit.add_argument("--overwrite", action="store_true", help="replace a detector in the output folder")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(run=cmd_fit)

    score = steps.add_parser("score", help="score images with a detector")
    score.add_argument("images", nargs="+", metavar="IMAGE", help="files, folders, globs, list files")
    score.add_argument("--detector", required=True, help="a folder written by `dino3 anomaly fit`")
    score.add_argument("-m", "--model", help="where the detector's model lies now, if it moved (checked)")
    score.add_argument("--json", help='write {"images": [{"path", "score", "anomalous"}], "threshold"} here')
    score.add_argument("-o", "--maps", help="write a heat-map overlay per image into this folder")
    score.add_argument("--threshold", type=positive_float, help="flag images scoring above this instead")
    score.add_argument("--batch-size", type=positive_int, default=8, help="images scored together (default: 8)")
    score.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(run=cmd_score)
