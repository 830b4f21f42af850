"""GRPO: pure maths (``core``: advantages, clipped loss, k3 KL, aggregation, batching), typed config, and the loop
(LoRA adapters on a frozen base: ``rl.common.lora``)."""

from rl.grpo.config import GRPOConfig, GRPOLoraConfig
from rl.grpo.outputs import GRPOOutputs

__all__ = ["GRPOConfig", "GRPOLoraConfig", "GRPOOutputs", "run_grpo"]


def run_grpo(model_dir: str, rows: list[dict], config: GRPOConfig, outputs: GRPOOutputs, **kwargs):
    """Train with GRPO from ``model_dir`` on ``[{"prompt": messages, "answer": str}]``, writing to ``outputs``;
    returns the final checkpoint."""
    from rl.grpo.trainer import GRPOTrainer

    return GRPOTrainer(model_dir=model_dir, rows=rows, config=config, outputs=outputs, **kwargs).train()
