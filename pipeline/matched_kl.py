"""Comparisons of curves at matched KL: runs interpolated onto a common √KL grid inside their measured range.

RL runs are measured at their export steps, and each run reaches a different KL at each step (and stops at a
different KL), so comparing them step by step or "past the peak" compares different distances from the initial
policy. Here every run is linearly interpolated in √KL (the x-axis of the curves, d = √KL) and read only inside its
own measured range: nothing is extrapolated, a run that does not reach a point is NaN there.

The measured KL is not monotone in the step (it can drop between exports), so a run's points are taken in √KL order,
not step order; points at the same √KL are averaged into one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.seed_stats import seed_stats

OVER_SEEDS_COLUMNS = ["sqrt_kl", "kl", "mean", "sd", "n", "ci_lo", "ci_hi"]


def interpolate(sqrt_kl, values, grid) -> np.ndarray:
    """A run's `values` at the distances `grid`, linear in √KL between the run's points; NaN outside its range.

    The points are sorted by `sqrt_kl` first (measured KL can drop between exports, so step order may backtrack),
    and points with the same √KL are replaced by their mean value. Points with a non-finite √KL or value are left
    out. The range is [smallest √KL, largest √KL] of the remaining points, ends included.
    """
    x = np.asarray(sqrt_kl, dtype=float).ravel()
    y = np.asarray(values, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"sqrt_kl and values differ in length: {x.size} vs {y.size}")
    grid = np.asarray(grid, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return np.full(grid.shape, np.nan)
    # np.unique sorts; the inverse index lets one bincount average the values of equal √KL
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return np.interp(grid, xs, ys, left=np.nan, right=np.nan)


def _range(run: pd.DataFrame, column: str) -> tuple[float, float]:
    x = run[column].to_numpy(dtype=float)
    x = x[np.isfinite(x)]
    return (float(x.min()), float(x.max())) if x.size else (np.nan, np.nan)


def common_grid(runs: list[pd.DataFrame], n: int = 25, column: str = "sqrt_kl") -> np.ndarray:
    """`n` evenly spaced √KL values over the range every run covers: from the largest of the runs' smallest
    `column` values to the smallest of their largest. Empty when the runs do not overlap (or there are none); a
    single point when they touch at one value."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ranges = [_range(r, column) for r in runs]
    if not ranges or any(np.isnan(lo) for lo, _ in ranges):
        return np.array([])
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if lo > hi:
        return np.array([])
    if lo == hi:
        return np.array([lo])
    return np.linspace(lo, hi, n)


def over_seeds(runs: list[pd.DataFrame], grid, column: str = "gold", x: str = "sqrt_kl") -> pd.DataFrame:
    """The runs (e.g. the seeds of one RL arm) interpolated onto `grid` and aggregated at each point.

    Columns (`OVER_SEEDS_COLUMNS`): sqrt_kl (the grid), kl (its square), mean, sd, n (the number of runs whose
    measured range covers the point; the others are NaN there and left out) and ci_lo/ci_hi, the 95 % Student-t
    interval for the mean over those runs (`seed_stats`; NaN with fewer than two runs, and mean is NaN with none).
    On a `common_grid` every run covers every point.
    """
    grid = np.asarray(grid, dtype=float).ravel()
    values = np.array([interpolate(r[x], r[column], grid) for r in runs]).reshape(len(runs), grid.size)
    rows = []
    for j in range(grid.size):
        v = values[:, j][np.isfinite(values[:, j])]
        st = seed_stats(v) if v.size else {"seeds": 0, "mean": np.nan, "sd": np.nan, "ci_lo": np.nan,
                                           "ci_hi": np.nan}
        rows.append({"sqrt_kl": grid[j], "kl": grid[j] ** 2, "mean": st["mean"], "sd": st["sd"], "n": st["seeds"],
                     "ci_lo": st["ci_lo"], "ci_hi": st["ci_hi"]})
    return pd.DataFrame(rows, columns=OVER_SEEDS_COLUMNS)


def value_at(run: pd.DataFrame, kls: list[float], column: str = "gold", x: str = "sqrt_kl") -> list[float]:
    """The run's `column` at each KL of `kls` (in nats, not √), interpolated in √KL; NaN outside its range."""
    d = np.sqrt(np.asarray(kls, dtype=float))
    return [float(v) for v in interpolate(run[x], run[column], d)]


def loss_rate(run: pd.DataFrame, sqrt_kl_lo: float, sqrt_kl_hi: float, column: str = "gold",
              x: str = "sqrt_kl") -> float:
    """Gold lost per √nat between two distances: (value(lo) − value(hi)) / (hi − lo), both values interpolated.

    Positive when the run loses gold between lo and hi. Compare runs over the same [lo, hi] inside every run's
    range (e.g. the ends of `common_grid`): a rate "past each run's own peak up to its own last export" shrinks the
    further a run goes, so it ranks runs by how far they ran. NaN when lo or hi lies outside the run's range.
    """
    if not sqrt_kl_hi > sqrt_kl_lo:
        raise ValueError(f"need sqrt_kl_hi > sqrt_kl_lo, got {sqrt_kl_lo} .. {sqrt_kl_hi}")
    v_lo, v_hi = interpolate(run[x], run[column], [sqrt_kl_lo, sqrt_kl_hi])
    return float((v_lo - v_hi) / (sqrt_kl_hi - sqrt_kl_lo))
