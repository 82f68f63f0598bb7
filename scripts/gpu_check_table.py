"""Print, for studies that have run, each stage's wall time and peak memory per rank from the cache's manifests.

    python scripts/gpu_check_table.py CONFIG [section.key=value ...] [-- CONFIG [overrides ...] ...]

Run from the repository root with overopt installed, or with PYTHONPATH=. (scripts/gpu_check.sh sets it). Used by
scripts/gpu_check.sh after its runs (and after a failed run, for the stages that did run); works for any study (peak
memory is recorded by the runner: a GPU rank's `torch.cuda.max_memory_allocated`, a CPU rank's peak resident memory;
an inline CPU stage records none).
Exits 1 if a stage of a named study is not cached (it did not run or failed).
"""

from __future__ import annotations

import sys

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.study import build_stages


def _studies(argv: list[str]) -> list[tuple[str, list[str]]]:
    groups, current = [], []
    for arg in argv + ["--"]:
        if arg == "--":
            if current:
                groups.append((current[0], current[1:]))
            current = []
        else:
            current.append(arg)
    return groups


def main(argv: list[str]) -> int:
    missing = 0
    print(f"{'study':<18} {'stage':<28} {'wall s':>8}  peak memory per rank")
    for path, overrides in _studies(argv):
        cfg = load_config(path, overrides)
        runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root, cfg.run.verify))
        for planned in runner.plan():
            if planned.status != "cached":
                print(f"{cfg.study:<18} {planned.node.key:<28} {'—':>8}  {planned.status}")
                missing += 1
                continue
            peaks = planned.manifest.get("peak_memory", [])
            memory = ", ".join(f"r{p['rank']} {p['device']} {p['peak_bytes'] / 2 ** 20:,.0f} MiB" for p in peaks)
            print(f"{cfg.study:<18} {planned.node.key:<28} {planned.manifest['wall_time_s']:>8.1f}  {memory or '—'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
