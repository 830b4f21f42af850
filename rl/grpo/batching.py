"""Response masks and mini-batch index splits for GRPO updates (pure, no model)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mask_truncated", "minibatches"]


def mask_truncated(response_mask: Tensor, truncated: Tensor) -> Tensor:
    """Zero the whole response mask of truncated completions (overlong masking).

    A completion that hit ``max_new_tokens`` without EOS has no final answer, so its 0
    reward says nothing about its reasoning; verl / DAPO ("overlong filtering") exclude
    such sequences from the loss instead of punishing them.

    Args:
        response_mask: [N, T] mask (bool or numeric).
        truncated: [N] bool, True for completions that stopped on the length limit.

    Returns:
        A new [N, T] mask, same dtype, with the rows of truncated completions zeroed. Those
        rows then count in no loss denominator (see `rl.grpo.loss`). The input is unchanged.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [N, T], got {tuple(response_mask.shape)}")
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must be [N]={response_mask.shape[0]}, got {tuple(truncated.shape)}")
    keep = ~truncated.to(device=response_mask.device, dtype=torch.bool)
    if response_mask.dtype == torch.bool:
        return response_mask & keep[:, None]
    return response_mask * keep[:, None].to(response_mask.dtype)


def minibatches(
    n_items: int,
    mini_batch_size: int | None,
    shuffle_generator: torch.Generator | None,
) -> list[Tensor]:
    """Split ``range(n_items)`` into mini-batches of indices for one epoch of updates.

    For ``ppo_epochs`` x mini-batch updates per rollout batch, call once per epoch with the
    same generator: each call covers every index exactly once, and the sequence of calls is
    deterministic given the generator's seed (each epoch gets a new permutation).

    Args:
        n_items: number of items (completions) in the rollout batch (>= 0).
        mini_batch_size: items per mini-batch (>= 1); None: one mini-batch with everything.
            When it does not divide ``n_items`` the last mini-batch is smaller.
        shuffle_generator: permutes the indices (``torch.randperm``, CPU generator);
            None keeps them in order.

    Returns:
        List of int64 CPU index tensors, disjoint, whose union is ``range(n_items)``.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be an int >= 0, got {n_items!r}")
    if mini_batch_size is not None and (
        isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1
    ):
        raise ValueError(f"mini_batch_size must be an int >= 1 or None, got {mini_batch_size!r}")
    if shuffle_generator is None:
        order = torch.arange(n_items, dtype=torch.long)
    else:
        order = torch.randperm(n_items, generator=shuffle_generator, dtype=torch.long)
    if n_items == 0:
        return []
    size = n_items if mini_batch_size is None else mini_batch_size
    return list(torch.split(order, size))
