"""Reward transforms: policy-side mitigations of over-optimization, applied to a proxy's raw scores before an RL
algorithm sees them — by PPO (`ppo.reward_transform`, before reward normalisation and the KL penalty) and by GRPO and
RLOO (`rl.reward_transform`, before their group baselines). One implementation for every arm.

Scores are (B,) tensors. `reference` (B,) is the proxy's score of a response the initial policy sampled for each
row's prompt; `prompt_ids` (B,) says which rows share a prompt.
"""

from __future__ import annotations

import torch


def clip(scores: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Scores clipped to [lo, hi]: no gain from pushing the proxy past `hi` (the "Clip" baseline of Fu et al. 2025)."""
    return scores.clamp(min=lo, max=hi)


def log_sigmoid_centred(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """log σ(r − c), c a per-prompt reference score (Wang et al. 2024, "Transforming and Combining Rewards for
    Aligning Large Language Models"): ≈ r − c while r is below the reference, saturating at 0 above it, so gains on
    responses already better than the reference are worth ever less."""
    return torch.nn.functional.logsigmoid(scores - reference)


def par(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Preference-as-reward, σ(r − r_ref) (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF"):
    bounded in (0, 1), steepest where the response ties with the reference response, flat far above it."""
    return torch.sigmoid(scores - reference)


def per_prompt_normalise(scores: torch.Tensor, prompt_ids: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each prompt's rollouts standardised by that prompt's mean and (unbiased) std, as GRPO's group advantages (Shao
    et al. 2024, DeepSeekMath). A prompt whose rollouts all score the same gets 0. A prompt with a single rollout has
    no std: refused, not silently mapped to 0 (which would drop its learning signal) — sample several per prompt
    (`ppo.reward_transform.rollouts_per_prompt`)."""
    groups, inverse, counts = torch.unique(prompt_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"per-prompt normalisation needs ≥ 2 rollouts of every prompt; {int((counts < 2).sum())} of "
                         f"{len(groups)} prompt(s) have one (set ppo.reward_transform.rollouts_per_prompt ≥ 2)")
    x = scores.float()
    n = counts.to(x.dtype)
    mean = torch.zeros(len(groups), dtype=x.dtype).index_add_(0, inverse, x) / n
    centred = x - mean[inverse]
    var = torch.zeros(len(groups), dtype=x.dtype).index_add_(0, inverse, centred * centred) / (n - 1)
    return (centred / (var.sqrt()[inverse] + eps)).to(scores.dtype)


KINDS = ("none", "clip", "par", "log_sigmoid", "per_prompt_norm")
# kind -> (what it does, where it comes from), for `overopt show` and the README
DESCRIPTIONS = {
    "none": ("the proxy's raw score", ""),
    "clip": ("clip(r, lo, hi), clip_range in the proxy's raw units", "Fu et al. 2025 (Clip baseline)"),
    "par": ("σ(r − r_ref), r_ref the score of a response of the initial policy to the same prompt",
            "Fu et al. 2025 (PAR)"),
    "log_sigmoid": ("log σ(r − r_ref), r_ref as for par", "Wang et al. 2024 (log-sigmoid centring)"),
    "per_prompt_norm": ("(r − mean) / sd over each prompt's rollouts (PPO only)", "Shao et al. 2024 (GRPO's group "
                        "normalisation)"),
}
REFERENCE_TRANSFORMS = ("par", "log_sigmoid")  # the kinds that need a reference response's score
# GRPO normalises each group by its mean and std itself, and RLOO's leave-one-out baseline centres it: per-prompt
# normalisation before them would be GRPO's own step done twice (RLOO: scaled by the group's std), not a mitigation
GROUP_RL_KINDS = ("none", "clip", "par", "log_sigmoid")


def transform_rewards(kind: str, scores: torch.Tensor, reference: torch.Tensor | None, prompt_ids: torch.Tensor,
                      cfg) -> torch.Tensor:
    """The transform `kind` (`reward_transform.kind`) of raw proxy scores; `cfg` carries its settings
    (`clip_range`). `reference` is needed by par and log_sigmoid only."""
    if kind == "none":
        return scores
    if kind == "clip":
        return clip(scores, *cfg.clip_range)
    if kind in REFERENCE_TRANSFORMS:
        if reference is None:
            raise ValueError(f"reward transform {kind!r} needs the reference responses' scores")
        return par(scores, reference) if kind == "par" else log_sigmoid_centred(scores, reference)
    if kind == "per_prompt_norm":
        return per_prompt_normalise(scores, prompt_ids)
    raise ValueError(f"unknown reward transform {kind!r} (expected none, clip, par, log_sigmoid or per_prompt_norm)")
