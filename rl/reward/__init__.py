"""Rule-based math reward for GRPO and evaluation.

    from rl.reward import math_reward, RewardResult, extract_boxed

The last ``\\boxed{}`` of each completion is compared with the gold answer by
math-verify, in a pool of worker processes with a hard per-item deadline
(see :mod:`rl.reward.pool` for why a plain executor is not enough).
"""

from rl.reward.extract import extract_boxed, extract_last_number, find_last_boxed
from rl.reward.pool import VerifierPool, VerifyOutcome, VerifyTask
from rl.reward.scoring import RewardResult, get_default_pool, math_reward, shutdown_default_pool

__all__ = [
    "math_reward",
    "RewardResult",
    "extract_boxed",
    "extract_last_number",
    "find_last_boxed",
    "VerifierPool",
    "VerifyTask",
    "VerifyOutcome",
    "get_default_pool",
    "shutdown_default_pool",
]
