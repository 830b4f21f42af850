"""Token-level SFT objectives: plain SFT, EKSFT (selective masking) and DFT.

Pure tensor functions, usable inside any trainer.

Inputs. `logits` [B, T, V] (any float dtype) and `labels` [B, T] ALREADY ALIGNED: the
caller has shifted, so `logits[:, t]` predicts `labels[:, t]`; prompt and padding carry
`labels == -100` and are never trained nor selected. `ref_logits` [B, T, V] are the
frozen reference's logits on the same tokens (None for objectives that do not need one,
see `Objective.needs_reference`).

Statistics. `token_entropy_and_kl` / `token_statistics` compute entropy, KL(policy ||
reference) and log p(label) in float32, chunked over the valid positions (one
[chunk, V] float32 temporary at a time, forward and backward). Outputs keep the graph to
`logits`; EKSFT detaches them for the selection and uses them with gradient for its
regularisers, so the statistics come from the one forward that computes the loss.

Settings. Each objective owns its settings class, in its own module (`SFTSettings`,
`EKSFTSettings`, `DFTSettings`, all `ObjectiveSettings`), registered with its parts function;
`ObjectiveConfig` is their union keyed on `name` (`catalog.py`), `objective_names()` the names.

Selection. `select_masked_tokens`: per sequence (or per micro-batch, scope="batch"),
k = floor(ratio * n) tokens by entropy and by KL, exact for decimal ratios; ties go to the
earlier position. `selection_decided_by_ties` reports when a set was chosen by that rule
(e.g. all-zero KL at step 0), logged by EKSFT as `kl_ties`. `select_eksft_tokens` applies
them with an `EKSFTSettings`: EKSFT's loss and `eksft inspect-masks` both call it (through
`get_objective(name).select`).

Losses and normalisation. Each objective builds `LossParts`: named terms holding a token
sum (with gradient), a token count and a signed weight. `parts.reduce()` divides by the
local counts; `parts.reduce(counts)` divides by the given counts instead. For gradient
accumulation (and data parallelism) sum `parts.counts()` over all micro-batches (and
ranks), e.g. `LossParts.total_counts(...)`, then backpropagate `parts.reduce(total)` of
each micro-batch: their sum is the full-batch token-mean loss. Entry points:
`sft_loss` / `eksft_loss` / `dft_loss(logits, labels, ref_logits, config) -> (loss, metrics)`
(locally normalised), `get_objective(name)(..., counts=None)` and `get_objective(name).parts(...)`.
Metrics are detached 0-dim float32 tensors.

Differences from the authors' code: the KL regulariser is the true KL (they subtract
reference log-probs from policy probabilities), lambdas are constant (their "dynamic
lambda" changes a local copy and is lost), and no extra no-grad policy forward is run.
"""

from .catalog import ObjectiveConfig
from .dft import DFTSettings, dft_loss, dft_parts
from .eksft import EKSFTSettings, eksft_loss, eksft_parts, select_eksft_tokens
from .parts import Aggregation, LossParts, LossTerm
from .registry import OBJECTIVES, Objective, get_objective, objective_names, register
from .selection import TokenSelection, select_masked_tokens, selection_decided_by_ties, tokens_to_select
from .settings import ObjectiveSettings
from .sft import SFTSettings, sft_loss, sft_parts
from rl.common.token_stats import IGNORE_INDEX, TokenStats, token_entropy_and_kl, token_statistics

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Aggregation",
    "DFTSettings",
    "EKSFTSettings",
    "LossParts",
    "LossTerm",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveSettings",
    "SFTSettings",
    "TokenSelection",
    "TokenStats",
    "dft_loss",
    "dft_parts",
    "eksft_loss",
    "eksft_parts",
    "get_objective",
    "objective_names",
    "register",
    "select_eksft_tokens",
    "select_masked_tokens",
    "selection_decided_by_ties",
    "sft_loss",
    "sft_parts",
    "token_entropy_and_kl",
    "token_statistics",
    "tokens_to_select",
]
