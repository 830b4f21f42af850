"""An engine in this process (the Ray actor of ``rl.rollout.ray_engine`` builds its engine with this too)."""

from __future__ import annotations

from rl.rollout.base import RolloutEngine

ENGINES = ("vllm", "hf")


def make_engine(kind: str, model_dir: str, *, dtype: str = "auto", **kwargs) -> RolloutEngine:
    """An engine in this process; kwargs: seed, trust_remote_code, max_model_len, kv_cache_gib (vLLM).

    ``dtype: auto`` is resolved here, where the engine runs (``rl.common.precision``): bfloat16 on a device that
    computes it natively, float32 elsewhere. The decision is printed once.
    """
    from rl.common.precision import resolve_dtype, slow_bf16_warning

    precision = resolve_dtype(dtype, kwargs.get("device"))
    print(f"[rollout] {kind} engine dtype: {precision.describe()}", flush=True)
    if warning := slow_bf16_warning(precision, "rollout.dtype"):
        print(f"[rollout] WARNING: {warning}", flush=True)
    kwargs["dtype"] = precision.dtype
    if kind == "vllm":
        from rl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **kwargs)
    if kind == "hf":
        from rl.rollout.hf_engine import HFEngine

        kwargs.pop("max_model_len", None)
        kwargs.pop("kv_cache_gib", None)
        return HFEngine(model_dir, **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r} (allowed: {', '.join(ENGINES)})")
