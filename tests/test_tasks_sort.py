"""The embedded sort task: tokenizer, prompts, reward on hand examples, sharded resumable prompt streams."""

from __future__ import annotations

import pytest

from async_grpo.config import ConfigError, TaskConfig, load_config
from async_grpo.tasks import build_task
from async_grpo.tasks.char_tokenizer import CharTokenizer


def _sort_task(**params):
    return build_task(TaskConfig(name="sort", params=params), seed=0)


def _ids(tok: CharTokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_char_tokenizer_is_small_and_round_trips_every_id():
    tok = CharTokenizer()
    assert tok.vocab_size == 52 and tok.vocab_size < 64
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    every_id = list(range(tok.vocab_size))
    assert tok.encode(tok.decode(every_id)) == every_id
    assert len(tok.decode(every_id)) == tok.vocab_size  # one character per id, specials included
    assert tok.decode([63]) == "\ufffd"  # an id the embedding has but the vocabulary lacks


def test_char_tokenizer_names_a_character_it_cannot_encode():
    with pytest.raises(ValueError, match=r"'S' at position 0 of 'Sort'"):
        CharTokenizer().encode("Sort")


def test_sort_prompt_is_bos_then_sort_colon_digits_equals():
    task = _sort_task()
    item = task.source.item(7)
    assert item.prompt.startswith("sort:") and item.prompt.endswith("=") and len(item.prompt) == 11
    digits = item.prompt[5:10]
    assert digits.isdigit()
    assert item.answer == "".join(sorted(digits))
    assert item.prompt_ids == [task.tokenizer.bos_id, *task.tokenizer.encode(item.prompt)]
    assert task.source.item(7) == item  # generated deterministically from (seed, index)
    assert build_task(TaskConfig(name="sort", params={"digits": 3}), seed=0).source.item(0).prompt.count(":") == 1
    assert len(build_task(TaskConfig(name="sort", params={"digits": 3}), seed=0).source.item(0).answer) == 3


def test_sort_reward_on_hand_examples():
    task = _sort_task(digits=4)
    tok = task.tokenizer
    item = task.source.item(0)
    item = type(item)(id=0, prompt_ids=item.prompt_ids, prompt="sort:4213=", answer="1234")
    eos = tok.eos_id
    assert task.score(item, _ids(tok, "1234") + [eos]) == 1.0  # perfect
    assert task.score(item, _ids(tok, "1299") + [eos]) == 0.5  # half right
    assert task.score(item, _ids(tok, "1234")) == 1.0  # no EOS (length cut): what is there counts
    assert task.score(item, _ids(tok, "12") + [eos] + _ids(tok, "34")) == 0.5  # tokens past EOS ignored
    assert task.score(item, [eos] + _ids(tok, "1234")) == 0.0  # empty completion
    assert task.score(item, []) == 0.0
    assert task.score(item, _ids(tok, "123456789") + [eos]) == 1.0  # extra tokens before EOS add nothing
    assert task.score(item, _ids(tok, "x1234") + [eos]) == 0.0  # positions are absolute: a shift is wrong
    assert task.score(item, [tok.bos_id] + _ids(tok, "234") + [eos]) == 0.75  # a special token holds its slot
    assert task.score(item, [60, 60] + _ids(tok, "34")) == 0.5  # out-of-vocabulary ids hold their slots too
    assert task.score_batch([item, item], [_ids(tok, "1234"), _ids(tok, "4321")]) == [1.0, 0.0]
    assert task.reward_stats() == {"calls": 12, "failures": 0, "timeouts": 0, "errors": 0, "crashes": 0, "restarts": 0}


def test_two_shards_cover_an_epoch_without_overlap():
    task = _sort_task(num_prompts=101)
    shard0 = task.prompts(seed=3, shard_rank=0, shard_count=2)
    shard1 = task.prompts(seed=3, shard_rank=1, shard_count=2)
    ids0 = [item.id for item in shard0.take(51)]
    ids1 = [item.id for item in shard1.take(50)]
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == list(range(101))
    assert (shard0.epoch, shard1.epoch) == (0, 0)
    next(shard1)  # the 51st prompt of shard 1 starts its second epoch
    assert shard1.epoch == 1


def test_each_epoch_is_a_fresh_permutation_fixed_by_the_seed():
    task = _sort_task(num_prompts=50)
    stream = task.prompts(seed=5)
    epoch0, epoch1 = [i.id for i in stream.take(50)], [i.id for i in stream.take(50)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert [i.id for i in task.prompts(seed=5).take(50)] == epoch0
    assert [i.id for i in task.prompts(seed=6).take(50)] != epoch0


def test_resume_from_state_dict_continues_the_same_sequence():
    task = _sort_task(num_prompts=20)
    reference = [i.id for i in task.prompts(seed=1, shard_rank=1, shard_count=3).take(25)]
    first = task.prompts(seed=1, shard_rank=1, shard_count=3)
    head = [i.id for i in first.take(9)]  # crosses into epoch 1 (shard 1 of 3 has 7 prompts per epoch)
    state = first.state_dict()
    assert state == {"seed": 1, "shard_rank": 1, "shard_count": 3, "num_prompts": 20, "epoch": 1, "offset": 2}
    resumed = task.prompts(seed=1, shard_rank=1, shard_count=3)
    resumed.load_state_dict(state)
    assert head + [i.id for i in resumed.take(16)] == reference


def test_resume_refuses_a_state_from_other_sharding():
    task = _sort_task(num_prompts=20)
    state = task.prompts(seed=1, shard_rank=0, shard_count=2).state_dict()
    with pytest.raises(ValueError, match="shard_count=2 but this stream has shard_count=4"):
        task.prompts(seed=1, shard_rank=0, shard_count=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"offset=99.*0 <= offset <= 10"):
        task.prompts(seed=1, shard_rank=0, shard_count=2).load_state_dict({**state, "offset": 99})


def test_bad_sharding_and_params_are_named():
    task = _sort_task(num_prompts=3)
    with pytest.raises(ValueError, match="shard_rank=2: expected 0 <= shard_rank < shard_count=2"):
        task.prompts(seed=0, shard_rank=2, shard_count=2)
    with pytest.raises(ValueError, match="has 3 prompts: expected at least one per shard"):
        task.prompts(seed=0, shard_rank=0, shard_count=4)
    unknown_param = r"task.params.digit.*one of the sort task's params \['digits', 'num_prompts'\]"
    with pytest.raises(ConfigError, match=unknown_param):
        _sort_task(digit=5)
    with pytest.raises(ConfigError, match=r"task.params.digits' = 0.*a positive integer"):
        _sort_task(digits=0)
    with pytest.raises(ConfigError, match=r"task.name' = 'sortt'.*'sort', 'math' or 'jsonl'"):
        load_config(overrides=["task.name=sortt"])
