"""The dense commands, thin over dino3.dense: `dino3 pca`, `dino3 foreground` (train, apply) and
`dino3 match`. `add_commands` adds them to the `dino3` parser.

    dino3 pca photos/ -m vits16 -o pca/                       # one PNG per image: input | PCA colours
    dino3 pca clip.mp4 -m vits16 -o clip-pca.mp4 --fps 5      # the side-by-side video
    dino3 foreground train photos/ --masks masks/ -m vits16 -o fg.safetensors
    dino3 foreground photos/ -m vits16 --classifier fg.safetensors -o masks-out/
    dino3 match a.jpg b.jpg -m vits16 -o match.png --json matches.json --mutual --sparse 32

An input that cannot be read (an image, a mask, a video frame) is named and skipped; the others go on
and the exit status is then 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError, VideoError
from .common import (
    EXIT_OK,
    add_model_arguments,
    add_runtime_arguments,
    add_video_arguments,
    positive_int,
    recipe_from_args,
    report_failures,
    use_threads,
    video_sampling,
)

OVERLAYS = "overlays"  # dino3 foreground: the subfolder of each mask over its image


def add_commands(subparsers: Any) -> None:
    """Add `pca`, `foreground` and `match` to the `dino3` command's subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    pca = subparsers.add_parser(
        "pca",
        help="PCA pictures of the patch features (Meta's recipe): one PNG per image, or a video",
        description=_wrap(
            "Meta's PCA picture: each image resized to --height (aspect kept), the last layer's patch "
            "features, 3 whitened principal components (fitted on the foreground patches) coloured by sigmoid(2x), "
            "the background black; the picture shows the input and its colours side by side. A video input "
            "gives one PNG per sampled frame, or with -o clip.mp4 the side-by-side video (one PCA for all frames)."
        ),
        epilog="examples:\n  dino3 pca photos/ -m vits16 -o pca/\n  dino3 pca cats/*.jpg -m vitb16 -o pca/ --joint "
        "--foreground auto\n  dino3 pca clip.mp4 -m vits16 -o clip-pca.mp4 --fps 5",
        formatter_class=raw,
    )
    pca.add_argument("inputs", nargs="+", metavar="INPUT", help="images, videos, folders, globs, list files")
    add_model_arguments(pca)
    pca.add_argument("-o", "--output", required=True, help="a folder (one PNG per input), or a video file")
    pca.add_argument("--joint", action="store_true", help="one PCA over all inputs: a colour means the same in each")
    pca.add_argument(
        "--foreground",
        default="none",
        metavar="FILE|auto|none",
        help="fit on the foreground and black out the rest: a classifier (dino3 foreground train), auto (DINOv2's "
        "unsupervised first-component recipe) or none (default: every patch)",
    )
    _add_dense_arguments(pca)
    add_video_arguments(pca)
    pca.set_defaults(run=cmd_pca)

    fg = subparsers.add_parser(
        "foreground",
        help="foreground masks: train a patch classifier from masks, or apply one",
        description=_wrap(
            "`dino3 foreground train IMAGES --masks DIR -o fg.safetensors` fits Meta's patch-level logistic "
            "regression (C chosen by leave-one-image-out average precision) on images and their masks (DIR/NAME.png, "
            "same name and size as the image; white or opaque = foreground). `dino3 foreground IMAGES --classifier "
            "fg.safetensors -o DIR` writes one mask PNG per image (median-filtered 3x3, threshold 0.5); "
            "--classifier auto uses DINOv2's unsupervised recipe instead."
        ),
        epilog="examples:\n  dino3 foreground train photos/ --masks masks/ -m vits16 -o fg.safetensors\n"
        "  dino3 foreground new/ -m vits16 --classifier fg.safetensors -o new-masks/",
        formatter_class=raw,
    )
    fg.add_argument("inputs", nargs="+", metavar="INPUT", help="`train` then images; or images (and videos) to mask")
    add_model_arguments(fg)
    fg.add_argument("-o", "--output", required=True, help="train: the classifier file (.safetensors); else a folder")
    fg.add_argument("--masks", help="train: the folder of masks, one per image with the image's name")
    fg.add_argument("--classifier", help="apply: a classifier file, or auto (unsupervised)")
    fg.add_argument("--C", type=float, dest="C", help="train: this C instead of the leave-one-image-out choice")
    _add_dense_arguments(fg, height_default=None)
    add_video_arguments(fg)
    fg.set_defaults(run=cmd_foreground)

    match = subparsers.add_parser(
        "match",
        help="match the patches of two images; a picture with lines, and JSON",
        description=_wrap(
            "Each patch of A is matched to the most similar patch of B (cosine of the L2-normalised "
            "last-layer features). The picture shows both images with a line per match; --json writes "
            '{"matches": [{"a": [x, y], "b": [x, y], "score": s}, ...]} with patch centres in each original image\'s '
            "pixels."
        ),
        epilog="example:\n  dino3 match a.jpg b.jpg -m vits16 -o match.png --json matches.json --mutual --sparse 32",
        formatter_class=raw,
    )
    match.add_argument("a", help="image A")
    match.add_argument("b", help="image B")
    add_model_arguments(match)
    match.add_argument("-o", "--output", required=True, help="the picture (.png)")
    match.add_argument("--json", help="also write the matches to this JSON file")
    match.add_argument("--mutual", action="store_true", help="keep mutual nearest neighbours only")
    match.add_argument("--min-score", type=_cosine, help="keep matches with at least this cosine (-1 to 1)")
    match.add_argument("--sparse", type=float, metavar="PX", help="keep matches at least PX pixels apart (best first)")
    match.add_argument("--foreground", default="none", metavar="FILE|auto|none", help="match foreground patches only")
    _add_dense_arguments(match)
    match.set_defaults(run=cmd_match)


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100)


def _add_dense_arguments(parser: argparse.ArgumentParser, height_default: int | None = 768) -> None:
    default = f"default: {height_default}" if height_default else "default: the classifier's, else 768"
    parser.add_argument(
        "--height", type=positive_int, default=height_default, help=f"resize to this height ({default})"
    )
    parser.add_argument("--tiles", action="store_true", help="run 512 px windows (stride 336) and average them")
    add_runtime_arguments(parser)
    parser.add_argument("--threads", type=positive_int, help="torch threads for the model (default: torch's choice)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# -- pca -------------------------------------------------------------------------------------------------------
def cmd_pca(args: argparse.Namespace) -> int:
    from ..dense.pca import fit_foreground_pca
    from ..dense.render import pca_picture, save_png
    from ..video import VIDEO_SUFFIXES, is_video

    sampling = video_sampling(args)
    output = Path(args.output)
    entries, failures = _inputs(args.inputs)
    entries = _outside(entries, output)
    to_video = output.suffix.lower() in VIDEO_SUFFIXES
    if not to_video:
        _check_folder_output(output)
    if to_video and (len(entries) != 1 or not is_video(entries[0])):
        raise UsageError(f"-o {output}: a video is written from one video input; for images give a folder")
    model = _load_model(args)
    foreground = _foreground(args.foreground, model)
    if to_video:
        return _pca_video(args, model, foreground, entries[0], output, sampling, failures)
    output.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    written = 0
    kept: list[tuple[str, Any, Any]] = []  # --joint: (name, dense image, mask) until the PCA is fitted
    with _bar(entries, "PCA", args) as bar:
        for name, image in _images(entries, sampling, failures, bar):
            dense, mask = _dense(model, image, name, args, foreground, failures)
            if dense is None:
                continue
            if args.joint:
                kept.append((name, dense, mask))
                continue
            pca, note = fit_foreground_pca([dense.features], [mask])
            _note(name, note)
            rgb = pca.rgb(dense.features, mask)
            save_png(pca_picture(dense.image, rgb, tuple(dense.pixels.shape[-2:])), output / _png_name(name, names))
            written += 1
    if kept:
        pca, note = fit_foreground_pca([d.features for _, d, _ in kept], [m for _, _, m in kept])
        _note("the inputs", note)
        for name, dense, mask in kept:
            rgb = pca.rgb(dense.features, mask)
            save_png(pca_picture(dense.image, rgb, tuple(dense.pixels.shape[-2:])), output / _png_name(name, names))
            written += 1
    print(f"wrote {written} PCA picture{'s' if written != 1 else ''} to {output}", file=sys.stderr)
    return _report(failures)


def _pca_video(args, model, foreground, path: str, output: Path, sampling, failures) -> int:
    from ..dense.pca_video import write_pca_video

    try:
        result = write_pca_video(
            model, path, output, sampling=sampling, height=args.height, tiles=_tiling(args), foreground=foreground,
            progress=not args.quiet,
        )  # fmt: skip
    except VideoError as e:
        failures.append((path, str(e)))
        return _report(failures)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {output}: {result.frames} frames at {float(result.rate):.3g} frames/s", file=sys.stderr)
    return _report(failures + result.failures)


# -- foreground ---------------------------------------------------------------------------------------------------
def cmd_foreground(args: argparse.Namespace) -> int:
    if args.inputs[0] == "train":
        if len(args.inputs) < 2:
            raise UsageError("foreground train: give the training images, then --masks DIR")
        return _foreground_train(args, args.inputs[1:])
    if args.masks is not None or args.C is not None:
        raise UsageError("--masks and --C are for `dino3 foreground train IMAGES --masks DIR ...`")
    if not args.classifier:
        raise UsageError("give --classifier FILE (made by `dino3 foreground train`) or --classifier auto")
    from ..dense.foreground import ForegroundClassifier, foreground_mask
    from ..dense.render import mask_overlay, mask_picture, save_png

    classifier = None if args.classifier == "auto" else ForegroundClassifier.load(args.classifier)
    if args.height is None:
        args.height = (classifier.processing.get("height") if classifier else None) or 768
    entries, failures = _inputs(args.inputs)
    model = _load_model(args)
    if classifier is None:
        print(
            "note: --classifier auto is DINOv2's unsupervised recipe (first principal component); "
            "train a classifier on a few masks for real masks",
            file=sys.stderr,
        )
    else:
        classifier.check_model(model, args.classifier)
        if classifier.quality is not None and classifier.quality.weak:
            print(f"warning: {args.classifier} is weak: {'; '.join(classifier.quality.problems)}", file=sys.stderr)
    output = Path(args.output)
    _check_folder_output(output)
    entries = _outside(entries, output)
    overlays = output / OVERLAYS
    overlays.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    written = empty = 0
    with _bar(entries, "masks", args) as bar:
        for name, image in _images(entries, video_sampling(args), failures, bar):
            dense, _ = _dense(model, image, name, args, None, failures)
            if dense is None:
                continue
            mask = foreground_mask(dense.features, classifier or "auto")
            file = _png_name(name, names)
            save_png(mask_picture(mask, tuple(image.shape[-2:])), output / file)
            save_png(mask_overlay(image, mask), overlays / file)
            written += 1
            empty += not bool(mask.any())
    print(
        f"wrote {written} mask{'s' if written != 1 else ''} to {output}, and each over its image to {overlays}",
        file=sys.stderr,
    )
    if empty:
        print(
            f"warning: {empty} of {written} masks are empty (no foreground found): look at the overlays; a "
            "classifier trained on more masked images of this kind finds more",
            file=sys.stderr,
        )
    return _report(failures)


def _foreground_train(args: argparse.Namespace, items: list[str]) -> int:
    from ..dense.foreground import model_probe, patch_labels, read_pair, train_foreground
    from ..video import is_video

    if not args.masks:
        raise UsageError("foreground train needs --masks DIR: one mask per image, with the image's name")
    if args.classifier:
        raise UsageError("--classifier is for applying a classifier, not for training one")
    masks_dir = Path(args.masks)
    if not masks_dir.is_dir():
        raise UsageError(f"--masks {masks_dir}: not a folder")
    output = Path(args.output)
    if output.suffix.lower() != ".safetensors":
        raise UsageError(f"-o {output}: a classifier is written to a .safetensors file")
    args.height = args.height or 768
    entries, failures = _inputs(items)
    model = _load_model(args)
    grids, labels = [], []
    with _bar(entries, "features", args) as bar:
        for path in entries:
            bar.update(1)
            if is_video(path):
                failures.append((path, f"{path}: a video has no masks; train on images"))
                continue
            try:
                image, mask = read_pair(path, masks_dir)
            except ImageError as e:
                failures.append((path, str(e)))
                continue
            dense, _ = _dense(model, image, path, args, None, failures)
            if dense is None:
                continue
            grids.append(dense.features)
            labels.append(patch_labels(mask, dense.processor))
    if not grids:
        raise UsageError("no image could be used for training" + _first_failure(failures))
    classifier = train_foreground(grids, labels, C=args.C)
    classifier.model = {"name": str(args.model), "feature_dim": model.config.feature_dim}
    classifier.probe = model_probe(model)
    classifier.processing = {"height": args.height, "tiles": bool(args.tiles)}
    classifier.save(output)
    if classifier.sweep is not None:
        table = ", ".join(f"{c:.0e}: {ap:.3f}" for c, ap in classifier.sweep.mean_scores().items())
        print(
            f"C by leave-one-image-out average precision over {len(classifier.sweep.folds)} images: {table}",
            file=sys.stderr,
        )
    print(f"wrote {output}: trained on {len(grids)} images, C = {classifier.C:.0e}", file=sys.stderr)
    print(classifier.quality.summary(), file=sys.stderr)
    if classifier.quality.weak:
        print(
            f"warning: this classifier is weak: {'; '.join(classifier.quality.problems)}. Its masks will be poor: "
            "train on more masked images (several of each kind of scene it will see) or give --C 0.1 (Meta's "
            "choice), and look at the overlays that `dino3 foreground` writes",
            file=sys.stderr,
        )
    return _report(failures)


# -- match -------------------------------------------------------------------------------------------------------
def cmd_match(args: argparse.Namespace) -> int:
    from .._io import atomic_write_text
    from ..dense.match import match_patches
    from ..dense.render import match_picture, save_png
    from ..images import load_image

    if args.sparse is not None and args.sparse < 0:
        raise UsageError(f"--sparse {args.sparse}: a distance in pixels, 0 or more")
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"-o {args.output}: the match picture is a PNG; give a name ending in .png")
    model = _load_model(args)
    foreground = _foreground(args.foreground, model)
    dense = []
    for source in (args.a, args.b):
        image = load_image(source)  # an unreadable image stops the command: there is nothing to match
        found, mask = _dense(model, image, source, args, foreground, None)
        dense.append((found, mask))
    (a, mask_a), (b, mask_b) = dense
    matches = match_patches(
        a, b, mutual=args.mutual, min_score=args.min_score, mask_a=mask_a, mask_b=mask_b, spacing=args.sparse
    )
    save_png(match_picture(a.image, b.image, matches.a, matches.b), args.output)
    if args.json:
        atomic_write_text(args.json, _matches_json(str(args.a), str(args.b), matches.to_json()["matches"]))
    median = f", median score {float(matches.score.median()):.3f}" if len(matches) else ""
    print(f"wrote {args.output}: {len(matches)} matches{median}", file=sys.stderr)
    return EXIT_OK


def _matches_json(a: str, b: str, matches: list[dict]) -> str:
    """The matches as JSON, one match per line."""
    rows = ",\n".join(f"  {json.dumps(m)}" for m in matches)
    return f'{{"image_a": {json.dumps(a)}, "image_b": {json.dumps(b)}, "matches": [\n{rows}\n]}}\n'


# -- shared ---------------------------------------------------------------------------------------------------------
def _load_model(args: argparse.Namespace):
    """The model as --model, --backend, --dtype, ... say (the recipe's options, checked before loading)."""
    use_threads(args)
    return recipe_from_args(args).load(device=args.device, check_hash=not args.no_hash_check).model


def _foreground(choice: str, model: Any):
    """None (every patch), "auto", or a ForegroundClassifier checked against the model."""
    from ..dense.foreground import ForegroundClassifier

    if choice in (None, "none"):
        return None
    if choice == "auto":
        print(
            "note: --foreground auto is DINOv2's unsupervised recipe (first principal component); a classifier "
            "trained on a few masks (dino3 foreground train) is better",
            file=sys.stderr,
        )
        return "auto"
    classifier = ForegroundClassifier.load(choice)
    classifier.check_model(model, choice)
    return classifier


def _dense(model, image, name: str, args, foreground, failures: list | None):
    """(DenseImage, foreground mask or None) of one decoded image, or (None, None) when it fails."""
    from ..dense.foreground import foreground_mask
    from ..dense.highres import load_dense

    try:
        dense = load_dense(model, image, height=args.height, tiles=_tiling(args), name=name)
    except ImageError as e:
        if failures is None:
            raise
        failures.append((name, str(e)))
        return None, None
    return dense, foreground_mask(dense.features, foreground)


def _tiling(args: argparse.Namespace):
    from ..dense.highres import Tiling

    return Tiling() if args.tiles else None


def _note(what: str, note: str | None) -> None:
    if note:
        print(f"note: {what}: {note}", file=sys.stderr)


def _bar(entries: list[str], description: str, args: argparse.Namespace):
    """A progress bar over the inputs (a video counts once), on stderr; none with --quiet."""
    from .._progress import progress_bar

    return progress_bar(len(entries), description, "input", not args.quiet)


def _inputs(items: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Images and videos named by files, folders, globs and list files; what was skipped, and why."""
    from ..embed.inputs import IMAGE_SUFFIXES, expand_inputs
    from ..video import VIDEO_SUFFIXES

    found = expand_inputs(items, suffixes=IMAGE_SUFFIXES | set(VIDEO_SUFFIXES))
    if not found.paths:
        raise UsageError("no images or videos found in the inputs" + _first_failure(found.skipped))
    return found.paths, list(found.skipped)


def _images(entries: list[str], sampling, failures: list, bar=None) -> Iterator[tuple[str, Any]]:
    """(name, (3, H, W) image) for each image and each sampled video frame; failures recorded; `bar`
    moved on as each input is done."""
    import torch

    from ..images import load_image
    from ..video import is_video, iter_frames

    for path in entries:
        if not is_video(path):
            try:
                image = load_image(path)
            except ImageError as e:
                failures.append((path, str(e)))
            else:
                yield path, image
        else:
            try:
                for frame in iter_frames(path, sampling):
                    if frame.error is not None:
                        failures.append((frame.name, frame.error))
                    else:
                        yield frame.name, torch.from_numpy(frame.pixels).permute(2, 0, 1)
            except VideoError as e:
                failures.append((path, str(e)))
        if bar is not None:
            bar.update(1)


def _cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"a cosine lies in -1..1, got {text}")
    return value


def _check_folder_output(output: Path) -> None:
    if output.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not output.is_dir():
        raise UsageError(f"-o {output}: give a folder, where one PNG per input is written")


def _outside(entries: list[str], output: Path) -> list[str]:
    """The inputs that do not lie in the output folder (pictures of an earlier run there are not inputs)."""
    import os

    root = os.path.realpath(output)
    return [e for e in entries if not os.path.realpath(e).startswith(root + os.sep)]


def _png_name(name: str, used: set[str]) -> str:
    """`photo.jpg` -> photo.png, `clip.mp4#t=12.480` -> clip_t12.480.png; made unique."""
    from ..video import parse_frame_name

    parsed = parse_frame_name(name)
    stem = f"{Path(parsed[0]).stem}_t{parsed[1]:.3f}" if parsed else Path(name).stem or "image"
    candidate, n = f"{stem}.png", 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}.png"
    used.add(candidate)
    return candidate


def _first_failure(failures: list[tuple[str, str]]) -> str:
    return f" (first problem: {failures[0][1]})" if failures else ""


def _report(failures: list[tuple[str, str]]) -> int:
    return report_failures(failures, "inputs could not be used")
