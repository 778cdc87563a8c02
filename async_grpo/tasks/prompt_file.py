"""Reading prompt records from a JSONL or Parquet file, with the field names from the config.

A record is one JSON object per line (blank lines skipped) or one Parquet row. The prompt field must
hold text in every record; the answer field is optional per record unless the caller requires it.
Errors name the file, the line (or row) and the field, so a bad data file is fixed in one look.
`RecordPrompts` makes the records a prompt source; prompts are formatted (chat template) only when taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from async_grpo.tasks.base import PromptItem

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_prompt_records(
    path: str, prompt_field: str, answer_field: str, require_answer: bool = False
) -> list[dict[str, Any]]:
    """All records of a prompt file, in file order, each checked for its prompt (and answer) field."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"task.path = {path!r}: expected an existing JSONL or Parquet file")
    suffix = file.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _read_jsonl(file)
    elif suffix in PARQUET_SUFFIXES:
        records = _read_parquet(file)
    else:
        raise ValueError(
            f"task.path = {path!r}: expected a file ending in one of "
            f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}, got {suffix!r}"
        )
    if not records:
        raise ValueError(f"task.path = {path!r}: the file holds no records, expected at least one")
    for where, record in records:
        if not isinstance(record.get(prompt_field), str):
            raise ValueError(
                f"{path} {where}: field task.prompt_field = {prompt_field!r} is {record.get(prompt_field)!r}: "
                f"expected text (fields present: {sorted(record)})"
            )
        if require_answer and record.get(answer_field) is None:
            raise ValueError(
                f"{path} {where}: field task.answer_field = {answer_field!r} is missing: "
                f"expected a reference answer in every record (fields present: {sorted(record)})"
            )
    return [record for _, record in records]


def _read_jsonl(file: Path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file} line {number}: expected a JSON object ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{file} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((f"line {number}", record))
    return records


def _read_parquet(file: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"task.path = {str(file)!r} is a Parquet file, which needs pyarrow: install it (pip install pyarrow) "
            "or convert the file to JSONL"
        ) from None
    rows = pq.read_table(file).to_pylist()
    return [(f"row {i}", row) for i, row in enumerate(rows)]


class RecordPrompts:
    """A `PromptSource` over file records: the prompt field formatted to ids on first use."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        prompt_field: str,
        answer_field: str,
        format_prompt: Callable[[str], list[int]],
        answer_of: Callable[[Any], str | None] | None = None,
    ):
        self.records = records
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.format_prompt = format_prompt
        self.answer_of = answer_of or (lambda raw: None if raw is None else str(raw))

    def __len__(self) -> int:
        return len(self.records)

    def item(self, index: int) -> PromptItem:
        record = self.records[index]
        prompt = record[self.prompt_field]
        metadata = {k: v for k, v in record.items() if k not in (self.prompt_field, self.answer_field)}
        return PromptItem(
            id=index,
            prompt_ids=self.format_prompt(prompt),
            prompt=prompt,
            answer=self.answer_of(record.get(self.answer_field)),
            metadata=metadata,
        )
