"""Seeds are a unit of the study: a proxy entry with `seeds: K` is K proxies (`bt`, `bt@seed1`, ...) with their own
stages, the first shared with a single-seed study; RL arms train against the first; the report aggregates the seeds
(mean, sd, Student-t interval; a mean best-of-n curve with its min–max band)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, ProxyConfig, ReportStageConfig, load_config
from pipeline.runner import Runner
from pipeline.study import build_stages

CONFIGS = Path(__file__).parents[1] / "configs"
SMOKE = CONFIGS / "smoke.yaml"
T95_2DF = 4.302652729749464  # t(0.975) with 2 degrees of freedom (3 seeds), from a t table


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def nodes(config, overrides=()):
    return {n.key: n for n in build_stages(load_config(config, list(overrides)))}


def fingerprints(config, overrides=()):
    return Runner(build_stages(load_config(config, list(overrides))), ArtifactCache("unused")).fingerprints()


# ----------------------------------------------------------------------------------------------------------------
# config


def test_an_entry_with_seeds_expands_into_named_seed_copies(tmp_path):
    cfg = load_config(write(tmp_path, "proxies:\n  - {name: bt, type: bt, seed: 4, seeds: 3}\n"
                                      "  - {name: g, type: grm, alpha: 0.1}\n"))
    assert [(p.name, p.seed, p.seeds) for p in cfg.expanded_proxies()] == [
        ("bt", 4, 1), ("bt@seed5", 5, 1), ("bt@seed6", 6, 1), ("g", 0, 1)]
    assert cfg.proxy_groups() == {"bt": ["bt", "bt@seed5", "bt@seed6"], "g": ["g"]}
    # a copy differs from its entry only in name, seed and seeds
    copy = cfg.expanded_proxies()[1]
    assert copy.model_dump(exclude={"name", "seed", "seeds"}) == cfg.proxies[0].model_dump(
        exclude={"name", "seed", "seeds"})
    with pytest.raises(ConfigError, match="seeds"):
        load_config(write(tmp_path, "proxies:\n  - {name: bt, type: bt, seeds: 0}\n"))


def test_the_first_seed_is_the_single_seed_proxy_and_seeds_is_not_fingerprinted():
    one = ProxyConfig(name="bt", type="bt", seed=2, head_width=16)
    three = one.model_copy(update={"seeds": 3})
    assert three.seed_copies()[0] == one
    assert three.canonical() == one.canonical()
    base, seeded = fingerprints(SMOKE), fingerprints(SMOKE, ["proxies.bt.seeds=3"])
    assert [k for k in base if base[k] != seeded[k]] == ["report"]  # every stage of the 1-seed study is shared
    assert {"train_proxy[bt@seed1]", "train_proxy[bt@seed2]"} <= set(seeded)
    # the copies are distinct models: their own fingerprints
    assert len({seeded[f"train_proxy[{p}]"] for p in ("bt", "bt@seed1", "bt@seed2")}) == 3


def test_ensemble_copies_share_no_member_seed():
    ens = ProxyConfig(name="e", type="ensemble", members=3, seed=10, seeds=3)
    copies = ens.seed_copies()
    assert [c.name for c in copies] == ["e", "e@seed11", "e@seed12"]
    members = [[(m.name, m.seed) for m in c.member_specs()] for c in copies]
    assert members == [[("e-m0", 10), ("e-m1", 11), ("e-m2", 12)],
                       [("e@seed11-m0", 13), ("e@seed11-m1", 14), ("e@seed11-m2", 15)],
                       [("e@seed12-m0", 16), ("e@seed12-m1", 17), ("e@seed12-m2", 18)]]
    seeds = [s for c in members for _, s in c]
    assert len(set(seeds)) == len(seeds)
    # the first copy's members are those of the single-seed ensemble
    assert copies[0].member_specs() == ens.model_copy(update={"seeds": 1}).member_specs()


def test_checkpoint_with_seeds_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "proxies:\n  - {name: rm, type: checkpoint, path: /m, seeds: 2}\n"))
    assert "proxies.rm.seeds" in str(e.value) and "checkpoint" in str(e.value)
    assert load_config(write(tmp_path, "proxies:\n  - {name: rm, type: checkpoint, path: /m, seeds: 1}\n"))


@pytest.mark.parametrize("name", ["bt@seed1", "bt@x", "a b", "gold"])
def test_a_user_proxy_name_cannot_look_like_a_seed_copy(tmp_path, name):
    with pytest.raises(ConfigError, match=r"must match \[A-Za-z0-9_-\]\+"):
        load_config(write(tmp_path, f"proxies:\n  - {{name: '{name}', type: bt}}\n"))


def test_rl_arms_name_entries_and_train_only_against_the_first_seed(tmp_path):
    keys = nodes(SMOKE, ["proxies.bt.seeds=3", "proxies.grm_sft.seeds=2", "ppo.proxies=[bt, grm_sft]",
                         "ppo.seeds=2"])
    for p in ("bt", "bt@seed1", "bt@seed2", "grm_sft", "grm_sft@seed1"):
        for stage in ("train_proxy", "eval_proxy", "bon_score", "bon_curve"):
            assert f"{stage}[{p}]" in keys, f"{stage}[{p}]"
    ppo = sorted(k for k in keys if k.startswith("ppo["))
    # PPO's own seeds (ppo[bt], ppo[bt@seed1]) against each entry's first proxy; no PPO against proxy seed copies
    assert ppo == ["ppo[bt@seed1]", "ppo[bt]", "ppo[grm_sft@seed1]", "ppo[grm_sft]"]
    for run in ppo:
        proxy = run[4:-1].split("@")[0]
        assert keys[run].inputs["model"] == f"train_proxy[{proxy}]"
        assert keys[run].config.scorer.name == proxy
    assert keys["ppo_curve[bt@seed1]"].inputs["bon_curve"] == "bon_curve[bt]"
    report = keys["report"]
    assert report.config.groups == {"bt": ["bt", "bt@seed1", "bt@seed2"], "grm_sft": ["grm_sft", "grm_sft@seed1"]}
    assert report.config.proxies == ["bt", "bt@seed1", "bt@seed2", "grm_sft", "grm_sft@seed1"]
    assert report.inputs["eval[bt@seed2]"] == "eval_proxy[bt@seed2]"
    assert report.inputs["bon[grm_sft@seed1]"] == "bon_curve[grm_sft@seed1]"
    assert report.config.rl_runs == {"ppo": {"bt": ["bt", "bt@seed1"], "grm_sft": ["grm_sft", "grm_sft@seed1"]}}
    # arms' proxies are validated against entry names, not copies
    with pytest.raises(ConfigError, match=r"ppo.proxies names \['bt@seed1'\]"):
        load_config(SMOKE, ["proxies.bt.seeds=3", "ppo.proxies=[bt@seed1]"])


def test_ensemble_seed_copies_get_their_members_stages():
    keys = nodes(SMOKE, ["proxies.bt.type=ensemble", "proxies.bt.members=2", "proxies.bt.seeds=2", "ppo=null"])
    assert {"train_proxy[bt-m0]", "train_proxy[bt-m1]", "train_proxy[bt@seed1-m0]", "train_proxy[bt@seed1-m1]",
            "bon_score[bt@seed1-m0]", "bon_score[bt@seed1]", "bon_curve[bt@seed1]", "eval_proxy[bt@seed1]"} <= set(keys)
    assert keys["eval_proxy[bt@seed1]"].inputs == {"pairs": "gold_label", "member0": "train_proxy[bt@seed1-m0]",
                                                   "member1": "train_proxy[bt@seed1-m1]"}
    assert keys["train_proxy[bt@seed1-m1]"].config.proxy.seed == 3


def test_demo_configs_compare_bt_and_grm_over_seeds():
    tiny, arms, grm = (load_config(CONFIGS / f) for f in ("tiny.yaml", "tiny_rl_algos.yaml", "grm_seeds.yaml"))
    for cfg in (tiny, arms):
        # every proxy entry of the demo over 3 seeds (issue 17: label smoothing and the ensemble too)
        assert {p.name: p.seeds for p in cfg.proxies} == {"bt": 3, "grm_sft": 3, "label_smoothing": 3, "ensemble": 3}
    assert [(p.name, p.type, p.alpha, p.seeds) for p in grm.proxies] == [
        ("bt", "bt", 0.01, 5), ("grm001", "grm", 0.01, 5), ("grm01", "grm", 0.1, 5)]
    assert len(grm.expanded_proxies()) == 15


# ----------------------------------------------------------------------------------------------------------------
# report


NS = [1, 2, 4, 8]
# gold of three seeds of `bt` and one run of `ls` at n = 1, 2, 4, 8 (gold at n = 1 is the policy's: shared)
GOLD = {"bt": [1.0, 1.5, 1.8, 1.2], "bt@seed1": [1.0, 1.6, 1.4, 1.0], "bt@seed2": [1.0, 1.7, 2.0, 0.8],
        "ls": [1.0, 1.4, 1.5, 1.3]}
PROXY = {"bt": [0.0, 0.5, 1.0, 1.5], "bt@seed1": [0.2, 0.6, 1.0, 1.4], "bt@seed2": [-0.1, 0.5, 1.1, 1.7],
         "ls": [0.0, 0.3, 0.6, 0.9]}
ACC = {"bt": (0.70, 0.60), "bt@seed1": (0.72, 0.65), "bt@seed2": (0.74, 0.65), "ls": (0.68, 0.61)}  # (id, ood)
GROUPS = {"bt": ["bt", "bt@seed1", "bt@seed2"], "ls": ["ls"]}


def kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


def synthetic_inputs(root: Path) -> dict[str, Path]:
    """eval_proxy and bon_curve artifacts as the stages write them, with the values above."""
    inputs = {}
    for p, (id_acc, ood_acc) in ACC.items():
        d = root / f"eval_{p}"
        d.mkdir()
        pd.DataFrame([{"proxy": p, "set": s, "labels": "clean", "pairs": 100, "unscored": 0, "accuracy": a, "ties": 0}
                      for s, a in (("id_test", id_acc), ("ood", ood_acc))]).to_parquet(d / "accuracy.parquet")
        inputs[f"eval[{p}]"] = d
        d = root / f"bon_{p}"
        d.mkdir()
        gold, proxy = np.array(GOLD[p]), np.array(PROXY[p])
        pd.DataFrame({"n": NS, "kl_bound": [kl(n) for n in NS], "sqrt_kl_bound": [math.sqrt(kl(n)) for n in NS],
                      "proxy": proxy, "proxy_lo": proxy - 0.1, "proxy_hi": proxy + 0.1, "proxy_rel": proxy - proxy[0],
                      "gold": gold, "gold_lo": gold - 0.1, "gold_hi": gold + 0.1, "gold_rel": gold - gold[0],
                      "gold_rel_lo": gold - gold[0] - 0.1, "gold_rel_hi": gold - gold[0] + 0.1}
                     ).to_parquet(d / "curve.parquet")
        i = int(np.argmax(gold))
        ci = {"estimate": 1.0, "lo": 0.5, "hi": 1.5}
        fit = {"empirical_peak": {"n": NS[i], "kl_bound": kl(NS[i]), "gold": float(gold[i])}, "gold_at_n1": 1.0,
               "at_max_kl": {"n": 8, "kl_bound": kl(8), "gold": float(gold[-1])},
               "gao_fit_bootstrap": {"alpha": ci, "beta": ci, "d_star": ci, "kl_star": ci, "r2": 0.9,
                                     "peak_fraction": 1.0, "ci": 0.95, "n_boot": 10}}
        (d / "fit.json").write_text(json.dumps(fit))
        inputs[f"bon[{p}]"] = d
    return inputs


@pytest.fixture(scope="module")
def seeded_report(tmp_path_factory):
    from stages import report

    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    out.mkdir()
    report.run(ReportStageConfig(study="s", proxies=list(ACC), groups=GROUPS), synthetic_inputs(root), out)
    return out


def test_seed_stats_by_hand():
    from pipeline.seed_stats import seed_stats

    st = seed_stats([0.70, 0.72, 0.74])
    half = T95_2DF * 0.02 / math.sqrt(3)
    assert st["seeds"] == 3 and st["mean"] == pytest.approx(0.72) and st["sd"] == pytest.approx(0.02)
    assert (st["ci_lo"], st["ci_hi"]) == pytest.approx((0.72 - half, 0.72 + half))
    assert (round(st["ci_lo"], 3), round(st["ci_hi"], 3)) == (0.670, 0.770)
    one = seed_stats([0.5])
    assert one["mean"] == 0.5 and all(math.isnan(one[k]) for k in ("sd", "ci_lo", "ci_hi"))


def test_report_aggregates_accuracy_over_seeds(seeded_report):
    acc = pd.read_csv(seeded_report / "accuracy.csv")
    assert list(acc.columns[:2]) == ["group", "proxy"]
    assert dict(zip(acc.proxy + "/" + acc.set, acc.accuracy)) == {
        f"{p}/{s}": a for p, v in ACC.items() for s, a in zip(("id_test", "ood"), v)}
    assert dict(zip(acc.proxy, acc.group)) == {"bt": "bt", "bt@seed1": "bt", "bt@seed2": "bt", "ls": "ls"}
    over = pd.read_csv(seeded_report / "accuracy_over_seeds.csv").set_index("set")
    assert set(over.group) == {"bt"} and (over.seeds == 3).all() and set(over.labels) == {"clean"}
    assert over.loc["id_test", ["mean", "sd"]].tolist() == pytest.approx([0.72, 0.02])
    half = T95_2DF * 0.02 / math.sqrt(3)
    assert over.loc["id_test", ["ci_lo", "ci_hi"]].tolist() == pytest.approx([0.72 - half, 0.72 + half])
    ood_mean, ood_sd = (0.60 + 0.65 + 0.65) / 3, math.sqrt(((0.6 - 19 / 30) ** 2 + 2 * (0.65 - 19 / 30) ** 2) / 2)
    assert over.loc["ood", ["mean", "sd"]].tolist() == pytest.approx([ood_mean, ood_sd])
    readme = (seeded_report / "README.md").read_text()
    assert "## Over seeds" in readme
    assert "| bt | 3 | 0.720 ± 0.020 [0.670, 0.770] |" in readme


def test_report_aggregates_best_of_n_over_seeds(seeded_report):
    peaks = pd.read_csv(seeded_report / "bon_peaks.csv").set_index("proxy_name")
    assert peaks.peak_n.to_dict() == {"bt": 4, "bt@seed1": 2, "bt@seed2": 4, "ls": 4}
    assert peaks.peak_gold.to_dict() == pytest.approx({"bt": 1.8, "bt@seed1": 1.6, "bt@seed2": 2.0, "ls": 1.5})
    assert peaks.gold_at_max_n.to_dict() == pytest.approx({"bt": 1.2, "bt@seed1": 1.0, "bt@seed2": 0.8, "ls": 1.3})
    assert peaks.group.to_dict() == {"bt": "bt", "bt@seed1": "bt", "bt@seed2": "bt", "ls": "ls"}

    over = pd.read_csv(seeded_report / "bon_peaks_over_seeds.csv").set_index("quantity")
    half = T95_2DF * 0.2 / math.sqrt(3)
    assert over.loc["peak_gold", ["mean", "sd", "ci_lo", "ci_hi"]].tolist() == pytest.approx(
        [1.8, 0.2, 1.8 - half, 1.8 + half])
    assert over.loc["gold_at_max_n", ["mean", "sd"]].tolist() == pytest.approx([1.0, 0.2])
    kls = [kl(4), kl(2), kl(4)]
    kl_mean = sum(kls) / 3
    kl_sd = math.sqrt(sum((k - kl_mean) ** 2 for k in kls) / 2)
    assert over.loc["peak_kl_bound", ["mean", "sd"]].tolist() == pytest.approx([kl_mean, kl_sd])

    bands = pd.read_csv(seeded_report / "bon_curves_over_seeds.csv")
    assert set(bands.group) == {"bt"} and bands.n.tolist() == NS and (bands.seeds == 3).all()
    at4 = bands.set_index("n").loc[4]
    assert at4[["gold_rel_mean", "gold_rel_min", "gold_rel_max"]].tolist() == pytest.approx([2.2 / 3, 0.4, 1.0])
    assert at4[["proxy_rel_mean", "proxy_rel_min", "proxy_rel_max"]].tolist() == pytest.approx([1.0, 0.8, 1.2])
    assert at4.sqrt_kl_bound == pytest.approx(math.sqrt(kl(4)))

    curves = pd.read_csv(seeded_report / "bon_curves.csv")
    for p in ACC:
        c = curves[curves.proxy_name == p]
        assert c.gold.tolist() == pytest.approx(GOLD[p]) and c.proxy.tolist() == pytest.approx(PROXY[p])
        assert set(c.group) == {p.split("@")[0]}

    readme = (seeded_report / "README.md").read_text()
    assert f"| bt | 3 | 1.800 ± 0.200 [{1.8 - half:.3f}, {1.8 + half:.3f}] |" in readme
    assert "gold at n = 8" in readme and "![best-of-n over seeds](bon_over_seeds.png)" in readme
    # per-run tables: every group's first run; the other seeds only in the CSV tables and the aggregate
    assert "### bt\n" in readme and "### ls\n" in readme and "### bt@seed1" not in readme
    assert (seeded_report / "bon_over_seeds.png").stat().st_size > 1000
    from tests.test_report import check_self_contained

    check_self_contained((seeded_report / "report.html").read_text(), seeded_report, readme)


def test_single_seed_proxies_keep_todays_presentation(tmp_path):
    from stages import report

    inputs = {k: v for k, v in synthetic_inputs(tmp_path).items() if k.endswith("[ls]")}
    out = tmp_path / "out"
    out.mkdir()
    report.run(ReportStageConfig(study="s", proxies=["ls"], groups={"ls": ["ls"]}), inputs, out)
    readme = (out / "README.md").read_text()
    assert "Over seeds" not in readme and "### ls" in readme and "several seeds" not in readme
    assert not any((out / f).exists() for f in ("accuracy_over_seeds.csv", "bon_peaks_over_seeds.csv",
                                                "bon_curves_over_seeds.csv", "bon_over_seeds.png"))
    # without groups (a config slice from before seeds), every proxy is its own group: the same page
    out2 = tmp_path / "out2"
    out2.mkdir()
    report.run(ReportStageConfig(study="s", proxies=["ls"]), inputs, out2)
    assert (out2 / "README.md").read_text() == readme


def test_summary_rows_aggregate_a_proxys_seeds(tmp_path):
    """The end-of-run table: one `bt (3 seeds)` row with mean ± sd over the seeds' fit.json, a row for `ls`."""
    from pipeline.cli import summary_rows
    from pipeline.runner import PlannedStage

    tree = yaml.safe_load(SMOKE.read_text())
    tree["proxies"] = [{"name": "bt", "type": "bt", "seeds": 3, "head_width": 16},
                       {"name": "ls", "type": "label_smoothing", "head_width": 16}]
    tree["ppo"] = None
    tree["run"]["cache_root"] = str(tmp_path / "cache")
    cfg = load_config(write(tmp_path, yaml.safe_dump(tree)))
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    fps = runner.fingerprints()
    inputs = synthetic_inputs(tmp_path)
    for p in ACC:
        key = f"bon_curve[{p}]"
        runner.cache.path(key, fps[key]).mkdir(parents=True)
        (runner.cache.path(key, fps[key]) / "fit.json").write_text((inputs[f"bon[{p}]"] / "fit.json").read_text())
    runner.selected = {"report"}
    plan = [PlannedStage(n, fps[n.key], "cached") for n in runner.nodes]
    rows = summary_rows(runner, plan)
    kls = [kl(4), kl(2), kl(4)]
    kl_mean = sum(kls) / 3
    kl_sd = math.sqrt(sum((k - kl_mean) ** 2 for k in kls) / 2)
    assert rows == [("bt (3 seeds)", "best-of-n", "1.800 ± 0.200", f"≤ {kl_mean:.2f} ± {kl_sd:.2f}",
                     "1.000 ± 0.200", f"≤ {kl(8):.2f} ± 0.00"),
                    ("ls", "best-of-n", "1.500", f"≤ {kl(4):.2f}", "1.300", f"≤ {kl(8):.2f}")]
    # a run that covered one seed only: that seed's own row
    runner.selected = {"bon_curve[bt@seed1]"}
    assert summary_rows(runner, plan) == [("bt@seed1", "best-of-n", "1.600", f"≤ {kl(2):.2f}", "1.000",
                                           f"≤ {kl(8):.2f}")]
