"""GRPO math (rl.grpo): advantages, dynamic sampling, k3 KL, clipped loss, aggregations,
global normalisation, masks, mini-batches and GRPOConfig, against hand-computed values
and independent float64 loop implementations."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError

from rl.grpo.config import GRPOConfig
from rl.grpo.core import (
    AGGREGATIONS,
    FillStats,
    aggregate,
    dynamic_sampling_filter,
    fill_groups,
    group_advantages,
    kl_k3,
    loss_has_gradient,
    mask_truncated,
    minibatches,
    policy_loss,
    valid_counts,
    zero_variance_groups,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_example() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # unbiased: sum of 4 * 0.25 over (4 - 1)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-6)
    torch.testing.assert_close(adv, expected)
    assert adv[0, 0].item() == pytest.approx(0.866025, abs=1e-5)
    assert adv.dtype == torch.float32


def test_group_advantages_eps_and_no_std() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 0.0, 2.0]], dtype=torch.float64)
    adv = group_advantages(rewards, normalize_std=False)
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0, 2.0, -2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-15)
    # Large eps: the denominator really is std + eps.
    adv = group_advantages(rewards, eps=1.0)
    std0 = statistics.stdev([1.0, 0.0, 0.0, 0.0])
    assert adv[0, 0].item() == pytest.approx(0.75 / (std0 + 1.0), rel=1e-12)


def test_group_advantages_matches_float64_loop() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(7, 6, generator=g, dtype=torch.float64)
    rewards[2] = 0.3  # a constant row
    adv = group_advantages(rewards, eps=1e-6)
    for i, row in enumerate(rewards.tolist()):
        mean = sum(row) / len(row)
        sd = statistics.stdev(row)  # sample (n - 1) std, independent of torch
        for j, r in enumerate(row):
            want = 0.0 if sd == 0 else (r - mean) / (sd + 1e-6)
            assert adv[i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_zero_variance_groups_get_exact_zero_and_are_detected() -> None:
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    zv = zero_variance_groups(rewards)
    assert zv.dtype == torch.bool
    assert zv.tolist() == [True, True, True, False]
    for normalize_std in (True, False):
        adv = group_advantages(rewards, normalize_std=normalize_std)
        assert (adv[:3] == 0).all()  # exactly 0, not rounding noise
        assert (adv[3] != 0).all()
        assert torch.isfinite(adv).all()


def test_group_of_size_one_has_zero_advantage() -> None:
    rewards = torch.tensor([[1.0], [0.0]])
    assert zero_variance_groups(rewards).tolist() == [True, True]
    for normalize_std in (True, False):
        adv = group_advantages(rewards, normalize_std=normalize_std)
        assert adv.tolist() == [[0.0], [0.0]]


def test_group_advantages_rejects_bad_shapes_and_int_input() -> None:
    with pytest.raises(ValueError, match="num_groups, G"):
        group_advantages(torch.tensor([1.0, 0.0]))
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32
    assert adv[0, 0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)


# ---------------------------------------------------------------- dynamic sampling


@dataclass
class _Group:
    prompt: str
    rewards: list[float]


def test_dynamic_sampling_filter_keeps_nonzero_variance() -> None:
    groups = [_Group("a", [1, 1]), _Group("b", [0, 1]), _Group("c", [0, 0, 0]), _Group("d", [0.5, 0.5, 1]), _Group("e", [1])]
    kept, index = dynamic_sampling_filter(groups)
    assert [g.prompt for g in kept] == ["b", "d"]
    assert index == [1, 3]
    # Plain reward lists work, and a custom accessor.
    kept, index = dynamic_sampling_filter([[1, 1], [1, 0]])
    assert kept == [[1, 0]] and index == [1]
    kept, _ = dynamic_sampling_filter([("x", [0, 1]), ("y", [0, 0])], rewards_of=lambda g: g[1])
    assert kept == [("x", [0, 1])]


def _counting_batches(batches: list[list[_Group]], pulled: list[int]):
    for i, b in enumerate(batches):
        pulled.append(i)
        yield b


def test_fill_groups_refills_and_stops_at_target() -> None:
    batches = [
        [_Group("a", [1, 1]), _Group("b", [0, 1]), _Group("c", [0, 0])],
        [_Group("d", [1, 0]), _Group("e", [1, 1]), _Group("f", [0, 1]), _Group("g", [1, 0])],
        [_Group("h", [1, 0])],  # must never be generated
    ]
    pulled: list[int] = []
    kept, stats = fill_groups(_counting_batches(batches, pulled), target_groups=3, max_rounds=5)
    assert [g.prompt for g in kept] == ["b", "d", "f"]
    assert pulled == [0, 1]
    assert stats == FillStats(
        rounds=2, num_candidates=7, num_zero_variance=3, num_surplus=1, num_kept=3, reached_target=True, exhausted=False
    )
    assert stats.kept_fraction == pytest.approx(4 / 7)
    assert stats.as_dict()["num_kept"] == 3.0


def test_fill_groups_stops_at_max_rounds() -> None:
    def endless():
        k = 0
        while True:
            k += 1
            yield [_Group(f"z{k}", [0, 0]), _Group(f"v{k}", [0, 1]) if k == 2 else _Group(f"o{k}", [1, 1])]

    kept, stats = fill_groups(endless(), target_groups=4, max_rounds=3)
    assert [g.prompt for g in kept] == ["v2"]
    assert (stats.rounds, stats.num_candidates, stats.num_zero_variance, stats.num_kept) == (3, 6, 5, 1)
    assert not stats.reached_target and not stats.exhausted and stats.num_surplus == 0


def test_fill_groups_exhausted_iterator_and_bad_args() -> None:
    kept, stats = fill_groups(iter([[[0, 1], [1, 1]]]), target_groups=2, max_rounds=None)
    assert kept == [[0, 1]]
    assert stats.exhausted and not stats.reached_target and stats.rounds == 1
    kept, stats = fill_groups([], target_groups=1, max_rounds=3)
    assert kept == [] and stats.rounds == 0 and stats.exhausted and stats.kept_fraction == 0.0
    with pytest.raises(ValueError, match="target_groups"):
        fill_groups([], target_groups=0, max_rounds=1)
    with pytest.raises(ValueError, match="max_rounds"):
        fill_groups([], target_groups=1, max_rounds=0)


# ---------------------------------------------------------------- k3 KL


def test_kl_k3_hand_values() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5, 0.0])
    ref = torch.tensor([-2.0, -1.0, -0.5, -100.0])
    k3 = kl_k3(logp, ref)
    # x = ref - logp: -1 -> e^-1 + 1 - 1; 1 -> e - 2; 0 -> 0; -100 clamped to -20 -> e^-20 + 19
    expected = torch.tensor([math.exp(-1), math.e - 2, 0.0, math.exp(-20) + 19])
    torch.testing.assert_close(k3, expected)
    assert k3[2].item() == 0.0


def test_kl_k3_nonnegative_and_zero_on_equal() -> None:
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(1000, generator=g) * 5
    assert (kl_k3(logp, logp) == 0).all()
    for scale in (1e-8, 5e-8, 1e-6, 1e-3, 1.0, 30.0):
        ref = logp + scale * torch.randn(1000, generator=g)
        assert (kl_k3(logp, ref) >= 0).all()
    # Tiny log-ratios where exp(x) - x - 1 in float32 would round below 0.
    x = torch.full((4,), 5e-8)
    assert (kl_k3(torch.zeros(4), x) >= 0).all() and (kl_k3(torch.zeros(4), -x) >= 0).all()


# ---------------------------------------------------------------- policy loss: hand examples


def test_ratio_one_gives_minus_token_mean_advantage() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    loss, m = policy_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1 + 1 + 1 - 2) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]]))
    assert m["clip_fraction"].item() == 0.0
    assert m["ratio_mean"].item() == 1.0 and m["approx_kl"].item() == 0.0
    assert m["num_tokens"].item() == 4 and m["num_seqs"].item() == 2
    assert m["pg_loss"].item() == pytest.approx(loss.item())
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert "kl" not in m and "entropy" not in m


def test_clipping_branches_and_clip_fractions() -> None:
    # One sequence, five tokens, eps = 0.2 both sides:
    #   A=+1 rho=1.5 -> clipped (high): -1.2    A=+1 rho=0.5 -> unclipped: -0.5
    #   A=-1 rho=1.5 -> unclipped: 1.5          A=-1 rho=0.5 -> clipped (low): 0.8
    #   A=+1 rho=1.1 -> inside the range: -1.1
    rho = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    old = torch.full_like(rho, -1.0)
    logp = (old + rho.log()).requires_grad_(True)
    mask = torch.ones_like(rho, dtype=torch.bool)
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 1.1) / 5, abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(2 / 5)
    assert m["clip_fraction_low"].item() == pytest.approx(1 / 5)
    assert m["clip_fraction_high"].item() == pytest.approx(1 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5)
    assert m["ratio_min"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    # d/dlogp of -A rho = -A rho; clipped tokens have zero gradient.
    expected = torch.tensor([[0.0, -0.5, 1.5, 0.0, -1.1]], dtype=torch.float64) / 5
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-12)
    # approx_kl = mean k3 of KL(old || new) = mean(rho - 1 - log rho)
    want = sum(r - 1 - math.log(r) for r in rho[0].tolist()) / 5
    assert m["approx_kl"].item() == pytest.approx(want, rel=1e-6)


def test_asymmetric_clip_higher() -> None:
    rho = torch.tensor([[1.25, 0.75]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros_like(rho)
    mask = torch.ones_like(rho)
    # Symmetric 0.2: both clipped -> (-1.2 + 0.8) / 2
    loss, m = policy_loss(rho.log(), old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert (m["clip_fraction_high"].item(), m["clip_fraction_low"].item()) == (0.5, 0.5)
    # Clip-higher 0.28: 1.25 is inside [0.8, 1.28], 0.75 still clipped low.
    loss, m = policy_loss(rho.log(), old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert (m["clip_fraction_high"].item(), m["clip_fraction_low"].item()) == (0.0, 0.5)
    # Wider low side only: 0.75 inside [0.7, 1.2], 1.25 clipped high.
    loss, m = policy_loss(rho.log(), old, adv, mask, eps_low=0.3, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.75) / 2)
    assert (m["clip_fraction_high"].item(), m["clip_fraction_low"].item()) == (0.5, 0.0)


def _ragged():
    # Per-token losses (rho = 1, loss = -A): seq0 [1,2,3,4], seq1 [5,6,-,-], seq2 [7,-,-,-], seq3 empty.
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    token_loss = torch.tensor([[1.0, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    adv = torch.where(mask, -token_loss, torch.full_like(token_loss, 1e9))  # garbage where masked
    logp = torch.where(mask, torch.full_like(token_loss, -1.0), torch.full_like(token_loss, float("nan")))
    old = torch.where(mask, torch.full_like(token_loss, -1.0), torch.full_like(token_loss, float("inf")))
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "aggregation,expected",
    [
        ("token-mean", 28 / 7),
        ("seq-mean-token-mean", (10 / 4 + 11 / 2 + 7 / 1) / 3),
        ("seq-mean-token-sum-norm", (10 / 8 + 11 / 8 + 7 / 8) / 3),
    ],
)
def test_aggregations_ragged_hand_example(aggregation: str, expected: float) -> None:
    logp, old, adv, mask = _ragged()
    logp.requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, aggregation=aggregation, max_response_len=8)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["pg_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert m["num_seqs"].item() == 3 and m["num_tokens"].item() == 7
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()


def test_sum_norm_needs_max_response_len_and_bad_aggregation() -> None:
    logp, old, adv, mask = _ragged()
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(logp, old, adv, mask, aggregation="sum")  # type: ignore[arg-type]


def test_all_masked_gives_zero_not_nan() -> None:
    z = torch.zeros(2, 3, requires_grad=True)
    for agg in AGGREGATIONS:
        loss, m = policy_loss(z, z.detach(), torch.ones(2), torch.zeros(2, 3), aggregation=agg, max_response_len=3)
        assert loss.item() == 0.0 and torch.isfinite(torch.stack(list(m.values()))).all()
        assert m["ratio_min"].item() == 1.0


def test_bad_inputs_are_rejected() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.ones(2), x, beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(x, x, torch.ones(2), x, alpha=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.ones(3), x)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(x, torch.zeros(2, 4), torch.ones(2), x)


def test_beta_and_alpha_terms_add_exactly_under_token_mean() -> None:
    g = torch.Generator().manual_seed(2)
    n, t = 4, 6
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) > 0.3
    beta, alpha = 0.05, 0.01
    base, _ = policy_loss(logp, old, adv, mask)
    full, m = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, entropy=ent, alpha=alpha)
    k3 = [
        math.exp(r - lp) - (r - lp) - 1
        for lp, r, v in zip(logp.flatten().tolist(), ref.flatten().tolist(), mask.flatten().tolist())
        if v
    ]
    h = [e for e, v in zip(ent.flatten().tolist(), mask.flatten().tolist()) if v]
    mean_k3, mean_h = sum(k3) / len(k3), sum(h) / len(h)
    assert full.item() - base.item() == pytest.approx(beta * mean_k3 - alpha * mean_h, rel=1e-10, abs=1e-14)
    assert m["kl"].item() == pytest.approx(mean_k3, rel=1e-6)
    assert m["entropy"].item() == pytest.approx(mean_h, rel=1e-6)
    assert m["pg_loss"].item() == pytest.approx(base.item(), rel=1e-6)
    # ref_logp given with beta = 0: reported, not added.
    same, m0 = policy_loss(logp, old, adv, mask, ref_logp=ref)
    assert same.item() == base.item() and m0["kl"].item() == pytest.approx(mean_k3, rel=1e-6)


# ---------------------------------------------------------------- independent float64 loop reference


def _loop_loss(logp, old, adv, mask, ref, ent, *, eps_low, eps_high, beta, alpha, aggregation, max_len):
    """Token-by-token float64 implementation of docs/method.md, GRPO loss (autograd on scalars)."""
    n, t = len(mask), len(mask[0])
    seq_values, all_tokens = [], []
    for i in range(n):
        toks = []
        for j in range(t):
            if not mask[i][j]:
                continue
            a = adv[i] if adv.dim() == 1 else adv[i, j]
            rho = torch.exp(logp[i, j] - old[i, j])
            clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            term = -torch.minimum(rho * a, clipped * a)
            x = ref[i, j] - logp[i, j]
            term = term + beta * (torch.exp(x) - x - 1) - alpha * ent[i, j]
            toks.append(term)
        all_tokens.extend(toks)
        if toks:
            s = sum(toks)
            seq_values.append(s / len(toks) if aggregation == "seq-mean-token-mean" else s / max_len)
    if aggregation == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    return sum(seq_values) / len(seq_values)


def _random_batch(seed: int, n: int = 5, t: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + 0.4 * torch.randn(n, t, generator=g)  # plenty of rho outside [0.8, 1.28]
    ref = logp + 0.5 * torch.randn(n, t, generator=g)
    ent = torch.rand(n, t, generator=g) * 2
    adv = torch.randn(n, generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = 0  # an empty row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return [x.to(dtype) for x in (logp, old, adv, ref, ent)] + [mask]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_loss_and_gradient_match_float64_loop(aggregation: str, per_token_adv: bool) -> None:
    logp, old, adv, ref, ent, mask = _random_batch(3)
    if per_token_adv:
        adv = adv[:, None] + 0.1 * torch.arange(logp.shape[1])[None, :]
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, alpha=0.01)
    lp32 = logp.clone().requires_grad_(True)
    en32 = ent.clone().requires_grad_(True)
    loss, m = policy_loss(
        lp32, old, adv, mask, ref_logp=ref, entropy=en32, aggregation=aggregation, max_response_len=9, **kw
    )
    loss.backward()
    lp64 = logp.double().requires_grad_(True)
    en64 = ent.double().requires_grad_(True)
    ref_loss = _loop_loss(
        lp64, old.double(), adv.double(), mask.tolist(), ref.double(), en64,
        aggregation=aggregation, max_len=9.0, **kw,
    )  # fmt: skip
    ref_loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(en32.grad.double(), en64.grad, rtol=1e-5, atol=1e-7)
    assert 0 < m["clip_fraction"].item() < 1  # the example exercises clipping
    # float64 input stays float64 and matches tightly.
    lp = logp.double().requires_grad_(True)
    loss64, _ = policy_loss(
        lp, old.double(), adv.double(), mask, ref_logp=ref.double(), entropy=ent.double(),
        aggregation=aggregation, max_response_len=9, **kw,
    )  # fmt: skip
    loss64.backward()
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(lp.grad, lp64.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- global normalisation


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_global_counts_micro_batches_sum_to_full_batch(aggregation: str) -> None:
    logp, old, adv, ref, ent, mask = _random_batch(4, n=6, t=5, dtype=torch.float64)
    kw = dict(ref_logp=ref, beta=0.1, entropy=ent, alpha=0.02, aggregation=aggregation, max_response_len=5, eps_high=0.28)
    full_lp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, old, adv, mask, **kw)
    full.backward()

    parts = [slice(0, 2), slice(2, 6)]  # uneven micro-batches; row 1 (empty) sits in the first
    counts = [valid_counts(mask[s]) for s in parts]
    num_tokens = sum(c[0] for c in counts)
    num_seqs = sum(c[1] for c in counts)
    assert (num_tokens, num_seqs) == valid_counts(mask)
    assert num_seqs == 5  # the empty row is not counted
    lp = logp.clone().requires_grad_(True)
    total = 0.0
    for s in parts:
        kws = {**kw, "ref_logp": ref[s], "entropy": ent[s]}
        part, _ = policy_loss(lp[s], old[s], adv[s], mask[s], num_tokens=num_tokens, num_seqs=num_seqs, **kws)
        part.backward()  # gradient accumulation
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(lp.grad, full_lp.grad, rtol=1e-12, atol=1e-14)

    # Local normalisation of the halves is NOT the full batch (the reason for the counts).
    local = sum(policy_loss(logp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s], "entropy": ent[s]})[0].item() for s in parts)
    assert local != pytest.approx(full.item(), rel=1e-6)


def test_aggregate_global_counts_direct() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "token-mean", num_tokens=10).item() == pytest.approx(1.0)
    assert aggregate(values, mask, "seq-mean-token-mean", num_seqs=4).item() == pytest.approx((2 + 4) / 4)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_response_len=2, num_seqs=1).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(values, mask, "token-mean", num_tokens=-1)


# ---------------------------------------------------------------- which losses have a gradient


ADVANTAGE_CASES = {  # (advantages, trained) of 3 sequences
    "all zero": ([0.0, 0.0, 0.0], [True, True, True]),
    "minus zero": ([-0.0, 0.0, -0.0], [True, True, True]),
    "one non-zero": ([0.0, 0.7, 0.0], [True, True, True]),
    "non-zero but untrained": ([0.0, 0.7, 0.0], [True, False, True]),
    "nothing trained": ([1.0, -1.0, 0.5], [False, False, False]),
    "negative": ([-0.3, 0.0, 0.0], [True, True, True]),
}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("beta, alpha", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.05)])
@pytest.mark.parametrize("case", list(ADVANTAGE_CASES))
@pytest.mark.parametrize("on_policy", [True, False], ids=["rho=1", "rho!=1"])
def test_loss_has_gradient_exactly_when_autograd_finds_one(case, beta, alpha, aggregation, on_policy) -> None:
    """The backward of `policy_loss` in float64, with a gradient flowing to log-probs and entropy: where
    `loss_has_gradient` says no, every gradient is exactly 0 (its backward can be skipped); where it says yes
    (every trained sequence here has valid tokens, and rho = 1 or near it clips nothing), some is not."""
    advantages, trained = ADVANTAGE_CASES[case]
    gen = torch.Generator().manual_seed(5)
    logp = (-torch.rand(3, 4, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = logp.detach() if on_policy else logp.detach() + 0.05 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    ref = logp.detach() - 0.3 * torch.rand(3, 4, generator=gen, dtype=torch.float64)
    entropy = (torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    lengths = torch.tensor([4, 2, 3])
    mask = (torch.arange(4)[None] < lengths[:, None]) & torch.tensor(trained)[:, None]
    loss, _ = policy_loss(logp, old, torch.tensor(advantages, dtype=torch.float64), mask, ref_logp=ref, beta=beta,
                          entropy=entropy, alpha=alpha, aggregation=aggregation, max_response_len=4.0,
                          num_tokens=9.0, num_seqs=3.0)
    loss.backward()
    nonzero = any(bool(t.grad.ne(0).any()) for t in (logp, entropy) if t.grad is not None)
    expected = loss_has_gradient(advantages, trained, beta=beta, alpha=alpha)
    assert nonzero == (expected and any(trained)), (case, beta, alpha)


def test_loss_has_gradient_counts_a_nan_advantage_and_checks_lengths() -> None:
    assert loss_has_gradient([0.0, float("nan")], [True, True])
    assert not loss_has_gradient([], [])
    with pytest.raises(ValueError):
        loss_has_gradient([0.0, 1.0], [True])


# ---------------------------------------------------------------- masks and mini-batches


def test_mask_truncated() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    trunc = torch.tensor([False, True, False])
    out = mask_truncated(mask, trunc)
    assert out.dtype == torch.bool
    assert out.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert mask[1].all()  # input untouched
    fmask = mask.float()
    fout = mask_truncated(fmask, trunc)
    assert fout.dtype == torch.float32 and fout.tolist() == out.float().tolist()
    assert valid_counts(out) == (3.0, 2.0)
    with pytest.raises(ValueError, match="truncated"):
        mask_truncated(mask, torch.tensor([True]))


def test_minibatches_cover_each_index_once_and_are_deterministic() -> None:
    n = 10
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    epochs1 = [minibatches(n, 3, g1) for _ in range(3)]
    epochs2 = [minibatches(n, 3, g2) for _ in range(3)]
    for e1, e2 in zip(epochs1, epochs2):
        assert [len(b) for b in e1] == [3, 3, 3, 1]
        assert sorted(torch.cat(e1).tolist()) == list(range(n))
        assert all(b.dtype == torch.long for b in e1)
        assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    assert not torch.equal(torch.cat(epochs1[0]), torch.cat(epochs1[1]))  # new permutation per epoch
    assert [b.tolist() for b in minibatches(5, 2, None)] == [[0, 1], [2, 3], [4]]
    whole = minibatches(6, None, torch.Generator().manual_seed(0))
    assert len(whole) == 1 and sorted(whole[0].tolist()) == list(range(6))
    assert minibatches(0, 4, None) == []
    with pytest.raises(ValueError, match="mini_batch_size"):
        minibatches(4, 0, None)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"eps_low": 0.1, "eps_high": 0.28, "beta_kl": 0.04, "alpha_entropy": 0.01, "aggregation": "seq-mean-token-mean"},
        {"eps_high": 0.3, "beta_kl": 0.5, "alpha_entropy": 0.2, "aggregation": "seq-mean-token-sum-norm", "max_new_tokens": 9},
    ],
)
def test_each_recipe_loss_setting_reaches_the_loss_the_trainer_computes(settings: dict) -> None:
    """The trainer calls ``policy_loss(..., **cfg.policy_loss_kwargs())``: the loss equals the float64 loop
    with each recipe key in the place its name says."""
    cfg = GRPOConfig(**settings)
    logp, old, adv, ref, ent, mask = (x.double() if x.is_floating_point() else x for x in _random_batch(5, n=16, t=12))
    loss, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, **cfg.policy_loss_kwargs())
    expected = _loop_loss(
        logp, old, adv, mask.tolist(), ref, ent, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta_kl,
        alpha=cfg.alpha_entropy, aggregation=cfg.aggregation, max_len=cfg.max_new_tokens,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    "field,value",
    [
        ("group_size", 1),
        ("temperature", 0.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("eps_low", -0.1),
        ("eps_low", 1.0),
        ("eps_high", -0.01),
        ("beta_kl", -1.0),
        ("alpha_entropy", -1.0),
        ("aggregation", "sum"),
        ("max_sampling_rounds", 0),
        ("ppo_epochs", 0),
        ("mini_batch_size", 0),
        ("micro_batch_size", 0),
        ("learning_rate", 0.0),
        ("weight_decay", -0.1),
        ("max_grad_norm", 0.0),
        ("adam_betas", (0.9, 1.0)),
        ("prompts_per_step", 0),
        ("steps", 0),
        ("save_every", 0),
        ("seed", -1),
        ("format_weight", -0.5),
        ("reward_timeout_s", 0.0),
        ("answer_fallback", "first_number"),
    ],
)
def test_grpo_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        GRPOConfig(**{field: value})
    assert field in str(err.value)
    c = GRPOConfig()
    with pytest.raises(ValidationError) as err:  # assignment is validated too
        setattr(c, field, value)
    assert field in str(err.value)


def test_grpo_config_messages_and_extra_keys() -> None:
    with pytest.raises(ValidationError, match=r"group_size must be >= 2.*compares the completions"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValidationError, match="grop_size"):
        GRPOConfig(grop_size=4)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="mini_batch_size"):
        GRPOConfig(prompts_per_step=2, group_size=4, mini_batch_size=9)
    assert GRPOConfig(prompts_per_step=2, group_size=4, mini_batch_size=8).mini_batch_size == 8


# ---------------------------------------------------------------- length buckets (completion_logprobs)


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_partition_and_bound_padding(seed):
    from rl.grpo.logprobs import length_buckets

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 97, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
    buckets = length_buckets(lengths, max_padding=0.2)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))  # each sample exactly once
    longest = [max(lengths[i] for i in b) for b in buckets]
    assert longest == sorted(longest, reverse=True)  # longest first
    for b in buckets:
        padded, real = len(b) * max(lengths[i] for i in b), sum(lengths[i] for i in b)
        if len(b) > 1:
            assert padded - real <= 0.2 * padded + 1e-9, (b, [lengths[i] for i in b])
    # Greedy: the next bucket's longest sample would have broken the bound of the previous bucket.
    for prev, nxt in zip(buckets, buckets[1:]):
        padded = (len(prev) + 1) * max(lengths[i] for i in prev)
        assert padded - (sum(lengths[i] for i in prev) + lengths[nxt[0]]) > 0.2 * padded - 1e-9


def test_length_buckets_by_hand():
    from rl.grpo.logprobs import length_buckets

    assert length_buckets([20, 22, 96, 21, 40, 0, 19, 45]) == [[2], [7, 4], [1, 3, 0, 6], [5]]
    assert length_buckets([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    assert length_buckets([3]) == [[0]]
