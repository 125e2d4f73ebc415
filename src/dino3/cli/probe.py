"""The probe commands: `dino3 probe train`, `dino3 probe eval` and `dino3 classify`; thin over the library.

dino3 probe train flowers/ -m vits16 -o flowers-probe            # logistic regression, C chosen
dino3 probe train flowers/ -m vits16 -o flowers-knn --method knn
dino3 classify photos/ --probe flowers-probe -k 3 --json predictions.json
dino3 probe eval flowers-test/ --probe flowers-probe              # accuracy, per class, confusion PNG
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, escape_field
from .common import recipe_from_args, report_failures, use_threads

DATASET_HELP = (
    "a folder with a folder of images per class, a CSV of path,label, or a `dino3 embed` output with --labels"
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `probe` (train, eval) and `classify` to the `dino3` command's subcommands."""
    from ..probe.knn import KS
    from ..probe.probe import FEATURES, METHODS
    from .common import (
        add_batch_arguments,
        add_model_arguments,
        add_processing_arguments,
        add_runtime_arguments,
        positive_float,
        positive_int,
    )

    probe = commands.add_parser(
        "probe",
        help="train or evaluate a classifier on DINOv3 features (logistic regression or k-NN)",
        description="Probes: classifiers on frozen features, by Meta's protocols. `dino3 probe train` makes one "
        "from labelled images, `dino3 probe eval` measures one, `dino3 classify` uses one.",
    )
    sub = probe.add_subparsers(dest="probe_command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a probe from labelled images",
        description="Embed labelled images and fit a probe: logistic regression (L-BFGS over Meta's 45 values of "
        "C, 1e-6 ... 1e5) or k-NN (cosine, temperature-weighted vote, k in "
        f"{', '.join(map(str, KS))}), C or k chosen on a stratified held-out share, then the probe fitted on all "
        "images. The probe is a folder: probe.safetensors and probe.json. Images that cannot be read are listed "
        "and left out (exit status 3); an interrupted embedding resumes when the command is run again.",
        epilog="examples:\n  dino3 probe train flowers/ -m vits16 -o flowers-probe\n"
        "  dino3 probe train labels.csv -m vitb16 -o probe --method knn --features cls\n"
        "  dino3 probe train features.npz --labels labels.csv -o probe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("dataset", metavar="DATASET", help=DATASET_HELP)
    add_model_arguments(train, required=False)
    train.add_argument("-o", "--output", required=True, metavar="PROBE", help="the probe folder to write")
    train.add_argument("--labels", help="with an embeddings file as DATASET: a CSV of path,label")
    train.add_argument(
        "--method", choices=METHODS, default="logreg", help="logistic regression or k-NN (default: logreg)"
    )
    train.add_argument(
        "--features", choices=FEATURES, help="pooling: cls, mean, or cls+mean (default: cls+mean, Meta's probe input)"
    )
    train.add_argument(
        "--val-fraction", type=_fraction, default=0.2, help="share of each class held out to choose C or k (0.2)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default: 0)")
    train.add_argument("--C", type=positive_float, dest="C", help="logreg: use this C instead of choosing it")
    train.add_argument("--knn-k", type=positive_int, dest="k", help="knn: use this k instead of choosing it")
    train.add_argument("--overwrite", action="store_true", help="replace the probe in PROBE")
    add_processing_arguments(train)
    add_runtime_arguments(train)
    add_batch_arguments(train)
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="measure a probe on labelled images: accuracy, per-class precision and recall, confusion matrix",
        description="Embed labelled images with the probe's model and settings and measure the probe: top-1 and "
        "top-5 accuracy, each class's precision and recall, and a confusion-matrix picture (PNG).",
    )
    evaluate.add_argument("dataset", metavar="DATASET", help=DATASET_HELP)
    evaluate.add_argument("--probe", required=True, help="the probe folder")
    evaluate.add_argument("--labels", help="with an embeddings file as DATASET: a CSV of path,label")
    evaluate.add_argument("--confusion", help="the confusion-matrix PNG to write (default: PROBE/confusion.png)")
    evaluate.add_argument("--json", help="also write the measures to this JSON file")
    _add_use_arguments(evaluate, add_model_arguments, add_runtime_arguments, add_batch_arguments)
    evaluate.set_defaults(run=cmd_eval)

    classify = commands.add_parser(
        "classify",
        help="classify images with a probe, or zero-shot by label names (dino.txt)",
        description="Classify images (files, folders, globs, list files, as `dino3 embed` takes them) or a "
        "`dino3 embed` output with a probe: the top classes of each image and their scores, best first. A probe "
        "made with another model is refused. Or, with a dino.txt model and --labels, zero-shot: each image "
        "against the names' text embeddings (as Transformers' zero-shot-image-classification pipeline).",
        epilog="examples:\n  dino3 classify photos/ --probe flowers-probe\n"
        "  dino3 classify a.jpg b.jpg --probe flowers-probe -k 3 --json predictions.json\n"
        '  dino3 classify photos/ -m dinotxt-vitl16 --labels "cat,dog,car" --template "a photo of a {}." --json p.json',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders, globs, list files, URLs")
    chosen = classify.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--probe", help="the probe folder")
    chosen.add_argument("--labels", help="zero-shot with a dino.txt model (-m): comma-separated class names")
    classify.add_argument(
        "--template",
        action="append",
        help='with --labels: a prompt with {} for the name (default: "This is a photo of {}.")',
    )
    classify.add_argument("-k", "--top-k", type=positive_int, default=5, help="classes per image (default: 5)")
    classify.add_argument("--json", help='write {"predictions": [{"path", "labels", "scores"}]} to this file')
    _add_use_arguments(classify, add_model_arguments, add_runtime_arguments, add_batch_arguments)
    classify.set_defaults(run=cmd_classify)


def _add_use_arguments(parser, add_model_arguments, add_runtime_arguments, add_batch_arguments) -> None:
    """-m (the probe's model where it is now; default: the one probe.json names), the runtime and batch options."""
    add_model_arguments(parser, required=False)
    add_runtime_arguments(parser)
    add_batch_arguments(parser)


# -- commands ---------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from ..probe.train import train

    use_threads(args)
    recipe, run = None, {}
    if not _is_embeddings(args.dataset) and args.model is not None:
        from ..probe.train import DEFAULT_FEATURES

        recipe = recipe_from_args(args, pool=args.features or DEFAULT_FEATURES)
        run = {k: v for k, v in _embed_options(args).items() if k in ("batch_size", "workers", "check_hash")}
    result = train(
        args.dataset,
        None if recipe is not None else args.model,
        args.output,
        recipe=recipe,
        labels=args.labels,
        method=args.method,
        features=args.features,
        val_fraction=args.val_fraction,
        seed=args.seed,
        C=args.C,
        k=args.k,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
        **run,
    )
    _notes(result.notes)
    probe, validation = result.probe, result.probe.settings.get("validation") or {}
    chosen = f"C = {probe.settings['C']:.4g}" if probe.method == "logreg" else f"k = {probe.settings['k']}"
    if "best" in validation:
        how = "chosen" if len(validation.get("scores", [])) > 1 else "given"
        chosen += f" ({how}; held-out top-1 {validation['best']:.4f} on {validation['held_out_images']} images)"
    print(
        f"wrote {result.folder}: {probe.method} over {len(probe.classes)} classes, {result.images} images, "
        f"{probe.pool} features of width {probe.feature_dim}; {chosen}; {result.seconds:.1f} s",
        file=sys.stderr,
    )
    return report_failures(result.failures, "images could not be embedded, left out of the training")


def cmd_classify(args: argparse.Namespace) -> int:
    from ..probe.classify import classify

    use_threads(args)
    if args.labels is not None:
        return _classify_zero_shot(args)
    if args.template:
        from ..errors import UsageError

        raise UsageError("--template goes with --labels (zero-shot); a probe has its own classes")
    found = classify(
        args.images,
        args.probe,
        top_k=args.top_k,
        model=args.model,
        device=args.device,
        progress=not args.quiet,
        **_embed_options(args),
    )
    _notes(found.notes)
    if args.json:
        atomic_write_text(args.json, json.dumps(found.to_dict(), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}: {len(found.paths)} images", file=sys.stderr)
    else:
        for path, labels, scores in zip(found.paths, found.predictions.labels, found.predictions.scores):
            best = "\t".join(f"{label}\t{score:.4f}" for label, score in zip(labels, scores))
            print(f"{escape_field(path)}\t{best}")
    return report_failures(found.failures, "images could not be embedded, not classified")


def _classify_zero_shot(args: argparse.Namespace) -> int:
    """dino3 classify IMAGES -m DINOTXT --labels a,b,c: the same output as a probe's classification."""
    from ..embed.inputs import expand_inputs
    from ..errors import ImageError, UsageError
    from ..text import classify
    from .text import load_text_model, split_labels

    if args.model is None:
        raise UsageError("--labels classifies with a dino.txt model: give it with -m (e.g. -m dinotxt-vitl16)")
    labels = split_labels(args.labels)
    found = expand_inputs(args.images)
    if not found.paths:
        raise UsageError(found.none_found())
    made = load_text_model(args)
    templates = args.template or "This is a photo of {}."
    rows, failures = [], list(found.skipped)

    def add(paths: list[str]) -> None:
        for path, best in zip(paths, classify(made.model, paths, labels, templates, top_k=args.top_k)):
            rows.append({"path": path, "labels": [b["label"] for b in best], "scores": [b["score"] for b in best]})

    for start in range(0, len(found.paths), args.batch_size):
        part = found.paths[start : start + args.batch_size]
        try:
            add(part)
        except ImageError:  # a bad image among them: the others one by one, the bad one listed
            for path in part:
                try:
                    add([path])
                except ImageError as e:
                    failures.append((path, str(e)))
    document = {"predictions": rows}
    if args.json:
        atomic_write_text(args.json, json.dumps(document, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}: {len(rows)} images", file=sys.stderr)
    else:
        for row in rows:
            best = "\t".join(f"{label}\t{score:.4f}" for label, score in zip(row["labels"], row["scores"]))
            print(f"{escape_field(row['path'])}\t{best}")
    return report_failures(failures, "images could not be read, not classified")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..probe.classify import load_probe
    from ..probe.evaluate import evaluate

    use_threads(args)
    probe = load_probe(args.probe, args.device)
    report = evaluate(
        args.dataset,
        probe,
        labels=args.labels,
        model=args.model,
        device=args.device,
        progress=not args.quiet,
        **({} if _is_embeddings(args.dataset) else _embed_options(args)),
    )
    _notes(report.notes)
    print(report.table())
    picture = report.draw(args.confusion or Path(args.probe) / "confusion.png")
    print(f"wrote {picture}", file=sys.stderr)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return report_failures(report.failures, "images could not be embedded, left out of the evaluation")


# -- pieces -----------------------------------------------------------------------------------------------
def _embed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's runtime options (the preprocessing is the probe's own) and the embed job's."""
    calibration = None
    if args.calibration:
        from ..embed.inputs import expand_inputs

        calibration = expand_inputs([args.calibration]).paths
    return {
        "dtype": args.dtype,
        "quantize": args.quantize,
        "backend": args.backend,
        "precision": args.precision,
        "calibration": calibration,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "check_hash": not args.no_hash_check,
    }


def _is_embeddings(dataset: str) -> bool:
    from ..probe.dataset import is_embeddings_file

    return is_embeddings_file(dataset)


def _notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value
