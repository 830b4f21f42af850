"""The trainer worker group: an FSDP2-sharded policy in N ranks (Ray actors), behind a small interface that a
single-controller loop calls (log-probs, update on a mini-batch, full weights out, checkpoints). The GRPO loop
(`rl.grpo.trainer`) and the cold start (`eksft.sft.run`) both drive it.

Ranks. `TrainerWorker` is one rank: it joins one torch.distributed process group (NCCL on CUDA, gloo on CPU)
and holds the policy sharded with ``fully_shard`` per decoder layer, then the root: float32 master weights,
bf16 compute through FSDP2's mixed-precision policy where the precision rule says so, float32 gradient
reduction, AdamW on the shards, DTensor-aware clipping; optional activation checkpointing and CPU offload. The
frozen reference is sharded the same way (forward only), or with LoRA is the base with adapters off
(``rl.lora.base_dtype``: the frozen base in float32 or bfloat16, the adapters float32). Weights are read from
disk on rank 0 only; the other ranks build the model on the meta device, shard it and receive their shards.
One rank computing in float32 is left unwrapped: FSDP would only copy (the same numbers, ~20% slower on a CPU).

Groups. `WorkerGroup` places N Ray actors with a placement group (one bundle per rank, packed per node), splits
each mini-batch's micro-batches across ranks (`split_across_ranks`) and all-reduces the token and sequence
counts, so the update does not depend on N. `InProcessWorkerGroup` is ``rl.workers: 1``: the same
`TrainerWorker` in the controller's process, joining an in-process vLLM engine's one-rank group.
`make_worker_group` picks one. Full weights leave rank 0 one tensor at a time (a Ray streaming generator) for
the rollout engine.

Updates. `update` is GRPO's (`rl.grpo.loss.policy_loss` on completions). `train_step` takes the loss from the
caller (`rl.workers.batch.StepLoss`: the normalisers to all-reduce, the forward(s) and loss of one micro-batch, a
padding micro-batch for ranks left short) and the learning rate of the step: the cold start's objectives run this
way (`eksft.sft.step.ObjectiveStepLoss`) without `rl` knowing them. AdamW decays weights but not biases and norm
scales (the HF Trainer's grouping).

Checkpoints. `save_checkpoint` writes the sharded policy and AdamW state with torch.distributed.checkpoint
(resume with the same N); `save_hf` writes a consolidated HF directory from rank 0 (what vLLM and evaluations
load; with LoRA the merged weights plus ``adapter/``); `save_rng_state` each rank's RNG (dropout draws differ per
rank). The loops add their own state (step, data position) beside them.

Failures. A call fails as soon as one rank fails: `WorkerFailure` names the rank, its pid and Ray actor and the
call; a rank that fails in a collective because a peer died is reported as the dead peer. The group is then
torn down. The process-group timeout (`WorkerSettings.process_group_timeout_s`; default 120 s on CPU, 600 s on
GPU) bounds a collective that waits on a dead rank.

CPU accounting (``rl.worker_cpus``, ``sft.worker_cpus``; `worker_resources`): unset, each Ray worker reserves a
token 0.01 CPU and the ranks share the stage's own CPUs (threads = stage threads / N): the controller (and GRPO's
in-process engine) waits while the workers train and the workers wait while the engine generates, so two arms of
two workers each run on 2 cores. Set, each worker reserves that many CPUs on top of the stage's.

Not done: the workers run one full-sequence forward per micro-batch (the prompt-sharing forward of
`rl.grpo.logprobs` is not used under FSDP; the cold start's shared-prompt forward is one packed forward and is);
CPU offload is wired but has not run (GPU only); nothing here has run on a GPU or with NCCL. The tests: tests/test_workers.py, tests/test_grpo_workers.py,
tests/test_sft_workers.py.

`rl.workers` imports neither Ray nor transformers at import time.
"""

from rl.workers.batch import MicroBatch, StepLoss, split_across_ranks
from rl.workers.group import InProcessWorkerGroup, WorkerFailure, WorkerGroup, make_worker_group, worker_resources, workers_device
from rl.workers.trainer_worker import TrainerWorker, WorkerSettings

__all__ = ["InProcessWorkerGroup", "MicroBatch", "StepLoss", "TrainerWorker", "WorkerFailure", "WorkerGroup",
           "WorkerSettings", "make_worker_group", "split_across_ranks", "worker_resources", "workers_device"]
