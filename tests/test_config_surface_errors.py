"""Bad input on the launch, ood, sweep, RL variant and transform sections and the RewardBench files is a
ConfigError naming the key (and the file and column), raised while the config is loaded or by the preflight checks
`overopt run` makes before its first stage: never after proxies were trained."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.preflight import preflight

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
PAPER = ROOT / "configs" / "paper" / "gemma2b_unified_feedback.yaml"
PAPER_HF = ["bon.backend=hf", "ppo.eval.backend=hf"]  # vllm is not installed here; its own check comes first


# ------------------------------------------------------------------------------------------------- data files


def test_ood_prompts_file_missing_or_with_wrong_columns_fails_at_preflight(tmp_path):
    # ood_prompts runs after every proxy, best-of-n and RL stage: the file is checked before the first stage instead
    with pytest.raises(ConfigError, match=r"not found:\n  ood.prompts_path: .*missing.jsonl"):
        preflight(load_config(PAPER, PAPER_HF + ["ood.enabled=true", f"ood.prompts_path={tmp_path}/missing.jsonl"]))
    wrong = tmp_path / "wrong.jsonl"
    pd.DataFrame({"id": ["a"], "text": ["hi"]}).to_json(wrong, orient="records", lines=True)
    with pytest.raises(ConfigError, match=r"before any stage ran\):\n  ood.prompts_path: .*wrong.jsonl: missing "
                                          r"column 'prompt_id' .*it has \['id', 'text'\]"):
        preflight(load_config(PAPER, PAPER_HF + ["ood.enabled=true", f"ood.prompts_path={wrong}"]))
    not_text = tmp_path / "not_text.parquet"
    pd.DataFrame({"prompt_id": ["a"], "prompt": [3]}).to_parquet(not_text)
    with pytest.raises(ConfigError, match=r"ood.prompts_path: .*not_text.parquet: column 'prompt' row 0 is neither"):
        preflight(load_config(SMOKE, ["ood.enabled=true", f"ood.prompts_path={not_text}"]))


def test_rewardbench_files_of_the_wrong_schema_fail_at_preflight(tmp_path):
    rb = tmp_path / "rb.parquet"
    pd.DataFrame({"id": ["1"], "prompt": ["p"], "chosen": ["a"], "rejected": ["b"],
                  "subset": ["alpacaeval-easy"]}).to_parquet(rb)
    rb2 = tmp_path / "rb2.parquet"
    pd.DataFrame({"id": ["1"], "prompt": ["p"], "chosen": [["a"]], "rejected": [["b", "c"]],
                  "subset": ["Math"]}).to_parquet(rb2)
    no_subset = tmp_path / "no_subset.parquet"
    pd.DataFrame({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(no_subset)
    preflight(load_config(SMOKE, [f"eval_proxy.rewardbench_path={rb}", f"eval_proxy.rewardbench2_path={rb2}"]))
    with pytest.raises(ConfigError, match=r"eval_proxy.rewardbench_path: .*no_subset.parquet: missing required "
                                          r"column\(s\) \['subset'\]"):
        preflight(load_config(SMOKE, [f"eval_proxy.rewardbench_path={no_subset}"]))
    with pytest.raises(ConfigError, match=r"eval_proxy.rewardbench_path: .*rb2.parquet: row 0 \(id 1\): column "
                                          r"'chosen' must be a string .*goes in eval_proxy.rewardbench2_path"):
        preflight(load_config(SMOKE, [f"eval_proxy.rewardbench_path={rb2}"]))
    with pytest.raises(ConfigError, match=r"eval_proxy.rewardbench2_path: .*rb.parquet: row 0 \(id 1\): column "
                                          r"'chosen' must be a non-empty list of strings"):
        preflight(load_config(SMOKE, [f"eval_proxy.rewardbench2_path={rb}"]))


def test_a_bad_data_file_stops_overopt_run_before_the_first_stage(tmp_path, capsys):
    wrong = tmp_path / "pairs.jsonl"
    pd.DataFrame({"prompt": ["p"], "good": ["a"]}).to_json(wrong, orient="records", lines=True)
    code = main(["run", str(SMOKE), f"run.cache_root={tmp_path / 'cache'}", f"knowledge.pairs_path={wrong}"])
    err = capsys.readouterr().err
    assert code != 0
    assert "knowledge.pairs_path: " in err and "missing column 'clean'" in err, err
    assert not (tmp_path / "cache" / "world").exists()


# ------------------------------------------------------------------------------------------- RL sections

RL = ["rl.proxies=[bt]", "rl.num_processes=1", "rl.deepspeed_config=null", "rl.steps=2", "rl.prompts_per_step=2",
      "rl.group_size=2", "rl.minibatches=1"]


@pytest.mark.parametrize("overrides, message", [
    # a clip_range beside another kind was silently unused
    (["ppo.reward_transform.kind=par", "ppo.reward_transform.clip_range=[0, 1]"],
     r"ppo.reward_transform.clip_range is read only with kind clip \(kind is 'par'\)"),
    (RL + ["rl.reward_transform.kind=log_sigmoid", "rl.reward_transform.clip_range=[0, 1]"],
     r"rl.reward_transform.clip_range is read only with kind clip \(kind is 'log_sigmoid'\)"),
    # a variant inheriting clip's range must null it when it changes the kind
    (["ppo.reward_transform={kind: clip, clip_range: [0, 1]}", "ppo.variants={p: {reward_transform: {kind: par}}}"],
     r"ppo.variants.p \(the ppo section with its overrides\): ppo.reward_transform.clip_range is read only with kind "
     r"clip .*null where it is inherited"),
    # empty or repeated algorithms: no arm, or a raw "duplicate stage keys in the DAG"
    (RL + ["rl.algos=[]"], r"rl.algos is empty"),
    (RL + ["rl.algos=[grpo, rloo, grpo]"], r"rl.algos \['grpo', 'rloo', 'grpo'\] names an algorithm twice"),
    # an empty proxy list made an arm with no runs, silently
    (["ppo.proxies=[]"], r"ppo.proxies is empty: no run would be made"),
    (RL + ["rl.proxies=[]"], r"rl.proxies is empty"),
    (["ppo.variants={kl: {proxies: []}}"], r"ppo.variants.kl.proxies is empty"),
    # a variant that changes nothing re-trains the plain arm under other stage keys
    (["ppo.variants={kl: {}}"], r"ppo.variants.kl changes no PPO setting \(its overrides \{\}"),
    (["ppo.variants={kl: {kl_coef: 0.0, proxies: [bt]}}"], r"ppo.variants.kl changes no PPO setting"),
])
def test_bad_rl_settings_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


def test_a_variant_that_sets_the_kind_and_nulls_the_range_is_accepted():
    cfg = load_config(SMOKE, ["ppo.reward_transform={kind: clip, clip_range: [0, 1]}",
                              "ppo.variants={p: {reward_transform: {kind: par, clip_range: null}}}"])
    assert cfg.ppo.variant("p").reward_transform.kind == "par"
    assert cfg.ppo.variant("p").reward_transform.clip_range is None


# ------------------------------------------------------------------------------------------------------ sweep


def _sweep_config(tmp_path, sweep: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SMOKE.read_text() + f"\nsweep: {sweep}\n")
    return path


@pytest.mark.parametrize("sweep, message", [
    # a section the study does not have would be created, with its defaults, in every point (two more RL arms)
    ("{rl.steps: [2, 4]}", r"sweep key 'rl.steps': the study has no rl section, so setting rl.steps would add one"),
    # a key the study does not read (BT has no alpha) made points that are one study under two names
    ("{proxies.bt.alpha: [0.1, 0.2]}", r"sweep key 'proxies.bt.alpha': values 0.1 and 0.2 make the same study"),
    ("{'proxies.bt.margin_scale,proxies.grm_sft.margin_scale': [1.0, 2.0]}",
     r"sweep key 'proxies.bt.margin_scale,proxies.grm_sft.margin_scale': values 1.0 and 2.0 make the same study"),
])
def test_a_sweep_key_the_study_does_not_have_is_named(tmp_path, sweep, message):
    from pipeline.sweep import expand_sweep

    with pytest.raises(ConfigError, match=message):
        expand_sweep(_sweep_config(tmp_path, sweep))


def test_a_sweep_key_that_changes_the_study_still_expands(tmp_path):
    from pipeline.sweep import expand_sweep

    _, points = expand_sweep(_sweep_config(tmp_path, "{'proxies.grm_sft.alpha,proxy_training.lr': [0.1, 0.2]}"))
    assert [p.config.proxy_training.lr for p in points] == [0.1, 0.2]
    assert [p.config.proxies[1].alpha for p in points] == [0.1, 0.2]


# ----------------------------------------------------------------------------------------------------- launch


def test_a_bad_launch_deepspeed_config_is_named_as_the_user_wrote_it(tmp_path):
    from pipeline.preflight import check_deepspeed_configs

    missing = tmp_path / "ds.json"
    # no stage takes it (smoke's ppo sets its own null, no rl/dpo, proxies train in one process): it was ignored
    with pytest.raises(ConfigError, match=r"before any stage ran\):\n  launch.deepspeed_config: .*ds.json: not found"):
        check_deepspeed_configs(load_config(SMOKE, [f"launch.deepspeed_config={missing}"]), cuda=False)
    # a dpo section that sets none takes it as its default: the error names both keys
    with pytest.raises(ConfigError, match=r"\n  dpo.deepspeed_config \(= launch.deepspeed_config\): .*ds.json: not "
                                          r"found$"):
        check_deepspeed_configs(load_config(SMOKE, [f"launch.deepspeed_config={missing}", "dpo={batch_size: 8}"]),
                                cuda=False)
