"""The cold start as one process or as ``sft.num_processes`` torchrun processes (data parallel).

``launch_sft(recipe, arm, out)`` runs ``run_sft`` here, or starts torchrun on this module: each process reads
the recipe from ``out.recipe_file`` (holding only the arm being trained) and runs ``run_sft`` on its share of
every batch; the first one writes metrics and checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eksft.layout import SFTStageDir
from eksft.sft.run import run_sft


def launch_sft(recipe, arm, out: SFTStageDir) -> Path:
    """Train ``arm.objective``; returns the final checkpoint directory (``out.checkpoint``)."""
    from eksft.config import recipe_to_yaml

    procs = recipe.sft.num_processes
    if procs == 1 or "RANK" in os.environ:  # already one of the torchrun processes (launched by the user)
        return run_sft(recipe, arm.objective, out)
    out.root.mkdir(parents=True, exist_ok=True)
    out.recipe_file.write_text(recipe_to_yaml(recipe.model_copy(update={"arms": [arm]})))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "eksft.sft.launch", str(out.recipe_file), arm.name, str(out.root)]
    print(f"[sft] {procs} processes: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"the {procs} SFT processes failed (their output is above); rerun to resume")
    return out.checkpoint


def main(argv: list[str]) -> None:
    """One torchrun process: ``python -m eksft.sft.launch RECIPE_FILE ARM STAGE_DIR``."""
    from eksft.config import load_recipe

    recipe_file, arm, stage_dir = argv
    recipe = load_recipe(recipe_file)
    run_sft(recipe, recipe.arm(arm).objective, SFTStageDir(Path(stage_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
