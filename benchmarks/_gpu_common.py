"""What the prepared GPU scripts share (stdlib only: the lent GPU machine has torch and transformers, no more).

The model shapes they build at random (no hub there), and loading one of this repository's module files by
path (so that a script needs none of the packages an ``rl`` package ``__init__`` imports).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-0.5B's shape (tied embeddings): a real model's memory and step time without its weights.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# For the CPU smoke tests (head_dim 64: vLLM's CPU attention rejects 16).
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)


def load_module_file(name: str, path: Path):
    """Import the file ``path`` as module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
