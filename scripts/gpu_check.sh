#!/usr/bin/env bash
# The GPU check: on a machine with at least one CUDA GPU, run a small study end to end on CUDA and print every
# stage's wall time and peak GPU memory per rank; any error fails the script (exit code ≠ 0) with the stage's
# message and traceback, after a table of the stages that did run. Aim: under 10 minutes on one modern GPU.
#
#   scripts/gpu_check.sh                     # from anywhere; overopt need not be pip-installed
#   PYTHON=/path/to/python scripts/gpu_check.sh
#   scripts/gpu_check.sh --plan              # no GPU needed: each run's `overopt plan` (runs nothing, writes
#                                            # nothing), which validates every override below
#
# What it runs (the smoke study, configs/smoke.yaml, on every visible GPU):
#   1. zero2: bf16 weights, PPO under DeepSpeed ZeRO-2 (bf16) with one rank per GPU, the data-parallel stages
#      (sampling and scoring) with one rank per GPU (on one GPU they run inline, in the `overopt run` process);
#   2. zero3: the same PPO under ZeRO-3 (bf16); everything upstream of PPO is cached from run 1;
#   3. vllm (only when vllm is installed): every sampler through vLLM (pipeline/vllm_backend.py), one engine per
#      rank and GPU: best-of-n (bon.backend), the PPO exports' sampling (ppo.eval.backend; their KL still measured
#      with the HF models) and gold_score's candidate pairs (gold_label.sampling_backend), on a policy with 64-wide
#      attention heads (the smoke policy's 16 are below what vLLM's attention kernels take). A vLLM engine runs in
#      a process of its own: its memory is not in the table, which shows the HF models' of the stage's rank.
# Artifacts go to a fresh cache (GPU_CHECK_CACHE, default a temporary folder), so nothing of a CPU study is reused.
# GPU_CHECK_NGPU: ranks per multi-process stage (default: every visible GPU; with --plan, 1 when none is visible).
# Nothing is downloaded: the tiny world is embedded, and the Hugging Face libraries are put offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLAN=0
case "${1:-}" in
  --plan) PLAN=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--plan]" >&2; exit 2 ;;
esac
# `pipeline` importable by this script's Python commands when overopt is not pip-installed (a stage's ranks get the
# repository on their path from the runner), and ahead of an installed copy from another checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a machine without internet: a request to the hub fails at once instead of waiting on the network
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

# Every package the smoke study imports, before anything runs: a missing one would otherwise fail a stage minutes
# in (deepspeed only at PPO). Versions outside pyproject.toml's ranges are named but do not stop the check.
"$PY" - <<'EOF'
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

# pyproject dependencies the smoke study never imports: DPO/GRPO/RLOO (trl), hub data sets (datasets), LoRA (peft),
# DeepSpeed's op builds (ninja)
UNUSED_HERE = {"trl", "datasets", "peft", "ninja"}
missing, off = [], []
for spec in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(spec)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        if req.name not in UNUSED_HERE:
            missing.append(str(req))
        continue
    if not req.specifier.contains(re.sub(r"\+.*", "", version), prereleases=True):
        off.append(f"{req.name} {version} (pyproject: {req.specifier})")
if off:
    print("gpu_check: warning: versions outside pyproject.toml's ranges: " + ", ".join(off), file=sys.stderr)
if missing:
    sys.exit("gpu_check: missing Python packages (install them first): " + ", ".join(missing))
EOF

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$PLAN" -eq 0 ] && [ "$GPUS" -lt 1 ]; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); --plan checks the runs without one" >&2
  exit 2
fi
NGPU=${GPU_CHECK_NGPU:-$(( GPUS > 0 ? GPUS : 1 ))}
if [ "$PLAN" -eq 0 ] && [ "$NGPU" -gt "$GPUS" ]; then
  echo "gpu_check: GPU_CHECK_NGPU=$NGPU but $GPUS GPU(s) are visible" >&2
  exit 2
fi
CACHE=${GPU_CHECK_CACHE:-$(mktemp -d)/cache}
if [ "$GPUS" -gt 0 ]; then
  echo "gpu_check: $NGPU rank(s) on $GPUS GPU(s): $("$PY" -c 'import torch; print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'); cache $CACHE"
fi

# rollouts per update divisible by ranks × minibatches for any rank count
COMMON=("run.cache_root=$CACHE" "run.reports_dir=$CACHE/reports" policy.dtype=bfloat16
        "launch.num_processes=$NGPU" "ppo.num_processes=$NGPU" "ppo.rollout_batch_size=$((16 * NGPU))"
        ppo.num_minibatches=2)
ZERO2=(configs/smoke.yaml study=gpu_check_zero2 "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero2_bf16.json)
ZERO3=(configs/smoke.yaml study=gpu_check_zero3 "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero3_bf16.json)
VLLM=(configs/smoke.yaml study=gpu_check_vllm "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero2_bf16.json
      bon.backend=vllm ppo.eval.backend=vllm gold_label.sampling_backend=vllm policy.hidden_size=128 policy.num_heads=2)

if [ "$PLAN" -eq 1 ]; then  # the vLLM run's plan too: plan needs no vllm
  "$PY" -m pipeline.cli plan "${ZERO2[@]}"
  "$PY" -m pipeline.cli plan "${ZERO3[@]}"
  "$PY" -m pipeline.cli plan "${VLLM[@]}"
  echo "gpu_check: every run's config is valid (--plan: nothing ran)"
  exit 0
fi

TABLE=()  # the table's arguments: each run's config and overrides, runs separated by --
table() { "$PY" scripts/gpu_check_table.py "${TABLE[@]}"; }
check() {  # one run; on failure the table of what ran, then stop with the run's exit code
  local rc=0 t0
  t0=$(date +%s)
  "$PY" -m pipeline.cli run --debug "$@" || rc=$?
  TABLE+=("$@" --)
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check: FAILED after $(( $(date +%s) - t0 )) s (exit code $rc): overopt run $*" >&2
    table || true
    exit "$rc"
  fi
  echo "gpu_check: $2 finished in $(( $(date +%s) - t0 )) s"
}

start=$(date +%s)
check "${ZERO2[@]}"
check "${ZERO3[@]}"
VLLM_FAILED=0
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)'; then
  echo "gpu_check: vllm is not installed: the vLLM backend is not checked (pip install -e '.[vllm]')"
elif ! err=$("$PY" -c 'import vllm' 2>&1); then  # installed but broken (e.g. built for another torch): a failure
  echo "gpu_check: FAILED: vllm is installed but does not import, so the vLLM backend is not checked:" >&2
  echo "$err" | tail -n 5 >&2
  VLLM_FAILED=1
else
  check "${VLLM[@]}"
fi
echo "gpu_check: every run finished in $(( $(date +%s) - start )) s"

# one table over the runs: stage, wall time, peak GPU memory per rank (from the stages' manifests)
table
exit "$VLLM_FAILED"
