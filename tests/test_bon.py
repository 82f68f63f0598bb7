"""Tests for pipeline.bon: KL bound, subset weights, unbiased/nested estimators, bootstrap, curve table and fits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.bon import (
    BON_CURVE_COLUMNS,
    bon_curve_table,
    bon_subset_weights,
    bon_weight_matrix,
    bootstrap_ci,
    kl_bon_bound,
    nested_bon,
    unbiased_bon,
)
from pipeline.gao import fit_bon, fit_rl, gao_bon, gao_rl

# --- brute-force references ------------------------------------------------------------------------------------------

def brute_force_weights(N: int, n: int) -> np.ndarray:
    """How often the i-th smallest of N distinct scores is the max of an n-subset, over all subsets."""
    counts = np.zeros(N)
    for subset in itertools.combinations(range(N), n):
        counts[max(subset)] += 1  # samples are indexed by rank here, so the max index is the max score
    return counts / math.comb(N, n)


def brute_force_bon(proxy_row: np.ndarray, gold_row: np.ndarray, n: int) -> tuple[float, float]:
    """Expected (proxy, gold) of best-of-n over all n-subsets, picking uniformly among tied maxima."""
    p_tot = g_tot = 0.0
    subsets = list(itertools.combinations(range(len(proxy_row)), n))
    for subset in subsets:
        s = np.asarray(subset)
        top = s[proxy_row[s] == proxy_row[s].max()]
        p_tot += proxy_row[top].mean()
        g_tot += gold_row[top].mean()
    return p_tot / len(subsets), g_tot / len(subsets)


# --- KL bound --------------------------------------------------------------------------------------------------------

def test_kl_bound_values():
    assert kl_bon_bound(1) == 0.0
    assert kl_bon_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert kl_bon_bound(4) == pytest.approx(math.log(4) - 0.75, abs=1e-15)
    assert isinstance(kl_bon_bound(3), float)


def test_kl_bound_vectorised_and_checked():
    ns = np.array([1, 2, 4, 405])
    kl = kl_bon_bound(ns)
    assert kl.shape == (4,)
    np.testing.assert_allclose(kl, np.log(ns) - (ns - 1) / ns)
    assert np.all(np.diff(kl) > 0)
    with pytest.raises(ValueError, match=r"best-of-n needs n >= 1"):
        kl_bon_bound(0)


# --- weights ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 8))
def test_weights_match_enumeration(n):
    np.testing.assert_allclose(bon_subset_weights(7, n), brute_force_weights(7, n), rtol=1e-12, atol=1e-15)


def test_weights_edge_cases():
    np.testing.assert_allclose(bon_subset_weights(10, 1), np.full(10, 0.1), rtol=1e-12)
    np.testing.assert_array_equal(bon_subset_weights(10, 10), np.eye(10)[-1])
    assert np.all(bon_subset_weights(10, 4)[:3] == 0.0)


@pytest.mark.parametrize("N,n", [(405, 200), (405, 2), (405, 405), (5000, 2500), (100_000, 37)])
def test_weights_sum_to_one_for_large_N(N, n):
    w = bon_subset_weights(N, n)
    assert w.shape == (N,)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-10)


def test_weight_matrix_rows():
    W = bon_weight_matrix(9, [1, 3, 9])
    assert W.shape == (3, 9)
    for row, n in zip(W, [1, 3, 9]):
        np.testing.assert_array_equal(row, bon_subset_weights(9, n))


@pytest.mark.parametrize("N,n", [(5, 0), (5, 6), (0, 0)])
def test_weights_reject_bad_n(N, n):
    with pytest.raises(ValueError, match=r"best-of-n needs 1 <= n <= N"):
        bon_subset_weights(N, n)
    with pytest.raises(TypeError):
        bon_subset_weights(5, 2.0)


# --- unbiased estimator ----------------------------------------------------------------------------------------------

def test_unbiased_matches_enumeration_distinct_scores():
    rng = np.random.default_rng(0)
    P, N = 4, 7
    proxy = rng.normal(size=(P, N))
    gold = rng.normal(size=(P, N))
    ns = list(range(1, N + 1))
    p_exp, g_exp = unbiased_bon(proxy, {"gold": gold}, ns)
    assert p_exp.shape == (P, N) and g_exp["gold"].shape == (P, N)
    for p in range(P):
        for k, n in enumerate(ns):
            bp, bg = brute_force_bon(proxy[p], gold[p], n)
            assert p_exp[p, k] == pytest.approx(bp, rel=1e-12, abs=1e-12)
            assert g_exp["gold"][p, k] == pytest.approx(bg, rel=1e-12, abs=1e-12)


def test_unbiased_matches_monte_carlo():
    rng = np.random.default_rng(1)
    P, N, n, M = 3, 64, 8, 20_000
    proxy = rng.normal(size=(P, N))
    gold = 0.5 * proxy + rng.normal(size=(P, N))
    _, g_exp = unbiased_bon(proxy, gold, [n])
    for p in range(P):
        subsets = rng.random((M, N)).argsort(axis=1)[:, :n]  # M uniformly random n-subsets
        best = np.take_along_axis(subsets, proxy[p][subsets].argmax(axis=1)[:, None], axis=1)[:, 0]
        draws = gold[p][best]
        se = draws.std(ddof=1) / math.sqrt(M)
        assert abs(g_exp[p, 0] - draws.mean()) < 5 * se


def test_unbiased_n1_is_mean_and_nN_is_argmax():
    rng = np.random.default_rng(2)
    proxy, gold = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    p_exp, g_exp = unbiased_bon(proxy, gold, [1, 30])
    np.testing.assert_allclose(p_exp[:, 0], proxy.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(g_exp[:, 0], gold.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(p_exp[:, 1], proxy.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(g_exp[:, 1], gold[np.arange(5), proxy.argmax(axis=1)], rtol=1e-12)


def test_records_sorted_whole():
    # Each sample has an identity k with proxy k and gold f(k); shuffling the samples of each prompt must not
    # change which gold goes with which proxy.
    rng = np.random.default_rng(3)
    P, N = 6, 20
    ids = np.stack([rng.permutation(N) for _ in range(P)])
    gold_of_id = np.sin(np.arange(N)) * 10.0  # a non-monotone function of identity
    proxy, gold = ids.astype(float), gold_of_id[ids]
    ns = [1, 2, 5, 20]
    _, g_exp = unbiased_bon(proxy, {"gold": gold}, ns)
    expected = bon_weight_matrix(N, ns) @ gold_of_id  # ids 0..N-1 are already in proxy order
    np.testing.assert_allclose(g_exp["gold"], np.broadcast_to(expected, (P, len(ns))), rtol=1e-12)
    # Sorting gold separately (the published bug) would give a different answer here, so the test can see it.
    buggy = np.sort(gold, axis=1) @ bon_weight_matrix(N, ns).T
    assert not np.allclose(buggy, g_exp["gold"])


def test_ties_match_random_tie_break_enumeration():
    proxy = np.array([[1.0, 2.0, 2.0, 0.0, 2.0, 3.0, 3.0],
                      [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
                      [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 4.0]])
    gold = np.arange(21, dtype=float).reshape(3, 7) ** 1.5
    ns = list(range(1, 8))
    p_exp, g_exp = unbiased_bon(proxy, gold, ns)
    for p in range(3):
        for k, n in enumerate(ns):
            bp, bg = brute_force_bon(proxy[p], gold[p], n)
            assert p_exp[p, k] == pytest.approx(bp, rel=1e-12)
            assert g_exp[p, k] == pytest.approx(bg, rel=1e-12)


def test_ties_independent_of_sample_order():
    rng = np.random.default_rng(4)
    P, N = 8, 40
    proxy = rng.integers(0, 6, size=(P, N)).astype(float)  # heavy ties
    gold = rng.normal(size=(P, N))
    ns = [1, 2, 4, 8, 16, 40]
    p_ref, g_ref = unbiased_bon(proxy, {"gold": gold}, ns)
    for _ in range(5):
        perm = np.stack([rng.permutation(N) for _ in range(P)])  # a different shuffle per prompt
        p_exp, g_exp = unbiased_bon(np.take_along_axis(proxy, perm, 1), {"gold": np.take_along_axis(gold, perm, 1)},
                                    ns)
        np.testing.assert_allclose(p_exp, p_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g_exp["gold"], g_ref["gold"], rtol=1e-12, atol=1e-12)


def test_others_forms_and_validation():
    rng = np.random.default_rng(5)
    proxy, gold, other = rng.normal(size=(3, 10)), rng.normal(size=(3, 10)), rng.normal(size=(3, 10))
    p1, d = unbiased_bon(proxy, {"gold": gold, "other": other}, [1, 4])
    p2, g = unbiased_bon(proxy, gold, [1, 4])
    p3, none = unbiased_bon(proxy, None, [1, 4])
    assert set(d) == {"gold", "other"} and none is None
    np.testing.assert_array_equal(d["gold"], g)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(p1, p3)
    with pytest.raises(ValueError, match=r"others has shape \(3, 9\), but proxy has shape \(3, 10\)"):
        unbiased_bon(proxy, gold[:, :9], [1])
    with pytest.raises(ValueError, match=r"best-of-n needs 1 <= n <= N, got n=11"):
        unbiased_bon(proxy, gold, [11])
    with pytest.raises(ValueError, match=r"proxy scores contain NaN"):
        unbiased_bon(np.where(proxy > 0, np.nan, proxy), gold, [1])


# --- nested estimator ------------------------------------------------------------------------------------------------

def test_nested_is_best_of_first_n():
    proxy = np.array([[0.0, 3.0, 1.0, 5.0], [2.0, 2.0, 1.0, 0.0]])
    gold = np.array([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    p_exp, g_exp = nested_bon(proxy, {"gold": gold}, [1, 2, 3, 4])
    np.testing.assert_array_equal(p_exp, [[0, 3, 3, 5], [2, 2, 2, 2]])
    np.testing.assert_array_equal(g_exp["gold"], [[10, 11, 11, 13], [20, 20, 20, 20]])  # ties: lowest index


# --- bootstrap -------------------------------------------------------------------------------------------------------

def test_bootstrap_zero_gives_mean():
    x = np.random.default_rng(6).normal(size=(50, 3))
    mean, lo, hi = bootstrap_ci(x, 0, 0.95, 0)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_array_equal(lo, mean)
    np.testing.assert_array_equal(hi, mean)


def test_bootstrap_ci_contains_mean_and_has_sane_width():
    x = np.random.default_rng(7).normal(loc=[0.0, 5.0], scale=[1.0, 3.0], size=(400, 2))
    mean, lo, hi = bootstrap_ci(x, 2000, 0.95, 0)
    assert np.all(lo < mean) and np.all(mean < hi)
    half = 1.96 * x.std(axis=0, ddof=1) / math.sqrt(len(x))  # normal-approximation half-width
    np.testing.assert_allclose((hi - lo) / 2, half, rtol=0.15)


def test_bootstrap_deterministic_for_seed():
    x = np.random.default_rng(8).normal(size=(100, 4))
    a = bootstrap_ci(x, 300, 0.9, 123)
    b = bootstrap_ci(x, 300, 0.9, 123)
    c = bootstrap_ci(x, 300, 0.9, 124)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_bootstrap_resamples_do_not_depend_on_how_they_are_chunked(monkeypatch):
    """Resamples are drawn in chunks to bound memory; the chunk size changes neither the draws nor the means, so the
    Gao fits (gao.bootstrap_fit, gao.empirical_peak) and bootstrap_ci with one seed resample the same prompts."""
    from pipeline import bon

    x = np.random.default_rng(9).normal(size=(37, 3))
    whole = bon.resampled_means(x, 250, 5)
    monkeypatch.setattr(bon, "_BOOT_CHUNK_ENTRIES", 37 * 7)  # chunks of 7 resamples
    np.testing.assert_allclose(bon.resampled_means(x, 250, 5), whole, rtol=0, atol=1e-12)
    counts = np.bincount(np.random.default_rng(5).integers(0, 37, size=37), minlength=37)
    np.testing.assert_allclose(whole[0], counts @ x / 37, rtol=0, atol=1e-12)  # resample 0: the first draws


def test_bootstrap_validation():
    x = np.zeros((5, 2))
    for bad, message in [(dict(n_boot=-1), r"n_boot must be a non-negative integer"),
                         (dict(n_boot=10, ci=1.0), r"ci must lie in \(0, 1\)"),
                         (dict(n_boot=10, ci=0.0), r"ci must lie in \(0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            bootstrap_ci(x, **bad)


# --- curve table -----------------------------------------------------------------------------------------------------

def _toy_scores(P=200, N=64, seed=9):
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=(P, N))
    proxy = quality + 0.5 * rng.normal(size=(P, N))
    gold = quality - 0.3 * quality ** 2 + 0.5 * rng.normal(size=(P, N))  # gold peaks, then falls
    prompt_level = 2.0 * rng.normal(size=(P, 1))  # some prompts score higher across the board
    return proxy + prompt_level, gold + prompt_level


def test_curve_table_columns_and_values():
    proxy, gold = _toy_scores()
    ns = [1, 2, 4, 8, 16, 32, 64]
    df = bon_curve_table(proxy, gold, ns, n_boot=200, ci=0.95, seed=0)
    assert isinstance(df, pd.DataFrame) and list(df.columns) == BON_CURVE_COLUMNS
    assert list(df["n"]) == ns
    np.testing.assert_allclose(df["kl_bound"], kl_bon_bound(np.array(ns)))
    np.testing.assert_allclose(df["sqrt_kl_bound"], np.sqrt(df["kl_bound"]))
    p_exp, g_exp = unbiased_bon(proxy, gold, ns)
    np.testing.assert_allclose(df["proxy"], p_exp.mean(axis=0))
    np.testing.assert_allclose(df["gold"], g_exp.mean(axis=0))
    assert df.loc[0, "proxy_rel"] == pytest.approx(0.0, abs=1e-12)
    assert df.loc[0, "gold_rel"] == pytest.approx(0.0, abs=1e-12)
    for c in ["proxy", "gold", "proxy_rel", "gold_rel"]:
        assert np.all(df[f"{c}_lo"] <= df[c] + 1e-12) and np.all(df[c] <= df[f"{c}_hi"] + 1e-12)
    assert np.all(np.diff(df["proxy"]) > 0)  # proxy keeps rising with n
    # Relative CIs come from per-prompt differences, so they are narrower than the absolute ones.
    assert np.all((df["gold_rel_hi"] - df["gold_rel_lo"])[1:] < (df["gold_hi"] - df["gold_lo"])[1:])


def test_curve_table_baseline_without_n1():
    proxy, gold = _toy_scores(P=30, N=16)
    df = bon_curve_table(proxy, gold, [4, 16], n_boot=0)
    np.testing.assert_allclose(df["proxy_rel"], df["proxy"] - proxy.mean())
    np.testing.assert_allclose(df["gold_rel"], df["gold"] - gold.mean())
    np.testing.assert_array_equal(df["gold_lo"], df["gold"])


def test_curve_table_nested_estimator():
    proxy, gold = _toy_scores(P=30, N=16)
    df = bon_curve_table(proxy, gold, [1, 4, 16], n_boot=50, estimator="nested")
    assert df.loc[0, "proxy"] == pytest.approx(proxy[:, 0].mean())
    assert df.loc[0, "gold_rel"] == pytest.approx(0.0, abs=1e-12)
    # At n = N both estimators select the argmax of every prompt.
    assert df.loc[2, "gold"] == pytest.approx(bon_curve_table(proxy, gold, [16], n_boot=0).loc[0, "gold"])
    with pytest.raises(ValueError, match=r"estimator must be 'unbiased' or 'nested'"):
        bon_curve_table(proxy, gold, [1], n_boot=0, estimator="other")


# --- fits ------------------------------------------------------------------------------------------------------------

def test_fit_bon_recovers_parameters():
    d = np.sqrt(kl_bon_bound(np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 405])))  # includes d = 0, which is skipped
    fit = fit_bon(d, gao_bon(d, 1.3, 0.4))
    assert fit["alpha"] == pytest.approx(1.3, rel=1e-8)
    assert fit["beta"] == pytest.approx(0.4, rel=1e-8)
    assert fit["d_star"] == pytest.approx(1.3 / 0.8, rel=1e-8)
    grid = np.linspace(0, 5, 200_001)
    assert fit["d_star"] == pytest.approx(grid[np.argmax(gao_bon(grid, 1.3, 0.4))], abs=1e-4)
    assert fit["r_star"] == pytest.approx(gao_bon(fit["d_star"], 1.3, 0.4), rel=1e-8)


def test_fit_rl_recovers_parameters():
    d = np.linspace(0.0, 6.0, 25)
    fit = fit_rl(d, gao_rl(d, 0.8, 0.3))
    assert fit["alpha"] == pytest.approx(0.8, rel=1e-8)
    assert fit["beta"] == pytest.approx(0.3, rel=1e-8)
    assert fit["d_star"] == pytest.approx(math.exp(0.8 / 0.3 - 1), rel=1e-8)
    grid = np.linspace(1e-6, 20, 400_001)
    assert fit["d_star"] == pytest.approx(grid[np.argmax(gao_rl(grid, 0.8, 0.3))], abs=1e-3)
    assert fit["r_star"] == pytest.approx(float(gao_rl(fit["d_star"], 0.8, 0.3)), rel=1e-8)


def test_fit_without_peak_and_validation():
    d = np.linspace(0.1, 2.0, 10)
    assert fit_bon(d, gao_bon(d, 1.0, -0.2))["d_star"] == math.inf
    assert fit_rl(d, gao_rl(d, 1.0, -0.2))["d_star"] == math.inf
    assert gao_rl(0.0, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match=r"need at least 2 points with d > 0"):
        fit_bon([0.0, 1.0], [0.0, 1.0])  # only one point with d > 0
