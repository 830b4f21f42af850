"""The orchestrator: every arm of a recipe through sft -> rl -> evaluations, on Ray or in-process.

    run_pipeline(recipe, run_dir)              # Ray tasks with the CPU/GPU needs the recipe declares
    run_pipeline(recipe, run_dir, local=True)  # the same stages, in this process, in order

``driver`` runs the whole recipe, ``plan`` lays out its stages and their keys, ``execute`` runs one stage
through the stage functions of ``eksft.stages``.
"""

from eksft.pipeline.driver import launch_order, run_pipeline
from eksft.pipeline.execute import run_stage
from eksft.pipeline.plan import Stage, plan

__all__ = ["Stage", "launch_order", "plan", "run_pipeline", "run_stage"]
