"""pipeline/comparison_stats.py against hand computation: paired and Welch differences, which runs pair up, Holm's
step-down adjustment, the noncentral-t minimal detectable difference, and the verdict sentences."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import comparison_stats as cs


def test_paired_difference_by_hand():
    # d = b − a = [1, 1.5, 1]: mean 7/6, sd √(1/12), SE = sd/√3 = 1/6, t = 7 on 2 df. Student's t with 2 df has a
    # closed form: F(t) = 1/2 + t / (2√(2 + t²)), so p = 1 − |t|/√(2 + t²) and t(0.975) = 0.95·√(2 / (4·0.975·0.025)).
    a, b = [1.0, 2.0, 3.0], [2.0, 3.5, 4.0]
    d = np.subtract(b, a)
    se = d.std(ddof=1) / np.sqrt(3)
    t = d.mean() / se
    crit = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    assert se == pytest.approx(1 / 6) and t == pytest.approx(7.0) and crit == pytest.approx(4.302653, abs=1e-6)
    r = cs.difference(a, b, paired=True)
    assert r["test"] == cs.PAIRED and (r["n_a"], r["n_b"], r["df"]) == (3, 3, 2)
    assert r["difference"] == pytest.approx(7 / 6)
    assert (r["ci_lo"], r["ci_hi"]) == (pytest.approx(7 / 6 - crit / 6), pytest.approx(7 / 6 + crit / 6))
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t ** 2))
    # the same numbers as independent groups: Welch ignores the pairing, and the seeds' shared offset makes it wider
    w = cs.difference(a, b, paired=False)
    assert w["test"] == cs.WELCH and w["difference"] == pytest.approx(7 / 6)
    assert w["p"] > 0.1 > r["p"] and w["ci_hi"] - w["ci_lo"] > r["ci_hi"] - r["ci_lo"]


def test_welch_difference_by_hand():
    from scipy import stats  # only Student's t distribution; statistic, SE and df are written out here

    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4  # 1/3 and 20/12
    se = np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)  # Welch–Satterthwaite
    t = 3.0 / se
    r = cs.difference(a, b, paired=False)
    assert r["test"] == cs.WELCH and r["difference"] == pytest.approx(3.0) and r["df"] == pytest.approx(df)
    half = stats.t.ppf(0.975, df) * se
    assert (r["ci_lo"], r["ci_hi"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert r["p"] == pytest.approx(2 * stats.t.sf(t, df))
    # MDD: the noncentral-t power of this design at the MDD is 80 %
    assert cs.t_power(r["mdd80"] / se, df) == pytest.approx(0.80, abs=1e-6)
    assert list(r) == cs.DIFFERENCE_COLUMNS  # the columns compare's peak table declares
    with pytest.raises(ValueError, match="as many runs in each group, got 3 and 4"):
        cs.difference(a, b, paired=True)


def test_untestable_comparisons_are_nan_with_a_reason():
    one = cs.difference([1.0], [2.0, 3.0], paired=False)
    assert one["difference"] == pytest.approx(1.5) and np.isnan([one["p"], one["ci_lo"], one["mdd80"]]).all()
    assert one["note"] == "fewer than two seeds in a group"
    flat = cs.difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], paired=True)  # every seed moves by exactly 0.5
    assert flat["difference"] == pytest.approx(0.5) and np.isnan(flat["p"]) and flat["note"] == "the runs do not vary"


def test_runs_pair_up_by_seed_part_of_their_names():
    # two entries of the same seeds (seed_runs names them bt, bt@seed1, ...): paired, aligned seed by seed
    assert cs.shared_seeds(["bt", "bt@seed1", "bt@seed2"], ["grm@seed2", "grm", "grm@seed1"])
    assert not cs.shared_seeds(["bt", "bt@seed1"], ["grm", "grm@seed6"])  # grm's seed 5, 6: other seeds
    assert not cs.shared_seeds(["bt", "bt@seed1"], ["grm", "grm@seed1", "grm@seed2"])
    a = pd.Series([1.0, 2.0, 3.0], index=["bt", "bt@seed1", "bt@seed2"])
    b = pd.Series([4.0, 2.0, 3.5], index=["grm@seed2", "grm", "grm@seed1"])  # seed order differs from a's
    r = cs.difference_of_runs(a, b)
    assert r["test"] == cs.PAIRED
    assert r["difference"] == pytest.approx(cs.difference([1, 2, 3], [2, 3.5, 4], paired=True)["difference"])
    assert r["p"] == pytest.approx(cs.difference([1, 2, 3], [2, 3.5, 4], paired=True)["p"])
    # one proxy in two studies: the same run names pair up; different ones do not
    assert cs.difference_of_runs(a, a + [1.0, 1.2, 0.9])["test"] == cs.PAIRED
    assert cs.difference_of_runs(a, a.iloc[:2] + 1)["test"] == cs.WELCH


def test_holm_worked_example():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> raised to 0.06 (monotone step-down)
    np.testing.assert_allclose(cs.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(cs.holm([0.3, 0.5]), [0.6, 0.6])  # 0.3·2 = 0.6; 0.5·1 raised to 0.6
    np.testing.assert_allclose(cs.holm([0.6, 0.9, 0.02]), [1.0, 1.0, 0.06])  # capped at 1
    np.testing.assert_allclose(cs.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])  # untested: not in the family


def noncentral_t_power_by_quadrature(nc: float, df: int, crit: float) -> float:
    """P(|T| > crit) for T = (Z + nc)/√(V/df), Z standard normal, V chi-squared with df degrees of freedom: the
    expectation over V of the normal tail probabilities, by the trapezoidal rule (scipy only for the normal cdf)."""
    from scipy.special import ndtr

    v = np.linspace(0.0, 80.0, 40_001)  # P(V > 80) < 1e-15 for 4 df
    density = v ** (df / 2 - 1) * np.exp(-v / 2) / (2 ** (df / 2) * math.gamma(df / 2))
    s = crit * np.sqrt(v / df)
    return float(np.trapezoid((ndtr(nc - s) + ndtr(-s - nc)) * density, v))  # P(Z > s − nc) + P(Z < −s − nc)


def test_minimal_detectable_difference_paired_n5_sd1():
    # paired, n = 5, sd of the differences 1: SE = 1/√5, 4 df, t(0.975; 4) = 2.776445 (tables). Solve the power
    # equation independently (quadrature + bisection): λ* ≈ 3.761, so MDD = λ*/√5 ≈ 1.682 (a normal approximation
    # would say (1.960 + 0.842)/√5 = 1.253, far too optimistic with 5 seeds).
    crit = 2.776445105
    lo, hi = 2.0, 6.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if noncentral_t_power_by_quadrature(mid, 4, crit) < 0.8 else (lo, mid)
    mdd = cs.minimal_detectable_difference(1 / math.sqrt(5), 4)
    assert mdd == pytest.approx(lo / math.sqrt(5), abs=1e-5) and mdd == pytest.approx(1.682, abs=1e-3)
    assert cs.t_power(mdd * math.sqrt(5), 4) == pytest.approx(0.80, abs=1e-6)
    # from the runs: differences with sd 1 over 5 seeds give the same MDD
    d = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    d = d / d.std(ddof=1)
    assert cs.difference(np.zeros(5), d + 0.3, paired=True)["mdd80"] == pytest.approx(mdd)


def test_power_matches_published_r_values():
    # R's documented examples: power.t.test(n = 20, delta = 1) gives power = 0.8689528 and power.t.test(power = .90,
    # delta = 1) gives n = 22.02110 (two samples, sd 1: SE = √(2/n), 2n − 2 df). R's default counts the upper tail
    # only; the lower tail adds < 1e-6 here.
    assert cs.t_power(1 / math.sqrt(2 / 20), 38) == pytest.approx(0.8689528, abs=1e-6)
    n = 22.02110
    assert cs.t_power(1 / math.sqrt(2 / n), 2 * n - 2) == pytest.approx(0.90, abs=1e-6)
    assert cs.t_power(0.0, 10) == pytest.approx(0.05)  # no difference: rejected at the test's level
    # many df: λ* tends to z(0.975) + z(0.80)
    assert cs.minimal_detectable_difference(1.0, 1e6) == pytest.approx(1.959964 + 0.841621, abs=1e-4)
    assert cs.t_power(cs.minimal_detectable_difference(1.0, 1), 1) == pytest.approx(0.80, abs=1e-6)  # λ* > 8


def test_verdicts_are_the_numbers_in_words():
    rows = [cs.difference([0.70, 0.71, 0.69, 0.72, 0.70], [0.74, 0.75, 0.72, 0.75, 0.74], paired=True),
            cs.difference([0.50, 0.52, 0.49], [0.51, 0.50, 0.53, 0.49], paired=False),
            cs.difference([1.0], [1.2], paired=True)]
    table = cs.with_holm(pd.DataFrame(rows).assign(what=["GRM − BT in OOD accuracy", "GRM − BT in ID accuracy",
                                                      "GRM − BT in peak gold"]))
    assert table.p_holm.iloc[0] == pytest.approx(2 * table.p.iloc[0])  # the smaller p of 2 tested comparisons
    first, second, third = cs.verdicts(table)
    r = table.iloc[0]
    assert first == (f"GRM − BT in OOD accuracy: {r.difference:+.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}] (paired t, "
                     f"5 seeds); significant after Holm correction over 2 comparisons (adjusted p < 0.001); a "
                     f"difference smaller than {r.mdd80:.3f} would go undetected at 80 % power.")
    r = table.iloc[1]
    assert second.startswith(f"GRM − BT in ID accuracy: {r.difference:+.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}] "
                             f"(Welch, 3 vs 4 seeds); not significant after Holm correction over 2 comparisons "
                             f"(adjusted p = {r.p_holm:.2g})")
    assert f"smaller than {r.mdd80:.3f}" in second
    assert third == "GRM − BT in peak gold: +0.200 (paired t, 1 seed); not tested: fewer than two seeds."
