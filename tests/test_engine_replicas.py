"""Several vLLM engines (Ray actors) fed by the trainer through vLLM's weight-transfer API (rl.rollout.ray_engine,
rl.rollout.weight_transfer): the dealing of prompts, equal outputs for one and two engines, log-prob gaps after a
real training step and a sync, the backend vLLM's factories return, and the memory a sync holds."""

import json
import os
import threading
import time

import pytest
import torch

from rl.rollout import SamplingConfig
from rl.rollout.ray_engine import deal_by_cost


def test_deal_by_cost_balances_and_keeps_prompt_order():
    costs = [10, 1, 7, 3, 3, 8]
    dealt = deal_by_cost(costs, 2)
    # largest first to the lighter engine: 10 -> e0, 8 -> e1, 7 -> e1 (8 < 10), 3 -> e0 (10 < 15), 3 -> e0 (13 < 15),
    # 1 -> e1 (15 < 16)
    assert dealt == [[0, 3, 4], [1, 2, 5]]
    assert [sum(costs[i] for i in d) for d in dealt] == [16, 16]
    assert sorted(i for d in deal_by_cost(costs, 4) for i in d) == list(range(6))
    assert deal_by_cost(costs, 1) == [list(range(6))]
    assert deal_by_cost([5, 5], 3) == [[0], [1], []]  # more engines than prompts: some get none
    with pytest.raises(ValueError, match="num_engines"):
        deal_by_cost(costs, 0)


def test_the_cpu_backend_is_what_vllms_factories_return():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from rl.rollout import weight_transfer as wt

    assert WeightTransferEngineFactory._registry[wt.CPU_BACKEND]() is wt.GlooWeightTransferEngine
    assert WeightTransferTrainerFactory._registry[wt.CPU_BACKEND]() is wt.GlooTrainerWeightTransfer
    wt.register()  # idempotent: a second import (another process, a plugin load) does not raise
    assert wt.transfer_backend("cpu", "colocated") == "cpu_gloo"
    assert (wt.transfer_backend("cuda", "colocated"), wt.transfer_backend("cuda", "separate")) == ("ipc", "nccl")


def _prompts(tokenizer):
    from test_grpo import PROMPTS

    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in PROMPTS] * 3


def _train_one_step(group, tokenizer, prompt_ids):
    """One real optimizer step of the worker group on a made-up batch (GRPO loss, nonzero advantages)."""
    from rl.grpo.config import GRPOConfig
    from rl.workers import MicroBatch

    completion = tokenizer("The answer is 4.")["input_ids"]
    batch = MicroBatch([prompt_ids[0], prompt_ids[1]], [completion, completion[:3]], [1.0, -1.0], None, None,
                       [True, True], None)
    return group.update([batch], GRPOConfig().policy_loss_kwargs())


@pytest.mark.slow
def test_two_engines_equal_one_and_serve_the_trainers_weights_after_a_sync(tiny_qwen2_dir):
    import ray
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rl.rollout.ray_engine import RayEngine
    from rl.workers import InProcessWorkerGroup, WorkerSettings
    from test_grpo import mean_gap

    assert AutoConfig.from_pretrained(tiny_qwen2_dir).tie_word_embeddings  # the vLLM-CPU tied-head corner
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    prompt_ids = _prompts(tokenizer)
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=24)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        one = RayEngine("vllm", tiny_qwen2_dir, num_engines=1, num_cpus=0.5, dtype="float32", max_model_len=512)
        single = one.generate(prompt_ids, sampling, list(range(len(prompt_ids))))
        one.shutdown()
        two = RayEngine("vllm", tiny_qwen2_dir, num_engines=2, num_cpus=0.5, dtype="float32", max_model_len=512,
                        weight_transfer="cpu_gloo")
        pair = two.generate(prompt_ids, sampling, list(range(len(prompt_ids))))
        # every prompt seeded: which engine drew it does not matter (CPU, float32)
        assert [[s.completion_ids for s in g] for g in pair] == [[s.completion_ids for s in g] for g in single]
        assert [[s.logprobs for s in g] for g in pair] == [[s.logprobs for s in g] for g in single]

        group = InProcessWorkerGroup(WorkerSettings(model_dir=tiny_qwen2_dir, bf16=False, learning_rate=1e-2))
        group.init_weight_transfer(two.transfer_target())
        _train_one_step(group, tokenizer, prompt_ids)
        sent = group.send_weights()
        trained = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
        start = {k: v.clone() for k, v in trained.state_dict().items()}
        trained.load_state_dict(dict(group.iter_full_weights()), strict=False)
        assert any(not torch.equal(start[k], v) for k, v in trained.state_dict().items())  # the step moved weights
        gaps = [mean_gap(trained, ray.get(actor.generate.remote(prompt_ids[:2], sampling, [3, 4])))
                for actor in two.actors]
        stale = mean_gap(trained, single[:2])
        group.shutdown()
        two.shutdown()
    finally:
        ray.shutdown()
    assert sent["buckets"] >= 1 and sent["bytes"] > 0
    assert all(g < 1e-3 for g in gaps), gaps
    assert stale > 10 * max(gaps), (stale, gaps)  # the gap test can fail: the old weights are far off


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_a_sync_holds_at_most_two_buckets_of_full_tensors(embedded_dir):
    """The trainer's rank 0 (here this process) holds one bucket of full tensors while it packs them: a bucket is up
    to ``bucket_bytes`` plus the tensor that crosses that size, and packing copies it once, so its resident memory
    during a sync of the embedded model (540 MB in float32, the tied head sent once) rises by less than
    2 x (bucket + largest tensor) plus an allowance of 64 MiB (allocator and gloo buffers): far below one full copy
    of the weights, which sending a state dict at once would hold."""
    import ray

    from rl.rollout.ray_engine import RayEngine
    from rl.workers import InProcessWorkerGroup, WorkerSettings

    bucket = 16 * 2**20
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        engine = RayEngine("vllm", embedded_dir, num_engines=1, num_cpus=1, dtype="float32", max_model_len=512,
                           weight_transfer="cpu_gloo")
        group = InProcessWorkerGroup(WorkerSettings(model_dir=embedded_dir, bf16=False))
        group.init_weight_transfer(engine.transfer_target(bucket))
        largest = max(p.numel() * p.element_size() for p in group.worker.model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in group.worker.model.parameters())  # tied: once
        group.send_weights()  # a first sync: one-time allocations (gloo, the pool threads) are not the bucket's
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.001)

        before = _rss_bytes()
        sampler = threading.Thread(target=sample)
        sampler.start()
        sent = group.send_weights()
        done.set()
        sampler.join()
        group.shutdown()
        engine.shutdown()
    finally:
        ray.shutdown()
    rise = peak[0] - before
    allowed = 2 * (bucket + largest) + 64 * 2**20
    print(f"sync: {sent['buckets']:.0f} buckets, {sent['bytes'] / 2**20:.0f} MiB; RSS rise {rise / 2**20:.0f} MiB "
          f"(allowed {allowed / 2**20:.0f} MiB; the weights are {model_bytes / 2**20:.0f} MiB)")
    assert sent["bytes"] >= model_bytes * 0.99 and sent["buckets"] > 1
    assert rise < allowed, (rise, allowed)
    assert allowed < model_bytes  # the bound says something: one full copy of the weights would break it


@pytest.mark.slow
def test_grpo_with_two_engines_syncs_both_through_vllms_weight_transfer(tmp_path, tiny_qwen2_dir, capsys):
    """Two GRPO steps, the prompts of each dealt over two engine actors; step 2 was sampled after step 1's update
    reached both through the cpu_gloo backend: its log-prob gap (over both engines' samples) is below 1e-3."""
    import ray

    from rl.grpo import GRPOConfig, run_grpo
    from rl.rollout import RolloutConfig
    from test_grpo import outputs, read_metrics, rows

    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=2, max_new_tokens=12, learning_rate=1e-3,
                     alpha_entropy=0.01, bf16=False)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:  # rollout.num_cpus unset: the engines share this process's CPUs (a token reservation each)
        run_grpo(tiny_qwen2_dir, rows(8), cfg, outputs(tmp_path), rollout=RolloutConfig(dtype="float32", num_engines=2))
    finally:
        ray.shutdown()
    assert "weights reach 2 engine(s) through vLLM's weight transfer (cpu_gloo" in capsys.readouterr().out
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["time/sync"] > 0 and metrics[0]["sync/bytes"] > 0 and metrics[0]["sync/buckets"] >= 1
    for m in metrics:  # each engine's own gap, every step (step 2's were sampled after step 1's sync)
        assert m["logprob_gap/engine0"] < 1e-3 and m["logprob_gap/engine1"] < 1e-3, m
        assert m["logprob_gap_engine_trainer"] < 1e-3
    # both engines drew samples in each step (the rollout files say which)
    for step in (1, 2):
        lines = outputs(tmp_path).rollout_file(step).read_text().splitlines()
        assert {json.loads(line)["engine"] for line in lines} == {0, 1}


def test_the_per_engine_gaps_are_each_engines_mean():
    """`engine_gaps` against a hand count: engine 0 draws 2 + 1 tokens, engine 1 draws 3."""
    from rl.grpo.trainer import engine_gaps
    from rl.rollout import Sample

    def sample(engine, logprobs):
        return Sample([1], [2] * len(logprobs), logprobs, "", "stop", engine)

    samples = [sample(0, [-1.0, -2.0]), sample(1, [-0.5, -0.5, -0.5]), sample(0, [-3.0])]
    trainer = [[-1.1, -2.0], [-0.5, -0.7, -0.2], [-2.5]]
    gaps = engine_gaps(trainer, samples, num_engines=2)
    assert gaps["logprob_gap/engine0"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert gaps["logprob_gap/engine1"] == pytest.approx((0.0 + 0.2 + 0.3) / 3)
    assert gaps["logprob_gap_engine_trainer"] == pytest.approx((0.1 + 0.5 + 0.2 + 0.3) / 6)
    assert set(engine_gaps(trainer, [sample(0, s.logprobs) for s in samples])) == {"logprob_gap_engine_trainer"}


@pytest.mark.slow
def test_an_engine_sharing_the_trainers_gpu_sleeps_through_the_update_and_gets_every_weight(tmp_path, tiny_qwen2_dir):
    """The order of a step with an engine that sleeps (GPU colocation): generate, sleep at level 2 (weights dropped),
    the update, wake the weights, the whole sync, wake the KV cache. vLLM has no sleep mode on CPU (its CPU worker's
    sleep and wake_up only log), so this runs the real trainer and the real in-process vLLM engine with
    ``engine_sleeps`` switched on and records the engine's calls: the GPU memory it frees is not observable here.
    Every weight is sent after the wake (level 2 keeps none), and the next step's gap shows the engine serves them."""
    from rl.grpo import GRPOConfig
    from rl.grpo.trainer import GRPOTrainer
    from rl.rollout import RolloutConfig
    from test_grpo import outputs, read_metrics, rows

    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, learning_rate=1e-3, bf16=False)
    trainer = GRPOTrainer(model_dir=tiny_qwen2_dir, rows=rows(4), config=cfg, outputs=outputs(tmp_path),
                          rollout=RolloutConfig(dtype="float32"))
    assert not trainer.engine_sleeps  # CPU: made without sleep mode
    trainer.engine_sleeps = True
    calls = []
    engine = trainer.engine
    for name in ("generate", "sleep", "wake_up", "start_weight_update", "update_weights_bucket",
                 "finish_weight_update", "update_weights"):
        real = getattr(engine, name)

        def record(*args, _name=name, _real=real, **kwargs):
            calls.append((_name, [*args, *kwargs.values()][0] if _name in ("sleep", "wake_up") else None))
            return _real(*args, **kwargs)

        setattr(engine, name, record)
    update = trainer.workers.update
    trainer.workers.update = lambda *a, **k: calls.append(("update", None)) or update(*a, **k)
    trainer.train()
    buckets = [c for c in calls if c[0] == "update_weights_bucket"]
    step = [c for c in calls if c[0] != "update_weights_bucket"]
    assert step == 2 * [("generate", None), ("sleep", 2), ("update", None), ("wake_up", ["weights"]),
                        ("start_weight_update", None), ("finish_weight_update", None), ("wake_up", ["kv_cache"])]
    assert len(buckets) >= 2  # every weight of each step went over (one bucket at least per sync)
    assert read_metrics(tmp_path)[1]["logprob_gap_engine_trainer"] < 1e-3


def test_engines_that_cannot_all_be_placed_fail_at_once_and_leave_no_reservation():
    """Every engine's placement group (its CPUs and tensor-parallel GPUs in one bundle) is reserved before any engine
    starts: when they cannot all be placed, the error gives the numbers and the reservations are given back."""
    import ray
    from ray.util.placement_group import placement_group_table

    from rl.rollout.ray_engine import RayEngine

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        with pytest.raises(RuntimeError, match=r"2 rollout engine\(s\) of 1.5 CPUs and 0 GPUs each could not all be "
                                               r"placed within 3 s"):
            RayEngine("vllm", "/nonexistent", num_engines=2, num_cpus=1.5, ready_timeout_s=3)
        assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
        deadline = time.monotonic() + 30  # Ray gives a removed group's CPUs back asynchronously
        while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU") == 2
    finally:
        ray.shutdown()
