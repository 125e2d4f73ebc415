"""The whole service: the embedding routes (service.py), the web page (page.py), with an index the
similarity search (search.py), and with an anomaly detector its scores and maps (anomaly.py).

    app = create_app(dino3.load("vits16"), ServeSettings(), index=dino3.index.open("photos.index"))
    app = create_app(dino3.load("vits16"), ServeSettings(), detector=dino3.anomaly.load("detector"))

The forwards run on the batcher's thread. On a CPU, a thread that ran torch (loading the model on the
main thread does) keeps an OpenMP team that slows them by a third or more where cores are few
(benchmarks/threads.py); `dino3 serve` therefore loads its model on a thread that ends.
"""

from __future__ import annotations

from typing import Any

from .anomaly import add_anomaly_routes, attach_detector
from .page import PUBLIC_ROUTES, add_page_routes
from .routes import create_core_app
from .search import add_search_routes, attach_index
from .service import ServeSettings


def create_app(
    model: Any,
    settings: ServeSettings | None = None,
    processor=None,
    warm: bool = True,
    index: Any = None,
    detector: Any = None,
):
    """The FastAPI application serving `model` (a loaded dino3 model or runtime) and, when given, an
    opened dino3 index built with that model and a dino3.anomaly detector fitted with it (either made
    with another model or preprocessing: a UsageError that says what differs)."""
    app = create_core_app(model, settings, processor, warm)
    service = app.state.service
    try:
        if index is not None:
            attach_index(service, index)
        if detector is not None:
            attach_detector(service, detector)
    except BaseException:  # refused: the model's thread and the pools go with the app that is not made
        service.close()
        raise
    add_search_routes(app, service)
    add_anomaly_routes(app, service)
    add_page_routes(app, service)
    service.public_routes.update(PUBLIC_ROUTES)
    return app
