"""train_proxy[p] on several processes: the HF Trainer under `accelerate launch` with DeepSpeed ZeRO-2/3.

One process (inline, today's path) and two ranks under ZeRO-2 train the same optimisation problem: each rank takes
half of every batch of the same seeded permutation, so the per-step losses agree within LOSS_TOL. They are not
bit-identical: each rank pads its half-batch to its own longest sequence (other matmul shapes, other float rounding),
the loss is a mean of two half-batch means rather than one mean, and DeepSpeed sums the ranks' gradients in its own
order (reduce-scatter into fp32 partitions) before AdamW steps each partition. Dropout would differ too (each rank draws
masks for its own rows), so these proxies train without it. Observed here: per-step losses within 6e-6 (ZeRO-2, full
fine-tuning) and 1e-7 (ZeRO-3, LoRA).

The trained models' rewards agree up to a common offset. The BT loss depends on r_c - r_r only, so the gradient of the
reward head's output bias is zero up to rounding, and Adam, which divides by the root of the gradient's second moment,
turns that noise into steps of up to ~lr: the bias drifts by at most steps × lr, differently for each reduction order
(observed 3e-4), while the centred rewards agree within 4e-5.

The base model and pairs are made here, tiny (a 2-layer Llama over the tiny world's tokenizer, 64 training pairs):
each launch costs mostly its start-up (torch, transformers and DeepSpeed imports on 2 CPU ranks, gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache import ArtifactCache
from pipeline.config import (
    BaseModelRef,
    ConfigError,
    LoraConfig,
    ProxyConfig,
    RMTrainingConfig,
    TrainProxyStageConfig,
    load_config,
)
from pipeline.records import PAIR_COLUMNS, messages, write_records
from pipeline.reward_model import GRMRewardModel
from pipeline.runner import Runner, StageNode, launch_stage
from pipeline.scoring import ModelScorer, grm_rewards_fn
from pipeline.study import build_stages
from stages import train_proxy

ROOT = Path(__file__).resolve().parents[1]
ZERO2, ZERO3 = Path("configs/deepspeed/zero2.json"), Path("configs/deepspeed/zero3.json")
N_TRAIN, BATCH = 64, 16  # 4 optimizer steps an epoch, 8 in all; 8 pairs per rank per step on 2 ranks
LR = 1e-3
LOSS_TOL = 1e-4  # per-step loss, absolute (losses are ~0.7; the observed gap is far smaller, see the docstring)
SCORE_TOL = 2e-4  # centred rewards of the trained models (their spread is ~0.05-0.3)
OFFSET_TOL = 2 * N_TRAIN // BATCH * LR  # the head's bias, unconstrained by the loss: at most ~lr per Adam step


@pytest.fixture(autouse=True)
def _two_ranks_fit(monkeypatch):
    """Two ranks need two GPUs; with fewer, run both on CPU (DeepSpeed's CPU accelerator) instead of failing."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A `policy` artifact (a tiny random Llama with the tiny world's chat tokenizer) and a `pairs` artifact of
    N_TRAIN training pairs of word strings, the chosen side the longer one (something a proxy can learn)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import world

    root = tmp_path_factory.mktemp("proxy_zero")
    tok = world.build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "policy" / "model")
    tok.save_pretrained(root / "policy" / "model")
    words = [w for w in world.vocabulary() if not w.startswith("<")]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_TRAIN + 8):
        text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
        long, short = text(int(rng.integers(6, 12))), text(int(rng.integers(1, 5)))
        rows.append({"pair_id": i, "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": text(4)}],
                     "chosen": long, "rejected": short, "gold_chosen": 1.0, "gold_rejected": 0.0,
                     "label_clean": 1, "label_noisy": 1, "split": "train" if i < N_TRAIN else "test"})
    (root / "pairs").mkdir()
    write_records(pd.DataFrame(rows), root / "pairs" / "pairs.parquet", PAIR_COLUMNS)
    return {"pairs": root / "pairs", "policy": root / "policy"}


def stage_config(**training) -> TrainProxyStageConfig:
    tr = dict(epochs=2, batch_size=BATCH, max_length=48, lr=LR, logging_steps=1) | training
    return TrainProxyStageConfig(proxy=ProxyConfig(name="bt", type="bt", head_width=16, head_dropout=0.0),
                                 training=RMTrainingConfig(**tr), base=BaseModelRef())


def run_inline(inputs, out: Path, cfg: TrainProxyStageConfig) -> Path:
    out.mkdir()
    train_proxy.run(cfg, inputs, out)
    return out


def run_launched(inputs, out: Path, cfg: TrainProxyStageConfig, deepspeed_config: Path) -> Path:
    """train_proxy as the runner launches it: 2 ranks under `accelerate launch` + DeepSpeed."""
    out.mkdir()
    node = StageNode("train_proxy[bt]", "train_proxy", cfg, launcher="accelerate", num_processes=2,
                     deepspeed_config=deepspeed_config)
    launch_stage(node, inputs, out, scratch_root=out.parent / f"{out.name}.launch")
    return out


def losses(art: Path) -> list[float]:
    return [h["loss"] for h in json.loads((art / "train_log.json").read_text())]


def saved_shapes(art: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted((art / "model").glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    return shapes


def assert_same_rewards(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to a common offset (no larger than OFFSET_TOL), within SCORE_TOL."""
    assert abs(float(a.mean() - b.mean())) < OFFSET_TOL
    np.testing.assert_allclose(a - a.mean(), b - b.mean(), rtol=0, atol=SCORE_TOL)


def rescore(art: Path, inputs) -> np.ndarray:
    """The saved model, loaded strictly as every downstream stage loads it, scoring the training pairs' chosen side."""
    from pipeline.models import load_tokenizer
    from pipeline.records import read_records

    model = GRMRewardModel.from_pretrained(art / "model")
    pairs = read_records(inputs["pairs"] / "pairs.parquet", PAIR_COLUMNS)
    scorer = ModelScorer(grm_rewards_fn(model), model, load_tokenizer(art / "model"), max_length=48)
    return scorer.score([messages(p) for p in pairs.prompt], list(pairs.chosen))


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    return run_inline(inputs, tmp_path_factory.mktemp("one") / "out", stage_config())


@pytest.mark.slow
def test_zero2_two_ranks_train_what_one_process_trains(inputs, one_process, tmp_path):
    two = run_launched(inputs, tmp_path / "zero2", stage_config(), ZERO2)
    one_losses, two_losses = losses(one_process), losses(two)
    assert len(one_losses) == len(two_losses) == 2 * N_TRAIN // BATCH  # one logged loss per optimizer step
    np.testing.assert_allclose(two_losses, one_losses, rtol=0, atol=LOSS_TOL)
    assert one_losses[-1] < one_losses[0] - 0.01  # it learned something: the comparison is not of two constants
    metrics = json.loads((two / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["per_device_batch_size"], metrics["zero_stage"]) == (2, BATCH // 2, 2)
    assert metrics["steps"] == json.loads((one_process / "metrics.json").read_text())["steps"]
    # the saved model loads strictly and scores as the one-process model does
    scores_two = rescore(two, inputs)
    assert_same_rewards(scores_two, rescore(one_process, inputs))
    # rank 0 wrote the statistics of the training responses' rewards, as one process does
    stats_one = json.loads((one_process / "reference_stats.json").read_text())
    stats_two = json.loads((two / "reference_stats.json").read_text())
    assert stats_two["n"] == stats_one["n"] == 2 * N_TRAIN
    assert stats_two["std"] == pytest.approx(stats_one["std"], abs=SCORE_TOL)
    assert stats_two["mean"] == pytest.approx(stats_one["mean"], abs=OFFSET_TOL)
    assert metrics["train_accuracy"] == json.loads((one_process / "metrics.json").read_text())["train_accuracy"]


@pytest.mark.slow
def test_zero3_saves_the_whole_model(inputs, one_process, tmp_path):
    """Under ZeRO-3 each rank holds a shard of every parameter; the saved model is gathered whole (LoRA merged), the
    same tensors and shapes as one process's, and trains to the same losses."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    three = run_launched(inputs, tmp_path / "zero3", stage_config(lora=lora), ZERO3)
    one_lora = run_inline(inputs, tmp_path / "one_lora", stage_config(lora=lora))
    assert saved_shapes(three) == saved_shapes(one_process) == saved_shapes(one_lora)
    assert all(0 not in shape for shape in saved_shapes(three).values())  # no empty ZeRO-3 placeholder saved
    np.testing.assert_allclose(losses(three), losses(one_lora), rtol=0, atol=LOSS_TOL)
    assert_same_rewards(rescore(three, inputs), rescore(one_lora, inputs))
    assert json.loads((three / "metrics.json").read_text())["zero_stage"] == 3


@pytest.mark.slow
def test_bf16_zero2_trains_and_saves_a_loadable_model(inputs, one_process, tmp_path):
    """The paper's precision: configs/deepspeed/zero2_bf16.json, whose engine casts every parameter (the reward head
    too) to bf16 while it keeps fp32 master weights. The Trainer is told bf16 (it checks against the config); the
    losses follow the fp32 run's within bf16's precision (8 significant bits: ~4e-3 of a loss of ~0.6)."""
    bf16 = run_launched(inputs, tmp_path / "bf16", stage_config(), Path("configs/deepspeed/zero2_bf16.json"))
    bf16_losses = losses(bf16)
    np.testing.assert_allclose(bf16_losses, losses(one_process), rtol=0, atol=1e-2)
    assert bf16_losses[-1] < bf16_losses[0] - 0.005  # it trained: not a run stuck at its first loss
    metrics = json.loads((bf16 / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["zero_stage"], metrics["mixed_precision"]) == (2, 2, "bf16")
    # the saved model ranks the pairs as the fp32 one-process model does (an untrained head would not)
    scores, fp32 = rescore(bf16, inputs), rescore(one_process, inputs)
    assert np.isfinite(scores).all() and np.corrcoef(scores, fp32)[0, 1] > 0.99


# ---------------------------------------------------------------------------------------------------- configuration

SMOKE = ROOT / "configs" / "smoke.yaml"
# train_proxy fingerprints of configs/tiny.yaml at commit 5189c14, before train_proxy could launch: the committed
# reports/tiny is built on them, so a change here recomputes every proxy of the demo (and what it feeds).
TINY_TRAIN_PROXY = {
    "train_proxy[bt]": "c72a2d8f505d02d2", "train_proxy[grm_sft]": "25a888b1b3f8fc0d",
    "train_proxy[label_smoothing]": "f3966e0faf0badb3", "train_proxy[ensemble-m0]": "a2e3217c34da2e63",
    "train_proxy[ensemble@seed2-m2]": "610068f8017ab7d7",
}


def fingerprints(cfg) -> dict[str, str]:
    return Runner(build_stages(cfg), ArtifactCache("unused")).fingerprints()


def test_existing_fingerprints_are_unchanged_and_the_launch_counts_only_when_set():
    tiny = fingerprints(load_config(ROOT / "configs" / "tiny.yaml"))
    assert {k: tiny[k] for k in TINY_TRAIN_PROXY} == TINY_TRAIN_PROXY
    # saying what is already so (one process, no DeepSpeed, a log interval) changes nothing
    same = ["proxy_training.num_processes=1", "proxy_training.logging_steps=1"]
    assert fingerprints(load_config(ROOT / "configs" / "tiny.yaml", same)) == tiny
    base = fingerprints(load_config(SMOKE))
    zero = load_config(SMOKE, ["proxy_training.num_processes=2", f"proxy_training.deepspeed_config={ZERO2}"])
    nodes = {n.key: n for n in build_stages(zero)}
    assert (nodes["train_proxy[bt]"].launcher, nodes["train_proxy[bt]"].num_processes) == ("accelerate", 2)
    assert nodes["train_proxy[bt]"].deepspeed_config == ZERO2
    changed = fingerprints(zero)
    assert changed["train_proxy[bt]"] != base["train_proxy[bt]"]  # 2 ranks are not bit-identical to one process
    assert changed["gold_label"] == base["gold_label"] and changed["bon_sample"] == base["bon_sample"]
    # the launch section (data-parallel sampling and scoring) leaves proxies in one process: their training depends on
    # their rank count, so speeding sampling up must not retrain them; proxy_training's own keys set their launch
    from_launch = load_config(SMOKE, ["launch.num_processes=2", f"launch.deepspeed_config={ZERO3}"])
    assert from_launch.proxy_launch() == (1, None, 1)
    assert fingerprints(from_launch)["train_proxy[bt]"] == base["train_proxy[bt]"]
    own = load_config(SMOKE, ["launch.num_processes=2", "proxy_training.num_processes=4"])
    assert own.proxy_launch() == (4, None, 1)


def test_a_batch_the_ranks_cannot_share_is_refused_naming_the_key(inputs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"proxy_training.batch_size \(32\) must be divisible by "
                                          r"proxy_training.num_processes \(3\)"):
        load_config(SMOKE, ["proxy_training.num_processes=3"])
    load_config(SMOKE, ["launch.num_processes=3"])  # the launch section does not split proxy batches
    with pytest.raises(ConfigError, match=r"proxies.bt.training.batch_size \(6\) must be divisible by "
                                          r"proxy_training.num_processes \(4\)"):
        load_config(SMOKE, ["proxy_training.num_processes=4", "proxies.bt.training={batch_size: 6}"])
    with pytest.raises(ConfigError, match=r"proxy_training.batch_size \(32\) must be divisible by the world size, "
                                          r"proxy_training.num_processes \(4\) × launch.num_machines \(3\) = 12"):
        load_config(SMOKE, ["proxy_training.num_processes=4", "launch.num_machines=3"])
    # a launch whose world size does not divide the batch fails in the stage too, before any work
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(train_proxy, "load_tokenizer", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match=r"proxy_training.batch_size \(16\) must be divisible by the number of "
                                         r"processes \(3\)"):
        train_proxy.run(stage_config(), inputs, tmp_path)


def test_plan_shows_train_proxys_launch_and_deepspeeds_estimate(tmp_path, monkeypatch):
    """`overopt plan`: a train_proxy row says its launch, and under ZeRO-2 without offload DeepSpeed's formula for the
    proxy's trained parameters (2 bytes/param of 16-bit weights on every rank, 18 bytes/param of gradients, fp32
    master weights and Adam states partitioned over the ranks), from a real local checkpoint's config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.plan import format_bytes, plan_study

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "policy")
    n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    paper = ROOT / "configs" / "paper" / "gemma2b_unified_feedback.yaml"
    base = [f"policy.model_id={tmp_path / 'policy'}", f"run.cache_root={tmp_path}/cache"]
    cfg = load_config(paper, base + ["proxy_training.num_processes=4", f"proxy_training.deepspeed_config={ZERO2}",
                                     "proxy_training.lora=null"])
    row = {p.key: p for p in plan_study(cfg)}["train_proxy[bt]"]
    assert (row.launch, row.processes) == ("accelerate + ZeRO-2", 4)
    assert row.memory.startswith(f"{format_bytes(2 * n + int(18 * n / 4))} device"), row.memory
    assert row.memory.endswith(f"for {n / 1e3:.3g}K trained params; frozen weights 0 B"), row.memory
    assert row.note == "2 pairs per rank per micro-step"  # the paper's global micro-batch of 8 over 4 ranks
    row = {p.key: p for p in plan_study(load_config(paper, base))}["train_proxy[bt]"]  # the paper config as it is
    assert (row.launch, row.processes, row.note) == ("accelerate + ZeRO-2", 8, "1 pair per rank per micro-step")
    # in one process there is no DeepSpeed and no estimate
    one = base + ["proxy_training.num_processes=1", "proxy_training.deepspeed_config=null"]
    row = {p.key: p for p in plan_study(load_config(paper, one))}["train_proxy[bt]"]
    assert (row.launch, row.processes, row.memory) == ("inline", 1, "—")


def test_every_trainer_takes_its_precision_from_the_launch():
    """train_proxy, DPO and GRPO/RLOO hand the Trainer the bf16/fp16 flags accelerate was launched with (from the
    DeepSpeed config), which the Trainer checks its own against: one helper for all three."""
    from types import SimpleNamespace

    from pipeline.distributed import trainer_precision

    assert trainer_precision(SimpleNamespace(mixed_precision="bf16")) == {"bf16": True, "fp16": False}
    assert trainer_precision(SimpleNamespace(mixed_precision="fp16")) == {"bf16": False, "fp16": True}
    assert trainer_precision(SimpleNamespace(mixed_precision="no")) == trainer_precision(None) == {"bf16": False,
                                                                                                  "fp16": False}
