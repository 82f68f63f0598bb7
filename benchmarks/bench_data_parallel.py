"""Data-parallel speed-up: bon_sample, bon_score[bt] and ppo_sample[bt] of the tiny study at 1 and at 2 ranks.

    python benchmarks/bench_data_parallel.py [--config configs/tiny.yaml] [--ranks 2] [--repeats 1]

Builds what the timed stages need (the study's cache, as `make demo` does; nothing when it is there), then recomputes
each timed stage (`--force`) in one process and under `accelerate launch` with `--ranks` processes, every process with
one thread, alternating, `--repeats` times each; the artifact is the same either way (tests/test_data_parallel.py), so
the cache is left as it was. Prints each stage's work (sequences generated and scored, `overopt plan`'s count: the
same job on both sides), its wall time at each rank count (the manifest's, launch and model loading included) and the
speed-up. Run it on an idle machine: the ranks compete with anything else for the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads: one thread per process, inline or launched

STAGES = ["bon_sample", "bon_score[bt]", "ppo_sample[bt]"]


def main() -> None:
    import torch

    from pipeline.cache import ArtifactCache
    from pipeline.config import load_config
    from pipeline.plan import plan_study
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args()
    torch.set_num_threads(1)

    def runner(ranks: int) -> Runner:
        cfg = load_config(args.config, [*args.overrides, f"launch.num_processes={ranks}"])
        root = cfg.run.cache_root if cfg.run.cache_root.is_absolute() else REPO / cfg.run.cache_root
        return Runner(build_stages(cfg), ArtifactCache(root))

    counts = (1, args.ranks)
    runner(1).run(until=set(STAGES))  # the inputs (and the stages themselves, once), untimed
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for ranks in counts:
            r = runner(ranks)
            for p in r.run(only=set(STAGES), force=set(STAGES)):
                if p.node.key in STAGES:
                    times.setdefault((p.node.key, ranks), []).append(p.manifest["wall_time_s"])
    plans = {p.key: p for p in plan_study(load_config(args.config, args.overrides))}
    print(f"\n{'stage':<18}{'work (both sides)':>30}" + "".join(f"{f'{n} rank(s) s':>14}" for n in counts)
          + f"{'speed-up':>10}")
    for stage in STAGES:
        t = [statistics.median(times[stage, n]) for n in counts]
        work = plans[stage]
        shape = ", ".join(f"{what} {w.sequences:,}" for what, w in (("generate", work.generate), ("score", work.score))
                          if w.sequences)
        print(f"{stage:<18}{shape:>30}" + "".join(f"{x:>14.1f}" for x in t) + f"{t[0] / t[1]:>9.2f}x")
    print(f"({args.repeats} repeat(s), median; one thread per process; {os.cpu_count()} logical CPUs)")


if __name__ == "__main__":
    main()
