"""Building blocks both stages share: the cold start (`eksft`) and GRPO (`rl.grpo`) import them.

    labels       IGNORE_INDEX, the label value of positions that are not trained
    token_stats  per-token entropy, KL to a reference and label log-probability, chunked over the vocabulary
    precision    the one decision of the compute precision (bf16 where the device computes it natively)
    lora         LoRA settings (each stage's defaults in a subclass), wrapping and adapters-off references (PEFT)
    resume       the last complete checkpoint of a killed run, and metrics cut back to it
    network      a free TCP port for a rendezvous (trainer ranks, weight transfer)
    cpu_share    Ray actors (trainer workers, engine replicas) inside their stage's own CPUs

Nothing here knows either stage: these modules import only torch, transformers, PEFT and pydantic.
"""
