"""Trainer -> vLLM engines through vLLM's own weight-transfer API (``vllm.distributed.weight_transfer``).

The lifecycle is vLLM's: the trainer's rank 0 calls
``WeightTransferTrainerFactory.trainer_init(init_info, client=, source=)`` once, then ``send_weights()`` after
every update; ``send_weights`` drives each engine through ``start_weight_update -> update_weights (one bucket at a
time) -> finish_weight_update``, and every trainer rank iterates the source (FSDP2 gathers are collectives).

Backends:

* ``nccl`` (engines on other GPUs) and ``ipc`` (engines on the trainer's GPUs, ``packed=True`` so that full tensors
  are not all alive at once) ship with vLLM and are CUDA-only: prepared here, not run on a GPU.
* ``cpu_gloo``, this module's own, registered in BOTH of vLLM's factories under that name (so vLLM's factory is
  what returns it): a private gloo process group between the trainer's rank 0 (group rank 0, which hosts the
  rendezvous store) and every engine worker (ranks 1..), vLLM's own ``pack_tensors`` buckets broadcast one at a
  time, and vLLM's layerwise reload on the engine side, as the shipped backends do. It also rebuilds the CPU
  build's prepacked copy of a tied ``lm_head`` (``lm_head.cpu_linear``), which the reload leaves stale.

Several engines: ``FanOutClient`` drives them all as one (each gets its own ``rank_offset`` in the group).
The engines register the backend by importing this module before building their ``LLM`` (``make_llm``); vLLM runs
its worker in the engine's process there (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import datetime
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   WeightSource, WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

from rl.common.network import free_port

CPU_BACKEND = "cpu_gloo"
GPU_BACKENDS = ("nccl", "ipc")
DEFAULT_BUCKET_BYTES = 64 * 2**20


def transfer_backend(device: str, placement: str) -> str:
    """The backend for engines on ``device``: ``cpu_gloo`` on CPU; on GPU ``ipc`` when the engines share the
    trainer's GPUs (colocated), ``nccl`` when they have their own (separate)."""
    if device != "cuda":
        return CPU_BACKEND
    return "ipc" if placement == "colocated" else "nccl"


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> tuple:
    """A gloo group of its own (torch.distributed's default group, vLLM's or the trainer's, is not touched);
    rank 0 hosts the store. Returns (group, store): keep the store alive as long as the group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size=world_size, is_master=rank == 0, timeout=timeout, use_libuv=True)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(CPU_BACKEND, store), rank, world_size, options), store


# ----------------------------------------------------------------------------- engine side


@dataclass
class GlooWorkerInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int  # 1 (the trainer's rank 0) + every engine worker
    rank_offset: int = 1  # this engine's first rank in the group
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One bucket's tensors (the bytes follow by broadcast)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    tensor_sizes: list[int]  # bytes of each tensor in the packed buffer


def refresh_tied_lm_heads(model: torch.nn.Module) -> int:
    """Rebuild the CPU build's prepacked GEMM of every unquantized ``ParallelLMHead`` from its (reloaded) weight;
    the number rebuilt. A tied head shares ``embed_tokens.weight`` but keeps its own packed copy, which the reload
    does not touch: without this the engine samples from the old head."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    heads = [m for m in model.modules()
             if isinstance(m, ParallelLMHead) and isinstance(getattr(m, "quant_method", None),
                                                             UnquantizedEmbeddingMethod)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


class GlooWeightTransferEngine(WeightTransferEngine[GlooWorkerInitInfo, GlooUpdateInfo]):
    """The engine worker's side of ``cpu_gloo``."""

    init_info_cls = GlooWorkerInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = self._store = None

    def init_transfer_engine(self, init_info: GlooWorkerInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.group, self._store = gloo_group(init_info.master_address, init_info.master_port, rank,
                                             init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with an accelerator synchronize: nothing here is asynchronous
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError(f"{CPU_BACKEND}: init_weight_transfer_engine was not called")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        buffer = torch.empty(sum(update_info.tensor_sizes), dtype=torch.uint8)
        self.group.broadcast(buffer, 0).wait()
        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        weights = unpack_tensor(buffer, update_info.names, update_info.shapes, dtypes, update_info.tensor_sizes)
        with disable_mtp_completeness_check():
            self.model.load_weights(weights)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_heads(self.model)

    def shutdown(self) -> None:
        self.group = self._store = None


# ----------------------------------------------------------------------------- trainer side


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = CPU_BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


class GlooTrainerWeightTransfer(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's side of ``cpu_gloo``: rank 0 packs the source into buckets and broadcasts them; every other
    rank only iterates the source (its part of each gather)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, init_info: GlooTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.init_info = init_info
        self.group = self._store = None
        self.last_buckets = self.last_bytes = 0

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError(f"{CPU_BACKEND}: the trainer side needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = GlooWorkerInitInfo(init_info.master_address, init_info.master_port, init_info.world_size,
                                         timeout_s=init_info.timeout_s)
        # The engines block in init_weight_transfer_engine until the group forms: ask them on a side thread
        # while this thread hosts the store and joins as rank 0.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group, engine._store = gloo_group(init_info.master_address, init_info.master_port, 0,
                                                     init_info.world_size, init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self, weight_version: str | None = None) -> None:
        if not self.is_sender:
            for _ in self.source:  # the gathers are collectives: take part, send nothing
                pass
            return
        self.client.start_weight_update()
        pairs = iter(self.source)
        buckets = sent = 0
        with ThreadPoolExecutor(max_workers=1) as pool, warnings.catch_warnings():
            # a tensor larger than a bucket is sent as a bucket of its own: by design, not worth a warning
            warnings.filterwarnings("ignore", message=r"Tensor .* exceeds buffer_size_bytes")
            # pack_tensors concatenates up to bucket_bytes of tensors into one uint8 buffer: at most one bucket
            # of full tensors (plus the tensor being gathered) is alive on this rank at a time
            while (bucket := pack_tensors(pairs, lambda item: item[1], self.init_info.bucket_bytes)) is not None:
                info = GlooUpdateInfo(bucket.names, [str(d).removeprefix("torch.") for d in bucket.dtypes],
                                      [list(s) for s in bucket.shapes], list(bucket.tensor_sizes))
                received = pool.submit(self.client.update_weights, asdict(info))  # the engines post the receive
                self.group.broadcast(bucket.packed_tensor, 0).wait()
                received.result()
                buckets, sent = buckets + 1, sent + bucket.packed_tensor.numel()
                del bucket
        self.client.finish_weight_update(weight_version)
        self.last_buckets, self.last_bytes = buckets, sent

    def shutdown(self) -> None:
        self.group = self._store = None


def register() -> None:
    """Register ``cpu_gloo`` in vLLM's worker-side and trainer-side factories (idempotent)."""
    if CPU_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(CPU_BACKEND, GlooWeightTransferEngine)
    if CPU_BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(CPU_BACKEND, GlooTrainerWeightTransfer)


register()


# ----------------------------------------------------------------------------- the trainer's view of the engines


@dataclass(frozen=True)
class TransferTarget:
    """What a trainer rank needs to reach the engines: the backend, each engine's handle (a Ray actor, or an
    engine object in the trainer's own process) and how many workers each engine runs (tensor parallel)."""

    backend: str
    engines: tuple
    workers_per_engine: int = 1
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    dtype: str | None = None  # the engines' dtype ("float32", "bfloat16"): the trainer casts on the way
    timeout_s: float = 600.0

    @property
    def world_size(self) -> int:
        return 1 + len(self.engines) * self.workers_per_engine


class FanOutClient:
    """vLLM's weight-sync client protocol over several engines: each call goes to every engine (all at once when
    they are Ray actors) and returns when all have answered. Engines are Ray actor handles or in-process engines
    with the same methods (``rl.rollout.vllm_engine.VLLMEngine``)."""

    def __init__(self, engines, workers_per_engine: int = 1):
        self.engines = list(engines)
        self.workers_per_engine = workers_per_engine

    def _call_each(self, method: str, args_per_engine: list[tuple]) -> None:
        refs = []
        for engine, args in zip(self.engines, args_per_engine):
            call = getattr(engine, method)
            if hasattr(call, "remote"):
                refs.append(call.remote(*args))
            else:
                call(*args)
        if refs:
            import ray

            ray.get(refs)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        # Backends with one group for every engine (nccl, cpu_gloo) give each engine's workers their own ranks:
        # 1.., then 1 + workers_per_engine.., ... ipc has no group (each engine opens the handles it is sent).
        if "rank_offset" not in init_info:
            self._call_each("init_weight_transfer_engine", [(init_info,)] * len(self.engines))
            return
        self._call_each("init_weight_transfer_engine",
                        [({**init_info, "rank_offset": 1 + i * self.workers_per_engine},)
                         for i in range(len(self.engines))])

    def start_weight_update(self) -> None:
        self._call_each("start_weight_update", [()] * len(self.engines))

    def update_weights(self, update_info) -> None:
        self._call_each("update_weights_bucket", [(update_info,)] * len(self.engines))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call_each("finish_weight_update", [(weight_version,)] * len(self.engines))


class WeightStream(WeightSource):
    """A trainer rank's weights as vLLM's ``WeightSource``: names, dtypes and full shapes without a gather
    (``metadata``), and a fresh pass of ``(name, full tensor)`` pairs per iteration (the gathers run as it is read).

    ``metadata_fn`` and ``iter_fn`` come from the trainer worker (``TrainerWorker.weight_metadata`` /
    ``iter_full_weights``); tensors are cast to ``dtype`` (the engine's) on the way.
    """

    def __init__(self, metadata_fn, iter_fn, dtype: torch.dtype | None = None):
        self._metadata_fn, self._iter_fn, self.dtype = metadata_fn, iter_fn, dtype

    def _cast(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self._cast(dtype), tuple(shape)) for name, dtype, shape in self._metadata_fn()]

    def __iter__(self):
        for name, tensor in self._iter_fn():
            yield name, tensor.to(self._cast(tensor.dtype)) if self.dtype is not None else tensor


def trainer_init_info(target: TransferTarget, rank: int):
    """The trainer-side init info of ``target.backend`` for trainer rank ``rank`` (rank 0 sends and hosts the
    rendezvous on this machine)."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    if target.backend == "ipc":
        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=target.bucket_bytes)
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    port = free_port() if rank == 0 else 0
    if target.backend == "nccl":
        return NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=target.world_size, rank=rank,
                                   packed=True, packed_buffer_size_bytes=target.bucket_bytes)
    if target.backend == CPU_BACKEND:
        return GlooTrainerInitInfo(master_address=host, master_port=port, world_size=target.world_size, rank=rank,
                                   bucket_bytes=target.bucket_bytes, timeout_s=target.timeout_s)
    raise ValueError(f"unknown weight-transfer backend {target.backend!r} (allowed: {CPU_BACKEND}, "
                     f"{', '.join(GPU_BACKENDS)})")


def trainer_transfer(target: TransferTarget, rank: int, source: WeightSource):
    """vLLM's trainer engine for ``target`` on trainer rank ``rank``, made by vLLM's factory."""
    client = FanOutClient(target.engines, target.workers_per_engine)
    return WeightTransferTrainerFactory.trainer_init(trainer_init_info(target, rank), client=client, source=source)
