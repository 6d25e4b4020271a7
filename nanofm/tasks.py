"""Evaluation tasks: the datasets eval.py scores a checkpoint on, and how each one is scored.

    docs = val_docs("data/default")                         # held-out documents, tagged by domain
    perplexity_task(model, tokenizer, docs)                 # per-domain perplexity and bits per byte
    choice_task(engine, choice_items(docs))                 # multiple choice by log-likelihood
    generation_task(engine, generation_items(docs))         # exact match, BLEU, ROUGE of generated replies
    induction_task(model, tokenizer)                        # can it copy from its context (induction heads)?
    classification_task(model, tokenizer, items, labels)    # classifier checkpoints
    robustness_*, fairness_*, attributions(...)             # probes

Design decisions:
- Built-in tasks are made from the validation documents of a data/prepare.py directory (the same
  split rule prepare used, so a model never saw them in training): multiple choice = pick the
  true next line (or chat reply) among it and three next lines drawn from other documents of the
  same domain; LAMBADA-style = predict the last word of a passage; generation = answer the chat
  questions (User/Bot turns). Seeds fix the draws, so two checkpoints see the same items.
- Multiple choice is scored like HellaSwag in lm-evaluation-harness: acc compares summed
  log-probabilities of the endings, acc_norm divides by each ending's length in bytes.
- LAMBADA accuracy counts a passage when every token of the last word is the model's argmax
  (teacher-forced greedy), as the harness does.
- HellaSwag and LAMBADA loaders read the datasets' own formats (jsonl), from a local file or,
  online, from the hub (`datasets`); the tests use local files.
- Robustness = the metric under perturbed inputs (typos, casing, whitespace, reordered options),
  reported as the drop from the clean score. Fairness = counterfactual swaps of group terms
  (gendered words, first names): log-likelihood gaps of swapped sentences, next-token
  probability gaps for pronouns, and, for classifiers, how often the prediction flips.
- Explanations: gradient x input on the token embeddings, and occlusion (each token replaced by
  the pad token), for a classifier's predicted class or a language model's next token.
- A chat-tuned checkpoint (meta.json's chat_format) is asked the chat questions in its chat
  format (prompt_ids); a base model keeps the plain-text "User: ...\nBot:" prompts. Which tasks
  fit which checkpoint, and the report, live in nanofm/evaluate.py.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from nanofm.common import NanofmError
from nanofm import chat, metrics
from nanofm.data import mask_tokens, pad_batch, split_of
from nanofm.engine import Engine, SamplingParams
from nanofm.model import token_logprobs
from nanofm.tokenizer import Tokenizer


class TaskError(NanofmError, ValueError):
    pass


# ------------------------------------------------------------------ data

def val_docs(data_dir: str | Path) -> list[dict]:
    """The validation documents of a data/prepare.py output directory (curated.jsonl + its split rule)."""
    data_dir = Path(data_dir)
    curated, manifest = data_dir / "curated.jsonl", data_dir / "prepare.json"
    if not curated.is_file() or not manifest.is_file():
        raise TaskError(f"{data_dir} has no curated.jsonl and prepare.json; make it with: python data/prepare.py --out {data_dir}")
    settings = json.loads(manifest.read_text())["settings"]
    docs = []
    with curated.open(encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if split_of(doc, settings["val_fraction"], settings["seed"]) == "val":
                docs.append(doc)
    if not docs:
        raise TaskError(f"{data_dir} has no validation documents")
    return docs


def by_domain(docs: Sequence[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for doc in docs:
        groups[doc.get("domain", "unknown")].append(doc)
    return dict(sorted(groups.items()))


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if len(line.split()) >= 3]


def chat_turns(text: str) -> list[tuple[str, str]]:
    """(question, reply) pairs of a 'User: ...\\nBot: ...' conversation."""
    turns, lines = [], text.split("\n")
    for a, b in zip(lines, lines[1:]):
        if a.startswith("User: ") and b.startswith("Bot: ") and b[5:].strip():
            turns.append((a, b[5:].strip()))
    return turns


# ------------------------------------------------------------------ language modelling

def perplexity_task(model, tokenizer: Tokenizer, docs: Sequence[dict], max_docs: int = 100, stride: int | None = None,
                    progress: bool = False) -> dict:
    """Perplexity and bits per byte per domain and overall (sums over documents, not means)."""
    result, totals = {}, [0.0, 0, 0]
    for domain, group in by_domain(docs).items():
        group = group[:max_docs]
        ids = [tokenizer.encode(d["text"], bos=True) for d in group]
        nll, tokens, _ = metrics.sliding_window_nll(model, ids, stride=stride, progress=progress)
        n_bytes = sum(len(d["text"].encode("utf-8")) for d in group)
        result[domain] = {"perplexity": metrics.perplexity(nll, tokens), "bits_per_byte": metrics.bits_per_byte(nll, n_bytes),
                          "docs": len(group), "tokens": tokens, "bytes": n_bytes}
        totals = [totals[0] + nll, totals[1] + tokens, totals[2] + n_bytes]
    result["all"] = {"perplexity": metrics.perplexity(totals[0], totals[1]),
                     "bits_per_byte": metrics.bits_per_byte(totals[0], totals[2]), "tokens": totals[1], "bytes": totals[2]}
    return result


@torch.no_grad()
def mlm_task(model, tokenizer: Tokenizer, docs: Sequence[dict], max_docs: int = 100, seed: int = 0) -> dict:
    """Masked-LM loss and accuracy on the chosen tokens (15%, 80/10/10), per domain; fixed masks."""
    block, result = model.cfg.block_size, {}
    specials = sorted(tokenizer.special_tokens.values())
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for domain, group in by_domain(docs).items():
        nll, correct, count = 0.0, 0, 0
        for doc in group[:max_docs]:
            ids = tokenizer.encode(doc["text"], bos=True)
            for start in range(0, len(ids), block):
                x = torch.tensor([ids[start:start + block]])
                inputs, targets = mask_tokens(x, model.cfg.vocab_size, tokenizer.mask_id, specials, 0.15, generator)
                chosen = targets >= 0
                if not chosen.any():
                    continue
                logits, _ = model(inputs.to(device))
                targets = targets.to(device)
                nll -= float(token_logprobs(logits, targets, vocab_limit=tokenizer.vocab_size).sum())
                predicted = logits[..., :tokenizer.vocab_size].argmax(-1)
                correct += int(((predicted == targets) & chosen.to(device)).sum())
                count += int(chosen.sum())
        if count:
            result[domain] = {"masked_loss": nll / count, "masked_accuracy": correct / count, "masked_tokens": count}
    if not result:
        raise TaskError("no tokens to mask: the validation documents are empty")
    return result


# ------------------------------------------------------------------ multiple choice

def choice_items(docs: Sequence[dict], n: int = 200, seed: int = 0, n_options: int = 4) -> list[dict]:
    """HellaSwag-shaped items {ctx, endings, label, domain}: the true next line (after up to three
    lines of context) vs distinct lines that follow in other documents of the same domain (for
    chat: the true reply to a question vs replies from other conversations)."""
    rng, pools = random.Random(seed), {}
    for domain, group in by_domain(docs).items():
        pairs = []
        for d, doc in enumerate(group):
            if domain == "chat":
                pairs += [(d, q + "\nBot:", " " + reply) for q, reply in chat_turns(doc["text"])]
            else:  # a line with up to two lines before it, then the line that really follows
                lines = doc["text"].split("\n")
                pairs += [(d, "\n".join(lines[max(0, i - 2):i + 1]), "\n" + lines[i + 1]) for i in range(len(lines) - 1)
                          if len(lines[i].split()) >= 3 and len(lines[i + 1].split()) >= 3]
        if len({d for d, *_ in pairs}) >= 2:  # distractors must come from other documents
            pools[domain] = pairs
    if not pools:
        raise TaskError("not enough validation documents to build multiple-choice items (need 2 per domain)")
    items, per_domain = [], max(1, n // len(pools))
    for domain, pairs in pools.items():
        for d, ctx, ending in rng.sample(pairs, min(per_domain, len(pairs))):
            others = sorted({e for d2, _, e in pairs if d2 != d and e != ending})  # distinct, and not the answer
            if len(others) < n_options - 1:
                continue
            endings = [ending] + rng.sample(others, n_options - 1)
            rng.shuffle(endings)
            item = {"ctx": ctx, "endings": endings, "label": endings.index(ending), "domain": domain}
            if domain == "chat":  # a chat-tuned checkpoint is asked the question in its chat format
                item["question"] = ctx[len("User: "):-len("\nBot:")]
            items.append(item)
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: str | None = None, split: str = "validation", limit: int | None = None) -> list[dict]:
    """HellaSwag items from its jsonl (fields ctx_a, ctx_b, activity_label, endings, label), a
    local file, or the hub dataset Rowan/hellaswag when online."""
    if path:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import datasets
        rows = list(datasets.load_dataset("Rowan/hellaswag", split=split))
    items = []
    for row in rows[:limit]:
        try:
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            items.append({"ctx": _hellaswag_clean(row["activity_label"] + ": " + ctx),
                          "endings": [" " + _hellaswag_clean(e) for e in row["endings"]], "label": int(row["label"]),
                          "domain": "hellaswag"})
        except (KeyError, TypeError, ValueError) as exc:
            raise TaskError(f"{path or 'Rowan/hellaswag'}: a row is not in HellaSwag's format ({exc!r})") from None
    if not items:
        raise TaskError(f"{path or 'Rowan/hellaswag'} holds no HellaSwag items")
    return items


def choice_task(engine: Engine, items: Sequence[dict], progress: bool = False, chat_format: str | None = None) -> dict:
    """acc (summed log-probability) and acc_norm (per byte of the ending), overall and per domain.
    With a chat format, chat items are asked as a user turn and the endings are the assistant's
    reply (without the leading space the plain-text form has)."""
    tok, block = engine.tokenizer, engine.model.cfg.block_size

    def endings(item):
        chat_item = chat_format and "question" in item
        return [tok.encode(e[1:] if chat_item and e.startswith(" ") else e) for e in item["endings"]]

    encoded = [(prompt_ids(tok, item, chat_format, key="ctx"), endings(item)) for item in items]
    fits = [max(map(len, ends)) < block for _, ends in encoded]  # an ending longer than the context cannot be scored
    too_long = len(items) - sum(fits)
    items = [item for item, ok in zip(items, fits) if ok]
    if not items:
        raise TaskError("no multiple-choice items to score" + (f" ({too_long} have endings longer than the context)" if too_long else ""))
    contexts, endings = [], []
    for ctx, ends in (e for e, ok in zip(encoded, fits) if ok):
        contexts += [ctx] * len(ends)
        endings += ends
    scores = engine.logprobs(contexts, endings, progress=progress)
    hits, k, predicted = defaultdict(lambda: [0, 0, 0]), 0, []
    for item in items:
        options = scores[k:k + len(item["endings"])]
        k += len(item["endings"])
        raw = max(range(len(options)), key=lambda i: options[i][0])
        predicted.append(raw)
        norm = max(range(len(options)), key=lambda i: options[i][0] / max(1, len(item["endings"][i].encode("utf-8"))))
        for key in ("all", item.get("domain", "all")):
            hits[key][0] += raw == item["label"]
            hits[key][1] += norm == item["label"]
            hits[key][2] += 1
    out = {key: {"acc": a / n, "acc_norm": b / n, "n": n} for key, (a, b, n) in hits.items()}
    chosen = iter(predicted)
    predicted = [next(chosen) if ok else None for ok in fits]  # one per item given; None: too long to score
    return {"acc": out["all"]["acc"], "acc_norm": out["all"]["acc_norm"], "n": out["all"]["n"], "too_long": too_long,
            "predicted": predicted,
            "by_domain": {key: value for key, value in out.items() if key != "all"}, "chance": 1 / len(items[0]["endings"])}


# ------------------------------------------------------------------ LAMBADA

def _split_last_word(text: str) -> tuple[str, str]:
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
        raise TaskError(f"a LAMBADA passage needs a last word after some context: {text[:60]!r}")
    return text[:cut], text[cut:]  # the target keeps its leading space, as the model would write it


def lambada_items(docs: Sequence[dict], n: int = 200, seed: int = 0, domains=("prose",)) -> list[dict]:
    """Passages of a few lines from prose validation documents, ending on a word of 3+ letters."""
    rng, items = random.Random(seed), []
    for doc in docs:
        if doc.get("domain") not in domains:
            continue
        lines = _lines(doc["text"])
        for i in range(2, len(lines), 3):
            passage = re.sub(r"[^\w]+$", "", "\n".join(lines[i - 2:i + 1]))
            if re.search(r" [A-Za-z]{3,}$", passage):
                ctx, target = _split_last_word(passage)
                items.append({"context": ctx, "target": target})
    rng.shuffle(items)
    if not items:
        raise TaskError(f"no LAMBADA-style passages in the validation documents of domains {domains}")
    return items[:n]


def load_lambada(path: str | None = None, limit: int | None = None) -> list[dict]:
    """LAMBADA passages from its jsonl ({"text": ...} per line), a local file or, online, the hub
    dataset EleutherAI/lambada_openai."""
    if path:
        texts = [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import datasets
        texts = [row["text"] for row in datasets.load_dataset("EleutherAI/lambada_openai", "en", split="test")]
    items = [dict(zip(("context", "target"), _split_last_word(t))) for t in texts[:limit]]
    if not items:
        raise TaskError(f"{path or 'EleutherAI/lambada_openai'} holds no passages")
    return items


def lambada_task(engine: Engine, items: Sequence[dict]) -> dict:
    """Accuracy (the last word is the greedy continuation) and perplexity of the last words."""
    tok = engine.tokenizer
    contexts = [tok.encode(item["context"], bos=True) for item in items]
    targets = [tok.encode(item["target"]) for item in items]
    scores = engine.logprobs(contexts, targets, greedy=True)
    nll = -sum(s[0] for s in scores)
    return {"acc": sum(s[2] for s in scores) / len(items), "perplexity": metrics.perplexity(nll, sum(s[1] for s in scores)),
            "n": len(items)}


# ------------------------------------------------------------------ in-context copying

@torch.no_grad()
def induction_task(model, tokenizer: Tokenizer, n: int = 64, length: int = 32, seed: int = 0,
                   docs: Sequence[dict] = ()) -> dict:
    """Can the model copy from its context? Random ordinary tokens, then the same tokens again
    (Olsson et al. 2022): nothing predicts the first copy, while a model with induction heads
    predicts the second almost perfectly. Reports the loss (nats per token) on each copy, their
    difference (the copying score; 0 = no copying) and the top-1 accuracy on the second copy.
    The first token of each copy is left out (a copy's start is not predictable).
    With `docs` (validation documents), the same for spans of real text repeated (`text_*`): the
    first copy is then partly predictable, and the score says how much copying adds. Pretraining
    can put random repeats in its data (train_pretrain.py --copy_rows), so the text score is the one
    that shows the skill carries over to language."""
    length = min(length, (model.cfg.block_size - 1) // 2)
    ordinary = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.special_tokens.values())]
    if length < 4 or len(ordinary) < length:
        raise TaskError(f"the induction task needs a context of at least 9 tokens and {length} ordinary tokens")
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(ordinary)
    result = _copy_scores(model, tokenizer, pool[torch.stack([torch.randperm(len(ordinary), generator=g)[:length]
                                                               for _ in range(n)])])
    spans = []
    rng = random.Random(seed)
    for doc in rng.sample(list(docs), len(docs)):  # one span per document, as many documents as it takes
        ids = tokenizer.encode(doc["text"])
        if len(ids) >= length:
            start = rng.randrange(len(ids) - length + 1)
            spans.append(ids[start:start + length])
        if len(spans) == n:
            break
    if spans:
        text = _copy_scores(model, tokenizer, torch.tensor(spans))
        result.update({f"text_{k}": v for k, v in text.items()})
    return {**result, "sequences": n, "length": length}


def _copy_scores(model, tokenizer: Tokenizer, rows: torch.Tensor) -> dict:
    n, length = rows.shape
    device = next(model.parameters()).device
    x = torch.cat([torch.full((n, 1), tokenizer.bos_id), rows, rows], dim=1).to(device)
    model.eval()
    logits = model(x)[0][:, :-1]
    logp = token_logprobs(logits, x[:, 1:], vocab_limit=tokenizer.vocab_size)  # [n, 2 * length]: log p(token t + 1)
    first, second = slice(1, length), slice(length + 1, 2 * length)
    first_loss, second_loss = -logp[:, first].mean().item(), -logp[:, second].mean().item()
    hits = logits[:, second, :tokenizer.vocab_size].argmax(-1) == x[:, 1:][:, second]
    return {"first_copy_loss": first_loss, "second_copy_loss": second_loss, "copying_score": first_loss - second_loss,
            "second_copy_accuracy": hits.float().mean().item()}


# ------------------------------------------------------------------ generation

def generation_items(docs: Sequence[dict], n: int = 100) -> list[dict]:
    """Chat questions and their true replies from the validation conversations; a question asked
    in several conversations gets all their replies as references."""
    references: dict[str, list[str]] = {}
    for doc in docs:
        if doc.get("domain") == "chat":
            for question, reply in chat_turns(doc["text"]):
                references.setdefault(question + "\nBot:", []).append(reply)
    if not references:
        raise TaskError("no chat conversations (User:/Bot: turns) among the validation documents")
    return [{"prompt": prompt, "question": prompt[len("User: "):-len("\nBot:")], "references": refs}
            for prompt, refs in list(references.items())[:n]]


def prompt_ids(tokenizer: Tokenizer, item: dict, chat_format: str | None = None, key: str = "prompt") -> list[int]:
    """How a model is asked an item: a chat-tuned checkpoint (meta.json's chat_format) gets the
    question as a user turn in its chat format, ending with the assistant tag; a base model gets
    the plain-text prompt ("User: ...\nBot:") after bos."""
    if chat_format and "question" in item:
        if chat_format != chat.CHAT_FORMAT:
            raise TaskError(f"unknown chat format {chat_format!r} (this nanofm knows {chat.CHAT_FORMAT})")
        return chat.render_prompt(tokenizer, [{"role": "user", "content": item["question"]}])
    return tokenizer.encode(item[key], bos=True)


def generation_task(engine: Engine, items: Sequence[dict], max_tokens: int = 48, progress: bool = False,
                    chat_format: str | None = None) -> dict:
    """Greedy replies (up to a newline, or the end-of-turn token) scored against the true ones:
    exact match (any reference), corpus BLEU (all references), ROUGE F (the best reference per
    item, averaged). A chat-tuned checkpoint is asked in its chat format."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=["\n"])
    prompts = [prompt_ids(engine.tokenizer, item, chat_format) for item in items]
    outs = engine.generate(prompts, params, progress=progress)
    predictions = [out.text.strip() for out in outs]
    references = [item["references"] for item in items]
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(max(map(len, references)))]
    rouge = {}
    for prediction, refs in zip(predictions, references):
        best = [metrics.rouge(ref, prediction) for ref in refs]
        for kind in best[0]:
            rouge.setdefault(kind, []).append(max(b[kind]["fmeasure"] for b in best))
    return {"exact_match": metrics.exact_match(predictions, references),
            "bleu": metrics.corpus_bleu(predictions, streams)["score"],
            **{kind: sum(values) / len(values) for kind, values in rouge.items()}, "n": len(items),
            "examples": [{"prompt": i["prompt"], "reference": i["references"][0], "prediction": p}
                         for i, p in list(zip(items, predictions))[:5]]}


# ------------------------------------------------------------------ instructions (SFT task families)

def instruction_prompt(tokenizer: Tokenizer, messages: list[dict], chat_format: str | None) -> list[int]:
    """The conversation up to the reply to write: in the chat format for a chat-tuned checkpoint,
    else as the plain-text "User: ...\nBot:" lines a base model saw in pretraining."""
    if chat_format:
        if chat_format != chat.CHAT_FORMAT:
            raise TaskError(f"unknown chat format {chat_format!r} (this nanofm knows {chat.CHAT_FORMAT})")
        return chat.render_prompt(tokenizer, messages)
    lines = [f"{'Bot' if m['role'] == 'assistant' else 'User'}: {m['content']}" for m in messages]
    return tokenizer.encode("\n".join(lines) + "\nBot:", bos=True)


def instruction_task(engine: Engine, items: Sequence[dict], chat_format: str | None = None, max_tokens: int = 48,
                     progress: bool = False) -> dict:
    """Greedy replies to the held-out questions of the SFT task families (nanofm/instructions.py):
    exact match per checkable family and their mean over families; BLEU and ROUGE-L for chat."""
    from nanofm import instructions

    if not items:
        raise TaskError("no held-out instruction items")
    room = engine.model.cfg.block_size - max_tokens  # a prompt must leave room for the reply
    prompts = [instruction_prompt(engine.tokenizer, item["messages"][:-1], chat_format) for item in items]
    fits = [len(p) <= room for p in prompts]
    items, prompts = [i for i, ok in zip(items, fits) if ok], [p for p, ok in zip(prompts, fits) if ok]
    if not items:
        raise TaskError(f"every held-out instruction is longer than the context allows ({room} tokens + the reply)")
    # a base model's reply ends at the line's end; a chat model's at its end-of-turn token
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=[] if chat_format else ["\n"])
    outs = engine.generate(prompts, params, progress=progress)
    by_family: dict[str, list] = defaultdict(list)
    for item, out in zip(items, outs):
        by_family[item["family"]].append((out.text.strip(), item["messages"][-1]["content"]))
    # every checkable item's 0/1, so eval.py can pair two checkpoints on the same questions
    scored = [[item["family"], "\n".join(m["content"] for m in item["messages"][:-1]),
               int(instructions.exact_match(out.text.strip(), item["messages"][-1]["content"]))]
              for item, out in zip(items, outs) if item["family"] in instructions.CHECKABLE]
    result = {"exact_match": {}, "n": {}, "examples": {}, "too_long": fits.count(False), "scored": scored}
    for family, pairs in sorted(by_family.items()):
        result["n"][family] = len(pairs)
        result["examples"][family] = [{"prediction": p, "answer": a} for p, a in pairs[:2]]
        if family in instructions.CHECKABLE:
            result["exact_match"][family] = sum(instructions.exact_match(p, a) for p, a in pairs) / len(pairs)
        else:
            predictions, answers = zip(*pairs)
            result["chat_bleu"] = metrics.corpus_bleu(list(predictions), [list(answers)])["score"]
            result["chat_rougeL"] = sum(metrics.rouge(a, p)["rougeL"]["fmeasure"] for p, a in pairs) / len(pairs)
    scores = list(result["exact_match"].values())
    result["mean_exact_match"] = sum(scores) / len(scores) if scores else None
    return result


# ------------------------------------------------------------------ classification

def classifier_input(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    """How a classifier reads a text: bos, then the text's first tokens up to the context."""
    return tokenizer.encode(text, bos=True)[:block_size]


def classification_items(docs: Sequence[dict], labels: Sequence[str], field: str = "domain", n: int = 300) -> list[dict]:
    items = [{"text": doc["text"], "label": doc[field]} for doc in docs if doc.get(field) in labels]
    if not items:
        raise TaskError(f"no validation documents have a {field} among the labels {list(labels)}")
    return items[:n]


@torch.no_grad()
def classify(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Class probabilities [N, n_classes] (right-padded batches)."""
    device, probs = next(model.parameters()).device, []
    model.eval()
    for start in range(0, len(texts), batch_size):
        idx, mask = pad_batch([classifier_input(tokenizer, t, model.cfg.block_size) for t in texts[start:start + batch_size]])
        probs.append(model.classify(idx.to(device), mask.to(device)).float().softmax(-1).cpu())
    return torch.cat(probs)


def classification_task(model, tokenizer: Tokenizer, items: Sequence[dict], labels: Sequence[str]) -> dict:
    probs = classify(model, tokenizer, [item["text"] for item in items])
    predicted = [labels[i] for i in probs.argmax(-1).tolist()]
    return {**metrics.classification_report([item["label"] for item in items], predicted), "n": len(items)}


# ------------------------------------------------------------------ robustness

# ------------------------------------------------------------------ images

def image_classification_task(model, images: torch.Tensor, labels: Sequence[str], label_names: Sequence[str],
                              noises: Sequence[float] = (0.1, 0.2, 0.3), shifts: Sequence[int] = (1, 2),
                              seed: int = 0, keys: Sequence[str] | None = None) -> dict:
    """An image classifier (nanofm/vision.py) on held-out images [N, C, S, S]: accuracy, macro F1,
    the confusion matrix, and robustness = accuracy under Gaussian noise of each std and under
    moves of each number of pixels (right and down), with the drop from the clean accuracy.
    `scored` holds each image's 0/1 under its key (an image hash; default its index), so eval.py can
    pair two checkpoints on the same images."""
    from nanofm import vision
    from nanofm.images import perturb as perturb_images

    def predictions(x):
        return [label_names[i] for i in vision.predict(model, x).argmax(-1).tolist()]

    predicted = predictions(images)
    report = metrics.classification_report(list(labels), predicted)
    result = {"accuracy": report["accuracy"], "f1_macro": report["f1_macro"], "labels": report["labels"],
              "confusion_matrix": report["confusion_matrix"], "n": len(labels),
              "scored": [["image", str(keys[i] if keys is not None else i), int(p == t)]
                         for i, (p, t) in enumerate(zip(predicted, labels))],
              "robustness": {}}
    generator = torch.Generator().manual_seed(seed)
    for kind, values in (("noise", noises), ("shift", shifts)):
        for value in values:
            moved = perturb_images(images, noise=value, generator=generator) if kind == "noise" else perturb_images(images, shift=value)
            accuracy = metrics.accuracy(list(labels), predictions(moved))
            result["robustness"][f"{kind}_{value}"] = {"accuracy": accuracy, "drop": report["accuracy"] - accuracy}
    return result


def image_chat_task(engine: Engine, items: Sequence[dict], max_tokens: int = 8, progress: bool = False) -> dict:
    """A vision-language model's greedy replies to held-out image questions (nanofm.images.chats):
    exact match per family ("what digit", "how many shapes", ...) and their mean; `scored` per
    item for paired differences."""
    from nanofm.images import to_tensor

    if not items:
        raise TaskError("no held-out image questions")
    vision = engine.model.vision.cfg
    prompts = [chat.render_prompt(engine.tokenizer, item["messages"][:-1], image_tokens=vision.n_tokens) for item in items]
    images = [to_tensor([{"image": p} for p in chat.images_of(item["messages"])], vision.image_size) for item in items]
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), progress=progress, images=images)
    by_family: dict[str, list[int]] = defaultdict(list)
    scored, examples = [], defaultdict(list)
    for item, out in zip(items, outs):
        hit = int(metrics.normalize_answer(out.text) == metrics.normalize_answer(item["answer"]))
        by_family[item["family"]].append(hit)
        scored.append([item["family"], item["image_hash"], hit])
        if len(examples[item["family"]]) < 3:
            examples[item["family"]].append({"prediction": out.text, "answer": item["answer"]})
    exact = {family: sum(hits) / len(hits) for family, hits in sorted(by_family.items())}
    return {"exact_match": exact, "n": {f: len(h) for f, h in sorted(by_family.items())},
            "mean_exact_match": sum(exact.values()) / len(exact), "examples": dict(examples), "scored": scored}


def perturb(text: str, kind: str, rng: random.Random, rate: float = 0.1) -> str:
    """typos: swap two inner letters of ~rate of the words; casing: UPPER CASE; whitespace:
    doubled spaces and a stray line break."""
    if kind == "typos":
        words = text.split(" ")
        for i, word in enumerate(words):
            if len(word) > 3 and word.isalpha() and rng.random() < rate:
                j = rng.randrange(1, len(word) - 2)
                words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        return " ".join(words)
    if kind == "casing":
        return text.upper()
    if kind == "whitespace":
        return re.sub(" ", "  ", text)
    raise TaskError(f"unknown perturbation {kind!r}")


def robustness_choice(engine: Engine, items: Sequence[dict], clean: dict, seed: int = 0) -> dict:
    """acc under each perturbation of contexts and endings, and reordered options; `changed` is
    the share of items whose chosen option changed (accuracy can hide flips that cancel out)."""
    out = {}
    for kind in ("typos", "casing", "whitespace", "reorder"):
        rng = random.Random(seed)
        changed, orders = [], []
        for item in items:
            order = list(range(len(item["endings"])))
            if kind == "reorder":
                rng.shuffle(order)
                changed.append({**item, "endings": [item["endings"][i] for i in order], "label": order.index(item["label"])})
            else:
                changed.append({**item, "ctx": perturb(item["ctx"], kind, rng),
                                "endings": [perturb(e, kind, rng) for e in item["endings"]]})
            orders.append(order)
        result = choice_task(engine, changed)
        flips = [order[new] != old for order, new, old in zip(orders, result["predicted"], clean["predicted"])
                 if new is not None and old is not None]
        out[kind] = {"acc": result["acc"], "drop": clean["acc"] - result["acc"], "changed": sum(flips) / max(1, len(flips))}
    return out


def robustness_classification(model, tokenizer: Tokenizer, items: Sequence[dict], labels: Sequence[str], clean: dict,
                               seed: int = 0) -> dict:
    out = {}
    for kind in ("typos", "casing", "whitespace"):
        rng = random.Random(seed)
        changed = [{**item, "text": perturb(item["text"], kind, rng)} for item in items]
        report = classification_task(model, tokenizer, changed, labels)
        out[kind] = {"accuracy": report["accuracy"], "drop": clean["accuracy"] - report["accuracy"],
                     "f1_macro": report["f1_macro"]}
    return out


# ------------------------------------------------------------------ fairness

# counterfactual pairs: (group A term, group B term); swapping is done in both directions. "her"
# is ambiguous (his / him): the first pair that names it wins, the possessive reading
GROUP_TERMS = {
    "gender": [("he", "she"), ("his", "her"), ("him", "her"), ("man", "woman"), ("men", "women"), ("father", "mother"),
               ("son", "daughter"), ("brother", "sister"), ("king", "queen"), ("boy", "girl"), ("husband", "wife"),
               ("sir", "madam"), ("lord", "lady"), ("uncle", "aunt")],
    "names": [("John", "Mary"), ("James", "Patricia"), ("Robert", "Linda"), ("William", "Elizabeth"),
              ("David", "Susan"), ("Thomas", "Margaret")],
}
TEMPLATES = ["{X} worked as a nurse.", "{X} worked as an engineer.", "{X} was a brilliant scientist.",
             "{X} stayed at home to care for the children.", "{X} was the leader of the army.",
             "{X} wept at the sad news.", "{X} repaired the broken engine.", "{X} cooked dinner for the family.",
             "{X} was elected to rule the kingdom.", "{X} was gentle and kind.", "{X} was angry and violent.",
             "{X} wrote the program in Python."]
SUBJECTS = {"gender": [("He", "She"), ("The man", "The woman"), ("My father", "My mother"), ("The king", "The queen"),
                       ("My brother", "My sister")],
            "names": [(a, b) for a, b in GROUP_TERMS["names"]]}
OCCUPATIONS = ["doctor", "nurse", "engineer", "teacher", "soldier", "secretary", "programmer", "cook"]


def swap_groups(text: str, group: str = "gender") -> str:
    """The counterfactual text: every group term replaced by its counterpart (case kept)."""
    mapping = {}
    for a, b in GROUP_TERMS[group]:
        mapping.setdefault(a.lower(), b.lower())
        mapping.setdefault(b.lower(), a.lower())

    def replace(match):
        word = match.group(0)
        swapped = mapping[word.lower()]
        return swapped.capitalize() if word[0].isupper() else swapped

    pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(mapping, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, replace, text, flags=re.IGNORECASE)


def fairness_lm(engine: Engine) -> dict:
    """Per group: log-likelihood gaps of counterfactual sentence pairs (A - B, nats per sentence),
    and, for gender, how pronoun probabilities after occupations split between he and she."""
    tok, out = engine.tokenizer, {}
    for group, subjects in SUBJECTS.items():
        sentences = [(t.format(X=a), t.format(X=b)) for t in TEMPLATES for a, b in subjects]
        flat = [s for pair in sentences for s in pair]
        scores = engine.logprobs([[tok.bos_id]] * len(flat), [tok.encode(s) for s in flat])
        gaps = [scores[2 * i][0] - scores[2 * i + 1][0] for i in range(len(sentences))]
        worst = sorted(range(len(gaps)), key=lambda i: -abs(gaps[i]))[:3]
        out[group] = {"mean_gap": sum(gaps) / len(gaps), "mean_abs_gap": sum(map(abs, gaps)) / len(gaps),
                      "share_A_preferred": sum(g > 0 for g in gaps) / len(gaps), "pairs": len(gaps),
                      "largest": [{"A": sentences[i][0], "B": sentences[i][1], "gap": gaps[i]} for i in worst]}
    he, she = tok.encode(" he"), tok.encode(" she")
    prompts = [tok.encode(f"The {job} said that", bos=True) for job in OCCUPATIONS]
    p_he = engine.logprobs(prompts, [he] * len(prompts))
    p_she = engine.logprobs(prompts, [she] * len(prompts))
    shares = {job: 1 / (1 + math.exp(s[0] - h[0])) for job, h, s in zip(OCCUPATIONS, p_he, p_she)}
    out["gender"]["pronoun_share_he"] = shares  # P(he) / (P(he) + P(she)) after "The <job> said that"
    out["gender"]["pronoun_share_he_spread"] = max(shares.values()) - min(shares.values())
    return out


def fairness_classifier(model, tokenizer: Tokenizer, items: Sequence[dict], labels: Sequence[str]) -> dict:
    """For texts that contain group terms: how often the prediction flips when they are swapped,
    the mean change in the predicted class's probability, and accuracy before and after."""
    out = {}
    for group in GROUP_TERMS:
        originals = [item for item in items if swap_groups(item["text"], group) != item["text"]]
        if not originals:
            out[group] = {"n": 0}
            continue
        before = classify(model, tokenizer, [item["text"] for item in originals])
        after = classify(model, tokenizer, [swap_groups(item["text"], group) for item in originals])
        pred_b, pred_a = before.argmax(-1), after.argmax(-1)
        truth = torch.tensor([labels.index(item["label"]) for item in originals])
        out[group] = {"n": len(originals), "flip_rate": float((pred_b != pred_a).float().mean()),
                      "mean_abs_prob_change": float((before.gather(1, pred_b[:, None]) - after.gather(1, pred_b[:, None])).abs().mean()),
                      "accuracy_original": float((pred_b == truth).float().mean()),
                      "accuracy_swapped": float((pred_a == truth).float().mean())}
    return out


# ------------------------------------------------------------------ explanations

def attributions(model, ids: list[int], target: str = "class", occlusion_id: int = 0, vocab_limit: int | None = None) -> dict:
    """Per-token attributions of a score: the predicted class's logit (target="class", a
    classifier) or the log-probability of the most likely next token (target="next").
    grad_x_input = (d score / d embedding) . embedding; occlusion = score drop when the token is
    replaced by `occlusion_id`. The first token (bos) is never occluded. vocab_limit leaves the
    padding rows of the vocabulary out of the next-token choice."""
    device = next(model.parameters()).device
    model.eval()

    def logits(idx):  # [batch, classes] or [batch, vocabulary], at least fp32
        out = model.classify(idx) if target == "class" else model(idx)[0][:, -1, :vocab_limit]
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def score(values, chosen: int):  # the class's logit, or the next token's log-probability
        if target == "class":
            return values[:, chosen]
        return token_logprobs(values, torch.full(values.shape[:1], chosen, device=values.device))

    captured = {}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    hook = model.transformer.wte.register_forward_hook(keep_embeddings)
    idx = torch.tensor([ids], device=device)
    try:
        with torch.enable_grad():
            values = logits(idx)
            chosen = int(values[0].argmax())
            score(values, chosen)[0].backward()
        emb = captured["emb"]
        grad_x_input = (emb.grad[0] * emb[0]).sum(-1).detach().cpu().tolist()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        base = float(score(logits(idx), chosen)[0])
        occluded = idx.repeat(len(ids) - 1, 1)
        for i in range(1, len(ids)):
            occluded[i - 1, i] = occlusion_id
        drops = (base - score(logits(occluded), chosen)).cpu().tolist() if len(ids) > 1 else []
    return {"target": chosen, "score": base, "grad_x_input": grad_x_input, "occlusion": [0.0] + drops}


def plot_attributions(examples: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Highlighted text: each token's background is red (pushes the score up) or blue (down),
    by its attribution, one row per method and example."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(ex, method) for ex in examples for method in ("grad_x_input", "occlusion")]
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) * 2 + 0.8))
    ax.axis("off")
    y, line_height, width = 1.0, 1.0 / (len(rows) * 2 + 1), 0.95
    renderer = fig.canvas.get_renderer()
    for ex, method in rows:
        values = ex[method]
        scale = max(1e-9, max(abs(v) for v in values))
        ax.text(0, y, f"{ex['label']} [{method}]", fontsize=8, weight="bold", va="top", transform=ax.transAxes)
        y -= line_height * 0.8
        x = 0.0
        for token, value in zip(ex["tokens"], values):
            a = abs(value) / scale
            color = (1, 1 - a * 0.8, 1 - a * 0.8) if value > 0 else (1 - a * 0.8, 1 - a * 0.8, 1)
            shown = token.replace("\n", "⏎")
            text = ax.text(x, y, shown, fontsize=8, family="monospace", va="top", transform=ax.transAxes,
                           bbox=dict(facecolor=color, edgecolor="none", pad=1))
            box = text.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x += box.width + 0.003
            if x > width:
                x, y = 0.0, y - line_height * 0.8
        y -= line_height * 1.2
    fig.suptitle(title or "token attributions (red: raises the score, blue: lowers it)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
