"""Gao fits with bootstrap CIs over prompts (`pipeline.gao.bootstrap_fit`): recovery of known α, β from synthetic
per-prompt curves, CIs that contain the truth, R² of a noise-free curve, and the per-prompt matrix `bon_per_prompt`
that the best-of-n stage feeds it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.bon import bon_curve_table, bon_per_prompt, kl_bon_bound
from pipeline.gao import bootstrap_fit, fit_bon, fit_rl, gao_bon, gao_rl
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
