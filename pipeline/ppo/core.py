"""The PPO algorithm on tensors (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024). The reward transforms
applied to the proxy's scores before it are in `pipeline.reward_transforms` (shared with GRPO and RLOO).

Shapes: B sequences × T response positions. `mask` is 1 on response tokens (up to and including the token that ends
the turn) and 0 on the padding after it. Every masked statistic guards an empty mask. Functions that need a global
statistic over data-parallel ranks take `all_reduce`, a function summing a tensor over ranks (identity by default),
so the same code serves one process and many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = _identity) -> torch.Tensor:
    """Mean of `x` over mask == 1 (over every rank with `all_reduce`); 0 for an empty mask."""
    stats = all_reduce(torch.stack([masked_sum(x.float(), mask), mask.float().sum()]))
    return stats[0] / stats[1].clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = _identity,
                  shift_mean: bool = True) -> torch.Tensor:
    """Standardise `x` with the mean and (unbiased) variance over mask == 1 across all ranks; 0 where mask is 0.

    Whitening over the whole batch, not per rank, keeps the update independent of how the batch is split.
    """
    x32, m = x.float(), mask.float()
    total = all_reduce(torch.stack([(x32 * m).sum(), (x32 * x32 * m).sum(), m.sum()]))
    n = total[2].clamp(min=1.0)
    mean = total[0] / n
    var = (total[1] / n - mean * mean).clamp(min=0.0)
    if total[2] > 1:
        var = var * total[2] / (total[2] - 1)  # Bessel's correction, as for an unbiased sample variance
    white = (x32 - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return (white * m).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------- KL


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(π ‖ π_ref) on tokens sampled from π (Schulman's k1 and k3).

    k1 = log π − log π_ref: unbiased, its sum over a sequence is the sequence's log-ratio, can be negative per sample.
    k3 = (r − 1) − log r with r = π_ref / π: unbiased as well, and ≥ 0 for every sample.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected k1 or k3)")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token (the one that ends the turn, or the last generated one); 0 for an
    empty row (its reward then lands on a masked position and is ignored by every masked statistic)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β_KL · kl_t on every response token, plus the sequence reward on the last real token."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response positions; the episode ends at the last masked-in token
    (values after it count as 0). Returns (advantages, returns = advantages + values), both 0 where mask is 0."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------------------------------ losses


@dataclass
class LossParts:
    loss: torch.Tensor  # what is back-propagated
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor  # between the policy that sampled and the current one (a trust-region diagnostic)


def ppo_losses(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float, cliprange_value: float, vf_coef: float, n_tokens_global: torch.Tensor,
               world_size: int = 1) -> LossParts:
    """Clipped policy-ratio loss plus clipped value loss, each a mean over the minibatch's response tokens.

    `n_tokens_global` is the number of response tokens in this minibatch summed over ranks; each rank divides its
    token sum by it and multiplies by `world_size` because data-parallel training averages gradients over ranks, so
    the gradient is that of the mean over all tokens, however the tokens fall across ranks.
    """
    m = mask.float()
    denom = n_tokens_global.clamp(min=1.0) / world_size
    log_ratio = (new_logprobs - old_logprobs) * m
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = (torch.maximum(pg_unclipped, pg_clipped) * m).sum() / denom

    values_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_unclipped = (new_values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * (torch.maximum(vf_unclipped, vf_clipped) * m).sum() / denom

    with torch.no_grad():
        n_local = m.sum().clamp(min=1.0)
        clip_fraction = ((pg_clipped > pg_unclipped).float() * m).sum() / n_local
        value_clip_fraction = ((vf_clipped > vf_unclipped).float() * m).sum() / n_local
        approx_kl = 0.5 * (log_ratio ** 2 * m).sum() / n_local
    return LossParts(policy_loss + vf_coef * value_loss, policy_loss, value_loss, clip_fraction,
                     value_clip_fraction, approx_kl)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by `logits` (…, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------------- KL control


class FixedKLController:
    """A constant KL coefficient (0 reproduces the paper: KL measured, not penalised)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move β_KL so the policy's KL to the reference tracks `target`.

    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon), with n_steps the episodes since the last
    update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RewardNormaliser:
    """Standardises proxy scores: not at all, with the first rollout batch's statistics (the GRM paper), or with each
    batch's. Statistics are over every rank."""

    def __init__(self, mode: str):
        self.mode, self.mean, self.std = mode, None, None

    def __call__(self, scores: torch.Tensor, all_reduce) -> torch.Tensor:
        if self.mode == "none":
            return scores
        if self.mode == "batch" or self.mean is None:
            total = all_reduce(torch.stack([scores.sum(), (scores ** 2).sum(), torch.tensor(float(len(scores)))]))
            mean = total[0] / total[2]
            std = ((total[1] / total[2] - mean ** 2).clamp(min=0) * total[2] / (total[2] - 1).clamp(min=1)).sqrt()
            self.mean, self.std = float(mean), float(std)
        return (scores - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state["mean"], state["std"]
