"""scripts/group_differences.py: the Welch interval of a difference of seed means, from a report's tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "group_differences.py"
spec = importlib.util.spec_from_file_location("group_differences", SCRIPT)
gd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gd)


def test_welch_interval_by_hand():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4  # 1/3 and 20/12
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)  # Welch–Satterthwaite
    from scipy import stats

    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    r = gd.welch(a, b)
    assert r["B - A"] == pytest.approx(3.0)
    assert (r["lo"], r["hi"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))


def test_differences_group_seed_copies_by_entry(tmp_path):
    names = ["bt", "bt@seed1", "grm", "grm@seed1", "bt2"]  # bt2 is another entry, not a seed of bt
    pd.DataFrame({"scorer": ["base policy log-prob", *names], "kind": "intruder",
                  "auc": [1.0, .5, .7, .8, .9, .0]}).to_csv(tmp_path / "knowledge.csv", index=False)
    pd.DataFrame({"proxy": names, "set": "id_test", "labels": "clean",
                  "accuracy": [.6, .7, .7, .8, .0]}).to_csv(tmp_path / "accuracy.csv", index=False)
    pd.DataFrame({"proxy_name": names, "peak_gold": [1., 2., 3., 4., 9.],
                  "gold_at_max_n": [0., 0., 1., 1., 9.]}).to_csv(tmp_path / "bon_peaks.csv", index=False)
    table = gd.differences(tmp_path, "bt", "grm").set_index("measure")
    assert table.loc["knowledge AUC (intruder)", "B - A"] == pytest.approx(0.25)
    assert table.loc["accuracy (id_test)", "B - A"] == pytest.approx(0.1)
    assert table.loc["best-of-n peak gold", "B - A"] == pytest.approx(2.0)
    assert set(table.seeds) == {"2 vs 2"}
