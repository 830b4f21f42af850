"""The rollout interface every engine implements.

    prompt_ids = prompt_token_ids(tokenizer, [messages, ...], template_kwargs)  # chat prompts -> token ids
    engine.generate(prompt_ids, SamplingConfig(n=8, ...), seeds)  -> list (per prompt) of list (per sample) of Sample
    engine.update_weights(state_dict)                               # after every trainer update
    engine.shutdown()

Log-probs are those of the sampling distribution (logits / temperature), so a trainer that
computes ``log_softmax(logits / temperature)`` with the same weights gets the same numbers:
that gap is logged every step and is a correctness test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


def prompt_token_ids(tokenizer, prompts: Sequence[list[dict[str, str]]],
                     template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """The engines' input: each chat prompt through the tokenizer's chat template, ready for the answer.

    ``template_kwargs``: variables of the chat template (a recipe's ``data.chat_template_kwargs``, e.g.
    ``enable_thinking``), the same ones the cold start rendered its examples with.
    """
    ids = []
    for messages in prompts:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                            **(template_kwargs or {}))
        ids.append(list(out["input_ids"] if isinstance(out, dict) else out))  # some tokenizers return a mapping
    return ids


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # engine log-prob of each completion token under the sampling distribution
    text: str
    finish_reason: str  # "stop" (EOS/stop token) or "length" (hit max_new_tokens: truncated)
    engine: int = 0  # which replica drew it (`rl.rollout.ray_engine.RayEngine`): the log-prob gap is kept per engine

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[list[Sample]]: ...

    def update_weights(self, weights: Weights) -> None:
        """Serve new weights: a state dict, or (HF name, tensor) pairs read once, in order (a trainer worker
        group streams its full weights one tensor at a time)."""

    def shutdown(self) -> None: ...


Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def weight_items(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a state dict or of a stream of pairs."""
    return weights.items() if isinstance(weights, Mapping) else weights


class RolloutConfig(BaseModel):
    """Where and how rollouts run (recipe section ``rollout``)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["vllm", "hf"] = "vllm"
    # Run the engine in a Ray actor (declared resources below) instead of this process.
    use_ray: bool = False
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs each engine actor reserves. None: the engines share the stage's own CPUs (the "
                                "stage waits while they generate, as it does for its trainer workers): a token "
                                "reservation each and the stage's threads split between them")
    num_gpus: float = Field(0, ge=0)
    # auto: bfloat16 where the device computes it natively, float32 elsewhere (rl.common.precision)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(2048, gt=0)
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV-cache size (on CPU: host RAM)")
    enforce_eager: bool | None = Field(
        None, description="vLLM without torch.compile (and without CUDA graphs). None: eager on a CPU, where "
                          "compiling adds ~35-100 s to every engine start for 1.25-1.4x the bf16 generation throughput "
                          "(worth it in long runs: set false), compiled on a GPU (vLLM's default)")
    num_engines: int = Field(1, ge=1, description="engine replicas (Ray actors, num_cpus/num_gpus each); a batch's "
                                                  "prompts are dealt across them by expected tokens")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism; GPU only)")
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="colocated: one engine in the trainer's process (on a GPU: sharing its GPUs, asleep "
                                 "during updates); separate: engines in Ray actors on their own devices. More than one "
                                 "engine is always separate")
    weight_sync: Literal["transfer", "reload"] = Field(
        "transfer", description="transfer: the trainer's rank 0 sends weights through vLLM's weight-transfer API "
                                "(cpu_gloo on CPU, nccl or ipc on GPU) where it can reach the engines; reload: the "
                                "controller passes the gathered weights to each engine's reload")
    bucket_mb: float = Field(64.0, gt=0, description="weight-transfer bucket: MiB of full tensors sent at a time")

    @model_validator(mode="after")
    def _engines_fit(self):
        if self.tensor_parallel_size > 1 and self.num_gpus == 0:
            raise ValueError("tensor_parallel_size > 1 splits an engine over GPUs: set num_gpus (per engine) too")
        if self.num_engines > 1 and self.engine != "vllm":
            raise ValueError(f"num_engines > 1 needs engine: vllm (got {self.engine})")
        return self

    @property
    def in_ray_actors(self) -> bool:
        return self.use_ray or self.placement == "separate" or self.num_engines > 1
