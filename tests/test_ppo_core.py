"""PPO's tensor algorithm against hand computation: masks, whitening, rewards' position, GAE, losses, KL, control."""

import math

import numpy as np
import pytest
import torch

from pipeline.ppo import core
from pipeline.ppo.models import response_logprobs
from pipeline.ppo.rollout import response_mask


def test_response_mask_ends_at_the_first_stop_token_even_when_pad_equals_it():
    eos = pad = 2
    responses = torch.tensor([[5, 6, eos, pad, pad],   # ended at position 2; padding equals EOS
                              [5, 6, 7, 8, 9],         # never ended its turn
                              [eos, pad, pad, pad, pad]])  # ended at once
    mask, finished = response_mask(responses, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_sequence_reward_lands_on_the_end_of_turn_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0.]])
    kl = torch.full((3, 5), 0.5)
    rewards = core.token_rewards(torch.tensor([10.0, 20.0, 30.0]), kl, mask, kl_coef=0.1)
    # row 0: the turn ends at index 2 (its EOS); -0.05 KL penalty on every response token, nothing on padding
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.05, 9.95, 0.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([-0.05, -0.05, -0.05, -0.05, 19.95])
    assert rewards[2].tolist() == [0.0] * 5  # an empty response carries no reward anywhere


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.5, 2.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0]])  # the last position is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    d2 = 2.0 + gamma * 0.0 - 3.0
    d1 = 0.5 + gamma * 3.0 - 2.0
    d0 = 0.0 + gamma * 2.0 - 1.0
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 1.0, a1 + 2.0, a2 + 3.0, 0.0])


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 0.125]])
    adv, _ = core.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([4.0 - 0.5, 3.0 - 0.25, 3.0 - 0.125])


def test_masked_whiten_and_mean_match_numpy_and_guard_empty_masks():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    white = core.masked_whiten(x, mask)
    expected = (kept - kept.mean()) / kept.std(ddof=1)
    assert white[mask.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert white[~mask.bool()].tolist() == [0.0, 0.0, 0.0]
    assert float(core.masked_mean(x, mask)) == pytest.approx(3.0)
    empty = torch.zeros_like(mask)
    assert float(core.masked_mean(x, empty)) == 0.0
    assert torch.isfinite(core.masked_whiten(x, empty)).all()


def test_whitening_over_ranks_equals_whitening_the_whole_batch():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).long()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    # a fake two-rank all-reduce: the sum of both halves' statistics
    stats = {}

    def reduce_for(rank):
        def all_reduce(t):
            other = halves[1 - rank]
            o = torch.stack([(other[0] * other[1]).sum(), (other[0] ** 2 * other[1]).sum(), other[1].sum().float()])
            return t + o
        return all_reduce

    for rank, (xr, mr) in enumerate(halves):
        stats[rank] = core.masked_whiten(xr, mr, reduce_for(rank))
    whole = core.masked_whiten(x, mask)
    assert torch.allclose(torch.cat([stats[0], stats[1]]), whole, atol=1e-6)


def test_kl_estimators():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(8), torch.randn(8)
    logp, logq = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    exact = float((logp.exp() * (logp - logq)).sum())
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    k1 = core.kl_per_token(logp[samples], logq[samples], "k1")
    k3 = core.kl_per_token(logp[samples], logq[samples], "k3")
    assert (k3 >= 0).all()  # k3 is non-negative sample by sample
    assert (k1 < 0).any()  # k1 is not, only in expectation
    assert float(k1.mean()) == pytest.approx(exact, abs=0.02) and float(k1.mean()) > 0
    assert float(k3.mean()) == pytest.approx(exact, abs=0.02)
    with pytest.raises(ValueError, match="k2"):
        core.kl_per_token(logp, logq, "k2")


def test_response_logprobs_reads_the_position_before_each_token():
    V, Q, T = 5, 3, 2
    logits = torch.zeros(1, Q + T, V)
    logits[0, Q - 1, 4] = 10.0  # the last query position predicts the first response token
    logits[0, Q, 1] = 10.0
    lp = response_logprobs(logits, torch.tensor([[4, 1]]), Q)
    assert lp[0].tolist() == pytest.approx([-math.log1p(4 * math.exp(-10))] * 2, abs=1e-6)
    hot = response_logprobs(logits, torch.tensor([[4, 1]]), Q, temperature=2.0)
    assert (hot < lp).all()  # a higher temperature flattens the distribution the tokens were drawn from


def test_ppo_losses_clip_and_normalise_by_global_token_count():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.9), 5.0]])  # ratio 1.5 clipped to 1.2; 0.9 kept; padding ignored
    adv = torch.tensor([[1.0, 1.0, 7.0]])
    values_old, values_new = torch.zeros(1, 3), torch.tensor([[0.5, -0.1, 3.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    parts = core.ppo_losses(new, old, adv, values_new, values_old, returns, mask, cliprange=0.2,
                            cliprange_value=0.2, vf_coef=0.1, n_tokens_global=torch.tensor(2.0))
    assert float(parts.policy_loss) == pytest.approx(-(1.2 + 0.9) / 2)
    # value: token 0 clipped to 0.2 → (0.2 − 1)² = 0.64 > (0.5 − 1)² = 0.25; token 1: (−0.1)² vs (−0.1)² = 0.01
    assert float(parts.value_loss) == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert float(parts.loss) == pytest.approx(float(parts.policy_loss) + 0.1 * float(parts.value_loss))
    assert float(parts.clip_fraction) == pytest.approx(0.5)
    # the same tokens split over two ranks: each rank's loss × world size / global count sums to the mean
    half = core.ppo_losses(new[:, :1], old[:, :1], adv[:, :1], values_new[:, :1], values_old[:, :1],
                           returns[:, :1], mask[:, :1], 0.2, 0.2, 0.1, torch.tensor(2.0), world_size=2)
    other = core.ppo_losses(new[:, 1:2], old[:, 1:2], adv[:, 1:2], values_new[:, 1:2], values_old[:, 1:2],
                            returns[:, 1:2], mask[:, 1:2], 0.2, 0.2, 0.1, torch.tensor(2.0), world_size=2)
    assert (float(half.loss) + float(other.loss)) / 2 == pytest.approx(float(parts.loss))


def test_adaptive_kl_controller_follows_ziegler():
    c = core.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=64)  # error clipped to +0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000))
    c.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 100 / 10000))
    state = c.state_dict()
    d = core.AdaptiveKLController(0.2, 6.0, 10000)
    d.load_state_dict(state)
    assert d.value == c.value
    fixed = core.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
