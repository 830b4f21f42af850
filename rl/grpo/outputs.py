"""Where the GRPO trainer writes. The caller decides (``eksft.layout`` builds one for a run directory);
the trainer only writes to these places."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rl.common.resume import checkpoint_name


@dataclass(frozen=True)
class GRPOOutputs:
    metrics: Path      # one JSON line per step
    rollouts: Path     # directory: <step_prefix>-N.jsonl, the prompts, completions and rewards of step N
    checkpoints: Path  # directory: <step_prefix>-N/, resumable checkpoints (HF model dir + trainer state)
    final: Path        # the final HF model directory
    step_prefix: str   # names step N's checkpoint and rollout file, as rl.common.resume.checkpoint_name

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(self.step_prefix, step)

    def rollout_file(self, step: int) -> Path:
        return self.rollouts / f"{checkpoint_name(self.step_prefix, step)}.jsonl"
