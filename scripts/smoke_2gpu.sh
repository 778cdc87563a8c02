#!/usr/bin/env bash
# The local two-GPU smoke test: one learner GPU (DeepSpeed ZeRO over NCCL), one rollout-worker GPU, weights over
# an NCCL broadcast, 30 steps of the embedded task on the Qwen2-0.5B shape. Extra args are config overrides.
#   bash scripts/smoke_2gpu.sh [trainer.max_steps=50 ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
  echo "smoke_2gpu: needs 2 GPUs, found $ngpu" >&2
  exit 2
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
python3 -m torch.distributed.run --standalone --nproc-per-node=2 -m async_grpo train configs/smoke_2gpu.yaml "$@"
