"""Ray actors that run inside their stage's own CPUs.

A stage's trainer workers and its engine replicas take turns with the stage's own process: the controller waits
while they train or generate. Reserving CPUs of their own would make a stage ask for more than a small machine has
(two arms' RL stages with two engines each on 2 cores), so by default they reserve a token share in Ray and split
the stage's threads between them.
"""

from __future__ import annotations

# What an actor inside its stage's own CPUs asks Ray for: a placement-group bundle cannot be empty.
TOKEN_CPU = 0.01


def shared_threads(num_actors: int) -> int:
    """Threads for each of ``num_actors`` actors that run at the same time inside this process's CPU budget (its
    torch thread count: the stage's ``num_cpus``)."""
    import torch

    return max(1, torch.get_num_threads() // max(1, num_actors))
