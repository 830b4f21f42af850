"""Rule-based math reward: last boxed answer vs gold answer, via math-verify.

``score = correct (1/0) + format_weight * format_ok`` where ``format_ok``
means the completion holds exactly one box marker, it is closed and it is not
empty (the instruction "put your answer within \\boxed{}" invites a small
model to copy the empty box, and crediting that is a reward GRPO learns to
hack). The
format term depends only on the text, so it is kept even when verification
times out; with the default ``format_weight=0`` the score is plain 1/0.

Security: completions are untrusted. Only the extracted box content (or the
fallback number), capped at ``max_answer_chars``, is sent to the verifier
processes; nothing here evals, sympifies or shells out, and math-verify runs
in separate, memory-capped processes that are killed at the deadline.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Sequence

from rl.reward.extract import (
    DEFAULT_MAX_ANSWER_CHARS,
    Extraction,
    count_boxes,
    extract_last_number,
    find_last_boxed,
)
from rl.reward.pool import VerifierPool, VerifyTask

Fallback = Literal["none", "last_number"]
_FALLBACKS = ("none", "last_number")


@dataclass(frozen=True, slots=True)
class RewardResult:
    """Reward of one completion. ``result.score`` and ``result["score"]`` both work.

    correct:   math-verify says the answer equals the gold answer
    timeout:   the verifier missed its deadline and was killed (score part 0)
    no_answer: no closed ``\\boxed{}`` and no fallback match
    format_ok: exactly one box marker, closed, with a non-blank answer inside
    error:     why verification could not run or failed, else None
    extracted: the answer string that was verified (None if none was)
    """

    score: float
    correct: bool = False
    timeout: bool = False
    no_answer: bool = False
    format_ok: bool = False
    error: str | None = None
    extracted: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_NAMES = frozenset(f.name for f in fields(RewardResult))

# --------------------------------------------------------------- default pool
_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def get_default_pool(num_workers: int | None = None) -> VerifierPool:
    """The process-wide pool, created on first use and closed at exit.

    Asking for a different ``num_workers`` than the current pool has replaces
    it (workers restart once); ``None`` accepts whatever exists.
    """
    global _default_pool
    with _default_lock:
        pool = _default_pool
        if pool is not None and num_workers is not None and pool.num_workers != num_workers:
            pool.close()
            pool = None
        if pool is None or pool.closed:
            pool = VerifierPool(num_workers)
            _default_pool = pool
        return pool


def shutdown_default_pool() -> None:
    """Kill the default pool's workers (registered with atexit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is not None:
            _default_pool.close()
            _default_pool = None


atexit.register(shutdown_default_pool)


# ------------------------------------------------------------------- reward
def _answer_for(
    text: str, found: Extraction, fallback: Fallback, max_chars: int
) -> tuple[str | None, str | None]:
    """(answer, error) for one completion; (None, None) means no answer at all."""
    if found.content is not None:
        return found.content, None
    if found.status == "too_long":
        return None, "answer_too_long"
    if fallback == "last_number":
        number = extract_last_number(text)
        if number is not None:
            if len(number) > max_chars:
                return None, "answer_too_long"
            return number, None
    return None, None


def math_reward(
    completions: Sequence[str],
    answers: Sequence[str | int | float],
    *,
    timeout_s: float = 5.0,
    num_workers: int | None = None,
    fallback: Fallback = "none",
    format_weight: float = 0.0,
    pool: VerifierPool | None = None,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> list[RewardResult]:
    """Score each completion against its gold answer (same index).

    The answer is the content of the LAST ``\\boxed{}``/``\\fbox{}``; with
    ``fallback="last_number"`` a completion without one falls back to its last
    number. Identical (gold, answer) pairs in one call are verified once.
    Each verification has a hard deadline of ``timeout_s`` seconds; ``pool``
    defaults to a shared lazily started :class:`VerifierPool` with
    ``num_workers`` workers (``num_workers`` is ignored when ``pool`` is given).
    Worst case wall time: about ``ceil(n_unique / n_workers) * timeout_s`` plus
    ~0.5 s per killed worker whose replacement the queue has to wait for.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if max_answer_chars < 1:
        raise ValueError("max_answer_chars must be >= 1")

    partial: list[dict[str, Any]] = []
    unique: dict[tuple[str, str], int] = {}
    for text, gold in zip(completions, answers):
        if not isinstance(text, str):
            raise TypeError(f"completions must be str, got {type(text).__name__}")
        gold = str(gold)
        found = find_last_boxed(text, max_answer_chars)
        format_ok = found.status == "ok" and bool(found.content.strip()) and count_boxes(text) == 1
        answer, error = _answer_for(text, found, fallback, max_answer_chars)
        item: dict[str, Any] = {"format_ok": format_ok, "error": error, "extracted": answer}
        if answer is None:
            item["no_answer"] = error is None
        elif len(gold) > max_answer_chars:
            item["error"] = "gold_too_long"
        else:
            item["task"] = unique.setdefault((gold, answer), len(unique))
        partial.append(item)

    outcomes = []
    if unique:
        pool = pool if pool is not None else get_default_pool(num_workers)
        outcomes = pool.map([VerifyTask(g, a) for g, a in unique], timeout_s=timeout_s)

    results = []
    for item in partial:
        correct = timeout = False
        error = item["error"]
        if "task" in item:
            outcome = outcomes[item["task"]]
            correct, timeout, error = outcome.correct, outcome.timeout, outcome.error
        bonus = format_weight * item["format_ok"]
        results.append(
            RewardResult(
                score=float(correct) + bonus,
                correct=correct,
                timeout=timeout,
                no_answer=item.get("no_answer", False),
                format_ok=item["format_ok"],
                error=error,
                extracted=item["extracted"],
            )
        )
    return results
