"""What the controller sends to the trainer workers, how it is split across ranks, and the one-forward log-probs.

Pure torch (no Ray, no torch.distributed): testable alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rl.common.packing import MAX_PACKED_LENGTH, attention_implementation, pack_sequences, packed_length, packed_logits
from rl.common.token_stats import IGNORE_INDEX, takes_logits_to_keep, token_statistics

__all__ = ["MicroBatch", "StepLoss", "dense_rows", "packed_sequence_logprobs", "sequence_logprobs",
           "split_across_ranks", "unsplit"]


class StepLoss(Protocol):
    """A loss that `TrainerWorker.train_step` runs on a rank's micro-batches (the cold start's objectives are one;
    GRPO has its own `TrainerWorker.update`). It travels to the ranks with each call, so it must pickle.

    ``weights(micro_batches)``: this rank's contributions to the global normalisers (e.g. [sequences]), summed over
    the ranks before the first forward. ``__call__(worker, micro_batch, totals)``: the forward(s) on
    ``worker.model`` (and ``worker.reference_model()``), returning (this micro-batch's share of the global loss,
    {metric: weighted sum}, weight). ``metric_names``: every metric any rank may report (all-reduced in this
    order). ``padding(like)``: a micro-batch that contributes nothing but runs the same forwards, for ranks left
    short (FSDP needs the same collectives on every rank).
    """

    metric_names: tuple[str, ...]

    def weights(self, micro_batches: Sequence[Any]) -> list[float]: ...

    def __call__(self, worker: Any, micro_batch: Any, totals: list[float]) -> tuple[Tensor, dict[str, float], float]: ...

    def padding(self, like: Any) -> Any: ...


@dataclass
class MicroBatch:
    """One forward/backward worth of completions, in plain lists so that it travels through Ray as it is.

    ``old_logprobs`` None means on policy: the detached log-probs of the training forward are the old ones
    (rho = 1). ``ref_logprobs`` is needed when the KL term is on (and feeds the ``kl`` metric when given).
    ``trained`` False excludes a sequence from the loss and from every count (overlong masking); None: all.
    ``engine_logprobs`` (the rollout engine's log-probs of the sampled tokens), when given, make `update` report
    ``logprob_gap_engine_trainer``: the mean |trainer - engine| over the trained tokens, before the step; with
    ``num_engines`` > 1 also ``logprob_gap/engine<e>`` for each replica, by ``engine_ids`` (which drew each sequence).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float] | None = None
    old_logprobs: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    trained: list[bool] | None = None
    engine_logprobs: list[list[float]] | None = None  # the sampler's: `update` reports the trainer-engine gap
    engine_ids: list[int] | None = None  # the replica that drew each sequence (None: all engine 0)
    num_engines: int = 1  # the same in every micro-batch of an update: the per-engine gaps are reduced as one vector

    def __len__(self) -> int:
        return len(self.completion_ids)

    @classmethod
    def padding(cls, like: MicroBatch) -> MicroBatch:
        """A micro-batch that contributes nothing (loss mask all 0) but still runs one forward and backward.

        FSDP's collectives need the same number of forwards and backwards on every rank, so a rank with fewer
        micro-batches than another runs these. It has the optional fields ``like`` has, so that every rank
        reports the same metrics (they are all-reduced as one vector)."""
        def zeros(field):
            return None if field is None else [[0.0]]

        return cls([[0]], [[0]], [0.0], zeros(like.old_logprobs), zeros(like.ref_logprobs), [False],
                   zeros(like.engine_logprobs), None if like.engine_ids is None else [0], like.num_engines)

    def trained_mask(self) -> list[bool]:
        return list(self.trained) if self.trained is not None else [True] * len(self)

    def counts(self) -> tuple[int, int]:
        """(valid tokens, non-empty sequences) of the trained sequences: this micro-batch's share of the
        global denominators of `rl.grpo.loss.policy_loss`."""
        lengths = [len(c) for c, keep in zip(self.completion_ids, self.trained_mask()) if keep]
        return sum(lengths), sum(n > 0 for n in lengths)


def split_across_ranks(micro_batches: Sequence, world_size: int,
                       padding: Callable[[Any], Any] = MicroBatch.padding) -> list[list]:
    """Rank r gets micro-batches r, r + N, r + 2N, ...; ranks left short are padded (``padding(first)``, by default
    `MicroBatch.padding`) so that every rank runs the same number of forwards. N ranks with k each then compute
    what one rank computes with all N * k: the loss uses global counts, so the gradients of all micro-batches
    simply add up."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not micro_batches:
        raise ValueError("no micro-batches to split")
    shares = [list(micro_batches[r::world_size]) for r in range(world_size)]
    longest = max(len(s) for s in shares)
    return [s + [padding(micro_batches[0]) for _ in range(longest - len(s))] for s in shares]


def unsplit(per_rank: Sequence[Sequence[list]], n_micro_batches: int) -> list:
    """Inverse of `split_across_ranks` for per-micro-batch results (padding results dropped), in the original
    order, flattened: ``per_rank[r][j]`` is the list of per-sample results of micro-batch ``r + j * N``."""
    world_size = len(per_rank)
    out = []
    for i in range(n_micro_batches):
        out.extend(per_rank[i % world_size][i // world_size])
    return out


def sequence_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      temperature: float, *, with_entropy: bool):
    """Log-probs (and entropies) of each completion under ``softmax(logits / T)``, in ONE forward of the model.

    Returns ``(logp, entropy, mask)``, [b, n_max] tensors with completion token t of row i at column t.

    Why not `rl.grpo.logprobs.completion_logprobs` (prompts once, then completions in length buckets): the number
    of forwards there depends on the data, and under FSDP every forward all-gathers parameters, so ranks holding
    different data would run different collectives and hang. Here each call is exactly one forward: rows are
    prompt + completion, left-padded so that every completion ends at the last column, and the LM head runs on
    the last ``n_max + 1`` positions only.
    """
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (it predicts the first completion token)")
    device = next(model.parameters()).device
    lengths = [len(c) for c in completion_ids]
    width = max(max(lengths), 1)
    total = max(len(p) + n for p, n in zip(prompt_ids, lengths))
    ids = torch.zeros((len(lengths), total), dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        row = list(p) + list(c)
        ids[i, total - len(row):] = torch.tensor(row)
        attention[i, total - len(row):] = 1
        if c:
            labels[i, width - len(c):] = torch.tensor(c)
    ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
    keep = {"logits_to_keep": width + 1} if takes_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False, **keep).logits
    logits = logits[:, -(width + 1):-1]  # column j predicts the token at column j of `labels`
    if temperature != 1.0:
        logits = logits / temperature
    right_valid = labels != IGNORE_INDEX
    stats = token_statistics(logits, right_valid, labels=torch.where(right_valid, labels, 0))
    # Right-aligned -> left-aligned: completion token t of row i sits at column width - n_i + t.
    n = torch.tensor(lengths, device=device)[:, None]
    columns = torch.arange(width, device=device)
    source = (columns + width - n).clamp(max=width - 1)
    mask = columns < n
    logp = torch.where(mask, stats.label_logprob.gather(1, source), 0.0)
    entropy = torch.where(mask, stats.entropy.gather(1, source), 0.0) if with_entropy else None
    return logp, entropy, mask


def packed_sequence_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                             temperature: float, *, with_entropy: bool, layout: str = "shared_prompt"):
    """`sequence_logprobs` computed on one packed row (`rl.common.packing`), the LM head on the completion tokens'
    positions only: the same ``(logp, entropy, mask)``, equal up to float rounding (tested), also in one forward.

    ``shared_prompt``: each prompt once for the adjacent completions that share it, with an [L, L] mask (SDPA or
    eager attention; the padded `sequence_logprobs` runs instead for other attention implementations).
    ``padding_free``: the sequences one after another, no mask (transformers separates them by position ids:
    varlen flash attention on a GPU). Either runs padded where the packed row would exceed `MAX_PACKED_LENGTH`."""
    if layout not in ("shared_prompt", "padding_free"):
        raise ValueError(f"layout must be shared_prompt or padding_free, got {layout!r}")
    share = layout == "shared_prompt"
    if (share and attention_implementation(model) not in ("sdpa", "eager")) or \
            packed_length(prompt_ids, completion_ids, share) > MAX_PACKED_LENGTH:
        return sequence_logprobs(model, prompt_ids, completion_ids, temperature, with_entropy=with_entropy)
    device = next(model.parameters()).device
    packed = pack_sequences(prompt_ids, completion_ids, device, share_prompts=share)
    logits = packed_logits(model, packed, packed.label_positions, masked=share)
    if temperature != 1.0:
        logits = logits / temperature
    valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=device)
    stats = token_statistics(logits, valid, labels=packed.labels[None])
    logp = packed.unpack(stats.label_logprob[0])
    entropy = packed.unpack(stats.entropy[0]) if with_entropy else None
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = torch.arange(packed.width, device=device)[None, :] < lengths[:, None]
    return logp, entropy, mask


def dense_rows(rows: Sequence[Sequence[float]], like: Tensor) -> Tensor:
    """Right-pad per-sample lists into the [b, n_max] layout (dtype, device) of ``like``."""
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.tensor(r, dtype=out.dtype, device=out.device)
    return out
