"""Rollout engines behind one interface (``rl.rollout.base.RolloutEngine``).

``make_engine("vllm" | "hf", model_dir, ...)`` builds one in this process; ``rl.rollout.ray_engine.RayEngine`` runs the
same engine inside a Ray actor with declared CPU/GPU needs.
"""

from __future__ import annotations

from rl.rollout.base import RolloutConfig, RolloutEngine, Sample, SamplingConfig, prompt_token_ids
from rl.rollout.vllm_engine import make_llm

ENGINES = ("vllm", "hf")

__all__ = ["ENGINES", "RolloutConfig", "RolloutEngine", "Sample", "SamplingConfig", "engine_from_config",
           "make_engine", "make_llm", "prompt_token_ids"]


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


def engine_from_config(cfg: RolloutConfig, model_dir: str, *, seed: int = 0, trust_remote_code: bool = False):
    """The engine a recipe's ``rollout`` section asks for, in a Ray actor when ``use_ray``."""
    kwargs = dict(dtype=cfg.dtype, seed=seed, trust_remote_code=trust_remote_code,
                  max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib)
    if cfg.use_ray:
        from rl.rollout.ray_engine import RayEngine

        return RayEngine(cfg.engine, model_dir, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **kwargs)
    return make_engine(cfg.engine, model_dir, **kwargs)
