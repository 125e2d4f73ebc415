"""How good a probe is on labelled images: top-1 and top-5 accuracy, each class's precision and
recall, and the confusion matrix, drawn as a PNG with PIL (no plotting library needed).

    report = dino3.probe.evaluate("flowers-test/", "flowers-probe")
    print(report.table()); report.draw("confusion.png")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path
from ..errors import UsageError
from .classify import features_for, load_probe
from .dataset import read_dataset
from .probe import Probe

TOP = 5


@dataclass
class Evaluation:
    classes: list[str]
    count: int  # images evaluated
    top1: float
    top5: float  # top-min(5, classes)
    precision: list[float | None]  # per class; None: never predicted
    recall: list[float | None]  # per class; None: no image of it
    support: list[int]  # images of each class
    confusion: np.ndarray  # (K, K) counts: rows the true class, columns the predicted one
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images left out
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.count,
            "top1": self.top1 if self.count else None,  # no image: no accuracy (JSON has no NaN)
            "top5": self.top5 if self.count else None,
            "classes": [
                {"name": name, "precision": p, "recall": r, "images": n}
                for name, p, r, n in zip(self.classes, self.precision, self.recall, self.support)
            ],
            "confusion": self.confusion.tolist(),
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
        }

    def table(self) -> str:
        k = min(TOP, len(self.classes))
        lines = [f"{self.count} images: top-1 accuracy {self.top1:.4f}, top-{k} accuracy {self.top5:.4f}"]
        width = max(8, *(len(name) for name in self.classes))
        lines.append(f"{'class':<{width}}  precision  recall  images")
        for name, p, r, n in zip(self.classes, self.precision, self.recall, self.support):
            lines.append(f"{name:<{width}}  {_fmt(p):>9}  {_fmt(r):>6}  {n:>6}")
        return "\n".join(lines)

    def draw(self, path: str | os.PathLike) -> Path:
        return draw_confusion(self.confusion, self.classes, path)


def metrics(probabilities: torch.Tensor, targets: Any, classes: list[str]) -> Evaluation:
    """Scores (N, K) and true class indices (N,) -> an Evaluation."""
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    probabilities = probabilities.detach().cpu()
    K = len(classes)
    top = probabilities.topk(min(TOP, K), dim=1).indices  # (N, 5)
    predicted = top[:, 0]
    count = len(targets)
    top1 = (predicted == targets).double().mean().item() if count else float("nan")
    top5 = (top == targets[:, None]).any(dim=1).double().mean().item() if count else float("nan")
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (targets.numpy(), predicted.numpy()), 1)
    hits = np.diag(confusion)
    predicted_count, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = [float(h / n) if n else None for h, n in zip(hits, predicted_count)]
    recall = [float(h / n) if n else None for h, n in zip(hits, support)]
    return Evaluation(list(classes), count, top1, top5, precision, recall, [int(n) for n in support], confusion)


def evaluate(
    dataset: str | os.PathLike,
    probe: Probe | str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Evaluation:
    """Evaluate a probe on a labelled dataset (the forms `train` takes); the images are embedded
    with the probe's model and settings. Every class of the dataset must be one of the probe's."""
    from ..recipe import check_options
    from .classify import RUNTIME_OPTIONS

    check_options(**{key: options[key] for key in RUNTIME_OPTIONS if options.get(key) is not None})
    probe = load_probe(probe, device)
    data = read_dataset(dataset, labels)
    unknown = sorted(set(data.labels) - set(probe.classes))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UsageError(
            f"{data.source} has classes the probe does not know: {shown} (the probe knows "
            f"{', '.join(probe.classes[:10])}{'...' if len(probe.classes) > 10 else ''})"
        )
    if data.features is not None:
        probe.check_embeddings(data.meta or {}, data.source)
        paths, features, failures, notes = data.paths, data.features, [], []
    else:
        from ..embed import Inputs

        found = features_for(
            probe, Inputs(data.paths, data.skipped), model=model, device=device, progress=progress, **options
        )
        paths, features, failures, notes = found.paths, found.features, found.failures, found.notes
    label_of = dict(zip(data.paths, data.labels))
    index = {name: i for i, name in enumerate(probe.classes)}
    targets = [index[label_of[p]] for p in paths]
    result = metrics(probe.probabilities(features), targets, probe.classes)
    result.failures, result.notes = failures, list(data.notes) + notes
    return result


def draw_confusion(confusion: np.ndarray, classes: list[str], path: str | os.PathLike) -> Path:
    """The confusion matrix as a PNG: rows the true class, columns the predicted one, each cell's
    colour its share of the row (white 0 to dark blue 1), counts written when the cells are large
    enough, class names when there is room for them."""
    from PIL import Image, ImageDraw, ImageFont

    K = len(classes)
    cell = int(np.clip(720 // max(K, 1), 3, 40))
    font = ImageFont.load_default()
    labelled = cell >= 10
    names = [name if len(name) <= 24 else name[:23] + "…" for name in classes]
    probe_draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((probe_draw.textbbox((0, 0), n, font=font)[2] for n in names), default=0) if labelled else 0
    margin = 8
    left = margin + text_width + (margin if labelled else 0) + 14  # names, then the "true" axis title
    top = margin + 18 + text_width + (margin if labelled else 0) + 16  # title, "predicted", names
    size = (left + K * cell + margin, top + K * cell + margin)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (margin, margin),
        "confusion matrix: rows true class, columns predicted; colour = share of the row",
        fill="black",
        font=font,
    )

    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=np.float64), where=rows > 0)
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    for i in range(K):
        for j in range(K):
            colour = tuple(int(v) for v in np.round(low + (high - low) * share[i, j]))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=colour)
            if cell >= 24 and confusion[i, j]:
                text = str(int(confusion[i, j]))
                box = draw.textbbox((0, 0), text, font=font)
                draw.text(
                    (x0 + (cell - box[2]) / 2, y0 + (cell - box[3]) / 2),
                    text,
                    fill="white" if share[i, j] > 0.5 else "black",
                    font=font,
                )
    draw.rectangle((left - 1, top - 1, left + K * cell, top + K * cell), outline=(120, 120, 120))
    draw.text((left, margin + 16), "predicted", fill="black", font=font)
    vertical = Image.new("RGB", (60, 14), "white")
    ImageDraw.Draw(vertical).text((0, 0), "true", fill="black", font=font)
    image.paste(vertical.rotate(90, expand=True), (margin, top))
    if labelled:
        for i, name in enumerate(names):
            y = top + i * cell + (cell - 11) / 2
            draw.text((left - margin - draw.textbbox((0, 0), name, font=font)[2], y), name, fill="black", font=font)
            label = Image.new("RGB", (text_width + 2, 14), "white")
            ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font)
            column = label.rotate(90, expand=True)
            image.paste(column, (left + i * cell + (cell - 14) // 2, top - margin - column.height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
