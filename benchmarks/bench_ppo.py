"""PPO throughput and memory on the tiny policy: 64 rollouts × 16 new tokens per update, 4 epochs × 4 minibatches.

    python benchmarks/bench_ppo.py [--steps 12] [--repeats 2] [--trl-python PATH] [--threads N]

Runs the real `ppo` stage (against the tiny study's BT proxy) in three settings — ZeRO-0 (no DeepSpeed) in one
process, ZeRO-2 and ZeRO-3 in two processes — into throw-away directories, and prints per setting: episodes/s over
the steady-state updates (those that neither export nor checkpoint), seconds per phase, and per rank the parameter +
optimizer-state bytes and the peak resident memory. The upstream artifacts (world, base policy, gold labels, BT proxy)
come from the tiny study's cache and are built first if missing.

`--trl-python` names the interpreter of a separate virtual environment holding TRL 1.12 (the last release with a PPO
trainer); its PPOTrainer is then timed on the same policy, the same training prompts (overopt's query token ids) and
the same job (`bench_trl_ppo.py`), in the same run. Both one-process runs, overopt's ZeRO-0 and TRL's, get
OMP_NUM_THREADS=`--threads` (default: OMP_NUM_THREADS, 1 when unset, the stage's own rule). The two shapes — rollouts
per update, minibatch size, optimizer steps per update, epochs, new tokens, processes, threads — are printed side by
side, TRL's as measured inside its run; the ratio is printed only when they agree, a MISMATCH line otherwise.
Run with nothing else on the machine: the 2 cores are shared by every process.
"""

from __future__ import annotations

import argparse
import json
import os
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


SHAPE_KEYS = [("rollouts_per_update", "rollouts per update"), ("minibatch_size", "minibatch size"),
              ("optimizer_steps_per_update", "optimizer steps per update"), ("epochs", "PPO epochs"),
              ("response_length", "new tokens per rollout"), ("processes", "processes"), ("threads", "torch threads")]


def overopt_shape(ppo, threads: int) -> dict:
    """The job overopt's one-process PPO stage runs (stages/ppo.py, pipeline/ppo/update.py: `ppo_epochs` passes over
    `num_minibatches` minibatches, one optimizer step each; threads from OMP_NUM_THREADS, see make_accelerator)."""
    return {"rollouts_per_update": ppo.rollout_batch_size,
            "minibatch_size": ppo.rollout_batch_size // ppo.num_minibatches,
            "optimizer_steps_per_update": ppo.ppo_epochs * ppo.num_minibatches, "epochs": ppo.ppo_epochs,
            "response_length": ppo.sampling.max_new_tokens, "processes": 1, "threads": threads}


def shape_mismatches(ours: dict, theirs: list[dict]) -> list[str]:
    """One line per shape entry on which any TRL repeat differs from overopt's job; empty when they agree."""
    return [f"{label}: overopt {ours[key]}, TRL {', '.join(str(t.get(key)) for t in theirs)}"
            for key, label in SHAPE_KEYS if any(t.get(key) != ours[key] for t in theirs)]


def training_prompt_ids(node, inputs, path: Path) -> Path:
    """overopt's PPO queries (the stage's own prompts and template) as a JSON list of token-id lists, for TRL."""
    from pipeline.models import load_tokenizer
    from pipeline.records import messages, training_prompts
    from pipeline.tokenization import prompt_ids

    tok = load_tokenizer(inputs["policy"] / "model", node.config.policy.trust_remote_code)
    path.write_text(json.dumps([prompt_ids(tok, messages(p)) for p in training_prompts(inputs["pairs"]).prompt]))
    return path


def run_setting(node, inputs, processes: int, ds_config: str | None, threads: int) -> dict:
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
            subprocess.run([sys.executable, "-m", "pipeline.stage_main", str(job)], check=True, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
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


def trl_run(python: str, policy_dir: Path, steps: int, ppo, threads: int, prompt_ids: Path | None) -> dict:
    """One run of bench_trl_ppo.py with overopt's job: its JSON line (shape as measured, episodes/s)."""
    cmd = [python, str(REPO / "benchmarks" / "bench_trl_ppo.py"), str(policy_dir), str(steps),
           "--rollouts", str(ppo.rollout_batch_size), "--minibatches", str(ppo.num_minibatches),
           "--epochs", str(ppo.ppo_epochs), "--response-length", str(ppo.sampling.max_new_tokens)]
    if prompt_ids is not None:
        cmd += ["--prompt-ids", str(prompt_ids)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"bench_trl_ppo.py failed (exit code {out.returncode})")
    for line in out.stderr.splitlines():
        if "MISMATCH" in line:
            print(line, file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_shapes(ours: dict, theirs: list[dict]) -> bool:
    """overopt's job (from its config) and TRL's (as measured in its run) side by side; True when they agree."""
    print(f"\n{'job per update':28s} {'overopt ZeRO-0':>16s} {'TRL 1.12':>16s}")
    for key, label in SHAPE_KEYS:
        trl = " / ".join(str(t.get(key)) for t in theirs) if theirs else "-"
        print(f"{label:28s} {str(ours[key]):>16s} {trl:>16s}")
    wrong = shape_mismatches(ours, theirs)
    for line in wrong:
        print(f"!!! MISMATCH: {line}")
    if wrong:
        print("!!! MISMATCH: overopt and TRL ran different jobs; no ratio is reported.")
    return not wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-python", default=None)
    parser.add_argument("--threads", type=int, default=max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))),
                        help="torch threads of the two one-process runs, overopt ZeRO-0 and TRL")
    args = parser.parse_args()
    node, inputs = upstream(args.steps)
    ppo = node.config.ppo
    results = {}
    for name, processes, ds in SETTINGS:
        runs = [run_setting(node, inputs, processes, ds, args.threads) for _ in range(args.repeats)]
        results[name] = runs
    trl = None
    if args.trl_python:
        with tempfile.TemporaryDirectory() as tmp:
            queries = training_prompt_ids(node, inputs, Path(tmp) / "prompt_ids.json")
            trl = [trl_run(args.trl_python, inputs["policy"] / "model", args.steps, ppo, args.threads, queries)
                   for _ in range(args.repeats)]

    ours = overopt_shape(ppo, args.threads)
    print(f"\nPPO on the tiny policy: {ours['rollouts_per_update']} rollouts x {ours['response_length']} new tokens "
          f"per update, {ours['epochs']} epochs x {ppo.num_minibatches} minibatches of {ours['minibatch_size']}; "
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
    same = print_shapes(ours, [t["shape"] for t in trl] if trl else [])
    if trl:
        zero0 = [r["episodes_per_s"] for r in results["ZeRO-0, 1 process"]]
        trl_eps = [t["episodes_per_s_steady"] for t in trl]
        print(f"\nsteady-state episodes/s, {args.threads} thread(s): overopt ZeRO-0 "
              f"{' / '.join(f'{e:.1f}' for e in zero0)}, TRL 1.12 PPOTrainer {' / '.join(f'{e:.1f}' for e in trl_eps)}")
        if same:
            print(f"overopt ZeRO-0 / TRL = {np.mean(zero0) / np.mean(trl_eps):.2f}x (same job, same threads)")


if __name__ == "__main__":
    main()
