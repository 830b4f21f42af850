"""Per-token entropy, KL to a reference and label log-probability, chunked over positions.

Why a custom autograd Function: with V ~ 150k, a [tokens, V] float32 temporary is
gigabytes, and plain autograd would keep the float32 softmax of every chunk alive until
backward. Here forward gathers only the valid positions and handles `chunk_size` of them
at a time; backward recomputes each chunk from the input logits (which the model keeps
alive anyway) and writes the analytic gradient. So at most one chunk of [chunk, V]
float32 temporaries exists in either direction, and the same call serves the detached
statistics (selection) and the differentiable terms (loss): one forward, not two.

It lives in `rl.common` (below both stages) because both the SFT objectives (`eksft.objectives`) and
the GRPO loss (log-probs and entropy of sampled tokens) are built on it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.common.labels import IGNORE_INDEX

DEFAULT_CHUNK_ELEMENTS = 1 << 26
"""Default chunk budget in vocabulary entries on an accelerator: 64M float32 = 256 MiB per temporary."""

CPU_CHUNK_ELEMENTS = 1 << 20
"""On a CPU: 1M float32 = 4 MiB per temporary, so that a chunk stays in the caches across its passes (log-sum-exp,
log p, p, the sums). Forward + backward on 560 x 49152 float32 logits, 2 AVX2 cores: 0.39 s in one chunk, 0.16 s
in chunks of 21 positions (benchmarks/results/token_stats_chunks_cpu-avx2.md)."""


def takes_logits_to_keep(model) -> bool:
    """Whether ``model`` (transformers' causal LMs: Llama, Qwen2, ...; PEFT and DDP wrappers of them) accepts
    ``logits_to_keep``: the LM head then runs only on the last positions, where the labels are."""
    base = model.module if hasattr(model, "module") else model  # DistributedDataParallel
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def default_chunk_size(vocab_size: int, device_type: str = "cuda") -> int:
    """Positions per chunk for `chunk_size=None` on ``device_type`` (an accelerator: 441 for V=152k, 2048 for
    V=32k; a CPU: 6 for V=152k, 21 for V=49k). The chunks' results are the same whatever their size."""
    elements = CPU_CHUNK_ELEMENTS if device_type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return max(1, elements // vocab_size)


@dataclass(frozen=True)
class TokenStats:
    """[B, T] statistics, zero where the mask is 0; `None` where the input was not given."""

    entropy: Tensor
    kl: Tensor | None
    label_logprob: Tensor | None


def _flat(logits: Tensor | None, dense: bool) -> Tensor | None:
    """[B * T, V] view of contiguous logits whose every position is valid (chunks are then slices), else None."""
    if logits is None or not dense or not logits.is_contiguous():
        return None
    return logits.view(-1, logits.shape[-1])


def _chunk(logits: Tensor, flat: Tensor | None, rows: tuple[Tensor, Tensor], sl: slice, dtype: torch.dtype) -> Tensor:
    """The [chunk, V] logits of the valid positions ``sl`` in ``dtype``: a slice of ``flat`` (read only: it is the
    logits' memory) when there is one, else a gathered copy."""
    if flat is not None:
        return flat[sl].to(dtype)
    return logits[rows[0][sl], rows[1][sl]].to(dtype)


class _TokenStatsFn(torch.autograd.Function):
    """Chunked entropy / KL / label log-prob over the positions (bi, ti) of [B, T, V] logits.

    Gradients (p = softmax(z), r = log p - log q):
      dH/dz = -p (log p + H),  dKL/dz = p (r - KL),  d log p_y/dz = onehot(y) - p.
    The reference and the labels never receive a gradient.

    Forward keeps only the per-position log-sum-exp of policy and reference (2n floats), so
    backward rebuilds log p = z - lse and log q = z_q - lse_q without another softmax, and
    folds the three gradients into p * (a log p + b (z - z_q) + c) with per-row a, b, c;
    a term whose output received no gradient costs nothing.

    When every position is valid (packed rows: the LM head ran on the label positions only) the
    chunks are views of the logits and backward writes into its output in place: no gather and no
    zero fill of [tokens, V], which is most of the memory traffic outside the LM head's matmuls.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, bi, ti, chunk_size):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        n = bi.numel()
        vocab = logits.shape[-1]
        dense = n == logits.numel() // max(vocab, 1)  # every position valid; bi, ti are then in row-major order
        flat, flat_ref = _flat(logits, dense), _flat(ref_logits, dense)
        rows = (bi, ti)
        entropy = logits.new_zeros(n, dtype=dtype)
        lse = logits.new_zeros(n, dtype=dtype)
        kl = logits.new_zeros(n, dtype=dtype) if ref_logits is not None else None
        lse_ref = logits.new_zeros(n, dtype=dtype) if ref_logits is not None else None
        label_lp = logits.new_zeros(n, dtype=dtype) if labels is not None else None
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            z = _chunk(logits, flat, rows, sl, dtype)
            lse[sl] = torch.logsumexp(z, dim=-1)
            logp = torch.sub(z, lse[sl, None])  # out of place: z may be a view of the logits
            p = logp.exp()
            entropy[sl] = -(p * logp).sum(-1)
            if kl is not None:
                logq = _chunk(ref_logits, flat_ref, rows, sl, dtype)
                lse_ref[sl] = torch.logsumexp(logq, dim=-1)
                logq = torch.sub(logq, lse_ref[sl, None])
                kl[sl] = (p * (logp - logq)).sum(-1)
            if label_lp is not None:
                label_lp[sl] = logp.gather(1, labels[sl, None]).squeeze(1)
        ctx.save_for_backward(logits, ref_logits, labels, bi, ti, entropy, kl, lse, lse_ref)
        ctx.chunk_size, ctx.dense = chunk_size, dense
        ctx.set_materialize_grads(False)
        return entropy, kl, label_lp

    @staticmethod
    def backward(ctx, g_entropy, g_kl, g_label):
        logits, ref_logits, labels, bi, ti, entropy, kl, lse, lse_ref = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        dtype = entropy.dtype
        n, vocab = bi.numel(), logits.shape[-1]
        use_h = g_entropy is not None
        use_ref = kl is not None and g_kl is not None
        use_label = g_label is not None and labels is not None
        # inner = -g_h (log p + H) + g_k (r - KL) - g_y,  r = (z - z_q) - (lse - lse_q)
        #       = -g_h log p + g_k (z - z_q) + c,     c = -g_h H - g_y - g_k (lse - lse_q + KL)
        # (z - z_q and lse - lse_q are exactly 0 when policy == reference, so is that gradient.)
        c = entropy.new_zeros(n)
        if use_h:
            c -= g_entropy * entropy
        if use_label:
            c -= g_label
        if use_ref:
            c -= g_kl * (lse - lse_ref + kl)
        rows = (bi, ti)
        flat, flat_ref = _flat(logits, ctx.dense), _flat(ref_logits if use_ref else None, ctx.dense)
        # dense: every position gets a gradient, written chunk by chunk (no zero fill)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if ctx.dense else torch.zeros_like(logits)
        grad_flat = grad.view(-1, vocab) if ctx.dense else None
        in_place = grad_flat is not None and grad.dtype == dtype  # log p is computed straight into the output
        for start in range(0, n, ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            z = _chunk(logits, flat, rows, sl, dtype)
            logp = torch.sub(z, lse[sl, None], out=grad_flat[sl]) if in_place else torch.sub(z, lse[sl, None])
            if use_h or use_ref:
                inner = logp * (-g_entropy[sl, None]) if use_h else None
                if use_ref:
                    diff = z - _chunk(ref_logits, flat_ref, rows, sl, dtype)
                    inner = diff.mul_(g_kl[sl, None]) if inner is None else inner.addcmul_(diff, g_kl[sl, None])
                g = logp.exp_().mul_(inner.add_(c[sl, None]))
            else:  # only the label log-prob: g = -g_y p + g_y onehot(y)
                g = logp.exp_().mul_(c[sl, None])
            if use_label:
                g.scatter_add_(1, labels[sl, None], g_label[sl, None])
            if ctx.dense:
                if not in_place:
                    grad_flat[sl] = g
            else:
                grad[bi[sl], ti[sl]] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def token_statistics(
    logits: Tensor,
    mask: Tensor,
    ref_logits: Tensor | None = None,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
) -> TokenStats:
    """Entropy, KL(policy || reference) and log p(label) at the positions where `mask` is 1.

    logits, ref_logits: [B, T, V], any float dtype; computed in float32 (float64 inputs stay
    float64). labels: [B, T], aligned with logits, valid wherever mask is 1. Outputs keep
    the graph to `logits` when it requires grad (detach them for selection); the reference
    is always a constant. Logits are assumed finite.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    batch, length, vocab = logits.shape
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be [B, T] = {(batch, length)}, got {tuple(mask.shape)}")
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits shape {tuple(logits.shape)}")
    if labels is not None and labels.shape != mask.shape:
        raise ValueError(f"labels must be [B, T] = {(batch, length)}, got {tuple(labels.shape)}")
    chunk = default_chunk_size(vocab, logits.device.type) if chunk_size is None else chunk_size
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    bi, ti = mask.bool().nonzero(as_tuple=True)
    ref = ref_logits.detach() if ref_logits is not None else None
    valid_labels = labels[bi, ti] if labels is not None else None
    entropy, kl, label_lp = _TokenStatsFn.apply(logits, ref, valid_labels, bi, ti, chunk)

    def to_grid(values: Tensor | None) -> Tensor | None:
        if values is None:
            return None
        return values.new_zeros(batch, length).index_put((bi, ti), values)

    return TokenStats(to_grid(entropy), to_grid(kl), to_grid(label_lp))


def token_entropy_and_kl(
    logits: Tensor, ref_logits: Tensor | None, mask: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-position policy entropy and KL(policy || reference), [B, T], zero where mask is 0.

    Keeps the graph to `logits` when it requires grad; callers detach for selection.
    `kl` is None when `ref_logits` is None. See `token_statistics` for dtypes and chunking.
    """
    stats = token_statistics(logits, mask, ref_logits=ref_logits, chunk_size=chunk_size)
    return stats.entropy, stats.kl


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over mask == 1 (0 when the mask is empty), detached."""
    mask = mask.bool()
    return (torch.where(mask, values.detach(), 0).sum() / mask.sum().clamp(min=1)).to(torch.float32)


def response_metrics(stats: TokenStats, mask: Tensor) -> dict[str, Tensor]:
    """Exploration metrics over all response tokens: mean entropy, and mean KL when known."""
    metrics = {"entropy_mean": masked_mean(stats.entropy, mask)}
    if stats.kl is not None:
        metrics["kl_mean"] = masked_mean(stats.kl, mask)
    return metrics
