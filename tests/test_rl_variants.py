"""Policy-side mitigations compared on the same curves: named PPO variants (`ppo.variants`, each an RL arm `ppo_<name>`
beside plain PPO, compared with it at matched KL) and reward transforms for GRPO / RLOO (`rl.reward_transform`) —
expansion into stages, the plain arm left as it was, errors naming the key, the comparison family, the group-RL reward
function against hand-computed values, and a smoke-size study with one variant run to its report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, RewardTransformConfig, load_config
from pipeline.report_data import arm_name
from pipeline.runner import Runner, fingerprint_view
from pipeline.study import build_stages, rl_runs
from stages.group_rl import TransformedReward, reference_scorer, reference_seed
from stages.report import _matched_comparisons, setting_lines

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
CLIP = "{reward_transform: {kind: clip, clip_range: [-1.0, 1.0]}}"
VARIANTS = f"ppo.variants={{clip: {CLIP}, kl_fixed: {{kl_coef: 0.05, proxies: [bt, grm_sft]}}}}"


def _nodes(*overrides: str) -> dict:
    return {n.key: n for n in build_stages(load_config(SMOKE, list(overrides)))}


def test_each_variant_is_an_arm_of_its_own_sharing_seeds_eval_and_launch():
    plain, nodes = _nodes(), _nodes(VARIANTS)
    added = sorted(set(nodes) - set(plain))
    assert added == sorted(f"{arm}{role}[{p}]" for arm, proxies in (("ppo_clip", ["bt"]),
                                                                    ("ppo_kl_fixed", ["bt", "grm_sft"]))
                           for p in proxies for role in ("", "_sample", "_gold", "_curve"))
    clip = nodes["ppo_clip[bt]"].config.ppo
    assert clip.reward_transform == RewardTransformConfig(kind="clip", clip_range=(-1.0, 1.0))
    assert clip.kl_coef == 0.0 and nodes["ppo_kl_fixed[grm_sft]"].config.ppo.kl_coef == 0.05
    # apart from its overrides, a variant's training settings are the ppo section's
    base = nodes["ppo[bt]"].config.ppo
    assert clip.model_copy(update={"reward_transform": base.reward_transform}) == base
    assert nodes["ppo_clip[bt]"].stage == "ppo" and nodes["ppo_clip_curve[bt]"].inputs["samples"] == \
        "ppo_clip_sample[bt]"
    # the evaluation, gold scoring and launch are shared: the same configs as the plain arm's
    for role in ("_sample", "_gold"):
        assert nodes[f"ppo_clip{role}[bt]"].config == nodes[f"ppo{role}[bt]"].config
    assert (nodes["ppo_clip[bt]"].launcher, nodes["ppo_clip[bt]"].num_processes) == \
        (nodes["ppo[bt]"].launcher, nodes["ppo[bt]"].num_processes)


def test_adding_variants_leaves_every_other_stage_as_it_was(tmp_path):
    """The plain PPO arm (and everything upstream) keeps its configs and fingerprints; only the report moves."""
    plain, nodes = _nodes(), _nodes(VARIANTS)
    for key, node in plain.items():
        if key != "report":
            assert fingerprint_view(nodes[key].config) == fingerprint_view(node.config), key
            assert nodes[key].inputs == node.inputs, key
    assert "variants" not in nodes["ppo[bt]"].config.ppo.model_dump(exclude_defaults=True)

    def fingerprints(*overrides):
        cfg = load_config(SMOKE, [f"run.cache_root={tmp_path}", *overrides])
        return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()

    before, after = fingerprints(), fingerprints(VARIANTS)
    assert [k for k in before if before[k] != after[k]] == ["report"]


def test_rl_runs_and_the_report_name_the_variants():
    cfg = load_config(SMOKE, [VARIANTS])
    assert rl_runs(cfg) == {"ppo": {"bt": ["bt"]}, "ppo_clip": {"bt": ["bt"]},
                            "ppo_kl_fixed": {"bt": ["bt"], "grm_sft": ["grm_sft"]}}
    report = _nodes(VARIANTS)["report"]
    assert report.config.rl_runs == rl_runs(cfg)
    assert {"ppo_clip[bt]", "ppo_kl_fixed[grm_sft]"} <= set(report.inputs)
    assert report.inputs["ppo_kl_fixed[grm_sft]"] == "ppo_kl_fixed_curve[grm_sft]"
    assert [arm_name(a) for a in rl_runs(cfg)] == ["PPO", "PPO (clip)", "PPO (kl_fixed)"]
    lines = setting_lines(report.config, {})
    assert "- **PPO (clip)**: against `bt`, 1 seed each; the ppo section's settings with reward_transform.kind = " \
           "clip, reward_transform.clip_range = [-1.0, 1.0]." in lines
    assert "- **PPO (kl_fixed)**: against `bt`, `grm_sft`, 1 seed each; the ppo section's settings with kl_coef = " \
           "0.05, proxies = [\"bt\", \"grm_sft\"]." in lines
    assert "- **PPO**: against `bt`, 1 seed each." in lines


@pytest.mark.parametrize("variants, message", [
    ("{clip: {reward_transfrom: {kind: clip}}}", r"ppo\.variants\.clip\.reward_transfrom is not a PPO setting "
                                                 r"\(did you mean 'reward_transform'\?\)"),
    ("{kl: {eval: {n_samples: 2}}}", r"ppo\.variants\.kl\.eval: a variant shares the ppo section's eval"),
    ("{kl: {seeds: 3}}", r"ppo\.variants\.kl\.seeds: a variant shares"),
    ("{kl: {num_processes: 2}}", r"ppo\.variants\.kl\.num_processes: a variant shares"),
    ("{kl: {kl_coef: -1}}", r"ppo\.variants\.kl\.kl_coef: Input should be greater than or equal to 0"),
    ("{kl: {adaptive_kl: {targt: 3}}}", r"ppo\.variants\.kl\.adaptive_kl\.targt: unknown key"),
    ("{clip: {reward_transform: {kind: clip}}}", r"ppo\.variants\.clip \(the ppo section with its overrides\): "
                                                 r"ppo\.reward_transform\.clip_range: \[lo, hi\] is required"),
    ("{kl: {proxies: [bt, nope]}}", r"ppo\.variants\.kl\.proxies names \['nope'\]"),
    ("{kl-2: {kl_coef: 1}}", r"ppo\.variants\.kl-2: a variant's name must match"),
    ("{sample: {kl_coef: 1}}", r"ppo\.variants\.sample: .*not be or end in sample, gold, curve"),
    ("{kl_curve: {kl_coef: 1}}", r"ppo\.variants\.kl_curve: .*not be or end in sample, gold, curve"),
])
def test_a_bad_variant_is_refused_naming_its_key(variants, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [f"ppo.variants={variants}"])


def test_a_nested_override_is_merged_into_the_sections_value():
    cfg = load_config(SMOKE, ["ppo.sampling.temperature=0.7", "ppo.variants={short: {sampling: {max_new_tokens: 4}}}"])
    sampling = cfg.ppo.variant("short").sampling
    assert (sampling.max_new_tokens, sampling.temperature) == (4, 0.7)


def test_comparisons_are_algorithm_pairs_and_each_variant_against_plain_ppo():
    arms = {"ppo": {"bt": ["bt", "bt@seed1"], "grm": ["grm", "grm@seed1"]},
            "ppo_clip": {"bt": ["bt", "bt@seed1"], "grm": ["grm", "grm@seed1"]},
            "ppo_kl": {"bt": ["bt", "bt@seed1"]},
            "grpo": {"bt": ["bt", "bt@seed1"]}, "rloo": {"bt": ["bt", "bt@seed1"]}}
    rng = np.random.default_rng(0)
    per_run = pd.DataFrame([{"arm": arm_name(a), "proxy_name": p, "run": r, "quantity": "q", "value": rng.normal()}
                            for a, by_proxy in arms.items() for p, rs in by_proxy.items() for r in rs])
    rows = _matched_comparisons(arms, per_run, ["q"])
    assert sorted(r["what"] for r in rows) == sorted([
        "GRPO − PPO against `bt`, q", "RLOO − PPO against `bt`, q", "RLOO − GRPO against `bt`, q",
        "PPO (clip) − PPO against `bt`, q", "PPO (kl) − PPO against `bt`, q", "PPO (clip) − PPO against `grm`, q",
        "`grm` − `bt` under PPO, q"])
    row = next(r for r in rows if r["what"] == "PPO (clip) − PPO against `grm`, q")
    value = per_run.set_index(["arm", "proxy_name", "run"]).value
    expected = np.mean([value["PPO (clip)", "grm", r] - value["PPO", "grm", r] for r in ("grm", "grm@seed1")])
    assert row["difference"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------- GRPO/RLOO


class FakeRaw:
    """A reward function giving fixed raw scores (the proxy's, as `TRLRewardFunction` would)."""

    __name__ = "bt"

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, prompts, completions, completion_ids, prompt_id=None, **_):
        return list(self.scores)


RAW = [-2.0, 0.5, 1.0, 3.0]
PROMPT_IDS = ["p7", "p7", "p3", "p3"]  # two prompts, two completions each (a group)
PROMPTS = [[{"role": "user", "content": f"prompt {p}"}] for p in PROMPT_IDS]


def _call(transform: str, reference=None, metrics=None):
    reward = TransformedReward(FakeRaw(RAW), RewardTransformConfig.model_validate(transform), reference)
    log = (lambda k, v: metrics.append((k, v))) if metrics is not None else None
    return reward(prompts=PROMPTS, completions=[[]] * 4, completion_ids=[[1]] * 4, prompt_id=PROMPT_IDS,
                  log_metric=log, trainer_state=None)


def test_the_group_rl_reward_clips_the_proxys_scores():
    assert _call({"kind": "clip", "clip_range": [-1.0, 2.0]}) == [-1.0, 0.5, 1.0, 2.0]
    assert _call({"kind": "none"}) == RAW


def test_the_group_rl_reward_centres_par_and_log_sigmoid_on_each_prompts_reference():
    calls = []

    def reference(chats, ids, update):
        calls.append((chats, ids, update))
        return torch.tensor({"p7": [0.0], "p3": [2.0]}[ids[0]] + {"p7": [0.0], "p3": [2.0]}[ids[1]])

    metrics = []
    # r − r_ref = −2, 0.5, −1, 1
    par = _call({"kind": "par"}, reference, metrics)
    assert par == pytest.approx([1 / (1 + math.e ** 2), 1 / (1 + math.e ** -0.5), 1 / (1 + math.e),
                                 1 / (1 + math.e ** -1)], rel=1e-6)
    assert par == pytest.approx([0.1192029, 0.6224593, 0.2689414, 0.7310586], rel=1e-6)
    assert calls == [([PROMPTS[0], PROMPTS[2]], ["p7", "p3"], 0)]  # one reference per distinct prompt
    assert metrics == [("score_raw", pytest.approx(0.625)), ("score_reference", pytest.approx(1.0))]
    log_sigmoid = _call({"kind": "log_sigmoid"}, reference)
    assert log_sigmoid == pytest.approx([-math.log(1 + math.e ** 2), -math.log(1 + math.e ** -0.5),
                                         -math.log(1 + math.e), -math.log(1 + math.e ** -1)], rel=1e-6)


def test_the_reward_counts_updates_for_the_reference_seeds():
    seen = []
    reward = TransformedReward(FakeRaw(RAW), RewardTransformConfig(kind="par"),
                               lambda chats, ids, update: seen.append(update) or torch.zeros(len(ids)))
    for _ in range(3):
        reward(prompts=PROMPTS, completions=[[]] * 4, completion_ids=[[1]] * 4, prompt_id=PROMPT_IDS)
    assert seen == [0, 1, 2]
    assert reference_seed(0, 1, "p7") == reference_seed(0, 1, "p7")
    assert len({reference_seed(0, 1, "p7"), reference_seed(0, 2, "p7"), reference_seed(0, 1, "p3"),
                reference_seed(1, 1, "p7")}) == 4


@pytest.mark.parametrize("value, message", [
    ("{kind: per_prompt_norm}", r"rl\.reward_transform\.kind 'per_prompt_norm' is not for group-baseline RL"),
    ("{kind: par, rollouts_per_prompt: 2}", r"rl\.reward_transform\.rollouts_per_prompt is PPO's"),
    ("{kind: clip}", r"rl\.reward_transform\.clip_range: \[lo, hi\] is required"),
    ("{kind: clip, clip_range: [1, 0]}", r"rl\.reward_transform\.clip_range: lo \(1\.0\) must be below hi"),
])
def test_the_rl_section_refuses_a_transform_it_cannot_run(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [f"rl={{reward_transform: {value}}}"])


def test_an_rl_transform_moves_only_the_group_rl_arms(tmp_path):
    def fingerprints(*overrides):
        cfg = load_config(SMOKE, [f"run.cache_root={tmp_path}", "rl={algos: [grpo]}", *overrides])
        return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()

    before, after = fingerprints(), fingerprints("rl.reward_transform={kind: par}")
    assert before == fingerprints("rl.reward_transform={kind: none}")
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {"grpo[bt]", "grpo[grm_sft]", "grpo_sample[bt]", "grpo_sample[grm_sft]", "grpo_gold[bt]",
                     "grpo_gold[grm_sft]", "grpo_curve[bt]", "grpo_curve[grm_sft]", "report"}


# ------------------------------------------------------------------------------------------------------ a short study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke study (PPO against `bt`, 2 updates) with one variant, PPO with a KL penalty, run to its report."""
    root = tmp_path_factory.mktemp("variants")
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}", "ppo.steps=2",
                 "knowledge.enabled=false", "ppo.variants={kl: {kl_coef: 0.5}}"]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = runner.run()
    return {"cfg": cfg, "root": root, "art": {p.node.key: runner.cache.path(p.node.key, p.fingerprint) for p in plan}}


def test_a_study_with_a_variant_runs_it_and_reports_it_beside_ppo(study):
    import json

    art, root = study["art"], study["root"]
    kl = [json.loads(line) for line in (art["ppo_kl[bt]"] / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (art["ppo[bt]"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in kl] == [0.5, 0.5] and [r["kl_coef"] for r in plain] == [0.0, 0.0]
    table = pd.read_csv(root / "report" / "ppo_kl_curves.csv")
    assert table.step.tolist() == [0, 1, 2] and np.isfinite(table.gold).all()
    readme = (root / "report" / "README.md").read_text()
    assert "## PPO (kl)" in readme and "- **PPO (kl)**: against `bt`, 1 seed each; the ppo section's settings " \
                                      "with kl_coef = 0.5." in readme
    comparisons = pd.read_csv(root / "report" / "comparisons.csv")
    matched = comparisons[comparisons.family == "RL at matched KL"]
    assert set(matched.what.str.extract(r"^(.*) against")[0]) == {"PPO (kl) − PPO"}
    against_baseline = comparisons[comparisons.family == "RL against the baseline"]
    assert set(against_baseline.what.str.extract(r"^(.*), ")[0]) == {"PPO (kl) against `bt` − PPO against `bt`"}


def test_the_reference_scorer_samples_the_same_response_for_a_prompt_and_update(study):
    """GRPO / RLOO's par and log_sigmoid centre on a reference drawn from (seed, update, prompt): every process that
    holds completions of a prompt gets the same score, and the draw leaves the global RNG as it was."""
    from pipeline.generation import stop_token_ids
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.scoring import build_scorer
    from pipeline.study import _sample_scorer

    cfg, art = study["cfg"], study["art"]
    tokenizer = load_tokenizer(art["sft_policy"] / "model")
    policy = load_causal_lm(art["sft_policy"] / "model")
    scorer = build_scorer(_sample_scorer(cfg, cfg.proxies[0]), {"model": art["train_proxy[bt]"]})
    score = reference_scorer(policy, tokenizer, scorer, "bt", cfg.ppo.sampling, stop_token_ids(tokenizer), seed=0)
    chats = [[{"role": "user", "content": "list three fruits"}], [{"role": "user", "content": "name two tools"}]]
    state = torch.random.get_rng_state()
    first = score(chats, ["a", "b"], 0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(score(chats[::-1], ["b", "a"], 0), first.flip(0))  # per prompt, not per batch position
    assert first.shape == (2,) and torch.isfinite(first).all()
    draws = torch.stack([score(chats[:1], ["a"], u) for u in range(6)])
    assert len(set(draws.flatten().tolist())) > 1  # a new response each update


def test_the_mitigations_study_reuses_the_demos_stages():
    """configs/tiny_mitigations.yaml repeats tiny.yaml's world, policy, pairs, proxy training and PPO settings: every
    stage the two studies share (bt's proxies and its PPO run among them) has one fingerprint, so the mitigation
    study recomputes none of the demo's work; every mitigation is there."""
    from pipeline.cache import ArtifactCache
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = Runner(build_stages(load_config(configs / "tiny.yaml")), ArtifactCache("unused")).fingerprints()
    mit = Runner(build_stages(load_config(configs / "tiny_mitigations.yaml")), ArtifactCache("unused")).fingerprints()
    shared = [k for k in demo if k in mit and k != "report"]
    assert {"sft_policy", "gold_label", "train_proxy[bt]", "bon_score[gold]", "ppo[bt]", "ppo_curve[bt]"} <= set(shared)
    assert [k for k in shared if demo[k] != mit[k]] == []
    for key in ("warm_average[warm]", "train_proxy[centred]", "train_proxy[odin]", "train_proxy[inform@seed2]",
                "ppo[inform@seed2]", "ppo_clip[bt]", "ppo_par[bt]", "ppo_log_sigmoid[bt]", "ppo_per_prompt_norm[bt]",
                "ppo_kl_fixed[bt@seed2]", "ppo_kl_adaptive[bt]", "dpo[bt@seed2]"):
        assert key in mit, key
