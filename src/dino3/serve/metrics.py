"""The service's Prometheus metrics, in a registry of its own (no process-wide state).

Requests are counted by route template (`/v1/thumbnails/{item}`), never by the raw path: a client
that asks for 20,000 made-up paths adds no series (they all count as `unmatched`).
"""

from __future__ import annotations

from typing import Any

UNMATCHED = "unmatched"  # the label of every path that names no route


class Metrics:
    """Requests, latency, batch sizes (by kind: image or text) and queue depth of one service."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("dino3_requests", "Requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "dino3_request_seconds",
            "Time to answer a request",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dino3_batch_size",
            "Images or texts per forward",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_seconds = Histogram("dino3_batch_seconds", "Time of one forward", ["kind"], registry=self.registry)
        self.queue_depth = Gauge("dino3_queue_depth", "Images and texts waiting for the model", registry=self.registry)
        self.images = Counter("dino3_images", "Images embedded", registry=self.registry)
        self.texts = Counter("dino3_texts", "Texts embedded (dino.txt)", registry=self.registry)
        self.in_progress = Gauge("dino3_requests_in_progress", "Requests being answered", registry=self.registry)

    def batch(self, kind: str, size: int, seconds: float) -> None:
        """One forward of `size` jobs of `kind` ("image" or "text")."""
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)
        (self.texts if kind == "text" else self.images).inc(size)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def route_label(router: Any, scope: dict) -> str:
    """The path template of the route of `router` that a request's scope matches (its method aside),
    or UNMATCHED."""
    from starlette.routing import Match

    for route in router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED
