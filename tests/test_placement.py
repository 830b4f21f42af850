"""`eksft plan`: every stage placed on a cluster, the memory per GPU, the refusal naming stage, GPU and shortfall,
and `eksft run` checking the same plan first (fast: arithmetic only, no model is loaded, no stage runs)."""

import json
from pathlib import Path

import pytest

from eksft.cli import main
from eksft.config import load_recipe
from eksft.pipeline.memory import (
    MicroBatchShape,
    ModelShape,
    TrainerSetup,
    engine_estimate,
    engine_step_bytes,
    trainer_estimate,
)
from eksft.pipeline.placement import (
    KNOWN_CONFIGS,
    NOT_FIT_EXIT,
    PROMPT_TOKENS,
    RUNTIME_GIB,
    Cluster,
    ModelConfigError,
    detect_cluster,
    model_shape,
    plan_memory,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "paper_qwen3_8b.yaml"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
GIB = 2**30
QWEN3_8B = ModelShape.from_hf_config(KNOWN_CONFIGS["Qwen/Qwen3-8B"])


def stage(report, kind):
    return next(s for s in report.stages if s.kind == kind)


def device(stage_plan, name):
    return next(d for d in stage_plan.devices if d.name == name)


# --------------------------------------------------------------------------- the paper recipe


def test_paper_recipe_fits_eight_gpus_of_80_gib_as_written():
    report = plan_memory(load_recipe(PAPER), Cluster.gpus(1, 8, 80))
    assert report.fits, report.refusal()
    assert report.precision == {"sft": "bfloat16", "rl": "bfloat16", "rollout": "bfloat16"}
    sft = stage(report, "sft")
    assert sft.arms == ["sft", "eksft"]  # the two cold starts are the same shape
    assert [d.name for d in sft.devices] == [f"node 0 GPU {g}" for g in range(8)]
    assert all([p.label for p in d.processes] == [f"trainer rank {g}"] for g, d in enumerate(sft.devices))
    rl = stage(report, "rl")
    assert rl.arms == ["base", "sft", "eksft"]
    assert [p.label for p in device(rl, "node 0 GPU 0").processes] == ["engine"]  # the stage's own GPU
    assert [p.label for p in device(rl, "node 0 GPU 7").processes] == ["trainer rank 6"]
    # the trainer rank: full fine-tuning on 7 ranks with checkpointing, 4 x (512 + 8192) tokens
    rank = device(rl, "node 0 GPU 1").processes[0].estimate
    expected = trainer_estimate(QWEN3_8B, TrainerSetup(workers=7, reference="copy", activation_checkpointing=True),
                                MicroBatchShape(4, PROMPT_TOKENS + 8192, 8193))
    assert rank == expected
    assert device(rl, "node 0 GPU 1").used == expected.peak() + RUNTIME_GIB * GIB
    assert round(expected.peak() / GIB, 1) == 65.4
    engine = device(rl, "node 0 GPU 0").processes[0].estimate
    assert engine.item("engine weights").bytes == 8_190_735_360 * 2
    assert engine.item("KV cache reserved (kv_cache_gib)").bytes == 40 * GIB
    evaluation = stage(report, "eval")
    assert [p.label for p in device(evaluation, "node 0 GPU 0").processes] == ["engine"]


def test_paper_recipe_refused_on_one_gpu_naming_stage_and_shortfall():
    report = plan_memory(load_recipe(PAPER), Cluster.gpus(1, 1, 80))
    assert not report.fits
    message = report.refusal()
    assert "sft (sft, eksft) stage needs 8 GPUs" in message and "the cluster has 1 (7 short)" in message
    assert "rl (base, sft, eksft) stage needs 8 GPUs" in message
    assert stage(report, "eval").fits
    # every suggestion, applied, fits
    sft = stage(report, "sft")
    assert sft.suggestions
    for suggestion in sft.suggestions:
        sets = [s.strip() for s in suggestion.split("--set") if s.strip()]
        again = plan_memory(load_recipe(PAPER, sets), Cluster.gpus(1, 1, 80), suggest=False)
        assert stage(again, "sft").fits, suggestion


def test_memory_shortfall_names_the_gpu_and_the_gib():
    """GRPO as the recipe had it before (one rank, no checkpointing): the trainer and the engine on GPU 0."""
    recipe = load_recipe(PAPER, ["rl.workers=1", "rl.activation_checkpointing=false"])
    report = plan_memory(recipe, Cluster.gpus(1, 8, 80))
    rl = stage(report, "rl")
    gpu0 = device(rl, "node 0 GPU 0")
    assert [p.label for p in gpu0.processes] == ["trainer rank 0", "engine"]
    trainer = trainer_estimate(QWEN3_8B, TrainerSetup(workers=1, reference="copy", unsharded_accumulation=True),
                               MicroBatchShape(4, PROMPT_TOKENS + 8192, 8193))
    engine = gpu0.processes[1].estimate
    assert gpu0.processes[1].sleeps_during_updates
    # one process, in turns: the engine sleeps (level 2) while the trainer updates, the trainer's resident state stays
    # while the engine generates; one process's runtime
    resident = sum(i.bytes for i in trainer.items if i.phase == "resident" and i.device == "gpu")
    used = max(trainer.peak(), resident + engine.peak()) + RUNTIME_GIB * GIB
    assert used == trainer.peak() + RUNTIME_GIB * GIB  # here the update is the larger
    assert gpu0.used == used and gpu0.shortfall == used - 80 * GIB
    assert round(trainer.peak() / GIB) == 464  # 452 + the 34 more bf16 layers one rank keeps gathered (12.2 GiB)
    assert f"rl (base, sft, eksft) stage: node 0 GPU 0 needs {used / GIB:.1f} GiB, has 80.0 GiB: " \
           f"{(used - 80 * GIB) / GIB:.1f} GiB short" in report.refusal()
    assert "--set rl.activation_checkpointing=true --set rl.workers=7" in rl.suggestions


def test_an_engine_sharing_the_trainers_gpu_counts_in_turns_with_it():
    """LoRA GRPO on one GPU (the recipe's own advice for fewer GPUs): the engine generates beside the trainer's
    resident state, then sleeps while the trainer updates; the larger of the two phases is what the GPU needs."""
    recipe = load_recipe(PAPER, ["rl.workers=1", "rl.lora.enabled=true", "rl.lora.base_dtype=bfloat16"])
    gpu0 = device(stage(plan_memory(recipe, Cluster.gpus(1, 8, 80)), "rl"), "node 0 GPU 0")
    trainer, engine = (p.estimate for p in gpu0.processes)
    resident = sum(i.bytes for i in trainer.items if i.phase == "resident" and i.device == "gpu")
    assert resident < trainer.peak()
    assert gpu0.used == max(trainer.peak(), resident + engine.peak()) + RUNTIME_GIB * GIB
    assert gpu0.used < trainer.peak() + engine.peak() + 2 * RUNTIME_GIB * GIB  # not both peaks at once
    # an evaluation's engine has its GPU to itself: no sleeping there
    ev = device(stage(plan_memory(recipe, Cluster.gpus(1, 8, 80)), "eval"), "node 0 GPU 0")
    assert [p.sleeps_during_updates for p in ev.processes] == [False]


def test_two_nodes():
    recipe = load_recipe(PAPER, ["sft.workers=16", "sft.grad_accum=4", "rl.workers=15"])
    report = plan_memory(recipe, Cluster.gpus(2, 8, 80))
    assert report.fits, report.refusal()
    sft = stage(report, "sft")
    assert [p.label for p in device(sft, "node 1 GPU 7").processes] == ["trainer rank 15"]
    rl = stage(report, "rl")
    assert [p.label for p in device(rl, "node 0 GPU 7").processes] == ["trainer rank 6"]
    assert [p.label for p in device(rl, "node 1 GPU 0").processes] == ["trainer rank 7"]
    assert "on nodes 0, 1" in "\n".join(rl.notes)
    # as written, --nodes 2 packs everything on the first node
    as_written = plan_memory(load_recipe(PAPER), Cluster.gpus(2, 8, 80))
    assert as_written.fits and all(d.node == 0 for s in as_written.stages for d in s.devices)


def test_separate_engines_with_tensor_parallelism_stay_on_one_node():
    recipe = load_recipe(PAPER, ["rl.workers=5", "resources.rl.num_gpus=0", "rollout.placement=separate",
                                 "rollout.num_engines=3", "rollout.num_gpus=1", "rollout.tensor_parallel_size=2",
                                 "resources.eval.num_gpus=0"])
    report = plan_memory(recipe, Cluster.gpus(2, 8, 80))
    rl = stage(report, "rl")
    labels = {d.name: [p.label for p in d.processes] for d in rl.devices}
    assert labels["node 0 GPU 4"] == ["trainer rank 4"]
    assert labels["node 0 GPU 5"] == ["engine 0 TP rank 0"] and labels["node 0 GPU 6"] == ["engine 0 TP rank 1"]
    # engine 1 would straddle GPUs 7 and 8: it moves to the next node whole
    assert "node 0 GPU 7" not in labels
    assert labels["node 1 GPU 0"] == ["engine 1 TP rank 0"] and labels["node 1 GPU 3"] == ["engine 2 TP rank 1"]
    tp2 = device(rl, "node 1 GPU 0").processes[0].estimate
    assert tp2 == engine_estimate(QWEN3_8B, dtype="bfloat16", tensor_parallel=2, prompts=43, samples=8,
                                  prompt_len=PROMPT_TOKENS, max_new_tokens=8192, max_model_len=16384,
                                  kv_cache_gib=40, batched_tokens=16384)
    assert report.fits, report.refusal()


def test_an_engine_wider_than_a_node_is_refused():
    recipe = load_recipe(PAPER, ["rl.workers=4", "resources.rl.num_gpus=0", "rollout.placement=separate",
                                 "rollout.num_gpus=1", "rollout.tensor_parallel_size=4"])
    report = plan_memory(recipe, Cluster.gpus(2, 2, 80), suggest=False)
    assert "an engine takes 4 GPUs (rollout.num_gpus x tensor_parallel_size), more than a node has (2)" \
        in report.refusal()


def test_kv_cache_below_one_sequence_is_refused():
    report = plan_memory(load_recipe(PAPER, ["rollout.kv_cache_gib=1"]), Cluster.gpus(1, 8, 80))
    assert "rollout.kv_cache_gib 1 holds less than one rollout.max_model_len 16384 sequence (1024 blocks, 2.25 GiB)" \
        in report.refusal()


def test_engine_step_by_hand():
    # 16384 tokens x 2 B x (2 h + q + 2 kv + 3 i) + 256 sequences x 3 float32 copies x V
    assert engine_step_bytes(QWEN3_8B, "bfloat16", 1, 16384) == \
        16384 * 2 * (2 * 4096 + 4096 + 2 * 1024 + 3 * 12288) + 256 * 3 * 4 * 151936 == 2_144_468_992


# --------------------------------------------------------------------------- CPU


def test_quickstart_fits_this_kind_of_machine_and_not_a_small_one():
    recipe = load_recipe(QUICKSTART)
    report = plan_memory(recipe, Cluster.cpu(23.5))
    assert report.fits, report.refusal()
    rl = stage(report, "rl")
    host = device(rl, "node 0 host memory")
    assert [p.label for p in host.processes] == ["trainer rank 0", "engine"]
    small = plan_memory(recipe, Cluster.cpu(4))
    assert not small.fits
    assert "rl (sft, eksft) stage: node 0 host memory needs" in small.refusal()
    assert "has 4.0 GiB" in small.refusal()


def test_packed_micro_batches_are_planned_as_the_packed_row():
    """Packing (`rl.packing`, `sft.packing`) resolves per device kind as the stages do: on a CPU `auto` packs, so
    the quickstart's trainers are planned as one packed row with its mask; on a GPU `auto` is off (padded rows)."""
    recipe = load_recipe(QUICKSTART)
    report = plan_memory(recipe, Cluster.cpu(23.5))
    rl_rank = device(stage(report, "rl"), "node 0 host memory").processes[0].estimate
    shape = ModelShape.from_hf_config(KNOWN_CONFIGS["embedded:smollm2-135m-instruct"])
    setup = TrainerSetup(workers=1, bf16=report.precision["rl"] == "bfloat16", reference="copy",
                         unsharded_accumulation=True)
    # micro_batch_size 16 = 4 groups of 4, each (512 - 1) + 4 x 96 positions, 4 x 96 of them with logits
    packed = MicroBatchShape(1, 4 * (511 + 4 * 96), 4 * 4 * 96, padded=True)
    assert rl_rank == trainer_estimate(shape, setup, packed)
    assert "one packed row of 3580 positions, 1536 with logits" in " ".join(stage(report, "rl").notes)
    # the cold start: 8 x 256 tokens in one row of at most 2048 positions (no shared prefix assumed)
    sft_rank = device(stage(report, "sft"), "node 0 host memory").processes[0].estimate
    assert sft_rank.title.endswith("1 x 2048 tokens)")
    # one bf16 cold-start rank keeps its layers gathered across the step too (sft.workers 1)
    bf16 = plan_memory(load_recipe(QUICKSTART, ["sft.bf16=true"]), Cluster.cpu(23.5))
    assert bf16.precision["sft"] == "bfloat16"
    gathered = device(stage(bf16, "sft"), "node 0 host memory").processes[0].estimate.item(
        "decoder layers, gathered (all: one rank keeps them across the update)")
    assert gathered.bytes == shape.layers * shape.layer_parameters * 2
    off = plan_memory(load_recipe(QUICKSTART, ["rl.packing=off", "sft.packing=off"]), Cluster.cpu(23.5))
    rl_off = device(stage(off, "rl"), "node 0 host memory").processes[0].estimate
    assert rl_off == trainer_estimate(shape, setup, MicroBatchShape(16, 512 + 96, 97))
    assert device(stage(off, "sft"), "node 0 host memory").processes[0].estimate.title.endswith("8 x 256 tokens)")


@pytest.mark.parametrize("packing, tokens, expected", [
    # 4 sequences round up to one group of 8: (512 - 1) + 8 x 1000 = 8511 positions > 4096, so the trainer may run
    # the packed row of up to 4096 positions or the group's 8 sequences padded; the plan takes the larger
    ("shared_prompt", None, "worse of (1, 4096, 3585) and (8, 1512, 1001)"),
    # 4 sequences of (512 - 1) + 1000 positions: 6044 > 4096, likewise
    ("padding_free", None, "worse of (1, 4096, 3585) and (4, 1512, 1001)"),
    # a token budget of 2048 holds one sequence of 1511 positions (each alone): a row of at most 2048
    ("padding_free", 2048, (1, 2048, 2048 - 511)),
])
def test_packed_rl_micro_batch_by_hand(packing, tokens, expected):
    from eksft.pipeline.placement import rl_micro_batch

    overrides = ["rl.group_size=8", "rl.micro_batch_size=4", "rl.max_new_tokens=1000", f"rl.packing={packing}",
                 "rl.mini_batch_size=null"] + ([f"rl.micro_batch_tokens={tokens}"] if tokens else [])
    rl = load_recipe(QUICKSTART, overrides).rl
    setup = TrainerSetup(workers=1, bf16=False, reference="copy")
    batch, assumes = rl_micro_batch(QWEN3_8B, setup, rl, 512, packing)
    if isinstance(expected, tuple):
        assert batch == MicroBatchShape(*expected, padded=True)
        assert f"rl.micro_batch_tokens {tokens}" in assumes
        return
    packed = MicroBatchShape(1, 4096, 4096 - 511, padded=True)
    rows = 8 if packing == "shared_prompt" else 4
    padded = MicroBatchShape(rows, 1512, 1001)
    peaks = {b: trainer_estimate(QWEN3_8B, setup, b).peak() for b in (packed, padded)}
    assert peaks[packed] != peaks[padded]
    assert batch == max(peaks, key=peaks.get)
    assert f"rl.packing {packing}" in assumes


def test_gpu_plans_packing_only_when_a_recipe_asks_for_it():
    default = plan_memory(load_recipe(PAPER), Cluster.gpus(1, 8, 80))
    assert "rl.micro_batch_size 4 x (512 prompt tokens assumed + rl.max_new_tokens 8192)" in " ".join(
        stage(default, "rl").notes)
    asked = plan_memory(load_recipe(PAPER, ["rl.packing=padding_free"]), Cluster.gpus(1, 8, 80))
    assert "rl.packing padding_free" in " ".join(stage(asked, "rl").notes)


def test_cpu_workers_add_onto_host_memory():
    recipe = load_recipe(QUICKSTART, ["rl.workers=2"])
    rl = stage(plan_memory(recipe, Cluster.cpu(23.5)), "rl")
    host = device(rl, "node 0 host memory")
    assert [p.label for p in host.processes] == ["trainer rank 0", "trainer rank 1", "engine"]


def test_this_machine_without_flags(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    torch = pytest.importorskip("torch")
    cluster = detect_cluster()
    if not torch.cuda.is_available():
        assert not cluster.has_gpus and cluster.host_memory_gib > 0 and "this machine" in cluster.source
    assert detect_cluster(gpus=8, gpu_memory_gib=80, nodes=2) == Cluster.gpus(2, 8, 80)
    assert detect_cluster(cpu_memory_gib=16) == Cluster.cpu(16)
    with pytest.raises(ValueError, match="--gpus and --gpu-memory go together"):
        detect_cluster(gpu_memory_gib=80)


# --------------------------------------------------------------------------- model shapes


def test_model_shapes(tmp_path):
    assert model_shape("Qwen/Qwen3-8B") == QWEN3_8B  # hub id without the hub: the published numbers
    assert model_shape("Qwen/Qwen3-1.7B").tied and model_shape("Qwen/Qwen3-1.7B").layers == 28
    assert model_shape("embedded:smollm2-135m-instruct").hidden == 576
    assert model_shape("tiny:qwen2").qkv_bias
    (tmp_path / "config.json").write_text(json.dumps(dict(KNOWN_CONFIGS["Qwen/Qwen3-8B"], num_hidden_layers=2)))
    assert model_shape(str(tmp_path)).layers == 2
    assert model_shape("someone/unknown-model", model_config=tmp_path / "config.json").layers == 2
    with pytest.raises(ModelConfigError, match=r"model 'someone/unknown-model': no config.json found .* --model-config"):
        model_shape("someone/unknown-model")


def test_embedded_table_equals_the_converted_config(embedded_dir):
    config = json.loads((Path(embedded_dir) / "config.json").read_text())
    assert model_shape("embedded:smollm2-135m-instruct") == ModelShape.from_hf_config(config)


# --------------------------------------------------------------------------- the command line


def test_plan_command_exit_codes(capsys):
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "plan for 8 GPUs of 80 GiB" in out and "everything fits" in out
    for text in ("weights (sharded)", "gradients (sharded)", "AdamW moments (sharded)", "reference (sharded)",
                 "activations (checkpointing on)", "activations (checkpointing off, not used)", "engine weights",
                 "KV cache reserved (kv_cache_gib)", "node 0 GPUs 1-7, each", "node 0 GPU 0"):
        assert text in out, text
    assert main(["plan", str(PAPER), "--gpus", "1", "--gpu-memory", "80"]) == NOT_FIT_EXIT == 3
    err = capsys.readouterr().err
    assert "the recipe does not fit 1 GPU of 80 GiB" in err and "sft (sft, eksft) stage needs 8 GPUs" in err
    assert "nearest settings that fit: --set" in err
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "80", "--nodes", "2"]) == 0
    assert main(["plan", str(PAPER), "--set", "model.name=someone/unknown", "--gpus", "8", "--gpu-memory", "80"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main(["plan", str(QUICKSTART), "--cpu-memory", "24"]) == 0


def test_run_refuses_before_anything_starts(tmp_path, capsys, monkeypatch):
    import eksft.pipeline

    calls = []
    monkeypatch.setattr(eksft.pipeline, "run_pipeline", lambda *a, **k: calls.append((a, k)))
    run_dir = tmp_path / "run"
    code = main(["run", str(QUICKSTART), "--run-dir", str(run_dir), "--cpu-memory", "3"])
    assert code == NOT_FIT_EXIT and calls == [] and not run_dir.exists()
    err = capsys.readouterr().err
    assert "the recipe does not fit CPU only, 3.0 GiB of host memory" in err
    assert "node 0 host memory needs" in err and "GiB short" in err and "eksft run --force" in err
    assert main(["run", str(QUICKSTART), "--run-dir", str(run_dir), "--cpu-memory", "3", "--force"]) == 0
    assert "--force: the memory plan is not checked" in capsys.readouterr().out
    assert len(calls) == 1 and calls[0][0][1] == str(run_dir)


def test_run_accepts_the_quickstart_on_this_machine(tmp_path, capsys, monkeypatch):
    import eksft.pipeline

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []
    monkeypatch.setattr(eksft.pipeline, "run_pipeline", lambda *a, **k: calls.append((a, k)))
    assert main(["run", str(QUICKSTART), "--run-dir", str(tmp_path / "run"), "--local"]) == 0
    assert "[run] memory plan: every stage fits" in capsys.readouterr().out and len(calls) == 1


def test_run_warns_and_proceeds_when_the_model_cannot_be_read(tmp_path, capsys, monkeypatch):
    import eksft.pipeline

    calls = []
    monkeypatch.setattr(eksft.pipeline, "run_pipeline", lambda *a, **k: calls.append((a, k)))
    assert main(["run", str(QUICKSTART), "--set", "model.name=someone/unknown", "--cpu-memory", "24"]) == 0
    assert "memory plan not checked" in capsys.readouterr().out and len(calls) == 1


def test_the_ray_cluster_at_ray_address(monkeypatch):
    """Without flags and with RAY_ADDRESS: the nodes Ray reports (connects, never starts a cluster)."""
    import sys
    import types

    calls = []

    def fake_ray(nodes):
        return types.SimpleNamespace(is_initialized=lambda: False, init=lambda **k: calls.append(k),
                                     nodes=lambda: nodes, shutdown=lambda: calls.append("shutdown"))

    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    cpu_nodes = [{"Alive": True, "Resources": {"CPU": 16, "memory": 48 * GIB}},
                 {"Alive": True, "Resources": {"CPU": 16, "memory": 40 * GIB}}, {"Alive": False, "Resources": {}}]
    monkeypatch.setitem(sys.modules, "ray", fake_ray(cpu_nodes))
    assert detect_cluster() == Cluster.cpu(40, 2, "Ray at head:6379")
    assert calls[0]["address"] == "head:6379" and calls[-1] == "shutdown"
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        gpu_nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 8, "memory": 48 * GIB}}]
        monkeypatch.setitem(sys.modules, "ray", fake_ray(gpu_nodes))
        with pytest.raises(ValueError, match="reports 8 GPUs but not their memory: give --gpus N --gpu-memory"):
            detect_cluster()
