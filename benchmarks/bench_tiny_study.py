"""Wall times of the embedded default study on this machine: a cold run in a fresh cache, then a fully cached re-run.

    python benchmarks/bench_tiny_study.py [CONFIG] [overrides...]

Prints one line per stage (from the artifact manifests) and the two totals. Targets (issue figures, not tests):
world + base policy <= 3 min on 2 cores, each proxy <= 2 min, the whole study in minutes.
"""

from __future__ import annotations

import sys
import tempfile
import time

from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.study import build_stages


def bench(config: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*overrides, f"run.cache_root={tmp}/cache", f"run.reports_dir={tmp}/report"]
        t0 = time.time()
        assert main(["run", config, *overrides]) == 0
        cold = time.time() - t0
        t0 = time.time()
        assert main(["run", config, *overrides]) == 0
        cached = time.time() - t0
        cfg = load_config(config, overrides)
        plan = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).plan()
        print(f"\n{'stage':32s} {'wall time':>10s}")
        for p in plan:
            print(f"{p.node.key:32s} {p.manifest['wall_time_s']:9.1f}s")
        print(f"{'cold run (CLI, incl. imports)':32s} {cold:9.1f}s")
        print(f"{'fully cached re-run':32s} {cached:9.1f}s")


if __name__ == "__main__":
    args = sys.argv[1:]
    bench(args[0] if args else "configs/tiny.yaml", args[1:])
