"""Answer extraction from untrusted model output, in linear time.

Everything here runs in the caller's process on raw completions (which can be
megabytes of garbage), so it never uses backtracking regexes, never recurses,
and stops scanning as soon as an answer is longer than the cap: only a short,
brace-balanced string ever leaves this module for the verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

BOX_MARKERS: tuple[str, ...] = ("\\boxed", "\\fbox")
DEFAULT_MAX_ANSWER_CHARS = 2000

# One character class, no quantifiers: finditer just jumps to the next
# interesting character, so the brace scan stays linear.
_BRACE_OR_ESCAPE = re.compile(r"[{}\\]")
# Thousands-separated number first, then a plain one. Each alternative can only
# backtrack over one digit run, so finditer is linear.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_NUMBER_CHARS = frozenset("0123456789,.-")

BoxStatus = Literal["ok", "absent", "unbalanced", "too_long"]


@dataclass(frozen=True, slots=True)
class Extraction:
    """Result of looking for the final boxed answer.

    ``status`` says why ``content`` is None: no marker, an unclosed brace (a
    truncated completion), or an answer longer than the cap.
    """

    content: str | None
    status: BoxStatus


def _skip_spaces(text: str, pos: int, limit: int = 64) -> int:
    """Skip a few whitespace characters (``\\boxed {x}`` is valid LaTeX)."""
    end = min(len(text), pos + limit)
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _last_box_open(text: str) -> int:
    """Index of the ``{`` that opens the last ``\\boxed{``/``\\fbox{``, or -1.

    Markers not followed by ``{`` (e.g. prose "use \\boxed to mark") are
    skipped by searching further left.
    """
    end = len(text)
    while True:
        best = -1
        marker_len = 0
        for marker in BOX_MARKERS:
            i = text.rfind(marker, 0, end)
            if i > best:
                best, marker_len = i, len(marker)
        if best < 0:
            return -1
        brace = _skip_spaces(text, best + marker_len)
        if brace < len(text) and text[brace] == "{":
            return brace
        end = best  # look further left; total work stays linear


def _balanced_content(text: str, open_pos: int, max_chars: int | None) -> Extraction:
    """Scan from the ``{`` at ``open_pos`` to its matching ``}``.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not
    count and ``\\\\{`` does. The scan stops once the content exceeds
    ``max_chars``, so a huge completion costs at most O(max_chars) here.
    """
    depth = 0
    skip_until = -1
    limit = None if max_chars is None else open_pos + 1 + max_chars
    for m in _BRACE_OR_ESCAPE.finditer(text, open_pos):
        i = m.start()
        if limit is not None and i > limit:
            return Extraction(None, "too_long")
        if i < skip_until:
            continue
        ch = m.group()
        if ch == "\\":
            skip_until = i + 2
        elif ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return Extraction(text[open_pos + 1 : i], "ok")
    if limit is not None and len(text) > limit:
        return Extraction(None, "too_long")
    return Extraction(None, "unbalanced")


def find_last_boxed(text: str, max_chars: int | None = DEFAULT_MAX_ANSWER_CHARS) -> Extraction:
    """Content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` with its status.

    If the last box is unclosed (a truncated completion) the answer is None:
    an earlier box is deliberately not used, because the model had not
    finished its final answer.
    """
    open_pos = _last_box_open(text)
    if open_pos < 0:
        return Extraction(None, "absent")
    return _balanced_content(text, open_pos, max_chars)


def extract_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` (nested braces kept), else None.

    Returns None when there is no box, the last box is unbalanced, or its
    content is longer than ``max_chars`` (no cap when None).
    """
    return find_last_boxed(text, max_chars).content


def count_boxes(text: str) -> int:
    """Number of box markers in the text (for the format reward)."""
    return sum(text.count(marker) for marker in BOX_MARKERS)


def extract_last_number(text: str, window: int = 256) -> str | None:
    """The last number in the text (``-1,234.5`` -> ``-1234.5``), else None.

    Searches growing windows from the end so a 1 MB completion whose last
    number is near the end costs microseconds. Each window's left edge is
    moved off any number it would cut in half, so a match is never partial.
    """
    n = len(text)
    while True:
        start = max(0, n - window)
        while start > 0 and text[start - 1] in _NUMBER_CHARS:
            start -= 1
        last = None
        for last in _NUMBER.finditer(text, start):
            pass
        if last is not None:
            return last.group().replace(",", "")
        if start == 0:
            return None
        window *= 4
