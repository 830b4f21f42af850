#!/usr/bin/env bash
# The one prepared GPU run of benchmarks/sft_step.py: a random-initialised Qwen2 of real 0.5B shape
# (no weights needed), bf16 weights, batch 1 x 4096 tokens, variants sft / eksft / naive, each in its
# own subprocess (a naive OOM is recorded in its JSON row, not fatal). About 1-2 minutes on an H100.
#
# Writes into "$OUT" when set (the device tool's output folder), else benchmarks/results/:
#   sft_step_gpu_qwen2-0.5b.json / .md / .log, gpu_sft_step_env.txt
#
# The GPU image has torch + transformers but no pydantic (needed by eksft.objectives). Carry the
# wheels, downloaded once on the CPU machine (see benchmarks/README.md), e.g. with the device tool:
#   run(command="bash benchmarks/gpu_sft_step.sh", carry=[".cache/gpu-wheels"], timeout_s=420)
# Environment: EKSFT_GPU_WHEELS (wheel folder, default .cache/gpu-wheels), PYTHON (default python3),
# SFT_STEP_ARGS (extra arguments for sft_step.py, e.g. "--steps 5").
set -uo pipefail
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
ensure_pydantic || exit 1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__); print(torch.cuda.get_device_name())" 2>&1
} | tee "$RESULTS/gpu_sft_step_env.txt"

# shellcheck disable=SC2086
timeout 420 "$PY" benchmarks/sft_step.py \
    --model random-qwen2-0.5b --device cuda --bf16 --batch 1 --seq 4096 \
    --steps 10 --warmup 3 --on-mismatch record --child-timeout 180 \
    --out "$RESULTS/sft_step_gpu_qwen2-0.5b.json" ${SFT_STEP_ARGS:-} 2>&1 | tee "$RESULTS/sft_step_gpu_qwen2-0.5b.log"
rc=${PIPESTATUS[0]}
echo "sft_step.py exit status: $rc"
exit "$rc"
