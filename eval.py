"""Stage 7: evaluate one checkpoint, or several side by side, and write a report.

    python eval.py                                                      # the newest checkpoint in out/, every task that fits
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
prints one table with a column per checkpoint. Only a directory eval.py wrote (or an empty one)
is replaced: any other --out_dir is refused. Metric definitions: nanofm/metrics.py; tasks:
nanofm/tasks.py; the task table, the report and the plots: nanofm/evaluate.py (the library
training scripts and the monitoring gate call).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanofm.checkpoint import newest_run
from nanofm.common import ConfigError, pick_device, run_cli
from nanofm.config import closest, config_to_dict, parse_config
from nanofm.engine import SamplingParams
from nanofm.evaluate import (TASKS, Settings, Subject, check_out_dir, paired, plot_comparison, run_tasks, table,
                             write_report)


@dataclass
class EvalConfig:
    ckpt: list[str] = field(default_factory=list)  # checkpoint or run directories; repeat to compare; none = the newest run in out/
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

    def __post_init__(self):
        if self.max_items < 1:
            raise ConfigError(f"--max_items must be at least 1, got {self.max_items}")
        if self.num_samples < 1:
            raise ConfigError(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise ConfigError(f"--max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also refuses nan
            raise ConfigError(f"--temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.stride < 0:
            raise ConfigError(f"--stride must be >= 0 (0 = half the context), got {self.stride}")
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"unknown task {task!r}{closest(task, list(TASKS), prefix='')}; tasks: {', '.join(TASKS)}")


def sample(cfg: EvalConfig, device: str) -> None:
    params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p if cfg.top_p < 1 else None, seed=cfg.seed + i) for i in range(cfg.num_samples)]
    for path in cfg.ckpt:
        subject = Subject.load(path, device)
        if subject.engine is None:
            raise ConfigError(f"{path} is not a causal language model, so it cannot write samples")
        for prompt in cfg.prompt:
            outs = subject.engine.generate([prompt] * cfg.num_samples, params)
            for i, out in enumerate(outs):
                print(f"--- {path} | sample {i + 1} ({out.finish_reason}, {len(out.token_ids)} tokens)")
                print(prompt + out.text)


def main(argv=None) -> dict | None:
    cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n\n")[0])
    if not cfg.ckpt:  # none given: the stage run most recently
        cfg.ckpt = [str(newest_run("out"))]
        print(f"no --ckpt given: evaluating the newest checkpoint under out/, {cfg.ckpt[0]}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.prompt:
        sample(cfg, device)
        return None

    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)  # before any work: never replace a folder eval.py did not write
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.with_name(f".tmp-{out_dir.name}-{time.time_ns()}")
    scratch.mkdir()
    try:
        report = {"command": "python eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "config": config_to_dict(cfg), "checkpoints": {}, "plots": []}
        settings = Settings(max_items=cfg.max_items, stride=cfg.stride, seed=cfg.seed, data_dir=cfg.data_dir,
                            hellaswag_file=cfg.hellaswag_file, lambada_file=cfg.lambada_file, progress=cfg.progress,
                            plot_dir=scratch)
        for i, path in enumerate(cfg.ckpt):
            label = Path(path).resolve().name
            label = label if label not in report["checkpoints"] else f"{label}_{i}"
            subject = Subject.load(path, device, name=label)
            outcome = run_tasks(subject, cfg.tasks or None, settings, log=lambda line: print(line, flush=True))
            report["checkpoints"][label] = {
                "path": subject.path, "kind": subject.kind, "model": subject.model.cfg.to_dict(),
                "stage": subject.meta.get("stage"), "chat_format": subject.chat_format,
                "params": subject.model.num_params(non_embedding=False), "step": subject.meta.get("step"),
                "data_dir": cfg.data_dir or subject.meta.get("data_dir"), **outcome}
            report["plots"] += [r["figure"] for r in outcome["results"].values() if isinstance(r, dict) and "figure" in r]
        report["plots"] += plot_comparison(report, scratch)
        report["paired"] = paired(report)
        report["paired_images"] = paired(report, "images")
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
    run_cli(main)
