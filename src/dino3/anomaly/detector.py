"""The detector: fitted on a few good images, it scores new ones and draws their maps; saved as a folder
of safetensors + JSON (nothing pickled) that records how its features were made."""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path, atomic_write_text
from .._progress import progress_bar
from .._version import __version__
from ..errors import UsageError
from .features import RESOLUTION, FeatureMaker, ImageFeatures
from .scoring import (
    EXACT_UP_TO,
    MASK_THRESHOLD,
    ROTATIONS,
    SIGMA,
    TOP_FRACTION,
    Bank,
    Masking,
    block_similarities,
    cosine_distance,
    image_score,
    normalize,
    pixel_map,
    to_image_size,
)

FORMAT = "dino3-anomaly"
FORMAT_VERSION = 1
SETTINGS_FILE = "detector.json"
BANK_FILE = "bank.safetensors"


@dataclass(frozen=True)
class Settings:
    """Every switch of the algorithm (the package docstring says what each does and whose it is)."""

    resolution: int = RESOLUTION
    rotations: tuple[float, ...] = ROTATIONS
    masking: bool = False
    mask_shots: bool = False
    mask: Masking = field(default_factory=Masking)
    neighbours: int = 1
    top_fraction: float = TOP_FRACTION
    sigma: float = SIGMA
    upsample: str = "nearest"
    exact_up_to: int = EXACT_UP_TO

    def __post_init__(self) -> None:
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise UsageError(f"neighbours must be a positive integer, got {self.neighbours!r}")
        if not (isinstance(self.top_fraction, (int, float)) and 0 < self.top_fraction <= 1):
            raise UsageError(f"top_fraction must lie in (0, 1], got {self.top_fraction!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise UsageError(f"sigma must be a number >= 0 (0: no smoothing), got {self.sigma!r}")
        if self.upsample not in ("nearest", "bilinear"):
            raise UsageError(
                f"upsample must be 'nearest' (anomalib's) or 'bilinear' (the paper's), got {self.upsample!r}"
            )
        if not self.rotations or 0 not in self.rotations:
            raise UsageError(f"rotations must include 0 (the shot as it is), got {self.rotations!r}")
        if isinstance(self.exact_up_to, bool) or not isinstance(self.exact_up_to, int) or self.exact_up_to < 0:
            raise UsageError(f"exact_up_to must be a whole number of patches, got {self.exact_up_to!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rotations"] = list(self.rotations)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        data = dict(data)
        data["rotations"] = tuple(data["rotations"])
        data["mask"] = Masking(**data["mask"])
        return cls(**data)


@dataclass
class Result:
    """One scored image."""

    name: str  # its path, or "image i"
    score: float  # the mean of its top 1% patch distances (cosine distance, 0..2)
    anomalous: bool | None  # score > threshold; None when the detector has no threshold
    patch_scores: np.ndarray  # (h, w) float32 each patch's distance to the good patches (0 where masked)
    map: np.ndarray  # (H0, W0) float32 the smoothed map over the image's own pixels
    mask: np.ndarray | None = None  # (h, w) bool the object's patches, when masking is on
    picture: Path | None = None  # the overlay written for it, if any

    def to_json(self) -> dict[str, Any]:
        return {"path": self.name, "score": self.score, "anomalous": self.anomalous}


def check_threshold(threshold: Any) -> float | None:
    """A usable threshold (a number in [0, 2], the range of cosine distances) or None."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UsageError(f"threshold must be a number (a score in [0, 2]), 'auto' or None; got {threshold!r}")
    if not 0 <= threshold <= 2:
        raise UsageError(f"threshold {threshold!r} is outside [0, 2], the range of the scores (cosine distances)")
    return float(threshold)


class Detector:
    """A memory bank of good patches and what is needed to score new images against it."""

    def __init__(
        self,
        settings: Settings,
        bank: torch.Tensor,
        shot_of_row: torch.Tensor,
        shots: list[str],
        record: dict[str, Any] | None = None,
        threshold: float | None = None,
        threshold_source: str | None = None,
        leave_one_out: list[float] | None = None,
        maker: FeatureMaker | None = None,
    ) -> None:
        self.settings = settings
        self.bank = Bank(bank, settings.exact_up_to)  # (N, D) unit rows
        self.shot_of_row = shot_of_row  # (N,) int32: which good image each row comes from
        self.shots = shots
        self.record = record
        self.threshold = check_threshold(threshold)
        self.threshold_source = threshold_source if threshold is not None else None
        self.leave_one_out = leave_one_out or []
        self._maker = maker
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Detector({len(self.shots)} good images, {len(self.bank):,} patches in the bank, "
            f"threshold {self.threshold} ({self.threshold_source}), model {(self.record or {}).get('model')})"
        )

    @property
    def feature_dim(self) -> int:
        return int(self.bank.vectors.shape[1])

    def set_threshold(self, threshold: float | None) -> None:
        """A threshold of your own (None: no anomalous flag)."""
        self.threshold = check_threshold(threshold)
        self.threshold_source = "user" if threshold is not None else None

    # -- scoring ---------------------------------------------------------------------------------------
    def score(
        self,
        images: Any,
        *,
        model: Any = None,
        maps: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> list[Result]:
        """Score images (paths, PIL images, arrays, tensors; one or a list): features by the detector's
        model and preprocessing (another model is refused), then `score_features`. With `maps`, an
        overlay per image is written into that folder (render.overlay; `Result.picture`)."""
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if not sources:
            raise UsageError("no images to score")
        maker = self.feature_maker(model)
        bar = progress_bar(len(sources), "scoring", "img", progress)
        try:
            features = maker.features(sources, (0,), progress=bar.update)
        finally:
            bar.close()
        results = self.score_features([f[0] for f in features], patch=maker.processor.patch_size)
        if maps is not None:
            from .render import write_overlays

            write_overlays(results, sources, maps, self.threshold)
        return results

    def score_features(self, features: Sequence[ImageFeatures | torch.Tensor], patch: int = 16) -> list[Result]:
        """Score patch grids: ImageFeatures, or bare (h, w, D) grids (taken as a (h p, w p) image)."""
        results = []
        for i, item in enumerate(features):
            if isinstance(item, ImageFeatures):
                name, size, resized, grid = item.name, item.size, item.resized, item.grid
            else:
                grid = torch.as_tensor(item)
                name, size = f"image {i}", (grid.shape[0] * patch, grid.shape[1] * patch)
                resized = size
            if grid.ndim != 3 or grid.shape[-1] != self.feature_dim:
                raise UsageError(
                    f"{name}: patch features of shape {tuple(grid.shape)}; "
                    f"this detector takes (h, w, {self.feature_dim})"
                )
            distances, mask = self.patch_distances(grid)
            score = image_score(distances, self.settings.top_fraction)
            upsampled = pixel_map(distances, patch, resized, self.settings.sigma, self.settings.upsample)
            anomalous = None if self.threshold is None else bool(score > self.threshold)
            results.append(
                Result(
                    name,
                    score,
                    anomalous,
                    distances.numpy(),
                    to_image_size(upsampled, size).numpy(),
                    None if mask is None else mask.numpy(),
                )
            )
        return results

    def patch_distances(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, w, D) raw features -> (h, w) distances to the bank (0 on masked background), and the mask."""
        h, w, dim = grid.shape
        mask = self.settings.mask(grid) if self.settings.masking else None
        rows = grid.reshape(-1, dim) if mask is None else grid.reshape(-1, dim)[mask.reshape(-1)]
        found = self.bank.distances(normalize(rows), self.settings.neighbours)  # (q,)
        if mask is None:
            return found.reshape(h, w), None
        distances = torch.zeros(h * w)
        distances[mask.reshape(-1)] = found
        return distances.reshape(h, w), mask

    def feature_maker(self, model: Any = None) -> FeatureMaker:
        """The model that makes this detector's features (checked against the record), loaded once."""
        with self._lock:
            if model is None and self._maker is not None:
                return self._maker
            if self.record is None:
                raise UsageError("this detector was fitted on bare features: score features (score_features)")
            maker = FeatureMaker.replay(self.record, model)
            if model is None:
                self._maker = maker
            return maker

    # -- the folder ------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the folder: bank.safetensors first, then detector.json (which names the bank's id)."""
        from safetensors.torch import save_file

        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file; a detector is saved as a folder")
        folder.mkdir(parents=True, exist_ok=True)
        bank_id = uuid.uuid4().hex
        tensors = {
            "bank": torch.from_numpy(self.bank.vectors).contiguous(),
            "shot_of_row": self.shot_of_row.to(torch.int32).contiguous(),
        }
        with atomic_path(folder / BANK_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "id": bank_id})
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dino3_version": __version__,
            "id": bank_id,
            "settings": self.settings.to_dict(),
            "recipe": self.record,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "leave_one_out_scores": self.leave_one_out,
            "shots": self.shots,
            "bank_rows": len(self.bank),
            "search": "approximate (HNSW)" if self.bank.approximate else "exact",
        }
        atomic_write_text(folder / SETTINGS_FILE, json.dumps(document, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Detector:
        """A detector folder, checked whole: an incomplete or damaged one is refused with the reason."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder).expanduser()
        settings_file, bank_file = folder / SETTINGS_FILE, folder / BANK_FILE
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such detector folder")
        if not settings_file.is_file():
            raise UsageError(f"{folder} is not a detector (no {SETTINGS_FILE}); make one with dino3.anomaly.fit")
        try:
            document = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{settings_file} is damaged ({e}); fit the detector again") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise UsageError(f"{settings_file} is not a dino3 anomaly detector")
        if document.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"{folder} is format version {document.get('format_version')}; this dino3 reads {FORMAT_VERSION}"
            )
        try:
            with safe_open(str(bank_file), "pt") as f:
                metadata = f.metadata() or {}
                bank, shot_of_row = f.get_tensor("bank"), f.get_tensor("shot_of_row")
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            raise UsageError(f"{bank_file} is missing or damaged ({e}); fit the detector again") from None
        if metadata.get("id") != document.get("id"):
            raise UsageError(f"{folder}: {BANK_FILE} does not belong to {SETTINGS_FILE} (another fit's); fit again")
        try:
            settings = Settings.from_dict(document["settings"])
        except (KeyError, TypeError) as e:
            raise UsageError(f"{settings_file}: unreadable settings ({e})") from None
        return cls(
            settings,
            bank,
            shot_of_row,
            list(document.get("shots") or []),
            record=document.get("recipe"),
            threshold=document.get("threshold"),
            threshold_source=document.get("threshold_source"),
            leave_one_out=list(document.get("leave_one_out_scores") or []),
        )


# -- fitting -----------------------------------------------------------------------------------------------
def fit(
    images: Any,
    model: Any,
    *,
    resolution: int = RESOLUTION,
    rotate: bool = True,
    masking: bool = False,
    mask_shots: bool = False,
    mask_threshold: float = MASK_THRESHOLD,
    neighbours: int = 1,
    top_fraction: float = TOP_FRACTION,
    sigma: float = SIGMA,
    upsample: str = "nearest",
    threshold: float | str | None = "auto",
    exact_up_to: int = EXACT_UP_TO,
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Detector:
    """Fit a detector on a few good images (see the package docstring for each switch).

    threshold: "auto" (leave-one-out over the good images, when there are 2 or more), a number, or None.
    """
    sources = list(images) if isinstance(images, (list, tuple)) else [images]
    if not sources:
        raise UsageError("no good images given: fit needs at least one")
    settings = Settings(
        resolution=resolution,
        rotations=ROTATIONS if rotate else (0,),
        masking=masking,
        mask_shots=mask_shots,
        mask=Masking(threshold=mask_threshold),
        neighbours=neighbours,
        top_fraction=top_fraction,
        sigma=sigma,
        upsample=upsample,
        exact_up_to=exact_up_to,
    )
    _check_threshold_option(threshold)
    maker = FeatureMaker.for_model(model, resolution=resolution, dtype=dtype, device=device, batch_size=batch_size)
    bar = progress_bar(len(sources), "good images", "img", progress)
    try:
        shots = maker.features(sources, settings.rotations, progress=bar.update)
    finally:
        bar.close()
    return fit_features(
        [[f.grid for f in shot] for shot in shots],
        settings,
        threshold=threshold,
        names=[shot[0].name for shot in shots],
        record=maker.record,
        maker=maker,
    )


def fit_features(
    shots: Sequence[Sequence[torch.Tensor]],
    settings: Settings | None = None,
    *,
    threshold: float | str | None = "auto",
    names: list[str] | None = None,
    record: dict[str, Any] | None = None,
    maker: FeatureMaker | None = None,
) -> Detector:
    """The detector of good images given as patch grids: for each image, its (h, w, D) grids, the
    unrotated one first (then its rotations, which only join the bank)."""
    settings = settings or Settings()
    _check_threshold_option(threshold)
    if not shots or any(len(s) == 0 for s in shots):
        raise UsageError("no good images given: fit needs at least one, each with its patch grids")
    dims = {int(g.shape[-1]) for s in shots for g in s}
    if len(dims) != 1 or any(g.ndim != 3 for s in shots for g in s):
        raise UsageError(f"the good images' patch grids must be (h, w, D) with one D; got D in {sorted(dims)}")
    blocks = [normalize(torch.cat([_bank_rows(g, settings) for g in shot])) for shot in shots]
    bank = torch.cat(blocks)
    shot_of_row = torch.cat([torch.full((len(b),), i, dtype=torch.int32) for i, b in enumerate(blocks)])
    if len(bank) == 0:
        raise UsageError("the mask left no patch of the good images: lower mask_threshold or fit without mask_shots")
    loo = leave_one_out([s[0] for s in shots], blocks, settings) if len(shots) >= 2 else []
    value, source = None, None
    if threshold == "auto":
        if loo:
            value, source = max(loo), "leave-one-out"
    elif threshold is not None:
        value, source = threshold, "user"
    names = names or [f"image {i}" for i in range(len(shots))]
    return Detector(settings, bank, shot_of_row, names, record, value, source, loo, maker)


def _bank_rows(grid: torch.Tensor, settings: Settings) -> torch.Tensor:
    rows = grid.reshape(-1, grid.shape[-1])
    if settings.masking and settings.mask_shots:
        rows = rows[settings.mask(grid).reshape(-1)]
    return rows


def leave_one_out(grids: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor], settings: Settings) -> list[float]:
    """Each good image's score against a bank of the other good images (their rotations included):
    the scores a good image gets when it is not in the bank. Exact search, one pass over the bank."""
    k = settings.neighbours
    queries, masks, counts = [], [], []
    for grid in grids:
        mask = settings.mask(grid) if settings.masking else torch.ones(grid.shape[:2], dtype=torch.bool)
        rows = grid.reshape(-1, grid.shape[-1])[mask.reshape(-1)]
        queries.append(normalize(rows))
        masks.append(mask)
        counts.append(len(rows))
    found = block_similarities(torch.cat(queries), blocks, k)  # (B, Q, k)
    scores, start = [], 0
    for i, (mask, count) in enumerate(zip(masks, counts)):
        others = torch.cat([found[:i], found[i + 1 :]])[:, start : start + count]  # (B - 1, q, k)
        best = others.permute(1, 0, 2).reshape(count, -1)  # (q, (B - 1) k)
        best = best.topk(min(k, best.shape[1]), dim=1).values
        distances = torch.zeros(mask.numel())
        distances[mask.reshape(-1)] = cosine_distance(best)
        scores.append(image_score(distances, settings.top_fraction))
        start += count
    return scores


def _check_threshold_option(threshold: Any) -> None:
    if isinstance(threshold, str):
        if threshold != "auto":
            raise UsageError(f"threshold must be 'auto', a number or None; got {threshold!r}")
        return
    check_threshold(threshold)


# -- the thin layer for a command or an endpoint --------------------------------------------------------------
def scores_document(results: Sequence[Result], threshold: float | None = None) -> dict[str, Any]:
    """The JSON document of a scoring: {"images": [{"path", "score", "anomalous"}], "threshold": ...}."""
    return {"images": [r.to_json() for r in results], "threshold": threshold}


def write_scores(results: Sequence[Result], path: str | os.PathLike, threshold: float | None = None) -> Path:
    """Write scores_document(...) as a JSON file, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(scores_document(results, threshold), indent=1) + "\n")
    return path
