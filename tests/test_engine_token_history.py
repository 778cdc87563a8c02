"""The host-side token history: vectorised appends per step, slots reused once a sample finishes."""

import numpy as np
import pytest

from async_grpo.workers.token_history import TokenHistory


def test_one_append_per_step_extends_every_slot_given():
    history = TokenHistory(max_new_tokens=3, capacity=4)
    a, b, c = history.open(), history.open(), history.open()
    assert (a, b, c) == (0, 1, 2)
    history.append(np.array([a, b, c]), np.array([5, 6, 7]), np.array([-0.25, -0.5, -0.75], dtype=np.float32))
    history.append(np.array([c, a]), np.array([8, 9]), np.array([-1.0, -1.5], dtype=np.float32))
    assert history.generated(a) == [5, 9]
    assert history.generated(b) == [6]
    assert history.generated(c) == [7, 8]
    assert history.last_tokens(np.array([a, b, c])).tolist() == [9, 6, 8]
    assert history.take(a) == ([5, 9], [-0.25, -1.5])
    assert history.num_open == 2


def test_logprobs_come_back_as_the_exact_fp32_values():
    history = TokenHistory(max_new_tokens=2, capacity=1)
    slot = history.open()
    value = np.float32(-0.1234567)  # not representable in fewer bits: any rounding would show
    history.append(np.array([slot]), np.array([3]), np.array([value]))
    assert history.take(slot)[1] == [float(value)]


def test_finished_slots_are_reused_and_capacity_doubles_when_full():
    history = TokenHistory(max_new_tokens=2, capacity=2)
    first, second = history.open(), history.open()
    history.append(np.array([first]), np.array([1]), np.array([0.0], dtype=np.float32))
    history.take(first)
    assert history.open() == first  # reused, and empty again
    assert history.generated(first) == []
    third = history.open()  # the pool of 2 is full: it doubles
    assert (third, history.capacity) == (2, 4)
    assert history.open() == 3
    assert history.generated(second) == []


def test_appending_past_max_new_tokens_is_an_error():
    history = TokenHistory(max_new_tokens=1, capacity=2)
    slot = history.open()
    history.append(np.array([slot]), np.array([1]), np.array([0.0], dtype=np.float32))
    with pytest.raises(ValueError, match=r"slots \[0\] already hold max_new_tokens = 1 tokens"):
        history.append(np.array([slot]), np.array([2]), np.array([0.0], dtype=np.float32))
    with pytest.raises(ValueError, match="expected three"):
        history.append(np.array([slot]), np.array([2, 3]), np.array([0.0], dtype=np.float32))
