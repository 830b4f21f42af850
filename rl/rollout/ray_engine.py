"""Rollout engines inside Ray actors: one, or several replicas that share each batch of prompts.

    engines = RayEngine("vllm", model_dir, num_engines=2, weight_transfer="cpu_gloo")
    engines.generate(prompt_ids, sampling, seeds)   # prompts dealt across the replicas, results in prompt order

Each replica is a whole engine (its own copy of the weights, its own KV cache); a step's prompts are dealt across
them by expected tokens (``deal_by_cost``) and they generate concurrently. Every request carries its own seed, so a
prompt's samples do not depend on which replica drew them (on CPU in float32; on a GPU, batch composition can change
floating-point results, so equality across replica counts is not guaranteed there).

Each replica sits in a Ray placement group of one bundle: its CPUs and its ``tensor_parallel_size`` GPUs, which a
bundle keeps on one node (vLLM's tensor-parallel workers then run as processes of the actor, ``mp`` executor).
All bundles are reserved before any engine starts, so replicas that can never all be placed fail at once with the
numbers instead of leaving a stage waiting. Without ``num_cpus`` the replicas run inside the stage's own CPUs
(`rl.common.cpu_share`): the stage waits while they generate.

New weights reach the replicas either through vLLM's weight-transfer API, driven by the trainer's rank 0
(``transfer_target()`` -> ``rl.rollout.weight_transfer``), or, without it, through ``update_weights`` (a state dict
in the Ray object store, read by every replica).
"""

from __future__ import annotations

from collections.abc import Sequence

from rl.rollout.base import Sample, SamplingConfig, Weights, weight_items


def deal_by_cost(costs: Sequence[float], num_engines: int) -> list[list[int]]:
    """Indices of ``costs`` dealt to ``num_engines`` engines so that their total costs are balanced: the largest
    first, each to the engine with the least so far (ties: the lowest engine). Each list keeps prompt order."""
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    loads = [0.0] * num_engines
    dealt: list[list[int]] = [[] for _ in range(num_engines)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        engine = min(range(num_engines), key=lambda e: (loads[e], e))
        dealt[engine].append(i)
        loads[engine] += costs[i]
    return [sorted(d) for d in dealt]


class _EngineActor:
    def __init__(self, kind: str, model_dir: str, kwargs: dict):
        from rl.rollout.in_process import make_engine

        self.engine = make_engine(kind, model_dir, **kwargs)

    def generate(self, prompt_ids, sampling, seeds):
        return self.engine.generate(prompt_ids, sampling, seeds)

    def dtype(self):
        return self.engine.dtype

    def update_weights(self, state_dict):
        self.engine.update_weights(state_dict)

    # vLLM's weight-transfer lifecycle, called by the trainer's client (rl.rollout.weight_transfer.FanOutClient)
    def init_weight_transfer_engine(self, init_info):
        self.engine.init_weight_transfer_engine(init_info)

    def start_weight_update(self):
        self.engine.start_weight_update()

    def update_weights_bucket(self, update_info):
        self.engine.update_weights_bucket(update_info)

    def finish_weight_update(self, weight_version=None):
        self.engine.finish_weight_update(weight_version)

    def shutdown(self):
        self.engine.shutdown()


class RayEngine:
    """``num_engines`` engines in Ray actors behind the one-engine interface; calls block until all answer."""

    def __init__(self, kind: str, model_dir: str, *, num_engines: int = 1, num_cpus: float | None = None,
                 num_gpus: float = 0, ready_timeout_s: float = 600, **kwargs):
        """``num_gpus``: per engine (all its tensor-parallel GPUs); ``num_cpus`` None: inside the stage's CPUs."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rl.common.cpu_share import TOKEN_CPU, shared_threads

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)  # RAY_ADDRESS, when set, points at a cluster
        self._ray = ray
        self.weight_transfer = kwargs.get("weight_transfer")
        self.workers_per_engine = kwargs.get("tensor_parallel_size", 1)
        if self.workers_per_engine > 1:
            kwargs.setdefault("distributed_executor_backend", "mp")  # the actor's own GPUs, not a Ray placement
        cpus, threads = (TOKEN_CPU, shared_threads(num_engines)) if num_cpus is None else (num_cpus, None)
        bundle = {"CPU": cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placements = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(num_engines)]
        try:
            ray.get([pg.ready() for pg in self.placements], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            for pg in self.placements:
                remove_placement_group(pg)
            raise RuntimeError(f"{num_engines} rollout engine(s) of {cpus:g} CPUs and {num_gpus:g} GPUs each could not "
                               f"all be placed within {ready_timeout_s:g} s (cluster: {ray.cluster_resources()}); "
                               "lower rollout.num_engines, rollout.num_cpus or rollout.num_gpus") from None
        # Ray sets an actor's OMP_NUM_THREADS from its reservation; an engine on a token share (TOKEN_CPU) gets its
        # part of the stage's threads instead.
        env = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}} if threads else {}
        actor_cls = ray.remote(_EngineActor)
        self.actors = [
            actor_cls.options(num_cpus=cpus, num_gpus=num_gpus, **env,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
            .remote(kind, model_dir, kwargs)
            for pg in self.placements
        ]

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[list[Sample]]:
        """Each sample's ``engine`` says which replica drew it."""
        # cost of a prompt: its prefill plus the n completions it may decode
        costs = [len(p) + sampling.n * sampling.max_new_tokens for p in prompt_ids]
        dealt = deal_by_cost(costs, len(self.actors))
        calls = [actor.generate.remote([list(prompt_ids[i]) for i in idx], sampling, [seeds[i] for i in idx])
                 for actor, idx in zip(self.actors, dealt) if idx]
        out: list[list[Sample] | None] = [None] * len(prompt_ids)
        busy = [e for e, d in enumerate(dealt) if d]
        for engine, groups in zip(busy, self._ray.get(calls)):
            for i, group in zip(dealt[engine], groups):
                for sample in group:
                    sample.engine = engine
                out[i] = group
        return out

    def transfer_target(self, bucket_bytes: int | None = None):
        """What the trainer's rank 0 needs to send weights through vLLM's API (None: engines made without it)."""
        if self.weight_transfer is None:
            return None
        from rl.rollout.weight_transfer import DEFAULT_BUCKET_BYTES, TransferTarget

        dtype = self._ray.get(self.actors[0].dtype.remote())
        return TransferTarget(self.weight_transfer, tuple(self.actors), self.workers_per_engine,
                              bucket_bytes or DEFAULT_BUCKET_BYTES, dtype)

    def update_weights(self, weights: Weights) -> None:
        # One object-store copy shared by every replica; tensors travel as numpy-backed buffers.
        ref = self._ray.put({k: v.detach().cpu() for k, v in weight_items(weights)})
        self._ray.get([actor.update_weights.remote(ref) for actor in self.actors])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            self._ray.get([actor.shutdown.remote() for actor in self.actors])
        finally:
            for actor in self.actors:
                self._ray.kill(actor)
            for pg in self.placements:
                remove_placement_group(pg)
