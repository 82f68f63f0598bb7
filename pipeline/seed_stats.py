"""Statistics over the seeds of one proxy or RL arm: the one place the report, the end-of-run summary and `overopt
compare` get their mean, standard deviation and Student-t interval from."""

from __future__ import annotations

import numpy as np


def seed_stats(values) -> dict:
    """Over the seeds of one proxy: their number, mean, sample standard deviation and a 95 % Student-t interval for
    the mean (mean ± t(0.975, k−1)·sd/√k); sd and interval are NaN for a single seed."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return {"seeds": len(v), "mean": mean, "sd": float("nan"), "ci_lo": float("nan"), "ci_hi": float("nan")}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * sd / np.sqrt(len(v))
    return {"seeds": len(v), "mean": mean, "sd": sd, "ci_lo": mean - half, "ci_hi": mean + half}


def mean_sd_text(values, fmt: str = ".3f") -> str:
    """`mean ± sd` over seeds; the value alone for a single seed."""
    st = seed_stats(values)
    return f"{st['mean']:{fmt}} ± {st['sd']:{fmt}}" if st["seeds"] > 1 else f"{st['mean']:{fmt}}"


def stats_text(st: dict, fmt: str = ".3f") -> str:
    """`mean ± sd [lo, hi]` of a `seed_stats` result."""
    return f"{st['mean']:{fmt}} ± {st['sd']:{fmt}} [{st['ci_lo']:{fmt}}, {st['ci_hi']:{fmt}}]"
