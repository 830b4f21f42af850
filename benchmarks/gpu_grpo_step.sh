#!/usr/bin/env bash
# The one prepared GPU run of benchmarks/gpu_grpo_step.py: a random-initialised Qwen2 of real 0.5B shape (no
# weights needed); one GRPO update (forward + rl.token_stats.token_statistics + rl.grpo.core.policy_loss + backward
# + AdamW) on 8 prompts x 8 samples (prompt 256 tokens, completions 128-1024 tokens), micro-batch 8, in two
# precisions (fp32 weights + bf16 autocast as GRPOTrainer does; bf16 weights), then rollouts with
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
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${EKSFT_GPU_WHEELS:-.cache/gpu-wheels}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if ls "$WHEELS"/pydantic-*.whl >/dev/null 2>&1; then
        # typing_extensions only when the image's is older than pydantic needs (>= 4.16).
        wheels=$(ls "$WHEELS"/*.whl | grep -v typing_extensions)
        if ! "$PY" -c "import sys, importlib.metadata as m; v = tuple(int(x) for x in m.version('typing_extensions').split('.')[:2]); sys.exit(v < (4, 16))" 2>/dev/null; then
            wheels="$wheels $(ls "$WHEELS"/typing_extensions-*.whl 2>/dev/null)"
        fi
        # shellcheck disable=SC2086
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/eksft-site $wheels; then
            export PYTHONPATH="/tmp/eksft-site:$PYTHONPATH"
        else
            echo "installing the pydantic wheels failed: the HF-engine part will be skipped" >&2
        fi
    else
        echo "pydantic is missing and there are no wheels in $WHEELS: the HF-engine part will be skipped" >&2
    fi
fi

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
