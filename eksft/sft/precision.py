"""Does an optimizer step survive the parameters' own precision?

Training bfloat16 parameters directly (no float32 master copy) rounds every update back onto the
bfloat16 grid: with 8 significant bits, an update smaller than half the spacing around a weight is
lost. AdamW's update has size ~lr per element, so at the small learning rates of SFT and RL most
weights of a bf16 model never move. This measures that share on the actual weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@torch.no_grad()
def vanishing_update_share(params: Iterable[torch.Tensor], step: float, chunk: int = 1 << 22) -> float:
    """Share of the elements of low-precision ``params`` where ``w + step`` rounds back to ``w``.

    The definition itself, evaluated element by element (in float32, then rounded to the parameter's
    dtype, as a low-precision optimizer step does); float32/float64 parameters count as kept.
    Returns 0.0 when there are no elements.
    """
    lost = total = 0
    for p in params:
        flat = p.detach().reshape(-1)
        total += flat.numel()
        if flat.dtype not in LOW_PRECISION:
            continue
        for start in range(0, flat.numel(), chunk):
            w = flat[start:start + chunk]
            lost += int(((w.float() + step).to(w.dtype) == w).sum())
    return lost / total if total else 0.0


def low_precision_warning(model: torch.nn.Module, lr: float) -> str | None:
    """A warning when trainable parameters are bf16/fp16 and an update of size ``lr`` would mostly vanish."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in LOW_PRECISION})
    if not dtypes:
        return None
    share = vanishing_update_share(params, lr)
    return (f"training {'/'.join(dtypes)} parameters directly (no float32 master copy): an update of size "
            f"lr={lr:g} rounds back to the old value for {share:.0%} of the trainable weights. Load the model "
            f"in float32 (model.dtype: float32) and keep sft.bf16: true for bf16 compute, or shard float32 "
            f"weights across GPUs (FSDP).")
