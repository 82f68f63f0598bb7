"""`overopt run|status|show CONFIG [section.key=value ...]`, `overopt gc CONFIG... [--yes]`, `overopt compare STUDY
STUDY... [--proxies a,b] [--label NAME ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from pipeline.config import ConfigError, StudyConfig, dump_config, load_config

log = logging.getLogger("overopt")


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def _setup_logging(log_file: Path | None = None) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger("overopt")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    console = RichHandler(show_path=False, show_time=False, markup=False)
    console.addFilter(_not_file_only)  # records logged with extra={"file_only": True} go to run.log only
    root.addHandler(console)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    root.propagate = False


def _runner(cfg: StudyConfig, cache=None):
    """The study's runner, on `cache` when given (the points of a sweep share one)."""
    from pipeline.cache import ArtifactCache
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    return Runner(build_stages(cfg), cache or ArtifactCache(cfg.run.cache_root, cfg.run.verify))


def _expanded(cfg: StudyConfig, args):
    """A sweep study's (base study, points) (`pipeline.sweep.expand_sweep`; a study with `world.seeds` > 1: its world
    points, `pipeline.worlds`), read once per command so a config edited while a sweep runs cannot change which points
    its report describes; None for a plain study."""
    if not cfg.sweep and cfg.world.seeds == 1:
        return None
    from pipeline.sweep import expand_sweep

    return expand_sweep(args.config, args.overrides)


def _studies(cfg: StudyConfig, sweep) -> list[tuple[str | None, StudyConfig]]:
    """What `run` and `status` work on: the study itself ((None, cfg)), or each point of its sweep (`_expanded`)."""
    if sweep is None:
        return [(None, cfg)]
    return [(p.name, p.config) for p in sweep[1]]


def _names(values: list[str] | None) -> set[str]:
    return {v for item in values or [] for v in item.split(",") if v}


def _forced(runner, args, forced: set[tuple[str, str]]) -> set[str]:
    """The keys `--force` names in this runner's study, less those already forced for another point of a sweep (a
    stage the points share re-runs once); `forced` is updated."""
    fps = runner.fingerprints()
    force = {n.key for n in runner.nodes if n.key in _names(args.force) or n.stage in _names(args.force)}
    force = {k for k in force if (k, fps[k]) not in forced}
    forced |= {(k, fps[k]) for k in force}
    return force


def cmd_run(cfg: StudyConfig, args) -> int:
    """Run the study's stages that are not cached; a sweep runs every point's, one after the other on one cache (so
    what points share runs once), then writes the sweep report (`pipeline.sweep`); a study with `world.seeds` > 1
    runs each world's the same way, then writes the report over worlds (`pipeline.worlds`). On several machines
    (`pipeline.machines`) machine rank 0 does all that and the others take their part in its multi-process stages."""
    import torch

    torch.set_num_threads(cfg.run.torch_threads)
    from contextlib import ExitStack

    from pipeline.cache import ArtifactCache
    from pipeline.machines import LeaderSession, check_hostfile_launch, is_follower, spread_over_machines
    from pipeline.preflight import preflight

    sweep = _expanded(cfg, args)
    studies = _studies(cfg, sweep)
    cache = ArtifactCache(cfg.run.cache_root, cfg.run.verify)
    runners = []
    for _, study in studies:  # every point checked before any work
        preflight(study)  # before any work: local paths exist, model directories serve their roles
        runners.append(_runner(study, cache))
        runners[-1].check_names(_names(args.only) | _names(args.until) | _names(args.force))
        runners[-1].launch = study.launch
        if study.launch.launcher == "deepspeed_hostfile":
            check_hostfile_launch(study.launch, runners[-1].nodes)
    if is_follower(cfg.launch):
        return _follow_run(cfg, args, studies, runners, cache)
    cache.claim()  # refuses a folder overopt did not make, before writing anything into it
    with ExitStack() as stack:
        stack.enter_context(cache.lock(cfg.run.lock_timeout_s))  # the leader's alone on several machines
        cache.sweep_stale()
        run_dir = cfg.run.cache_root / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir.mkdir(parents=True)
        (run_dir / "resolved_config.yaml").write_text(dump_config(cfg))  # a sweep's: its points follow from it
        _setup_logging(run_dir / "run.log")
        t0 = time.time()
        forced: set[tuple[str, str]] = set()  # (key, fingerprint) already forced: a shared stage re-runs once
        # several machines: the session the others join (after the sweep, which clears the last run's)
        session = stack.enter_context(LeaderSession(cache, cfg.launch)) if spread_over_machines(cfg.launch) else None
        for i, ((point, study), runner) in enumerate(zip(studies, runners)):
            runner.session = session
            if point is None:
                log.info("study %s: %d stages; log and resolved config in %s", study.study, len(runner.nodes),
                         run_dir)
            else:
                log.info("%s %d/%d %s: %d stages; log in %s", "world" if cfg.world.seeds > 1 else "sweep point",
                         i + 1, len(runners), point, len(runner.nodes), run_dir)
            try:
                plan = runner.run(only=_names(args.only), until=_names(args.until), force=_forced(runner, args, forced))
            except BaseException as e:
                stage = runner.failed_stage and (runner.failed_stage + (f" of sweep point {point}" if point else ""))
                if session is not None:  # the other machines stop, naming the leader's error
                    session.finish("failed", failure_line(e, stage).removeprefix("error: "))
                if not isinstance(e, Exception):
                    raise
                log.error("%s failed after %.1fs (finished stages stay cached)", f"stage {stage}" if stage else "run",
                          time.time() - t0, exc_info=True, extra={"file_only": True})
                if isinstance(e, ConfigError):
                    raise
                if args.debug:
                    traceback.print_exc()
                print(failure_line(e, stage), file=sys.stderr)
                print(f"  full traceback in {run_dir / 'run.log'}" + ("" if args.debug else " (or run again with "
                                                                       "--debug)"), file=sys.stderr)
                return 1
        log.info("finished in %.1fs", time.time() - t0)
        if sweep is None:
            print_summary(cfg.study, runner, plan)  # under the lock: gc cannot remove what it reads
        elif args.only or args.until:
            log.info("%s not written: --only / --until ran part of each point",
                     "report over worlds" if cfg.world.seeds > 1 else "sweep report")
        elif cfg.world.seeds > 1:
            from pipeline.worlds import write_world_report

            study, points = sweep
            readme = write_world_report(study, points, cache, Path(cfg.run.reports_dir))
            print(f"study over {len(points)} worlds: {readme}")
        else:
            from pipeline.sweep import write_sweep_report

            study, points = sweep
            readme = write_sweep_report(study, points, cache, Path(cfg.run.reports_dir))
            print(f"sweep of {len(points)} points: {readme}")
        if session is not None:
            session.finish("done")
    return 0


def _follow_run(cfg: StudyConfig, args, studies, runners, cache) -> int:
    """`overopt run` on a machine of rank k > 0: join the leader's session, then walk the same stages, taking this
    machine's part in each one spread over the machines (`pipeline.machines`); no lock, no commit, no run folder."""
    from pipeline.machines import Follower, MachineError

    follower = Follower(cache, cfg.launch)
    cache.verify = "size"  # the leader checks the artifacts; a follower only needs to know which are there
    forced: set[tuple[str, str]] = set()
    t0 = time.time()
    runner = None
    try:
        follower.join()
        for runner in runners:
            runner.follower = follower
            runner.run(only=_names(args.only), until=_names(args.until), force=_forced(runner, args, forced))
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        stage = runner.failed_stage if runner is not None else None
        print(f"error: {e}" if isinstance(e, MachineError) else failure_line(e, stage), file=sys.stderr)
        return 1
    log.info("machine %d finished in %.1fs", cfg.launch.machine_rank, time.time() - t0)
    return 0


def _fit(artifact: Path, *keys: str):
    """`fit.json[k1][k2]...` of a curve artifact (`records.read_fit`); a missing key is an error naming it."""
    from pipeline.records import FIT_FILE, read_fit

    value = read_fit(artifact)
    for i, k in enumerate(keys):
        if not isinstance(value, dict) or k not in value:
            raise ValueError(f"{Path(artifact) / FIT_FILE}: no key {'.'.join(keys[:i + 1])!r}")
        value = value[k]
    return value


def summary_rows(runner, plan) -> list[tuple[str, ...]]:
    """One row per proxy and arm whose curve the run just covered (selected, or upstream of what was selected) and
    that is cached: best-of-n from `bon_curve[p]/fit.json`, each RL arm from `<arm>_curve[run]/fit.json`, as the
    report's inputs name them. Columns: proxy (the run, for RL arms), arm, peak gold, KL at the peak, gold at the
    largest KL, the largest KL. Several seeds of one proxy (its `seeds:` copies) or of one RL arm against it make one
    row, `name (K seeds)`, with mean ± sd over the seeds, when the run covered all of them; otherwise a row each."""
    from pipeline.report_data import arm_name

    report = runner.by_key.get("report")
    if report is None:
        return []
    covered = runner.ancestors(runner.selected)
    cached = {p.node.key: p.fingerprint for p in plan if p.status == "cached" and p.node.key in covered}

    def fits(names: list[str], role: str) -> list[tuple[str, Path]]:
        keys = [(name, report.inputs.get(role.format(name))) for name in names]
        return [(name, runner.cache.path(key, cached[key])) for name, key in keys if key in cached]

    groups = report.config.groups or {p: [p] for p in report.config.proxies}
    rows = []
    for group, proxies in groups.items():
        rows += _summary_group(group, "best-of-n", fits(proxies, "bon[{}]"), len(proxies), "kl_bound", "≤ ")
        for arm, by_proxy in report.config.rl_runs.items():
            runs = by_proxy.get(group, [])
            rows += _summary_group(group, arm_name(arm), fits(runs, f"{arm}[{{}}]"), len(runs), "kl", "")
    return rows


def _summary_group(group: str, arm: str, fits: list[tuple[str, Path]], seeds: int, kl: str,
                   kl_prefix: str) -> list[tuple[str, ...]]:
    """Summary rows of one proxy's (or RL arm's) seeds: `fits` are the cached (name, curve artifact) of `seeds`
    runs."""
    from pipeline.seed_stats import mean_sd_text

    values = [(name, _fit(f, "empirical_peak"), _fit(f, "at_max_kl")) for name, f in fits]
    if seeds > 1 and len(values) == seeds:
        peaks, fars = [p for _, p, _ in values], [f for _, _, f in values]
        return [(f"{group} ({seeds} seeds)", arm, mean_sd_text([p["gold"] for p in peaks]),
                 kl_prefix + mean_sd_text([p[kl] for p in peaks], ".2f"), mean_sd_text([f["gold"] for f in fars]),
                 kl_prefix + mean_sd_text([f[kl] for f in fars], ".2f"))]
    return [(name, arm, f"{peak['gold']:.3f}", f"{kl_prefix}{peak[kl]:.2f}", f"{far['gold']:.3f}",
             f"{kl_prefix}{far[kl]:.2f}") for name, peak, far in values]


def print_summary(study: str, runner, plan) -> None:
    """A one-screen table of the run's over-optimization curves (nothing when it covered none)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    try:
        rows = summary_rows(runner, plan)
    except (OSError, ValueError) as e:  # the stages succeeded; a curve artifact this code cannot read is no failure
        log.warning("no summary table: %s", e)
        return
    if not rows:
        return
    table = Table(title=f"study {escape(study)}: gold of the over-optimization curves",
                  caption="KL in nats: best-of-n's the bound log n − (n−1)/n, RL arms' measured on samples (k1)")
    table.add_column("proxy", no_wrap=True)
    table.add_column("arm", no_wrap=True)
    for col in ("peak\ngold", "KL at\npeak", "gold at\nlargest KL", "largest\nKL"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, *cells in rows:
        # a seed aggregate's "(K seeds)" and "± sd" on a second line keep the table within one 80-column screen
        table.add_row(escape(name).replace(" (", "\n("), *(escape(c).replace(" ± ", "\n± ") for c in cells))
    Console().print(table)


def _hint(e: BaseException) -> str:
    """What to change, where the exception's type says it (the stages' own messages say it where they know)."""
    name = type(e).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "lower the stage's batch size (gold.batch_size, eval_proxy.batch_size, bon.score_batch_size, " \
               "proxy_training.batch_size) or use dtype: bfloat16"
    if name == "RecordError":
        return "an upstream artifact does not have the expected records; re-run it with --force <stage>"
    if isinstance(e, FileNotFoundError):
        return "check the path in the config"
    return ""


def failure_line(e: BaseException, stage: str | None) -> str:
    """One line: which stage failed, the exception's message (on one line), and what to change when known."""
    message = " ".join(str(e).split()) or "(no message)"
    hint = _hint(e)
    where = f"stage {stage} failed" if stage else "run failed"
    return f"error: {where}: {type(e).__name__}: {message}" + (f" -> {hint}" if hint and hint not in message else "")


def cmd_status(cfg: StudyConfig, args) -> int:
    """A table of the study's stages and their cache state; for a sweep, each point's progress (stages cached of
    its total) and, with --point NAME, that point's table of stages."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if cfg.sweep or cfg.world.seeds > 1:
        points = dict(_studies(cfg, _expanded(cfg, args)))
        if args.point is None:
            return _sweep_status(cfg, points)
        if args.point not in points:
            raise ConfigError(f"--point {args.point!r} is not a point of this study (points: {', '.join(points)})")
        cfg = points[args.point]
    runner = _runner(cfg)
    table = Table(title=f"study {cfg.study} — cache {cfg.run.cache_root}")
    table.add_column("stage", no_wrap=True)
    for col in ("fingerprint", "state", "wall time", "size"):
        table.add_column(col)
    for p in runner.plan():
        m = p.manifest or {}
        wall = f"{m['wall_time_s']:.1f}s" if "wall_time_s" in m and p.status == "cached" else ""
        size = f"{m['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in m and p.status == "cached" else ""
        state = p.status + (f" ({p.detail})" if p.detail else "")
        table.add_row(escape(p.node.key), p.fingerprint, escape(state), wall, size)
    Console().print(table)
    return 0


def _sweep_status(cfg: StudyConfig, points: dict[str, StudyConfig]) -> int:
    """One row per sweep point: how many of its stages are cached, stale, missing (`overopt status`'s states), of
    its total; a last row for the sweep's distinct stages (those points share counted once)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipeline.cache import ArtifactCache
    from pipeline.sweep import STATES, SweepPoint, status_rows

    cache = ArtifactCache(cfg.run.cache_root, cfg.run.verify)
    rows, overall = status_rows([SweepPoint(name, {}, c) for name, c in points.items()], cache)
    kind = f"study {escape(cfg.study)} over {len(rows)} worlds" if cfg.world.seeds > 1 else \
        f"sweep {escape(cfg.study)}: {len(rows)} points"
    table = Table(title=f"{kind} — cache {cfg.run.cache_root}",
                  caption="a stage that points share counts in each; `--point NAME` lists one point's stages")
    table.add_column("point", no_wrap=True)
    shown = [s for s in STATES if s in ("cached", "missing") or overall[s]]
    for col in (*shown, "total", "done"):
        table.add_column(col, justify="right")
    for r in [*rows, {"point": f"distinct stages of the {'study' if cfg.world.seeds > 1 else 'sweep'}", **overall}]:
        table.add_row(escape(r["point"]), *(str(r[s]) for s in shown), str(r["total"]),
                      f"{r['cached'] / r['total']:.0%}")
    Console().print(table)
    return 0


def print_catalog() -> None:
    """What can be swapped in: every proxy type, the options every trained proxy takes, the RL reward transforms and
    the RL arms, each with the paper it comes from (`pipeline.proxy_types`, `pipeline.reward_transforms`)."""
    from pipeline.proxy_types import PROXY_OPTIONS, PROXY_TYPES
    from pipeline.reward_transforms import DESCRIPTIONS

    def line(name: str, what: str, ref: str) -> str:
        return f"  {name:<16} {what}" + (f"  [{ref}]" if ref else "")

    print("proxy types (proxies[].type):")
    print("\n".join(line(t.name, t.summary, t.reference) for t in PROXY_TYPES.values()))
    print("proxy options (any trained type):")
    print("\n".join(line(name, what, ref) for name, (what, ref) in PROXY_OPTIONS.items()))
    print("reward transforms (ppo.reward_transform.kind, rl.reward_transform.kind, ppo.variants):")
    print("\n".join(line(kind, what, ref) for kind, (what, ref) in DESCRIPTIONS.items()))
    print("RL arms: ppo (+ ppo.variants, e.g. a KL penalty: kl_coef, adaptive_kl), grpo and rloo (rl:), dpo (dpo:)")
    print()


def cmd_show(cfg: StudyConfig, args) -> int:
    """Print what can be swapped in (`print_catalog`), then a few labeled pairs so a person can check the world and
    the gold labels by eye, and (tiny world) what difference decides the training pairs."""
    import pandas as pd

    from pipeline.records import prompt_text

    print_catalog()
    runner = _runner(cfg)
    plan = {p.node.key: p for p in runner.plan()}
    p = plan.get("gold_label")
    if p is None or p.status != "cached":
        print("gold_label is not cached yet: run `overopt run CONFIG --until gold_label` first", file=sys.stderr)
        return 1
    df = pd.read_parquet(runner.cache.path("gold_label", p.fingerprint) / "pairs.parquet")
    for _, r in df.head(args.n).iterrows():
        print(f"[{r.pair_id}] prompt: {prompt_text(r.prompt)}")
        print(f"   chosen   ({r.gold_chosen:+.2f}): {r.chosen}")
        print(f"   rejected ({r.gold_rejected:+.2f}): {r.rejected}")
    train = df[df.split == "train"]
    if cfg.policy.source == "tiny" and len(train):  # what the proxies can learn from: the tiny world's rules say it
        from pipeline.world import deciding_shares

        share = deciding_shares([prompt_text(p) for p in train.prompt], train.chosen, train.rejected)
        print(f"{len(train)} training pairs: {share['intruders']:.1%} decided by an intruder difference alone, "
              f"count {share['count']:.1%}, repeats {share['repeats']:.1%}, several at once {share['several']:.1%} "
              f"(pipeline.world.deciding_difference)")
    return 0


def cmd_plan(cfg: StudyConfig, args) -> int:
    """Print, per stage, its launch, the sequences (and tokens, at most) it generates, scores and trains on, and for
    DeepSpeed stages the model-state memory per rank: nothing runs and nothing is written (`pipeline.plan`)."""
    import shutil

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipeline.plan import plan_study, policy_size_text

    table = Table(title=f"plan of study {escape(cfg.study)}: {escape(policy_size_text(cfg))}", show_lines=False)
    for col in ("stage", "launch", "procs", "generate", "score", "train", "model states per rank", "note"):
        table.add_column(col, overflow="fold")
    for p in plan_study(cfg):
        table.add_row(escape(p.key), p.launch, str(p.processes), p.generate.text(), p.score.text(), p.train.text(),
                      escape(p.memory), escape(p.note))
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
    print("Sequences are exact where the config fixes them (≈ where gold ties or over-length pairs are dropped); "
          "tokens are upper bounds (each sequence at its length limit). Memory: DeepSpeed's estimate of the trained "
          "models' parameters, gradients and optimizer states per rank, plus the frozen models each rank holds whole; "
          "activations and generation caches come on top.")
    return 0


def cmd_gc(args, extra: list[str]) -> int:
    from pipeline.gc import collect

    overrides = [a for a in args.configs if "=" in a] + extra
    paths = [a for a in args.configs if "=" not in a]
    if not paths:
        raise ConfigError("gc needs at least one study config: the studies whose artifacts are kept")
    from pipeline.sweep import expand_sweep

    # a sweep's points are studies of their own: what they reference is kept too
    configs = [c for path in paths for study, points in [expand_sweep(path, overrides)]
               for c in [study, *(p.config for p in points)]]
    from pipeline.cache import CacheLockedError

    try:
        collect(configs, yes=args.yes, lock_timeout_s=0.0)
    except CacheLockedError as e:
        raise CacheLockedError(f"{e}. gc lists and removes nothing while a run holds the lock: run it again once "
                               f"that run has finished") from None
    return 0


def cmd_compare(args, extra: list[str]) -> int:
    """Curves of several studies (report directories, or configs with overrides) on shared axes; see
    `pipeline.compare`."""
    from pipeline.compare import CompareError, choose_proxies, compare, default_out, load_studies

    try:
        studies = load_studies(list(args.studies) + extra, args.label)
        proxies = choose_proxies(studies, [p for p in (args.proxies or "").split(",") if p])
        readme = compare(studies, proxies, args.out or default_out(studies))
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"compared {len(proxies)} prox{'y' if len(proxies) == 1 else 'ies'} across "
          f"{', '.join(s.label for s in studies)}: {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overopt", description="Reward-model over-optimization studies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run the study's stages that are not cached"),
                        ("status", "show each stage's cache state"),
                        ("show", "list proxy types and reward transforms, then print a few gold-labeled pairs"),
                        ("plan", "per stage: processes, tokens to generate and score, memory per rank; runs nothing")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", type=Path)
        p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
        if name == "run":
            p.add_argument("--only", action="append", help="run only these stages (keys or stage names)")
            p.add_argument("--until", action="append", help="run these stages and what they depend on")
            p.add_argument("--force", action="append", help="re-run these stages even if cached")
            p.add_argument("--debug", action="store_true", help="on failure, print the traceback here too")
        if name == "show":
            p.add_argument("-n", type=int, default=5)
        if name == "status":
            p.add_argument("--point", help="a sweep, or a study over worlds (world.seeds): this point's table of "
                                           "stages (default: every point's progress)")
    p = sub.add_parser("gc", help="list (with --yes remove) cached artifacts and run folders that none of the named "
                                  "studies reference")
    p.add_argument("configs", nargs="+", help="study configs to keep; section.key=value overrides apply to all")
    p.add_argument("--yes", action="store_true", help="remove what is listed")
    p = sub.add_parser("compare", help="over-optimization curves of several studies on shared axes")
    p.add_argument("studies", nargs="+", help="report directories, or study configs each followed by its "
                                              "section.key=value overrides (curves read from the cache)")
    p.add_argument("--proxies", help="comma-separated proxies to compare (default: those common to all studies)")
    p.add_argument("--label", action="append", help="a study's name in plots and tables, once per study in order "
                                                    "(default: the report directory's name or the config's study)")
    p.add_argument("--out", type=Path, help="output directory (default: reports/compare/<a>_vs_<b>)")
    # overrides may come after options (`run CONFIG --only x a.b=1`): collect the leftovers that look like overrides
    args, extra = parser.parse_known_args(argv)
    # compare's studies may come after its options too: every leftover that is no option is one of them
    unknown = [e for e in extra if e.startswith("-") or ("=" not in e and args.command != "compare")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _setup_logging()
    try:
        if args.command == "gc":
            return cmd_gc(args, extra)
        if args.command == "compare":
            return cmd_compare(args, extra)
        args.overrides = list(args.overrides) + extra
        cfg = load_config(args.config, args.overrides)
        if args.command == "run" and cfg.launch.launcher == "slurm":  # this node's place from SLURM's environment
            from pipeline.machines import slurm_overrides

            args.overrides += slurm_overrides(cfg.launch)
            cfg = load_config(args.config, args.overrides)
        return {"run": cmd_run, "status": cmd_status, "show": cmd_show, "plan": cmd_plan}[args.command](cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipeline.cache import CacheLockedError

        if isinstance(e, CacheLockedError):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
