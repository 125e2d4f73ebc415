"""One logistic regression for every room that fits a linear classifier on frozen features (the
probes, the foreground classifier): the model, its two solvers, the sweep of C and its scores.

The model is scikit-learn's `LogisticRegression` (L2 penalty, lbfgs), so that a C means the same
model in both: the mean cross-entropy plus ||W||^2 / (2 C n), the intercept left unpenalised; for
three classes or more the multinomial (softmax) loss over one weight row per class, for two the
binary logistic loss over one weight vector (stored as two rows, the first zero, so that softmax
gives the same probabilities). Everything is float64, on the features' device, with the loss and
its gradient written out (a few matmuls, no autograd).

Two solvers reach the same optimum:
- "lbfgs": torch's L-BFGS with a strong-Wolfe line search, on centred features (the unpenalised
  intercept absorbs the mean, so W is the same, and L-BFGS needs several times fewer steps on
  features that share a large mean, as DINOv3's do). Any number of classes, any width.
- "newton": Newton's method with a backtracking line search, for two classes: a few dozen steps
  even where the classes are nearly separable and first-order methods crawl; the exact Hessian
  ((D + 1)^2 float64) makes it the choice up to NEWTON_MAX_DIM features.

A sweep fits each C of a grid, smallest first, each fit starting from the previous C's weights, and
scores it on held-out rows (top-1 accuracy, or the average precision of the positive class); the
best score wins, the smallest C among equals. `sweep_groups` holds each group (an image, say) out
in turn and ranks the C values by their mean score over the groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._progress import progress_bar
from .errors import UsageError

SOLVERS = ("lbfgs", "newton")
METRICS = ("accuracy", "average_precision")
NEWTON_MAX_DIM = 2048  # up to this width the exact Hessian is cheap
HISTORY_BYTES = 256 << 20  # memory for L-BFGS's past steps: up to 100 of them (scikit-learn keeps 10)


@dataclass
class LinearModel:
    """Fitted weights: one row per class (two classes: the first row zero)."""

    weight: torch.Tensor  # (K, D) float64
    bias: torch.Tensor  # (K,) float64
    iterations: int  # loss evaluations the fit took

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K), in float64."""
        features = features.to(device=self.weight.device, dtype=torch.float64)
        return torch.addmm(self.bias, features, self.weight.T)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K) float64 class probabilities."""
        return torch.softmax(self.logits(features), dim=1)

    def binary_logit(self, features: torch.Tensor) -> torch.Tensor:
        """Two classes: (N, D) -> (N,) float64 logit of class 1 against class 0."""
        if self.weight.shape[0] != 2:
            raise UsageError(f"a binary logit needs a two-class model; this one has {self.weight.shape[0]} classes")
        features = features.to(device=self.weight.device, dtype=torch.float64)
        return features @ (self.weight[1] - self.weight[0]) + (self.bias[1] - self.bias[0])

    def positive_probability(self, features: torch.Tensor) -> torch.Tensor:
        """Two classes: (N, D) -> (N,) float64 probability of class 1 (scikit-learn's predict_proba[:, 1])."""
        return torch.sigmoid(self.binary_logit(features))


def fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    C: float,
    *,
    solver: str = "lbfgs",
    tol: float = 1e-6,
    max_iter: int = 1000,
    init: LinearModel | None = None,
) -> LinearModel:
    """Fit at one C. features (N, D), labels (N,) class indices in [0, num_classes); float64 on the
    features' device. The fit stops when no entry of the mean loss's gradient exceeds `tol`
    (scipy's criterion, as scikit-learn runs it). `init` starts from another fit (a warm start)."""
    if solver not in SOLVERS:
        raise UsageError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if num_classes < 2:
        raise UsageError(f"a classifier needs two classes or more, got {num_classes}")
    if not C > 0:
        raise UsageError(f"C must be a number > 0, got {C!r}")
    X = features.to(torch.float64)  # (N, D)
    y = labels.to(device=X.device, dtype=torch.long)  # (N,)
    if solver == "newton":
        if num_classes != 2:
            raise UsageError(f"the newton solver fits two classes; use lbfgs for {num_classes}")
        return _fit_newton(X, y, C, tol, max_iter, init)
    return _fit_lbfgs(X, y, num_classes, C, tol, max_iter, init)


def _fit_lbfgs(
    X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, tol: float, max_iter: int, init: LinearModel | None
) -> LinearModel:
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
        tolerance_change=min(1e-12, tol * tol),
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


def _fit_newton(
    X: torch.Tensor, y: torch.Tensor, C: float, tol: float, max_iter: int, init: LinearModel | None
) -> LinearModel:
    """Newton's method with a backtracking (Armijo) line search on the strictly convex mean loss,
    over theta = (w, b), (D + 1,)."""
    n, dim = X.shape
    sign = y.to(torch.float64) * 2 - 1  # (n,) +-1
    theta = torch.zeros(dim + 1, dtype=torch.float64, device=X.device)
    if init is not None:
        theta[:dim] = init.weight[1] - init.weight[0]
        theta[dim] = init.bias[1] - init.bias[0]
    evaluations = 0

    def loss_and_grad(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal evaluations
        evaluations += 1
        z = torch.addmv(theta[dim:].expand(n), X, theta[:dim])  # (n,)
        margin = -sign * z
        value = (torch.nn.functional.softplus(margin).sum() + 0.5 / C * theta[:dim].square().sum()) / n
        slope = -sign * torch.sigmoid(margin)  # d loss / d z, (n,)
        grad = torch.empty_like(theta)
        grad[:dim] = (X.T @ slope + theta[:dim] / C) / n
        grad[dim] = slope.sum() / n
        return value, grad, z

    ridge = torch.full((dim + 1,), 1.0 / (C * n), dtype=torch.float64, device=X.device)
    ridge[dim] = 1e-12  # the intercept is not penalised; a whisker keeps the system solvable
    value, grad, z = loss_and_grad(theta)
    for _ in range(max_iter):
        if float(grad.abs().max()) <= tol:
            break
        weight = torch.sigmoid(z) * torch.sigmoid(-z) / n  # (n,) the loss's curvature at each sample
        hessian = torch.empty(dim + 1, dim + 1, dtype=torch.float64, device=X.device)
        hessian[:dim, :dim] = (X.T * weight) @ X
        hessian[:dim, dim] = hessian[dim, :dim] = X.T @ weight
        hessian[dim, dim] = weight.sum()
        hessian.diagonal().add_(ridge)
        step = torch.linalg.solve(hessian, -grad)
        slope, size = float(grad @ step), 1.0
        while True:  # Armijo: accept the first size that lowers the loss enough
            trial = theta + size * step
            new_value, new_grad, new_z = loss_and_grad(trial)
            if float(new_value) <= float(value) + 1e-4 * size * slope or size < 1e-10:
                break
            size /= 2
        if size < 1e-10:  # no progress left at float64's precision
            break
        theta, value, grad, z = trial, new_value, new_grad, new_z
    zero = torch.zeros(1, dim, dtype=torch.float64, device=X.device)
    weight = torch.cat((zero, theta[None, :dim]))  # (2, D): class 0's logit fixed at zero
    bias = torch.cat((torch.zeros(1, dtype=torch.float64, device=X.device), theta[dim:]))
    return LinearModel(weight, bias, evaluations)


def _history(parameters: int) -> int:
    """How many past steps L-BFGS keeps: 100 (torch's default; on DINOv3 features it needs fewer
    steps than scipy's 10) unless that would take more than HISTORY_BYTES, never under 10."""
    return int(min(100, max(10, HISTORY_BYTES // (2 * 8 * parameters))))


# -- scores ---------------------------------------------------------------------------------------------------
def average_precision(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """scikit-learn's average_precision_score: the precision at each distinct score threshold
    (highest first), weighted by the recall it adds. 0 when there is no positive."""
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    y, s = labels.to(torch.float64)[order], scores.to(torch.float64)[order]
    last = torch.ones_like(s, dtype=torch.bool)  # the last position of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    true_pos = torch.cumsum(y, 0)[last]
    predicted = (torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device))[last]
    positives = float(true_pos[-1]) if len(true_pos) else 0.0
    if positives == 0:
        return 0.0
    precision = true_pos / predicted
    recall = true_pos / positives
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64, device=s.device))
    return float((gained * precision).sum())


def score(model: LinearModel, features: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """The model on held-out rows: top-1 accuracy, or (two classes) the average precision of class 1."""
    labels = labels.to(model.weight.device)
    if metric == "accuracy":
        return (model.logits(features).argmax(dim=1) == labels).double().mean().item()
    if metric == "average_precision":
        return average_precision(labels == 1, model.positive_probability(features))
    raise UsageError(f"metric must be one of {METRICS}, got {metric!r}")


# -- the choice of C ----------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """The choice of C: each held-out part's score at each C of the grid, and the C chosen."""

    cs: tuple[float, ...]  # the grid, in the order given
    scores: torch.Tensor  # (folds, len(cs)) float64: each held-out part's score at each C
    C: float  # the chosen one: the best mean score, the smallest C among equals
    metric: str = "accuracy"
    folds: list[int] = field(default_factory=lambda: [0])  # the groups held out (one split: [0])
    model: LinearModel | None = None  # one split: the fit at the chosen C on the training part

    def mean_scores(self) -> dict[float, float]:
        """C -> the mean held-out score over the folds, C ascending."""
        means = self.scores.mean(dim=0).tolist()
        return dict(sorted(zip(self.cs, means)))

    @property
    def best(self) -> float:
        """Deprecated: the chosen C is `C` (the foreground classifier's sweep called it `best`)."""
        warnings.warn("Sweep.best is deprecated; use Sweep.C", DeprecationWarning, stacklevel=2)
        return self.C


def sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    cs: Sequence[float],
    *,
    metric: str = "accuracy",
    solver: str = "lbfgs",
    tol: float = 1e-4,
    max_iter: int = 1000,
    progress: bool = False,
) -> Sweep:
    """Fit each C of the grid (smallest first, warm-started) on the training part and score it on
    the held-out part; the best score wins, the smallest C among equals. `progress`: a bar on stderr."""
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {METRICS}, got {metric!r}")
    cs = tuple(float(c) for c in cs)
    if not cs:
        raise UsageError("the grid of C is empty")
    X = train_features.to(torch.float64)
    model, found, best = None, {}, None
    with progress_bar(len(cs), "choosing C", "C", progress) as bar:
        for C in sorted(cs):
            model = fit(X, train_labels, num_classes, C, solver=solver, tol=tol, max_iter=max_iter, init=model)
            found[C] = score(model, val_features, val_labels, metric)
            if best is None or found[C] > found[best[0]]:
                best = (C, model)
            bar.update(1)
    table = torch.tensor([[found[c] for c in cs]], dtype=torch.float64)
    return Sweep(cs, table, best[0], metric, [0], best[1])


def sweep_groups(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    cs: Sequence[float],
    *,
    num_classes: int = 2,
    metric: str = "average_precision",
    solver: str = "lbfgs",
    tol: float = 1e-4,
    max_iter: int = 1000,
) -> Sweep:
    """Leave one group out: for each group, `sweep` on the other groups' rows scored on its own; the
    best C has the highest mean score over the groups (the smallest C among equals). A group whose
    others hold one class only is skipped (there is nothing to fit)."""
    cs = tuple(float(c) for c in cs)
    members = [int(g) for g in torch.unique(groups)]
    if len(members) < 2:
        raise UsageError("leaving one group out needs at least 2 groups")
    rows, folds = [], []
    for group in members:
        held = groups == group
        train_labels = labels[~held]
        if len(torch.unique(train_labels)) < 2:
            continue
        found = sweep(
            features[~held], train_labels, features[held], labels[held], num_classes, cs,
            metric=metric, solver=solver, tol=tol, max_iter=max_iter,
        )  # fmt: skip
        rows.append(found.scores[0])
        folds.append(group)
    if not rows:
        raise UsageError("no group could be held out: the other groups hold one class only, whichever is held out")
    table = torch.stack(rows)  # (folds, len(cs))
    means = table.mean(dim=0)
    order = sorted(range(len(cs)), key=lambda i: cs[i])
    chosen = max(order, key=lambda i: (float(means[i]), -cs[i]))  # the best mean, the smallest C among equals
    return Sweep(cs, table, cs[chosen], metric, folds, None)
