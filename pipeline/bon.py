"""Best-of-n (BoN) over-optimization curves: KL bound, unbiased estimator, bootstrap CIs and Gao-style fits.

Pure numpy/scipy. Inputs are score matrices of shape (P prompts, N samples): `proxy[p, j]` is the proxy reward of
sample j of prompt p, and every other score matrix (e.g. the gold reward) is aligned with it sample by sample.

Estimator (Gao et al. 2022, Coste et al. 2023). Draw N ≫ n samples per prompt once and sort them by proxy score
ascending. The i-th smallest (1-based) is the best of a uniformly random n-subset with probability

    w_i(N, n) = C(i − 1, n − 1) / C(N, n)      (zero for i < n; Σ_i w_i = 1 by the hockey-stick identity),

so E[score of best-of-n] = Σ_i w_i · score_(i), for the proxy and for any score carried along with it. This uses all
N samples for every n instead of only the first n ("nested" estimator, kept for comparison).

Distance: d = √KL with KL_bon(n) = log n − (n − 1)/n, which is an *upper bound* on the true KL of best-of-n
(Beirami et al. 2024), so the x-axis is labelled as a bound. The true KL of a discrete policy (`kl_bon_exact`) and its
plug-in estimate from the N samples (`kl_bon_estimate`) are below it, far below when many samples repeat.

Gao et al.'s functional forms fitted to these curves live in `pipeline.gao` (shared with the RL curves).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from scipy.special import gammaln, rel_entr

# Upper limit on the number of entries of one chunk of bootstrap resample indices (n_boot × P), to bound memory.
_BOOT_CHUNK_ENTRIES = 4_000_000


# ---------------------------------------------------------------------------------------------------------------------
# KL bound and subset weights
# ---------------------------------------------------------------------------------------------------------------------

def kl_bon_bound(n) -> float | np.ndarray:
    """Upper bound on KL(best-of-n ‖ base) in nats: log n − (n − 1)/n (Beirami et al. 2024).

    Vectorised: a scalar `n` gives a float, an array gives an array of the same shape. n must be ≥ 1.
    """
    n_arr = np.asarray(n, dtype=float)
    if np.any(~(n_arr >= 1)):  # also rejects NaN
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    kl = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(kl) if kl.ndim == 0 else kl


def _bon_level_kl_terms(F: np.ndarray, F_prev: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """Each reward level's term π_bon log(π_bon / p) of KL(best-of-n ‖ base), elementwise.

    A level is a set of outcomes with equal reward; `p` is its probability under the base policy, `F` the base CDF of
    the reward at the level (including it) and `F_prev` the CDF strictly below it (F − p). Best-of-n lands on the
    level with probability F^n − F_prev^n, written as F^n · (1 − (F_prev/F)^n) with `expm1` so that a small level
    high in the distribution (F_prev ≈ F ≈ 1) does not lose its mass to cancellation. Levels with p = 0 give 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # F_prev = 0 (the lowest level): log 0 = −inf, expm1 → −1
        ratio_log = np.log(F_prev) - np.log(F)
        pi = np.where(p > 0, F ** n * -np.expm1(n * ratio_log), 0.0)
    return rel_entr(pi, p)  # π log(π/p), 0 where π = 0


def kl_bon_exact(probs, rewards, n) -> float | np.ndarray:
    """KL(π_bon(n) ‖ π) in nats of best-of-n over a discrete base policy π, by exact enumeration of its outcomes.

    Args:
        probs: (K,) probabilities of the K outcomes under π (non-negative, summing to 1; renormalised).
        rewards: (K,) reward of each outcome; best-of-n keeps the highest of n independent draws.
        n: a positive integer or an array of them (the result then has its shape).

    With F the CDF of the reward under π and F⁻ the CDF strictly below, best-of-n's maximum reward equals r with
    probability F(r)^n − F⁻(r)^n (Beirami et al. 2024). Ties: when several of the n draws share the maximum reward,
    best-of-n returns one of them chosen without looking at which outcome it is (uniformly at random, or the first
    drawn: both give the same policy). Given the maximum level, the returned outcome then is distributed as π
    restricted to that level, so π_bon(y) / π(y) is the same for every outcome of a level, and the KL over outcomes
    equals the KL over reward levels:

        KL = Σ_levels π_bon(level) log(π_bon(level) / π(level)),   π_bon(level) = F^n − F⁻^n.

    This equals the bound log n − (n − 1)/n only in the limit of distinct rewards with vanishing probabilities, and
    is below it otherwise (for example 0 when all rewards tie). A tie-break that prefers particular outcomes (a
    total order on outcomes) is a different policy with a larger KL; it is not what `unbiased_bon` estimates.
    """
    p = np.asarray(probs, dtype=float).ravel()
    r = np.asarray(rewards, dtype=float).ravel()
    if p.shape != r.shape or p.size < 1:
        raise ValueError(f"probs and rewards must be non-empty and of equal length, got {p.size} and {r.size}")
    if np.any(~(p >= 0)) or not np.isfinite(r).all():
        raise ValueError("probs must be non-negative and rewards finite")
    total = p.sum()
    if not abs(total - 1.0) <= 1e-9:
        raise ValueError(f"probs must sum to 1, got {total}")
    ns = np.asarray(n)
    for v in ns.ravel():
        if not _is_int(v) or v < 1:
            raise ValueError(f"best-of-n needs integer n >= 1, got {v!r}")
    levels, inverse = np.unique(r, return_inverse=True)  # ascending rewards; equal rewards form one level
    p_level = np.bincount(inverse, weights=p / total, minlength=levels.size)
    F = np.minimum(np.cumsum(p_level), 1.0)
    F_prev = np.concatenate([[0.0], F[:-1]])
    kl = np.array([_bon_level_kl_terms(F, F_prev, p_level, int(v)).sum() for v in ns.ravel()]).reshape(ns.shape)
    kl = np.maximum(kl, 0.0)  # n = 1 gives 0 up to rounding (≈ −1e-17)
    return float(kl) if kl.ndim == 0 else kl


def bon_subset_weights(N: int, n: int) -> np.ndarray:
    """Weights (length N) of the sorted samples in the best-of-n expectation.

    Entry i − 1 is the probability that the i-th smallest of N samples (1-based i) is the maximum of a uniformly
    random n-subset: C(i − 1, n − 1) / C(N, n), zero for i < n. Computed in log space with `gammaln`, because the
    binomial coefficients overflow float64 already for N ≈ 1000. The weights sum to 1.
    """
    N, n = _check_N_n(N, n)
    i = np.arange(n, N + 1, dtype=float)
    log_num = gammaln(i) - gammaln(n) - gammaln(i - n + 1)  # log C(i−1, n−1)
    log_den = gammaln(N + 1) - gammaln(n + 1) - gammaln(N - n + 1)  # log C(N, n)
    w = np.zeros(N)
    w[n - 1:] = np.exp(log_num - log_den)
    return w


def bon_weight_matrix(N: int, ns) -> np.ndarray:
    """The (len(ns), N) matrix whose row k is `bon_subset_weights(N, ns[k])`."""
    ns = _check_ns(ns, N)
    W = np.zeros((len(ns), N))
    for k, n in enumerate(ns):  # one row per n; len(ns) is small (≈ log2 N)
        W[k] = bon_subset_weights(N, n)
    return W


def _check_N_n(N, n) -> tuple[int, int]:
    if not (_is_int(N) and _is_int(n)):
        raise TypeError(f"N and n must be integers, got N={N!r}, n={n!r}")
    N, n = int(N), int(n)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={N}")
    return N, n


def _check_ns(ns, N: int) -> list[int]:
    ns = list(np.atleast_1d(ns).tolist()) if isinstance(ns, np.ndarray) else list(ns)
    for n in ns:
        _check_N_n(N, n)
    return [int(n) for n in ns]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# ---------------------------------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------------------------------

def _as_scores(x, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (prompts, samples) matrix, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, but proxy has shape {shape}; scores must align sample by sample")
    return a


def _others_as_dict(others, shape) -> tuple[dict[str, np.ndarray], bool]:
    """Normalise `others` to a dict of aligned (P, N) matrices; the flag says whether the caller passed a dict."""
    if others is None:
        return {}, True
    if isinstance(others, Mapping):
        return {k: _as_scores(v, f"others[{k!r}]", shape) for k, v in others.items()}, True
    return {"_": _as_scores(others, "others", shape)}, False


def _unwrap(res: dict[str, np.ndarray], others, was_dict: bool):
    """Give the other-score results back in the form the caller passed them (dict, single array or None)."""
    if others is None:
        return None
    return res if was_dict else res["_"]


def _tie_group_means(sorted_proxy: np.ndarray, sorted_other: np.ndarray) -> np.ndarray:
    """Replace each run of equal proxy scores (within a row of a proxy-sorted matrix) by the mean of `sorted_other`.

    The best-of-n weights depend only on the rank, and under a uniformly random tie-break every tied sample is
    equally likely to sit at each rank of its tie group, so the expected score at each of those ranks is the group
    mean. With the group means in place, the estimate no longer depends on the order of tied samples and equals the
    expectation under a uniformly random tie-break (the selection rule "pick uniformly among tied maxima").
    """
    P, N = sorted_proxy.shape
    starts = np.ones((P, N), dtype=bool)
    starts[:, 1:] = sorted_proxy[:, 1:] != sorted_proxy[:, :-1]
    # Column 0 always starts a group, so a running count over the flattened matrix gives group ids that never
    # span two prompts: one bincount then averages every group of every prompt at once.
    gid = np.cumsum(starts.ravel()) - 1
    counts = np.bincount(gid)
    sums = np.bincount(gid, weights=sorted_other.ravel())
    return (sums / counts)[gid].reshape(P, N)


def unbiased_bon(proxy: np.ndarray, others: Mapping[str, np.ndarray] | np.ndarray | None, ns):
    """Per-prompt expected scores of best-of-n, for each n in `ns`, from N samples per prompt.

    Args:
        proxy: (P, N) proxy scores; best-of-n selects by these. Must not contain NaN.
        others: scores to evaluate at the selected sample, aligned with `proxy` sample by sample: a dict of
            (P, N) matrices (e.g. `{"gold": gold}`), a single (P, N) matrix, or None.
        ns: the n values, each in 1..N.

    Returns:
        `(proxy_exp, others_exp)`: `proxy_exp` is (P, len(ns)); `others_exp` has the form of `others` (dict of
        (P, len(ns)) arrays, one array, or None).

    Each prompt's samples are sorted by proxy score as whole records: one permutation (a stable argsort, so ties
    keep sample-index order and the sort is deterministic) is applied to the proxy and to every other matrix
    alike. Sorting parallel lists separately (a bug seen in a published implementation) would pair the gold score
    of one sample with the proxy rank of another.

    Ties in the proxy: the other scores are averaged within each group of equal proxy scores, which is exactly the
    expectation under a uniformly random tie-break and makes the result independent of the order of tied samples
    (see `_tie_group_means`). The proxy expectation is unaffected by ties.

    Vectorised: one (P, N) × (N, len(ns)) product per score; no loop over prompts.
    """
    proxy = _as_scores(proxy, "proxy")
    if np.isnan(proxy).any():
        raise ValueError("proxy scores contain NaN; best-of-n cannot rank them")
    P, N = proxy.shape
    other_map, was_dict = _others_as_dict(others, proxy.shape)
    W = bon_weight_matrix(N, ns)

    order = np.argsort(proxy, axis=1, kind="stable")
    sorted_proxy = np.take_along_axis(proxy, order, axis=1)
    has_ties = bool((sorted_proxy[:, 1:] == sorted_proxy[:, :-1]).any())

    res = {}
    for name, o in other_map.items():  # loop over score kinds (gold, ...), not prompts
        sorted_o = np.take_along_axis(o, order, axis=1)
        if has_ties:
            sorted_o = _tie_group_means(sorted_proxy, sorted_o)
        res[name] = sorted_o @ W.T
    return sorted_proxy @ W.T, _unwrap(res, others, was_dict)


def nested_picks(proxy: np.ndarray, ns) -> np.ndarray:
    """(P, len(ns)) sample indices: entry [p, k] is the sample best-of-ns[k] picks for prompt p when the draw is the
    first ns[k] samples, i.e. the proxy argmax among samples 0..ns[k]−1 (ties to the lowest index).

    The picks are nested (each n's draw extends the previous one), so they show one concrete best-of-n draw growing
    with n: the nested estimator's selections, and the responses a report shows as examples.
    """
    proxy = _as_scores(proxy, "proxy")
    if np.isnan(proxy).any():
        raise ValueError("proxy scores contain NaN; best-of-n cannot rank them")
    ns = _check_ns(ns, proxy.shape[1])
    idx = np.empty((proxy.shape[0], len(ns)), dtype=np.intp)
    for k, n in enumerate(ns):  # loop over n values, not prompts
        idx[:, k] = np.argmax(proxy[:, :n], axis=1)
    return idx


def nested_bon(proxy: np.ndarray, others: Mapping[str, np.ndarray] | np.ndarray | None, ns):
    """The reference code's naive estimator: per prompt, the sample with the highest proxy among the first n.

    Same arguments and return form as `unbiased_bon`. It uses only n of the N samples for each n, so it is much
    noisier (and its curve points are correlated through the shared prefix); ties go to the lowest sample index.
    For comparison only.
    """
    proxy = _as_scores(proxy, "proxy")
    if np.isnan(proxy).any():
        raise ValueError("proxy scores contain NaN; best-of-n cannot rank them")
    P, N = proxy.shape
    other_map, was_dict = _others_as_dict(others, proxy.shape)
    ns = _check_ns(ns, N)

    idx = nested_picks(proxy, ns)
    res = {name: np.take_along_axis(o, idx, axis=1) for name, o in other_map.items()}
    return np.take_along_axis(proxy, idx, axis=1), _unwrap(res, others, was_dict)


def kl_bon_per_prompt(proxy: np.ndarray, ns, response_ids=None) -> np.ndarray:
    """(P, len(ns)) plug-in estimates of each prompt's KL(π_bon(n) ‖ π) from its N samples, in nats.

    The estimate is `kl_bon_exact` applied to the empirical distribution of the prompt's N samples (a plug-in of the
    exact formula of Beirami et al. 2024; their Section 4 proposes a closed-form estimator of its own, which this has
    not been checked against): each distinct outcome gets its sample frequency as its probability under π.
    Outcomes are grouped into reward levels as in `kl_bon_exact`, which matches `unbiased_bon`'s rule for ties
    (uniform among the tied samples), so the estimate is the KL of the policy whose scores that estimator gives.

    Args:
        proxy: (P, N) proxy scores, the reward best-of-n selects by. Must not contain NaN.
        ns: the n values, each in 1..N (as for `unbiased_bon`).
        response_ids: optional (P, N) identifiers of the sampled responses (e.g. their text or a hash). Samples with
            the same id in a prompt are one outcome, scored by the mean of their proxy scores, so copies of one
            response count as a repeat even when batched scoring gave them slightly different floats. Without ids,
            samples with exactly equal proxy scores are one level, which gives the same KL when identical responses
            get identical scores.

    Bias: the plug-in distribution has at most N atoms, so the estimate is at most log N; for continuous rewards
    (no repeats) it underestimates the true KL once n is a sizeable fraction of N. It is always ≤ the bound.
    Vectorised over prompts: one pass per n over the sorted (P, N) matrix.
    """
    proxy = _as_scores(proxy, "proxy")
    if np.isnan(proxy).any():
        raise ValueError("proxy scores contain NaN; best-of-n cannot rank them")
    P, N = proxy.shape
    ns = _check_ns(ns, N)
    if response_ids is not None:
        proxy = _score_per_response(proxy, response_ids)
    sorted_proxy = np.sort(proxy, axis=1)
    cols = np.arange(N)
    starts = np.ones((P, N), dtype=bool)
    starts[:, 1:] = sorted_proxy[:, 1:] != sorted_proxy[:, :-1]
    ends = np.ones((P, N), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    # Each level's terms are evaluated at its last sample: F = (index + 1)/N, F⁻ = (index of its first sample)/N.
    first = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
    F = np.broadcast_to((cols + 1) / N, (P, N))
    F_prev = first / N
    p = np.where(ends, (cols - first + 1) / N, 0.0)  # p = 0 elsewhere: one term per level
    out = np.empty((P, len(ns)))
    for k, n in enumerate(ns):  # loop over n values, not prompts
        out[:, k] = _bon_level_kl_terms(F, F_prev, p, n).sum(axis=1)
    return np.maximum(out, 0.0)  # n = 1 gives 0 up to rounding (≈ −1e-17)


def kl_bon_estimate(proxy: np.ndarray, ns, response_ids=None) -> np.ndarray:
    """(len(ns),) plug-in estimate of KL(π_bon(n) ‖ π) averaged over prompts: the column means of
    `kl_bon_per_prompt` (see there for the estimator, ties, `response_ids` and its bias)."""
    return kl_bon_per_prompt(proxy, ns, response_ids).mean(axis=0)


def _score_per_response(proxy: np.ndarray, response_ids) -> np.ndarray:
    """Replace each sample's score by the mean score of the samples with the same response id in its prompt."""
    ids = np.asarray(response_ids, dtype=object)
    if ids.shape != proxy.shape:
        raise ValueError(f"response_ids has shape {ids.shape}, but proxy has shape {proxy.shape}")
    P, N = proxy.shape
    codes = pd.factorize(ids.ravel())[0].reshape(P, N)  # ids of any hashable type to integers
    if (codes < 0).any():  # factorize codes a missing id as -1, which would merge it with another prompt's group
        raise ValueError("response_ids holds missing values (None/NaN); every sample needs an id")
    # One group per (prompt, response): combine the prompt index and the id's code into one key.
    _, group = np.unique(np.arange(P)[:, None] * (codes.max() + 1) + codes, return_inverse=True)
    group = group.ravel()
    mean = np.bincount(group, weights=proxy.ravel()) / np.bincount(group)
    return mean[group].reshape(P, N)


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap over prompts
# ---------------------------------------------------------------------------------------------------------------------

def bootstrap_ci(per_prompt: np.ndarray, n_boot: int, ci: float = 0.95, seed: int = 0):
    """Percentile bootstrap over prompts for the mean of each column of `per_prompt` (P, K).

    Prompts are resampled with replacement `n_boot` times (numpy Generator seeded with `seed`, so the result is
    deterministic); all K columns share the same resamples, so CIs of related quantities stay consistent.

    Returns `(mean, lo, hi)`, each of shape (K,): `mean` is the plain mean over prompts, `lo`/`hi` the
    (1 − ci)/2 and (1 + ci)/2 quantiles of the bootstrap means. With `n_boot == 0`, lo = hi = mean.
    """
    x = np.asarray(per_prompt, dtype=float)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"per_prompt must be a (prompts, K) matrix with at least one prompt, got shape {x.shape}")
    if not _is_int(n_boot) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    mean = x.mean(axis=0)
    if n_boot == 0:
        return mean, mean.copy(), mean.copy()
    lo, hi = np.quantile(resampled_means(x, n_boot, seed), [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0], axis=0)
    return mean, lo, hi


def resampled_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K): the column means of each of `n_boot` resamples, with replacement, of the rows (prompts) of the
    (P, K) matrix `x`. The one prompt bootstrap of the project (`bootstrap_ci`, the Gao fits' and empirical peaks'
    CIs): the draws come from a numpy Generator seeded with `seed` and depend only on (seed, P, n_boot), so every
    caller with the same seed resamples the same prompts."""
    P, K = x.shape
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, K))
    chunk = max(1, _BOOT_CHUNK_ENTRIES // P)
    for start in range(0, n_boot, chunk):  # chunks of resamples bound memory; all prompts handled at once
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, P, size=(b, P))
        # counts[r, p]: how often resample r drew prompt p. A (b, P) × (P, K) product then gives every resample's
        # mean without materialising a (b, P, K) array.
        counts = np.bincount((idx + P * np.arange(b)[:, None]).ravel(), minlength=b * P).reshape(b, P)
        boot[start:start + b] = counts @ x / P
    return boot


# ---------------------------------------------------------------------------------------------------------------------
# Curve table
# ---------------------------------------------------------------------------------------------------------------------

BON_CURVE_COLUMNS = ["n", "kl_bound", "sqrt_kl_bound",
                     "proxy", "proxy_lo", "proxy_hi", "gold", "gold_lo", "gold_hi",
                     "proxy_rel", "proxy_rel_lo", "proxy_rel_hi", "gold_rel", "gold_rel_lo", "gold_rel_hi"]


def bon_per_prompt(proxy: np.ndarray, gold: np.ndarray, ns, estimator: str = "unbiased") -> dict[str, np.ndarray]:
    """Each prompt's best-of-n expectations: (P, len(ns)) matrices "proxy", "gold", "proxy_rel" and "gold_rel".

    The relative scores are the score minus the prompt's initial-policy (n = 1) score, computed even when 1 is not in
    `ns`. `estimator` is "unbiased" (`unbiased_bon`; baseline = the mean over all N samples, which is its n = 1
    value) or "nested" (`nested_bon`, for comparison; baseline = its own n = 1 value, the first sample). The curve
    table's points are the means of these columns over prompts.
    """
    proxy = _as_scores(proxy, "proxy")
    gold = _as_scores(gold, "gold", proxy.shape)
    ns = _check_ns(ns, proxy.shape[1])
    if not ns:
        raise ValueError("ns is empty")
    if estimator == "unbiased":
        p_exp, g_exp = unbiased_bon(proxy, gold, ns)
        p_base, g_base = proxy.mean(axis=1), gold.mean(axis=1)
    elif estimator == "nested":
        p_exp, g_exp = nested_bon(proxy, gold, ns)
        p_base, g_base = proxy[:, 0], gold[:, 0]
    else:
        raise ValueError(f"estimator must be 'unbiased' or 'nested', got {estimator!r}")
    return {"proxy": p_exp, "gold": g_exp, "proxy_rel": p_exp - p_base[:, None], "gold_rel": g_exp - g_base[:, None]}


def bon_curve_table(proxy: np.ndarray, gold: np.ndarray, ns, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                    estimator: str = "unbiased") -> pd.DataFrame:
    """The BoN curve: one row per n with the KL bound, mean proxy and gold scores and their bootstrap CIs.

    Columns (`BON_CURVE_COLUMNS`): n, kl_bound (log n − (n−1)/n, an upper bound on the KL), sqrt_kl_bound
    (the distance d), proxy/gold with _lo/_hi CI bounds, and proxy_rel/gold_rel (with _lo/_hi): the score minus the
    initial policy's (n = 1) score. The relative CIs are bootstrapped on per-prompt differences, so the prompt-level
    variation common to both terms cancels. The n = 1 baseline is computed even when 1 is not in `ns`.

    `estimator` is "unbiased" or "nested" (see `bon_per_prompt`, which gives the per-prompt values averaged here).
    All quantities share the same bootstrap resamples.
    """
    blocks = bon_per_prompt(proxy, gold, ns, estimator)
    ns = _check_ns(ns, np.shape(proxy)[1])  # validated by bon_per_prompt; as a list of ints
    K = len(ns)
    mean, lo, hi = bootstrap_ci(np.concatenate(list(blocks.values()), axis=1), n_boot, ci, seed)

    n_arr = np.asarray(ns)
    kl = np.asarray(kl_bon_bound(n_arr), dtype=float)
    table = {"n": n_arr, "kl_bound": kl, "sqrt_kl_bound": np.sqrt(kl)}
    for j, name in enumerate(blocks):
        sl = slice(j * K, (j + 1) * K)
        table[name], table[f"{name}_lo"], table[f"{name}_hi"] = mean[sl], lo[sl], hi[sl]
    return pd.DataFrame(table)[BON_CURVE_COLUMNS]


KL_ESTIMATED_COLUMNS = ["kl_estimated", "kl_estimated_lo", "kl_estimated_hi", "sqrt_kl_estimated"]


def with_kl_estimated(table: pd.DataFrame, proxy: np.ndarray, response_ids=None, n_boot: int = 1000,
                      ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """A copy of a `bon_curve_table` with the plug-in KL estimate beside the bound.

    Adds `KL_ESTIMATED_COLUMNS` right after sqrt_kl_bound: kl_estimated (`kl_bon_estimate` at the table's n), its
    percentile-bootstrap CI over prompts (kl_estimated_lo/_hi, `bootstrap_ci` with the given n_boot, ci, seed) and
    sqrt_kl_estimated, the distance d on that scale. `proxy` (and `response_ids`) must be the matrix the table was
    computed from. The table passed in is not modified.
    """
    if "n" not in table or "sqrt_kl_bound" not in table:
        raise ValueError("table must be a bon_curve_table (columns n and sqrt_kl_bound)")
    per_prompt = kl_bon_per_prompt(proxy, table["n"].to_numpy(), response_ids)
    mean, lo, hi = bootstrap_ci(per_prompt, n_boot, ci, seed)
    out = table.copy()
    at = list(out.columns).index("sqrt_kl_bound") + 1
    for offset, (name, values) in enumerate(zip(KL_ESTIMATED_COLUMNS, (mean, lo, hi, np.sqrt(mean)))):
        out.insert(at + offset, name, values)
    return out
