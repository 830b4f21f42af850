"""The trainer worker group: an FSDP2-sharded policy in N ranks (Ray actors), behind a small interface that a
single-controller loop calls (log-probs, update on a mini-batch, full weights out).

STATUS (branch fsdp-workers; issue "Sharded GRPO training on Ray"):
  done     TrainerWorker (process group, FSDP2 per decoder layer + root, float32 master weights, bf16 compute
           where the precision rule says so, float32 gradient reduction, AdamW on the shards, DTensor-aware
           clipping, sharded reference forward-only, LoRA: seeded float32 adapters on a frozen base in
           rl.lora.base_dtype (float32 or bfloat16; a separate reference also in base_dtype), reference = base
           with adapters off, merged weights out in the base's dtype; weights read from disk on rank 0 only:
           the other ranks build the model on the meta device, shard it, then receive their shards
           (set_model_state_dict, full_state_dict + broadcast_from_rank0) and rank 0's buffers), WorkerGroup
           (Ray actors in a placement group, micro-batches split across ranks, global counts all-reduced, full
           weights streamed from rank 0 with a Ray streaming generator), InProcessWorkerGroup (rl.workers: 1:
           the same TrainerWorker in the controller's process, joining an in-process vLLM's one-rank process
           group), sharded checkpoints (torch.distributed.checkpoint:
           model + AdamW) and a consolidated HF directory written by rank 0 (+ adapter/ with LoRA), calls that
           fail as soon as one rank fails, with a `WorkerFailure` naming the rank, its pid and Ray actor and the
           call (update, log-probs, the weight stream: every wait of the stream covers every rank, so a rank
           dying mid-stream fails it at once; a rank that fails in a collective because a peer died, e.g. gloo
           seeing the connection close, is reported as the dead peer when Ray confirms the death within 2 s),
           the group then torn down (actors killed). Process-group timeout:
           WorkerSettings.process_group_timeout_s, None = 120 s on CPU / 600 s on GPU
           (rl/workers/trainer_worker.py, CPU_/GPU_PROCESS_GROUP_TIMEOUT_S). GRPOTrainer (rl/grpo/trainer.py)
           drives the group: old-policy and reference log-probs, updates, weight sync one tensor at a time,
           checkpoints (HF dir + dcp/ + trainer_state.pt); its single-process update path is gone. Reward
           function and advantage estimator are constructor arguments (defaults: math_reward,
           group_advantages). CPU accounting: with
           rl.worker_cpus unset the Ray workers reserve 0.01 CPU each and share the RL stage's own CPUs
           (threads = stage threads / N); rl.worker_cpus = c reserves c each on top.
           Tested: tests/test_workers.py (N=2 vs N=1 per aggregation, KL on/off, storage, DCP resume, HF export,
           killed rank mid-update and SIGKILLed mid weight-stream: WorkerFailure naming rank 1 within 1 s),
           tests/test_grpo_workers.py (the real trainer: workers 2 vs 1 after one step, exact resume at workers 2;
           a real SIGKILL to rank 1's process after step 1's checkpoint of a 3-step run fails the stage 1.4 s
           later naming rank 1 and its pid, rank 0's process goes, and the rerun resumes from step 1 and ends
           with the uninterrupted run's weights (<= 1e-6 relative) and reward/loss metrics, steps 1..3 once
           each), tests/test_grpo*.py, the LoRA merge against PEFT's. rl.lora.base_dtype: bfloat16 (see
           measured): tests/test_workers.py (N=1 vs 2, float32 and bf16 compute) and tests/test_grpo_workers.py
           (the real trainer, workers 1 vs 2). Rank-0 loading: N=2's unmerged parameters after setup equal
           N=1's exactly (torch.equal and dtype, full model and LoRA on a bf16 base), all N=2 vs N=1 tests
           unchanged (same printed differences before and after the change). benchmarks/gpu_fsdp_update.py: the
           worker at world size 1 on a random Qwen2.5-0.5B-shape model (step time, peak memory; torch +
           transformers only), smoke-tested on CPU with --tiny (tests/test_bench_gpu_fsdp_update.py).
  not yet  resuming a checkpoint of the pre-worker trainer (no dcp/: a clear error), a measurement of the
           memory rank-0 loading saves (tested for correctness only, on a tiny model; rank 0 still holds the full
           model in CPU memory during setup, and on GPU fully_shard first moves rank 0's full parameters to the
           GPU before sharding them), benchmarks/gpu_fsdp_update.py
           on a GPU (prepared, never run: no GPU lent so far), the prompt-sharing forward of rl.grpo.logprobs
           under FSDP (workers run one full-sequence forward per micro-batch: see
           rl.workers.batch.sequence_logprobs; rl.grpo.logprobs is now used by tests and benchmarks only),
           activation checkpointing and CPU offload (wired, untested), anything on GPU/NCCL (untested; on GPU
           the in-process vLLM and an in-process worker would share the default group),
           benchmarks/grpo_step.py --profile (it replicates the removed single-process update on trainer.model).
  measured (2-core CPU) rl.lora.base_dtype: bfloat16 (frozen bf16 base, float32 adapters and AdamW state; FSDP
           units mix a bf16 frozen base and float32 trainable adapters: torch 2.13's FSDP2 checks dtype
           uniformity over the trainable parameters only, and all-gathers mixed dtypes as bytes, so no separate
           units were needed): worker level, two updates with KL, N=2 vs N=1: float32 compute (bf16 activations
           from the bf16 base) adapters max relative difference 1.3e-6 (update 9.3e-6), loss and grad norm equal
           to 6 digits; bf16 compute: 0.0 (bit for bit); reference log-probs N=2 vs N=1 identical; the base
           unchanged and bf16, both adapter matrices moved; the merged HF export (bf16) loads in transformers.
           Real trainer, workers 1 vs 2, one step: adapters and merged bf16 weights identical (0.0); step 2's
           engine-trainer log-prob gap 7.7e-4 (float32 engine on bf16 merged weights).
  measured (2-core CPU, float32): the real trainer with workers 2 vs 1 after one GRPO step (2 mini-batches,
           seq-mean-token-mean, KL and entropy on): parameters identical bit for bit (relative difference 0.0);
           exact resume at workers 2 holds (test_grpo_workers). benchmarks/grpo_step.py --systems ours --no-profile
           (8 prompts x 8 x 128 tokens, bf16 auto on a Xeon with AVX512_BF16, others' CPU share 0.00), main at
           8c15e6b then this branch at 7c3fdb0, back to back: step 63.53 s (train 48.48 s) before, 60.31 s
           (train 45.86 s) with rl.workers: 1, identical rollouts (4218.5 completion tokens/step): within 10%.
           TRL's ratio not rerun (--systems ours only); the scaling row (N=1 vs 2) is to do; the GPU script is
           written (benchmarks/gpu_fsdp_update.py) but has not run on a GPU.
           `eksft run recipes/quickstart.yaml --set rl.workers=2` on 2 cores (23 GB RAM shared with other jobs):
           the sft arm's RL stage (a Ray task of 1 CPU + 2 workers of 0.01 CPU) finished its 6 steps in 294 s
           beside the other arm's stages; the eksft arm's RL stage was killed by Ray's memory monitor (node
           memory > 95%: two RL stages, each an in-process vLLM + 2 workers that each load the full float32
           policy and reference before sharding, plus an evaluation, plus other jobs on the machine).
           Memory is the open problem there, not CPUs (rank-0-only loading, since done, is the first fix; that
           quickstart was not rerun with it). Rerun (the same
           command, finished stages skipped): the eksft arm's RL finished (308 s) and the report was written.
           The bf16 trainer-engine gap (logprob_gap_engine_trainer) is not a regression: the quickstart on main
           (old trainer, same machine, bf16 auto) logged sft 0.006-0.017, eksft 0.031-0.039 per step; this branch
           at rl.workers=2 logged sft 0.005-0.020, eksft 0.033-0.038.

`rl.workers` imports neither Ray nor transformers at import time.
"""

from rl.workers.batch import MicroBatch, split_across_ranks
from rl.workers.group import InProcessWorkerGroup, WorkerFailure, WorkerGroup, make_worker_group
from rl.workers.trainer_worker import TrainerWorker, WorkerSettings

__all__ = ["InProcessWorkerGroup", "MicroBatch", "TrainerWorker", "WorkerFailure", "WorkerGroup", "WorkerSettings",
           "make_worker_group", "split_across_ranks"]
