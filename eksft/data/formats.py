"""Row formats -> chat messages (SFT) or {prompt, answer} (RL and evaluation).

SFT rows may be:
  * ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  * ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``, spelled by
    ``tags`` (LlamaFactory's ``dataset_info.json`` tags: ``role_tag``, ``content_tag``, ``user_tag``,
    ``assistant_tag``, ``system_tag``); e.g. the EKSFT authors' ``sup_3k_data.json`` has
    ``{"conversations": [{"role": "user"|"assistant"|"system", "value": str}, ...]}``. Without ``tags`` the
    defaults (``from``/``value``, ``human``/``gpt``/``system``) also accept the role values ``user`` and
    ``assistant``, as this reader always has; with ``tags`` only the three given role values are accepted.
  * ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``
  * ``problem_solution``: ``{"problem": str, "solution": str}``
RL / evaluation rows are ``problem_answer``: ``{"problem": str, "answer": str|number}``.
``auto`` picks the first format whose fields are present, in the order above: an OpenR1-Math-220k row
(``problem``, ``solution``, ``answer``, ``generations``, ..., ``messages`` = the problem and one R1 trace) is a
``messages`` row, and other fields are ignored.
"""

from __future__ import annotations

from typing import Any

from eksft.data.sources import DataError, Row

Messages = list[dict[str, str]]

# sharegpt without tags: LlamaFactory's defaults, plus the role values user/assistant (accepted before tags existed).
_SHAREGPT_KEYS = ("from", "value")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "problem_solution": ("problem", "solution"),
    "problem_answer": ("problem", "answer"),
}
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "problem_solution")

# The recipes' default instruction (data.instruction), appended to every problem: the reward reads the last \boxed{}.
BOXED_ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."


def build_prompt(problem: str, system_prompt: str | None = None, instruction: str | None = None) -> Messages:
    """The one place a problem becomes a chat prompt (SFT demonstrations, RL and evaluation share it)."""
    text = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": text}]


def detect_format(row: Row, candidates: tuple[str, ...]) -> str:
    for fmt in candidates:
        if all(k in row.data for k in _REQUIRED[fmt]):
            return fmt
    wanted = " | ".join("{" + ", ".join(_REQUIRED[f]) + "}" for f in candidates)
    raise DataError(f"{row.where()}: cannot tell the row format: expected fields {wanted}; row has {sorted(row.data)}")


def to_sft_messages(row: Row, fmt: str = "auto", system_prompt: str | None = None,
                    instruction: str | None = None, tags: Any = None) -> Messages:
    """Chat messages of one SFT row; at least one assistant turn, which is what gets trained.

    ``tags`` (a :class:`eksft.data.config.ShareGPTTags`, or None for the defaults) spells ``sharegpt`` messages.
    """
    if fmt == "auto":
        fmt = detect_format(row, SFT_FORMATS)
    if fmt not in SFT_FORMATS:
        raise DataError(f"{row.where()}: format {fmt!r} is not an SFT format (allowed: {', '.join(SFT_FORMATS)}, auto)")
    if fmt == "messages":
        key = "messages"
        messages = [_message(row, i, m, "role", "content", None) for i, m in enumerate(_field(row, key, list))]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
    elif fmt == "sharegpt":
        key = "conversations"
        (role_key, content_key), roles = _sharegpt_spelling(tags)
        messages = [_message(row, i, m, role_key, content_key, roles) for i, m in enumerate(_field(row, key, list))]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
    elif fmt == "alpaca":
        user = _field(row, "instruction", str)
        extra = row.data.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{row.where()}: field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages = build_prompt(user, system_prompt) + [{"role": "assistant", "content": _field(row, "output", str)}]
        key = "output"
    else:
        messages = build_prompt(_field(row, "problem", str), system_prompt, instruction)
        messages.append({"role": "assistant", "content": _field(row, "solution", str)})
        key = "solution"
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise DataError(f"{row.where()}: no assistant message to train on in field {key!r} (roles: {roles})")
    return messages


def _sharegpt_spelling(tags: Any) -> tuple[tuple[str, str], dict[str, str]]:
    if tags is None:
        return _SHAREGPT_KEYS, _SHAREGPT_ROLES
    roles = {tags.user_tag: "user", tags.assistant_tag: "assistant", tags.system_tag: "system"}
    return (tags.role_tag, tags.content_tag), roles


def to_prompt_answer(row: Row, fmt: str = "auto", system_prompt: str | None = None,
                     instruction: str | None = None) -> dict[str, Any]:
    """``{"prompt": messages, "answer": str, "problem": str}`` for RL and evaluation."""
    if fmt not in ("auto", "problem_answer"):
        raise DataError(f"{row.where()}: RL/evaluation data must be problem_answer rows (or auto), not {fmt!r}")
    detect_format(row, ("problem_answer",))
    problem = _field(row, "problem", str)
    answer = row.data["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{row.where()}: field 'answer' must be a string or a number, got {type(answer).__name__}")
    answer = str(answer).strip()
    if not answer:
        raise DataError(f"{row.where()}: field 'answer' is empty")
    return {"prompt": build_prompt(problem, system_prompt, instruction), "answer": answer, "problem": problem}


def _field(row: Row, name: str, kind: type) -> Any:
    if name not in row.data:
        raise DataError(f"{row.where()}: missing field {name!r}; row has {sorted(row.data)}")
    value = row.data[name]
    if not isinstance(value, kind):
        raise DataError(f"{row.where()}: field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    if kind in (str, list) and not value:
        raise DataError(f"{row.where()}: field {name!r} is empty")
    return value


def _message(row: Row, i: int, m: Any, role_key: str, content_key: str, role_map: dict | None) -> dict[str, str]:
    where = f"{row.where()}: message {i}"
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected an object with {role_key!r} and {content_key!r}, got {m!r:.80}")
    for k in (role_key, content_key):
        if k not in m:
            raise DataError(f"{where}: missing field {k!r}; message has {sorted(m)}")
    role, content = m[role_key], m[content_key]
    allowed = role_map or {"system": "system", "user": "user", "assistant": "assistant"}
    if not isinstance(role, str) or role not in allowed:
        raise DataError(f"{where}: field {role_key!r} is {role!r} (allowed: {', '.join(allowed)})")
    if not isinstance(content, str):
        raise DataError(f"{where}: field {content_key!r} must be a string, got {type(content).__name__}")
    return {"role": allowed[role], "content": content}
