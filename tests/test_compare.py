"""`overopt compare` on report directories written by hand in the report stage's schema: the plotted points, the
peak table's Δ, its interval, test and Holm p against hand computation, seeds grouped under their proxy, old reports,
and the error messages."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.bon import BON_CURVE_COLUMNS, kl_bon_bound
from pipeline.cli import main
from pipeline.compare import CompareError, load_studies, proxy_family, split_studies

NS = [1, 2, 4, 8]
STEPS = [0, 1, 2, 4]


def bon_rows(proxy: str, gold: list[float]) -> pd.DataFrame:
    """One proxy's best-of-n curve as the report writes it (bon_curves.csv: BON_CURVE_COLUMNS + proxy_name)."""
    g, n = np.array(gold), np.array(NS)
    kl = kl_bon_bound(n)
    score = np.linspace(0.0, 1.0, len(NS))  # the proxy's mean score rises with n
    t = pd.DataFrame({"n": n, "kl_bound": kl, "sqrt_kl_bound": np.sqrt(kl), "proxy": score, "proxy_lo": score - .1,
                      "proxy_hi": score + .1, "gold": g, "gold_lo": g - .1, "gold_hi": g + .1,
                      "proxy_rel": score - score[0], "proxy_rel_lo": score - score[0] - .1,
                      "proxy_rel_hi": score - score[0] + .1, "gold_rel": g - g[0], "gold_rel_lo": g - g[0] - .1,
                      "gold_rel_hi": g - g[0] + .1})
    return t[BON_CURVE_COLUMNS].assign(proxy_name=proxy)


def rl_rows(proxy: str, run: str, kl: list[float], gold: list[float]) -> pd.DataFrame:
    """One RL run's curve as the report writes it (ppo_curves.csv: proxy_name, run, then ppo_curve's columns)."""
    k, g = np.array(kl), np.array(gold)
    cols = {"proxy_name": proxy, "run": run, "step": STEPS, "sqrt_kl": np.sqrt(k), "kl_k1": k, "kl_k1_lo": k,
            "kl_k1_hi": k, "kl_k3": k, "kl_k3_lo": k, "kl_k3_hi": k}
    for q, v in (("proxy", np.arange(4.0)), ("gold", g), ("proxy_rel", np.arange(4.0)), ("gold_rel", g - g[0])):
        cols |= {q: v, f"{q}_lo": v - .1, f"{q}_hi": v + .1}
    return pd.DataFrame(cols)


def write_report(root: Path, name: str, bon: list[pd.DataFrame], ppo: list[pd.DataFrame] | None = None) -> Path:
    d = root / name
    d.mkdir()
    pd.concat(bon, ignore_index=True).to_csv(d / "bon_curves.csv", index=False)
    if ppo:
        pd.concat(ppo, ignore_index=True).to_csv(d / "ppo_curves.csv", index=False)
    (d / "README.md").write_text(f"# Study `{name}`\n")
    return d


@pytest.fixture
def two(tmp_path):
    """Study A: bt, grm (best-of-n), PPO on bt. Study B: the same plus only_b, and PPO on bt with two seeds."""
    a = write_report(tmp_path, "study_a", [bon_rows("bt", [1.0, 1.5, 1.2, 0.5]), bon_rows("grm", [1.0, 1.6, 1.7, 1.1])],
                     [rl_rows("bt", "bt", [0, .1, .4, 1.0], [1.0, 1.2, 1.1, 0.0])])
    b = write_report(tmp_path, "study_b", [bon_rows("bt", [1.0, 1.3, 1.4, 0.2]), bon_rows("grm", [1.0, 1.5, 1.8, 1.6]),
                                           bon_rows("only_b", [1.0, 1.1, 1.2, 1.3])],
                     [rl_rows("bt", "bt", [0, .2, .5, 1.2], [1.0, 1.1, 1.6, 0.3]),
                      rl_rows("bt", "bt@seed1", [0, .3, .6, 1.5], [1.0, 1.4, 1.0, 0.2])])
    return a, b


def table_rows(readme: str, proxy: str) -> list[str]:
    """The body rows of the peak table under `### proxy`."""
    lines = readme.split(f"### {proxy}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return lines[2:]


def test_compare_writes_points_plots_and_peak_table(two, tmp_path, capsys):
    a, b = two
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert "compared 2 proxies across study_a, study_b" in capsys.readouterr().out
    assert {f.name for f in out.iterdir()} == {"README.md", "bon_curves.csv", "bon_gold_vs_kl.png",
                                               "ppo_curves.csv", "ppo_gold_vs_kl.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    # every plotted point, as the studies' tables have it, with the study's label; only the common proxies
    bon = pd.read_csv(out / "bon_curves.csv")
    assert list(bon.columns[:3]) == ["study", "proxy_name", "run"]
    assert set(bon.proxy_name) == {"bt", "grm"} and len(bon) == 2 * 2 * len(NS)
    for study, d in (("study_a", a), ("study_b", b)):
        src = pd.read_csv(d / "bon_curves.csv")
        src = src[src.proxy_name != "only_b"].reset_index(drop=True)
        got = bon[bon.study == study].reset_index(drop=True)
        pd.testing.assert_frame_equal(got[src.columns], src)
    ppo = pd.read_csv(out / "ppo_curves.csv")
    assert list(ppo.groupby("study").run.unique().map(list)) == [["bt"], ["bt", "bt@seed1"]]
    np.testing.assert_allclose(ppo[ppo.study == "study_b"].gold, [1.0, 1.1, 1.6, 0.3, 1.0, 1.4, 1.0, 0.2])

    readme = (out / "README.md").read_text()
    assert "![best-of-n](bon_gold_vs_kl.png)" in readme and "![PPO](ppo_gold_vs_kl.png)" in readme
    # by hand: A's bt peaks at n = 2 (1.5, KL log 2 − 1/2), B's at n = 4 (1.4, KL log 4 − 3/4): Δ −0.1.
    # PPO: A's one run peaks at 1.2 (KL 0.1); B's runs at 1.6 (KL 0.5) and 1.4 (KL 0.3): mean 1.5, sd √0.02, KL 0.4,
    # Δ +0.3.
    assert table_rows(readme, "bt") == [
        f"| best-of-n | study_a | 1 | 1.000 | 1.500 | — | {math.log(2) - .5:.3f} | +0.000 | — | — | — | — | — |",
        f"| best-of-n | study_b | 1 | 1.000 | 1.400 | — | {math.log(4) - .75:.3f} | -0.100 | — | paired t, 1 seed | — "
        f"| — | — |",
        "| PPO | study_a | 1 | 1.000 | 1.200 | — | 0.100 | +0.000 | — | — | — | — | — |",
        f"| PPO | study_b | 2 | 1.000 | 1.500 | {math.sqrt(.02):.3f} | 0.400 | +0.300 | — | Welch, 1 vs 2 seeds "
        f"| — | — | — |"]
    assert table_rows(readme, "grm") == [  # grm: A peaks at n = 4 (1.7), B at n = 4 (1.8); no PPO
        f"| best-of-n | study_a | 1 | 1.000 | 1.700 | — | {math.log(4) - .75:.3f} | +0.000 | — | — | — | — | — |",
        f"| best-of-n | study_b | 1 | 1.000 | 1.800 | — | {math.log(4) - .75:.3f} | +0.100 | — | paired t, 1 seed | — "
        f"| — | — |"]
    assert "### only_b" not in readme
    # one run a side tests nothing, and the sentences say so
    assert ("- study_b − study_a in bt's PPO peak gold: +0.300 (Welch, 1 vs 2 seeds); not tested: fewer than two "
            "seeds in a group.") in readme


def test_compare_proxies_labels_and_default_out(two, tmp_path, monkeypatch):
    a, b = two
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(a), "--label", "clean", str(b), "--label", "noisy 25%", "--proxies", "grm"]) == 0
    out = tmp_path / "reports" / "compare" / "clean_vs_noisy-25-"
    readme = (out / "README.md").read_text()
    assert "### grm" in readme and "### bt" not in readme and "minus `clean`'s" in readme
    assert set(pd.read_csv(out / "bon_curves.csv").study) == {"clean", "noisy 25%"}
    assert "PPO: none of the compared proxies." in readme and not (out / "ppo_curves.csv").exists()


def test_seeds_of_a_proxy_are_one_proxy_with_runs(tmp_path):
    a = write_report(tmp_path, "a", [bon_rows("bt", [1.0, 1.5, 1.2, 0.5]), bon_rows("bt@seed1", [1.0, 1.2, 1.3, 0.1])])
    b = write_report(tmp_path, "b", [bon_rows("bt", [1.0, 1.1, 1.0, 0.5])])
    assert proxy_family("bt@seed12") == "bt" and proxy_family("bt_s1") == "bt_s1"
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    rows = table_rows((tmp_path / "out" / "README.md").read_text(), "bt")
    kl = (math.log(2) - .5 + math.log(4) - .75) / 2  # the runs peak at n = 2 and n = 4
    assert rows == [
        f"| best-of-n | a | 2 | 1.000 | 1.400 | {math.sqrt(.02):.3f} | {kl:.3f} | +0.000 | — | — | — | — | — |",
        f"| best-of-n | b | 1 | 1.000 | 1.100 | — | {math.log(2) - .5:.3f} | -0.300 | — | Welch, 2 vs 1 seeds | — | — "
        f"| — |"]
    points = pd.read_csv(tmp_path / "out" / "bon_curves.csv")
    assert set(points.proxy_name) == {"bt"} and set(points.run) == {"bt", "bt@seed1"}


def test_peak_gold_differences_paired_by_run_name_welch_otherwise_holm_over_all(tmp_path):
    """bt has the same three runs in both studies: paired over seeds. grm has two runs in one study and three in the
    other: Welch. Holm over the two."""
    def runs(proxy: str, peaks: list[float]) -> list[pd.DataFrame]:
        return [bon_rows(name, [1.0, peak, 0.9, 0.5])  # each run peaks at n = 2
                for name, peak in zip([proxy, f"{proxy}@seed1", f"{proxy}@seed2"], peaks)]

    a = write_report(tmp_path, "a", runs("bt", [1.5, 1.3, 1.6]) + runs("grm", [1.7, 1.5]))
    b = write_report(tmp_path, "b", runs("bt", [1.2, 1.1, 1.2]) + runs("grm", [1.8, 1.6, 1.7]))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    readme = (tmp_path / "out" / "README.md").read_text()

    # bt, paired: differences −0.3, −0.2, −0.4 (mean −0.3, sd 0.1, SE 0.1/√3, t = −3√3 on 2 df). Student's t with 2 df:
    # p = 1 − |t|/√(2 + t²), t(0.975) = 0.95·√(2/(4·0.975·0.025)).
    se, t = 0.1 / math.sqrt(3), -3 * math.sqrt(3)
    p_bt = 1 - abs(t) / math.sqrt(2 + t ** 2)
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * se
    # grm, Welch: a = [1.7, 1.5] (var 0.02), b = [1.8, 1.6, 1.7] (var 0.01); Δ = 1.7 − 1.6 = +0.1
    from scipy import stats

    va, vb = 0.02 / 2, 0.01 / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    p_grm = 2 * stats.t.sf(0.1 / math.sqrt(va + vb), df)
    holm_bt, holm_grm = 2 * min(p_bt, p_grm), max(2 * min(p_bt, p_grm), max(p_bt, p_grm))
    assert p_bt < p_grm  # so bt's p is doubled and grm's, the larger, is raised to at least that

    def p(v: float) -> str:
        return f"{v:.2g}"

    # MDD80 of the paired design: the noncentrality λ at which the two-sided 5 % t test on 2 df has power 0.8, × SE.
    # Power written out, not through the noncentral t comparison_stats uses: T = (Z + λ)/√(V/2), V ~ χ²(2), so
    # P(|T| > c) = E_V[Φ(λ − c√(V/2)) + Φ(−λ − c√(V/2))], integrated over V.
    from scipy import integrate
    from scipy.optimize import brentq

    crit = stats.t.ppf(0.975, 2)

    def power(lam: float) -> float:
        def inner(v: float) -> float:
            s = crit * math.sqrt(v / 2)
            return (stats.norm.cdf(lam - s) + stats.norm.cdf(-lam - s)) * stats.chi2.pdf(v, 2)
        return integrate.quad(inner, 0, math.inf)[0]

    lam = brentq(lambda x: power(x) - 0.8, 0.0, 50.0, xtol=1e-10)
    mdd_bt = lam * se
    assert mdd_bt > 0.3  # with 3 seeds even the difference observed sits below 80 % power
    half_grm = stats.t.ppf(0.975, df) * math.sqrt(va + vb)

    bt = table_rows(readme, "bt")[1].split(" | ")
    assert bt[7:12] == ["-0.300", f"[{-0.3 - half:.3f}, {-0.3 + half:.3f}]", "paired t, 3 seeds", p(p_bt), p(holm_bt)]
    assert bt[12].rstrip(" |") == f"{mdd_bt:.3f}"
    grm = table_rows(readme, "grm")[1].split(" | ")
    assert grm[7:12] == ["+0.100", f"[{0.1 - half_grm:.3f}, {0.1 + half_grm:.3f}]", "Welch, 2 vs 3 seeds", p(p_grm),
                         p(holm_grm)]
    assert "## Differences in peak gold" in readme
    assert (f"- b − a in bt's best-of-n peak gold: -0.300 [{-0.3 - half:.3f}, {-0.3 + half:.3f}] (paired t, 3 seeds); "
            f"{'not significant' if holm_bt >= 0.05 else 'significant'} after Holm correction over 2 comparisons "
            f"(adjusted p = {p(holm_bt)}); a difference smaller than {mdd_bt:.3f} would go undetected at "
            f"80 % power.") in readme


def test_reports_from_before_proxy_name_are_read_with_a_note(two, tmp_path):
    a, b = two
    old = pd.read_csv(a / "bon_curves.csv")
    old.assign(proxy=old.proxy_name).drop(columns="proxy_name").to_csv(a / "bon_curves.csv", index=False)
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert f"{a / 'bon_curves.csv'} predates the proxy_name column" in readme
    assert table_rows(readme, "bt")[0].startswith("| best-of-n | study_a | 1 | 1.000 | 1.500 |")
    points = pd.read_csv(out / "bon_curves.csv")
    assert points[points.study == "study_a"].proxy.isna().all()  # the overwritten mean score is not invented


def error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_name_the_path_or_proxy(two, tmp_path, capsys):
    a, b = two
    out = ["--out", str(tmp_path / "out")]
    assert f"no such report directory or config file: {tmp_path / 'nope'}" in error(
        ["compare", str(a), str(tmp_path / "nope"), *out], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = error(["compare", str(a), str(empty), *out], capsys)
    assert f"{empty} has no bon_curves.csv" in msg and "overopt run" in msg
    assert "needs at least two studies, got 1" in error(["compare", str(a), *out], capsys)
    msg = error(["compare", str(a), str(b), "--proxies", "bt,only_b", *out], capsys)
    assert "--proxies names 'only_b', which study 'study_a' does not have (its proxies: bt, grm)" in msg
    other = write_report(tmp_path, "other", [bon_rows("ens", [1.0, 1.1, 1.2, 1.3])])
    msg = error(["compare", str(a), str(other), *out], capsys)
    assert "no proxy is common to all studies (study_a: bt, grm; other: ens)" in msg
    assert "2 --label(s) for 3 studies" in error(["compare", str(a), str(b), str(other), "--label", "x", "--label",
                                                   "y", *out], capsys)
    assert "several studies are labelled 'x'" in error(["compare", str(a), str(b), "--label", "x", "--label", "x",
                                                        *out], capsys)
    assert "override 'gold_label.noise_rate=0.25' follows no study config" in error(
        ["compare", str(a), "gold_label.noise_rate=0.25", str(b), *out], capsys)
    bad = pd.read_csv(b / "bon_curves.csv").drop(columns=["gold_lo"])
    bad.to_csv(b / "bon_curves.csv", index=False)
    assert f"{b / 'bon_curves.csv'} lacks column(s) ['gold_lo']" in error(["compare", str(a), str(b), *out], capsys)
    assert not (tmp_path / "out").exists()


def test_a_config_reads_its_curves_from_the_cache_and_never_runs(tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    assert split_studies([str(config), "gold_label.noise_rate=0.25", str(config)]) == [
        (str(config), ["gold_label.noise_rate=0.25"]), (str(config), [])]
    with pytest.raises(CompareError, match=r"study 'noisy': \d+ curve stage\(s\) not cached in .*bon_curve\[bt\].*"
                                           r"run `overopt run .*tiny.yaml gold_label.noise_rate=0.25 run.cache_root="):
        load_studies([str(config), "gold_label.noise_rate=0.25", f"run.cache_root={tmp_path / 'cache'}",
                      str(config), f"run.cache_root={tmp_path / 'cache'}"], ["noisy", "clean"])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


def test_a_config_with_overrides_reads_the_curves_cached_at_its_own_fingerprints(tmp_path, monkeypatch):
    """Curve artifacts committed by hand at the fingerprints of tiny.yaml with and without label noise: each study
    reads its own, and nothing else is needed (no upstream artifact, no run)."""
    from pipeline.cache import ArtifactCache
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    monkeypatch.chdir(Path(__file__).parents[1])  # tiny.yaml's DeepSpeed config path is relative to the repo
    config = "configs/tiny.yaml"
    cache = [f"run.cache_root={tmp_path / 'cache'}"]
    variants = {"clean": cache, "noisy": ["gold_label.noise_rate=0.25", *cache]}
    peak = {"clean": 1.5, "noisy": 1.3}
    for name, overrides in variants.items():
        runner = Runner(build_stages(load_config(config, overrides)), ArtifactCache(tmp_path / "cache"))
        fps = runner.fingerprints()
        for key in fps:
            if key.startswith("bon_curve["):
                table = bon_rows("x", [1.0, peak[name], 1.2, 0.5]).drop(columns="proxy_name")
            elif key.startswith("ppo_curve["):
                table = rl_rows("x", "x", [0, .1, .4, 1.0], [1.0, peak[name] - .2, 1.1, 0.0]).drop(
                    columns=["proxy_name", "run"])
            else:
                continue
            staged = tmp_path / "staged" / name / key
            staged.mkdir(parents=True)
            table.to_parquet(staged / "curve.parquet", index=False)
            runner.cache.commit(key, fps[key], staged, {"stage": "hand-made"})
    studies = load_studies([config, *variants["clean"], config, *variants["noisy"]], ["clean", "noisy"])
    assert [s.source for s in studies] == [" ".join([config, *o]) for o in variants.values()]
    assert studies[0].proxies() == ["bt", "grm_sft", "label_smoothing", "ensemble"]
    ppo = studies[1].curves["ppo"]
    assert sorted(ppo.proxy_name.unique()) == ["bt", "grm_sft"] and set(ppo.run) == {"bt", "grm_sft"}
    for s in studies:
        assert s.curves["bon"].gold.max() == peak[s.label]
    assert main(["compare", config, *variants["clean"], config, *variants["noisy"], "--label", "clean", "--label",
                 "noisy", "--proxies", "bt", "--out", str(tmp_path / "out")]) == 0
    assert table_rows((tmp_path / "out" / "README.md").read_text(), "bt") == [
        # tiny.yaml trains bt over 3 seeds: three identical hand-made curves, sd 0
        f"| best-of-n | clean | 3 | 1.000 | 1.500 | 0.000 | {math.log(2) - .5:.3f} | +0.000 | — | — | — | — | — |",
        f"| best-of-n | noisy | 3 | 1.000 | 1.300 | 0.000 | {math.log(2) - .5:.3f} | -0.200 | — | paired t, 3 seeds "
        f"| — | — | — |",  # every seed 0.2 lower: nothing to test
        "| PPO | clean | 1 | 1.000 | 1.300 | — | 0.100 | +0.000 | — | — | — | — | — |",
        "| PPO | noisy | 1 | 1.000 | 1.100 | — | 0.100 | -0.200 | — | paired t, 1 seed | — | — | — |"]
