"""Packed rows (`rl.common.packing`): the layout checked by brute force, and the GRPO forwards on packed rows equal
to the padded ones (log-probs, entropies, every loss metric and every parameter gradient), on real models."""

import dataclasses
import random

import pytest
import torch

from rl.common.packing import (MAX_PACKED_LENGTH, PACKING_BY_DEVICE, SegmentLayout, completion_buckets, pack_sequences,
                               packed_length, packing_units, resolve_packing, segment_attention, sft_packed)
from rl.grpo import GRPOConfig
from rl.grpo.loss import AGGREGATIONS
from rl.workers.batch import MicroBatch, packed_sequence_logprobs, sequence_logprobs


def test_layout_by_hand():
    prompts = [[1, 2, 3], [1, 2, 3], [4, 5]]
    completions = [[7, 8], [9], [6, 6, 6]]
    packed = pack_sequences(prompts, completions)
    #                 prompt 1 | seq 0 | seq 1 | prompt 2 | seq 2
    assert packed.input_ids.tolist() == [[1, 2, 3, 7, 3, 4, 5, 6, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3]]
    assert packed.label_positions.tolist() == [2, 3, 4, 6, 7, 8]
    assert packed.labels.tolist() == [7, 8, 9, 6, 6, 6]
    assert packed.rows.tolist() == [0, 0, 1, 2, 2, 2] and packed.columns.tolist() == [0, 1, 0, 0, 1, 2]
    assert (packed.num_sequences, packed.width, packed.length) == (3, 3, 9)
    assert packed_length(prompts, completions) == 9
    # Row 4 (seq 1's copy of the prompt's last token) sees the prompt's first two tokens and itself, not seq 0.
    assert packed.allowed[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert packed.allowed[8].nonzero().flatten().tolist() == [5, 6, 7, 8]


def test_units_are_runs_of_equal_prompts():
    assert packing_units([[1], [1], [2], [1], [1]]) == [[0, 1], [2], [3, 4]]


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared_prompt", "padding_free"])
@pytest.mark.parametrize("seed", range(20))
def test_every_position_sees_exactly_its_plain_prefix(seed, share_prompts):
    """Brute force: for each label position, the (token, position id) pairs it may attend to are exactly those of
    the plain ``prompt + completion`` sequence up to the predicting token, and it predicts the right label."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(rng.randint(1, 4)):
        prompt = [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        for _ in range(rng.randint(1, 4)):
            prompts.append(prompt)
            completions.append([rng.randint(1, 50) for _ in range(rng.randint(0, 5))])
    packed = pack_sequences(prompts, completions, share_prompts=share_prompts)
    ids, pos = packed.input_ids[0].tolist(), packed.position_ids[0].tolist()
    assert packed.length == packed_length(prompts, completions, share_prompts)
    if not share_prompts:
        # No mask is passed for padding_free: transformers separates the sequences where a position id does not
        # follow the previous one (transformers.masking_utils.find_packed_sequence_indices), so the mask it builds
        # must be this one.
        starts = [0] + [j for j in range(1, len(pos)) if pos[j] != pos[j - 1] + 1]
        sequence = torch.zeros(len(pos), dtype=torch.long)
        for j in starts[1:]:
            sequence[j:] += 1
        index = torch.arange(len(pos))
        implied = (index[None, :] <= index[:, None]) & (sequence[None, :] == sequence[:, None])
        assert torch.equal(implied, packed.allowed)
    k = 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        plain = p + c
        for t in range(len(c)):
            q = int(packed.label_positions[k])
            seen = sorted((pos[j], ids[j]) for j in packed.allowed[q].nonzero().flatten().tolist())
            assert seen == [(j, plain[j]) for j in range(len(p) + t)]
            assert (int(packed.labels[k]), int(packed.rows[k]), int(packed.columns[k])) == (c[t], i, t)
            k += 1
    assert k == len(packed.labels) == sum(map(len, completions))


def random_batch(rng: random.Random, vocab: int = 50):
    """1-4 prompts of 1-6 tokens (a one-token prompt has no position of its own in the row), each with 1-4
    completions of 0-5 tokens."""
    prompts, completions = [], []
    for _ in range(rng.randint(1, 4)):
        prompt = [rng.randint(1, vocab) for _ in range(rng.randint(1, 6))]
        for _ in range(rng.randint(1, 4)):
            prompts.append(prompt)
            completions.append([rng.randint(1, vocab) for _ in range(rng.randint(0, 5))])
    return prompts, completions


@pytest.mark.parametrize("call_pairs", [0, None])
@pytest.mark.parametrize("seed", range(20))
def test_segment_attention_equals_sdpa_under_the_rows_mask(seed, call_pairs):
    """`segment_attention` (the prompts in one SDPA call, the completions in buckets of similar length, only the
    allowed pairs) against SDPA over the whole row under its [L, L] mask, in float64: outputs and the gradients of
    q, k and v (grouped-query heads: 4 query heads on 2 key/value heads). ``call_pairs`` 0: calls cost nothing, so
    the completions split into many buckets; None: the default cost."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prompts, completions = random_batch(random.Random(seed))
    packed = pack_sequences(prompts, completions)
    layout = (packed.segment_layout() if call_pairs is None
              else SegmentLayout.of(packed.segment, packed.seen, call_pairs=call_pairs))
    if call_pairs == 0 and len({len(c) for c in completions if c}) > 1:
        assert len(layout.buckets) > 1
    g = torch.Generator().manual_seed(seed)
    L = packed.length
    q, k, v = (torch.randn(1, heads, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for heads in (4, 2, 2))
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    out, _ = segment_attention(module, q, k, v, None, scaling=0.3, packed_layout=layout)
    expected, _ = sdpa_attention_forward(module, q, k, v, packed.allowed[None, None], scaling=0.3)
    assert out.shape == expected.shape == (1, L, 4, 8)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("seed", range(6))
def test_segment_attention_of_a_bf16_row_on_a_cpu_attends_in_float32(seed, monkeypatch):
    """A bf16 row on a CPU attends in `CPU_ATTENTION_DTYPE` (float32): its output is the float64 masked SDPA of the
    same bf16 values rounded once to bf16 (at most one bf16 step of 2^-8 relative, plus float32 noise), and the
    gradients reach q, k and v in bf16. With the setting off (None) SDPA runs in bf16 itself, and is further off."""
    import types

    import rl.common.packing as packing
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prompts, completions = random_batch(random.Random(100 + seed))
    packed = pack_sequences(prompts, completions)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, packed.length, 64, generator=g).bfloat16().requires_grad_(True)
               for heads in (4, 2, 2))
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    expected, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), packed.allowed[None, None],
                                         scaling=0.125)
    assert packing.CPU_ATTENTION_DTYPE == torch.float32
    out, _ = segment_attention(module, q, k, v, None, scaling=0.125, packed_layout=packed.segment_layout())
    assert out.dtype == torch.bfloat16
    error = (out.double() - expected).abs()
    assert bool((error <= expected.abs() * 2.0**-8 + 1e-6).all())  # rounded once
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(grad.dtype == torch.bfloat16 and bool(grad.abs().sum() > 0) for grad in grads)
    monkeypatch.setattr(packing, "CPU_ATTENTION_DTYPE", None)
    in_bf16, _ = segment_attention(module, q, k, v, None, scaling=0.125, packed_layout=packed.segment_layout())
    assert in_bf16.dtype == torch.bfloat16
    assert float((in_bf16.detach().double() - expected).abs().max()) >= float(error.max())

def _partitions(items: list[int]):
    """Every set partition of ``items`` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


@pytest.mark.parametrize("seed", range(30))
def test_completion_buckets_are_the_cheapest_partition(seed):
    """The dynamic programme's split against every partition of 1-7 completions (brute force): the same minimum
    of padded query-key pairs plus the per-call cost, and a true partition (every completion once, each bucket in
    the original order)."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
    width, call_pairs = rng.randint(0, 30), rng.choice([0, 1, 50, 500, 5000])

    def cost(buckets):
        return sum(len(b) * max(lengths[i] for i in b) * (width + max(lengths[i] for i in b)) + call_pairs
                   for b in buckets)

    buckets = completion_buckets(lengths, width, call_pairs)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in buckets)
    assert cost(buckets) == min(cost(p) for p in _partitions(list(range(len(lengths)))))


def test_completion_buckets_by_hand():
    """Lengths 8, 2, 7, 1 after a 2-token prompt. One call: 4 x 8 x 10 = 320 pairs. Free calls: {8}, {7}, {2},
    {1} = 80 + 63 + 8 + 3 = 154 pairs. At 100 pairs a call: {8, 7} and {2, 1}: 160 + 16 + 200 = 376 < 420."""
    assert completion_buckets([8, 2, 7, 1], 2, call_pairs=10**6) == [[0, 1, 2, 3]]
    assert completion_buckets([8, 2, 7, 1], 2, call_pairs=0) == [[0], [2], [1], [3]]
    assert completion_buckets([8, 2, 7, 1], 2, call_pairs=100) == [[0, 2], [1, 3]]
    assert completion_buckets([], 5) == []


def test_segment_layout_by_hand():
    """Prompt [7, 8, 9] with completions [1, 2] and [3]; prompt [5] (no position of its own) with [4, 6]:
    row 7 8 | 9 1 | 9 | 5 4 -> prompts {0, 1}; completions {2, 3}, {4}, {5, 6}."""
    packed = pack_sequences([[7, 8, 9], [7, 8, 9], [5]], [[1, 2], [3], [4, 6]])
    assert packed.input_ids[0].tolist() == [7, 8, 9, 1, 9, 5, 4]
    layout = packed.segment_layout()
    assert layout.prompt_index.tolist() == [[0, 1]]  # the one-token prompt [5] has no segment with positions
    (bucket,) = layout.buckets  # three short completions: one SDPA call is cheaper than two
    assert bucket.query_index.tolist() == [[2, 3], [4, 0], [5, 6]]
    assert bucket.query_valid.tolist() == [[True, True], [True, False], [True, True]]
    assert bucket.key_index.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [0, 0, 5, 6]]
    T, F = True, False
    assert bucket.key_mask[:, 0].tolist() == [[[T, T, T, F], [T, T, T, T]],
                                              [[T, T, T, F], [T, T, T, T]],  # the second query is padding
                                              [[F, F, T, F], [F, F, T, T]]]  # no prompt keys
    assert layout.order.tolist() == list(range(7))


def test_errors_and_settings():
    with pytest.raises(ValueError, match="at least one token"):
        pack_sequences([[]], [[1]])
    assert resolve_packing("auto", "cpu") == PACKING_BY_DEVICE["cpu"]
    assert resolve_packing("auto", "cuda") == PACKING_BY_DEVICE["cuda"]
    assert resolve_packing("off", "cpu") == "off"
    with pytest.raises(ValueError, match="shared_prompt"):
        resolve_packing("packed", "cpu")
    assert resolve_packing("padding_free", "cuda") == "padding_free"
    # the cold start's switch follows the same per-device choice
    assert sft_packed("auto", "cpu") is (PACKING_BY_DEVICE["cpu"] != "off")
    assert sft_packed("auto", "cuda") is (PACKING_BY_DEVICE["cuda"] != "off")
    assert sft_packed("on", "cuda") and not sft_packed("off", "cpu")
    with pytest.raises(ValueError, match="auto, on, off"):
        sft_packed("yes", "cpu")
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPOConfig(prompts_per_step=2, group_size=4, mini_batch_size=6)
    assert GRPOConfig(prompts_per_step=2, group_size=4, mini_batch_size=6, packing="off").mini_batch_size == 6
    assert GRPOConfig(packing=False).packing == "off"  # YAML's bare `off`
    with pytest.raises(ValueError, match="ambiguous"):
        GRPOConfig(packing=True)
    with pytest.raises(ValueError, match="needs packing"):
        GRPOConfig(packing="off", micro_batch_tokens=512)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        GRPOConfig(micro_batch_tokens=MAX_PACKED_LENGTH + 1)


def test_minibatches_and_micro_batches_are_whole_groups():
    """The controller's cuts with packing: shuffled whole groups, micro-batches rounded up to whole groups or
    bounded by packed positions (a group longer than the budget alone); without packing, sequences."""
    from rl.grpo.trainer import GRPOTrainer
    from rl.rollout import Sample

    trainer = object.__new__(GRPOTrainer)  # only the two cutting methods, no engine or workers
    G = 4
    trainer.cfg, trainer.packing = GRPOConfig(prompts_per_step=6, group_size=G, mini_batch_size=8,
                                              micro_batch_size=6), "shared_prompt"
    minis = trainer._minibatches(6, torch.Generator().manual_seed(0))
    assert len(minis) == 3 and sorted(i for m in minis for i in m) == list(range(24))
    for m in minis:
        assert len(m) == 8 and all(m[k : k + G] == list(range(m[k], m[k] + G)) and m[k] % G == 0 for k in (0, 4))
    sample = lambda n: Sample([1, 2, 3], [5] * n, [0.0] * n, "", "stop")  # noqa: E731
    samples = [sample(n) for n in [10] * 4 + [40] * 4 + [2] * 4]  # packed lengths 42, 162, 10
    assert trainer._micro_batch_chunks(list(range(12)), samples) == [list(range(8)), list(range(8, 12))]
    trainer.cfg = GRPOConfig(prompts_per_step=6, group_size=G, micro_batch_tokens=100)
    assert trainer._micro_batch_chunks(list(range(12)), samples) == [list(range(4)), list(range(4, 8)),
                                                                     list(range(8, 12))]
    trainer.cfg = GRPOConfig(prompts_per_step=6, group_size=G, micro_batch_tokens=52)
    assert trainer._micro_batch_chunks([8, 9, 10, 11, 0, 1, 2, 3], samples) == [[8, 9, 10, 11, 0, 1, 2, 3]]
    trainer.cfg, trainer.packing = GRPOConfig(prompts_per_step=6, group_size=G, micro_batch_size=5), "off"
    assert trainer._micro_batch_chunks(list(range(12)), samples) == [list(range(5)), list(range(5, 10)), [10, 11]]
    # padding_free: sequences, not groups (each packs as 3 + n - 1 positions: 12, 42, 4)
    trainer.packing = "padding_free"
    assert trainer._micro_batch_chunks(list(range(12)), samples) == [list(range(5)), list(range(5, 10)), [10, 11]]
    trainer.cfg = GRPOConfig(prompts_per_step=6, group_size=G, mini_batch_size=6, packing="padding_free",
                             micro_batch_tokens=50)
    assert trainer._micro_batch_chunks(list(range(12)), samples) == [[0, 1, 2, 3], [4], [5], [6], [7, 8, 9], [10, 11]]
    assert sorted(len(m) for m in trainer._minibatches(6, torch.Generator().manual_seed(0))) == [6, 6, 6, 6]


# ---------------------------------------------------------------------------------------------- on real models
def groups_of_sequences(vocab: int, seed: int = 0):
    """Two groups of 3 (a different prompt each), completions of different lengths, one of them empty."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(9)] * 3 + [draw(5)] * 3
    completions = [draw(n) for n in (6, 1, 11, 0, 7, 3)]
    return prompts, completions


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("layout", ["shared_prompt", "padding_free"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_logprobs_equal_padded_on_the_tiny_model(tiny_qwen2_dir, implementation, layout):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32, attn_implementation=implementation)
    prompts, completions = groups_of_sequences(model.config.vocab_size)
    for temperature in (1.0, 0.7):
        logp, entropy, mask = sequence_logprobs(model, prompts, completions, temperature, with_entropy=True)
        p_logp, p_entropy, p_mask = packed_sequence_logprobs(model, prompts, completions, temperature,
                                                             with_entropy=True, layout=layout)
        assert torch.equal(mask, p_mask)
        assert relative(p_logp, logp) < 1e-6 and relative(p_entropy, entropy) < 1e-6
        assert (p_logp[~mask] == 0).all()


def compare_updates(worker, micro_batches, with_reference: bool) -> dict:
    """For each aggregation: the update's metrics and gradients with packing off and on (optimizer step disabled,
    clipping out of reach), and the old / reference log-probs of both layouts."""
    worker.optimizer.step = lambda: None  # the gradients stay to be read
    settings = worker.settings
    found = {}
    for packing in ("off", "shared_prompt", "padding_free"):
        worker.settings = dataclasses.replace(settings, packing=packing)
        old = worker.logprobs(micro_batches)
        ref = worker.logprobs(micro_batches, reference=True) if with_reference else [None] * len(micro_batches)
        batches = [dataclasses.replace(mb, old_logprobs=o, ref_logprobs=r) for mb, o, r in zip(micro_batches, old, ref)]
        per_aggregation = {}
        for aggregation in AGGREGATIONS:
            loss = dict(eps_low=0.2, eps_high=0.28, beta=0.05 if with_reference else 0.0, alpha=0.01,
                        aggregation=aggregation, max_response_len=16.0)
            metrics = worker.update(batches, loss)
            grads = {n: p.grad.clone() for n, p in worker.model.named_parameters() if p.grad is not None}
            per_aggregation[aggregation] = (metrics, grads)
        found[packing] = (old, ref, per_aggregation)
    worker.settings = settings
    return found


def assert_same_updates(found: dict, tolerance: float) -> None:
    for layout in ("shared_prompt", "padding_free"):
        assert_same_update(found["off"], found[layout], tolerance)


def assert_same_update(padded_run, packed_run, tolerance: float) -> None:
    (old, ref, padded), (p_old, p_ref, packed) = padded_run, packed_run
    flat = lambda xs: torch.tensor([v for mb in xs for row in mb for v in row], dtype=torch.float64)  # noqa: E731
    assert relative(flat(p_old), flat(old)) < tolerance
    if ref[0] is not None:
        assert relative(flat(p_ref), flat(ref)) < tolerance
    worst = worst_overall = 0.0
    for aggregation, (metrics, grads) in padded.items():
        p_metrics, p_grads = packed[aggregation]
        assert p_metrics.keys() == metrics.keys()
        for k in metrics:
            # kl is a difference of the policy's and the reference's log-probs, each equal to ``tolerance`` relative:
            # its error is bounded by that times |log-prob| in absolute terms, not by a fraction of the (small) kl
            bound = tolerance * float(flat(old).abs().mean()) if k == "kl" else 1e-7
            assert p_metrics[k] == pytest.approx(metrics[k], rel=tolerance, abs=bound), (aggregation, k)
        assert p_grads.keys() == grads.keys() and grads
        assert any(float(g.abs().max()) > 0 for g in grads.values())
        names = sorted(grads)
        # The whole gradient (every parameter as one vector) to ``tolerance``; each parameter's own to 10x that
        # (a parameter with a small gradient shows float32 rounding in relative terms).
        overall = relative(torch.cat([p_grads[n].flatten() for n in names]), torch.cat([grads[n].flatten() for n in names]))
        worst_overall = max(worst_overall, overall)
        worst = max([worst] + [relative(p_grads[n], grads[n]) for n in names if float(grads[n].norm()) > 1e-8])
    print(f"[packing] relative gradient difference: whole gradient {worst_overall:.2e}, worst parameter {worst:.2e}")
    assert worst_overall < tolerance and worst < 10 * tolerance


def micro_batches_of(prompts, completions) -> list[MicroBatch]:
    advantages = [1.0, -0.5, 0.3, 0.0, -1.2, 0.8]
    trained = [True, True, True, True, False, True]  # an empty completion and an excluded one
    return [MicroBatch(prompts[:3], completions[:3], advantages[:3], trained=trained[:3]),
            MicroBatch(prompts, completions, advantages, trained=trained)]


def make_worker(model_dir, lora: bool, reference: bool):
    from rl.grpo import GRPOLoraConfig
    from rl.workers import InProcessWorkerGroup, WorkerSettings

    settings = WorkerSettings(model_dir=model_dir, reference_dir=model_dir if reference and not lora else None,
                              bf16=False, max_grad_norm=1e9, learning_rate=1e-3,
                              lora=GRPOLoraConfig(enabled=True, r=4, alpha=8) if lora else None)
    group = InProcessWorkerGroup(settings)
    assert group.worker.model.config._attn_implementation == "sdpa"  # the packed path runs (no padded fallback)
    if lora:  # B starts at 0: give the adapters a delta, so that A gets gradients too
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in group.worker.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    return group


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_update_equals_padded_on_the_tiny_model(tiny_qwen2_dir, lora):
    group = make_worker(tiny_qwen2_dir, lora, reference=True)
    try:
        prompts, completions = groups_of_sequences(group.worker.model.config.vocab_size)
        found = compare_updates(group.worker, micro_batches_of(prompts, completions), with_reference=True)
    finally:
        group.shutdown()
    assert_same_updates(found, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_update_equals_padded_on_the_embedded_model(embedded_dir, lora):
    group = make_worker(embedded_dir, lora, reference=True)
    try:
        prompts, completions = groups_of_sequences(group.worker.model.config.vocab_size, seed=1)
        found = compare_updates(group.worker, micro_batches_of(prompts, completions), with_reference=True)
    finally:
        group.shutdown()
    assert_same_updates(found, 1e-5)
