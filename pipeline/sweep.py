"""Sweeps as a unit: a study's `sweep:` section expanded into points, their progress, and one sweep report.

A point is the study with one value of every `sweep:` key applied as an override (`pipeline.config.set_key`, the
override machinery of `load_config`), the keys crossed; it is named after its values (`n_train_pairs=300,alpha=0.01`)
and publishes its own report to `<reports_dir>/points/<name>/`. Every point keeps the study's name and cache, and
`sweep:` enters no stage's config slice, so stages that two points share (world, base policy, the same pairs, the
same proxy) have one fingerprint and run once, and a point equal to the study has the study's fingerprints.

The sweep report is plain functions called by `overopt run` after every point ran, not a stage: the runner's DAG is
keyed by stage key, and the points' stages share keys (`eval_proxy[bt]` of every point), so no one DAG can hold them
all. It reads each point's eval_proxy[p] and bon_curve[p] artifacts from the cache at that point's fingerprints, as
the point's report stage gets them (its input roles, `pipeline.report_data.read_accuracy` / `read_bon_curves`,
`pipeline.report_data.run_measures`) and, with RL arms, each RL run's peak gold and gold at KLs every run of every point
reaches (`rl_point_runs`), and writes into the study's `reports_dir`: README.md, sweep_runs.csv (every run's
value of every measure), sweep_groups.csv (per point and proxy entry: mean, sd and 95 % t-interval over seeds,
`pipeline.seed_stats`), sweep_differences.csv (each entry minus the baseline entry per point and measure,
`pipeline.comparison_stats.difference_of_runs`: paired over shared seeds, Holm over the whole sweep) and one PNG per
measure, the difference against the first swept key's value, one line per value of the other keys.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import markdown
from pipeline.config import (
    ConfigError,
    StudyConfig,
    read_config_tree,
    set_key,
    sweep_keys,
    validate_config,
)
from pipeline.records import read_curve, read_fit


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its name, the value of each `sweep:` key (as the key is written) and its study config."""

    name: str
    values: dict[str, Any]
    config: StudyConfig


# ----------------------------------------------------------------------------------------------------------------
# expansion


def value_text(value: Any) -> str:
    """A swept value as it appears in a point's name: YAML's spelling of scalars (`null`, `true`, `0.01`), anything
    but letters, digits and `._+-` replaced by `-` (the name is a directory)."""
    if value is None or isinstance(value, (bool, dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "-"


def key_labels(keys: list[str]) -> dict[str, str]:
    """Each sweep key's short name in point names and tables: the last part of its (first) override key, or as many
    trailing parts as make the names distinct (`grm_sft.alpha`, `grm_dpo.alpha`)."""
    parts = {k: sweep_keys(k)[0].split(".") for k in keys}
    for depth in range(1, max(map(len, parts.values()), default=0) + 1):
        labels = {k: ".".join(p[-depth:]) for k, p in parts.items()}
        if len(set(labels.values())) == len(labels):
            return labels
    return {k: re.sub(r"[^A-Za-z0-9._+-]+", "-", k) for k in keys}


def point_config(study_tree: dict, values: dict[str, Any], source: str, reports_dir: Path | None) -> StudyConfig:
    """The study tree with each sweep key set to its value (a tied key sets each of its override keys), validated."""
    tree = copy.deepcopy(study_tree)
    for key, value in values.items():
        for part in sweep_keys(key):
            try:
                set_key(tree, part, value)
            except ConfigError as e:
                raise ConfigError(f"sweep key {key!r}: {e}") from None
    if reports_dir is not None:
        set_key(tree, "run.reports_dir", str(reports_dir))
    return validate_config(tree, source)


def _check_key_matters(study: StudyConfig, key: str, values: list[Any], configs: list[StudyConfig]) -> None:
    """Raise ConfigError naming `key` when setting it adds an RL or best-of-n section the study does not have (an
    override key would create that section with its defaults in every point), or when two of its values make the
    same stages with the same fingerprints (a field the study does not read, such as `alpha` of a BT proxy: the
    points would be one study under two names)."""
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    for part in sweep_keys(key):
        section = part.split(".")[0]
        if "." in part and section in StudyConfig.model_fields and getattr(study, section) is None \
                and any(getattr(c, section) is not None for c in configs):
            raise ConfigError(f"sweep key {key!r}: the study has no {section} section, so setting {part} would add "
                              f"one with its defaults to every point; add {section}: to the study to sweep its keys")
    seen: dict[tuple, Any] = {}
    for value, config in zip(values, configs):
        stages = tuple(sorted(Runner(build_stages(config), cache=None).fingerprints().items()))
        if stages in seen:
            raise ConfigError(f"sweep key {key!r}: values {seen[stages]!r} and {value!r} make the same study (every "
                              f"stage and fingerprint equal): the study does not read {key} (e.g. a setting the "
                              f"proxy's type does not use) or the two values mean the same")
        seen[stages] = value


def expand_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[StudyConfig, list[SweepPoint]]:
    """The study (with its `sweep:`) and its points: the cartesian product of the `sweep:` values in the order the
    keys and values are written, each point the study with those values set and `sweep:` removed; no points when the
    study has no sweep. Every key and value is first checked alone, so an invalid one is a ConfigError naming it;
    a combination the config refuses names the point. A study with `world.seeds: K` > 1 (no `sweep:` then) is
    expanded into its K world points instead (`pipeline.worlds.world_points`): the same machinery runs them."""
    tree = read_config_tree(path, overrides)
    study = validate_config(tree, str(path))
    if study.world.seeds > 1:
        from pipeline.worlds import world_points

        return study, world_points(study, tree, str(path))
    if not study.sweep:
        return study, []
    study_tree = {k: v for k, v in tree.items() if k != "sweep"}
    for key, values in study.sweep.items():
        alone = [point_config(study_tree, {key: value}, f"{path}, sweep key {key} = {value!r}", None)
                 for value in values]
        _check_key_matters(study, key, values, alone)
    labels = key_labels(list(study.sweep))
    points = []
    for combo in itertools.product(*study.sweep.values()):
        values = dict(zip(study.sweep, combo))
        name = ",".join(f"{labels[k]}={value_text(v)}" for k, v in values.items())
        config = point_config(study_tree, values, f"{path}, sweep point {name}",
                              Path(study.run.reports_dir) / "points" / name)
        points.append(SweepPoint(name, values, config))
    names = [p.name for p in points]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"sweep: several points are named {repeated[0]!r}: two values of one key read the same in a "
                          f"file name; write them differently")
    return study, points


# ----------------------------------------------------------------------------------------------------------------
# progress


def status_rows(points: list[SweepPoint], cache) -> tuple[list[dict], dict[str, int]]:
    """Per point: its name and how many of its stages are cached, stale, missing or corrupt (`Runner.plan`, the
    `overopt status` states), of how many; and the same over the distinct stages of the whole sweep (a stage that
    points share, at one fingerprint, counted once)."""
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    rows, distinct = [], {}
    for point in points:
        plan = Runner(build_stages(point.config), cache).plan()
        counts = pd.Series([p.status for p in plan]).value_counts()
        rows.append({"point": point.name, "total": len(plan), **{s: int(counts.get(s, 0)) for s in STATES}})
        distinct |= {(p.node.key, p.fingerprint): p.status for p in plan}
    overall = pd.Series(list(distinct.values()), dtype=object).value_counts()
    return rows, {"total": len(distinct), **{s: int(overall.get(s, 0)) for s in STATES}}


STATES = ("cached", "stale", "missing", "corrupt")


# ----------------------------------------------------------------------------------------------------------------
# the sweep report


class SweepError(ValueError):
    """The sweep report cannot be written (an artifact it reads is not cached); the message names it."""


def point_inputs(point: SweepPoint, cache, roles: tuple[str, ...] = ("eval[", "bon[")) -> dict[str, Path]:
    """The eval_proxy and bon_curve artifacts of a point (or those of other `roles`, prefixes of input roles), by the
    input roles its report stage gives them (`eval[p]`, `bon[p]`), at the point's fingerprints; one that is not
    cached is a SweepError naming it and the point."""
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    runner = Runner(build_stages(point.config), cache)
    fps = runner.fingerprints()
    wanted = {role: key for role, key in runner.by_key["report"].inputs.items()
              if role.startswith(roles)}
    missing = [key for key in wanted.values() if cache.check(key, fps[key]).status != "cached"]
    if missing:
        raise SweepError(f"point {point.name}: {len(missing)} stage(s) not cached: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}")
    return {role: cache.path(key, fps[key]) for role, key in wanted.items()}


def measure_order(measure: str) -> tuple[int, str]:
    # accuracies (in distribution, then out of it) before best-of-n, as the README's tables read
    return (measure.startswith("best-of-n"), measure.replace("id_test", "0").replace("ood", "1"))


def point_runs(point: SweepPoint, cache) -> pd.DataFrame:
    """Every run's value of every measure at one point: columns point, group (the proxy entry), run, measure, value
    (the measures of `pipeline.report_data.run_measures`, read as the point's report reads them)."""
    from pipeline.report_data import read_accuracy, read_bon_curves, run_measures

    inputs = point_inputs(point, cache)
    proxies = [p.name for p in point.config.expanded_proxies()]
    group_of = {run: g for g, runs in point.config.proxy_groups().items() for run in runs}
    rows = [{"point": point.name, "group": group_of[run], "run": run, "measure": measure, "value": float(value)}
            for measure, values in run_measures(read_accuracy(proxies, inputs), read_bon_curves(proxies, inputs))
            for run, value in values.items() if run in group_of]
    return pd.DataFrame(rows, columns=["point", "group", "run", "measure", "value"])


def rl_point_runs(points: list[SweepPoint], cache) -> pd.DataFrame:
    """Each RL run's peak gold (`<Arm> peak gold`: `pipeline.report_data.run_endpoint`, the empirical peak over exports)
    and its gold at matched KL (`<Arm> gold at KL k`, interpolated in √KL, `matched_kl.value_at`), at the KLs
    `matched_points` picks for the runs of every arm at every point (sweep point or world) together, so that every
    point is read at the same KLs; column `world` names the point, `group` the proxy entry the arm optimised. Empty
    for a study without RL arms."""
    from pipeline import matched_kl
    from pipeline.report_data import arm_name, matched_points, run_endpoint
    from pipeline.study import rl_runs

    found = []  # (world, arm, proxy, run, curve, fit)
    for point in points:
        arms = rl_runs(point.config)
        if not arms:
            continue
        inputs = point_inputs(point, cache, tuple(f"{arm}[" for arm in arms))
        found += [(point.name, arm, proxy, run, read_curve(inputs[f"{arm}[{run}]"]), read_fit(inputs[f"{arm}[{run}]"]))
                  for arm, by_proxy in arms.items() for proxy, names in by_proxy.items() for run in names]
    columns = ["world", "group", "run", "measure", "value"]
    if not found:
        return pd.DataFrame(columns=columns)
    kls, _, _ = matched_points([c for *_, c, _ in found], [run_endpoint(f, "KL at the gold peak") for *_, f in found])
    rows = []
    for world, arm, proxy, run, curve, fit in found:
        at = {"world": world, "group": proxy, "run": run}
        rows.append({**at, "measure": f"{arm_name(arm)} peak gold", "value": run_endpoint(fit, "peak gold")})
        rows += [{**at, "measure": f"{arm_name(arm)} gold at KL {k:g}", "value": v}
                 for k, v in zip(kls, matched_kl.value_at(curve, kls))]
    return pd.DataFrame(rows, columns=columns)


def sweep_tables(study: StudyConfig, points: list[SweepPoint], cache) -> dict[str, pd.DataFrame]:
    """The sweep's numbers: `runs` (every run's value), `groups` (per point, entry and measure: `seed_stats` over
    the entry's seeds) and `differences` (per point, non-baseline entry and measure: `difference_of_runs` of the
    entry's runs against the baseline entry's, B − A, paired over shared seeds; `p_holm` over every row). Each
    table has a column per sweep key (its `key_labels` name) holding the point's value."""
    from pipeline.comparison_stats import difference_of_runs, with_holm
    from pipeline.seed_stats import seed_stats

    labels = key_labels(list(study.sweep))
    values = {p.name: {labels[k]: v for k, v in p.values.items()} for p in points}
    runs = pd.concat([point_runs(p, cache) for p in points], ignore_index=True)
    rl = rl_point_runs(points, cache).rename(columns={"world": "point"})
    proxy_measures = sorted(runs.measure.unique(), key=measure_order)
    runs = pd.concat([runs, rl], ignore_index=True) if len(rl) else runs
    measures = proxy_measures + list(dict.fromkeys(rl.measure))  # RL measures after the proxies', in arm order
    baseline = study.baseline_entry()
    groups, differences = [], []
    for point in points:
        here = runs[runs.point == point.name]
        for measure in measures:
            by_group = {g: t.set_index("run").value for g, t in here[here.measure == measure].groupby("group",
                                                                                                      sort=False)}
            groups += [{"point": point.name, **values[point.name], "group": g, "measure": measure, **seed_stats(v)}
                       for g, v in by_group.items()]
            if baseline not in by_group:
                continue
            differences += [{"point": point.name, **values[point.name], "group": g, "baseline": baseline,
                             "measure": measure, **difference_of_runs(by_group[baseline], v)}
                            for g, v in by_group.items() if g != baseline]
    runs = runs.assign(**{label: runs.point.map(lambda n, label=label: values[n][label]) for label in labels.values()})
    differences = pd.DataFrame(differences)
    return {"runs": runs, "groups": pd.DataFrame(groups),
            "differences": with_holm(differences) if len(differences) else differences}


def write_sweep_report(study: StudyConfig, points: list[SweepPoint], cache, out: Path) -> Path:
    """Write the sweep report (module docstring) into `out`; return its README.md. Its content is a function of the
    cache alone (the compute time is the stages' manifests', not this run's), so a cached re-run rewrites it
    unchanged."""
    from pipeline import plots
    from pipeline.comparison_stats import design_text, p_text
    from pipeline.seed_stats import mean_sd_text

    out.mkdir(parents=True, exist_ok=True)
    tables = sweep_tables(study, points, cache)
    for name, table in tables.items():
        table.to_csv(out / f"sweep_{name}.csv", index=False)
    labels = key_labels(list(study.sweep))
    keys = list(labels.values())
    baseline = study.baseline_entry()
    parts = [f"# Sweep `{study.study}`", "",
             f"Generated by `overopt run` over the {len(points)} points of the study's `sweep:` (every combination "
             f"of {', '.join(f'`{k}` {study.sweep[k]}' for k in study.sweep)}); each point's own report is in "
             "`points/<point>/`. Stages the points share ran once (one cache).", "",
             "| point | " + " | ".join(keys) + " | report |", "|" + "---|" * (len(keys) + 2)]
    parts += [f"| {p.name} | " + " | ".join(value_text(v) for v in p.values.values())
              + f" | [points/{p.name}](points/{p.name}/README.md) |" for p in points]
    parts += ["", time_line(points, cache), ""]

    runs, groups, diffs = tables["runs"], tables["groups"], tables["differences"]
    measures = list(dict.fromkeys(groups.measure))
    parts += ["## Per point", "", "Each proxy entry's mean ± sd over its seeds (their number in parentheses); every "
              "run's value "
              "is in sweep_runs.csv, the 95 % t-intervals in sweep_groups.csv.", ""]
    cells = runs.groupby(["point", "group", "measure"], sort=False).value.agg(
        lambda v: f"{mean_sd_text(v)} ({len(v)})").unstack("measure")
    order = pd.MultiIndex.from_tuples(list(dict.fromkeys(zip(runs.point, runs.group))), names=["point", "group"])
    parts += [markdown.table(cells.reindex(order)[measures].reset_index().rename(columns={"group": "entry"})), ""]
    if len(diffs):
        parts += [f"## Differences to `{baseline}`", "",
                  f"Each entry minus `{baseline}` at each point, with its 95 % interval: the paired t test over seeds "
                  "when the two entries' runs are the same seeds, Welch's otherwise (`test`); Holm p adjusts over all "
                  f"{int(diffs.p_holm.notna().sum())} tested differences of this sweep; MDD80 is the smallest true "
                  "difference the design detects with 80 % power (`pipeline.comparison_stats`). Every number is in "
                  f"sweep_differences.csv. In each plot x is `{keys[0]}`"
                  + (f", one line per value of {', '.join(f'`{k}`' for k in keys[1:])}" if len(keys) > 1 else "")
                  + "; bars are the 95 % intervals.", ""]
        for measure in measures:
            sub = diffs[diffs.measure == measure]
            if not len(sub):
                continue
            figure = f"sweep_{markdown.slug(measure)}.png"
            plots.plot_sweep_differences(sub, keys[0], keys[1:], out / figure,
                                         f"{study.study}: {measure}, entry − {baseline}", f"Δ {measure}")
            shown = pd.DataFrame({"point": sub.point, "entry": sub.group,
                                  f"Δ (− {baseline}) [95 % CI]": [
                                      f"{r.difference:+.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}]" if np.isfinite(r.ci_lo)
                                      else f"{r.difference:+.3f}" for r in sub.itertuples()],
                                  "test": [design_text(r) for _, r in sub.iterrows()],
                                  "p": sub.p.map(p_text), "Holm p": sub.p_holm.map(p_text),
                                  "MDD80": [f"{v:.3f}" if np.isfinite(v) else "—" for v in sub.mdd80]})
            parts += [f"### {measure}", "", f"![{measure}]({figure})", "", markdown.table(shown), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme


def time_line(points: list[SweepPoint], cache) -> str:
    """How long the sweep's work took: the summed wall time of its distinct stages, from their manifests (whichever
    run made them; how long this run took depends on what was cached, and is in its log)."""
    from pipeline.cache import ArtifactCache
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    sized = ArtifactCache(cache.root, verify="size")  # the cache's own manifest check; sizes suffice for a time
    seen: dict[tuple[str, str], float] = {}
    for point in points:
        for key, fp in Runner(build_stages(point.config), cache).fingerprints().items():
            if (key, fp) in seen:
                continue
            state = sized.check(key, fp)
            if state.status == "cached":  # a missing or damaged artifact has no time to add
                seen[(key, fp)] = float(state.manifest.get("wall_time_s", 0.0))
    return (f"Compute: {len(seen)} distinct stages, {markdown.duration(sum(seen.values()))} of stage wall time in all "
            "(from their manifests, whichever run made them).")
