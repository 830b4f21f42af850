"""Writing a model directory so that a concurrent or interrupted write never looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def save_model_dir(target: Path, model, tokenizer, finish: Callable[[Path], None] | None = None) -> Path:
    """Save model + tokenizer into a temporary sibling, optionally post-process it, then rename into place.

    If another process finished the same directory first, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if finish is not None:
            finish(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_model_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
