"""The PPO arm on the smoke study: stage outputs, KL measured by the pipeline, the report's PPO tables, the fast
scoring path, and a killed multi-process PPO run resuming to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.models import load_tokenizer
from pipeline.records import RL_SAMPLE_COLUMNS, messages, read_sample_shards
from pipeline.runner import Runner
from pipeline.scoring import build_scorer, score_rollouts
from pipeline.study import build_stages
from pipeline.tokenization import ConversationEncoder, encode_conversation, prompt_ids

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke study run to completion (PPO inline, one process, against `bt`)."""
    root = tmp_path_factory.mktemp("ppo_study")
    overrides = [f"run.cache_root={root / 'cache'}", f"run.reports_dir={root / 'report'}"]
    cfg = load_config(SMOKE, overrides)
    cache = ArtifactCache(cfg.run.cache_root)
    plan = Runner(build_stages(cfg), cache).run()
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan}
    return {"cfg": cfg, "art": art, "root": root, "overrides": overrides, "plan": plan}


def test_ppo_exports_log_spaced_policies_and_metrics(study):
    from transformers import AutoModelForCausalLM

    art, ppo = study["art"]["ppo[bt]"], study["cfg"].ppo
    steps = sorted(int(d.name.split("_")[1]) for d in (art / "exports").iterdir())
    assert steps == ppo.export_steps() == [0, 1, 2, 3]
    assert not (art / "resume").exists()  # the resume checkpoints are not part of the artifact
    records = [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("score", "kl_penalty", "value_loss", "policy_loss", "clip_fraction", "approx_kl", "entropy",
                "response_length", "time_rollout_s", "time_score_s", "time_forward_s", "time_update_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    # step 0 is the initial policy, byte for byte; the last export has moved
    base = AutoModelForCausalLM.from_pretrained(study["art"]["sft_policy"] / "model").state_dict()
    first = AutoModelForCausalLM.from_pretrained(art / "exports" / "step_00000").state_dict()
    last = AutoModelForCausalLM.from_pretrained(art / "exports" / "step_00003").state_dict()
    assert all(torch.equal(base[k], first[k]) for k in base)
    assert any(not torch.equal(base[k], last[k]) for k in base)


def test_ppo_sample_measures_kl_on_samples_and_is_zero_for_the_initial_policy(study):
    samples = read_sample_shards(study["art"]["ppo_sample[bt]"])
    assert list(samples.columns) == RL_SAMPLE_COLUMNS
    ev = pd.read_parquet(study["art"]["world"] / "eval_prompts.parquet")
    assert set(samples.prompt_id) == set(ev.prompt_id)  # the best-of-n evaluation prompts
    n = study["cfg"].ppo.eval.n_samples
    assert (samples.groupby(["step", "prompt_id"]).size() == n).all()
    step0 = samples[samples.step == 0]
    assert (step0.kl_k1 == 0).all() and (step0.kl_k3 == 0).all()  # the same model: log-ratios are exactly 0
    assert (samples.kl_k3 >= 0).all()
    later = samples[samples.step == 3]
    assert later.kl_k1.abs().sum() > 0
    # gold scores of the RL samples come from their own stage, keyed by (step, prompt_id, sample_idx)
    gold = pd.read_parquet(study["art"]["ppo_gold[bt]"] / "scores.parquet")
    assert list(gold.columns) == ["step", "prompt_id", "sample_idx", "score"] and len(gold) == len(samples)
    from pipeline.world import gold_reward

    row = samples.iloc[5]
    mine = gold[(gold.step == row.step) & (gold.prompt_id == row.prompt_id) & (gold.sample_idx == row.sample_idx)]
    assert float(mine.score.iloc[0]) == gold_reward(messages(row.prompt)[-1]["content"], row.response)


def test_ppo_curve_and_report_tables(study):
    curve = pd.read_parquet(study["art"]["ppo_curve[bt]"] / "curve.parquet")
    samples = read_sample_shards(study["art"]["ppo_sample[bt]"])
    gold = pd.read_parquet(study["art"]["ppo_gold[bt]"] / "scores.parquet")
    merged = samples.merge(gold, on=["step", "prompt_id", "sample_idx"])
    assert curve.step.tolist() == [0, 1, 2, 3]
    # the curve's points are means over prompts of per-prompt means
    by_step = merged.groupby(["step", "prompt_id"])[["kl_k1", "proxy_score", "score"]].mean().groupby("step").mean()
    assert curve.kl_k1.to_numpy() == pytest.approx(by_step.kl_k1.to_numpy())
    assert curve.proxy.to_numpy() == pytest.approx(by_step.proxy_score.to_numpy())
    assert curve.gold.to_numpy() == pytest.approx(by_step.score.to_numpy())
    assert curve.gold_rel.iloc[0] == 0 and (curve.gold_lo <= curve.gold).all() and (curve.gold <= curve.gold_hi).all()
    fit = json.loads((study["art"]["ppo_curve[bt]"] / "fit.json").read_text())
    far = curve.loc[curve.kl_k1.idxmax()]
    assert fit["at_max_kl"] == {"step": int(far.step), "kl": pytest.approx(far.kl_k1), "gold": pytest.approx(far.gold)}
    boot = fit["gao_fit_bootstrap"]  # Gao's RL fit with CIs over prompts, beside the plain fit (kept for old readers)
    assert (boot["form"], boot["n_boot"], boot["prompts"]) == ("rl", 50, fit["prompts"])
    assert boot["points"] == int((curve.sqrt_kl > 0).sum())
    for key in ("alpha", "beta"):
        assert boot[key]["estimate"] == pytest.approx(fit["gao_fit_gold_rel"][key])
        assert boot[key]["lo"] <= boot[key]["estimate"] <= boot[key]["hi"]
    report = study["root"] / "report"
    table = pd.read_csv(report / "ppo_curves.csv")
    assert set(table.proxy_name) == {"bt"}
    assert set(table.run) == {"bt"}
    pd.testing.assert_frame_equal(table.drop(columns=["proxy_name", "run"]), curve, check_dtype=False)
    assert (report / "gold_vs_kl.png").stat().st_size > 1000
    readme = (report / "README.md").read_text()
    assert "## PPO" in readme and "## Made with" in readme and "torch threads" in readme
    # report.html is the README as one page: tables, both plots embedded, no local file referenced
    from tests.test_report import check_self_contained

    check_self_contained((report / "report.html").read_text(), report, readme)


def test_run_ends_with_a_summary_of_every_curve(study, capsys, tmp_path):
    """`overopt run` ends with one table: per proxy and arm, peak gold, KL at the peak, gold at the largest KL."""
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["run", str(SMOKE), *study["overrides"]]) == 0  # cached: nothing runs, the summary still reads
    out = capsys.readouterr().out
    assert "gold of the over-optimization curves" in out
    rows = {tuple(cell.strip() for cell in line.strip("│ ").split("│")[:2]): line
            for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == {("bt", "best-of-n"), ("grm_sft", "best-of-n"), ("bt", "PPO")}
    for (proxy, arm), line in rows.items():
        key = f"bon_curve[{proxy}]" if arm == "best-of-n" else f"ppo_curve[{proxy}]"
        fit = json.loads((study["art"][key] / "fit.json").read_text())
        peak, far = fit["empirical_peak"], fit["at_max_kl"]
        kl = (f"≤ {peak['kl_bound']:.2f}", f"≤ {far['kl_bound']:.2f}") if arm == "best-of-n" else (
            f"{peak['kl']:.2f}", f"{far['kl']:.2f}")
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        assert cells[2:] == [f"{peak['gold']:.3f}", kl[0], f"{far['gold']:.3f}", kl[1]], line

    # a run that covers no curve, or a study without curves, prints no table
    assert main(["run", str(SMOKE), *study["overrides"], "--until", "gold_label"]) == 0
    assert "over-optimization curves" not in capsys.readouterr().out
    assert main(["run", str(SMOKE), *study["overrides"], "bon=null", "ppo=null", f"run.reports_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "✓ report" in out and "over-optimization curves" not in out
    assert (tmp_path / "README.md").exists() and not (tmp_path / "bon_curves.csv").exists()


def test_fast_scoring_paths_equal_the_text_path(study):
    """ConversationEncoder (template once per prompt, batched responses) and token ids (no decode) give the same
    rewards as encoding every pair through the full chat template."""
    cfg = study["cfg"]
    tokenizer = load_tokenizer(study["art"]["sft_policy"] / "model")
    samples = read_sample_shards(study["art"]["bon_sample"])
    prompts, responses = [messages(p) for p in samples.prompt], list(samples.response)
    exact = [encode_conversation(tokenizer, p, r, 64) for p, r in zip(prompts, responses)]
    assert ConversationEncoder(tokenizer, 64).encode(prompts, responses) == exact

    from pipeline.study import _sample_scorer

    scorer = build_scorer(_sample_scorer(cfg, cfg.proxies[0]), {"model": study["art"]["train_proxy[bt]"]})
    text = scorer.score(prompts, responses)
    assert text == pytest.approx(scorer.score_encoded(exact), abs=1e-6)
    heads = [prompt_ids(tokenizer, p) for p in prompts]
    contents = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    ids = score_rollouts(scorer, tokenizer, prompts, heads, contents, responses)
    assert ids == pytest.approx(text, abs=1e-6)
    assert np.isfinite(text).all() and np.unique(text.round(6)).size > 1


def test_conversation_encoder_matches_the_template_of_a_gemma_like_tokenizer():
    from tests.test_generation import gemma_like_tokenizer

    tok = gemma_like_tokenizer()
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "world hello"}]] * 3
    responses = ["hello world", "", "world", "hello hello", "world world world", "hello"]
    exact = [encode_conversation(tok, p, r, 64) for p, r in zip(prompts, responses)]
    encoder = ConversationEncoder(tok, 64)
    assert encoder.suffix is not None  # <end_of_turn> and its newline
    assert encoder.encode(prompts, responses) == exact


@pytest.mark.slow
def test_killed_ppo_under_zero2_resumes_to_the_uninterrupted_result(study, tmp_path):
    """SIGKILL a two-rank ZeRO-2 PPO run once it has checkpointed, re-run it: it resumes from the checkpoint (not
    from scratch) and its metrics equal those of an uninterrupted run on the same machine."""
    overrides = study["overrides"] + ["ppo.num_processes=2", "ppo.deepspeed_config=configs/deepspeed/zero2.json",
                                      "ppo.steps=10", "ppo.checkpoint_every=1"]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(SMOKE), *overrides, "--only", "ppo[bt]"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    partial = study["root"] / "cache" / ".partial"  # ppo(bt).<fingerprint>/ while the stage runs
    log = tmp_path / "killed_run.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        states = list(partial.glob("ppo(bt).*/resume/latest.json"))
        if states and json.loads(states[0].read_text())["step"] >= 4:
            killed_at = json.loads(states[0].read_text())["step"]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming PPO from its checkpoint at update" in resumed.stdout + resumed.stderr
    cfg = load_config(SMOKE, overrides)
    plan = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).plan()
    art = next(p for p in plan if p.node.key == "ppo[bt]")
    metrics_path = ArtifactCache(cfg.run.cache_root).path("ppo[bt]", art.fingerprint) / "metrics.jsonl"

    def metrics(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

    after_resume = metrics(metrics_path)
    assert [r["step"] for r in after_resume] == list(range(1, 11))
    fresh = subprocess.run(cmd + ["--force", "ppo[bt]"], cwd=REPO, env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stdout + fresh.stderr
    assert metrics(metrics_path) == after_resume


def test_ppo_seeds_expand_into_runs_and_the_report_aggregates_them(study):
    overrides = study["overrides"] + ["ppo.seeds=2"]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    before = {p.node.key: p.status for p in runner.plan()}
    # the first seed's run is the single-seed study's (cached); only the second seed's stages and the report are new
    assert {k for k, s in before.items() if s != "cached"} == {
        "ppo[bt@seed1]", "ppo_sample[bt@seed1]", "ppo_gold[bt@seed1]", "ppo_curve[bt@seed1]", "report"}
    plan = runner.run()
    second = next(p for p in plan if p.node.key == "ppo[bt@seed1]")
    assert second.node.config.ppo.seed == 1
    table = pd.read_csv(study["root"] / "report" / "ppo_curves.csv")
    assert set(table.run) == {"bt", "bt@seed1"} and set(table.proxy_name) == {"bt"}
    a, b = (table[table.run == r].gold.to_numpy() for r in ("bt", "bt@seed1"))
    assert a[0] == b[0] and not np.array_equal(a, b)  # same initial policy and eval samples, different training
    readme = (study["root"] / "report" / "README.md").read_text()
    assert "### Over seeds" in readme and "| bt | 2 |" in readme


def test_ppo_options_run_together(study):
    """The options the demo leaves off, in one short inline run: value model from the proxy's backbone, k3 in the
    reward under the adaptive controller, a missing-EOS penalty, per-batch reward normalisation, a LoRA policy."""
    overrides = study["overrides"] + [
        "ppo.value_init=proxy", "ppo.kl_estimator=k3", "ppo.kl_coef=0.05",
        "ppo.adaptive_kl={target: 0.01, horizon: 100}", "ppo.missing_eos_penalty=1.0", "ppo.reward_norm=batch",
        "ppo.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"]
    cfg = load_config(SMOKE, overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    plan = {p.node.key: p for p in runner.run(until={"ppo[bt]"})}
    art = runner.cache.path("ppo[bt]", plan["ppo[bt]"].fingerprint)
    records = [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r[k]) for r in records for k in ("policy_loss", "value_loss", "kl_penalty"))
    # the controller moved β after every update, from that update's measured KL (Ziegler et al.'s rule)
    beta = 0.05
    for r in records:
        assert r["kl_coef"] == pytest.approx(beta)
        beta *= 1 + min(max(r["kl_seq_k1"] / 0.01 - 1, -0.2), 0.2) * cfg.ppo.rollout_batch_size / 100
    # per-batch normalisation: each batch's normalised scores have mean 0
    assert all(abs(r["score_normalised"]) < 1e-5 for r in records)


def test_a_non_finite_proxy_score_stops_ppo_and_commits_nothing(study, monkeypatch):
    import pipeline.ppo.rollout
    from pipeline.scoring import NonFiniteScoreError

    def broken(scorer, tokenizer, prompts, heads, contents, texts):
        return np.where(np.arange(len(texts)) == 1, np.nan, 0.0)

    monkeypatch.setattr(pipeline.ppo.rollout, "score_rollouts", broken)  # under proxy_scores, the one path
    cfg = load_config(SMOKE, study["overrides"] + ["ppo.steps=2"])
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    with pytest.raises(NonFiniteScoreError, match=r"scorer 'bt' returned a non-finite score \(nan\) for prompt_id="):
        runner.run(until={"ppo[bt]"})
    assert next(p for p in runner.plan() if p.node.key == "ppo[bt]").status != "cached"


def test_curves_check_their_fits_and_standardise_the_proxy(study):
    """ppo_curve's fit.json says whether the Gao fit describes the curve and where the data peaks (with a CI over
    prompts); its proxy is standardised by the step-0 samples' spread; best-of-n's estimated KL is under the bound."""
    art = study["art"]["ppo_curve[bt]"]
    curve = pd.read_parquet(art / "curve.parquet")
    samples = read_sample_shards(study["art"]["ppo_sample[bt]"])
    sd = samples.proxy_score[samples.step == 0].std(ddof=1)
    for suffix in ("", "_lo", "_hi"):
        np.testing.assert_allclose(curve[f"proxy_rel_std{suffix}"], curve[f"proxy_rel{suffix}"] / sd)
    assert curve.proxy_rel_std.iloc[0] == pytest.approx(0.0, abs=1e-12)
    fit = json.loads((art / "fit.json").read_text())
    peak = fit["empirical_peak_ci"]
    assert peak["step"] == fit["empirical_peak"]["step"]
    assert peak["estimate"] == pytest.approx(curve.sqrt_kl[curve.gold.idxmax()])
    assert peak["kl"]["estimate"] == pytest.approx(peak["estimate"] ** 2)
    check = fit["fit_check"]  # the smoke run has exports with KL > 0, so there is a fit to check
    assert check["form"] == "rl" and check["ok"] == (check["peak_consistent"] and check["misfit"]["ok"])
    assert (check["reason"] == "") == check["ok"]
    assert check["misfit"]["points"] == fit["gao_fit_bootstrap"]["points"]

    bon = json.loads((study["art"]["bon_curve[bt]"] / "fit.json").read_text())
    assert {"fit_check", "empirical_peak_ci"} <= set(bon)
    assert bon["fit_check"]["form"] == "bon" and isinstance(bon["fit_check"]["ok"], bool)
    bon_curve = pd.read_parquet(study["art"]["bon_curve[bt]"] / "curve.parquet")
    assert (bon_curve.kl_estimated <= bon_curve.kl_bound + 1e-12).all()
    for where in ("at_peak", "at_max_n"):
        assert bon["kl_estimated"][where]["kl_estimated"] <= bon["kl_estimated"][where]["kl_bound"] + 1e-12


def test_a_curve_without_the_initial_policy_names_the_samples(study):
    from pipeline.records import RecordError
    from stages.ppo_curve import rl_curve_table

    samples = read_sample_shards(study["art"]["ppo_sample[bt]"]).rename(columns={"proxy_score": "proxy"})
    later = samples[samples.step > 0].assign(gold=0.0)
    with pytest.raises(RecordError, match=r"where/shards: no samples of the step-0 .*steps present: \[1, 2, 3\]"):
        rl_curve_table(later, n_boot=10, ci=0.9, seed=0, source="where/shards")


# ------------------------------------------------------------------------------ kills, full disks and resumption
# A killed run is simulated in-process: a Checkpointer that raises right after checkpoint k leaves the partial output
# exactly as SIGKILL at that moment would (the row of update k appended, checkpoint k complete). The damage a kill
# or a full disk can do to it is then made by hand, and the resumed run must end with the metrics of an
# uninterrupted one.

RESUME_OVERRIDES = ["ppo.steps=6", "ppo.checkpoint_every=2"]


class Killed(Exception):
    pass


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _ppo_runner(study) -> tuple[Runner, str]:
    cfg = load_config(SMOKE, study["overrides"] + RESUME_OVERRIDES)
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
    return runner, next(p.fingerprint for p in runner.plan() if p.node.key == "ppo[bt]")


@pytest.fixture(scope="module")
def uninterrupted(study):
    """The metrics of a 6-update PPO run that nothing interrupted."""
    runner, fp = _ppo_runner(study)
    runner.run(until={"ppo[bt]"})
    return _metrics(runner.cache.path("ppo[bt]", fp) / "metrics.jsonl")


def _killed_after_checkpoint(study, monkeypatch, step: int) -> Path:
    """Run ppo[bt] afresh until checkpoint `step` is written, then 'kill' it; return the partial output."""
    import shutil

    import stages.ppo

    runner, fp = _ppo_runner(study)
    shutil.rmtree(runner.cache.path("ppo[bt]", fp), ignore_errors=True)

    class KilledAfterCheckpoint(stages.ppo.Checkpointer):
        def save(self, state):
            super().save(state)
            if state["step"] == step:
                raise Killed(f"killed after checkpoint {step}")

    with monkeypatch.context() as m:
        m.setattr(stages.ppo, "Checkpointer", KilledAfterCheckpoint)
        with pytest.raises(Killed):
            runner.run(until={"ppo[bt]"}, force={"ppo[bt]"})
    partial = runner.cache.partial_path("ppo[bt]", fp)
    assert json.loads((partial / "resume" / "latest.json").read_text())["step"] == step
    return partial


def _resume(study, caplog) -> tuple[list[dict], str]:
    runner, fp = _ppo_runner(study)
    caplog.clear()
    with caplog.at_level("INFO", logger="overopt"):
        runner.run(until={"ppo[bt]"})
    art = runner.cache.path("ppo[bt]", fp)
    assert runner.cache.check("ppo[bt]", fp).status == "cached"
    assert not (art / "resume").exists() and not runner.cache.partial_path("ppo[bt]", fp).exists()
    return _metrics(art / "metrics.jsonl"), caplog.text


@pytest.mark.parametrize("damage", ["torn last line", "last row lost"])
def test_a_damaged_metrics_log_is_rewritten_from_the_checkpoint(study, uninterrupted, monkeypatch, caplog, damage):
    """A full disk tears the last metrics line; the old code lost the row of a kill just after a checkpoint. Both
    resume to the uninterrupted run's metrics (the old code failed with a JSONDecodeError, or lacked the row)."""
    partial = _killed_after_checkpoint(study, monkeypatch, step=4)
    log_file = partial / "metrics.jsonl"
    text = log_file.read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3, 4]
    last = text.splitlines()[-1]
    log_file.write_text(text[:-len(last) - 1] + (last[:len(last) // 2] if damage == "torn last line" else ""))
    metrics, logged = _resume(study, caplog)
    assert "resuming PPO from its checkpoint at update 4" in logged
    assert ("dropped a torn last line" in logged) == (damage == "torn last line")
    assert "rewritten from the checkpoint's own record" in logged
    assert metrics == uninterrupted


def test_a_checkpoint_missing_a_file_is_set_aside_and_the_stage_starts_afresh(study, uninterrupted, monkeypatch,
                                                                               caplog):
    """A kill inside the old non-atomic swap left a checkpoint every later run failed to load, --force included.
    Now a checkpoint that lacks a file is found before the stage runs: the partial output is kept aside, named in a
    warning, and the stage starts afresh."""
    partial = _killed_after_checkpoint(study, monkeypatch, step=4)
    next((partial / "resume" / "step_00004").glob("rng_rank0.safetensors")).unlink()
    metrics, logged = _resume(study, caplog)
    assert "cannot resume its partial output (checkpoint" in logged and "lacks rng_rank0.safetensors" in logged
    assert "resuming" not in logged
    asides = list(partial.parent.glob(partial.name + ".aside-*"))
    assert any(a.is_dir() and (a / "resume").is_dir() for a in asides)  # kept for inspection
    assert "lacks rng_rank0.safetensors" in next(a for a in asides if a.suffix == ".why").read_text()
    assert metrics == uninterrupted


def test_a_kill_after_the_last_update_does_not_restart_training(study, uninterrupted, monkeypatch, caplog):
    """The old code deleted its checkpoint before the commit: a kill in those seconds restarted PPO from update 0."""
    _killed_after_checkpoint(study, monkeypatch, step=6)
    metrics, logged = _resume(study, caplog)
    assert "resuming PPO from its checkpoint at update 6" in logged
    assert "ppo 6/6" not in logged  # no update ran again
    assert metrics == uninterrupted


def test_a_kill_inside_the_commit_is_finished_without_running_the_stage(study, uninterrupted, monkeypatch, caplog):
    runner, fp = _ppo_runner(study)
    import shutil

    shutil.rmtree(runner.cache.path("ppo[bt]", fp))
    real = ArtifactCache._move_into_place

    def killed(self, *args):
        raise Killed("killed inside the commit")

    monkeypatch.setattr(ArtifactCache, "_move_into_place", killed)
    with pytest.raises(Killed):
        runner.run(until={"ppo[bt]"}, force={"ppo[bt]"})
    monkeypatch.setattr(ArtifactCache, "_move_into_place", real)
    partial = runner.cache.partial_path("ppo[bt]", fp)
    assert (partial / "manifest.json").is_file() and (partial / "resume").is_dir()
    metrics, logged = _resume(study, caplog)
    assert "completed its interrupted commit" in logged and "resuming" not in logged
    assert metrics == uninterrupted


def test_force_starts_afresh_even_from_a_sound_checkpoint(study, uninterrupted, monkeypatch, caplog):
    partial = _killed_after_checkpoint(study, monkeypatch, step=2)
    runner, _ = _ppo_runner(study)
    caplog.clear()
    with caplog.at_level("INFO", logger="overopt"):
        runner.run(until={"ppo[bt]"}, force={"ppo[bt]"})
    assert "--force starts afresh" in caplog.text and "resuming" not in caplog.text
    assert list(partial.parent.glob(partial.name + ".aside-*"))
    _, fp = _ppo_runner(study)
    assert _metrics(runner.cache.path("ppo[bt]", fp) / "metrics.jsonl") == uninterrupted
