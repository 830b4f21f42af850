"""Memory per GPU of a recipe's trainer ranks and rollout engines, by arithmetic on the model's shape.

Pure functions and small frozen dataclasses (stdlib only; `parameter_count_exact` alone imports transformers, to
check the formulas against a model built on the meta device). The formulas describe how this project trains:

* trainer (`rl.workers.trainer_worker`): FSDP2 ``fully_shard`` on every decoder layer, then the root (embeddings,
  final norm, LM head), over W ranks; weights, gradients and AdamW's two moments sharded in the stored dtype (float32
  master weights by default); ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`` when the compute is
  bf16: a unit is all-gathered in bf16 just before it runs, its gradients come out in bf16 and are reduce-scattered
  in float32. A frozen reference is stored in bf16 when the compute is bf16. LoRA: the base frozen in its base
  dtype, float32 adapters with gradients and AdamW. One rank computing in float32 with float32 weights and no CPU
  offload runs without FSDP (nothing gathered, nothing reduce-scattered).
* activations: what autograd saves in transformers' Llama / Qwen2 / Qwen3 decoder layers with SDPA attention,
  counted tensor by tensor (`layer_activation_bytes_per_token`); the logits of the positions that have labels, and
  the chunked vocabulary statistics of `rl.common.token_stats` (`logits_bytes`).
* engine (vLLM): weights split over tensor-parallel ranks, and vLLM's paged KV cache: a block of ``block_size``
  tokens holds, per layer, K and V of the rank's KV heads; a sequence of n tokens takes ceil(n / block_size) blocks.

Every estimate is a list of `Item` (name, bytes, formula) grouped by *phase*: ``resident`` items are held
throughout, the items of each other phase only during it (the peak is resident + the largest phase), ``info``
items are reported and not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHUNK_ELEMENTS", "CPU_BLOCK_SIZE", "DTYPE_BYTES", "END_OF_BACKWARD", "ENGINE_MAX_SEQS", "engine_step_bytes", "GPU", "GPU_BLOCK_SIZE", "HOST", "INFO",
    "LORA_MODULES", "RESIDENT", "STEP", "VOCAB_PADDING", "activation_bytes", "dtype_bytes", "engine_estimate",
    "engine_weight_bytes", "Estimate", "Item", "kv_batch_blocks", "kv_blocks", "kv_heads_per_rank", "kv_page_bytes",
    "layer_activation_bytes_per_token", "linear_shapes", "logits_bytes", "lora_parameters", "LoraShape",
    "MicroBatchShape", "ModelShape", "parameter_count", "parameter_count_exact", "sharded_numel",
    "trainer_estimate", "TrainerSetup",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_BLOCK_SIZE = 16  # vLLM's default KV block (CacheConfig.DEFAULT_BLOCK_SIZE)
CPU_BLOCK_SIZE = 32  # what rl.rollout.vllm_engine.make_llm sets on CPU
VOCAB_PADDING = 64  # vLLM pads the vocabulary of its embedding and LM head to a multiple of this
CHUNK_ELEMENTS = 1 << 26  # rl.common.token_stats.DEFAULT_CHUNK_ELEMENTS (vocabulary entries per chunk)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT "all-linear"

RESIDENT, STEP, END_OF_BACKWARD, INFO = "resident", "forward/backward", "end of backward", "info"
GPU, HOST = "gpu", "host"


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``float32`` / ``bfloat16`` / ``float16`` (a ``torch.`` prefix is ignored)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[name]


def _n(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.3g}"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder-only transformer (Llama, Mistral, Qwen2, Qwen3 families) as far as memory goes.

    ``qkv_bias``: biases on q/k/v (Qwen2 always; Llama/Qwen3 ``attention_bias``), ``o_bias``: on o_proj (Llama/Qwen3
    ``attention_bias``), ``mlp_bias``: on gate/up/down (Llama ``mlp_bias``), ``qk_norm``: RMSNorm over head_dim on
    queries and keys (Qwen3). ``tied``: the LM head is the embedding matrix.
    """

    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> ModelShape:
        """From a transformers config (object or ``config.json`` dict). Missing ``num_key_value_heads``: as many as
        query heads; missing ``head_dim``: hidden / heads; missing ``tie_word_embeddings``: False (the default of
        these families' config classes)."""
        c = dict(config) if isinstance(config, Mapping) else config.to_dict()
        kind = c.get("model_type")
        if kind not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"no parameter formula for model_type {kind!r} (llama, mistral, qwen2, qwen3); "
                             "parameter_count_exact counts any model")
        heads = c["num_attention_heads"]
        attention_bias = bool(c.get("attention_bias", False))
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                   q_heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=True if kind == "qwen2" else attention_bias,
                   o_bias=attention_bias if kind != "qwen2" else False,
                   mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=kind == "qwen3")

    def layer_tensors(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of one decoder layer's parameters, as transformers names and shapes them."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        out = [("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
               ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, q))]
        if self.qkv_bias:
            out += [("self_attn.q_proj.bias", (q,)), ("self_attn.k_proj.bias", (kv,)), ("self_attn.v_proj.bias", (kv,))]
        if self.o_bias:
            out += [("self_attn.o_proj.bias", (h,))]
        if self.qk_norm:
            out += [("self_attn.q_norm.weight", (self.head_dim,)), ("self_attn.k_norm.weight", (self.head_dim,))]
        out += [("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i))]
        if self.mlp_bias:
            out += [("mlp.gate_proj.bias", (i,)), ("mlp.up_proj.bias", (i,)), ("mlp.down_proj.bias", (h,))]
        out += [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]
        return tuple(out)

    def root_tensors(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of the parameters outside the decoder layers: FSDP's root unit."""
        out = [("embed_tokens.weight", (self.vocab, self.hidden)), ("norm.weight", (self.hidden,))]
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return tuple(out)

    @property
    def layer_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.layer_tensors())

    @property
    def root_parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.root_tensors())


def parameter_count(shape: ModelShape) -> int:
    """P = layers x (q: h*q + k, v: h*kv each + o: q*h [+ biases] [+ 2 head_dim q/k norms] + 3 h*i [+ biases] + 2 h)
    + V*h (embedding) + h (final norm) [+ V*h untied LM head]."""
    return shape.layers * shape.layer_parameters + shape.root_parameters


def parameter_count_exact(config: Mapping[str, Any] | Any) -> int:
    """The parameters of ``AutoModelForCausalLM.from_config(config)`` built on the meta device (no memory), each
    once (a tied LM head is the embedding). ``config``: a transformers config or a ``config.json`` dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, Mapping):
        values = dict(config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def sharded_numel(tensors: Iterable[tuple[str, tuple[int, ...]]], world: int) -> int:
    """Elements one of ``world`` ranks holds: FSDP2 shards each tensor on dim 0, padded to a multiple of the world
    size, so a rank holds ceil(dim0 / W) x (the other dims) of every tensor."""
    return sum(-(-s[0] // world) * math.prod(s[1:]) for _, s in tensors)


# --------------------------------------------------------------------------- LoRA


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in features, out features) of each linear module of a decoder layer."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class LoraShape:
    """LoRA adapters of rank ``r`` on the linear modules ``targets`` of every decoder layer (PEFT's "all-linear":
    all seven, never the LM head), with ``dropout`` on each adapter's input."""

    r: int
    targets: tuple[str, ...] = LORA_MODULES
    dropout: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any) -> LoraShape:
        """From a recipe's ``sft.lora`` / ``rl.lora`` (``r``, ``target_modules``, ``dropout``)."""
        targets = settings.target_modules
        if targets == "all-linear":
            targets = LORA_MODULES
        elif isinstance(targets, str):
            raise ValueError(f"target_modules {targets!r}: only 'all-linear' or a list of module names is counted")
        unknown = set(targets) - set(LORA_MODULES)
        if unknown:
            raise ValueError(f"target_modules {sorted(unknown)}: not linear modules of a decoder layer")
        return cls(r=settings.r, targets=tuple(targets), dropout=settings.dropout)

    def layer_tensors(self, shape: ModelShape) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """lora_A [r, in] and lora_B [out, r] of each adapted module of one layer."""
        out = []
        for name in self.targets:
            fan_in, fan_out = linear_shapes(shape)[name]
            out += [(f"{name}.lora_A", (self.r, fan_in)), (f"{name}.lora_B", (fan_out, self.r))]
        return tuple(out)


def lora_parameters(shape: ModelShape, lora: LoraShape) -> int:
    """layers x sum over the adapted modules of r x (in + out)."""
    return shape.layers * sum(math.prod(s) for _, s in lora.layer_tensors(shape))


# --------------------------------------------------------------------------- activations


def layer_activation_bytes_per_token(shape: ModelShape, compute_bytes: int, *, lora: LoraShape | None = None,
                                     masked_length: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer between its forward and its backward.

    Counted tensor by tensor from transformers' decoder layer with SDPA attention (b = compute dtype bytes; h, q =
    heads x head_dim, kv = KV heads x head_dim, i = intermediate; RMSNorm computes in float32):

    * each RMSNorm (2): its float32 input copy (4h) and the rsqrt (4), plus its bf16 normalised input (b h) for the
      weight's gradient when the norm trains (full fine-tuning);
    * the inputs of the linear layers: the normalised hidden state before q/k/v (b h) and before gate/up (b h),
      down_proj's input (b i); o_proj's input is SDPA's output itself (no copy);
    * q/k norms (Qwen3): float32 copy and rsqrt of q and k ((4 q + 4 heads) + (4 kv + 4 KV heads)), plus the
      normalised q and k (b q + b kv) when they train;
    * SDPA: rotated q (b q), k and v (b kv each; b q each when an attention mask is passed: transformers then
      repeats the KV heads), its output (b q) and log-sum-exp (4 heads); with a mask, the mask as an additive
      bias in the compute dtype, b x ``masked_length`` per token (a [B, 1, T, T] tensor per layer);
    * the MLP: gate output (SiLU's input), SiLU output and up output (3 b i).

    Full fine-tuning: 2 (4 + 2b) h + 8 + 4 b i + [(4+b)(q + kv) + 4 (heads + KV heads)] + 2 b q + 2 b kv
    + 4 heads. LoRA: the frozen norms keep no normalised copy; each adapted module keeps its r-dim ``lora_A`` output
    (b r), and with dropout its own dropped-out input (b in) and mask (1 byte x in) instead of sharing the input.
    Checked against the tensors autograd saves on CPU (tests/test_memory_estimate.py).
    """
    b, h, q, kv, i = compute_bytes, shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    full = lora is None
    total = 2 * (4 * h + 4 + (b * h if full else 0))  # the two RMSNorms
    if shape.qk_norm:
        total += (4 + (b if full else 0)) * (q + kv) + 4 * (shape.q_heads + shape.kv_heads)
    kv_saved = q if masked_length else kv
    total += b * q + 2 * b * kv_saved + b * q + 4 * shape.q_heads + b * masked_length  # SDPA
    total += 3 * b * i  # gate output, SiLU output, up output
    # The inputs of the linear layers, grouped by the tensor they read (o_proj's is SDPA's output, counted).
    for x_dim, modules, shared in ((h, ("q_proj", "k_proj", "v_proj"), False), (q, ("o_proj",), True),
                                   (h, ("gate_proj", "up_proj"), False), (i, ("down_proj",), False)):
        if full:
            total += 0 if shared else b * x_dim
            continue
        adapted = [m for m in modules if m in lora.targets]
        total += len(adapted) * b * lora.r
        if lora.dropout > 0:
            total += len(adapted) * (b + 1) * x_dim
        elif adapted and not shared:
            total += b * x_dim
    return total


@dataclass(frozen=True)
class MicroBatchShape:
    """One forward/backward: ``sequences`` rows padded to ``length`` tokens, the LM head on ``logit_positions`` of
    each row (GRPO: the longest completion + 1; SFT: from the first labelled position; None: all).

    ``padded``: an attention mask reaches SDPA (rows of different lengths; transformers drops an all-ones mask);
    None: when there is more than one row. ``reference_logits``: the loss keeps a reference's logits beside the
    policy's (the cold start's objectives with a reference; GRPO passes reference log-probs, not logits).
    ``chunk_rows``: token_stats' positions per chunk (None: its default on an accelerator, 2^26 // vocab; a CPU's
    is `rl.common.token_stats.default_chunk_size(vocab, "cpu")`)."""

    sequences: int
    length: int
    logit_positions: int | None = None
    padded: bool | None = None
    reference_logits: bool = False
    chunk_rows: int | None = None

    @property
    def tokens(self) -> int:
        return self.sequences * self.length

    @property
    def logit_tokens(self) -> int:
        return self.sequences * (self.length if self.logit_positions is None else self.logit_positions)

    @property
    def masked(self) -> bool:
        return self.sequences > 1 if self.padded is None else self.padded


def _outside_layers_bytes(shape: ModelShape, batch: MicroBatchShape, b: int, lora: LoraShape | None,
                          checkpointing: bool) -> int:
    """Saved outside the decoder layers: RoPE cos and sin (2 b head_dim N), the final norm's float32 copy and rsqrt
    (4h + 4 per token); when the model trains in full also the token ids (8 N, the embedding's gradient), the final
    norm's normalised input (b h N) and the LM head's input (b h over the kept positions, or over all N when one row
    keeps the whole hidden state alive). With checkpointing the boolean [B, 1, T, T] mask of a padded batch is kept
    for the recomputations (B T^2)."""
    n = batch.tokens
    total = 2 * b * shape.head_dim * n + (4 * shape.hidden + 4) * n
    if lora is None:
        head_rows = n if (batch.sequences == 1 or batch.logit_tokens == n) else batch.logit_tokens
        total += 8 * n + b * shape.hidden * n + b * shape.hidden * head_rows
    if checkpointing and batch.masked:
        total += batch.sequences * batch.length ** 2
    return total


def activation_bytes(shape: ModelShape, batch: MicroBatchShape, compute_bytes: int, *, checkpointing: bool,
                     lora: LoraShape | None = None) -> int:
    """Activations of one micro-batch of N = B x T tokens at the end of the forward.

    Without checkpointing: layers x per-layer bytes per token x N + what is saved outside the layers.
    With checkpointing (each decoder layer recomputed in the backward): every layer keeps only its input (b h N),
    plus one layer's full activations while it is recomputed, plus the same outside the layers.
    LoRA on a frozen embedding: nothing before the first layer's adapters needs a gradient, so that layer's input
    norm keeps nothing (4h + 4 less per token), nor do its q/k/v dropout masks and (Qwen3) the q/k norms behind a
    projection without adapter."""
    per_token = layer_activation_bytes_per_token(shape, compute_bytes, lora=lora,
                                                 masked_length=batch.length if batch.masked else 0)
    outside = _outside_layers_bytes(shape, batch, compute_bytes, lora, checkpointing)
    if checkpointing:
        return shape.layers * compute_bytes * shape.hidden * batch.tokens + per_token * batch.tokens + outside
    first = 0
    if lora is not None:  # a frozen embedding: the first layer's input needs no gradient until the first adapter
        first = 4 * shape.hidden + 4 + (lora.dropout > 0) * shape.hidden * sum(
            m in lora.targets for m in ("q_proj", "k_proj", "v_proj"))
        if shape.qk_norm:  # a q or k norm behind a frozen projection of that input keeps nothing either
            first += (4 * shape.q_dim + 4 * shape.q_heads) * ("q_proj" not in lora.targets)
            first += (4 * shape.kv_dim + 4 * shape.kv_heads) * ("k_proj" not in lora.targets)
    return shape.layers * per_token * batch.tokens - first * batch.tokens + outside


def logits_bytes(vocab: int, logit_tokens: int, compute_bytes: int, *, reference_logits: bool = False,
                 chunk_rows: int | None = None) -> int:
    """The logits and the loss's vocabulary temporaries at their peak.

    The LM head writes [L, V] logits in the compute dtype (L = positions with labels); `rl.common.token_stats`
    keeps them (and the reference's, when given) for its backward and works on c = min(L, 2^26 // V) positions at
    a time in float32. Forward: the logits (+ reference) and 3 float32 [c, V] chunks (5 with a reference).
    Backward: the logits (+ reference), their full-size gradient ``zeros_like(logits)`` and 2 float32 chunks (3
    with a reference) plus the chunk's gradient in the compute dtype. The peak is the larger:
    max((1 + r) b L V + (3 + 2r) 4 c V,  (2 + r) b L V + (2 + r) 4 c V + b c V)."""
    c = min(logit_tokens, chunk_rows or max(1, CHUNK_ELEMENTS // vocab))
    r = int(reference_logits)
    forward = (1 + r) * compute_bytes * logit_tokens * vocab + (3 + 2 * r) * 4 * c * vocab
    backward = (2 + r) * compute_bytes * logit_tokens * vocab + (2 + r) * 4 * c * vocab + compute_bytes * c * vocab
    return max(forward, backward)


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Item:
    """One line of an estimate: ``bytes`` per GPU (or host, ``device``), during ``phase``, and how it was computed."""

    name: str
    bytes: int
    formula: str
    phase: str = RESIDENT
    device: str = GPU


@dataclass(frozen=True)
class Estimate:
    """Itemised memory of one process kind (a trainer rank, an engine rank). The peak on a device is its resident
    items plus the largest of its other phases; ``info`` items are not counted."""

    title: str
    items: tuple[Item, ...] = field(default_factory=tuple)

    def phase_bytes(self, phase: str, device: str = GPU) -> int:
        return sum(i.bytes for i in self.items if i.phase == phase and i.device == device)

    def peak(self, device: str = GPU) -> int:
        phases = {i.phase for i in self.items} - {RESIDENT, INFO}
        return self.phase_bytes(RESIDENT, device) + max((self.phase_bytes(p, device) for p in phases), default=0)

    def item(self, name: str) -> Item:
        found = [i for i in self.items if i.name == name]
        if len(found) != 1:
            raise KeyError(f"{name!r}: {len(found)} items of that name in {self.title!r}")
        return found[0]

    def format(self, unit: float = 2**30, unit_name: str = "GiB") -> str:
        """A table: name, size, phase, formula; then the peak per device."""
        width = max((len(i.name) for i in self.items), default=10)
        lines = [self.title]
        for i in self.items:
            where = "" if i.device == GPU else f" [{i.device}]"
            lines.append(f"  {i.name:<{width}}  {i.bytes / unit:9.2f} {unit_name}  {i.phase + where:<18}  {i.formula}")
        lines.append(f"  {'peak per GPU':<{width}}  {self.peak() / unit:9.2f} {unit_name}")
        if any(i.device == HOST for i in self.items):
            lines.append(f"  {'host memory':<{width}}  {self.peak(HOST) / unit:9.2f} {unit_name}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TrainerSetup:
    """How the trainer ranks hold the model (`rl.workers.WorkerSettings` and the resolved precision).

    ``bf16``: the resolved compute precision (MixedPrecisionPolicy in bf16); else the compute is in the stored
    dtype. ``weight_dtype``: the stored policy weights without LoRA (float32 master weights; SFT: model.dtype).
    ``lora_base_dtype``: the frozen LoRA base (GRPO ``rl.lora.base_dtype``; None: ``weight_dtype``).
    ``reference``: none | copy (a second, frozen, sharded model) | adapter (the LoRA base with adapters off: free).
    ``unsharded_accumulation``: an optimizer step at one rank (the GRPO update, the cold start's step) keeps every
    decoder layer gathered from its first forward to its last backward, except with ``cpu_offload``
    (`rl.workers.trainer_worker.ONE_RANK_UNSHARDED_ACCUMULATION`). Its float32 gradients, unsharded until the last
    backward, take the place of the sharded ones (one rank: the same size), which exist only after it.
    """

    workers: int = 1
    bf16: bool = True
    weight_dtype: str = "float32"
    lora: LoraShape | None = None
    lora_base_dtype: str | None = None
    reference: str = "none"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    unsharded_accumulation: bool = False

    def __post_init__(self):
        if self.reference not in ("none", "copy", "adapter"):
            raise ValueError(f"reference must be none, copy or adapter, got {self.reference!r}")
        if self.reference == "adapter" and self.lora is None:
            raise ValueError("reference 'adapter' needs LoRA (the base with adapters off)")

    @property
    def load_dtype(self) -> str:
        """The dtype the policy is loaded in (`TrainerWorker.base_dtype`)."""
        return (self.lora_base_dtype or self.weight_dtype) if self.lora is not None else self.weight_dtype

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bf16 else self.load_dtype

    @property
    def reference_dtype(self) -> str:
        """A frozen reference is stored in bf16 when the compute is bf16, else in the load dtype."""
        return "bfloat16" if self.bf16 else self.load_dtype

    @property
    def uses_fsdp(self) -> bool:
        """False only for one rank computing in float32 on float32 weights without CPU offload (the plain module)."""
        return not (self.workers == 1 and self.load_dtype == "float32" and not self.bf16 and not self.cpu_offload)


def trainer_estimate(shape: ModelShape, setup: TrainerSetup, batch: MicroBatchShape) -> Estimate:
    """One trainer rank's memory for a training micro-batch ``batch``.

    Resident: the sharded weights, gradients and AdamW moments (1/W each, in the stored dtype; LoRA: the frozen
    base in its dtype, the float32 adapters with gradients and moments), the sharded reference, and the gathered
    root units (FSDP2 never reshards a root module after its forward: the policy's embeddings, final norm and LM
    head stay gathered from the forward to the end of the backward, and a reference's stay gathered after its
    no-grad forward). With ``cpu_offload`` the sharded state is in host memory.
    Forward/backward: two gathered decoder layers (the current one and the prefetched next), the activations, the
    logits and loss temporaries, the LM head's unsharded gradient (kept until the root's reduce-scatter) and one
    layer's gradients in flight (compute dtype, then the float32 reduce-scatter input and its 1/W output).
    End of backward: the root's gradients in flight (activations are freed by then).
    """
    W = setup.workers
    b = dtype_bytes(setup.compute_dtype)
    state_device = HOST if setup.cpu_offload else GPU
    fsdp = setup.uses_fsdp
    base_tensors = [t for _ in range(shape.layers) for t in shape.layer_tensors()] + list(shape.root_tensors())
    items: list[Item] = []
    P = parameter_count(shape)
    per = f" / W={W}" if W > 1 else ""

    if setup.lora is None:
        w = dtype_bytes(setup.weight_dtype)
        numel = sharded_numel(base_tensors, W)
        trainable, train_bytes = numel, w
        items.append(Item("weights (sharded)", numel * w, f"P x {w} B ({setup.weight_dtype}){per}: "
                          f"{_n(P)} x {w}{per}", RESIDENT, state_device))
    else:
        base_bytes = dtype_bytes(setup.load_dtype)
        base_numel = sharded_numel(base_tensors, W)
        adapters = [t for _ in range(shape.layers) for t in setup.lora.layer_tensors(shape)]
        trainable, train_bytes = sharded_numel(adapters, W), 4
        items.append(Item("base weights, frozen (sharded)", base_numel * base_bytes,
                          f"P x {base_bytes} B ({setup.load_dtype}){per}: {_n(P)} x {base_bytes}{per}", RESIDENT,
                          state_device))
        items.append(Item("LoRA adapters (sharded)", trainable * 4,
                          f"P_lora x 4 B (float32){per}: {_n(lora_parameters(shape, setup.lora))} x 4{per}", RESIDENT,
                          state_device))
    what = "P" if setup.lora is None else "P_lora"
    items.append(Item("gradients (sharded)", trainable * train_bytes,
                      f"{what} x {train_bytes} B{per}", RESIDENT, state_device))
    items.append(Item("AdamW moments (sharded)", 2 * trainable * train_bytes,
                      f"2 x {what} x {train_bytes} B{per}", RESIDENT, state_device))
    ref_bytes = dtype_bytes(setup.reference_dtype)
    if setup.reference == "copy":
        items.append(Item("reference (sharded)", sharded_numel(base_tensors, W) * ref_bytes,
                          f"P x {ref_bytes} B ({setup.reference_dtype}){per}", RESIDENT, state_device))
    else:
        items.append(Item("reference (sharded)", 0, "none" if setup.reference == "none" else
                          "the LoRA base with adapters off: no copy", RESIDENT, state_device))

    root, layer = shape.root_parameters, shape.layer_parameters
    gather = b if setup.bf16 else dtype_bytes(setup.load_dtype)
    lora_layer = 0 if setup.lora is None else sum(math.prod(s) for _, s in setup.lora.layer_tensors(shape))
    lora_gather = b if setup.bf16 else 4
    if fsdp:
        items.append(Item("policy root unit, gathered", root * gather,
                          f"(V h{'' if shape.tied else ' x 2'} + h) x {gather} B: {_n(root)} x {gather}"))
        if setup.reference == "copy":
            items.append(Item("reference root unit, gathered", root * ref_bytes,
                              f"{_n(root)} x {ref_bytes} B (kept after its no-grad forward)"))
        adapters_text = f" + LoRA {_n(lora_layer)} x {lora_gather} B" if lora_layer else ""
        all_layers = W == 1 and setup.unsharded_accumulation and not setup.cpu_offload
        gathered = shape.layers if all_layers else 2
        items.append(Item("decoder layers, gathered " + ("(all: one rank keeps them across the update)" if all_layers
                                                          else "(current + prefetched)"),
                          gathered * (layer * gather + lora_layer * lora_gather),
                          f"{gathered} x (P_layer {_n(layer)} x {gather} B{adapters_text})", STEP))

    def activations(checkpointing: bool) -> int:
        return activation_bytes(shape, batch, b, checkpointing=checkpointing, lora=setup.lora)

    on, off = activations(True), activations(False)
    n_text = f"{batch.sequences} x {batch.length} tokens"
    ckpt = setup.activation_checkpointing
    items.append(Item(f"activations (checkpointing {'on' if ckpt else 'off'})", on if ckpt else off,
                      f"{n_text}: " + ("layers x b h N + one layer's activations + outside the layers" if ckpt else
                                       "layers x per-layer bytes/token x N + outside the layers"), STEP))
    items.append(Item(f"activations (checkpointing {'off' if ckpt else 'on'}, not used)", off if ckpt else on,
                      "the other setting of activation_checkpointing", INFO))
    copies = "(2 + 1 reference)" if batch.reference_logits else "2"
    items.append(Item("logits and loss temporaries",
                      logits_bytes(shape.vocab, batch.logit_tokens, b, reference_logits=batch.reference_logits,
                                   chunk_rows=batch.chunk_rows),
                      f"L={_n(batch.logit_tokens)} positions x V={_n(shape.vocab)}: {copies} x {b} B x L V"
                      " + float32 chunks", STEP))
    if fsdp:
        if setup.lora is None:
            head = shape.vocab * shape.hidden
            items.append(Item("LM head gradient, unsharded", head * b, f"V h x {b} B: {_n(head)} x {b}", STEP))
            layer_grads, root_grads = layer, root
        else:
            layer_grads, root_grads = lora_layer, 0
        rs = b + 4 + 4 / W
        items.append(Item("one layer's gradients in flight", int(layer_grads * rs),
                          f"{_n(layer_grads)} x ({b} + 4 + 4/W) B", STEP))
        if root_grads:
            items.append(Item("root gradients in flight", int(root_grads * rs),
                              f"{_n(root_grads)} x ({b} + 4 + 4/W) B", END_OF_BACKWARD))
    title = (f"trainer rank ({'LoRA r=%d' % setup.lora.r if setup.lora else 'full'}, W={W}, compute "
             f"{setup.compute_dtype}, {n_text})")
    return Estimate(title, tuple(items))


# --------------------------------------------------------------------------- engines (vLLM)


def kv_heads_per_rank(kv_heads: int, tensor_parallel: int) -> int:
    """vLLM splits the KV heads over the tensor-parallel ranks, at least one per rank (replicated when TP > heads):
    max(1, kv_heads // TP)."""
    return max(1, kv_heads // tensor_parallel)


def engine_weight_bytes(shape: ModelShape, dtype: str, tensor_parallel: int = 1) -> int:
    """One engine rank's weights in the engine dtype: q, o, gate, up, down and the vocabulary (padded to a
    multiple of 64) split over TP; k and v split by KV heads (`kv_heads_per_rank`); norms replicated."""
    tp = tensor_parallel
    h, d, i = shape.hidden, shape.head_dim, shape.intermediate
    q_rank = -(-shape.q_heads // tp) * d
    kv_rank = kv_heads_per_rank(shape.kv_heads, tp) * d
    i_rank = -(-i // tp)
    layer = h * q_rank + 2 * h * kv_rank + q_rank * h + 3 * h * i_rank + 2 * h
    layer += (q_rank + 2 * kv_rank) * shape.qkv_bias + h * shape.o_bias + (2 * i_rank + h) * shape.mlp_bias
    layer += 2 * d * shape.qk_norm
    vocab_rank = -(-(-(-shape.vocab // VOCAB_PADDING) * VOCAB_PADDING) // tp)
    root = vocab_rank * h * (1 if shape.tied else 2) + h
    return (shape.layers * layer + root) * dtype_bytes(dtype)


def kv_page_bytes(shape: ModelShape, dtype: str, tensor_parallel: int = 1, block_size: int = GPU_BLOCK_SIZE) -> int:
    """vLLM's page of one block in one layer on one rank (``AttentionSpec.page_size_bytes``):
    2 (K and V) x block_size x KV heads per rank x head_dim x dtype bytes."""
    return 2 * block_size * kv_heads_per_rank(shape.kv_heads, tensor_parallel) * shape.head_dim * dtype_bytes(dtype)


def kv_blocks(tokens: int, block_size: int = GPU_BLOCK_SIZE) -> int:
    """Blocks a sequence of ``tokens`` tokens takes: ceil(tokens / block_size)."""
    return -(-tokens // block_size)


def kv_batch_blocks(prompts: int, samples: int, prompt_len: int, max_new_tokens: int,
                    block_size: int = GPU_BLOCK_SIZE, *, share_prompt_blocks: bool = False) -> int:
    """Blocks for ``prompts`` x ``samples`` sequences of prompt_len + max_new_tokens tokens, all at full length at
    once: prompts x samples x ceil((p + m) / block). ``share_prompt_blocks``: with prefix caching the samples of a
    prompt share its full blocks, floor(p / block) once per prompt."""
    each = kv_blocks(prompt_len + max_new_tokens, block_size)
    if not share_prompt_blocks:
        return prompts * samples * each
    shared = prompt_len // block_size
    return prompts * (shared + samples * (each - shared))


ENGINE_MAX_SEQS = 256  # vLLM's max_num_seqs (sequences sampled per step) as the planner assumes it


def engine_step_bytes(shape: ModelShape, dtype: str, tensor_parallel: int, batched_tokens: int,
                      max_seqs: int = ENGINE_MAX_SEQS) -> int:
    """One engine step's temporaries (an inference forward keeps nothing between layers): T = ``batched_tokens``
    tokens through one layer at a time - the residual and the normalised hidden state (2 h), the q/k/v projection
    (q + 2 kv), the gate/up output and the activation (3 i), the split ones divided over TP - in the engine dtype,
    and the sampler's float32 logits with two temporaries (softmax, log-probs) for ``max_seqs`` sequences."""
    tp = tensor_parallel
    b = dtype_bytes(dtype)
    q_rank = -(-shape.q_heads // tp) * shape.head_dim
    kv_rank = kv_heads_per_rank(shape.kv_heads, tp) * shape.head_dim
    per_token = 2 * shape.hidden + q_rank + 2 * kv_rank + 3 * -(-shape.intermediate // tp)
    vocab_rank = -(-(-(-shape.vocab // VOCAB_PADDING) * VOCAB_PADDING) // tp)
    return batched_tokens * b * per_token + max_seqs * 3 * 4 * vocab_rank


def engine_estimate(shape: ModelShape, *, dtype: str, tensor_parallel: int = 1, block_size: int = GPU_BLOCK_SIZE,
                    prompts: int, samples: int, prompt_len: int, max_new_tokens: int, max_model_len: int,
                    kv_cache_gib: float | None = None, batched_tokens: int | None = None,
                    max_seqs: int = ENGINE_MAX_SEQS) -> Estimate:
    """One engine rank: its weights, the KV cache the recipe reserves (``rollout.kv_cache_gib`` per GPU, vLLM's
    ``kv_cache_memory_bytes``), and for comparison (info) what the batch needs at full length, with and without
    shared prompt blocks, and the least vLLM accepts (one ``max_model_len`` sequence). ``prompts``: this engine's
    share of the batch's prompts.

    ``batched_tokens``: the engine's step budget (``max_num_batched_tokens``); when given, the forward of one step
    is counted too (`engine_step_bytes`): its largest layer temporaries and the sampler's float32 logits."""
    tp = tensor_parallel
    page = kv_page_bytes(shape, dtype, tp, block_size)
    per_block = shape.layers * page
    heads = kv_heads_per_rank(shape.kv_heads, tp)
    b = dtype_bytes(dtype)
    page_text = f"2 x {block_size} x {heads} KV heads x {shape.head_dim} x {b} B x {shape.layers} layers"
    items = [Item("engine weights", engine_weight_bytes(shape, dtype, tp),
                  f"P_rank x {b} B ({dtype}, TP={tp})")]
    if kv_cache_gib is not None:
        reserved = int(kv_cache_gib * 2**30)
        blocks = reserved // per_block
        items.append(Item("KV cache reserved (kv_cache_gib)", reserved,
                          f"{kv_cache_gib:g} GiB = {_n(blocks)} blocks of {page_text}"
                          f" = {_n(blocks * block_size)} tokens"))
    seqs, tokens = prompts * samples, prompt_len + max_new_tokens
    need = kv_batch_blocks(prompts, samples, prompt_len, max_new_tokens, block_size)
    items.append(Item("KV cache the batch needs", need * per_block,
                      f"{prompts} x {samples} seqs x ceil({tokens} / {block_size}) = {_n(need)} blocks x {page_text}",
                      INFO))
    shared = kv_batch_blocks(prompts, samples, prompt_len, max_new_tokens, block_size, share_prompt_blocks=True)
    items.append(Item("KV cache the batch needs, prompt blocks shared", shared * per_block,
                      f"{prompts} x (floor({prompt_len} / {block_size}) + {samples} x (ceil({tokens} / {block_size})"
                      f" - floor({prompt_len} / {block_size}))) = {_n(shared)} blocks", INFO))
    if batched_tokens:
        step = engine_step_bytes(shape, dtype, tp, batched_tokens, max_seqs)
        items.append(Item("forward of one step", step,
                          f"{_n(batched_tokens)} tokens x {b} B x (2 h + (q + 2 kv + 3 i) / TP) + {max_seqs} seqs x "
                          f"3 x 4 B x V / TP", STEP))
    least = kv_blocks(max_model_len, block_size)
    items.append(Item("KV cache vLLM requires (one max_model_len sequence)", least * per_block,
                      f"ceil({max_model_len} / {block_size}) = {_n(least)} blocks", INFO))
    return Estimate(f"engine rank ({dtype}, TP={tp}, block {block_size}, {seqs} sequences x {tokens} tokens)",
                    tuple(items))
