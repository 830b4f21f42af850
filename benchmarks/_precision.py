"""The benchmarks' precision flags, resolved by the rule the trainers use (``rl.common.precision``).

    --bf16 / --no-bf16          trainer bf16 autocast; neither: auto (bf16 where the device computes it natively)
    --rollout-dtype auto|...    the vLLM engine's dtype; auto: the same rule

``resolve(args)`` turns ``auto`` into explicit values once, in the parent, and ``pinned_argv(args)`` passes those
values to every child, so every compared system runs at the same precision. ``record(args)`` is what the
results files store: the capability of the machine and the decisions.
"""

from __future__ import annotations

import argparse

from rl.common.precision import resolve_bf16, resolve_dtype, stage_device


def add_precision_args(p: argparse.ArgumentParser, *, rollout: bool = True) -> None:
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default="auto",
                   help="trainer bf16 autocast, for every compared system (default: auto, i.e. where this device "
                        "computes bf16 natively)")
    if rollout:
        p.add_argument("--rollout-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="the vLLM engine's dtype (default auto: bfloat16 where native, else float32)")


def resolve(args: argparse.Namespace, device: str | None = None) -> dict:
    """Replace ``auto`` in ``args`` by the resolved values; returns ``record(args)``."""
    device = device or stage_device()
    trainer = resolve_bf16(args.bf16, device)
    args.bf16_setting, args.bf16 = trainer.setting, trainer.bf16
    if hasattr(args, "rollout_dtype"):
        engine = resolve_dtype(args.rollout_dtype, device)
        args.rollout_dtype_setting, args.rollout_dtype = engine.setting, engine.dtype
    return record(args, device)


def record(args: argparse.Namespace, device: str | None = None) -> dict:
    device = device or stage_device()
    trainer = resolve_bf16(args.bf16, device)  # a no-op on resolved values
    out = {"hardware": trainer.hardware.as_dict(), "trainer": trainer.dtype,
           "trainer_setting": getattr(args, "bf16_setting", trainer.setting)}
    if hasattr(args, "rollout_dtype"):
        out.update(rollout=resolve_dtype(args.rollout_dtype, device).dtype,
                   rollout_setting=getattr(args, "rollout_dtype_setting", args.rollout_dtype))
    return out


def pinned_argv(args: argparse.Namespace) -> list[str]:
    """Flags that give a child the parent's resolved precision (appended last, they override the command line)."""
    flags = ["--bf16" if args.bf16 else "--no-bf16"]
    if hasattr(args, "rollout_dtype"):
        flags += ["--rollout-dtype", args.rollout_dtype]
    return flags


def header(rec: dict) -> str:
    """One markdown line: the machine's capability and the precisions the run used."""
    hw = rec["hardware"]
    line = (f"Capability: {hw['device']} {hw['capability']} [{hw['units'] or 'no bf16 units'}], native bf16: "
            f"{hw['native_bf16']} ({hw['reason']}). Trainer: {rec['trainer']} ({rec['trainer_setting']})")
    if "rollout" in rec:
        line += f"; vLLM engine: {rec['rollout']} ({rec['rollout_setting']})"
    return line + "."
