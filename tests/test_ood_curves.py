"""Over-optimization under shift (`ood:`): the OOD prompts, the OOD copies of best-of-n's and every RL arm's evaluation
stages (same configs and seeds as ID, ID fingerprints unchanged), the paper-scale prompts file, and the report's OOD
part from a smoke study run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline import world as W
from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import ConfigError, OODPromptsStageConfig, load_config
from pipeline.records import RecordError, load_prompts_file, prompt_text, read_sample_shards, user_prompt
from pipeline.runner import Runner
from pipeline.study import build_stages
from stages import ood_prompts
from stages.report import labelled_sections

CONFIGS = Path(__file__).parents[1] / "configs"
SMOKE = CONFIGS / "smoke.yaml"
PAPER = CONFIGS / "paper" / "gemma2b_unified_feedback.yaml"
# every RL arm: PPO, a PPO variant, GRPO, DPO (one run each; none of them runs here)
ARMS = ["ppo.variants={clip: {kl_coef: 0.1}}", "rl.algos=[grpo]", "rl.proxies=[bt]", "dpo.seeds=1"]


def nodes_of(cfg) -> dict:
    return {n.key: n for n in build_stages(cfg)}


def fingerprints(cfg) -> dict[str, str]:
    return Runner(build_stages(cfg), ArtifactCache("unused")).fingerprints()


# ----------------------------------------------------------------------------------------------------------------
# the DAG


def test_every_evaluation_stage_gets_an_ood_copy_with_its_config_and_the_ood_prompts():
    off, on = load_config(SMOKE, ARMS), load_config(SMOKE, [*ARMS, "ood.enabled=true"])
    before, after = nodes_of(off), nodes_of(on)
    added = set(after) - set(before)
    arms = [("ppo", "bt"), ("ppo_clip", "bt"), ("grpo", "bt"), ("dpo", "bt")]
    assert added == {"ood_prompts", "bon_sample_ood", "bon_score_ood[gold]", "bon_score_ood[bt]",
                     "bon_score_ood[grm_sft]", "bon_curve_ood[bt]", "bon_curve_ood[grm_sft]",
                     *(f"{a}_{s}_ood[{r}]" for a, r in arms for s in ("sample", "gold", "curve"))}
    assert after["ood_prompts"].inputs == {"id_prompts": "world"}
    assert after["ood_prompts"].config == OODPromptsStageConfig(n_prompts=4, seed=0)  # smoke: 4 ID eval prompts
    # each copy is its ID stage with the OOD prompts and the OOD copies of its evaluation inputs: same module and
    # config (so the same sampling seeds, scorers and bootstrap seeds), same trained models and RL exports
    renamed = {"prompts": "ood_prompts"}
    for key in added - {"ood_prompts"}:
        copy, original = after[key], before[key.replace("_ood", "")]
        assert copy.stage == original.stage and copy.config == original.config, key
        assert copy.launcher == original.launcher and copy.external == original.external
        for role, up in original.inputs.items():
            want = renamed.get(role) or (up.replace("[", "_ood[") if "[" in up else f"{up}_ood")
            assert copy.inputs[role] == (want if want in added else up), (key, role)
    assert after["bon_sample_ood"].inputs == {"prompts": "ood_prompts", "policy": "sft_policy"}
    assert after["ppo_sample_ood[bt]"].inputs["rl"] == "ppo[bt]"  # the same exports, sampled on OOD prompts
    assert after["ppo_sample_ood[bt]"].config.seed == before["ppo_sample[bt]"].config.seed == on.bon.seed
    assert after["ppo_curve_ood[bt]"].inputs["bon_curve"] == "bon_curve_ood[bt]"
    report = after["report"].inputs
    assert {r: u for r, u in report.items() if r.startswith("ood:")} == {
        "ood:bon[bt]": "bon_curve_ood[bt]", "ood:bon[grm_sft]": "bon_curve_ood[grm_sft]",
        **{f"ood:{a}[{r}]": f"{a}_curve_ood[{r}]" for a, r in arms}}


def test_turning_ood_on_changes_no_existing_fingerprint_but_the_reports():
    off = fingerprints(load_config(SMOKE, ARMS))
    on = fingerprints(load_config(SMOKE, [*ARMS, "ood.enabled=true"]))
    assert {k for k in off if off[k] != on[k]} == {"report"}
    # an ood section that is off is no section at all, whatever it holds
    assert fingerprints(load_config(SMOKE, [*ARMS, "ood.n_prompts=3"])) == off


def test_ood_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ood.enabled.*needs the bon section"):
        load_config(SMOKE, ["ood.enabled=true", "bon=null", "ppo=null"])
    with pytest.raises(ConfigError, match="ood.n_prompts"):
        load_config(SMOKE, ["ood.enabled=true", "ood.n_prompts=100000"])
    with pytest.raises(ConfigError, match="ood.prompts_path"):
        load_config(PAPER, ["ood.enabled=true"])
    with pytest.raises(ConfigError, match="ood.n_prompt"):
        load_config(SMOKE, ["ood.n_prompt=3"])
    # a stage named so that an OOD copy would take its key (a PPO variant `sample_ood`) is refused before any work
    with pytest.raises(ConfigError, match=r"ood.enabled: .* keyed ppo_sample_ood\[bt\]"):
        build_stages(load_config(SMOKE, ["ood.enabled=true", "ppo.variants={sample_ood: {kl_coef: 0.1}}"]))


def test_paper_scale_reads_the_prompts_file_and_holds_it_out_from_eval_prompts(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("")
    cfg = load_config(PAPER, ["ood.enabled=true", f"ood.prompts_path={path}"])
    nodes = nodes_of(cfg)
    assert nodes["ood_prompts"].inputs == {"id_prompts": "eval_prompts"}
    assert nodes["ood_prompts"].external == (str(path),)
    assert nodes["ood_prompts"].config.n_prompts == cfg.bon.n_prompts  # as many as the ID prompts by default
    assert nodes["bon_sample_ood"].inputs["prompts"] == "ood_prompts"


# ----------------------------------------------------------------------------------------------------------------
# the prompts


def is_ood(spec: W.PromptSpec) -> bool:
    """What makes a tiny-world prompt OOD, written out: a verb or opener training never uses, or k above 5."""
    return spec.verb in ("show", "suggest", "mention") or spec.opener == "kindly" or spec.k in (6, 7)


def test_tiny_world_ood_prompts_are_ood_distinct_seeded_and_disjoint_from_id():
    a = ood_prompts.world_ood_prompts(50, seed=0)
    specs = [W.parse_prompt(prompt_text(p)) for p in a.prompt]
    assert len(a) == 50 and a.prompt_id.is_unique and len({s.render() for s in specs}) == 50
    assert all(is_ood(s) for s in specs)
    id_space = {s.render() for s in W.all_prompts(W.TRAIN_VERBS, W.TRAIN_OPENERS, W.TRAIN_KS)}
    assert not id_space & {s.render() for s in specs}
    assert list(a.k) == [s.k for s in specs] and list(a.verb) == [s.verb for s in specs]
    again, other = ood_prompts.world_ood_prompts(50, seed=0), ood_prompts.world_ood_prompts(50, seed=1)
    pd.testing.assert_frame_equal(a, again)
    assert list(a.prompt_id) == list(other.prompt_id) and list(map(prompt_text, a.prompt)) != list(
        map(prompt_text, other.prompt))
    # the whole space is 856 prompts: every OOD prompt of the world is in it exactly once
    full = ood_prompts.world_ood_prompts(len(W.ood_prompt_space()), seed=0)
    assert len(full) == 7 * 3 * 7 * 8 - 4 * 2 * 5 * 8 and full.prompt.map(prompt_text).is_unique
    with pytest.raises(ValueError, match="ood.n_prompts"):
        ood_prompts.world_ood_prompts(len(full) + 1, seed=0)


def id_prompts_dir(tmp_path: Path, texts: list[str]) -> Path:
    d = tmp_path / "id"
    d.mkdir(exist_ok=True)
    pd.DataFrame({"prompt_id": [f"ev{i}" for i in range(len(texts))],
                  "prompt": [user_prompt(t) for t in texts]}).to_parquet(d / "eval_prompts.parquet")
    return d


def test_the_stage_refuses_an_ood_prompt_that_is_an_id_prompt(tmp_path):
    drawn = ood_prompts.world_ood_prompts(3, seed=0)
    clash = id_prompts_dir(tmp_path, ["list 2 fruits", prompt_text(drawn.prompt[1])])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RecordError, match=r"1 OOD prompt\(s\) are also in-distribution.*oodev0001"):
        ood_prompts.run(OODPromptsStageConfig(n_prompts=3, seed=0), {"id_prompts": clash}, out)
    fine = id_prompts_dir(tmp_path, ["list 2 fruits"])
    ood_prompts.run(OODPromptsStageConfig(n_prompts=3, seed=0), {"id_prompts": fine}, out)
    written = pd.read_parquet(out / "eval_prompts.parquet")
    assert list(written.prompt_id) == list(drawn.prompt_id)
    assert list(map(prompt_text, written.prompt)) == list(map(prompt_text, drawn.prompt))


def test_a_prompts_file_gives_its_first_rows_and_bad_files_are_errors_naming_key_file_and_column(tmp_path):
    good = tmp_path / "held_out.jsonl"
    rows = [{"prompt_id": "a", "prompt": "show 2 fruits"},
            {"prompt_id": "b", "prompt": [{"role": "user", "content": "kindly name 6 tools"}]},
            {"prompt_id": "c", "prompt": "mention 7 colors"}]
    good.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    cfg = OODPromptsStageConfig(n_prompts=2, seed=0, prompts_path=str(good))
    ood_prompts.run(cfg, {"id_prompts": id_prompts_dir(tmp_path, ["list 2 fruits"])}, out)
    written = pd.read_parquet(out / "eval_prompts.parquet")
    assert list(written.prompt_id) == ["a", "b"]
    assert [prompt_text(p) for p in written.prompt] == ["show 2 fruits", "kindly name 6 tools"]
    with pytest.raises(RecordError, match=r"ood.prompts_path .*held_out.jsonl: 1 OOD prompt\(s\).*'a'"):
        ood_prompts.run(cfg, {"id_prompts": id_prompts_dir(tmp_path, ["show 2 fruits"])}, out)

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"id": ["a"], "prompt": ["show 2 fruits"]}).to_parquet(bad)
    with pytest.raises(RecordError, match=r"ood.prompts_path .*bad.parquet: missing column 'prompt_id'"):
        load_prompts_file(bad, "ood.prompts_path")
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n')
    with pytest.raises(RecordError, match="column 'prompt_id' repeats 'a'"):
        load_prompts_file(repeated, "ood.prompts_path")
    not_prompt = tmp_path / "not_prompt.jsonl"
    not_prompt.write_text('{"prompt_id": "a", "prompt": 3}\n')
    with pytest.raises(RecordError, match="column 'prompt' row 0 is neither text nor a list of chat messages"):
        load_prompts_file(not_prompt, "ood.prompts_path")
    with pytest.raises(RecordError, match="ood.prompts_path: file not found"):
        load_prompts_file(tmp_path / "missing.jsonl", "ood.prompts_path")


def test_ood_sections_are_marked_and_point_into_their_folder():
    parts = ["## Best-of-n\n\ntext ![best-of-n](bon_gold_vs_kl.png) and [a page](https://x.org/a)",
             "### PPO: bt", "[anchor](#best-of-n)"]
    assert labelled_sections(parts, "OOD", "ood") == [
        "### Best-of-n (OOD)\n\ntext ![best-of-n](ood/bon_gold_vs_kl.png) and [a page](https://x.org/a)",
        "#### PPO: bt (OOD)", "[anchor](#best-of-n)"]


# ----------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_smoke_study_with_ood_draws_ood_curves_beside_the_id_ones(tmp_path):
    cache, report = tmp_path / "cache", tmp_path / "report"
    overrides = [f"run.cache_root={cache}", f"run.reports_dir={report}", "ood.enabled=true", "knowledge.enabled=false"]
    assert main(["run", str(SMOKE), *overrides]) == 0
    cfg = load_config(SMOKE, overrides)
    planned = {p.node.key: p for p in Runner(build_stages(cfg), ArtifactCache(cache)).plan()}
    assert {p.status for p in planned.values()} == {"cached"}

    def artifact(key: str) -> Path:
        return ArtifactCache(cache).path(key, planned[key].fingerprint)

    # the samples are of the OOD prompts, the same number per prompt as ID, the same exports
    ood = pd.read_parquet(artifact("ood_prompts") / "eval_prompts.parquet")
    id_prompts = pd.read_parquet(artifact("world") / "eval_prompts.parquet")
    assert len(ood) == len(id_prompts) == 4
    assert all(is_ood(W.parse_prompt(prompt_text(p))) for p in ood.prompt)
    bon_id, bon_ood = read_sample_shards(artifact("bon_sample")), read_sample_shards(artifact("bon_sample_ood"))
    assert set(bon_ood.prompt_id) == set(ood.prompt_id) and len(bon_ood) == len(bon_id) == 4 * cfg.bon.n_samples
    rl_id, rl_ood = read_sample_shards(artifact("ppo_sample[bt]")), read_sample_shards(artifact("ppo_sample_ood[bt]"))
    assert set(rl_ood.prompt_id) == set(ood.prompt_id) and sorted(rl_ood.step.unique()) == sorted(rl_id.step.unique())

    readme = (report / "README.md").read_text()
    for heading in ("## Over-optimization out of distribution", "### In distribution and out of distribution",
                    "### Best-of-n (OOD)", "### PPO (OOD)", "#### PPO: bt (OOD)", "### RL at matched KL (OOD)",
                    "## Best-of-n", "## PPO", "## RL at matched KL", "## Proxy pairwise accuracy"):
        assert f"\n{heading}\n" in readme, heading
    for figure in ("ood_vs_id_bon.png", "ood_vs_id_ppo.png", "ood/bon_gold_vs_kl.png", "ood/gold_vs_kl.png"):
        assert f"]({figure})" in readme and (report / figure).stat().st_size > 5000, figure
    assert (report / "report.html").read_text().count("data:image/png") >= 6

    # the OOD tables are the ID tables' builders on the OOD curves
    ood_bon = pd.read_csv(report / "ood" / "bon_curves.csv")
    curve = pd.read_parquet(artifact("bon_curve_ood[grm_sft]") / "curve.parquet")
    assert ood_bon[ood_bon.proxy_name == "grm_sft"].gold.to_numpy() == pytest.approx(curve.gold.to_numpy())
    assert set(pd.read_csv(report / "ood" / "ppo_curves.csv").run) == {"bt"}
    assert set(pd.read_csv(report / "ood" / "rl_matched_kl.csv").arm) >= {"PPO"}

    # side by side: peaks on each prompt set and the accuracies, from the curves and eval_proxy's rows
    side = pd.read_csv(report / "ood_vs_id.csv").set_index(["proxy", "arm"])
    for where, key in (("ID prompts", "ppo_curve[bt]"), ("OOD prompts", "ppo_curve_ood[bt]")):
        gold = pd.read_parquet(artifact(key) / "curve.parquet").gold
        assert float(side.loc[("bt", "PPO"), f"peak gold, {where}"]) == pytest.approx(gold.max(), abs=5e-4)
        assert float(side.loc[("bt", "PPO"), f"gold at the end, {where}"]) == pytest.approx(gold.iloc[-1], abs=5e-4)
    assert float(side.loc[("grm_sft", "best-of-n"), "peak gold, OOD prompts"]) == pytest.approx(curve.gold.max(),
                                                                                                abs=5e-4)
    acc = pd.read_parquet(artifact("eval_proxy[bt]") / "accuracy.parquet")
    clean = acc[acc.labels == "clean"].set_index("set").accuracy
    assert float(side.loc[("bt", "PPO"), "accuracy, ID"]) == pytest.approx(clean["id_test"], abs=5e-4)
    assert float(side.loc[("bt", "PPO"), "accuracy, OOD"]) == pytest.approx(clean["ood"], abs=5e-4)
