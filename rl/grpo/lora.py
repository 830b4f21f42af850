"""GRPO with LoRA adapters: the base stays frozen (in float32 or bfloat16), only the adapters train.

What changes against full fine-tuning, and where:
  * the policy is a PEFT model; the optimizer holds only the adapter weights (float32);
  * the reference is the same model with its adapters disabled (no second copy in memory), unless the
    caller gives another reference model (the trainer then loads that one);
  * the rollout engine and the saved checkpoints get plain HF weights, base + scaled B @ A,
    computed out of place (merging in place and unmerging would round a bf16 base each step);
  * resuming reloads the adapters saved beside each checkpoint.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"  # inside checkpoints/step-N/, beside the merged HF weights


def wrap_with_lora(model, settings, adapter_dir: str | Path | None = None):
    """A trainable PEFT model over ``model``: fresh adapters, or the ones saved in ``adapter_dir``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model.requires_grad_(False)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return get_peft_model(model, LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type="CAUSAL_LM"))


@contextmanager
def adapters_disabled(peft_model):
    """The reference policy: the base model alone (dropout off while it runs)."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield peft_model
    finally:
        peft_model.train(was_training)


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """HF-named weights of the base with every LoRA delta added, in the base weights' dtype.

    The model is not modified. Non-LoRA tensors are returned as they are (no copy).
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    state = {}
    for name, tensor in inner.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return state
