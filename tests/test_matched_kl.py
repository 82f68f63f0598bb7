"""pipeline.matched_kl against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.matched_kl import OVER_SEEDS_COLUMNS, common_grid, interpolate, loss_rate, over_seeds, value_at

# Student-t 0.975 quantiles, from a table (not from scipy, which the code under test uses)
T975 = {1: 12.706204736174707, 2: 4.302652729911275}


def run(sqrt_kl, gold) -> pd.DataFrame:
    return pd.DataFrame({"sqrt_kl": sqrt_kl, "gold": gold})


def test_interpolate_three_points():
    # points (0, 0), (1, 2), (3, 1): halfway up the first segment is 1, halfway along the second is 1.5
    got = interpolate([0.0, 1.0, 3.0], [0.0, 2.0, 1.0], [-0.1, 0.0, 0.5, 1.0, 2.0, 3.0, 3.5])
    np.testing.assert_allclose(got, [np.nan, 0.0, 1.0, 2.0, 1.5, 1.0, np.nan])


def test_interpolate_backtracking_run_sorts_by_kl_and_averages_ties():
    # step order: √KL 0, 2, 1, 2, 3 (the KL drops after the second export); values 0, 4, 1, 2, 0.
    # In √KL order: (0, 0), (1, 1), (2, mean(4, 2) = 3), (3, 0).
    got = interpolate([0.0, 2.0, 1.0, 2.0, 3.0], [0.0, 4.0, 1.0, 2.0, 0.0], [1.0, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 1.5])


def test_interpolate_drops_non_finite_points_and_handles_empty():
    np.testing.assert_allclose(interpolate([0.0, np.nan, 2.0], [0.0, 5.0, 2.0], [1.0]), [1.0])
    assert np.isnan(interpolate([], [], [1.0])).all()
    with pytest.raises(ValueError, match="differ in length"):
        interpolate([0.0, 1.0], [0.0], [0.5])


def test_common_grid_is_the_overlap():
    a, b = run([0.0, 0.5, 2.0], [0, 0, 0]), run([0.2, 1.0, 1.5], [0, 0, 0])
    np.testing.assert_allclose(common_grid([a, b], n=3), [0.2, 0.85, 1.5])
    assert common_grid([run([0.0, 1.0], [0, 0]), run([2.0, 3.0], [0, 0])]).size == 0
    np.testing.assert_allclose(common_grid([run([0.0, 1.0], [0, 0]), run([1.0, 3.0], [0, 0])]), [1.0])
    assert common_grid([]).size == 0


def test_over_seeds_mean_and_t_interval_by_hand():
    # gold = a·√KL with a = 1, 2 (√KL 0..2) and a = 4 (√KL 0..0.5 only: it does not reach √KL = 1)
    runs = [run([0.0, 2.0], [0.0, 2.0]), run([0.0, 2.0], [0.0, 4.0]), run([0.0, 0.5], [0.0, 2.0])]
    got = over_seeds(runs, [0.25, 1.0])
    assert list(got.columns) == OVER_SEEDS_COLUMNS
    # at √KL 0.25: values 0.25, 0.5, 1.0
    mean = 1.75 / 3
    sd = math.sqrt(((0.25 - mean) ** 2 + (0.5 - mean) ** 2 + (1.0 - mean) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    row = got.iloc[0]
    assert row.n == 3 and row.kl == pytest.approx(0.0625)
    assert (row["mean"], row.sd, row.ci_lo, row.ci_hi) == pytest.approx((mean, sd, mean - half, mean + half))
    # at √KL 1: only the first two runs cover it: values 1 and 2, sd = √0.5, half = t(1)·√0.5/√2 = t(1)/2
    row = got.iloc[1]
    assert row.n == 2 and row.kl == pytest.approx(1.0)
    assert (row["mean"], row.sd) == pytest.approx((1.5, math.sqrt(0.5)))
    assert (row.ci_lo, row.ci_hi) == pytest.approx((1.5 - T975[1] / 2, 1.5 + T975[1] / 2))


def test_over_seeds_point_no_run_covers():
    got = over_seeds([run([0.0, 1.0], [0.0, 1.0])], [0.5, 2.0], column="gold")
    assert got.n.tolist() == [1, 0]
    assert got["mean"].iloc[0] == pytest.approx(0.5) and np.isnan(got.sd.iloc[0])  # one run: no spread
    assert np.isnan(got["mean"].iloc[1])


def test_value_at_takes_kl_in_nats():
    r = run([0.0, 1.0, 2.0], [0.0, 1.0, 0.0])
    got = value_at(r, [0.25, 1.0, 2.25, 9.0])  # √: 0.5, 1, 1.5, 3 (outside)
    np.testing.assert_allclose(got, [0.5, 1.0, 0.5, np.nan])
    assert isinstance(got, list)


def test_loss_rate_on_a_line():
    d = np.linspace(0.0, 4.0, 9)
    r = pd.DataFrame({"sqrt_kl": d, "gold": 3.0 - 0.5 * d, "proxy": 2.0 * d})
    assert loss_rate(r, 1.0, 3.0) == pytest.approx(0.5)
    assert loss_rate(r, 0.3, 3.7) == pytest.approx(0.5)
    assert loss_rate(r, 1.0, 3.0, column="proxy") == pytest.approx(-2.0)  # a gain is a negative loss
    assert np.isnan(loss_rate(r, 1.0, 5.0))
    with pytest.raises(ValueError, match=r"need sqrt_kl_hi > sqrt_kl_lo"):
        loss_rate(r, 2.0, 2.0)
