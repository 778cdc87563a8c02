"""bench/rollout.py's --quick mode: the CPU smoke run of the rollout benchmark, end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rollout.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_a_table_row_and_writes_json(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "rollout.json"
    assert bench.main(["--quick", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| quick |")]
    assert len(rows) == 2  # as the case finishes, and in the final table
    (result,) = json.loads(out.read_text())
    # 2 prompts of 12 tokens x 2 samples, 8 new, block 4: per prompt 3 shared blocks + 2 x (ceil(19/4) - 3)
    # own = 7, so 14 in all; a dense cache holds ceil(20/4) = 5 blocks per sample, 20 in all.
    assert (result["peak_blocks"], result["dense_blocks"]) == (14, 20)
    assert result["decode_steps"] == 7 and result["graph_steps"] == 0
    assert result["hf_tok_s"] > 0 and result["engine_tok_s"] > 0
    assert result["speedup"] == pytest.approx(result["engine_tok_s"] / result["hf_tok_s"])


def test_blocks_needed_is_the_sum_of_admission_worst_cases():
    bench = load_bench()
    case = bench.CASES["32x16-1k"]
    # Prompt 1024 = 64 full blocks shared; each sample caches up to 1279 tokens = 80 blocks, 16 of them its own.
    assert bench.blocks_needed(case, 16) == 32 * (64 + 16 * 16)
    assert bench.dense_blocks(case, 16) == 32 * 16 * 80
