"""Tests for best-of-n's actual KL: `kl_bon_exact` (discrete policy), the plug-in `kl_bon_estimate` from samples,
and the `with_kl_estimated` column helper."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.special import rel_entr

from pipeline.bon import (
    KL_ESTIMATED_COLUMNS,
    bon_curve_table,
    kl_bon_bound,
    kl_bon_estimate,
    kl_bon_exact,
    kl_bon_per_prompt,
    with_kl_estimated,
)

# A 4-outcome policy with a tie: outcomes 1 and 2 share reward 1.0.
PROBS = np.array([0.1, 0.3, 0.2, 0.4])
REWARDS = np.array([0.0, 1.0, 1.0, 2.0])


def brute_force_bon_policy(probs, rewards, n: int, tie: str) -> np.ndarray:
    """π_bon over outcomes by enumerating every n-tuple of draws, weighted by its probability.

    tie="uniform": among the draws with the maximum reward, each is returned with equal chance; tie="first": the
    first such draw; tie="outcome": the tied outcome with the largest index (a tie-break that looks at the outcome).
    """
    K = len(probs)
    pi = np.zeros(K)
    for draw in itertools.product(range(K), repeat=n):
        weight = np.prod(probs[list(draw)])
        best = max(rewards[y] for y in draw)
        tied = [y for y in draw if rewards[y] == best]  # one entry per tied draw (repeats count)
        if tie == "uniform":
            for y in tied:
                pi[y] += weight / len(tied)
        elif tie == "first":
            pi[tied[0]] += weight
        else:
            pi[max(tied)] += weight
    return pi


def kl_over_outcomes(pi, probs) -> float:
    return float(rel_entr(pi, probs).sum())


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("tie", ["uniform", "first"])
def test_exact_matches_enumeration_of_draws_with_ties(n, tie):
    pi = brute_force_bon_policy(PROBS, REWARDS, n, tie)
    assert pi.sum() == pytest.approx(1.0, abs=1e-12)
    assert kl_bon_exact(PROBS, REWARDS, n) == pytest.approx(kl_over_outcomes(pi, PROBS), abs=1e-12)


def test_a_tie_break_by_outcome_is_a_different_policy_with_more_kl():
    # Documented in kl_bon_exact: preferring one of the tied outcomes is not the policy it describes.
    for n in (2, 3):
        by_outcome = kl_over_outcomes(brute_force_bon_policy(PROBS, REWARDS, n, "outcome"), PROBS)
        assert by_outcome > kl_bon_exact(PROBS, REWARDS, n) + 1e-3


def test_exact_known_values_and_vectorised():
    assert kl_bon_exact(PROBS, REWARDS, 1) == 0.0
    assert kl_bon_exact([0.5, 0.5], [3.0, 3.0], 7) == 0.0  # all tied: best-of-n is the base policy
    # Two outcomes, the better with probability q: π_bon(top) = 1 − (1 − q)^n.
    q, n = 0.2, 5
    top = 1 - (1 - q) ** n
    expected = top * np.log(top / q) + (1 - top) * np.log((1 - top) / (1 - q))
    assert kl_bon_exact([1 - q, q], [0.0, 1.0], n) == pytest.approx(expected, rel=1e-12)
    ns = np.array([1, 2, 4, 8])
    kl = kl_bon_exact(PROBS, REWARDS, ns)
    assert kl.shape == (4,) and isinstance(kl_bon_exact(PROBS, REWARDS, 2), float)
    np.testing.assert_allclose(kl, [kl_bon_exact(PROBS, REWARDS, int(v)) for v in ns], rtol=1e-15)
    assert np.all(np.diff(kl) > 0)
    # Outcome order does not matter, and zero-probability outcomes change nothing.
    perm = [3, 0, 2, 1]
    assert kl_bon_exact(PROBS[perm], REWARDS[perm], 4) == pytest.approx(kl[2], rel=1e-12)
    assert kl_bon_exact(np.append(PROBS, 0.0), np.append(REWARDS, 9.0), 4) == pytest.approx(kl[2], rel=1e-12)


def test_exact_approaches_the_bound_for_many_distinct_equally_likely_outcomes():
    K = 10_000
    ns = np.array([1, 2, 4, 16, 64, 256])
    gap = kl_bon_bound(ns) - kl_bon_exact(np.full(K, 1 / K), np.arange(K), ns)
    assert np.all(gap >= -1e-12)
    assert np.all(gap < 1e-4)  # measured: at most 2.7e-5 (n = 256)


def test_exact_is_below_the_bound_for_random_discrete_policies():
    rng = np.random.default_rng(3)
    ns = np.array([1, 2, 3, 8, 32, 128, 1024])
    for _ in range(50):
        K = int(rng.integers(1, 30))
        probs = rng.dirichlet(np.full(K, 0.5))
        rewards = rng.integers(0, 5, size=K).astype(float)  # plenty of ties
        assert np.all(kl_bon_exact(probs, rewards, ns) <= kl_bon_bound(ns) + 1e-12)


def test_exact_validation():
    with pytest.raises(ValueError, match=r"probs must sum to 1"):
        kl_bon_exact([0.5, 0.4], [0.0, 1.0], 2)  # does not sum to 1
    with pytest.raises(ValueError, match=r"probs and rewards must be non-empty and of equal length"):
        kl_bon_exact([0.5, 0.5], [0.0], 2)
    with pytest.raises(ValueError, match=r"best-of-n needs integer n >= 1"):
        kl_bon_exact([0.5, 0.5], [0.0, 1.0], 0)
    with pytest.raises(ValueError, match=r"probs must be non-negative"):
        kl_bon_exact([1.5, -0.5], [0.0, 1.0], 2)


# --- plug-in estimate from samples -----------------------------------------------------------------------------------

def test_estimate_converges_to_the_exact_kl():
    ns = [1, 2, 4, 8, 16]
    exact = kl_bon_exact(PROBS, REWARDS, np.array(ns))
    rng = np.random.default_rng(0)
    # 20 prompts of the same policy, 2000 samples each. Tolerance 0.02 nats: over seeds 0..29 of this set-up the
    # largest error was 0.013 (at n = 16, where π_bon puts almost all mass on the top level and the estimate is most
    # sensitive to its sampled frequency); this seed's is 0.0044. The error shrinks like 1/√N.
    samples = rng.choice(REWARDS, p=PROBS, size=(20, 2000))
    np.testing.assert_allclose(kl_bon_estimate(samples, ns), exact, atol=0.02)


def test_estimate_of_distinct_samples_is_the_exact_kl_of_the_empirical_distribution():
    rng = np.random.default_rng(1)
    proxy = rng.normal(size=(3, 50))
    ns = [1, 2, 5, 50]
    per_prompt = kl_bon_per_prompt(proxy, ns)
    for p in range(3):
        np.testing.assert_allclose(per_prompt[p], kl_bon_exact(np.full(50, 1 / 50), proxy[p], np.array(ns)),
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(kl_bon_estimate(proxy, ns), per_prompt.mean(axis=0), rtol=1e-15)
    assert np.all(per_prompt <= np.log(50) + 1e-12)  # the plug-in has at most N atoms
    np.testing.assert_allclose(per_prompt[:, 0], 0.0, atol=1e-15)


def test_estimate_is_order_invariant_and_below_the_bound():
    rng = np.random.default_rng(2)
    ns = [1, 2, 4, 16, 64, 256]
    for proxy in (rng.normal(size=(8, 256)), rng.integers(0, 6, size=(8, 256)).astype(float),
                  np.round(rng.exponential(size=(8, 256)), 1)):
        per_prompt = kl_bon_per_prompt(proxy, ns)
        assert np.all(per_prompt <= kl_bon_bound(np.array(ns)) + 1e-12)
        assert np.all(per_prompt >= 0.0)
        shuffled = rng.permuted(proxy, axis=1)
        np.testing.assert_allclose(kl_bon_per_prompt(shuffled, ns), per_prompt, rtol=1e-12, atol=1e-15)


def test_repeated_responses_lower_the_kl_and_response_ids_merge_copies():
    # One prompt, 8 samples: responses a, a, a, b, b, c, d, d with proxy scores that differ by scoring noise.
    ids = np.array([["a", "a", "a", "b", "b", "c", "d", "d"]], dtype=object)
    level = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}
    clean = np.array([[level[i] for i in ids[0]]])
    noisy = clean + np.array([[0, 1e-7, -1e-7, 0, 2e-7, 0, 0, -3e-7]])
    ns = [1, 2, 4, 8]
    exact = kl_bon_exact([3 / 8, 2 / 8, 1 / 8, 2 / 8], [0.0, 1.0, 2.0, 3.0], np.array(ns))
    np.testing.assert_allclose(kl_bon_estimate(clean, ns), exact, rtol=1e-12)
    np.testing.assert_allclose(kl_bon_estimate(noisy, ns, response_ids=ids), exact, rtol=1e-12)
    # Without ids the noise splits the copies into distinct outcomes: more atoms, more KL.
    assert np.all(kl_bon_estimate(noisy, ns)[1:] > exact[1:])
    assert np.all(exact[1:] < kl_bon_bound(np.array(ns[1:])))
    # Ids are per prompt: the same id in two prompts is two outcomes.
    two = np.vstack([clean, clean + 10.0])
    np.testing.assert_allclose(kl_bon_per_prompt(two, ns, np.vstack([ids, ids])), np.vstack([exact, exact]),
                               rtol=1e-12)


def test_estimate_validation():
    with pytest.raises(ValueError, match=r"best-of-n needs 1 <= n <= N, got n=5, N=4"):
        kl_bon_estimate(np.zeros((2, 4)), [5])  # n > N
    with pytest.raises(ValueError, match=r"proxy scores contain NaN"):
        kl_bon_estimate(np.array([[0.0, np.nan]]), [1])
    with pytest.raises(ValueError, match=r"response_ids has shape \(2, 3\), but proxy has shape \(2, 4\)"):
        kl_bon_estimate(np.zeros((2, 4)), [2], response_ids=np.zeros((2, 3)))


def test_with_kl_estimated_adds_columns_beside_the_bound_and_leaves_the_table_alone():
    rng = np.random.default_rng(4)
    proxy = rng.integers(0, 8, size=(30, 64)).astype(float)
    gold = proxy + rng.normal(size=proxy.shape)
    ns = [1, 2, 4, 16]
    table = bon_curve_table(proxy, gold, ns, n_boot=50)
    before = table.copy()
    out = with_kl_estimated(table, proxy, n_boot=50)
    pd.testing.assert_frame_equal(table, before)
    cols = list(out.columns)
    i = cols.index("sqrt_kl_bound")
    assert cols[i + 1:i + 1 + len(KL_ESTIMATED_COLUMNS)] == KL_ESTIMATED_COLUMNS
    assert cols == list(table.columns[:i + 1]) + KL_ESTIMATED_COLUMNS + list(table.columns[i + 1:])
    np.testing.assert_allclose(out.kl_estimated, kl_bon_estimate(proxy, ns), rtol=1e-12)
    np.testing.assert_allclose(out.sqrt_kl_estimated, np.sqrt(out.kl_estimated))
    assert np.all(out.kl_estimated_lo <= out.kl_estimated) and np.all(out.kl_estimated <= out.kl_estimated_hi)
    assert np.all(out.kl_estimated[1:] < out.kl_bound[1:])
