"""Batched sampling from a causal-LM policy, returning records keyed by (prompt index, sample index).

Prompts go through the tokenizer's chat template (`pipeline.tokenization.prompt_ids`), are left-padded, and sampled
with `model.generate`. The response text is decoded once here, from the generated ids, and stored raw.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.config import SamplingConfig
from pipeline.tokenization import Prompt, end_of_turn_ids, pad_rows, pad_token_id, prompt_ids


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS, the model's generation-config EOS ids, and the special tokens
    its chat template closes an assistant turn with (gemma-2b-it's generation config lists only EOS, not
    `<end_of_turn>`)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= end_of_turn_ids(tokenizer)
    extra = getattr(generation_config, "eos_token_id", None)
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError(f"no end-of-turn token for {getattr(tokenizer, 'name_or_path', '')!r}")
    return sorted(ids)


def finish_response(token_ids: Sequence[int], stop_ids: Sequence[int], tokenizer, stopped: bool = False) -> dict:
    """One sampled continuation as a record: cut at the first stop token (excluded), decoded once, raw text kept.
    `stopped`: the backend reports a stop whose token it did not return (vLLM)."""
    token_ids = list(token_ids)
    cut = next((i for i, t in enumerate(token_ids) if t in stop_ids), None)
    kept = token_ids if cut is None else token_ids[:cut]
    return {"response": tokenizer.decode(kept, skip_special_tokens=True).strip(), "n_tokens": len(kept),
            "finished": cut is not None or stopped, "token_ids": kept,
            "stop_id": token_ids[cut] if cut is not None else None}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows padded on the left, so every row's next token is at the same
    position."""
    ids, attn = pad_rows(rows, pad_id, padding_side="left")
    return torch.from_numpy(ids), torch.from_numpy(attn)


@torch.no_grad()
def generate_ids(model, prompt_rows: Sequence[Sequence[int]], sampling: SamplingConfig, pad_id: int,
                 stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one continuation of each prompt (token ids): returns the left-padded prompts, their attention mask and
    the generated tokens (B, ≤ max_new_tokens; after a stop token, `pad_id`)."""
    device = next(model.parameters()).device
    ids, attn = left_pad(prompt_rows, pad_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                         temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                         max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=list(stop_ids))
    return ids, attn, out[:, ids.shape[1]:].cpu()


def seed_sampling(seed: int) -> None:
    """Seed the global RNG `generate` draws from (from a derived seed, so sampling seed s does not replay the
    stream of a model initialised with seed s)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[Prompt], n_per_prompt: int, sampling: SamplingConfig,
                     seed: int, progress: bool = False) -> list[dict]:
    """`n_per_prompt` samples for each prompt: dicts with prompt_index, sample_idx, response, n_tokens, finished and
    token_ids (the response's ids before the token that ended the turn) and stop_id (that token, or None)."""
    from tqdm.auto import tqdm

    model.eval()
    pad_id, stop_ids = pad_token_id(tokenizer), stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    jobs = [(i, j) for i, _ in enumerate(prompts) for j in range(n_per_prompt)]
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    seed_sampling(seed)
    rows = []
    for s in tqdm(range(0, len(jobs), sampling.batch_size), desc="sampling", disable=not progress, leave=False):
        batch = jobs[s:s + sampling.batch_size]
        _, _, generated = generate_ids(model, [encoded[i] for i, _ in batch], sampling, pad_id, stop_ids)
        for r, (i, j) in enumerate(batch):
            rows.append({"prompt_index": i, "sample_idx": j,
                         **finish_response(generated[r].tolist(), stop_ids, tokenizer)})
    return rows
