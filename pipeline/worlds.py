"""Worlds as seeds: a tiny-world study run in K worlds (`world.seeds: K`), and its report over worlds.

The tiny world (stage `world`), the base policy trained in it (`sft_policy`) and everything downstream are made from
`world.seed` and `policy.seed`. Results differ between worlds (a world made on another CPU type differs too), so one
world is one draw, and a difference between proxies that holds in one world may not hold in the next. With
`world.seeds: K` a study expands into K *world points*, run like the points of a sweep (`pipeline.sweep`: one cache,
`overopt status` shows each point, `overopt gc` keeps every point's artifacts):

- point i is named `world<s>`, s = world.seed + i: the study with world.seed + i, policy.seed + i and world.seeds 1.
  The base policy's seed moves with its world: the policy is trained on that world's corpora anyway, and moving its
  seed too makes the worlds independent replications of everything upstream of the proxies (a fixed policy seed would
  tie the worlds' initialisations together for no gain). Every other seed stays (gold_label's, the proxies',
  best-of-n's, RL's), so every world runs the same design: worlds are the units, the proxy (or RL) seeds are
  replicates within a world.
- point 0 is the single-world study: `world.seeds` enters no fingerprint, so its stages, its report included, are the
  single-world study's artifacts.
- each point publishes its own report to `<reports_dir>/worlds/<point>/`.

The report over worlds is plain functions called by `overopt run` after every point ran (as the sweep report is). It
reads each point's artifacts as its report stage does and writes into the study's `reports_dir`:

- worlds_runs.csv: every run's value of every measure in every world. The measures are the single-world report's
  (`pipeline.report_data.run_measures`: accuracy per evaluation set, best-of-n peak gold) and, per RL arm, its runs'
  peak gold and their gold at matched KL (KLs every run of every arm in every world reaches,
  `pipeline.report_data.matched_points`), grouped by the proxy entry the arm optimised.
- worlds_components.csv: per entry and measure, the mean over all runs, its 95 % t-interval over the world means, and
  the two sources of spread, between worlds and within a world (`variance_components`).
- worlds_differences.csv: each entry minus the baseline entry (`sweep_baseline`, default the first) per measure with
  a 95 % interval that treats worlds as the unit (`world_differences`), Holm over the whole family, beside the pooled
  interval over every seed of every world for reference; worlds_differences_by_world.csv: the difference in each
  world, paired by seed within it.
- one PNG per measure (`plots.plot_world_differences`) and README.md with the tables and one sentence per difference
  (`comparison_stats.verdicts`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import markdown
from pipeline.config import StudyConfig
from pipeline.sweep import SweepPoint, measure_order, point_config, point_runs, rl_point_runs, time_line

POINTS_DIR = "worlds"  # each world's report: <reports_dir>/worlds/<point>/


# ----------------------------------------------------------------------------------------------------------------
# expansion


def world_points(study: StudyConfig, tree: dict, source: str) -> list[SweepPoint]:
    """The study's K = world.seeds world points (module docstring): `world<s>` with world.seed s = world.seed + i and
    policy.seed + i, world.seeds 1, reports under `<reports_dir>/worlds/<point>/`; `tree` is the study's config tree
    (overrides applied), `source` says where it came from."""
    points = []
    for i in range(study.world.seeds):
        values = {"world.seed": study.world.seed + i, "policy.seed": study.policy.seed + i}
        name = f"world{values['world.seed']}"
        config = point_config(tree, {**values, "world.seeds": 1}, f"{source}, world point {name}",
                              Path(study.run.reports_dir) / POINTS_DIR / name)
        points.append(SweepPoint(name, values, config))
    return points


# ----------------------------------------------------------------------------------------------------------------
# the runs


def world_runs(points: list[SweepPoint], cache) -> pd.DataFrame:
    """Every run's value of every measure in every world: columns world (the point's name), world_seed, policy_seed,
    group (the proxy entry), run, measure, value. Proxy measures as the sweep report reads them (`sweep.point_runs`),
    then the RL arms' (`sweep.rl_point_runs`)."""
    proxies = pd.concat([point_runs(p, cache) for p in points], ignore_index=True).rename(columns={"point": "world"})
    proxies = proxies.assign(_order=proxies.measure.map(measure_order)).sort_values("_order", kind="stable")
    runs = pd.concat([proxies.drop(columns="_order"), rl_point_runs(points, cache)], ignore_index=True)
    seeds = {p.name: p.values for p in points}
    return runs.assign(world_seed=runs.world.map(lambda w: seeds[w]["world.seed"]),
                       policy_seed=runs.world.map(lambda w: seeds[w]["policy.seed"]))[
        ["world", "world_seed", "policy_seed", "group", "run", "measure", "value"]]


# ----------------------------------------------------------------------------------------------------------------
# statistics


def variance_components(values, worlds) -> dict:
    """The two sources of spread of runs nested in worlds: one-way random-effects ANOVA, y_wj = μ + a_w + e_wj with
    world effects a_w of variance σ²_b and run (seed) effects e_wj of variance σ²_w, by the method of moments:

        MSB = Σ_w n_w (ȳ_w − ȳ)² / (K − 1),  MSW = Σ_w Σ_j (y_wj − ȳ_w)² / (N − K),
        n0 = (N − Σ_w n_w² / N) / (K − 1)  (n0 = n for n runs in every world),
        σ²_w = MSW,  σ²_b = max(0, (MSB − MSW) / n0)

    (K worlds, n_w runs in world w, N in all; ȳ the mean over all runs). Returns worlds, runs, mean (ȳ), the world
    means' 95 % Student-t interval (`seed_stats` over the K world means: worlds are the unit; ci_lo, ci_hi),
    sd_world_means, ms_between, ms_within, n0, var_between, var_within, their square roots sd_between and sd_within,
    share_between (σ²_b / (σ²_b + σ²_w), the intraclass correlation) and a note. Undefined parts are NaN: with one
    world there is no spread between worlds; with one run per world the within-world spread cannot be estimated and
    the spread of the world means holds both; a negative raw σ²_b (MSB < MSW: the worlds differ less than their seeds
    predict) is set to 0 and noted."""
    from pipeline.seed_stats import seed_stats

    v, w = np.asarray(values, dtype=float), np.asarray(worlds)
    groups = [v[w == name] for name in dict.fromkeys(w)]
    k, n = len(groups), len(v)
    sizes = np.array([len(g) for g in groups], dtype=float)
    means = np.array([g.mean() for g in groups])
    over_worlds = seed_stats(means)
    out = {"worlds": k, "runs": n, "mean": float(v.mean()), "ci_lo": over_worlds["ci_lo"],
           "ci_hi": over_worlds["ci_hi"], "sd_world_means": over_worlds["sd"], "ms_between": np.nan,
           "ms_within": np.nan, "n0": np.nan, "var_between": np.nan, "var_within": np.nan, "note": ""}
    if n > k:
        out["ms_within"] = float(sum(((g - g.mean()) ** 2).sum() for g in groups) / (n - k))
        out["var_within"] = out["ms_within"]
    if k >= 2:
        out["ms_between"] = float((sizes * (means - v.mean()) ** 2).sum() / (k - 1))
        out["n0"] = float((n - (sizes ** 2).sum() / n) / (k - 1))
        raw = (out["ms_between"] - out["ms_within"]) / out["n0"]
        out["var_between"] = max(0.0, raw) if np.isfinite(raw) else np.nan
        if raw < 0:
            out["note"] = "between-world estimate negative (MSB < MSW), set to 0"
    if k < 2:
        out["note"] = "one world: no spread between worlds"
    elif n == k:
        out["note"] = "one run per world: the spread of the world means holds both sources"
    out["sd_between"], out["sd_within"] = np.sqrt(out["var_between"]), np.sqrt(out["var_within"])
    total = out["var_between"] + out["var_within"]
    out["share_between"] = out["var_between"] / total if np.isfinite(total) and total > 0 else np.nan
    return out


def world_differences(runs: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each entry minus `baseline` in each measure, over worlds. `runs`: columns world, group, run, measure, value.

    Returns (by_world, overall). by_world: per measure, entry and world, `comparison_stats.difference_of_runs` of
    the two entries' runs in that world (paired by seed when they are the same seeds, Welch otherwise). overall: per
    measure and entry, the interval that treats worlds as the unit: the paired t test over worlds of the two entries'
    world means (`comparison_stats.difference(..., paired=True)`), i.e. a t-interval with K − 1 degrees of freedom
    of the per-world differences (with paired seeds, each world's mean of its paired differences); its `unit` is
    `world`. With one world there is no such interval (NaN, noted); with two it has one degree of freedom (t = 12.7)
    and is wide. Beside it, prefixed `pooled_`, the interval over every run of every world as if they were one group
    of seeds: paired by (world, seed) when every world pairs, Welch otherwise; it ignores the spread between worlds,
    so it is too narrow when worlds differ, and is given for reference. `p_holm` adjusts the world-unit p-values over
    every row (one family), `pooled_p_holm` the pooled ones over theirs."""
    from pipeline.comparison_stats import difference, difference_of_runs, holm, paired_by_seed, with_holm

    by_world, overall = [], []
    worlds = list(dict.fromkeys(runs.world))
    for measure in dict.fromkeys(runs.measure):
        here = runs[runs.measure == measure]
        for group in dict.fromkeys(here.group):
            if group == baseline:
                continue
            pairs = [(w, here[(here.world == w) & (here.group == baseline)].set_index("run").value,
                      here[(here.world == w) & (here.group == group)].set_index("run").value) for w in worlds]
            pairs = [(w, a, b) for w, a, b in pairs if len(a) and len(b)]
            if not pairs:
                continue
            key = {"measure": measure, "group": group, "baseline": baseline}
            within = [(w, difference_of_runs(a, b)) for w, a, b in pairs]
            by_world += [{**key, "world": w, **d} for w, d in within]
            unit = difference([d["mean_a"] for _, d in within], [d["mean_b"] for _, d in within], paired=True)
            if len(within) < 2:
                unit["note"] = "one world: no interval over worlds"
            aligned = [paired_by_seed(a, b) for _, a, b in pairs]
            if all(x is not None for x in aligned):
                pooled = difference(np.concatenate([x[0] for x in aligned]), np.concatenate([x[1] for x in aligned]),
                                    paired=True)
            else:
                pooled = difference(np.concatenate([a.to_numpy() for _, a, _ in pairs]),
                                    np.concatenate([b.to_numpy() for _, _, b in pairs]), paired=False)
            overall.append({**key, "unit": "world", **unit, **{f"pooled_{k}": v for k, v in pooled.items()}})
    overall = pd.DataFrame(overall)
    if len(overall):
        overall = with_holm(overall).assign(pooled_p_holm=lambda t: holm(t.pooled_p))
    return pd.DataFrame(by_world), overall


def world_tables(study: StudyConfig, points: list[SweepPoint], cache) -> dict[str, pd.DataFrame]:
    """The report's numbers: `runs` (`world_runs`), `components` (per measure and entry, `variance_components`),
    `differences` and `differences_by_world` (`world_differences` against the study's baseline entry)."""
    runs = world_runs(points, cache)
    components = pd.DataFrame([{"measure": m, "group": g, **variance_components(t.value, t.world)}
                               for (m, g), t in runs.groupby(["measure", "group"], sort=False)])
    by_world, overall = world_differences(runs, study.baseline_entry())
    return {"runs": runs, "components": components, "differences": overall, "differences_by_world": by_world}


# ----------------------------------------------------------------------------------------------------------------
# the report


def _interval(d: float, lo: float, hi: float) -> str:
    return f"{d:+.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{d:+.3f}"


def _num(v: float, fmt: str = ".3f") -> str:
    return f"{v:{fmt}}" if np.isfinite(v) else "—"


def write_world_report(study: StudyConfig, points: list[SweepPoint], cache, out: Path) -> Path:
    """Write the report over worlds (module docstring) into `out`; return its README.md, a function of the cache
    alone (see `pipeline.sweep.write_sweep_report`)."""
    from pipeline import plots
    from pipeline.comparison_stats import design_text, p_text, verdicts

    out.mkdir(parents=True, exist_ok=True)
    tables = world_tables(study, points, cache)
    for name, table in tables.items():
        table.to_csv(out / f"worlds_{name}.csv", index=False)
    components = tables["components"]
    diffs, by_world = tables["differences"], tables["differences_by_world"]
    baseline = study.baseline_entry()
    k = len(points)
    parts = [f"# Study `{study.study}` over {k} worlds", "",
             f"Generated by `overopt run` (`world.seeds: {k}`): the study run in {k} tiny worlds, each made from its "
             "own `world.seed` with its own base policy (`policy.seed` moves with it) and everything downstream; "
             "every other seed is the same in each world, so each world runs the same design. The first world is the "
             f"single-world study (its artifacts). Each world's own report is in `{POINTS_DIR}/<world>/`.", "",
             "| world | world.seed | policy.seed | report |", "|---|---|---|---|"]
    parts += [f"| {p.name} | {p.values['world.seed']} | {p.values['policy.seed']} | "
              f"[{POINTS_DIR}/{p.name}]({POINTS_DIR}/{p.name}/README.md) |" for p in points]
    parts += ["", time_line(points, cache), ""]

    parts += ["## Over worlds: the mean and the two sources of spread", "",
              "Per entry and measure: the mean over every run of every world, with its 95 % t-interval over the world "
              "means (worlds are the unit: K − 1 degrees of freedom); and the spread split into its two sources by a "
              "one-way random-effects ANOVA of runs nested in worlds (method of moments): within a world, σ_w = "
              "√MSW (the spread of the proxy or RL seeds in one world), between worlds, σ_b = √max(0, (MSB − MSW) / "
              "n0) (how much the world itself moves the measure beyond what its seeds explain; n0 is the runs per "
              "world), and the share of the variance that is between worlds, σ_b² / (σ_b² + σ_w²). With few worlds "
              "σ_b is a rough estimate. Every number is in worlds_components.csv, every run in worlds_runs.csv.", ""]
    shown = pd.DataFrame({
        "measure": components.measure, "entry": components.group,
        "worlds × runs": [f"{r.worlds} × {r.runs // r.worlds}" if r.runs % r.worlds == 0 else f"{r.worlds}, {r.runs} "
                          "runs" for r in components.itertuples()],
        "mean [95 % CI over worlds]": [_interval(r.mean, r.ci_lo, r.ci_hi).lstrip("+") for r in
                                       components.itertuples()],
        "σ between worlds": components.sd_between.map(_num), "σ within a world": components.sd_within.map(_num),
        "share between": components.share_between.map(lambda v: _num(v, ".0%")), "note": components.note})
    parts += [markdown.table(shown), ""]

    if len(diffs):
        family = int(diffs.p_holm.notna().sum())
        parts += [f"## Differences to `{baseline}`", "",
                  f"Each entry minus `{baseline}`. Per world: the difference with its 95 % interval over that world's "
                  "seeds (paired by seed where the entries' runs are the same seeds, Welch otherwise). Over worlds, "
                  f"the inference: worlds are the unit, the {k} per-world differences (each the mean of the world's "
                  f"paired differences) with a 95 % t-interval over them ({k - 1} degree{'s' if k != 2 else ''} of "
                  "freedom" + ("; with two worlds t(0.975, 1) = 12.7, so the interval is wide: two worlds say little"
                               if k == 2 else "; with one world there is none" if k == 1 else "")
                  + f"); p-values Holm-adjusted over all {family} tested differences; MDD80 is the smallest true "
                  "difference this design detects with 80 % power. Beside it, for reference, the pooled interval over "
                  "every seed of every world as one group (paired by world and seed): it ignores the spread between "
                  "worlds, so it is too narrow when worlds differ. Every number is in worlds_differences.csv and "
                  "worlds_differences_by_world.csv.", ""]
        said = dict(zip(diffs.index, verdicts(diffs.assign(
            what=[f"`{g}` − `{baseline}` in {m}, over worlds" for g, m in zip(diffs.group, diffs.measure)]))))
        for measure in dict.fromkeys(diffs.measure):
            sub, per = diffs[diffs.measure == measure], by_world[by_world.measure == measure]
            figure = f"worlds_{markdown.slug(measure)}.png"
            plots.plot_world_differences(per, sub, out / figure, f"{study.study}: {measure}, entry − {baseline}",
                                         f"Δ {measure}")
            cells = {(r.group, r.world): _interval(r.difference, r.ci_lo, r.ci_hi) for r in per.itertuples()}
            table = pd.DataFrame({"entry": sub.group,
                                  **{w: [cells.get((g, w), "—") for g in sub.group] for w in dict.fromkeys(per.world)},
                                  "over worlds [95 % CI]": [_interval(r.difference, r.ci_lo, r.ci_hi)
                                                            for r in sub.itertuples()],
                                  "test": [design_text(r) for _, r in sub.iterrows()],
                                  "Holm p": sub.p_holm.map(p_text), "MDD80": sub.mdd80.map(_num),
                                  "pooled [95 % CI]": [_interval(r.pooled_difference, r.pooled_ci_lo, r.pooled_ci_hi)
                                                       for r in sub.itertuples()],
                                  "pooled test": [design_text({"n_a": r.pooled_n_a, "n_b": r.pooled_n_b,
                                                               "test": r.pooled_test}) for r in sub.itertuples()]})
            parts += [f"### {measure}", "", f"![{measure}]({figure})", "", markdown.table(table), "",
                      *[f"- {said[i]}" for i in sub.index], ""]
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme
