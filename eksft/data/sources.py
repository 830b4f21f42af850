"""Reading rows from wherever a recipe points: local JSONL/JSON/Parquet, the HF hub, or an embedded generator.

Every row keeps its origin (file and 1-based row number) so that a malformed row can be
reported precisely: ``data/train.jsonl: row 17: missing field 'messages'``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Malformed data; the message names the file (or source), the row and the field."""


@dataclass(frozen=True)
class Row:
    origin: str  # file path, hub id or embedded:<name>
    index: int  # 1-based row number within the origin (the line number for JSONL)
    data: dict[str, Any]

    def where(self) -> str:
        return f"{self.origin}: row {self.index}"


def read_rows(source: str, split: str = "train", num_examples: int | None = None, seed: int = 0,
              fields: dict[str, str] | None = None, selection: str = "first",
              revision: str | None = None) -> list[Row]:
    """Rows of ``source``; ``fields`` renames source fields to canonical ones ({canonical: source_field});
    ``revision``: the hub commit, tag or branch of a hub source (ignored for the others).

    ``num_examples`` rows of a file or hub source are the first N (``selection="first"``) or N drawn uniformly
    without replacement by ``random.Random(seed)`` (``selection="random"``), kept in source order with their
    original row numbers; N >= the number of rows takes them all. An ``embedded:`` generator makes N rows from
    ``seed`` (``selection="random"`` is an error there).
    """
    if selection not in ("first", "random"):
        raise DataError(f"{source}: selection must be 'first' or 'random', got {selection!r}")
    if source.startswith("embedded:"):
        if selection == "random":
            raise DataError(f"{source}: selection 'random' does not apply to an embedded generator "
                            "(it makes num_examples rows from seed)")
        from eksft.data.generators import generate

        rows = [Row(source, i + 1, r) for i, r in enumerate(generate(source.removeprefix("embedded:"), num_examples or 256, seed))]
    else:
        path = Path(source).expanduser()
        if path.suffix in {".jsonl", ".json", ".parquet"}:
            if not path.is_file():
                raise DataError(f"{source}: file not found")
            rows = _read_file(path)
        elif path.is_dir() or source.count("/") == 1:
            rows = _read_hub(source, split, revision)
        else:
            raise DataError(f"{source}: expected a .jsonl/.json/.parquet file, an HF hub id (org/name) or embedded:<generator>")
        if num_examples is not None:
            rows = select_rows(rows, num_examples, seed) if selection == "random" else rows[:num_examples]
    if fields:
        rows = [_rename(r, fields) for r in rows]
    return rows


def select_rows(rows: list[Row], n: int, seed: int) -> list[Row]:
    """``n`` of ``rows`` drawn uniformly without replacement with ``random.Random(seed)``, in source order (all when
    ``n >= len(rows)``): the same seed and rows give the same choice on every machine (Python documents only
    ``random()`` as reproducible across its versions, not ``sample``: tests pin one choice, so a change would show)."""
    if n >= len(rows):
        return list(rows)
    chosen = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in chosen]


def _rename(row: Row, fields: dict[str, str]) -> Row:
    data = dict(row.data)
    for canonical, original in fields.items():
        if original not in data:
            raise DataError(f"{row.where()}: missing field {original!r} (mapped to {canonical!r}); row has {sorted(row.data)}")
        data[canonical] = data[original]
    return Row(row.origin, row.index, data)


def _read_file(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                rows.append(_as_row(str(path), lineno, obj))
        return rows
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}}), got {type(obj).__name__}")
        return [_as_row(str(path), i + 1, r) for i, r in enumerate(obj)]
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [Row(str(path), i + 1, r) for i, r in enumerate(table.to_pylist())]


def _read_hub(source: str, split: str, revision: str | None = None) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as e:  # offline machines, missing splits, private repos: say which source failed
        raise DataError(f"{source}: could not load split {split!r} from the HF hub or cache: {e}") from e
    return [Row(f"{source}[{split}]", i + 1, dict(r)) for i, r in enumerate(ds)]


def _as_row(origin: str, index: int, obj: Any) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{origin}: row {index}: expected a JSON object, got {type(obj).__name__}")
    return Row(origin, index, obj)
