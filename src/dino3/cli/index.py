"""The index's commands: `dino3 index build|add|info`, `dino3 search`, `dino3 dedup`.

    dino3 index build photos/ -m vits16 --index photos.index          # embed and index every image
    dino3 index add photos/ --index photos.index                      # new and changed images only
    dino3 search query.jpg --index photos.index -k 10 --html results.html
    dino3 dedup --index photos.index --threshold 0.95 --json groups.json

Exit status as `dino3 embed`'s: 0 done, 3 some images could not be embedded (listed), 2 a mistake in
the command, 1 an error that stopped it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_OK, plural, recipe_from_args, report_failures, use_threads


def add_commands(subparsers) -> None:
    """Add `index`, `search` and `dedup` to the `dino3` command's subparsers."""
    from ..index.update import INDEX_POOLS
    from .common import (
        add_batch_arguments,
        add_model_arguments,
        add_processing_arguments,
        add_runtime_arguments,
        positive_int,
    )

    raw = argparse.RawDescriptionHelpFormatter
    index = subparsers.add_parser(
        "index",
        help="an index of image embeddings for search and dedup: build, add, info",
        description="An index of DINOv3 embeddings on disk, for `dino3 search` and `dino3 dedup`.",
    )
    commands = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="embed images (or take `dino3 embed` outputs) into a new index",
        description="Embed every image of the inputs with a DINOv3 model, as `dino3 embed` does, and keep the "
        "vectors with the model's identity, the pooling and the preprocessing, so that queries are embedded "
        "the same way. Inputs may instead be `dino3 embed` outputs (.npz, .npy, .safetensors, .parquet): they "
        "name their model. An interrupted build is continued by running it again.",
        epilog="examples:\n  dino3 index build photos/ -m vits16 --index photos.index\n"
        "  dino3 index build features.npz --index photos.index",
        formatter_class=raw,
    )
    build.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, globs, lists, URLs; or embeddings")
    add_model_arguments(build, required=False)
    _index_argument(build)
    build.add_argument(
        "--pool",
        choices=INDEX_POOLS,
        help="the vector of an image (default: cls; with a dino.txt model: text, its image embedding)",
    )
    add_processing_arguments(build)
    add_runtime_arguments(build)
    add_batch_arguments(build)
    build.add_argument(
        "--overwrite", action="store_true", help="replace the index in DIR (usable until the new one is)"
    )
    _relative_to_argument(build)
    build.set_defaults(run=cmd_index_build)

    add = commands.add_parser(
        "add",
        help="bring an index up to date: new and changed images in, files gone out",
        description="Embed the images of the inputs that are new to the index or changed (other size or time, "
        "and other bytes), reuse the vector of a file with the same bytes as an indexed one, and drop the "
        "indexed files that are gone. One transaction: an interrupted add leaves the index as it was.",
        epilog="example:\n  dino3 index add photos/ --index photos.index",
        formatter_class=raw,
    )
    add.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, globs, lists, URLs; or embeddings")
    _index_argument(add)
    _moved_model_argument(add)
    add.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    add_batch_arguments(add)
    add.add_argument("--no-hash-check", action="store_true", help="skip the SHA-256 check of Meta's file names")
    _relative_to_argument(add)
    add.set_defaults(run=cmd_index_add)

    info = commands.add_parser("info", help="what an index holds and how it was made")
    _index_argument(info)
    info.set_defaults(run=cmd_index_info)

    search = subparsers.add_parser(
        "search",
        help="find the images of an index most similar to query images",
        description="Embed the query images as the index's images were, and list the k most similar indexed "
        "images of each, best first, with their cosine similarity.",
        epilog="examples:\n  dino3 search query.jpg --index photos.index -k 10\n"
        '  dino3 search --text "a red bicycle" --index photos.index --json results.json\n'
        "  dino3 search queries/ --index photos.index --json results.json --html results.html",
        formatter_class=raw,
    )
    search.add_argument("queries", nargs="*", metavar="QUERY", help="image files, folders, globs, lists, URLs")
    search.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="search by this text instead (an index of a dino.txt model's image embeddings); may be repeated",
    )
    _index_argument(search)
    search.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default: 10)")
    _report_arguments(search)
    _moved_model_argument(search)
    search.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    add_batch_arguments(search)
    search.set_defaults(run=cmd_search)

    dedup = subparsers.add_parser(
        "dedup",
        help="groups of near-duplicate images in an index",
        description="Join every pair of indexed images whose cosine reaches the threshold into groups (if a~b and "
        "b~c, one group a, b, c), largest first; print how each image's nearest-neighbour score is "
        "distributed, to help choose the threshold.",
        epilog="example:\n  dino3 dedup --index photos.index --threshold 0.95 --json groups.json --html groups.html",
        formatter_class=raw,
    )
    _index_argument(dedup)
    dedup.add_argument(
        "--threshold", type=cosine_threshold, default=0.95, help="cosine of a duplicate, in (0, 1] (default 0.95)"
    )
    _report_arguments(dedup)
    dedup.set_defaults(run=cmd_dedup)


def cosine_threshold(text: str) -> float:
    """A dedup threshold: a cosine in (0, 1], as Index.dedup takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (a cosine above 0), got {value}")
    return value


def _relative_to_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--relative-to",
        metavar="DIR",
        help="for `dino3 embed` outputs of an older dino3 that hold relative paths: the folder they are relative to",
    )


def _index_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, metavar="DIR", help="the index folder")


def _moved_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m", "--model", help="where the index's model lies now, if it moved (checked to be the same weights)"
    )


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--html", metavar="FILE", help="write a contact sheet (thumbnails, scores) that opens offline")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--exact", dest="exact", action="store_true", default=None, help="exact search (slower when large)"
    )
    how.add_argument("--approximate", dest="exact", action="store_false", help="the approximate index (FAISS)")


# -- commands ---------------------------------------------------------------------------------------------
def cmd_index_build(args: argparse.Namespace) -> int:
    from ..embed import is_embeddings
    from ..index.update import build
    from ..models.text import is_text_checkpoint

    use_threads(args)
    recipe = None
    if args.model is not None and not any(is_embeddings(i) for i in args.inputs):
        pool = args.pool or ("text" if is_text_checkpoint(args.model) else "cls")
        recipe = recipe_from_args(args, pool=pool)
    update = build(
        args.inputs,
        model=None if recipe is not None else args.model,
        folder=args.index,
        recipe=recipe,
        pool=None if recipe is not None else args.pool,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=args.overwrite,
        check_hash=not args.no_hash_check,
        progress=not args.quiet,
        relative_to=args.relative_to,
    )
    return _report_update(update, f"built {update.folder}: {plural(update.count, 'image')}")


def cmd_index_add(args: argparse.Namespace) -> int:
    from ..index.index import open_index

    use_threads(args)
    index = open_index(args.index)
    try:
        update = index.add(
            args.inputs,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            check_hash=not args.no_hash_check,
            progress=not args.quiet,
            model=args.model,
            relative_to=args.relative_to,
        )
    finally:
        index.close()
    parts = [
        f"{update.added} new",
        f"{update.replaced} changed",
        f"{update.dropped} gone",
        f"{update.unchanged + update.touched} unchanged",
    ]
    line = f"updated {update.folder}: {', '.join(parts)}; {plural(update.count, 'image')} now"
    if update.reused:
        line += f" ({update.reused} vectors reused from files with the same bytes)"
    return _report_update(update, line)


def cmd_index_info(args: argparse.Namespace) -> int:
    from ..index.index import open_index

    index = open_index(args.index)
    try:
        info = index.info()
    finally:
        index.close()
    ann = info["approximate_index"]
    lines = [
        f"{info['folder']}: {plural(info['images'], 'image')}, {info['dim']}-d vectors",
        f"  model          {info['model']}",
        f"  pool           {info['pool']}",
        f"  preprocessing  {json.dumps({k: v for k, v in info['processor'].items() if k != 'image_processor_type'})}",
        "  search         "
        + (
            f"approximate by default (FAISS HNSW, {ann['count']} in the graph, ef_search {ann['ef_search']})"
            if ann
            else "exact"
        ),
        f"  written by     dino3 {info['dino3_version']} (index format {info['format']})",
    ]
    print("\n".join(lines))
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from ..embed import expand_inputs
    from ..index.index import open_index

    use_threads(args)
    _check_outputs(args)
    if args.text and args.queries:
        raise _usage("give query images or --text, not both")
    if args.text:
        return _search_text(args)
    if not args.queries:
        raise _usage("give query images (or --text TEXT)")
    found = expand_inputs(args.queries)
    failures = list(found.skipped)
    if not found.paths:
        raise _usage("no query images found" + (f" ({len(failures)} skipped)" if failures else ""))
    index = open_index(args.index)
    k = args.k
    if 0 < len(index) < k:  # the default k on a small index: all of it
        print(
            f"note: the index holds {plural(len(index), 'image')}; listing them all (-k {len(index)})", file=sys.stderr
        )
        k = len(index)
    try:
        results = index.search(
            found.paths,
            k=k,
            exact=args.exact,
            model=args.model,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            on_error=lambda i, source, error: failures.append((str(source), str(error))),
        )
    finally:
        index.close()
    for result in results:
        print(result["query"])
        for neighbour in result["neighbors"]:
            print(f"  {neighbour['score']:.4f}  {neighbour['path']}")
    _write_reports(args, {"results": results}, "search")
    return report_failures(failures, "query images could not be read")


def _search_text(args: argparse.Namespace) -> int:
    from ..index.index import open_index

    index = open_index(args.index)
    try:
        k = min(args.k, len(index)) if len(index) else args.k
        results = index.search_text(args.text, k=k, exact=args.exact, model=args.model, device=args.device)
    finally:
        index.close()
    for result in results:
        print(result["query"])
        for neighbour in result["neighbors"]:
            print(f"  {neighbour['score']:.4f}  {neighbour['path']}")
    _write_reports(args, {"results": results}, "search")
    return EXIT_OK


def cmd_dedup(args: argparse.Namespace) -> int:
    from ..index.dedup import format_histogram
    from ..index.index import open_index

    _check_outputs(args)
    index = open_index(args.index)
    try:
        result = index.dedup(args.threshold, exact=args.exact)
    finally:
        index.close()
    print(format_histogram(result["histogram"]["counts"], args.threshold), file=sys.stderr)
    groups = result["groups"]
    images = sum(len(g["paths"]) for g in groups)
    print(
        f"{plural(len(groups), 'group')} of near-duplicates at cosine >= {args.threshold} "
        f"({images} of {result['images']} images; {'exact' if result['exact'] else 'approximate index'})",
        file=sys.stderr,
    )
    for number, group in enumerate(groups[:20], 1):
        print(f"group {number}: {len(group['paths'])} images")
        for path, score in zip(group["paths"], group["scores"]):
            print(f"  {score:.4f}  {path}")
    if len(groups) > 20:
        print(f"... and {len(groups) - 20} more groups" + (" (all in the JSON)" if args.json else ""))
    _write_reports(args, result, "dedup")
    return EXIT_OK


# -- helpers ------------------------------------------------------------------------------------------------
def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, a report that could not be written at the end."""
    import os

    for option in ("json", "html"):
        value = getattr(args, option)
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise _usage(f"--{option} {value} is a folder; give a file name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise _usage(f"--{option} {value}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise _usage(f"--{option} {value}: no permission to write in {parent}")


def _write_reports(args: argparse.Namespace, data: dict, kind: str) -> None:
    from .._io import atomic_write_text
    from ..index.report import dedup_page, search_page

    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.html:
        page = search_page(data["results"]) if kind == "search" else dedup_page(data)
        atomic_write_text(args.html, page)
        print(f"wrote {args.html}", file=sys.stderr)


def _report_update(update, line: str) -> int:
    for note in update.notes:
        print(f"note: {note}", file=sys.stderr)
    if update.embedded and update.seconds > 0:
        line += f" ({update.embedded} embedded, {update.seconds:.1f} s)"
    print(line, file=sys.stderr)
    if update.ignored:
        print(f"ignored {plural(update.ignored, 'file')} without an image suffix in the folders given", file=sys.stderr)
    return report_failures(update.failures, "images could not be embedded (they are not in the index)")


def _usage(message: str):
    from ..errors import UsageError

    return UsageError(message)
