"""The rollout engine against transformers: greedy parity, stops, prefix-sharing memory, admission."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from async_grpo.config import KVConfig, SamplingConfig
from async_grpo.model import load_pretrained
from async_grpo.workers.engine import GenerationEngine

BLOCK = 4
# Shorter than, equal to, longer than one block, and exactly two blocks.
PROMPTS = [[11, 3, 7], [5, 9, 2, 14], [8, 1, 30, 4, 22, 6, 17], [2, 2, 9, 40, 13, 5, 27, 3]]
MAX_NEW = 8
N = 2
SHAPE = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "qwen3": lambda: Qwen3Config(head_dim=16, **SHAPE),
}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def hf_greedy(hf, prompt, max_new, eos=None):
    hf.generation_config.eos_token_id = eos
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(max_new=MAX_NEW, **kw):
    return SamplingConfig(temperature=0, max_new_tokens=max_new, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, checkpoint dir), eos token chosen to fire mid-way through prompt 0."""
    out = {}
    for family in FAMILIES:
        hf = hf_model(family)
        eos = hf_greedy(hf, PROMPTS[0], MAX_NEW)[4]
        hf.config.eos_token_id = eos
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        out[family] = (hf, path, eos)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_token_for_token(checkpoints, family):
    hf, path, eos = checkpoints[family]
    model = load_pretrained(path, torch.float32, "cpu")
    assert model.args.eos_token_ids == [eos]
    engine = GenerationEngine(model, KVConfig(block_size=BLOCK, num_blocks=64), "cpu", torch.float32)

    results = engine.generate(PROMPTS, N, greedy(ignore_eos=True))
    for prompt, completions in zip(PROMPTS, results):
        expected = hf_greedy(hf, prompt, MAX_NEW)
        assert len(completions) == N
        for c in completions:
            assert c.token_ids == expected
            assert c.finish_reason == "length"
            assert len(c.logprobs) == MAX_NEW and all(lp <= 0 for lp in c.logprobs)

    # With EOS honoured: each completion ends at the first EOS, as transformers' does.
    results = engine.generate(PROMPTS, N, greedy())
    stopped = 0
    for prompt, completions in zip(PROMPTS, results):
        expected = hf_greedy(hf, prompt, MAX_NEW, eos=eos)
        for c in completions:
            assert c.token_ids == expected
            assert c.finish_reason == ("stop" if expected[-1] == eos else "length")
            stopped += c.finish_reason == "stop"
    assert results[0][0].token_ids[-1] == eos and len(results[0][0].token_ids) <= 5
    assert stopped >= N
    assert engine.pool.stats().blocks_in_use == 0  # every finished sample freed its blocks


def test_greedy_logprobs_match_transformers_scores(checkpoints):
    hf, path, _ = checkpoints["llama"]
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=64),
                              "cpu", torch.float32)
    completion = engine.generate([PROMPTS[2]], 1, greedy(ignore_eos=True))[0][0]
    full = torch.tensor([PROMPTS[2] + completion.token_ids])
    logp = torch.log_softmax(hf(full).logits[0].float(), -1)  # [S, V]
    p = len(PROMPTS[2])
    expected = [logp[p - 1 + i, tok].item() for i, tok in enumerate(completion.token_ids)]
    assert completion.logprobs == pytest.approx(expected, abs=1e-5)


def test_peak_blocks_equal_the_prefix_sharing_minimum(checkpoints):
    _, path, _ = checkpoints["llama"]
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=64),
                              "cpu", torch.float32)
    engine.generate(PROMPTS, N, greedy(ignore_eos=True))
    # Each sample caches at most P + MAX_NEW - 1 = P + 7 tokens (its last token is never fed back).
    # Full prompt blocks are held once per prompt; each sample holds its tail copy and completion blocks.
    #   P=3: shared 0, own ceil(10/4)=3 -> 0 + 2*3 = 6
    #   P=4: shared 1, own ceil(11/4)-1=2 -> 1 + 2*2 = 5
    #   P=7: shared 1, own ceil(14/4)-1=3 -> 1 + 2*3 = 7
    #   P=8: shared 2, own ceil(15/4)-2=2 -> 2 + 2*2 = 6
    assert engine.last_stats.peak_blocks_in_use == 6 + 5 + 7 + 6
    # Without sharing it would be 2 * (3 + 3 + 4 + 4) = 28.
    assert engine.last_stats.prompt_tokens == 3 + 4 + 7 + 8
    assert engine.last_stats.prefill_tokens == 3 + 4 + 7 + 8  # each prompt prefilled once, not n times
    assert engine.last_stats.generated_tokens == len(PROMPTS) * N * MAX_NEW
    assert engine.last_stats.steps == MAX_NEW  # one prefill step, then MAX_NEW - 1 batched decode steps


def test_pool_too_small_for_one_group_is_a_clear_error(checkpoints):
    _, path, _ = checkpoints["llama"]
    # Prompt 2 (7 tokens, n=2, 8 new) needs 7 blocks at worst.
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=6),
                              "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"prompt 2 \(7 tokens, n = 2, max_new_tokens = 8\) needs up to 7 KV blocks "
                                         r"of 4 tokens, but the pool has 6"):
        engine.generate(PROMPTS, N, greedy(ignore_eos=True))


def test_small_pool_runs_groups_in_waves_with_the_same_outputs(checkpoints):
    _, path, _ = checkpoints["qwen2"]
    model = load_pretrained(path, torch.float32, "cpu")
    big = GenerationEngine(model, KVConfig(block_size=BLOCK, num_blocks=64), "cpu", torch.float32)
    small = GenerationEngine(model, KVConfig(block_size=BLOCK, num_blocks=8), "cpu", torch.float32)
    expected = big.generate(PROMPTS, N, greedy(ignore_eos=True))
    got = small.generate(PROMPTS, N, greedy(ignore_eos=True))
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    assert small.last_stats.peak_blocks_in_use <= 8
    assert small.last_stats.steps > big.last_stats.steps  # the groups had to wait for room


def test_stop_token_ids_end_a_completion_with_reason_stop(checkpoints):
    _, path, _ = checkpoints["qwen3"]
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=64),
                              "cpu", torch.float32)
    free_run = engine.generate([PROMPTS[3]], 1, greedy(ignore_eos=True))[0][0].token_ids
    stop = free_run[2]
    first = free_run.index(stop)
    c = engine.generate([PROMPTS[3]], 1, greedy(ignore_eos=True, stop_token_ids=[stop]))[0][0]
    assert c.token_ids == free_run[: first + 1]
    assert c.finish_reason == "stop"


def test_sampled_generation_is_reproducible_with_a_seed(checkpoints):
    _, path, _ = checkpoints["llama"]
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=64),
                              "cpu", torch.float32)
    params = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=6, ignore_eos=True)
    a = engine.generate(PROMPTS, 3, params, seed=11)
    b = engine.generate(PROMPTS, 3, params, seed=11)
    c = engine.generate(PROMPTS, 3, params, seed=12)
    tokens = lambda r: [[x.token_ids for x in g] for g in r]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert tokens(a) != tokens(c)
    # The n samples of one prompt differ (they were drawn, not copied).
    assert len({tuple(x.token_ids) for x in a[2]}) > 1


def test_bad_prompts_are_rejected_with_their_index(checkpoints):
    _, path, _ = checkpoints["llama"]
    engine = GenerationEngine(load_pretrained(path, torch.float32, "cpu"), KVConfig(block_size=BLOCK, num_blocks=64),
                              "cpu", torch.float32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], 1, greedy())
    with pytest.raises(ValueError, match="prompt 0 has 60 tokens; with max_new_tokens = 8 that is 68, beyond the "
                                         "model's 64 positions"):
        engine.generate([[1] * 60], 1, greedy())
    with pytest.raises(ValueError, match=r"prompt 0 has token ids \[48\] outside the vocabulary \[0, 48\)"):
        engine.generate([[1, 48]], 1, greedy())
    with pytest.raises(ValueError, match="n = 0"):
        engine.generate([[1, 2]], 0, greedy())
