"""Best-of-n stages on the smoke study: bon_sample (keys, determinism, resume), bon_score (gold, ensembles) and
bon_curve (table, fit, plot).

The smoke study runs once per module up to `gold_label`; the stage modules' `run(cfg, inputs, out)` are then called
directly on small configs (4 evaluation prompts x 8 samples, one prompt per shard).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import stages.bon_curve as bon_curve
import stages.bon_sample as bon_sample
import stages.bon_score as bon_score
import stages.train_proxy as train_proxy
from pipeline.bon import BON_CURVE_COLUMNS, KL_ESTIMATED_COLUMNS
from pipeline.cache import ArtifactCache
from pipeline.config import (
    BaseModelRef,
    BonCurveStageConfig,
    BonSampleStageConfig,
    GoldConfig,
    ProxyConfig,
    RMTrainingConfig,
    SamplingConfig,
    ScorerStageConfig,
    TrainProxyStageConfig,
    load_config,
)
from pipeline.records import SAMPLE_COLUMNS, SCORE_COLUMNS, messages, prompt_text, read_records, read_sample_shards
from pipeline.runner import Runner
from pipeline.scoring import EnsembleScorer, build_scorer, load_reward_scorer
from pipeline.study import build_stages
from pipeline.world import gold_reward

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
N_SAMPLES = 8
MAX_NEW = 12
MAX_LEN = 64



def sample_cfg(seed: int = 0, prompts_per_shard: int = 1) -> BonSampleStageConfig:
    return BonSampleStageConfig(n_samples=N_SAMPLES, sampling=SamplingConfig(max_new_tokens=MAX_NEW, batch_size=64),
                                seed=seed, prompts_per_shard=prompts_per_shard, backend="hf", policy=BaseModelRef())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study's world, sft_policy and gold_label, and one bon_sample artifact (4 shards of 1 prompt)."""
    root = tmp_path_factory.mktemp("bon_cache")
    cfg = load_config(SMOKE, [f"run.cache_root={root}"])
    cache = ArtifactCache(cfg.run.cache_root)
    plan = Runner(build_stages(cfg), cache).run(until={"gold_label"})
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan if p.status == "cached"}
    s = SimpleNamespace(world=art["world"], policy=art["sft_policy"], pairs=art["gold_label"], tmp=tmp_path_factory)
    s.samples = run_sample(s, sample_cfg(), tmp_path_factory.mktemp("samples"))
    return s


def run_sample(smoke, cfg: BonSampleStageConfig, out: Path) -> Path:
    bon_sample.run(cfg, {"prompts": smoke.world, "policy": smoke.policy}, out)
    return out


def run_score(smoke, cfg: ScorerStageConfig, inputs: dict) -> pd.DataFrame:
    out = smoke.tmp.mktemp(f"score_{cfg.name}")
    bon_score.run(cfg, {"samples": smoke.samples, **inputs}, out)
    return read_records(out / "scores.parquet", SCORE_COLUMNS).assign(_dir=str(out))


def score_dir(frame: pd.DataFrame) -> Path:
    return Path(frame["_dir"].iloc[0])


# ---------------------------------------------------------------------------------------------------------- bon_sample


def test_bon_sample_writes_shards_keyed_by_prompt_and_sample(smoke):
    eval_prompts = pd.read_parquet(smoke.world / "eval_prompts.parquet")
    shards = sorted((smoke.samples / "shards").glob("*"))
    assert [f.name for f in shards] == [f"shard_{i:05d}.parquet" for i in range(len(eval_prompts))]
    assert json.loads((smoke.samples / "samples.json").read_text()) == {
        "prompts": len(eval_prompts), "n_samples": N_SAMPLES, "shards": len(eval_prompts)}
    for i, f in enumerate(shards):  # one prompt per shard, in the order of the prompt file
        shard = read_records(f, SAMPLE_COLUMNS)
        assert set(shard.prompt_id) == {eval_prompts.prompt_id[i]}

    frame = read_sample_shards(smoke.samples)
    assert list(frame.columns) == SAMPLE_COLUMNS
    assert len(frame) == len(eval_prompts) * N_SAMPLES
    assert not frame.duplicated(["prompt_id", "sample_idx"]).any()
    assert sorted(frame.prompt_id.unique()) == sorted(eval_prompts.prompt_id)
    for pid, group in frame.groupby("prompt_id"):
        assert sorted(group.sample_idx) == list(range(N_SAMPLES))
        expected = eval_prompts.set_index("prompt_id").prompt[pid]
        assert all(messages(p) == messages(expected) for p in group.prompt)  # the prompt stored as its messages
    assert frame.response.map(lambda r: isinstance(r, str)).all()
    assert frame.n_tokens.between(0, MAX_NEW).all()
    assert (frame.n_tokens[~frame.finished] == MAX_NEW).all()  # an unfinished sample used its whole budget
    assert (frame.response.str.split().map(len) <= frame.n_tokens).all()
    assert frame.response.nunique() > 1


def test_bon_sample_is_deterministic_per_seed(smoke):
    again = run_sample(smoke, sample_cfg(), smoke.tmp.mktemp("samples_again"))
    pd.testing.assert_frame_equal(read_sample_shards(again), read_sample_shards(smoke.samples))
    other = run_sample(smoke, sample_cfg(seed=1), smoke.tmp.mktemp("samples_seed1"))
    a, b = read_sample_shards(smoke.samples), read_sample_shards(other)
    assert list(a.prompt_id) == list(b.prompt_id) and list(a.sample_idx) == list(b.sample_idx)
    assert (a.response != b.response).any()


def test_bon_sample_resumes_only_the_missing_shard(smoke, monkeypatch):
    out = smoke.tmp.mktemp("samples_resume")
    shutil.copytree(smoke.samples / "shards", out / "shards")
    shards = out / "shards"
    (shards / "shard_00002.parquet").unlink()  # a run killed before this shard was written ...
    (shards / "shard_00003.parquet.tmp").write_bytes(b"half-written")  # ... while writing another
    before = {f.name: f.stat().st_mtime_ns for f in shards.glob("*.parquet")}

    calls = []
    real = bon_sample.sample_responses

    def counting(model, tokenizer, prompts, n, sampling, seed, **kw):
        calls.append((len(prompts), seed))
        return real(model, tokenizer, prompts, n, sampling, seed, **kw)

    monkeypatch.setattr(bon_sample, "sample_responses", counting)
    run_sample(smoke, sample_cfg(), out)
    assert calls == [(1, 0 + 2)]  # one shard sampled, with that shard's seed
    assert {f.name: f.stat().st_mtime_ns for f in shards.glob("*.parquet") if f.name in before} == before
    assert sorted(f.name for f in shards.iterdir()) == [f"shard_{i:05d}.parquet" for i in range(4)]  # .tmp gone
    pd.testing.assert_frame_equal(read_sample_shards(out), read_sample_shards(smoke.samples))

    calls.clear()
    run_sample(smoke, sample_cfg(), out)  # complete: nothing is sampled (the model is not even loaded)
    assert calls == []


# ----------------------------------------------------------------------------------------------------------- bon_score


@pytest.fixture(scope="module")
def gold_scores(smoke) -> pd.DataFrame:
    return run_score(smoke, ScorerStageConfig(name="gold", gold=GoldConfig()), {})


def test_bon_score_gold_is_the_world_gold_reward(smoke, gold_scores):
    samples = read_sample_shards(smoke.samples)
    assert list(gold_scores.columns[:3]) == SCORE_COLUMNS
    assert list(gold_scores.prompt_id) == list(samples.prompt_id)
    assert list(gold_scores.sample_idx) == list(samples.sample_idx)
    expected = [gold_reward(prompt_text(p), r) for p, r in zip(samples.prompt, samples.response)]
    np.testing.assert_array_equal(gold_scores.score.to_numpy(), np.array(expected, dtype=float))
    assert gold_scores.score.nunique() > 1


ENSEMBLE = ProxyConfig(name="ens", type="ensemble", members=2, member_type="bt", head_width=16)


@pytest.fixture(scope="module")
def members(smoke):
    """Two trained bt members (seeds 0 and 1) and their bon_score artifacts."""
    out = []
    for m in ENSEMBLE.member_specs():
        art = smoke.tmp.mktemp(f"train_{m.name}")
        cfg = TrainProxyStageConfig(proxy=m, training=RMTrainingConfig(epochs=1, batch_size=32, max_length=MAX_LEN,
                                                                       n_train_pairs=64), base=BaseModelRef())
        train_proxy.run(cfg, {"pairs": smoke.pairs, "policy": smoke.policy}, art)
        scores = run_score(smoke, ScorerStageConfig(name=m.name, proxy=m, batch_size=64, max_length=MAX_LEN),
                           {"model": art})
        out.append(SimpleNamespace(spec=m, train=art, scores=scores))
    assert [m.spec.seed for m in out] == [0, 1]
    return out


def ensemble_inputs(members) -> dict:
    return ({f"member{i}": m.train for i, m in enumerate(members)}
            | {f"member{i}_scores": score_dir(m.scores) for i, m in enumerate(members)})


@pytest.mark.parametrize("combine,uwo_lambda", [("mean", 0.5), ("min", 0.5), ("uwo", 0.5), ("uwo", 3.0)])
def test_bon_score_ensemble_combines_member_scores_like_the_ensemble_scorer(smoke, members, combine, uwo_lambda):
    proxy = ENSEMBLE.model_copy(update={"combine": combine, "uwo_lambda": uwo_lambda})
    cfg = ScorerStageConfig(name="ens", proxy=proxy, batch_size=64, max_length=MAX_LEN)
    inputs = ensemble_inputs(members)
    got = run_score(smoke, cfg, inputs)

    samples = read_sample_shards(smoke.samples)
    prompts, responses = [messages(p) for p in samples.prompt], list(samples.response)
    scorers = [load_reward_scorer(m.train / "model", batch_size=64, max_length=MAX_LEN) for m in members]
    stats = [json.loads((m.train / "reference_stats.json").read_text()) for m in members]
    direct = EnsembleScorer(scorers, stats, combine, uwo_lambda).score(prompts, responses)
    assert list(got.prompt_id) == list(samples.prompt_id) and list(got.sample_idx) == list(samples.sample_idx)
    assert not np.isnan(direct).any()
    np.testing.assert_allclose(got.score.to_numpy(), direct, rtol=1e-6, atol=1e-6)
    # the scorer eval_proxy builds for the same ensemble (from the members' models) agrees too
    np.testing.assert_allclose(build_scorer(cfg, {"samples": smoke.samples, **inputs}).score(prompts, responses),
                               direct, rtol=1e-6, atol=1e-6)

    z = np.stack([(m.scores.score.to_numpy() - s["mean"]) / s["std"] for m, s in zip(members, stats)])
    expected = {"mean": z.mean(0), "min": z.min(0), "uwo": z.mean(0) - uwo_lambda * z.var(0)}[combine]
    np.testing.assert_allclose(got.score.to_numpy(), expected, rtol=1e-9, atol=1e-9)
    assert (z[0] != z[1]).any()  # the members are different models


def test_bon_score_ensemble_refuses_misaligned_members(smoke, members, tmp_path):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    m1 = read_records(score_dir(members[1].scores) / "scores.parquet", SCORE_COLUMNS)
    m1.iloc[::-1].reset_index(drop=True).to_parquet(shuffled / "scores.parquet", index=False)
    inputs = ensemble_inputs(members) | {"member1_scores": shuffled}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="not aligned"):
        bon_score.run(ScorerStageConfig(name="ens", proxy=ENSEMBLE), {"samples": smoke.samples, **inputs}, out)


# ----------------------------------------------------------------------------------------------------------- bon_curve


def run_curve(smoke, proxy_scores: Path, gold_scores: Path, **kw) -> Path:
    cfg = BonCurveStageConfig(**({"proxy": "p", "ns": [1, 2, 4, 8], "bootstrap": 50, "ci": 0.9,
                                  "nested_estimator": False, "seed": 0} | kw))
    out = smoke.tmp.mktemp("curve")
    bon_curve.run(cfg, {"proxy_scores": proxy_scores, "gold_scores": gold_scores, "samples": smoke.samples}, out)
    return out


# the table of bon_curve_table with the estimated KL beside the bound and the standardised proxy after proxy_rel
_at, _std = BON_CURVE_COLUMNS.index("sqrt_kl_bound") + 1, BON_CURVE_COLUMNS.index("proxy_rel_hi") + 1
CURVE_COLUMNS = (BON_CURVE_COLUMNS[:_at] + KL_ESTIMATED_COLUMNS + BON_CURVE_COLUMNS[_at:_std]
                 + ["proxy_rel_std", "proxy_rel_std_lo", "proxy_rel_std_hi"] + BON_CURVE_COLUMNS[_std:])


def test_bon_curve_table_fit_and_plot(smoke, members, gold_scores):
    proxy_scores = members[0].scores
    out = run_curve(smoke, score_dir(proxy_scores), score_dir(gold_scores), ns=[1, 2, 4, 8, 16])
    curve = pd.read_parquet(out / "curve.parquet")
    assert list(curve.columns) == CURVE_COLUMNS
    assert list(curve.n) == [1, 2, 4, 8]  # n beyond the samples per prompt is dropped
    n = curve.n.to_numpy(dtype=float)
    np.testing.assert_allclose(curve.kl_bound, np.log(n) - (n - 1) / n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.sqrt_kl_bound, np.sqrt(curve.kl_bound), rtol=0, atol=1e-12)
    assert curve.kl_bound.iloc[0] == 0 and curve.kl_bound.is_monotonic_increasing

    # n = 1 is the base policy: the mean over all samples (the unbiased estimator uses all N of them)
    assert curve.gold.iloc[0] == pytest.approx(gold_scores.score.mean(), abs=1e-12)
    assert curve.proxy.iloc[0] == pytest.approx(proxy_scores.score.mean(), abs=1e-9)
    np.testing.assert_allclose(curve.gold_rel, curve.gold - curve.gold.iloc[0], atol=1e-9)
    np.testing.assert_allclose(curve.proxy_rel, curve.proxy - curve.proxy.iloc[0], atol=1e-9)
    assert curve.proxy.is_monotonic_increasing  # best-of-n by the proxy raises the proxy
    for c in ["proxy", "gold", "proxy_rel", "gold_rel"]:
        assert (curve[f"{c}_lo"] <= curve[c] + 1e-12).all() and (curve[c] <= curve[f"{c}_hi"] + 1e-12).all()

    fit = json.loads((out / "fit.json").read_text())
    assert set(fit) == {"prompts", "samples_per_prompt", "gao_fit_gold_rel", "empirical_peak", "gold_at_max_n",
                        "gold_at_n1", "at_max_kl", "gao_fit_bootstrap", "kl_estimated", "empirical_peak_ci",
                        "fit_check"}
    assert fit["at_max_kl"] == {"n": 8, "kl_bound": pytest.approx(curve.kl_bound.iloc[-1]),
                                "gold": pytest.approx(curve.gold.iloc[-1])}
    boot = fit["gao_fit_bootstrap"]  # the same fit, with CIs from resampled prompts
    assert (boot["form"], boot["n_boot"], boot["ci"], boot["prompts"]) == ("bon", 50, 0.9, fit["prompts"])
    for key in ("alpha", "beta"):
        assert boot[key]["estimate"] == pytest.approx(fit["gao_fit_gold_rel"][key])
        assert boot[key]["lo"] <= boot[key]["estimate"] <= boot[key]["hi"]
    assert boot["r2"] <= 1.0
    assert set(fit["gao_fit_gold_rel"]) == {"alpha", "beta", "alpha_se", "beta_se", "d_star", "r_star"}
    assert set(fit["empirical_peak"]) == {"n", "kl_bound", "gold"}
    assert fit["prompts"] == gold_scores.prompt_id.nunique() and fit["samples_per_prompt"] == N_SAMPLES
    assert fit["gold_at_n1"] == pytest.approx(gold_scores.score.mean(), abs=1e-12)
    assert fit["gold_at_max_n"] == pytest.approx(curve.gold.iloc[-1])
    assert fit["empirical_peak"]["gold"] == pytest.approx(curve.gold.max())
    assert fit["empirical_peak"]["n"] in list(curve.n)
    assert math.isfinite(fit["gao_fit_gold_rel"]["alpha"]) and math.isfinite(fit["gao_fit_gold_rel"]["beta"])

    png = out / "curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_bon_curve_nested_columns_and_gold_as_its_own_proxy(smoke, members, gold_scores):
    out = run_curve(smoke, score_dir(members[0].scores), score_dir(gold_scores), nested_estimator=True)
    curve = pd.read_parquet(out / "curve.parquet")
    assert list(curve.columns) == CURVE_COLUMNS + ["gold_nested", "proxy_nested"]
    first = gold_scores[gold_scores.sample_idx == 0]
    assert curve.gold_nested.iloc[0] == pytest.approx(first.score.mean(), abs=1e-12)  # nested n=1: sample 0 only
    assert curve.gold_nested.iloc[-1] == pytest.approx(curve.gold.iloc[-1], abs=1e-9)  # n = N: both use all samples

    # selecting by the gold itself can only raise the gold
    out = run_curve(smoke, score_dir(gold_scores), score_dir(gold_scores))
    curve = pd.read_parquet(out / "curve.parquet")
    np.testing.assert_allclose(curve.proxy, curve.gold, atol=1e-12)
    assert (np.diff(curve.gold) >= -1e-12).all()
    g = gold_scores.pivot(index="prompt_id", columns="sample_idx", values="score").to_numpy()
    assert curve.gold.iloc[-1] == pytest.approx(g.max(axis=1).mean(), abs=1e-12)  # best of all N: the per-prompt max


def test_bon_score_refuses_samples_longer_than_the_scoring_limit(smoke, members, tmp_path):
    """Dropping unscored samples would bias best-of-n towards short ones: it is an error naming the setting."""
    m = members[0]
    cfg = ScorerStageConfig(name=m.spec.name, proxy=m.spec, batch_size=64, max_length=8)
    with pytest.raises(ValueError, match="bon.score_max_length"):
        bon_score.run(cfg, {"samples": smoke.samples, "model": m.train}, tmp_path)


def test_bon_curve_estimated_kl_standardised_proxy_and_fit_check(smoke, members, gold_scores):
    """The KL best-of-n has, estimated from the samples, lies under the bound at every n; the proxy is standardised by
    its spread over all samples; fit.json says whether the Gao fit describes the curve and where the data peaks."""
    proxy_scores = members[0].scores
    out = run_curve(smoke, score_dir(proxy_scores), score_dir(gold_scores))
    curve = pd.read_parquet(out / "curve.parquet")
    assert curve.kl_estimated.iloc[0] == pytest.approx(0.0, abs=1e-12)  # n = 1 is the initial policy
    assert (curve.kl_estimated <= curve.kl_bound + 1e-12).all()
    assert (curve.kl_estimated_lo <= curve.kl_estimated + 1e-12).all()
    assert (curve.kl_estimated <= curve.kl_estimated_hi + 1e-12).all()
    np.testing.assert_allclose(curve.sqrt_kl_estimated, np.sqrt(curve.kl_estimated))
    sd = proxy_scores.score.std(ddof=1)
    for suffix in ("", "_lo", "_hi"):
        np.testing.assert_allclose(curve[f"proxy_rel_std{suffix}"], curve[f"proxy_rel{suffix}"] / sd)

    fit = json.loads((out / "fit.json").read_text())
    for where, row in (("at_peak", curve.loc[curve.gold.idxmax()]), ("at_max_n", curve.iloc[-1])):
        kl = fit["kl_estimated"][where]
        assert kl["n"] == row.n and kl["kl_bound"] == pytest.approx(row.kl_bound)
        assert kl["kl_estimated"] == pytest.approx(row.kl_estimated) and kl["kl_estimated"] <= kl["kl_bound"] + 1e-12
    peak = fit["empirical_peak_ci"]
    assert peak["estimate"] == pytest.approx(curve.sqrt_kl_bound[curve.gold.idxmax()])
    assert peak["lo"] <= peak["estimate"] <= peak["hi"]
    assert peak["n"]["estimate"] == fit["empirical_peak"]["n"]
    assert peak["kl"]["estimate"] == pytest.approx(peak["estimate"] ** 2)
    check = fit["fit_check"]
    assert check["form"] == "bon" and isinstance(check["ok"], bool) and isinstance(check["peak_consistent"], bool)
    assert check["ok"] == (check["peak_consistent"] and check["misfit"]["ok"])
    assert (check["reason"] == "") == check["ok"]
    assert check["misfit"]["points"] == int((curve.sqrt_kl_bound > 0).sum())
    assert 0 <= check["misfit"]["count"] <= check["misfit"]["points"]
