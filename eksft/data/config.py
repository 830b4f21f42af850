"""The recipe's ``data`` section. Its own module so that the evaluation (which builds prompts with these
settings) and the recipe (``eksft.config``, which holds the evaluation settings) both import it, not each other."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION
from eksft.schema import Strict


class DataSource(Strict):
    source: str = Field(
        "embedded:arithmetic",
        description="hub id, local .jsonl/.json/.parquet file, or 'embedded:<generator>'",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "problem_solution", "problem_answer"] = "auto"
    split: str = "train"
    num_examples: int | None = Field(None, gt=0, description="first N rows (embedded generators: how many to make, default 256)")
    seed: int = 0
    # Rename fields of the source to the canonical ones, e.g. {problem: question}.
    fields: dict[str, str] = Field(default_factory=dict)


class DataConfig(Strict):
    sft: DataSource = DataSource(source="embedded:arithmetic", num_examples=256)
    rl: DataSource = DataSource(source="embedded:arithmetic", num_examples=256, seed=1)
    max_length: int = Field(1024, gt=8)
    system_prompt: str | None = None
    # Appended to every problem when a prompt is built from {problem, ...} rows.
    instruction: str = BOXED_ANSWER_INSTRUCTION
    # Variables for the model's chat template, the same for SFT formatting, RL prompts and evaluation prompts,
    # e.g. {enable_thinking: false} with Qwen3's template (which then ends every prompt with an empty think block).
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_the_tokenizers_own(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(kwargs) & RESERVED_TEMPLATE_KEYS)
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the stages themselves, not a template variable "
                             f"(reserved: {', '.join(sorted(RESERVED_TEMPLATE_KEYS))})")
        return kwargs


# Arguments of the tokenizer's apply_chat_template (and the template's own `messages`): a template variable of
# the same name would change how the stages render, not what the template sees (tests check the list is complete).
RESERVED_TEMPLATE_KEYS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
})
