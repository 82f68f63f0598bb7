"""A test-only stage: a few PPO updates on one fixed synthetic rollout batch, in one process or split over ranks.

Every rank builds the same seeded tiny policy, value model and batch, keeps its share of the batch, and runs the
project's own update pieces (`pipeline.ppo.update`, `pipeline.ppo.core`) with whitening and loss normalisation over
all ranks. The per-update losses (means over ranks) must not depend on how the batch is split, nor on ZeRO.
Rank 0 writes losses.json.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from pipeline.config import PPOConfig, Section
from pipeline.distributed import all_reduce_sum, make_accelerator
from pipeline.ppo import core
from pipeline.ppo.models import PolicyAndValue, ValueModel
from pipeline.ppo.update import ppo_epochs, rollout_logprobs_values

VERSION = "1"
BATCH, Q, T, VOCAB = 8, 5, 6, 32


class EquivalenceConfig(Section):
    updates: int = 3
    seed: int = 0


def synthetic_rollout(seed: int):
    """Left-padded queries, responses ending at varied positions (then padding), and sequence scores."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(3, VOCAB, (BATCH, Q), generator=g)
    query_mask = torch.ones(BATCH, Q, dtype=torch.long)
    query_mask[::3, :2] = 0
    queries[query_mask == 0] = 0
    responses = torch.randint(3, VOCAB, (BATCH, T), generator=g)
    ends = torch.randint(1, T + 1, (BATCH,), generator=g)
    mask = (torch.arange(T)[None, :] < ends[:, None]).long()
    responses[mask == 0] = 0
    scores = torch.randn(BATCH, generator=g)
    return torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1), responses, mask.float(), scores


def run(cfg: EquivalenceConfig, inputs: dict[str, Path], out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    ppo = PPOConfig(num_processes=1, rollout_batch_size=BATCH, num_minibatches=1, ppo_epochs=2, lr=1e-2,
                    max_grad_norm=1.0, kl_coef=0.05)
    local = BATCH // int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = make_accelerator(gradient_clipping=ppo.max_grad_norm, micro_batch_size=local)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, pad_token_id=0)
    policy = LlamaForCausalLM(config)
    ref_policy = copy.deepcopy(policy).eval()
    model = PolicyAndValue(policy, ValueModel(LlamaModel(config))).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ppo.lr, eps=1e-5, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    all_reduce = all_reduce_sum(accelerator)
    use_deepspeed = hasattr(model, "save_checkpoint")

    ids, attn, responses, mask, scores = synthetic_rollout(cfg.seed + 1)
    mine = slice(rank * local, (rank + 1) * local)
    ids, attn, responses, mask, scores = (x[mine].to(accelerator.device) for x in (ids, attn, responses, mask, scores))
    history = []
    for update in range(cfg.updates):
        logprobs, ref_logprobs, values = rollout_logprobs_values(model, ref_policy, ids, attn, responses, Q, 1.0,
                                                                 chunk=local)
        kl = core.kl_per_token(logprobs, ref_logprobs) * mask
        rewards = core.token_rewards(scores, kl, mask, ppo.kl_coef)
        advantages, returns = core.gae(rewards, values, mask, ppo.gamma, ppo.lam)
        advantages = core.masked_whiten(advantages, mask, all_reduce)
        stats = ppo_epochs(model, optimizer, accelerator, ids, attn, responses, mask, logprobs, values, advantages,
                           returns, Q, ppo, torch.Generator().manual_seed(update), all_reduce,
                           clip_grad=not use_deepspeed)
        means = all_reduce(torch.tensor([stats["policy_loss"], stats["value_loss"]], dtype=torch.float64)) / world
        history.append({"policy_loss": float(means[0]), "value_loss": float(means[1]),
                        "kl": float(all_reduce(kl.sum().double()))})
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps({"world_size": world, "deepspeed": use_deepspeed,
                                                     "history": history}))
    accelerator.wait_for_everyone()
