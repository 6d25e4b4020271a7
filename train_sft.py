"""Stage 5: fine-tune a pretrained checkpoint on conversations (chat SFT), optionally with LoRA.

    python train_sft.py                                          # the latest out/pretrain, built-in mixture
    python train_sft.py --lora_rank=8                            # LoRA adapters instead of every weight
    python train_sft.py --data=mine.jsonl --data=dolly:dolly.jsonl   # your conversations, Dolly's format
    python train_sft.py --init_from=path/to/gpt2 --data=hf:smoltalk  # Hugging Face weights, a hub dataset (online)
    python train_sft.py --init_from=resume --out_dir=out/sft     # continue a stopped run exactly
    python train_sft.py --help                                   # every setting

What it does, top to bottom: load the checkpoint and its tokenizer; build the conversations (the
built-in task families of nanofm/instructions.py, or user data) and render them with the chat
format (nanofm/chat.py), so the loss falls on the assistant's tokens and end-of-turn only; train
with the shared loop (nanofm/train.py), evaluating held-out loss and exact match as it goes; save
checkpoints that record their parent and the chat format, which eval, RLHF and serving then use.

Design decisions:
- The tokenizer is the checkpoint's; the data directory only supplies text for the built-in
  families (its curated.jsonl), so any checkpoint works with it.
- Batches are padded per batch with the pad token (never eos), not packed: SFT conversations are
  short (median 31 tokens here), and padding keeps every row's mask obvious.
- LoRA (--lora_rank > 0) freezes the body and trains adapters on --lora_targets; checkpoints hold
  the adapters alone and name their base (a small file), or with --lora_merge the merged weights.
- Settings left out take the task's defaults (TASK_DEFAULTS): chat SFT and classification want
  different step counts, learning rates and dropout (measured; the README's stage 5 tables).
- The in-loop evaluation generates greedy replies to a few held-out questions of every family, so
  exact match is logged like the loss; the full held-out report is `python eval.py --tasks
  instructions`.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm import chat, instructions, labels, lora, metrics, safety, tasks  # noqa: E402
from nanofm.checkpoint import CheckpointError, load_for_training, load_weights, make_meta, read_meta, resolve  # noqa: E402
from nanofm.common import ConfigError, run_cli  # noqa: E402
from nanofm.config import config_to_dict, fill_unset, parse_config  # noqa: E402
from nanofm.data import ChatLoader, ClassifyLoader  # noqa: E402
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.model import Transformer  # noqa: E402
from nanofm.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from nanofm.train import Run, TrainConfig, evaluate_nll, setup, teardown, train, wrap_model  # noqa: E402


# what a setting left out means for each task: measured on the tiny default model (README, stage 5)
TASK_DEFAULTS = {"chat": {"max_iters": 2500, "lr": 3e-3},
                 "classify": {"max_iters": 2000, "lr": 1e-3, "dropout": 0.1}}


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tune a checkpoint on conversations (chat SFT), fully or with LoRA adapters."""
    task: str = "chat"  # chat (instruction tuning) | classify (a classification head)
    init_from: str = "out/pretrain"  # a checkpoint or run directory, a Hugging Face GPT-2/Llama directory, or resume
    out_dir: str = "out/sft"  # checkpoints, metrics.jsonl, loss.png
    data: list[str] = field(default_factory=list)  # user data, repeatable: PATH.jsonl, dolly:PATH, alpaca:PATH, smoltalk:PATH, hf:NAME
    data_dir: str = ""  # curated corpus for the built-in families; "" = the checkpoint's data_dir, else data/default
    per_family: int = 2000  # built-in training examples per corpus family (domain, function, speaker, first_sentence, chat)
    per_synthetic: int = 8000  # built-in training examples per generated family (arithmetic, count, upper, reverse, sort)
    families: list[str] = field(default_factory=lambda: list(instructions.FAMILIES))  # built-in task families to train on
    safety_demos: int = 10  # chat: add the tone and safety demonstrations (nanofm/safety.py), each this many times; 0 = none
    val_per_family: int = 8  # held-out questions per family generated at each evaluation (exact match)
    seq_len: int = 256  # tokens per conversation (or text to classify); longer ones are cut (and counted)
    # classification (--task=classify)
    labels: str = "domain"  # domain | quality | sentiment, or FORMAT:PATH (csv, jsonl, sst2, imdb)
    pool: str = "auto"  # what the head reads: auto (last real token if causal, first if bidirectional) | first | last | mean
    freeze_body: bool = False  # train the head alone
    class_weights: bool = True  # weigh each class by 1 / its frequency (imbalanced labels)
    # LoRA: 0 = full fine-tuning
    lora_rank: int = 0  # adapter rank; > 0 trains low-rank adapters only
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))  # layer names the adapters go on
    lora_modules_to_save: list[str] = field(default_factory=list)  # modules trained in full beside the adapters and saved with them (PEFT's modules_to_save), e.g. transformer.wte
    lora_merge: bool = False  # save merged weights (a plain checkpoint) instead of the adapters alone
    # the loop's defaults, for fine-tuning (None: the task's, TASK_DEFAULTS below)
    max_iters: Optional[int] = None  # optimizer steps (chat 2500: about 9 minutes on 2 CPU cores in bf16 with one digit per token, 3000 took 10.7; classify 2000)
    batch_size: int = 32  # conversations per micro-step per process
    lr: Optional[float] = None  # peak learning rate (chat 3e-3; classify 1e-3: 3e-3 overshoots, 0.79 F1 on sentiment vs 0.86)
    warmup_iters: int = 20  # linear warmup steps
    eval_interval: int = 500  # evaluate every N steps (and at the end)
    eval_iters: int = 4  # held-out batches for the validation loss
    sample_tokens: int = 48  # tokens of the reply sampled at each evaluation
    weight_decay: float = 0.0  # AdamW weight decay (none by default when fine-tuning)
    dropout: Optional[float] = None  # dropout probability (chat: the checkpoint's; classify 0.1, +0.03 F1 on unseen sentiment words)

    def __post_init__(self):
        if self.task not in TASK_DEFAULTS:
            raise ConfigError(f"--task must be chat or classify, got {self.task!r}")
        fill_unset(self, TASK_DEFAULTS[self.task])
        super().__post_init__()
        if self.pool not in ("auto", "first", "last", "mean"):
            raise ConfigError(f"--pool must be auto, first, last or mean, got {self.pool!r}")
        if self.seq_len < 8:
            raise ConfigError(f"--seq_len must be at least 8, got {self.seq_len}")
        for name in ("per_family", "per_synthetic"):
            if not 1 <= getattr(self, name) <= instructions.MAX_PER_FAMILY:
                raise ConfigError(f"--{name} must be in [1, {instructions.MAX_PER_FAMILY}], got {getattr(self, name)}")
        instructions.check_families(self.families)
        if self.val_per_family < 0 or self.safety_demos < 0:
            raise ConfigError(f"--val_per_family and --safety_demos must be >= 0, got {self.val_per_family} and "
                              f"{self.safety_demos}")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank:
            lora_config(self)  # validates
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")


def lora_config(cfg: SFTConfig) -> lora.LoRAConfig | None:
    return lora.LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                           cfg.lora_modules_to_save) if cfg.lora_rank else None


def load_start(cfg: SFTConfig) -> tuple[Transformer, Tokenizer, dict, str, Path | None]:
    """(model, tokenizer, parent meta, parent path, resume checkpoint or None)."""
    if cfg.init_from == "resume":
        ckpt = resolve(cfg.out_dir)
        meta = read_meta(ckpt)
        tokenizer = Tokenizer.load(ckpt)
        if meta.get("adapters"):  # the base, its new head if any, then this run's adapters, unmerged, to keep training them
            model, _, _ = load_for_training(meta["adapters"]["base"], tokenizer)
            if meta["model"].get("n_classes"):
                model = model.with_classifier(meta["model"]["n_classes"], meta["model"].get("pool", "auto"))
            lora.apply(model, lora.LoRAConfig(**meta["adapters"]["config"]))
            load_weights(model, {**model.state_dict(), **torch.load(ckpt / "model.pt", weights_only=True)}, ckpt)
        else:
            model, _, _ = load_for_training(ckpt, tokenizer)
        # the run's own parent, lineage and data dir, so the resumed run rebuilds the same conversations
        parent_meta = {"lineage": meta.get("lineage", [])[:-1], "data_dir": meta.get("data_dir")}
        return model, tokenizer, parent_meta, meta.get("parent"), ckpt
    source = Path(cfg.init_from)
    if not source.exists():
        hint = " (make one with: python train_pretrain.py)" if cfg.init_from == "out/pretrain" else ""
        raise CheckpointError(f"no checkpoint at {source}{hint}")
    directory = source if (source / "config.json").is_file() and not (source / "model.pt").is_file() else resolve(source)
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory} has no tokenizer.json: fine-tuning needs the tokenizer the model was trained with")
    tokenizer = Tokenizer.load(directory)
    model, meta, parent = load_for_training(source, tokenizer)
    if not model.cfg.causal and cfg.task == "chat":
        raise ConfigError(f"{parent} is a bidirectional (masked LM) model; chat SFT needs a causal one "
                          f"(classification fine-tuning takes either: --task=classify)")
    for name in ("<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"):
        if name not in tokenizer.special_tokens:
            raise TokenizerError(f"the tokenizer of {parent} has no {name} token, which the chat format needs")
    return model, tokenizer, meta, str(parent), None


def conversations(cfg: SFTConfig, parent_meta: dict) -> tuple[list[dict], list[dict], str]:
    """(training conversations, held-out conversations, data dir used) from user data or the built-in families."""
    data_dir = cfg.data_dir or parent_meta.get("data_dir") or str(ROOT / "data" / "default")
    families = tuple(cfg.families)
    held_out = instructions.builtin(data_dir, "val", per_family=max(1, cfg.val_per_family), seed=cfg.seed, families=families)
    if cfg.data:
        items = [item for spec in cfg.data for item in instructions.load_user_data(spec)]
        # a held-out tenth of the user's data for the validation loss; the built-in questions stay for exact match
        split = max(1, len(items) // 10)
        return items[split:], items[:split] + held_out, data_dir
    items = instructions.builtin(data_dir, "train", per_family=cfg.per_family, seed=cfg.seed, families=families,
                                 per_synthetic=cfg.per_synthetic)
    return items + safety.demonstrations("train", cfg.seed) * cfg.safety_demos, held_out, data_dir


class ChatSFT:
    """Cross-entropy on the assistant's tokens (y = -100 elsewhere); evaluated as held-out loss and
    greedy exact match on a few held-out questions of every checkable family."""

    def __init__(self, cfg: SFTConfig, ctx, tokenizer: Tokenizer, held_out: list[dict], context: int):
        self.cfg, self.ctx, self.tokenizer = cfg, ctx, tokenizer
        self.held_out = held_out
        # questions whose prompt leaves no room for a reply in the model's context are left out of exact match
        self.questions = [item for item in held_out if item.get("family") in instructions.CHECKABLE
                          and len(chat.render_prompt(tokenizer, item["messages"][:-1])) < context]
        self.make_val_loader()  # fail now, not at the first evaluation

    def make_val_loader(self):
        rows = min(self.cfg.batch_size, len(self.held_out) // self.ctx.world_size)
        return ChatLoader(self.held_out, self.tokenizer, rows, self.cfg.seq_len, self.ctx.rank, self.ctx.world_size,
                          self.ctx.device, seed=self.cfg.seed)

    def loss(self, model, batch, step):
        x, y = batch
        _, loss = model(x, y)
        return loss, (y != -100).sum(), {}

    def _nll_sum(self, model, batch, step):
        x, y = batch
        _, loss = model(x, y)
        count = int((y != -100).sum())
        return loss * count, count, y

    def evaluate(self, model) -> dict:
        results = {"val_loss": evaluate_nll(model, self._nll_sum, self.make_val_loader, self.cfg.eval_iters, self.ctx)["loss"]}
        if self.questions and self.ctx.master and not self.ctx.fsdp:
            raw = getattr(model, "module", model)
            raw = getattr(raw, "_orig_mod", raw)  # the plain model under DDP / compile
            scores = exact_match(raw, self.tokenizer, self.questions, self.ctx)
            results["val_exact_match"] = sum(scores.values()) / len(scores)
        return results

    def sample(self, model) -> str:
        question = self.questions[0]["messages"] if self.questions else [{"role": "user", "content": "Hello!"}]
        params = SamplingParams(max_tokens=self.cfg.sample_tokens, temperature=0)
        prompt = chat.render_prompt(self.tokenizer, question[:-1])
        reply = Engine(model, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype).generate([prompt], params)[0]
        return f"{question[-2]['content']}\n--> {reply.text}"


class Classify:
    """Cross-entropy of the class logits (optionally weighted by 1 / class frequency); evaluated as
    accuracy and macro F1 on the held-out texts."""

    def __init__(self, cfg: SFTConfig, ctx, tokenizer: Tokenizer, labels: list[str], held_out: list[dict],
                 weights: torch.Tensor | None):
        self.cfg, self.ctx, self.tokenizer, self.labels, self.held_out, self.weights = cfg, ctx, tokenizer, labels, held_out, weights

    def loss(self, model, batch, step):
        idx, mask, y = batch
        logits, _ = model(idx, attention_mask=mask, head="classify")
        return F.cross_entropy(logits.float(), y, weight=self.weights), y.numel(), {}

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        raw = getattr(raw, "_orig_mod", raw)
        probs = tasks.classify(raw, self.tokenizer, [item["text"] for item in self.held_out])
        raw.train()
        report = metrics.classification_report([item["label"] for item in self.held_out],
                                               [self.labels[i] for i in probs.argmax(-1).tolist()])
        return {"val_accuracy": report["accuracy"], "val_f1_macro": report["f1_macro"]}


def exact_match(model, tokenizer: Tokenizer, items: list[dict], ctx=None) -> dict[str, float]:
    """Greedy replies in the chat format to the last user turn of each item; exact match per family
    (eval's instructions task, on a model in memory)."""
    engine = Engine(model, tokenizer, device=ctx.device if ctx else None, dtype=ctx.dtype if ctx else None)
    return tasks.instruction_task(engine, items, chat.CHAT_FORMAT)["exact_match"]


def main(argv=None) -> dict:
    cfg = parse_config(SFTConfig, argv, description=__doc__.split("\n\n")[0])
    ctx = setup(cfg)
    model, tokenizer, parent_meta, parent, resume_from = load_start(cfg)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.seq_len > model.cfg.block_size:  # a row cannot be longer than the model's context
        if ctx.master:
            print(f"sft: --seq_len {cfg.seq_len} is longer than the model's context; using {model.cfg.block_size}")
        cfg.seq_len = model.cfg.block_size
    data_dir = cfg.data_dir or parent_meta.get("data_dir") or str(ROOT / "data" / "default")
    label_names = None
    if cfg.task == "classify":
        train_items, label_names = labels.load(cfg.labels, data_dir, "train", cfg.seed)
        held_out, _ = labels.load(cfg.labels, data_dir, "test", cfg.seed)
    else:
        train_items, held_out, data_dir = conversations(cfg, parent_meta)

    # the model to train: a new head (classify), then adapters (LoRA), on a new run's starting point
    lora_cfg, adapters = lora_config(cfg), None
    if resume_from is not None:  # a resumed run's model already has its head and adapters
        adapters = read_meta(resume_from).get("adapters")
    else:
        base_fingerprint = lora.fingerprint(model.state_dict())  # the base checkpoint's weights, before any head
        if cfg.task == "classify":
            model = model.with_classifier(len(label_names), cfg.pool)
        if lora_cfg:
            names = lora.apply(model, lora_cfg)
            adapters = {"config": lora_cfg.to_dict(), "base": parent, "base_fingerprint": base_fingerprint,
                        "layers": len(names)}
    if cfg.task == "classify":  # the same trainable set on a new and a resumed run (the optimizer state must fit it)
        if cfg.freeze_body:
            for p in model.parameters():
                p.requires_grad_(False)
        for p in model.cls_head.parameters():  # the new head always trains (LoRA froze it too)
            p.requires_grad_(True)

    if cfg.task == "classify":
        train_loader = ClassifyLoader(train_items, label_names, tokenizer, cfg.batch_size, min(cfg.seq_len, model.cfg.block_size),
                                      ctx.rank, ctx.world_size, ctx.device, seed=cfg.seed)
        counts = torch.tensor(train_loader.class_counts(len(label_names)), dtype=torch.float)
        weights = (counts.sum() / (len(counts) * counts)).to(ctx.device) if cfg.class_weights else None
        objective = Classify(cfg, ctx, tokenizer, label_names, held_out[:1000], weights)
    else:
        train_loader = ChatLoader(train_items, tokenizer, cfg.batch_size, cfg.seq_len, ctx.rank, ctx.world_size,
                                  ctx.device, seed=cfg.seed)
        objective = ChatSFT(cfg, ctx, tokenizer, held_out, model.cfg.block_size)
    models = wrap_model(model, cfg, ctx)
    trainable = sum(p.numel() for p in models.raw.parameters() if p.requires_grad)

    # what a checkpoint holds: everything, the adapters alone (and a new head) naming their base, or merged weights
    keep = None
    if adapters and cfg.lora_merge:
        keep = partial(lora.merged_state_dict, cfg=lora.LoRAConfig(**adapters["config"]))
    elif adapters:
        saved = lora.saved_modules(models.raw, lora.LoRAConfig(**adapters["config"]))
        keep = partial(lora.adapter_state_dict, also=("cls_head.", *(name + "." for name in saved)))
    meta = make_meta(stage="sft", objective=cfg.task, model=models.raw.cfg, config=config_to_dict(cfg),
                     tokenizer=tokenizer.name, data_dir=data_dir, parent=parent, parent_meta=parent_meta,
                     chat_format=chat.CHAT_FORMAT if cfg.task == "chat" else None,
                     adapters=adapters if adapters and not cfg.lora_merge else None,
                     labels=label_names, label_task=cfg.labels if cfg.task == "classify" else None,
                     trainable_params=trainable, data=cfg.data or ["builtin"])
    if ctx.master:
        lora_note = f" (LoRA rank {cfg.lora_rank} on {adapters['layers']} layers)" if adapters and "layers" in adapters else ""
        print(f"sft: {len(train_items):,} {'texts' if cfg.task == 'classify' else 'conversations'} "
              f"({train_loader.truncated} cut to {cfg.seq_len} tokens), "
              f"{len(held_out):,} held out; {trainable / 1e6:.2f}M of {models.raw.num_params(non_embedding=False) / 1e6:.2f}M "
              f"parameters trained{lora_note}; from {parent}")
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer every checkpoint gets a copy of
        tokenizer.save(Path(scratch) / "tokenizer.json")
        run = Run(Path(cfg.out_dir), meta, tokenizer_path=Path(scratch) / "tokenizer.json", resume_from=resume_from,
                  keep_weights=keep)
        result = train(cfg, ctx, models, objective, train_loader, run)
    teardown(ctx)
    result["truncated"] = train_loader.truncated
    result["trainable_params"] = trainable
    result["peak_memory_mib"] = peak_memory_mib(ctx.device)
    return result


def peak_memory_mib(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident memory (Linux: KiB)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    run_cli(main)
