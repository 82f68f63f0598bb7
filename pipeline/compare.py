"""`overopt compare STUDY_A STUDY_B ...`: the over-optimization curves of several studies on shared axes.

A study is a report directory (`reports/<study>/`, holding bon_curves.csv and, when it ran RL, ppo_curves.csv,
grpo_curves.csv, rloo_curves.csv, dpo_curves.csv) or a study config with optional `section.key=value` overrides after
it, as `overopt run` takes them. A config's curves are read from the cache, at the fingerprints that config and those
overrides give: nothing runs, every curve stage must be cached, and an override (say `gold_label.noise_rate=0.25`)
can never pick up a report directory made without it.

For every arm (best-of-n, PPO, GRPO, RLOO) that at least two studies have, the output directory gets
`<arm>_gold_vs_kl.png` (each study's curve of each compared proxy: colour by proxy, line style by study) and
`<arm>_curves.csv` (every plotted point, with a `study` column), and README.md a table per proxy: per arm and study
the gold at the initial policy, the peak gold, the KL at the peak and the peak gold's difference to the first study's
with its 95 % interval, p-value (Holm-adjusted over every difference the README gives) and 80 %-power minimal
detectable difference, from `pipeline.comparison_stats` (paired over seeds when the proxy has the same runs in both
studies, Welch otherwise), then a sentence per difference that says what those numbers mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import markdown
from pipeline.comparison_stats import DIFFERENCE_COLUMNS, design_text, difference_of_runs, p_text, verdicts, with_holm
from pipeline.config import proxy_family
from pipeline.gao import peak_row
from pipeline.records import read_curve
from pipeline.seed_stats import seed_stats

# arm -> (display name, curve table of a report directory, x-axis column, KL column), in report order
ARMS = {"bon": ("best-of-n", "bon_curves.csv", "sqrt_kl_bound", "kl_bound"),
        "ppo": ("PPO", "ppo_curves.csv", "sqrt_kl", "kl_k1"),
        "grpo": ("GRPO", "grpo_curves.csv", "sqrt_kl", "kl_k1"),
        "rloo": ("RLOO", "rloo_curves.csv", "sqrt_kl", "kl_k1"),
        "dpo": ("DPO", "dpo_curves.csv", "sqrt_kl", "kl_k1")}
X_LABEL = {"bon": "√KL  (KL = log n − (n−1)/n, an upper bound)", "rl": "√KL to the initial policy (measured, k1)"}
# what a curve table needs for the comparison (besides proxy_name and run)
NEEDED = {"bon": ["n", "kl_bound", "sqrt_kl_bound", "gold", "gold_lo", "gold_hi", "gold_rel"],
          "rl": ["step", "kl_k1", "sqrt_kl", "gold", "gold_lo", "gold_hi", "gold_rel"]}


class CompareError(ValueError):
    """A study cannot be read or the comparison asked for is impossible; the message names the path or proxy."""


@dataclass
class Study:
    """One study's curve tables by arm key, each with `proxy_name` (the proxy, seeds of a proxy under its name) and
    `run` (one curve: a proxy entry of best-of-n, an RL run) columns."""

    label: str
    source: str  # what the user named: a directory, or a config with its overrides
    curves: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)

    def proxies(self) -> list[str]:
        """Every proxy of any arm, in the order the tables list them."""
        return list(dict.fromkeys(p for t in self.curves.values() for p in t.proxy_name))


# ----------------------------------------------------------------------------------------------------------------
# reading studies


def split_studies(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """Command-line tokens as (study, overrides): a `key=value` token that is not an existing path is an override
    of the config before it."""
    studies: list[tuple[str, list[str]]] = []
    for tok in tokens:
        if "=" in tok and not Path(tok).exists():
            if not studies or Path(studies[-1][0]).is_dir():
                raise CompareError(f"override {tok!r} follows no study config: overrides go after the config they "
                                   f"change (a report directory takes none)")
            studies[-1][1].append(tok)
        else:
            studies.append((tok, []))
    return studies


def _kind(arm: str) -> str:
    return "bon" if arm == "bon" else "rl"


def normalise(table: pd.DataFrame, arm: str, source: Path | str) -> tuple[pd.DataFrame, str | None]:
    """A curve table with `proxy_name` and `run` columns, checked for the columns the comparison uses.

    Each curve's name stays in `run` (an RL table's run, a best-of-n table's proxy entry) and `proxy_name` becomes its
    proxy's family (`proxy_family`): the seeds of a proxy are compared as one proxy with several runs.

    Reports made before curve tables had `proxy_name` wrote the proxy's name over the `proxy` column (its mean
    score): such a table is read with that name, its proxy score lost; the returned note says so."""
    note = None
    if "proxy_name" not in table.columns:
        if "proxy" not in table.columns or pd.api.types.is_numeric_dtype(table.proxy):
            raise CompareError(f"{source}: no proxy_name column (has {list(table.columns)})")
        table = table.assign(proxy_name=table.proxy.astype(str), proxy=np.nan)
        note = (f"{source} predates the proxy_name column: proxy names read from its proxy column, which lost the "
                f"proxy's mean score")
    table = table.assign(proxy_name=table.proxy_name.astype(str))
    if "run" not in table.columns:  # best-of-n: one curve per proxy entry
        table = table.assign(run=table.proxy_name)
    table = table.assign(run=table.run.astype(str), proxy_name=table.proxy_name.map(proxy_family))
    missing = [c for c in NEEDED[_kind(arm)] if c not in table.columns]
    if missing:
        raise CompareError(f"{source} lacks column(s) {missing} (has {list(table.columns)})")
    return table, note


def read_report_dir(path: Path, label: str) -> Study:
    """A study from its report directory: every curve table there."""
    if not path.is_dir():
        raise CompareError(f"study {label!r}: no such report directory or config file: {path}")
    curves, notes = {}, []
    for arm, (_, name, _, _) in ARMS.items():
        if (path / name).is_file():
            curves[arm], note = normalise(pd.read_csv(path / name), arm, path / name)
            notes += [note] if note else []
    if not curves:
        raise CompareError(f"study {label!r}: {path} has no bon_curves.csv (nor ppo/grpo/rloo/dpo_curves.csv); is it a "
                           f"report directory? Run the study first (overopt run CONFIG) or name its reports_dir")
    return Study(label, str(path), curves, notes)


def read_config_study(path: Path, overrides: list[str], label: str | None) -> Study:
    """A study from its config and overrides: each curve stage's cached curve.parquet at the fingerprint they give.
    Nothing runs; a curve stage that is not cached is an error naming it and the command that makes it."""
    from pipeline.cache import ArtifactCache
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from pipeline.study import build_stages, rl_runs

    cfg = load_config(path, overrides)
    label = label or cfg.study
    runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root, cfg.run.verify))
    fps = runner.fingerprints()
    wanted: dict[str, list[tuple[str, str, str]]] = {}  # arm -> (stage key, proxy, run)
    if cfg.bon is not None:
        wanted["bon"] = [(f"bon_curve[{p.name}]", p.name, p.name) for p in cfg.expanded_proxies()]
    for arm, by_proxy in rl_runs(cfg).items():
        if arm not in ARMS:  # a PPO variant (ppo_<name>) is compared with plain PPO in its own study's report
            continue
        wanted[arm] = [(f"{arm}_curve[{r}]", p, r) for p, runs in by_proxy.items() for r in runs]
    if not any(wanted.values()):
        raise CompareError(f"study {label!r} ({path}) has no curve stages (no bon, ppo, rl or dpo section)")
    missing = [key for keys in wanted.values() for key, _, _ in keys
               if runner.cache.check(key, fps[key]).status != "cached"]
    if missing:
        command = " ".join(["overopt run", str(path), *overrides])
        raise CompareError(f"study {label!r}: {len(missing)} curve stage(s) not cached in {cfg.run.cache_root}: "
                           f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; run `{command}` first")
    curves = {}
    for arm, keys in wanted.items():
        tables = [read_curve(runner.cache.path(key, fps[key])).assign(proxy_name=p)
                  for key, p, _ in keys]
        if _kind(arm) == "rl":  # a best-of-n curve's run is its proxy entry (normalise)
            tables = [t.assign(run=r) for t, (_, _, r) in zip(tables, keys)]
        curves[arm], _ = normalise(pd.concat(tables, ignore_index=True), arm, f"{path} ({arm} curves)")
    return Study(label, " ".join([str(path), *overrides]), curves)


def load_studies(tokens: list[str], labels: list[str] | None) -> list[Study]:
    """The studies the command line names, with their labels (default: a report directory's name, a config's
    `study`); labels must be distinct."""
    pairs = split_studies(tokens)
    if len(pairs) < 2:
        raise CompareError(f"compare needs at least two studies, got {len(pairs)}")
    if labels and len(labels) != len(pairs):
        raise CompareError(f"{len(labels)} --label(s) for {len(pairs)} studies: give one per study, in order")
    studies = []
    for i, (name, overrides) in enumerate(pairs):
        path, label = Path(name), labels[i] if labels else None
        if path.is_file():
            studies.append(read_config_study(path, overrides, label))
        else:
            studies.append(read_report_dir(path, label or path.resolve().name))
    seen = [s.label for s in studies]
    repeated = sorted({x for x in seen if seen.count(x) > 1})
    if repeated:
        raise CompareError(f"several studies are labelled {', '.join(map(repr, repeated))}: name them with one "
                           f"--label per study")
    return studies


def choose_proxies(studies: list[Study], wanted: list[str] | None) -> list[str]:
    """The proxies to compare: `wanted` (each must be in every study), default every proxy common to all studies,
    in the first study's order."""
    if wanted:
        for s in studies:
            unknown = [p for p in wanted if p not in s.proxies()]
            if unknown:
                raise CompareError(f"--proxies names {', '.join(map(repr, unknown))}, which study {s.label!r} does "
                                   f"not have (its proxies: {', '.join(s.proxies())})")
        return list(dict.fromkeys(wanted))
    common = [p for p in studies[0].proxies() if all(p in s.proxies() for s in studies[1:])]
    if not common:
        have = "; ".join(f"{s.label}: {', '.join(s.proxies())}" for s in studies)
        raise CompareError(f"no proxy is common to all studies ({have})")
    return common


# ----------------------------------------------------------------------------------------------------------------
# the comparison


def _peak(table: pd.DataFrame, arm: str) -> tuple[dict, pd.Series]:
    """Peak gold (its sd over runs), KL at the peak and initial gold of one proxy in one study; with several runs
    (seeds), each run's own peak, averaged over runs. Also each run's peak gold, indexed by run."""
    kl = ARMS[arm][3]
    runs = {r: t for r, t in table.groupby("run", sort=False)}
    peaks = {r: peak_row(t) for r, t in runs.items()}
    first = [t.sort_values("n" if _kind(arm) == "bon" else "step").iloc[0] for t in runs.values()]
    peak_gold = pd.Series({r: p.gold for r, p in peaks.items()}, dtype=float)
    gold = seed_stats(peak_gold)
    return ({"runs": len(runs), "initial gold": float(np.mean([f.gold for f in first])), "peak gold": gold["mean"],
             "sd": gold["sd"], "KL at the peak": float(np.mean([p[kl] for p in peaks.values()]))}, peak_gold)


PEAK_COLUMNS = ["arm", "study", "runs", "initial gold", "peak gold", "sd", "KL at the peak", "Δ peak gold"]


def peak_table(studies: list[Study], proxy: str) -> pd.DataFrame:
    """One row per arm and study that has `proxy`: runs, initial gold, peak gold, KL at the peak, and Δ peak gold
    (the study's minus the first study's, NaN where the first study lacks the arm or proxy). Beside Δ, the columns of
    `pipeline.comparison_stats.difference` of the runs' peak gold against the first study's (its `what` names it;
    NaN on the first study's rows): paired when the proxy has the same runs in both studies (the same seeds)."""
    rows = []
    for arm, (name, _, _, _) in ARMS.items():
        base = None
        for i, s in enumerate(studies):
            t = s.curves.get(arm)
            if t is None or proxy not in set(t.proxy_name):
                continue
            summary, peak_gold = _peak(t[t.proxy_name == proxy], arm)
            row = {"arm": name, "study": s.label, **summary, "Δ peak gold": np.nan}
            if i == 0:
                base, row["Δ peak gold"] = peak_gold, 0.0
            elif base is not None:
                diff = difference_of_runs(base, peak_gold)
                row |= {**diff, "Δ peak gold": diff["difference"],
                        "what": f"{s.label} − {studies[0].label} in {proxy}'s {name} peak gold"}
            rows.append(row)
    return pd.DataFrame(rows, columns=[*PEAK_COLUMNS, "what", *DIFFERENCE_COLUMNS])


def _cell(v, fmt: str = ".3f") -> str:
    if isinstance(v, float):
        return "—" if np.isnan(v) else f"{v:{fmt}}"
    return str(v)


def _peak_md(table: pd.DataFrame) -> str:
    """A proxy's peak table (`peak_table` with `p_holm`) in markdown: Δ with its interval, test, p, Holm p, MDD80."""
    rows = list(table.itertuples(index=False))
    shown = pd.DataFrame({**{c: table[c].map(_cell) for c in PEAK_COLUMNS[:-1]},
                          "Δ peak gold": table["Δ peak gold"].map(lambda v: _cell(v, "+.3f")),
                          "95 % interval": ["—" if np.isnan(r.ci_lo) else f"[{r.ci_lo:.3f}, {r.ci_hi:.3f}]"
                                            for r in rows],
                          "test": [design_text(r._asdict()) if isinstance(r.test, str) else "—" for r in rows],
                          "p": table.p.map(p_text), "Holm p": table.p_holm.map(p_text),
                          "MDD80": table.mdd80.map(_cell)})
    return markdown.table(shown)


def default_out(studies: list[Study]) -> Path:
    """reports/compare/<a>_vs_<b>[...]: labels with anything but letters, digits, `.`, `-`, `_` replaced."""
    return Path("reports") / "compare" / "_vs_".join(re.sub(r"[^\w.-]+", "-", s.label) for s in studies)


def compare(studies: list[Study], proxies: list[str], out: Path) -> Path:
    """Write the comparison of `proxies` across `studies` into `out`; return README.md's path."""
    from pipeline.plots import Overlay, plot_overlay

    out.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in studies]
    parts = [f"# Comparison: {' vs '.join(f'`{x}`' for x in labels)}", "",
             "Made by `overopt compare`. Studies (colours in the plots, one panel per proxy, in this order):", ""]
    parts += [f"- `{s.label}`: `{s.source}`" for s in studies] + [""]
    parts += [f"- Note: {n}" for s in studies for n in s.notes] + ([""] if any(s.notes for s in studies) else [])
    parts += ["Peak gold is the largest mean gold over a curve's points (best-of-n: over n; RL: over the exports); "
              "with several runs of a proxy (RL seeds, and `p@seedK` proxy entries, the seeds of `p`) each run's peak, "
              "averaged, with their sd. KL at the peak is best-of-n's bound log n − (n−1)/n, RL's measured KL (k1); "
              f"initial gold is n = 1's or step 0's. Δ peak gold: the study's peak gold minus `{labels[0]}`'s, with "
              "its 95 % interval and p-value from the runs' peaks: the paired t test over seeds when the proxy has "
              "the same runs (names, so seeds) in both studies, Welch's test otherwise (`test`); Holm p: the p-value "
              "Holm-adjusted over every difference in this README; MDD80: the smallest true difference the test "
              "detects with 80 % power at these runs' spread (noncentral t). `—`: not tested (fewer than two runs "
              "a side, or runs that do not vary).", ""]
    for arm, (name, csv, x, _) in ARMS.items():
        have = [s for s in studies if arm in s.curves]
        if len(have) < 2:
            if have:
                parts += [f"{name}: only in `{have[0].label}`, not compared.", ""]
            continue
        tables = [(s.label, s.curves[arm][s.curves[arm].proxy_name.isin(proxies)]) for s in have]
        if sum(len(t) for _, t in tables) == 0:
            parts += [f"{name}: none of the compared proxies.", ""]
            continue
        points = pd.concat([t.assign(study=label) for label, t in tables], ignore_index=True)
        first = ["study", "proxy_name", "run"]
        points[first + [c for c in points.columns if c not in first]].to_csv(out / csv, index=False)
        figure = f"{arm}_gold_vs_kl.png"
        plot_overlay([Overlay(t, x, keys[0], label)
                      for label, table in tables for keys, t in table.groupby(["proxy_name", "run"], sort=False)],
                     out / figure, f"{name}: {' vs '.join(labels)}", X_LABEL[_kind(arm)])
        parts += [f"## {name}", "", f"![{name}]({figure})", "",
                  f"Every plotted point, with a `study` column: [{csv}]({csv}).", ""]
    # one family for Holm: every difference this README gives, over all proxies and arms
    family = with_holm(pd.concat([peak_table(studies, p).assign(proxy=p) for p in proxies], ignore_index=True))
    parts += ["## Peak gold per proxy", ""]
    for p in proxies:
        parts += [f"### {p}", "", _peak_md(family[family.proxy == p]), ""]
    compared = family[family.what.notna()]
    if len(compared):
        parts += ["## Differences in peak gold", ""] + [f"- {v}" for v in verdicts(compared)] + [""]
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme
