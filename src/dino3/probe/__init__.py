"""Probes: classifiers on frozen DINOv3 features, by Meta's protocols (logistic regression over a
grid of C, k-NN with a temperature-weighted vote), trained from a folder of labelled images.

    result = dino3.probe.train("flowers/", model="vits16", output="flowers-probe")
    probe = dino3.probe.Probe.load("flowers-probe")
    probe.predict(["rose.jpg"]).labels            # [["rose", "tulip", ...]], best first
    dino3.probe.classify(["photos/"], "flowers-probe")   # files, folders, globs, as `dino3 embed`
    dino3.probe.evaluate("flowers-test/", "flowers-probe").table()
"""

from __future__ import annotations

from .classify import Classified, classify
from .dataset import Dataset, read_dataset, stratified_split
from .evaluate import Evaluation, draw_confusion, evaluate, metrics
from .knn import KS, TEMPERATURE
from .logreg import C_GRID
from .probe import FEATURES, METHODS, Predictions, Probe
from .train import TrainResult, train

__all__ = [
    "C_GRID",
    "FEATURES",
    "KS",
    "METHODS",
    "TEMPERATURE",
    "Classified",
    "Dataset",
    "Evaluation",
    "Predictions",
    "Probe",
    "TrainResult",
    "classify",
    "draw_confusion",
    "evaluate",
    "metrics",
    "read_dataset",
    "stratified_split",
    "train",
]
