"""Differences between two proxies trained over seeds, read from a study's report tables.

For each measure the declared variant's rule uses (README, "Declared variant: intruder-heavy demonstrations"): the
difference of means over seeds (B − A) and its Welch 95 % interval (unequal variances, Welch–Satterthwaite degrees
of freedom). Measures: knowledge AUC per kind of minimal pair (knowledge.csv), pairwise accuracy per evaluation set
(accuracy.csv, clean labels), best-of-n peak gold and gold at the largest n (bon_peaks.csv).

    python scripts/group_differences.py reports/tiny_intruders bt grm_sft
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.config import proxy_family


def welch(a, b) -> dict:
    """Mean of b minus mean of a, and the Welch 95 % interval of that difference."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    test = stats.ttest_ind(b, a, equal_var=False)
    ci = test.confidence_interval(0.95)
    return {"A": a.mean(), "B": b.mean(), "B - A": b.mean() - a.mean(), "lo": ci.low, "hi": ci.high,
            "seeds": f"{len(a)} vs {len(b)}"}


def _seeds_of(group: str, names) -> list[str]:
    """The proxies of one config entry: `name` and its copies `name@seedK`."""
    return [n for n in names if proxy_family(n) == group]


def differences(report: Path, a: str, b: str) -> pd.DataFrame:
    rows = []
    knowledge = pd.read_csv(report / "knowledge.csv")
    for kind, sub in knowledge.groupby("kind", sort=False):
        by = sub.set_index("scorer").auc
        rows.append({"measure": f"knowledge AUC ({kind})",
                     **welch(by[_seeds_of(a, by.index)], by[_seeds_of(b, by.index)])})
    acc = pd.read_csv(report / "accuracy.csv")
    for s, sub in acc[acc.labels == "clean"].groupby("set", sort=False):
        by = sub.set_index("proxy").accuracy
        rows.append({"measure": f"accuracy ({s})", **welch(by[_seeds_of(a, by.index)], by[_seeds_of(b, by.index)])})
    peaks = pd.read_csv(report / "bon_peaks.csv").set_index("proxy_name")
    for col in ("peak_gold", "gold_at_max_n"):
        rows.append({"measure": f"best-of-n {col.replace('_', ' ')}",
                     **welch(peaks.loc[_seeds_of(a, peaks.index), col], peaks.loc[_seeds_of(b, peaks.index), col])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report directory (reports/<study>)")
    parser.add_argument("a", help="the baseline proxy entry (e.g. bt)")
    parser.add_argument("b", help="the proxy entry compared with it (e.g. grm_sft)")
    args = parser.parse_args()
    table = differences(args.report, args.a, args.b)
    print(f"{args.report}: {args.b} − {args.a}, mean over seeds, Welch 95 % interval")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
