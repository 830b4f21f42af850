"""Data for both stages: SFT conversations and {prompt, answer} rows for RL and evaluation.

    conversations = load_sft_conversations(recipe.data)        # chat messages, one list per row
    examples, stats = tokenize_dataset(tokenizer, conversations, recipe.data.max_length)
    rows = load_prompt_answer_rows(recipe.data, recipe.data.rl)  # [{"prompt", "answer", "problem"}]
    examples, stats = build_sft_dataset(recipe, tokenizer)      # both steps above, for the SFT trainer
"""

from __future__ import annotations

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION, build_prompt, to_prompt_answer, to_sft_messages
from eksft.data.load import build_sft_dataset, load_prompt_answer_rows, load_sft_conversations
from eksft.data.sources import DataError, Row, read_rows
from eksft.data.tokenize import IGNORE_INDEX, TokenizeStats, tokenize_conversation, tokenize_dataset

__all__ = [
    "BOXED_ANSWER_INSTRUCTION", "DataError", "Row", "read_rows", "build_prompt", "to_sft_messages", "to_prompt_answer",
    "IGNORE_INDEX", "TokenizeStats", "tokenize_conversation", "tokenize_dataset",
    "load_sft_conversations", "load_prompt_answer_rows", "build_sft_dataset",
]
