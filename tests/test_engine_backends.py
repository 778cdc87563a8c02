"""The engine's attention backends agree: the fused Triton decode path gives the torch reference's tokens.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET
before triton is imported), on a tiny model for a few steps; on a GPU the same comparison runs compiled, plus a bf16
run of the CUDA engine.
"""

import pytest
import torch

pytest.importorskip("triton")

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig  # noqa: E402
from async_grpo.model import build_model  # noqa: E402
from async_grpo.workers.engine import GenerationEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2]]


def tokens(results):
    return [[c.token_ids for c in g] for g in results]


def test_triton_decode_backend_matches_torch_reference():
    model = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
    params = SamplingConfig(temperature=0, max_new_tokens=4, ignore_eos=True)
    ref = GenerationEngine(model, KVConfig(block_size=4, num_blocks=32, attention="torch"), DEVICE, torch.float32)
    fused = GenerationEngine(model, KVConfig(block_size=4, num_blocks=32, attention="triton"), DEVICE, torch.float32)
    assert fused.backend == "triton"
    expected = ref.generate(PROMPTS, 2, params)
    got = fused.generate(PROMPTS, 2, params)
    assert tokens(got) == tokens(expected)
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_picks_a_fused_backend_and_generates_in_bf16():
    model = build_model(ModelConfig(preset="tiny", init_seed=3), "cuda", torch.bfloat16).eval()
    engine = GenerationEngine(model, KVConfig(block_size=16, num_blocks=256), "cuda", torch.bfloat16)
    assert engine.backend in ("triton", "flash")
    params = SamplingConfig(temperature=1.0, max_new_tokens=32, ignore_eos=True)
    results = engine.generate([list(range(1, 40))] * 8, 4, params, seed=0)
    assert all(len(c.token_ids) == 32 and len(c.logprobs) == 32 for g in results for c in g)
    assert engine.pool.stats().blocks_in_use == 0


class PaddedBuckets:
    """Stands in for DecodeGraphs where there is no CUDA: each decode step runs the forward a graph would
    replay (the smallest bucket >= rows, extra rows padding) eagerly, so the padding path runs on CPU."""

    def __init__(self, engine, buckets):
        self.engine, self.buckets, self.replayed = engine, buckets, []

    def bucket_for(self, rows):
        return next((b for b in self.buckets if b >= rows), None)

    def replay(self, bucket):
        self.replayed.append(bucket)
        return self.engine._graph_forward(bucket)


def test_padded_bucket_decode_matches_torch_reference_as_rows_leave():
    model = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
    ref = GenerationEngine(model, KVConfig(block_size=4, num_blocks=32, attention="torch"), DEVICE, torch.float32)
    padded = GenerationEngine(model, KVConfig(block_size=4, num_blocks=32, attention="triton", cuda_graphs=False),
                              DEVICE, torch.float32)
    padded.graphs = PaddedBuckets(padded, [1, 2, 4, 8])
    free = ref.generate(PROMPTS, 2, SamplingConfig(temperature=0, max_new_tokens=5, ignore_eos=True))
    # Prompt 1's third token stops it early (and any other sample that draws it): the batch shrinks.
    stop = free[1][0].token_ids[2]
    params = SamplingConfig(temperature=0, max_new_tokens=5, ignore_eos=True, stop_token_ids=[stop])
    expected = ref.generate(PROMPTS, 2, params)
    got = padded.generate(PROMPTS, 2, params)
    assert tokens(got) == tokens(expected)
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # 6 rows padded to 8; prompt 1's samples stop after their third token, leaving 4 rows: bucket 4.
    assert padded.graphs.replayed == [8, 8, 4, 4]
    assert padded.last_stats.graph_steps == padded.last_stats.decode_steps == 4
    assert padded.pool.stats().blocks_in_use == 0
