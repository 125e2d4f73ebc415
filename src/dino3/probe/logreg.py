"""The linear probe's protocol, as Meta runs it (dinov3/eval/log_regression.py): L2-penalised
logistic regression in float64 (`dino3.linear`, scikit-learn's model), one fit per C of a log grid,
the C with the best accuracy on held-out images, then one fit on all images at that C.

Meta runs scikit-learn with tol=1e-12 and 1000 iterations at each C; here the sweep stops at
scikit-learn's default tolerance (it only ranks the C values) and the final fit goes further. The
solver is L-BFGS on centred features, warm-started up the grid (see dino3.linear).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import linear
from ..linear import LinearModel, Sweep

__all__ = ["C_GRID", "MAX_ITER", "SWEEP_TOL", "TOL", "LinearModel", "Sweep", "fit", "sweep"]

# Meta's grid: 45 values of C, 10^-6 ... 10^5 evenly spaced in log (C_POWER_RANGE = linspace(-6, 5, 45)).
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))
TOL = 1e-6  # the probe's fit: probabilities within ~1e-4 of the exact optimum on DINOv3-scale features
SWEEP_TOL = 1e-4  # the sweep only ranks the C values by held-out accuracy (scikit-learn's default tol)
MAX_ITER = 1000  # Meta's max_train_iters


def fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    C: float,
    *,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    init: LinearModel | None = None,
) -> LinearModel:
    """The probe's fit at one C (L-BFGS); see dino3.linear.fit."""
    return linear.fit(features, labels, num_classes, C, solver="lbfgs", tol=tol, max_iter=max_iter, init=init)


def sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    grid: tuple[float, ...] = C_GRID,
    *,
    tol: float = SWEEP_TOL,
    max_iter: int = MAX_ITER,
    progress: bool = False,
) -> Sweep:
    """Meta's choice of C: each C of the grid fitted on the training part, scored by held-out top-1
    accuracy; the best wins, the smallest C among equals (as Meta's tracker picks)."""
    return linear.sweep(
        train_features, train_labels, val_features, val_labels, num_classes, grid,
        metric="accuracy", solver="lbfgs", tol=tol, max_iter=max_iter, progress=progress,
    )  # fmt: skip
