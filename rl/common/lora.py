"""LoRA adapters on a frozen base, for both stages (the SFT cold start in eksft, and GRPO).

  * ``LoraSettings``: the fields both stages' ``lora`` sections have (each stage subclasses it for its defaults);
  * ``wrap_with_lora``: the trainable PEFT model (fresh adapters, or saved ones to resume);
  * ``adapters_disabled``: the base alone, i.e. the reference, with no second copy in memory;
  (GRPO merges base + scaled B @ A out of place, tensor by tensor, in its trainer workers:
  `rl.workers.trainer_worker.TrainerWorker.iter_full_weights`.)
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ADAPTER_DIR = "adapter"  # GRPO: inside checkpoints/step-N/, beside the merged HF weights

LoraDropout = Annotated[float, Field(ge=0, lt=1)]


class LoraSettings(BaseModel):
    """Train LoRA adapters instead of every weight (the reference is then the base with adapters off).

    A stage with another dropout default redeclares ``dropout: LoraDropout = <its default>``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: LoraDropout = 0.0
    target_modules: str | list[str] = "all-linear"


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
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, back in its previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def adapters_disabled(peft_model):
    """The reference policy: the base model alone (dropout off while it runs)."""
    with eval_mode(peft_model), peft_model.disable_adapter():
        yield peft_model
