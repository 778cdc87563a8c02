#!/usr/bin/env bash
# One pass over everything that needs a GPU: the GPU tests, then the benchmarks in order of importance,
# each under its own time limit so one slow item cannot starve the rest. Results go to OUT_DIR (arg 1).
#   bash bench/gpu_pass.sh results/   (then copy the figures into bench/RESULTS.md)
#   ONLY="tests learner" bash bench/gpu_pass.sh results/   (just the named steps)
set -uo pipefail
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run CMD with a limit, output to OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? after $SECONDS s"; tail -n 25 "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"
step tests 200 "$py" -m pytest -q -rs tests/test_engine_cuda_graphs.py tests/test_model_gpu.py \
  tests/test_kernels_paged.py tests/test_kernels_shared_prefix.py tests/test_engine_backends.py \
  tests/test_engine_shared_prefix.py tests/test_model_fused_ops.py tests/test_model_logprobs_fused.py \
  tests/test_learner_fast_path.py
step rollout_16x16 240 "$py" bench/rollout.py --cases 16x16 --also-eager --repeats 3 --hf-repeats 1 --fused-ops both
step rollout_shared 200 "$py" bench/rollout.py --cases 32x16-1k --shared-prefix both --repeats 3 --no-hf
step rollout_rest 150 "$py" bench/rollout.py --cases 8x8,32x16-1k --repeats 3 --hf-repeats 1
step learner_fast 200 "$py" bench/learner.py --zero 2 --no-reference --micro-batch-tokens 16384 \
  --fused-grad-checks off on --phases
step learner 400 "$py" bench/learner.py --zero 2 --only-reference --micro-batch-tokens 16384
step learner_zero3 400 "$py" bench/learner.py --zero 3 --micro-batch-tokens 16384
step attention_tune 110 "$py" bench/attention.py --tune --tune-cases ${TUNE_CASES:-4096x16,1024x16}
step attention 120 "$py" bench/attention.py --sweep
step single_gpu 170 "$py" -m async_grpo train configs/single_gpu.yaml out_dir=/tmp/single_gpu trainer.max_steps=${SINGLE_GPU_STEPS:-25}
cp /tmp/single_gpu/metrics.jsonl "$out/single_gpu_metrics.jsonl" 2>/dev/null
step pipeline 240 "$py" bench/pipeline.py configs/single_gpu.yaml --steps 12 --warmup 3
step transport 90 "$py" bench/transport.py trajectories --repeats 5
step weights 60 "$py" bench/transport.py weights --cpu --params 5e8 --repeats 3
