"""Math reward: extraction, math-verify equivalences, hard deadlines, hostile input.

One module-scoped pool (2 workers, 2 s deadline) is shared by most tests so the
file pays worker start-up about once; the hang tests restart workers on purpose.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rl.reward import (
    RewardResult,
    VerifierPool,
    VerifyTask,
    extract_boxed,
    extract_last_number,
    find_last_boxed,
    math_reward,
    shutdown_default_pool,
)

TIMEOUT_S = 2.0
STARTUP_S = 15.0  # generous allowance for (re)spawning workers on a busy 2-core box


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
        p.warmup()
        yield p


def reward(pool, completions, answers, **kw) -> list[RewardResult]:
    return math_reward(completions, answers, pool=pool, timeout_s=TIMEOUT_S, **kw)


# ------------------------------------------------------------- extraction only
def test_extract_last_box_nested_and_escaped() -> None:
    assert extract_boxed(r"first \boxed{1} then \boxed{2}.") == "2"
    assert extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"\boxed{1} and \fbox{9}") == "9"
    assert extract_boxed(r"\boxed {x+1}") == "x+1"
    assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not count
    assert extract_boxed(r"\boxed{a\\{b}}") == r"a\\{b}"  # \\ is a line break, then a real {
    assert extract_boxed(r"\boxed{3} and use \boxed to mark") == "3"  # marker without a brace
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{1} then \boxed{2") is None  # truncated final box
    assert extract_boxed(r"\boxed{}") == ""


def test_extract_caps_and_statuses() -> None:
    assert find_last_boxed(r"\boxed{" + "1" * 50 + "}", max_chars=10).status == "too_long"
    assert find_last_boxed(r"\boxed{12}", max_chars=10).status == "ok"
    assert find_last_boxed(r"\boxed{12", max_chars=10).status == "unbalanced"
    assert find_last_boxed("nothing").status == "absent"


def test_extract_last_number() -> None:
    assert extract_last_number("I think 12 apples, so 1,234.5 in total.") == "1234.5"
    assert extract_last_number("answer: -3") == "-3"
    assert extract_last_number("x" * 100_000 + " 42 " + "y" * 10_000) == "42"  # window grows
    assert extract_last_number("1" * 5000) == "1" * 5000  # window never cuts a number
    assert extract_last_number("no digits") is None
    assert extract_last_number("") is None


def test_extraction_of_huge_inputs_is_fast() -> None:
    big = "\u00e9x{ " * 250_000 + r"\boxed{5}"  # ~1 MB, many stray braces
    t = time.perf_counter()
    assert extract_boxed(big) == "5"
    assert find_last_boxed(r"\boxed{" + "{" * 100_000).status == "too_long"
    assert extract_boxed(r"\boxed{" + "{" * 100_000 + "}" * 100_001) == "{" * 100_000 + "}" * 100_000  # uncapped: linear
    assert extract_last_number("7 " + "z" * 1_000_000) == "7"
    assert time.perf_counter() - t < 2.0


# ------------------------------------------------------------- verification
CORRECT = [
    (r"The answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{3/4}", r"\frac{3}{4}"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{-7}", "-7"),
    (r"\boxed{\{3,2,1\}}", r"\{1,2,3\}"),
    (r"\boxed{[0, 1)}", "[0,1)"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{18 \text{ dollars}}", "18"),  # math-verify 0.9 drops the unit text
    (r"\boxed{\$18}", "18"),
    (r"\boxed{1+x^2}", "x^2+1"),
    (r"\fbox{9}", "9"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{7}", 7),  # int gold from a dataset column
]
WRONG = [
    (r"\boxed{43}", "42"),
    (r"\boxed{7}", "-7"),
    (r"\boxed{[0,1)}", "(0,1]"),
    (r"\boxed{0.999999999}", "1"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
]


def test_correct_answers_score_one(pool) -> None:
    results = reward(pool, [c for c, _ in CORRECT], [a for _, a in CORRECT])
    for (completion, gold), r in zip(CORRECT, results):
        assert (r.score, r.correct, r.timeout, r.error) == (1.0, True, False, None), (completion, gold, r)


def test_wrong_answers_score_zero(pool) -> None:
    results = reward(pool, [c for c, _ in WRONG], [a for _, a in WRONG])
    for (completion, gold), r in zip(WRONG, results):
        assert (r.score, r.correct, r.no_answer) == (0.0, False, False), (completion, gold, r)


def test_last_box_wins(pool) -> None:
    r1, r2 = reward(pool, [r"\boxed{3} no wait \boxed{4}"] * 2, ["4", "3"])
    assert r1.correct and r1.extracted == "4"
    assert not r2.correct
    assert not r1.format_ok  # two boxes


def test_no_answer_and_fallback(pool) -> None:
    text = "so the total is 1,250 apples"
    (r,) = reward(pool, [text], ["1250"])
    assert (r.score, r.no_answer, r.correct, r.extracted) == (0.0, True, False, None)
    (r,) = reward(pool, [text], ["1250"], fallback="last_number")
    assert (r.score, r.no_answer, r.correct, r.extracted) == (1.0, False, True, "1250")
    (r,) = reward(pool, ["no digits at all"], ["3"], fallback="last_number")
    assert r.no_answer and r.score == 0.0


def test_empty_and_garbage(pool) -> None:
    garbage = "\x00\ud7ff\u202e\U0001f600\\boxed{\u2603\x07\U0010ffff}}}{{" + "\u0301" * 1000
    results = reward(pool, ["", garbage, "\\boxed{\u221e\u00bd}", "\\\\\\\\{"], ["1", "1", "1", "1"])
    assert all(r.score == 0.0 and not r.correct for r in results)
    assert results[0].no_answer


def test_megabyte_completion_is_fast(pool) -> None:
    big = "blah { \\frac{" * 80_000  # ~1 MB of unbalanced junk
    t = time.perf_counter()
    r_ok, r_none, r_trunc = reward(pool, [big + r" \boxed{12}", big, r"\boxed{" + big], ["12"] * 3)
    assert time.perf_counter() - t < TIMEOUT_S + 1.0
    assert r_ok.correct and r_ok.score == 1.0
    assert r_none.no_answer and r_none.score == 0.0
    assert r_trunc.score == 0.0 and r_trunc.error == "answer_too_long"


def test_deeply_nested_braces(pool) -> None:
    t = time.perf_counter()
    results = reward(
        pool,
        [
            r"\boxed{" + "{" * 100_000,  # unbalanced, and longer than the cap
            r"\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",  # balanced but too long
            r"\boxed{" + "{" * 900 + "1" + "}" * 900 + "}",  # under the cap: reaches math-verify
            "{" * 100_000,
        ],
        ["1"] * 4,
    )
    assert time.perf_counter() - t < 3 * TIMEOUT_S + STARTUP_S
    assert [results[i].score for i in (0, 1, 3)] == [0.0, 0.0, 0.0]
    assert results[0].error == results[1].error == "answer_too_long"
    assert results[3].no_answer
    # Under the cap, the box is extracted whole and handed to math-verify (which may see through 900 redundant
    # brace groups or run out of time: either way the answer came back within the deadline above).
    third = results[2]
    assert third.error is None and not third.no_answer and third.extracted == "{" * 900 + "1" + "}" * 900
    assert (third.score == 0.0) if third.timeout else (third.score == (1.0 if third.correct else 0.0))


def test_enormous_expressions_hit_the_deadline(pool) -> None:
    """These really hang math-verify (a C-level big-int pow that SIGALRM cannot
    interrupt); the caller must get 0 within the deadline and the rest scored."""
    completions = [
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{10^{10^{10^{10}}}}",
        r"\boxed{100000!}",
        r"\boxed{2}",
        r"\boxed{\frac{6}{4}}",
    ]
    answers = ["1", "1", "1", "2", "1.5"]
    t = time.perf_counter()
    results = reward(pool, completions, answers)
    assert time.perf_counter() - t < 3 * TIMEOUT_S + STARTUP_S
    assert [r.score for r in results] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert results[0].timeout and results[1].timeout
    assert not results[3].timeout and not results[4].timeout


def test_real_hang_does_not_block_the_queue(pool) -> None:
    """Hidden hook (``debug_sleep_s``): the worker sleeps far past the deadline.
    An input that hangs math-verify forever on every sympy version cannot be
    relied on, so the hang is simulated; the kill path is the real one."""
    pids_before = set(pool.worker_pids())
    kills_before = pool.killed_workers
    tasks = [VerifyTask("1", "1", debug_sleep_s=600.0)] + [
        VerifyTask(str(i), str(i) if i % 2 else str(i + 1)) for i in range(8)
    ]
    t = time.perf_counter()
    out = pool.map(tasks, timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - t
    assert out[0].timeout and not out[0].correct
    # queued items were served by the other worker while the first one hung
    assert [o.correct for o in out[1:]] == [bool(i % 2) for i in range(8)]
    assert not any(o.timeout for o in out[1:])
    assert elapsed < TIMEOUT_S + 2.0  # no respawn needed on the critical path
    assert pool.killed_workers == kills_before + 1
    # the killed worker is replaced and the pool keeps working
    (r,) = reward(pool, [r"\boxed{5}"], ["5"])
    assert r.correct
    pool.warmup()
    pids_after = set(pool.worker_pids())
    assert len(pids_after) == 2 and None not in pids_after and pids_after != pids_before


def test_worker_crash_mid_item_is_reported(pool) -> None:
    pool.warmup()
    victim = pool.worker_pids()[0]
    killer = threading.Timer(0.5, os.kill, args=(victim, signal.SIGKILL))
    killer.start()
    out = pool.map([VerifyTask("1", "1", debug_sleep_s=1.5), VerifyTask("2", "2")], timeout_s=TIMEOUT_S)
    killer.join()
    assert out[0].error == "worker_crashed" and not out[0].correct and not out[0].timeout
    assert out[1].correct
    (r,) = reward(pool, [r"\boxed{8}"], ["8"])
    assert r.correct


def test_format_reward(pool) -> None:
    results = reward(
        pool,
        [r"\boxed{4}", r"\boxed{4} or \boxed{4}", "4", r"\boxed{5}", r"\boxed{}", r"4 \boxed{ }", r"\boxed{4"],
        ["4"] * 7,
        format_weight=0.1,
        fallback="last_number",
    )
    # an empty box is no answer: no format credit (else GRPO learns to print "\boxed{}")
    assert [r.score for r in results] == pytest.approx([1.1, 1.0, 1.0, 0.1, 0.0, 0.0, 1.0])
    assert [r.format_ok for r in results] == [True, False, False, True, False, False, False]


def test_result_mapping_access_and_validation(pool) -> None:
    (r,) = reward(pool, [r"\boxed{1}"], ["1"])
    assert r["score"] == r.score == 1.0 and r["correct"] is True and r["timeout"] is False
    assert r.to_dict()["extracted"] == "1"
    with pytest.raises(KeyError):
        r["nope"]
    with pytest.raises(ValueError):
        reward(pool, ["a", "b"], ["1"])
    with pytest.raises(ValueError):
        reward(pool, ["a"], ["1"], fallback="first_number")
    assert reward(pool, [], []) == []
    closed = VerifierPool(1, 1.0)
    closed.close()
    with pytest.raises(RuntimeError):
        closed.map([VerifyTask("1", "1")])


def test_works_from_a_non_main_thread() -> None:
    """math-verify's own SIGALRM timeouts fail off the main thread; ours must not.
    Also exercises the lazily created default pool."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["results"] = math_reward(
                [r"\boxed{\frac{1}{2}}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}"],
                ["0.5", "1", "4"],
                timeout_s=TIMEOUT_S,
                num_workers=2,
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            box["error"] = exc

    thread = threading.Thread(target=run)
    t = time.perf_counter()
    thread.start()
    thread.join(timeout=3 * TIMEOUT_S + STARTUP_S)
    try:
        assert not thread.is_alive(), "math_reward blocked in a thread"
        assert "error" not in box, box.get("error")
        results = box["results"]
        assert [r.score for r in results] == [1.0, 0.0, 0.0]
        assert results[1].timeout
        assert time.perf_counter() - t < 3 * TIMEOUT_S + STARTUP_S
    finally:
        shutdown_default_pool()
