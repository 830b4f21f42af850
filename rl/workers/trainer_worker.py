"""One rank of the trainer worker group: an FSDP2-sharded policy (and reference), AdamW on the shards, the GRPO
update on this rank's share of the micro-batches.

Plain Python: `WorkerGroup` runs it as a Ray actor (one per GPU, or N processes on a CPU); a single worker can
also run in this process. Sharding follows torch's FSDP2 recipe: ``fully_shard`` on every decoder layer, then
on the root (embeddings, final norm and LM head), on a 1-D device mesh over all ranks.

Precision: the sharded master weights are float32; ``MixedPrecisionPolicy(param_dtype=bf16)`` makes FSDP
all-gather and compute in bf16 only where `rl.common.precision.resolve_bf16` says the device computes bf16
natively; gradients are reduced in float32 either way.

Gradients are SUMMED across ranks, not averaged (divide factor 1): each micro-batch loss is already its share of
the mini-batch loss (global token / sequence counts, all-reduced here), so the sum over every micro-batch of
every rank is the mini-batch gradient, whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from rl.common.host_memory import release_free_memory, reusing_freed_memory
from rl.common.network import free_port
from rl.grpo.loss import loss_has_gradient, policy_loss
from rl.workers.batch import MicroBatch, dense_rows, packed_sequence_logprobs, sequence_logprobs

__all__ = ["TrainerWorker", "WorkerSettings", "default_process_group_timeout_s", "free_port"]

# The process-group timeout when WorkerSettings.process_group_timeout_s is None. On CPU the ranks run the same
# work in lock step (a collective per layer), so a peer silent for 2 minutes is dead; on GPU the first NCCL
# collectives may wait for slow model loading / compilation, hence the longer bound.
CPU_PROCESS_GROUP_TIMEOUT_S = 120.0
GPU_PROCESS_GROUP_TIMEOUT_S = 600.0
# One rank: keep the compute-dtype parameters unsharded and the gradients unsharded (float32) across an optimizer
# step's micro-batches, in the GRPO update and the cold start's step (`_one_rank_accumulation`). Read per step.
ONE_RANK_UNSHARDED_ACCUMULATION = True


def default_process_group_timeout_s(device_type: str) -> float:
    return GPU_PROCESS_GROUP_TIMEOUT_S if device_type == "cuda" else CPU_PROCESS_GROUP_TIMEOUT_S


@dataclass(frozen=True)
class WorkerSettings:
    """What every rank needs to build the same sharded policy, optimizer and loss."""

    model_dir: str
    reference_dir: str | None = None  # None: no reference model (KL term off and no kl metric)
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    bf16: Literal["auto"] | bool = "auto"
    temperature: float = 1.0
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    trust_remote_code: bool = False
    # How long a rank waits in one collective for the others before failing (gloo / NCCL timeout). None: 120 s
    # on CPU, 600 s on GPU (`default_process_group_timeout_s`). The controller notices a dead rank at once (Ray);
    # this is the bound for the ranks left waiting, e.g. rank 0 mid weight-stream when a peer dies.
    process_group_timeout_s: float | None = None
    # LoRA adapters (rl.grpo.GRPOLoraConfig) on a frozen base in its ``base_dtype`` (float32 or bfloat16; a
    # separate reference too): only the float32 adapters train, and the reference is the base with the adapters
    # off unless ``reference_dir`` names another model.
    lora: Any = None
    seed: int = 0  # seeds the fresh LoRA adapters (the same on every rank)
    # The stored dtype of the policy's weights without LoRA (float32: float32 master weights, the default; the
    # cold start follows model.dtype). With LoRA the frozen base takes ``lora.base_dtype`` when the settings have
    # one, else this.
    dtype: str = "float32"
    # How the GRPO forwards lay out a micro-batch (`rl.common.packing`): "shared_prompt" packs each group's
    # completions behind one copy of its prompt, "padding_free" packs the sequences without a mask (varlen flash
    # attention), "off" runs padded rows, "auto" is the device kind's choice.
    packing: str = "auto"
    # A GRPO micro-batch whose loss has no gradient (`rl.grpo.loss.loss_has_gradient`: e.g. zero-variance groups,
    # all advantages 0) runs its forward for the metrics without autograd and no backward; False: every
    # micro-batch runs its backward (as verl and TRL do). The update is the same either way.
    skip_zero_gradient: bool = True

    @classmethod
    def from_grpo(cls, config, model_dir: str, reference_dir: str | None = None, **overrides) -> WorkerSettings:
        """The settings a `rl.grpo.config.GRPOConfig` implies (the reference is loaded when given)."""
        return cls(model_dir=model_dir, reference_dir=reference_dir, learning_rate=config.learning_rate,
                   weight_decay=config.weight_decay, adam_betas=tuple(config.adam_betas),
                   max_grad_norm=config.max_grad_norm, bf16=config.bf16, temperature=config.temperature,
                   lora=config.lora if config.lora.enabled else None, seed=config.seed,
                   activation_checkpointing=config.activation_checkpointing, cpu_offload=config.cpu_offload,
                   **{"packing": config.packing, "skip_zero_gradient": config.skip_zero_gradient, **overrides})


def _compute_call(method):
    """A worker call that runs forwards/backwards: on a CPU within `reusing_freed_memory` (its large temporaries
    reuse freed heap instead of faulting in fresh pages); on every device the freed memory goes back at the end."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.device.type != "cpu":
            try:
                return method(self, *args, **kwargs)
            finally:
                release_free_memory()
        with reusing_freed_memory():
            return method(self, *args, **kwargs)

    return call


class TrainerWorker:
    """One rank. Construct, then `setup` on every rank at once (it joins the process group)."""

    def __init__(self, settings: WorkerSettings, rank: int, world_size: int):
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.model = self.reference = self.optimizer = None

    # ------------------------------------------------------------------ setup
    def identity(self) -> dict:
        """Who this rank is, for error messages that name a dead worker: rank, pid, Ray actor id (in Ray)."""
        import os

        actor_id = None
        try:
            import ray

            if ray.is_initialized():
                actor_id = ray.get_runtime_context().get_actor_id()
        except ImportError:
            pass
        return {"rank": self.rank, "pid": os.getpid(), "actor_id": actor_id}

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): where the other ranks find rank 0."""
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # not in Ray: one host
            host = "127.0.0.1"
        return host, free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU), then `load_models`."""
        from torch.distributed.device_mesh import init_device_mesh

        from rl.common.precision import resolve_bf16, stage_device

        s = self.settings
        self.device = torch.device(stage_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray shows each actor its own GPU as device 0
            self.device = torch.device("cuda", 0)
        self.owns_process_group = not dist.is_initialized()
        if self.owns_process_group:
            timeout = s.process_group_timeout_s or default_process_group_timeout_s(self.device.type)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=timeout))
        elif dist.get_world_size() != self.world_size:
            # One worker in the controller's process, where an in-process vLLM engine already made its
            # (world size 1) default group: FSDP over that group is the same one-rank sharding.
            raise RuntimeError(f"this process already has a process group of {dist.get_world_size()} ranks; "
                               f"a trainer worker of a {self.world_size}-rank group needs its own process")
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.precision = resolve_bf16(s.bf16, self.device.type)
        self.load_models()

    @property
    def packing(self) -> str:
        """The layout of this rank's GRPO forwards: ``settings.packing`` with ``auto`` resolved for its device."""
        from rl.common.packing import resolve_packing

        return resolve_packing(self.settings.packing, self.device.type)

    def _sequence_logprobs(self, model, mb: MicroBatch, with_entropy: bool):
        if self.packing == "off":
            return sequence_logprobs(model, mb.prompt_ids, mb.completion_ids, self.settings.temperature,
                                     with_entropy=with_entropy)
        return packed_sequence_logprobs(model, mb.prompt_ids, mb.completion_ids, self.settings.temperature,
                                        with_entropy=with_entropy, layout=self.packing)

    def load_models(self, model_dir: str | None = None) -> None:
        """Load and shard the policy (from ``model_dir``, default the settings') with a fresh AdamW, and the
        reference: a new start on the same process group (another stage's weights, or a test's second run)."""
        s = self.settings
        self.model = self.reference = self.optimizer = None  # free the old shards first
        self.model = self._sharded_model(model_dir or s.model_dir, trainable=True)
        self.model.train()
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, s.weight_decay), lr=s.learning_rate,
                                           betas=tuple(s.adam_betas), fused=True)
        if s.reference_dir is not None:
            self.reference = self._sharded_model(s.reference_dir, trainable=False).eval()

    def base_dtype(self) -> torch.dtype:
        """The dtype the models are loaded in: ``settings.dtype`` (float32 by default), or with LoRA
        ``lora.base_dtype`` where the settings have it (the frozen base, and a separate reference, in bf16 to halve
        their memory; the adapters stay float32)."""
        return getattr(torch, getattr(self.settings.lora, "base_dtype", None) or self.settings.dtype)

    def _sharded_model(self, model_dir: str, *, trainable: bool):
        """float32 weights (a LoRA base: `base_dtype`), ``fully_shard`` per decoder layer then the root (not for one
        rank computing in float32, where FSDP has nothing to do);
        gradients summed across ranks. A frozen bf16 base and its float32 adapters share FSDP units: FSDP2
        requires one dtype among the trainable parameters only, and all-gathers mixed dtypes as bytes.

        A frozen model (the reference) is stored in bf16 when the compute is bf16: the mixed-precision policy would
        round its float32 weights to bf16 before every forward anyway (the same values), so this halves its memory
        and skips that cast and half the all-gather bytes."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        from transformers import AutoModelForCausalLM

        s = self.settings
        dtype = torch.bfloat16 if not trainable and self.precision.bf16 else self.base_dtype()
        # Only rank 0 reads the weights (the full model on its CPU); the other ranks build the same modules on the
        # meta device (no memory) and receive their shards from rank 0 after sharding (`_load_from_rank0`).
        on_meta = self.world_size > 1 and self.rank != 0
        if on_meta:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=s.trust_remote_code)
            with torch.device("meta"):  # `dtype` as from_pretrained applies it (float32 rotary buffers stay so)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         trust_remote_code=s.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                         trust_remote_code=s.trust_remote_code)
        if not trainable:
            model.requires_grad_(False)
        elif s.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if trainable and s.lora is not None:
            from rl.common.lora import wrap_with_lora

            with torch.random.fork_rng():  # the same fresh adapters on every rank, whatever each RNG did before
                torch.manual_seed(s.seed)
                model = wrap_with_lora(model, s.lora)
            for p in model.parameters():  # float32 adapters (and AdamW state) on a frozen base of any dtype
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        if self.world_size == 1 and dtype == torch.float32 and not self.precision.bf16 and not s.cpu_offload:
            # One rank computing in float32: FSDP would shard nothing and cast nothing, only copy every weight into
            # its gather buffer and every gradient through its reduce-scatter (a fifth of a 135M model's step on
            # a CPU). The module as it is computes the same numbers.
            return model.to(self.device)
        # Rank 0's full weights kept past the sharding to broadcast from: detached aliases (no copy) of the CPU
        # storage, which stay on the CPU when fully_shard moves the parameters to the GPU.
        full = {k: v.detach() for k, v in model.state_dict().items()} if self.world_size > 1 and not on_meta else None
        shard = dict(
            mesh=self.mesh,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision.bf16 else None,
                                           reduce_dtype=torch.float32),
            offload_policy=CPUOffloadPolicy() if s.cpu_offload else OffloadPolicy(),
        )
        for layer in decoder_layers(model):
            fully_shard(layer, **shard)
        fully_shard(model, **shard)
        if self.world_size > 1:
            self._load_from_rank0(model, full, on_meta)
            del full
        for module in model.modules():
            if isinstance(module, FSDPModule):  # a plain SUM (gloo has no PREMUL_SUM), no division after it
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        # FSDP fixes each unit's gradient dtypes from the parameters that require gradients at its lazy init
        # (the first forward). PEFT's adapters-off context (the LoRA reference, often the first forward) sets
        # requires_grad False on the adapters, which would leave bf16 gradients uncast: initialise now.
        model._get_fsdp_state()._lazy_init()
        return model

    def _load_from_rank0(self, model, full: dict | None, on_meta: bool) -> None:
        """Fill every rank's shards from rank 0's full state dict (``full``; None on the other ranks), one tensor
        broadcast at a time (torch.distributed.checkpoint's ``broadcast_from_rank0``), then copy rank 0's
        buffers to every rank (non-persistent ones such as rotary frequencies are in no state dict; on the
        meta device they were never computed)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if on_meta:  # storage for the shards and buffers; the values come below
            model.to_empty(device="cpu" if self.settings.cpu_offload else self.device)
        set_model_state_dict(model, full if full is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers: rank 0's names, shapes and dtypes first, so that each broadcast has the same size everywhere.
        buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
        layout = [[(tuple(b.shape), b.dtype) for _, _, b in buffers]]
        dist.broadcast_object_list(layout, src=0)
        if len(layout[0]) != len(buffers):
            raise RuntimeError(f"rank {self.rank} built {len(buffers)} buffers, rank 0 {len(layout[0])}")
        for (module, name, buffer), (shape, dtype) in zip(buffers, layout[0]):
            buffer = (buffer.to(self.device) if self.rank == 0 else
                      torch.empty(shape, dtype=dtype, device=self.device))
            dist.broadcast(buffer, src=0)
            module._buffers[name] = buffer

    # ------------------------------------------------------------------ work
    @torch.no_grad()
    @_compute_call
    def logprobs(self, micro_batches: list[MicroBatch], reference: bool = False) -> list[list[list[float]]]:
        """Per micro-batch, per sample: the completion tokens' log-probs under the policy (old log-probs) or the
        reference."""
        with self._policy_or_reference(reference) as model:
            out = []
            for mb in micro_batches:
                logp, _, mask = self._sequence_logprobs(model, mb, with_entropy=False)
                out.append([row[m].float().cpu().tolist() for row, m in zip(logp, mask)])
        return out

    @contextlib.contextmanager
    def _policy_or_reference(self, reference: bool):
        if not reference:
            yield self.model
        elif self.reference is not None:
            yield self.reference
        elif self.settings.lora is not None:  # the base alone: the same sharded modules, adapters off
            from rl.common.lora import adapters_disabled

            with adapters_disabled(self.model) as base:
                yield base
        else:
            raise RuntimeError("no reference model: WorkerSettings.reference_dir is None")

    @_compute_call
    def train_step(self, micro_batches: list, step_loss, learning_rate: float | None = None) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch, with a loss the caller defines.

        ``step_loss`` (see `StepLoss`) owns what a micro-batch means: ``step_loss.weights(micro_batches)`` gives
        this rank's normaliser contributions (e.g. sequences), summed over all ranks before any forward;
        ``step_loss(self, micro_batch, totals)`` runs the forward(s) and returns this micro-batch's share of the
        global loss (its gradients simply add up over micro-batches and ranks) and its metrics as sums with a
        weight. Metrics come back as weighted means over the global batch, plus ``loss`` (the global loss),
        ``grad_norm`` (before clipping) and ``learning_rate``. ``learning_rate``, when given, is set on the
        optimizer before the step: the controller owns the schedule.
        """
        s = self.settings
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
        totals = self._sum_across_ranks(step_loss.weights(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, sums, weight = 0.0, {}, 0.0
        with self._one_rank_accumulation([True] * len(micro_batches)) as before_backward:
            for index, mb in enumerate(micro_batches):
                loss, metric_sums, mb_weight = step_loss(self, mb, totals)
                before_backward(index)
                loss.backward()
                loss_sum += float(loss.detach())
                for k, v in metric_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                weight += mb_weight
        grad_norm = clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        # Every rank must all-reduce the same keys in the same order: the union of names is fixed by the loss.
        keys = list(step_loss.metric_names)
        reduced = self._sum_across_ranks([loss_sum, weight] + [sums.get(k, 0.0) for k in keys])
        loss_sum, weight = reduced[0], max(reduced[1], 1e-30)
        out = {k: v / weight for k, v in zip(keys, reduced[2:])}
        out.update(loss=loss_sum, grad_norm=grad_norm, learning_rate=self.optimizer.param_groups[0]["lr"])
        return out

    @contextlib.contextmanager
    def _one_rank_accumulation(self, backward: list[bool]):
        """Around an optimizer step's micro-batches on ONE rank (``backward[i]``: whether micro-batch i runs a
        backward): FSDP2 keeps the bf16 parameters unsharded from the first forward to the last backward, and sums
        the micro-batches' gradients unsharded in float32 (its ``set_requires_gradient_sync(False)``), reducing and
        resharding once, in the last backward; yields ``before_backward(i)``, to call before micro-batch i's
        backward. With one rank there is nothing to all-gather or reduce across ranks: the same values and the same
        float32 sums, without a parameter cast and a gradient copy per micro-batch. A no-op for several ranks and
        with ``cpu_offload`` (memory per device is why they shard or offload: here every layer and its float32
        gradient would stay on the device)."""
        model = self.model
        if not (ONE_RANK_UNSHARDED_ACCUMULATION and self.world_size == 1 and isinstance(model, FSDPModule)
                and not self.settings.cpu_offload and any(backward)):
            yield lambda index: None
            return
        last = max(i for i, b in enumerate(backward) if b)

        def before_backward(index: int) -> None:
            model.set_requires_gradient_sync(index == last)
            model.set_reshard_after_backward(index == last)

        model.set_reshard_after_forward(False)
        try:
            yield before_backward
        finally:
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            for unit in units:  # FSDP2's defaults again: the root stays gathered after its forward, the rest reshard
                unit.set_reshard_after_forward(unit is not model, recurse=False)
            for unit in units:  # forwards without a backward after the last one left units unsharded
                unit.reshard()

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference to run forwards on: the sharded reference, or with LoRA the policy's modules with
        the adapters off (in eval mode: no dropout noise)."""
        with torch.no_grad(), self._policy_or_reference(True) as model:
            yield model

    @_compute_call
    def update(self, micro_batches: list[MicroBatch], loss_settings: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; metrics are over the whole mini-batch.

        ``loss_settings`` are the keyword arguments of `rl.grpo.loss.policy_loss` (``GRPOConfig.policy_loss_kwargs``):
        the controller owns the algorithm, so they come with each update (a KL controller may change beta).

        ``loss`` is the mini-batch loss (sum of every micro-batch's share), the other loss metrics are means over
        the trained sequences, ``grad_norm`` the norm before clipping, ``skipped_backward`` the share of this rank's
        micro-batches whose loss had no gradient on any rank and ran no backward (``skip_zero_gradient``).
        """
        s = self.settings
        local = [mb.counts() for mb in micro_batches]
        num_tokens, num_seqs = self._sum_across_ranks([sum(t for t, _ in local), sum(q for _, q in local)])
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        weight = 0.0
        # |trainer - engine| log-prob summed over the trained tokens (before this update), and their count, per engine
        engines = micro_batches[0].num_engines
        gap, gap_tokens = [0.0] * engines, [0.0] * engines
        ratio_min, ratio_max = float("inf"), float("-inf")
        backward = self._needs_backward(micro_batches, loss_settings)
        with self._one_rank_accumulation(backward) as before_backward:
            for index, (mb, mb_backward) in enumerate(zip(micro_batches, backward)):
                with torch.set_grad_enabled(mb_backward):  # without: no activations kept, the forward is for the metrics
                    logp, entropy, mask = self._sequence_logprobs(self.model, mb, with_entropy=True)
                    trained = torch.tensor(mb.trained_mask(), device=mask.device)
                    mask = mask & trained[:, None]
                    old = logp.detach() if mb.old_logprobs is None else dense_rows(mb.old_logprobs, logp)
                    ref = None if mb.ref_logprobs is None else dense_rows(mb.ref_logprobs, logp)
                    advantages = torch.tensor(mb.advantages, dtype=torch.float32, device=logp.device)
                    loss, metrics = policy_loss(logp, old, advantages, mask, ref_logp=ref, entropy=entropy,
                                                num_tokens=max(num_tokens, 1.0), num_seqs=max(num_seqs, 1.0),
                                                **loss_settings)
                if mb_backward:
                    before_backward(index)
                    loss.backward()
                if mb.engine_logprobs is not None:
                    engine = dense_rows(mb.engine_logprobs, logp)
                    row_gap, row_tokens = ((logp.detach() - engine).abs() * mask).sum(-1).tolist(), mask.sum(-1).tolist()
                    for e, g, t in zip(mb.engine_ids or [0] * len(mb), row_gap, row_tokens):
                        gap[e] += g
                        gap_tokens[e] += t
                n = float(trained.sum())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in metrics.items():
                    if k not in ("num_tokens", "num_seqs", "ratio_min", "ratio_max"):
                        sums[k] = sums.get(k, 0.0) + float(v) * n
                if mask.any():
                    ratio_min, ratio_max = min(ratio_min, float(metrics["ratio_min"])), max(ratio_max, float(metrics["ratio_max"]))
                weight += n
        if not backward[-1] and isinstance(self.model, FSDPModule):
            # FSDP2 keeps a root module unsharded after its forward until a backward reshards it: without one, the
            # module would still hold the full tensors, not the sharded parameters that carry the gradients.
            self.model.reshard()
        if not any(backward):
            # The gradient is zero: AdamW still decays the weights and its moments and counts the step, as after a
            # backward that computed zeros.
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        grad_norm = clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        keys = sorted(sums)
        totals = self._sum_across_ranks([sums[k] for k in keys] + gap + gap_tokens + [weight])
        weight = max(totals.pop(), 1.0)
        gap_tokens, gap = totals[-engines:], totals[-2 * engines : -engines]
        out = {k: (v if k == "loss" else v / weight) for k, v in zip(keys, totals)}
        (ratio_min,), (ratio_max,) = self._reduce([ratio_min], dist.ReduceOp.MIN), self._reduce([ratio_max], dist.ReduceOp.MAX)
        if num_tokens > 0:
            out.update(ratio_min=ratio_min, ratio_max=ratio_max)
        out.update(grad_norm=grad_norm, num_tokens=num_tokens, num_seqs=num_seqs,
                   skipped_backward=1.0 - sum(backward) / len(backward))
        if micro_batches[0].engine_logprobs is not None:
            out["logprob_gap_engine_trainer"] = sum(gap) / max(sum(gap_tokens), 1.0)
            if engines > 1:
                out.update({f"logprob_gap/engine{e}": g / max(t, 1.0) for e, (g, t) in enumerate(zip(gap, gap_tokens))})
        return out

    def _needs_backward(self, micro_batches: list[MicroBatch], loss_settings: dict[str, Any]) -> list[bool]:
        """Per micro-batch, whether its backward runs: where its loss can have a gradient on some rank (FSDP's
        backward collectives must run on every rank for the same micro-batches), or everywhere when
        ``skip_zero_gradient`` is off."""
        if not self.settings.skip_zero_gradient:
            return [True] * len(micro_batches)
        beta, alpha = loss_settings.get("beta", 0.0), loss_settings.get("alpha", 0.0)
        local = [float(loss_has_gradient(mb.advantages, mb.trained_mask(), beta=beta, alpha=alpha))
                 for mb in micro_batches]
        return [v > 0 for v in self._reduce(local, dist.ReduceOp.MAX)]

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _sum_across_ranks(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    # ------------------------------------------------------------------ weights out
    def iter_full_weights(self, skip_tied: bool = False, on_device: bool = False):
        """(HF name, full CPU tensor) pairs, gathered one tensor at a time; rank 0 yields them, the other ranks
        yield nothing but must run the generator to its end too (each tensor is a collective). The peak extra
        memory on a rank is one full tensor. With LoRA: base + scaled B @ A under the base's names (the
        adapters, small, are gathered first). ``skip_tied``: a tied weight once (an engine ties it again).
        ``on_device``: full tensors stay on this rank's device (what GPU weight transfers send from)."""
        state = self.model.state_dict()
        skipped = self._tied_duplicates() if skip_tied else set()
        adapters = {}
        if self.settings.lora is not None:
            adapters = {name: self._gather(t, on_device) for name, t in state.items() if "lora_" in name}
        for name, tensor in state.items():
            if "lora_" in name or name in skipped:
                continue
            full = self._gather(tensor, on_device)
            if self.rank == 0:
                if self.settings.lora is not None:
                    name, full = self._merge_adapters(name, full, adapters)
                yield name, full
            del full
        release_free_memory()

    def _gather(self, tensor, on_device: bool = False) -> torch.Tensor:
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        # on_device: this rank's device even when the shards are offloaded to CPU memory (rl.cpu_offload)
        return full.detach().to(self.device if on_device else "cpu", copy=True)

    def _merge_adapters(self, name: str, weight: torch.Tensor, adapters: dict) -> tuple[str, torch.Tensor]:
        """A PEFT state-dict entry -> (plain HF name, weight with every active adapter's delta added), computed
        as PEFT's merge does (B @ A times the scaling, added in float32, then the base's dtype)."""
        name = name.removeprefix("base_model.model.")
        if not name.endswith(".base_layer.weight"):  # not adapted, or an adapted layer's bias
            return name.replace(".base_layer.", "."), weight
        module_name = name.removesuffix(".base_layer.weight")
        module = self.model.get_base_model().get_submodule(module_name)
        delta = 0
        for a in module.active_adapters:
            key = f"base_model.model.{module_name}.lora_%s.{a}.weight"
            if key % "A" in adapters:
                ba = adapters[key % "B"] @ adapters[key % "A"]
                delta = delta + (ba.T if module.fan_in_fan_out else ba) * module.scaling[a]
        return name.replace(".base_layer.", "."), (weight.float() + delta).to(weight.dtype)

    def _tied_duplicates(self) -> set[str]:
        """State-dict names of parameters that are another parameter (a tied output head): the same on every rank."""
        every = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        return every - {name for name, _ in self.model.named_parameters()}

    def weight_metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(HF name, dtype, full shape) of what `iter_full_weights(skip_tied=True)` yields, in its order, without a
        gather (a sharded tensor knows its global shape): what vLLM's weight-transfer backends size buffers from."""
        out = []
        skipped = self._tied_duplicates()
        for name, tensor in self.model.state_dict().items():
            if "lora_" in name or name in skipped:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out.append((name, tensor.dtype, tuple(tensor.shape)))
        return out

    def init_weight_transfer(self, target) -> None:
        """Join vLLM's weight transfer to the engines of ``target`` (``rl.rollout.weight_transfer.TransferTarget``):
        rank 0 becomes the sender (and hosts the rendezvous), the other ranks only take part in the gathers."""
        from rl.rollout.weight_transfer import GPU_BACKENDS, WeightStream, trainer_transfer

        dtype = getattr(torch, target.dtype) if target.dtype else None
        on_device = target.backend in GPU_BACKENDS  # NCCL and CUDA IPC send CUDA tensors
        source = WeightStream(self.weight_metadata, lambda: self.iter_full_weights(skip_tied=True, on_device=on_device),
                              dtype)
        self.weight_transfer = trainer_transfer(target, self.rank, source)

    def send_weights(self) -> dict[str, float]:
        """Send the current weights to the engines (every rank calls it). Returns the bytes sent (one copy of the
        weights in the engines' dtype, from the source's metadata) and, where the backend counts them (cpu_gloo),
        rank 0's buckets."""
        self.weight_transfer.send_weights()
        sent = {"bytes": float(sum(math.prod(m.shape) * m.dtype.itemsize for m in self.weight_transfer.source.metadata()))}
        if hasattr(self.weight_transfer, "last_buckets"):
            sent["buckets"] = float(self.weight_transfer.last_buckets)
        return sent

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """`iter_full_weights` collected into one dict on rank 0 (None elsewhere): every rank must call it."""
        out = dict(self.iter_full_weights())
        return out if self.rank == 0 else None

    def module_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's own state dict gathered to full CPU tensors in their stored dtypes, on rank 0 (None
        elsewhere; every rank must call it): with LoRA, PEFT's names (``...base_layer.weight``, ``lora_A``/``B``)
        unmerged. For tests and inspection; the engine and the checkpoints get `iter_full_weights`."""
        out = {name: self._gather(t) for name, t in self.model.state_dict().items()}
        return out if self.rank == 0 else None

    def gather_full_weights(self) -> None:
        """`iter_full_weights` run to its end for its collectives only: the part of a rank other than 0 in a
        weight stream (a plain call, so that the controller sees at once when this rank dies)."""
        for _ in self.iter_full_weights():
            pass

    def stream_full_weights(self):
        """`iter_full_weights` for a Ray streaming generator: rank 0 yields ``(name, tensor)``, one per object."""
        yield from self.iter_full_weights()

    # ------------------------------------------------------------------ checkpoints
    def seed(self, seed: int) -> None:
        """Seed this rank's torch RNG with ``seed + rank`` (dropout draws differ across ranks, as data-parallel
        ranks' do)."""
        torch.manual_seed(seed + self.rank)

    def save_rng_state(self, directory: str) -> None:
        """This rank's torch RNG state (CPU, and CUDA when used) as ``directory/rng-rank{r}.pt``: with the
        checkpoint, an exact resume of anything random (dropout). Every rank writes its own."""
        from pathlib import Path

        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(state, f"{directory}/rng-rank{self.rank}.pt")

    def load_rng_state(self, directory: str) -> None:
        state = torch.load(f"{directory}/rng-rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def save_checkpoint(self, path: str) -> None:
        """The sharded policy and AdamW state with torch.distributed.checkpoint: each rank writes its own shards
        (``path`` on a file system every rank sees). Every rank must call it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        """The counterpart of `save_checkpoint`, into the current shards (any number of ranks can read it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)  # the layout to read into
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def save_hf(self, path: str) -> None:
        """A consolidated HF model directory (float32 weights, config, tokenizer), written by rank 0 from the full
        tensors gathered one at a time. Every rank must call it."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from transformers import GenerationConfig

        from rl.common.lora import ADAPTER_DIR

        full = self.full_state_dict()
        adapters = None
        if self.settings.lora is not None:  # gathered on every rank (collectives), kept on rank 0
            adapters = {name: self._gather(t) for name, t in self.model.state_dict().items() if "lora_" in name}
        if self.rank != 0:
            return
        s = self.settings
        config = AutoConfig.from_pretrained(s.model_dir, trust_remote_code=s.trust_remote_code)
        with torch.device("meta"):  # names and tied weights only: the values are `full`
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=s.trust_remote_code)
        try:
            skeleton.generation_config = GenerationConfig.from_pretrained(s.model_dir)
        except OSError:  # the model has none: keep the one derived from its config
            pass
        # Tied weights (an LM head that is the embedding) once, under the name the model keeps: the gathered
        # copies no longer share storage, so save_pretrained would write both.
        kept = {name for name, _ in skeleton.named_parameters()}
        tied = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)} - kept
        full = {k: v for k, v in full.items() if k not in tied}
        skeleton.save_pretrained(path, state_dict=full, safe_serialization=True)
        AutoTokenizer.from_pretrained(s.model_dir, trust_remote_code=s.trust_remote_code).save_pretrained(path)
        if adapters is not None:  # the adapters alone as well (PEFT's format), beside the merged weights
            self.model.save_pretrained(f"{path}/{ADAPTER_DIR}", state_dict=adapters)

    def local_storage_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the policy's parameter shards, gradient shards and optimizer state, each
        storage counted once (the padded shard buffers FSDP allocates, not only the visible elements)."""
        seen: set[int] = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None:
                    continue
                local = t.to_local() if hasattr(t, "to_local") else t
                storage = local.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return total

        params = list(self.model.parameters())
        state = [v for per_param in self.optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
        return {"parameters": size(params), "gradients": size(p.grad for p in params), "optimizer": size(state)}

    def shutdown(self) -> None:
        if getattr(self, "owns_process_group", False) and dist.is_initialized():
            dist.destroy_process_group()


def weight_decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the trainable weights, none on biases and normalisation scales (the
    HF Trainer's grouping, so that a recipe's weight_decay means what it meant there)."""
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if "bias" in name or type(module).__name__.lower().endswith("norm"):
                no_decay.add(f"{module_name}.{name}" if module_name else name)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in params if name not in no_decay], "weight_decay": weight_decay},
            {"params": [p for name, p in params if name in no_decay], "weight_decay": 0.0}]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.model.layers`` for Llama/Qwen-style models):
    FSDP's units, each all-gathered just before it runs and freed after. A PEFT model: its base's blocks."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"no decoder layers found in {type(model).__name__} (expected model.model.layers)")


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` for DTensor gradients: the norm of the local shards is a partial value that
    ``full_tensor`` all-reduces into the global norm, and every rank scales its shards by the same factor."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    parameters = [p for p in parameters if p.grad is not None]
    total = get_total_norm([p.grad for p in parameters], norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)
