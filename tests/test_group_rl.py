"""The TRL arm (GRPO, RLOO): the reward-function adapter gives the scorer's rewards, exports follow PPO's update
schedule, and a short GRPO run trains under ZeRO-2 with 2 processes and feeds the shared RL evaluation stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.generation import stop_token_ids
from pipeline.models import load_tokenizer
from pipeline.records import messages, read_sample_shards
from pipeline.runner import Runner
from pipeline.scoring import NonFiniteScoreError, TRLRewardFunction, build_scorer
from pipeline.study import _sample_scorer, build_stages

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
RL = "rl={algos: [grpo, rloo], proxies: [bt], steps: 3, prompts_per_step: 4, group_size: 4, minibatches: 2, " \
     "num_iterations: 2, num_processes: 1, deepspeed_config: null, eval: {n_samples: 4, bootstrap: 20}}"


@pytest.fixture(autouse=True)
def _two_ranks_fit(monkeypatch):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke study with GRPO and RLOO (inline, one process) against `bt`, run to its report."""
    root = tmp_path_factory.mktemp("rl_study")
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}", RL]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = runner.run()
    return {"cfg": cfg, "root": root, "overrides": overrides,
            "art": {p.node.key: runner.cache.path(p.node.key, p.fingerprint) for p in plan}}


def test_reward_function_gives_the_scorers_rewards(study):
    cfg, art = study["cfg"], study["art"]
    tokenizer = load_tokenizer(art["sft_policy"] / "model")
    scorer = build_scorer(_sample_scorer(cfg, cfg.proxies[0]), {"model": art["train_proxy[bt]"]})
    samples = read_sample_shards(art["bon_sample"]).head(24)
    prompts, texts = [messages(p) for p in samples.prompt], list(samples.response)
    stops = stop_token_ids(tokenizer)
    # TRL hands over conversational completions and completion ids that end with the stop token when the turn ended
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + ([stops[0]] if done else [])
           for t, done in zip(texts, samples.finished)]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    reward = TRLRewardFunction(scorer, "bt", tokenizer, stops)
    got = reward(prompts=prompts, completions=completions, completion_ids=ids, prompt_id=list(samples.prompt_id))
    assert reward.__name__ == "bt" and len(got) == len(texts)
    assert np.allclose(got, scorer.score(prompts, texts), atol=1e-6)

    broken = TRLRewardFunction(type("Nan", (), {"score": lambda self, p, r: np.full(len(r), np.nan)})(), "nan",
                               tokenizer, stops)
    with pytest.raises(NonFiniteScoreError, match="scorer 'nan' returned a non-finite score"):
        broken(prompts=prompts, completions=completions, completion_ids=ids, prompt_id=list(samples.prompt_id))


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_exports_follow_the_update_schedule(study, algo):
    from transformers import AutoModelForCausalLM

    art, rl = study["art"], study["cfg"].rl
    exports = sorted(int(d.name.split("_")[1]) for d in (art[f"{algo}[bt]"] / "exports").iterdir())
    assert exports == rl.export_steps() == [0, 1, 2, 3]
    records = [json.loads(line) for line in (art[f"{algo}[bt]"] / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == rl.steps * rl.num_iterations * rl.minibatches  # TRL logs every optimizer step
    base = AutoModelForCausalLM.from_pretrained(art["sft_policy"] / "model").state_dict()
    first = AutoModelForCausalLM.from_pretrained(art[f"{algo}[bt]"] / "exports" / "step_00000").state_dict()
    last = AutoModelForCausalLM.from_pretrained(art[f"{algo}[bt]"] / "exports" / "step_00003").state_dict()
    assert all(torch.equal(base[k], first[k]) for k in base) and any(not torch.equal(base[k], last[k]) for k in base)
    samples = read_sample_shards(art[f"{algo}_sample[bt]"])
    assert sorted(samples.step.unique()) == [0, 1, 2, 3] and (samples[samples.step == 0].kl_k1 == 0).all()
    table = pd.read_csv(study["root"] / "report" / f"{algo}_curves.csv")
    assert table.step.tolist() == [0, 1, 2, 3] and set(table.run) == {"bt"}


def test_report_compares_the_arms(study):
    readme = (study["root"] / "report" / "README.md").read_text()
    for heading in ("## PPO", "## GRPO", "## RLOO", "## RL arms compared"):
        assert heading in readme
    assert (study["root"] / "report" / "arms_bt.png").stat().st_size > 1000


@pytest.mark.slow
def test_grpo_trains_under_zero2_with_two_processes(study):
    overrides = study["overrides"] + ["rl.algos=[grpo]", "rl.num_processes=2",
                                      "rl.deepspeed_config=configs/deepspeed/zero2.json"]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = {p.node.key: p for p in runner.run(until={"grpo_curve[bt]"})}
    art = runner.cache.path("grpo[bt]", plan["grpo[bt]"].fingerprint)
    summary = json.loads((art / "summary.json").read_text())
    assert (summary["world_size"], summary["zero_stage"], summary["algo"]) == (2, 2, "grpo")
    assert sorted(int(d.name.split("_")[1]) for d in (art / "exports").iterdir()) == [0, 1, 2, 3]
    curve = pd.read_parquet(runner.cache.path("grpo_curve[bt]", plan["grpo_curve[bt]"].fingerprint) / "curve.parquet")
    assert curve.step.tolist() == [0, 1, 2, 3] and np.isfinite(curve.gold).all()


def test_the_arms_study_reuses_every_stage_of_the_demo():
    """configs/tiny_rl_algos.yaml repeats tiny.yaml and adds seeds and the rl section: every demo stage but the
    report has the same fingerprint there, so running it after `make demo` recomputes none of them."""
    from pipeline.runner import Runner

    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = Runner(build_stages(load_config(configs / "tiny.yaml")), ArtifactCache("unused")).fingerprints()
    arms = Runner(build_stages(load_config(configs / "tiny_rl_algos.yaml")), ArtifactCache("unused")).fingerprints()
    assert [k for k in demo if demo[k] != arms.get(k)] == ["report"]
    assert {"grpo[bt@seed2]", "rloo[grm_sft@seed1]", "ppo[grm_sft@seed2]"} <= set(arms)
