"""`dino3 serve`: an HTTP embedding service with dynamic batching, a web page and, with an index,
similarity search (extra: pip install "dino3[serve]").

from dino3.serve import create_app, ServeSettings
app = create_app(dino3.load("vits16"), ServeSettings(max_batch=32))   # an ASGI app for uvicorn
"""

from __future__ import annotations

from .app import create_app
from .service import ApiError, ServeSettings

__all__ = ["ApiError", "ServeSettings", "create_app"]
