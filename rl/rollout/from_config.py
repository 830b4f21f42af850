"""The engine a recipe's ``rollout`` section asks for: in this process, or in a Ray actor."""

from __future__ import annotations

from rl.rollout.base import RolloutConfig
from rl.rollout.in_process import make_engine


def engine_from_config(cfg: RolloutConfig, model_dir: str, *, seed: int = 0, trust_remote_code: bool = False):
    """The engine a recipe's ``rollout`` section asks for, in a Ray actor when ``use_ray``."""
    kwargs = dict(dtype=cfg.dtype, seed=seed, trust_remote_code=trust_remote_code,
                  max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib)
    if cfg.use_ray:
        from rl.rollout.ray_engine import RayEngine

        return RayEngine(cfg.engine, model_dir, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **kwargs)
    return make_engine(cfg.engine, model_dir, **kwargs)
