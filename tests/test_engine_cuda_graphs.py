"""CUDA-graph decode: buckets, fallback, and graph replay giving the eager engine's tokens (GPU tests skip on CPU)."""

import logging

import pytest
import torch

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig
from async_grpo.model import build_model
from async_grpo.model.args import ModelArgs
from async_grpo.model.decoder import Decoder
from async_grpo.workers.cuda_graphs import DecodeGraphs, graph_buckets
from async_grpo.workers.engine import GenerationEngine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")

# Lengths around block boundaries (block 4): 3, 4, 5, 9 tokens.
PROMPTS = [[3, 1, 4], [1, 5, 9, 2], [6, 5, 3, 5, 8], [9, 7, 9, 3, 2, 3, 8, 4, 6]]


def tokens(results):
    return [[c.token_ids for c in g] for g in results]


def test_buckets_are_powers_of_two_up_to_the_largest():
    assert graph_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert graph_buckets(1) == [1]
    with pytest.raises(ValueError, match="max_rows = 0"):
        graph_buckets(0)


def test_cpu_engine_ignores_the_cuda_graphs_flag():
    model = build_model(ModelConfig(preset="tiny"), "cpu", torch.float32).eval()
    engine = GenerationEngine(model, KVConfig(block_size=4, num_blocks=32, cuda_graphs=True), "cpu", torch.float32)
    assert engine.graphs is None
    engine.generate([[1, 2, 3]], 2, SamplingConfig(temperature=0, max_new_tokens=3))
    assert engine.last_stats.graph_steps == 0 and engine.last_stats.decode_steps == 2


def engines(model, dtype, **kv):
    cfg = dict(block_size=4, num_blocks=256, attention="triton", cuda_graph_max_rows=16, **kv)
    graphed = GenerationEngine(model, KVConfig(cuda_graphs=True, **cfg), "cuda", dtype)
    eager = GenerationEngine(model, KVConfig(cuda_graphs=False, **cfg), "cuda", dtype)
    assert graphed.graphs is not None and graphed.graphs.captured
    assert eager.graphs is None
    return graphed, eager


@needs_cuda
def test_graph_decode_gives_the_eager_greedy_tokens_fp32():
    model = build_model(ModelConfig(preset="tiny", init_seed=5), "cuda", torch.float32).eval()
    graphed, eager = engines(model, torch.float32)
    params = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)
    expected = eager.generate(PROMPTS, 3, params)  # 12 rows: the bucket of 16 pads 4
    got = graphed.generate(PROMPTS, 3, params)
    assert tokens(got) == tokens(expected)
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert graphed.last_stats.graph_steps == graphed.last_stats.decode_steps == 23
    assert eager.last_stats.graph_steps == 0
    assert graphed.pool.stats().blocks_in_use == 0

    # A stop id from one run makes rows finish at different steps: the batch shrinks through the buckets.
    stop = expected[2][0].token_ids[6]
    params = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    expected = eager.generate(PROMPTS, 3, params)
    assert tokens(graphed.generate(PROMPTS, 3, params)) == tokens(expected)
    assert expected[2][0].finish_reason == "stop"
    assert graphed.pool.stats().blocks_in_use == 0


@needs_cuda
def test_graph_decode_gives_the_eager_tokens_in_bf16():
    # The Qwen2-0.5B attention shape (14 query heads, 2 KV heads, head_dim 64), two small layers.
    args = ModelArgs(vocab_size=256, hidden_size=896, intermediate_size=1024, num_layers=2, num_heads=14,
                     num_kv_heads=2, head_dim=64, rope_theta=1e6, max_position_embeddings=256,
                     tie_word_embeddings=True, attention_bias=True, architecture="qwen2")
    model = Decoder(args, device="cuda", dtype=torch.bfloat16).eval()
    model.init_weights(0)
    graphed, eager = engines(model, torch.bfloat16)
    # 4 prompts x 2 = 8 rows, exactly a bucket and never shrinking: the same GEMM shapes in both engines,
    # so bf16 rounding is identical and tokens must match exactly.
    greedy = SamplingConfig(temperature=0, max_new_tokens=20, ignore_eos=True)
    assert tokens(graphed.generate(PROMPTS, 2, greedy)) == tokens(eager.generate(PROMPTS, 2, greedy))
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=20, ignore_eos=True)
    assert tokens(graphed.generate(PROMPTS, 2, sampled, seed=3)) == tokens(eager.generate(PROMPTS, 2, sampled, seed=3))
    assert graphed.last_stats.graph_steps == 19


@needs_cuda
def test_graphs_see_weights_loaded_in_place_after_capture():
    model = build_model(ModelConfig(preset="tiny", init_seed=0), "cuda", torch.float32).eval()
    graphed, eager = engines(model, torch.float32)
    params = SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    before = tokens(graphed.generate(PROMPTS, 2, params))
    model.load_full_state_dict(build_model(ModelConfig(preset="tiny", init_seed=1), "cpu", torch.float32)
                               .full_state_dict())
    after = tokens(graphed.generate(PROMPTS, 2, params))
    assert after == tokens(eager.generate(PROMPTS, 2, params))
    assert after != before


@needs_cuda
def test_more_rows_than_the_largest_bucket_decode_eagerly():
    model = build_model(ModelConfig(preset="tiny", init_seed=5), "cuda", torch.float32).eval()
    graphed, eager = engines(model, torch.float32)
    params = SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = PROMPTS * 3  # 12 prompts x 2 = 24 rows > 16: the buffers grow, graphs are captured again
    assert tokens(graphed.generate(prompts, 2, params)) == tokens(eager.generate(prompts, 2, params))
    assert graphed.decode_batch.capacity == 24
    assert graphed.last_stats.graph_steps == 0 and graphed.last_stats.decode_steps == 5
    assert graphed.graphs is not None and graphed.graphs.captured


@needs_cuda
def test_capture_failure_falls_back_to_eager_with_a_warning(caplog):
    buffer = torch.zeros(4, device="cuda")

    def syncs_with_the_host(rows: int) -> torch.Tensor:
        if buffer.sum().item() > 1:  # a host sync: not allowed while capturing
            return buffer
        return buffer[:rows] + 1

    graphs = DecodeGraphs(syncs_with_the_host, max_rows=4, device="cuda")
    with caplog.at_level(logging.WARNING, logger="async_grpo.workers.cuda_graphs"):
        assert graphs.capture() is False
    assert "decoding eagerly" in caplog.text
    assert not graphs.captured and graphs.bucket_for(1) is None
