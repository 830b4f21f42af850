"""Rollout engines: generate n samples per prompt with per-token log-probs, load new weights, shut down."""

from rl.rollout.vllm_engine import make_llm

__all__ = ["make_llm"]
