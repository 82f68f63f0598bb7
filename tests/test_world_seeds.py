"""Worlds as seeds: `world.seeds: K` expands a tiny-world study into K world points (world and base policy re-made
from seeds world.seed + i, policy.seed + i); the first is the single-world study; `overopt run` runs them all and
writes a report over worlds that separates the spread between worlds from the spread within one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.runner import Runner
from pipeline.study import build_stages
from pipeline.sweep import expand_sweep
from pipeline.worlds import variance_components, world_differences

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# Student-t quantiles t(0.975, df), from tables, so the intervals below are checked against numbers scipy did not make
T975 = {1: 12.706204736174704, 2: 4.302652729911275, 5: 2.570581835636314}


def fingerprints(cfg) -> dict[str, str]:
    return Runner(build_stages(cfg), ArtifactCache("unused")).fingerprints()


# ----------------------------------------------------------------------------------------------------------------
# expansion


def test_world_seeds_expand_into_world_points_and_the_first_is_the_single_world_study():
    study, points = expand_sweep(SMOKE, ["world.seed=5", "policy.seed=2", "world.seeds=3"])
    assert [p.name for p in points] == ["world5", "world6", "world7"]
    assert [p.values for p in points] == [{"world.seed": s, "policy.seed": s - 3} for s in (5, 6, 7)]
    for p in points:
        assert p.config.world.seed == p.values["world.seed"] and p.config.policy.seed == p.values["policy.seed"]
        assert p.config.world.seeds == 1 and p.config.study == study.study
        assert p.config.run.cache_root == study.run.cache_root
        assert p.config.run.reports_dir == study.run.reports_dir / "worlds" / p.name
        # nothing else moves: the proxies' and best-of-n's seeds are the same design in every world
        assert p.config.proxies == study.proxies and p.config.bon == study.bon
        assert p.config.gold_label == study.gold_label

    single = fingerprints(load_config(SMOKE, ["world.seed=5", "policy.seed=2"]))
    assert fingerprints(study) == single  # world.seeds is not fingerprinted
    assert fingerprints(points[0].config) == single  # every stage, the report included: the artifacts are shared
    second = fingerprints(points[1].config)
    assert all(second[k] != single[k] for k in single)  # a new world re-makes everything (all stages descend from it)
    # only the world stage sees world.seed; the base policy also sees its own seed move
    moved = load_config(SMOKE, ["world.seed=6", "policy.seed=2"])
    assert fingerprints(moved)["world"] == second["world"] and fingerprints(moved)["sft_policy"] != second["sft_policy"]
    # a plain study has no points
    assert expand_sweep(SMOKE)[1] == []


def test_world_seeds_are_refused_at_paper_scale_and_with_a_sweep(tmp_path, capsys):
    paper = ROOT / "configs" / "paper" / "gemma2b_unified_feedback.yaml"
    load_config(paper)  # valid alone
    with pytest.raises(ConfigError, match=r"world\.seeds \(2\) is only for the tiny world"):
        load_config(paper, ["world.seeds=2"])
    with pytest.raises(ConfigError, match=r"world\.seeds \(2\) and sweep: cannot be combined"):
        load_config(SMOKE, ["world.seeds=2", "sweep={proxies.grm_sft.alpha: [0.1, 0.5]}"])
    with pytest.raises(ConfigError, match="world.seeds"):
        load_config(SMOKE, ["world.seeds=0"])
    # on the command line: a clear error, before any work
    assert main(["run", str(SMOKE), "world.seeds=2", f"run.cache_root={tmp_path / 'c'}",
                 "sweep={gold_label.n_pairs: [100, 200]}"]) == 2
    assert "world.seeds (2) and sweep:" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_demo_over_two_worlds_validates_and_shares_the_demo_s_world_0():
    study, points = expand_sweep(ROOT / "configs" / "tiny_worlds.yaml")
    demo = load_config(ROOT / "configs" / "tiny.yaml")
    assert study.world.seeds == 2 and [p.name for p in points] == ["world0", "world1"]
    assert study.run.cache_root == demo.run.cache_root and study.run.reports_dir != demo.run.reports_dir
    assert fingerprints(points[0].config) == fingerprints(demo)


# ----------------------------------------------------------------------------------------------------------------
# statistics, against hand-computed numbers


def test_variance_components_by_hand():
    # balanced: worlds A = (1, 2, 3), B = (4, 6, 8). Means 2 and 6, grand mean 4.
    # MSB = 3·((2−4)² + (6−4)²)/1 = 24; MSW = (1+0+1 + 4+0+4)/(6−2) = 2.5; n0 = 3; σ²_b = (24 − 2.5)/3
    c = variance_components([1, 2, 3, 4, 6, 8], list("AAABBB"))
    assert (c["worlds"], c["runs"], c["mean"]) == (2, 6, 4.0)
    assert c["ms_between"] == pytest.approx(24) and c["ms_within"] == pytest.approx(2.5) and c["n0"] == 3
    assert c["var_between"] == pytest.approx(21.5 / 3) and c["var_within"] == pytest.approx(2.5)
    assert c["sd_between"] == pytest.approx(np.sqrt(21.5 / 3)) and c["sd_within"] == pytest.approx(np.sqrt(2.5))
    assert c["share_between"] == pytest.approx((21.5 / 3) / (21.5 / 3 + 2.5))
    # the mean's interval treats worlds as the unit: world means 2 and 6, sd √8, 1 degree of freedom
    half = T975[1] * np.sqrt(8) / np.sqrt(2)
    assert (c["ci_lo"], c["ci_hi"]) == pytest.approx((4 - half, 4 + half))
    assert c["note"] == ""

    # unbalanced: A = (1, 3), B = (4, 6, 8): grand mean 4.4; MSB = 2·(2−4.4)² + 3·(6−4.4)² = 19.2;
    # MSW = (1+1 + 4+0+4)/3; n0 = (5 − (4+9)/5)/1 = 2.4
    c = variance_components([1, 3, 4, 6, 8], list("AABBB"))
    assert c["n0"] == pytest.approx(2.4) and c["ms_between"] == pytest.approx(19.2)
    assert c["var_between"] == pytest.approx((19.2 - 10 / 3) / 2.4) and c["var_within"] == pytest.approx(10 / 3)

    # worlds that differ less than their seeds predict: the raw estimate (MSB 0 − MSW)/n0 is negative, set to 0
    c = variance_components([1, 3, 1, 3], list("AABB"))
    assert c["var_between"] == 0 and c["var_within"] == pytest.approx(2) and c["share_between"] == 0
    assert "negative" in c["note"]
    # one world: nothing between worlds; one run per world: nothing within, the two sources cannot be told apart
    c = variance_components([1, 2, 3], list("AAA"))
    assert np.isnan(c["var_between"]) and c["var_within"] == pytest.approx(1) and "one world" in c["note"]
    c = variance_components([1, 2, 4], list("ABC"))
    assert np.isnan(c["var_between"]) and np.isnan(c["var_within"]) and "one run per world" in c["note"]
    assert c["sd_world_means"] == pytest.approx(np.std([1, 2, 4], ddof=1))


def _synthetic_runs() -> pd.DataFrame:
    """Three worlds, two seeds per entry; entry g's paired differences from bt are, per world, (0.1, 0.3), (−0.1,
    0.1) and (0.2, 0.4) in measure m1 — world means 0.2, 0.0, 0.3 — and g − bt = 0 + noise in m2."""
    rows = []
    bt = {"w0": (0.5, 0.6), "w1": (0.7, 0.5), "w2": (0.4, 0.45)}
    d1 = {"w0": (0.1, 0.3), "w1": (-0.1, 0.1), "w2": (0.2, 0.4)}
    d2 = {"w0": (0.01, -0.02), "w1": (0.03, 0.0), "w2": (-0.01, 0.02)}
    for w in bt:
        for i, run in enumerate(("", "@seed1")):
            rows += [{"world": w, "group": "bt", "run": f"bt{run}", "measure": m, "value": bt[w][i]} for m in
                     ("m1", "m2")]
            rows += [{"world": w, "group": "g", "run": f"g{run}", "measure": m, "value": bt[w][i] + d[w][i]}
                     for m, d in (("m1", d1), ("m2", d2))]
    return pd.DataFrame(rows)


def test_differences_treat_worlds_as_the_unit_by_hand():
    by_world, overall = world_differences(_synthetic_runs(), "bt")
    assert list(overall.measure) == ["m1", "m2"] and set(overall.group) == {"g"} and (overall.unit == "world").all()
    # per world: the paired difference over that world's two seeds
    w = by_world[by_world.measure == "m1"].set_index("world")
    assert list(w.difference) == pytest.approx([0.2, 0.0, 0.3]) and (w.test == "paired t").all()
    half = T975[1] * np.std([0.1, 0.3], ddof=1) / np.sqrt(2)
    assert (w.loc["w0", "ci_lo"], w.loc["w0", "ci_hi"]) == pytest.approx((0.2 - half, 0.2 + half))
    # over worlds: a t-interval with K − 1 = 2 degrees of freedom of the three per-world differences
    r = overall[overall.measure == "m1"].iloc[0]
    d = np.array([0.2, 0.0, 0.3])
    half = T975[2] * d.std(ddof=1) / np.sqrt(3)
    assert r.difference == pytest.approx(d.mean()) and (r.ci_lo, r.ci_hi) == pytest.approx((d.mean() - half,
                                                                                              d.mean() + half))
    assert (r.n_a, r.n_b, r.df, r.test) == (3, 3, 2, "paired t")
    # pooled, for reference: all six paired differences as one group of seeds (5 degrees of freedom): narrower
    every = np.array([0.1, 0.3, -0.1, 0.1, 0.2, 0.4])
    half_pooled = T975[5] * every.std(ddof=1) / np.sqrt(6)
    assert r.pooled_difference == pytest.approx(every.mean())
    assert (r.pooled_ci_lo, r.pooled_ci_hi) == pytest.approx((every.mean() - half_pooled, every.mean() + half_pooled))
    assert r.pooled_n_a == 6 and r.pooled_test == "paired t" and half_pooled < half
    # Holm over the two measures: the smaller p doubled, the larger kept (at least the smaller adjusted)
    p = overall.set_index("measure").p
    lo, hi = sorted(p)
    assert sorted(overall.p_holm) == pytest.approx([min(1, 2 * lo), min(1, max(2 * lo, hi))])
    assert overall.pooled_p_holm.notna().all()
    # the sentence counts worlds, not seeds
    from pipeline.comparison_stats import verdicts

    text = verdicts(overall.assign(what=["m1", "m2"]))[0]
    assert "paired t, 3 worlds" in text and "Holm correction over 2 comparisons" in text


def test_two_worlds_give_one_degree_of_freedom_and_one_world_no_interval():
    runs = _synthetic_runs()
    _, two = world_differences(runs[runs.world != "w2"], "bt")
    r = two[two.measure == "m1"].iloc[0]
    half = T975[1] * np.std([0.2, 0.0], ddof=1) / np.sqrt(2)
    assert r.df == 1 and (r.ci_lo, r.ci_hi) == pytest.approx((0.1 - half, 0.1 + half))
    _, one = world_differences(runs[runs.world == "w0"], "bt")
    r = one[one.measure == "m1"].iloc[0]
    assert r.difference == pytest.approx(0.2) and np.isnan(r.ci_lo) and np.isnan(r.p_holm)
    assert r.note == "one world: no interval over worlds"
    assert np.isfinite(r.pooled_ci_lo)  # the world's own seeds still give the reference interval


# ----------------------------------------------------------------------------------------------------------------
# run, report, status


@pytest.mark.slow
def test_a_two_world_smoke_study_runs_every_world_and_writes_the_report_over_worlds(tmp_path, capsys):
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    # two seeds per proxy, so within-world spread exists; one short PPO run against each proxy for the RL measures;
    # no knowledge stages
    overrides = [f"run.cache_root={cache}", f"run.reports_dir={reports}", "world.seeds=2", "knowledge.enabled=false",
                 "proxies.bt.seeds=2", "proxies.grm_sft.seeds=2", "ppo.proxies=[bt, grm_sft]", "ppo.steps=2"]
    capsys.readouterr()
    assert main(["status", str(SMOKE), *overrides]) == 0
    out = capsys.readouterr().out
    assert "over 2 worlds" in out and "world0" in out and "world1" in out

    t0 = time.time()
    assert main(["run", str(SMOKE), *overrides]) == 0
    with capsys.disabled():
        print(f"\n2-world smoke study: {time.time() - t0:.0f}s")
    log = next((cache / "runs").iterdir()) / "run.log"
    ran = [line.split("▶")[1].split()[0] for line in log.read_text().splitlines() if "▶" in line]
    assert ran.count("world") == 2 and ran.count("sft_policy") == 2 and ran.count("report") == 2

    for world in ("world0", "world1"):
        assert (reports / "worlds" / world / "README.md").is_file()
    readme = (reports / "README.md").read_text()
    assert "# Study `smoke` over 2 worlds" in readme and "worlds/world1/README.md" in readme
    runs = pd.read_csv(reports / "worlds_runs.csv")
    assert set(runs.world) == {"world0", "world1"} and set(runs.world_seed) == {0, 1}
    measures = set(runs.measure)
    assert {"accuracy (id_test)", "accuracy (ood)", "best-of-n peak gold", "PPO peak gold"} <= measures
    assert any(m.startswith("PPO gold at KL") for m in measures)
    # world0's runs are the single-world study's: its own report's accuracies
    acc = pd.read_csv(reports / "worlds" / "world0" / "accuracy.csv")
    acc = acc[(acc.labels == "clean") & (acc.set == "ood")].set_index("proxy").accuracy
    mine = runs[(runs.world == "world0") & (runs.measure == "accuracy (ood)")].set_index("run").value
    assert mine.sort_index().to_dict() == pytest.approx(acc.sort_index().to_dict())

    comp = pd.read_csv(reports / "worlds_components.csv")
    row = comp[(comp.measure == "accuracy (ood)") & (comp.group == "grm_sft")].iloc[0]
    sub = runs[(runs.measure == "accuracy (ood)") & (runs.group == "grm_sft")]
    assert (row.worlds, row.runs) == (2, 4) and row["mean"] == pytest.approx(sub.value.mean())
    ref = variance_components(sub.value, sub.world)
    assert row.var_within == pytest.approx(ref["var_within"])
    diffs = pd.read_csv(reports / "worlds_differences.csv")
    assert set(diffs.group) == {"grm_sft"} and set(diffs.baseline) == {"bt"} and (diffs.n_a == 2).all()
    assert (diffs.df == 1).all() and diffs.p_holm.notna().all() and (diffs.pooled_test == "paired t").all()
    assert "paired t, 2 worlds" in readme and "t(0.975, 1) = 12.7" in readme
    assert (reports / "worlds_accuracy_ood.png").stat().st_size > 5000

    # status: both worlds done; a re-run runs nothing; gc keeps both worlds
    assert main(["status", str(SMOKE), *overrides]) == 0
    assert capsys.readouterr().out.count("100%") == 3
    assert main(["run", str(SMOKE), *overrides]) == 0
    assert "▶" not in sorted((cache / "runs").iterdir())[-1].joinpath("run.log").read_text()
    capsys.readouterr()
    assert main(["gc", str(SMOKE), *overrides]) == 0
    assert "train_proxy" not in capsys.readouterr().out
