"""The rows a recipe's ``data`` section names, in the shape each stage reads."""

from __future__ import annotations

from eksft.data.formats import to_prompt_answer, to_sft_messages
from eksft.data.sources import read_rows
from eksft.data.tokenize import tokenize_dataset


def _rows(src):
    return read_rows(src.source, src.split, src.num_examples, src.seed, src.fields, src.selection,
                     revision=src.revision)


def load_sft_conversations(data_cfg) -> tuple[list[list[dict]], list[str]]:
    """``(conversations, origins)`` for ``data_cfg.sft``; origins are "file: row N" strings for reports."""
    rows = _rows(data_cfg.sft)
    src = data_cfg.sft
    convs = [to_sft_messages(r, src.format, data_cfg.system_prompt, data_cfg.instruction, src.tags) for r in rows]
    return convs, [r.where() for r in rows]


def load_prompt_answer_rows(data_cfg, source) -> list[dict]:
    """``[{"prompt": messages, "answer": str, "problem": str}]`` for RL or evaluation from ``source``."""
    return [to_prompt_answer(r, source.format, data_cfg.system_prompt, data_cfg.instruction) for r in _rows(source)]


def build_sft_dataset(recipe, tokenizer):
    """``(examples, stats)``: the recipe's SFT conversations tokenized for training; an error when none is left."""
    conversations, origins = load_sft_conversations(recipe.data)
    examples, stats = tokenize_dataset(tokenizer, conversations, recipe.data.max_length, origins,
                                       recipe.data.chat_template_kwargs)
    if not examples:
        raise ValueError(f"no SFT example left to train on: {stats.summary()}")
    return examples, stats
