"""The DPO arm: TRL's DPO loss on a batch equals an independently written DPO loss, the policy is exported on the
log-spaced step schedule, and a smoke study with `dpo:` set runs DPO through the RL evaluation stages into the
report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, load_config, log_spaced_steps
from pipeline.losses import response_logprobs
from pipeline.records import read_sample_shards
from pipeline.runner import Runner
from pipeline.study import build_stages

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
# epochs, not steps: the export schedule then comes from the trainer's own step count
DPO = "dpo={num_processes: 1, deepspeed_config: null, epochs: 1, batch_size: 32, lr: 1.0e-3, beta: 0.1, " \
      "max_length: 64, eval: {n_samples: 4, bootstrap: 20}}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke study with a PPO and a DPO arm (both inline), run to its report."""
    root = tmp_path_factory.mktemp("dpo_study")
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}", DPO]
    cfg = load_config(SMOKE, overrides)
    nodes = build_stages(cfg)
    runner = Runner(nodes, ArtifactCache(cfg.run.cache_root))
    plan = runner.run()
    return {"cfg": cfg, "root": root, "nodes": {n.key: n for n in nodes},
            "art": {p.node.key: runner.cache.path(p.node.key, p.fingerprint) for p in plan}}


def test_trl_loss_on_a_batch_is_the_dpo_loss(study, tmp_path):
    """On one batch, with the policy moved away from its reference, TRL's loss is
    −mean log σ(β((log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)))), log π summed over the response
    tokens by `response_logprobs` from plain forward passes."""
    from pipeline.distributed import make_accelerator
    from stages.dpo import build_trainer

    art, node = study["art"], study["nodes"]["dpo[bt]"]
    inputs = {"pairs": art["gold_label"], "policy": art["sft_policy"]}
    trainer, tokenizer, encoded = build_trainer(node.config, inputs, str(tmp_path), make_accelerator(), 6)
    policy, reference = trainer.model, trainer.ref_model
    torch.manual_seed(0)
    with torch.no_grad():  # at the start policy = reference and every pair's loss is log 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 12  # 6 chosen rows, then their 6 rejected rows
    loss = trainer.compute_loss(policy, batch)

    def logps(model):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_logprobs(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)

    (c, r), (ref_c, ref_r) = logps(policy), logps(reference)
    beta = node.config.dpo.beta
    expected = -F.logsigmoid(beta * ((c - ref_c) - (r - ref_r))).mean()
    assert abs(expected.item() - math.log(2)) > 1e-3  # the check is not the trivial start
    assert torch.allclose(loss.detach(), expected, atol=1e-5), (loss.item(), expected.item())
    # the rows are the pairs encoded as the proxies encode them: prompt + chosen is the chosen side's encoding
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] + row["chosen_ids"] == encoded.items[0][0].input_ids
    assert row["prompt_ids"] + row["rejected_ids"] == encoded.items[0][1].input_ids


def test_export_callback_schedule(monkeypatch):
    """Exports after each unit of the config's schedule (DPO: optimizer steps 1, 2, 4, ..., last of
    `DPOConfig.export_steps`, the schedule `overopt plan` reads too; GRPO/RLOO: updates of several optimizer steps),
    and a trainer whose own length does not end that schedule stops the run with both counts."""
    from types import SimpleNamespace

    import pipeline.trl_runs as trl_runs
    from pipeline.config import DPOConfig

    saved = []
    monkeypatch.setattr(trl_runs, "export_policy", lambda lm, acc, tok, out, step: saved.append(step))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    schedule = DPOConfig(batch_size=32, epochs=2).export_steps(330)  # 2 epochs of ceil(330 / 32) = 11 batches
    assert schedule == [0, 1, 2, 4, 8, 16, 22]
    dpo_like = trl_runs.export_callback(accelerator, None, Path("unused"), schedule)
    dpo_like.on_train_begin(None, SimpleNamespace(max_steps=22), None)
    for step in range(1, 23):
        dpo_like.on_step_end(None, SimpleNamespace(global_step=step), None, model="m")
    assert saved == [1, 2, 4, 8, 16, 22]
    with pytest.raises(RuntimeError, match=r"the trainer runs 21 optimizer steps, but the config's export schedule "
                                           r"\[0, 1, 2, 4, 8, 16, 22\] × 1 ends at 22"):
        dpo_like.on_train_begin(None, SimpleNamespace(max_steps=21), None)
    saved.clear()
    rl_like = trl_runs.export_callback(accelerator, None, Path("unused"), [0, 1, 2, 3], 4)
    rl_like.on_train_begin(None, SimpleNamespace(max_steps=12), None)
    for step in range(1, 13):
        rl_like.on_step_end(None, SimpleNamespace(global_step=step), None, model="m")
    assert saved == [4 // 4, 8 // 4, 12 // 4]


def test_dpo_run_exports_trains_and_is_evaluated(study):
    from transformers import AutoModelForCausalLM

    art = study["art"]
    summary = json.loads((art["dpo[bt]"] / "summary.json").read_text())
    steps = math.ceil(summary["train_pairs"] / 32)  # one epoch of batches of 32 pairs
    assert summary["optimizer_steps"] == steps == study["cfg"].dpo.optimizer_steps(summary["train_pairs"])
    assert summary["exports"] == log_spaced_steps(steps)
    exports = sorted(int(d.name.split("_")[1]) for d in (art["dpo[bt]"] / "exports").iterdir())
    assert exports == log_spaced_steps(steps)
    rows = [json.loads(line) for line in (art["dpo[bt]"] / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps and rows[-1]["rewards/margins"] > 0  # the implicit reward learnt the preferences
    base = AutoModelForCausalLM.from_pretrained(art["sft_policy"] / "model").state_dict()
    first = AutoModelForCausalLM.from_pretrained(art["dpo[bt]"] / "exports" / "step_00000").state_dict()
    last = AutoModelForCausalLM.from_pretrained(art["dpo[bt]"] / "exports" / f"step_{steps:05d}").state_dict()
    assert all(torch.equal(base[k], first[k]) for k in base) and any(not torch.equal(base[k], last[k]) for k in base)
    samples = read_sample_shards(art["dpo_sample[bt]"])
    assert sorted(samples.step.unique()) == exports and (samples[samples.step == 0].kl_k1 == 0).all()
    assert samples[samples.step == steps].kl_k1.mean() > 0
    curve = pd.read_parquet(art["dpo_curve[bt]"] / "curve.parquet")
    assert curve.step.tolist() == exports


def test_report_renders_the_dpo_arm(study):
    report = study["root"] / "report"
    readme = (report / "README.md").read_text()
    assert "## DPO" in readme and "## RL arms compared" in readme
    assert "- **DPO**: the base policy trained by DPO on the proxies' training pairs (noisy labels)" in readme
    assert "no proxy in its loop" in readme
    table = pd.read_csv(report / "dpo_curves.csv")
    assert set(table.run) == {"bt"} and set(table.proxy_name) == {"bt"}
    assert "DPO − PPO against `bt`" in readme
    from pipeline.compare import read_report_dir  # `overopt compare` reads the arm from a report directory

    assert set(read_report_dir(report, "smoke").curves) == {"bon", "ppo", "dpo"}


def test_dpo_stages_and_config_errors(tmp_path):
    """Runs are keyed by the scoring proxy (default the first entry), one per seed; the DPO training stage depends
    on the pairs and the policy only; no dpo section changes nothing; bad keys are named."""
    base = [f"run.cache_root={tmp_path}"]
    cfg = load_config(SMOKE, base + ["dpo={seeds: 2, proxy: grm_sft, num_processes: 1, deepspeed_config: null}"])
    nodes = {n.key: n for n in build_stages(cfg)}
    assert {"dpo[grm_sft]", "dpo[grm_sft@seed1]", "dpo_sample[grm_sft@seed1]", "dpo_curve[grm_sft]"} <= set(nodes)
    assert set(nodes["dpo[grm_sft]"].inputs) == {"pairs", "policy"}
    assert nodes["dpo[grm_sft@seed1]"].config.dpo.seed == 1
    assert nodes["dpo_sample[grm_sft]"].inputs["model"] == "train_proxy[grm_sft]"
    assert nodes["report"].config.rl_runs["dpo"] == {"grm_sft": ["grm_sft", "grm_sft@seed1"]}
    default = load_config(SMOKE, base + ["dpo={num_processes: 1}"])
    assert [n.key for n in build_stages(default) if n.stage == "dpo"] == ["dpo[bt]"]
    from pipeline.plan import plan_study

    plan = {p.key: p for p in plan_study(default)}  # `overopt plan`: 170 pairs, one epoch of 6 steps of 32 pairs
    assert plan["dpo[bt]"].train.sequences == 2 * 6 * 32 and plan["dpo[bt]"].note == "5 exports"
    assert plan["dpo_sample[bt]"].note == "5 exports"
    plain = Runner(build_stages(load_config(SMOKE, base)), ArtifactCache("unused")).fingerprints()
    assert not any(k.startswith("dpo") for k in plain)
    with pytest.raises(ConfigError, match=r"dpo.proxy names \['nope'\]"):
        load_config(SMOKE, base + ["dpo={proxy: nope}"])
    with pytest.raises(ConfigError, match="dpo evaluates on the best-of-n"):
        load_config(SMOKE, base + ["dpo={num_processes: 1}", "bon=null", "ppo=null"])
    with pytest.raises(ConfigError, match=r"dpo.batch_size \(5\) must be divisible by dpo.num_processes \(2\)"):
        load_config(SMOKE, base + ["dpo={batch_size: 5}"])


@pytest.mark.slow
def test_dpo_trains_under_zero2_with_two_processes(study, monkeypatch):
    """The launched path: dpo[bt] under `accelerate launch` with 2 processes and ZeRO-2 (a GPU-less machine runs both
    on the CPU), its exports on the same schedule and its curve through the shared stages."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    root = study["root"]
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}", DPO, "ppo=null",
                 "dpo.num_processes=2", "dpo.deepspeed_config=configs/deepspeed/zero2.json"]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = {p.node.key: p for p in runner.run(until={"dpo_curve[bt]"})}
    art = runner.cache.path("dpo[bt]", plan["dpo[bt]"].fingerprint)
    summary = json.loads((art / "summary.json").read_text())
    steps = math.ceil(summary["train_pairs"] / 32)
    assert (summary["world_size"], summary["zero_stage"], summary["optimizer_steps"]) == (2, 2, steps)
    assert sorted(int(d.name.split("_")[1]) for d in (art / "exports").iterdir()) == log_spaced_steps(steps)
    curve = pd.read_parquet(runner.cache.path("dpo_curve[bt]", plan["dpo_curve[bt]"].fingerprint) / "curve.parquet")
    assert curve.step.tolist() == log_spaced_steps(steps) and curve.gold.notna().all()
