"""Time the best-of-n curve code at the paper's scale: 1,000 prompts × 405 samples, n = 1, 2, 4, ..., 256, 405.

Run:  .venv/bin/python benchmarks/bench_bon.py [--repeats R] [--prompts P] [--samples N]

Prints the best and median wall time of R runs of each step. Target: `unbiased_bon` under 1 s on 2 CPU cores.
Scores are synthetic (continuous, so no ties) plus a tied variant (proxy rounded to 1 decimal), because ties take
the extra group-averaging path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.bon import bon_curve_table, unbiased_bon  # noqa: E402


def timeit(fn, repeats: int) -> tuple[float, float]:
    """Best and median wall time of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=405)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    P, N = args.prompts, args.samples
    ns = [2 ** k for k in range(N.bit_length()) if 2 ** k <= N]
    if ns[-1] != N:
        ns.append(N)
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(P, N))
    gold = 0.5 * proxy + rng.normal(size=(P, N))
    proxy_tied = np.round(proxy, 1)

    print(f"P = {P} prompts, N = {N} samples, ns = {ns}")
    print(f"CPU cores visible: {os.cpu_count()}, numpy {np.__version__}")
    cases = [
        ("unbiased_bon (proxy + gold)", lambda: unbiased_bon(proxy, {"gold": gold}, ns)),
        ("unbiased_bon, tied proxy", lambda: unbiased_bon(proxy_tied, {"gold": gold}, ns)),
        ("bon_curve_table, n_boot=0", lambda: bon_curve_table(proxy, gold, ns, n_boot=0)),
        ("bon_curve_table, n_boot=1000", lambda: bon_curve_table(proxy, gold, ns, n_boot=1000, ci=0.95, seed=0)),
    ]
    width = max(len(name) for name, _ in cases)
    for name, fn in cases:
        best, med = timeit(fn, args.repeats)
        print(f"{name:<{width}}  best {best * 1e3:8.1f} ms   median {med * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
