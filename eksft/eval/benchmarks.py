"""Evaluation benchmarks: a registry of HF hub datasets, local files and embedded generators.

A benchmark name is one of
  * a registry key (``BENCHMARKS``): ``math500``, ``aime24``, ``aime25``, ``amc23``, ``gsm8k``, ``minerva``,
    ``olympiadbench`` - loaded from the HF hub (or its local cache) with the spec's config and split, its fields
    mapped to {problem, answer} and its answer normalised;
  * a local ``.jsonl`` / ``.json`` / ``.parquet`` file, read with :func:`eksft.data.read_rows`; fields are
    detected per row (problem: ``problem`` | ``question``; answer: ``answer`` | ``final_answer``) and answers
    normalised (gsm8k-style ``"... #### 1,234"`` -> ``"1234"``, a list -> its first element, ``$`` stripped);
  * ``embedded:<generator>`` (``arithmetic``, ``multistep``, ``gsm``, ``mix``): procedural problems made with the
    held-out seed ``EMBEDDED_EVAL_SEED`` (10_000; the recipes' training defaults are seed 0 for SFT and 1 for RL),
    ``EMBEDDED_DEFAULT_SIZE`` (64) problems unless ``num_problems`` says otherwise. The one-step ``arithmetic``
    space is small (two one-digit terms), so some evaluation problems also occur in training data; the other
    generators rarely repeat.

Hub fields, as published (first rows checked against the dataset cards and common RL recipes):

=============  ===============================  ====================  =====  ======================================
name           hub id                           config                split  fields -> {problem, answer}
=============  ===============================  ====================  =====  ======================================
math500        HuggingFaceH4/MATH-500           -                     test   problem, answer (LaTeX string)
aime24         HuggingFaceH4/aime_2024          -                     train  problem, answer (string, "204")
aime25         yentinglin/aime_2025             -                     train  problem, answer (string or int)
amc23          zwhe99/amc23                     -                     test   question, answer (float, 27.0 -> "27")
gsm8k          openai/gsm8k                     main                  test   question, answer ("... #### 1,234")
minerva        math-ai/minervamath              -                     test   question, answer (LaTeX string)
olympiadbench  Hothan/OlympiadBench             OE_TO_maths_en_COMP   train  question, final_answer (["$x$"] -> "x")
=============  ===============================  ====================  =====  ======================================

``load_benchmark(name)`` returns ``[{"prompt": messages, "answer": str, "problem": str}]`` with prompts built by
:func:`eksft.data.build_prompt` (the recipe's system prompt and instruction; by default the boxed-answer
instruction, which the reward needs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eksft.data.config import DataConfig
from eksft.data.sources import DataError, Row

EMBEDDED_EVAL_SEED = 10_000
"""Seed of the embedded generators for evaluation (held out: training defaults are 0 for SFT and 1 for RL)."""

EMBEDDED_DEFAULT_SIZE = 64
"""Problems made by an ``embedded:<generator>`` benchmark unless ``num_problems`` is given."""

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "final_answer", "Answer")


# ----------------------------------------------------------------------------- answer normalisers


def _scalar(value: Any) -> str:
    """A number or string as a clean string; integral floats lose their ``.0`` (27.0 -> "27")."""
    if isinstance(value, bool):
        raise DataError(f"expected a string or a number, got a boolean {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value).strip()
    raise DataError(f"expected a string or a number, got {type(value).__name__}")


def normalize_plain(value: Any) -> str:
    """Strings stripped, numbers as strings (MATH-500, AIME, AMC, Minerva)."""
    return _scalar(value)


def normalize_gsm8k(value: Any) -> str:
    """The text after the last ``####`` with thousands separators removed: ``"... #### 1,234"`` -> ``"1234"``."""
    text = _scalar(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text.strip("$").strip()


def normalize_first_of_list(value: Any) -> str:
    """OlympiadBench ``final_answer``: a list of answers -> the first one, surrounding ``$`` removed."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError("the answer list is empty")
        value = value[0]
    return _strip_dollars(_scalar(value))


def normalize_auto(value: Any) -> str:
    """For local files: a list -> its first element, gsm8k ``####`` answers -> the number, ``$`` stripped."""
    if isinstance(value, (list, tuple)):
        return normalize_first_of_list(value)
    text = _scalar(value)
    if "####" in text:
        return normalize_gsm8k(text)
    return _strip_dollars(text)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BenchmarkSpec:
    """One hub benchmark: where it lives and how a row becomes {problem, answer}.

    ``fields`` maps canonical names to the dataset's own (``{"problem": "question", "answer": "answer"}``, the same
    convention as ``DataSource.fields``); ``normalize`` turns the raw answer value into the gold answer string.
    """

    name: str
    hub_id: str
    split: str
    fields: Mapping[str, str]
    normalize: Callable[[Any], str] = normalize_plain
    config: str | None = None
    description: str = ""

    def source(self) -> str:
        """``hub_id`` plus config and split, for messages."""
        return f"{self.hub_id}" + (f" (config {self.config!r})" if self.config else "") + f" split {self.split!r}"

    def to_problem_answer(self, row: Row) -> tuple[str, str]:
        """``(problem, answer)`` of one dataset row; a DataError names the row and the missing field."""
        for canonical in ("problem", "answer"):
            original = self.fields[canonical]
            if original not in row.data:
                raise DataError(f"{row.where()}: benchmark {self.name!r}: missing field {original!r} "
                                f"(mapped to {canonical!r}); row has {sorted(row.data)}")
        problem = row.data[self.fields["problem"]]
        if not isinstance(problem, str):
            raise DataError(f"{row.where()}: field {self.fields['problem']!r} must be a string, got {type(problem).__name__}")
        try:
            answer = self.normalize(row.data[self.fields["answer"]])
        except DataError as e:
            raise DataError(f"{row.where()}: field {self.fields['answer']!r}: {e}") from None
        return problem, answer


_QA = {"problem": "question", "answer": "answer"}
_PA = {"problem": "problem", "answer": "answer"}

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", _PA,
                      description="500 MATH test problems (Lightman et al. 2023 subset)"),
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", _PA, description="AIME 2024 I + II, 30 problems"),
        BenchmarkSpec("aime25", "yentinglin/aime_2025", "train", _PA, description="AIME 2025 I + II, 30 problems"),
        BenchmarkSpec("amc23", "zwhe99/amc23", "test", _QA, description="AMC 2023, 40 problems (numeric answers)"),
        BenchmarkSpec("gsm8k", "openai/gsm8k", "test", _QA, normalize=normalize_gsm8k, config="main",
                      description="GSM8K test, 1319 grade-school word problems"),
        BenchmarkSpec("minerva", "math-ai/minervamath", "test", _QA,
                      description="Minerva OCW quantitative reasoning, 272 problems"),
        BenchmarkSpec("olympiadbench", "Hothan/OlympiadBench", "train", {"problem": "question", "answer": "final_answer"},
                      normalize=normalize_first_of_list, config="OE_TO_maths_en_COMP",
                      description="OlympiadBench open-ended text-only English math competition, 675 problems"),
    )
}


def embedded_generators() -> tuple[str, ...]:
    from eksft.data.generators import GENERATORS

    return (*GENERATORS, "mix")


def allowed_names() -> str:
    """Human-readable list of valid benchmark names (for error messages and --help)."""
    embedded = ", ".join(f"embedded:{g}" for g in embedded_generators())
    return f"{', '.join(BENCHMARKS)}, {embedded}, or a path to a {'/'.join(FILE_SUFFIXES)} file"


def check_benchmark_name(name: str) -> str:
    """Return ``name`` if it is a registry key, ``embedded:<generator>`` or a ``.jsonl/.json/.parquet`` path.

    File paths are checked by suffix only here (a config may be validated before the file exists where it runs);
    ``load_benchmark`` reports a missing file.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"benchmark name must be a non-empty string, got {name!r} (allowed: {allowed_names()})")
    if name in BENCHMARKS:
        return name
    if name.startswith("embedded:"):
        if name.removeprefix("embedded:") in embedded_generators():
            return name
        raise DataError(f"unknown embedded benchmark {name!r} (allowed: {allowed_names()})")
    if Path(name).suffix in FILE_SUFFIXES:
        return name
    raise DataError(f"unknown benchmark {name!r} (allowed: {allowed_names()})")


# ----------------------------------------------------------------------------- loading


def _hub_rows(name: str, spec: BenchmarkSpec, revision: str | None = None) -> list[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split, revision=revision)
    except Exception as e:  # offline, renamed dataset, missing split: say which benchmark and where
        raise DataError(
            f"benchmark {name!r}: could not load {spec.source()} from the HF hub or the local cache "
            f"({type(e).__name__}: {e}). Without network, download it once elsewhere into the HF cache, or pass a "
            f"local .jsonl/.json/.parquet copy as the benchmark name."
        ) from e
    origin = f"{spec.hub_id}[{spec.split}]"
    return [Row(origin, i + 1, dict(r)) for i, r in enumerate(ds)]


def _auto_problem_answer(row: Row) -> tuple[str, str]:
    problem_key = next((k for k in PROBLEM_FIELDS if k in row.data), None)
    answer_key = next((k for k in ANSWER_FIELDS if k in row.data), None)
    if problem_key is None or answer_key is None:
        raise DataError(f"{row.where()}: cannot find the problem and answer: expected fields "
                        f"{{{'|'.join(PROBLEM_FIELDS)}}} and {{{'|'.join(ANSWER_FIELDS)}}}; row has {sorted(row.data)}")
    problem = row.data[problem_key]
    if not isinstance(problem, str):
        raise DataError(f"{row.where()}: field {problem_key!r} must be a string, got {type(problem).__name__}")
    try:
        answer = normalize_auto(row.data[answer_key])
    except DataError as e:
        raise DataError(f"{row.where()}: field {answer_key!r}: {e}") from None
    return problem, answer


def load_benchmark(name: str, num_problems: int | None = None, data_cfg=None, revision: str | None = None) -> list[dict]:
    """``[{"prompt": messages, "answer": str, "problem": str}]`` of benchmark ``name`` (see the module docstring).

    ``num_problems``: the first N problems (embedded generators: how many to make, default 64).
    ``data_cfg``: an ``eksft.data.config.DataConfig`` (or anything with ``system_prompt`` and ``instruction``) whose
    prompt settings are used; default: ``DataConfig()``'s (no system prompt, the boxed-answer instruction).
    ``revision``: the hub commit, tag or branch of a registry benchmark (default: the hub's main branch).
    Raises :class:`DataError` naming the benchmark (and hub id, file or row) on any problem.
    """
    from eksft.data import read_rows, to_prompt_answer

    if data_cfg is None:
        data_cfg = DataConfig()
    if num_problems is not None and num_problems < 1:
        raise DataError(f"benchmark {name!r}: num_problems must be >= 1, got {num_problems}")
    check_benchmark_name(name)
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
        rows = _hub_rows(name, spec, revision)
        if num_problems is not None:
            rows = rows[:num_problems]
        pairs = [(row, spec.to_problem_answer(row)) for row in rows]
    elif name.startswith("embedded:"):
        rows = read_rows(name, num_examples=num_problems or EMBEDDED_DEFAULT_SIZE, seed=EMBEDDED_EVAL_SEED)
        pairs = [(row, (row.data["problem"], str(row.data["answer"]))) for row in rows]
    else:
        rows = read_rows(name, num_examples=num_problems)
        pairs = [(row, _auto_problem_answer(row)) for row in rows]
    if not pairs:
        raise DataError(f"benchmark {name!r}: no problems")
    return [to_prompt_answer(Row(row.origin, row.index, {"problem": problem, "answer": answer}), "problem_answer",
                             data_cfg.system_prompt, data_cfg.instruction)
            for row, (problem, answer) in pairs]
