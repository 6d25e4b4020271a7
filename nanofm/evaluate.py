"""Evaluation as a library: each task is one record (its name, the checkpoints it fits, how it
runs, its headline numbers), callable from eval.py, a training script or a monitoring gate.

    from nanofm.evaluate import Subject, Settings, run_tasks, TASKS
    subject = Subject.load("out/sft")                       # or Subject(model, tokenizer, meta)
    out = run_tasks(subject, ["perplexity", "choice"], Settings(max_items=100))
    out["results"]["choice"]["acc"], out["skipped"]         # what ran, what did not fit and why
    headline("choice", out["results"]["choice"])            # the few numbers a comparison table shows

    report = {"checkpoints": {"sft": {...}}, ...}; write_report(report, scratch, Path("out/eval"))

Design decisions:
- A Subject is what a task needs of a model: the model, its tokenizer, its meta.json (chat
  format, labels, data dir), the shared engine, and the held-out documents, loaded on first use.
  An in-memory model (a training run's, a retrained candidate) is a Subject as much as a
  checkpoint on disk is.
- Which tasks fit is decided by the model's kind: "lm" (causal), "mlm" (bidirectional),
  "classifier" (n_classes > 0). A task that does not fit, or whose data is missing, is skipped
  with the reason, unless it was asked for by name, in which case its error is raised.
- A chat-tuned checkpoint (meta.json's chat_format) is asked its chat questions in that format;
  a base model keeps plain-text prompts (nanofm/tasks.py, prompt_ids).
- Reports are written into a scratch directory and swapped in with one rename; only a directory
  that eval wrote (it holds the marker file .nanofm-eval) or an empty one may be replaced, so a
  mistyped --out_dir can never delete a user's folder.
- With several checkpoints, later ones are compared with the first on the instruction questions
  both answered: the difference in mean exact match and its standard error (paired()), since two
  scores side by side cannot tell a gain of 0.03 from noise and a paired difference can.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanofm import metrics, tasks
from nanofm.checkpoint import CheckpointError, load_for_inference, resolve
from nanofm.common import NanofmError
from nanofm.engine import Engine
from nanofm.tokenizer import Tokenizer

MARKER = ".nanofm-eval"  # in every directory eval writes; only such a directory may be replaced


class ReportError(NanofmError):
    pass


@dataclass
class Settings:
    max_items: int = 200  # items per task (documents per domain for perplexity)
    stride: int = 0  # sliding-window stride for long documents; 0 = half the context
    seed: int = 0  # fixes the built-in task draws
    data_dir: str = ""  # held-out documents; "" = the subject's own data_dir
    hellaswag_file: str = ""  # a local HellaSwag jsonl; "" = the hub dataset (online)
    lambada_file: str = ""  # a local LAMBADA jsonl; "" = built-in passages
    progress: bool = False  # progress bars
    plot_dir: Path | None = None  # where confusion matrices and attribution plots go; None = no plots


def kind_of(model) -> str:
    if model.cfg.n_classes:
        return "image_classifier" if model.cfg.vision is not None else "classifier"
    return "lm" if model.cfg.causal else "mlm"


class Subject:
    """A model under evaluation, with what its tasks need, made on first use."""

    def __init__(self, model, tokenizer: Tokenizer, meta: dict, name: str = "model", path: str | None = None):
        self.model, self.tokenizer, self.meta, self.name, self.path = model, tokenizer, meta, name, path
        self.kind = kind_of(model)
        self.chat_format = meta.get("chat_format")
        self.engine = Engine(model, tokenizer) if model.cfg.causal else None
        self._docs = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", name: str | None = None) -> "Subject":
        model, meta, tokenizer = load_for_inference(path, device)
        return cls(model, tokenizer, meta, name or Path(path).resolve().name, str(resolve(path)))

    def docs(self, settings: Settings) -> list[dict]:
        data_dir = settings.data_dir or self.meta.get("data_dir")
        if not data_dir:
            raise tasks.TaskError(f"{self.path or self.name} does not say which data it was trained on; give --data_dir")
        if data_dir not in self._docs:
            self._docs[data_dir] = tasks.val_docs(data_dir)
        return self._docs[data_dir]

    @property
    def labels(self) -> list[str]:
        labels = self.meta.get("labels")
        if not labels or len(labels) != self.model.cfg.n_classes:
            raise CheckpointError(f"{self.path or self.name} is a classifier but its meta.json has no list of "
                                  f"{self.model.cfg.n_classes} labels")
        return labels

    def classification_items(self, settings: Settings) -> list[dict]:
        if self.meta.get("label_task"):  # fine-tuned by train_sft.py: its own held-out texts
            from nanofm import labels
            data_dir = settings.data_dir or self.meta.get("data_dir")
            try:
                items, _ = labels.load(self.meta["label_task"], data_dir, "test", data_seed(self, settings))
            except labels.LabelError as exc:
                raise tasks.TaskError(str(exc)) from None
            return items[:settings.max_items]
        return tasks.classification_items(self.docs(settings), self.labels, field=self.meta.get("label_field", "domain"),
                                          n=settings.max_items)


# ------------------------------------------------------------------ the tasks

def _perplexity(s: Subject, cfg: Settings, done: dict) -> dict:
    return tasks.perplexity_task(s.model, s.tokenizer, s.docs(cfg), max_docs=cfg.max_items, stride=cfg.stride or None,
                                 progress=cfg.progress)


def _mlm(s: Subject, cfg: Settings, done: dict) -> dict:
    return tasks.mlm_task(s.model, s.tokenizer, s.docs(cfg), max_docs=cfg.max_items, seed=cfg.seed)


def _choice(s: Subject, cfg: Settings, done: dict) -> dict:
    return tasks.choice_task(s.engine, tasks.choice_items(s.docs(cfg), n=cfg.max_items, seed=cfg.seed),
                             progress=cfg.progress, chat_format=s.chat_format)


def _hellaswag(s: Subject, cfg: Settings, done: dict) -> dict:
    return tasks.choice_task(s.engine, tasks.load_hellaswag(cfg.hellaswag_file or None, limit=cfg.max_items),
                             progress=cfg.progress)


def _lambada(s: Subject, cfg: Settings, done: dict) -> dict:
    items = (tasks.load_lambada(cfg.lambada_file, limit=cfg.max_items) if cfg.lambada_file
             else tasks.lambada_items(s.docs(cfg), n=cfg.max_items, seed=cfg.seed))
    return tasks.lambada_task(s.engine, items)


def _generation(s: Subject, cfg: Settings, done: dict) -> dict:
    return tasks.generation_task(s.engine, tasks.generation_items(s.docs(cfg), n=cfg.max_items), progress=cfg.progress,
                                 chat_format=s.chat_format)


def _induction(s: Subject, cfg: Settings, done: dict) -> dict:
    try:
        docs = s.docs(cfg)
    except tasks.TaskError:  # no validation documents at hand: the random-token score alone
        docs = []
    return tasks.induction_task(s.model, s.tokenizer, seed=cfg.seed, docs=docs)


def data_seed(s: Subject, cfg: Settings) -> int:
    """The seed that split the checkpoint's fine-tuning data (its training config's), so the
    held-out questions are the ones it never trained on; --seed for checkpoints without one."""
    return s.meta.get("config", {}).get("seed", cfg.seed)


def _instructions(s: Subject, cfg: Settings, done: dict) -> dict:
    from nanofm import instructions
    data_dir = cfg.data_dir or s.meta.get("data_dir")
    if not data_dir:
        raise tasks.TaskError(f"{s.path or s.name} does not say which data it was trained on; give --data_dir")
    try:
        items = instructions.builtin(data_dir, "val", per_family=max(1, min(cfg.max_items // 4, 100)), seed=data_seed(s, cfg))
    except instructions.InstructionError as exc:
        raise tasks.TaskError(str(exc)) from None
    return tasks.instruction_task(s.engine, items, s.chat_format, progress=cfg.progress)


def _safety(s: Subject, cfg: Settings, done: dict) -> dict:
    from nanofm import safety
    return safety.measure(s.engine, safety.prompts("val", seed=data_seed(s, cfg)))


def _classification(s: Subject, cfg: Settings, done: dict) -> dict:
    report = tasks.classification_task(s.model, s.tokenizer, s.classification_items(cfg), s.labels)
    if cfg.plot_dir is not None:
        report["figure"] = f"confusion_{s.name}.png"
        plot_confusion(report, cfg.plot_dir / report["figure"], s.name)
    return report


def _robustness(s: Subject, cfg: Settings, done: dict) -> dict:
    if s.kind == "classifier":
        items = s.classification_items(cfg)
        clean = done.get("classification") or tasks.classification_task(s.model, s.tokenizer, items, s.labels)
        return tasks.robustness_classification(s.model, s.tokenizer, items, s.labels, clean, cfg.seed)
    items = tasks.choice_items(s.docs(cfg), n=cfg.max_items, seed=cfg.seed)
    clean = done["choice"] if "choice" in done and not s.chat_format else tasks.choice_task(s.engine, items)
    return tasks.robustness_choice(s.engine, items, clean, cfg.seed)


def _fairness(s: Subject, cfg: Settings, done: dict) -> dict:
    if s.kind == "classifier":
        return tasks.fairness_classifier(s.model, s.tokenizer, s.classification_items(cfg), s.labels)
    return tasks.fairness_lm(s.engine)


def _explain(s: Subject, cfg: Settings, done: dict) -> dict:
    return explain(s, cfg)


def _images(s: Subject, cfg: Settings, done: dict) -> dict:
    """The held-out images of the checkpoint's own data (rebuilt from its config: nanofm.images.gather):
    a classifier's accuracy, macro F1, confusion matrix and robustness; a vision-language
    model's exact match on questions about them (at most 3 x max_items)."""
    import random
    from nanofm import images

    try:
        _, test, _ = images.gather(images.ImageData.of(s.meta.get("config", {})))
    except images.ImageError as exc:
        raise tasks.TaskError(str(exc)) from None
    if s.kind == "image_classifier":
        x = images.to_tensor(test, s.model.vision.cfg.image_size)
        result = tasks.image_classification_task(s.model, x, [i["label"] for i in test], s.labels, seed=cfg.seed,
                                                 keys=[i["hash"] for i in test])
        if cfg.plot_dir is not None:
            result["figure"] = f"confusion_{s.name}.png"
            plot_confusion(result, cfg.plot_dir / result["figure"], s.name)
        return result
    questions = images.chats(test, data_seed(s, cfg) + 1)
    random.Random(cfg.seed).shuffle(questions)
    return tasks.image_chat_task(s.engine, questions[:3 * cfg.max_items], progress=cfg.progress)


@dataclass(frozen=True)
class Task:
    name: str
    fits: frozenset  # the kinds of model it evaluates: "lm", "mlm", "classifier"
    run: Callable  # (subject, settings, results so far) -> result dict
    ask_only: bool = False  # needs a file or the network: only when asked for by name
    chat: bool = False  # asks chat prompts: a base model is skipped (said so), even when the task is named
    vision: bool = False  # shows images: a model that reads none is skipped (said so), even when the task is named


TASKS = {t.name: t for t in [
    Task("perplexity", frozenset({"lm"}), _perplexity),
    Task("mlm", frozenset({"mlm"}), _mlm),
    Task("choice", frozenset({"lm"}), _choice),
    Task("lambada", frozenset({"lm"}), _lambada),
    Task("generation", frozenset({"lm"}), _generation),
    Task("hellaswag", frozenset({"lm"}), _hellaswag, ask_only=True),
    Task("instructions", frozenset({"lm"}), _instructions),
    Task("induction", frozenset({"lm"}), _induction),
    Task("safety", frozenset({"lm"}), _safety, chat=True),
    Task("classification", frozenset({"classifier"}), _classification),
    Task("robustness", frozenset({"lm", "classifier"}), _robustness),
    Task("fairness", frozenset({"lm", "classifier"}), _fairness),
    Task("explain", frozenset({"lm", "classifier"}), _explain),
    Task("images", frozenset({"lm", "image_classifier"}), _images, vision=True),
]}


def run_tasks(subject: Subject, names: list[str] | None = None, settings: Settings | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """{"results": {task: result}, "skipped": {task: why}, "seconds": {task: s}} for the named
    tasks (None: every task that fits and needs no file or network)."""
    settings = settings or Settings()
    unknown = [n for n in names or [] if n not in TASKS]
    if unknown:
        raise tasks.TaskError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    wanted = names or [n for n, t in TASKS.items() if not t.ask_only]
    out = {"results": {}, "skipped": {}, "seconds": {}}
    was_training = subject.model.training
    subject.model.eval()
    try:
        for name in wanted:
            task = TASKS[name]
            if subject.kind not in task.fits:
                out["skipped"][name] = f"needs a {' or '.join(sorted(task.fits))} checkpoint, this is a {subject.kind}"
                continue
            if task.chat and not subject.chat_format:  # so eval.py can compare a base with its chat models
                out["skipped"][name] = "the task asks chat prompts: it needs a chat-tuned checkpoint (train_sft.py)"
                continue
            if task.vision and (subject.model.cfg.vision is None or (subject.kind == "lm" and not subject.chat_format)):
                out["skipped"][name] = "the task shows images: it needs a checkpoint that reads them (train_vision.py)"
                continue
            if log:
                log(f"[{subject.name}] {name} ...")
            start = time.time()
            try:
                out["results"][name] = task.run(subject, settings, out["results"])
            except tasks.TaskError as exc:
                if names:  # asked for by name: its data must be there
                    raise
                out["skipped"][name] = str(exc)
                continue
            out["seconds"][name] = round(time.time() - start, 2)
    finally:
        subject.model.train(was_training)
    return out


def explain(s: Subject, cfg: Settings, n_examples: int = 3, max_tokens: int = 40) -> dict:
    """Attributions for a few inputs: a classifier's predicted class, or an LM's next token."""
    tok, examples = s.tokenizer, []
    if s.kind == "classifier":
        texts = [item["text"] for item in s.classification_items(cfg)[:n_examples]]
        inputs = [tasks.classifier_input(tok, t, s.model.cfg.block_size)[:max_tokens] for t in texts]
    else:
        inputs = [tasks.prompt_ids(tok, item, s.chat_format)[-max_tokens:] for item in _explain_prompts(s, cfg)[:n_examples]]
    for ids in inputs:
        attribution = tasks.attributions(s.model, ids, "class" if s.kind == "classifier" else "next",
                                         occlusion_id=tok.pad_id, vocab_limit=tok.vocab_size)
        target = (s.labels[attribution["target"]] if s.kind == "classifier"
                  else repr(tok.decode([attribution["target"]])))
        examples.append({"label": f"prediction {target}", "tokens": [tok.decode([i]) for i in ids], **attribution})
    result = {"examples": examples}
    if cfg.plot_dir is not None:
        result["figure"] = f"explain_{s.name}.png"
        tasks.plot_attributions(examples, cfg.plot_dir / result["figure"],
                                f"{s.name}: token attributions (red raises the prediction's score, blue lowers it)")
    return result


def _explain_prompts(s: Subject, cfg: Settings) -> list[dict]:
    try:
        return tasks.generation_items(s.docs(cfg))
    except tasks.TaskError:  # no chat data: the starts of validation lines
        return [{"prompt": line} for doc in s.docs(cfg) for line in doc["text"].split("\n")[:1] if line.strip()]


# ------------------------------------------------------------------ the report

def headline(task: str, result: dict) -> dict[str, float]:
    """The few numbers per task that go into the side-by-side table."""
    if task == "perplexity":
        return {"perplexity": result["all"]["perplexity"], "bits_per_byte": result["all"]["bits_per_byte"],
                **{f"bits_per_byte[{d}]": r["bits_per_byte"] for d, r in result.items() if d != "all"}}
    if task == "mlm":
        return {f"masked_accuracy[{d}]": r["masked_accuracy"] for d, r in result.items()}
    if task in ("choice", "hellaswag"):
        return {"acc": result["acc"], "acc_norm": result["acc_norm"], "chance": result["chance"]}
    if task == "lambada":
        return {"acc": result["acc"], "perplexity": result["perplexity"]}
    if task == "generation":
        return {k: result[k] for k in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL", "rougeLsum")}
    if task == "classification":
        return {k: result[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted")}
    if task == "instructions":
        return {"mean_exact_match": result["mean_exact_match"],
                **{f"exact_match[{f}]": v for f, v in result["exact_match"].items()},
                **({"chat_bleu": result["chat_bleu"], "chat_rougeL": result["chat_rougeL"]} if "chat_bleu" in result else {})}
    if task == "safety":
        return {k: result[k] for k in ("refusal_rate", "over_refusal_rate", "polite_share", "rude_share")
                if result[k] is not None}
    if task == "induction":
        return {k: result[k] for k in ("first_copy_loss", "second_copy_loss", "copying_score", "second_copy_accuracy",
                                       "text_copying_score", "text_second_copy_accuracy") if k in result}
    if task == "images":
        if "accuracy" in result:
            return {"accuracy": result["accuracy"], "f1_macro": result["f1_macro"],
                    **{f"accuracy[{k}]": v["accuracy"] for k, v in result["robustness"].items()}}
        return {"mean_exact_match": result["mean_exact_match"],
                **{f"exact_match[{f}]": v for f, v in result["exact_match"].items()}}
    if task == "robustness":
        return {**{f"drop[{k}]": v["drop"] for k, v in result.items()},
                **{f"changed[{k}]": v["changed"] for k, v in result.items() if "changed" in v}}
    if task == "fairness":
        out = {}
        for group, r in result.items():
            for key in ("mean_abs_gap", "share_A_preferred", "pronoun_share_he_spread", "flip_rate"):
                if key in r:
                    out[f"{key}[{group}]"] = r[key]
        return out
    return {}


def paired(report: dict, task: str = "instructions") -> dict[str, dict]:
    """Each later checkpoint against the first on the items of `task` both answered (instruction
    questions, or held-out images): the difference in the mean score over families and its
    standard error (metrics.paired_difference), the way a gain should be reported. Empty when
    fewer than two checkpoints ran the task."""
    runs = [(name, entry["results"][task]["scored"]) for name, entry in report["checkpoints"].items()
            if "scored" in entry["results"].get(task, {})]
    if len(runs) < 2:
        return {}
    first_name, first = runs[0]
    first_by_key = {(family, question): right for family, question, right in first}
    out = {}
    for name, scored in runs[1:]:
        shared = [(family, first_by_key[(family, question)], right) for family, question, right in scored
                  if (family, question) in first_by_key]
        if shared:  # none shared: checkpoints split with different seeds
            families, before, after = zip(*shared)
            out[name] = {"against": first_name, **metrics.paired_difference(before, after, families)}
    return out


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def table(report: dict) -> list[list[str]]:
    names = list(report["checkpoints"])
    rows = [["task", "metric"] + names]
    keys = []
    for name in names:
        for task, result in report["checkpoints"][name]["results"].items():
            for metric in headline(task, result):
                if (task, metric) not in keys:
                    keys.append((task, metric))
    for task, metric in keys:
        row = [task, metric]
        for name in names:
            entry = report["checkpoints"][name]
            result = entry["results"].get(task)
            row.append(fmt(headline(task, result).get(metric)) if result else entry["skipped"].get(task, "-"))
        rows.append(row)
    for task, key, metric in (("instructions", "paired", "mean_exact_match"), ("images", "paired_images", "mean_score")):
        gains = report.get(key, {})
        if gains:
            against = next(iter(gains.values()))["against"]
            rows.append([task, f"{metric} - {against} (paired, se)"] +
                        [f"{gains[n]['difference']:+.3f} ({gains[n]['se']:.3f})" if n in gains else "-" for n in names])
    return rows


def markdown(report: dict) -> str:
    lines = ["# Evaluation report", "", f"{report['finished']}; command: `{report['command']}`", ""]
    for name, entry in report["checkpoints"].items():
        m = entry["model"]
        lines.append(f"- **{name}**: `{entry['path']}` ({entry['kind']}, {m['n_layer']} layers x {m['n_embd']}, "
                     f"{entry['params'] / 1e6:.1f}M parameters, step {entry.get('step')}, data `{entry.get('data_dir')}`)")
    rows = table(report)
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    for name, entry in report["checkpoints"].items():
        results = entry["results"]
        if entry["skipped"]:
            lines += ["", f"Skipped for {name}: " + "; ".join(f"{t} ({why})" for t, why in entry["skipped"].items())]
        if "generation" in results:
            lines += ["", f"## {name}: generation examples", ""]
            for ex in results["generation"]["examples"]:
                lines.append(f"- `{ex['prompt'].splitlines()[0]}` -> `{ex['prediction']}` (reference: `{ex['reference']}`)")
        if "fairness" in results:
            lines += ["", f"## {name}: largest counterfactual gaps", ""]
            for group, r in results["fairness"].items():
                for ex in r.get("largest", []):
                    lines.append(f"- {group}: `{ex['A']}` vs `{ex['B']}`: {ex['gap']:+.3f} nats")
    for plot in report["plots"]:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_confusion(report: dict, path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, labels = report["confusion_matrix"], report["labels"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            ax.text(j, i, str(c), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{label}: accuracy {report['accuracy']:.3f}, macro F1 {report['f1_macro']:.3f}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_comparison(report: dict, out_dir: Path) -> list[str]:
    """Bits per byte by domain, and robustness drops, one bar per checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, picker, ylabel, filename in (
            ("perplexity", lambda r: {d: v["bits_per_byte"] for d, v in r.items()}, "bits per byte (lower is better)", "bits_per_byte.png"),
            ("robustness", lambda r: {k: v["drop"] for k, v in r.items()}, "metric drop vs clean inputs", "robustness.png")):
        series = {name: picker(entry["results"][task]) for name, entry in report["checkpoints"].items()
                  if task in entry["results"]}
        if not series:
            continue
        groups = list(dict.fromkeys(k for s in series.values() for k in s))
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(series) / 2)), 4))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([g + i * width for g in range(len(groups))], [values.get(k, math.nan) for k in groups], width, label=name)
        ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(out_dir / filename, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(filename)
    return written


def is_replaceable(out_dir: Path) -> bool:
    """Eval may replace a directory it wrote (its marker is there) or an empty one; nothing else."""
    return not out_dir.exists() or (out_dir.is_dir() and ((out_dir / MARKER).is_file() or not any(out_dir.iterdir())))


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out_dir {out_dir} is a file; give a directory for the report")
    if not is_replaceable(out_dir):
        raise ReportError(f"--out_dir {out_dir} holds files that eval.py did not write; the report replaces its "
                          f"directory whole, so choose a new or empty one (e.g. {out_dir / 'eval'})")


def write_report(report: dict, scratch: Path, out_dir: Path) -> None:
    """Everything is written into `scratch` first; then it replaces out_dir in one rename."""
    check_out_dir(out_dir)  # again: it may have changed while the tasks ran
    (scratch / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (scratch / "report.md").write_text(markdown(report))
    (scratch / MARKER).write_text("written by nanofm eval.py; this directory is replaced by the next report\n")
    old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    scratch.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
