"""The whole service: the embedding routes (service.py), the web page (page.py) and, with an index,
the similarity search (search.py).

    app = create_app(dino3.load("vits16"), ServeSettings(), index=dino3.index.open("photos.index"))

The forwards run on the batcher's thread. On a CPU, a thread that ran torch (loading the model on the
main thread does) keeps an OpenMP team that slows them by a third or more where cores are few
(benchmarks/threads.py); `dino3 serve` therefore loads its model on a thread that ends.
"""

from __future__ import annotations

from typing import Any

from .page import PUBLIC_ROUTES, add_page_routes
from .routes import create_core_app
from .search import add_search_routes, attach_index
from .service import ServeSettings


def create_app(model: Any, settings: ServeSettings | None = None, processor=None, warm: bool = True, index: Any = None):
    """The FastAPI application serving `model` (a loaded dino3 model or runtime) and, when given, an
    opened dino3 index built with that model (a UsageError otherwise)."""
    app = create_core_app(model, settings, processor, warm)
    service = app.state.service
    if index is not None:
        attach_index(service, index)
    add_search_routes(app, service)
    add_page_routes(app, service)
    service.public_routes.update(PUBLIC_ROUTES)
    return app
