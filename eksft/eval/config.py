"""Evaluation settings (a recipe's ``eval`` section, and what ``eksft eval`` builds from its flags).

``eksft.config`` imports this module to add ``eval: EvalConfig`` to the recipe; this module and the benchmark
registry it imports take the ``data`` settings from ``eksft.data.config``, never from ``eksft.config``, so no
import comes back.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from eksft.eval.benchmarks import BENCHMARKS, check_benchmark_name
from eksft.layout import check_distinct_result_files


class EvalConfig(BaseModel):
    """How a model is evaluated.

    avg@n and pass@k (k = 1..n) are computed from ``n`` samples per problem drawn at ``temperature`` / ``top_p``,
    so they are sampling metrics; ``n=1`` with ``temperature=0`` gives greedy decoding (accuracy = avg@1).
    ``every_rl_steps`` is read by the pipeline orchestrator: 0 evaluates only at the fixed points (SFT start,
    SFT end = RL start, RL end); N > 0 also every N RL steps.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    benchmarks: list[str] = Field(
        default_factory=lambda: ["embedded:arithmetic"],
        description="registry names (math500, aime24, aime25, amc23, gsm8k, minerva, olympiadbench), "
                    "embedded:<generator>, or .jsonl/.json/.parquet paths",
    )
    n: int = Field(8, ge=1, description="samples per problem")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1)
    num_problems: int | None = Field(None, ge=1, description="first N problems of each benchmark (embedded: how many to make)")
    every_rl_steps: int = Field(0, ge=0, description="orchestrator: also evaluate every N RL steps (0: only the fixed points)")
    reward_timeout_s: float = Field(5.0, gt=0, description="math-verify deadline per answer")
    answer_fallback: Literal["none", "last_number"] = Field(
        "none", description="answer of a completion without a closed \\boxed{}: none (incorrect) or its last number")
    seed: int = 0
    revisions: dict[str, str] = Field(
        default_factory=dict, description="hub commit, tag or branch per registry benchmark, e.g. {gsm8k: <sha>}; the "
                                          "pipeline pins each registry benchmark to the commit it resolves to")

    @field_validator("revisions")
    @classmethod
    def _registry_revisions(cls, revisions: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(revisions) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"revisions are for registry benchmarks ({', '.join(BENCHMARKS)}), got {unknown}")
        return revisions

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("at least one benchmark is needed")
        for name in names:
            check_benchmark_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate benchmark names in {names}")
        check_distinct_result_files(names)
        return names
