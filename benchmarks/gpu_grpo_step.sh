#!/usr/bin/env bash
# The one prepared GPU run of benchmarks/gpu_grpo_step.py: a random-initialised Qwen2 of real 0.5B shape (no
# weights needed); one GRPO update (forward + rl.common.token_stats.token_statistics + rl.grpo.core.policy_loss + backward
# + AdamW) on 8 prompts x 8 samples (prompt 256 tokens, completions 128-1024 tokens), micro-batch 8, in two
# precisions (fp32 weights + bf16 autocast as GRPOTrainer does; bf16 weights), each in three forward layouts
# (prompt-cache; padded rows; packed rows, one prompt per group: rl.common.packing), then rollouts with
# rl.rollout.hf_engine.HFEngine (bf16, 8 prompts x 8 samples x 256 tokens) vs one batched generate.
# About 2-4 minutes on an H100. No vLLM / Ray / datasets / math-verify needed.
#
# Writes into "$OUT" when set (the device tool's output folder), else benchmarks/results/:
#   gpu_grpo_step.json / .md / .log, gpu_grpo_step_env.txt
#
# rl.grpo and rl.rollout import pydantic, which the GPU image lacks: carry the wheels downloaded for
# gpu_sft_step.sh (see benchmarks/README.md), e.g. with the device tool:
#   run(command="bash benchmarks/gpu_grpo_step.sh", carry=[".cache/gpu-wheels"], timeout_s=480)
# Without them the update still runs (the pure modules are loaded from their files) and the HF-engine part
# is skipped. Environment: EKSFT_GPU_WHEELS (wheel folder, default .cache/gpu-wheels), PYTHON (default
# python3), GRPO_GPU_ARGS (extra arguments for gpu_grpo_step.py, e.g. "--steps 3").
set -uo pipefail
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
ensure_pydantic || echo "without pydantic the HF-engine part will be skipped" >&2

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1
    "$PY" -c "import pydantic; print('pydantic', pydantic.__version__)" 2>&1 | tail -1
} | tee "$RESULTS/gpu_grpo_step_env.txt"

# shellcheck disable=SC2086
timeout 450 "$PY" benchmarks/gpu_grpo_step.py --out "$RESULTS/gpu_grpo_step.json" ${GRPO_GPU_ARGS:-} 2>&1 \
    | tee "$RESULTS/gpu_grpo_step.log"
rc=${PIPESTATUS[0]}
echo "gpu_grpo_step.py exit status: $rc"
exit "$rc"
