"""Sweeps as a unit: a `sweep:` section is crossed into points, each the study with overrides applied; the points
share one cache (a point equal to the study has its fingerprints); `overopt run` runs them all and writes the sweep
report; `overopt status` shows each point's progress."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.runner import Runner
from pipeline.study import build_stages
from pipeline.sweep import expand_sweep, key_labels, value_text

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


def sweep_config(tmp_path: Path, sweep: dict, **top) -> Path:
    """smoke.yaml with a `sweep:` section (and other top-level keys), written to tmp_path."""
    tree = yaml.safe_load(SMOKE.read_text()) | top | {"sweep": sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def fingerprints(cfg) -> dict[str, str]:
    return Runner(build_stages(cfg), ArtifactCache("unused")).fingerprints()


# ----------------------------------------------------------------------------------------------------------------
# expansion


def test_keys_are_crossed_into_named_points_with_their_overrides_applied(tmp_path):
    path = sweep_config(tmp_path, {"gold_label.n_pairs": [300, 1000, 3000], "proxies.grm_sft.alpha": [0.01, 0.1]})
    study, points = expand_sweep(path)
    assert study.sweep == {"gold_label.n_pairs": [300, 1000, 3000], "proxies.grm_sft.alpha": [0.01, 0.1]}
    assert [p.name for p in points] == ["n_pairs=300,alpha=0.01", "n_pairs=300,alpha=0.1", "n_pairs=1000,alpha=0.01",
                                        "n_pairs=1000,alpha=0.1", "n_pairs=3000,alpha=0.01", "n_pairs=3000,alpha=0.1"]
    for p in points:
        assert p.config.gold_label.n_pairs == p.values["gold_label.n_pairs"]
        assert {e.name: e.alpha for e in p.config.proxies}["grm_sft"] == p.values["proxies.grm_sft.alpha"]
        assert p.config.sweep == {} and p.config.study == study.study  # a point is a plain study of the same name
        assert p.config.run.cache_root == study.run.cache_root
        assert p.config.run.reports_dir == study.run.reports_dir / "points" / p.name
    # a point is what the same overrides on the command line make (beside its reports directory)
    same = load_config(SMOKE, ["gold_label.n_pairs=1000", "proxies.grm_sft.alpha=0.1"])
    assert fingerprints(points[3].config) == fingerprints(same)
    # command-line overrides apply to every point; `sweep={}` is the study alone
    _, points = expand_sweep(path, ["proxies.bt.seeds=2"])
    assert all(p.config.proxies[0].seeds == 2 for p in points)
    assert expand_sweep(path, ["sweep={}"])[1] == []


def test_tied_keys_take_one_value_together_and_names_stay_distinct(tmp_path):
    tree_proxies = [{"name": "bt", "type": "bt"}, {"name": "g1", "type": "grm", "reg": "sft"},
                    {"name": "g2", "type": "grm", "reg": "dpo_noref"}]
    path = sweep_config(tmp_path, {"proxy_training.n_train_pairs": [30, None],
                                   "proxies.g1.alpha,proxies.g2.alpha": [0.01, 0.1]}, proxies=tree_proxies)
    _, points = expand_sweep(path)
    assert [p.name for p in points] == ["n_train_pairs=30,alpha=0.01", "n_train_pairs=30,alpha=0.1",
                                        "n_train_pairs=null,alpha=0.01", "n_train_pairs=null,alpha=0.1"]
    assert [(p.config.proxies[1].alpha, p.config.proxies[2].alpha) for p in points] == [(0.01, 0.01), (0.1, 0.1)] * 2
    # two keys with the same last part are named by as many parts as tell them apart
    assert key_labels(["proxies.g1.alpha", "proxies.g2.alpha", "gold_label.n_pairs"]) == {
        "proxies.g1.alpha": "g1.alpha", "proxies.g2.alpha": "g2.alpha", "gold_label.n_pairs": "gold_label.n_pairs"}
    assert [value_text(v) for v in (None, True, 0.001, 1e-5, -2, "dpo_noref", {"r": 8})] == [
        "null", "true", "0.001", "1e-05", "-2", "dpo_noref", "-r-8-"]


@pytest.mark.parametrize("sweep, named", [
    ({"gold_label.n_pair": [100, 200]}, "gold_label.n_pair"),                    # a typo: unknown key
    ({"proxies.nope.alpha": [0.1]}, "proxies.nope.alpha"),                       # no such proxy entry
    ({"proxies.grm_sft.alpha": [0.1, 2.0]}, "proxies.grm_sft.alpha = 2.0"),      # out of range
    ({"proxies.grm_sft.alpha,proxies.bt.x": [0.1]}, "proxies.bt.x"),             # one bad key of a tied pair
    ({"run.cache_root": ["a", "b"]}, "run.cache_root"),                          # one cache per sweep
    ({"gold_label.n_pairs": []}, "gold_label.n_pairs"),                          # no values
    ({"gold_label.n_pairs": [100, 100]}, "gold_label.n_pairs"),                  # a point twice
])
def test_an_invalid_sweep_key_or_value_is_an_error_naming_it(tmp_path, sweep, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        expand_sweep(sweep_config(tmp_path, sweep))


def test_sweep_errors_come_before_any_work(tmp_path, capsys):
    path = sweep_config(tmp_path, {"gold_label.n_pair": [100, 200]})
    assert main(["run", str(path), f"run.cache_root={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "gold_label.n_pair" in err and "n_pairs" in err  # the key, and the closest valid one
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="sweep_baseline 'nope'"):
        load_config(sweep_config(tmp_path, {"proxies.grm_sft.alpha": [0.1]}, sweep_baseline="nope"))


# ----------------------------------------------------------------------------------------------------------------
# one cache


def test_a_point_equal_to_the_study_has_its_fingerprints_and_points_share_what_they_share(tmp_path):
    path = sweep_config(tmp_path, {"proxies.grm_sft.alpha": [0.1, 0.5]})  # smoke's grm_sft has alpha 0.1
    study, (same, other) = expand_sweep(path)
    base = fingerprints(load_config(SMOKE))
    assert fingerprints(study) == base  # `sweep:` changes no fingerprint
    assert fingerprints(same.config) == base  # every stage, the report included: its artifacts are reused
    moved = fingerprints(other.config)
    shared = {k for k in base if moved[k] == base[k]}
    assert {"world", "sft_policy", "gold_score", "gold_label", "bon_sample", "bon_score[gold]", "train_proxy[bt]",
            "eval_proxy[bt]", "bon_curve[bt]"} <= shared
    assert {"train_proxy[grm_sft]", "eval_proxy[grm_sft]", "bon_curve[grm_sft]", "report"}.isdisjoint(shared)


# ----------------------------------------------------------------------------------------------------------------
# run, report, status


@pytest.mark.slow
def test_a_two_point_sweep_runs_on_one_cache_and_writes_its_report(tmp_path, capsys):
    path = sweep_config(tmp_path, {"proxies.grm_sft.alpha": [0.1, 0.5]})
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    # two seeds per proxy, so the differences have intervals; no PPO or knowledge stages, to keep it short
    overrides = [f"run.cache_root={cache}", f"run.reports_dir={reports}", "ppo=null", "knowledge.enabled=false",
                 "proxies.bt.seeds=2", "proxies.grm_sft.seeds=2"]
    capsys.readouterr()
    assert main(["status", str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "alpha=0.1" in out and "alpha=0.5" in out and "distinct stages" in out

    t0 = time.time()
    assert main(["run", str(path), *overrides]) == 0
    took = time.time() - t0
    with capsys.disabled():
        print(f"\n2-point smoke sweep: {took:.0f}s")
    log = next((cache / "runs").iterdir()) / "run.log"
    ran = [line.split("▶")[1].split()[0] for line in log.read_text().splitlines() if "▶" in line]
    assert ran.count("world") == 1 and ran.count("train_proxy[bt]") == 1  # shared stages ran once
    assert ran.count("train_proxy[grm_sft]") == 2 and ran.count("report") == 2  # one per point

    # each point's report in its own folder, the sweep report above them
    for point in ("alpha=0.1", "alpha=0.5"):
        assert (reports / "points" / point / "README.md").is_file()
    readme = (reports / "README.md").read_text()
    assert "# Sweep `smoke`" in readme and "points/alpha=0.5/README.md" in readme
    runs = pd.read_csv(reports / "sweep_runs.csv")
    assert set(runs.measure) == {"accuracy (id_test)", "accuracy (ood)", "best-of-n peak gold"}
    assert len(runs) == 2 * 4 * 3 and set(runs.alpha) == {0.1, 0.5}
    # bt's runs are the same artifacts at both points
    bt = runs[runs.group == "bt"].pivot_table(index=["run", "measure"], columns="alpha", values="value")
    assert (bt[0.1] == bt[0.5]).all()
    diffs = pd.read_csv(reports / "sweep_differences.csv")
    assert len(diffs) == 2 * 3 and set(diffs.group) == {"grm_sft"} and set(diffs.baseline) == {"bt"}
    assert (diffs.test == "paired t").all() and diffs.p_holm.notna().all()
    # the difference is the mean over paired seeds of grm_sft − bt
    row = diffs[(diffs.alpha == 0.5) & (diffs.measure == "accuracy (ood)")].iloc[0]
    sub = runs[(runs.alpha == 0.5) & (runs.measure == "accuracy (ood)")].groupby("group").value.mean()
    assert row.difference == pytest.approx(sub["grm_sft"] - sub["bt"])
    assert row.ci_lo <= row.difference <= row.ci_hi
    groups = pd.read_csv(reports / "sweep_groups.csv")
    assert (groups.seeds == 2).all() and len(groups) == 2 * 2 * 3
    for measure in ("accuracy_id_test", "accuracy_ood", "best_of_n_peak_gold"):
        assert (reports / f"sweep_{measure}.png").stat().st_size > 5000
        assert f"sweep_{measure}.png" in readme

    # status: every point done; a point's own table of stages; a re-run runs nothing
    assert main(["status", str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert out.count("100%") == 3  # both points and the distinct stages
    assert main(["status", str(path), *overrides, "--point", "alpha=0.5"]) == 0
    out = capsys.readouterr().out
    assert "train_proxy[grm_sft@seed1]" in out and "missing" not in out
    written = {f.name: f.read_bytes() for f in reports.iterdir() if f.is_file()}
    assert main(["run", str(path), *overrides]) == 0
    assert "▶" not in sorted((cache / "runs").iterdir())[-1].joinpath("run.log").read_text()
    # the report is a function of the cache: the cached re-run rewrites it byte for byte
    assert {f.name: f.read_bytes() for f in reports.iterdir() if f.is_file()} == written
    # the study itself (the point equal to it) is fully cached
    plan = Runner(build_stages(load_config(path, [*overrides, "sweep={}"])), ArtifactCache(cache)).plan()
    assert {p.status for p in plan} == {"cached"}
    # gc keeps every point's artifacts
    capsys.readouterr()
    assert main(["gc", str(path), *overrides]) == 0
    assert "train_proxy" not in capsys.readouterr().out


def test_the_difference_plot_draws_a_line_per_other_key_and_a_panel_per_entry(tmp_path):
    from pipeline.plots import plot_sweep_differences

    rows = [{"group": g, "n_train_pairs": n, "alpha": a, "difference": d, "ci_lo": d - 0.05, "ci_hi": d + 0.05}
            for g in ("grm_sft", "grm_dpo_noref") for n in (300, 1000, 3000) for a, d in ((0.01, 0.01), (0.1, 0.03))]
    rows[0] |= {"ci_lo": float("nan"), "ci_hi": float("nan")}  # one seed: no interval, the point alone
    plot_sweep_differences(pd.DataFrame(rows), "n_train_pairs", ["alpha"], tmp_path / "d.png", "t", "Δ accuracy")
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_rl_measures_enter_the_sweep_tables_after_the_proxies(monkeypatch):
    """With RL arms, every run's RL measures (`rl_point_runs`: peak gold, gold at matched KL) are sweep measures
    like the proxies': per point and entry over seeds, and each entry minus the baseline, paired by RL seed."""
    import pipeline.sweep as sw

    configs = Path(__file__).resolve().parents[1] / "configs"
    study = load_config(configs / "tiny_sweep.yaml")
    points = sw.expand_sweep(configs / "tiny_sweep.yaml")[1][:2]
    proxy_rows = [{"point": p.name, "group": g, "run": r, "measure": "accuracy (id_test)", "value": v}
                  for p in points for g, runs in (("bt", ["bt", "bt@seed1"]), ("grm_sft", ["grm_sft", "grm_sft@seed1"]))
                  for r, v in zip(runs, (0.7, 0.72))]
    rl_rows = [{"world": p.name, "group": g, "run": r, "measure": "PPO gold at KL 4", "value": v}
               for p in points for g, runs, vals in (("bt", ["bt", "bt@seed1"], (1.0, 1.2)),
                                                     ("grm_sft", ["grm_sft", "grm_sft@seed1"], (1.5, 1.6)))
               for r, v in zip(runs, vals)]
    monkeypatch.setattr(sw, "point_runs",
                        lambda p, cache: pd.DataFrame([r for r in proxy_rows if r["point"] == p.name]))
    monkeypatch.setattr(sw, "rl_point_runs", lambda ps, cache: pd.DataFrame(rl_rows))
    tables = sw.sweep_tables(study, points, cache=None)
    assert list(dict.fromkeys(tables["groups"].measure)) == ["accuracy (id_test)", "PPO gold at KL 4"]
    rl = tables["differences"][tables["differences"].measure == "PPO gold at KL 4"]
    assert len(rl) == 2 and (rl.test == "paired t").all()
    assert rl.difference.tolist() == pytest.approx([((1.5 - 1.0) + (1.6 - 1.2)) / 2] * 2)
