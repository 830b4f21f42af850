"""Chat-template tokenisation that trains on assistant tokens only, and counts truncation out loud.

The conversation is rendered once with the tokenizer's chat template; the character span of
each assistant turn is found by rendering the prefix up to that turn (with the generation
prompt) and the conversation through that turn. Tokens whose characters start inside an
assistant span get labels; every other token (system, user, role headers, padding) gets -100.
This works for any template whose rendering of a prefix is a prefix of the whole rendering,
which we check rather than assume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rl.common.labels import IGNORE_INDEX


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0  # examples cut at max_length (still used if they keep an assistant token)
    dropped: int = 0  # examples with no assistant token left after truncation
    tokens: int = 0
    trained_tokens: int = 0
    truncated_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained); "
            f"truncated {self.truncated}, dropped {self.dropped} (no assistant token left)"
        )


def assistant_spans(tokenizer, messages: list[dict[str, str]],
                    template_kwargs: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the [start, end) character spans of the assistant turns (end-of-turn token included).

    ``template_kwargs``: the chat template's variables (``data.chat_template_kwargs``), the same the RL and
    evaluation prompts are rendered with, so that what is trained follows exactly what the model will be prompted with.
    """
    kwargs = template_kwargs or {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kwargs) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kwargs)
        if not through.startswith(before):
            parted = max(0, len(os.path.commonprefix([before, through])) - 20)  # a little context before they part
            raise ValueError(
                f"the chat template{f' with {kwargs}' if kwargs else ''} does not render assistant turn {i} after the "
                f"generation prompt: the prompt ends {before[-40:]!r} but the conversation continues "
                f"{through[parted:parted + 60]!r}. The model would be trained on "
                "a turn it is never prompted for (e.g. a <think> trace with enable_thinking: false, whose prompt "
                "already closes the think block): change data.chat_template_kwargs or the data")
        if not text.startswith(through):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently "
                "(e.g. it rewrites earlier turns); assistant-only masking cannot be derived from it"
            )
        spans.append((len(before), len(through.rstrip("\n")) if through.endswith("\n") else len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_length: int,
                          template_kwargs: dict | None = None) -> dict:
    """``{"input_ids", "labels", "truncated"}``; labels are -100 outside assistant turns."""
    text, spans = assistant_spans(tokenizer, messages, template_kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, offsets)
    ]
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def tokenize_dataset(tokenizer, conversations, max_length: int, origins: list[str] | None = None,
                     template_kwargs: dict | None = None):
    """Tokenise many conversations; returns ``(examples, stats)``. Examples with nothing to train are dropped and counted.
    A conversation the template cannot render is an error naming its row (``origins``)."""
    stats = TokenizeStats()
    examples = []
    for i, messages in enumerate(conversations):
        try:
            ex = tokenize_conversation(tokenizer, messages, max_length, template_kwargs)
        except ValueError as e:
            raise ValueError(f"{origins[i] if origins else f'conversation {i}'}: {e}") from None
        stats.examples += 1
        if ex["truncated"]:
            stats.truncated += 1
            stats.truncated_rows.append(origins[i] if origins else str(i))
        n_trained = sum(label != IGNORE_INDEX for label in ex["labels"])
        if n_trained == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(ex["input_ids"])
        stats.trained_tokens += n_trained
        examples.append(ex)
    return examples, stats
