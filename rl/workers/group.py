"""N `TrainerWorker` Ray actors forming one torch.distributed process group, driven by one controller.

The actors sit in a Ray placement group with one bundle per worker (``PACK``: on as few nodes as possible, so
the ranks of one node share it; a larger group spans nodes with the same code). Rank 0 picks the rendezvous
address; every rank then joins at once. Each call fans out to every rank and returns rank 0's answer, or the
answers reassembled in the controller's order (log-probs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rl.common.cpu_share import TOKEN_CPU, shared_threads
from rl.workers.batch import MicroBatch, split_across_ranks, unsplit
from rl.workers.trainer_worker import TrainerWorker, WorkerSettings

__all__ = ["InProcessWorkerGroup", "WorkerFailure", "WorkerGroup", "make_worker_group", "worker_resources",
           "workers_device"]

class WorkerFailure(RuntimeError):
    """A trainer worker died, failed or did not answer: the message names the rank, its pid and Ray actor, and
    the call; the cause (Ray's error, or the rank's own exception) is chained. The group is broken after it."""

    def __init__(self, message: str, rank: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.rank, self.pid = rank, pid


class WorkerGroup:
    """``num_workers`` ranks, each with ``num_cpus`` CPUs and ``num_gpus`` GPUs (1 on GPU machines).

    ``call_timeout_s`` bounds every call: a rank that dies or hangs fails the call (and so the stage) instead of
    blocking the controller forever.
    """

    def __init__(self, settings: WorkerSettings, num_workers: int, *, num_cpus: float = 1, num_gpus: float = 0,
                 omp_threads: int = 1, call_timeout_s: float | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)  # RAY_ADDRESS, when set, points at a cluster
        self._ray, self.num_workers, self.call_timeout_s = ray, num_workers, call_timeout_s
        self.broken = False  # a call failed: the process group cannot be trusted any more
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([bundle] * num_workers, strategy="PACK")
        ray.get(self.placement.ready(), timeout=call_timeout_s)
        actor_cls = ray.remote(TrainerWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(omp_threads)}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(settings, rank, num_workers)
            for rank in range(num_workers)
        ]
        self.identities: list[dict] = [{"rank": r} for r in range(num_workers)]  # filled in just below
        self.identities = self._all("identity")
        addr, port = self._get(self.actors[0].rendezvous_address.remote(), "rendezvous_address")
        self._all("setup", addr, port)

    @property
    def pids(self) -> list[int]:
        """Each rank's process id (rank order)."""
        return [i["pid"] for i in self.identities]

    def _describe(self, rank: int) -> str:
        ident = self.identities[rank]
        return (f"trainer worker rank {rank} of {self.num_workers} (Ray actor {ident.get('actor_id', '?')}, "
                f"pid {ident.get('pid', '?')})")

    def _fail(self, rank: int | None, method: str, cause: BaseException | None) -> WorkerFailure:
        """Mark the group broken (the surviving ranks may be stuck in a collective: shutdown kills them) and
        build the error that names the rank."""
        self.broken = True
        if rank is None:
            return WorkerFailure(f"trainer workers did not answer {method} within {self.call_timeout_s} s "
                                 "(rl.worker_timeout_s)")
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        message = f"{self._describe(rank)} failed in {method}: {type(cause).__name__}: {first_line}"
        dead = None if isinstance(cause, self._ray.exceptions.RayActorError) else self._dead_peer(rank)
        if dead is not None:  # e.g. gloo saw the peer's connection close before Ray reported the death
            return WorkerFailure(f"{self._describe(dead)} died during {method} (then {message})",
                                 rank=dead, pid=self.identities[dead].get("pid"))
        return WorkerFailure(message, rank=rank, pid=self.identities[rank].get("pid"))

    def _dead_peer(self, rank: int, wait_s: float = 2.0) -> int | None:
        """A rank other than ``rank`` whose actor is dead, if Ray says so within ``wait_s`` (a rank that failed
        in a collective often failed because a peer died; the live peers, blocked in the collective, answer
        nothing and are not waited for longer)."""
        refs = {self.actors[r].identity.remote(): r for r in range(self.num_workers) if r != rank}
        if not refs:
            return None
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
        for ref in ready:
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayActorError:
                return refs[ref]
            except Exception:
                pass
        return None

    def _get(self, refs, method: str = "a call", ranks: list[int] | None = None):
        """The answers of ``refs`` (one ref or a list, rank order unless ``ranks`` says), failing as soon as any
        rank fails: the others are then blocked in a collective that will never complete, so waiting for them
        all would hang until the process-group timeout. ``call_timeout_s`` bounds the whole call."""
        if not isinstance(refs, list):
            return self._get([refs], method, ranks)[0]
        ranks = list(range(len(refs))) if ranks is None else ranks
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        deadline = None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, pending = self._ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise self._fail(None, method, None)
            try:
                self._ray.get(ready[0])  # raises the rank's error (or ActorDiedError) now
            except Exception as err:
                raise self._fail(rank_of[ready[0]], method, err) from err
        return self._ray.get(refs)

    def _all(self, method: str, *args) -> list:
        return self._get([getattr(a, method).remote(*args) for a in self.actors], method)

    def init_weight_transfer(self, target) -> None:
        """Every rank joins vLLM's weight transfer to ``target``'s engines (rank 0 sends; see `TrainerWorker`)."""
        self._all("init_weight_transfer", target)

    def send_weights(self) -> dict[str, float]:
        """Rank 0 streams the gathered weights to the engines, bucket by bucket, the others gather with it."""
        return self._all("send_weights")[0]

    def load_models(self, model_dir: str | None = None) -> None:
        """Every rank reloads the policy (from ``model_dir``, default the settings') with a fresh optimizer."""
        self._all("load_models", model_dir)

    def update(self, micro_batches: Sequence[MicroBatch], loss_settings: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on a mini-batch: rank r trains micro-batches r, r + N, ... (`split_across_ranks`);
        ``loss_settings``: the keyword arguments of `rl.grpo.loss.policy_loss`."""
        shares = split_across_ranks(micro_batches, self.num_workers)
        return self._get([a.update.remote(share, loss_settings) for a, share in zip(self.actors, shares)], "update")[0]

    def train_step(self, micro_batches: Sequence, step_loss, learning_rate: float | None = None) -> dict[str, float]:
        """One optimizer step on a global batch with a caller-defined loss (`rl.workers.batch.StepLoss`): rank r
        trains micro-batches r, r + N, ...; returns the metrics of the whole batch."""
        shares = split_across_ranks(micro_batches, self.num_workers, step_loss.padding)
        refs = [a.train_step.remote(share, step_loss, learning_rate) for a, share in zip(self.actors, shares)]
        return self._get(refs, "train_step")[0]

    def seed(self, seed: int) -> None:
        """Each rank seeds its torch RNG with ``seed + rank``."""
        self._all("seed", seed)

    def save_rng_state(self, directory: str) -> None:
        self._all("save_rng_state", str(directory))

    def load_rng_state(self, directory: str) -> None:
        self._all("load_rng_state", str(directory))

    def logprobs(self, micro_batches: Sequence[MicroBatch], reference: bool = False) -> list[list[float]]:
        """Per sample, in the order of ``micro_batches``: the completion log-probs (old policy or reference)."""
        shares = split_across_ranks(micro_batches, self.num_workers)
        per_rank = self._get([a.logprobs.remote(share, reference) for a, share in zip(self.actors, shares)],
                             "reference log-probs" if reference else "log-probs")
        return unsplit(per_rank, len(micro_batches))

    def full_state_dict(self):
        """Full weights with HF names (CPU tensors), gathered one tensor at a time on rank 0."""
        return self._all("full_state_dict")[0]

    def module_state_dict(self):
        """The policy's unmerged state dict (PEFT names with LoRA), full CPU tensors in their dtypes, from rank 0."""
        return self._all("module_state_dict")[0]

    def iter_full_weights(self):
        """(HF name, full CPU tensor) pairs, one at a time: rank 0 streams them (a Ray streaming generator) while
        the other ranks take part in each gather (a plain call each). Consume it to the end.

        Every wait covers rank 0's next tensor AND the other ranks' calls, so a rank that dies mid-stream fails
        the stream at once, not after rank 0 waited out the process-group timeout in that rank's gather."""
        method = "the weight stream"
        stream = self.actors[0].stream_full_weights.options(num_returns="streaming").remote()
        others = {a.gather_full_weights.remote(): rank for rank, a in enumerate(self.actors) if rank}
        deadline = None if self.call_timeout_s is None else time.monotonic() + self.call_timeout_s
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _ = self._ray.wait([stream, *others], num_returns=1, timeout=left)
            if not ready:
                raise self._fail(None, method, None)
            if ready[0] is not stream:  # another rank finished (fine) or died (its error now)
                rank = others.pop(ready[0])
                try:
                    self._ray.get(ready[0])
                except Exception as err:
                    raise self._fail(rank, method, err) from err
                continue
            try:
                ref = next(stream)
            except StopIteration:
                break
            try:
                item = self._ray.get(ref)
            except Exception as err:
                raise self._fail(0, method, err) from err
            yield item
        self._get(list(others), method, list(others.values()))  # the other ranks' ends: surfaces their errors

    def save_checkpoint(self, path: str) -> None:
        """Sharded policy and optimizer state (torch.distributed.checkpoint), each rank its own shards."""
        self._all("save_checkpoint", str(path))

    def load_checkpoint(self, path: str) -> None:
        self._all("load_checkpoint", str(path))

    def save_hf(self, path: str) -> None:
        """A consolidated HF model directory, written by rank 0."""
        self._all("save_hf", str(path))

    def local_storage_bytes(self) -> list[dict[str, int]]:
        """Per rank: bytes of parameter shards, gradient shards and optimizer state."""
        return self._all("local_storage_bytes")

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            if not self.broken:
                self._get([a.shutdown.remote() for a in self.actors], "shutdown")
        finally:
            for actor in self.actors:
                self._ray.kill(actor)
            remove_placement_group(self.placement)


class InProcessWorkerGroup:
    """The same interface and the same `TrainerWorker` code with ONE rank in the controller's process (no Ray):
    what ``rl.workers: 1`` runs. The rank joins the process's default process group when one exists (an
    in-process vLLM engine makes a one-rank group) or makes its own. With bf16 compute (or a bf16 LoRA base)
    FSDP2 over one rank shards nothing but computes exactly as in a larger group (mixed precision, float32
    gradient reduction, DTensor clipping); computing in float32 the rank uses the module as it is (FSDP would
    only copy weights and gradients through its one-rank gather and reduce: the same numbers)."""

    num_workers = 1
    broken = False

    def __init__(self, settings: WorkerSettings):
        from rl.workers.trainer_worker import free_port

        self.worker = TrainerWorker(settings, 0, 1)
        self.worker.setup("127.0.0.1", free_port())

    def load_models(self, model_dir: str | None = None) -> None:
        self.worker.load_models(model_dir)

    def update(self, micro_batches: Sequence[MicroBatch], loss_settings: dict[str, Any]) -> dict[str, float]:
        return self.worker.update(list(micro_batches), loss_settings)

    def train_step(self, micro_batches: Sequence, step_loss, learning_rate: float | None = None) -> dict[str, float]:
        return self.worker.train_step(list(micro_batches), step_loss, learning_rate)

    def seed(self, seed: int) -> None:
        self.worker.seed(seed)

    def save_rng_state(self, directory: str) -> None:
        self.worker.save_rng_state(str(directory))

    def load_rng_state(self, directory: str) -> None:
        self.worker.load_rng_state(str(directory))

    def logprobs(self, micro_batches: Sequence[MicroBatch], reference: bool = False) -> list[list[float]]:
        return unsplit([self.worker.logprobs(list(micro_batches), reference)], len(micro_batches))

    def full_state_dict(self):
        return self.worker.full_state_dict()

    def module_state_dict(self):
        return self.worker.module_state_dict()

    def iter_full_weights(self):
        return self.worker.iter_full_weights()

    def init_weight_transfer(self, target) -> None:
        self.worker.init_weight_transfer(target)

    def send_weights(self) -> dict[str, float]:
        return self.worker.send_weights()

    def save_checkpoint(self, path: str) -> None:
        self.worker.save_checkpoint(str(path))

    def load_checkpoint(self, path: str) -> None:
        self.worker.load_checkpoint(str(path))

    def save_hf(self, path: str) -> None:
        self.worker.save_hf(str(path))

    def local_storage_bytes(self) -> list[dict[str, int]]:
        return [self.worker.local_storage_bytes()]

    def shutdown(self) -> None:
        self.worker.shutdown()


def make_worker_group(settings: WorkerSettings, num_workers: int, **ray_options):
    """``num_workers`` ranks: Ray actors (`WorkerGroup`), or for one rank the same worker in this process
    (`InProcessWorkerGroup`: no Ray, no copy of the weights between processes)."""
    if num_workers == 1:
        return InProcessWorkerGroup(settings)
    return WorkerGroup(settings, num_workers, **ray_options)


def workers_device(num_workers: int) -> str:
    """Where a stage's trainer ranks compute: ``cuda`` when this process sees a GPU, or (Ray workers) when the Ray
    cluster has GPUs, so that a stage whose own process needs no GPU (the cold start's controller only batches
    data) can place N workers on the N GPUs of a node; ``cpu`` otherwise."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if num_workers > 1:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    return "cpu"


def worker_resources(num_workers: int, worker_cpus: float | None, call_timeout_s: float | None, device: str) -> dict:
    """The `WorkerGroup` options of a stage's Ray workers (``workers`` > 1): a GPU each on GPU machines.

    CPUs: with ``worker_cpus`` None the workers live inside the stage's own CPU budget (the stage task holds its
    ``resources.<kind>.num_cpus``, its torch thread count here): they reserve a token share in Ray and split the
    stage's threads. The stage's own process waits while they train (the RL controller's engine generates while
    they wait), so it never needs both at once; two stages of two workers each then run on 2 cores. With
    ``worker_cpus`` set, each worker reserves that many CPUs (and as many threads) on top of the stage's."""
    import math

    if worker_cpus is None:
        cpus, threads = TOKEN_CPU, shared_threads(num_workers)
    else:
        cpus, threads = worker_cpus, max(1, math.floor(worker_cpus))
    return dict(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, omp_threads=threads,
                call_timeout_s=call_timeout_s)
