"""Embedded data: procedural math problems with exact answers (reasoning-gym) and programmatic demonstrations.

Every row is ``{problem, answer, solution}`` where ``solution`` is a demonstration that
ends in ``\\boxed{answer}``:
  * ``arithmetic``: one step, two one-digit terms (the embedded model's base pass@1 is ~0.12);
  * ``multistep``: 3-5 terms of up to two digits with + - * and parentheses; the demonstration
    reduces the expression one operation at a time;
  * ``gsm``: GSM-style word problems (reasoning-gym's gsm_symbolic), whose chain of thought
    comes from the generator's metadata.
``mix`` interleaves the three.

reasoning-gym seeds row i of seed s with s + i: seed 1's rows are seed 0's shifted by one, so sources meant to be
disjoint need seeds further apart than their sizes.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable

_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def _arithmetic_rows(size: int, seed: int, **difficulty) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset(
        "basic_arithmetic", size=size, seed=seed, operators=("+", "-", "*"), **difficulty
    )
    rows = []
    for item in ds:
        expression = item["metadata"]["expression"]
        steps = reduction_steps(expression)
        answer = steps[-1]
        if answer != item["answer"].strip():
            raise AssertionError(f"demonstration {answer} disagrees with generator answer {item['answer']}")
        lines = [f"{a} = {b}" for a, b in zip(steps, steps[1:])] if len(steps) > 2 else [f"{expression} = {answer}"]
        solution = "\n".join(lines) + f"\nThe answer is \\boxed{{{answer}}}."
        rows.append({"problem": item["question"], "answer": answer, "solution": solution})
    return rows


def _gsm_rows(size: int, seed: int) -> list[dict]:
    import reasoning_gym

    rows = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
        answer = item["answer"].strip()
        cot = item["metadata"].get("answer_cot", "").strip()
        # The generator's chain of thought ends in "#### <answer>"; replace that with a boxed answer.
        cot = re.sub(r"\n?####\s*\S+\s*$", "", cot).strip()
        rows.append({"problem": item["question"], "answer": answer, "solution": f"{cot}\nThe answer is \\boxed{{{answer}}}."})
    return rows


GENERATORS: dict[str, Callable[[int, int], list[dict]]] = {
    "arithmetic": lambda n, seed: _arithmetic_rows(n, seed, min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    "multistep": lambda n, seed: _arithmetic_rows(n, seed, min_terms=3, max_terms=5, min_digits=1, max_digits=2),
    "gsm": _gsm_rows,
}


def generate(name: str, size: int, seed: int = 0) -> list[dict]:
    """``size`` rows of the embedded generator ``name`` (``arithmetic``, ``multistep``, ``gsm`` or ``mix``)."""
    if name == "mix":
        parts = [GENERATORS[g](size // 3 + 1, seed + i) for i, g in enumerate(GENERATORS)]
        mixed = [row for group in zip(*parts) for row in group]
        return mixed[:size]
    if name not in GENERATORS:
        raise ValueError(f"unknown embedded generator {name!r} (available: {', '.join([*GENERATORS, 'mix'])})")
    return GENERATORS[name](size, seed)


def reduction_steps(expression: str) -> list[str]:
    """``["(2 + 3) * 4", "5 * 4", "20"]``: evaluate one innermost operation at a time.

    Only for the generator's own expressions (trusted text); parsed with ``ast``, never ``eval``.
    """
    tree = ast.parse(expression, mode="eval").body
    steps = [_render(tree)]
    while not _is_number(tree):
        tree = _reduce_once(tree)
        steps.append(_render(tree))
    return steps


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return True
    # A negative literal is one minus over a positive constant; "- -8" and "-0" still need a step.
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, int)
            and node.operand.value > 0)


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant):
        return node.value
    return -_value(node.operand)  # type: ignore[attr-defined]


def _number(v: int) -> ast.AST:
    return ast.Constant(v) if v >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-v))


def _reduce_once(node: ast.AST) -> ast.AST:
    """Replace the leftmost operation whose operands are both numbers by its value."""
    if isinstance(node, ast.UnaryOp):
        if _is_number(node.operand):
            return _number(-_value(node.operand))
        return ast.UnaryOp(node.op, _reduce_once(node.operand))
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _OPS:
            raise ValueError(f"unsupported operator {type(node.op).__name__}")
        if _is_number(node.left) and _is_number(node.right):
            return _number(_OPS[type(node.op)](_value(node.left), _value(node.right)))
        if not _is_number(node.left):
            return ast.BinOp(_reduce_once(node.left), node.op, node.right)
        return ast.BinOp(node.left, node.op, _reduce_once(node.right))
    raise ValueError(f"unsupported expression node {ast.dump(node)}")


def _render(node: ast.AST) -> str:
    return ast.unparse(node)
