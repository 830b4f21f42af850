"""Rollout engines behind one interface (``rl.rollout.base.RolloutEngine``).

``make_engine("vllm" | "hf", model_dir, ...)`` builds one in this process; ``rl.rollout.ray_engine.RayEngine`` runs the
same engine inside a Ray actor with declared CPU/GPU needs.
"""

from __future__ import annotations

from rl.rollout.base import RolloutConfig, RolloutEngine, Sample, SamplingConfig, prompt_token_ids
from rl.rollout.from_config import engine_from_config
from rl.rollout.in_process import ENGINES, make_engine
from rl.rollout.vllm_engine import make_llm

__all__ = ["ENGINES", "RolloutConfig", "RolloutEngine", "Sample", "SamplingConfig", "engine_from_config",
           "make_engine", "make_llm", "prompt_token_ids"]
