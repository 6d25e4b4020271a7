"""Stage 9: watch the deployed model, and turn what users say into the next model's data.

    python monitor.py report --db out/serve/interactions.db     # windows of traffic: a table, plots, drift per window
    python monitor.py check  --db out/serve/interactions.db     # the latest window against the first: JSON + exit code
    python monitor.py export --db out/serve/interactions.db     # feedback -> SFT JSONL, preference pairs, a corpus
    python monitor.py retrain --db out/serve/interactions.db    # on an alarm: train a candidate, gate it, promote it
    python monitor.py simulate --url http://127.0.0.1:8000      # drifting traffic (chat -> code, ratings fall)

--db is the interaction log serve.py writes: an SQLite file, or a postgresql:// URL.

What each command does, top to bottom:
- report: reads every request, cuts them into windows (--window_requests, or --window_seconds),
  summarises each (traffic, latency, token counts, thumbs down share) and compares each with the
  reference (the first --reference_requests requests, default the first window) using the drift
  checks of nanofm/monitoring.py. Writes report.md, report.json and report.png to --out_dir.
- check: the same comparison for one window (the latest --window_requests requests, or those of
  the last --window_seconds), for schedulers: the status as JSON on stdout (and in --out), exit
  status 0 when nothing drifted, 2 when a group alarmed, 1 on an error (a cron job, an Airflow
  sensor or a Kubernetes CronJob reads it). --reference_data=data/default compares the prompts
  with the training data instead (input checks only). --ckpt adds the serving model's perplexity
  of the replies.
- export: highly rated replies (thumbs up, or 4-5 stars) become SFT conversations (sft.jsonl, for
  train_sft.py --data), an up and a down reply to the same prompt become a preference pair
  (pairs.jsonl, for train_rlhf.py --data), and every prompt becomes a document of a corpus that
  data/prepare.py curates and PII-masks like any other (corpus/ -> data/feedback).

- retrain: when a trigger fires (a drift or quality alarm, a schedule, or --trigger=force) and
  the cooldown has passed, exports the feedback, trains a candidate with the stage that fits
  (continued pretraining on the prompts after input drift, followed for a chat model by a short
  SFT that brings its chat format back; else DPO on preference pairs when there are enough; else
  SFT on the good replies), evaluates the candidate and the serving model
  with the evaluation library (--gate_task, --gate_metric: every named number must hold), and
  promotes the candidate only if it is at least as good (+ --gate_margin): it becomes the serving run directory's newest checkpoint
  (a server started with --watch reloads it; --serve_url asks one to reload at once). Every
  decision, with its reason and numbers, is a line of decisions.jsonl. A failed, rejected or
  interrupted retrain leaves the serving model as it was. --every_seconds keeps it running.
- simulate: drifting traffic for a running server (prompts move from one domain to another,
  simulated thumbs-down become more frequent), to watch all of the above happen.

Design decisions:
- The thresholds are Evidently's defaults and every one is a flag (nanofm/monitoring.py's
  DriftConfig). The status is one JSON document a program can read.
- Files are written whole or not at all (atomic writes), so a scheduler never reads half a report.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm.common import ConfigError, NanofmError, atomic_write_bytes, atomic_write_text, run_cli  # noqa: E402
from nanofm.config import closest, parse_config  # noqa: E402
from nanofm.interactions import InteractionLog, is_url  # noqa: E402
from nanofm.monitoring import (DriftConfig, MonitorError, check_drift, finite, is_down, is_good,  # noqa: E402
                               latest_window, prompt_text, reference_and_current, reply_text, split_windows,
                               summarize)


@dataclass
class LogConfig:
    db: str = "out/serve/interactions.db"  # the interaction log: an SQLite file or a postgresql:// URL


@dataclass
class ReportConfig(DriftConfig, LogConfig):
    out_dir: str = "out/monitor"  # report.md, report.json, report.png
    window_requests: int = 100  # requests per window (0: use --window_seconds)
    window_seconds: float = 0.0  # seconds per window, when --window_requests is 0
    reference_requests: int = 0  # the reference: the first N requests; 0 = the first window


@dataclass
class CheckConfig(DriftConfig, LogConfig):
    window_requests: int = 100  # the current window: the latest N requests...
    window_seconds: float = 0.0  # ...or, when > 0, the requests of the last N seconds
    reference_requests: int = 100  # the reference: the first N requests of the log
    reference_data: str = ""  # or a data directory (its curated.jsonl): compare prompts with the training data
    ckpt: str = ""  # the serving checkpoint: adds the perplexity of the replies under it
    eval_tasks: list[str] = field(default_factory=list)  # with --ckpt: re-run these evaluation tasks (e.g. instructions, fairness)...
    eval_baseline: str = "out/monitor/eval_baseline.json"  # ...against the numbers kept here (the first run records them)
    eval_drop: float = 0.05  # a headline number worse than its baseline by more than this is a quality alarm
    eval_items: int = 40  # items per task for the re-run
    out: str = ""  # also write the status JSON here


@dataclass
class ExportConfig(LogConfig):
    out_dir: str = "out/feedback"  # sft.jsonl, pairs.jsonl, corpus/
    since: float = 0.0  # only requests after this unix time
    min_stars: int = 4  # a stars rating at least this good counts as good (a thumbs up always does)
    prepare: bool = False  # also run data/prepare.py on the corpus (curation, PII masking) into --data_out
    data_out: str = "data/feedback"  # where --prepare writes the curated corpus
    ckpt: str = "out/sft"  # --prepare encodes with this checkpoint's tokenizer, so the model can train on it
    val_fraction: float = 0.1  # --prepare's validation share (feedback corpora are small: enough for one step)


class ExitCode(Exception):
    """A command's verdict for schedulers (not an error)."""


def open_log(db: str) -> InteractionLog:
    if not is_url(db) and not Path(db).is_file():
        raise ConfigError(f"no interaction log at {db}: give --db the file serve.py writes (--log), or a postgresql:// URL")
    return InteractionLog(db)


def read_rows(db: str, since: float = 0.0) -> list[dict]:
    log = open_log(db)
    try:
        rows = log.requests(since=since)
    finally:
        log.close()
    if not rows:
        raise MonitorError(f"the interaction log {db} has no requests{' since ' + str(since) if since else ''}")
    return rows


def drift_config(cfg) -> DriftConfig:
    return DriftConfig(**{f.name: getattr(cfg, f.name) for f in fields(DriftConfig)})


# ------------------------------------------------------------------ report

def report(argv) -> dict:
    cfg = parse_config(ReportConfig, argv, description="windows of traffic: a table, plots, drift per window")
    rows = read_rows(cfg.db)
    windows = split_windows(rows, cfg.window_requests, cfg.window_seconds)
    reference = rows[:cfg.reference_requests] if cfg.reference_requests else windows[0]
    entries = []
    for number, window in enumerate(windows):
        entry = {"window": number, **summarize(window)}
        if window is reference or (cfg.reference_requests and window[-1]["created"] <= reference[-1]["created"]):
            entry["drift"] = "reference"
        else:
            try:
                entry["drift"] = check_drift(reference, window, drift_config(cfg))
            except MonitorError as exc:  # a short last window: reported, not compared
                entry["drift"] = f"not compared: {exc}"
        entries.append(entry)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"db": InteractionLog.describe_target(cfg.db), "requests": len(rows), "windows": entries,
              "config": asdict(cfg)}
    atomic_write_text(out / "report.json", json.dumps(result, indent=1, default=finite))
    atomic_write_text(out / "report.md", markdown(result))
    atomic_write_bytes(out / "report.png", plot(entries))
    first_alarm = next((e for e in entries if isinstance(e["drift"], dict) and e["drift"]["drift"]), None)
    print(markdown_table(entries))
    print(f"first alarm: window {first_alarm['window']}" if first_alarm else "no alarm")
    print(f"wrote {out}/report.md, report.json and report.png")
    return result


def check_value(entry: dict, name: str):
    status = entry["drift"]
    if not isinstance(status, dict):
        return None
    return next((c["value"] for c in status["checks"] if c["check"] == name), None)


def markdown_table(entries: list[dict]) -> str:
    header = ("window", "requests", "latency p50 / p95 ms", "prompt / reply tokens", "down share", "end of turn",
              "words JS", "domain AUC", "alarms")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        status = e["drift"]
        alarms = ("reference" if status == "reference" else status if isinstance(status, str)
                  else ", ".join(g for g, v in status["groups"].items() if v["alarm"]) or "none")

        def fmt(x, spec):
            return "" if x is None else format(x, spec)
        lines.append("| " + " | ".join([
            str(e["window"]), str(e["requests"]),
            f"{fmt(e.get('latency_p50_ms'), '.0f')} / {fmt(e.get('latency_p95_ms'), '.0f')}",
            f"{fmt(e.get('prompt_tokens_mean'), '.1f')} / {fmt(e.get('completion_tokens_mean'), '.1f')}",
            fmt(e.get("down_share"), ".2f"), fmt(e.get("end_of_turn_rate"), ".2f"),
            fmt(check_value(e, "prompt_words"), ".3f"), fmt(check_value(e, "domain_classifier"), ".3f"),
            alarms.split(":")[0]]) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    entries = result["windows"]
    lines = [f"# Monitoring report: {result['db']}", "",
             f"{result['requests']} requests in {len(entries)} windows; window 0 (or the first "
             f"{result['config']['reference_requests']} requests) is the reference. Alarms: a group drifts when at least "
             f"half of its checks (and at least {result['config']['min_drifted']}) do; quality when the thumbs-down "
             f"share rises by {result['config']['rating_drop']} and significantly.", "", markdown_table(entries), "",
             "![report](report.png)", ""]
    for e in entries:
        if isinstance(e["drift"], dict) and e["drift"]["drift"]:
            drifted = [f"{c['check']} ({c['method']} {c['value']:.3f})" for c in e["drift"]["checks"] if c["drifted"]]
            lines.append(f"- window {e['window']}: drifted: {', '.join(drifted)}")
    return "\n".join(lines) + "\n"


def plot(entries: list[dict]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["window"] for e in entries]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].plot(x, [e.get("latency_p50_ms") for e in entries], "o-", label="p50")
    axes[0, 0].plot(x, [e.get("latency_p95_ms") for e in entries], "o-", label="p95")
    axes[0, 0].set(title="latency (ms)", xlabel="window")
    axes[0, 1].plot(x, [e.get("prompt_tokens_mean") for e in entries], "o-", label="prompt")
    axes[0, 1].plot(x, [e.get("completion_tokens_mean") for e in entries], "o-", label="reply")
    axes[0, 1].set(title="tokens per request (mean)", xlabel="window")
    axes[1, 0].plot(x, [e.get("down_share") for e in entries], "o-", label="thumbs down share")
    axes[1, 0].plot(x, [e.get("end_of_turn_rate") for e in entries], "o-", label="end of turn")
    axes[1, 0].set(title="quality and output", xlabel="window", ylim=(0, 1))
    for name, label in [("prompt_words", "words JS"), ("domain_classifier", "domain AUC")]:
        axes[1, 1].plot(x, [check_value(e, name) for e in entries], "o-", label=label)
    axes[1, 1].axhline(0.1, color="gray", linestyle=":", linewidth=1, label="JS threshold 0.1")
    axes[1, 1].axhline(0.55, color="gray", linestyle="--", linewidth=1, label="AUC threshold 0.55")
    alarms = [e["window"] for e in entries if isinstance(e["drift"], dict) and e["drift"]["drift"]]
    for ax in axes.flat:
        for w in alarms:
            ax.axvspan(w - 0.4, w + 0.4, color="red", alpha=0.12)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[1, 1].set(title="input drift (red: an alarm)", xlabel="window", ylim=(0, 1.05))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------ check

def reference_from_data(data_dir: str, n: int, seed: int = 0) -> list[dict]:
    """Prompt-like snippets of the training documents (a few lines each), as rows with no reply."""
    import random
    path = Path(data_dir) / "curated.jsonl"
    if not path.is_file():
        raise ConfigError(f"--reference_data {data_dir} has no curated.jsonl (a directory written by data/prepare.py)")
    docs = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    rng, rows = random.Random(seed), []
    for i in range(n):
        lines = [line for line in rng.choice(docs).splitlines() if line.strip()] or [""]
        start = rng.randrange(len(lines))
        text = " ".join(lines[start:start + 3])[:300]
        rows.append({"id": f"data-{i}", "created": 0.0, "prompt": text, "output": [], "prompt_tokens": None,
                     "completion_tokens": None, "finish_reason": None, "latency_ms": None, "rating": None,
                     "rating_scale": None})
    return rows


def reply_perplexity(ckpt: str):
    """perplexity(rows) -> the serving model's perplexity of each reply given its prompt."""
    from nanofm import chat
    from nanofm.checkpoint import load_for_inference
    from nanofm.engine import Engine
    model, meta, tokenizer = load_for_inference(ckpt)
    engine = Engine(model, tokenizer)

    def perplexity(rows: list[dict]) -> list[float]:
        contexts, continuations = [], []
        for row in rows:
            prompt = row["prompt"]
            context = (chat.render_prompt(tokenizer, prompt) if isinstance(prompt, list)
                       else tokenizer.encode(prompt, bos=True))
            reply = tokenizer.encode(reply_text(row)) or [tokenizer.eos_id]
            room = model.cfg.block_size - 1
            contexts.append(context[-max(1, room - len(reply[:room - 1])):])
            continuations.append(reply[:room - 1])
        scores = engine.logprobs(contexts, continuations)
        return [math.exp(-total / max(1, n)) for total, n in scores]
    return perplexity


def periodic_eval(cfg: CheckConfig) -> dict | None:
    """Re-run the evaluation tasks on the serving model; the first run records the baseline."""
    from nanofm.evaluate import Settings, Subject, headline, run_tasks
    from nanofm.monitoring import eval_regression
    if not cfg.ckpt:
        raise ConfigError("--eval_tasks evaluates the serving model: give it with --ckpt")
    out = run_tasks(Subject.load(cfg.ckpt), list(cfg.eval_tasks), Settings(max_items=cfg.eval_items))
    numbers = {f"{task}.{key}": value for task in cfg.eval_tasks
               for key, value in headline(task, out["results"][task]).items() if isinstance(value, (int, float))}
    path = Path(cfg.eval_baseline)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"ckpt": cfg.ckpt, "recorded_at": time.time(), "numbers": numbers}, indent=1))
        print(f"recorded the evaluation baseline in {path} ({len(numbers)} numbers)", file=sys.stderr)
        return None
    baseline = json.loads(path.read_text())["numbers"]
    return eval_regression(baseline, numbers, cfg.eval_drop)


def check(argv) -> dict:
    cfg = parse_config(CheckConfig, argv, description="the latest window against a reference: JSON and exit code")
    rows = read_rows(cfg.db)
    if cfg.reference_data:
        current = latest_window(rows, cfg.window_requests, cfg.window_seconds)
        reference = reference_from_data(cfg.reference_data, max(cfg.min_rows, cfg.reference_requests))
    else:
        reference, current = reference_and_current(rows, cfg.reference_requests, cfg.window_requests,
                                                   cfg.window_seconds)
    extra = [periodic_eval(cfg)] if cfg.eval_tasks else []
    status = check_drift(reference, current, drift_config(cfg), reply_perplexity(cfg.ckpt) if cfg.ckpt else None,
                         [e for e in extra if e is not None])
    status = {"checked_at": time.time(), "db": InteractionLog.describe_target(cfg.db), **status}
    text = json.dumps(status, indent=1, default=finite)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.out, text + "\n")
    print(text)
    if status["drift"]:
        raise ExitCode(2)
    return status


# ------------------------------------------------------------------ export

def messages_of(row: dict) -> list[dict]:
    prompt = row["prompt"]
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def has_image(row: dict) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
               for m in messages_of(row))


def export(argv) -> dict:
    cfg = parse_config(ExportConfig, argv, description="feedback -> SFT JSONL, preference pairs, a corpus")
    rows = read_rows(cfg.db, cfg.since)
    # the log keeps an image as its hash, not its pixels: such a chat cannot become training data
    with_images = [r for r in rows if has_image(r)]
    rows = [r for r in rows if not has_image(r)]
    good = [r for r in rows if is_good(r, cfg.min_stars) and reply_text(r).strip()]
    bad = [r for r in rows if is_down(r) and reply_text(r).strip()]
    sft = [{"messages": messages_of(r) + [{"role": "assistant", "content": reply_text(r)}]} for r in good]
    # a pair: the same prompt, one reply rated good and one rated bad (each good reply used once)
    by_prompt: dict[str, list[dict]] = {}
    for r in good:
        by_prompt.setdefault(json.dumps(messages_of(r), sort_keys=True), []).append(r)
    pairs = []
    for r in bad:
        candidates = by_prompt.get(json.dumps(messages_of(r), sort_keys=True)) or []
        chosen = next((c for c in candidates if reply_text(c) != reply_text(r)), None)
        if chosen is not None:
            pairs.append({"prompt": messages_of(r), "chosen": reply_text(chosen), "rejected": reply_text(r)})
    prompts = {prompt_text(r).strip() for r in rows} - {""}
    corpus = [{"id": f"feedback/{i}", "text": text, "source": "feedback", "domain": "chat"}
              for i, text in enumerate(sorted(prompts))]
    out = Path(cfg.out_dir)
    (out / "corpus").mkdir(parents=True, exist_ok=True)

    def jsonl(items):
        return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    atomic_write_text(out / "sft.jsonl", jsonl(sft))
    atomic_write_text(out / "pairs.jsonl", jsonl(pairs))
    atomic_write_text(out / "corpus" / "prompts.jsonl", jsonl(corpus))
    counts = {"requests": len(rows), "sft": len(sft), "pairs": len(pairs), "corpus_documents": len(corpus),
              "skipped_with_images": len(with_images)}
    if with_images:
        print(f"note: {len(with_images)} chats with images are left out (the log keeps image hashes, not pixels)")
    print(f"{len(rows)} requests -> {out}/sft.jsonl ({len(sft)} conversations rated good), {out}/pairs.jsonl "
          f"({len(pairs)} preference pairs), {out}/corpus/prompts.jsonl ({len(corpus)} distinct prompts)")
    if not sft:
        print("note: no reply is rated good yet, so sft.jsonl is empty (train_sft.py refuses an empty file)")
    if cfg.prepare:
        prepare_corpus(out / "corpus", cfg.data_out, cfg.ckpt, cfg.val_fraction)
    return counts


def prepare_corpus(corpus: Path, data_out: str | Path, ckpt: str | Path, val_fraction: float) -> None:
    """data/prepare.py on an exported corpus: curated and PII-masked like every other corpus, and
    encoded with the checkpoint's tokenizer, so that model can train on it."""
    from nanofm.checkpoint import resolve
    command = [sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(corpus), "--out", str(data_out),
               "--tokenizer", str(resolve(ckpt) / "tokenizer.json"), "--progress=false", f"--val_fraction={val_fraction}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise MonitorError(f"data/prepare.py failed on {corpus}:\n{done.stderr[-2000:]}")
    print(f"curated the corpus into {data_out}")


# ------------------------------------------------------------------ retrain

@dataclass
class RetrainConfig(DriftConfig, LogConfig):
    serving: str = "out/sft"  # the run directory the server serves (serve.py --ckpt out/sft --watch picks up a promotion)
    serve_url: str = ""  # also ask this running server to reload at once (POST /admin/reload)
    api_key: str = ""  # the server's API key, if it has one
    trigger: str = "auto"  # auto (a drift or quality alarm, as `check` sees it) | schedule (always) | force (also ignores the cooldown)
    stage: str = "auto"  # auto | sft (good replies) | dpo (preference pairs) | pretrain (continued pretraining on the prompts)
    cooldown_seconds: float = 3600.0  # no new retrain this soon after the last one
    every_seconds: float = 0.0  # > 0: keep going, one decision every N seconds (the scheduled mode)
    window_requests: int = 100  # as in `check`: the latest N requests...
    reference_requests: int = 100  # ...against the first N
    min_examples: int = 20  # feedback examples a stage needs (good replies for sft, pairs for dpo)
    max_iters: int = 200  # the candidate's training steps
    train_flags: list[str] = field(default_factory=list)  # extra flags for the candidate's training script, repeatable (--train_flags=--lr=1e-4)
    pretrain_flags: list[str] = field(default_factory=list)  # extra flags for the continued-pretraining step (stage pretrain)
    gate_task: str = "instructions"  # the evaluation task (nanofm/evaluate.py) both models take
    gate_metric: list[str] = field(default_factory=lambda: ["mean_exact_match", "chat_bleu"])  # its numbers that must not fall (headline numbers of that task), repeatable
    gate_margin: float = 0.0  # the candidate must score at least the serving model's number + this, on every metric
    gate_items: int = 40  # items per family for the gate's evaluation
    out_dir: str = "out/retrain"  # candidates, their feedback data, and decisions.jsonl


def decide(cfg: RetrainConfig, log_path: Path, decision: dict) -> dict:
    decision = {"time": time.time(), **decision}
    with open(log_path, "a", encoding="utf-8") as handle:  # one line per decision, appended whole
        handle.write(json.dumps(decision, default=finite) + "\n")
    print(f"retrain: {decision['action']}: {decision['reason']}")
    return decision


def past_decisions(log_path: Path) -> list[dict]:
    from nanofm.train import read_metrics  # the same tolerant JSONL reader (a line cut short is skipped)
    return read_metrics(log_path) if log_path.is_file() else []


def gate_scores(ckpt: str, cfg: RetrainConfig, data_dir: str) -> dict[str, float]:
    """The gate's number for one model. Both models take the same items: the built-in tasks are
    drawn from `data_dir` (the serving model's), never from each model's own data_dir, which for a
    candidate may be the small feedback corpus (fewer families: a different, easier test)."""
    from nanofm.evaluate import Settings, Subject, headline, run_tasks
    out = run_tasks(Subject.load(ckpt), [cfg.gate_task], Settings(max_items=cfg.gate_items, data_dir=data_dir))
    numbers = headline(cfg.gate_task, out["results"][cfg.gate_task])
    missing = [m for m in cfg.gate_metric if m not in numbers]
    if missing:
        raise ConfigError(f"--gate_metric {missing} not among the numbers of {cfg.gate_task}: {sorted(numbers)}")
    return {m: float(numbers[m]) for m in cfg.gate_metric}


def promote(candidate: Path, serving: Path) -> Path:
    """Copy the candidate into the serving run directory as its newest checkpoint, then point
    `latest` at it (atomic: a watching server sees the old model or the whole new one)."""
    import shutil
    from nanofm.checkpoint import complete_checkpoints
    steps = [int(p.name.split("_")[-1]) for p in complete_checkpoints(serving)]
    final = serving / f"ckpt_{max(steps, default=0) + 1:07d}"
    tmp = serving / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(candidate, tmp)
    tmp.rename(final)
    atomic_write_text(serving / "latest", final.name)
    return final


def retrain_once(cfg: RetrainConfig) -> dict:
    from nanofm.checkpoint import read_meta, resolve
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "decisions.jsonl"
    trained = [d for d in past_decisions(log_path) if d.get("action") in ("promoted", "rejected", "failed")]
    if trained and cfg.trigger != "force" and time.time() - trained[-1]["time"] < cfg.cooldown_seconds:
        return decide(cfg, log_path, {"action": "skipped", "reason": f"cooldown: the last retrain was "
                                      f"{time.time() - trained[-1]['time']:.0f} s ago (--cooldown_seconds "
                                      f"{cfg.cooldown_seconds:.0f})"})
    serving = resolve(cfg.serving)
    alarms: dict = {}
    if cfg.trigger == "auto":
        try:
            reference, current = reference_and_current(read_rows(cfg.db), cfg.reference_requests, cfg.window_requests)
        except MonitorError as exc:
            return decide(cfg, log_path, {"action": "skipped", "reason": str(exc)})
        status = check_drift(reference, current, drift_config(cfg))
        alarms = {g: v for g, v in status["groups"].items() if v["alarm"]}
        if not alarms:
            return decide(cfg, log_path, {"action": "skipped", "reason": "no drift or quality alarm",
                                          "groups": status["groups"]})
        reason = f"alarm in {', '.join(alarms)}"
    else:
        reason = "scheduled" if cfg.trigger == "schedule" else "forced"
    run = out / time.strftime("%Y%m%d-%H%M%S")
    feedback = run / "feedback"
    counts = export(["--db", cfg.db, "--out_dir", str(feedback)])
    stage = cfg.stage
    if stage == "auto":  # input drift: learn the new text; else the feedback that is richest
        if "input" in alarms:
            stage = "pretrain"
        elif counts["pairs"] >= cfg.min_examples:
            stage = "dpo"
        else:
            stage = "sft"
    have = {"sft": counts["sft"], "dpo": counts["pairs"], "pretrain": counts["corpus_documents"]}[stage]
    if have < cfg.min_examples:
        return decide(cfg, log_path, {"action": "skipped", "stage": stage, "reason": f"{reason}, but not enough "
                                      f"feedback for {stage}: {have} examples, --min_examples {cfg.min_examples}",
                                      "feedback": counts})
    candidate_dir = run / "candidate"
    meta = read_meta(serving)
    data_dir = meta.get("data_dir") or ""  # the built-in tasks' corpus
    if stage == "pretrain":
        try:  # the corpus the export above wrote
            prepare_corpus(feedback / "corpus", run / "data", serving, ExportConfig.val_fraction)
        except MonitorError as exc:  # e.g. curation kept no document
            return decide(cfg, log_path, {"action": "failed", "stage": stage, "trigger": reason, "feedback": counts,
                                          "reason": f"preparing the corpus failed; serving model kept: {exc}"})
        replay = data_dir
        if not (replay and list(Path(replay).glob("train_*.bin")) and (Path(replay) / "tokenizer.json").is_file()):
            replay = ""  # no shards of the old data at hand: nothing to replay
        adapted = run / "adapted" if meta.get("chat_format") else candidate_dir
        steps = [["train_pretrain.py", "--init_from", str(serving), "--data_dir", str(run / "data"),
                  *(["--replay_dir", replay, "--replay_ratio=0.5"] if replay else []), "--out_dir", str(adapted),
                  f"--max_iters={cfg.max_iters}", *cfg.pretrain_flags]]
        if meta.get("chat_format"):  # plain text makes a chat model forget its format: SFT brings it back
            steps.append(["train_sft.py", "--init_from", str(adapted), "--per_family=200", "--per_synthetic=400",
                          *(["--data_dir", data_dir] if data_dir else []),  # the built-in questions of the old corpus
                          *(["--data", str(feedback / "sft.jsonl")] if counts["sft"] else []),
                          "--out_dir", str(candidate_dir), f"--max_iters={cfg.max_iters}", *cfg.train_flags])
    elif stage == "sft":
        steps = [["train_sft.py", "--init_from", str(serving), "--data", str(feedback / "sft.jsonl"),
                  "--per_family=200", "--per_synthetic=400",  # some built-in questions as replay
                  "--out_dir", str(candidate_dir), f"--max_iters={cfg.max_iters}", *cfg.train_flags]]
    else:
        steps = [["train_rlhf.py", "--algo=dpo", "--init_from", str(serving), "--data", str(feedback / "pairs.jsonl"),
                  "--out_dir", str(candidate_dir), f"--max_iters={cfg.max_iters}", *cfg.train_flags]]
    base = {"stage": stage, "trigger": reason, "serving": str(serving), "feedback": counts, "commands": steps}
    before = gate_scores(str(serving), cfg, data_dir)  # first: a --gate_metric that does not exist fails before training
    print(f"retrain: {reason}; training a {stage} candidate in {candidate_dir}")
    for step in steps:
        try:
            done = subprocess.run([sys.executable, str(ROOT / step[0]), *step[1:]], capture_output=True, text=True)
        except KeyboardInterrupt:
            decide(cfg, log_path, {**base, "action": "failed", "reason": "interrupted during training; serving model kept"})
            raise
        if done.returncode != 0:
            return decide(cfg, log_path, {**base, "action": "failed", "reason": f"training failed ({step[0]}, exit "
                                          f"{done.returncode}); serving model kept: {done.stderr.strip()[-600:]}"})
    candidate = resolve(candidate_dir)
    after = gate_scores(str(candidate), cfg, data_dir)
    gate = {"task": cfg.gate_task, "margin": cfg.gate_margin, "data_dir": data_dir,
            "metrics": {m: {"serving": before[m], "candidate": after[m]} for m in cfg.gate_metric}}
    verdicts = [f"{m} {after[m]:.4f} {'>=' if after[m] >= before[m] + cfg.gate_margin else '<'} serving {before[m]:.4f}"
                for m in cfg.gate_metric]
    if any(after[m] < before[m] + cfg.gate_margin for m in cfg.gate_metric):
        return decide(cfg, log_path, {**base, "action": "rejected", "candidate": str(candidate), "gate": gate,
                                      "reason": f"gate failed (margin {cfg.gate_margin}): {'; '.join(verdicts)}; "
                                                f"serving model kept"})
    promoted = promote(candidate, Path(cfg.serving) if not (Path(cfg.serving) / "model.pt").exists() else serving.parent)
    reloaded = None
    if cfg.serve_url:
        import urllib.request
        request = urllib.request.Request(cfg.serve_url + "/admin/reload", data=json.dumps({"ckpt": str(promoted)}).encode(),
                                         headers={"content-type": "application/json",
                                                  **({"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                reloaded = response.status == 200
        except OSError as exc:
            reloaded = f"the reload request failed ({exc}); a server started with --watch picks it up anyway"
    return decide(cfg, log_path, {**base, "action": "promoted", "candidate": str(candidate), "promoted": str(promoted),
                                  "gate": gate, "reloaded": reloaded,
                                  "reason": f"gate passed (margin {cfg.gate_margin}): {'; '.join(verdicts)}"})


def retrain(argv) -> dict:
    cfg = parse_config(RetrainConfig, argv, description="retrain when a trigger fires, promote behind a gate")
    if cfg.trigger not in ("auto", "schedule", "force"):
        raise ConfigError(f"--trigger must be auto, schedule or force, not {cfg.trigger!r}")
    if cfg.stage not in ("auto", "sft", "dpo", "pretrain"):
        raise ConfigError(f"--stage must be auto, sft, dpo or pretrain, not {cfg.stage!r}")
    if cfg.every_seconds <= 0:
        return retrain_once(cfg)
    while True:  # the scheduled mode: a decision every --every_seconds (the cooldown still applies)
        try:
            retrain_once(cfg)
        except NanofmError as exc:  # a log that is down, too little traffic: reported, and the loop goes on
            print(f"retrain: error: {exc}", file=sys.stderr)
        time.sleep(cfg.every_seconds)


# ------------------------------------------------------------------ simulate

@dataclass
class SimulateConfig:
    url: str = "http://127.0.0.1:8000"  # a running serve.py
    model: str = ""  # the served model's name; "" = the one /v1/models lists
    api_key: str = ""  # if the server wants one
    data_dir: str = "data/default"  # prompts are drawn from its curated.jsonl, by domain
    requests: int = 400  # requests to send
    before: str = "chat"  # the prompts before the shift: chat | prose | code (corpus snippets) | tasks (checkable questions)
    after: str = "code"  # ...and after it
    shift_at: int = 200  # the request where traffic turns from --before to --after
    rate_share: float = 0.5  # the share of replies the simulated users rate
    down_before: float = 0.2  # the chance of a thumbs down before the shift...
    down_after: float = 0.5  # ...and after it (ratings fall); a `tasks` question is rated by its answer instead
    max_tokens: int = 32
    concurrency: int = 8  # requests in flight at once
    seed: int = 0


def task_prompts(data_dir: str, n: int = 2000, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) of the checkable instruction families (training split), for users who
    check the answer before they rate it."""
    from nanofm import instructions
    families = [f for f in instructions.FAMILIES if f != "chat"]
    items = instructions.builtin(data_dir, split="train", per_family=max(1, n // len(families)), seed=seed,
                                 families=families)
    return [(item["messages"][0]["content"], item["messages"][1]["content"]) for item in items]


def domain_prompts(data_dir: str, domain: str) -> list[str]:
    """Short prompts cut from the curated documents of one domain: a chat's user turns, or up to
    three lines of prose or code."""
    path = Path(data_dir) / "curated.jsonl"
    if not path.is_file():
        raise ConfigError(f"--data_dir {data_dir} has no curated.jsonl (a directory written by data/prepare.py)")
    prompts = []
    for line in path.open(encoding="utf-8"):
        doc = json.loads(line)
        if doc.get("domain") != domain:
            continue
        lines = [x.strip() for x in doc["text"].splitlines() if x.strip()]
        if domain == "chat":  # the user's turns of the conversation
            prompts += [x[len("User:"):].strip()[:240] for x in lines if x.startswith("User:") and len(x) > 15]
            continue
        for start in range(0, min(len(lines), 30), 3):
            text = " ".join(lines[start:start + 3])[:240]
            if len(text) > 10:
                prompts.append(text)
    if not prompts:
        raise ConfigError(f"{path} has no documents of the domain {domain!r} (chat, prose and code are built in)")
    return list(dict.fromkeys(prompts))  # each distinct prompt once, in the corpus' order


def simulate(argv) -> dict:
    """Send traffic that drifts to a running server: prompts move from one domain to another at
    --shift_at, and the simulated users' thumbs-down rate rises. A stand-in for real users: the
    ratings are random draws, except for `tasks` questions, which are rated by their answers."""
    cfg = parse_config(SimulateConfig, argv, description="drifting traffic to a running server")
    import random
    import threading
    import urllib.error
    import urllib.request
    def pool(domain):  # (prompt, answer or None)
        if domain == "tasks":
            return task_prompts(cfg.data_dir, seed=cfg.seed)
        return [(prompt, None) for prompt in domain_prompts(cfg.data_dir, domain)]
    pools = {"before": pool(cfg.before), "after": pool(cfg.after)}
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {})}

    def call(path, body=None):
        request = urllib.request.Request(cfg.url + path, data=json.dumps(body).encode() if body else None, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    try:
        model = cfg.model or call("/v1/models")["data"][0]["id"]
    except OSError as exc:
        raise ConfigError(f"no server answers at {cfg.url} ({exc}); start one: python serve.py") from None
    rng = random.Random(cfg.seed)
    plan = []  # drawn up front, so the traffic is the same whatever the timing
    for i in range(cfg.requests):
        phase = "after" if i >= cfg.shift_at else "before"
        prompt, answer = rng.choice(pools[phase])
        plan.append({"i": i, "prompt": prompt, "answer": answer, "rate": rng.random() < cfg.rate_share,
                     "down": rng.random() < (cfg.down_after if phase == "after" else cfg.down_before)})
    counts = {"sent": 0, "errors": 0, "rated": 0}
    first_error = []  # what went wrong, said once (a prompt longer than a small model's context, a dead server)
    lock, queue = threading.Lock(), list(reversed(plan))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop()
            try:
                answer = call("/v1/chat/completions", {"model": model, "max_tokens": cfg.max_tokens, "temperature": 0.8,
                                                       "seed": cfg.seed * 100_003 + item["i"],
                                                       "messages": [{"role": "user", "content": item["prompt"]}]})
                if item["rate"]:
                    down = item["down"]
                    if item["answer"] is not None:  # a user who knows the answer rates the reply by it
                        from nanofm.instructions import exact_match
                        down = not exact_match(answer["choices"][0]["message"]["content"], item["answer"])
                    call("/v1/feedback", {"request_id": answer["id"], "rating": "down" if down else "up"})
                with lock:
                    counts["sent"] += 1
                    counts["rated"] += item["rate"]
            except (OSError, urllib.error.HTTPError, KeyError, json.JSONDecodeError) as exc:
                detail = exc.read().decode("utf-8", "replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
                with lock:
                    counts["errors"] += 1
                    first_error[:] = first_error or [f"{exc} {detail}".strip()]
    from tqdm import tqdm
    threads = [threading.Thread(target=worker) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    with tqdm(total=cfg.requests, desc="simulate") as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            bar.n = counts["sent"] + counts["errors"]
            bar.refresh()
    print(f"{counts['sent']} requests sent ({cfg.before} -> {cfg.after} at {cfg.shift_at}), {counts['rated']} rated, "
          f"{counts['errors']} errors" + (f" (the first: {first_error[0]})" if first_error else ""))
    return counts


COMMANDS = {"report": report, "check": check, "export": export, "retrain": retrain, "simulate": simulate}


USAGE = f"usage: python monitor.py {{{'|'.join(COMMANDS)}}} [--flags]   (python monitor.py COMMAND --help: its flags)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):  # the commands, what each does, and how to ask for its flags
        print(USAGE + "\n\n" + __doc__.split("Design decisions:")[0].strip())
        return None
    if not argv or argv[0] not in COMMANDS:
        unknown = f"unknown command {argv[0]!r}{closest(argv[0], list(COMMANDS), prefix='')}. " if argv else ""
        raise ConfigError(unknown + USAGE)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    try:
        run_cli(main)
    except ExitCode as verdict:
        sys.exit(int(str(verdict)))
