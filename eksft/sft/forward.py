"""The cold start's forward pieces: the policy's logits of the labelled positions (one forward on a packed row, the
shared prompt computed once), the frozen reference, the padding collator. Used by the trainer workers (`eksft.sft.step`) and
`eksft inspect-masks`."""

from __future__ import annotations

import torch

from eksft.objectives import IGNORE_INDEX
from rl.common.lora import adapters_disabled
from rl.common.packing import MAX_PACKED_LENGTH, attention_implementation, pack_sequences, packed_length, packed_logits


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


def causal_lm_logits(model, input_ids, attention_mask, first: int, *, packed: bool = True) -> torch.Tensor:
    """Logits of positions ``first`` .. T-1 ([B, T - first, V]) of a right-padded batch, in ONE forward.

    * The LM head runs only on those positions (``logits_to_keep``), where the labels are predicted.
    * With ``packed``, the batch runs as one packed row without padding (`rl.common.packing`):
      the positions every sequence has in common before ``first`` (the chat template's system prompt: ~30 of the
      quickstart's ~70 tokens) once, then each sequence's rest, attending to that prefix and to itself only, its
      position ids continuing from the prefix. Causal attention makes this the same computation (tested against
      the plain forward: logits, gradients and every objective); padded positions get zero logits (their labels
      are -100). Still one forward, so under FSDP every rank runs the same collectives whatever its data.
    """
    batch, width = input_ids.shape
    # A custom mask needs SDPA or eager attention (flash attention takes none): others run plain.
    layout = None
    if packed and batch > 1 and attention_implementation(model) in ("sdpa", "eager"):
        layout = packed_batch(input_ids, attention_mask, first)
    if layout is None:
        keep = {"logits_to_keep": width - first} if first > 0 else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits
    row, wanted, rows, columns = layout
    out = packed_logits(model, row, wanted)[0]
    logits = out.new_zeros(batch, width - first, out.shape[-1])
    return logits.index_put((rows, columns), out)  # out of place: the scatter keeps its gradient


def packed_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int):
    """The right-padded batch as one packed row (`rl.common.packing.pack_sequences`), or None when that row would
    exceed `MAX_PACKED_LENGTH`. Returns ``(row, wanted, rows, columns)``: the `PackedSequences`, the packed positions
    whose logits are wanted, and where each goes in the [B, T - first] output (row, column).

    Each sequence ``x`` of length n is packed as the "prompt" ``x[:s]`` (s: the batch's common prefix before
    ``first``, at least 1 token) and the "completion" ``x[s:n]`` plus a placeholder: the packed positions then
    hold x's positions s - 1 .. n - 1, whose logits are the plain forward's there."""
    device = input_ids.device
    lengths = attention_mask.sum(1).tolist()
    shared = max(1, min(common_prefix_length(input_ids, attention_mask), first))
    rows_ids = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    prompts = [x[:shared] for x in rows_ids]
    completions = [x[shared:] + [0] for x in rows_ids]  # the placeholder is a label only, never an input
    if packed_length(prompts, completions) > MAX_PACKED_LENGTH:
        return None
    row = pack_sequences(prompts, completions, device)
    position = shared - 1 + row.columns  # the position in its own sequence that each label position holds
    wanted = position >= first
    return row, row.label_positions[wanted], row.rows[wanted], position[wanted] - first


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
