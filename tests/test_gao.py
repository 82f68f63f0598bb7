"""Gao fits with bootstrap CIs over prompts (`pipeline.gao.bootstrap_fit`): recovery of known α, β from synthetic
per-prompt curves, CIs that contain the truth, R² of a noise-free curve, and the per-prompt matrix `bon_per_prompt`
that the best-of-n stage feeds it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.bon import bon_curve_table, bon_per_prompt, bootstrap_ci, kl_bon_bound
from pipeline.gao import bootstrap_fit, check_fit, empirical_peak, fit_bon, fit_rl, gao_bon, gao_rl
from pipeline.records import finite_or_none

D_BON = np.sqrt(kl_bon_bound(2 ** np.arange(10)))  # n = 1 … 512, as in the tiny study (d = 0 is skipped)
D_RL = np.sqrt(np.array([0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 7.0, 10.0]))  # measured KLs of log-spaced exports
CASES = {"bon": (gao_bon, D_BON, 1.2, 0.7, lambda a, b: a / (2 * b)),
         "rl": (gao_rl, D_RL, 0.8, 0.3, lambda a, b: math.exp(a / b - 1))}


def synthetic(form: str, seed: int, prompts: int = 64, noise: float = 0.5) -> np.ndarray:
    """(prompts, points) relative gold: each prompt its own (α, β) around the true ones, plus per-point noise."""
    model, d, alpha, beta, _ = CASES[form]
    rng = np.random.default_rng(seed)
    a = alpha + rng.normal(0, 0.3, prompts)
    b = beta + rng.normal(0, 0.1, prompts)
    return np.stack([model(d, ai, bi) for ai, bi in zip(a, b)]) + rng.normal(0, noise, (prompts, d.size))


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_noise_free_curve_is_recovered_exactly_with_r2_one(form):
    model, d, alpha, beta, peak = CASES[form]
    per_prompt = np.tile(model(d, alpha, beta), (16, 1))
    fit = bootstrap_fit(form, per_prompt, d, n_boot=200, ci=0.9, seed=0)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    for key, true in (("alpha", alpha), ("beta", beta), ("d_star", peak(alpha, beta))):
        assert fit[key]["estimate"] == pytest.approx(true, rel=1e-8)
        assert fit[key]["lo"] == pytest.approx(true, rel=1e-8) and fit[key]["hi"] == pytest.approx(true, rel=1e-8)
    assert fit["kl_star"]["estimate"] == pytest.approx(peak(alpha, beta) ** 2, rel=1e-8)
    assert fit["peak_fraction"] == 1.0
    assert (fit["form"], fit["prompts"], fit["points"], fit["n_boot"], fit["ci"]) == (form, 16, d.size - 1, 200, 0.9)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_noisy_curves_recover_alpha_beta_and_the_cis_contain_them(form):
    model, d, alpha, beta, peak = CASES[form]
    per_prompt = synthetic(form, seed=0)  # one data set; the coverage over 40 more is checked below
    fit = bootstrap_fit(form, per_prompt, d, n_boot=1000, ci=0.95, seed=0)
    # the point estimate is the plain fit of the mean curve
    plain = (fit_bon if form == "bon" else fit_rl)(d, per_prompt.mean(axis=0))
    assert fit["alpha"]["estimate"] == pytest.approx(plain["alpha"]) and fit["beta"]["estimate"] == pytest.approx(
        plain["beta"])
    assert fit["alpha"]["estimate"] == pytest.approx(alpha, abs=0.15)
    assert fit["beta"]["estimate"] == pytest.approx(beta, abs=0.1)
    for key, true in (("alpha", alpha), ("beta", beta), ("d_star", peak(alpha, beta))):
        assert fit[key]["lo"] < true < fit[key]["hi"], key
        assert fit[key]["lo"] <= fit[key]["estimate"] <= fit[key]["hi"], key
    assert 0.9 < fit["r2"] < 1.0
    # the CIs are calibrated, not only wide: over 40 independent data sets the 90 % CIs cover the truth about 90 %
    covered = {"alpha": 0, "beta": 0}
    for seed in range(100, 140):
        f = bootstrap_fit(form, synthetic(form, seed), d, n_boot=500, ci=0.9, seed=seed)
        covered["alpha"] += f["alpha"]["lo"] <= alpha <= f["alpha"]["hi"]
        covered["beta"] += f["beta"]["lo"] <= beta <= f["beta"]["hi"]
    assert 30 <= covered["alpha"] <= 40 and 30 <= covered["beta"] <= 40, covered


def test_cis_shrink_with_more_prompts_and_are_deterministic_per_seed():
    small = bootstrap_fit("bon", synthetic("bon", 1, prompts=32), D_BON, n_boot=500, seed=3)
    large = bootstrap_fit("bon", synthetic("bon", 1, prompts=512), D_BON, n_boot=500, seed=3)
    width = lambda f: f["alpha"]["hi"] - f["alpha"]["lo"]  # noqa: E731
    assert width(large) < width(small) / 2
    per_prompt = synthetic("rl", 2)
    a, b = (bootstrap_fit("rl", per_prompt, D_RL, n_boot=300, seed=5) for _ in range(2))
    assert a == b
    assert bootstrap_fit("rl", per_prompt, D_RL, n_boot=300, seed=6)["alpha"] != a["alpha"]


def test_no_peak_is_inf_and_strict_json_null():
    d = D_BON[1:]
    per_prompt = np.tile(gao_bon(d, 1.0, -0.2), (8, 1))  # gold keeps rising: no interior peak
    fit = bootstrap_fit("bon", per_prompt, d, n_boot=50)
    assert fit["d_star"] == {"estimate": math.inf, "lo": math.inf, "hi": math.inf}
    assert fit["peak_fraction"] == 0.0
    text = json.dumps(finite_or_none(fit), allow_nan=False)
    assert json.loads(text)["d_star"] == {"estimate": None, "lo": None, "hi": None}


def test_bootstrap_fit_validation():
    with pytest.raises(ValueError, match="form"):
        bootstrap_fit("ppo", np.zeros((2, 3)), [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one column per d"):
        bootstrap_fit("bon", np.zeros((2, 3)), [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 points"):
        bootstrap_fit("bon", np.zeros((2, 2)), [0.0, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_fit("rl", np.array([[0.0, np.nan, 1.0]]), [0.0, 0.2, 0.3])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_fit("rl", np.zeros((2, 3)), [0.1, 0.2, 0.3], n_boot=-1)
    fit = bootstrap_fit("rl", synthetic("rl", 0), D_RL, n_boot=0)
    assert fit["alpha"]["lo"] == fit["alpha"]["estimate"] == fit["alpha"]["hi"]


def test_bon_per_prompt_matrix_is_what_the_curve_table_averages():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(20, 32)), rng.normal(size=(20, 32))
    ns = [1, 2, 4, 8, 32]
    per_prompt = bon_per_prompt(proxy, gold, ns)
    table = bon_curve_table(proxy, gold, ns, n_boot=0)
    for name, block in per_prompt.items():
        assert block.shape == (20, len(ns))
        np.testing.assert_allclose(block.mean(axis=0), table[name], atol=1e-12)
    np.testing.assert_allclose(per_prompt["gold_rel"][:, 0], 0.0, atol=1e-12)  # n = 1 is the baseline
    nested = bon_per_prompt(proxy, gold, ns, estimator="nested")
    np.testing.assert_allclose(nested["gold"][:, 0], gold[:, 0])


# --- check_fit and empirical_peak ------------------------------------------------------------------------------------

D_EVEN = np.linspace(0.0, 3.0, 13)


def curve_points(truth, d: np.ndarray, seed: int, prompts: int = 200, noise: float = 0.3):
    """Per-prompt relative scores around `truth(d)` (each prompt scaled by its own factor, plus noise; 0 at d = 0),
    with the mean curve's 95% bootstrap CIs, the RL fit with bootstrap CIs and the empirical peak."""
    rng = np.random.default_rng(seed)
    x = truth(d)[None, :] * (1 + rng.normal(0, 0.2, (prompts, 1))) + rng.normal(0, noise, (prompts, d.size))
    x[:, d == 0] = 0.0
    mean, lo, hi = bootstrap_ci(x, 500, 0.95, 0)
    return d, mean, lo, hi, bootstrap_fit("rl", x, d, n_boot=500, seed=0), empirical_peak(x, d, n_boot=500, seed=0)


def rl_truth(d):
    return gao_rl(d, 0.3, 0.5)  # peak at exp(0.3/0.5 − 1) ≈ 0.67, inside both grids


def bump_truth(d):
    return np.exp(-(d - 1) ** 2 / (2 * 0.4 ** 2)) - math.exp(-1 / (2 * 0.4 ** 2))  # Gaussian bump at 1, R(0) = 0


def tail_truth(d):
    return rl_truth(d) - np.where(d > 1.34, 2 * (d - 1.34) ** 2, 0.0)  # the RL form, then a steep late fall


@pytest.mark.parametrize("d", [D_EVEN, D_RL], ids=["even", "log-spaced"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_fit_passes_a_curve_drawn_from_the_rl_form(d, seed):
    d, mean, lo, hi, fit, emp = curve_points(rl_truth, d, seed)
    verdict = check_fit("rl", d, mean, lo, hi, fit, emp)
    assert verdict["ok"] and verdict["peak_consistent"] and verdict["misfit"]["ok"], verdict["reason"]
    assert verdict["reason"] == ""
    assert verdict["misfit"]["max_rel_residual"] < 2.0


@pytest.mark.parametrize("truth", [bump_truth, tail_truth], ids=["gaussian-bump", "steep-tail"])
@pytest.mark.parametrize("d", [D_EVEN, D_RL], ids=["even", "log-spaced"])
def test_check_fit_flags_a_shape_the_rl_form_cannot_follow(truth, d):
    d, mean, lo, hi, fit, emp = curve_points(truth, d, seed=0)
    verdict = check_fit("rl", d, mean, lo, hi, fit, emp)
    assert not verdict["ok"] and not verdict["misfit"]["ok"]
    assert verdict["misfit"]["fraction"] > 0.5 and verdict["misfit"]["max_rel_residual"] > 5
    assert "points' fitted values lie outside their CI" in verdict["reason"]
    assert "\n" not in verdict["reason"]


def test_check_fit_flags_the_committed_ppo_bt_curve():
    # reports/tiny_rl_algos/ppo_curves.csv, run bt (sqrt_kl, gold_rel and its CI): the RL form puts d* at 0.49,
    # half the empirical peak's distance (0.98), and misses 4 of 7 points' CIs: the finding of issue 16, item 1.
    d = [0.0, 0.3238, 0.5136, 0.7900, 0.9819, 1.3664, 2.0383, 2.7515]
    mean = [0.0, 0.1318, 0.2212, 0.3057, 0.4116, 0.2622, -0.6426, -2.1182]
    lo = [0.0, 0.0703, 0.1489, 0.1924, 0.3144, 0.1269, -1.0739, -2.7955]
    hi = [0.0, 0.1958, 0.2945, 0.4028, 0.5024, 0.3822, -0.2558, -1.4814]
    fit = fit_rl(d, mean)
    verdict = check_fit("rl", d, mean, lo, hi, fit, {"estimate": 0.9819, "lo": 0.9819, "hi": 0.9819})
    assert fit["d_star"] == pytest.approx(0.49, abs=0.01)
    assert not verdict["peak_consistent"] and verdict["misfit"]["count"] == 4
    assert verdict["reason"].startswith("fitted peak d*=0.49")


def hand_fit(d_star_lo, d_star_hi, alpha=0.3, beta=0.5):
    return {"alpha": alpha, "beta": beta, "d_star": {"estimate": (d_star_lo + d_star_hi) / 2, "lo": d_star_lo,
                                                      "hi": d_star_hi}}


def test_peak_consistency_is_interval_overlap_with_the_empirical_peak_widened_to_the_grid():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    mean = gao_rl(d, 0.3, 0.5)
    lo, hi = mean - 10, mean + 10  # wide CIs: only the peak decides
    at_one = {"estimate": 1.0, "lo": 1.0, "hi": 1.0}

    def consistent(fit, emp, widen=True):
        return check_fit("rl", d, mean, lo, hi, fit, emp, widen_to_grid=widen)["peak_consistent"]

    assert consistent(hand_fit(0.9, 1.1), at_one, widen=False)  # the empirical peak inside the fitted CI
    assert not consistent(hand_fit(1.2, 1.4), at_one, widen=False)
    assert consistent(hand_fit(1.2, 1.4), at_one)  # …but the grid only places the peak in 0.5..1.5
    assert not consistent(hand_fit(1.6, 1.8), at_one)
    assert consistent(hand_fit(1.6, 1.8), {"estimate": 1.0, "lo": 1.0, "hi": 1.5})  # CIs overlap once widened
    assert consistent(hand_fit(0.5, 0.5), at_one)  # touching ends count as overlap
    # a peak at the last point does not bound the peak from above; a fit without a peak (inf) is consistent with it
    assert consistent(hand_fit(5.0, math.inf), {"estimate": 3.0, "lo": 2.0, "hi": 3.0})
    # plain numbers (e.g. fit_rl's output) give a one-point interval
    plain = {"alpha": 0.3, "beta": 0.5, "d_star": 1.7}
    verdict = check_fit("rl", d, mean, lo, hi, plain, at_one)
    assert not verdict["ok"] and verdict["misfit"]["ok"]
    assert verdict["peak"]["empirical"] == {"estimate": 1.0, "lo": 0.5, "hi": 1.5}
    assert verdict["reason"] == "fitted peak d*=1.7 (CI 1.7..1.7) misses the empirical peak d=1 (interval 0.5..1.5)"
    # a BoN d* < 0 (gold falls from the start) is a peak at d = 0
    falling = gao_bon(d, -0.5, 0.1)
    bon_fit = {"alpha": -0.5, "beta": 0.1, "d_star": {"estimate": -2.5, "lo": -3.0, "hi": -2.0}}
    zero = {"estimate": 0.0, "lo": 0.0, "hi": 0.0}
    assert check_fit("bon", d, falling, falling - 1, falling + 1, bon_fit, zero)["peak_consistent"]


def test_misfit_counts_points_outside_their_ci_and_measures_residuals_on_the_fitted_side():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    fitted = gao_rl(d, 0.3, 0.5)
    mean = fitted.copy()
    mean[2] -= 0.3  # fitted value above the mean by 0.3; the CI's upper half-width is 0.1: 3 half-widths out
    mean[3] += 0.05  # inside: fitted below the mean by 0.05 with lower half-width 0.1
    lo, hi = mean - 0.1, mean + 0.1
    hi[2] = mean[2] + 0.1
    lo[2] = mean[2] - 1.0  # a wide lower side that must not be used
    verdict = check_fit("rl", d, mean, lo, hi, hand_fit(0.5, 0.9), {"estimate": 0.5, "lo": 0.5, "hi": 1.0})
    m = verdict["misfit"]
    assert (m["count"], m["points"], m["fraction"]) == (1, 4, 0.25)  # d = 0 is not a fitted point
    np.testing.assert_allclose(m["rel_residuals"], [0.0, 3.0, 0.5, 0.0], atol=1e-12)
    assert m["max_rel_residual"] == pytest.approx(3.0)
    assert not m["ok"] and not verdict["ok"]  # 3 > max_rel_residual = 2
    assert check_fit("rl", d, mean, lo, hi, hand_fit(0.5, 0.9), {"estimate": 0.5, "lo": 0.5, "hi": 1.0},
                     max_rel_residual=3.5)["ok"]
    assert not check_fit("rl", d, mean, lo, hi, hand_fit(0.5, 0.9), {"estimate": 0.5, "lo": 0.5, "hi": 1.0},
                         max_rel_residual=3.5, max_outside_fraction=0.2)["ok"]
    with pytest.raises(ValueError, match=r"each point needs lo <= mean <= hi"):
        check_fit("rl", d, mean, hi, lo, hand_fit(0.5, 0.9), {"estimate": 0.5, "lo": 0.5, "hi": 1.0})
    with pytest.raises(ValueError, match=r"form must be one of .*got 'quadratic'"):
        check_fit("quadratic", d, mean, lo, hi, hand_fit(0.5, 0.9), {"estimate": 0.5, "lo": 0.5, "hi": 1.0})


def test_empirical_peak_first_maximum_shared_resamples_and_validation():
    d = np.array([0.0, 0.5, 1.0, 1.5])
    flat_top = np.tile([0.0, 1.0, 1.0, 0.5], (10, 1))  # tie: the first maximum
    assert empirical_peak(flat_top, d, n_boot=100) == {"estimate": 0.5, "lo": 0.5, "hi": 0.5, "index": 1}
    assert empirical_peak(flat_top, d, n_boot=0)["estimate"] == 0.5
    rng = np.random.default_rng(0)
    x = np.array([0.0, 1.0, 1.1, 0.2]) + rng.normal(0, 1.0, (40, 4))
    a, b = empirical_peak(x, d, n_boot=300, seed=5), empirical_peak(x, d, n_boot=300, seed=5)
    assert a == b and a["lo"] <= a["estimate"] <= a["hi"] and {a["lo"], a["hi"]} <= set(d)
    with pytest.raises(ValueError, match=r"one column per d \(3\)"):
        empirical_peak(x, d[:3])
    with pytest.raises(ValueError, match=r"ci must lie in \(0, 1\)"):
        empirical_peak(x, d, ci=1.0)
