"""The FSDP2 trainer worker group on CPU (gloo, real Ray actors): N=2 ranks give the update one rank gives."""

import resource
import sys
from pathlib import Path

import pytest
import torch

from rl.grpo.loss import AGGREGATIONS
from rl.workers import MicroBatch, WorkerGroup, WorkerSettings, split_across_ranks
from rl.workers.batch import unsplit

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 4  # N=1 runs all four, each of N=2 ranks runs two


def test_split_across_ranks_pads_short_ranks_and_unsplit_restores_order():
    mbs = [MicroBatch([[1]], [[i] * (i + 1)], [0.0], ref_logprobs=[[0.0] * (i + 1)]) for i in range(5)]
    shares = split_across_ranks(mbs, 2)
    assert [len(s) for s in shares] == [3, 3]
    assert shares[1][2].trained == [False] and shares[1][2].counts() == (0, 0)
    assert shares[1][2].ref_logprobs is not None and shares[1][2].old_logprobs is None  # same fields as the rest
    per_rank = [[[mb.completion_ids[0]] for mb in share] for share in shares]
    assert unsplit(per_rank, len(mbs)) == [mb.completion_ids[0] for mb in mbs]


def synthetic_micro_batches(seed: int) -> list[MicroBatch]:
    """Groups of 2 completions per prompt, ragged lengths (one empty, one excluded as truncated), fixed
    advantages; old log-probs come later (the policy's, perturbed so that rho != 1 and clipping happens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(MICRO_BATCHES):
        prompts = [torch.randint(0, 300, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(2)]
        lengths = torch.randint(1, 10, (4,), generator=gen).tolist()
        if m == 1:
            lengths[3] = 0
        completions = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lengths]
        advantages = torch.randn(4, generator=gen).tolist()
        trained = [not (m == 2 and i == 0) for i in range(4)]
        out.append(MicroBatch([prompts[i // 2] for i in range(4)], completions, advantages, trained=trained))
    return out


def with_logprobs(mbs, old, ref, seed):
    gen = torch.Generator().manual_seed(seed)
    flat_old = [[x + 0.3 * float(torch.randn(1, generator=gen)) for x in row] for row in old]
    out, k = [], 0
    for mb in mbs:
        n = len(mb)
        out.append(MicroBatch(mb.prompt_ids, mb.completion_ids, mb.advantages, flat_old[k:k + n],
                              None if ref is None else ref[k:k + n], mb.trained))
        k += n
    return out


@pytest.fixture(scope="module")
def reference_dir(tiny_qwen2_dir, tmp_path_factory):
    """A reference that differs from the policy, so that the k3 term has a gradient from the first step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("reference")
    model.save_pretrained(path)
    return str(path)


def relative_difference(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||b||."""
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def differences(after_two: dict, after_one: dict, start: dict) -> tuple[float, float]:
    """(parameters, update = after - start): max relative difference of N=2's to N=1's."""
    update_two = {k: after_two[k] - start[k] for k in start}
    update_one = {k: after_one[k] - start[k] for k in start}
    return relative_difference(after_two, after_one), relative_difference(update_two, update_one)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_ranks_update_like_one_for_each_aggregation_with_and_without_kl(ray_cluster, tiny_qwen2_dir,
                                                                           reference_dir):
    """One GRPO update from the same start (fresh weights and AdamW each time), for each of the 3 aggregations
    with the k3 KL term off and on (sharded reference), on one rank (all 4 micro-batches) and on two (2 each):
    the parameters agree to 1e-5 relative in float32. Then: storage per rank at N=2 <= 0.55x N=1."""
    settings = WorkerSettings(model_dir=tiny_qwen2_dir, reference_dir=reference_dir, bf16=False,
                              learning_rate=1e-3, temperature=0.9, max_grad_norm=1.0)
    one = WorkerGroup(settings, 1, num_cpus=0.5, call_timeout_s=300)
    two = WorkerGroup(settings, 2, num_cpus=0.5, call_timeout_s=300)
    try:
        start = one.full_state_dict()
        assert relative_difference(two.full_state_dict(), start) == 0.0
        assert_same_tensors(two.module_state_dict(), one.module_state_dict())  # rank 1 got its shards from rank 0
        for case, (aggregation, beta) in enumerate((a, b) for a in AGGREGATIONS for b in (0.0, 0.1)):
            if case:
                one.load_models()
                two.load_models()
            mbs = synthetic_micro_batches(seed=case)
            old = one.logprobs(mbs)
            ref_one, ref_two = one.logprobs(mbs, reference=True), two.logprobs(mbs, reference=True)
            assert max(abs(a - b) for r1, r2 in zip(ref_one, ref_two) for a, b in zip(r1, r2)) < 1e-5
            mbs = with_logprobs(mbs, old, ref_one, seed=100 + case)
            loss = dict(aggregation=aggregation, beta=beta, eps_low=0.2, eps_high=0.28, max_response_len=12.0)
            m1, m2 = one.update(mbs, loss), two.update(mbs, loss)
            params, update = differences(two.full_state_dict(), one.full_state_dict(), start)
            print(f"[workers] {aggregation} beta={beta}: loss {m1['loss']:.6f} / {m2['loss']:.6f}, grad_norm "
                  f"{m1['grad_norm']:.6f} / {m2['grad_norm']:.6f}, clip_fraction {m1['clip_fraction']:.3f}, "
                  f"kl {m1['kl']:.4f}, tokens {m1['num_tokens']:.0f}/{m2['num_tokens']:.0f}, seqs "
                  f"{m1['num_seqs']:.0f}/{m2['num_seqs']:.0f}; max relative difference: parameters {params:.2e}, "
                  f"update {update:.2e}")
            assert (m1["num_tokens"], m1["num_seqs"]) == (m2["num_tokens"], m2["num_seqs"])
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
            assert params <= 1e-5

        sizes_one, sizes_two = one.local_storage_bytes(), two.local_storage_bytes()
        total_one = sum(sizes_one[0].values())
        ratios = [sum(s.values()) / total_one for s in sizes_two]
        print(f"[workers] bytes of parameters + gradients + AdamW state: N=1 {sizes_one[0]}, N=2 {sizes_two}; "
              f"ratios {[f'{r:.3f}' for r in ratios]}")
        assert all(s["optimizer"] > 0 and s["gradients"] > 0 for s in sizes_one + sizes_two)
        assert max(ratios) <= 0.55
    finally:
        one.shutdown()
        two.shutdown()


@pytest.mark.slow
def test_micro_batches_without_gradient_skip_their_backward_and_the_update_is_unchanged(ray_cluster, tiny_qwen2_dir):
    """Two ranks with ``skip_zero_gradient`` on and two with it off, from the same start, AdamW with weight decay.
    Update 1: micro-batches 0, 2, 3 have advantages 0 (rank 0 holds 0 and 2, rank 1 holds 1 and 3), so at index 0
    the ranks disagree and both run the backward, at index 1 both skip it. Update 2: every advantage is 0, no
    backward anywhere, and AdamW still decays the weights. The parameters are bitwise those of the full backward."""
    common = dict(model_dir=tiny_qwen2_dir, bf16=False, learning_rate=1e-3, weight_decay=0.1, temperature=0.9)
    skip = WorkerGroup(WorkerSettings(**common), 2, num_cpus=0.5, call_timeout_s=300)
    full = WorkerGroup(WorkerSettings(**common, skip_zero_gradient=False), 2, num_cpus=0.5, call_timeout_s=300)
    loss = dict(aggregation="token-mean", beta=0.0, eps_low=0.2, eps_high=0.28, max_response_len=12.0)

    def with_advantages(mbs, zero):
        return [MicroBatch(mb.prompt_ids, mb.completion_ids, [0.0] * len(mb) if i in zero else mb.advantages,
                           mb.old_logprobs, None, mb.trained) for i, mb in enumerate(mbs)]

    try:
        start = full.full_state_dict()
        mbs = synthetic_micro_batches(seed=7)
        mbs = with_logprobs(mbs, full.logprobs(mbs), None, seed=8)
        for zero, skipped in (({0, 2, 3}, 0.5), ({0, 1, 2, 3}, 1.0)):
            batch = with_advantages(mbs, zero)
            m_skip, m_full = skip.update(batch, loss), full.update(batch, loss)
            print(f"[workers] zero-advantage micro-batches {sorted(zero)}: skipped_backward {m_skip['skipped_backward']}"
                  f" / {m_full['skipped_backward']}, loss {m_skip['loss']:.6f} / {m_full['loss']:.6f}, grad_norm "
                  f"{m_skip['grad_norm']:.6f} / {m_full['grad_norm']:.6f}")
            assert (m_skip["skipped_backward"], m_full["skipped_backward"]) == (skipped, 0.0)
            for k, v in m_full.items():
                if k != "skipped_backward":
                    assert m_skip[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
            assert_same_tensors(skip.full_state_dict(), full.full_state_dict())
        after = full.full_state_dict()
        assert relative_difference(after, start) > 0  # the updates changed the weights (decay at least)
    finally:
        skip.shutdown()
        full.shutdown()


@pytest.mark.slow
def test_forwards_without_backward_between_backwards_on_one_fsdp_rank(ray_cluster, tiny_qwen2_dir):
    """One rank with bf16 compute (FSDP2 over one rank): skipped micro-batches first, between backwards and last
    leave the parameters bitwise those of the full backward."""
    common = dict(model_dir=tiny_qwen2_dir, bf16=True, learning_rate=1e-3, weight_decay=0.1, temperature=0.9)
    skip = WorkerGroup(WorkerSettings(**common), 1, num_cpus=0.5, call_timeout_s=300)
    full = WorkerGroup(WorkerSettings(**common, skip_zero_gradient=False), 1, num_cpus=0.5, call_timeout_s=300)
    loss = dict(aggregation="seq-mean-token-mean", beta=0.0, eps_low=0.2, eps_high=0.2)
    try:
        mbs = synthetic_micro_batches(seed=9)
        for zero in ({0, 2}, {1, 3}):
            batch = [MicroBatch(mb.prompt_ids, mb.completion_ids, [0.0] * len(mb) if i in zero else mb.advantages,
                                trained=mb.trained) for i, mb in enumerate(mbs)]
            m_skip, m_full = skip.update(batch, loss), full.update(batch, loss)
            assert (m_skip["skipped_backward"], m_full["skipped_backward"]) == (0.5, 0.0)
            assert m_skip["grad_norm"] == m_full["grad_norm"] > 0
            assert_same_tensors(skip.full_state_dict(), full.full_state_dict())
    finally:
        skip.shutdown()
        full.shutdown()


@pytest.mark.slow
def test_activation_checkpointing_at_two_ranks_updates_like_one_rank_without_it(ray_cluster, tiny_qwen2_dir,
                                                                               reference_dir):
    """rl.activation_checkpointing recomputes each decoder layer in the backward: the same parameters after an
    update (N=2 with it vs N=1 without, KL on) to 1e-5 relative in float32."""
    common = dict(model_dir=tiny_qwen2_dir, reference_dir=reference_dir, bf16=False, learning_rate=1e-3)
    one = WorkerGroup(WorkerSettings(**common), 1, num_cpus=0.5, call_timeout_s=300)
    two = WorkerGroup(WorkerSettings(**common, activation_checkpointing=True), 2, num_cpus=0.5, call_timeout_s=300)
    try:
        start = one.full_state_dict()
        mbs = synthetic_micro_batches(seed=7)
        mbs = with_logprobs(mbs, one.logprobs(mbs), one.logprobs(mbs, reference=True), seed=107)
        loss = dict(aggregation="seq-mean-token-mean", beta=0.1, eps_low=0.2, eps_high=0.28)
        m1, m2 = one.update(mbs, loss), two.update(mbs, loss)
        after_one = one.full_state_dict()
        params, update = differences(two.full_state_dict(), after_one, start)
        print(f"[workers] activation checkpointing, N=2 vs N=1 without: grad_norm {m1['grad_norm']:.6f} / "
              f"{m2['grad_norm']:.6f}; max relative difference parameters {params:.2e}, update {update:.2e}")
        assert any(not torch.equal(after_one[k], start[k]) for k in start)  # the update moved the weights
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
        assert params <= 1e-5  # the update itself differs by ~1e-5: AdamW's first step is ~lr * sign(gradient)
    finally:
        one.shutdown()
        two.shutdown()


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_and_the_hf_export_loads_identically(ray_cluster, tiny_qwen2_dir,
                                                                               tmp_path):
    """N=2: update, save (torch.distributed.checkpoint), update again; then a fresh start that loads the
    checkpoint and makes the second update lands on the same parameters, bit for bit. The consolidated HF
    directory rank 0 writes loads in transformers with the same weights."""
    from transformers import AutoModelForCausalLM

    settings = WorkerSettings(model_dir=tiny_qwen2_dir, bf16=False, learning_rate=1e-3)
    loss = dict(aggregation="token-mean", eps_low=0.2, eps_high=0.28)
    two = WorkerGroup(settings, 2, num_cpus=0.5, call_timeout_s=300)
    try:
        first, second = synthetic_micro_batches(seed=10), synthetic_micro_batches(seed=11)
        two.update(first, loss)
        two.save_checkpoint(tmp_path / "dcp")
        two.update(second, loss)
        straight = two.full_state_dict()

        two.load_models()
        two.load_checkpoint(tmp_path / "dcp")
        two.update(second, loss)
        resumed = two.full_state_dict()
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)

        two.save_hf(tmp_path / "hf")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
        assert loaded.keys() == straight.keys()
        assert all(torch.equal(loaded[k], straight[k]) for k in straight)
    finally:
        two.shutdown()


@pytest.mark.slow
def test_a_killed_worker_fails_the_call_at_once(ray_cluster, tiny_qwen2_dir):
    """Rank 1 dies in the middle of an update: the call fails with an error naming rank 1 within seconds, not
    after the process-group timeout that rank 0, blocked in a collective, would otherwise wait for."""
    import threading
    import time

    from ray.exceptions import RayActorError

    from rl.workers import WorkerFailure

    settings = WorkerSettings(model_dir=tiny_qwen2_dir, bf16=False, process_group_timeout_s=600)
    two = WorkerGroup(settings, 2, num_cpus=0.5, call_timeout_s=300)
    try:
        killer = threading.Timer(1.0, ray_cluster.kill, args=(two.actors[1],))
        start = time.monotonic()
        killer.start()
        with pytest.raises(WorkerFailure, match=f"rank 1 of 2 .*pid {two.pids[1]}.* in update") as failure:
            two.update(synthetic_micro_batches(seed=0) * 50, dict(aggregation="token-mean"))
        elapsed = time.monotonic() - start
        killer.join()
        print(f"[workers] rank 1 killed 1 s into an update: the call failed after {elapsed:.1f} s: {failure.value}")
        assert isinstance(failure.value.__cause__, RayActorError) and failure.value.rank == 1
        assert elapsed < 60 and two.broken
    finally:
        two.shutdown()  # kills rank 0, still blocked in a collective, without waiting for it


@pytest.mark.slow
def test_a_worker_killed_mid_weight_stream_fails_the_stream_at_once(ray_cluster, tiny_qwen2_dir):
    """SIGKILL to rank 1's process after the first streamed tensor: the stream fails naming rank 1 within
    seconds (rank 0 is left blocked in the next gather, or fails at once when gloo sees the connection close:
    the dead rank 1 is named either way; shutdown kills rank 0)."""
    import os
    import signal
    import time

    from rl.workers import WorkerFailure

    settings = WorkerSettings(model_dir=tiny_qwen2_dir, bf16=False, process_group_timeout_s=600)
    two = WorkerGroup(settings, 2, num_cpus=0.5, call_timeout_s=300)
    try:
        stream = two.iter_full_weights()
        next(stream)
        os.kill(two.pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="rank 1 of 2 .* in the weight stream"):
            for _ in stream:
                time.sleep(0.05)  # a slow consumer, as an engine loading weights
        elapsed = time.monotonic() - start
        print(f"[workers] rank 1 SIGKILLed mid weight-stream: failed after {elapsed:.1f} s")
        assert elapsed < 60 and two.broken
    finally:
        two.shutdown()


def test_the_default_process_group_timeout_on_cpu_is_two_minutes():
    from rl.workers.trainer_worker import default_process_group_timeout_s

    assert WorkerSettings(model_dir="x").process_group_timeout_s is None
    assert default_process_group_timeout_s("cpu") == 120.0


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["off", "shared_prompt"])
@pytest.mark.parametrize("bf16", [False, True], ids=["float32-compute", "bf16-compute"])
def test_lora_on_a_bf16_base_trains_float32_adapters_alike_on_one_and_two_ranks(ray_cluster, tiny_qwen2_dir, bf16,
                                                                                tmp_path, packing):
    """rl.lora.base_dtype: bfloat16 (a frozen bf16 base, float32 adapters and AdamW state; the reference is the
    base with adapters off): two GRPO updates with the k3 KL term on one rank and on two. The base stays bf16
    and unchanged, the adapters float32 and moved; N=2 agrees with N=1 closely (bf16 base compute); the merged
    HF export (bf16, base + B @ A) loads in transformers with the streamed weights."""
    from transformers import AutoModelForCausalLM

    from rl.grpo import GRPOLoraConfig

    lora = GRPOLoraConfig(enabled=True, r=4, alpha=8, base_dtype="bfloat16")
    settings = WorkerSettings(model_dir=tiny_qwen2_dir, bf16=bf16, learning_rate=1e-2, temperature=0.9, lora=lora,
                              packing=packing)
    one = WorkerGroup(settings, 1, num_cpus=0.5, call_timeout_s=300)
    two = WorkerGroup(settings, 2, num_cpus=0.5, call_timeout_s=300)
    try:
        start = one.module_state_dict()
        assert_same_tensors(two.module_state_dict(), start)  # rank 1 built on meta, its shards from rank 0
        base = {k for k in start if "lora_" not in k}
        adapters = set(start) - base
        assert adapters and all(start[k].dtype == torch.float32 for k in adapters)
        assert all(start[k].dtype == torch.bfloat16 for k in base)
        loss = dict(aggregation="token-mean", beta=0.1, eps_low=0.2, eps_high=0.28)
        for step in range(2):
            mbs = synthetic_micro_batches(seed=20 + step)
            old = one.logprobs(mbs)
            ref_one, ref_two = one.logprobs(mbs, reference=True), two.logprobs(mbs, reference=True)
            ref_gap = max(abs(a - b) for r1, r2 in zip(ref_one, ref_two) for a, b in zip(r1, r2))
            mbs = with_logprobs(mbs, old, ref_one, seed=200 + step)
            m1, m2 = one.update(mbs, loss), two.update(mbs, loss)
            print(f"[workers lora bf16 base] step {step + 1}: loss {m1['loss']:.6f} / {m2['loss']:.6f}, grad_norm "
                  f"{m1['grad_norm']:.6f} / {m2['grad_norm']:.6f}, kl {m1['kl']:.2e} / {m2['kl']:.2e}, reference "
                  f"log-prob max |N=2 - N=1| {ref_gap:.2e}")
            assert ref_gap < 1e-5
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4, abs=1e-6)
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        after_one, after_two = one.module_state_dict(), two.module_state_dict()
        for after in (after_one, after_two):
            assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], start[k]) for k in base)
            assert all(after[k].dtype == torch.float32 for k in adapters)
            assert any("lora_A" in k and not torch.equal(after[k], start[k]) for k in adapters)
            assert any("lora_B" in k and not torch.equal(after[k], start[k]) for k in adapters)
        params = relative_difference({k: after_two[k] for k in adapters}, {k: after_one[k] for k in adapters})
        update = relative_difference({k: after_two[k] - start[k] for k in adapters},
                                     {k: after_one[k] - start[k] for k in adapters})
        print(f"[workers lora bf16 base] adapters after 2 updates, max relative difference N=2 vs N=1: parameters "
              f"{params:.2e}, update {update:.2e}")
        # The frozen base is bf16, so activations are rounded to bf16 (2^-8 relative) whatever the compute dtype, and
        # a CPU that emulates bf16 rounds differently for different batch shapes (N=1 runs all four micro-batches,
        # each of N=2 two): measured 8.9e-5 / 5.1e-4 (parameters / update) with ONEDNN_MAX_CPU_ISA=AVX2
        # ATEN_CPU_CAPABILITY=avx2, 1.3e-6 / 9.3e-6 with native bf16. A wrong reduction across ranks is O(1).
        # Packed rows (rl.packing): on an AMD EPYC without bf16 units, 5.2e-3 / 3.5e-2 with float32 compute against
        # 1.2e-6 / 7.9e-6 padded, while the losses agree to 1e-6 and the grad norms to 1e-5: the one rank of N=1
        # runs two threads and each of N=2 one (num_cpus 0.5), and the emulated bf16 kernels of the packed row's
        # attention round differently with the thread count; AdamW's first steps magnify that in near-zero gradient
        # entries. Packing's exactness is tested in float32 (test_packing.py; 2 ranks vs 1: test_grpo_workers.py).
        tolerance = 1.0 if packing == "off" else 10.0
        assert params <= 1e-3 * tolerance and update <= 1e-2 * tolerance

        merged = two.full_state_dict()
        assert all(v.dtype == torch.bfloat16 for v in merged.values())
        two.save_hf(tmp_path / "hf")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
        assert loaded.keys() == merged.keys()
        assert all(torch.equal(loaded[k].to(torch.bfloat16), merged[k]) for k in merged)
        assert (tmp_path / "hf" / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        one.shutdown()
        two.shutdown()


_HEAP_REUSE_CHILD = r'''
import ctypes, json, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20

def faults_of_a_written_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def second_of_two():  # the first may fault in what the second reuses
    faults_of_a_written_allocation()
    return faults_of_a_written_allocation()

from rl.grpo.config import GRPOConfig
from rl.workers.trainer_worker import MicroBatch, TrainerWorker, WorkerSettings, free_port
worker = TrainerWorker(WorkerSettings(model_dir=sys.argv[1], bf16=False), 0, 1)
worker.setup("127.0.0.1", free_port())
seen = {"before": second_of_two()}
original = worker._sequence_logprobs
def probing(*args, **kwargs):  # inside the update's forward
    seen.setdefault("during_update", second_of_two())
    return original(*args, **kwargs)
worker._sequence_logprobs = probing
worker.update([MicroBatch([[1, 2, 3]] * 2, [[4, 5], [6]], [1.0, -1.0], trained=[True, True])],
              GRPOConfig().policy_loss_kwargs())
seen["after"] = second_of_two()
print(json.dumps(seen))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_cpu_workers_update_reuses_freed_memory_and_gives_it_back_after(tiny_qwen2_dir):
    """glibc's default serves a 64 MiB allocation with a fresh mmap: all of its 16384 pages fault in again on every
    write. Within a CPU worker's update (`rl.common.host_memory.reusing_freed_memory`) a second one reuses the
    first's memory; after the update glibc's thresholds are back and so are the faults."""
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-c", _HEAP_REUSE_CHILD, tiny_qwen2_dir], capture_output=True, text=True,
                         timeout=300, cwd=str(REPO))
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    pages = (64 << 20) // resource.getpagesize()
    assert seen["before"] >= pages and seen["after"] >= pages, seen
    assert seen["during_update"] < pages // 100, seen


@pytest.mark.slow
def test_one_rank_accumulates_unsharded_and_updates_bitwise_the_same(tiny_qwen2_dir, monkeypatch):
    """One rank with bf16 compute (FSDP2 over one rank) keeps the parameters unsharded and sums the gradients
    unsharded in float32 across an update's micro-batches (`ONE_RANK_UNSHARDED_ACCUMULATION`): against the
    per-micro-batch reduce and reshard, the same metrics and bitwise the same parameters over three updates,
    one with a forward-only micro-batch last (its units must be resharded) and one with only that."""
    from torch.distributed.fsdp import FSDPModule

    import rl.workers.trainer_worker as trainer_worker
    from rl.workers import InProcessWorkerGroup

    common = dict(model_dir=tiny_qwen2_dir, bf16=True, learning_rate=1e-3, weight_decay=0.1, temperature=0.9)
    groups = {on: InProcessWorkerGroup(WorkerSettings(**common)) for on in (True, False)}
    loss = dict(aggregation="token-mean", beta=0.0, eps_low=0.2, eps_high=0.28)
    try:
        mbs = synthetic_micro_batches(seed=12)
        last_zero = [MicroBatch(mb.prompt_ids, mb.completion_ids, [0.0] * len(mb) if i == len(mbs) - 1 else mb.advantages,
                                trained=mb.trained) for i, mb in enumerate(mbs)]
        for batch, skipped in ((mbs, 0.0), (last_zero, 1 / len(mbs)), (last_zero[-1:], 1.0)):
            metrics = {}
            for on, group in groups.items():
                monkeypatch.setattr(trainer_worker, "ONE_RANK_UNSHARDED_ACCUMULATION", on)
                metrics[on] = group.update(batch, loss)
            assert metrics[True]["skipped_backward"] == metrics[False]["skipped_backward"] == skipped
            assert metrics[True] == metrics[False]
            assert_same_tensors(groups[True].full_state_dict(), groups[False].full_state_dict())
            # FSDP2's own settings again: the root keeps its parameters after a forward, the layers reshard
            # (a post-forward mesh of None means no resharding), and every unit is sharded between updates
            model = groups[True].worker.model
            for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
                group_state = unit._get_fsdp_state()._fsdp_param_groups[0]
                assert (group_state.post_forward_mesh_info is None) == (unit is model)
                assert group_state.is_sharded
    finally:
        for group in groups.values():
            group.shutdown()


def test_one_rank_cold_start_step_accumulates_unsharded_bitwise_the_same(tiny_qwen2_dir, monkeypatch):
    """The cold start's optimizer step (`TrainerWorker.train_step`, the EKSFT objective with its frozen reference)
    over three micro-batches at one bf16 rank: with `ONE_RANK_UNSHARDED_ACCUMULATION` the same metrics and bitwise
    the same parameters as with a reduce and reshard per micro-batch, over two steps; every unit sharded after."""
    from torch.distributed.fsdp import FSDPModule

    import rl.workers.trainer_worker as trainer_worker
    from eksft.config import load_recipe
    from eksft.data import build_sft_dataset
    from eksft.models import load_tokenizer
    from eksft.sft.run import worker_settings
    from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    from rl.workers import InProcessWorkerGroup

    recipe = load_recipe(None, ["model.name=tiny:qwen2", "data.sft.num_examples=6", "data.max_length=96",
                                "sft.bf16=true", "sft.learning_rate=1e-3"])
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    batches = [SFTMicroBatch.of(examples[i:i + 2]) for i in (0, 2, 4)]
    loss = ObjectiveStepLoss(recipe.arm("eksft").objective, tokenizer.pad_token_id, with_reference=True)
    groups = {on: InProcessWorkerGroup(worker_settings(recipe, tiny_qwen2_dir, with_reference=True))
              for on in (True, False)}
    try:
        for _ in range(2):
            metrics = {}
            for on, group in groups.items():
                monkeypatch.setattr(trainer_worker, "ONE_RANK_UNSHARDED_ACCUMULATION", on)
                metrics[on] = group.train_step(batches, loss, learning_rate=1e-3)
            assert metrics[True] == metrics[False] and metrics[True]["grad_norm"] > 0
            assert_same_tensors(groups[True].full_state_dict(), groups[False].full_state_dict())
            model = groups[True].worker.model
            assert isinstance(model, FSDPModule)  # bf16 compute: FSDP2 over the one rank
            assert all(unit._get_fsdp_state()._fsdp_param_groups[0].is_sharded
                       for unit in model.modules() if isinstance(unit, FSDPModule))
    finally:
        for group in groups.values():
            group.shutdown()
