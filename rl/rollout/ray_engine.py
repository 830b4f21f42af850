"""Any rollout engine inside a Ray actor, with declared CPU/GPU needs (vLLM-CPU runs fine with num_cpus=1)."""

from __future__ import annotations

from collections.abc import Sequence

from rl.rollout.base import Sample, SamplingConfig, Weights, weight_items


class _EngineActor:
    def __init__(self, kind: str, model_dir: str, kwargs: dict):
        from rl.rollout.in_process import make_engine

        self.engine = make_engine(kind, model_dir, **kwargs)

    def generate(self, prompt_ids, sampling, seeds):
        return self.engine.generate(prompt_ids, sampling, seeds)

    def update_weights(self, state_dict):
        self.engine.update_weights(state_dict)

    def shutdown(self):
        self.engine.shutdown()


class RayEngine:
    """Same interface as the in-process engines; calls block until the actor answers."""

    def __init__(self, kind: str, model_dir: str, *, num_cpus: float = 1, num_gpus: float = 0, **kwargs):
        import ray

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)  # RAY_ADDRESS, when set, points at a cluster
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_EngineActor)
        self._ray = ray
        self.actor = actor_cls.remote(kind, model_dir, kwargs)

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[list[Sample]]:
        return self._ray.get(self.actor.generate.remote([list(p) for p in prompt_ids], sampling, list(seeds)))

    def update_weights(self, weights: Weights) -> None:
        # One object-store copy shared by every reader; tensors travel as numpy-backed buffers.
        ref = self._ray.put({k: v.detach().cpu() for k, v in weight_items(weights)})
        self._ray.get(self.actor.update_weights.remote(ref))

    def shutdown(self) -> None:
        try:
            self._ray.get(self.actor.shutdown.remote())
        finally:
            self._ray.kill(self.actor)
