"""The cold start with ``sft.workers: 2`` (two FSDP2 ranks in Ray actors, gloo on CPU) against ``sft.workers: 1`` (one
rank in the stage's process): the same update for every objective, LoRA with the adapters-off reference, half the
state per rank, and a SIGKILLed worker that fails the stage within the bound and resumes exactly."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eksft.config import load_recipe
from eksft.layout import SFTStageDir
from eksft.sft import run_sft
from test_sft_loop import read_metrics

# float32, 6 examples in micro-batches of 2: a global batch of 4 (1 worker x 2 x 2 accumulation, or 2 workers x 2 x 1)
# then the epoch's last micro-batch alone (at 2 workers rank 1 runs a padding micro-batch), so both steps train the
# same micro-batches whatever the number of workers. The KL metric on both steps. The learning rate is large enough
# that step 2's KL to the reference (which EKSFT ranks tokens by) is the update's, far above float rounding: at
# 1e-4 the KLs of the tiny model's tokens were ~1e-6 apart, and one rank vs two (a different summation order)
# swapped one token of the eksft selection.
BASE = ["model.name=tiny:qwen2", "data.sft.num_examples=6", "data.max_length=96", "sft.bf16=false", "sft.epochs=1",
        "sft.batch_size=2", "sft.learning_rate=1e-3", "sft.lr_scheduler=constant", "sft.warmup_ratio=0",
        "sft.kl_metric_every=1", "sft.save_steps=1000"]
ONE, TWO = ["sft.workers=1", "sft.grad_accum=2"], ["sft.workers=2", "sft.grad_accum=1"]

ARMS = {
    "sft": "{name: sft}",
    "eksft-sequence": "{name: eksft, ratio: 0.3, scope: sequence}",
    "eksft-batch": "{name: eksft, ratio: 0.3, scope: batch}",
    "dft": "{name: dft}",
}


def train(overrides: list[str], out: Path, on_step=None) -> Path:
    recipe = load_recipe(None, overrides)
    return run_sft(recipe, recipe.arms[0].objective, SFTStageDir(out), on_step=on_step)


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the parameters together (float64 sums)."""
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("arm,extra", [
    *[(name, []) for name in ARMS],
    ("eksft-sequence", ["sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.dropout=0.0", "sft.reference=adapter"]),
], ids=[*ARMS, "eksft-lora-adapter-reference"])
def test_two_workers_train_like_one(ray_cluster, tmp_path, tiny_qwen2_dir, arm, extra):
    common = [*BASE, *extra, f"arms=[{{name: a, objective: {ARMS[arm]}}}]"]
    one = train([*common, *ONE], tmp_path / "one")
    two = train([*common, *TWO], tmp_path / "two")
    w_one, w_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    start = load_file(f"{tiny_qwen2_dir}/model.safetensors")
    params = relative_difference(w_two, w_one)
    moved = relative_difference(w_one, start)
    m_one, m_two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    print(f"[sft workers] {arm}{' (LoRA)' if extra else ''}: 2 steps, workers 1 vs 2: relative difference of the "
          f"parameters {params:.2e} (they moved {moved:.2e} from the start); loss {m_one[-1]['loss']:.6f} / "
          f"{m_two[-1]['loss']:.6f}")
    assert moved > 1e-4 and params <= 1e-5
    assert [m["step"] for m in m_one] == [m["step"] for m in m_two] == [1, 2]
    for a, b in zip(m_one, m_two):
        assert set(a) == set(b)
        for key in sorted(set(a) - {"phase", "step"}):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert m_two[1]["kl_mean"] > 0  # step 2 against the reference after a real update


@pytest.mark.slow
def test_two_workers_hold_half_the_state_each(ray_cluster, tiny_qwen2_dir):
    """Parameter, gradient and AdamW shards of the policy per rank after a step: at 2 ranks at most 0.55 of one."""
    from eksft.data import build_sft_dataset
    from eksft.models import load_tokenizer
    from eksft.sft.run import worker_settings
    from eksft.sft.step import ObjectiveStepLoss, SFTMicroBatch
    from rl.workers import make_worker_group

    recipe = load_recipe(None, BASE)
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    examples, _ = build_sft_dataset(recipe, tokenizer)
    loss = ObjectiveStepLoss(recipe.arm("eksft").objective, tokenizer.pad_token_id, with_reference=True)
    batches = [SFTMicroBatch.of(examples[:2]), SFTMicroBatch.of(examples[2:4])]
    per_rank = {}
    for n in (1, 2):
        group = make_worker_group(worker_settings(recipe, tiny_qwen2_dir, with_reference=True), n, num_cpus=0.01)
        try:
            group.train_step(batches, loss, learning_rate=1e-4)
            per_rank[n] = [sum(r.values()) for r in group.local_storage_bytes()]
        finally:
            group.shutdown()
    ratio = max(per_rank[2]) / per_rank[1][0]
    print(f"[sft workers] policy state per rank: 1 worker {per_rank[1][0] / 2**20:.2f} MiB, 2 workers "
          f"{[round(b / 2**20, 2) for b in per_rank[2]]} MiB: ratio {ratio:.3f}")
    assert ratio <= 0.55


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_sigkilled_worker_fails_the_stage_and_a_rerun_resumes_exactly(ray_cluster, tmp_path, monkeypatch):
    """A real SIGKILL to rank 1's process just after step 1's checkpoint: the stage fails within the process-group
    bound (2 minutes on CPU) with an error naming rank 1 and its pid; rerunning it resumes from step 1 and ends
    with the weights and metrics of an uninterrupted run."""
    import rl.workers as workers
    from rl.workers import WorkerFailure

    overrides = [*BASE, *TWO, "data.sft.num_examples=12", "sft.save_steps=1", "sft.max_steps=3"]
    straight = train(overrides, tmp_path / "straight")

    groups = []
    make_group = workers.make_worker_group
    monkeypatch.setattr(workers, "make_worker_group", lambda *a, **kw: groups.append(make_group(*a, **kw)) or groups[-1])
    killed_at = []

    def kill_rank_1_after_step_1(step, metrics):
        if step == 1:
            killed_at.append(time.monotonic())
            os.kill(groups[0].pids[1], signal.SIGKILL)

    with pytest.raises(WorkerFailure, match="rank 1 of 2 .*pid ") as failure:
        train(overrides, tmp_path / "killed", on_step=kill_rank_1_after_step_1)
    elapsed = time.monotonic() - killed_at[0]
    pids = groups[0].pids
    print(f"[sft workers] rank 1 (pid {pids[1]}) SIGKILLed after step 1's checkpoint: the stage failed after "
          f"{elapsed:.1f} s: {failure.value}")
    assert elapsed < 120 and failure.value.rank == 1 and f"pid {pids[1]}" in str(failure.value)
    deadline = time.monotonic() + 30
    while _alive(pids[0]) and time.monotonic() < deadline:  # ray.kill is asynchronous
        time.sleep(0.2)
    assert not _alive(pids[0]), "rank 0 was left running"
    assert sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir()) == ["checkpoint-1"]

    monkeypatch.setattr(workers, "make_worker_group", make_group)
    resumed = train(overrides, tmp_path / "killed")
    w_straight, w_resumed = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=0, atol=0)
    assert read_metrics(tmp_path / "killed/metrics.jsonl") == read_metrics(tmp_path / "straight/metrics.jsonl")
