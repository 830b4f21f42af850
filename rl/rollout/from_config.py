"""The engine a recipe's ``rollout`` section asks for: in this process, or in a Ray actor."""

from __future__ import annotations

from rl.rollout.base import RolloutConfig
from rl.rollout.in_process import make_engine


def engine_from_config(cfg: RolloutConfig, model_dir: str, *, seed: int = 0, trust_remote_code: bool = False,
                       trainer_shares_gpu: bool = False):
    """The engine(s) a recipe's ``rollout`` section asks for: Ray actors (``num_engines`` replicas) when
    ``in_ray_actors``, else one engine in this process.

    vLLM engines are made ready for vLLM's weight-transfer API unless ``weight_sync: reload``, or unless the engine
    is on a GPU in the trainer's own process: there the trainer's tensors are already on the engine's device and a
    reload takes them as they are (CUDA IPC cannot open a handle in the process that made it).
    ``trainer_shares_gpu`` (the GRPO trainer's in-process engine): on a GPU the engine is made with sleep mode, so
    that it frees its memory while the trainer updates."""
    gpu = cfg.num_gpus > 0 or _sees_gpu()
    kwargs = dict(dtype=cfg.dtype, seed=seed, trust_remote_code=trust_remote_code,
                  max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib)
    if cfg.engine == "vllm":
        kwargs["enforce_eager"] = cfg.enforce_eager
    if cfg.engine == "vllm" and cfg.weight_sync == "transfer" and (cfg.in_ray_actors or not gpu):
        from rl.rollout.weight_transfer import transfer_backend

        kwargs["weight_transfer"] = transfer_backend("cuda" if gpu else "cpu", cfg.placement)
    if cfg.engine == "vllm" and gpu and trainer_shares_gpu and not cfg.in_ray_actors:
        kwargs["enable_sleep_mode"] = True
    if cfg.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
    if cfg.in_ray_actors:
        from rl.rollout.ray_engine import RayEngine

        return RayEngine(cfg.engine, model_dir, num_engines=cfg.num_engines, num_cpus=cfg.num_cpus,
                         num_gpus=cfg.num_gpus * cfg.tensor_parallel_size, **kwargs)
    return make_engine(cfg.engine, model_dir, **kwargs)


def _sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
