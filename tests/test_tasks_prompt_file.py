"""Prompt files (JSONL, Parquet): field names from config, errors that point at the line, the jsonl task."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from async_grpo.config import ConfigError, TaskConfig
from async_grpo.tasks import build_task
from async_grpo.tasks.prompt_file import read_prompt_records

_RECORDS = [
    {"q": "sort:321=", "a": "123", "level": 1},
    {"q": "sort:90=", "a": "09", "level": 2},
    {"q": "sort:5=", "a": "5", "level": 3},
]


def _write_jsonl(path, records, extra: str = "") -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" + extra)
    return str(path)


def test_jsonl_records_are_read_in_order_with_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_RECORDS[0]) + "\n\n   \n" + json.dumps(_RECORDS[1]) + "\n")
    assert read_prompt_records(str(path), "q", "a") == _RECORDS[:2]


def test_bad_prompt_files_name_the_line_and_field(tmp_path):
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", _RECORDS[:1], extra="{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: expected a JSON object"):
        read_prompt_records(bad_json, "q", "a")
    no_prompt = _write_jsonl(tmp_path / "noq.jsonl", [_RECORDS[0], {"question": "x", "a": "1"}])
    expected = r"noq.jsonl line 2: field task.prompt_field = 'q' is None: expected text \(fields present: \['a', 'question'\]\)"
    with pytest.raises(ValueError, match=expected):
        read_prompt_records(no_prompt, "q", "a")
    no_answer = _write_jsonl(tmp_path / "noa.jsonl", [_RECORDS[0], {"q": "x"}])
    assert len(read_prompt_records(no_answer, "q", "a")) == 2
    with pytest.raises(ValueError, match=r"noa.jsonl line 2: field task.answer_field = 'a' is missing"):
        read_prompt_records(no_answer, "q", "a", require_answer=True)
    with pytest.raises(ValueError, match=r"expected a file ending in one of .*got '.csv'"):
        (tmp_path / "p.csv").write_text("q,a\n")
        read_prompt_records(str(tmp_path / "p.csv"), "q", "a")
    with pytest.raises(ValueError, match=r"task.path = '.*missing.jsonl': expected an existing JSONL or Parquet file"):
        read_prompt_records(str(tmp_path / "missing.jsonl"), "q", "a")
    with pytest.raises(ValueError, match=r"holds no records"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_prompt_records(str(tmp_path / "empty.jsonl"), "q", "a")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"is a Parquet file, which needs pyarrow: install it"):
        read_prompt_records(str(path), "q", "a")


@pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed (optional dependency)"
)
def test_parquet_rows_read_like_jsonl_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(_RECORDS), path)
    assert read_prompt_records(str(path), "q", "a") == _RECORDS


def test_jsonl_task_scores_exact_match_with_the_char_tokenizer(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", _RECORDS)
    task = build_task(TaskConfig(name="jsonl", path=path, prompt_field="q", answer_field="a"), seed=0)
    tok = task.tokenizer
    item = task.source.item(1)
    assert (item.prompt, item.answer, item.metadata) == ("sort:90=", "09", {"level": 2})
    assert item.prompt_ids == [tok.bos_id, *tok.encode("sort:90=")]
    completions = [tok.encode("09") + [tok.eos_id], tok.encode(" 09 "), tok.encode("90")]
    assert task.score_batch([item] * 3, completions) == [1.0, 1.0, 0.0]
    # Sharding works over file records as over generated ones.
    shards = [task.prompts(seed=2, shard_rank=r, shard_count=3) for r in range(3)]
    assert sorted(next(s).id for s in shards) == [0, 1, 2]


def test_jsonl_task_without_reward_needs_answers(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"q": "sort:1="}])
    with pytest.raises(ValueError, match=r"field task.answer_field = 'a' is missing"):
        build_task(TaskConfig(name="jsonl", path=path, prompt_field="q", answer_field="a"), seed=0)
    with pytest.raises(ConfigError, match=r"task.params.digits.*takes none"):
        build_task(TaskConfig(name="jsonl", path=path, params={"digits": 3}), seed=0)
