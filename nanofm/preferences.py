"""Preference pairs for alignment: a prompt (chat messages), a chosen reply and a rejected one.

    pairs = builtin("data/default", split="train", per_family=500, seed=0)
    pairs[0] == {"family": "arithmetic", "prompt": [{"role": "user", "content": "What is 37 + 45?"}],
                 "chosen": "82", "rejected": "92"}
    load("mine.jsonl")                 # {"prompt": str or messages, "chosen": str, "rejected": str} per line
    load("hh:hh.jsonl")                # Anthropic/hh-rlhf rows: two transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
    load("ultrafeedback:uf.jsonl")     # HuggingFaceH4/ultrafeedback_binarized rows: prompt + two conversations
    load("hf:hh-rlhf")                 # the hub datasets, online only, through the same readers

Built-in pairs come from the checkable task families of nanofm/instructions.py: the chosen reply
is the right answer, the rejected one a plausible wrong answer made by a family's own slip (a sum
off by 1 or 10, a count off by one, one word left in lower case, the order not reversed, two words
swapped, another domain, another function or speaker of the corpus, the first sentence cut
short), and for the chatterbot conversations a true reply against the reply of another
conversation on another topic. A program can therefore check which reply is right, so
reward-model accuracy and the verifiable rewards of PPO and GRPO are exact.

Design decisions:
- The split is the instruction families' (instructions.builtin): a held-out prompt is never a
  training prompt, so held-out pair accuracy measures generalisation.
- A pair's prompt ends with a user turn, and chosen and rejected are the assistant's next reply
  (plain text): every format is brought to this one shape, and the chat format renders it.
- A chat pair's rejected reply comes from a conversation that shares no content word with the
  prompt and its true reply, and is no true reply to the prompt's question. The corpus asks
  near-duplicates ("What kind of computer", "What type of computer are you") whose replies
  answer each other, so any other reply made pairs no one could judge: the chosen reply of one
  held-out pair was the rejected reply of its twin, and the reward model's held-out chat
  accuracy swung from 1.00 to 0.00 between two runs on 10 such pairs (issue 19).
- Every pair is checked when read (chat.py's rules, non-empty texts, chosen != rejected), and a
  bad one is an error naming the file and line.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from nanofm import chat, instructions
from nanofm.common import NanofmError


class PreferenceError(NanofmError, ValueError):
    pass


# ------------------------------------------------------------------ built-in pairs

def _swap_two(words: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(words) - 1)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def wrong_answer(family: str, question: str, answer: str, rng: random.Random, others: list[str]) -> str:
    """A plausible wrong answer to `question` (the family's typical slip), or, where the slip gives
    back the right answer, another answer of the family (`others`)."""
    words = answer.split()
    if family == "arithmetic":
        wrong = str(int(answer) + rng.choice((-10, -1, 1, 10)))
    elif family == "count":
        wrong = str(max(1, int(answer) + rng.choice((-1, 1))))
    elif family == "upper":
        i = rng.randrange(len(words))
        wrong = " ".join(w.lower() if j == i else w for j, w in enumerate(words))
    elif family == "reverse":
        wrong = question.split(": ", 1)[1]  # not reversed at all
    elif family == "sort":
        wrong = " ".join(_swap_two(words, rng))
    elif family == "domain":
        wrong = rng.choice([d for d in ("prose", "code", "chat") if d != answer])
    elif family == "first_sentence" and len(words) > 4:
        wrong = " ".join(words[:len(words) - rng.randint(2, min(5, len(words) - 2))])
    else:  # function, speaker, chat: another reply of the same family
        wrong = answer
    candidates = [o for o in others if o != answer]
    if wrong == answer and candidates:
        wrong = rng.choice(candidates)
    return wrong


_FUNCTION_WORDS = frozenset("what when where which while your yours have does with that this there their they them "
                            "will would could should about from into just like than then were been being".split())


def topic_words(text: str) -> set[str]:
    """The content words of a question (4+ letters, lower case, common function words left out)."""
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _FUNCTION_WORDS}


def off_topic_replies(question: str, answer: str, conversations: list[tuple[str, str]]) -> list[str]:
    """Replies (of (question, reply) pairs) that cannot be a right answer to `question`: no content
    word of their question and reply is in the question or its `answer`, and none answers the
    same question."""
    words, asked = topic_words(question + " " + answer), question.strip().lower()
    true_replies = {r for q, r in conversations if q.strip().lower() == asked}
    return [r for q, r in conversations if not words & topic_words(q + " " + r) and r not in true_replies]


def builtin(data_dir: str | Path, split: str = "train", per_family: int = 500, seed: int = 0,
            families: tuple[str, ...] = instructions.FAMILIES) -> list[dict]:
    """Pairs made from the instruction families' items of the split (see the module docstring)."""
    items = instructions.builtin(data_dir, split, per_family=per_family, seed=seed, families=families)
    answers: dict[str, list[str]] = {}
    turns = []  # every (question, reply) of the chat conversations
    for item in items:  # the wrong replies a family can borrow
        answers.setdefault(item["family"], []).append(item["messages"][-1]["content"])
        if item["family"] == "chat":
            messages = item["messages"]
            turns += [(q["content"], r["content"]) for q, r in zip(messages, messages[1:])
                      if q["role"] == "user" and r["role"] == "assistant"]
    pairs = []
    for item in items:
        family, prompt, answer = item["family"], item["messages"][:-1], item["messages"][-1]["content"]
        rng = random.Random(f"{seed}:pair:{split}:{prompt[-1]['content']}:{answer}")
        others = off_topic_replies(prompt[-1]["content"], answer, turns) if family == "chat" else answers[family]
        rejected = wrong_answer(family, prompt[-1]["content"], answer, rng, others)
        if rejected != answer:  # a family with a single distinct answer has no wrong one to offer
            pairs.append({"family": family, "prompt": prompt, "chosen": answer, "rejected": rejected})
    return pairs


# ------------------------------------------------------------------ checks and user formats

def check_pair(pair: dict, where: str) -> dict:
    """The pair in nanofm's shape, or an error naming `where`."""
    prompt, chosen, rejected = pair.get("prompt"), pair.get("chosen"), pair.get("rejected")
    try:
        prompt = chat.as_prompt(prompt)
    except chat.ChatError as exc:
        raise PreferenceError(f"{where}: {exc}") from None
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise PreferenceError(f"{where}: '{name}' must be a non-empty reply")
    if chosen.strip() == rejected.strip():
        raise PreferenceError(f"{where}: chosen and rejected are the same reply, so there is no preference to learn")
    return {"family": pair.get("family", "user"), "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "chosen": chosen, "rejected": rejected}


def _rows(path: str | Path):
    try:
        yield from instructions._rows(path)
    except instructions.InstructionError as exc:
        raise PreferenceError(str(exc)) from None


def read_pairs(path: str | Path) -> list[dict]:
    """nanofm's JSONL: {"prompt": str or messages, "chosen": str, "rejected": str} per line."""
    pairs = [check_pair(row if isinstance(row, dict) else {}, f"{path} line {number}") for number, row in _rows(path)]
    if not pairs:
        raise PreferenceError(f"{path} holds no preference pairs")
    return pairs


def parse_transcript(text: str) -> list[dict]:
    """HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as chat messages."""
    messages, role, content = [], None, []
    for line in text.lstrip("\n").split("\n\n"):
        for marker, name in (("Human: ", "user"), ("Assistant: ", "assistant"), ("Assistant:", "assistant")):
            if line.startswith(marker):
                if role:
                    messages.append({"role": role, "content": "\n\n".join(content).strip()})
                role, content = name, [line[len(marker):]]
                break
        else:
            if role:
                content.append(line)
    if role:
        messages.append({"role": role, "content": "\n\n".join(content).strip()})
    return messages


def _split_last_reply(messages: list[dict], where: str, name: str) -> tuple[list[dict], str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise PreferenceError(f"{where}: the {name} conversation does not end with an assistant reply")
    return messages[:-1], messages[-1]["content"]


def read_hh(path: str | Path) -> list[dict]:
    """Anthropic/hh-rlhf: {"chosen": transcript, "rejected": transcript}, the same dialogue up to
    the last assistant reply."""
    pairs = []
    for number, row in _rows(path):
        where = f"{path} line {number}"
        if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise PreferenceError(f"{where} is not in hh-rlhf's format (chosen and rejected transcripts)")
        prompt, chosen = _split_last_reply(parse_transcript(row["chosen"]), where, "chosen")
        other, rejected = _split_last_reply(parse_transcript(row["rejected"]), where, "rejected")
        if other != prompt:
            raise PreferenceError(f"{where}: the chosen and rejected transcripts differ before their last reply")
        pairs.append(check_pair({"family": "hh-rlhf", "prompt": prompt, "chosen": chosen, "rejected": rejected}, where))
    return pairs


def read_ultrafeedback(path: str | Path) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: {"prompt": str, "chosen": messages, "rejected": messages}
    (each conversation repeats the prompt, then one reply)."""
    pairs = []
    for number, row in _rows(path):
        where = f"{path} line {number}"
        if not isinstance(row, dict) or not isinstance(row.get("chosen"), list) or not isinstance(row.get("rejected"), list):
            raise PreferenceError(f"{where} is not in ultrafeedback's format (prompt, chosen and rejected messages)")
        prompt, chosen = _split_last_reply(row["chosen"], where, "chosen")
        _, rejected = _split_last_reply(row["rejected"], where, "rejected")
        pairs.append(check_pair({"family": "ultrafeedback", "prompt": prompt or row.get("prompt", ""), "chosen": chosen,
                                 "rejected": rejected}, where))
    return pairs


READERS = {"jsonl": read_pairs, "hh": read_hh, "ultrafeedback": read_ultrafeedback}
HUB = {"hh-rlhf": ("Anthropic/hh-rlhf", "train", "hh"),
       "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "ultrafeedback")}


def load(spec: str) -> list[dict]:
    """FORMAT:PATH (jsonl, hh, ultrafeedback), a plain .jsonl path, or hf:NAME (online only)."""
    if spec.startswith("hf:"):
        name = spec[3:]
        if name not in HUB:
            raise PreferenceError(f"unknown hub dataset {name!r}; nanofm reads {', '.join(HUB)}")
        repo, split, kind = HUB[name]
        return instructions.read_from_hub(repo, split, READERS[kind])
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS:
        kind, path = "jsonl", spec
    return READERS[kind](path)
