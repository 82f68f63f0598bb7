"""Rollouts: sampling responses from the policy and teacher-forced log-probs of sampled tokens.

A batch is kept as token ids: queries left-padded (width Q), responses right-padded (width T). The response mask is 1
up to and including the first token that ends the turn, found by position — never by comparing with the pad id, which
equals the end-of-turn id for many tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.config import SamplingConfig
from pipeline.generation import generate_ids, left_pad
from pipeline.ppo.models import position_ids, response_logprobs
from pipeline.scoring import check_finite, score_rollouts
from pipeline.tokenization import pad_rows


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, Q) left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, T); after the stop token: padding
    response_mask: torch.Tensor  # (B, T) 1 up to and including the stop token
    finished: torch.Tensor  # (B,) bool: the response ended its turn within max_new_tokens

    @property
    def context_length(self) -> int:
        return self.query_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def content_ids(self) -> list[list[int]]:
        """Each response's tokens before the one that ended its turn (what a reward model's template wraps)."""
        lengths = self.response_mask.sum(1) - self.finished.long()
        return [row[:n].tolist() for row, n in zip(self.response_ids, lengths)]

    def prompt_rows(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.query_ids, self.query_mask)]


def response_mask(responses: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, finished): mask is 1 up to and including each row's first stop token, or on every position of a row
    that never stopped."""
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids), device=responses.device))
    finished = is_stop.any(dim=1)
    T = responses.shape[1]
    end = torch.where(finished, is_stop.float().argmax(dim=1), torch.full_like(finished, T - 1, dtype=torch.long))
    mask = torch.arange(T, device=responses.device)[None, :] <= end[:, None]
    return mask.long(), finished


def sample_rollout(policy, query_rows: Sequence[Sequence[int]], sampling: SamplingConfig, pad_id: int,
                   stop_ids: Sequence[int]) -> Rollout:
    """One response per query from `policy` (a plain module: under ZeRO-3, gathered first)."""
    query_ids, query_mask, responses = generate_ids(policy, query_rows, sampling, pad_id, stop_ids)
    if responses.shape[1] == 0:  # generate may return nothing when max_new_tokens is 0; the config forbids it
        raise RuntimeError("the policy generated no token")
    mask, finished = response_mask(responses, stop_ids)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
    return Rollout(query_ids, query_mask, responses, mask, finished)


def sample_reference_rollout(ref_policy, policy, query_rows: Sequence[Sequence[int]], sampling: SamplingConfig,
                             pad_id: int, stop_ids: Sequence[int]) -> Rollout:
    """One response per query from the reference (initial) policy: `ref_policy`, or — with LoRA, where it is None —
    the trained `policy` (a plain module, gathered under ZeRO-3) with its adapters switched off."""
    if ref_policy is not None:
        return sample_rollout(ref_policy, query_rows, sampling, pad_id, stop_ids)
    with policy.disable_adapter():
        return sample_rollout(policy, query_rows, sampling, pad_id, stop_ids)


def proxy_scores(scorer, tokenizer, rollout: Rollout, chats: Sequence, prompt_ids: Sequence, scorer_name: str,
                 where: str) -> torch.Tensor:
    """The proxy's raw scores of `rollout`, whose rows answer the prompts `chats` (chat messages; `prompt_ids` name
    them in an error); one path for an RL arm's rollouts and its reference responses, so both are scored alike. A
    non-finite score stops the run."""
    contents = rollout.content_ids()
    texts = tokenizer.batch_decode(contents, skip_special_tokens=True)
    raw = score_rollouts(scorer, tokenizer, list(chats), rollout.prompt_rows(), contents, [s.strip() for s in texts])
    check_finite(raw, scorer_name, list(prompt_ids), ("prompt_id",), where=where)
    return torch.tensor(raw, dtype=torch.float32)


@torch.no_grad()
def sequence_logprobs(model, query_rows: Sequence[Sequence[int]], response_rows: Sequence[Sequence[int]],
                      pad_id: int, batch_size: int = 256) -> list[torch.Tensor]:
    """Teacher-forced log π(y_t | x, y_<t) at temperature 1 of each response token (the stop token included, when
    the row has one), for a plain causal LM; one 1-D tensor per row."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for s in range(0, len(query_rows), batch_size):
        queries, responses = query_rows[s:s + batch_size], response_rows[s:s + batch_size]
        q_ids, q_mask = left_pad(queries, pad_id)
        r_ids, r_mask = (torch.from_numpy(a) for a in pad_rows(
            responses, pad_id, width=max(1, max(len(r) for r in responses))))
        ids = torch.cat([q_ids, r_ids], 1).to(device)
        attn = torch.cat([q_mask, r_mask], 1).to(device)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
        logp = response_logprobs(logits, r_ids.to(device), q_ids.shape[1]).cpu()
        out += [logp[i, :len(r)] for i, r in enumerate(responses)]
    return out


def prompt_batch(step: int, n_prompts: int, batch_size: int, seed: int, repeats: int = 1) -> np.ndarray:
    """Indices of the global batch of update `step`: passes over a seeded shuffle of the prompts, a new shuffle each
    pass. A pure function of its arguments, so every rank agrees and a resumed run continues the same sequence.

    With `repeats` k > 1 the batch holds batch_size / k distinct prompts, each k times in a row (so a rank's
    contiguous share, a multiple of k, holds whole groups); k = 1 is the plain sequence."""
    if repeats > 1:
        return np.repeat(prompt_batch(step, n_prompts, batch_size // repeats, seed), repeats)
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        idx.extend(order[offset:offset + batch_size - len(idx)])
    return np.asarray(idx)


def sampling_seed(seed: int, rank: int) -> int:
    """Each rank's sampling stream, derived so that (seed, rank 1) never replays (seed + 1, rank 0)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
