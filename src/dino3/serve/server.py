"""The app on uvicorn, with the limits a server others can reach needs (ServeSettings holds them):

- a connection must send a request's headers within header_timeout_s of opening (or of its last
  answer), else it is closed: uvicorn has no such timeout of its own, and idle or half-sent
  connections would otherwise be held for ever;
- an idle keep-alive connection is closed after keep_alive_s;
- beyond max_connections open connections, requests are answered 503 at once (uvicorn's
  limit_concurrency), and the process's open-file limit is raised to its hard limit, so that a flood
  of connections meets these limits before it meets EMFILE;
- a body must arrive within body_timeout_s (408) and stay under max_body_bytes (413), counted as it
  arrives (service.body_of);
- SIGTERM (or Ctrl-C) stops accepting, lets the requests in flight finish (each is bounded by the
  limits above and the queue), waiting at most shutdown_timeout_s when one is set (requests still
  running then get 503), finishes the forward that is running, and exits 0.

A public deployment still belongs behind a reverse proxy (TLS, per-client rate limits).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .service import ServeSettings


def uvicorn_config(app: Any, host: str, port: int, settings: ServeSettings, log_level: str = "info"):
    """uvicorn's Config for `app` with the settings' limits and timeouts."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=with_header_timeout(AutoHTTPProtocol, settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def with_header_timeout(protocol: type, seconds: float) -> type:
    """A subclass of a uvicorn HTTP protocol (h11's or httptools') that closes a connection which has
    not started a request within `seconds` of opening, or of its last answer."""

    class HeaderTimeout(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_headers()

        def _expect_headers(self) -> None:
            self.loop.call_later(seconds, self._headers_late, self.cycle)

        def _headers_late(self, cycle) -> None:
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                self.transport.close()  # no new request began: the headers are late, or never coming

    HeaderTimeout.__name__ = f"HeaderTimeout{protocol.__name__}"
    return HeaderTimeout


def raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one (this process is a server)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def serve(app: Any, host: str, port: int, settings: ServeSettings) -> None:
    """Run `app` until SIGTERM or Ctrl-C (see the module docstring); returns once it has stopped."""
    import signal

    import uvicorn

    raise_open_file_limit()
    server = uvicorn.Server(uvicorn_config(app, host, port, settings))
    # uvicorn stops accepting on SIGTERM, lets the requests in flight finish, then raises the signal
    # again for the handler that was there before: a quiet one, so that the service exits with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
