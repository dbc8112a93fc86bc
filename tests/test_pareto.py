"""Non-dominated sets, the 2-D hypervolume (checked against Optuna's own WFG implementation) and the plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsearch.pareto import (ACC, SIZE, hypervolume, hypervolume_history, non_dominated_mask, pareto_front,
                             reference_point)

points_2d = st.lists(st.tuples(st.integers(0, 100), st.integers(1, 50)), min_size=1, max_size=25)


def _brute_force_mask(p: np.ndarray, maximize: tuple[bool, ...]) -> np.ndarray:
    q = p * np.where(maximize, -1.0, 1.0)
    keep = []
    for i in range(len(q)):
        dominated = any((q[j] <= q[i]).all() and (q[j] < q[i]).any() for j in range(len(q)) if j != i)
        keep.append(not dominated)
    return np.array(keep)


@settings(max_examples=60, deadline=None)
@given(points_2d)
def test_non_dominated_mask_matches_brute_force(pts: list[tuple[int, int]]) -> None:
    p = np.array(pts, dtype=float)
    assert (non_dominated_mask(p, (True, False)) == _brute_force_mask(p, (True, False))).all()


def test_non_dominated_three_objectives_and_duplicates() -> None:
    p = np.array([[1, 1, 1], [1, 1, 1], [2, 0, 1], [0, 0, 0], [3, 3, 3]], dtype=float)
    mask = non_dominated_mask(p, (False, False, False))
    assert mask.tolist() == [False, False, False, True, False]
    # duplicates: neither dominates the other, both stay
    assert non_dominated_mask(np.array([[1.0, 2.0], [1.0, 2.0]]), (True, False)).tolist() == [True, True]


def test_hypervolume_by_hand() -> None:
    # accuracy max, size min; reference (0 %, 10 MB): rectangles 80x(10-2) + (90-80)x(10-5)
    pts = [(80.0, 2.0), (90.0, 5.0), (70.0, 6.0)]  # the last one is dominated
    assert hypervolume(pts, (0.0, 10.0)) == pytest.approx(80 * 8 + 10 * 5)
    assert hypervolume([(50.0, 12.0)], (0.0, 10.0)) == 0.0  # outside the reference box
    assert hypervolume(np.zeros((0, 2)), (0.0, 10.0)) == 0.0


@settings(max_examples=40, deadline=None)
@given(points_2d)
def test_hypervolume_matches_optuna_wfg(pts: list[tuple[int, int]]) -> None:
    from optuna._hypervolume import compute_hypervolume  # an independent implementation as the oracle

    p = np.array(pts, dtype=float)
    ref = (-1.0, 60.0)
    loss = np.stack([-p[:, 0], p[:, 1]], axis=1)  # to minimisation
    front = loss[_brute_force_mask(p, (True, False))]
    want = compute_hypervolume(np.unique(front, axis=0), np.array([1.0, 60.0]))
    assert hypervolume(p, ref) == pytest.approx(want)


def test_history_is_monotone_and_ends_at_the_total() -> None:
    rng = np.random.default_rng(0)
    p = np.stack([rng.uniform(50, 95, 30), rng.uniform(0.01, 0.1, 30)], axis=1)
    ref = reference_point(0.1)
    hist = hypervolume_history(p, ref)
    assert all(b >= a for a, b in zip(hist, hist[1:]))
    assert hist[-1] == pytest.approx(hypervolume(p, ref))


def test_pareto_front_rows() -> None:
    assert (ACC, SIZE) == ("val_acc", "size_mb")  # the search chooses on validation accuracy
    df = pd.DataFrame({ACC: [80.0, 90.0, 70.0, np.nan, 90.0], SIZE: [2.0, 5.0, 6.0, 1.0, 7.0],
                       "number": [0, 1, 2, 3, 4]})
    front = pareto_front(df)
    assert front["number"].tolist() == [0, 1]  # size ascending; NaN row skipped; (90, 7) dominated by (90, 5)
    assert pareto_front(df.iloc[3:4]).empty


def test_pareto_front_is_chosen_on_validation_not_test() -> None:
    """A test accuracy that would change the front must not: only the val_acc column is read."""
    df = pd.DataFrame({"val_acc": [80.0, 90.0, 85.0], "test_acc": [99.0, 10.0, 10.0], SIZE: [2.0, 5.0, 6.0],
                       "number": [0, 1, 2]})
    assert pareto_front(df)["number"].tolist() == [0, 1]  # (85, 6) is dominated on val_acc
    assert pareto_front(df, acc="test_acc")["number"].tolist() == [0]  # what test would have picked
    with pytest.raises(KeyError):
        pareto_front(pd.DataFrame({"acc": [80.0], SIZE: [1.0]}))  # the old column name is not read


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="objectives"):
        non_dominated_mask(np.ones((3, 3)), (True, False))
    with pytest.raises(ValueError, match="finite"):
        hypervolume([(np.nan, 1.0)], (0.0, 2.0))


def test_plot_pareto_writes_png(tmp_path) -> None:
    from kdsearch.plots import Marker, plot_pareto

    df = pd.DataFrame({"status": ["completed", "completed", "pruned", "infeasible"], ACC: [80.0, 85.0, 60.0, np.nan],
                       SIZE: [0.02, 0.03, 0.025, 0.09]})
    out = plot_pareto(df, tmp_path / "pareto.png", budget_mb=0.05,
                      markers=[Marker("uniform 8-bit", 0.04, 86.0), Marker("uniform 16-bit", 0.08),
                               Marker("float", 0.3, 88.0)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="size_mb"):
        Marker("bad", 0.0)


def test_plot_pareto_adds_a_bops_panel(tmp_path) -> None:
    import matplotlib.image

    from kdsearch.pareto import BOPS
    from kdsearch.plots import Marker, plot_pareto

    df = pd.DataFrame({"status": ["completed", "completed", "pruned"], ACC: [80.0, 85.0, 60.0],
                       SIZE: [0.02, 0.03, 0.025], BOPS: [0.3, 0.2, 0.25]})
    one = plot_pareto(df.drop(columns=[BOPS]), tmp_path / "size.png", budget_mb=0.05)
    two = plot_pareto(df, tmp_path / "both.png", budget_mb=0.05, budget_gbops=0.35,
                      markers=[Marker("uniform 8-bit", 0.04, 86.0, gbops=0.4), Marker("no bops", 0.08)])
    w1, w2 = (matplotlib.image.imread(p).shape[1] for p in (one, two))
    assert w2 > 1.8 * w1  # a second panel, against GBOPs
    with pytest.raises(ValueError, match="gbops"):
        Marker("bad", 0.1, gbops=float("nan"))
