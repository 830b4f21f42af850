"""Per-token log-probs and entropies of sampled completions under the trainer's model.

Pure torch (no pydantic, vLLM or Ray), so benchmarks on a bare GPU image can load it as a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from rl.common.token_stats import IGNORE_INDEX, takes_logits_to_keep, token_statistics

if TYPE_CHECKING:
    from rl.rollout.base import Sample  # anything with .prompt_ids and .completion_ids (lists of ints)


def completion_logprobs(model, samples: Sequence[Sample], temperature: float, *, with_entropy: bool,
                        autocast_dtype: torch.dtype | None = None):
    """Log-probs (and entropy) of each sample's completion tokens under ``softmax(logits / T)``.

    Returns [b, T_max] tensors aligned with the completion tokens and their validity mask.

    Each distinct prompt is computed once per call, not once per sample: GRPO's G samples of a prompt share
    it, and the prompt is often longer than the completions. First the distinct prompts (left-padded, LM head
    on their last position only, which predicts the first completion token), then the completions on their
    prompt's keys and values as KV cache, in buckets of similar length (`length_buckets`: one 96-token sample
    would otherwise pad a micro-batch of 20-token ones). With causal attention each completion token sees
    exactly what it sees in the full sequence, so the values and, through the cache, the gradients are those
    of one forward per sample (tested against float64 full-sequence log-probs and gradients).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompts: dict[tuple[int, ...], int] = {}
    group = torch.tensor([prompts.setdefault(tuple(s.prompt_ids), len(prompts)) for s in samples], device=device)
    p_max = max(len(p) for p in prompts)
    prompt_ids = torch.zeros((len(prompts), p_max), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for j, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        prompt_ids[j, p_max - len(p):] = torch.tensor(p)
        prompt_mask[j, p_max - len(p):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    lengths = [len(s.completion_ids) for s in samples]
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        keep = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                      position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), **keep)
    dtype = torch.promote_types(first.logits.dtype, torch.float32)  # what token_statistics computes in
    logp = torch.zeros((len(samples), max(lengths)), device=device, dtype=dtype)
    entropy = torch.zeros_like(logp) if with_entropy else None
    mask = torch.zeros(logp.shape, dtype=torch.bool, device=device)
    for bucket in length_buckets(lengths):
        rows = torch.tensor(bucket, device=device)
        width = max(lengths[i] for i in bucket)
        if width == 0:  # empty completions: nothing to score
            continue
        ids = torch.zeros((len(bucket), width), dtype=torch.long)
        for r, i in enumerate(bucket):
            ids[r, : lengths[i]] = torch.tensor(samples[i].completion_ids, dtype=torch.long)
        ids = ids.to(device)
        valid = torch.arange(width, device=device) < torch.tensor([lengths[i] for i in bucket], device=device)[:, None]
        with ctx:
            logits = first.logits[:, -1:][group[rows]]  # [k, 1, V]: predicts each completion's first token
            if width > 1:  # the rest, on the prompts' keys/values (a gather: the gradients of the copies add up)
                cache = DynamicCache(ddp_cache_data=[(k[group[rows]], v[group[rows]]) for k, v, *_ in first.past_key_values],
                                     config=model.config)
                rest = model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True,
                             attention_mask=torch.cat([prompt_mask[group[rows]], valid[:, :-1].long()], dim=-1),
                             position_ids=prompt_mask.sum(-1)[group[rows], None] + torch.arange(width - 1, device=device))
                logits = torch.cat([logits, rest.logits], dim=1)  # [k, width, V]: position t predicts token t
        if temperature != 1.0:
            logits = logits / temperature
        stats = token_statistics(logits, valid, labels=torch.where(valid, ids, IGNORE_INDEX))
        logp[rows, :width] = stats.label_logprob
        if with_entropy:
            entropy[rows, :width] = stats.entropy
        mask[rows, :width] = valid
    return logp, entropy, mask


def length_buckets(lengths: Sequence[int], max_padding: float = 0.2) -> list[list[int]]:
    """Indices grouped by similar length, longest first: a bucket grows while at most ``max_padding`` of its
    padded positions (``len(bucket) * longest``) are padding. Empty sequences go with the shortest."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    total = 0
    for i in order:
        if buckets and (len(buckets[-1]) + 1) * max(lengths[buckets[-1][0]], 1) * (1 - max_padding) <= total + lengths[i]:
            buckets[-1].append(i)
            total += lengths[i]
        else:
            buckets.append([i])
            total = lengths[i]
    return buckets
