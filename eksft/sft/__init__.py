"""Stage 1: the cold start (``eksft.sft.run``: one process; ``eksft.sft.launch``: torchrun processes)."""

from eksft.sft.launch import launch_sft
from eksft.sft.run import is_main_process, run_sft

__all__ = ["is_main_process", "launch_sft", "run_sft"]
