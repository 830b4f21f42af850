"""The real GRPO trainer with ``rl.workers: 2`` (two FSDP2 ranks in Ray actors, gloo on CPU) against
``rl.workers: 1`` (one rank in the trainer's process), and exact resume at two workers."""

import pytest
import torch
from safetensors.torch import load_file

from rl.grpo import GRPOConfig, run_grpo
from test_grpo import FLOAT32, FLOAT32_ENGINE, assert_resumed_like_uninterrupted, outputs, read_metrics, rows

# 8 sequences per step in 2 mini-batches (2 optimizer steps, so the old log-probs come from the workers too) of
# 2 micro-batches: each of the 2 ranks trains one micro-batch per mini-batch. KL and entropy terms on, so
# that the random tiny model (every reward 0) still gets a gradient; a sequence-count aggregation.
COMMON = dict(prompts_per_step=2, group_size=4, max_new_tokens=12, learning_rate=1e-3, alpha_entropy=0.01,
              beta_kl=0.01, aggregation="seq-mean-token-mean", mini_batch_size=4, micro_batch_size=2,
              save_every=1, **FLOAT32)


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


@pytest.mark.slow
def test_two_workers_step_like_one_and_resume_exactly(ray_cluster, tmp_path, tiny_qwen2_dir):
    data = rows(8)
    one = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=1, workers=1, **COMMON), outputs(tmp_path / "one"),
                   rollout=FLOAT32_ENGINE)
    full_out = outputs(tmp_path / "full")
    full = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, workers=2, **COMMON), full_out, rollout=FLOAT32_ENGINE)

    # Step 1: the same rollouts (same weights, same seeds), so the same update whatever the number of ranks.
    assert outputs(tmp_path / "one").rollout_file(1).read_text() == full_out.rollout_file(1).read_text()
    w_one = load_file(str(one / "model.safetensors"))
    w_two = load_file(str(full_out.step_checkpoint(1) / "model.safetensors"))
    start = load_file(f"{tiny_qwen2_dir}/model.safetensors")
    params = relative_difference(w_two, w_one)
    update = relative_difference({k: w_two[k] - start[k] for k in start}, {k: w_one[k] - start[k] for k in start})
    m_one, m_two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "full")[0]
    print(f"[grpo workers] step 1, workers 1 vs 2: max relative difference parameters {params:.2e}, update "
          f"{update:.2e}; grad_norm {m_one['grad_norm']:.6f} / {m_two['grad_norm']:.6f}, kl {m_one['kl']:.6g} / "
          f"{m_two['kl']:.6g}")
    assert max(float((w_one[k] - start[k]).abs().max()) for k in start) > 0  # the step moved the weights
    assert params <= 1e-5 and update <= 1e-5
    for key in ("entropy", "kl", "grad_norm", "pg_loss", "clip_fraction", "num_tokens", "num_seqs",
                "logprob_gap_engine_trainer"):
        assert m_two[key] == pytest.approx(m_one[key], rel=1e-4, abs=1e-7), key

    # Exact resume at 2 workers: stop after step 1, rerun with 2 steps: step 2 equals the uninterrupted run's.
    killed = outputs(tmp_path / "killed")
    run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=1, workers=2, **COMMON), killed, rollout=FLOAT32_ENGINE)
    assert (killed.step_checkpoint(1) / "dcp").is_dir() and (killed.step_checkpoint(1) / "config.json").is_file()
    resumed = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, workers=2, **COMMON), killed, rollout=FLOAT32_ENGINE)
    assert_resumed_like_uninterrupted(full_out, full, killed, resumed)
    # The resumed run's vLLM engine started from the consolidated step-1 directory: step 2 samples from it.
    gap = read_metrics(tmp_path / "killed")[1]["logprob_gap_engine_trainer"]
    print(f"[grpo workers] vLLM on the consolidated checkpoint vs the trainer, step 2: log-prob gap {gap:.2e}")
    assert gap < 1e-3


def odd_answers_by_parity(texts, answers):
    """A reward that varies inside a group (the random tiny model never answers): the parity of the completion's
    length; prompts with an even answer score 0 throughout, so dynamic sampling drops their groups and refills."""
    from types import SimpleNamespace

    scores = [0.0 if int(a) % 2 == 0 else float(len(t) % 2) for t, a in zip(texts, answers)]
    return [SimpleNamespace(score=x, correct=x > 0) for x in scores]


@pytest.mark.slow
@pytest.mark.parametrize("aggregation, beta", [("token-mean", 0.0), ("seq-mean-token-sum-norm", 0.01)])
def test_dynamic_sampling_with_two_workers_steps_like_one(ray_cluster, tmp_path, tiny_qwen2_dir, aggregation, beta):
    """Dynamic sampling on (zero-variance groups dropped, more prompts sampled until the batch is full), through
    the real trainer: workers 2 vs 1 after one step, parameters to 1e-5 relative in float32."""
    cfg = dict(COMMON, aggregation=aggregation, beta_kl=beta, dynamic_sampling=True, alpha_entropy=0.0)
    data = rows(16)
    runs = {}
    for workers in (1, 2):
        out = outputs(tmp_path / f"w{workers}")
        final = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=1, workers=workers, **cfg), out,
                         rollout=FLOAT32_ENGINE, reward_fn=odd_answers_by_parity)
        runs[workers] = (load_file(str(final / "model.safetensors")), read_metrics(tmp_path / f"w{workers}")[0])
    (w1, m1), (w2, m2) = runs[1], runs[2]
    start = load_file(f"{tiny_qwen2_dir}/model.safetensors")
    # Relative to all the parameters at once: per tensor, the key projections' biases (whose true gradient is 0:
    # a bias on every key shifts a query's scores by a constant, which softmax ignores) get AdamW steps of
    # +-lr driven by float noise, so their own relative difference measures the noise (1.2e-5 seen), not the update.
    params = (sum(float((w2[k] - w1[k]).norm()) ** 2 for k in w1) / sum(float(w1[k].norm()) ** 2 for k in w1)) ** 0.5
    largest = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    print(f"[grpo workers] dynamic sampling, {aggregation}, beta {beta}: zero-variance share "
          f"{m1['zero_variance_share']:.2f}, {m1['groups_seen']} groups seen in {m1['sampling_rounds']} rounds; "
          f"workers 1 vs 2: relative difference of the parameters {params:.2e} (per tensor up to "
          f"{relative_difference(w2, w1):.2e}), largest element difference {largest:.1e}")
    assert m1["zero_variance_share"] > 0 and m1["groups_seen"] > COMMON["prompts_per_step"]  # groups were refilled
    assert (m1["groups_seen"], m1["num_tokens"]) == (m2["groups_seen"], m2["num_tokens"])
    assert max(float((w1[k] - start[k]).abs().max()) for k in start) > 0
    assert params <= 1e-5 and largest <= 1e-6  # one step moves an element by up to lr = 1e-3


@pytest.mark.slow
def test_a_sigkilled_worker_fails_the_stage_and_a_rerun_resumes_exactly(ray_cluster, tmp_path, tiny_qwen2_dir):
    """A real SIGKILL to rank 1's process just after step 1's checkpoint: the stage fails within 2 minutes with
    an error naming rank 1 and its pid, and the group is torn down (rank 0's process goes too). Rerunning the
    same stage on the same outputs resumes from step 1 and ends where an uninterrupted 3-step run ends."""
    import os
    import signal
    import threading
    import time

    from rl.grpo.trainer import GRPOTrainer
    from rl.workers import WorkerFailure

    data, config = rows(8), GRPOConfig(steps=3, workers=2, **COMMON)
    straight = run_grpo(tiny_qwen2_dir, data, config, outputs(tmp_path / "straight"), rollout=FLOAT32_ENGINE)

    out = outputs(tmp_path / "killed")
    trainer = GRPOTrainer(model_dir=tiny_qwen2_dir, rows=data, config=config, outputs=out, rollout=FLOAT32_ENGINE)
    pids, killed_at = trainer.workers.pids, []

    def kill_rank_1_after_step_1():
        while not out.step_checkpoint(1).is_dir():  # renamed into place only when complete
            time.sleep(0.02)
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1_after_step_1, daemon=True)
    killer.start()
    with pytest.raises(WorkerFailure, match=f"rank 1 of 2 .*pid {pids[1]}") as failure:
        trainer.train()
    elapsed = time.monotonic() - killed_at[0]
    killer.join()
    print(f"[grpo workers] rank 1 (pid {pids[1]}) SIGKILLed after step 1's checkpoint: the stage failed after "
          f"{elapsed:.1f} s: {failure.value}")
    assert elapsed < 120 and failure.value.rank == 1
    assert trainer.latest_checkpoint() == out.step_checkpoint(1)
    deadline = time.monotonic() + 30
    while _alive(pids[0]) and time.monotonic() < deadline:  # ray.kill is asynchronous
        time.sleep(0.2)
    assert not _alive(pids[0]), "rank 0 was left running"

    resumed = run_grpo(tiny_qwen2_dir, data, config, out, rollout=FLOAT32_ENGINE)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in b] == [1, 2, 3]
    compared = [k for k in a[0] if k.startswith("reward") or "loss" in k]
    assert "reward_mean" in compared and "pg_loss" in compared
    for x, y in zip(a, b):
        for key in compared:
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (x["step"], key)
    w_straight, w_resumed = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert w_resumed.keys() == w_straight.keys()
    assert relative_difference(w_resumed, w_straight) <= 1e-6


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_lora_on_a_bf16_base_with_one_and_two_workers(ray_cluster, tmp_path, tiny_qwen2_dir):
    """rl.lora.base_dtype: bfloat16 through the real trainer (the engine syncs the merged bf16 weights): 2 steps
    with workers 1 and 2 give the same step-1 adapters and merged weights (closely), only the adapted linear
    layers move, and the final HF directory loads in transformers."""
    from transformers import AutoModelForCausalLM

    data = rows(8)
    lora = {"enabled": True, "r": 4, "alpha": 8, "base_dtype": "bfloat16"}
    config = dict(COMMON, learning_rate=1e-2, steps=2, lora=lora)
    finals, outs = {}, {}
    for n in (1, 2):
        outs[n] = outputs(tmp_path / f"w{n}")
        finals[n] = run_grpo(tiny_qwen2_dir, data, GRPOConfig(workers=n, **config), outs[n], rollout=FLOAT32_ENGINE)
    assert outs[1].rollout_file(1).read_text() == outs[2].rollout_file(1).read_text()
    start = load_file(f"{tiny_qwen2_dir}/model.safetensors")
    merged = {n: load_file(str(outs[n].step_checkpoint(1) / "model.safetensors")) for n in (1, 2)}
    adapters = {n: load_file(str(outs[n].step_checkpoint(1) / "adapter/adapter_model.safetensors")) for n in (1, 2)}
    assert all(v.dtype == torch.bfloat16 for v in merged[2].values())
    assert all(v.dtype == torch.float32 for v in adapters[2].values())
    moved = {k for k in start if not torch.equal(start[k].to(torch.bfloat16), merged[2][k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)
    params = relative_difference({k: v.float() for k, v in merged[2].items()},
                                 {k: v.float() for k, v in merged[1].items()})
    adapter = relative_difference(adapters[2], adapters[1])
    m1, m2 = read_metrics(tmp_path / "w1"), read_metrics(tmp_path / "w2")
    print(f"[grpo workers lora bf16 base] step 1, workers 1 vs 2: max relative difference adapters {adapter:.2e}, "
          f"merged bf16 weights {params:.2e}; grad_norm {m1[0]['grad_norm']:.6f} / {m2[0]['grad_norm']:.6f}; "
          f"step 2 logprob_gap_engine_trainer {m1[1]['logprob_gap_engine_trainer']:.2e} / "
          f"{m2[1]['logprob_gap_engine_trainer']:.2e}")
    assert adapter <= 1e-4 and params <= 1e-2  # bf16 rounding of base + B @ A
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-4)
    loaded = AutoModelForCausalLM.from_pretrained(finals[2]).state_dict()
    final = load_file(str(finals[2] / "model.safetensors"))
    assert all(torch.equal(loaded[k].to(torch.bfloat16), final[k]) for k in final)


def test_a_checkpoint_of_the_trainer_before_workers_is_refused_before_anything_starts(tmp_path, tiny_qwen2_dir):
    """A step-N directory written by the single-process trainer (HF weights + trainer_state.pt, no dcp/) cannot
    be resumed by the worker group: the stage says so before it starts an engine or a worker."""
    import shutil

    from rl.grpo.trainer import GRPOTrainer

    out = outputs(tmp_path / "old")
    old = out.step_checkpoint(3)
    shutil.copytree(tiny_qwen2_dir, old)
    torch.save({"step": 3, "cursor": 0}, old / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"step-3 has no dcp/ \(a checkpoint of the single-process trainer"):
        GRPOTrainer(model_dir=tiny_qwen2_dir, rows=rows(4), config=GRPOConfig(steps=4, **COMMON), outputs=out,
                    rollout=FLOAT32_ENGINE)


def test_cpu_offload_on_a_cpu_stage_is_refused_with_what_to_write(tmp_path, tiny_qwen2_dir):
    from rl.grpo.trainer import GRPOTrainer

    with pytest.raises(ValueError, match=r"rl.cpu_offload .* this stage runs on cpu.*set rl.cpu_offload: false"):
        GRPOTrainer(model_dir=tiny_qwen2_dir, rows=rows(4), config=GRPOConfig(steps=1, cpu_offload=True, **COMMON),
                    outputs=outputs(tmp_path / "offload"), rollout=FLOAT32_ENGINE)
