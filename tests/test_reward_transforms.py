"""Reward transforms of the RL arms (`ppo.reward_transform`): each transform against numbers worked out by hand, the
dispatcher, the config's validation, fingerprints left alone by the default, and a short PPO run with PAR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import reward_transforms as rt
from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, RewardTransformConfig, load_config
from pipeline.ppo.rollout import prompt_batch
from pipeline.runner import Runner, fingerprint_view
from pipeline.study import build_stages

REPO = Path(__file__).resolve().parents[1]
SMOKE, TINY = REPO / "configs" / "smoke.yaml", REPO / "configs" / "tiny.yaml"

SCORES = torch.tensor([-2.0, 0.5, 1.0, 3.0])
REFERENCE = torch.tensor([0.0, 0.5, 2.0, 1.0])


def test_clip_bounds_the_scores():
    assert rt.clip(SCORES, -1.0, 2.0).tolist() == [-1.0, 0.5, 1.0, 2.0]


def test_par_is_the_sigmoid_of_the_score_centred_on_the_reference():
    # r − r_ref = −2, 0, −1, 2; σ(x) = 1 / (1 + e^−x)
    expected = [1 / (1 + math.e ** 2), 0.5, 1 / (1 + math.e), 1 / (1 + math.e ** -2)]
    assert rt.par(SCORES, REFERENCE).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([0.1192029, 0.5, 0.2689414, 0.8807971], rel=1e-6)


def test_log_sigmoid_centring():
    # log σ(x) = −log(1 + e^−x) at x = −2, 0, −1, 2
    expected = [-math.log(1 + math.e ** 2), -math.log(2), -math.log(1 + math.e), -math.log(1 + math.e ** -2)]
    assert rt.log_sigmoid_centred(SCORES, REFERENCE).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([-2.1269280, -0.6931472, -1.3132617, -0.1269280], rel=1e-6)
    # far below the reference it is r − c itself; far above it, 0 (computed stably, no overflow)
    far = rt.log_sigmoid_centred(torch.tensor([-100.0, 100.0]), torch.tensor([0.0, 0.0]))
    assert far.tolist() == pytest.approx([-100.0, 0.0], abs=1e-6)


def test_per_prompt_normalisation_uses_each_prompts_mean_and_unbiased_std():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, 4.0, 7.0, 1.0])
    prompts = torch.tensor([5, 5, 2, 2, 9, 9, 9])
    # prompt 5: mean 2, sd √((1 + 1) / 1) = √2; prompt 2: all equal -> 0; prompt 9: mean 4, sd √((0 + 9 + 9) / 2) = 3
    expected = [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0, 0.0, 1.0, -1.0]
    assert rt.per_prompt_normalise(scores, prompts).tolist() == pytest.approx(expected, abs=1e-6)


def test_per_prompt_normalisation_refuses_a_prompt_with_one_rollout():
    with pytest.raises(ValueError, match=r"1 of 2 prompt\(s\) have one.*ppo\.reward_transform\.rollouts_per_prompt"):
        rt.per_prompt_normalise(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_the_dispatcher_routes_each_kind():
    ids = torch.tensor([0, 0, 1, 1])
    cfg = RewardTransformConfig(kind="clip", clip_range=(0.0, 1.0))
    assert rt.transform_rewards("none", SCORES, None, ids, RewardTransformConfig()) is SCORES
    assert rt.transform_rewards("clip", SCORES, None, ids, cfg).tolist() == [0.0, 0.5, 1.0, 1.0]
    assert torch.equal(rt.transform_rewards("par", SCORES, REFERENCE, ids, cfg), torch.sigmoid(SCORES - REFERENCE))
    assert rt.transform_rewards("log_sigmoid", SCORES, REFERENCE, ids, cfg).tolist() == pytest.approx(
        torch.log(torch.sigmoid(SCORES - REFERENCE)).tolist(), rel=1e-6)
    # prompt 0: −2, 0.5 -> mean −0.75, sd 1.25·√2; prompt 1: 1, 3 -> mean 2, sd √2
    s = 1 / math.sqrt(2)
    assert rt.transform_rewards("per_prompt_norm", SCORES, None, ids, cfg).tolist() == pytest.approx(
        [-s, s, -s, s], abs=1e-6)
    with pytest.raises(ValueError, match="needs the reference responses' scores"):
        rt.transform_rewards("par", SCORES, None, ids, cfg)
    with pytest.raises(ValueError, match="unknown reward transform 'tanh'"):
        rt.transform_rewards("tanh", SCORES, None, ids, cfg)


@pytest.mark.parametrize("value, message", [
    ("{kind: clip, clip_range: [1.0, -1.0]}", r"ppo\.reward_transform\.clip_range: lo \(1\.0\) must be below hi"),
    ("{kind: clip, clip_range: [0.5, 0.5]}", r"ppo\.reward_transform\.clip_range: lo \(0\.5\) must be below hi"),
    ("{kind: clip}", r"ppo\.reward_transform\.clip_range: \[lo, hi\] is required"),
    ("{kind: per_prompt_norm}", r"ppo\.reward_transform\.rollouts_per_prompt must be ≥ 2"),
    ("{kind: per_prompt_norm, rollouts_per_prompt: 3}", r"divisible by ppo\.reward_transform\.rollouts_per_prompt"),
    ("{kind: sqrt}", r"reward_transform\.kind"),
])
def test_the_config_refuses_what_a_transform_cannot_run_with(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [f"ppo.reward_transform={value}"])  # smoke: 8 rollouts per update on one process


def test_repeated_prompts_keep_groups_whole_and_leave_the_plain_sequence_alone():
    assert prompt_batch(3, 10, 4, 0, repeats=1).tolist() == prompt_batch(3, 10, 4, 0).tolist()
    grouped = prompt_batch(3, 10, 8, 0, repeats=2)
    assert grouped.tolist() == np.repeat(prompt_batch(3, 10, 4, 0), 2).tolist()


def _fingerprints(overrides: list[str], tmp_path) -> dict[str, str]:
    cfg = load_config(TINY, [f"run.cache_root={tmp_path / 'cache'}", *overrides])
    return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()


def test_the_default_leaves_the_demos_fingerprints_and_a_transform_moves_only_the_rl_stages(tmp_path):
    default = _fingerprints([], tmp_path)
    ppo_stage = next(n for n in build_stages(load_config(TINY)) if n.stage == "ppo")
    assert "reward_transform" not in fingerprint_view(ppo_stage.config.ppo)  # as before the option existed
    assert _fingerprints(["ppo.reward_transform={kind: none}"], tmp_path) == default
    par = _fingerprints(["ppo.reward_transform={kind: par}"], tmp_path)
    moved = {k for k in default if par[k] != default[k]}
    rl_stages = {"ppo", "ppo_sample", "ppo_gold", "ppo_curve", "report"}  # and the OOD copies (tiny.yaml's ood:)
    assert moved and all(k.split("[")[0].removesuffix("_ood") in rl_stages for k in moved)
    assert any(k.startswith("ppo[") for k in moved)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """One cache for the short runs below, so the smoke study's upstream stages run once."""
    return tmp_path_factory.mktemp("transforms")


def _short_ppo_metrics(root: Path, transform: str, *extra: str) -> list[dict]:
    """Two PPO updates on the smoke study with `ppo.reward_transform=transform`; the metrics rows."""
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}", "ppo.steps=2",
                 f"ppo.reward_transform={transform}", *extra]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = {p.node.key: p for p in runner.run(until={"ppo[bt]"})}
    art = runner.cache.path("ppo[bt]", plan["ppo[bt]"].fingerprint)
    records = [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[k]) for r in records for k in ("score", "score_transformed", "policy_loss"))
    return records


def test_a_short_ppo_run_with_par_logs_transformed_scores_in_the_unit_interval(smoke_root):
    """Each update also samples one reference response per prompt from the initial policy and centres the sigmoid on
    the proxy's score of it."""
    for r in _short_ppo_metrics(smoke_root, "{kind: par}"):
        assert 0 < r["score_transformed"] < 1 and np.isfinite(r["score_reference"])
        assert r["score_transformed"] != r["score"]  # `score` stays the proxy's raw score


def test_log_sigmoid_with_a_lora_policy_samples_references_with_the_adapters_off(smoke_root):
    lora = "ppo.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    for r in _short_ppo_metrics(smoke_root, "{kind: log_sigmoid}", lora):
        assert r["score_transformed"] < 0 and np.isfinite(r["score_reference"])


def test_per_prompt_normalisation_in_ppo_groups_repeated_prompts(smoke_root):
    for r in _short_ppo_metrics(smoke_root, "{kind: per_prompt_norm, rollouts_per_prompt: 2}"):
        assert abs(r["score_transformed"]) < 1e-5  # each prompt's rollouts standardised: their mean is 0
        assert "score_reference" not in r
