#!/usr/bin/env bash
# The GPU check: on a machine with at least one CUDA GPU, run a small study end to end on CUDA and print every
# stage's wall time and peak GPU memory per rank; any error fails the script (exit code ≠ 0) with the stage's
# one-line message. Aim: under 10 minutes on one modern GPU.
#
#   scripts/gpu_check.sh                     # from the repository root, with overopt installed (pip install -e .)
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# What it runs (the smoke study, configs/smoke.yaml, on every visible GPU):
#   1. zero2: bf16 weights, PPO under DeepSpeed ZeRO-2 (bf16) with one rank per GPU, the data-parallel stages
#      (sampling and scoring) with one rank per GPU;
#   2. zero3: the same PPO under ZeRO-3 (bf16); everything upstream of PPO is cached from run 1;
#   3. vllm (only when `import vllm` works): every sampler through vLLM (pipeline/vllm_backend.py), one engine per
#      rank and GPU: best-of-n (bon.backend), the PPO exports' sampling (ppo.eval.backend; their KL still measured
#      with the HF models) and gold_score's candidate pairs (gold_label.sampling_backend), on a policy with 64-wide
#      attention heads (the smoke policy's 16 are below what vLLM's attention kernels take).
# Artifacts go to a fresh cache (GPU_CHECK_CACHE, default a temporary folder), so nothing of a CPU study is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False)" >&2
  exit 2
fi
CACHE=${GPU_CHECK_CACHE:-$(mktemp -d)/cache}
echo "gpu_check: $NGPU GPU(s): $("$PY" -c 'import torch; print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'); cache $CACHE"

# rollouts per update divisible by ranks × minibatches for any GPU count up to 8
COMMON=(run.cache_root="$CACHE" run.reports_dir="$CACHE/reports" policy.dtype=bfloat16
        launch.num_processes="$NGPU" ppo.num_processes="$NGPU" ppo.rollout_batch_size=$((16 * NGPU))
        ppo.num_minibatches=2)
ZERO2=(configs/smoke.yaml study=gpu_check_zero2 "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero2_bf16.json)
ZERO3=(configs/smoke.yaml study=gpu_check_zero3 "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero3_bf16.json)
RUNS=("${ZERO2[*]}" "${ZERO3[*]}")

start=$(date +%s)
"$PY" -m pipeline.cli run "${ZERO2[@]}"
"$PY" -m pipeline.cli run "${ZERO3[@]}"
if "$PY" -c 'import vllm' 2>/dev/null; then
  VLLM=(configs/smoke.yaml study=gpu_check_vllm "${COMMON[@]}" ppo.deepspeed_config=configs/deepspeed/zero2_bf16.json
        bon.backend=vllm ppo.eval.backend=vllm gold_label.sampling_backend=vllm policy.hidden_size=128
        policy.num_heads=2)
  "$PY" -m pipeline.cli run "${VLLM[@]}"
  RUNS+=("${VLLM[*]}")
else
  echo "gpu_check: vllm is not installed: the vLLM backend is not checked (pip install -e '.[vllm]')"
fi
echo "gpu_check: every run finished in $(( $(date +%s) - start )) s"

# one table over the runs: stage, wall time, peak GPU memory per rank (from the stages' manifests)
args=()
for run in "${RUNS[@]}"; do
  # shellcheck disable=SC2206  # the runs' words were joined with spaces above and hold none themselves
  args+=($run --)
done
"$PY" scripts/gpu_check_table.py "${args[@]}"
