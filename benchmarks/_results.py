"""Where a benchmark's record goes and how it is written: JSON, with its markdown table beside it (``.md``).

Files are written atomically (a temporary file, then a rename), so a reader never sees half a record.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_path(*name_parts: str) -> str:
    """``benchmarks/results/<part>_<part>....json``, e.g. ``default_path("grpo_step", "cpu-avx2")``."""
    return str(RESULTS_DIR / ("_".join(name_parts) + ".json"))


def cpu_machine() -> dict[str, Any]:
    """The machine a CPU benchmark ran on: platform, cores, torch version."""
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """``result`` as JSON at ``path`` (values JSON does not know are written as their str)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(result, indent=1, default=str) + "\n")
    return path


def write_results(path: str | Path, result: dict[str, Any], table: str) -> tuple[Path, Path]:
    """The record at ``path`` and ``table`` at ``path`` with ``.md``; returns both paths."""
    json_path = write_json(path, result)
    md_path = json_path.with_suffix(".md")
    _write(md_path, table)
    return json_path, md_path


def write_and_print(name: str, result: dict[str, Any], table: str, out: str | None) -> None:
    """`write_results` to ``out``, or to ``results/<name>_<capability tag>.json`` (the tag from
    ``result["hardware"]``); prints the table and both paths."""
    paths = write_results(out or default_path(name, result["hardware"]["tag"]), result, table)
    print(table)
    print("wrote", *paths)
