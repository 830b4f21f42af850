"""The recipe's ``data`` section. Its own module so that the evaluation (which builds prompts with these
settings) and the recipe (``eksft.config``, which holds the evaluation settings) both import it, not each other."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    revision: str | None = Field(
        None, description="hub commit, tag or branch of a hub source; the pipeline pins a hub source to the commit "
                          "it resolves to and records it in run.json")


class DataConfig(Strict):
    sft: DataSource = DataSource(source="embedded:arithmetic", num_examples=256)
    rl: DataSource = DataSource(source="embedded:arithmetic", num_examples=256, seed=1)
    max_length: int = Field(1024, gt=8)
    system_prompt: str | None = None
    # Appended to every problem when a prompt is built from {problem, ...} rows.
    instruction: str = BOXED_ANSWER_INSTRUCTION
