"""Data for both stages: SFT conversations and {prompt, answer} rows for RL and evaluation.

    conversations = load_sft_conversations(recipe.data)        # chat messages, one list per row
    examples, stats = tokenize_dataset(tokenizer, conversations, recipe.data.max_length)
    rows = load_prompt_answer_rows(recipe.data, recipe.data.rl)  # [{"prompt", "answer", "problem"}]
"""

from __future__ import annotations

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION, build_prompt, to_prompt_answer, to_sft_messages
from eksft.data.sources import DataError, Row, read_rows
from eksft.data.tokenize import IGNORE_INDEX, TokenizeStats, tokenize_conversation, tokenize_dataset

__all__ = [
    "BOXED_ANSWER_INSTRUCTION", "DataError", "Row", "read_rows", "build_prompt", "to_sft_messages", "to_prompt_answer",
    "IGNORE_INDEX", "TokenizeStats", "tokenize_conversation", "tokenize_dataset",
    "load_sft_conversations", "load_prompt_answer_rows",
]


def _rows(src):
    return read_rows(src.source, src.split, src.num_examples, src.seed, src.fields)


def load_sft_conversations(data_cfg) -> tuple[list[list[dict]], list[str]]:
    """``(conversations, origins)`` for ``data_cfg.sft``; origins are "file: row N" strings for reports."""
    rows = _rows(data_cfg.sft)
    convs = [to_sft_messages(r, data_cfg.sft.format, data_cfg.system_prompt, data_cfg.instruction) for r in rows]
    return convs, [r.where() for r in rows]


def load_prompt_answer_rows(data_cfg, source) -> list[dict]:
    """``[{"prompt": messages, "answer": str, "problem": str}]`` for RL or evaluation from ``source``."""
    return [to_prompt_answer(r, source.format, data_cfg.system_prompt, data_cfg.instruction) for r in _rows(source)]
