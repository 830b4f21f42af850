"""The cold start's forward pieces: the policy's logits of the labelled positions (one forward, the shared prompt
computed once), the frozen reference, the padding collator. Used by the trainer workers (`eksft.sft.step`) and
`eksft inspect-masks`."""

from __future__ import annotations

import torch

from eksft.objectives import IGNORE_INDEX
from rl.common.lora import adapters_disabled
from rl.common.token_stats import takes_logits_to_keep


class ReferenceModel:
    """The frozen model the SFT started from: a separate copy, or the LoRA base with adapters disabled."""

    def __init__(self, mode: str, copy: torch.nn.Module | None = None):
        if mode == "copy" and copy is None:
            raise ValueError("reference mode 'copy' needs the frozen model")
        self.mode, self.copy = mode, copy
        if copy is not None:
            copy.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, policy: torch.nn.Module, input_ids, attention_mask, first: int) -> torch.Tensor:
        if self.mode == "copy":
            return causal_lm_logits(self.copy, input_ids, attention_mask, first)
        unwrapped = policy.module if hasattr(policy, "module") else policy
        with adapters_disabled(unwrapped) as base:  # eval mode inside: no LoRA dropout noise in the reference
            return causal_lm_logits(base, input_ids, attention_mask, first)


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading positions every row of the batch has in common (real tokens, same ids)."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.long().cumprod(0).sum())


def causal_lm_logits(model, input_ids, attention_mask, first: int, *, share_prefix: bool = True) -> torch.Tensor:
    """Logits of positions ``first`` .. T-1 ([B, T - first, V]) of a right-padded batch, in ONE forward.

    * The LM head runs only on those positions (``logits_to_keep``), where the labels are predicted.
    * With ``share_prefix``, the positions every sequence has in common before ``first`` (the chat template's
      system prompt: ~30 of the quickstart's ~70 tokens) are computed once: the batch runs as one packed row
      ``prefix, rest_1, ..., rest_B`` whose attention mask lets each ``rest_i`` see the prefix and itself
      (`packed_shared_prefix`). Causal attention makes this the same computation (tested against the plain
      forward, logits and gradients); padded positions get zero logits (their labels are -100). Still one
      forward, so under FSDP every rank runs the same collectives whatever its data.
    """
    batch, width = input_ids.shape
    shared = min(common_prefix_length(input_ids, attention_mask), first) if share_prefix and batch > 1 else 0
    # A custom mask needs SDPA (flash attention takes none; eager would need it additive): others run plain.
    sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
    packed = packed_shared_prefix(input_ids, attention_mask, shared, first) if shared >= 2 and sdpa else None
    if packed is None:
        keep = {"logits_to_keep": width - first} if first > 0 else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
    ids, positions, mask, wanted, rows, columns = packed
    keep = {"logits_to_keep": wanted} if takes_logits_to_keep(model) else {}
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, **keep).logits[0]
    if not keep:
        out = out[wanted]
    logits = out.new_zeros(batch, width - first, out.shape[-1])
    return logits.index_put((rows, columns), out)  # out of place: the scatter keeps its gradient


# A packed row longer than this runs as the plain batch: its [L, L] mask (and attention without a fused kernel)
# would cost more than the shared prefix saves.
MAX_PACKED_LENGTH = 4096


def packed_shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int, first: int):
    """The right-padded batch as one row ``prefix, rest_1, ..., rest_B`` (the first ``shared`` tokens once), or None
    when that row would exceed `MAX_PACKED_LENGTH`. Returns ``(ids [1, L], position_ids [1, L], boolean mask
    [1, 1, L, L], wanted, rows, columns)``: the packed positions whose logits are wanted, and where each goes in the
    [B, T - first] output (row, column)."""
    device = input_ids.device
    lengths = attention_mask.sum(1).tolist()
    total = shared + sum(n - shared for n in lengths)
    if total > MAX_PACKED_LENGTH:
        return None
    ids = torch.cat([input_ids[0, :shared]] + [input_ids[i, shared:n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(shared, device=device)] +
                          [torch.arange(shared, n, device=device) for n in lengths])[None]
    segment = torch.cat([torch.full((shared,), -1, device=device)] +
                        [torch.full((n - shared,), i, device=device) for i, n in enumerate(lengths)])
    index = torch.arange(total, device=device)
    allowed = (index[None, :] <= index[:, None]) & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
    mask = allowed[None, None]  # True: may attend (SDPA's boolean mask, which transformers passes as it is)
    # Wanted: every row's positions first .. n_i - 1 (those before `shared` read the prefix's copy).
    wanted, rows, columns = [], [], []
    start = shared
    for i, n in enumerate(lengths):
        for t in range(first, n):
            wanted.append(t if t < shared else start + t - shared)
            rows.append(i)
            columns.append(t - first)
        start += n - shared
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ids, positions, mask, as_tensor(wanted), as_tensor(rows), as_tensor(columns)


def pad_collate(pad_token_id: int):
    """Right-pad input_ids (pad id), labels (-100) and build the attention mask."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention[i, :n] = 1
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate
