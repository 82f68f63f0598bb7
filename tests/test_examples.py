"""Example responses at low, peak and high KL: `nested_picks` by hand, examples.json of bon_curve and ppo_curve on
small hand-made records, and the report's "Example responses" section and examples.csv."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stages.bon_curve as bon_curve
import stages.ppo_curve as ppo_curve
import stages.report as report
from pipeline.bon import kl_bon_bound, nested_bon, nested_picks
from pipeline.config import BonCurveStageConfig, PPOCurveStageConfig, ReportStageConfig
from pipeline.examples import EXAMPLE_COLUMNS, N_PROMPTS, example_prompt_ids
from pipeline.records import RL_SAMPLE_COLUMNS, SAMPLE_COLUMNS, RecordError, user_prompt

P, N = 5, 8
STEPS = [0, 1, 2, 4]


def test_nested_picks_by_hand():
    proxy = np.array([[0.1, 0.5, 0.5, 0.9],    # rises, with a tie at n = 3 (the lower index wins)
                      [0.7, 0.2, 0.7, 0.1],    # the first sample stays best (tie with sample 2)
                      [-1.0, -2.0, 3.0, 2.0]])
    assert nested_picks(proxy, [1, 2, 3, 4]).tolist() == [[0, 1, 1, 3], [0, 0, 0, 0], [0, 0, 2, 2]]
    assert nested_picks(proxy, [4, 1]).tolist() == [[3, 0], [0, 0], [2, 0]]
    gold = np.arange(12.0).reshape(3, 4)
    p, g = nested_bon(proxy, gold, [1, 2, 3, 4])  # the nested estimator evaluates exactly these picks
    np.testing.assert_array_equal(g, [[0, 1, 1, 3], [4, 4, 4, 4], [8, 8, 10, 10]])
    np.testing.assert_array_equal(p, np.take_along_axis(proxy, nested_picks(proxy, [1, 2, 3, 4]), axis=1))
    with pytest.raises(ValueError, match="1 <= n <= N"):
        nested_picks(proxy, [5])
    with pytest.raises(ValueError, match="NaN"):
        nested_picks(np.array([[0.0, np.nan]]), [1])


def test_example_prompts_are_seeded_and_shared():
    ids = [f"p{i}" for i in range(10)]
    chosen = example_prompt_ids(ids[::-1] + ids)  # order and repeats do not matter
    assert chosen == example_prompt_ids(ids) and len(chosen) == N_PROMPTS and chosen == sorted(chosen)
    assert set(chosen) <= set(ids) and example_prompt_ids(["b", "a"]) == ["a", "b"]


def prompt(i: int):
    return user_prompt(f"list {i % 5 + 1} fruits")


PIPED = int(example_prompt_ids([f"p{i}" for i in range(P)])[0][1:])  # a shown prompt whose sample 0 needs escaping


def response(i: int, j: int) -> str:
    return "a | b\nc" if (i, j) == (PIPED, 0) else f"p{i} s{j}"


def bon_proxy(i: int, j: int) -> float:
    """Rising in the sample index for even prompts (best of the first n: sample n − 1), falling for odd ones
    (sample 0 stays best)."""
    return float(j if i % 2 == 0 else -j)


def bon_gold(i: int, j: int) -> float:
    """Best at sample 5 for even prompts, flat for odd ones: by hand, the unbiased best-of-n gold of an even prompt
    is −1.875, −0.75, −0.6, −1 at n = 1, 2, 4, 8, so the curve peaks at n = 4."""
    return float(i - (j - 5) ** 2 / 4 if i % 2 == 0 else i)


@pytest.fixture
def artifacts(tmp_path) -> dict[str, Path]:
    """Hand-made bon_sample, bon_score (proxy, gold), ppo_sample and ppo_gold artifacts; P prompts."""
    dirs = {k: tmp_path / k for k in ("samples", "proxy", "gold", "rl_samples", "rl_gold")}
    for d in dirs.values():
        d.mkdir()
    (dirs["samples"] / "shards").mkdir()
    (dirs["rl_samples"] / "shards").mkdir()
    rows = [{"prompt_id": f"p{i}", "sample_idx": j, "prompt": prompt(i),
             "response": response(i, j), "n_tokens": 2, "finished": True}
            for i in range(P) for j in range(N)]
    samples = pd.DataFrame(rows)
    for shard, half in enumerate((samples.iloc[:20], samples.iloc[20:])):  # two shards, as bon_sample writes them
        half[SAMPLE_COLUMNS].to_parquet(dirs["samples"] / "shards" / f"shard_{shard:05d}.parquet", index=False)
    keys = samples[["prompt_id", "sample_idx"]]
    keys.assign(score=[bon_proxy(i, j) for i in range(P) for j in range(N)]).to_parquet(
        dirs["proxy"] / "scores.parquet", index=False)
    keys.assign(score=[bon_gold(i, j) for i in range(P) for j in range(N)]).sample(frac=1, random_state=0).to_parquet(
        dirs["gold"] / "scores.parquet", index=False)  # order does not matter: records are keyed

    # RL: 2 samples per prompt per export; gold peaks at step 2; sample 1 scores differ from sample 0's
    rl = pd.DataFrame([{"step": s, "prompt_id": f"p{i}", "sample_idx": j, "prompt": prompt(i),
                        "response": f"step{s} p{i} s{j}", "n_tokens": 2, "finished": True,
                        "kl_k1": 0.1 * s + 0.01 * i + 0.001 * j, "kl_k3": 0.1 * s, "proxy_score": s + 0.1 * j}
                       for s in STEPS for i in range(P) for j in range(2)])
    for s in STEPS:
        rl[rl.step == s][RL_SAMPLE_COLUMNS].to_parquet(dirs["rl_samples"] / "shards" / f"shard_{s:05d}.parquet",
                                                       index=False)
    rl[["step", "prompt_id", "sample_idx"]].assign(score=-(rl.step - 2.0) ** 2 + 0.1 * rl.sample_idx).to_parquet(
        dirs["rl_gold"] / "scores.parquet", index=False)
    return dirs


def run_bon(artifacts, tmp_path) -> Path:
    out = tmp_path / "bon_curve"
    out.mkdir()
    cfg = BonCurveStageConfig(proxy="bt", ns=[1, 2, 4, 8], bootstrap=20, ci=0.9, nested_estimator=False, seed=0)
    bon_curve.run(cfg, {"proxy_scores": artifacts["proxy"], "gold_scores": artifacts["gold"],
                        "samples": artifacts["samples"]}, out)
    return out


def run_rl(artifacts, tmp_path, bon: Path | None = None) -> Path:
    out = tmp_path / "ppo_curve"
    out.mkdir()
    ppo_curve.run(PPOCurveStageConfig(proxy="bt", bootstrap=20, ci=0.9, seed=3),
                  {"samples": artifacts["rl_samples"], "gold_scores": artifacts["rl_gold"],
                   **({"bon_curve": bon} if bon else {})}, out)
    return out


def test_bon_curve_examples_are_the_proxy_picks_among_the_first_n(artifacts, tmp_path):
    out = run_bon(artifacts, tmp_path)
    ex = json.loads((out / "examples.json").read_text())
    peak_n = json.loads((out / "fit.json").read_text())["empirical_peak"]["n"]
    chosen = example_prompt_ids([f"p{i}" for i in range(P)])
    assert (ex["proxy"], ex["arm"], ex["prompt_ids"]) == ("bt", "best-of-n", chosen)
    assert peak_n == 4
    assert [(pt["point"], pt["n"]) for pt in ex["points"]] == [("low", 1), ("peak", 4), ("high", 8)]
    for pt in ex["points"]:
        assert pt["kl"] == pytest.approx(kl_bon_bound(pt["n"]))
        assert [e["prompt_id"] for e in pt["examples"]] == chosen
        for e in pt["examples"]:
            i = int(e["prompt_id"][1:])
            j = pt["n"] - 1 if i % 2 == 0 else 0  # by hand: the proxy's argmax among the first n samples
            assert e["sample_idx"] == j and e["prompt"] == prompt(i)
            assert e["response"] == response(i, j)
            assert (e["proxy"], e["gold"]) == (bon_proxy(i, j), bon_gold(i, j))


def test_bon_curve_refuses_samples_that_were_not_scored(artifacts, tmp_path):
    shard = artifacts["samples"] / "shards" / "shard_00001.parquet"
    frame = pd.read_parquet(shard)
    frame.assign(prompt_id=frame.prompt_id + "x").to_parquet(shard, index=False)
    with pytest.raises(RecordError, match="no sample record .*the scores were not made from these samples"):
        run_bon(artifacts, tmp_path)


def test_ppo_curve_examples_at_step0_peak_and_last_step(artifacts, tmp_path):
    out = run_rl(artifacts, tmp_path)
    ex = json.loads((out / "examples.json").read_text())
    curve = pd.read_parquet(out / "curve.parquet")
    assert (ex["proxy"], ex["arm"]) == ("bt", "rl")
    assert ex["prompt_ids"] == example_prompt_ids([f"p{i}" for i in range(P)])  # best-of-n's prompts
    assert [(pt["point"], pt["step"]) for pt in ex["points"]] == [("low", 0), ("peak", 2), ("high", 4)]
    for pt in ex["points"]:
        s = pt["step"]
        assert pt["kl"] == pytest.approx(float(curve.kl_k1[curve.step == s].iloc[0]))
        for e in pt["examples"]:
            i = int(e["prompt_id"][1:])
            assert (e["sample_idx"], e["response"], e["prompt"]) == (0, f"step{s} p{i} s0", prompt(i))
            assert e["proxy"] == pytest.approx(s) and e["gold"] == pytest.approx(-(s - 2.0) ** 2)
            assert e["kl_k1"] == pytest.approx(0.1 * s + 0.01 * i)


def test_report_renders_example_responses(artifacts, tmp_path):
    bon, rl = run_bon(artifacts, tmp_path), run_rl(artifacts, tmp_path, None)
    evals = tmp_path / "eval"
    evals.mkdir()
    pd.DataFrame({"proxy": ["bt"], "set": ["id"], "labels": ["clean"], "accuracy": [0.8]}).to_parquet(
        evals / "accuracy.parquet", index=False)
    out = tmp_path / "report"
    out.mkdir()
    cfg = ReportStageConfig(study="t", proxies=["bt"], rl_runs={"ppo": {"bt": ["bt"]}})
    report.run(cfg, {"eval[bt]": evals, "bon[bt]": bon, "ppo[bt]": rl}, out)

    table = pd.read_csv(out / "examples.csv")
    assert list(table.columns) == EXAMPLE_COLUMNS and len(table) == 2 * 3 * N_PROMPTS
    assert list(table.groupby("arm", sort=False).size().index) == ["best-of-n", "PPO"]
    assert set(table.prompt) == {f"list {int(p[1:]) % 5 + 1} fruits" for p in table.prompt_id}
    first = table[(table.arm == "best-of-n") & (table.point == "low") & (table.prompt_id == f"p{PIPED}")]
    assert first.response.tolist() == ["a | b\nc"]  # whole in the CSV

    readme = (out / "README.md").read_text()
    section = readme.split("## Example responses", 1)[1].split("\n## ", 1)[0]
    assert "### Examples: bt" in section
    assert "| arm | point | KL | prompt | response | proxy | gold |" in section
    rows = [line for line in section.splitlines() if line.startswith("| best-of-n") or line.startswith("| PPO")]
    assert len(rows) == 2 * 3 * N_PROMPTS
    assert rows[0].startswith("| best-of-n | low (n = 1) | 0.000 |")
    assert any(r.startswith(f"| best-of-n | peak (n = 4) | {kl_bon_bound(4):.3f} |") for r in rows)
    assert any(r.startswith("| PPO | peak (step 2) |") for r in rows)
    assert "| a \\| b c |" in section  # one line, the pipe escaped
    from tests.test_report import check_self_contained

    check_self_contained((out / "report.html").read_text(), out, readme)
