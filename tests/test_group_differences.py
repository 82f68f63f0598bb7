"""scripts/group_differences.py: differences of seed means between two entries from a report's tables, through
pipeline.comparison_stats (paired when the entries' runs are the same seeds, Welch otherwise)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "group_differences.py"
spec = importlib.util.spec_from_file_location("group_differences", SCRIPT)
gd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gd)


def write_tables(root: Path, names: list[str], auc, accuracy, peak_gold, gold_at_max_n) -> Path:
    """knowledge.csv, accuracy.csv and bon_peaks.csv in the report's schema, one value per proxy of `names`."""
    pd.DataFrame({"scorer": ["base policy log-prob", *names], "kind": "intruder",
                  "auc": [1.0, *auc]}).to_csv(root / "knowledge.csv", index=False)
    pd.DataFrame({"proxy": names, "set": "id_test", "labels": "clean",
                  "accuracy": accuracy}).to_csv(root / "accuracy.csv", index=False)
    pd.DataFrame({"proxy_name": names, "peak_gold": peak_gold,
                  "gold_at_max_n": gold_at_max_n}).to_csv(root / "bon_peaks.csv", index=False)
    return root


def test_entries_of_other_seeds_get_the_welch_interval_by_hand(tmp_path):
    # bt over 3 seeds, grm over 4: not the same seeds, so Welch's interval of the difference of means
    names = ["bt", "bt@seed1", "bt@seed2", "grm", "grm@seed1", "grm@seed2", "grm@seed3"]
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    write_tables(tmp_path, names, [.5] * 7, [.7] * 7, a + b, a + b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4  # 1/3 and 20/12
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)  # Welch–Satterthwaite
    from scipy import stats

    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    r = gd.differences(tmp_path, "bt", "grm").set_index("measure").loc["best-of-n peak gold"]
    assert r.test == "Welch" and (r.n_a, r.n_b) == (3, 4)
    assert r.difference == pytest.approx(3.0)
    assert (r.ci_lo, r.ci_hi) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))


def test_differences_group_seed_copies_by_entry_and_pair_them_by_seed(tmp_path):
    names = ["bt", "bt@seed1", "grm", "grm@seed1", "bt2"]  # bt2 is another entry, not a seed of bt
    write_tables(tmp_path, names, [.5, .7, .8, .9, .0], [.6, .7, .7, .8, .0], [1., 2., 3., 4.5, 9.],
                 [0., 0., 1., 1., 9.])
    table = gd.differences(tmp_path, "bt", "grm").set_index("measure")
    assert table.loc["knowledge AUC (intruder)", "difference"] == pytest.approx(0.25)
    assert table.loc["accuracy (id_test)", "difference"] == pytest.approx(0.1)
    assert table.loc["best-of-n peak gold", "difference"] == pytest.approx(2.25)
    # grm and grm@seed1 are bt's seeds: paired. Differences per seed: peak gold 2 and 2.5 (mean 2.25, SE 0.25, 1 df,
    # t = 9): p = 2·P(T₁ > 9) = 1 − (2/π)·atan(9) (Cauchy); the half-width t(0.975; 1)·SE = tan(0.475π)·0.25.
    assert set(table.test) == {"paired t"} and set(table.n_a) == set(table.n_b) == {2}
    peak = table.loc["best-of-n peak gold"]
    assert peak.p == pytest.approx(1 - 2 / np.pi * np.arctan(9.0))
    assert (peak.ci_lo, peak.ci_hi) == (pytest.approx(2.25 - np.tan(0.475 * np.pi) * .25),
                                        pytest.approx(2.25 + np.tan(0.475 * np.pi) * .25))
    # every seed of accuracy and of gold at max n moves by the same amount: no variation, no test
    assert np.isnan(table.loc["accuracy (id_test)", "p"]) and np.isnan(table.loc["best-of-n gold at max n", "p"])
    # Holm over the 2 tested comparisons (knowledge AUC: differences 0.3 and 0.2, t = 5, p = 1 − (2/π)·atan(5))
    p_auc = 1 - 2 / np.pi * np.arctan(5.0)
    assert table.loc["knowledge AUC (intruder)", "p"] == pytest.approx(p_auc)
    assert table.loc["best-of-n peak gold", "p_holm"] == pytest.approx(2 * peak.p)  # the smaller p, times 2
    assert table.loc["knowledge AUC (intruder)", "p_holm"] == pytest.approx(max(p_auc, 2 * peak.p))
    assert table.loc["best-of-n peak gold", "what"] == "grm − bt in best-of-n peak gold"


def test_the_script_prints_the_table_and_a_sentence_per_measure(tmp_path):
    names = ["bt", "bt@seed1", "bt@seed2", "grm", "grm@seed1", "grm@seed2"]
    write_tables(tmp_path, names, [.5, .6, .7, .6, .8, .75], [.6, .7, .65, .7, .72, .69], [1., 2., 1.5, 1.2, 2.4, 1.6],
                 [0., .5, .2, .1, .4, .6])
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "bt", "grm"], capture_output=True, text=True,
                         check=True, env=os.environ | {"PYTHONPATH": str(SCRIPT.parents[1])}).stdout
    table = gd.differences(tmp_path, "bt", "grm")
    assert "paired t where the entries' runs are the same seeds" in out and "over these 4 comparisons" in out
    assert "MDD80" in out and "p Holm" in out
    for _, r in table.iterrows():
        assert f"{r.what}: {r.difference:+.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}] (paired t, 3 seeds)" in out
        assert f"smaller than {r.mdd80:.3f} would go undetected at 80 % power" in out
