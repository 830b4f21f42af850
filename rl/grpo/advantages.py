"""Group-relative advantages and DAPO-style dynamic sampling (pure, no model).

GRPO samples G completions per prompt ("a group") and scores each one; the advantage of
completion i is its reward relative to the others of the same group:

    A_i = (r_i - mean(r)) / (std(r) + eps)      normalize_std=True  (GRPO, DeepSeekMath)
    A_i =  r_i - mean(r)                        normalize_std=False (Dr. GRPO)

``std`` is the UNBIASED sample standard deviation (divides by G - 1), as ``torch.std``
computes it by default and as verl (``compute_grpo_outcome_advantage``) and TRL
(``rewards.view(-1, G).std(dim=1)``) use it. Example: rewards [1, 0, 0, 1] have mean 0.5
and sample std sqrt(1/3) = 0.5774, so A = +-0.866 (the population std, 0.5, would give
+-1).

A group whose rewards are all equal (all right or all wrong) carries no learning signal:
its advantages are exactly 0 (set explicitly, not left to ``r - mean`` rounding), and
DAPO's dynamic sampling drops such groups and generates more prompts until the batch is
full (`dynamic_sampling_filter`, `fill_groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "FillStats",
    "dynamic_sampling_filter",
    "fill_groups",
    "group_advantages",
    "group_rewards",
    "zero_variance_groups",
]


def _check_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor [num_groups, G], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [num_groups, G], got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards


def zero_variance_groups(rewards: Tensor) -> Tensor:
    """Which groups have all rewards equal (no learning signal).

    Args:
        rewards: [num_groups, G] rewards, one row per prompt.

    Returns:
        BoolTensor [num_groups]: True where every reward of the row equals the first one
        (exact comparison; a group of size 1 is always zero-variance).
    """
    rewards = _check_rewards(rewards)
    if rewards.shape[1] == 0:
        return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages, one per completion, relative to its group.

    Args:
        rewards: [num_groups, G] rewards (row g holds the G completions of prompt g).
        normalize_std: divide by ``std + eps`` (GRPO). False: only subtract the group mean
            (Dr. GRPO, which removes the bias towards easy/hard prompts the std brings).
        eps: added to the std in the denominator.

    Returns:
        [num_groups, G] advantages, same dtype as ``rewards`` (float32 for integer input).
        The std is the unbiased sample std (``torch.std(unbiased=True)``, as verl and TRL);
        zero-variance groups, including groups of size 1 (whose sample std is undefined),
        get advantage exactly 0.
    """
    rewards = _check_rewards(rewards)
    num_groups, g = rewards.shape
    if g == 0:
        return rewards.clone()
    constant = zero_variance_groups(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std and g > 1:
        std = rewards.std(dim=1, unbiased=True, keepdim=True)
        adv = centred / (std + eps)
    else:
        adv = centred
    return torch.where(constant[:, None], torch.zeros_like(adv), adv)


def group_rewards(group: Any) -> Sequence[float] | Tensor:
    """Default way to read a group's rewards: its ``.rewards`` attribute, else the group itself."""
    return getattr(group, "rewards", group)


def _has_variance(rewards: Sequence[float] | Tensor) -> bool:
    values = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if values.numel() < 2:
        return False
    return bool((values != values[0]).any())


def dynamic_sampling_filter(
    groups: Sequence[T],
    rewards_of: Callable[[T], Sequence[float] | Tensor] = group_rewards,
) -> tuple[list[T], list[int]]:
    """Keep the groups whose rewards are not all equal (DAPO dynamic sampling).

    Args:
        groups: candidate groups, any objects; ``rewards_of(group)`` gives the group's
            rewards (default: ``group.rewards`` if present, else the group itself, so a
            list of reward lists works). Groups may have different sizes.
        rewards_of: accessor for a group's rewards.

    Returns:
        (kept groups in their original order, indices of the kept groups in ``groups``).
        A group of fewer than 2 completions has no variance and is dropped.
    """
    kept: list[T] = []
    index: list[int] = []
    for i, group in enumerate(groups):
        if _has_variance(rewards_of(group)):
            kept.append(group)
            index.append(i)
    return kept, index


@dataclass(frozen=True)
class FillStats:
    """What `fill_groups` did.

    Attributes:
        rounds: generation rounds (candidate batches) consumed from the iterator.
        num_candidates: groups seen over all rounds.
        num_zero_variance: groups dropped because all their rewards were equal.
        num_surplus: groups with variance dropped because the target was already full.
        num_kept: groups returned (``<= target_groups``).
        reached_target: ``num_kept == target_groups``.
        exhausted: the iterator ran out before the target was reached.
    """

    rounds: int
    num_candidates: int
    num_zero_variance: int
    num_surplus: int
    num_kept: int
    reached_target: bool
    exhausted: bool

    @property
    def kept_fraction(self) -> float:
        """Fraction of the candidate groups that had variance (kept or surplus)."""
        if self.num_candidates == 0:
            return 0.0
        return (self.num_candidates - self.num_zero_variance) / self.num_candidates

    def as_dict(self) -> dict[str, float]:
        return {
            "rounds": float(self.rounds),
            "num_candidates": float(self.num_candidates),
            "num_zero_variance": float(self.num_zero_variance),
            "num_surplus": float(self.num_surplus),
            "num_kept": float(self.num_kept),
            "reached_target": float(self.reached_target),
            "exhausted": float(self.exhausted),
            "kept_fraction": self.kept_fraction,
        }


def fill_groups(
    batches_iter: Iterable[Sequence[T]],
    target_groups: int,
    max_rounds: int | None,
    rewards_of: Callable[[T], Sequence[float] | Tensor] = group_rewards,
) -> tuple[list[T], FillStats]:
    """Collect ``target_groups`` groups with non-zero reward variance (DAPO dynamic sampling).

    Pulls one candidate batch (one generation round: a list of scored groups) at a time
    from ``batches_iter``, keeps the groups with variance (`dynamic_sampling_filter`) and
    stops as soon as ``target_groups`` are kept, after ``max_rounds`` rounds, or when the
    iterator is exhausted. It never pulls a batch it does not need, so ``batches_iter`` can
    generate lazily (a generator that samples the next prompts on demand).

    Groups beyond the target in the last round are dropped (counted in ``num_surplus``),
    as verl's DAPO recipe truncates the batch to its size. When the target is not reached
    the kept groups are still returned, with ``stats.reached_target == False``: the caller
    decides whether to train on a smaller batch or skip the step (verl raises instead).

    Args:
        batches_iter: iterable of candidate batches, each a sequence of groups.
        target_groups: number of groups wanted (>= 1).
        max_rounds: most batches to consume (>= 1); None: until the iterator ends.
        rewards_of: accessor for a group's rewards (see `dynamic_sampling_filter`).

    Returns:
        (kept groups, at most ``target_groups``, in generation order; `FillStats`).
    """
    if isinstance(target_groups, bool) or not isinstance(target_groups, int) or target_groups < 1:
        raise ValueError(f"target_groups must be an int >= 1, got {target_groups!r}")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1):
        raise ValueError(f"max_rounds must be an int >= 1 or None, got {max_rounds!r}")
    kept: list[T] = []
    rounds = candidates = zero_var = surplus = 0
    exhausted = False
    iterator = iter(batches_iter)
    while len(kept) < target_groups and (max_rounds is None or rounds < max_rounds):
        try:
            batch = next(iterator)
        except StopIteration:
            exhausted = True
            break
        rounds += 1
        candidates += len(batch)
        good, _ = dynamic_sampling_filter(batch, rewards_of)
        zero_var += len(batch) - len(good)
        room = target_groups - len(kept)
        surplus += max(0, len(good) - room)
        kept.extend(good[:room])
    stats = FillStats(
        rounds=rounds,
        num_candidates=candidates,
        num_zero_variance=zero_var,
        num_surplus=surplus,
        num_kept=len(kept),
        reached_target=len(kept) == target_groups,
        exhausted=exhausted,
    )
    return kept, stats
