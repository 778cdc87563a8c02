"""Naming a reward function by import path, so the same function can be run inline or in a child process.

Every reward, built-in or user-supplied, has one signature:

    fn(prompt: str, completion: str, item: dict) -> float

`prompt` is the raw prompt text (before any chat template), `completion` the decoded completion up to
and excluding its first stop token, `item` the prompt record's fields plus `id`, `prompt` and `answer`.
A user reward is configured as `task.reward: "package.module:function"`; the module must be importable
from the run's Python path. Built-in rewards may take extra keyword arguments, bound in `RewardSpec.kwargs`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

RewardFn = Callable[[str, str, dict], float]


@dataclass(frozen=True)
class RewardSpec:
    """An importable reward: `target` is "package.module:function", `kwargs` are bound keyword arguments."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> RewardFn:
        fn = load_reward_fn(self.target)
        return functools.partial(fn, **self.kwargs) if self.kwargs else fn


def load_reward_fn(target: str, key: str = "task.reward") -> RewardFn:
    """Import `package.module:function` and check it takes (prompt, completion, item)."""
    from async_grpo.config import ConfigError

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, target, 'an import path "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while importing
        raise ConfigError(
            key, target, f"an importable module, but importing {module_name!r} failed ({type(err).__name__}: {err})"
        ) from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(key, target, f"a function, but module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(key, target, f"a function, but {attr!r} is a {type(fn).__name__}")
    try:
        inspect.signature(fn).bind("", "", {})
    except TypeError:
        raise ConfigError(
            key,
            target,
            f"a function fn(prompt: str, completion: str, item: dict) -> float, got {attr}{inspect.signature(fn)}",
        ) from None
    except ValueError:  # builtins without a signature: accept and let a bad call fail as a scored error
        pass
    return fn
