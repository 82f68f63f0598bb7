"""The report as a reviewer reads it (issue 16): its setting in its first lines, failed fits labelled and not quoted,
95 % t-bands over seeds, RL arms and proxies compared at matched measured KL with generated verdicts. Every number is
checked against a hand computation on hand-made artifacts; nothing is trained."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.config import (
    GoldLabelConfig,
    LoraConfig,
    PolicyConfig,
    ProxyConfig,
    ReportSetting,
    ReportStageConfig,
    RMTrainingConfig,
)
from pipeline.proxy_types import describe_proxy

T975_2DF = 4.302652729911275  # Student-t 0.975 quantile, 2 degrees of freedom (from a table)


def kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


NS = [1, 2, 4, 8]


def bon_input(root, name: str, gold: list[float], fit_extra: dict | None = None):
    """A bon_curve artifact: curve.parquet over n = 1, 2, 4, 8 and a fit.json whose Gao d* is 7.77 [7.11, 8.88]."""
    d = root / f"bon_{name}"
    d.mkdir()
    g = np.array(gold)
    pd.DataFrame({"n": NS, "kl_bound": [kl(n) for n in NS], "sqrt_kl_bound": [math.sqrt(kl(n)) for n in NS],
                  "proxy": g, "proxy_lo": g - 0.1, "proxy_hi": g + 0.1, "proxy_rel": g - g[0],
                  "gold": g, "gold_lo": g - 0.1, "gold_hi": g + 0.1, "gold_rel": g - g[0],
                  "gold_rel_lo": g - g[0] - 0.1, "gold_rel_hi": g - g[0] + 0.1}).to_parquet(d / "curve.parquet")
    i = int(np.argmax(g))
    ci = {"estimate": 1.0, "lo": 0.5, "hi": 1.5}
    fit = {"empirical_peak": {"n": NS[i], "kl_bound": kl(NS[i]), "gold": float(g[i])}, "gold_at_n1": float(g[0]),
           "gao_fit_bootstrap": {"alpha": ci, "beta": ci, "d_star": {"estimate": 7.77, "lo": 7.11, "hi": 8.88},
                                 "kl_star": {"estimate": 60.37, "lo": 50.55, "hi": 78.85}, "r2": 0.9,
                                 "peak_fraction": 1.0, "ci": 0.95, "n_boot": 10}} | (fit_extra or {})
    (d / "fit.json").write_text(json.dumps(fit))
    return d


def write_report(tmp_path, cfg: ReportStageConfig, inputs: dict):
    from stages import report

    out = tmp_path / "out"
    out.mkdir()
    report.run(cfg, inputs, out)
    return out, (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# the setting


def test_describe_proxy_names_type_alpha_regulariser_pairs_and_lora():
    lora = RMTrainingConfig(lora=LoraConfig(r=8, alpha=16))
    assert describe_proxy(ProxyConfig(name="bt", type="bt")) == "BT"
    assert describe_proxy(ProxyConfig(name="g", type="grm", reg="sft", alpha=0.01), RMTrainingConfig()) == \
        "GRM-SFT α=0.01"
    assert describe_proxy(ProxyConfig(name="g", type="grm", reg="dpo_noref", alpha=0.1), lora) == \
        "GRM-DPO-noref α=0.1 β=0.1, LoRA r=8"
    assert describe_proxy(ProxyConfig(name="ls", type="label_smoothing", epsilon=0.1)) == "label smoothing ε=0.1"
    assert describe_proxy(ProxyConfig(name="e", type="ensemble", members=3, combine="mean")) == "ensemble (mean) of 3"
    assert describe_proxy(ProxyConfig(name="e", type="ensemble", members=3, combine="min", member_type="grm")) == \
        "ensemble (min) of 3 GRM-SFT α=0.01"
    assert describe_proxy(ProxyConfig(name="bt", type="bt"), RMTrainingConfig(n_train_pairs=300, labels="clean")) \
        == "BT, 300 pairs, clean labels"
    assert describe_proxy(ProxyConfig(name="c", type="checkpoint", path="/models/GRM-gemma-2b/"), lora) == \
        "checkpoint GRM-gemma-2b"  # not trained here: no training settings


def test_every_report_states_its_setting_first(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "metrics.json").write_text(json.dumps({"pairs": 2900, "train": 2465, "test": 435, "ties_dropped": 100,
                                                    "noisy_flips": 616, "ood": {"pairs": 50}}))
    setting = ReportSetting(policy=PolicyConfig(hidden_size=64, num_layers=2),
                            gold_label=GoldLabelConfig(n_pairs=3000, noise_rate=0.25),
                            proxy_training=RMTrainingConfig(n_train_pairs=300, lora=LoraConfig(r=8, alpha=16)),
                            proxies=[ProxyConfig(name="bt", type="bt", seeds=3),
                                     ProxyConfig(name="grm01", type="grm", alpha=0.01, seeds=3)])
    groups = {"bt": ["bt", "bt@seed1", "bt@seed2"], "grm01": ["grm01", "grm01@seed1", "grm01@seed2"]}
    cfg = ReportStageConfig(study="s", proxies=[p for ps in groups.values() for p in ps], groups=groups,
                            rl_runs={"ppo": {"bt": ["bt", "bt@seed1"]}}, setting=setting)
    _, readme = write_report(tmp_path, cfg, {"pairs": pairs})
    head = readme.split("## ")[0]  # everything before the first section
    assert "- **Policy**: a tiny Llama (64 hidden, 2 layers) pretrained and SFT'd here." in head
    assert ("- **Proxy training pairs**: 300 of the 2465 training pairs (2900 gold-labelled pairs: 2465 train / 435 "
            "test).") in head
    assert "- **Label noise**: 25% of labels flipped at random, 616 flipped; proxies train on the noisy labels." in head
    assert "- **Proxy fine-tuning**: LoRA r=8, α=16 on q_proj, k_proj, v_proj, o_proj." in head
    assert ("- **Proxies**: `bt` BT, LoRA r=8, 300 pairs (3 seeds); `grm01` GRM-SFT α=0.01, LoRA r=8, 300 pairs "
            "(3 seeds).") in head
    assert "- **PPO**: against `bt`, 2 seeds each." in head


def test_the_setting_of_a_clean_full_fine_tuned_study_and_a_slice_without_it(tmp_path):
    setting = ReportSetting(policy=PolicyConfig(source="hub", model_id="google/gemma-2b-it"),
                            gold_label=GoldLabelConfig(source="unified_feedback", dataset_path="uf.parquet",
                                                       n_pairs=1000, test_fraction=0.2),
                            proxy_training=RMTrainingConfig(), proxies=[ProxyConfig(name="bt", type="bt")])
    _, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=["bt"], setting=setting), {})
    assert "- **Policy**: `google/gemma-2b-it`." in readme
    assert "- **Proxy training pairs**: all training pairs (1000 pairs from unified feedback, 80% for training)." in \
        readme
    assert "- **Label noise**: none; proxies train on the clean labels." in readme
    assert "- **Proxy fine-tuning**: full (every weight), no LoRA." in readme
    # a config slice from before the setting existed: only what the inputs tell
    (tmp_path / "out").rename(tmp_path / "first")
    _, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=["bt"]), {})
    assert "- **Proxies**: `bt`." in readme and "Policy" not in readme


def test_the_study_passes_its_setting_to_the_report():
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.study import build_stages

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / "tiny.yaml", ["gold_label.noise_rate=0.25", "proxy_training.n_train_pairs=300"])
    report = next(n for n in build_stages(cfg) if n.key == "report")
    assert report.config.setting.gold_label.noise_rate == 0.25
    assert report.config.setting.proxy_training.n_train_pairs == 300
    assert [p.name for p in report.config.setting.proxies] == [p.name for p in cfg.proxies]


# ----------------------------------------------------------------------------------------------------------------
# fits


FAILED = {"fit_check": {"ok": False, "peak_consistent": True, "reason": "3/3 points' fitted values lie outside their "
                        "CI (max |residual| 4.2 CI half-widths; allowed 25% and 2)"},
          "empirical_peak_ci": {"estimate": 0.7976, "lo": 0.4395, "hi": 0.9}}


def test_a_failed_fit_is_labelled_and_its_d_star_not_quoted(tmp_path):
    inputs = {"bon[bt]": bon_input(tmp_path, "bt", [1.0, 1.4, 1.6, 1.2], FAILED)}
    _, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=["bt"]), inputs)
    assert f"fit fails its check ({FAILED['fit_check']['reason']})" in readme
    assert "7.77" not in readme and "60.37" not in readme  # d* and KL* are not findings
    # the empirical peak instead, with its CI over prompts: √KL and KL = d²
    assert (f"Empirical peak over prompts (bootstrap, 95 %): √KL 0.80 [0.44, 0.90], KL ≤ {0.7976 ** 2:.2f} "
            f"[{0.4395 ** 2:.2f}, {0.81:.2f}].") in readme


def test_a_passing_fit_is_quoted_and_older_artifacts_read_as_before(tmp_path):
    passed = {"fit_check": {"ok": True, "peak_consistent": True, "reason": ""}}
    inputs = {"bon[bt]": bon_input(tmp_path, "bt", [1.0, 1.4, 1.6, 1.2], passed),
              "bon[old]": bon_input(tmp_path, "old", [1.0, 1.3, 1.5, 1.1])}
    _, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=["bt", "old"]), inputs)
    bt, old = readme.split("### bt")[1].split("### old")
    assert "peak d* = 7.77 [7.11, 8.88]" in bt and "The fit passes its check" in bt
    assert "peak d* = 7.77 [7.11, 8.88]" in old and "check" not in old and "Empirical peak over" not in old


# ----------------------------------------------------------------------------------------------------------------
# over seeds


def test_best_of_n_over_seeds_is_a_t_band(tmp_path):
    from stages.report import seed_band

    golds = {"bt": [1.0, 1.4, 1.6, 1.2], "bt@seed1": [1.0, 1.2, 1.3, 1.0], "bt@seed2": [1.0, 1.3, 1.8, 0.9]}
    curves = {p: pd.read_parquet(bon_input(tmp_path, p, g) / "curve.parquet") for p, g in golds.items()}
    band = seed_band(list(curves.values())).set_index("n")
    # at n = 4 the three seeds gain 0.6, 0.3 and 0.8 over n = 1
    gains = [0.6, 0.3, 0.8]
    mean = sum(gains) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / 2)
    half = T975_2DF * sd / math.sqrt(3)
    assert band.loc[4, ["gold_rel_mean", "gold_rel_sd", "gold_rel_ci_lo", "gold_rel_ci_hi"]].tolist() == \
        pytest.approx([mean, sd, mean - half, mean + half])
    assert band.loc[4, ["gold_rel_min", "gold_rel_max"]].tolist() == pytest.approx([0.3, 0.8])  # old columns kept

    inputs = {f"bon[{p}]": tmp_path / f"bon_{p}" for p in golds}
    out, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=list(golds),
                                                           groups={"bt": list(golds)}), inputs)
    csv = pd.read_csv(out / "bon_curves_over_seeds.csv").set_index("n")
    assert csv.loc[4, ["gold_rel_ci_lo", "gold_rel_ci_hi"]].tolist() == pytest.approx([mean - half, mean + half])
    # the first seed's sentence gives the empirical peak over seeds: KL ≤ bound at n = 4, 4, 4
    assert f"the empirical peak is at KL ≤ {kl(4):.2f} ± 0.00 [{kl(4):.2f}, {kl(4):.2f}]" in readme


# ----------------------------------------------------------------------------------------------------------------
# RL at matched KL

SQRT_KL = {"ppo": [0.0, 1.0, 2.0, 3.0], "grpo": [0.0, 1.0, 2.0, 2.5]}
SHAPE = {("ppo", "bt"): [1.0, 1.5, 1.2, 0.6], ("grpo", "bt"): [1.0, 1.7, 1.5, 1.0],
         ("ppo", "grm"): [1.3, 1.8, 1.5, 0.9]}
OFFSET = {("ppo", "bt"): [0.0, 0.1, -0.1], ("grpo", "bt"): [0.05, 0.1, -0.2], ("ppo", "grm"): [0.0, 0.2, 0.1]}
RUNS = {"bt": ["bt", "bt@seed1", "bt@seed2"], "grm": ["grm", "grm@seed1", "grm@seed2"]}


def rl_input(root, arm: str, proxy: str, seed: int):
    """A ppo_curve artifact: gold = SHAPE + OFFSET[seed] at √KL = SQRT_KL[arm]; its fit fails its check."""
    run = RUNS[proxy][seed]
    d = root / f"{arm}_{run}"
    d.mkdir()
    x, g = np.array(SQRT_KL[arm]), np.array(SHAPE[(arm, proxy)]) + OFFSET[(arm, proxy)][seed]
    z = np.zeros_like(x)
    pd.DataFrame({"step": [0, 1, 2, 4], "sqrt_kl": x, "kl_k1": x ** 2, "kl_k3": x ** 2, "proxy": x, "proxy_lo": x,
                  "proxy_hi": x, "gold": g, "gold_lo": g - 0.1, "gold_hi": g + 0.1, "proxy_rel": x, "proxy_rel_lo": x,
                  "proxy_rel_hi": x, "gold_rel": g - g[0], "gold_rel_lo": z, "gold_rel_hi": z}
                 ).to_parquet(d / "curve.parquet")
    i = int(np.argmax(g))
    ci = {"estimate": 0.3, "lo": 0.2, "hi": 0.4}
    fit = {"empirical_peak": {"step": [0, 1, 2, 4][i], "kl": float(x[i] ** 2), "gold": float(g[i])},
           "gold_at_last_step": float(g[-1]), "kl_at_last_step": float(x[-1] ** 2), "gold_at_step0": float(g[0]),
           "gao_fit_gold_rel": {"alpha": 1.0, "beta": 1.0},
           "gao_fit_bootstrap": {"alpha": ci, "beta": ci, "d_star": {"estimate": 0.456, "lo": 0.4, "hi": 0.5},
                                 "kl_star": {"estimate": 0.208, "lo": 0.16, "hi": 0.25}, "r2": 0.8,
                                 "peak_fraction": 1.0, "ci": 0.95, "n_boot": 10},
           "fit_check": {"ok": False, "peak_consistent": False, "reason": "fitted peak misses the empirical peak"},
           "empirical_peak_ci": {"estimate": 1.0, "lo": 1.0, "hi": 2.0}}
    (d / "fit.json").write_text(json.dumps(fit))
    return d


@pytest.fixture
def rl_report(tmp_path):
    rl_runs = {"ppo": {"bt": RUNS["bt"], "grm": RUNS["grm"]}, "grpo": {"bt": RUNS["bt"]}}
    inputs = {f"{arm}[{RUNS[p][s]}]": rl_input(tmp_path, arm, p, s)
              for arm, by_proxy in rl_runs.items() for p in by_proxy for s in range(3)}
    inputs["bon[bt]"] = bon_input(tmp_path, "bt", [1.0, 1.4, 1.6, 1.2])
    cfg = ReportStageConfig(study="s", proxies=["bt", "grm"], rl_runs=rl_runs)
    return write_report(tmp_path, cfg, inputs)


def test_rl_runs_at_matched_kl_by_hand(rl_report):
    out, readme = rl_report
    # common √KL range [0, 2.5] (GRPO stops at 2.5): KL 1, 2, 4 are the largest targets inside it. The runs peak at
    # √KL 1, so the loss range is √KL 1 – 2.5.
    per_run = pd.read_csv(out / "rl_matched_kl.csv")
    ppo_bt = per_run[(per_run.arm == "PPO") & (per_run.run == "bt")].set_index("quantity").value
    r2 = math.sqrt(2) - 1  # KL 2 lies at √KL √2, between the points at √KL 1 and 2
    rate = "gold lost per √nat, √KL 1.00–2.50"
    assert ppo_bt.to_dict() == pytest.approx({"gold at KL 1": 1.5, "gold at KL 2": 1.5 + r2 * (1.2 - 1.5),
                                              "gold at KL 4": 1.2, rate: (1.5 - 0.9) / 1.5})
    grpo_bt = per_run[(per_run.arm == "GRPO") & (per_run.run == "bt@seed2")].set_index("quantity").value
    assert grpo_bt[rate] == pytest.approx((1.7 - 1.0) / 1.5)  # the offset cancels
    assert grpo_bt["gold at KL 1"] == pytest.approx(1.5)
    # best-of-n of bt, at its bound (its curve has no estimated KL): √KL ≤ 1.10 reaches KL 1 only
    bon = per_run[per_run.arm == "best-of-n (KL ≤ bound)"].set_index("quantity").value
    x1, x2 = math.sqrt(kl(4)), math.sqrt(kl(8))
    assert bon["gold at KL 1"] == pytest.approx(1.6 + (1.0 - x1) / (x2 - x1) * (1.2 - 1.6))
    assert bon[["gold at KL 4", rate]].isna().all()

    over = pd.read_csv(out / "rl_matched_kl_over_seeds.csv")
    row = over[(over.arm == "PPO") & (over.proxy_name == "bt") & (over.quantity == "gold at KL 1")].iloc[0]
    half = T975_2DF * 0.1 / math.sqrt(3)  # 1.5, 1.6, 1.4: sd 0.1
    assert [row["mean"], row.sd, row.ci_lo, row.ci_hi] == pytest.approx([1.5, 0.1, 1.5 - half, 1.5 + half])
    assert "## RL at matched KL" in readme and f"1.500 ± 0.100 [{1.5 - half:.3f}, {1.5 + half:.3f}]" in readme
    assert "gold lost per nat" not in readme
    curves = pd.read_csv(out / "rl_curves_over_seeds.csv")
    assert curves.sqrt_kl.max() == pytest.approx(2.5) and set(curves.arm) == {"PPO", "GRPO"}


def test_matched_kl_comparisons_are_one_holm_family_with_generated_verdicts(rl_report):
    from pipeline import comparison_stats as cs

    out, readme = rl_report
    table = pd.read_csv(out / "comparisons.csv", keep_default_na=False, na_values=[""])
    kl1 = table[table.what == "GRPO − PPO against `bt`, gold at KL 1"].iloc[0]
    # paired by seed: GRPO − PPO per seed is 0.2 + (0.05, 0, −0.1)
    d = np.array([0.25, 0.2, 0.1])
    half = T975_2DF * d.std(ddof=1) / math.sqrt(3)
    assert kl1.test == cs.PAIRED
    assert [kl1.difference, kl1.ci_lo, kl1.ci_hi] == pytest.approx([d.mean(), d.mean() - half, d.mean() + half])
    grm = table[table.what == "`grm` − `bt` under PPO, gold at KL 4"].iloc[0]
    assert grm.test == cs.PAIRED and grm.difference == pytest.approx(0.3 + 0.1)  # 0.3 + mean(0, 0.1, 0.2)
    # the loss rates do not vary between seeds (offsets cancel): not tested, outside the family
    rate = table[table.what.str.endswith("gold lost per √nat, √KL 1.00–2.50")]
    assert len(rate) == 2 and rate.p.isna().all()
    matched = table[table.family == "RL at matched KL"]
    assert len(matched) == 8 and matched.p_holm.notna().sum() == 6
    # one family with the report's other comparisons (each arm and proxy against the baseline among them)
    assert set(table.family) == {"RL at matched KL", "RL against the baseline"}
    assert table.p_holm.tolist() == pytest.approx(cs.holm(table.p).tolist(), nan_ok=True)
    for sentence in cs.verdicts(table):  # generated from the numbers, not written by hand
        assert f"- {sentence}" in readme
    tested = int(table.p.notna().sum())
    assert f"after Holm correction over {tested} comparisons" in readme
    assert "would go undetected at 80 % power" in readme


def test_rl_fits_that_fail_are_labelled(rl_report):
    _, readme = rl_report
    assert readme.count("fit fails its check (fitted peak misses the empirical peak)") == 9
    rl = readme[readme.index("## PPO"):readme.index("## RL at matched KL")]
    assert "0.456" not in rl and "d* = " not in rl  # (the best-of-n fit has no check: quoted as before)


def test_the_rl_report_page_stands_alone(rl_report):
    from tests.test_report import check_self_contained

    out, readme = rl_report
    check_self_contained((out / "report.html").read_text(), out, readme)


def test_seeded_proxy_groups_are_compared_in_the_same_family(tmp_path):
    """Two entries over three seeds: `grm` − `bt` in best-of-n peak gold and in accuracy, paired by seed, beside
    nothing else (no RL), Holm over those two."""
    from pipeline import comparison_stats as cs

    golds = {"bt": [1.0, 1.4, 1.6, 1.2], "bt@seed1": [1.0, 1.2, 1.3, 1.0], "bt@seed2": [1.0, 1.3, 1.8, 0.9],
             "grm": [1.0, 1.5, 1.7, 1.3], "grm@seed1": [1.0, 1.2, 1.5, 1.0], "grm@seed2": [1.0, 1.3, 1.85, 0.9]}
    accuracy = {"bt": 0.70, "bt@seed1": 0.72, "bt@seed2": 0.74, "grm": 0.71, "grm@seed1": 0.75, "grm@seed2": 0.74}
    inputs = {f"bon[{p}]": bon_input(tmp_path, p, g) for p, g in golds.items()}
    for p, a in accuracy.items():
        d = tmp_path / f"eval_{p}"
        d.mkdir()
        pd.DataFrame([{"proxy": p, "set": "id_test", "labels": "clean", "pairs": 100, "unscored": 0, "accuracy": a,
                       "ties": 0}]).to_parquet(d / "accuracy.parquet")
        inputs[f"eval[{p}]"] = d
    groups = {"bt": ["bt", "bt@seed1", "bt@seed2"], "grm": ["grm", "grm@seed1", "grm@seed2"]}
    out, readme = write_report(tmp_path, ReportStageConfig(study="s", proxies=list(golds), groups=groups), inputs)
    table = pd.read_csv(out / "comparisons.csv").set_index("what")
    peak = table.loc["`grm` − `bt` in best-of-n peak gold"]
    assert peak.test == cs.PAIRED and peak.difference == pytest.approx((0.1 + 0.2 + 0.05) / 3)
    acc = table.loc["`grm` − `bt` in accuracy (id_test)"]
    assert acc.difference == pytest.approx((0.01 + 0.03 + 0.0) / 3)
    assert len(table) == 2 and table.p_holm.tolist() == pytest.approx(cs.holm(table.p).tolist())
    assert "after Holm correction over 2 comparisons" in readme


def test_matched_points_of_short_runs_and_late_peaks():
    from pipeline.report_data import matched_points

    def run(sqrt_kl):
        return pd.DataFrame({"sqrt_kl": sqrt_kl})

    # common range √KL 0–0.23 (KL 0.0529): no target fits, so KL 0.052; the latest peak (√KL 0.22) leaves a sliver
    kls, (lo, hi), why = matched_points([run([0, 0.1, 0.23]), run([0, 0.22, 0.3])], [0.01, 0.22 ** 2])
    assert kls == [0.052] and (lo, hi) == (0.0, 0.23) and why.startswith("the whole range")
    # common range √KL 0–3 (KL 9): KL 2, 4, 8; peaks by √KL 1.2: the rate over 1.2–3
    kls, (lo, hi), why = matched_points([run([0, 1, 3]), run([0, 1.2, 3.5])], [1.0, 1.44])
    assert kls == [2.0, 4.0, 8.0] and (lo, hi) == pytest.approx((1.2, 3.0)) and why.startswith("from the latest")


def test_rl_against_the_baseline_by_hand():
    """Each arm and proxy against plain PPO on the first proxy: peak gold, its KL, and the last export's gold and KL
    from the runs' fit.json, over seeds, differences paired by seed (B − A)."""
    from stages.report import _against_baseline_section

    def fit(peak_gold, peak_kl, last_gold, last_kl):
        return {"empirical_peak": {"gold": peak_gold, "kl": peak_kl, "step": 4},
                "gold_at_last_step": last_gold, "kl_at_last_step": last_kl}

    arms = {"ppo": {"bt": ["bt", "bt@seed1"]}, "ppo_clip": {"bt": ["bt", "bt@seed1"]}}
    fits = {("ppo", "bt"): fit(1.0, 0.5, 0.2, 6.0), ("ppo", "bt@seed1"): fit(1.2, 0.7, 0.0, 5.0),
            ("ppo_clip", "bt"): fit(1.5, 2.0, 1.0, 3.0), ("ppo_clip", "bt@seed1"): fit(1.3, 1.0, 0.6, 2.0)}
    parts, rows = _against_baseline_section(arms, fits)
    by_what = {r["what"]: r for r in rows}
    assert len(rows) == 4  # the baseline is not compared with itself
    peak = by_what["PPO (clip) against `bt` − PPO against `bt`, peak gold"]
    assert peak["difference"] == pytest.approx(((1.5 - 1.0) + (1.3 - 1.2)) / 2)
    kl = by_what["PPO (clip) against `bt` − PPO against `bt`, KL at the gold peak"]
    assert kl["difference"] == pytest.approx(((2.0 - 0.5) + (1.0 - 0.7)) / 2)
    last = by_what["PPO (clip) against `bt` − PPO against `bt`, gold at the last export"]
    # paired over seeds: the per-seed differences are 0.8 and 0.6, so the t-interval is mean ± t(1) · sd / √2
    d = np.array([0.8, 0.6])
    half = 12.706204736 * d.std(ddof=1) / math.sqrt(2)
    assert (last["ci_lo"], last["ci_hi"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-6)
    assert all(r["family"] == "RL against the baseline" for r in rows)
    assert "| PPO | bt | 2 |" in "\n".join(parts) and "baseline" in "\n".join(parts)
    assert _against_baseline_section({"ppo": {"bt": ["bt"]}}, fits) == ([], [])
