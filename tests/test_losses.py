"""Reward-model losses against values computed by hand with the math module."""

import math

import pytest
import torch

from pipeline.losses import bt_loss, grm_loss, grm_regulariser, label_smoothing_loss, margin_loss, response_logprobs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


R_C = [1.0, 0.5, -2.0]
R_R = [0.0, 1.5, -1.0]
DIFFS = [c - r for c, r in zip(R_C, R_R)]  # 1.0, -1.0, -1.0


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_bt_loss_by_hand():
    expected = -sum(log_sigmoid(d) for d in DIFFS) / 3
    assert bt_loss(t(R_C), t(R_R)).item() == pytest.approx(expected, abs=1e-12)
    # one pair with equal rewards: log 2
    assert bt_loss(t([0.3]), t([0.3])).item() == pytest.approx(math.log(2), abs=1e-12)


def test_margin_loss_by_hand_scalar_and_per_pair():
    expected = -sum(log_sigmoid(d - 0.5) for d in DIFFS) / 3
    assert margin_loss(t(R_C), t(R_R), 0.5).item() == pytest.approx(expected, abs=1e-12)
    margins = [0.0, 1.0, 2.0]
    expected = -sum(log_sigmoid(d - m) for d, m in zip(DIFFS, margins)) / 3
    assert margin_loss(t(R_C), t(R_R), t(margins)).item() == pytest.approx(expected, abs=1e-12)
    assert margin_loss(t(R_C), t(R_R), 0.0).item() == pytest.approx(bt_loss(t(R_C), t(R_R)).item(), abs=1e-12)


def test_label_smoothing_by_hand():
    eps = 0.1
    expected = (-(1 - eps) * sum(log_sigmoid(d) for d in DIFFS) / 3
                - eps * sum(log_sigmoid(-d) for d in DIFFS) / 3)
    assert label_smoothing_loss(t(R_C), t(R_R), eps).item() == pytest.approx(expected, abs=1e-12)
    assert label_smoothing_loss(t(R_C), t(R_R), 0.0).item() == pytest.approx(bt_loss(t(R_C), t(R_R)).item())
    with pytest.raises(ValueError, match=r"label smoothing eps must lie in \[0, 1\]"):
        label_smoothing_loss(t(R_C), t(R_R), 1.5)


LP_C = [-3.0, -10.0]
LP_R = [-4.0, -8.0]
REF_C = [-3.5, -9.0]
REF_R = [-3.0, -9.5]


def test_sft_regulariser_by_hand():
    beta = 0.1
    expected = -sum(log_sigmoid(beta * x) for x in LP_C) / 2
    assert grm_regulariser("sft", t(LP_C), beta=beta).item() == pytest.approx(expected, abs=1e-12)
    assert grm_regulariser("sft_nll", t(LP_C)).item() == pytest.approx(6.5, abs=1e-12)


def test_dpo_regularisers_by_hand():
    beta = 0.5
    ratios = [c - r for c, r in zip(LP_C, LP_R)]  # 1, -2
    expected = -sum(log_sigmoid(beta * x) for x in ratios) / 2
    assert grm_regulariser("dpo_noref", t(LP_C), t(LP_R), beta=beta).item() == pytest.approx(expected, abs=1e-12)
    ref = [c - r for c, r in zip(REF_C, REF_R)]  # -0.5, 0.5
    expected = -sum(log_sigmoid(beta * (x - y)) for x, y in zip(ratios, ref)) / 2
    got = grm_regulariser("dpo", t(LP_C), t(LP_R), beta=beta, ref_logp_c=t(REF_C), ref_logp_r=t(REF_R))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_regulariser_errors():
    with pytest.raises(ValueError, match="unknown GRM regulariser"):
        grm_regulariser("kl", t(LP_C))
    with pytest.raises(ValueError, match="logp_r"):
        grm_regulariser("dpo_noref", t(LP_C))
    with pytest.raises(ValueError, match="ref_logp_c"):
        grm_regulariser("dpo", t(LP_C), t(LP_R))
    with pytest.raises(ValueError, match="ref_logp_c"):
        grm_regulariser("dpo", t(LP_C), t(LP_R), ref_logp_c=t(REF_C))
    with pytest.raises(ValueError, match="shape"):
        bt_loss(t([1.0, 2.0]), t([1.0]))


def test_grm_loss_combines_bt_and_reg():
    reg = grm_regulariser("sft", t(LP_C))
    alpha = 0.01
    expected = (1 - alpha) * bt_loss(t(R_C), t(R_R)).item() + alpha * reg.item()
    assert grm_loss(t(R_C), t(R_R), reg, alpha).item() == pytest.approx(expected, abs=1e-12)
    assert grm_loss(t(R_C), t(R_R), reg, 0.0).item() == pytest.approx(bt_loss(t(R_C), t(R_R)).item())
    with pytest.raises(ValueError, match=r"GRM alpha must lie in \[0, 1\]"):
        grm_loss(t(R_C), t(R_R), reg, 1.5)


# ------------------------------------------------------------------------------------------------ response_logprobs
def test_response_logprobs_by_hand():
    # vocab 3; sequence [0, 1, 2, 1]; prompt = token 0..1, response = tokens at positions 2, 3.
    logits = torch.tensor([[[0.0, 1.0, 2.0],    # predicts token at position 1 (prompt: ignored)
                            [1.0, 0.0, 0.0],    # predicts position 2 -> token 2
                            [0.0, 3.0, 0.0],    # predicts position 3 -> token 1
                            [9.0, 9.0, 9.0]]])  # predicts beyond the end: ignored
    ids = torch.tensor([[0, 1, 2, 1]])
    resp = torch.tensor([[0, 0, 1, 1]])
    lse1 = math.log(math.e + 2)
    lse2 = math.log(2 + math.exp(3))
    expected = (0.0 - lse1) + (3.0 - lse2)
    assert response_logprobs(logits, ids, resp).item() == pytest.approx(expected, abs=1e-6)
    assert response_logprobs(logits, ids, resp).dtype == torch.float32


def test_response_logprobs_matches_log_softmax_reference():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    resp = torch.zeros(B, T, dtype=torch.long)
    resp[0, 3:] = 1
    resp[1, 5:6] = 1
    # row 2: no response token -> 0
    logp = torch.log_softmax(logits, -1)
    expected = torch.zeros(B)
    for b in range(B):
        for pos in range(1, T):
            if resp[b, pos]:
                expected[b] += logp[b, pos - 1, ids[b, pos]]
    assert torch.allclose(response_logprobs(logits, ids, resp), expected, atol=1e-5)
    assert response_logprobs(logits, ids, resp)[2].item() == 0.0


def test_response_logprobs_left_and_right_padding_agree():
    """The same sequence padded on either side, garbage logits at the padding: identical log-probs."""
    torch.manual_seed(1)
    V, n, pad = 9, 5, 3
    seq_logits = torch.randn(n, V)
    seq_ids = torch.randint(1, V, (n,))
    seq_resp = torch.tensor([0, 0, 1, 1, 1])
    right_logits = torch.cat([seq_logits, 100 * torch.randn(pad, V)])
    left_logits = torch.cat([100 * torch.randn(pad, V), seq_logits])
    pad_ids = torch.zeros(pad, dtype=torch.long)
    right_ids, left_ids = torch.cat([seq_ids, pad_ids]), torch.cat([pad_ids, seq_ids])
    zeros = torch.zeros(pad, dtype=torch.long)
    right_resp, left_resp = torch.cat([seq_resp, zeros]), torch.cat([zeros, seq_resp])
    out = response_logprobs(torch.stack([right_logits, left_logits]), torch.stack([right_ids, left_ids]),
                            torch.stack([right_resp, left_resp]))
    unpadded = response_logprobs(seq_logits[None], seq_ids[None], seq_resp[None])
    assert torch.allclose(out[0], out[1], atol=1e-6)
    assert torch.allclose(out[0], unpadded[0], atol=1e-6)


def test_response_logprobs_bfloat16_logits_computed_in_float32():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 50)
    ids = torch.randint(0, 50, (2, 6))
    resp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    ref = response_logprobs(logits.bfloat16().float(), ids, resp)
    got = response_logprobs(logits.bfloat16(), ids, resp)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)


def test_gradients_flow():
    torch.manual_seed(3)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (4, 5))
    resp = torch.tensor([[0, 0, 1, 1, 1]] * 4)
    r = torch.randn(4, requires_grad=True)
    regs = {
        "sft": lambda c, rj: grm_regulariser("sft", c),
        "dpo_noref": lambda c, rj: grm_regulariser("dpo_noref", c, rj),
        "dpo": lambda c, rj: grm_regulariser("dpo", c, rj, ref_logp_c=c.detach() - 1, ref_logp_r=rj.detach()),
    }
    for make in regs.values():
        logits.grad = r.grad = None
        logp = response_logprobs(logits, ids, resp)
        reg = make(logp[0::2], logp[1::2])
        grm_loss(r[0::2], r[1::2], reg, alpha=0.5).backward()
        assert r.grad is not None and r.grad.abs().sum() > 0
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        # logits predicting prompt tokens, and the last position's logits, get no gradient
        assert logits.grad[:, 0].abs().sum() == 0 and logits.grad[:, -1].abs().sum() == 0
    for loss_fn in (lambda a, b: margin_loss(a, b, 1.0), lambda a, b: label_smoothing_loss(a, b, 0.1)):
        r.grad = None
        loss_fn(r[0::2], r[1::2]).backward()
        assert r.grad.abs().sum() > 0
