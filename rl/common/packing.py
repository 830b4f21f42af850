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

* ``shared_prompt``: as above. With SDPA the row runs `segment_attention` (the prompts in one SDPA call, then the
  completions with their prompt, in buckets of similar length: only the pairs the mask allows, not all L^2 of
  them); eager attention takes the [L, L] mask (additive);
* ``padding_free``: every sequence its own unit (no prompt shared), position ids restarting at 0 for each, and
  NO mask: transformers finds the sequences from the position ids (varlen flash attention on a GPU; a block
  mask it builds itself for SDPA / eager). The layout flash attention can run, which takes no custom mask.

`packed_logits` runs a model on a packed row (for `rl.workers.batch.packed_sequence_logprobs` and the cold start's
`eksft.sft.forward.causal_lm_logits`); the rest is pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from rl.common.token_stats import takes_logits_to_keep

__all__ = ["LAYOUTS", "MAX_PACKED_LENGTH", "PACKING_BY_DEVICE", "SDPA_CALL_PAIRS", "CPU_ATTENTION_DTYPE",
           "CompletionBucket", "Packing", "PackedSequences", "SEGMENT_ATTENTION", "SegmentLayout",
           "completion_buckets", "attention_implementation", "pack_sequences", "packed_length", "packed_logits",
           "packing_units", "resolve_packing", "segment_attention", "sft_packed", "use_segment_attention"]

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
    segment: Tensor  # [L] the segment of each position (a prompt, or one completion)
    seen: Tensor  # [L] the prompt segment each position also sees (its own for a prompt)

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

    def segment_layout(self) -> SegmentLayout:
        """The row's segments laid out for `segment_attention` (cached)."""
        if getattr(self, "_layout", None) is None:
            self._layout = SegmentLayout.of(self.segment, self.seen)
        return self._layout

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
                           as_long(labels), as_long(rows), as_long(columns), len(completion_ids), width, segment, seen)


# What one SDPA call's fixed cost (dispatch, gathers, the thread pool's start) is worth in query-key pairs, for
# `completion_buckets`: measured on 2 AVX2 cores (benchmarks/results/segment_attention_cpu-avx2.md).
SDPA_CALL_PAIRS = 16384

# The dtype `segment_attention` computes in on a CPU when the model computes in bf16 / fp16. SDPA's CPU kernels
# are about twice as slow in bf16 as in float32 at GRPO's shapes (forward + backward, native-bf16 Xeon:
# benchmarks/results/segment_attention_cpu-avx512-bf16.md), so the attention casts up and rounds its output back
# (more exact than bf16 SDPA, which rounds the probabilities). None: the query's dtype. Accelerators are unaffected.
CPU_ATTENTION_DTYPE: torch.dtype | None = torch.float32


def completion_buckets(lengths: Sequence[int], prompt_width: int, call_pairs: int | None = None) -> list[list[int]]:
    """The completions (by index into ``lengths``) split into buckets, one SDPA call each in `segment_attention`.

    A bucket pads its completions to its longest, C, and each of its S x C queries meets ``prompt_width + C`` keys.
    The split minimises those pairs plus ``call_pairs`` per call, exactly: for this cost some optimal split takes
    the completions in order of length (swapping a longer one into the bucket of shorter ones never helps), so a
    dynamic programme over the sorted lengths finds it (tested against every partition). Each bucket lists its
    completions in their original order, longest bucket first. ``call_pairs`` None: `SDPA_CALL_PAIRS`."""
    call_pairs = SDPA_CALL_PAIRS if call_pairs is None else call_pairs
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = [0] + [float("inf")] * len(order)  # best[j]: the cheapest split of the j longest
    start = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last bucket is order[i:j], padded to its first (longest) length
            longest = lengths[order[i]]
            cost = best[i] + (j - i) * longest * (prompt_width + longest) + call_pairs
            if cost < best[j]:
                best[j], start[j] = cost, i
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(sorted(order[start[j]:j]))
        j = start[j]
    return buckets[::-1]


@dataclass(frozen=True)
class CompletionBucket:
    """Completions of similar length, attended to in one SDPA call: ``query_index`` [S, C] their row positions,
    padded with 0 where ``query_valid`` is False; each attends to its prompt's positions and, causally, to its own:
    ``key_index`` [S, P + C] (its prompt's row of the layout's ``prompt_index``, then its own) under ``key_mask``
    [S, 1, C, P + C]. A padded query sees its own keys up to it, so no row of the mask is empty (its output is
    dropped). ``query_rows``: the valid entries of ``query_index``, flattened."""

    query_index: Tensor
    query_valid: Tensor
    key_index: Tensor
    key_mask: Tensor
    query_rows: Tensor

    def to(self, device) -> CompletionBucket:
        return CompletionBucket(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass(frozen=True)
class SegmentLayout:
    """The segments of a packed row laid out for `segment_attention`.

    Prompts (segments that see only themselves): ``prompt_index`` [U, P] their row positions, padded with 0 where
    ``prompt_valid`` is False (``prompt_rows``: its valid entries, flattened). Completions: ``buckets`` of similar
    length (`completion_buckets`). ``order`` [L]: the row position of each valid output, prompts first, then the
    buckets' in turn."""

    prompt_index: Tensor
    prompt_valid: Tensor
    prompt_rows: Tensor  # index_select with it: a cheap backward
    buckets: tuple[CompletionBucket, ...]
    order: Tensor

    @classmethod
    def of(cls, segment: Tensor, seen: Tensor, call_pairs: int | None = None) -> SegmentLayout:
        device = segment.device
        ids, parents = segment.tolist(), seen.tolist()
        where: dict[int, list[int]] = {}
        for position, sid in enumerate(ids):
            where.setdefault(sid, []).append(position)
        parent = {sid: parents[where[sid][0]] for sid in where}
        prompts = [sid for sid in where if parent[sid] == sid]
        completions = [sid for sid in where if parent[sid] != sid]
        prompt_row = {sid: r for r, sid in enumerate(prompts)}

        def padded(segments: list[int]) -> tuple[Tensor, Tensor]:
            width = max((len(where[sid]) for sid in segments), default=0)
            index = torch.zeros((len(segments), width), dtype=torch.long)
            valid = torch.zeros((len(segments), width), dtype=torch.bool)
            for r, sid in enumerate(segments):
                index[r, : len(where[sid])] = torch.tensor(where[sid])
                valid[r, : len(where[sid])] = True
            return index, valid

        prompt_index, prompt_valid = padded(prompts)
        P = prompt_index.shape[1]
        buckets = []
        for members in completion_buckets([len(where[sid]) for sid in completions], P, call_pairs):
            sids = [completions[m] for m in members]
            query_index, query_valid = padded(sids)
            # A completion whose prompt has no position (a one-token prompt) sees no prompt key.
            rows = torch.tensor([prompt_row.get(parent[sid], -1) for sid in sids], dtype=torch.long)
            has = (rows >= 0)[:, None]
            C = query_index.shape[1]
            prompt_keys = torch.where(has, prompt_index[rows.clamp(min=0)], 0) if P else prompt_index[:0].reshape(len(rows), 0)
            prompt_seen = (prompt_valid[rows.clamp(min=0)] & has) if P else prompt_valid[:0].reshape(len(rows), 0)
            causal = torch.ones((C, C), dtype=torch.bool).tril()
            key_mask = torch.cat([prompt_seen[:, None, :].expand(-1, C, -1), causal.expand(len(rows), -1, -1)], dim=2)
            buckets.append(CompletionBucket(query_index, query_valid, torch.cat([prompt_keys, query_index], dim=1),
                                            key_mask[:, None], query_valid.flatten().nonzero().flatten()))
        order = torch.empty(len(ids), dtype=torch.long)
        order[torch.cat([prompt_index[prompt_valid]] + [b.query_index[b.query_valid] for b in buckets])] = \
            torch.arange(len(ids))
        return cls(prompt_index.to(device), prompt_valid.to(device), prompt_valid.flatten().nonzero().flatten().to(device),
                   tuple(b.to(device) for b in buckets), order.to(device))


def segment_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, packed_layout: SegmentLayout | None = None, **kwargs):
    """transformers' attention interface for one packed row, segment by segment: what the row's [L, L] mask
    allows, without computing the pairs it forbids.

    Under the mask SDPA computes all L^2 query-key pairs of the row; a completion only needs its prompt and its
    own earlier tokens (G completions of c tokens after a p-token prompt: G c (p + c/2) of (p + G c)^2 pairs).
    Here each prompt attends causally to itself (one SDPA call over the prompts, ``is_causal``) and each
    completion to its prompt and causally to itself (one SDPA call per bucket of completions of similar length,
    each padded to its longest: `completion_buckets`).
    The same softmax over the same keys: equal to the masked SDPA up to float rounding (tested). On a CPU a bf16 /
    fp16 row attends in `CPU_ATTENTION_DTYPE` (float32) and returns its own dtype.
    Registered as `SEGMENT_ATTENTION`; without ``packed_layout`` it is transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = packed_layout
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: key/value heads repeated as transformers does
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [L, heads, head_dim]
    if query.device.type == "cpu" and CPU_ATTENTION_DTYPE is not None and query.dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.to(CPU_ATTENTION_DTYPE), k.to(CPU_ATTENTION_DTYPE), v.to(CPU_ATTENTION_DTYPE)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def gather(t: Tensor, index: Tensor) -> Tensor:  # [L, heads, d] -> [N, heads, W, d] (index_select, not t[index]:
        # the backward of advanced indexing is a serial accumulating index_put on a CPU)
        return t.index_select(0, index.flatten()).view(*index.shape, *t.shape[1:]).transpose(1, 2)

    def valid(out: Tensor, rows: Tensor) -> Tensor:  # [N, heads, W, d] -> [n valid, heads, d]
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[3]).index_select(0, rows)

    outputs = []
    if layout.prompt_index.numel():
        qp, kp, vp = (gather(t, layout.prompt_index) for t in (q, k, v))  # [U, heads, P, head_dim]
        outputs.append(valid(sdpa(qp, kp, vp, dropout_p=dropout, is_causal=True, scale=scaling), layout.prompt_rows))
    for bucket in layout.buckets:
        qs = gather(q, bucket.query_index)  # [S, heads, C, head_dim]
        ks, vs = gather(k, bucket.key_index), gather(v, bucket.key_index)  # [S, heads, P + C, head_dim]
        out = sdpa(qs, ks, vs, attn_mask=bucket.key_mask, dropout_p=dropout, scale=scaling)
        outputs.append(valid(out, bucket.query_rows))
    return torch.cat(outputs).index_select(0, layout.order).to(query.dtype)[None], None


SEGMENT_ATTENTION = "sdpa_packed_segments"  # the name `segment_attention` is registered under in transformers


def attention_implementation(model) -> str | None:
    """transformers' attention implementation of ``model`` (``sdpa``, ``eager``, ``flash_attention_2``, ...); a model
    switched to `SEGMENT_ATTENTION` reports ``sdpa``, which it runs for every forward without a packed layout."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "sdpa" if implementation == SEGMENT_ATTENTION else implementation


def use_segment_attention(model) -> None:
    """Switch an SDPA ``model`` to `segment_attention` for good: SDPA (and SDPA's masks) for every forward, the
    segments of a packed row when one passes ``packed_layout``. For good, not around one forward: activation
    checkpointing recomputes the layers in the backward, where they must find the same attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        AttentionMaskInterface.register(SEGMENT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation = SEGMENT_ATTENTION


def packed_logits(model, packed: PackedSequences, positions: Tensor, *, masked: bool = True) -> Tensor:
    """[1, len(positions), V] logits of the packed row at ``positions``, in one forward (the LM head on those
    positions only where the model takes ``logits_to_keep``). ``masked``: attention as the row's [L, L] mask allows
    (SDPA: `segment_attention`; eager: the mask); without it transformers separates the sequences by their
    position ids."""
    implementation = attention_implementation(model)
    if masked and implementation == "sdpa":
        # SDPA under the [L, L] mask computes every pair of the row; `segment_attention` only the allowed ones.
        use_segment_attention(model)
        return _logits(model, positions, input_ids=packed.input_ids, position_ids=packed.position_ids,
                       use_cache=False, packed_layout=packed.segment_layout())
    mask = None
    if masked:
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        mask = packed.attention_mask(implementation, dtype)
    return _logits(model, positions, input_ids=packed.input_ids, position_ids=packed.position_ids,
                   attention_mask=mask, use_cache=False)


def _logits(model, positions: Tensor, **inputs) -> Tensor:
    if takes_logits_to_keep(model):
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]
