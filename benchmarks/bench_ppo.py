"""PPO throughput and memory on the tiny policy: 64 rollouts × 16 new tokens per update, 4 epochs × 4 minibatches.

    python benchmarks/bench_ppo.py [--steps 12] [--repeats 2] [--trl-python PATH]

Runs the real `ppo` stage (against the tiny study's BT proxy) in three settings — ZeRO-0 (no DeepSpeed) in one
process, ZeRO-2 and ZeRO-3 in two processes — into throw-away directories, and prints per setting: episodes/s over
the steady-state updates (those that neither export nor checkpoint), seconds per phase, and per rank the parameter +
optimizer-state bytes and the peak resident memory. The upstream artifacts (world, base policy, gold labels, BT proxy)
come from the tiny study's cache and are built first if missing.

`--trl-python` names the interpreter of a separate virtual environment holding TRL 1.12 (the last release with a PPO
trainer); its PPOTrainer is then timed on the same policy and batch shape (`bench_trl_ppo.py`), in the same run,
and the ratio is printed. Run with nothing else on the machine: the 2 cores are shared by every process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.runner import Runner, launch_stage
from pipeline.study import build_stages

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [("ZeRO-0, 1 process", 1, None), ("ZeRO-2, 2 processes", 2, "configs/deepspeed/zero2.json"),
            ("ZeRO-3, 2 processes", 2, "configs/deepspeed/zero3.json")]


def upstream(steps: int):
    """The tiny study's ppo[bt] node (with this benchmark's settings) and its upstream artifacts, built if missing."""
    overrides = [f"ppo.steps={steps}", "ppo.proxies=[bt]", "ppo.checkpoint_every=1000000"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    runner = Runner(build_stages(cfg), ArtifactCache(REPO / cfg.run.cache_root))
    runner.run(until={"train_proxy[bt]", "gold_label"})
    fps = runner.fingerprints()
    node = runner.by_key["ppo[bt]"]
    inputs = {role: runner.cache.path(key, fps[key]) for role, key in node.inputs.items()}
    return node, inputs


def run_setting(node, inputs, processes: int, ds_config: str | None) -> dict:
    from dataclasses import replace

    from pipeline.config import PPOStageConfig

    ppo = node.config.ppo.model_copy(update={"num_processes": processes,
                                             "deepspeed_config": Path(ds_config) if ds_config else None})
    cfg = PPOStageConfig(ppo=ppo, scorer=node.config.scorer, policy=node.config.policy)
    with tempfile.TemporaryDirectory() as out:
        if ds_config is None and processes == 1:  # a fresh interpreter, like the launched settings
            job = Path(out) / "job.json"
            job.write_text(json.dumps({"stage": "ppo", "config_class": "pipeline.config.PPOStageConfig",
                                       "config": cfg.model_dump(mode="json"),
                                       "inputs": {k: str(v) for k, v in inputs.items()}, "out": out}))
            subprocess.run([sys.executable, "-m", "pipeline.stage_main", str(job)], check=True, cwd=REPO)
        else:
            launch_stage(replace(node, config=cfg, launcher="accelerate", num_processes=processes,
                                 deepspeed_config=Path(ds_config) if ds_config else None), inputs, Path(out))
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(out) / "summary.json").read_text())
    exports = set(ppo.export_steps())
    steady = [r for r in records if r["step"] not in exports and r["step"] > 2]
    phases = {k[len("time_"):-2]: float(np.mean([r[k] for r in steady])) for k in steady[0] if k.startswith("time_")}
    return {"episodes_per_s": ppo.rollout_batch_size / phases["total"], "phases": phases,
            "per_rank": summary["per_rank"], "zero_stage": summary["zero_stage"], "steady_steps": len(steady)}


def trl_episodes_per_s(python: str, policy_dir: Path, steps: int) -> float:
    out = subprocess.run([python, str(REPO / "benchmarks" / "bench_trl_ppo.py"), str(policy_dir), str(steps)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["episodes_per_s_steady"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-python", default=None)
    args = parser.parse_args()
    node, inputs = upstream(args.steps)
    results = {}
    for name, processes, ds in SETTINGS:
        runs = [run_setting(node, inputs, processes, ds) for _ in range(args.repeats)]
        results[name] = runs
    trl = None
    if args.trl_python:
        trl = [trl_episodes_per_s(args.trl_python, inputs["policy"] / "model", args.steps)
               for _ in range(args.repeats)]

    print(f"\nPPO on the tiny policy: 64 rollouts x 16 new tokens per update, 4 epochs x 4 minibatches; "
          f"{args.steps} updates, {args.repeats} repeats (mean over steady-state updates; repeats listed)")
    print(f"{'setting':22s} {'episodes/s':>18s} {'rollout':>8s} {'score':>7s} {'forward':>8s} {'update':>7s}   "
          f"{'param+optim MB/rank':>20s} {'peak RSS MB/rank':>18s}")
    base = None
    for name, runs in results.items():
        eps = [r["episodes_per_s"] for r in runs]
        ph = {k: np.mean([r["phases"][k] for r in runs]) for k in runs[0]["phases"]}
        state = [f"{rank['parameter_and_optimizer_bytes'] / 1e6:.2f}" for rank in runs[0]["per_rank"]]
        rss = [f"{rank['peak_rss_bytes'] / 1e6:.0f}" for rank in runs[0]["per_rank"]]
        print(f"{name:22s} {' / '.join(f'{e:.0f}' for e in eps):>18s} {ph['rollout']:8.3f} {ph['score']:7.3f} "
              f"{ph['forward']:8.3f} {ph['update']:7.3f}   {', '.join(state):>20s} {', '.join(rss):>18s}")
        base = base or runs[0]["per_rank"][0]["parameter_and_optimizer_bytes"]
    z3 = results["ZeRO-3, 2 processes"][0]["per_rank"]
    print(f"\nZeRO-3 per-rank parameter + optimizer-state bytes / ZeRO-0's: "
          f"{max(r['parameter_and_optimizer_bytes'] for r in z3) / base:.2f}")
    for name, runs in results.items():
        r = runs[0]["per_rank"][0]
        print(f"  {name:22s} parameters {r['parameter_bytes']:>9,d}  master copies {r['master_copy_bytes']:>9,d}  "
              f"optimizer state {r['optimizer_state_bytes']:>9,d} bytes (rank 0)")
    if trl:
        ours = np.mean([r["episodes_per_s"] for r in results["ZeRO-0, 1 process"]])
        print(f"\nTRL 1.12 PPOTrainer, 1 process: {' / '.join(f'{e:.0f}' for e in trl)} episodes/s; "
              f"overopt ZeRO-0 / TRL = {ours / np.mean(trl):.2f}x")


if __name__ == "__main__":
    main()
