"""`overopt plan`: per-stage workload and DeepSpeed's model-state estimate, before anything runs, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.plan import format_bytes, plan_study

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "configs" / "paper" / "gemma2b_unified_feedback.yaml"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: hub configs are not on this machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_tiny_plan_counts_what_the_config_fixes(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.cache_root={tmp_path}/cache"])
    plan = {p.key: p for p in plan_study(cfg)}
    # 320 in-distribution prompts (2 openers × 4 verbs × 5 k × 8 categories), 0.2 of them capped at 64 held out
    assert plan["bon_sample"].generate.sequences == 64 * 512
    assert plan["bon_sample"].generate.tokens == 64 * 512 * 16
    assert plan["bon_score[gold]"].score.sequences == 64 * 512
    # PPO: 64 updates × 64 rollouts, 4 epochs over each; 8 exports (0, 1, 2, 4, ..., 64) × 64 prompts × 32 samples
    assert plan["ppo[bt]"].generate.sequences == 64 * 64
    assert plan["ppo[bt]"].train.sequences == 64 * 64 * 4
    assert plan["ppo[bt]"].processes == 2 and plan["ppo[bt]"].launch == "accelerate + ZeRO-2"
    assert plan["ppo_sample[bt]"].generate.sequences == 8 * 64 * 32
    assert plan["ppo_gold[bt]"].score.sequences == 8 * 64 * 32
    # gold_score: 256 training prompts × 8 samples, every same-prompt pair (28 each) + 600 OOD pairs, both sides
    assert plan["gold_score"].generate.sequences == 256 * 8
    assert plan["gold_score"].score.sequences == 2 * (256 * 28 + 600)
    assert "device" in plan["ppo[bt]"].memory
    assert not (tmp_path / "cache").exists(), "plan must not create the cache"


def _local_policy(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    policy_dir = tmp_path / "policy"
    LlamaForCausalLM(config).save_pretrained(policy_dir)
    return policy_dir, sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_zero2_estimate_matches_deepspeeds_formula_for_a_local_policy(tmp_path, offline):
    """ZeRO-2 without offload (DeepSpeed's formula: 2 bytes/param of 16-bit weights on every rank, and 18 bytes/param
    of gradients, fp32 master weights and Adam states partitioned over the ranks), for the policy plus PPO's value
    model, counted from a real local checkpoint's config."""
    policy_dir, n_policy = _local_policy(tmp_path)
    cfg = load_config(PAPER, [f"policy.model_id={policy_dir}", f"run.cache_root={tmp_path}/cache",
                              "ppo.deepspeed_config=configs/deepspeed/zero2.json", "ppo.num_processes=4",
                              "ppo.lora=null"])
    ppo = next(p for p in plan_study(cfg) if p.key.startswith("ppo["))
    trained = 2 * n_policy  # policy + value model (counted as a second policy, as plan does)
    assert ppo.memory.startswith(f"{format_bytes(2 * trained + int(18 * trained / 4))} device"), ppo.memory
    assert f"{trained / 1e3:.3g}K trained params" in ppo.memory
    # frozen on every rank: the reference policy (bf16) and the proxy (counted as the base policy, bf16)
    assert ppo.memory.endswith(f"frozen weights {format_bytes(2 * n_policy + 2 * n_policy)}"), ppo.memory


def test_lora_trains_only_the_adapters_and_the_value_model(tmp_path, offline):
    """The paper's LoRA policy (r 32 on q, k, v, o: 4 linears of 32 → 32 per layer, 2 layers): adapters r·(in + out)
    each, by hand, plus the value model; the frozen base weights are partitioned under ZeRO-3."""
    policy_dir, n_policy = _local_policy(tmp_path)
    cfg = load_config(PAPER, [f"policy.model_id={policy_dir}", f"run.cache_root={tmp_path}/cache"])
    ppo = next(p for p in plan_study(cfg) if p.key.startswith("ppo["))
    adapters = 2 * 4 * 32 * (32 + 32)
    assert f"{(adapters + n_policy) / 1e3:.3g}K trained params" in ppo.memory, ppo.memory
    # ZeRO-3 partitions the frozen bf16 base over the 8 ranks; ZeRO-2 keeps it whole on each: 7/8 of it more
    zero2 = load_config(PAPER, [f"policy.model_id={policy_dir}", f"run.cache_root={tmp_path}/cache",
                                "ppo.deepspeed_config=configs/deepspeed/zero2_bf16.json"])
    ppo2 = next(p for p in plan_study(zero2) if p.key.startswith("ppo["))
    assert cfg.ppo.num_processes == 8 and cfg.policy.dtype == "bfloat16"
    assert frozen_bytes(ppo2.memory) - frozen_bytes(ppo.memory) == pytest.approx(2 * n_policy * 7 / 8, rel=0.01)


def frozen_bytes(memory: str) -> float:
    """The `frozen weights` figure of a plan's memory text, in bytes (3 significant digits)."""
    value, unit = memory.rsplit("frozen weights ", 1)[1].split()
    return float(value) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]


def test_paper_plan_prints_offline_and_says_what_it_cannot_estimate(capsys, offline):
    assert main(["plan", str(PAPER)]) == 0
    out = capsys.readouterr().out
    assert "bon_sample" in out and "ppo_sample[bt]" in out
    assert "not on this machine" in out  # gemma-2b-it's config is not here: said, never a crash
    cfg = load_config(PAPER)
    plan = {p.key: p for p in plan_study(cfg)}
    assert plan["bon_sample"].generate.sequences == cfg.bon.n_prompts * cfg.bon.n_samples
