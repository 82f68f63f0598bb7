"""The two model-facing steps of a PPO update: log-probs and values of a rollout (no grad), and the optimisation
epochs over minibatches. Both run on every rank; everything global goes through `all_reduce`."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.ppo import core
from pipeline.ppo.models import position_ids, response_logprobs


@torch.no_grad()
def rollout_logprobs_values(model, ref_policy, ids: torch.Tensor, attn: torch.Tensor, responses: torch.Tensor,
                            context_length: int, temperature: float, chunk: int,
                            disable_adapter=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs under the policy, under the reference, values) of each response position, in chunks of `chunk`
    sequences. The reference is `ref_policy` (a plain causal LM), or — with LoRA — the trained policy itself with its
    adapters switched off by the `disable_adapter` context."""
    Q, T = context_length, responses.shape[1]
    logprobs, ref_logprobs, values = [], [], []
    for s in range(0, ids.shape[0], chunk):
        sl = slice(s, s + chunk)
        logits, v = model(ids[sl], attn[sl])
        logprobs.append(response_logprobs(logits, responses[sl], Q, temperature))
        values.append(v[:, Q - 1:Q - 1 + T].float())
        if ref_policy is None:
            with disable_adapter() if disable_adapter is not None else nullcontext():
                ref_logits, _ = model(ids[sl], attn[sl])
        else:
            ref_logits = ref_policy(input_ids=ids[sl], attention_mask=attn[sl], position_ids=position_ids(attn[sl]),
                                    use_cache=False).logits
        ref_logprobs.append(response_logprobs(ref_logits, responses[sl], Q, temperature))
    return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)


def ppo_epochs(model, optimizer, accelerator, ids: torch.Tensor, attn: torch.Tensor, responses: torch.Tensor,
               mask: torch.Tensor, old_logprobs: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, context_length: int, ppo, generator: torch.Generator, all_reduce,
               clip_grad: bool) -> dict[str, float]:
    """`ppo.ppo_epochs` passes over `ppo.num_minibatches` shuffled minibatches of this rank's rollout, one optimizer
    step each. The shuffle comes from `generator` (seeded per update: the same on every rank, and on a resumed run).
    `clip_grad`: clip here (plain PyTorch); DeepSpeed clips inside its own step. Returns per-rank mean statistics."""
    Q, T = context_length, responses.shape[1]
    n = ids.shape[0]
    size = n // ppo.num_minibatches
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                     "value_clip_fraction", "approx_kl", "entropy")}
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(ids.device)
        for s in range(0, n, size):
            mb = order[s:s + size]
            logits, v = model(ids[mb], attn[mb])
            new_logprobs = response_logprobs(logits, responses[mb], Q, ppo.sampling.temperature)
            parts = core.ppo_losses(new_logprobs, old_logprobs[mb], advantages[mb], v[:, Q - 1:Q - 1 + T].float(),
                                    old_values[mb], returns[mb], mask[mb], ppo.cliprange, ppo.cliprange_value,
                                    ppo.vf_coef, all_reduce(mask[mb].sum().detach()), accelerator.num_processes)
            accelerator.backward(parts.loss)
            if clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), ppo.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                entropy = core.entropy_from_logits(logits[:, Q - 1:Q - 1 + T])
                stats["entropy"].append(float(core.masked_mean(entropy, mask[mb])))
            for k in ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"):
                stats[k].append(float(getattr(parts, k).detach()))
    return {k: sum(v) / len(v) for k, v in stats.items()}
