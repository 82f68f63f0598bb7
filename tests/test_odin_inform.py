"""ODIN (two reward heads, only the quality head scores) and InfoRM (an information-bottleneck head with a latent
outlier score): losses against independently written values, the heads' scoring and save/load, the outlier score
against numpy, its aggregation into the curves, and a smoke-size study with one proxy of each type."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import proxy_types
from pipeline.losses import gaussian_kl_to_standard, inform_loss, odin_loss, pearson
from pipeline.records import SCORE_COLUMNS
from pipeline.reward_model import HEAD_CONFIG_FILE, HEAD_FILE, GRMRewardModel, RewardHeadConfig
from pipeline.scoring import (
    LATENT_COV_RIDGE,
    LATENT_STATS_FILE,
    ModelScorer,
    fit_latent_stats,
    grm_rewards_fn,
    load_latent_stats,
    mahalanobis,
    save_latent_stats,
)
from pipeline.world import build_tokenizer
from tests.test_reward_model import PAIRS, batch, build_base

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return build_base("llama", tok, tmp_path_factory.mktemp("base_llama"))


def new_model(base, seed=0, **head) -> GRMRewardModel:
    torch.manual_seed(seed)
    return GRMRewardModel.from_base(base, head=RewardHeadConfig(**{"type": "mlp", "width": 16, **head}))


def np_pearson(x, y) -> float:
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def np_bt(r_c, r_r) -> float:
    return float(np.mean(np.log1p(np.exp(-(np.asarray(r_c) - np.asarray(r_r))))))


# ------------------------------------------------------------------------------------------------------------ ODIN
def test_odin_loss_terms_against_numpy():
    r_c, r_r = torch.tensor([0.5, -0.2, 1.0]), torch.tensor([0.1, 0.3, -0.4])
    l_c, l_r = torch.tensor([0.2, 0.9, -0.1]), torch.tensor([0.0, 0.4, 0.7])
    lengths = torch.tensor([5, 12, 3, 8, 7, 2])  # chosen rows first
    dot = torch.tensor(-0.3)
    q, ln = np.r_[r_c.numpy(), r_r.numpy()], np.r_[l_c.numpy(), l_r.numpy()]
    expected = (np_bt(r_c.numpy() + l_c.numpy(), r_r.numpy() + l_r.numpy())
                + 0.5 * (abs(np_pearson(q, lengths)) - np_pearson(ln, lengths)) + 2.0 * 0.3)
    got = odin_loss(r_c, r_r, l_c, l_r, lengths, dot, length_weight=0.5, ortho_weight=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # each term alone
    got_rho = pearson(torch.tensor(q, dtype=torch.float64), lengths.double()).item()
    assert got_rho == pytest.approx(np_pearson(q, lengths), abs=1e-9)
    no_terms = odin_loss(r_c, r_r, l_c, l_r, lengths, dot, 0.0, 0.0).item()
    assert no_terms == pytest.approx(np_bt(r_c + l_c, r_r + l_r), abs=1e-6)
    assert odin_loss(r_c, r_r, l_c, l_r, lengths, dot, 0.0, 1.0).item() - no_terms == pytest.approx(0.3, abs=1e-6)
    # equal lengths carry no correlation (and no NaN gradient)
    r = torch.tensor([0.1, 0.4], requires_grad=True)
    rho = pearson(r, torch.tensor([4.0, 4.0]))
    rho.backward()
    assert rho.item() == 0.0 and torch.isfinite(r.grad).all()


@pytest.mark.parametrize("head_type", ["mlp", "linear"])
def test_odin_only_the_quality_head_scores(base, tok, head_type):
    model = new_model(base, type=head_type, outputs=2, dropout=0.0)
    b = batch(tok)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], return_logits=False)
        before = model.rewards(b["input_ids"], b["attention_mask"])
        final = model.v_head.final_linear()
        w = final.weight
        assert out.head["head_weight_dot"].item() == pytest.approx(float(w[0] @ w[1]), abs=1e-6)
        final.weight[1].add_(torch.randn_like(final.weight[1]))
        final.bias[1].add_(3.0)
        after = model.rewards(b["input_ids"], b["attention_mask"])
        assert torch.equal(before, after)  # the length head never scores
        again = model(b["input_ids"], b["attention_mask"], return_logits=False).head["length_rewards"]
        assert not torch.allclose(out.head["length_rewards"], again)
        final.weight[0].add_(0.5)
        assert not torch.allclose(before, model.rewards(b["input_ids"], b["attention_mask"]))


def test_odin_training_loss_reads_lengths_from_the_response_mask(base, tok):
    from pipeline.config import ProxyConfig
    from pipeline.preference_pairs import PairCollator
    from pipeline.tokenization import encode_conversation, pad_token_id

    model = new_model(base, outputs=2, dropout=0.0)
    enc = [(encode_conversation(tok, p, r, 64), encode_conversation(tok, p, r + " extra words here", 64), 0.0)
           for p, r in PAIRS]
    inputs = PairCollator(pad_token_id(tok))(enc)
    proxy = ProxyConfig(name="o", type="odin", odin_length_weight=0.7, odin_ortho_weight=0.2)
    with torch.no_grad():
        out = model(inputs["input_ids"], inputs["attention_mask"], return_logits=False)
        r_c, r_r = out.rewards.chunk(2)
        loss = proxy_types.training_loss(proxy, r_c, r_r, inputs, out)
    q, ln = out.rewards.numpy(), out.head["length_rewards"].numpy()
    # L by hand: the response tokens of each row, chosen rows first
    span = lambda e: len(e.input_ids) - e.response_start  # noqa: E731
    lengths = np.array([span(c) for c, _, _ in enc] + [span(j) for _, j, _ in enc], float)
    assert (lengths[len(PAIRS):] > lengths[:len(PAIRS)]).all()  # the rejected responses are the longer ones
    w = model.v_head.final_linear().weight.detach().numpy()
    expected = (np_bt(q[:4] + ln[:4], q[4:] + ln[4:]) + 0.7 * (abs(np_pearson(q, lengths)) - np_pearson(ln, lengths))
                + 0.2 * abs(float(w[0] @ w[1])))
    assert loss.item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------------------ InfoRM
def test_inform_kl_against_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 4), torch.randn(5, 4)
    p = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    q = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    expected = torch.distributions.kl_divergence(p, q).sum(-1)
    assert torch.allclose(gaussian_kl_to_standard(mean, logvar), expected, atol=1e-5)
    r_c, r_r = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.2])
    got = inform_loss(r_c, r_r, mean, logvar, beta=0.1)
    assert got.item() == pytest.approx(np_bt(r_c, r_r) + 0.1 * expected.mean().item(), abs=1e-5)


def test_inform_head_samples_in_training_and_uses_the_mean_to_score(base, tok):
    model = new_model(base, type="linear", ib_dim=3, dropout=0.0)
    b = batch(tok)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], return_logits=False)
        mean, logvar = out.head["latent_mean"], out.head["latent_logvar"]
        assert mean.shape == logvar.shape == (len(PAIRS), 3)
        assert torch.allclose(out.rewards, model.v_head.decoder(mean).squeeze(-1), atol=1e-6)
        model.v_head.train()
        torch.manual_seed(7)
        sampled = model(b["input_ids"], b["attention_mask"], return_logits=False).rewards
        torch.manual_seed(7)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        assert torch.allclose(sampled, model.v_head.decoder(z).squeeze(-1), atol=1e-6)
        assert not torch.allclose(sampled, out.rewards)


def test_mahalanobis_outlier_score_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.4]])
    test = rng.normal(size=(6, 3)) * 3
    save_latent_stats(fit_latent_stats(train), tmp_path / LATENT_STATS_FILE, n=len(train))
    stats = load_latent_stats(tmp_path)
    inv = np.linalg.inv(np.cov(train.T) + LATENT_COV_RIDGE * np.eye(3))
    d = test - train.mean(axis=0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", d, inv, d))
    assert mahalanobis(torch.tensor(test, dtype=torch.float32), stats).numpy() == pytest.approx(expected, rel=1e-5)
    # more latent dimensions than training responses: the ridge keeps the covariance invertible
    wide = fit_latent_stats(rng.normal(size=(4, 8)))
    save_latent_stats(wide, tmp_path / LATENT_STATS_FILE, n=4)
    assert torch.isfinite(mahalanobis(torch.randn(2, 8), load_latent_stats(tmp_path))).all()
    with pytest.raises(ValueError, match="at least two"):
        fit_latent_stats(rng.normal(size=(1, 3)))


def test_scorer_extras_give_the_outlier_of_each_scored_response(base, tok, tmp_path):
    model = new_model(base, ib_dim=4).eval()
    b = batch(tok)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], return_logits=False)
    save_latent_stats(fit_latent_stats(out.head["latent_mean"].numpy()), tmp_path / LATENT_STATS_FILE, n=len(PAIRS))
    stats = load_latent_stats(tmp_path)
    scorer = ModelScorer(grm_rewards_fn(model, stats), model, tok, batch_size=3, max_length=64)
    extras = {}
    scores = scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS], extras)
    assert scores == pytest.approx(out.rewards.numpy(), abs=1e-5)
    assert extras["outlier"] == pytest.approx(mahalanobis(out.head["latent_mean"], stats).numpy(), abs=1e-5)
    assert extras["latent_mean"].shape == (len(PAIRS), 4)
    # without a dict the same scorer gives the same rewards; a plain head's function is the model's rewards
    assert scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS]) == pytest.approx(scores, abs=1e-9)
    plain = new_model(base)
    assert grm_rewards_fn(plain) == plain.rewards


# ------------------------------------------------------------------------------------------------- save / load
def test_odin_and_inform_heads_round_trip(base, tok, tmp_path):
    b = batch(tok)
    for name, head in (("odin", {"outputs": 2}), ("inform", {"ib_dim": 5})):
        model = new_model(base, seed=3, **head).eval()
        with torch.no_grad():
            before = model(b["input_ids"], b["attention_mask"], return_logits=False)
        out = model.save_pretrained(tmp_path / name, tokenizer=tok)
        meta = json.loads((out / HEAD_CONFIG_FILE).read_text())
        assert {k: meta["head"][k] for k in head} == head
        keys = sorted(load_file(out / HEAD_FILE))
        assert ("v_head.decoder.weight" in keys) == (name == "inform")
        assert load_file(out / HEAD_FILE)["v_head.summary.2.weight"].shape[0] == (2 if name == "odin" else 10)
        loaded = GRMRewardModel.from_pretrained(out, head=RewardHeadConfig(type="mlp", width=16, **head))
        with torch.no_grad():
            after = loaded(b["input_ids"], b["attention_mask"], return_logits=False)
        assert torch.equal(before.rewards, after.rewards)
        assert before.head.keys() == after.head.keys()
        assert all(torch.equal(before.head[k], after.head[k]) for k in before.head)
        with pytest.raises(ValueError, match="reward head"):  # a plain head is not what was saved
            GRMRewardModel.from_pretrained(out, head=RewardHeadConfig(type="mlp", width=16))
    # a plain head's settings file is as before these heads existed
    plain = new_model(base).save_pretrained(tmp_path / "plain")
    assert set(json.loads((plain / HEAD_CONFIG_FILE).read_text())["head"]) == {"type", "width", "dropout",
                                                                                "num_layers"}
    with pytest.raises(ValueError, match="outputs"):
        RewardHeadConfig(outputs=3)
    with pytest.raises(ValueError, match="ib_dim"):
        RewardHeadConfig(outputs=2, ib_dim=4)


# ------------------------------------------------------------------------------------------------------------ curves
def test_curves_carry_the_mean_outlier_of_selected_and_sampled_responses():
    from stages.bon_curve import with_outlier
    from stages.ppo_curve import rl_curve_table

    # best-of-n, 2 prompts x 3 samples: n = 1 is the mean, n = 3 the proxy's argmax
    proxy = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    outlier = np.array([[1.0, 4.0, 2.0], [3.0, 5.0, 6.0]])
    table = with_outlier(pd.DataFrame({"n": [1, 3]}), proxy, outlier, [1, 3], n_boot=20, ci=0.9, seed=0)
    assert table.outlier.tolist() == pytest.approx([(7 / 3 + 14 / 3) / 2, (4.0 + 6.0) / 2])
    assert (table.outlier_lo <= table.outlier).all() and (table.outlier <= table.outlier_hi).all()
    # n = 2 by hand: the best of a random pair is the top sample w.p. 2/3 and the middle one w.p. 1/3
    two = with_outlier(pd.DataFrame({"n": [2]}), proxy, outlier, [2], n_boot=0, ci=0.9, seed=0)
    assert two.outlier.iloc[0] == pytest.approx(((2 / 3) * 4 + (1 / 3) * 2 + (2 / 3) * 6 + (1 / 3) * 3) / 2)

    rows = [dict(step=s, prompt_id=p, sample_idx=i, kl_k1=0.1 * s, kl_k3=0.1 * s, proxy=s + i, gold=1.0 - s,
                 outlier=10 * s + i + (p == "b"))
            for s in (0, 1) for p in ("a", "b") for i in (0, 1)]
    frame = pd.DataFrame(rows)
    curve = rl_curve_table(frame, n_boot=10, ci=0.9, seed=0)
    assert curve.outlier.tolist() == pytest.approx([1.0, 11.0])  # (0.5 + 1.5) / 2, (10.5 + 11.5) / 2
    plain = rl_curve_table(frame.drop(columns="outlier"), n_boot=10, ci=0.9, seed=0)
    assert "outlier" not in plain and curve.drop(columns=["outlier", "outlier_lo", "outlier_hi"]).equals(plain)


# ------------------------------------------------------------------------------------------------------------ study
@pytest.mark.slow
def test_smoke_study_with_odin_and_inform_proxies(tmp_path):
    from pipeline.cache import ArtifactCache
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    tree = yaml.safe_load(SMOKE.read_text())
    tree["proxies"] = [{"name": "odin", "type": "odin", "head_width": 16},
                       {"name": "inform", "type": "inform", "head_width": 16, "ib_dim": 8}]
    tree["ppo"]["proxies"] = ["inform"]
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tree))
    overrides = [f"run.cache_root={tmp_path / 'cache'}", f"run.reports_dir={tmp_path / 'report'}"]
    assert main(["run", str(config), *overrides]) == 0

    cfg = load_config(config, overrides)
    cache = ArtifactCache(cfg.run.cache_root)
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in Runner(build_stages(cfg), cache).plan()}
    assert json.loads((art["train_proxy[odin]"] / "model" / HEAD_CONFIG_FILE).read_text())["head"]["outputs"] == 2
    assert (art["train_proxy[inform]"] / LATENT_STATS_FILE).is_file()
    assert not (art["train_proxy[odin]"] / LATENT_STATS_FILE).exists()
    # only the inform proxy's artifacts gain an outlier column
    assert list(pd.read_parquet(art["bon_score[odin]"] / "scores.parquet").columns) == SCORE_COLUMNS
    scores = pd.read_parquet(art["bon_score[inform]"] / "scores.parquet")
    assert list(scores.columns) == [*SCORE_COLUMNS, "outlier"] and (scores.outlier >= 0).all()
    assert "outlier" not in pd.read_parquet(art["bon_curve[odin]"] / "curve.parquet")
    bon = pd.read_parquet(art["bon_curve[inform]"] / "curve.parquet")
    first = bon.iloc[0]  # n = 1: the mean outlier over all samples
    assert first.n == 1 and first.outlier == pytest.approx(scores.outlier.mean(), abs=1e-9)
    rl = pd.read_parquet(art["ppo_curve[inform]"] / "curve.parquet")
    assert rl.outlier.notna().all() and len(rl) >= 2
    report = (tmp_path / "report" / "README.md").read_text()
    assert report.count("latent outlier") >= 3 and "ODIN" in report and "InfoRM" in report
    assert not math.isnan(pd.read_csv(tmp_path / "report" / "bon_curves.csv").query("proxy_name == 'inform'")
                          .outlier.iloc[0])
