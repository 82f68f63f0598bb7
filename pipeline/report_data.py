"""What the study report, the sweep report and the report over worlds read from a study's artifacts, and the names
and comparison points they share: eval_proxy's accuracy rows, the best-of-n curves and their empirical peaks, the
measures proxies are compared in (`run_measures`), the RL arms' names, the KLs at which RL runs are compared
(`matched_points`) and each RL run's endpoints from its curve stage's fit.json (`run_endpoint`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline import matched_kl
from pipeline.gao import peak_row
from pipeline.records import read_curve


def read_accuracy(proxies: list[str], inputs: dict[str, Path]) -> pd.DataFrame:
    """Every proxy's eval_proxy accuracy rows (input role `eval[p]`), concatenated; empty without any."""
    evaluated = [pd.read_parquet(inputs[f"eval[{p}]"] / "accuracy.parquet") for p in proxies if f"eval[{p}]" in inputs]
    return pd.concat(evaluated, ignore_index=True) if evaluated else pd.DataFrame()


def read_bon_curves(proxies: list[str], inputs: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """Each proxy's best-of-n curve (input role `bon[p]`: bon_curve's curve.parquet), for the proxies that have one."""
    return {p: read_curve(inputs[f"bon[{p}]"]) for p in proxies if f"bon[{p}]" in inputs}


def bon_peak(c: pd.DataFrame) -> dict:
    """One best-of-n curve's empirical gold peak and its end, as bon_curve's fit.json has them (the first maximum)."""
    peak, last = peak_row(c), c.iloc[-1]
    return {"peak_n": int(peak.n), "peak_kl_bound": float(peak.kl_bound), "peak_gold": float(peak.gold),
            "max_n": int(last.n), "kl_bound_at_max_n": float(last.kl_bound), "gold_at_max_n": float(last.gold)}


def run_measures(acc: pd.DataFrame, curves: dict[str, pd.DataFrame]) -> list[tuple[str, pd.Series]]:
    """What proxies are compared in, each as (measure, one value per proxy run indexed by its name): best-of-n peak
    gold (`bon_peak` of each bon_curve's curve.parquet) and pairwise accuracy on clean labels per
    evaluation set (eval_proxy's accuracy.parquet rows, concatenated), named `accuracy (<set>)`. Used by the report's
    comparisons and by the sweep report (`pipeline.sweep`)."""
    measures: list[tuple[str, pd.Series]] = []
    if curves:
        measures.append(("best-of-n peak gold", pd.Series({p: bon_peak(c)["peak_gold"] for p, c in curves.items()})))
    if len(acc):
        for s, sub in acc[acc.labels == "clean"].groupby("set", sort=False):
            measures.append((f"accuracy ({s})", sub.set_index("proxy").accuracy))
    return measures


ARM_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}
PPO_VARIANT_PREFIX = "ppo_"  # a PPO variant's arm is ppo_<name> (`PPOConfig.arms`)


def arm_name(arm: str) -> str:
    """An RL arm as a reader names it: PPO, GRPO, RLOO, DPO, and a PPO variant `ppo_<name>` as "PPO (<name>)"."""
    if arm in ARM_NAMES:
        return ARM_NAMES[arm]
    if arm.startswith(PPO_VARIANT_PREFIX):
        return f"PPO ({arm.removeprefix(PPO_VARIANT_PREFIX)})"
    return arm


def is_ppo_variant(arm: str) -> bool:
    return arm not in ARM_NAMES and arm.startswith(PPO_VARIANT_PREFIX)


KL_TARGETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # nats; the report uses the largest three every run reaches


def matched_points(runs: list[pd.DataFrame], peaks_kl: list[float]) -> tuple[list[float], tuple[float, float], str]:
    """Where a family of RL runs is compared: (fixed KLs in nats, (√KL lo, √KL hi) of the loss rate, what that range
    is).

    The KLs are the largest three of KL_TARGETS inside the range every run measured (`matched_kl.common_grid`); runs
    too short for any of them get one KL, the common range's end rounded down to two significant digits. The loss
    range ends where the first run stops (the common range's end) and starts at the latest of the runs' empirical
    gold peaks, so that every run is past its own peak over it and all are measured over the same distance; when
    that leaves less than a quarter of the common range (a rate over a sliver is noise), it is the whole common
    range.
    Empty (and (nan, nan)) when the runs share no range."""
    grid = matched_kl.common_grid(runs, n=2)
    if grid.size < 2:
        return [], (math.nan, math.nan), ""
    lo, hi = float(grid[0]), float(grid[-1])
    kls = [k for k in KL_TARGETS if lo ** 2 <= k <= hi ** 2][-3:]
    if not kls and hi > 0:
        scale = 10.0 ** (math.floor(math.log10(hi ** 2)) - 1)
        kls = [k] if (k := round(math.floor(hi ** 2 / scale) * scale, 12)) >= lo ** 2 else []
    peak = max(math.sqrt(max(k, 0.0)) for k in peaks_kl)
    if lo <= peak and hi - peak >= (hi - lo) / 4:
        return kls, (peak, hi), "from the latest of the runs' gold peaks to where the first run stops"
    return kls, (lo, hi), "the whole range every run measured (past the latest peak is under a quarter of it)"


# What a run's fit.json says about where it over-optimizes: its empirical gold peak (the first maximum over exports),
# the measured KL there, and the gold and KL of its last export.
RUN_ENDPOINTS = {"peak gold": ("empirical_peak", "gold"), "KL at the gold peak": ("empirical_peak", "kl"),
                 "gold at the last export": ("gold_at_last_step", None),
                 "KL at the last export": ("kl_at_last_step", None)}


def run_endpoint(fit: dict, quantity: str) -> float:
    """One of RUN_ENDPOINTS of an RL run, from its curve stage's fit.json (the one reader of those keys)."""
    key, sub = RUN_ENDPOINTS[quantity]
    return float(fit[key][sub] if sub else fit[key])
