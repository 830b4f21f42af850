"""Stage 1: the cold start (``eksft.sft.run``), on the trainer worker group of ``sft.workers`` FSDP2 ranks."""

from eksft.sft.run import run_sft

__all__ = ["run_sft"]
