"""Your own tasks for PPO and GRPO: a file of prompts and a Python reward function.

    python train_rlhf.py --algo=grpo --prompts tasks.jsonl --reward my_rewards.py:score
    python train_rlhf.py --algo=ppo --prompts tasks.jsonl --reward mypackage.rewards:score

A prompts file has one JSON object per line (or a .json list): "messages" (chat messages ending
with a user turn) or "prompt" (a string, one user turn), and optionally "answer" (a reference
reply) and any other fields of your own. The reward is a function

    def score(prompt: str, reply: str, item: dict) -> float

called for every sampled reply: `prompt` is the last user turn, `reply` the model's text, and
`item` the prompt's whole JSON object (its answer and your fields), as TRL's reward functions get
the dataset's columns. Without --reward, the reward is exact match against "answer".

Design decisions:
- The function is found by "module:function" (imported as Python imports it, from the current
  directory too) or "path/to/file.py:function"; without ":function" it is called `reward`.
- Every failure names what failed: a module that does not import, a missing or uncallable
  function, a call that raises (with the item's file and line), a value that is not a finite
  number. A run never trains on a reward it could not compute.
- The held-out tenth of the prompts (at least one) is scored at each evaluation: the mean reward of
  sampled replies, and exact match where the items have answers.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

from nanofm import chat, instructions
from nanofm.common import NanofmError

FAMILY = "prompts"  # the family name every user prompt gets (reports group by family)


class RewardError(NanofmError, ValueError):
    pass


def read_prompts(path: str | Path) -> list[dict]:
    """The prompts of a JSONL (or JSON list) file as RL items: {"family", "messages" (the prompt and
    an assistant turn holding the answer, "" if none), "answer" (or None), "item" (the row), "where"}."""
    items = []
    for number, row in instructions._rows(path):
        where = f"{path} line {number}"
        if not isinstance(row, dict):
            raise RewardError(f"{where}: expected a JSON object with 'messages' or 'prompt', got {type(row).__name__}")
        if "messages" not in row and "prompt" not in row:
            raise RewardError(f"{where}: give 'prompt' (a string) or 'messages' (chat messages ending with a user turn)")
        try:
            messages = chat.as_prompt(row.get("messages", row.get("prompt")))
        except chat.ChatError as exc:
            raise RewardError(f"{where}: {exc}") from None
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RewardError(f"{where}: 'answer' must be a string, got {type(answer).__name__}")
        items.append({"family": FAMILY, "messages": [*messages, {"role": "assistant", "content": answer or ""}],
                      "answer": answer, "item": row, "where": where})
    if not items:
        raise RewardError(f"{path} holds no prompts")
    return items


def load_function(spec: str) -> Callable:
    """The reward function named by "module:function" or "file.py:function" (default name: reward)."""
    target, _, name = spec.rpartition(":") if ":" in spec else (spec, ":", "reward")
    name = name or "reward"
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"--reward {spec}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"nanofm_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's module: any error, reported with its kind
            raise RewardError(f"--reward {spec}: {path} failed to load: {type(exc).__name__}: {exc}") from exc
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # a module beside the user's command, as `python -m` finds it
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardError(f"--reward {spec}: cannot import {target!r}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"--reward {spec}: {target} has no function {name!r}"
                          + (f"; its functions: {', '.join(found[:8])}" if found else ""))
    return function


class UserReward:
    """A user's reward function as PPO/GRPO's reward: one float per (item, reply)."""

    def __init__(self, spec: str):
        self.spec, self.function = spec, load_function(spec)

    def score(self, item: dict, reply: str) -> float:
        where = item.get("where") or f"the {item.get('family', '?')} question {item['messages'][-2]['content'][:60]!r}"
        try:
            value = self.function(item["messages"][-2]["content"], reply, item.get("item", item))
        except Exception as exc:  # the user's code: name the item it failed on
            raise RewardError(f"--reward {self.spec} raised {type(exc).__name__}: {exc} (on {where}, reply {reply[:60]!r})") from exc
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # True/False count as 1/0
            raise RewardError(f"--reward {self.spec} returned {value!r} on {where}: a reward must be a finite number")
        return float(value)

    def __call__(self, items: list[dict], replies: list[str], x=None, attention=None):
        import torch

        return torch.tensor([self.score(item, reply) for item, reply in zip(items, replies)])
