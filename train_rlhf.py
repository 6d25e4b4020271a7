"""Stage 6: align a fine-tuned checkpoint: a reward model, DPO (preferences) or GRPO (verifiable rewards).

    python train_rlhf.py --algo=dpo                      # DPO on the built-in pairs, from the latest out/sft
    python train_rlhf.py --algo=rm                       # a reward model (Bradley-Terry) on the same pairs
    python train_rlhf.py --algo=grpo                     # GRPO: groups of sampled replies, rewarded by exact match
    python train_rlhf.py --algo=dpo --data=hh:hh.jsonl   # your pairs: jsonl, hh:, ultrafeedback:, hf:NAME
    python train_rlhf.py --init_from=resume --algo=dpo --out_dir=out/dpo   # continue a stopped run exactly
    python train_rlhf.py --help                          # every setting

What it does, top to bottom: load the chat-tuned checkpoint and its tokenizer; build preference
pairs (nanofm/preferences.py: right vs plausibly wrong answers of the checkable families, true vs
mismatched chat replies; or user data) with a held-out split; then
- rm: put a scalar head on the model (the score read at the last real token) and train it so
  the chosen reply scores above the rejected one (-log sigmoid(r_c - r_r));
- dpo: compute the reference model's log-probabilities of every reply once (the starting model,
  frozen), then train the policy on -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)));
- grpo: sample --group_size replies to each question of the verifiable families, reward exact
  answers, weight each reply's tokens by its group advantage in the clipped policy loss;
with the shared loop (nanofm/train.py), evaluating held-out pair accuracy (and for DPO the
held-out exact match of the task families) as it goes. Checkpoints record their parent, the
algorithm and, for DPO, the reference.

Design decisions:
- One script for every algorithm, as for fine-tuning: the data, the checkpoint and the loop are
  shared, and each algorithm is an objective (loss + evaluate) of a few lines over nanofm/rlhf.py.
- DPO's reference log-probabilities are computed once, before training (the reference model is
  then dropped), and again on resume from the recorded reference: the same numbers, no second
  model in memory during training.
- Log-probabilities are normalised over the tokenizer's ids (vocab_limit), like sampling, so
  DPO's policy is the distribution the engine samples from.
- GRPO's rollouts are its data loader (Rollouts): the loop, checkpoints and exact resume are the
  shared ones, and each rollout gets one update (so the ratio is 1; the clip matters once rollouts
  are reused for several epochs, as PPO will).
- PPO (a value head, GAE over the KL-penalised reward) is not here yet.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm import instructions, preferences, rlhf, tasks  # noqa: E402
from nanofm.checkpoint import CheckpointError, load_for_training, make_meta, read_meta, resolve  # noqa: E402
from nanofm.common import ConfigError, run_cli  # noqa: E402
from nanofm.config import config_to_dict, fill_unset, parse_config  # noqa: E402
from nanofm.data import PreferenceLoader, RowLoader  # noqa: E402
from nanofm.engine import Engine  # noqa: E402
from nanofm.model import Transformer, token_logprobs  # noqa: E402
from nanofm.tokenizer import Tokenizer  # noqa: E402
from nanofm.train import Run, TrainConfig, setup, teardown, train, wrap_model  # noqa: E402

ALGOS = ("rm", "dpo", "grpo")
# what a setting left out means for each algorithm: measured on the tiny default model (README, stage 6)
ALGO_DEFAULTS = {"rm": {"max_iters": 500, "lr": 1e-3, "batch_size": 16}, "dpo": {"max_iters": 300, "lr": 1e-4, "batch_size": 16},
                 "grpo": {"max_iters": 50, "lr": 1e-4, "batch_size": 8}}  # grpo: not tuned yet


@dataclass
class RLHFConfig(TrainConfig):
    """Align a chat-tuned checkpoint with preference pairs: a reward model or DPO."""
    algo: str = "dpo"  # rm (reward model) | dpo
    init_from: str = "out/sft"  # a chat-tuned checkpoint or run directory (train_sft.py's), or resume
    out_dir: str = ""  # "" = out/<algo>
    data: list[str] = field(default_factory=list)  # user pairs, repeatable: PATH.jsonl, hh:PATH, ultrafeedback:PATH, hf:NAME
    data_dir: str = ""  # curated corpus for the built-in pairs; "" = the checkpoint's data_dir
    per_family: int = 500  # built-in training pairs per task family
    families: list[str] = field(default_factory=lambda: list(instructions.FAMILIES))  # built-in task families to make pairs from
    val_pairs: int = 20  # held-out pairs per family for the held-out accuracy
    seq_len: int = 256  # tokens per prompt + reply; longer ones are cut (and counted)
    beta: float = 0.1  # DPO: strength of the pull towards the reference (the implicit KL coefficient)
    # GRPO: --batch_size prompts per step, each answered group_size times, rewarded by exact match
    group_size: int = 8  # samples per prompt (their mean and std make the baseline)
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 32  # longest sampled reply
    clip: float = 0.2  # ratio clip of the policy loss
    kl_coef: float = 0.0  # weight of the k3 KL to the reference (0: no reference model kept)
    # the loop's defaults, for alignment (None: the algorithm's, ALGO_DEFAULTS below)
    max_iters: Optional[int] = None  # optimizer steps (rm 500, dpo 300)
    batch_size: Optional[int] = None  # pairs (grpo: questions) per micro-step per process (rm, dpo 16; grpo 8)
    lr: Optional[float] = None  # peak learning rate (rm 1e-3: a new head; dpo 1e-4)
    warmup_iters: int = 10  # linear warmup steps
    eval_interval: int = 100  # evaluate every N steps (and at the end)
    weight_decay: float = 0.0  # AdamW weight decay
    sample_tokens: int = 0  # no free samples: the evaluation generates answers
    dropout: Optional[float] = 0.0  # dropout off: DPO's policy and reference must score alike at the start

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        fill_unset(self, ALGO_DEFAULTS[self.algo])
        super().__post_init__()
        if not self.out_dir:
            self.out_dir = f"out/{self.algo}"
        if not 0 < self.beta <= 10:
            raise ConfigError(f"--beta must be in (0, 10], got {self.beta}")
        if not 1 <= self.per_family <= instructions.MAX_PER_FAMILY:
            raise ConfigError(f"--per_family must be in [1, {instructions.MAX_PER_FAMILY}], got {self.per_family}")
        instructions.check_families(self.families)
        if self.group_size < 2:
            raise ConfigError(f"--group_size must be at least 2 (the group is the baseline), got {self.group_size}")
        if not 0 <= self.kl_coef <= 10 or not 0 < self.clip < 1 or self.temperature <= 0 or self.max_new_tokens < 1:
            raise ConfigError("--kl_coef must be in [0, 10], --clip in (0, 1), --temperature > 0, --max_new_tokens >= 1")
        if self.val_pairs < 1 or self.seq_len < 8:
            raise ConfigError("--val_pairs must be >= 1 and --seq_len >= 8")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")


def load_start(cfg: RLHFConfig) -> tuple[Transformer, Tokenizer, dict, str, Path | None]:
    """(model, tokenizer, parent meta, parent path, resume checkpoint or None)."""
    if cfg.init_from == "resume":
        ckpt = resolve(cfg.out_dir)
        meta = read_meta(ckpt)
        if meta.get("algorithm") != cfg.algo:
            raise ConfigError(f"{ckpt} was trained with --algo={meta.get('algorithm')}, not {cfg.algo}")
        tokenizer = Tokenizer.load(ckpt)
        model, _, _ = load_for_training(ckpt, tokenizer)
        parent_meta = {"lineage": meta.get("lineage", [])[:-1], "data_dir": meta.get("data_dir"),
                       "chat_format": meta.get("chat_format"), "reference": meta.get("reference")}
        return model, tokenizer, parent_meta, meta.get("parent"), ckpt
    source = Path(cfg.init_from)
    if not source.exists():
        hint = " (make one with: python train_sft.py)" if cfg.init_from == "out/sft" else ""
        raise CheckpointError(f"no checkpoint at {source}{hint}")
    directory = resolve(source)
    if not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"{directory} has no tokenizer.json: alignment needs the tokenizer the model was trained with")
    tokenizer = Tokenizer.load(directory)
    model, meta, parent = load_for_training(source, tokenizer)
    if not meta.get("chat_format"):
        raise ConfigError(f"{parent} is not chat-tuned (its meta.json has no chat_format): alignment starts from a chat "
                          f"model; run python train_sft.py --init_from={cfg.init_from} first")
    if not model.cfg.causal or model.cfg.n_classes:
        raise ConfigError(f"{parent} is not a causal language model (it is a classifier or a masked LM)")
    return model, tokenizer, meta, str(parent), None


def preference_pairs(cfg: RLHFConfig, data_dir: str) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): user data (a tenth held out) or the built-in pairs."""
    if cfg.data:
        pairs = [pair for spec in cfg.data for pair in preferences.load(spec)]
        split = max(1, len(pairs) // 10)
        return pairs[split:], pairs[:split]
    families = tuple(cfg.families)
    train_pairs = preferences.builtin(data_dir, "train", per_family=cfg.per_family, seed=cfg.seed, families=families)
    return train_pairs, preferences.builtin(data_dir, "val", per_family=cfg.val_pairs, seed=cfg.seed, families=families)


def reply_logprobs(model, batch, vocab_limit: int) -> torch.Tensor:
    """Summed log-probabilities of each row's reply (and <|end|>): [2B] for a preference batch."""
    x, y = batch[0], batch[1]
    logits, _ = model(x)
    return token_logprobs(logits, y, vocab_limit).sum(-1)


@torch.no_grad()
def all_reply_logprobs(model, pairs: list[dict], tokenizer: Tokenizer, cfg: RLHFConfig, device) -> torch.Tensor:
    """[n_pairs, 2] (chosen, rejected) log-probabilities of every pair under `model` (the reference)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    for batch in PreferenceLoader(pairs, tokenizer, 1, cfg.seq_len, device=device).in_order(32):
        logp, b = reply_logprobs(model, batch, tokenizer.vocab_size).float().cpu(), len(batch[3])
        out[batch[3].cpu()] = torch.stack([logp[:b], logp[b:]], dim=1)
    model.train(was_training)
    return out


def pair_accuracy(scores: torch.Tensor, pairs: list[dict]) -> dict:
    """Share of pairs whose chosen reply scores above its rejected one, overall and per family."""
    wins = (scores[:, 0] > scores[:, 1]).tolist()
    by_family: dict[str, list] = {}
    for pair, win in zip(pairs, wins):
        by_family.setdefault(pair["family"], []).append(win)
    return {"pair_accuracy": sum(wins) / len(wins),
            **{f"pair_accuracy[{f}]": sum(w) / len(w) for f, w in sorted(by_family.items())}}


class DPO:
    """DPO on preference batches, against reference log-probabilities computed once."""

    def __init__(self, cfg: RLHFConfig, ctx, tokenizer: Tokenizer, reference: torch.Tensor, held_out: list[dict],
                 held_reference: torch.Tensor, questions: list[dict], chat_format: str):
        self.cfg, self.ctx, self.tokenizer = cfg, ctx, tokenizer
        self.reference, self.held_out, self.held_reference = reference.to(ctx.device), held_out, held_reference
        self.questions, self.chat_format = questions, chat_format

    def loss(self, model, batch, step):
        index = batch[3]
        logp = reply_logprobs(model, batch, self.tokenizer.vocab_size)
        b = len(index)
        ref = self.reference[index]
        loss, stats = rlhf.dpo_loss(logp[:b], logp[b:], ref[:, 0], ref[:, 1], self.cfg.beta)
        return loss, b, stats

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        logp = all_reply_logprobs(raw, self.held_out, self.tokenizer, self.cfg, self.ctx.device)
        loss, stats = rlhf.dpo_loss(logp[:, 0], logp[:, 1], self.held_reference[:, 0], self.held_reference[:, 1], self.cfg.beta)
        results = {"val_loss": loss.item(), "val_reward_accuracy": stats["accuracy"], "val_margin": stats["margin"],
                   "val_pair_accuracy": pair_accuracy(logp, self.held_out)["pair_accuracy"]}
        if self.questions and self.ctx.master:
            engine = Engine(raw, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype)
            results["val_exact_match"] = tasks.instruction_task(engine, self.questions, self.chat_format)["mean_exact_match"]
            raw.train()
        return results


class RewardModel:
    """Bradley-Terry on the scalar head's scores of the chosen and rejected rows."""

    def __init__(self, cfg: RLHFConfig, ctx, tokenizer: Tokenizer, held_out: list[dict]):
        self.cfg, self.ctx, self.tokenizer, self.held_out = cfg, ctx, tokenizer, held_out

    def loss(self, model, batch, step):
        x, _, attention, index = batch
        scores = model(x, attention_mask=attention, head="classify")[0][:, 0].float()
        b = len(index)
        loss = rlhf.reward_loss(scores[:b], scores[b:])
        return loss, b, {"accuracy": (scores[:b] > scores[b:]).float().mean().item()}

    @torch.no_grad()
    def scores(self, model, pairs: list[dict]) -> torch.Tensor:
        """[n_pairs, 2] (chosen, rejected) scores."""
        out = torch.zeros(len(pairs), 2)
        for x, _, attention, index in PreferenceLoader(pairs, self.tokenizer, 1, self.cfg.seq_len,
                                                       device=self.ctx.device).in_order(32):
            s, b = model(x, attention_mask=attention, head="classify")[0][:, 0].float().cpu(), len(index)
            out[index.cpu()] = torch.stack([s[:b], s[b:]], dim=1)
        return out

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        raw.eval()
        scores = self.scores(raw, self.held_out)
        raw.train()
        return {"val_loss": rlhf.reward_loss(scores[:, 0], scores[:, 1]).item(),
                **{f"val_{k}": v for k, v in pair_accuracy(scores, self.held_out).items()}}


class Rollouts(RowLoader):
    """GRPO's data: each step, the next --batch_size questions of the verifiable families (this
    rank's share, in RowLoader's seeded order), each answered group_size times by the current
    policy through the engine, with the reward (1 for an exact answer, else 0) and the group
    advantages. Sampling is seeded by (seed, step, rank, row) and the position is saved like any
    loader's, so a resumed run rolls out the same replies."""

    what = "questions"

    def __init__(self, questions: list[dict], model, tokenizer: Tokenizer, cfg: RLHFConfig, ctx):
        self.rows, self.model, self.tokenizer, self.cfg, self.ctx = questions, model, tokenizer, cfg, ctx
        self._init_rows(cfg.batch_size, ctx.rank, ctx.world_size, ctx.device, cfg.seed)
        self.step = 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])

    @torch.no_grad()
    def next_batch(self):
        from nanofm import chat
        from nanofm.data import pad_batch
        from nanofm.engine import SamplingParams
        items = self._next_rows()
        g = self.cfg.group_size
        prompts = [chat.render_prompt(self.tokenizer, item["messages"][:-1]) for item in items for _ in range(g)]
        params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                 seed=self.cfg.seed * 1_000_003 + self.step * 10_007 + self.ctx.rank * 1009 + i)
                  for i in range(len(prompts))]
        engine = Engine(self.model, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype)
        outs = engine.generate(prompts, params)
        self.model.train()
        self.step += 1
        answers = [item["messages"][-1]["content"] for item in items for _ in range(g)]
        rewards = torch.tensor([float(instructions.exact_match(o.text, a)) for o, a in zip(outs, answers)])
        advantages = rlhf.group_advantages(rewards.view(len(items), g)).view(-1)
        rows = [prompt + out.token_ids for prompt, out in zip(prompts, outs)]
        x, _ = pad_batch([r[:-1] for r in rows], value=self.tokenizer.pad_id)
        y, _ = pad_batch([[-100] * (len(p) - 1) + o.token_ids for p, o in zip(prompts, outs)], value=-100)
        lengths = torch.tensor([float(len(o.token_ids)) for o in outs])
        return tuple(t.to(self.ctx.device) for t in (x, y, advantages, rewards, lengths))


class GRPO:
    """The clipped policy loss on sampled replies weighted by their group advantages, plus an
    optional k3 KL to the reference; evaluated by greedy exact match on held-out questions."""

    def __init__(self, cfg: RLHFConfig, ctx, tokenizer: Tokenizer, reference, questions: list[dict], chat_format: str):
        self.cfg, self.ctx, self.tokenizer, self.reference = cfg, ctx, tokenizer, reference
        self.questions, self.chat_format = questions, chat_format

    def loss(self, model, batch, step):
        x, y, advantages, rewards, lengths = batch
        logits, _ = model(x)
        logp = token_logprobs(logits, y, self.tokenizer.vocab_size)
        mask = (y != -100).float()
        # one update per rollout: the old policy is this one, so the ratio is 1 and the clip guards later epochs
        loss, stats = rlhf.ppo_policy_loss(logp, logp.detach(), advantages[:, None].expand_as(logp), mask, self.cfg.clip)
        if self.reference is not None and self.cfg.kl_coef > 0:
            with torch.no_grad():
                ref_logp = token_logprobs(self.reference(x)[0], y, self.tokenizer.vocab_size)
            kl = rlhf.masked_mean(rlhf.kl_k3(logp, ref_logp), mask)
            loss = loss + self.cfg.kl_coef * kl
            stats["kl"] = kl.item()
        stats.update(reward=rewards.mean().item(), response_length=lengths.mean().item())
        return loss, len(rewards), stats

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        results = {}
        if self.questions and self.ctx.master:
            engine = Engine(raw, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype)
            result = tasks.instruction_task(engine, self.questions, self.chat_format)
            raw.train()
            results["val_exact_match"] = result["mean_exact_match"]
        return results


def main(argv=None) -> dict:
    cfg = parse_config(RLHFConfig, argv, description=__doc__.split("\n\n")[0])
    ctx = setup(cfg)
    model, tokenizer, parent_meta, parent, resume_from = load_start(cfg)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    data_dir = cfg.data_dir or parent_meta.get("data_dir") or str(ROOT / "data" / "default")
    reference = parent if resume_from is None else parent_meta.get("reference")
    checkable = tuple(f for f in cfg.families if f in instructions.CHECKABLE)
    if cfg.algo == "grpo":
        if cfg.data:
            raise ConfigError("GRPO rewards exact answers of the built-in task families; --data (preference pairs) "
                              "is for rm and dpo")
        model = model.to(ctx.device)
        questions = instructions.builtin(data_dir, "train", per_family=cfg.per_family, seed=cfg.seed, families=checkable)
        held_questions = instructions.builtin(data_dir, "val", per_family=cfg.val_pairs, seed=cfg.seed, families=checkable)
        reference_model = None
        if cfg.kl_coef > 0:
            reference_model, _, _ = load_for_training(reference, tokenizer)
            reference_model = reference_model.to(ctx.device).eval().requires_grad_(False)
        objective = GRPO(cfg, ctx, tokenizer, reference_model, held_questions, parent_meta.get("chat_format"))
        train_loader = Rollouts(questions, model, tokenizer, cfg, ctx)
        train_pairs, held_out = questions, held_questions
    else:
        train_pairs, held_out = preference_pairs(cfg, data_dir)
        held_out = [held_out[i] for i, _ in PreferenceLoader(held_out, tokenizer, 1, cfg.seq_len).rows]  # those that fit
        train_loader = PreferenceLoader(train_pairs, tokenizer, cfg.batch_size, cfg.seq_len, ctx.rank, ctx.world_size,
                                        ctx.device, seed=cfg.seed)
    if cfg.algo == "rm":
        if resume_from is None:
            model = model.with_classifier(1, "last")  # a scalar score at the last real token
        reference = None
        objective = RewardModel(cfg, ctx, tokenizer, held_out)
    elif cfg.algo == "dpo":
        reference_model = model
        if resume_from is not None:  # the run's own starting point, recorded as its reference
            reference_model, _, _ = load_for_training(reference, tokenizer)
            reference_model.set_dropout(0.0)
        reference_model = reference_model.to(ctx.device)
        if ctx.master:
            print(f"dpo: reference log-probabilities of {len(train_pairs) + len(held_out):,} pairs from {reference}")
        ref_train = all_reply_logprobs(reference_model, train_pairs, tokenizer, cfg, ctx.device)
        ref_held = all_reply_logprobs(reference_model, held_out, tokenizer, cfg, ctx.device)
        del reference_model
        questions = instructions.builtin(data_dir, "val", per_family=4, seed=cfg.seed, families=checkable) if not cfg.data else []
        objective = DPO(cfg, ctx, tokenizer, ref_train, held_out, ref_held, questions, parent_meta.get("chat_format"))
    models = wrap_model(model, cfg, ctx)
    meta = make_meta(stage="rlhf", objective="reward_model" if cfg.algo == "rm" else cfg.algo, model=models.raw.cfg,
                     config=config_to_dict(cfg), tokenizer=tokenizer.name, data_dir=data_dir, parent=parent,
                     parent_meta=parent_meta, algorithm=cfg.algo, reference=reference, data=cfg.data or ["builtin"],
                     labels=["score"] if cfg.algo == "rm" else None)
    if ctx.master:
        what = "questions" if cfg.algo == "grpo" else (f"pairs ({train_loader.truncated} replies cut to {cfg.seq_len} "
                                                       f"tokens, {train_loader.dropped} left out: the prompt fills it)")
        print(f"{cfg.algo}: {len(train_pairs):,} {what}, {len(held_out):,} held out; from {parent}")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save(Path(scratch) / "tokenizer.json")
        run = Run(Path(cfg.out_dir), meta, tokenizer_path=Path(scratch) / "tokenizer.json", resume_from=resume_from)
        result = train(cfg, ctx, models, objective, train_loader, run)
    teardown(ctx)
    result["truncated"] = getattr(train_loader, "truncated", 0)
    return result


if __name__ == "__main__":
    run_cli(main)
