"""Stage 6: align a fine-tuned checkpoint: a reward model, DPO (preferences), PPO or GRPO (rewards).

    python train_rlhf.py --algo=dpo                      # DPO on the built-in pairs, from the latest out/sft
    python train_rlhf.py --algo=rm                       # a reward model (Bradley-Terry) on the same pairs
    python train_rlhf.py --algo=ppo                      # PPO: sampled replies rewarded by exact match, KL-penalised
    python train_rlhf.py --algo=ppo --reward_model=out/rm   # ...or scored by the reward model
    python train_rlhf.py --algo=grpo                     # GRPO: groups of sampled replies, rewarded by exact match
    python train_rlhf.py --algo=dpo --data=hh:hh.jsonl   # your pairs: jsonl, hh:, ultrafeedback:, hf:NAME
    python train_rlhf.py --init_from=resume --algo=dpo --out_dir=out/dpo   # continue a stopped run exactly
    python train_rlhf.py --help                          # every setting

What it does, top to bottom: load the chat-tuned checkpoint and its tokenizer; build preference
pairs (nanofm/preferences.py: right vs plausibly wrong answers of the checkable families, true vs
mismatched chat replies; or user data) or questions (nanofm/instructions.py) with a held-out
split; then
- rm: put a scalar head on the model (the score read at the last real token) and train it so
  the chosen reply scores above the rejected one (-log sigmoid(r_c - r_r));
- dpo: compute the reference model's log-probabilities of every reply once (the starting model,
  frozen), then train the policy on -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)));
- ppo: give the policy a value head; each rollout samples replies to the questions through the
  engine, scores them (exact answer, or --reward_model), subtracts the KL penalty to the frozen
  reference on every token, and turns that into GAE advantages (whitened) and returns; then
  --ppo_epochs passes of --minibatches steps train the clipped policy loss + the clipped value
  loss, stopping early if the policy drifts past --target_kl from the one that sampled;
- grpo: sample --group_size replies to each question, reward exact answers, weight each reply's
  tokens by its group advantage ((r - mean) / (std + eps)) in the same clipped loss;
with the shared loop (nanofm/train.py), evaluating held-out pair accuracy (rm, dpo) or greedy
exact match on held-out questions (dpo, ppo, grpo) as it goes. Checkpoints record their parent,
the algorithm, the reference and (ppo, grpo) the reward.

Design decisions:
- One script for every algorithm, as for fine-tuning: the data, the checkpoint and the loop are
  shared, and each algorithm is an objective (loss + evaluate) of a few lines over nanofm/rlhf.py.
- DPO's reference log-probabilities are computed once, before training (the reference model is
  then dropped), and again on resume from the recorded reference: the same numbers, no second
  model in memory during training.
- Log-probabilities are normalised over the tokenizer's ids (vocab_limit), like sampling, so
  the policy being trained is the distribution the engine samples from.
- PPO's and GRPO's rollouts are their data loader (Rollouts): the shared loop asks for a batch,
  the loader rolls out when its last rollout is used up and hands out its minibatches. So the
  loop, checkpoints and exact resume (the rollout is part of the loader's state) are the shared
  ones; the two algorithms differ only in how advantages are made and in the value loss.
- The critic is a value head on the policy's body (one forward gives logits and values; the
  value loss is weighted by --value_coef), not a second model: half the memory and compute, at
  the price of the two losses sharing features. InstructGPT used a separate critic.
- The KL early stop acts after the update that crossed 1.5 --target_kl (the loop always steps);
  the rest of the rollout's epochs are skipped.
- Doubt: rewards are exact match (0/1) for the verifiable families; sampling at temperature 1
  from the tiny model rarely gets them right where greedy decoding does, so the rollouts see
  fewer rewards than the greedy evaluation suggests.
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

from nanofm import chat, instructions, metrics, preferences, rewards, rlhf, safety, tasks  # noqa: E402
from nanofm.checkpoint import CheckpointError, load_for_training, load_model, make_meta, read_meta, resolve  # noqa: E402
from nanofm.common import ConfigError, run_cli  # noqa: E402
from nanofm.config import config_to_dict, fill_unset, parse_config  # noqa: E402
from nanofm.data import PreferenceLoader, RowLoader  # noqa: E402
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.model import Transformer, token_logprobs  # noqa: E402
from nanofm.tokenizer import Tokenizer  # noqa: E402
from nanofm.train import Run, TrainConfig, plot_metrics, setup, teardown, train, wrap_model  # noqa: E402

ALGOS = ("rm", "dpo", "ppo", "grpo")
# what a setting left out means for each algorithm: measured on the tiny default model (README, stage 6)
ALGO_DEFAULTS = {
    "rm": {"max_iters": 500, "lr": 1e-3, "batch_size": 16},
    "dpo": {"max_iters": 300, "lr": 1e-4, "batch_size": 16},
    # ppo: rollouts of batch_size * minibatches questions, each used for ppo_epochs passes (8 steps)
    "ppo": {"max_iters": 200, "lr": 1e-4, "batch_size": 16, "minibatches": 2, "ppo_epochs": 4, "kl_coef": 0.05},
    # grpo: rollouts of batch_size * minibatches questions * group_size replies, each used for 2 passes (4 steps)
    "grpo": {"max_iters": 60, "lr": 3e-4, "batch_size": 8, "minibatches": 2, "ppo_epochs": 2, "kl_coef": 0.0},
}


@dataclass
class RLHFConfig(TrainConfig):
    """Align a chat-tuned checkpoint: a reward model, DPO on preference pairs, PPO or GRPO on rewards."""
    algo: str = "dpo"  # rm (reward model) | dpo | ppo | grpo
    init_from: str = "out/sft"  # a chat-tuned checkpoint or run directory (train_sft.py's), or resume
    out_dir: str = ""  # "" = out/<algo>
    data: list[str] = field(default_factory=list)  # user pairs, repeatable: PATH.jsonl, hh:PATH, ultrafeedback:PATH, hf:NAME
    data_dir: str = ""  # curated corpus for the built-in pairs and questions; "" = the checkpoint's data_dir
    per_family: int = 500  # built-in training pairs (ppo, grpo: questions) per task family
    families: list[str] = field(default_factory=lambda: list(instructions.FAMILIES))  # built-in task families to use
    safety_pairs: bool = True  # rm, dpo: add the built-in tone and safety pairs (nanofm/safety.py: refuse, helpful, polite)
    safety_repeat: int = 4  # rm, dpo: each tone and safety training pair this many times (they are few beside the families'; 1 gave refusals 0.12)
    val_pairs: int = 20  # held-out pairs (questions) per family for the held-out numbers
    seq_len: int = 256  # tokens per prompt + reply; longer ones are cut (and counted)
    beta: float = 0.1  # DPO: strength of the pull towards the reference (the implicit KL coefficient)
    sft_coef: float = 1.0  # DPO: + this x the chosen replies' NLL per token (RPO, Pang et al. 2024); 0 = plain DPO
    # PPO and GRPO: roll out, score, then ppo_epochs passes over the rollout in minibatches of batch_size questions
    reward_model: str = ""  # ppo: a reward model (--algo=rm's out_dir) scores replies; "" = exact answers
    prompts: str = ""  # ppo, grpo: your prompts instead of the built-in questions (JSONL: prompt or messages, optional answer)
    reward: str = ""  # ppo, grpo: your reward function, module:function or file.py:function, f(prompt, reply, item) -> float
    group_size: int = 8  # grpo: replies per question (their mean and std make the baseline)
    partial_credit: float = 0.0  # ppo, grpo exact answers: a wrong word-list reply earns this x its share of words in place
    skip_equal_groups: bool = True  # grpo: leave out of the loss the groups whose replies all got one reward (DAPO's filter)
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 32  # longest sampled reply
    ppo_epochs: Optional[int] = None  # passes over each rollout (ppo 4, grpo 2)
    minibatches: Optional[int] = None  # optimizer steps per pass (ppo 2, grpo 2)
    clip: float = 0.2  # ratio clip of the policy loss
    clip_high: float = 0.0  # upper ratio clip, 1 + this; 0 = --clip (symmetric). DAPO's clip-higher uses 0.28
    target_kl: float = 0.05  # approx. KL to the sampling policy past 1.5x this ends a rollout's epochs (0: never)
    kl_coef: Optional[float] = None  # ppo: k1 KL penalty per token in the reward (0.05); grpo: k3 KL in the loss (0)
    value_coef: float = 0.1  # ppo: weight of the value loss (the critic shares the policy's body)
    value_clip: float = 0.2  # ppo: how far a value may move from the rollout's in one update
    gae_lambda: float = 0.95  # ppo: GAE's lambda (gamma is 1: one reply is one episode)
    # the loop's defaults, for alignment (None: the algorithm's, ALGO_DEFAULTS above)
    max_iters: Optional[int] = None  # optimizer steps (rm 500, dpo 300, ppo 200, grpo 60)
    batch_size: Optional[int] = None  # pairs (ppo, grpo: questions) per micro-step per process (rm, dpo, ppo 16; grpo 8)
    lr: Optional[float] = None  # peak learning rate (rm 1e-3: a new head; dpo, ppo 1e-4; grpo 3e-4)
    warmup_iters: int = 10  # linear warmup steps
    eval_interval: int = 100  # evaluate every N steps (and at the end)
    weight_decay: float = 0.0  # AdamW weight decay
    sample_tokens: int = 0  # no free samples: the evaluation generates answers
    dropout: Optional[float] = 0.0  # dropout off: the policy must score its samples as it sampled them (DPO: as the reference)

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        fill_unset(self, ALGO_DEFAULTS[self.algo])
        super().__post_init__()
        if not self.out_dir:
            self.out_dir = f"out/{self.algo}"
        if not 0 < self.beta <= 10:
            raise ConfigError(f"--beta must be in (0, 10], got {self.beta}")
        if not 0 <= self.sft_coef <= 100:
            raise ConfigError(f"--sft_coef must be in [0, 100], got {self.sft_coef}")
        if not 1 <= self.per_family <= instructions.MAX_PER_FAMILY:
            raise ConfigError(f"--per_family must be in [1, {instructions.MAX_PER_FAMILY}], got {self.per_family}")
        instructions.check_families(self.families)
        if self.group_size < 2:
            raise ConfigError(f"--group_size must be at least 2 (the group is the baseline), got {self.group_size}")
        if self.algo in ("ppo", "grpo"):
            problems = [message for bad, message in (
                (not 0 <= self.kl_coef <= 10, f"--kl_coef must be in [0, 10], got {self.kl_coef}"),
                (not 0 < self.clip < 1, f"--clip must be in (0, 1), got {self.clip}"),
                (self.clip_high < 0, f"--clip_high must be >= 0 (0: the same as --clip), got {self.clip_high}"),
                (not 0 < self.value_clip, f"--value_clip must be > 0, got {self.value_clip}"),
                (not 0 <= self.gae_lambda <= 1, f"--gae_lambda must be in [0, 1], got {self.gae_lambda}"),
                (self.target_kl < 0 or self.value_coef < 0, "--target_kl and --value_coef must be >= 0"),
                (self.temperature <= 0, f"--temperature must be > 0, got {self.temperature}"),
                (self.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                (self.ppo_epochs < 1 or self.minibatches < 1, "--ppo_epochs and --minibatches must be >= 1"),
                (self.reward_model and self.algo != "ppo", "--reward_model scores PPO's replies; GRPO uses exact answers"),
                (self.reward_model and self.reward, "give --reward_model or --reward, not both"),
                (not 0 <= self.partial_credit < 1, f"--partial_credit must be in [0, 1) (an exact answer earns 1), got {self.partial_credit}"),
            ) if bad]
            if problems:
                raise ConfigError("; ".join(problems))
        if (self.prompts or self.reward) and self.algo not in ("ppo", "grpo"):
            raise ConfigError(f"--prompts and --reward are for --algo=ppo or grpo (rewarded sampling), not {self.algo}")
        if self.safety_repeat < 1:
            raise ConfigError(f"--safety_repeat must be >= 1 (--safety_pairs=false leaves them out), got {self.safety_repeat}")
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
    if model.cfg.value_head:  # a PPO checkpoint: its critic is dropped (PPO gives itself a new one)
        model = model.with_value_head(False)
    return model, tokenizer, meta, str(parent), None


def preference_pairs(cfg: RLHFConfig, data_dir: str) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): user data (a tenth held out) or the built-in pairs."""
    if cfg.data:
        pairs = [pair for spec in cfg.data for pair in preferences.load(spec)]
        split = max(1, len(pairs) // 10)
        return pairs[split:], pairs[:split]
    families = tuple(cfg.families)
    train_pairs = preferences.builtin(data_dir, "train", per_family=cfg.per_family, seed=cfg.seed, families=families)
    held_out = preferences.builtin(data_dir, "val", per_family=cfg.val_pairs, seed=cfg.seed, families=families)
    if cfg.safety_pairs:  # every tone and safety pair (a few hundred), and every held-out one
        train_pairs = train_pairs + safety.pairs("train", cfg.seed) * cfg.safety_repeat
        held_out = held_out + safety.pairs("val", cfg.seed)
    return train_pairs, held_out


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
        if self.cfg.sft_coef > 0:  # RPO: keep the chosen replies likely (plain DPO can lower both replies)
            nll = -logp[:b].sum() / (batch[1][:b] != -100).sum().clamp(min=1)
            loss = loss + self.cfg.sft_coef * nll
            stats["chosen_nll"] = nll.item()
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
            if self.cfg.safety_pairs:  # held-out tone and safety prompts: refusals, over-refusals, polite replies
                rates = safety.measure(engine, safety.prompts("val", self.cfg.seed))
                results.update({f"val_{k}": rates[k] for k in ("refusal_rate", "over_refusal_rate", "polite_share")})
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


class ExactAnswer:
    """The programmatic reward of the verifiable families: 1 for an exact answer, else 0, or with
    `partial` > 0 that times the share of words in the right place (instructions.partial_credit) for
    the families whose answer is a list of words: a reply with one word out of place then beats one
    with none right, where exact match gives both 0 and the group no signal."""

    def __init__(self, partial: float = 0.0):
        self.partial = partial

    def __call__(self, items: list[dict], replies: list[str], x, attention) -> torch.Tensor:
        scores = []
        for item, reply in zip(items, replies):
            answer = item["messages"][-1]["content"]
            exact = instructions.exact_match(reply, answer)
            scores.append(1.0 if exact else self.partial * instructions.partial_credit(item["family"], reply, answer))
        return torch.tensor(scores)


class LearnedReward:
    """A reward model's score (train_rlhf.py --algo=rm) of prompt + reply, read at the last real token."""

    def __init__(self, path: str, tokenizer: Tokenizer, ctx):
        directory = resolve(path)
        if not (directory / "tokenizer.json").exists() or not Tokenizer.load(directory).same_as(tokenizer):
            raise ConfigError(f"the reward model {directory} was trained with another tokenizer than the policy; "
                              f"train it from the same SFT checkpoint: python train_rlhf.py --algo=rm")
        meta = read_meta(directory)
        if meta.get("algorithm") != "rm":
            raise ConfigError(f"{directory} is not a reward model (its algorithm is {meta.get('algorithm')!r}); "
                              f"make one with: python train_rlhf.py --algo=rm")
        self.model, _ = load_model(directory)
        self.model = self.model.to(ctx.device).eval().requires_grad_(False)
        self.ctx, self.path = ctx, str(directory)

    @torch.no_grad()
    def __call__(self, items: list[dict], replies: list[str], x, attention) -> torch.Tensor:
        with self.ctx.autocast():
            return self.model(x, attention_mask=attention, head="classify")[0][:, 0].float().cpu()


class Rollouts(RowLoader):
    """PPO's and GRPO's data. Every rollout: the next questions (this rank's share, in RowLoader's
    seeded order), answered by the current policy through the engine (GRPO: group_size times
    each), scored by the reward, and turned into per-token training targets:
    - ppo: the policy's and the reference's log-probabilities and the values of the sampled
      tokens, per-token rewards -kl_coef (logp - ref_logp) with the score added at the last
      token, GAE advantages (gamma 1: the episode is one reply; lambda --gae_lambda), whitened;
    - grpo: the group advantage of each reply on every one of its tokens.
    Then each step takes one minibatch, ppo_epochs passes over the rollout in a seeded shuffle,
    until the objective calls stop_epochs (the KL target) or the rollout is used up.
    Sampling is seeded by (seed, rollout, rank, row) and the rollout itself is part of the saved
    state, so a resumed run continues exactly."""

    what = "questions"

    def __init__(self, questions: list[dict], policy, reward, reference, tokenizer: Tokenizer, cfg: RLHFConfig, ctx):
        self.rows, self.policy, self.reward, self.reference = questions, policy, reward, reference
        self.tokenizer, self.cfg, self.ctx = tokenizer, cfg, ctx
        self.samples = cfg.group_size if cfg.algo == "grpo" else 1
        self._init_rows(cfg.batch_size * cfg.minibatches, ctx.rank, ctx.world_size, ctx.device, cfg.seed)
        self.rollout, self.buffer, self.schedule, self.stats = 0, None, [], {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rollout": self.rollout, "buffer": self.buffer, "schedule": self.schedule,
                "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rollout, self.buffer, self.schedule, self.stats = (int(state["rollout"]), state["buffer"],
                                                                list(state["schedule"]), state["stats"])

    def stop_epochs(self) -> None:
        """The policy moved far enough from the one that sampled: the next step rolls out anew."""
        self.schedule = []

    def next_batch(self) -> dict:
        if not self.schedule:
            self.buffer, self.stats = self.roll_out()
            self.schedule = self.plan(len(self.buffer["x"]))
            self.rollout += 1
        rows = torch.tensor(self.schedule.pop(0))
        return {**{k: v[rows].to(self.ctx.device) for k, v in self.buffer.items()}, "rollout_stats": self.stats}

    def plan(self, n_rows: int) -> list[list[int]]:
        """ppo_epochs seeded shuffles of the rollout's rows, each cut into --minibatches parts."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.rollout * 104_729 + self.ctx.rank)
        size = n_rows // self.cfg.minibatches
        return [order[i:i + size].tolist() for _ in range(self.cfg.ppo_epochs)
                for order in [torch.randperm(n_rows, generator=generator)] for i in range(0, n_rows, size)]

    def sample(self, items: list[dict], temperature: float, seed: int, samples: int = 1):
        """Replies to `items` (each `samples` times): the engine's completions, and the rows
        (x, y, attention) the losses read, right-padded, with -100 outside the replies."""
        from nanofm.data import pad_batch
        from nanofm.engine import SamplingParams
        prompts = [chat.render_prompt(self.tokenizer, item["messages"][:-1]) for item in items for _ in range(samples)]
        params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                 seed=seed * 1_000_003 + self.ctx.rank * 1009 + i) for i in range(len(prompts))]
        engine = Engine(self.policy, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype, batch_size=len(prompts))
        outs = engine.generate(prompts, params)
        self.policy.train()
        x, attention = pad_batch([p + o.token_ids[:-1] for p, o in zip(prompts, outs)], value=self.tokenizer.pad_id)
        y, _ = pad_batch([[-100] * (len(p) - 1) + o.token_ids for p, o in zip(prompts, outs)], value=-100)
        return outs, x.to(self.ctx.device), y.to(self.ctx.device), attention.to(self.ctx.device)

    @torch.no_grad()
    def roll_out(self) -> tuple[dict, dict]:
        cfg, vocab = self.cfg, self.tokenizer.vocab_size
        items = [item for item in self._next_rows() for _ in range(self.samples)]
        outs, x, y, attention = self.sample(items[::self.samples], cfg.temperature, cfg.seed + 10_007 * self.rollout,
                                           self.samples)
        mask = (y != -100).float()
        self.policy.eval()
        with self.ctx.autocast():
            if cfg.algo == "ppo":
                logits, values = self.policy(x, head="values")
            else:
                logits, values = self.policy(x)[0], torch.zeros_like(mask)
            # the distribution that sampled (logits / temperature), for the policy and the reference alike
            logp = token_logprobs(logits / cfg.temperature, y, vocab)
            ref_logp = token_logprobs(self.reference(x)[0] / cfg.temperature, y, vocab)
        self.policy.train()
        scores = self.reward(items, [o.text for o in outs], x, attention).to(mask.device)
        kl = (logp - ref_logp) * mask  # k1 per token: its sum over a reply estimates KL(policy || reference)
        if cfg.algo == "ppo":
            rewards = -cfg.kl_coef * kl
            last = mask.size(1) - 1 - mask.flip(1).argmax(1)  # the last generated token of each row
            rewards[torch.arange(len(rewards)), last] += scores
            advantages, returns = rlhf.gae(rewards, values.float() * mask, mask, gamma=1.0, lam=cfg.gae_lambda)
            advantages = rlhf.whiten(advantages, mask)
        else:
            groups = scores.view(-1, self.samples)
            advantages = rlhf.group_advantages(groups).view(-1, 1) * mask
            returns = torch.zeros_like(mask)
            # a group whose replies all scored alike has zero advantage everywhere: it teaches nothing but
            # would still count in the per-token mean (and the KL term). DAPO drops such groups; DAPO also
            # samples more to refill the batch, which we do not: a rollout just has fewer rows that count
            informative = (groups.max(-1).values > groups.min(-1).values).repeat_interleave(self.samples)
            if cfg.skip_equal_groups:
                mask = mask * informative.to(mask.dtype)[:, None]
        buffer = {"x": x, "y": y, "mask": mask, "old_logp": logp * mask, "ref_logp": ref_logp * mask,
                  "values": values.float() * mask, "advantages": advantages, "returns": returns}
        lengths = (y != -100).float().sum(1)  # every sampled reply, counted or not in the loss
        stats = {"reward": scores.mean().item(), "kl": kl.sum(1).mean().item(), "response_length": lengths.mean().item(),
                 "stopped": sum(o.finish_reason == "stop" for o in outs) / len(outs)}
        if cfg.algo == "grpo":
            stats["informative_groups"] = informative.float().mean().item()
        return {k: v.cpu() for k, v in buffer.items()}, stats


class PolicyGradient:
    """PPO's and GRPO's loss on a minibatch of a rollout: the clipped policy loss on the sampled
    tokens' advantages, plus (ppo) the clipped value loss, or (grpo, with --kl_coef) the k3 KL to
    the reference. A minibatch whose approximate KL to the sampling policy passes 1.5 --target_kl
    ends the rollout's epochs (after its update). Evaluated by greedy exact match on held-out
    questions, and with a reward model by its mean score of the greedy replies."""

    def __init__(self, cfg: RLHFConfig, ctx, tokenizer: Tokenizer, rollouts: Rollouts, questions: list[dict],
                 chat_format: str):
        self.cfg, self.ctx, self.tokenizer, self.rollouts = cfg, ctx, tokenizer, rollouts
        self.questions, self.chat_format = questions, chat_format

    def loss(self, model, batch, step):
        cfg, mask = self.cfg, batch["mask"]
        if cfg.algo == "ppo":
            logits, values = model(batch["x"], head="values")
        else:
            logits, values = model(batch["x"])[0], None
        logits = logits / cfg.temperature  # on-policy: the distribution the rollout sampled from
        logp = token_logprobs(logits, batch["y"], self.tokenizer.vocab_size)
        loss, stats = rlhf.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip,
                                           cfg.clip_high or None)
        if values is not None:
            value_loss = rlhf.ppo_value_loss(values, batch["values"], batch["returns"], mask, cfg.value_clip)
            loss = loss + cfg.value_coef * value_loss
            stats["value_loss"] = value_loss.item()
        elif cfg.kl_coef > 0:
            kl = rlhf.masked_mean(rlhf.kl_k3(logp, batch["ref_logp"]), mask)
            loss = loss + cfg.kl_coef * kl
            stats["kl_k3"] = kl.item()
        with torch.no_grad():
            log_probs = torch.log_softmax(logits[..., :self.tokenizer.vocab_size].float(), dim=-1)
            stats["entropy"] = rlhf.masked_mean(-(log_probs.exp() * log_probs).sum(-1), mask).item()
        approx_kl = torch.tensor(stats["approx_kl"], device=mask.device)
        if self.ctx.ddp:  # every rank stops the epochs at the same step
            torch.distributed.all_reduce(approx_kl)
            approx_kl /= self.ctx.world_size
        stats["early_stop"] = float(cfg.target_kl > 0 and approx_kl.item() > 1.5 * cfg.target_kl)
        if stats["early_stop"]:
            self.rollouts.stop_epochs()
        return loss, int(mask.sum()), {**stats, **batch["rollout_stats"]}

    def evaluate(self, model) -> dict:
        """Greedy exact match on the held-out questions (eval.py's instructions task), and the
        held-out reward: the mean reward of VAL_SAMPLES sampled replies per question at the
        rollouts' temperature (what training raises; fixed seeds, so every evaluation draws alike)."""
        raw = getattr(model, "module", model)
        results = {}
        if self.questions and self.ctx.master:
            engine = Engine(raw, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype)
            if self.questions[0]["family"] != rewards.FAMILY:
                results["val_exact_match"] = tasks.instruction_task(engine, self.questions, self.chat_format)["mean_exact_match"]
            elif all(q["answer"] is not None for q in self.questions):  # the user's prompts, where they give answers
                prompts = [chat.render_prompt(self.tokenizer, q["messages"][:-1]) for q in self.questions]
                outs = engine.generate(prompts, SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=0))
                results["val_exact_match"] = sum(instructions.exact_match(o.text.strip(), q["answer"])
                                                 for o, q in zip(outs, self.questions)) / len(outs)
            items = [q for q in self.questions for _ in range(VAL_SAMPLES)]
            outs, x, _, attention = self.rollouts.sample(self.questions, self.cfg.temperature, self.cfg.seed, VAL_SAMPLES)
            scores = self.rollouts.reward(items, [o.text for o in outs], x, attention)
            results["val_reward"] = scores.mean().item()
            if isinstance(self.rollouts.reward, ExactAnswer):  # pass@k: is one of k sampled replies exactly right?
                right = (scores.view(-1, VAL_SAMPLES) >= 1.0).sum(1).tolist()
                for k in (1, VAL_SAMPLES):
                    results[f"val_pass@{k}"] = sum(metrics.pass_at_k(VAL_SAMPLES, c, k) for c in right) / len(right)
            raw.train()
        return results


VAL_SAMPLES = 4  # sampled replies per held-out question for the held-out reward


def main(argv=None) -> dict:
    cfg = parse_config(RLHFConfig, argv, description=__doc__.split("\n\n")[0])
    ctx = setup(cfg)
    model, tokenizer, parent_meta, parent, resume_from = load_start(cfg)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    data_dir = cfg.data_dir or parent_meta.get("data_dir") or str(ROOT / "data" / "default")
    reference = parent if resume_from is None else parent_meta.get("reference")
    checkable = tuple(f for f in cfg.families if f in instructions.CHECKABLE)
    if cfg.algo in ("ppo", "grpo"):
        if cfg.data:
            raise ConfigError(f"{cfg.algo.upper()} learns from rewards of sampled replies, on the built-in questions; "
                              f"--data (preference pairs) is for rm and dpo")
        if cfg.algo == "ppo" and resume_from is None:
            model = model.with_value_head()  # the critic: a scalar head on the policy's body
        model = model.to(ctx.device)
        if cfg.prompts:  # the user's prompts: a tenth (at least one) held out, drawn with the seed
            questions = rewards.read_prompts(cfg.prompts)
            if len(questions) < 2:
                raise ConfigError(f"{cfg.prompts} holds {len(questions)} prompt; give at least 2 (a tenth is held out)")
            if not cfg.reward and any(q["answer"] is None for q in questions):
                missing = next(q["where"] for q in questions if q["answer"] is None)
                raise ConfigError(f"{missing} has no 'answer', and without --reward the reward is exact match against it; "
                                  f"add answers or pass --reward module:function")
            import random
            random.Random(cfg.seed).shuffle(questions)
            held = max(1, len(questions) // 10)
            questions, held_questions = questions[held:], questions[:held]
        else:
            # exact answers reward only the checkable families; a reward model or function scores any prompt
            families = tuple(cfg.families) if cfg.reward_model or cfg.reward else checkable
            if not families:
                raise ConfigError("--families has no checkable family for exact-answer rewards; add one or pass --reward_model")
            questions = instructions.builtin(data_dir, "train", per_family=cfg.per_family, seed=cfg.seed, families=families)
            held_questions = instructions.builtin(data_dir, "val", per_family=cfg.val_pairs, seed=cfg.seed, families=checkable)
        room = min(cfg.seq_len, model.cfg.block_size) - cfg.max_new_tokens  # a prompt must leave room for the reply

        def fitting(items):
            return [q for q in items if len(chat.render_prompt(tokenizer, q["messages"][:-1])) <= room]
        dropped, questions, held_questions = len(questions), fitting(questions), fitting(held_questions)
        dropped -= len(questions)
        if not questions:
            raise ConfigError(f"no question leaves room for --max_new_tokens={cfg.max_new_tokens} in --seq_len={cfg.seq_len}")
        reward = (rewards.UserReward(cfg.reward) if cfg.reward else LearnedReward(cfg.reward_model, tokenizer, ctx)
                  if cfg.reward_model else ExactAnswer(cfg.partial_credit))
        # the frozen starting point (on resume: the run's recorded reference): the KL is always measured
        reference_model, _, _ = load_for_training(reference, tokenizer)
        reference_model = reference_model.to(ctx.device).eval().requires_grad_(False)
        train_loader = Rollouts(questions, model, reward, reference_model, tokenizer, cfg, ctx)
        objective = PolicyGradient(cfg, ctx, tokenizer, train_loader, held_questions, parent_meta.get("chat_format"))
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
    reward_source = None
    if cfg.algo in ("ppo", "grpo"):
        reward_source = (f"function:{cfg.reward}" if cfg.reward else str(resolve(cfg.reward_model)) if cfg.reward_model
                         else "exact_match")
    meta = make_meta(stage="rlhf", objective="reward_model" if cfg.algo == "rm" else cfg.algo, model=models.raw.cfg,
                     config=config_to_dict(cfg), tokenizer=tokenizer.name, data_dir=data_dir, parent=parent,
                     parent_meta=parent_meta, algorithm=cfg.algo, reference=reference,
                     data=cfg.data or ([cfg.prompts] if cfg.prompts else ["builtin"]),
                     labels=["score"] if cfg.algo == "rm" else None, reward=reward_source)
    if ctx.master:
        what = f"questions ({dropped} left out: too long)" if cfg.algo in ("ppo", "grpo") else (f"pairs ({train_loader.truncated} replies cut to {cfg.seq_len} "
                                                       f"tokens, {train_loader.dropped} left out: the prompt fills it)")
        print(f"{cfg.algo}: {len(train_pairs):,} {what}, {len(held_out):,} held out; from {parent}")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save(Path(scratch) / "tokenizer.json")
        run = Run(Path(cfg.out_dir), meta, tokenizer_path=Path(scratch) / "tokenizer.json", resume_from=resume_from)
        result = train(cfg, ctx, models, objective, train_loader, run)
    if ctx.master and cfg.algo in ("ppo", "grpo"):  # the RL curves: is the reward rising, and at what KL and length?
        plot_metrics({cfg.algo: run.out_dir / "metrics.jsonl"}, ["reward", "kl", "response_length", "val_exact_match"],
                     run.out_dir / "curves.png", title=f"{cfg.algo} from {parent}")
    teardown(ctx)
    result["truncated"] = getattr(train_loader, "truncated", 0)
    return result


if __name__ == "__main__":
    run_cli(main)
