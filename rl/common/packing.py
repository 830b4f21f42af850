"""Packed rows: the sequences of a micro-batch as ONE row of a forward, each prompt computed once for its group.

The G completions of a prompt are laid out as ``prompt[:-1], (prompt[-1], c1[:-1]), ..., (prompt[-1], cG[:-1])``:

* the prompt (but its last token) once, then one segment per completion;
* each segment starts with a copy of the prompt's last token, so that every position predicts exactly one
  completion token (the copy predicts ``c_j[0]``, ``c_j[t]`` predicts ``c_j[t + 1]``) and the last completion
  token, which predicts nothing, is not computed at all;
* a segment attends to the prompt and to itself only, its position ids continue from the prompt's end
  (``len(prompt) - 1 + t``): causal attention makes every completion token's logits the ones of the plain
  ``prompt + completion`` forward, and the prompt carries no loss, so the gradients are the same too.

Adjacent sequences with the same prompt form one unit; several units go into one row with a block mask (no
attention between units). A sequence whose prompt differs from its neighbours' is its own unit, which is plain
padding-free packing.

Two layouts (``rl.packing``):

* ``shared_prompt``: as above, with the [L, L] mask passed to SDPA (boolean) or eager attention (additive);
* ``padding_free``: every sequence its own unit (no prompt shared), position ids restarting at 0 for each, and
  NO mask: transformers finds the sequences from the position ids (varlen flash attention on a GPU; a block
  mask it builds itself for SDPA / eager). The layout flash attention can run, which takes no custom mask.

`packed_logits` runs a model on a packed row (for `rl.workers.batch.packed_sequence_logprobs` and the cold start's
`eksft.sft.forward.causal_lm_logits`); the rest is pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl.common.token_stats import takes_logits_to_keep

__all__ = ["LAYOUTS", "MAX_PACKED_LENGTH", "PACKING_BY_DEVICE", "Packing", "PackedSequences", "attention_implementation",
           "pack_sequences", "packed_length", "packed_logits", "packing_units", "resolve_packing", "sft_packed"]

# A packed row longer than this runs as the padded batch: its [L, L] mask (and attention without a fused kernel
# for arbitrary masks) would cost more than the shared positions save.
MAX_PACKED_LENGTH = 4096

Packing = Literal["auto", "off", "shared_prompt", "padding_free"]
LAYOUTS = ("off", "shared_prompt", "padding_free")

# What `auto` means per device kind, chosen from the committed benchmarks (benchmarks/results/): on a CPU
# (`grpo_step_cpu-avx2.md`) the trainer's update with the shared prompt computes 0.41x the positions in 0.50x the
# time of padded rows (padding_free: 0.64x, 0.81x). On an H200 it is no clear win: the update alone with
# completions of 128-1024 tokens took 0.93x the time (`gpu_grpo_step_h200.md`), the FSDP2 worker's update with
# equal lengths 1.07x (`gpu_fsdp_update_h200.md`: the mask keeps SDPA off its flash kernel), so it stays off.
PACKING_BY_DEVICE = {"cpu": "shared_prompt", "cuda": "off"}


def resolve_packing(setting: str, device_type: str) -> str:
    """``auto`` -> the device kind's choice (`PACKING_BY_DEVICE`, off for unknown kinds); otherwise the setting."""
    if setting == "auto":
        return PACKING_BY_DEVICE.get(device_type, "off")
    if setting not in LAYOUTS:
        raise ValueError(f"packing must be one of auto, {', '.join(LAYOUTS)}; got {setting!r}")
    return setting


def sft_packed(setting: str, device_type: str) -> bool:
    """Whether the cold start packs its micro-batches (``sft.packing``): on, off, or auto = where `rl.packing`'s
    ``auto`` packs on this device kind."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"sft.packing must be one of auto, on, off; got {setting!r}")
    return setting == "on" or (setting == "auto" and resolve_packing("auto", device_type) != "off")


def packing_units(prompt_ids: Sequence[Sequence[int]], share_prompts: bool = True) -> list[list[int]]:
    """Indices of the sequences grouped into units: maximal runs of adjacent sequences with equal prompts (without
    ``share_prompts``: one sequence each)."""
    units: list[list[int]] = []
    for i, p in enumerate(prompt_ids):
        if share_prompts and units and list(prompt_ids[units[-1][0]]) == list(p):
            units[-1].append(i)
        else:
            units.append([i])
    return units


def packed_length(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                  share_prompts: bool = True) -> int:
    """Positions of the packed row of these sequences (at least 1): what a micro-batch's token budget counts."""
    total = 0
    for unit in packing_units(prompt_ids, share_prompts):
        total += len(prompt_ids[unit[0]]) - 1 + sum(len(completion_ids[i]) for i in unit)
    return max(total, 1)


@dataclass
class PackedSequences:
    """One packed row and where each completion token's logits are in it.

    ``input_ids``, ``position_ids``: [1, L]. ``allowed``: [L, L] bool, True where query position q may attend to
    key position k. ``label_positions`` [K]: the row positions whose logits predict the completion tokens, in the
    order ``labels`` [K] lists them (sequence by sequence); ``rows``, ``columns`` [K]: where each goes in the
    [num_sequences, max completion length] layout of `rl.workers.batch.sequence_logprobs`.
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    label_positions: Tensor
    labels: Tensor
    rows: Tensor
    columns: Tensor
    num_sequences: int
    width: int  # the longest completion (>= 1)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def attention_mask(self, implementation: str | None, dtype: torch.dtype) -> Tensor | None:
        """The [1, 1, L, L] mask transformers passes to the attention as it is: boolean for SDPA (True: attend),
        additive for eager (0 or the dtype's minimum). None for implementations that take no such mask."""
        if implementation == "sdpa":
            return self.allowed[None, None]
        if implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=self.allowed.device)
            return torch.where(self.allowed, zero, torch.finfo(dtype).min)[None, None]
        return None

    def unpack(self, values: Tensor) -> Tensor:
        """[K] per-label values -> [num_sequences, width], zero where a sequence has no token (differentiable)."""
        out = values.new_zeros(self.num_sequences, self.width)
        return out.index_put((self.rows, self.columns), values)


def pack_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   device: torch.device | str = "cpu", share_prompts: bool = True) -> PackedSequences:
    """The packed row of ``prompt_ids[i] + completion_ids[i]`` (see the module docstring); every prompt needs at
    least one token (it predicts the first completion token). Without ``share_prompts`` every sequence is its own
    unit (the ``padding_free`` layout)."""
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(f"need as many prompts as completions (>= 1), got {len(prompt_ids)} and {len(completion_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (it predicts the first completion token)")
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []  # one id per segment; a prompt's id is its unit's first segment
    parent: list[int] = []  # per segment: the prompt segment it also sees (itself for a prompt)
    label_positions: list[int] = []
    labels: list[int] = []
    rows: list[int] = []
    columns: list[int] = []
    for unit in packing_units(prompt_ids, share_prompts):
        prompt = list(prompt_ids[unit[0]])
        head = len(prompt) - 1
        prompt_segment = len(parent)
        parent.append(prompt_segment)
        ids += prompt[:-1]
        positions += range(head)
        segments += [prompt_segment] * head
        for i in unit:
            completion = list(completion_ids[i])
            if not completion:
                continue
            segment = len(parent)
            parent.append(prompt_segment)
            start = len(ids)
            ids += [prompt[-1]] + completion[:-1]
            positions += range(head, head + len(completion))
            segments += [segment] * len(completion)
            label_positions += range(start, start + len(completion))
            labels += completion
            rows += [i] * len(completion)
            columns += range(len(completion))
    if not ids:  # nothing to compute (one-token prompts, empty completions): one dummy position
        ids, positions, segments = [0], [0], [len(parent)]
        parent.append(len(parent))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    segment = as_long(segments)
    seen = as_long(parent)[segment]  # the prompt segment each position may also attend to
    index = torch.arange(len(ids), device=device)
    allowed = (index[None, :] <= index[:, None]) & ((segment[None, :] == segment[:, None]) |
                                                    (segment[None, :] == seen[:, None]))
    width = max([len(c) for c in completion_ids] + [1])
    return PackedSequences(as_long(ids)[None], as_long(positions)[None], allowed, as_long(label_positions),
                           as_long(labels), as_long(rows), as_long(columns), len(completion_ids), width)


def attention_implementation(model) -> str | None:
    """transformers' attention implementation of ``model`` (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def packed_logits(model, packed: PackedSequences, positions: Tensor, *, masked: bool = True) -> Tensor:
    """[1, len(positions), V] logits of the packed row at ``positions``, in one forward (the LM head on those
    positions only where the model takes ``logits_to_keep``). ``masked``: pass the row's [L, L] mask (SDPA or
    eager attention); without it transformers separates the sequences by their position ids."""
    mask = None
    if masked:
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        mask = packed.attention_mask(attention_implementation(model), dtype)
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask, use_cache=False)
    if takes_logits_to_keep(model):
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]
