"""Statistics of comparisons between two groups of runs (two proxies over seeds, or one proxy in two studies): the
one place `overopt compare` and `scripts/group_differences.py` get a difference of means, its 95 % interval and
p-value, the minimal difference the design detects, the Holm correction over a family of comparisons and the
sentence that says what the numbers mean. Statistics of one group (mean, sd, interval over seeds) are
`pipeline.seed_stats`'s.

Two groups are *paired* when their runs are the same seeds: the seeds of a proxy entry are named by
`pipeline.config.seed_runs` (`bt`, `bt@seed1`, `bt@seed2`, ... for `seed: 0`), so two entries with the same seed
parts in their run names, or one entry in two studies with the same run names, were trained from the same seeds and
scored on the same samples; their runs pair up seed by seed and the paired t test is used. Otherwise Welch's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from pipeline.config import proxy_family

ALPHA = 0.05  # two-sided level of every test and interval here (95 % intervals)
POWER = 0.80  # the power at which the minimal detectable difference is given

PAIRED, WELCH = "paired t", "Welch"
# what `difference` returns, in order: the columns of a table of comparisons
DIFFERENCE_COLUMNS = ["test", "n_a", "n_b", "mean_a", "mean_b", "difference", "ci_lo", "ci_hi", "p", "df", "mdd80",
                      "note"]


# ----------------------------------------------------------------------------------------------------------------
# which runs pair up


def seed_of(run: str) -> str:
    """The seed part of a run's name: `@seed2` of `bt@seed2`, '' of an entry's first copy `bt` (whose seed is the
    entry's `seed`)."""
    return run[len(proxy_family(run)):]


def shared_seeds(runs_a, runs_b) -> bool:
    """Whether two groups of runs are the same seeds: as many runs, with the same seed parts in their names.

    With two or more runs the seed parts also fix the first copy's seed (`seed_runs` numbers copy i `seed + i`), so
    equal parts mean equal seeds throughout; two single runs are never tested anyway."""
    seeds_a, seeds_b = [seed_of(r) for r in runs_a], [seed_of(r) for r in runs_b]
    return len(set(seeds_a)) == len(seeds_a) and sorted(seeds_a) == sorted(seeds_b)


def difference_of_runs(a: pd.Series, b: pd.Series, pair_seeds: bool = True) -> dict:
    """`difference` of two groups of runs, each a Series of one value per run indexed by run name: paired seed by
    seed when the groups are the same seeds (`shared_seeds`) and `pair_seeds`, Welch otherwise (`pair_seeds=False`
    reproduces an analysis declared with Welch's test, as the README's declared variant is)."""
    aligned = paired_by_seed(a, b) if pair_seeds else None
    if aligned is not None:
        return difference(*aligned, paired=True)
    return difference(a.to_numpy(), b.to_numpy(), paired=False)


def paired_by_seed(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """Two groups of runs (Series indexed by run name) as arrays aligned seed by seed, in a's order, when they are
    the same seeds (`shared_seeds`); None otherwise."""
    if not shared_seeds(a.index, b.index):
        return None
    by_seed_b = b.set_axis([seed_of(r) for r in b.index])
    return a.to_numpy(), by_seed_b.loc[[seed_of(r) for r in a.index]].to_numpy()


# ----------------------------------------------------------------------------------------------------------------
# one comparison


def difference(a, b, paired: bool) -> dict:
    """mean(b) − mean(a) with its 95 % interval, two-sided p-value and 80 %-power minimal detectable difference.

    paired: a[i] and b[i] are the same seed (equal lengths): the paired t test on the differences b − a
    (`scipy.stats.ttest_rel`), n − 1 degrees of freedom. Otherwise Welch's test (`ttest_ind(equal_var=False)`),
    Welch–Satterthwaite degrees of freedom. Returns `test` (PAIRED or WELCH), `n_a`, `n_b`, `mean_a`, `mean_b`,
    `difference`, `ci_lo`, `ci_hi`, `p`, `df` and `mdd80` (`minimal_detectable_difference`). Interval, p, df and
    MDD are NaN where the test is undefined: fewer than two runs in a group (pairs, when paired), or runs that do not
    vary at all (`note` then says why)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired and len(a) != len(b):
        raise ValueError(f"a paired comparison needs as many runs in each group, got {len(a)} and {len(b)}")
    result = {"test": PAIRED if paired else WELCH, "n_a": len(a), "n_b": len(b), "mean_a": float(a.mean()),
              "mean_b": float(b.mean()), "difference": float(b.mean() - a.mean()), "ci_lo": np.nan, "ci_hi": np.nan,
              "p": np.nan, "df": np.nan, "mdd80": np.nan, "note": ""}
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return result | {"note": "a run's value is not finite (NaN or inf)"}
    if min(len(a), len(b)) < 2:
        return result | {"note": "fewer than two seeds" + (" in a group" if not paired else "")}
    # "Constant" up to rounding: differences like 0.7 − 0.6 and 0.8 − 0.7 differ in the 17th digit, and a t statistic
    # over that would be noise; scipy warns of catastrophic cancellation and returns NaN or nonsense. Say why instead.
    spread = np.ptp(b - a) if paired else max(np.ptp(a), np.ptp(b))
    if spread <= 1e-12 * max(np.abs(a).max(), np.abs(b).max()):
        return result | {"note": "the runs do not vary"}
    se, df = standard_error(b - a, paired=True) if paired else standard_error((a, b), paired=False)
    with warnings.catch_warnings():
        # one Welch group whose seeds agree exactly has variance 0, which scipy computes right but warns about
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        test = stats.ttest_rel(b, a) if paired else stats.ttest_ind(b, a, equal_var=False)
    ci = test.confidence_interval(1 - ALPHA)
    return result | {"ci_lo": float(ci.low), "ci_hi": float(ci.high), "p": float(test.pvalue), "df": float(test.df),
                     "mdd80": minimal_detectable_difference(se, df)}


def standard_error(values, paired: bool) -> tuple[float, float]:
    """(standard error, degrees of freedom) of the difference of means a t test of the design uses.

    paired: `values` are the differences d: sd(d)/√n with n − 1 df. Welch: `values` is (a, b):
    √(s_a²/n_a + s_b²/n_b) with Welch–Satterthwaite df (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) +
    (s_b²/n_b)²/(n_b−1))."""
    if paired:
        d = np.asarray(values, dtype=float)
        return float(d.std(ddof=1) / np.sqrt(len(d))), float(len(d) - 1)
    a, b = (np.asarray(v, dtype=float) for v in values)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return 0.0, np.nan
    return float(np.sqrt(va + vb)), float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)))


def t_power(noncentrality: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t test at level alpha with df degrees of freedom when the true difference is
    `noncentrality` standard errors: the statistic is then noncentral t(df, λ), and the power is
    P(T > t_c) + P(T < −t_c), t_c = t⁻¹(1 − α/2; df) (both tails, as R's power.t.test with strict = TRUE)."""
    from scipy import stats

    crit = stats.t.ppf(1 - alpha / 2, df)
    # P(T < −t_c; λ) = P(T > t_c; −λ): nct.cdf returns NaN far in the lower tail where sf returns ~0
    return float(stats.nct.sf(crit, df, noncentrality) + stats.nct.sf(crit, df, -noncentrality))


def minimal_detectable_difference(se: float, df: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true difference a two-sided t test of this design detects with probability `power`.

    MDD = λ* · SE, where λ* solves t_power(λ*, df, alpha) = power (the noncentral t, `t_power`; found by
    `scipy.optimize.brentq`, the power rising with λ from alpha at λ = 0) and SE, df are the design's
    (`standard_error`): paired, SE = sd(d)/√n and df = n − 1, so MDD = λ*·sd(d)/√n; Welch, SE = √(s_a²/n_a +
    s_b²/n_b) and the Welch–Satterthwaite df. The observed sds stand in for the true ones: it is the difference these
    runs' noise lets the test see, not a guarantee (and Welch's statistic is noncentral t only approximately). For
    large df λ* tends to z(1 − α/2) + z(power) = 2.80; with few seeds it is much larger (n = 5 paired: 3.76)."""
    from scipy.optimize import brentq

    if not (se > 0 and df > 0):
        return np.nan
    upper = 8.0
    while t_power(upper, df, alpha) < power:  # with one or two df λ* can exceed 8
        upper *= 2
    return float(brentq(lambda nc: t_power(nc, df, alpha) - power, 0.0, upper, xtol=1e-12)) * se


# ----------------------------------------------------------------------------------------------------------------
# a family of comparisons


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values, in their order: the k-th smallest of m becomes
    max over j ≤ k of (m − j + 1)·p_(j), capped at 1, so adjusted p-values keep the raw ones' order. Rejecting where
    the adjusted p < α controls the family-wise error rate at α. NaN p-values (no test) stay NaN and are not counted
    in m."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """The table of comparisons (a `p` column) with `p_holm`, Holm-adjusted over all of its rows."""
    return table.assign(p_holm=holm(table.p))


# ----------------------------------------------------------------------------------------------------------------
# what the numbers say


def p_text(p: float) -> str:
    """A p-value in two significant digits, `< 0.001` below that, `—` for none."""
    return "—" if not np.isfinite(p) else "< 0.001" if p < 0.001 else f"{p:.2g}"


def design_text(row) -> str:
    """`paired t, 5 seeds` or `Welch, 5 vs 4 seeds` of a `difference` result; a row with a `unit` (e.g. `world`,
    for a test whose units are worlds, `pipeline.worlds`) counts in that unit instead of seeds."""
    n_a, n_b = int(row["n_a"]), int(row["n_b"])
    unit = row.get("unit") if isinstance(row.get("unit"), str) else "seed"
    units = unit if max(n_a, n_b) == 1 else f"{unit}s"
    return f"{PAIRED}, {n_a} {units}" if row["test"] == PAIRED else f"{WELCH}, {n_a} vs {n_b} {units}"


def verdicts(table: pd.DataFrame, fmt: str = ".3f") -> list[str]:
    """One sentence per comparison of a family, from its numbers: rows of `difference` results with `p_holm`
    (`with_holm` over the same rows) and `what` (e.g. `GRM − BT in OOD accuracy`). The family's size is its number
    of tested comparisons."""
    family = int(table.p_holm.notna().sum())
    out = []
    for _, r in table.iterrows():
        head = f"{r['what']}: {r['difference']:+{fmt}}"
        if not np.isfinite(r["p"]):
            out.append(f"{head} ({design_text(r)}); not tested: {r['note'] or 'no p-value'}.")
            continue
        significant = r["p_holm"] < ALPHA
        adjusted = p_text(r["p_holm"])
        adjusted = adjusted if adjusted.startswith("<") else f"= {adjusted}"
        out.append(f"{head} [{r['ci_lo']:{fmt}}, {r['ci_hi']:{fmt}}] ({design_text(r)}); "
                   f"{'significant' if significant else 'not significant'} after Holm correction over {family} "
                   f"comparison{'s' if family != 1 else ''} (adjusted p {adjusted}); a difference smaller "
                   f"than {r['mdd80']:{fmt}} would go undetected at {POWER * 100:.0f} % power.")
    return out
