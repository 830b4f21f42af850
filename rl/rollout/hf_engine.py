"""Fallback engine on transformers ``generate`` (slower; no vLLM needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rl.rollout.base import Sample, SamplingConfig, Weights, weight_items


class HFEngine:
    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, trust_remote_code: bool = False,
                 device: str | None = None, batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(self.model.generation_config.eos_token_id if isinstance(
            self.model.generation_config.eos_token_id, list) else [self.model.generation_config.eos_token_id])
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[list[Sample]]:
        results = []
        for ids, seed in zip(prompt_ids, seeds):
            torch.manual_seed(int(seed))
            batch = torch.tensor([list(ids)], device=self.device).repeat(sampling.n, 1)
            out = self.model.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=sampling.temperature > 0,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
                output_scores=True, return_dict_in_generate=True, pad_token_id=self.pad_id,
            )
            # scores are the processed logits (after temperature / top-p): normalise them into log-probs.
            logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            samples = []
            for row in range(sampling.n):
                completion = out.sequences[row, len(ids):].tolist()
                end = next((i + 1 for i, t in enumerate(completion) if t in self.eos_ids), None)
                finished = end is not None
                completion = completion[:end] if finished else completion
                samples.append(Sample(
                    prompt_ids=list(ids), completion_ids=completion,
                    logprobs=logprobs[row, : len(completion)].float().tolist(),
                    text=self.tokenizer.decode(completion, skip_special_tokens=True),
                    finish_reason="stop" if finished else "length",
                ))
            results.append(samples)
        return results

    @torch.no_grad()
    def update_weights(self, weights: Weights) -> None:
        """Copy each tensor in as it arrives (names the model does not have are skipped)."""
        params = self.model.state_dict()
        for name, tensor in weight_items(weights):
            if name in params:
                params[name].copy_(tensor)

    def shutdown(self) -> None:
        del self.model
