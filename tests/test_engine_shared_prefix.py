"""Shared-prefix (cascade) decode in the engine: the same tokens as the plain kernel and the torch reference.

Each group's full prompt blocks are read once for all its live samples. On CPU the Triton kernels run
under the interpreter (tests/conftest.py sets TRITON_INTERPRET before triton is imported) on a tiny fp32 model with
block size 4 and prompts spanning several blocks; samples stop at different steps (stop ids), so groups
hold 1..n live rows. The per-step prefix/suffix split is checked against a hand computation. GPU tests
(skipped without CUDA) replay the shared step from CUDA graphs.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from async_grpo.config import KVConfig, ModelConfig, SamplingConfig  # noqa: E402
from async_grpo.kv.backend import shared_prefix_mode, shared_prefix_splits  # noqa: E402
from async_grpo.kv.shared_prefix import prefix_tile_rows  # noqa: E402
from async_grpo.kv.pool import KVPool  # noqa: E402
from async_grpo.model import build_model  # noqa: E402
from async_grpo.model.args import ModelArgs  # noqa: E402
from async_grpo.model.decoder import Decoder  # noqa: E402
from async_grpo.workers.decode_batch import DecodeBatch  # noqa: E402
from async_grpo.workers.engine import GenerationEngine  # noqa: E402
from async_grpo.workers.prefix_groups import group_slots  # noqa: E402
from async_grpo.workers.sequence import Sequence, SequenceGroup  # noqa: E402
from async_grpo.workers.token_history import TokenHistory  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 4
# 9, 13, 3 and 6 tokens: 2, 3, 0 and 1 full blocks (the third shares nothing), tails of 1, 1, 3 and 2.
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9], [6, 2, 8], [1, 4, 1, 4, 2, 1]]


def tokens(results):
    return [[c.token_ids for c in g] for g in results]


def engine(model, attention, shared_prefix="auto", device=DEVICE, dtype=torch.float32, **kv):
    # 48 blocks admit every group of these tests at once (their worst cases sum to at most 36).
    cfg = dict(block_size=BS, num_blocks=48, attention=attention, shared_prefix=shared_prefix) | kv
    return GenerationEngine(model, KVConfig(**cfg), device, dtype)


def assert_same_completions(got, expected, abs_logprob=1e-4):
    assert tokens(got) == tokens(expected)
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            assert a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, abs=abs_logprob)


def steps_with_a_sharing_group(results, prompts, min_rows):
    """Decode steps k = 1, 2, ... at which some group with a full prompt block has >= min_rows live rows.

    A completion of L tokens got its first token from the prefill and token k + 1 from decode step k, so
    its row is live at decode step k exactly when L >= k + 1.
    """
    longest = max(len(c.token_ids) for g in results for c in g)
    steps = 0
    for k in range(1, longest):
        live = [sum(len(c.token_ids) >= k + 1 for c in g) for g in results]
        steps += any(n >= min_rows and len(p) >= BS for n, p in zip(live, prompts))
    return steps


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()


# ---- the per-step prefix / suffix split -------------------------------------------------------------


def forked_group(pool, history, prompt_len, n):
    """A prompt of `prompt_len` tokens prefilled into the pool and forked into n samples that sampled token 7."""
    group = SequenceGroup(index=prompt_len, prompt_ids=list(range(prompt_len)), n=n)
    kv = pool.new_sequence()
    pool.append_slots(kv, prompt_len)
    for i, handle in enumerate(pool.fork(kv, n)):
        seq = Sequence(group, i, 0, history, history.open(), kv=handle)
        history.append(np.array([seq.slot]), np.array([7]), np.array([-0.5], dtype=np.float32))
        group.samples.append(seq)
    return group.samples


def test_prefix_groups_and_suffix_tables_equal_a_hand_computation():
    pool = KVPool(KVConfig(block_size=BS, num_blocks=40), num_layers=1, num_kv_heads=1, head_dim=2,
                  device="cpu", dtype=torch.float32)
    history = TokenHistory(max_new_tokens=16)
    # Pool blocks are handed out in order: A (9 tokens, n=3) holds 0, 1 shared and tails 2, 3, 4;
    # B (4 tokens, n=2) shares block 5 and has no tail; C (3 tokens, n=2) has tails 6 and 7 and shares nothing.
    a, b, c = forked_group(pool, history, 9, 3), forked_group(pool, history, 4, 2), forked_group(pool, history, 3, 2)
    assert [pool.block_table(s.kv) for s in a + b + c] == [[0, 1, 2], [0, 1, 3], [0, 1, 4], [5], [5], [6], [7]]
    batch = DecodeBatch(pool, max_blocks_per_seq=6, capacity=12, device="cpu")
    batch.add([a[0], b[0], a[1], c[0], b[1], a[2], c[1]], np.full(7, 7))  # groups interleaved over the rows
    batch.grow_blocks()  # B's rows sit at a block boundary: they get blocks 8 and 9
    assert batch.shares_prefix(min_rows=3) and not batch.shares_prefix(min_rows=4)

    # A bucket of 12 rows for 3 prompts of 3 samples: min(12, 3 + ceil(12 / 3)) = 7 group slots.
    assert group_slots(12, num_prompts=3, group_size=3) == 7
    batch.refresh_prefix_groups(12, max_group_rows=3)
    meta = batch.metadata(12, 10, batch.prefix_groups(12, 7, max_group_rows=3))
    groups, shared = meta.shared_prefix.groups, meta.shared_prefix
    # Groups in the order of their first rows: A = rows 0, 2, 5; B = 1, 4; C = 3, 6; then the padding rows
    # 7..11 in groups of at most 3 with an empty prefix; slots 5 and 6 stay unused.
    assert groups.order.tolist() == [0, 2, 5, 1, 4, 3, 6, 7, 8, 9, 10, 11]
    assert groups.starts[:5].tolist() == [0, 3, 5, 7, 10]
    assert groups.counts.tolist() == [3, 2, 2, 3, 2, 0, 0]
    assert groups.prefix_lens.tolist() == [8, 4, 0, 0, 0, 0, 0]
    assert groups.row_prefix_blocks.tolist() == [2, 1, 2, 0, 1, 2, 0] + [0] * 5
    assert groups.prefix_block_tables[0, :2].tolist() == [0, 1] and groups.prefix_block_tables[1, :1].tolist() == [5]
    assert groups.max_live == 3
    # Own blocks after the prefix; columns past them repeat the table's last column and are never read.
    assert shared.suffix_block_tables[:7, 0].tolist() == [2, 8, 3, 6, 9, 4, 7]
    # Positions 9, 4, 9, 3, 4, 9, 3: context 10, 5, 10, 4, ... minus the prefix's 8, 4, 8, 0, ... tokens.
    assert shared.suffix_lens.tolist() == [2, 1, 2, 4, 1, 2, 4] + [0] * 5
    assert meta.context_lens.tolist() == [10, 5, 10, 4, 5, 10, 4] + [0] * 5

    # A's first row and C's second finish: rows b0, a1, c0, b1, a2; B now comes first, A has rows 1 and 4.
    batch.remove(np.array([True, False, False, False, False, False, True]))
    with pytest.raises(RuntimeError, match="refresh first"):
        batch.prefix_groups(5, 5, max_group_rows=3)
    batch.refresh_prefix_groups(5, max_group_rows=3)  # an eager step: no padding rows
    meta = batch.metadata(5, 10, batch.prefix_groups(5, group_slots(5, 3, 3), max_group_rows=3))
    groups = meta.shared_prefix.groups
    assert groups.order.tolist() == [0, 3, 1, 4, 2]
    assert groups.starts[:3].tolist() == [0, 2, 4] and groups.counts.tolist() == [2, 2, 1, 0, 0]
    assert groups.prefix_lens.tolist() == [4, 8, 0, 0, 0]
    assert groups.prefix_block_tables[1, :2].tolist() == [0, 1]
    assert meta.shared_prefix.suffix_block_tables[:, 0].tolist() == [8, 3, 6, 9, 4]
    assert meta.shared_prefix.suffix_lens.tolist() == [1, 2, 4, 1, 2]
    assert batch.shares_prefix(min_rows=2) and not batch.shares_prefix(min_rows=3)
    with pytest.raises(ValueError, match="a group has 2 live rows, more than max_group_rows = 1"):
        batch.refresh_prefix_groups(5, max_group_rows=1)


def test_prefix_splits_fit_the_busy_groups_in_one_wave():
    # 512 rows of groups of 16, 14 query / 2 KV heads: 112 rows fit one 128-row tile (2 programs per SM), 32
    # busy groups x 2 KV heads = 64 programs; one wave of 132 x 2 = 264 slots holds 4 splits (not ceil = 5).
    assert shared_prefix_splits(512, 16, 14, 2, 32768, num_sms=132) == 4
    assert shared_prefix_splits(512, 16, 14, 2, 512, num_sms=132) == 2  # 512 prefix tokens allow 2 by length
    # The bench's prompt-4k cases: G 16 -> 264 // 32 = 8 splits; G 8 (56 rows, 64-row tiles, 3 per SM) -> 396 // 64 = 6.
    assert shared_prefix_splits(256, 16, 14, 2, 4096, num_sms=132) == 8
    assert shared_prefix_splits(256, 8, 14, 2, 4096, num_sms=132) == 6
    # 20 samples x 7 heads = 140 rows: two tiles per group; 26 busy groups x 2 tiles x 2 heads = 104 programs.
    assert shared_prefix_splits(512, 20, 14, 2, 32768, num_sms=132) == 2
    assert shared_prefix_splits(4096, 2, 2, 2, 32768, num_sms=132) == 1  # more programs than slots: no split
    # Groups of 4 (28 rows) still get 64-row tiles, 3 per SM: 64 busy groups x 2 heads = 128 programs -> 3 splits.
    assert shared_prefix_splits(256, 4, 14, 2, 4096, num_sms=132) == 3


def test_prefix_tiles_are_powers_of_two_between_the_bounds():
    assert [prefix_tile_rows(n) for n in (1, 14, 28, 56, 64, 65, 112, 140)] == [64, 64, 64, 64, 64, 128, 128, 128]
    assert prefix_tile_rows(28, min_tile_rows=16) == 32 and prefix_tile_rows(14, min_tile_rows=16) == 16
    assert prefix_tile_rows(28, max_tile_rows=16) == 16  # the upper bound wins


def test_shared_prefix_setting_resolves_against_the_backend():
    assert shared_prefix_mode("auto", "triton") == "auto"
    assert shared_prefix_mode("on", "triton") == "on"
    assert shared_prefix_mode("auto", "torch") == "off"
    assert shared_prefix_mode("off", "flash") == "off"
    with pytest.raises(ValueError, match="kv.shared_prefix = 'on' needs the attention backend .* uses 'torch'"):
        shared_prefix_mode("on", "torch")
    with pytest.raises(ValueError, match="kv.shared_prefix = 'sometimes': expected one of"):
        shared_prefix_mode("sometimes", "triton")


# ---- engine output: shared on == off == torch reference ---------------------------------------------


def test_greedy_tokens_with_shared_prefix_equal_plain_and_torch_reference(tiny):
    ref = engine(tiny, "torch")
    # Greedy samples of a group agree, so stop ids end whole groups, at different steps: 62 ends prompt 0's
    # group after 3 tokens, 22 prompt 1's after 2; the others run to max_new_tokens.
    params = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True, stop_token_ids=[62, 22])
    expected = ref.generate(PROMPTS, 3, params)
    assert [[len(c.token_ids) for c in g] for g in expected] == [[3] * 3, [2] * 3, [8] * 3, [8] * 3]
    on, off = engine(tiny, "triton", "on"), engine(tiny, "triton", "off")
    got_on, got_off = on.generate(PROMPTS, 3, params), off.generate(PROMPTS, 3, params)
    assert_same_completions(got_on, expected)
    assert_same_completions(got_off, expected)
    assert on.last_stats.shared_prefix_steps == on.last_stats.decode_steps == 7
    assert off.last_stats.shared_prefix_steps == 0 and off.last_stats.decode_steps == 7
    assert on.pool.stats().blocks_in_use == 0


def test_sampled_tokens_equal_as_samples_of_a_group_stop_at_different_steps(tiny):
    ref = engine(tiny, "torch")
    params = SamplingConfig(temperature=1.0, max_new_tokens=6, ignore_eos=True, stop_token_ids=[6, 16, 17, 39, 48, 51])
    expected = ref.generate(PROMPTS, 3, params, seed=1)
    lengths = [sorted(len(c.token_ids) for c in g) for g in expected]
    if DEVICE == "cpu":  # the CPU generator's stream, checked by hand (CUDA draws other tokens)
        # Prompt 0's group holds 3 live rows, then 2 after the first token, then 1 after the fourth.
        assert lengths == [[1, 4, 5], [2, 3, 6], [6, 6, 6], [3, 4, 6]]
    assert any(len(set(group)) > 1 for group in lengths)  # some group's samples stop at different steps
    auto, on = engine(tiny, "triton", "auto"), engine(tiny, "triton", "on")
    assert_same_completions(auto.generate(PROMPTS, 3, params, seed=1), expected)
    assert_same_completions(on.generate(PROMPTS, 3, params, seed=1), expected)
    assert on.last_stats.decode_steps == auto.last_stats.decode_steps == max(map(max, lengths)) - 1
    assert on.last_stats.shared_prefix_steps == steps_with_a_sharing_group(expected, PROMPTS, 1)
    # auto takes the shared path only while a group with a full prompt block has two live rows (on the
    # CPU: prompt 2's group keeps three to the end but shares no block, so the last two steps are plain).
    assert auto.last_stats.shared_prefix_steps == steps_with_a_sharing_group(expected, PROMPTS, 2)
    if DEVICE == "cpu":
        assert (on.last_stats.shared_prefix_steps, auto.last_stats.shared_prefix_steps) == (5, 3)


def test_shared_prefix_off_and_auto_without_sharing_keep_the_plain_path(tiny, monkeypatch):
    seen = []
    forward = tiny.forward_paged

    def recording_forward(ids, positions, attn, rows=None, **options):
        seen.append(attn.meta.shared_prefix is not None)
        return forward(ids, positions, attn, rows, **options)

    monkeypatch.setattr(tiny, "forward_paged", recording_forward)
    greedy = SamplingConfig(temperature=0, max_new_tokens=4, ignore_eos=True)
    # Eager steps only: capturing CUDA graphs runs extra forwards, one per bucket.
    off = engine(tiny, "triton", "off", cuda_graphs=False)
    off.generate(PROMPTS, 3, greedy)
    assert seen == [False] * 4 and off.last_stats.shared_prefix_steps == 0  # one prefill, three decode steps
    seen.clear()
    auto = engine(tiny, "triton", "auto", cuda_graphs=False)
    auto.generate(PROMPTS, 1, greedy)  # one sample per prompt: nothing shared
    auto.generate([[1, 2, 3], [4, 5]], 3, greedy)  # no prompt fills a block
    assert seen == [False] * 8 and auto.last_stats.shared_prefix_steps == 0
    seen.clear()
    auto.generate(PROMPTS, 2, greedy)
    assert seen == [False, True, True, True] and auto.last_stats.shared_prefix_steps == 3
    with pytest.raises(ValueError, match="kv.shared_prefix = 'on' needs the attention backend"):
        engine(tiny, "torch", "on")


class FlipAfter:
    """A DecodeControl that loads `new_state` as version 1 after `steps` steps."""

    def __init__(self, model, new_state, steps):
        self.model, self.new_state, self.steps, self.polls = model, new_state, steps, 0

    def poll_new_weights(self) -> bool:
        self.polls += 1
        return self.polls == self.steps + 1

    def on_new_weights(self) -> int:
        self.model.load_full_state_dict(self.new_state)
        return 1


def test_shared_prefix_stays_exact_after_a_weight_update_mid_generation():
    new_state = build_model(ModelConfig(preset="tiny", init_seed=4), "cpu", torch.float32).full_state_dict()
    params = SamplingConfig(temperature=1.0, max_new_tokens=7, ignore_eos=True, stop_token_ids=[5])
    results = {}
    for attention, mode in (("torch", "off"), ("triton", "on")):
        policy = build_model(ModelConfig(preset="tiny", init_seed=3), DEVICE, torch.float32).eval()
        eng = engine(policy, attention, mode)
        # Three steps in (prefill + 2 decode steps) the weights change: re-prefill, new forks, catch-up.
        results[mode] = eng.generate(PROMPTS, 3, params, seed=2, control=FlipAfter(policy, new_state, 3))
        assert eng.last_stats.weight_updates == 1 and eng.pool.stats().blocks_in_use == 0
    assert_same_completions(results["on"], results["off"])
    assert eng.last_stats.shared_prefix_steps == eng.last_stats.decode_steps > 0


class PaddedBuckets:
    """Stands in for DecodeGraphs where there is no CUDA: the forward a graph would replay (the smallest
    bucket >= rows, extra rows padding) runs eagerly, so the padded shared-prefix step runs on CPU."""

    def __init__(self, engine, buckets, shared):
        self.engine, self.buckets, self.shared, self.replayed = engine, buckets, shared, []

    def bucket_for(self, rows):
        return next((b for b in self.buckets if b >= rows), None)

    def replay(self, bucket):
        self.replayed.append(bucket)
        return self.engine._graph_forward(bucket, shared=self.shared)


def test_padded_bucket_shared_step_matches_torch_reference(tiny):
    ref = engine(tiny, "torch")
    padded = engine(tiny, "triton", "auto", cuda_graphs=False)
    padded.graphs = PaddedBuckets(padded, [1, 2, 4, 8, 16], shared=False)
    padded.shared_graphs = PaddedBuckets(padded, [1, 2, 4, 8, 16], shared=True)
    params = SamplingConfig(temperature=0, max_new_tokens=5, ignore_eos=True, stop_token_ids=[62, 22])
    expected = ref.generate(PROMPTS, 3, params)
    assert [len(g[0].token_ids) for g in expected] == [3, 2, 5, 5]
    assert_same_completions(padded.generate(PROMPTS, 3, params), expected)
    # Live rows per decode step: 12, 9, 6, 6, padded to buckets 16, 16, 8, 8 (padding groups of <= 3 rows).
    assert padded.shared_graphs.replayed == [16, 16, 8, 8]
    assert padded.graphs.replayed == []
    assert padded.last_stats.graph_steps == padded.last_stats.shared_prefix_steps == 4


# ---- GPU: the shared step replayed from CUDA graphs --------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_graph_shared_decode_gives_the_eager_plain_tokens_fp32():
    model = build_model(ModelConfig(preset="tiny", init_seed=5), "cuda", torch.float32).eval()
    kv = dict(num_blocks=256, cuda_graph_max_rows=16)  # every group admitted at once
    graphed = engine(model, "triton", "on", "cuda", cuda_graphs=True, **kv)
    eager = engine(model, "triton", "off", "cuda", cuda_graphs=False, **kv)
    assert graphed.shared_graphs is None  # captured by the first call, for its samples per prompt
    free = eager.generate(PROMPTS, 4, SamplingConfig(temperature=1.0, max_new_tokens=24, ignore_eos=True), seed=1)
    params = SamplingConfig(temperature=1.0, max_new_tokens=24, ignore_eos=True,
                            stop_token_ids=[free[0][0].token_ids[3], free[2][1].token_ids[5]])
    expected = eager.generate(PROMPTS, 4, params, seed=1)
    assert_same_completions(graphed.generate(PROMPTS, 4, params, seed=1), expected)
    assert graphed.shared_graphs is not None and graphed.shared_graphs.captured
    stats = graphed.last_stats
    assert stats.graph_steps == stats.decode_steps
    # Plain graphs serve the steps where only prompt 2's group (no full block) is left.
    assert stats.shared_prefix_steps == steps_with_a_sharing_group(expected, PROMPTS, 1) > 0
    assert graphed.pool.stats().blocks_in_use == 0
    # Another n recaptures the shared graphs for groups of that size; the same n reuses them.
    shared_graphs = graphed.shared_graphs
    assert_same_completions(graphed.generate(PROMPTS, 4, params, seed=1), expected)
    assert graphed.shared_graphs is shared_graphs
    assert_same_completions(graphed.generate(PROMPTS, 2, params, seed=3), eager.generate(PROMPTS, 2, params, seed=3))
    assert graphed.shared_graphs is not shared_graphs


@needs_cuda
def test_graph_shared_decode_gives_the_eager_plain_tokens_bf16():
    # The Qwen2-0.5B attention shape (14 query heads, 2 KV heads, head_dim 64), two small layers.
    args = ModelArgs(vocab_size=256, hidden_size=896, intermediate_size=1024, num_layers=2, num_heads=14,
                     num_kv_heads=2, head_dim=64, rope_theta=1e6, max_position_embeddings=256,
                     tie_word_embeddings=True, attention_bias=True, architecture="qwen2")
    model = Decoder(args, device="cuda", dtype=torch.bfloat16).eval()
    model.init_weights(0)
    kv = dict(num_blocks=256, cuda_graph_max_rows=16)
    graphed = engine(model, "triton", "on", "cuda", torch.bfloat16, cuda_graphs=True, **kv)
    eager_shared = engine(model, "triton", "on", "cuda", torch.bfloat16, cuda_graphs=False, **kv)
    eager_plain = engine(model, "triton", "off", "cuda", torch.bfloat16, cuda_graphs=False, **kv)
    # 4 prompts x 4 = 16 rows, exactly a bucket and never shrinking: graph and eager shared steps run the
    # same kernels on the same shapes, so their bf16 rounding is identical.
    greedy = SamplingConfig(temperature=0, max_new_tokens=16, ignore_eos=True)
    got = graphed.generate(PROMPTS, 4, greedy)
    assert tokens(got) == tokens(eager_shared.generate(PROMPTS, 4, greedy))
    assert graphed.last_stats.graph_steps == graphed.last_stats.shared_prefix_steps == 15
    # Against the plain kernel only the order of fp32 sums differs before each bf16 rounding; a logit of
    # magnitude 4..8 moves by a bf16 step of 0.03 when its rounding flips, so logprobs agree to two steps.
    assert_same_completions(got, eager_plain.generate(PROMPTS, 4, greedy), abs_logprob=6e-2)
