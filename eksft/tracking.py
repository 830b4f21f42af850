"""Experiment trackers for stages that are not driven by transformers' Trainer (RL, evaluation).

A tracker is a callable taking a flat metrics dict with a "step" key. metrics.jsonl and the
console are always written by the stages themselves; these are the optional extras.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Tracker = Callable[[dict], None]


def make_trackers(report_to: list[str], log_dir: Path, run_name: str, config: dict | None = None,
                  step_offset: int = 0) -> list[Tracker]:
    trackers: list[Tracker] = []
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))

        def tensorboard(metrics: dict) -> None:
            step = int(metrics["step"]) + step_offset
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, step)
            writer.flush()

        trackers.append(tensorboard)
    if "wandb" in report_to:
        import wandb

        run = wandb.init(name=run_name, config=config or {}, dir=str(log_dir), reinit="create_new")

        def wandb_log(metrics: dict) -> None:
            run.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]) + step_offset)

        trackers.append(wandb_log)
    return trackers
