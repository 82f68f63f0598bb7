"""Batched sampling from a causal-LM policy, returning records keyed by (prompt index, sample index).

Prompts go through the tokenizer's chat template (`pipeline.tokenization.prompt_ids`), are left-padded, and sampled
with `model.generate`. The response text is decoded once here, from the generated ids, and stored raw.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.config import SamplingConfig
from pipeline.tokenization import Prompt, end_of_turn_ids, pad_token_id, prompt_ids


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
            "finished": cut is not None or stopped}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[Prompt], n_per_prompt: int, sampling: SamplingConfig,
                     seed: int, progress: bool = False) -> list[dict]:
    """`n_per_prompt` samples for each prompt: dicts with prompt_index, sample_idx, response, n_tokens, finished."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    pad_id, stop_ids = pad_token_id(tokenizer), stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    jobs = [(i, j) for i, _ in enumerate(prompts) for j in range(n_per_prompt)]
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    rows = []
    for s in tqdm(range(0, len(jobs), sampling.batch_size), desc="sampling", disable=not progress, leave=False):
        batch = jobs[s:s + sampling.batch_size]
        width = max(len(encoded[i]) for i, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (i, _) in enumerate(batch):  # left padding: every row's next token is at the same position
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[r, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                             temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                             max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids)
        for r, (i, j) in enumerate(batch):
            rows.append({"prompt_index": i, "sample_idx": j,
                         **finish_response(out[r, width:].tolist(), stop_ids, tokenizer)})
    return rows
