"""Logistic regression on frozen features, as Meta's linear-probe protocol runs it
(dinov3/eval/log_regression.py): L2-penalised, L-BFGS in float64, one fit per C of a log grid, the C
with the best accuracy on held-out images, then one fit on all images at that C.

The objective is scikit-learn's `LogisticRegression(solver="lbfgs")`, so that a C means the same
model in both: the mean cross-entropy plus ||W||^2 / (2 C n), the intercept left unpenalised; for
three classes or more the multinomial (softmax) loss over one weight row per class, for two the
binary logistic loss over one weight vector (stored as two rows, the first zero, so that softmax
gives the same probabilities). The solver is torch's L-BFGS with a strong-Wolfe line search, on the
CPU or a GPU, with the loss and its gradient written out (two matmuls, no autograd).

Two exact shortcuts make it fast: the features are centred (the unpenalised intercept absorbs the
mean, so W is the same, and L-BFGS needs several times fewer steps on features that share a large
mean, as DINOv3's do), and the sweep goes up the grid with each fit starting from the previous C's
weights. Meta runs scikit-learn with tol=1e-12 and 1000 iterations at each C; here the sweep stops
at scikit-learn's default tolerance (it only ranks the C values) and the final fit goes further.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Meta's grid: 45 values of C, 10^-6 ... 10^5 evenly spaced in log (C_POWER_RANGE = linspace(-6, 5, 45)).
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))
# A fit stops when no gradient entry exceeds the tolerance (scipy's criterion, as scikit-learn runs it).
TOL = 1e-6  # the probe's fit: probabilities within ~1e-4 of the exact optimum on DINOv3-scale features
SWEEP_TOL = 1e-4  # the sweep only ranks the C values by held-out accuracy (scikit-learn's default tol)
MAX_ITER = 1000  # Meta's max_train_iters
HISTORY_BYTES = 256 << 20  # memory for L-BFGS's past steps: up to 100 of them (scikit-learn keeps 10)


@dataclass
class LinearModel:
    weight: torch.Tensor  # (K, D) float64
    bias: torch.Tensor  # (K,) float64
    iterations: int  # loss evaluations the fit took

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K), in float64."""
        features = features.to(device=self.weight.device, dtype=torch.float64)
        return torch.addmm(self.bias, features, self.weight.T)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features), dim=1)


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
    """Fit at one C. features (N, D), labels (N,) class indices in [0, num_classes); float64 on the
    features' device. `init` starts from another fit's weights (a warm start)."""
    X = features.to(torch.float64)  # (N, D)
    y = labels.to(device=X.device, dtype=torch.long)  # (N,)
    n, dim = X.shape
    # Centred features: W x + b = W (x - mean) + (b + W mean), and b is not penalised, so this is the
    # same problem with the same W; L-BFGS solves it in far fewer steps when the features share a
    # large mean, as DINOv3's do.
    mean = X.mean(dim=0)  # (D,)
    X = X - mean
    binary = num_classes == 2
    rows = 1 if binary else num_classes  # binary: one vector, the logit of class 1 against class 0
    W = torch.zeros(rows, dim, dtype=torch.float64, device=X.device)
    b = torch.zeros(rows, dtype=torch.float64, device=X.device)
    if init is not None:
        W.copy_(init.weight[-rows:] if not binary else init.weight[1:] - init.weight[:1])
        b.copy_((init.bias[-rows:] if not binary else init.bias[1:] - init.bias[:1]) + W @ mean)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)  # (N, K)
    penalty = 1.0 / (C * n)
    optimizer = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=_history(rows * (dim + 1)),
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def loss_and_gradient() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        logits = torch.addmm(b, X, W.T)  # (N, rows)
        if binary:
            logits = torch.cat((torch.zeros_like(logits), logits), dim=1)  # (N, 2)
        # softmax cross-entropy written out: elementwise ops and row reductions, which stay on one
        # thread for small problems (log_softmax does not, and costs far more there on a busy CPU)
        top = logits.amax(dim=1, keepdim=True)  # (N, 1)
        e = (logits - top).exp_()
        total = e.sum(dim=1, keepdim=True)
        loss = ((top + total.log()).sum() - (logits * onehot).sum()) / n + 0.5 * penalty * (W * W).sum()
        residual = (e.div_(total) - onehot).div_(n)  # (N, K): d loss / d logits
        if binary:
            residual = residual[:, 1:]
        W.grad = residual.T @ X + penalty * W  # (rows, D)
        b.grad = residual.sum(dim=0)
        return loss

    optimizer.step(loss_and_gradient)
    b = b - W @ mean  # back to uncentred features
    if binary:  # two rows: class 0's logit fixed at zero
        W = torch.cat((torch.zeros_like(W), W))
        b = torch.cat((torch.zeros_like(b), b))
    return LinearModel(W, b, evaluations)


@dataclass
class Sweep:
    C: float  # the chosen one
    scores: dict[float, float]  # C -> held-out top-1 accuracy, for each C of the grid
    model: LinearModel  # the fit at the chosen C (on the training part only)


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
) -> Sweep:
    """Fit each C of the grid (smallest first, warm-started) on the training part and score it on the
    held-out part; the best accuracy wins, the smallest C among equals (as Meta's tracker picks)."""
    X = train_features.to(torch.float64)
    val_labels = val_labels.to(X.device)
    model, scores, best = None, {}, None
    for C in sorted(grid):
        model = fit(X, train_labels, num_classes, C, tol=tol, max_iter=max_iter, init=model)
        predicted = model.logits(val_features).argmax(dim=1)
        scores[C] = (predicted == val_labels).double().mean().item()
        if best is None or scores[C] > scores[best[0]]:
            best = (C, model)
    return Sweep(best[0], scores, best[1])


def _history(parameters: int) -> int:
    """How many past steps L-BFGS keeps: 100 (torch's default; on DINOv3 features it needs fewer
    steps than scipy's 10) unless that would take more than HISTORY_BYTES, never under 10."""
    return int(min(100, max(10, HISTORY_BYTES // (2 * 8 * parameters))))
