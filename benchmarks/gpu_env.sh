# Sourced by benchmarks/gpu_*.sh: the shared set-up for a bare GPU image (torch + transformers, no pydantic).
# Sets PY, WHEELS, RESULTS (created), the environment, and defines ensure_pydantic.
# Environment: EKSFT_GPU_WHEELS (wheel folder, default .cache/gpu-wheels), PYTHON (default python3),
# OUT (the device tool's output folder; default benchmarks/results).
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
WHEELS=${EKSFT_GPU_WHEELS:-.cache/gpu-wheels}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# pydantic importable, from the carried wheels if the image lacks it (installed into /tmp/eksft-site).
# Returns 1 with a message on stderr when it cannot be had; the caller decides whether that is fatal.
ensure_pydantic() {
    "$PY" -c "import pydantic" 2>/dev/null && return 0
    if ! ls "$WHEELS"/pydantic-*.whl >/dev/null 2>&1; then
        echo "pydantic is missing and there are no wheels in $WHEELS (see benchmarks/README.md)" >&2
        return 1
    fi
    # typing_extensions only when the image's is older than pydantic needs (>= 4.16).
    local wheels
    wheels=$(ls "$WHEELS"/*.whl | grep -v typing_extensions)
    if ! "$PY" -c "import sys, importlib.metadata as m; v = tuple(int(x) for x in m.version('typing_extensions').split('.')[:2]); sys.exit(v < (4, 16))" 2>/dev/null; then
        wheels="$wheels $(ls "$WHEELS"/typing_extensions-*.whl 2>/dev/null)"
    fi
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/eksft-site $wheels; then
        echo "installing the pydantic wheels from $WHEELS failed" >&2
        return 1
    fi
    export PYTHONPATH="/tmp/eksft-site:$PYTHONPATH"
}
