"""What a killed run leaves behind, and how a rerun picks up from it (GRPO here, and the SFT stage in eksft).

A kill can land anywhere: inside a checkpoint save (a directory without its last file, or a
``step-N.tmp`` that was never renamed) or inside a metrics write (a half line at the end of
metrics.jsonl). Resuming uses only complete checkpoints and rewrites metrics.jsonl to the steps
that checkpoint had reached, so the rerun logs every later step exactly once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def checkpoint_name(prefix: str, step: int) -> str:
    """``{prefix}-{step}``: the name :func:`latest_complete_checkpoint` finds (the HF Trainer's convention too)."""
    return f"{prefix}-{step}"


def complete_checkpoints(directory: str | Path, prefix: str, last_file: str) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``{prefix}-N`` subdirectory that holds ``last_file``, by increasing N.

    ``last_file`` must be the file the saver writes last (its presence means the save finished).
    Names other than exactly ``{prefix}-<digits>`` (``step-3.tmp``, ``step-x``) are never checkpoints.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    name = re.compile(re.escape(prefix) + r"-(\d+)")
    return sorted((int(m.group(1)), p) for p in directory.iterdir()
                  if (m := name.fullmatch(p.name)) and p.is_dir() and (p / last_file).is_file())


def latest_complete_checkpoint(directory: str | Path, prefix: str, last_file: str) -> Path | None:
    """The complete ``{prefix}-N`` checkpoint with the highest N (`complete_checkpoints`), or None."""
    found = complete_checkpoints(directory, prefix, last_file)
    return found[-1][1] if found else None


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the metrics.jsonl lines of steps <= ``step`` (the resumed run logs the others again).

    A line that does not parse can only be the write the kill interrupted; it is dropped too.
    Returns the number of lines dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            record = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(ln)
    if len(kept) != len(lines):
        path.write_text("".join(ln + "\n" for ln in kept))
    return len(lines) - len(kept)
