"""eval_proxy[name]: pairwise accuracy of a proxy in and out of distribution.

Accuracy is strict (r_c > r_r counts, a tie does not) and ties are reported separately. In-distribution: the test
split of the gold-labeled pairs, against the clean labels and, when noise is on, the noisy ones. Out of distribution:
the tiny world's OOD pairs (unseen verbs, openers and list lengths, another sampler), and at paper scale
HHH-Alignment and MT-Bench human judgments when their paths are configured.

RewardBench and RewardBench 2, when their paths are configured, are scored as the benchmarks score
(`pipeline.rewardbench`): accuracy rows `rewardbench` (the section-weighted overall score) and `rewardbench_<section>`,
`rewardbench2` (the mean of its subsets) and `rewardbench2_<subset>` (the Ties row holds the Ties score, not an
accuracy); every subset, section and Ties component is in rewardbench_scores.parquet / .json.

Data-parallel: under a launcher each rank computes whole scoring batches (`pipeline.scoring.data_parallel`) and rank 0
writes, the same bytes for any number of ranks.

Writes accuracy.parquet (one row per evaluation set) and accuracy.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import rewardbench as rb
from pipeline.config import EvalProxyStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.hf_data import pair_prompts
from pipeline.preference_pairs import pairwise_accuracy
from pipeline.records import PAIR_COLUMNS, read_records
from pipeline.scoring import build_scorer, check_finite, data_parallel, over_length_check

VERSION = "2"
DATA_PARALLEL = True  # scoring batches split over launch.num_processes ranks; the same artifact for any number
log = logging.getLogger("overopt")


def _json_rows(rows: list[dict]) -> str:
    """Rows as strict JSON: NaN (nothing scored) becomes null."""
    return json.dumps([{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in rows],
                      indent=2)


def _score_checked(scorer, cfg: EvalProxyStageConfig, prompts: list, responses: list, keys: list,
                   key_names: tuple[str, ...], where: str) -> np.ndarray:
    """Rewards through the one scorer; a non-finite score other than an over-length NaN is an error (`check_finite`)."""
    r = scorer.score(prompts, responses)
    check_finite(r, cfg.scorer.name, keys, key_names, over_length_check(scorer, prompts, responses), where=where)
    return r


def rewardbench_tables(frame: pd.DataFrame, r_c: np.ndarray, r_r: np.ndarray) -> tuple[list[dict], list[dict]]:
    """RewardBench from the rewards of each pair: (accuracy rows per section and overall, as eval_proxy's table
    has them, without the proxy column; the subset/section/overall score table). Subset accuracy is
    `pairwise_accuracy` (strict: a tie is wrong, as RewardBench counts it); the weighting is
    `pipeline.rewardbench`'s."""
    subset_rows, acc = [], {}
    subsets = frame.subset.to_numpy()
    for subset in dict.fromkeys(subsets):
        mine = subsets == subset
        a = pairwise_accuracy(r_c[mine], r_r[mine])
        acc[subset] = a["accuracy"]
        subset_rows.append({"benchmark": "rewardbench", "level": "subset", "name": subset,
                            "section": rb.SECTION_OF.get(subset), "examples": a["pairs"], "unscored": a["unscored"],
                            "ties": a["ties"], "score": a["accuracy"],
                            "weight": float(rb.EXAMPLE_COUNTS[subset]) if subset in rb.SECTION_OF else float("nan")})
    outside = [s for s in acc if s not in rb.SECTION_OF]
    if outside:
        log.warning("rewardbench: subset(s) %s belong to no RewardBench section: reported, not in any section or the "
                    "overall score", outside)
    sections = rb.section_scores(acc)
    overall = rb.overall_score(sections, "rewardbench", list(rb.SECTION_SUBSETS))
    accuracy_rows, section_rows = [], []

    def counts(names):
        rows = [r for r in subset_rows if r["name"] in names]
        return {k: int(sum(r[k] for r in rows)) for k in ("examples", "unscored", "ties")}

    for section, score in sections.items():
        c = counts(rb.SECTION_SUBSETS[section])
        section_rows.append({"benchmark": "rewardbench", "level": "section", "name": section, "section": section,
                             **c, "score": score, "weight": float("nan")})
        accuracy_rows.append({"set": rb.set_name("rewardbench", section), "labels": "clean", "pairs": c["examples"],
                              "unscored": c["unscored"], "accuracy": score, "ties": c["ties"]})
    c = counts(rb.SECTION_OF)
    accuracy_rows.insert(0, {"set": "rewardbench", "labels": "clean", "pairs": c["examples"],
                             "unscored": c["unscored"], "accuracy": overall, "ties": c["ties"]})
    overall_row = {"benchmark": "rewardbench", "level": "overall", "name": "overall", "section": None, **c,
                   "score": overall, "weight": float("nan")}
    return accuracy_rows, subset_rows + section_rows + [overall_row]


def rewardbench2_tables(frame: pd.DataFrame, scores: list[np.ndarray]) -> tuple[list[dict], list[dict]]:
    """RewardBench 2 from each example's rewards (`scores[i]`: row i's chosen answers, then its rejected ones):
    (accuracy rows, overall and per subset, as eval_proxy's table has them without the proxy column; the score table
    with the Ties components). An example with an unscored (over-length) answer is left out and counted as unscored.
    `ties` counts examples whose correct answer shares the top score (Ties subset: whose worst correct answer equals
    the best incorrect one)."""
    subset_rows, components = [], []
    for subset in dict.fromkeys(frame.subset):
        idx = np.flatnonzero((frame.subset == subset).to_numpy())
        kept = [i for i in idx if not np.isnan(scores[i]).any()]
        row = {"benchmark": "rewardbench2", "level": "subset", "name": subset, "section": None,
               "examples": len(kept), "unscored": len(idx) - len(kept)}
        if subset.lower() == rb.TIES_SUBSET:
            n_correct = {i: len(frame.chosen.iat[i]) for i in kept}
            parts = rb.ties_score({(frame.kind.iat[i], frame.group.iat[i]): (scores[i], n_correct[i]) for i in kept})
            score = parts.pop("score")
            ties = sum(1 for i in kept if scores[i][:n_correct[i]].min() == scores[i][n_correct[i]:].max())
            components += [{**row, "level": "ties_component", "name": k, "ties": ties, "score": v,
                            "weight": rb.TIES_WEIGHTS[k]} for k, v in parts.items()]
        else:
            credit = [rb.best_of_n_credit(scores[i]) for i in kept]
            score = float(np.mean(credit)) if kept else float("nan")
            ties = sum(1 for i in kept if scores[i][0] == scores[i].max() and (scores[i] == scores[i][0]).sum() > 1)
        subset_rows.append({**row, "ties": ties, "score": score, "weight": float("nan")})
    overall = rb.overall_score({r["name"]: r["score"] for r in subset_rows}, "rewardbench2",
                               rb.REWARDBENCH2_SUBSETS)
    n = {k: int(sum(r[k] for r in subset_rows)) for k in ("examples", "unscored", "ties")}
    overall_row = {"benchmark": "rewardbench2", "level": "overall", "name": "overall", "section": None, **n,
                   "score": overall, "weight": float("nan")}
    accuracy_rows = [{"set": "rewardbench2", "labels": "clean", "pairs": n["examples"], "unscored": n["unscored"],
                      "accuracy": overall, "ties": n["ties"]}]
    accuracy_rows += [{"set": rb.set_name("rewardbench2", r["name"]), "labels": "clean", "pairs": r["examples"],
                       "unscored": r["unscored"], "accuracy": r["score"], "ties": r["ties"]} for r in subset_rows]
    return accuracy_rows, subset_rows + components + [overall_row]


def run(cfg: EvalProxyStageConfig, inputs: dict[str, Path], out: Path) -> None:
    # benchmark files are read (and their schemas checked) before the scorer is loaded
    rewardbench = rewardbench2 = None
    if cfg.eval.rewardbench_path:
        from pipeline.hf_data import load_rewardbench

        rewardbench = load_rewardbench(cfg.eval.rewardbench_path)
    if cfg.eval.rewardbench2_path:
        from pipeline.hf_data import load_rewardbench2

        rewardbench2 = load_rewardbench2(cfg.eval.rewardbench2_path)
    ranks = data_parallel_ranks()
    scorer = data_parallel(build_scorer(cfg.scorer, inputs), ranks)
    pairs = read_records(inputs["pairs"] / "pairs.parquet", PAIR_COLUMNS)
    sets = {"id_test": pairs[pairs.split == "test"]}
    ood_file = inputs["pairs"] / "ood_pairs.parquet"
    if ood_file.exists():
        sets["ood"] = read_records(ood_file, PAIR_COLUMNS)
    if cfg.eval.hhh_path:
        from pipeline.hf_data import load_hhh_alignment

        hhh = load_hhh_alignment(cfg.eval.hhh_path)
        for subset, frame in hhh.groupby("subset"):
            sets[f"hhh_{subset}"] = frame
        sets["hhh_all"] = hhh
    if cfg.eval.mt_bench_path:
        from pipeline.hf_data import load_mt_bench_human

        sets["mt_bench"] = load_mt_bench_human(cfg.eval.mt_bench_path, keep_ties=False)

    rows = []
    for name, frame in sets.items():
        if frame.empty:  # an accuracy of nothing would be NaN, which is not JSON; say so instead
            log.warning("eval_proxy[%s]: evaluation set %r has no pairs; skipped", cfg.scorer.name, name)
            continue
        prompts_c, prompts_r = pair_prompts(frame)  # MT-Bench turn 2: each side in its own model's conversation
        r_c = _score_checked(scorer, cfg, prompts_c, list(frame.chosen), list(frame.pair_id), ("pair_id",),
                             f"{name}, chosen")
        r_r = _score_checked(scorer, cfg, prompts_r, list(frame.rejected), list(frame.pair_id), ("pair_id",),
                             f"{name}, rejected")
        rows.append({"proxy": cfg.scorer.name, "set": name, "labels": "clean", **pairwise_accuracy(r_c, r_r)})
        if "label_noisy" in frame and (frame.label_noisy == 0).any():
            rows.append({"proxy": cfg.scorer.name, "set": name, "labels": "noisy",
                         **pairwise_accuracy(r_c, r_r, frame.label_noisy.to_numpy())})
    benchmark_rows: list[dict] = []
    if rewardbench is not None:
        prompts = [list(p) for p in rewardbench.prompt]
        keys = list(rewardbench.pair_id)
        r_c = _score_checked(scorer, cfg, prompts, list(rewardbench.chosen), keys, ("pair_id",),
                             "rewardbench, chosen")
        r_r = _score_checked(scorer, cfg, prompts, list(rewardbench.rejected), keys, ("pair_id",),
                             "rewardbench, rejected")
        acc_rows, scores_table = rewardbench_tables(rewardbench, r_c, r_r)
        rows += [{"proxy": cfg.scorer.name, **r} for r in acc_rows]
        benchmark_rows += scores_table
    if rewardbench2 is not None:
        # every answer of every example in one scoring call; scores[i] = chosen then rejected answers of row i
        answers = [list(c) + list(r) for c, r in zip(rewardbench2.chosen, rewardbench2.rejected)]
        flat = _score_checked(
            scorer, cfg, [list(p) for p, a in zip(rewardbench2.prompt, answers) for _ in a],
            [x for a in answers for x in a], [(e, j) for e, a in zip(rewardbench2.example_id, answers)
                                              for j in range(len(a))], ("id", "answer"), "rewardbench2")
        bounds = np.cumsum([0] + [len(a) for a in answers])
        acc_rows, scores_table = rewardbench2_tables(rewardbench2,
                                                     [flat[b:e] for b, e in zip(bounds[:-1], bounds[1:])])
        rows += [{"proxy": cfg.scorer.name, **r} for r in acc_rows]
        benchmark_rows += scores_table
    if not ranks.main:  # every rank holds every score; one writes the tables
        return
    table = pd.DataFrame(rows)
    table.to_parquet(out / "accuracy.parquet", index=False)
    # every pair over the length limit leaves accuracy NaN: null in strict JSON
    (out / "accuracy.json").write_text(_json_rows(rows))
    if benchmark_rows:
        pd.DataFrame(benchmark_rows).to_parquet(out / "rewardbench_scores.parquet", index=False)
        (out / "rewardbench_scores.json").write_text(_json_rows(benchmark_rows))
    for r in rows:
        log.info("  %-12s %-10s %-6s accuracy %.3f (%d pairs, %d ties)", r["proxy"], r["set"], r["labels"],
                 r["accuracy"], r["pairs"], r["ties"])
