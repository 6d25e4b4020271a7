"""The whole lifecycle in one command: every stage in order, then one table of what each moved.

    python lifecycle.py                          # each stage at its CPU default (about 30 min on 2 cores) -> runs/cpu/
    python lifecycle.py --scale=smoke            # every stage at toy size, a few minutes (the tests run it)
    python lifecycle.py --scale=speedrun         # a GPU box: web data from the hub, a GPT-2-size model, torchrun
    python lifecycle.py --scale=speedrun --tiny  # the speedrun's own commands at toy size, on any machine
    python lifecycle.py --dry_run                # print the commands (and the speedrun's time and cost), run nothing
    python lifecycle.py --until=sft              # stop after a stage; run again to go on from there

The stages, each a command a user could type (every one is printed before it runs):
    prepare   data/prepare.py: collect, curate, train the tokenizer, write shards
    pretrain  train_pretrain.py: a causal LM on those shards
    continue  continued pretraining on one domain (code) with a quarter of each batch replayed from
              the old data: the new domain's loss falls, the old one's barely rises. A side branch:
              fine-tuning starts from the base, as the README's stage tables measure it
    sft       train_sft.py: chat SFT on the built-in task families (and tone demonstrations)
    dpo       train_rlhf.py --algo=dpo: preference pairs, tone and safety pairs included
    grpo      train_rlhf.py --algo=grpo: sampled answers scored against the checkable answers
    vision    train_vision.py: digit classifiers with a CNN stem and a ViT stem, and eval.py pairing them
    vlm       train_vision.py --task=chat: the SFT model learns to read images ("what digit is this?")
    eval      eval.py: every chat model on the same held-out questions, with paired differences
    serve     serve.py on a copy of the DPO model, then monitor.py simulate: checkable questions whose
              users rate each reply by its answer, turning to code snippets half-way
    monitor   monitor.py report and check: windows of traffic and the drift alarm
    retrain   monitor.py retrain: on the alarm, a candidate trained behind the gate (promoted or not)
    chat      a few questions to the served model, through the API

Writes into --out (runs/<scale>): every stage's own directory, lifecycle.json (the finished
stages, their commands, minutes and numbers) and report.md (the table, the chat, the plots).
Interrupted, it goes on from the stage it stopped in (a stage cut off half-way starts again);
a stage whose commands changed (other flags) runs again, and so does every stage after it.

Design decisions:
- Each stage is a subprocess running the same script a user runs, so the lifecycle is the README
  in order, and the speedrun's torchrun commands are the ones a GPU box runs. No second code path.
- The scales are lists of flags on the same stages: `cpu` is each script's default, `smoke` the
  smallest settings at which every stage still works, `speedrun` the GPU sizes.
- Numbers come from what each stage already writes (metrics.jsonl, report.json), first evaluation
  against last; nothing is re-measured here.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm.common import ConfigError, NanofmError, atomic_write_text, run_cli  # noqa: E402
from nanofm.config import parse_config  # noqa: E402

SCALES = ("cpu", "smoke", "speedrun")


@dataclass
class LifecycleConfig:
    """Run every stage of the lifecycle in order, resumable, and report what each one moved."""
    scale: str = "cpu"  # cpu (each stage's CPU default) | smoke (toy sizes, minutes) | speedrun (a GPU box)
    out: str = ""  # the run's directory; "" = runs/<scale> (runs/speedrun-tiny with --tiny)
    until: str = ""  # stop after this stage ("" = run them all)
    tiny: bool = False  # speedrun: the same commands at toy sizes (on a CPU: 2 gloo processes)
    gpus: int = 0  # speedrun: processes per torchrun; 0 = every GPU here (2 with --tiny on a CPU)
    gpu: str = "H100"  # speedrun: the card, for the time and cost estimate (nanofm/sizing.py)
    mfu: float = 0.4  # speedrun: model FLOP utilisation assumed by the estimate
    usd_per_gpu_hour: float = 3.0  # speedrun: the price assumed by the estimate
    hub_data: str = "hf:HuggingFaceFW/fineweb-edu:train"  # speedrun: the pretraining data (streamed)
    hub_max_docs: int = 4_000_000  # speedrun: documents streamed (about 4 B tokens before curation)
    port: int = 0  # the server's port; 0 = a free one
    dry_run: bool = False  # print each stage's commands (and the speedrun's estimate), run nothing
    force: bool = False  # run every stage again, finished or not

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.tiny and self.scale != "speedrun":
            raise ConfigError("--tiny is the speedrun's toy size; for the other scales use --scale=smoke")
        if self.until and self.until not in STAGE_NAMES:
            raise ConfigError(f"--until must be one of {', '.join(STAGE_NAMES)}, got {self.until!r}")
        if self.gpus < 0 or not 0 < self.mfu <= 1 or self.usd_per_gpu_hour < 0:
            raise ConfigError("--gpus must be >= 0, --mfu in (0, 1], --usd_per_gpu_hour >= 0")


STAGE_NAMES = ("prepare", "pretrain", "continue", "sft", "dpo", "grpo", "vision", "vlm", "eval", "serve", "monitor", "retrain",
               "chat")


class LifecycleError(NanofmError):
    pass


# ------------------------------------------------------------------ the flags of each scale

# smoke: the smallest sizes at which each stage still does its job (every loss falls); about 2 minutes on 2 cores
SMOKE_MODEL = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=64", "--block_size=128"]
SMOKE = {
    "prepare": ["--vocab_size=1024"],
    "pretrain": [*SMOKE_MODEL, "--max_iters=150", "--batch_size=16", "--eval_interval=150", "--eval_iters=4",
                 "--sample_tokens=0", "--warmup_iters=10"],
    "continue": ["--max_iters=30", "--batch_size=16", "--eval_interval=30", "--eval_iters=4", "--warmup_iters=5"],
    "sft": ["--max_iters=120", "--per_family=40", "--per_synthetic=40", "--safety_demos=1", "--batch_size=16",
            "--seq_len=128", "--val_per_family=2", "--eval_interval=120", "--eval_iters=2", "--sample_tokens=0"],
    "dpo": ["--max_iters=20", "--per_family=10", "--safety_repeat=1", "--val_pairs=3", "--batch_size=8",
            "--seq_len=128", "--eval_interval=20", "--eval_iters=2"],
    # two families the toy SFT model sometimes gets right when sampling: elsewhere every group's rewards are 0
    "grpo": ["--max_iters=16", "--per_family=20", "--val_pairs=3", "--eval_interval=16", "--max_new_tokens=8",
             "--families=domain", "--families=count"],
    # the default classifier, fewer steps (smaller ones stay near chance in 100 steps); the toy chat
    # model keeps the stem frozen (trained at its learning rate, a small model wrecks it: README, images)
    "vision": ["--max_iters=200", "--eval_interval=200"],
    "vlm": ["--max_iters=60", "--eval_interval=60", "--data=digits", "--text_ratio=0.1", "--batch_size=16",
            "--eval_questions=40", "--seq_len=128", "--sample_tokens=0", "--freeze_stem"],
    "eval": ["--max_items=10"],
    "simulate": ["--requests=60", "--shift_at=30", "--max_tokens=8"],
    "report": ["--window_requests=20"],
    "check": ["--window_requests=20", "--reference_requests=20"],
    "retrain": ["--window_requests=20", "--reference_requests=20", "--max_iters=20", "--pretrain_flags=--max_iters=20",
                "--train_flags=--batch_size=4", "--min_examples=5"],
}
CPU = {"continue": ["--max_iters=200"], "simulate": ["--requests=400", "--shift_at=200"], "report": ["--window_requests=50"],
       "check": ["--window_requests=50", "--reference_requests=50"],
       "retrain": ["--window_requests=50", "--reference_requests=50"]}


def speedrun_flags(cfg: LifecycleConfig) -> dict[str, list[str]]:
    """GPT-2 small's shape (111 M parameters with a 32,768-token BPE) trained on about 20 tokens per
    parameter (Chinchilla) of web text, then each later stage at its default on the GPU. With
    --tiny: the same commands at toy sizes."""
    if cfg.tiny:  # the built-in corpus stands in for the hub's (the tests have no network)
        return SMOKE
    return {
        **CPU,
        "prepare": ["--input", cfg.hub_data, f"--hub_max_docs={cfg.hub_max_docs}", "--vocab_size=32768"],
        # 16 rows x 1024 tokens x 16 // GPUs accumulation x GPUs = 262,144 tokens per step; 9,500 steps = 2.5 B tokens
        "pretrain": ["--preset=gpt2", "--batch_size=16", f"--grad_accum={max(1, 16 // gpu_count(cfg))}",
                     "--max_iters=9500", "--eval_interval=500", "--checkpoint_interval=1000"],
        "continue": ["--max_iters=500", "--batch_size=16"],
        "sft": ["--max_iters=3000"],
    }


def gpu_count(cfg: LifecycleConfig) -> int:
    if cfg.gpus:
        return cfg.gpus
    import torch
    return torch.cuda.device_count() or (2 if cfg.tiny else 1)


# ------------------------------------------------------------------ the stages

@dataclass
class Stage:
    name: str
    title: str  # the README's numbering
    commands: list[list[str]]
    measure: Callable[["Paths"], dict]  # -> {"what", "before", "after"} (and more) from the stage's own files
    server: bool = False  # needs serve.py running (started once for the stages that do)
    ok_codes: tuple = (0,)  # exit statuses that are not failures (monitor.py check: 2 = drift found)
    fresh: tuple = ()  # what the stage writes without an --overwrite of its own: removed before it runs again


@dataclass
class Paths:
    out: Path
    port: int

    def __getattr__(self, name):  # paths.sft == out/sft, and so on
        return self.out / name

    def __getitem__(self, name):  # paths["continue"] (a keyword)
        return self.out / name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def python(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def launcher(cfg: LifecycleConfig, script: str, *args) -> list[str]:
    """A training command: plain python, or torchrun over every GPU for the speedrun."""
    if cfg.scale != "speedrun":
        return python(script, *args)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpu_count(cfg)}",
            str(ROOT / script), *map(str, args)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def evals(run: Path, key: str) -> list[float]:
    """Every logged value of one metric of a run, in order (evaluations carry val_*)."""
    return [row[key] for row in jsonl(run / "metrics.jsonl") if isinstance(row.get(key), (int, float))]


def first_last(run: Path, key: str, what: str, **extra) -> dict:
    values = evals(run, key)
    if not values:
        raise LifecycleError(f"{run}/metrics.jsonl has no {key}: did the stage finish?")
    return {"what": what, "before": values[0], "after": values[-1], **extra}


def ends(values: list[float]) -> list[float]:
    return [values[0], values[-1]] if values else []


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def measure_prepare(p: Paths) -> dict:
    report = json.loads((p.data / "report.json").read_text())
    return {"what": "documents kept by curation", "before": report["input"]["docs"], "after": report["output"]["docs"],
            "train_tokens": report["tokens"]["per_split"]["train"]["tokens"], "report": "data/report.png"}


def measure_continue(p: Paths) -> dict:
    code, prose = evals(p["continue"], "val_loss"), evals(p["continue"], "val_loss_data")
    return {"what": "code val loss (nats); old data's val loss", "before": code[0], "after": code[-1],
            "old_before": prose[0], "old_after": prose[-1]}


def measure_grpo(p: Paths) -> dict:
    rewards, kls = evals(p.grpo, "reward"), evals(p.grpo, "kl")
    k = max(1, len(rewards) // 5)  # the first and last fifth of the steps: one step's reward is noisy
    return {"what": "training reward (first vs last fifth of the steps); KL to the SFT model",
            "before": mean_of(rewards[:k]), "after": mean_of(rewards[-k:]), "kl": kls[-1] if kls else math.nan}


def measure_vision(p: Paths) -> dict:
    report = json.loads((p.eval_images / "report.json").read_text())
    cnn, vit = (report["checkpoints"][name]["results"]["images"] for name in ("vision_cnn", "vision_vit"))
    gain = report["paired_images"].get("vision_vit", {})
    sklearn = json.loads((p.vision_cnn / "report.json").read_text()).get("sklearn", {})
    return {"what": "held-out digit accuracy: CNN stem, first evaluation -> last", "before": evals(p.vision_cnn, "val_accuracy")[0],
            "after": cnn["accuracy"], "vit": vit["accuracy"], "vit_minus_cnn": gain.get("difference"), "se": gain.get("se"),
            "sklearn_svm": sklearn.get("svm_rbf", {}).get("accuracy"), "report": "vision_cnn/confusion.png"}


def measure_vlm(p: Paths) -> dict:
    """The run's first evaluation against its final report (every held-out question, not the
    in-loop subset)."""
    report = json.loads((p.vlm / "report.json").read_text())
    return {"what": "exact match, 'what digit is this?' on held-out images", "before": evals(p.vlm, "val_image_digit")[0],
            "after": report["exact_match"]["image_digit"], "exact_match": report["exact_match"], "n": report["n"],
            "report": "vlm/loss.png"}


def measure_eval(p: Paths) -> dict:
    report = json.loads((p.eval / "report.json").read_text())
    scores = {name: c["results"]["instructions"]["mean_exact_match"] for name, c in report["checkpoints"].items()}
    return {"what": "mean held-out exact match: base -> SFT", "before": scores.get("pretrain"), "after": scores.get("sft"),
            "scores": scores, "paired": report.get("paired", {}),
            "images": {name: c["results"]["images"]["exact_match"] for name, c in report["checkpoints"].items()
                       if "images" in c["results"]}}


def measure_serve(p: Paths) -> dict:
    from nanofm.interactions import InteractionLog
    log = InteractionLog(str(p.serve / "interactions.db"))
    try:
        rows = log.requests()
    finally:
        log.close()
    return {"what": "requests answered and logged (rated)", "before": 0, "after": len(rows),
            "rated": sum(1 for r in rows if r["rating"] is not None)}


def measure_monitor(p: Paths) -> dict:
    report = json.loads((p.monitor / "report.json").read_text())
    first = next((w["window"] for w in report["windows"] if isinstance(w["drift"], dict) and w["drift"]["drift"]), None)
    downs = [w.get("down_share") for w in report["windows"]]
    return {"what": "thumbs-down share, first window -> last; first alarmed window", "before": downs[0],
            "after": downs[-1], "first_alarm": first, "report": "monitor/report.png"}


def measure_retrain(p: Paths) -> dict:
    decisions = jsonl(p.retrain / "decisions.jsonl")
    if not decisions:
        raise LifecycleError(f"{p.retrain}/decisions.jsonl is empty: monitor.py retrain decided nothing")
    last = decisions[-1]
    first_metric = next(iter((last.get("gate") or {}).get("metrics", {}).items()), (None, {}))
    what = (f"{last['action']} by the gate ({last.get('stage')} candidate): {first_metric[0]}, serving -> candidate"
            if first_metric[0] else f"{last['action']}: {last['reason'][:100]}")
    return {"what": what, "before": first_metric[1].get("serving"), "after": first_metric[1].get("candidate"),
            "action": last["action"], "reason": last["reason"], "stage": last.get("stage")}


def chat_prompts(p: Paths) -> list[str]:
    """Held-out questions of three families and a harmful request: what the model was taught."""
    from nanofm import instructions, safety
    data = p.data_tasks if p.data_tasks.exists() else p.data
    items = instructions.builtin(str(data), "val", per_family=1, seed=0, families=("count", "sort", "upper"))
    harmful = next(item["prompt"] for item in safety.prompts("val", 0) if item["family"] == "refuse")
    return [item["messages"][0]["content"] for item in items] + [harmful]


def measure_chat(p: Paths) -> dict:
    turns = json.loads((p.out / "chat.json").read_text())
    return {"what": "a short chat with the served model", "before": None, "after": len(turns), "turns": turns}


def stages(cfg: LifecycleConfig, p: Paths) -> list[Stage]:
    flags = {"cpu": CPU, "smoke": SMOKE, "speedrun": None}[cfg.scale] or speedrun_flags(cfg)
    f = lambda name: flags.get(name, [])  # noqa: E731
    train = lambda script, *args: launcher(cfg, script, *args)  # noqa: E731
    overwrite = "--overwrite"  # a stage that runs again (cut off half-way, or changed) starts its run afresh
    code = p.data_code
    # the task families (SFT, RL, eval, the simulated users) draw on the built-in corpus: the speedrun
    # pretrains on web text, so it also encodes the built-in corpus with that tokenizer
    tasks = p.data_tasks if cfg.scale == "speedrun" else p.data
    prepare_tasks = [python("data/prepare.py", "--out", tasks, "--tokenizer", p.data / "tokenizer.json",
                            "--progress=false")] if cfg.scale == "speedrun" else []
    return [
        Stage("prepare", "1-2 data", [python("data/prepare.py", "--out", p.data, "--progress=false", *f("prepare")),
                                      *prepare_tasks], measure_prepare),
        Stage("pretrain", "3-4 pretraining", [train("train_pretrain.py", "--data_dir", p.data, "--out_dir", p.pretrain,
                                                    overwrite, *f("pretrain"))],
              lambda p: first_last(p.pretrain, "val_bpb", "validation bits per byte", report="pretrain/loss.png",
                                   induction=evals(p.pretrain, "induction_score")[-1:])),
        Stage("continue", "4 continued pretraining", [
            python("data/prepare.py", "--out", code, "--mix=code:1,prose:0,chat:0", "--tokenizer", p.pretrain,
                   "--progress=false"),
            train("train_pretrain.py", "--init_from", p.pretrain, "--data_dir", code, "--replay_dir", p.data,
                  "--replay_ratio=0.25", "--out_dir", p["continue"], overwrite, *f("continue"))],
              measure_continue),
        Stage("sft", "5 fine-tuning", [train("train_sft.py", "--init_from", p.pretrain, "--data_dir", tasks, "--out_dir", p.sft, overwrite,
                                             *f("sft"))],
              lambda p: first_last(p.sft, "val_exact_match", "exact match on the run's held-out questions",
                                   report="sft/loss.png", val_loss=ends(evals(p.sft, "val_loss")))),
        Stage("dpo", "6 alignment: DPO", [train("train_rlhf.py", "--algo=dpo", "--init_from", p.sft, "--data_dir", tasks, "--out_dir", p.dpo,
                                                overwrite, *f("dpo"))],
              lambda p: first_last(p.dpo, "val_pair_accuracy", "held-out preference accuracy",
                                   refusal=ends(evals(p.dpo, "val_refusal_rate")), val_loss=ends(evals(p.dpo, "val_loss")),
                                   report="dpo/loss.png")),
        Stage("grpo", "6 alignment: GRPO", [train("train_rlhf.py", "--algo=grpo", "--init_from", p.sft, "--data_dir", tasks, "--out_dir", p.grpo,
                                                  overwrite, *f("grpo"))],
              lambda p: {**measure_grpo(p), "report": "grpo/curves.png"}),
        Stage("vision", "4-5 images: classifiers", [
            train("train_vision.py", "--out_dir", p.vision_cnn, overwrite, *f("vision")),
            train("train_vision.py", "--stem=vit", "--out_dir", p.vision_vit, overwrite, *f("vision")),
            python("eval.py", "--ckpt", p.vision_cnn, "--ckpt", p.vision_vit, "--tasks", "images", "--out_dir", p.eval_images,
                   "--progress=false")],
              measure_vision),
        Stage("vlm", "5 images: chat SFT", [train("train_vision.py", "--task=chat", "--init_from", p.sft, "--vision_from",
                                                  p.vision_cnn, "--out_dir", p.vlm, overwrite, *f("vlm"))],
              measure_vlm),
        Stage("eval", "7 evaluation", [python("eval.py", "--ckpt", p.sft, "--ckpt", p.dpo, "--ckpt", p.grpo,
                                              "--ckpt", p.pretrain, "--ckpt", p.vlm, "--tasks", "instructions", "--tasks", "safety",
                                              "--tasks", "images", "--data_dir", tasks,
                                              "--out_dir", p.eval, "--progress=false", *f("eval"))],
              measure_eval),
        Stage("serve", "8 deployment", [python("monitor.py", "simulate", "--url", p.url, "--data_dir", tasks,
                                               "--before", "tasks", "--after", "code", *f("simulate"))],
              measure_serve, server=True, fresh=(p.serve, p.serving)),
        Stage("monitor", "9 monitoring", [
            python("monitor.py", "report", "--db", p.serve / "interactions.db", "--out_dir", p.monitor, *f("report")),
            python("monitor.py", "check", "--db", p.serve / "interactions.db", "--out", p.monitor / "check.json",
                   *f("check"))],
              measure_monitor, ok_codes=(0, 2), fresh=(p.monitor,)),
        Stage("retrain", "9 retraining behind the gate", [
            python("monitor.py", "retrain", "--db", p.serve / "interactions.db", "--serving", p.serving,
                   "--serve_url", p.url, "--out_dir", p.retrain, "--cooldown_seconds=0", *f("retrain"))],
              measure_retrain, server=True, fresh=(p.retrain,)),
        Stage("chat", "8 a chat with the served model", [], measure_chat, server=True),
    ]


# ------------------------------------------------------------------ running them

def shown(command: list[str]) -> str:
    """The command as a user would type it (python, torchrun, paths relative to the repository)."""
    text = shlex.join(command).replace(f"{sys.executable} -m torch.distributed.run", "torchrun")
    return text.replace(sys.executable, "python").replace(str(ROOT) + "/", "")


def free_port(wanted: int = 0) -> int:
    """`wanted` if it is free here, else any free port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port just closed is free
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py on a copy of the DPO model (the serving run directory retrain promotes into)."""

    def __init__(self, p: Paths):
        self.p, self.process = p, None

    def __enter__(self):
        if not self.p.serving.exists():
            source = self.p.dpo if self.p.dpo.exists() else self.p.sft
            shutil.copytree(source, self.p.serving.with_name("serving.tmp"), symlinks=True, dirs_exist_ok=True)
            os.replace(self.p.serving.with_name("serving.tmp"), self.p.serving)
        self.p.serve.mkdir(parents=True, exist_ok=True)
        command = python("serve.py", "--ckpt", self.p.serving, "--port", self.p.port, "--log",
                         self.p.serve / "interactions.db", "--watch", "--slots=8")
        print(f"$ {shown(command)} &", flush=True)
        self.process = subprocess.Popen(command, stdout=open(self.p.serve / "server.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise LifecycleError(f"serve.py exited ({self.process.returncode}); see {self.p.serve / 'server.log'}")
            try:
                with urllib.request.urlopen(self.p.url + "/health", timeout=5):
                    return self
            except OSError:
                time.sleep(1)
        raise LifecycleError(f"serve.py did not answer /health within 300 s; see {self.p.serve / 'server.log'}")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def ask(p: Paths, prompt: str) -> str:
    body = {"model": "serving", "messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0}
    request = urllib.request.Request(p.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def run_stage(stage: Stage, p: Paths) -> float:
    start = time.time()
    for command in stage.commands:
        print(f"\n$ {shown(command)}", flush=True)
        code = subprocess.run(command, cwd=ROOT).returncode
        if code not in stage.ok_codes:
            raise LifecycleError(f"stage {stage.name} failed: `{shown(command)}` exited with status {code}; "
                                 f"fix it and run lifecycle.py again to go on from this stage")
    if stage.name == "chat":
        turns = [{"user": prompt, "assistant": ask(p, prompt)} for prompt in chat_prompts(p)]
        for turn in turns:
            print(f"user: {turn['user']}\nassistant: {turn['assistant']}\n")
        atomic_write_text(p.out / "chat.json", json.dumps(turns, indent=1))
    return time.time() - start


def load_state(path: Path) -> dict:
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LifecycleError(f"{path} is not valid JSON ({exc}); delete it to start the lifecycle afresh") from None


def speedrun_estimate(cfg: LifecycleConfig) -> list[str]:
    """Pretraining's wall time and cost on this box, by nanofm.sizing's arithmetic (the other
    stages are small beside it); an estimate, not a measurement."""
    from dataclasses import replace

    from nanofm import sizing
    from nanofm.model import ModelConfig, describe
    if cfg.tiny:  # the estimate is for the full-size run (on 8 GPUs unless --gpus says otherwise)
        cfg = replace(cfg, tiny=False, gpus=cfg.gpus or 8)
    flags = speedrun_flags(cfg)["pretrain"]
    value = lambda name: int(next(x.split("=")[1] for x in flags if x.startswith(f"--{name}=")))  # noqa: E731
    model = ModelConfig.preset("gpt2", vocab_size=int(speedrun_flags(cfg)["prepare"][-1].split("=")[1]))
    gpus = gpu_count(cfg)
    tokens = value("batch_size") * model.block_size * value("grad_accum") * gpus * value("max_iters")
    flops = describe(model)["flops_per_token"] * tokens
    hours = sizing.wall_time_hours(flops, gpus, cfg.gpu, cfg.mfu)
    return [f"speedrun estimate (nanofm/sizing.py; not measured): GPT-2 small, {describe(model)['params'] / 1e6:.0f} M "
            f"parameters, {tokens / 1e9:.2f} B tokens, {flops:.2e} FLOPs",
            f"  on {gpus} x {cfg.gpu} at {cfg.mfu:.0%} MFU: pretraining {hours * 60:.0f} min, "
            f"{hours * gpus:.1f} GPU-hours, about ${hours * gpus * cfg.usd_per_gpu_hour:,.0f} at "
            f"${cfg.usd_per_gpu_hour:.2f} per GPU-hour"]


def fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def table(state: dict) -> str:
    lines = ["| stage | minutes | what moved | before | after |", "|---|---|---|---|---|"]
    for name in STAGE_NAMES:
        done = state["stages"].get(name)
        if done:
            m = done["measured"]
            lines.append(f"| {done['title']} | {done['seconds'] / 60:.1f} | {m['what']} | {fmt(m['before'])} | {fmt(m['after'])} |")
    return "\n".join(lines)


def write_report(cfg: LifecycleConfig, p: Paths, state: dict) -> None:
    parts = [f"# nanofm lifecycle: {cfg.scale}{' (tiny)' if cfg.tiny else ''}", "",
             f"Written by `python lifecycle.py --scale={cfg.scale}`. Minutes per stage, and the number each moved "
             "(from the stage's own metrics: first evaluation -> last).", "", table(state), ""]
    measured = {name: s["measured"] for name, s in state["stages"].items()}
    if "eval" in measured:
        parts += ["## Held-out exact match (eval.py)", "", "| model | exact match | paired vs sft (se) |", "|---|---|---|"]
        for name, score in measured["eval"]["scores"].items():
            pair = measured["eval"]["paired"].get(name)
            paired = f"{pair['difference']:+.3f} ({pair['se']:.3f})" if pair else ""
            parts.append(f"| {name} | {score:.3f} | {paired} |")
        parts.append("")
        for name, scores in measured["eval"].get("images", {}).items():
            parts += [f"{name} on questions about held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), ""]
    if "vision" in measured:
        v = measured["vision"]
        parts += [f"Digit classifiers on the same held-out images: CNN stem {v['after']:.3f}, ViT stem {v['vit']:.3f} "
                  f"(ViT - CNN paired {v['vit_minus_cnn']:+.3f}, se {v['se']:.3f}); scikit-learn's SVM "
                  f"{fmt(v['sklearn_svm'])}.", ""]
    if "chat" in measured:
        parts += ["## A short chat with the served model", ""]
        parts += [f"> **user:** {t['user']}\n>\n> **assistant:** {t['assistant']}\n" for t in measured["chat"]["turns"]]
    plots = [m["report"] for m in measured.values() if m.get("report") and (p.out / m["report"]).exists()]
    if plots:
        parts += ["## Plots", ""] + [f"![{path}]({path})" for path in plots]
    atomic_write_text(p.out / "report.md", "\n".join(parts) + "\n")


def main(argv=None, summary: bool = True) -> dict:
    cfg = parse_config(LifecycleConfig, argv, description=__doc__.split("\n")[0])
    out = Path(cfg.out or ROOT / "runs" / (cfg.scale + ("-tiny" if cfg.tiny else "")))
    state_path = out / "lifecycle.json"
    state = load_state(state_path)
    port = cfg.port or free_port(state.get("port", 0))  # a new port changes the serving stages' commands: they run again
    p = Paths(out, port)
    plan = stages(cfg, p)
    if cfg.scale == "speedrun":
        print("\n".join(speedrun_estimate(cfg)))
    if cfg.dry_run:
        for stage in plan:
            print(f"\n# {stage.title} ({stage.name})" + (" [with serve.py running]" if stage.server else ""))
            for command in stage.commands:
                print(shown(command))
        return {"dry_run": True}
    out.mkdir(parents=True, exist_ok=True)
    state["port"], state["config"] = port, asdict(cfg)
    server = None
    changed = False  # once a stage runs again, every stage after it does too (its inputs changed)
    try:
        for stage in plan:
            commands = [shown(c) for c in stage.commands]
            done = state["stages"].get(stage.name)
            if done and done["commands"] == commands and not cfg.force and not changed:
                print(f"[{stage.name}] done before ({done['seconds'] / 60:.1f} min): skipped")
            else:
                changed = True
                state["stages"].pop(stage.name, None)
                print(f"\n===== {stage.title} ({stage.name}) =====", flush=True)
                for path in stage.fresh:  # a fresh log and a fresh copy of the model to serve
                    shutil.rmtree(path, ignore_errors=True)
                if stage.server and server is None:
                    server = Server(p).__enter__()
                seconds = run_stage(stage, p)
                state["stages"][stage.name] = {"title": stage.title, "commands": commands, "seconds": seconds,
                                               "measured": stage.measure(p)}
                atomic_write_text(state_path, json.dumps(state, indent=1, default=str))
            if stage.name == cfg.until:
                break
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    write_report(cfg, p, state)
    if summary:
        print("\n" + table(state))
        print(f"\nwrote {p.out / 'report.md'} and {state_path}")
    return state


def ensure(stage: str) -> Paths:
    """For the notebooks: the smoke-scale lifecycle up to `stage`, run now where it is missing
    (finished stages are reused), in $NANOFM_LIFECYCLE_OUT or runs/smoke. Returns its paths."""
    out = os.environ.get("NANOFM_LIFECYCLE_OUT") or str(ROOT / "runs" / "smoke")
    state = main(["--scale=smoke", "--out", out, "--until", stage], summary=False)
    print(f"the smoke-scale lifecycle in {out}: {', '.join(state['stages'])} done (python lifecycle.py --scale=smoke)")
    return Paths(Path(out), state["port"])


if __name__ == "__main__":
    run_cli(main)
