"""Differences between two proxies trained over seeds, read from a study's report tables.

For each measure the declared variant's rule uses (README, "Declared variant: intruder-heavy demonstrations"): the
difference of means over seeds (B − A), its 95 % interval and p-value, from `pipeline.comparison_stats`: the paired
t test when the two entries' runs are the same seeds (this project's configs give every entry `seed: 0`, so `bt`,
`bt@seed1`, ... pair with `grm`, `grm@seed1`, ...), Welch's test otherwise; the p-values Holm-adjusted over the
script's comparisons, and the smallest difference the design detects with 80 % power (MDD80). Measures: knowledge
AUC per kind of minimal pair (knowledge.csv), pairwise accuracy per evaluation set (accuracy.csv, clean labels),
best-of-n peak gold and gold at the largest n (bon_peaks.csv). A sentence per measure says what the numbers mean.

    python scripts/group_differences.py reports/grm_seeds bt grm01
    python scripts/group_differences.py reports/tiny_intruders bt grm_sft --welch   # the declared rule's test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline.comparison_stats import design_text, difference_of_runs, p_text, verdicts, with_holm
from pipeline.config import proxy_family


def _seeds_of(group: str, values: pd.Series) -> pd.Series:
    """The values of one config entry's proxies: `name` and its copies `name@seedK`, indexed by proxy name."""
    return values[[n for n in values.index if proxy_family(n) == group]]


def differences(report: Path, a: str, b: str, pair_seeds: bool = True) -> pd.DataFrame:
    """One row per measure: `measure`, `what` (`b − a in measure`) and `pipeline.comparison_stats.difference`'s
    columns (test, n_a, n_b, mean_a, mean_b, difference, ci_lo, ci_hi, p, mdd80, ...), with `p_holm` over the rows."""
    measures: list[tuple[str, pd.Series]] = []  # (measure, one value per proxy, indexed by proxy name)
    knowledge = pd.read_csv(report / "knowledge.csv")
    for kind, sub in knowledge.groupby("kind", sort=False):
        measures.append((f"knowledge AUC ({kind})", sub.set_index("scorer").auc))
    acc = pd.read_csv(report / "accuracy.csv")
    for s, sub in acc[acc.labels == "clean"].groupby("set", sort=False):
        measures.append((f"accuracy ({s})", sub.set_index("proxy").accuracy))
    peaks = pd.read_csv(report / "bon_peaks.csv").set_index("proxy_name")
    for col in ("peak_gold", "gold_at_max_n"):
        measures.append((f"best-of-n {col.replace('_', ' ')}", peaks[col]))
    rows = [{"measure": m, "what": f"{b} − {a} in {m}",
             **difference_of_runs(_seeds_of(a, v), _seeds_of(b, v), pair_seeds)} for m, v in measures]
    return with_holm(pd.DataFrame(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report directory (reports/<study>)")
    parser.add_argument("a", help="the baseline proxy entry (e.g. bt)")
    parser.add_argument("b", help="the proxy entry compared with it (e.g. grm_sft)")
    parser.add_argument("--welch", action="store_true", help="Welch's test even where the runs share seeds (the "
                                                              "declared variant's rule was declared with it)")
    args = parser.parse_args()
    table = differences(args.report, args.a, args.b, pair_seeds=not args.welch)
    shown = pd.DataFrame({"measure": table.measure, "test": [design_text(r) for _, r in table.iterrows()],
                          args.a: table.mean_a, args.b: table.mean_b, "B − A": table.difference, "lo": table.ci_lo,
                          "hi": table.ci_hi, "p": table.p.map(p_text),
                          "p Holm": table.p_holm.map(p_text), "MDD80": table.mdd80})
    print(f"{args.report}: {args.b} − {args.a}, mean over seeds, 95 % interval (paired t where the entries' runs are "
          f"the same seeds, Welch otherwise); p Holm-adjusted over these {table.p_holm.notna().sum()} comparisons; "
          f"MDD80: the smallest difference detected with 80 % power")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print("\n".join(verdicts(table)))


if __name__ == "__main__":
    main()
