"""The whole study on the smoke config through the CLI: every stage runs, a re-run is fully cached, and adding
proxies runs only their stages (and the report)."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.study import build_stages

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


def plan(config, overrides):
    cfg = load_config(config, overrides)
    return {p.node.key: p.status for p in Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).plan()}


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, capsys):
    overrides = [f"run.cache_root={tmp_path / 'cache'}", f"run.reports_dir={tmp_path / 'report'}"]
    assert main(["run", str(SMOKE), *overrides]) == 0
    report = tmp_path / "report"
    assert (report / "README.md").exists() and (report / "bon_gold_vs_kl.png").stat().st_size > 1000
    acc = pd.read_csv(report / "accuracy.csv")
    assert set(acc.proxy) == {"bt", "grm_sft"} and set(acc.set) == {"id_test", "ood"}
    assert acc.accuracy.between(0, 1).all()
    curves = pd.read_csv(report / "bon_curves.csv")
    assert sorted(curves.n.unique()) == [1, 2, 4, 8, 16]
    runs = list((tmp_path / "cache" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "resolved_config.yaml").exists() and (runs[0] / "run.log").exists()

    # an unchanged re-run executes nothing
    assert set(plan(SMOKE, overrides).values()) == {"cached"}
    assert main(["run", str(SMOKE), *overrides]) == 0
    assert "running" not in (sorted((tmp_path / "cache" / "runs").iterdir())[-1] / "run.log").read_text()

    # adding proxies (label smoothing and a 2-member ensemble) leaves every existing stage cached
    tree = yaml.safe_load(SMOKE.read_text())
    tree["proxies"] += [{"name": "ls", "type": "label_smoothing", "head_width": 16},
                        {"name": "ens", "type": "ensemble", "members": 2, "combine": "min", "head_width": 16}]
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(tree))
    states = plan(bigger, overrides)
    new = {k for k, s in states.items() if s != "cached"}
    assert new == {"train_proxy[ls]", "eval_proxy[ls]", "bon_score[ls]", "bon_curve[ls]",
                   "train_proxy[ens-m0]", "train_proxy[ens-m1]", "eval_proxy[ens]", "bon_score[ens-m0]",
                   "bon_score[ens-m1]", "bon_score[ens]", "bon_curve[ens]", "knowledge[ls]", "knowledge[ens]",
                   "report"}
    assert main(["run", str(bigger), *overrides]) == 0
    assert set(plan(bigger, overrides).values()) == {"cached"}
    acc = pd.read_csv(report / "accuracy.csv")
    assert set(acc.proxy) == {"bt", "grm_sft", "ls", "ens"}

    # status and show print tables a person can read
    capsys.readouterr()
    assert main(["status", str(bigger), *overrides]) == 0
    out = capsys.readouterr().out
    assert "train_proxy[ens-m1]" in out and "cached" in out
    assert main(["show", str(bigger), *overrides, "-n", "2"]) == 0
    assert "chosen" in capsys.readouterr().out


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    assert main(["run", str(SMOKE), "gold_label.noise_rat=0.1", f"run.cache_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "gold_label.noise_rat" in err and "noise_rate" in err
    assert not any(tmp_path.iterdir())  # nothing was created
    assert main(["run", str(SMOKE), "--only", "nope", f"run.cache_root={tmp_path / 'c'}"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_missing_local_checkpoint_is_reported_before_any_stage(tmp_path, capsys):
    tree = yaml.safe_load(SMOKE.read_text())
    tree["proxies"].append({"name": "released", "type": "checkpoint", "path": str(tmp_path / "no_such_rm")})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["run", str(cfg), f"run.cache_root={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "proxies.released.path" in err and "no_such_rm" in err
    assert not (tmp_path / "cache").exists()


def fingerprints(config, overrides=()):
    cfg = load_config(config, list(overrides))
    return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()


def test_fingerprints_ignore_what_cannot_change_a_result():
    base = fingerprints(SMOKE)
    assert fingerprints(SMOKE, ["gold.batch_size=3", "bon.score_batch_size=5", "eval_proxy.batch_size=7"]) == base
    assert fingerprints(SMOKE, ["proxies.bt.alpha=0.5", "proxies.bt.epsilon=0.2"]) == base  # unused by BT
    changed = fingerprints(SMOKE, ["proxies.grm_sft.alpha=0.5"])
    assert {k for k in base if base[k] != changed[k]} == {"train_proxy[grm_sft]", "eval_proxy[grm_sft]",
                                                           "bon_score[grm_sft]", "bon_curve[grm_sft]",
                                                           "knowledge[grm_sft]", "report"}


def test_a_replaced_local_dataset_invalidates_what_reads_it(tmp_path):
    data = tmp_path / "uf.parquet"
    data.write_bytes(b"one")
    paper = Path(__file__).parents[1] / "configs" / "paper" / "gemma2b_unified_feedback.yaml"
    overrides = [f"gold_label.dataset_path={data}"]
    before = fingerprints(paper, overrides)
    data.write_bytes(b"other contents")
    after = fingerprints(paper, overrides)
    assert before["gold_score"] != after["gold_score"] and before["eval_prompts"] != after["eval_prompts"]
    assert before["train_proxy[bt]"] != after["train_proxy[bt]"]  # through gold_label
