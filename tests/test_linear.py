"""dino3.linear, the one logistic regression of the probes and the foreground classifier: its two
solvers reach scikit-learn's model, the sweep's choice of C, and the deprecated names that still work.
(Each room's own tests check it against scikit-learn on its own data: test_probe.py, test_dense.py.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dino3 import dense, linear
from dino3.errors import UsageError

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402


def _two_digits() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    keep = (y == 3) | (y == 8)  # the two digits most alike: not separable at small C
    return torch.from_numpy(X[keep]), torch.from_numpy((y[keep] == 8).astype(np.int64))


@pytest.mark.parametrize("C", [1e-4, 1e-2, 1.0])
def test_both_solvers_reach_scikit_learns_binary_model(C):
    """Bugs planted: the penalty of Newton's gradient not divided by n; L-BFGS's class-0 row not zero."""
    X, y = _two_digits()
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(X.numpy(), y.numpy())
    expected = reference.predict_proba(X.numpy())[:, 1]
    for solver in linear.SOLVERS:
        model = linear.fit(X, y, 2, C, solver=solver, tol=1e-8, max_iter=20_000)
        assert np.abs(model.positive_probability(X).numpy() - expected).max() <= 1e-5, solver
        assert np.abs(model.probabilities(X)[:, 1].numpy() - expected).max() <= 1e-5, solver


def test_warm_starts_and_newton_from_an_lbfgs_fit():
    X, y = _two_digits()
    start = linear.fit(X, y, 2, 0.01, solver="lbfgs")
    cold = linear.fit(X, y, 2, 0.1, solver="newton", tol=1e-9)
    warm = linear.fit(X, y, 2, 0.1, solver="newton", tol=1e-9, init=start)
    assert warm.iterations < cold.iterations
    assert (warm.positive_probability(X) - cold.positive_probability(X)).abs().max() < 1e-7


def test_the_sweeps_pick_the_best_score_and_the_smallest_C_among_equals():
    """Bug planted: ties going to the largest C (Meta's tracker and numpy's argmax keep the first)."""
    X, y = _two_digits()
    cs = (1e-6, 1e-5, 1e-1, 1.0)  # the two smallest C score alike: every fit predicts one class
    found = linear.sweep(X[::2], y[::2], X[1::2], y[1::2], 2, cs)
    scores = found.mean_scores()
    assert list(scores) == sorted(cs) and min(c for c in cs if scores[c] == max(scores.values())) == found.C
    assert found.scores.shape == (1, 4) and found.model is not None
    tied = linear.sweep(X[::2], y[::2], X[1::2], y[1::2], 2, (1e-6, 1e-5))
    assert tied.scores[0, 0] == tied.scores[0, 1] and tied.C == 1e-6
    groups = torch.arange(len(y)) % 3
    by_group = linear.sweep_groups(X, y, groups, cs, solver="newton", tol=1e-8, max_iter=200)
    assert by_group.folds == [0, 1, 2] and by_group.scores.shape == (3, 4) and by_group.model is None
    assert max(sorted(cs), key=lambda c: by_group.mean_scores()[c]) == by_group.C
    with pytest.raises(UsageError, match="two classes"):
        linear.fit(X, torch.arange(len(y)) % 3, 3, 1.0, solver="newton")


def test_the_foreground_names_that_moved_still_work_and_say_where_they_went():
    X, y = _two_digits()
    with pytest.warns(DeprecationWarning, match="dino3.linear.fit"):
        params = dense.fit_logistic(X, y, 0.1)
    model = linear.fit(X, y, 2, 0.1, solver="newton", tol=1e-8, max_iter=200)
    assert torch.equal(params[:-1], model.weight[1]) and float(params[-1]) == float(model.bias[1])
    found = dense.sweep_c(X, y, torch.arange(len(y)) % 2, cs=(1e-3, 1e-1))
    assert isinstance(found, dense.foreground.Sweep) and found.cs == (1e-3, 1e-1)
    with pytest.warns(DeprecationWarning, match="use Sweep.C"):
        assert found.best == found.C
    assert dense.average_precision is linear.average_precision


def test_average_precision_counts_tied_scores_as_one_threshold():
    """Bug pinned (the fresh mutation pass of issue 31): tied scores taken one by one, as if the
    order among equals meant something: the average precision then depended on that order. Equal to
    scikit-learn's on scores with many ties, and the same whichever way tied items are ordered."""
    from sklearn.metrics import average_precision_score

    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.2, 0.2])
    expected = average_precision_score(labels.numpy(), scores.numpy())
    assert linear.average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)
    order = torch.tensor([0, 3, 4, 1, 2, 5])  # the positives first among equals: the same answer
    assert linear.average_precision(labels[order], scores[order]) == pytest.approx(expected, abs=1e-12)


def test_bad_arguments_are_refused_naming_them():
    """A solver, class count, C, metric or grid out of range is refused before any fit, naming it."""
    X, y = _two_digits()
    for kwargs, message in [
        ({"solver": "sgd"}, "solver must be one of ('lbfgs', 'newton'), got 'sgd'"),
        ({"num_classes": 1}, "a classifier needs two classes or more, got 1"),
        ({"C": 0.0}, "C must be a number > 0, got 0.0"),
        ({"C": float("nan")}, "C must be a number > 0, got nan"),
    ]:
        args = {"num_classes": 2, "C": 1.0, **kwargs}
        with pytest.raises(UsageError, match=re.escape(message)):
            linear.fit(X, y, args.pop("num_classes"), args.pop("C"), **args)
    with pytest.raises(
        UsageError, match=re.escape("metric must be one of ('accuracy', 'average_precision'), got 'f1'")
    ):
        linear.sweep(X, y, X, y, 2, (1.0,), metric="f1")
    with pytest.raises(UsageError, match="the grid of C is empty"):
        linear.sweep(X, y, X, y, 2, ())
    model = linear.fit(X[:20], y[:20], 2, 1.0)
    with pytest.raises(UsageError, match="metric must be one of"):
        linear.score(model, X, y, "f1")


def test_a_binary_logit_needs_two_classes():
    """The positive probability of a 3-class model is refused, naming its class count."""
    model = linear.LinearModel(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0)
    with pytest.raises(UsageError, match="needs a two-class model; this one has 3 classes"):
        model.positive_probability(torch.zeros(1, 4))


def test_accuracy_and_average_precision_scores_equal_hand_counts():
    """score: accuracy is the share of argmax hits; average precision of class 1; no positive: 0."""
    weight = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    model = linear.LinearModel(weight, torch.zeros(2, dtype=torch.float64), 0)
    X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])  # logits of class 1: 2, -2, 1, -1
    y = torch.tensor([1, 0, 0, 0])
    assert linear.score(model, X, y, "accuracy") == pytest.approx(3 / 4)
    three = linear.LinearModel(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0)
    X3 = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    assert linear.score(three, X3, torch.tensor([0, 2, 0, 1, 1]), "accuracy") == pytest.approx(2 / 5)  # rows 0, 1
    from sklearn.metrics import average_precision_score

    y2 = torch.tensor([0, 1, 1, 0])  # ranked 2, 1, -1, -2: labels 0, 1, 0, 1
    expected = average_precision_score(y2.numpy(), model.positive_probability(X).numpy())
    assert linear.score(model, X, y2, "average_precision") == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert linear.average_precision(torch.zeros(4), torch.rand(4)) == 0.0


def test_lbfgs_keeps_100_steps_unless_they_would_take_256_mib_and_never_under_10():
    """The history's bounds, on each side of each threshold: 256 MiB // (16 bytes x parameters)."""
    assert linear._history(1) == 100
    assert linear._history(167772) == 100 and linear._history(167773) == 99
    assert linear._history(1677721) == 10 and linear._history(1677722) == 10 and linear._history(10**9) == 10


def test_leaving_groups_out_skips_a_group_whose_others_hold_one_class():
    """A group whose removal leaves one class is skipped (its fold not listed); one group, or none
    left to hold out, is refused."""
    X, y = _two_digits()
    X, y = X[:40], y[:40].clone()
    groups = torch.zeros(40, dtype=torch.long)
    groups[y == 1] = 1  # group 1 holds every positive: leaving it out leaves class 0 only
    groups[(y == 0).nonzero()[:5, 0]] = 2
    found = linear.sweep_groups(X, y, groups, (0.1, 1.0), solver="newton", max_iter=50)
    assert found.folds == [0, 2] and found.scores.shape == (2, 2)
    with pytest.raises(UsageError, match="needs at least 2 groups"):
        linear.sweep_groups(X, y, torch.zeros(40, dtype=torch.long), (1.0,))
    with pytest.raises(UsageError, match="no group could be held out"):
        linear.sweep_groups(X, y, (y == 1).long(), (1.0,))


def test_newtons_line_search_halves_a_step_that_overshoots():
    """Started far off (a warm start that is confidently wrong), the full Newton step overshoots and
    must be cut; the fit still reaches scikit-learn's model."""
    X = torch.tensor([[-3.0], [-1.0], [1.0], [2.0], [-0.5], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 1, 1])
    wrong = linear.LinearModel(
        torch.tensor([[0.0], [-8.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0
    )
    model = linear.fit(X, y, 2, 1.0, solver="newton", tol=1e-10, max_iter=200, init=wrong)
    p = model.positive_probability(X).numpy()
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(X.numpy(), y.numpy())
    assert np.abs(p - reference.predict_proba(X.numpy())[:, 1]).max() < 1e-4
