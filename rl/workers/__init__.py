"""The trainer worker group: an FSDP2-sharded policy in N ranks (Ray actors), behind a small interface that a
single-controller loop calls (log-probs, update on a mini-batch, full weights out).

STATUS (branch fsdp-workers; issue "Sharded GRPO training on Ray"):
  done     TrainerWorker (process group, FSDP2 per decoder layer + root, float32 master weights, bf16 compute
           where the precision rule says so, float32 gradient reduction, AdamW on the shards, DTensor-aware
           clipping, sharded reference forward-only), WorkerGroup (Ray actors in a placement group, micro-batches
           split across ranks, global counts all-reduced), full_state_dict gathered one tensor at a time on
           rank 0, local_storage_bytes, sharded checkpoints (torch.distributed.checkpoint: model + AdamW) and a
           consolidated HF directory written by rank 0, calls that fail as soon as one rank fails (the group is
           then marked broken and shutdown kills it). Tested in tests/test_workers.py: N=2 vs N=1 after one
           update, each aggregation, KL on and off; storage ratio; exact resume at N=2; the HF export loads; a
           rank killed mid-update fails the call within seconds.
  not yet  GRPOTrainer on the group (its single-process _update is still there; rl.workers: N in the config),
           LoRA (reference = base with adapters off), a Ray streaming generator for weights to the engine
           (full_state_dict holds all of them on rank 0), loading the weights on rank 0 only (meta device
           elsewhere: every rank now reads the full float32 model first), the CPU accounting of a stage and its
           workers, the stage (not only the call) failing when a worker dies, the prompt-sharing forward of
           rl.grpo.logprobs under FSDP (workers run one full-sequence forward per micro-batch: see
           rl.workers.batch.sequence_logprobs), activation checkpointing and CPU offload (wired, untested),
           anything on GPU/NCCL (untested).

`rl.workers` imports neither Ray nor transformers at import time.
"""

from rl.workers.batch import MicroBatch, split_across_ranks
from rl.workers.group import InProcessWorkerGroup, WorkerGroup, make_worker_group
from rl.workers.trainer_worker import TrainerWorker, WorkerSettings

__all__ = ["InProcessWorkerGroup", "MicroBatch", "TrainerWorker", "WorkerGroup", "WorkerSettings", "make_worker_group",
           "split_across_ranks"]
