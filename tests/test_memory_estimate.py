"""The memory arithmetic of `eksft.pipeline.memory` against values computed by hand (written out below), the
parameter counts of models built on the meta device, vLLM's own KV page size, and the tensors autograd really
saves in a forward of small transformers models on CPU."""

import json
import math
from pathlib import Path

import pytest

from eksft.pipeline.memory import (
    CHUNK_ELEMENTS,
    END_OF_BACKWARD,
    GPU_BLOCK_SIZE,
    HOST,
    INFO,
    RESIDENT,
    STEP,
    Estimate,
    Item,
    LoraShape,
    MicroBatchShape,
    ModelShape,
    TrainerSetup,
    activation_bytes,
    dtype_bytes,
    engine_estimate,
    engine_weight_bytes,
    kv_batch_blocks,
    kv_blocks,
    kv_heads_per_rank,
    kv_page_bytes,
    layer_activation_bytes_per_token,
    linear_shapes,
    logits_bytes,
    lora_parameters,
    parameter_count,
    parameter_count_exact,
    sharded_numel,
    trainer_estimate,
)

# Qwen/Qwen3-8B config.json as published (the keys that shape the model).
QWEN3_8B = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 36,
            "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False,
            "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "torch_dtype": "bfloat16"}
# SmolLM2-135M-Instruct: the embedded model's config.json (eksft.models.embedded converts it from the GGUF).
SMOLLM2_135M = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
                "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False,
                "mlp_bias": False, "hidden_act": "silu", "max_position_embeddings": 8192}

# Hand counts. Qwen3-8B, per layer: q 4096*4096, k and v 4096*1024 each, o 4096*4096, q/k norms 128 each,
# gate/up/down 4096*12288 each, two RMSNorms of 4096; outside: embedding and untied LM head 151936*4096, norm 4096.
QWEN3_8B_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096
QWEN3_8B_ROOT = 2 * 151936 * 4096 + 4096
QWEN3_8B_P = 36 * QWEN3_8B_LAYER + QWEN3_8B_ROOT
# SmolLM2-135M: q 576*576, k and v 576*192, o 576*576, MLP 3*576*1536, norms 2*576; tied embedding 49152*576, norm.
SMOLLM2_LAYER = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576
SMOLLM2_P = 30 * SMOLLM2_LAYER + 49152 * 576 + 576
# tiny:qwen2 (eksft.models.tiny): h 128, 2 heads / 1 KV head of 64, MLP 256, 2 layers, vocab 320, tied, qkv bias.
TINY_QWEN2_P = 2 * (128 * 128 + 128 + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 256 + 2 * 128) + 320 * 128 + 128
# tiny:llama: the same without biases, LM head untied.
TINY_LLAMA_P = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256 + 2 * 128) + 2 * 320 * 128 + 128

GIB = 2**30


def tiny_config(arch: str) -> dict:
    from eksft.models.tiny import build_config, build_tokenizer

    return build_config(arch, build_tokenizer()).to_dict()


def test_the_module_needs_only_the_standard_library():
    import subprocess
    import sys

    import eksft.pipeline.memory as memory

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); "
            "sys.modules['m'] = module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'vllm', 'pydantic')))")
    assert subprocess.run([sys.executable, "-c", code, memory.__file__]).returncode == 0


# --------------------------------------------------------------------------- parameters


def test_qwen3_8b_parameter_count_by_hand_and_published():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    assert shape == ModelShape(layers=36, hidden=4096, intermediate=12288, q_heads=32, kv_heads=8, head_dim=128,
                               vocab=151936, tied=False, qkv_bias=False, o_bias=False, qk_norm=True)
    assert shape.layer_parameters == QWEN3_8B_LAYER == 192_946_432
    assert shape.root_parameters == QWEN3_8B_ROOT == 1_244_663_808
    assert parameter_count(shape) == QWEN3_8B_P == 8_190_735_360
    assert round(parameter_count(shape) / 1e9, 1) == 8.2  # the model card: 8.2B parameters


@pytest.mark.parametrize("config, expected", [(QWEN3_8B, QWEN3_8B_P), (SMOLLM2_135M, SMOLLM2_P)],
                         ids=["qwen3-8b", "smollm2-135m"])
def test_formula_equals_the_meta_device_count(config, expected):
    assert parameter_count(ModelShape.from_hf_config(config)) == expected
    assert parameter_count_exact(config) == expected


def test_embedded_model(embedded_dir):
    config = json.loads((Path(embedded_dir) / "config.json").read_text())
    shape = ModelShape.from_hf_config(config)
    assert shape == ModelShape.from_hf_config(SMOLLM2_135M)
    assert parameter_count(shape) == SMOLLM2_P == 134_515_008
    assert parameter_count_exact(config) == SMOLLM2_P


@pytest.mark.parametrize("arch, expected", [("qwen2", TINY_QWEN2_P), ("llama", TINY_LLAMA_P)])
def test_tiny_models(arch, expected):
    config = tiny_config(arch)
    shape = ModelShape.from_hf_config(config)
    assert shape.qkv_bias == (arch == "qwen2") and not shape.o_bias and shape.tied == (arch == "qwen2")
    assert parameter_count(shape) == expected == {"qwen2": 337_024, "llama": 377_472}[arch]
    assert parameter_count_exact(config) == expected


def test_biases_of_each_family():
    llama = ModelShape.from_hf_config(dict(SMOLLM2_135M, attention_bias=True, mlp_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    bias = 576 + 2 * 192 + 576 + 2 * 1536 + 576  # per layer: q + k + v + o + gate + up + down
    assert parameter_count(llama) == SMOLLM2_P + 30 * bias
    assert parameter_count_exact(dict(SMOLLM2_135M, attention_bias=True, mlp_bias=True)) == SMOLLM2_P + 30 * bias
    qwen3 = ModelShape.from_hf_config(dict(QWEN3_8B, attention_bias=True))
    assert parameter_count(qwen3) == QWEN3_8B_P + 36 * (4096 + 2 * 1024 + 4096)
    with pytest.raises(ValueError, match="no parameter formula"):
        ModelShape.from_hf_config({"model_type": "qwen3_moe"})


def test_sharding_pads_each_tensor_to_the_world_size():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    tensors = [t for _ in range(shape.layers) for t in shape.layer_tensors()] + list(shape.root_tensors())
    assert sharded_numel(tensors, 1) == QWEN3_8B_P
    assert sharded_numel(tensors, 8) == QWEN3_8B_P // 8  # every first dimension divides by 8
    tiny = ModelShape.from_hf_config(tiny_config("qwen2"))
    tiny_tensors = list(tiny.layer_tensors())
    # W=3: dim 0 of 128 -> 43 rows, of 64 -> 22, of 256 -> 86 (ceil), times the other dims
    by_hand = (43 * 128 + 43 + 2 * (22 * 128 + 22) + 43 * 128 + 2 * 86 * 128 + 43 * 256 + 2 * 43)
    assert sharded_numel(tiny_tensors, 3) == by_hand


# --------------------------------------------------------------------------- trainer


def qwen3_8b_estimate(**setup) -> Estimate:
    return trainer_estimate(ModelShape.from_hf_config(QWEN3_8B), TrainerSetup(**setup), MicroBatchShape(1, 8192))


def test_trainer_full_fine_tune_state_w8_vs_w1():
    e8 = qwen3_8b_estimate(workers=8, reference="copy")
    assert e8.item("weights (sharded)").bytes == QWEN3_8B_P * 4 // 8 == 4_095_367_680
    assert e8.item("gradients (sharded)").bytes == QWEN3_8B_P * 4 // 8
    assert e8.item("AdamW moments (sharded)").bytes == 2 * QWEN3_8B_P * 4 // 8
    assert e8.item("reference (sharded)").bytes == QWEN3_8B_P * 2 // 8  # bf16: the compute is bf16
    assert e8.item("policy root unit, gathered").bytes == QWEN3_8B_ROOT * 2
    assert e8.item("reference root unit, gathered").bytes == QWEN3_8B_ROOT * 2
    assert e8.item("decoder layers, gathered (current + prefetched)").bytes == 2 * QWEN3_8B_LAYER * 2
    assert e8.item("LM head gradient, unsharded").bytes == 151936 * 4096 * 2
    assert e8.item("one layer's gradients in flight").bytes == int(QWEN3_8B_LAYER * (2 + 4 + 4 / 8))
    assert e8.item("root gradients in flight").bytes == int(QWEN3_8B_ROOT * (2 + 4 + 4 / 8))
    e1 = qwen3_8b_estimate(workers=1, reference="copy")
    for name in ("weights (sharded)", "gradients (sharded)", "AdamW moments (sharded)", "reference (sharded)"):
        assert e1.item(name).bytes == 8 * e8.item(name).bytes
    assert e1.item("policy root unit, gathered").bytes == e8.item("policy root unit, gathered").bytes
    # float32 compute: the reference in float32, the gathered units in float32
    e8_fp32 = qwen3_8b_estimate(workers=8, reference="copy", bf16=False)
    assert e8_fp32.item("reference (sharded)").bytes == QWEN3_8B_P * 4 // 8
    assert e8_fp32.item("policy root unit, gathered").bytes == QWEN3_8B_ROOT * 4


def test_one_rank_update_keeps_every_decoder_layer_gathered():
    """`unsharded_accumulation` (an optimizer step at one rank: the GRPO update, the cold start's step): all 36 of
    Qwen3-8B's layers gathered in bf16 instead of the current and the prefetched one; several ranks ignore it (they
    reshard), so do float32 at one rank (no FSDP) and CPU offload (the worker does not keep them then)."""
    kept = qwen3_8b_estimate(workers=1, unsharded_accumulation=True)
    assert kept.item("decoder layers, gathered (all: one rank keeps them across the update)").bytes == 36 * QWEN3_8B_LAYER * 2
    plain = qwen3_8b_estimate(workers=1)
    assert kept.peak() - plain.peak() == (36 - 2) * QWEN3_8B_LAYER * 2
    assert qwen3_8b_estimate(workers=8, unsharded_accumulation=True) == qwen3_8b_estimate(workers=8)
    assert qwen3_8b_estimate(workers=1, bf16=False, unsharded_accumulation=True) == qwen3_8b_estimate(workers=1, bf16=False)
    assert qwen3_8b_estimate(workers=1, cpu_offload=True, unsharded_accumulation=True) == \
        qwen3_8b_estimate(workers=1, cpu_offload=True)


def test_one_float32_rank_runs_without_fsdp():
    assert not TrainerSetup(workers=1, bf16=False).uses_fsdp
    assert TrainerSetup(workers=2, bf16=False).uses_fsdp
    assert TrainerSetup(workers=1, bf16=True).uses_fsdp
    assert TrainerSetup(workers=1, bf16=False, cpu_offload=True).uses_fsdp
    assert TrainerSetup(workers=1, bf16=False, weight_dtype="bfloat16").uses_fsdp
    names = {i.name for i in qwen3_8b_estimate(workers=1, bf16=False).items}
    assert not any("gathered" in n or "in flight" in n or "unsharded" in n for n in names)


def test_trainer_lora_vs_full():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    lora = LoraShape(r=16)
    # r x (in + out): q 4096+4096, k and v 4096+1024, o 4096+4096, gate and up 4096+12288, down 12288+4096
    per_layer = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 12288))
    assert lora_parameters(shape, lora) == 36 * per_layer == 43_646_976
    e = qwen3_8b_estimate(workers=8, lora=lora, lora_base_dtype="bfloat16", reference="adapter")
    assert e.item("base weights, frozen (sharded)").bytes == QWEN3_8B_P * 2 // 8
    assert e.item("LoRA adapters (sharded)").bytes == 36 * per_layer * 4 // 8
    assert e.item("gradients (sharded)").bytes == 36 * per_layer * 4 // 8
    assert e.item("AdamW moments (sharded)").bytes == 2 * 36 * per_layer * 4 // 8
    assert e.item("reference (sharded)").bytes == 0
    assert e.item("decoder layers, gathered (current + prefetched)").bytes == 2 * (QWEN3_8B_LAYER + per_layer) * 2
    assert e.item("one layer's gradients in flight").bytes == int(per_layer * (2 + 4 + 4 / 8))
    names = {i.name for i in e.items}
    assert "LM head gradient, unsharded" not in names and "root gradients in flight" not in names
    # A LoRA arm starting from an SFT checkpoint has a separate reference: bf16, sharded, its root gathered.
    e_copy = qwen3_8b_estimate(workers=8, lora=lora, lora_base_dtype="bfloat16", reference="copy")
    assert e_copy.item("reference (sharded)").bytes == QWEN3_8B_P * 2 // 8
    full = qwen3_8b_estimate(workers=8)
    assert e.peak() < full.peak()


def test_lora_count_equals_peft(tiny_qwen2_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from rl.common.lora import LoraSettings, wrap_with_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    counted = 0
    for settings in (LoraSettings(enabled=True, r=8),
                     LoraSettings(enabled=True, r=4, target_modules=["q_proj", "v_proj"])):
        peft = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32), settings)
        counted = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
        assert lora_parameters(ModelShape.from_hf_config(model.config), LoraShape.from_settings(settings)) == counted
    # by hand: the last settings (r=4 on q 128->128 and v 128->64 of the 2 layers); r=8 on all seven modules
    assert counted == 2 * 4 * ((128 + 128) + (128 + 64)) == 3584
    assert lora_parameters(ModelShape.from_hf_config(model.config), LoraShape(8)) == 2 * 8 * (
        (128 + 128) + 2 * (128 + 64) + (128 + 128) + 3 * (128 + 256))


def test_embedded_model_on_one_float32_rank():
    """The CPU default: SmolLM2-135M on one rank computing in float32 (no FSDP), a float32 reference copy."""
    shape = ModelShape.from_hf_config(SMOLLM2_135M)
    e = trainer_estimate(shape, TrainerSetup(workers=1, bf16=False, reference="copy"), MicroBatchShape(2, 512, 300))
    assert e.item("weights (sharded)").bytes == SMOLLM2_P * 4 == 538_060_032
    assert e.item("gradients (sharded)").bytes == SMOLLM2_P * 4
    assert e.item("AdamW moments (sharded)").bytes == 2 * SMOLLM2_P * 4
    assert e.item("reference (sharded)").bytes == SMOLLM2_P * 4
    h, q, kv, i, heads, b, n = 576, 576, 192, 1536, 9, 4, 2 * 512
    per_token = (2 * (4 * h + 4 + b * h) + (b * h + b * h + b * i)  # norms, linear inputs
                 + b * q + 2 * b * q + b * q + 4 * heads + b * 512  # SDPA, padded: k, v repeated to 9 heads; mask
                 + 3 * b * i)  # MLP
    assert layer_activation_bytes_per_token(shape, 4, masked_length=512) == per_token
    outside = 2 * b * 64 * n + (4 * h + 4) * n + 8 * n + b * h * n + b * h * 2 * 300  # 2 rows: the head input copied
    assert e.item("activations (checkpointing off)").bytes == 30 * per_token * n + outside
    assert 2**26 // 49152 == 1365  # positions per chunk: more than the 600 with logits, so one chunk of 600
    logits = 2 * 4 * 600 * 49152 + 2 * 4 * 600 * 49152 + 4 * 600 * 49152  # backward: float32 logits, gradient, chunks
    assert e.item("logits and loss temporaries").bytes == logits
    # no FSDP: nothing gathered or in flight; the peak is the state (weights, gradients, 2 moments, reference) + step
    assert e.peak() == 5 * SMOLLM2_P * 4 + 30 * per_token * n + outside + logits


def test_tiny_model_engine_on_cpu_blocks():
    shape = ModelShape.from_hf_config(tiny_config("qwen2"))
    assert kv_page_bytes(shape, "float32", block_size=32) == 2 * 32 * 1 * 64 * 4 == 16_384
    e = engine_estimate(shape, dtype="float32", block_size=32, prompts=2, samples=4, prompt_len=40, max_new_tokens=25,
                        max_model_len=2048, kv_cache_gib=1.0)
    # 65 tokens -> 3 blocks of 32, x 8 sequences, x 2 layers x 16 KiB; shared: the one full prompt block
    assert e.item("KV cache the batch needs").bytes == 8 * 3 * 2 * 16_384
    assert e.item("KV cache the batch needs, prompt blocks shared").bytes == 2 * (1 + 4 * 2) * 2 * 16_384
    assert e.item("engine weights").bytes == TINY_QWEN2_P * 4  # vocabulary 320 = 5 x 64, tied: counted once


def test_cpu_offload_moves_the_sharded_state_to_the_host():
    e = qwen3_8b_estimate(workers=8, cpu_offload=True)
    for name in ("weights (sharded)", "gradients (sharded)", "AdamW moments (sharded)"):
        assert e.item(name).device == HOST
    assert e.peak(HOST) == 4 * QWEN3_8B_P * 4 // 8
    assert e.peak() == qwen3_8b_estimate(workers=8).peak() - 4 * QWEN3_8B_P * 4 // 8


def test_peak_is_resident_plus_the_largest_phase():
    e = Estimate("t", (Item("a", 10, "", RESIDENT), Item("b", 5, "", STEP), Item("c", 3, "", STEP),
                       Item("d", 7, "", END_OF_BACKWARD), Item("e", 100, "", INFO), Item("f", 50, "", RESIDENT, HOST)))
    assert e.peak() == 10 + max(5 + 3, 7)
    assert e.peak(HOST) == 50
    assert "peak per GPU" in e.format() and "host memory" in e.format()


# --------------------------------------------------------------------------- activations and logits


def test_qwen3_8b_activations_per_layer_by_hand():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    h, q, kv, i, heads, kv_heads = 4096, 32 * 128, 8 * 128, 12288, 32, 8
    for b in (2, 4):
        norms = 2 * (4 * h + 4 + b * h)  # float32 input copy, rsqrt, normalised input (weight gradient)
        linear_inputs = b * h + b * h + b * i  # before q/k/v, before gate/up, down_proj's input
        qk_norms = (4 + b) * q + 4 * heads + (4 + b) * kv + 4 * kv_heads
        sdpa = b * q + b * kv + b * kv + b * q + 4 * heads  # rotated q, k, v, output, log-sum-exp
        mlp = 3 * b * i  # gate output, SiLU output, up output
        assert layer_activation_bytes_per_token(shape, b) == norms + linear_inputs + qk_norms + sdpa + mlp
    assert layer_activation_bytes_per_token(shape, 2) == 215_336
    # a padded batch of length 8192: k and v repeated to 32 heads, the mask as a bf16 bias per layer
    assert layer_activation_bytes_per_token(shape, 2, masked_length=8192) == 215_336 + 2 * 2 * (q - kv) + 2 * 8192


def test_checkpointing_on_vs_off():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    batch = MicroBatchShape(1, 8192)
    n, per_token = 8192, 215_336
    # cos/sin, the final norm (float32 copy, rsqrt), the token ids, the normalised final state, the LM head's input
    outside = 2 * 2 * 128 * n + (4 * 4096 + 4) * n + 8 * n + 2 * 4096 * n + 2 * 4096 * n
    off = activation_bytes(shape, batch, 2, checkpointing=False)
    on = activation_bytes(shape, batch, 2, checkpointing=True)
    assert off == 36 * per_token * n + outside == 63_777_898_496
    assert on == 36 * 2 * 4096 * n + per_token * n + outside == 4_452_679_680
    assert round(off / GIB, 2) == 59.40 and round(on / GIB, 2) == 4.15


def test_lora_activations():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    b, h, q, kv, i, r = 2, 4096, 4096, 1024, 12288, 16
    full = layer_activation_bytes_per_token(shape, b)
    no_dropout = layer_activation_bytes_per_token(shape, b, lora=LoraShape(r))
    # frozen norms keep no normalised copy (2 b h, and b (q + kv) for q/k norms); 7 lora_A outputs of r each
    assert no_dropout == full - 2 * b * h - b * (q + kv) + 7 * b * r
    with_dropout = layer_activation_bytes_per_token(shape, b, lora=LoraShape(r, dropout=0.05))
    # each adapted module keeps its own dropped-out input and a 1-byte mask instead of the shared input
    inputs = 5 * h + q + i  # q, k, v, gate, up read h; o reads q; down reads i
    assert with_dropout == no_dropout - (b * h + b * h + b * i) + (b + 1) * inputs


def test_logits_and_loss_temporaries():
    from rl.common.token_stats import DEFAULT_CHUNK_ELEMENTS, default_chunk_size

    assert CHUNK_ELEMENTS == DEFAULT_CHUNK_ELEMENTS
    V, L = 151936, 8192
    c = default_chunk_size(V)
    assert c == 2**26 // V == 441
    # a CPU trainer's chunks are 4 MiB of float32, to stay in the caches (rl.common.token_stats.CPU_CHUNK_ELEMENTS)
    assert default_chunk_size(V, "cpu") == 2**20 // V == 6
    assert default_chunk_size(49152, "cpu") == 21 and default_chunk_size(10**7, "cpu") == 1
    # backward: the bf16 logits and their full-size gradient, 2 float32 chunks and the chunk's bf16 gradient
    assert logits_bytes(V, L, 2) == 2 * 2 * L * V + 2 * 4 * c * V + 2 * c * V == 5_648_676_608
    # with a reference's logits kept too (SFT objectives with a reference)
    assert logits_bytes(V, L, 2, reference_logits=True) == 3 * 2 * L * V + 3 * 4 * c * V + 2 * c * V
    # few positions: the float32 chunks of the forward dominate (c = L)
    assert logits_bytes(V, 10, 2) == 2 * 10 * V + 3 * 4 * 10 * V
    assert logits_bytes(V, 1000, 2, chunk_rows=100) == max(2 * 1000 * V + 3 * 4 * 100 * V,
                                                           2 * 2 * 1000 * V + 2 * 4 * 100 * V + 2 * 100 * V)


def _saved_tensor_bytes(config: dict, batch: MicroBatchShape, dtype, lora: LoraShape | None, checkpointing: bool):
    """Bytes of the distinct storages autograd saves in one training forward (parameters excluded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    hf = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from rl.common.lora import LoraSettings, wrap_with_lora

        model = wrap_with_lora(model, LoraSettings(enabled=True, r=lora.r, dropout=lora.dropout,
                                                   target_modules=list(lora.targets)))
    model = model.to(dtype).train()  # all in the compute dtype, as FSDP's mixed precision gathers them
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, hf.vocab_size, (batch.sequences, batch.length))
    attention = torch.ones_like(ids)
    if batch.masked:
        attention[0, :3] = 0  # left padding, as rl.workers.batch.sequence_logprobs builds rows
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
              use_cache=False, logits_to_keep=batch.logit_positions)
    return sum(seen.values())


SMALL = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "tie_word_embeddings": False}


@pytest.mark.parametrize("model_type, dtype, batch, lora, checkpointing", [
    ("qwen3", "float32", MicroBatchShape(1, 96, 96), None, False),
    ("qwen3", "bfloat16", MicroBatchShape(1, 96, 96), None, False),
    ("qwen3", "bfloat16", MicroBatchShape(2, 96, 17), None, False),  # padded: mask, repeated KV heads
    ("qwen3", "bfloat16", MicroBatchShape(2, 96, 17), None, True),
    ("qwen3", "bfloat16", MicroBatchShape(1, 96, 96), LoraShape(8), False),
    ("qwen3", "bfloat16", MicroBatchShape(2, 96, 17), LoraShape(8, dropout=0.1), False),
    ("qwen3", "float32", MicroBatchShape(1, 96, 96), LoraShape(4, targets=("q_proj", "v_proj")), False),
    ("qwen2", "bfloat16", MicroBatchShape(2, 96, 17), None, False),
    ("llama", "bfloat16", MicroBatchShape(1, 96, 96), LoraShape(8), True),
])
def test_activations_equal_what_autograd_saves_on_cpu(model_type, dtype, batch, lora, checkpointing):
    torch = pytest.importorskip("torch")
    config = dict(SMALL, model_type=model_type)
    shape = ModelShape.from_hf_config(config)
    b = dtype_bytes(dtype)
    expected = activation_bytes(shape, batch, b, checkpointing=checkpointing, lora=lora)
    if checkpointing:  # the recomputed layer, the mask, cos and sin are the checkpoint's inputs, not saved tensors
        masked = batch.length if batch.masked else 0
        expected -= layer_activation_bytes_per_token(shape, b, lora=lora, masked_length=masked) * batch.tokens
        expected -= batch.sequences * batch.length**2 * batch.masked + 2 * b * shape.head_dim * batch.tokens
    elif lora is not None and lora.dropout > 0:  # a CPU dropout keeps its mask in the input dtype (CUDA: bool)
        per_layer = sum(linear_shapes(shape)[m][0] for m in lora.targets)
        first_layer_no_mask = sum(m in lora.targets for m in ("q_proj", "k_proj", "v_proj")) * shape.hidden
        expected += (b - 1) * batch.tokens * (shape.layers * per_layer - first_layer_no_mask)
    assert _saved_tensor_bytes(config, batch, getattr(torch, dtype), lora, checkpointing) == expected


# --------------------------------------------------------------------------- engines (vLLM)


def test_kv_block_rounding_and_tensor_parallel_heads():
    assert kv_blocks(33, 32) == 2 and kv_blocks(32, 32) == 1 and kv_blocks(1, 32) == 1 and kv_blocks(0, 32) == 0
    assert kv_blocks(8704, 16) == 544
    assert [kv_heads_per_rank(8, tp) for tp in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]  # TP 16: replicated
    shape = ModelShape.from_hf_config(QWEN3_8B)
    assert kv_page_bytes(shape, "bfloat16") == 2 * 16 * 8 * 128 * 2 == 65_536
    assert kv_page_bytes(shape, "bfloat16", tensor_parallel=2) == 2 * 16 * 4 * 128 * 2
    assert kv_page_bytes(shape, "bfloat16", tensor_parallel=16) == kv_page_bytes(shape, "bfloat16", tensor_parallel=8)
    assert kv_page_bytes(shape, "float32", block_size=32) == 2 * 32 * 8 * 128 * 4


def test_kv_page_size_is_vllms():
    torch = pytest.importorskip("torch")
    interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    shape = ModelShape.from_hf_config(SMOLLM2_135M)
    for dtype, block in (("bfloat16", 16), ("float32", 32)):
        spec = interface.FullAttentionSpec(block_size=block, num_kv_heads=shape.kv_heads, head_size=shape.head_dim,
                                           dtype=getattr(torch, dtype))
        assert kv_page_bytes(shape, dtype, block_size=block) == spec.page_size_bytes


def test_kv_cache_for_a_grpo_batch():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    # 16 prompts x 8 samples of 512 + 8192 tokens: 544 blocks each
    assert kv_batch_blocks(16, 8, 512, 8192, 16) == 16 * 8 * 544 == 69_632
    # prefix caching: the 32 full prompt blocks once per prompt
    assert kv_batch_blocks(16, 8, 512, 8192, 16, share_prompt_blocks=True) == 16 * (32 + 8 * (544 - 32)) == 66_048
    # a 33-token prompt and 31 new tokens in blocks of 32: 2 blocks each, 1 shared
    assert kv_batch_blocks(1, 4, 33, 31, 32) == 8 and kv_batch_blocks(1, 4, 33, 31, 32, share_prompt_blocks=True) == 5
    e = engine_estimate(shape, dtype="bfloat16", prompts=16, samples=8, prompt_len=512, max_new_tokens=8192,
                        max_model_len=16384, kv_cache_gib=40)
    assert e.item("KV cache the batch needs").bytes == 69_632 * 36 * 65_536 == 164_282_499_072
    assert e.item("KV cache the batch needs, prompt blocks shared").bytes == 66_048 * 36 * 65_536
    assert e.item("KV cache vLLM requires (one max_model_len sequence)").bytes == 1024 * 36 * 65_536
    assert e.item("KV cache reserved (kv_cache_gib)").bytes == 40 * GIB
    assert "18,204 blocks" in e.item("KV cache reserved (kv_cache_gib)").formula  # 40 GiB // (36 x 65536)
    assert e.peak() == QWEN3_8B_P * 2 + 40 * GIB  # the batch's need is information, not counted


def test_engine_weights():
    shape = ModelShape.from_hf_config(QWEN3_8B)
    assert engine_weight_bytes(shape, "bfloat16") == QWEN3_8B_P * 2 == 16_381_470_720
    # TP=2: q, o, MLP and vocabulary halved, 4 of the 8 KV heads, norms replicated
    layer = 4096 * 2048 + 2 * 4096 * 512 + 2048 * 4096 + 3 * 4096 * 6144 + 2 * 4096 + 2 * 128
    assert engine_weight_bytes(shape, "bfloat16", 2) == (36 * layer + 2 * 75968 * 4096 + 4096) * 2
    tiny = ModelShape.from_hf_config(SMOLLM2_135M)
    assert engine_weight_bytes(tiny, "float32") == SMOLLM2_P * 4  # 49152 is a multiple of 64: no padding
    padded = ModelShape.from_hf_config(dict(SMOLLM2_135M, vocab_size=49155))  # padded to 49216 rows
    assert engine_weight_bytes(padded, "float32") == (SMOLLM2_P + (49216 - 49152) * 576) * 4
    assert GPU_BLOCK_SIZE == 16


def test_worked_example_qwen3_8b_w8():
    """The docs' worked example: full fine-tuning of Qwen3-8B on 8 GPUs, bf16 compute, one 8192-token sequence."""
    off = qwen3_8b_estimate(workers=8)
    on = qwen3_8b_estimate(workers=8, activation_checkpointing=True)
    state = 4 * QWEN3_8B_P * 4 // 8 + QWEN3_8B_ROOT * 2  # weights, gradients, 2 moments; the gathered root
    step = 2 * QWEN3_8B_LAYER * 2 + 5_648_676_608 + 151936 * 4096 * 2 + int(QWEN3_8B_LAYER * 6.5)
    assert off.peak() == state + step + 63_777_898_496
    assert on.peak() == state + step + 4_452_679_680
    assert round(off.peak() / GIB, 1) == 85.3 and round(on.peak() / GIB, 1) == 30.0
    assert math.isclose(off.peak() / 1e9, 91.6, abs_tol=0.05)  # does not fit an 80 GB GPU without checkpointing


def test_engine_step_by_hand_for_the_three_shapes():
    """One engine step: T tokens x b x (2 h + q + 2 kv + 3 i, split over TP) + 256 sequences x 3 float32 x V."""
    from eksft.pipeline.memory import engine_step_bytes

    qwen3 = ModelShape.from_hf_config(QWEN3_8B)
    assert engine_step_bytes(qwen3, "bfloat16", 1, 16384) == \
        16384 * 2 * (2 * 4096 + 4096 + 2 * 1024 + 3 * 12288) + 256 * 3 * 4 * 151936
    smol = ModelShape.from_hf_config(SMOLLM2_135M)
    assert engine_step_bytes(smol, "float32", 1, 16384) == \
        16384 * 4 * (2 * 576 + 576 + 2 * 192 + 3 * 1536) + 256 * 3 * 4 * 49152 == 591_396_864
    tiny = ModelShape.from_hf_config(tiny_config("qwen2"))
    # TP 2: one of the 2 query heads, the single KV head replicated, half the MLP and of the 320-row vocabulary
    assert engine_step_bytes(tiny, "float32", 2, 1024) == 1024 * 4 * (2 * 128 + 64 + 2 * 64 + 3 * 128) \
        + 256 * 3 * 4 * 160 == 3_899_392
    e = engine_estimate(smol, dtype="float32", block_size=32, prompts=8, samples=4, prompt_len=64, max_new_tokens=96,
                        max_model_len=1024, kv_cache_gib=1.0, batched_tokens=16384)
    assert e.peak() == SMOLLM2_P * 4 + GIB + 591_396_864
