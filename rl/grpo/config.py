"""GRPO algorithm knobs (pydantic v2), validated.

Defaults are a plain GRPO with the common verl/TRL choices: KL penalty off (``beta_kl=0``),
no entropy bonus, symmetric clipping ``eps_low = eps_high = 0.2`` (set ``eps_high=0.28``
for DAPO's clip-higher), token-mean aggregation, std-normalised advantages (set
``normalize_std=False`` and ``aggregation="seq-mean-token-sum-norm"`` for Dr. GRPO),
dynamic sampling and overlong masking off. See `rl.grpo.loss` / `rl.grpo.advantages`.

Batch units: ``prompts_per_step`` prompts x ``group_size`` completions make one rollout
batch of ``prompts_per_step * group_size`` sequences; ``mini_batch_size`` (sequences) splits
it into optimizer steps, repeated ``ppo_epochs`` times; ``micro_batch_size`` (sequences) is
the forward/backward chunk inside a mini-batch (gradient accumulation).

Packing (``packing``, `rl.common.packing`): a group's completions run as one packed row behind ONE copy of
their prompt, with the same log-probs and gradients as the padded rows. Mini-batches and micro-batches are then
made of whole groups (the groups are shuffled into mini-batches instead of the sequences): the order of the
updates within a step changes, what GRPO estimates does not. ``padding_free`` packs the sequences without
sharing prompts (no mask: the layout varlen flash attention runs). ``micro_batch_tokens`` then bounds a
micro-batch by its packed positions instead of by ``micro_batch_size``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rl.common.lora import LoraSettings
from rl.common.packing import MAX_PACKED_LENGTH, Packing
from rl.grpo.loss import Aggregation

__all__ = ["GRPOConfig", "GRPOLoraConfig"]


class GRPOLoraConfig(LoraSettings):
    """The shared LoRA settings (dropout stays 0: it would make the trainer's log-probs differ from the
    engine's, and rho != 1 on policy) and the dtype of the frozen base."""

    # The frozen base may be bf16 (it never receives updates, so nothing is lost); the adapters train in float32.
    base_dtype: Literal["float32", "bfloat16"] = "float32"


class GRPOConfig(BaseModel):
    """Knobs of the GRPO algorithm (sampling, advantage, loss, updates, optimiser, schedule)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Sampling
    group_size: int = Field(8, description="completions sampled per prompt (G), >= 2")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (> 0: greedy groups are identical)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling, 0 < top_p <= 1")
    max_new_tokens: int = Field(256, gt=0, description="completion length limit; also Dr. GRPO's normaliser")

    # Advantage
    normalize_std: bool = Field(True, description="divide group-centred rewards by the (unbiased) group std")

    # Loss
    eps_low: float = Field(0.2, ge=0, lt=1, description="rho clipped below at 1 - eps_low")
    eps_high: float = Field(0.2, ge=0, description="rho clipped above at 1 + eps_high (DAPO clip-higher: 0.28)")
    beta_kl: float = Field(0.0, ge=0, description="weight of the k3 KL(pi || pi_ref) penalty; 0 = off, no reference model")
    alpha_entropy: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    aggregation: Aggregation = Field(
        "token-mean",
        description="token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum-norm (Dr. GRPO, / max_new_tokens)",
    )

    # Batch construction
    dynamic_sampling: bool = Field(False, description="drop zero-variance groups and sample more prompts (DAPO)")
    max_sampling_rounds: int = Field(3, ge=1, description="most generation rounds per step with dynamic_sampling")
    mask_truncated: bool = Field(False, description="exclude completions that hit max_new_tokens without EOS")

    # Updates
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    mini_batch_size: int | None = Field(None, ge=1, description="sequences per optimizer step; None = whole batch")
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward/backward (gradient accumulation); "
                                                        "with packing rounded up to whole groups")
    packing: Packing = Field(
        "auto", description="shared_prompt: each group's completions in one packed row behind one copy of the prompt "
                            "(same log-probs and gradients; mini- and micro-batches of whole groups); padding_free: "
                            "the sequences in one row without padding, separated by position ids (varlen flash "
                            "attention on a GPU); off: padded rows; auto: the device kind's choice "
                            "(rl.common.packing.PACKING_BY_DEVICE)")
    skip_zero_gradient: bool = Field(
        True, description="a micro-batch whose loss has no gradient (every trained sequence with advantage 0, e.g. "
                          "zero-variance groups, and beta_kl = alpha_entropy = 0) runs its forward for the metrics "
                          "but no backward: the update is the same; false: every micro-batch runs its backward "
                          "(as verl and TRL do)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, le=MAX_PACKED_LENGTH,
        description="with packing: whole groups (padding_free: sequences) per forward/backward up to this many "
                    "packed positions (a longer one runs alone) instead of micro_batch_size")

    # Precision: bf16 autocast for the trainer's forward passes (weights and optimizer stay float32)
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast in the trainer; auto: where the device computes bf16 natively "
                            "(CUDA sm_80+, CPUs with AVX512_BF16/AMX), float32 elsewhere (rl.common.precision)")

    lora: GRPOLoraConfig = Field(default_factory=GRPOLoraConfig)

    # Trainer workers (rl.workers): the policy, reference and optimizer sharded (FSDP2) over this many ranks
    workers: int = Field(1, ge=1, description="trainer ranks (FSDP2); 1 = one rank in the stage's process, "
                                              "N > 1 = N Ray actors (one GPU each on GPU machines)")
    worker_cpus: float | None = Field(
        None, gt=0, description="CPUs each Ray trainer worker reserves (rl.workers > 1); None: the workers run inside "
                                "the stage's own CPUs (resources.rl.num_cpus), which they share (threads = the "
                                "stage's / workers): the controller and its engine wait while they train")
    worker_timeout_s: float = Field(3600.0, gt=0, description="a call to the Ray trainer workers that takes "
                                                             "longer fails the stage (a dead or hung rank)")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward instead of keeping them: "
                           "less memory per rank, one more forward of the layers")
    cpu_offload: bool = Field(
        False, description="keep the sharded parameters, gradients and AdamW state in CPU memory between uses "
                           "(FSDP2's CPUOffloadPolicy; for GPUs short of memory)")

    # Optimiser
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")

    # Schedule and reward
    prompts_per_step: int = Field(8, ge=1, description="prompts (groups) per rollout batch")
    steps: int = Field(100, ge=1, description="training steps (rollout batches)")
    save_every: int = Field(10, ge=1, description="checkpoint every this many steps")
    seed: int = Field(0, ge=0)
    format_weight: float = Field(0.0, ge=0, description="weight of the optional format reward term")
    answer_fallback: Literal["none", "last_number"] = Field(
        "none", description="answer of a completion without a closed \\boxed{}: none (scores 0) or its last number")
    reward_timeout_s: float = Field(5.0, gt=0, description="verifier time limit per completion (s)")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"group_size must be >= 2, got {v}: GRPO's advantage compares the completions of one "
                "prompt with each other, so a group of 1 always has advantage 0 (and no sample std)"
            )
        return v

    @field_validator("packing", mode="before")
    @classmethod
    def _packing(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false
        if v is False:
            return "off"
        if v is True:
            raise ValueError("packing: true is ambiguous: use auto, shared_prompt or padding_free")
        return v

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        for b in v:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"adam_betas must each be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _batches(self) -> GRPOConfig:
        if self.mini_batch_size is not None and self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be <= prompts_per_step * group_size "
                f"({self.rollout_batch_size} sequences per rollout batch)"
            )
        if self.packing in ("auto", "shared_prompt") and self.mini_batch_size is not None and \
                self.mini_batch_size % self.group_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of group_size ({self.group_size}) with "
                f"packing: {self.packing} (mini-batches of whole groups); set packing: off or padding_free for any size"
            )
        if self.micro_batch_tokens is not None and self.packing == "off":
            raise ValueError("micro_batch_tokens bounds packed micro-batches: it needs packing auto, shared_prompt or "
                             "padding_free")
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per rollout batch: ``prompts_per_step * group_size``."""
        return self.prompts_per_step * self.group_size

    def policy_loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `rl.grpo.loss.policy_loss` set by this config."""
        return {
            "eps_low": self.eps_low,
            "eps_high": self.eps_high,
            "beta": self.beta_kl,
            "alpha": self.alpha_entropy,
            "aggregation": self.aggregation,
            "max_response_len": float(self.max_new_tokens),
        }
