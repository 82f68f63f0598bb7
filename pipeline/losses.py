"""Reward-model losses: Bradley-Terry, its baselines, and GRM's text-generation regularisers.

Pure functions over tensors (no model, no config). Notation: `r_c`, `r_r` are the (B,) rewards of the chosen and
rejected responses of B preference pairs; `logp_c`, `logp_r` are the (B,) summed log-probabilities
log π(y|x) = Σ_t log softmax(logits)[y_t] of those responses under the reward model's own LM head (see
`response_logprobs`), `ref_*` the same under a frozen reference copy of the base model. σ is the logistic function;
every `mean` is over the B pairs. log σ is computed with `F.logsigmoid`, which is stable for large |x|.

GRM (Yang et al. 2024):  L = (1 − α)·L_BT + α·L_reg,  α = 0.01, β = 0.1 by default.
Reward centering (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`): + c·mean((r_c + r_r)²), added to any of
the losses above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REGULARISERS = ("sft", "sft_nll", "dpo_noref", "dpo")


def _check_pair(r_c: torch.Tensor, r_r: torch.Tensor) -> None:
    if r_c.shape != r_r.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(r_c.shape)} vs {tuple(r_r.shape)}")


def bt_loss(r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: L_BT = −mean log σ(r_c − r_r)."""
    _check_pair(r_c, r_r)
    return -F.logsigmoid(r_c - r_r).mean()


def margin_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin) -> torch.Tensor:
    """BT with a margin: L = −mean log σ(r_c − r_r − m).

    `margin` is a scalar or a (B,) tensor, e.g. the gold-score (or rating) difference of each pair.
    """
    _check_pair(r_c, r_r)
    m = torch.as_tensor(margin, dtype=r_c.dtype, device=r_c.device)
    return -F.logsigmoid(r_c - r_r - m).mean()


def label_smoothing_loss(r_c: torch.Tensor, r_r: torch.Tensor, eps: float) -> torch.Tensor:
    """BT with label smoothing: L = −(1−ε)·mean log σ(r_c − r_r) − ε·mean log σ(r_r − r_c)."""
    _check_pair(r_c, r_r)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1], got {eps}")
    d = r_c - r_r
    return -(1.0 - eps) * F.logsigmoid(d).mean() - eps * F.logsigmoid(-d).mean()


def reward_centering(r_c: torch.Tensor, r_r: torch.Tensor, coef: float) -> torch.Tensor:
    """Reward centering's auxiliary term: c · mean((r_c + r_r)²).

    The BT losses see only reward differences, so the reward's offset drifts freely; this term pulls the sum of each
    pair's rewards (twice its mean) to 0, so rewards come out centred. TRL's RewardTrainer adds the same term with
    `center_rewards_coefficient` (Eisenstein et al. 2023 suggest c = 0.01).
    """
    _check_pair(r_c, r_r)
    if coef < 0:
        raise ValueError(f"reward centering coefficient must be >= 0, got {coef}")
    return coef * torch.mean((r_c + r_r) ** 2)


def grm_regulariser(kind: str, logp_c: torch.Tensor, logp_r: torch.Tensor | None = None, beta: float = 0.1,
                    ref_logp_c: torch.Tensor | None = None, ref_logp_r: torch.Tensor | None = None) -> torch.Tensor:
    """GRM's text-generation regulariser L_reg over summed response log-probs (B,):

    - "sft"       (paper's default): −mean log σ(β · log π(y_c|x))
    - "sft_nll"   (plain NLL):       −mean log π(y_c|x)
    - "dpo_noref" (DPO, no reference): −mean log σ(β · (log π(y_c) − log π(y_r)))
    - "dpo"       (DPO with a frozen reference π_ref):
                  −mean log σ(β · ((log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))))
    """
    if kind not in REGULARISERS:
        raise ValueError(f"unknown GRM regulariser {kind!r} (expected one of {', '.join(REGULARISERS)})")
    if logp_c is None:
        raise ValueError(f"GRM regulariser {kind!r} needs logp_c (log-probs of the chosen responses)")
    if kind == "sft":
        return -F.logsigmoid(beta * logp_c).mean()
    if kind == "sft_nll":
        return -logp_c.mean()
    if logp_r is None:
        raise ValueError(f"GRM regulariser {kind!r} needs logp_r (log-probs of the rejected responses)")
    _check_pair(logp_c, logp_r)
    ratio = logp_c - logp_r
    if kind == "dpo":
        if ref_logp_c is None or ref_logp_r is None:
            raise ValueError("GRM regulariser 'dpo' needs ref_logp_c and ref_logp_r (log-probs under the frozen "
                             "reference model); use 'dpo_noref' for the reference-free variant")
        _check_pair(ref_logp_c, ref_logp_r)
        ratio = ratio - (ref_logp_c - ref_logp_r).to(ratio.dtype)
    return -F.logsigmoid(beta * ratio).mean()


def grm_loss(r_c: torch.Tensor, r_r: torch.Tensor, reg_value: torch.Tensor, alpha: float) -> torch.Tensor:
    """GRM's total loss: L = (1 − α)·L_BT + α·L_reg, with `reg_value` = `grm_regulariser(...)`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"GRM alpha must lie in [0, 1], got {alpha}")
    return (1.0 - alpha) * bt_loss(r_c, r_r) + alpha * reg_value


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's response tokens: (B,) = Σ_t log softmax(logits)[y_t].

    `logits` (B, T, V) come from a causal LM run on `input_ids` (B, T): the logits at position t predict token t+1, so
    token t (t ≥ 1) is scored by the logits at t−1. `response_mask` (B, T) is 1 on response tokens and 0 on prompt and
    padding tokens (`pipeline.tokenization.collate`), whatever the padding side; a response token at position 0 has no
    prediction and is ignored. No length normalisation.

    Memory: only the rows of the logits at response positions are gathered and upcast to float32 (N × V for N
    response tokens in the batch), and log softmax is taken as `logit[y] − logsumexp(logits)`, so no full float32
    (B, T, V) log-softmax tensor is made.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2] or response_mask.shape != input_ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"response_mask {tuple(response_mask.shape)}")
    batch = logits.shape[0]
    mask = response_mask[:, 1:].bool()  # which next-tokens are scored
    rows, cols = mask.nonzero(as_tuple=True)  # cols index the predicting position t (target is t + 1)
    out = torch.zeros(batch, dtype=torch.float32, device=logits.device)
    if rows.numel() == 0:  # no response token anywhere: log π of an empty response is 0
        return out
    selected = logits[rows, cols].float()  # (N, V)
    targets = input_ids[rows, cols + 1]
    token_logp = selected.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(selected, dim=-1)
    return out.index_add(0, rows, token_logp)


# ---------------------------------------------------------------------------------------------------------------------
# ODIN (Chen et al. 2024, arXiv 2402.07319): a quality head r_q and a length head r_l on the same features, BT on
# r_q + r_l, the length carried by r_l and kept out of r_q by Pearson-correlation terms over the batch's responses,
# and the two heads' weight vectors kept orthogonal. Only r_q scores.


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of two (N,) tensors; 0 when either is constant. `eps` inside the square root keeps the
    gradient finite where a variance is 0 (a batch of equal lengths or equal rewards)."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"pearson needs two (N,) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt(((xc * xc).sum() + eps) * ((yc * yc).sum() + eps))


def odin_loss(r_c: torch.Tensor, r_r: torch.Tensor, len_r_c: torch.Tensor, len_r_r: torch.Tensor,
              lengths: torch.Tensor, head_weight_dot: torch.Tensor, length_weight: float,
              ortho_weight: float) -> torch.Tensor:
    """ODIN's loss: L = L_BT(r_q + r_l) + λ_L·(|ρ(r_q, L)| − ρ(r_l, L)) + λ_O·|W_q · W_l|.

    `r_c`, `r_r` are the quality head's (B,) rewards, `len_r_c`, `len_r_r` the length head's; `lengths` (2B,) the
    response lengths in tokens, chosen rows first (the order of `torch.cat([r_c, r_r])`); ρ is the Pearson
    correlation over the batch's 2B responses; `head_weight_dot` the inner product of the two heads' final weight
    vectors. (The authors' public code writes the length head's term as 1 − ρ: the same gradient.)"""
    _check_pair(r_c, r_r)
    _check_pair(len_r_c, len_r_r)
    r_q, r_l = torch.cat([r_c, r_r]), torch.cat([len_r_c, len_r_r])
    lengths = lengths.to(r_q.dtype)
    correlation = pearson(r_q, lengths).abs() - pearson(r_l, lengths)
    return bt_loss(r_c + len_r_c, r_r + len_r_r) + length_weight * correlation + ortho_weight * head_weight_dot.abs()


# ---------------------------------------------------------------------------------------------------------------------
# InfoRM (Miao et al. 2024, arXiv 2402.09345): a variational information bottleneck between the hidden state and the
# reward.


def gaussian_kl_to_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) of each row, (B, D) -> (B,): ½ Σ_d (μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def inform_loss(r_c: torch.Tensor, r_r: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                beta: float) -> torch.Tensor:
    """InfoRM's loss: L = L_BT + β · mean KL(N(μ, σ²) ‖ N(0, I)), the mean over all the batch's responses (rows of
    `mean`, `logvar`). The rewards come from the sampled latent z = μ + σ·ε (the head in training mode)."""
    return bt_loss(r_c, r_r) + beta * gaussian_kl_to_standard(mean, logvar).mean()
