"""Per-token log-probs and entropies of sampled completions under the trainer's model.

Pure torch (no pydantic, vLLM or Ray), so benchmarks on a bare GPU image can load it as a file.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from rl.token_stats import IGNORE_INDEX, token_statistics

if TYPE_CHECKING:
    from rl.rollout.base import Sample  # anything with .prompt_ids and .completion_ids (lists of ints)


def completion_logprobs(model, samples: Sequence[Sample], temperature: float, *, with_entropy: bool,
                        autocast_dtype: torch.dtype | None = None):
    """Log-probs (and entropy) of each sample's completion tokens under ``softmax(logits / T)``.

    Returns [b, T_max] tensors aligned with the completion tokens and their validity mask.
    The LM head runs only from the shortest prompt's last token on (``logits_to_keep``): the
    prompt positions before it predict nothing we train on, and with a vocabulary of 50k-150k
    the head and the statistics over it are a large part of the step.
    """
    device = next(model.parameters()).device
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    width = max(lengths)
    # logits[t] predicts token t+1: the first completion token of sample i is predicted at p_i - 1.
    first = min(len(s.prompt_ids) for s in samples) - 1 if _takes_logits_to_keep(model) else 0
    first = max(0, min(first, width - 2))  # at least one position (all completions may be empty)
    ids = torch.zeros((len(samples), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full((len(samples), width - 1 - first), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        p = len(s.prompt_ids)
        labels[i, p - 1 - first : len(seq) - 1 - first] = torch.tensor(s.completion_ids)
    ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    keep = {"logits_to_keep": width - first} if first > 0 else {}
    with ctx:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **keep).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    mask = labels != IGNORE_INDEX
    stats = token_statistics(logits, mask, labels=labels)
    # Gather the completion positions into a dense [b, T_max] layout.
    max_len = max(len(s.completion_ids) for s in samples)
    logp = torch.zeros((len(samples), max_len), device=device, dtype=stats.label_logprob.dtype)
    entropy = torch.zeros_like(logp) if with_entropy else None
    resp_mask = torch.zeros((len(samples), max_len), dtype=torch.bool, device=device)
    for i, s in enumerate(samples):
        start, n = len(s.prompt_ids) - 1 - first, len(s.completion_ids)
        logp[i, :n] = stats.label_logprob[i, start : start + n]
        if with_entropy:
            entropy[i, :n] = stats.entropy[i, start : start + n]
        resp_mask[i, :n] = True
    return logp, entropy, resp_mask


def _takes_logits_to_keep(model) -> bool:
    """transformers' causal LMs (Llama, Qwen2, ... and PEFT wrappers of them) accept ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
