"""`dino3 serve`: the command that loads a model and serves it with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys


def add_commands(commands) -> None:
    from .common import add_model_arguments, add_runtime_arguments, natural, positive_int

    def positive_float(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP: embeddings in OpenAI's shape, dynamic batching, metrics",
        description="Serve a model over HTTP (FastAPI on uvicorn): a web page at /; POST /v1/embeddings "
        "(images; with a dino.txt model texts too, in one space), /v1/embeddings/upload, /v1/patches, /v1/pca, "
        "/v1/search (with --index), /v1/anomaly (with --detector); GET /v1/models, /healthz, /readyz, "
        "/metrics, /docs. Binds 127.0.0.1 unless told otherwise.",
        epilog="examples:\n  dino3 serve -m vits16 --port 8000 --max-batch 32\n"
        "  curl -s localhost:8000/v1/embeddings -H 'content-type: application/json' -d @request.json\n"
        "  dino3 serve -m dinotxt-vitl16 --index photos.index     # texts and images; text search\n"
        "  dino3 serve -m vits16 --detector detector/              # POST /v1/anomaly",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=natural, default=8000, help="port (default: 8000; 0: any free port)")
    add_runtime_arguments(serve)
    serve.add_argument("--index", metavar="DIR", help="serve this index (built with the same model): /v1/search")
    serve.add_argument(
        "--detector",
        metavar="DIR",
        help="serve this anomaly detector (dino3 anomaly fit, with the same model): /v1/anomaly",
    )
    serve.add_argument("--max-batch", type=positive_int, default=32, help="images per forward at most (default: 32)")
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="wait this long for more images while others are being decoded (default: 10)",
    )
    serve.add_argument("--max-queue", type=positive_int, default=256, help="images waiting at most; then 429")
    serve.add_argument(
        "--max-images", type=positive_int, default=64, help="images (and texts) per request at most; then 413"
    )
    serve.add_argument("--max-body-mb", type=positive_int, default=32, help="request body at most, MiB; then 413")
    serve.add_argument("--max-megapixels", type=float, default=40.0, help="pixels per image at most; then 413")
    serve.add_argument(
        "--max-text-chars", type=positive_int, default=10_000, help="characters per text at most (dino.txt); then 413"
    )
    serve.add_argument("--decode-threads", type=positive_int, default=2, help="threads decoding images (default: 2)")
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help='the names clients give in "model" (as vLLM\'s flag; the first is the one answers carry); '
        "default: the -m argument and its last part. The preset name and hub id of the checkpoint are "
        "accepted too where dino3 knows the weights are that checkpoint (GET /v1/models lists them all)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("DINO3_API_KEY"),
        help="require Authorization: Bearer KEY on every route but the health checks and the page's files "
        "(default: $DINO3_API_KEY, which keeps the key out of the process list)",
    )
    serve.add_argument("--allow-urls", action="store_true", help="fetch http(s) URLs given as inputs")
    serve.add_argument("--allow-private-urls", action="store_true", help="also from private networks (not advised)")
    serve.add_argument(
        "--cors-origin", action="append", default=[], help="allow this origin (repeatable); default: none"
    )
    limits = serve.add_argument_group("connections and timeouts (see the README's Serve section)")
    limits.add_argument("--max-connections", type=positive_int, default=1000, help="then 503 at once (default: 1000)")
    limits.add_argument(
        "--header-timeout", type=positive_float, default=10.0, help="seconds for a request's headers (default: 10)"
    )
    limits.add_argument(
        "--body-timeout", type=positive_float, default=60.0, help="seconds for a request's body; then 408 (default: 60)"
    )
    limits.add_argument(
        "--keep-alive", type=positive_int, default=5, help="seconds an idle connection is kept (default: 5)"
    )
    limits.add_argument(
        "--url-timeout", type=positive_float, default=20.0, help="seconds for one URL's download (default: 20)"
    )
    limits.add_argument(
        "--timeout-graceful-shutdown",
        type=positive_float,
        metavar="S",
        help="on SIGTERM, wait at most S seconds for the requests in flight (default: until they finish)",
    )
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("dino3 serve needs FastAPI and uvicorn: pip install 'dino3[serve]'") from None
    from .._openmp import on_passing_thread
    from ..api import load
    from ..serve.app import create_app
    from ..serve.server import serve
    from ..serve.service import ServeSettings
    from .common import recipe_from_args

    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty: give a real key (an empty one would guard nothing), or leave it out")
    settings = ServeSettings(  # every setting checked before the model loads
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_images=args.max_images,
        max_body_bytes=args.max_body_mb * 2**20,
        max_pixels=int(args.max_megapixels * 1e6),
        max_text_chars=args.max_text_chars,
        api_key=args.api_key,
        allow_urls=args.allow_urls,
        allow_private_urls=args.allow_private_urls,
        cors_origins=args.cors_origin,
        decode_threads=args.decode_threads,
        served_model_names=args.served_model_name or [],
        url_timeout_s=args.url_timeout,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
        shutdown_timeout_s=args.timeout_graceful_shutdown,
    )
    detector = None
    if args.detector:  # before the model loads: a wrong folder is told at once
        from ..anomaly import load as load_detector

        detector = load_detector(args.detector)
    index = None
    if args.index:  # before the model loads: a wrong folder is told at once
        from ..index import open as open_index

        index = open_index(args.index)
    # the recipe's checks: a runtime backend with --dtype or --quantize is refused here, as by every command
    options = recipe_from_args(args).load_options(args.device, check_hash=not args.no_hash_check)
    # Loaded on a thread that ends: the OpenMP team it builds goes with it, and the model's thread
    # (the batcher's) keeps the only one, so its forwards run at full speed (see dino3._openmp).
    model = on_passing_thread(load, args.model, **options)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches it can use it", file=sys.stderr)
    app = create_app(model, settings, index=index, detector=detector)  # another model's index or detector: refused
    serve(app, args.host, args.port, settings)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
