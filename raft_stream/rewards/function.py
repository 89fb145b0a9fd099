"""The python kind: your own reward function, by dotted path or as a callable.

Two shapes, as RAFT users write them::

    def reward_of(text: str) -> float: ...                      # per text (default)
    def score(pairs: list[tuple[str, str]]) -> list[float]: ... # batched (prompt, response)

Example:
    >>> reward = reward_from_path("builtins:len")
    >>> reward(["Q: "], ["four"])
    [4.0]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from raft_stream.errors import ConfigError
from raft_stream.rewards.base import RewardFunction, TextReward, as_reward, as_rewards, check_pairs

PerTextFn = Callable[[str], float]
BatchedFn = Callable[[list[tuple[str, str]]], Sequence[float]]


class PerTextReward(TextReward):
    """Calls ``fn(text)`` once per response (or prompt + response)."""

    def __init__(self, fn: PerTextFn, *, score_prompt: bool = False) -> None:
        super().__init__(score_prompt=score_prompt)
        self.fn = fn
        self.name = _name_of(fn)

    def score_texts(self, texts: list[str]) -> list[float]:
        return [as_reward(self.fn(text), self.name) for text in texts]


class BatchedReward:
    """Calls ``fn(pairs)`` once per batch with the (prompt, response) pairs."""

    def __init__(self, fn: BatchedFn) -> None:
        self.fn = fn
        self.name = _name_of(fn)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        check_pairs(prompts, responses)
        pairs = list(zip(prompts, responses, strict=True))
        return as_rewards(self.fn(pairs), len(pairs), self.name)


def reward_from_callable(
    fn: Callable[..., Any], *, batched: bool = False, score_prompt: bool = False
) -> RewardFunction:
    """Wrap a Python callable as a RewardFunction (see the module docstring for its shape).

    ``score_prompt`` applies to per-text functions only: batched ones get both halves anyway.
    """
    if not callable(fn):
        raise TypeError(f"reward function must be callable, got {type(fn).__name__}")
    if batched:
        return BatchedReward(fn)
    return PerTextReward(fn, score_prompt=score_prompt)


def reward_from_path(
    path: str, *, batched: bool = False, score_prompt: bool = False
) -> RewardFunction:
    """Import ``package.module:function`` and wrap it as a RewardFunction."""
    fn = import_function(path)
    return reward_from_callable(fn, batched=batched, score_prompt=score_prompt)


def import_function(path: str) -> Callable[..., Any]:
    """Import ``package.module:attr[.attr]``; ConfigError names the path and what is wrong."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(
            f"reward.function {path!r} must look like 'package.module:function' "
            "(a colon between the module and the function)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Tell "your module is missing" apart from "your module imports something missing".
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"reward.function {path!r}: module {module_name!r} not found; "
                "check the spelling and that it is on PYTHONPATH"
            ) from exc
        raise ConfigError(
            f"reward.function {path!r}: importing {module_name!r} failed: {exc}"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"reward.function {path!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ConfigError(
                f"reward.function {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ConfigError(
            f"reward.function {path!r} is not callable (got {type(target).__name__}); "
            "point it at a function"
        )
    return target


def _name_of(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}" if module else name
