"""Exactness tests of eksft.objectives: statistics, selection, losses, config, registry."""

from __future__ import annotations

import ast
import graphlib
import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import TypeAdapter, ValidationError

from eksft.objectives import (
    OBJECTIVES,
    DFTSettings,
    EKSFTSettings,
    LossParts,
    ObjectiveConfig,
    ObjectiveSettings,
    SFTSettings,
    dft_loss,
    eksft_loss,
    get_objective,
    objective_names,
    register,
    select_masked_tokens,
    selection_decided_by_ties,
    sft_loss,
    token_entropy_and_kl,
    token_statistics,
    tokens_to_select,
)
import eksft.objectives as objectives_package
from eksft.objectives.registry import settings_union

IGNORE = -100


def direct_stats(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor):
    """Float64, unchunked reference computation."""
    logp = torch.log_softmax(logits.double(), -1)
    logq = torch.log_softmax(ref_logits.double(), -1)
    entropy = -(logp.exp() * logp).sum(-1) * mask
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return entropy, kl


def positions(selected: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(p) for p in selected.nonzero().tolist()}


# --- hand-built example -------------------------------------------------------------------
# One sequence, T=12, V=4: positions 0-1 prompt (uniform logits: maximal entropy, and a
# reference far away: huge KL), 2-11 response (n=10, ratio 0.2 -> k=2). Policy logits at
# a response position are [s, 0, 0, 0]: entropy strictly decreases with s >= 0. The
# reference equals the policy except at positions 6 and 9, so only they have KL > 0.
S = [5.0, 0.5, 3.0, 1.0, 4.0, 2.0, 6.0, 0.0, 7.0, 2.5]  # positions 2..11


def hand_example():
    logits = torch.zeros(1, 12, 4, dtype=torch.float64)
    logits[0, 2:, 0] = torch.tensor(S, dtype=torch.float64)
    ref = logits.clone()
    ref[0, :2] = torch.tensor([0.0, 0.0, 0.0, 30.0])
    ref[0, 6] = torch.tensor([0.0, 0.0, 0.0, 4.0])
    ref[0, 9] = torch.tensor([0.0, 4.0, 0.0, 0.0])
    labels = torch.tensor([[IGNORE, IGNORE, 0, 1, 0, 2, 0, 3, 0, 1, 0, 0]])
    return logits, ref, labels


def test_hand_built_removed_set_union_and_intersection():
    logits, ref, labels = hand_example()
    mask = labels != IGNORE
    entropy, kl = token_entropy_and_kl(logits, ref, mask)
    # smallest s = largest entropy: s=0 at position 9, s=0.5 at position 3
    removed, s_h, s_kl = select_masked_tokens(entropy, kl, mask, 0.2)
    assert positions(s_h) == {(0, 9), (0, 3)}
    assert positions(s_kl) == {(0, 6), (0, 9)}
    assert positions(removed) == {(0, 3), (0, 6), (0, 9)}
    removed_i, _, _ = select_masked_tokens(entropy, kl, mask, 0.2, combine="intersection")
    assert positions(removed_i) == {(0, 9)}

    config = EKSFTSettings(ratio=0.2, lambda_entropy=0.1, lambda_kl=0.3)
    loss, metrics = eksft_loss(logits, labels, ref, config)
    kept = [t for t in range(2, 12) if t not in (3, 6, 9)]
    logp = torch.log_softmax(logits[0], -1)
    ce = -sum(logp[t, labels[0, t]] for t in kept) / len(kept)
    bonus = 0.1 * (entropy[0, 9] + entropy[0, 3]) / 2 / math.log(4)
    kl_term = 0.3 * (kl[0, 6] + kl[0, 9]) / 2
    torch.testing.assert_close(loss, ce - bonus + kl_term, rtol=1e-12, atol=0)
    assert metrics["tokens_trained"].item() == 7
    assert metrics["removed_fraction"].item() == pytest.approx(0.3)
    assert metrics["iou_entropy_kl"].item() == pytest.approx(1 / 3)
    assert metrics["kl_ties"].item() == 0.0
    assert metrics["entropy_bonus"].item() == pytest.approx(bonus.item())
    assert metrics["kl_term"].item() == pytest.approx(kl_term.item())


def test_hand_built_smallest():
    logits, ref, labels = hand_example()
    mask = labels != IGNORE
    entropy, kl = token_entropy_and_kl(logits, ref, mask)
    _, s_h, s_kl = select_masked_tokens(entropy, kl, mask, 0.2, largest_entropy=False, largest_kl=False)
    assert positions(s_h) == {(0, 10), (0, 8)}  # s = 7 and s = 6
    # KL is exactly 0 on eight positions: the tie goes to the two earliest response tokens
    assert positions(s_kl) == {(0, 2), (0, 3)}
    assert selection_decided_by_ties(kl, s_kl, mask)
    assert not selection_decided_by_ties(entropy, s_h, mask)


# --- selection ----------------------------------------------------------------------------


def test_tie_break_prefers_earlier_position():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0]])
    mask = torch.ones_like(values, dtype=torch.bool)
    _, largest, smallest = select_masked_tokens(values, values, mask, 1 / 3, largest_kl=False)
    assert positions(largest) == {(0, 1), (0, 2)}
    assert positions(smallest) == {(0, 0), (0, 5)}
    _, smallest3, _ = select_masked_tokens(values, values, mask, 0.5, largest_entropy=False)
    assert positions(smallest3) == {(0, 0), (0, 5), (0, 3)}
    flat = torch.zeros(1, 6)
    _, first, _ = select_masked_tokens(flat, flat, mask, 0.5)
    assert positions(first) == {(0, 0), (0, 1), (0, 2)}


def test_largest_vs_smallest_are_disjoint_ends():
    values = torch.tensor([[0.4, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.5, 0.0]])
    mask = torch.ones_like(values, dtype=torch.bool)
    _, top, bottom = select_masked_tokens(values, values, mask, 0.3, largest_kl=False)
    assert positions(top) == {(0, 1), (0, 5), (0, 3)}
    assert positions(bottom) == {(0, 9), (0, 2), (0, 6)}


def test_prompt_and_padding_never_selected():
    torch.manual_seed(0)
    batch, length, vocab = 2, 10, 8
    logits = torch.randn(batch, length, vocab) * 3
    ref = torch.randn(batch, length, vocab) * 3
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :3] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # right padding
    invalid = labels == IGNORE
    logits[invalid] = 0.0  # uniform: the largest possible entropy
    ref[invalid] = torch.tensor([50.0] + [0.0] * (vocab - 1))  # huge KL
    mask = ~invalid
    entropy, kl = token_entropy_and_kl(logits, ref, mask)
    assert torch.all(entropy[invalid] == 0) and torch.all(kl[invalid] == 0)
    for scope in ("sequence", "batch"):
        for ratio in (0.2, 0.5, 1.0):
            removed, s_h, s_kl = select_masked_tokens(
                torch.where(mask, entropy, 1e9), torch.where(mask, kl, 1e9), mask, ratio, scope=scope
            )
            assert not (removed | s_h | s_kl)[invalid].any()
    removed, _, _ = select_masked_tokens(entropy, kl, mask, 1.0)
    assert torch.equal(removed, mask)


def test_batch_and_sequence_scope_agree_at_batch_size_one():
    torch.manual_seed(1)
    entropy, kl = torch.rand(1, 17), torch.rand(1, 17)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, :4] = False
    for ratio in (0.1, 0.2, 0.5, 0.9):
        seq = select_masked_tokens(entropy, kl, mask, ratio, scope="sequence")
        bat = select_masked_tokens(entropy, kl, mask, ratio, scope="batch")
        assert all(torch.equal(a, b) for a, b in zip(seq, bat))


def test_batch_scope_differs_from_sequence_scope():
    entropy = torch.tensor([[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    _, seq, _ = select_masked_tokens(entropy, entropy, mask, 0.5, scope="sequence")
    _, bat, _ = select_masked_tokens(entropy, entropy, mask, 0.5, scope="batch")
    assert positions(seq) == {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert positions(bat) == {(0, 0), (0, 1), (0, 2), (0, 3)}


@pytest.mark.parametrize(
    ("ratio", "n", "k"),
    [(0.2, 10, 2), (0.3, 10, 3), (0.29, 100, 29), (0.57, 100, 57), (0.7, 10, 7), (1e-7, 10**7, 1), (0.0, 5, 0), (1.0, 5, 5), (0.2, 4, 0)],
)
def test_tokens_to_select_is_exact_floor(ratio, n, k):
    assert tokens_to_select(ratio, torch.tensor([n])).item() == k


def test_selection_decided_by_ties():
    mask = torch.ones(2, 5, dtype=torch.bool)
    zeros = torch.zeros(2, 5)
    _, _, s_kl = select_masked_tokens(zeros, zeros, mask, 0.4)
    assert selection_decided_by_ties(zeros, s_kl, mask)
    distinct = torch.arange(10.0).reshape(2, 5)
    _, _, s_kl = select_masked_tokens(distinct, distinct, mask, 0.4)
    assert not selection_decided_by_ties(distinct, s_kl, mask)
    # a tie only inside the selected set does not decide anything
    inner_tie = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0]])
    _, _, s_kl = select_masked_tokens(inner_tie, inner_tie, mask[:1], 0.4)
    assert not selection_decided_by_ties(inner_tie, s_kl, mask[:1])
    _, _, s_kl = select_masked_tokens(zeros[:1], zeros[:1], mask[:1], 0.1)  # k == 0
    assert not selection_decided_by_ties(zeros[:1], s_kl, mask[:1])


# --- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_statistics_match_float64(dtype):
    torch.manual_seed(2)
    logits = (torch.randn(3, 7, 33) * 2).to(dtype)
    ref = (torch.randn(3, 7, 33) * 2).to(dtype)
    mask = torch.rand(3, 7) > 0.3
    n_valid = int(mask.sum())
    expected_h, expected_kl = direct_stats(logits, ref, mask)
    for chunk in (1, 2, 4, 7, n_valid - 1, n_valid, 1000, None):
        entropy, kl = token_entropy_and_kl(logits, ref, mask, chunk_size=chunk)
        assert entropy.dtype == torch.float32 and kl.dtype == torch.float32
        torch.testing.assert_close(entropy.double(), expected_h, rtol=1e-5, atol=0)
        torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-5, atol=0)
        assert torch.all(entropy[~mask] == 0) and torch.all(kl[~mask] == 0)


def test_statistics_gradient_matches_autograd_and_is_chunk_independent():
    torch.manual_seed(3)
    logits64 = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 6, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 6))
    mask = torch.rand(2, 6) > 0.25
    weights = torch.randn(3, 2, 6, dtype=torch.float64)

    def objective(stats):
        return (weights[0] * stats.entropy + weights[1] * stats.kl + weights[2] * stats.label_logprob).sum()

    torch.autograd.gradcheck(
        lambda z: objective(token_statistics(z, mask, ref, labels, chunk_size=4)), (logits64,)
    )
    logp = torch.log_softmax(logits64, -1)
    direct = (
        weights[0] * -(logp.exp() * logp).sum(-1)
        + weights[1] * (logp.exp() * (logp - torch.log_softmax(ref, -1))).sum(-1)
        + weights[2] * logp.gather(-1, labels[..., None]).squeeze(-1)
    )
    (expected,) = torch.autograd.grad((direct * mask).sum(), logits64)
    for chunk in (1, 3, 5, None):
        logits32 = logits64.detach().float().requires_grad_()
        objective(token_statistics(logits32, mask, ref.float(), labels, chunk_size=chunk)).backward()
        torch.testing.assert_close(logits32.grad.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("terms", ["hky", "y", "hy", "k", "h", "ky"])
@pytest.mark.parametrize("layout", ["masked", "every_position", "every_position_shifted_view", "every_position_bf16"])
def test_statistics_gradient_of_each_term_and_layout(terms, layout):
    """Backward skips the terms whose output got no gradient, and when every position is valid it reads the logits
    in place and writes its output chunk by chunk: each against float64 autograd of the direct formulas."""
    torch.manual_seed(5)
    full = torch.randn(3, 8, 13, dtype=torch.float64) * 2
    ref = torch.randn(3, 7, 13, dtype=torch.float64) * 2
    labels = torch.randint(0, 13, (3, 7))
    mask = torch.rand(3, 7) > 0.3 if layout == "masked" else torch.ones(3, 7, dtype=torch.bool)
    weights = torch.randn(3, 3, 7, dtype=torch.float64)
    dtype = torch.bfloat16 if layout.endswith("bf16") else torch.float32
    start = full.to(dtype).double()  # what the statistics see, in float64

    def objective(stats):
        parts = {"h": weights[0] * stats.entropy, "k": weights[1] * stats.kl, "y": weights[2] * stats.label_logprob}
        return sum(parts[t] for t in terms).sum()

    expected_leaf = start.clone().requires_grad_()
    logp = torch.log_softmax(expected_leaf[:, :-1], -1)
    direct = {"h": weights[0] * -(logp.exp() * logp).sum(-1),
              "k": weights[1] * (logp.exp() * (logp - torch.log_softmax(ref, -1))).sum(-1),
              "y": weights[2] * logp.gather(-1, labels[..., None]).squeeze(-1)}
    (expected,) = torch.autograd.grad((sum(direct[t] for t in terms) * mask).sum(), expected_leaf)
    for chunk in (2, 5, None):
        shifted = layout in ("masked", "every_position_shifted_view")  # the causal shift: a non-contiguous view
        leaf = full.to(dtype) if shifted else full[:, :-1].to(dtype).contiguous()
        leaf.requires_grad_()
        logits = leaf[:, :-1] if shifted else leaf
        objective(token_statistics(logits, mask, ref.to(dtype), labels, chunk_size=chunk)).backward()
        grad = leaf.grad[:, :-1] if shifted else leaf.grad
        assert grad.dtype == dtype
        tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(grad.double(), expected[:, :-1], **tolerance)
        assert torch.all(grad[~mask] == 0)
        if shifted:
            assert torch.all(leaf.grad[:, -1] == 0)


def test_statistics_detached_input_and_reference_constant():
    logits = torch.randn(1, 4, 5)
    ref = torch.randn(1, 4, 5, requires_grad=True)
    entropy, kl = token_entropy_and_kl(logits, ref, torch.ones(1, 4))
    assert not entropy.requires_grad and not kl.requires_grad
    leaf = logits.clone().requires_grad_()
    _, kl = token_entropy_and_kl(leaf, ref, torch.ones(1, 4))
    kl.sum().backward()
    assert ref.grad is None and leaf.grad is not None
    entropy, kl = token_entropy_and_kl(logits, None, torch.ones(1, 4))
    assert kl is None


def test_non_contiguous_logits_from_shift():
    torch.manual_seed(4)
    full = torch.randn(2, 8, 6, requires_grad=True)
    logits = full[:, :-1]  # the usual causal shift: a non-contiguous view
    ref = torch.randn(2, 7, 6)
    labels = torch.randint(0, 6, (2, 7))
    loss, _ = eksft_loss(logits, labels, ref, EKSFTSettings(ratio=0.3, chunk_size=3))
    loss.backward()
    expected_full = full.detach().clone().requires_grad_()
    expected, _ = eksft_loss(expected_full[:, :-1].contiguous(), labels, ref, EKSFTSettings(ratio=0.3))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(full.grad, expected_full.grad)
    assert torch.all(full.grad[:, -1] == 0)


# --- losses -------------------------------------------------------------------------------


def settings_of(name: str, **common) -> ObjectiveSettings:
    """The named objective's settings; EKSFT at ratio 0.3, so that it removes tokens."""
    return get_objective(name).settings(**common, **({"ratio": 0.3} if name == "eksft" else {}))


def random_batch(seed: int, batch=3, length=9, vocab=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=generator) * 2).to(dtype)
    ref = (torch.randn(batch, length, vocab, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :2] = IGNORE
    labels[-1, -3:] = IGNORE
    return logits.requires_grad_(), ref, labels


def test_ratio_with_k_zero_is_plain_sft_exactly():
    logits, ref, labels = random_batch(5)
    config = EKSFTSettings(ratio=0.1)  # at most 7 valid tokens per row: k = 0
    loss, metrics = eksft_loss(logits, labels, ref, config)
    (grad,) = torch.autograd.grad(loss, logits)
    plain, _ = sft_loss(logits, labels)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    assert torch.equal(loss, plain)
    assert torch.equal(grad, plain_grad)
    assert metrics["removed_fraction"].item() == 0 and metrics["entropy_bonus"].item() == 0
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    token_mean, _ = sft_loss(logits, labels, config=SFTSettings(aggregation="token-mean"))
    torch.testing.assert_close(token_mean, expected, rtol=1e-12, atol=0)
    per_seq = [torch.nn.functional.cross_entropy(logits[b], labels[b], ignore_index=IGNORE) for b in range(len(labels))]
    torch.testing.assert_close(plain, torch.stack(per_seq).mean(), rtol=1e-12, atol=0)


def test_cross_entropy_gradient_is_zero_on_removed_tokens():
    logits, ref, labels = random_batch(6)
    config = EKSFTSettings(ratio=0.4)
    mask = labels != IGNORE
    parts = get_objective("eksft").parts(logits, labels, ref, config)
    parts.terms["ce"].value().backward()
    entropy, kl = token_entropy_and_kl(logits.detach(), ref, mask)
    removed, _, _ = select_masked_tokens(entropy, kl, mask, 0.4)
    assert removed.any()
    assert torch.all(logits.grad[removed] == 0)
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask & ~removed].abs().sum(-1) > 0)


def test_cross_entropy_gradient_is_zero_on_removed_tokens_tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
    )
    model = transformers.Qwen2ForCausalLM(config)
    input_ids = torch.randint(0, 64, (2, 12))
    logits = model(input_ids=input_ids).logits[:, :-1]
    logits.retain_grad()
    labels = input_ids[:, 1:].clone()
    labels[:, :3] = IGNORE
    ref = logits.detach() + torch.randn_like(logits)
    parts = get_objective("eksft").parts(logits, labels, ref, EKSFTSettings(ratio=0.3))
    parts.terms["ce"].value().backward()
    mask = labels != IGNORE
    entropy, kl = token_entropy_and_kl(logits.detach(), ref, mask)
    removed, _, _ = select_masked_tokens(entropy, kl, mask, 0.3)
    assert removed.any()
    assert torch.all(logits.grad[removed] == 0)
    assert torch.all(logits.grad[mask & ~removed].abs().sum(-1) > 0)


def test_kl_term_and_gradient_zero_when_policy_equals_reference():
    logits, _, labels = random_batch(8, dtype=torch.float32)
    ref = logits.detach().clone()
    parts = get_objective("eksft").parts(logits, labels, ref, EKSFTSettings())
    kl_value = parts.terms["kl"].value()
    assert kl_value.item() == 0
    (grad,) = torch.autograd.grad(kl_value, logits)
    assert torch.all(grad == 0)
    assert parts.metrics["kl_ties"].item() == 1.0
    assert parts.metrics["kl_mean"].item() == 0


def test_dft_matches_float64_hand_computation():
    logits, _, labels = random_batch(9, dtype=torch.float32)
    loss, metrics = dft_loss(logits, labels, config=DFTSettings(aggregation="token-mean"))
    total, count = 0.0, 0
    z = logits.detach().double()
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE:
                continue
            p_y = torch.softmax(z[b, t], -1)[labels[b, t]].item()
            total += -p_y * math.log(p_y)
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # gradient: that of sg(p_y) * CE
    logits64 = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(logits64, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    mask = labels != IGNORE
    expected = (-(logp.detach().exp() * logp) * mask).sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, logits64)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert metrics["ce"].item() > metrics["loss"].item()


def brute_force_eksft(logits, ref, labels, config: EKSFTSettings) -> torch.Tensor:
    """Independent float64 EKSFT: Python loops over tokens, sorting by (value, position)."""
    batch, length, vocab = logits.shape
    entropy, kl, nll = {}, {}, {}
    for b in range(batch):
        for t in range(length):
            if labels[b, t] == IGNORE:
                continue
            p = torch.softmax(logits[b, t].double(), -1)
            q = torch.softmax(ref[b, t].double(), -1)
            entropy[b, t] = -(p * p.log()).sum()
            kl[b, t] = (p * (p.log() - q.log())).sum()
            nll[b, t] = -p[labels[b, t]].log()
    scopes = [[(b, t) for t in range(length) if (b, t) in nll] for b in range(batch)]
    if config.scope == "batch":
        scopes = [[pos for scope in scopes for pos in scope]]
    s_h, s_kl = set(), set()
    for scope in scopes:
        k = math.floor(Fraction(str(config.ratio)) * len(scope))
        for stat, largest, out in ((entropy, config.largest_entropy, s_h), (kl, config.largest_kl, s_kl)):
            sign = -1 if largest else 1
            ordered = sorted(scope, key=lambda pos: (sign * stat[pos].item(), pos))
            out.update(ordered[:k])
    removed = s_h | s_kl if config.combine == "union" else s_h & s_kl

    def formula(positions):
        kept = [pos for pos in positions if pos not in removed]
        h_set = [pos for pos in positions if pos in s_h]
        kl_set = [pos for pos in positions if pos in s_kl]
        loss = sum(nll[pos] for pos in kept) / max(len(kept), 1)
        if h_set:
            loss = loss - config.lambda_entropy * sum(entropy[pos] for pos in h_set) / len(h_set) / math.log(vocab)
        if kl_set:
            loss = loss + config.lambda_kl * sum(kl[pos] for pos in kl_set) / len(kl_set)
        return loss

    if config.aggregation == "token-mean":
        return formula(list(nll))
    rows = [[pos for pos in nll if pos[0] == b] for b in range(batch)]
    return sum(formula(row) for row in rows) / batch


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"combine": "intersection", "ratio": 0.5},
        {"largest_entropy": False, "largest_kl": False, "ratio": 0.3},
        {"scope": "batch", "ratio": 0.25, "lambda_entropy": 0.5, "lambda_kl": 0.7},
        {"scope": "batch", "combine": "intersection", "largest_kl": False, "ratio": 0.6},
        {"ratio": 1.0},
        {"aggregation": "token-mean"},
        {"aggregation": "token-mean", "combine": "intersection", "ratio": 0.5},
        {"aggregation": "token-mean", "scope": "batch", "ratio": 0.25, "lambda_entropy": 0.5, "lambda_kl": 0.7},
    ],
)
def test_eksft_matches_brute_force(settings):
    config = EKSFTSettings(chunk_size=5, **settings)
    for seed in (10, 11):
        logits, ref, labels = random_batch(seed)
        loss, _ = eksft_loss(logits, labels, ref, config)
        expected = brute_force_eksft(logits, ref, labels, config)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(loss, logits)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
        loss32, _ = eksft_loss(logits.detach().float(), labels, ref.float(), config)
        assert loss32.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["sft", "eksft", "dft"])
def test_loss_parts_global_counts_over_halves_equal_full_batch(name):
    logits, ref, labels = random_batch(12, batch=4)
    objective = get_objective(name)
    config = settings_of(name, aggregation="token-mean")
    full = objective.parts(logits, labels, ref, config)
    halves = [objective.parts(logits[i : i + 2], labels[i : i + 2], ref[i : i + 2], config) for i in (0, 2)]
    total = LossParts.total_counts(halves)
    assert total.keys() == full.counts().keys()
    assert all(torch.equal(total[key], full.counts()[key]) for key in total)
    accumulated = sum(part.reduce(total) for part in halves)
    torch.testing.assert_close(accumulated, full.reduce(), rtol=1e-12, atol=1e-14)
    (grad_acc,) = torch.autograd.grad(accumulated, logits)
    (grad_full,) = torch.autograd.grad(full.reduce(), logits)
    torch.testing.assert_close(grad_acc, grad_full, rtol=1e-12, atol=1e-14)
    loss, metrics = objective(logits, labels, ref, config, counts=total)
    torch.testing.assert_close(loss, full.reduce())
    assert metrics["loss"].item() == pytest.approx(full.reduce().item())


def test_metrics_are_detached_scalars():
    logits, ref, labels = random_batch(13)
    for name in OBJECTIVES:
        _, metrics = get_objective(name)(logits, labels, ref, get_objective(name).settings())
        assert {"ce", "entropy_mean", "kl_mean", "tokens_trained", "loss"} <= metrics.keys()
        for value in metrics.values():
            assert value.dim() == 0 and not value.requires_grad
    _, metrics = sft_loss(logits, labels)
    assert "kl_mean" not in metrics
    _, metrics = eksft_loss(logits, labels, ref)
    expected = {"entropy_bonus", "kl_term", "removed_fraction", "iou_entropy_kl", "kl_ties"}
    assert expected <= metrics.keys()


# --- config and registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"ratio": 1.5}, "ratio", "[0, 1]"),
        ({"ratio": -0.1}, "ratio", "[0, 1]"),
        ({"ratio": float("nan")}, "ratio", "[0, 1]"),
        ({"combine": "xor"}, "combine", "union"),
        ({"scope": "global"}, "scope", "sequence"),
        ({"lambda": 0.1}, "lambda", "Extra inputs are not permitted"),
        ({"chunk_size": 0}, "chunk_size", "greater than 0"),
        ({"lambda_kl": float("inf")}, "lambda_kl", "finite"),
    ],
)
def test_config_errors_name_the_field(kwargs, field, text):
    with pytest.raises(ValidationError) as info:
        EKSFTSettings(**kwargs)
    (error,) = info.value.errors()
    assert error["loc"] == (field,)
    assert text in error["msg"]
    assert field in str(info.value)


def test_config_defaults_are_the_paper_recipes_eksft_arm():
    """The defaults are the authors' settings, which recipes/paper_qwen3_8b.yaml spells out key by key."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "paper_qwen3_8b.yaml").read_text())
    (spelled_out,) = [arm["objective"] for arm in recipe["arms"] if arm["name"] == "eksft"]
    assert len(spelled_out) > 1
    assert TypeAdapter(ObjectiveConfig).validate_python(spelled_out) == EKSFTSettings()


@pytest.mark.parametrize("name", objective_names())
def test_every_objective_validates_from_its_name_alone(name):
    """The union picks the named objective's own settings class, with that class's defaults."""
    settings = TypeAdapter(ObjectiveConfig).validate_python({"name": name})
    objective = get_objective(name)
    assert type(settings) is objective.settings and settings == objective.settings()
    assert settings.name == name
    logits, ref, labels = random_batch(15)
    loss, _ = objective(logits, labels, ref, settings)
    assert torch.isfinite(loss)


def test_settings_of_another_objective_are_refused():
    """Each objective reads only its own settings: EKSFT's ratio handed to `sft` is an error, not ignored."""
    with pytest.raises(ValidationError, match="ratio") as info:
        TypeAdapter(ObjectiveConfig).validate_python({"name": "sft", "ratio": 0.3})
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    logits, ref, labels = random_batch(16)
    with pytest.raises(TypeError, match="objective 'sft' takes SFTSettings, got EKSFTSettings"):
        get_objective("sft")(logits, labels, ref, EKSFTSettings(ratio=0.3))


def test_a_new_objective_is_one_registration():
    """Registering a settings class with its parts function is all the union and the registry need."""

    class HalfSettings(ObjectiveSettings):
        name: Literal["half-ce"] = "half-ce"
        factor: float = 0.5

    def half_parts(logits, labels, ref_logits, config):
        parts = get_objective("sft").parts(logits, labels, None, SFTSettings(aggregation=config.aggregation))
        return LossParts({"ce": replace(parts.terms["ce"], weight=config.factor)}, {}, config.aggregation)

    register(HalfSettings, needs_reference=False)(half_parts)
    try:
        settings = TypeAdapter(settings_union()).validate_python({"name": "half-ce", "factor": 0.25})
        assert isinstance(settings, HalfSettings) and "half-ce" in objective_names()
        logits, _, labels = random_batch(17)
        loss, _ = get_objective("half-ce")(logits, labels, None, settings)
        torch.testing.assert_close(loss, 0.25 * sft_loss(logits, labels)[0])
    finally:
        del OBJECTIVES["half-ce"]


def test_no_objectives_module_imports_one_that_imports_it_back():
    """The registry knows settings only through their base class; objectives import the registry, never back."""
    package = Path(objectives_package.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eksft.objectives"):
                names.add(node.module.removeprefix("eksft.objectives").lstrip(".") or "__init__")
        imports[path.stem] = names
    assert all("__init__" not in names for names in imports.values())  # no module goes through the package
    order = list(graphlib.TopologicalSorter(imports).static_order())  # raises CycleError on a cycle
    assert order.index("registry") < order.index("eksft") < order.index("catalog") < order.index("__init__")


def test_registry():
    assert {"sft", "eksft", "dft"} <= OBJECTIVES.keys()
    assert get_objective("eksft").needs_reference
    assert not get_objective("sft").needs_reference and not get_objective("dft").needs_reference
    with pytest.raises(KeyError, match="registered: dft, eksft, sft"):
        get_objective("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(SFTSettings, needs_reference=False)(lambda *args: None)
    logits, _, labels = random_batch(14)
    with pytest.raises(ValueError, match="needs reference logits"):
        eksft_loss(logits, labels, None)


@pytest.mark.parametrize("name", ["sft", "eksft", "dft"])
def test_sequence_mean_needs_no_global_counts_for_accumulation(name):
    """Default aggregation: micro-batch losses weighted by their share of sequences add up to the full batch."""
    logits, ref, labels = random_batch(14, batch=4)
    objective = get_objective(name)
    config = settings_of(name)
    full, _ = objective(logits, labels, ref, config)
    accumulated = sum(objective(logits[i : i + 1], labels[i : i + 1], ref[i : i + 1], config)[0] / 4 for i in range(4))
    torch.testing.assert_close(accumulated, full, rtol=1e-12, atol=1e-14)
    (grad_acc,) = torch.autograd.grad(accumulated, logits)
    (grad_full,) = torch.autograd.grad(full, logits)
    torch.testing.assert_close(grad_acc, grad_full, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="token-mean only"):
        objective.parts(logits, labels, ref, config).reduce(objective.parts(logits, labels, ref, config).counts())
