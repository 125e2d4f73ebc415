"""The service's anomaly detection, when it serves a detector (dino3.anomaly, issue 30): POST /v1/anomaly.

Images in (as /v1/embeddings takes them); out, each one's score, its verdict against the detector's
threshold and, on request ("map": true), the image under its anomaly map (dino3.anomaly.render's
overlay, with the colour bar and the score) as a PNG data URL:

    {"object": "list", "data": [{"object": "anomaly", "index": 0, "score": 0.31, "anomalous": true,
     "map": "data:image/png;base64,..."}], "threshold": 0.27, "model": "vits16"}

The patch features are made as the detector's were: its processor (the shorter side to its
resolution, bicubic, a centre crop to whole patches) and pool "patches" of the served model, which
must be the detector's (refused at start-up otherwise), on the model's thread, batched with every
other request's images. The scoring (the bank's FAISS search, the map's smoothing) and the pictures
run on the decoding threads, off the event loop. The maps are made at the size of the picture shown
(render.MAX_SIDE on the longer side at most), never at a large image's own size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

from .routes import input_list
from .service import ApiError, Service, parse, png_data_url


class AnomalyRequest(BaseModel):
    input: Any
    model: str | None = None
    map: bool = False  # the overlay picture of each image, as a PNG data URL


@dataclass
class Decoded:
    """One image, decoded and processed as the detector's images were."""

    pixels: torch.Tensor  # (3, H, W) as the model sees it
    size: tuple[int, int]  # (H0, W0) the image's own size
    shown: tuple[int, int]  # (h, w) the size of its picture (and of its map)
    picture: np.ndarray | None  # (h, w, 3) uint8 the image at that size, kept when a map is asked for


def attach_detector(service: Service, detector: Any) -> None:
    """Serve `detector` beside the model: refused (UsageError, saying what differs) unless the model
    and its preprocessing make the detector's features. The check runs the model: on its thread."""
    from ..anomaly.scoring import faiss_module

    faiss_module()  # the bank is searched with FAISS: without it, a clear error now, not a 500 per request
    maker = service.on_model_thread(detector.feature_maker, service.model)
    service.extras["detector"] = detector
    service.extras["detector_processor"] = maker.processor


def add_anomaly_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/anomaly", summary="Anomaly scores of images (and their maps) by the served detector")
    async def anomaly(request: Request):
        from ..anomaly import ImageFeatures

        detector = service.extras.get("detector")
        if detector is None:
            raise ApiError(
                404, "this server holds no anomaly detector: start it with --detector DIR", code="no_detector"
            )
        payload = await parse(request, AnomalyRequest, service.settings)
        model_name = service.model_answered(payload.model)
        sources, names, _ = await service.inputs(input_list(payload.input))
        processor = service.extras["detector_processor"]
        decoded = await service.decode_all(sources, names, partial(_decode, service, processor, payload.map))
        grids = await service.features([d.pixels for d in decoded], "patches")  # each (h, w, D)
        features = [
            ImageFeatures(name, d.shown, processor.aspect_size(*d.size), grid)
            for name, d, grid in zip(names, decoded, grids)
        ]
        results = await service.submit(service.decoders, detector.score_features, features, processor.patch_size)
        data = [
            {"object": "anomaly", "index": i, "score": r.score, "anomalous": r.anomalous} for i, r in enumerate(results)
        ]
        if payload.map:
            pictures = await service.submit(
                service.decoders, _pictures, results, [d.picture for d in decoded], detector.threshold
            )
            for item, picture in zip(data, pictures):
                item["map"] = picture
        return {"object": "list", "data": data, "threshold": detector.threshold, "model": model_name}


def _decode(service: Service, processor: Any, keep: bool, source: bytes | str, name: str) -> Decoded:
    """One input decoded (EXIF orientation applied) and processed as FeatureMaker processes an image;
    with `keep`, the image at the size of its picture too. On a decoding thread."""
    from ..anomaly.render import MAX_SIDE
    from ..dense.render import resize, to_uint8
    from ..images import decode, named, open_image

    opened = open_image(service.source_bytes(source, name), max_pixels=service.settings.max_pixels)
    width, height = opened.size
    with service.memory.reserve(width * height):
        image = decode(opened)  # (3, H0, W0)
        pixels = processor.pixels(named(image, name))
        size = (int(image.shape[1]), int(image.shape[2]))
        scale = min(1.0, MAX_SIDE / max(size))  # as render.overlay shows an image
        shown = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        picture = resize(to_uint8(image), shown) if keep else None
    return Decoded(pixels, size, shown, picture)


def _pictures(results: list[Any], pictures: list[np.ndarray], threshold: float | None) -> list[str]:
    """Each image under its map, all coloured on one scale (as write_overlays draws them), as PNG data URLs."""
    from ..anomaly import overlay

    low = min(float(r.map.min()) for r in results)
    high = max(float(r.map.max()) for r in results)
    return [
        png_data_url(overlay(picture, r.map, r.score, low=low, high=high, threshold=threshold, anomalous=r.anomalous))
        for r, picture in zip(results, pictures)
    ]
