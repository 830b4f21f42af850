"""The recipe's ``data`` section. Its own module so that the evaluation (which builds prompts with these
settings) and the recipe (``eksft.config``, which holds the evaluation settings) both import it, not each other."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eksft.data.formats import BOXED_ANSWER_INSTRUCTION
from eksft.schema import Strict


class ShareGPTTags(Strict):
    """How a ``sharegpt`` row's messages are spelled: LlamaFactory's ``dataset_info.json`` ``tags``, same keys and
    defaults. Each message of ``conversations`` is ``{role_tag: <one of the three role tags>, content_tag: str}``.
    The EKSFT authors' file: ``{role_tag: role, content_tag: value, user_tag: user, assistant_tag: assistant,
    system_tag: system}``."""

    role_tag: str = Field("from", min_length=1, description="key of a message's role")
    content_tag: str = Field("value", min_length=1, description="key of a message's text")
    user_tag: str = Field("human", min_length=1, description="role value of a user turn")
    assistant_tag: str = Field("gpt", min_length=1, description="role value of an assistant turn")
    system_tag: str = Field("system", min_length=1, description="role value of a system turn")

    @model_validator(mode="after")
    def _distinct(self) -> ShareGPTTags:
        if self.role_tag == self.content_tag:
            raise ValueError(f"tags: role_tag and content_tag must differ, both are {self.role_tag!r}")
        roles = [self.user_tag, self.assistant_tag, self.system_tag]
        if len(set(roles)) < 3:
            raise ValueError(f"tags: user_tag, assistant_tag and system_tag must differ, got {roles}")
        return self


class DataSource(Strict):
    source: str = Field(
        "embedded:arithmetic",
        description="hub id, local .jsonl/.json/.parquet file, or 'embedded:<generator>'",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "problem_solution", "problem_answer"] = "auto"
    split: str = "train"
    num_examples: int | None = Field(None, gt=0, description="N rows, see selection (embedded generators: how many to make, default 256)")
    seed: int = 0
    # Rename fields of the source to the canonical ones, e.g. {problem: question}.
    fields: dict[str, str] = Field(default_factory=dict)
    selection: Literal["first", "random"] = Field(
        "first",
        description="which num_examples rows of a file or hub source: 'first' (the first N) or 'random' (N rows drawn "
                    "uniformly without replacement with `seed`, kept in source order with their row numbers; all "
                    "rows when N >= the source's size); not for embedded: sources, which make N rows from `seed`",
    )
    tags: ShareGPTTags | None = Field(
        None,
        description="format: sharegpt only: the role/content keys and role values (LlamaFactory's tags); unset: "
                    "from/value with human/gpt/system, which also accepts the role values user and assistant",
    )
    revision: str | None = Field(
        None, description="hub commit, tag or branch of a hub source; the pipeline pins a hub source to the commit "
                          "it resolves to and records it in run.json")

    @model_validator(mode="after")
    def _consistent(self) -> DataSource:
        if self.tags is not None and self.format != "sharegpt":
            raise ValueError(f"tags: only for format: sharegpt (this source has format: {self.format})")
        if self.selection == "random":
            if self.source.startswith("embedded:"):
                raise ValueError(f"selection: random does not apply to {self.source} (a generator makes num_examples "
                                 "rows from seed: change seed for other rows)")
            if self.num_examples is None:
                raise ValueError("selection: random needs num_examples (how many rows to draw)")
        return self


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
