"""Stage 7: evaluate one checkpoint, or several side by side, and write a report.

    python eval.py --ckpt out/pretrain                                  # every task that fits it
    python eval.py --ckpt out/base --ckpt out/sft --tasks perplexity --tasks choice   # a comparison
    python eval.py --ckpt out/pretrain --tasks hellaswag --hellaswag_file hellaswag_val.jsonl
    python eval.py --ckpt out/pretrain --prompt "ROMEO:" --temperature 0.8 --top_k 50 --seed 1

Reads each checkpoint's model and tokenizer and, for the built-in tasks, the validation documents
of the data directory it was trained on (meta.json's data_dir, or --data_dir). Picks the tasks
that fit each checkpoint: a causal LM gets perplexity, multiple choice, LAMBADA-style last words,
chat generation (exact match, BLEU, ROUGE), robustness, fairness and explanations; a masked LM
gets masked-token loss and accuracy; a classifier (n_classes > 0) gets accuracy, P/R/F1 and a
confusion matrix, robustness, fairness and explanations. Writes report.json, report.md and plots
to --out_dir, all at once at the end (a failed run leaves the previous report as it was), and
prints one table with a column per checkpoint. Metric definitions: nanofm/metrics.py; tasks:
nanofm/tasks.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanofm import tasks
from nanofm.checkpoint import CheckpointError, load_model, resolve
from nanofm.config import closest, config_to_dict, parse_config
from nanofm.engine import Engine, SamplingParams
from nanofm.tokenizer import Tokenizer, TokenizerError
from nanofm.train import pick_device


@dataclass
class EvalConfig:
    ckpt: list[str] = field(default_factory=list)  # checkpoint or run directories; repeat the flag to compare several
    tasks: list[str] = field(default_factory=list)  # tasks to run (repeat the flag); none = every task that fits
    data_dir: str = ""  # held-out documents for the built-in tasks; "" = each checkpoint's own data_dir
    out_dir: str = "out/eval"  # report.json, report.md and plots
    max_items: int = 200  # items per task (documents per domain for perplexity)
    stride: int = 0  # sliding-window stride for long documents; 0 = half the context
    hellaswag_file: str = ""  # a local HellaSwag jsonl; "" = the hub dataset Rowan/hellaswag (online)
    lambada_file: str = ""  # a local LAMBADA jsonl; "" = built-in passages from the validation prose
    prompt: list[str] = field(default_factory=list)  # print samples for these prompts instead of evaluating
    max_tokens: int = 64  # sample length for --prompt
    temperature: float = 0.8  # --prompt sampling; 0 = greedy
    top_k: int = 50  # --prompt sampling; 0 = off
    top_p: float = 1.0  # --prompt sampling; 1 = off
    num_samples: int = 1  # samples per prompt
    seed: int = 0  # fixes the samples and the built-in task draws
    device: str = "auto"  # auto | cuda | mps | cpu
    progress: bool = True  # progress bars


# task -> the kinds of checkpoint it fits ("lm": causal LM, "mlm": masked LM, "classifier")
TASKS = {
    "perplexity": {"lm"}, "mlm": {"mlm"}, "choice": {"lm"}, "lambada": {"lm"}, "generation": {"lm"},
    "hellaswag": {"lm"}, "classification": {"classifier"}, "robustness": {"lm", "classifier"},
    "fairness": {"lm", "classifier"}, "explain": {"lm", "classifier"},
}
ASK_ONLY = {"hellaswag"}  # needs a file or the network, so only when asked for


def kind_of(model) -> str:
    if model.cfg.n_classes:
        return "classifier"
    return "lm" if model.cfg.causal else "mlm"


class Checkpoint:
    """A loaded checkpoint with what its tasks need, made on first use."""

    def __init__(self, path: str, cfg: EvalConfig, device: str):
        self.path, self.cfg = path, cfg
        self.dir = resolve(path)
        self.model, self.meta = load_model(path, device)
        self.model.eval()
        if not (self.dir / "tokenizer.json").exists():
            raise CheckpointError(f"{self.dir} has no tokenizer.json, so its ids cannot be turned into text")
        self.tokenizer = Tokenizer.load(self.dir)
        self.kind = kind_of(self.model)
        self.engine = Engine(self.model, self.tokenizer) if self.model.cfg.causal else None
        self._docs = None

    @property
    def docs(self) -> list[dict]:
        if self._docs is None:
            data_dir = self.cfg.data_dir or self.meta.get("data_dir")
            if not data_dir:
                raise tasks.TaskError(f"{self.path} does not say which data it was trained on; give --data_dir")
            self._docs = tasks.val_docs(data_dir)
        return self._docs

    @property
    def labels(self) -> list[str]:
        labels = self.meta.get("labels")
        if not labels or len(labels) != self.model.cfg.n_classes:
            raise CheckpointError(f"{self.path} is a classifier but its meta.json has no list of {self.model.cfg.n_classes} labels")
        return labels


# ------------------------------------------------------------------ the tasks

def run_task(name: str, ck: Checkpoint, results: dict, out_dir: Path, label: str) -> dict:
    cfg, n = ck.cfg, ck.cfg.max_items
    progress = cfg.progress
    if name == "perplexity":
        return tasks.perplexity_task(ck.model, ck.tokenizer, ck.docs, max_docs=n, stride=cfg.stride or None, progress=progress)
    if name == "mlm":
        return tasks.mlm_task(ck.model, ck.tokenizer, ck.docs, max_docs=n, seed=cfg.seed)
    if name == "choice":
        return tasks.choice_task(ck.engine, tasks.choice_items(ck.docs, n=n, seed=cfg.seed), progress=progress)
    if name == "hellaswag":
        return tasks.choice_task(ck.engine, tasks.load_hellaswag(cfg.hellaswag_file or None, limit=n), progress=progress)
    if name == "lambada":
        items = tasks.load_lambada(cfg.lambada_file, limit=n) if cfg.lambada_file else tasks.lambada_items(ck.docs, n=n, seed=cfg.seed)
        return tasks.lambada_task(ck.engine, items)
    if name == "generation":
        return tasks.generation_task(ck.engine, tasks.generation_items(ck.docs, n=n), progress=progress)
    if name == "classification":
        report = tasks.classification_task(ck.model, ck.tokenizer, classification_items(ck), ck.labels)
        plot_confusion(report, out_dir / f"confusion_{label}.png", label)
        return report
    if name == "robustness":
        if ck.kind == "classifier":
            clean = results.get("classification") or tasks.classification_task(ck.model, ck.tokenizer, classification_items(ck), ck.labels)
            return tasks.robustness_classification(ck.model, ck.tokenizer, classification_items(ck), ck.labels, clean, cfg.seed)
        items = tasks.choice_items(ck.docs, n=n, seed=cfg.seed)
        clean = results.get("choice") or tasks.choice_task(ck.engine, items)
        return tasks.robustness_choice(ck.engine, items, clean, cfg.seed)
    if name == "fairness":
        if ck.kind == "classifier":
            return tasks.fairness_classifier(ck.model, ck.tokenizer, classification_items(ck), ck.labels)
        return tasks.fairness_lm(ck.engine)
    if name == "explain":
        return explain(ck, out_dir / f"explain_{label}.png", label)
    raise AssertionError(name)


def classification_items(ck: Checkpoint) -> list[dict]:
    return tasks.classification_items(ck.docs, ck.labels, field=ck.meta.get("label_field", "domain"), n=ck.cfg.max_items)


def explain(ck: Checkpoint, path: Path, label: str, n_examples: int = 3, max_tokens: int = 40) -> dict:
    """Attributions for a few inputs: a classifier's predicted class, or an LM's next token."""
    tok, examples = ck.tokenizer, []
    if ck.kind == "classifier":
        texts = [item["text"] for item in classification_items(ck)[:n_examples]]
        inputs = [tasks.classifier_input(tok, t, ck.model.cfg.block_size)[:max_tokens] for t in texts]
    else:
        inputs = [tok.encode(item["prompt"], bos=True)[-max_tokens:] for item in _explain_prompts(ck)[:n_examples]]
    for ids in inputs:
        attribution = tasks.attributions(ck.model, ids, "class" if ck.kind == "classifier" else "next",
                                         occlusion_id=tok.pad_id, vocab_limit=tok.vocab_size)
        target = (ck.labels[attribution["target"]] if ck.kind == "classifier"
                  else repr(tok.decode([attribution["target"]])))
        examples.append({"label": f"prediction {target}", "tokens": [tok.decode([i]) for i in ids], **attribution})
    tasks.plot_attributions(examples, path, f"{label}: token attributions (red raises the prediction's score, blue lowers it)")
    return {"examples": examples, "figure": path.name}


def _explain_prompts(ck: Checkpoint) -> list[dict]:
    try:
        return tasks.generation_items(ck.docs)
    except tasks.TaskError:  # no chat data: the starts of validation lines
        return [{"prompt": line} for doc in ck.docs for line in doc["text"].split("\n")[:1] if line.strip()]


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


def write_report(report: dict, scratch: Path, out_dir: Path) -> None:
    """Everything is written into `scratch` first; then it replaces out_dir in one rename."""
    (scratch / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (scratch / "report.md").write_text(markdown(report))
    old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    scratch.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ main

def sample(cfg: EvalConfig, device: str) -> None:
    params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p if cfg.top_p < 1 else None, seed=cfg.seed + i) for i in range(cfg.num_samples)]
    for path in cfg.ckpt:
        ck = Checkpoint(path, cfg, device)
        if ck.engine is None:
            raise ValueError(f"{path} is not a causal language model, so it cannot write samples")
        for prompt in cfg.prompt:
            outs = ck.engine.generate([prompt] * cfg.num_samples, params)
            for i, out in enumerate(outs):
                print(f"--- {path} | sample {i + 1} ({out.finish_reason}, {len(out.token_ids)} tokens)")
                print(prompt + out.text)


def main(argv=None) -> dict | None:
    cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n\n")[0])
    if not cfg.ckpt:
        raise ValueError("give at least one checkpoint: --ckpt out/pretrain (repeat --ckpt to compare several)")
    for task in cfg.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}{closest(task, list(TASKS), prefix='')}; tasks: {', '.join(TASKS)}")
    if cfg.max_items < 1:
        raise ValueError(f"--max_items must be at least 1, got {cfg.max_items}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.prompt:
        sample(cfg, device)
        return None

    out_dir = Path(cfg.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    scratch.mkdir()
    try:
        report = {"command": "python eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "config": config_to_dict(cfg), "checkpoints": {}, "plots": []}
        for i, path in enumerate(cfg.ckpt):
            ck = Checkpoint(path, cfg, device)
            label = Path(path).resolve().name
            label = label if label not in report["checkpoints"] else f"{label}_{i}"
            entry = {"path": str(ck.dir), "kind": ck.kind, "model": ck.model.cfg.to_dict(), "stage": ck.meta.get("stage"),
                     "params": ck.model.num_params(non_embedding=False), "step": ck.meta.get("step"),
                     "data_dir": cfg.data_dir or ck.meta.get("data_dir"), "results": {}, "skipped": {}, "seconds": {}}
            report["checkpoints"][label] = entry
            wanted = cfg.tasks or [t for t in TASKS if t not in ASK_ONLY]
            for task in wanted:
                if ck.kind not in TASKS[task]:
                    entry["skipped"][task] = f"needs a {' or '.join(sorted(TASKS[task]))} checkpoint, this is a {ck.kind}"
                    continue
                print(f"[{label}] {task} ...", flush=True)
                start = time.time()
                try:
                    entry["results"][task] = run_task(task, ck, entry["results"], scratch, label)
                except tasks.TaskError as exc:
                    if cfg.tasks:  # asked for by name: its data must be there
                        raise
                    entry["skipped"][task] = str(exc)
                    continue
                entry["seconds"][task] = round(time.time() - start, 2)
                if task in ("classification", "explain"):
                    report["plots"].append(f"{'confusion' if task == 'classification' else 'explain'}_{label}.png")
        report["plots"] += plot_comparison(report, scratch)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = table(report)
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows))
        write_report(report, scratch, out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    print(f"wrote {out_dir}/report.json, report.md and {len(report['plots'])} plot(s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, TokenizerError, tasks.TaskError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
