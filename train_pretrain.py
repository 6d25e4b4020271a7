"""Stages 3-4: pretrain a Transformer, causal LM (GPT) or masked LM (BERT), on token shards.

    python train_pretrain.py                                    # built-in corpus, whatever device is here
    python train_pretrain.py --objective=mlm                    # a BERT-style model
    python train_pretrain.py --preset=small --max_iters=2000 --out_dir=out/small
    python train_pretrain.py --init_from=resume --out_dir=out/pretrain   # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset=gpt2 --batch_size=16
    python train_pretrain.py --help                             # every setting

With no arguments it prepares the built-in data if it is missing (data/prepare.py), trains the
`tiny` preset on CPU (`gpt2` on a GPU), prints samples, and saves checkpoints in out/pretrain/.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm.checkpoint import CheckpointError, load_for_training, make_meta  # noqa: E402
from nanofm.common import ConfigError, run_cli  # noqa: E402
from nanofm.config import config_to_dict, parse_config  # noqa: E402
from nanofm.data import (MixedLoader, ShardError, TokenLoader, check_token_ids, mask_tokens, read_header,  # noqa: E402
                         copy_rows, shard_paths, unigram_entropy)
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.model import ModelConfig, Transformer, padded_vocab  # noqa: E402
from nanofm.tasks import TaskError, induction_task, val_docs  # noqa: E402
from nanofm.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from nanofm.train import (Run, TrainConfig, evaluate_nll, setup, teardown, token_byte_lengths, train,  # noqa: E402
                          wrap_model)


@dataclass
class PretrainConfig(TrainConfig):
    """Pretrain (or keep pretraining) a Transformer on token shards from data/prepare.py."""
    objective: str = "clm"  # clm (causal LM, GPT) | mlm (masked LM, BERT)
    lr: float = 0.0  # peak learning rate; 0 = by size: 2e-3 below 50M parameters, 6e-4 above
    preset: str = "auto"  # model preset; auto = tiny on CPU/MPS, gpt2 on CUDA (see nanofm/model.py)
    data_dir: str = "data/default"  # token shards and tokenizer from data/prepare.py
    out_dir: str = "out/pretrain"  # checkpoints, metrics.jsonl, loss.png
    init_from: str = "scratch"  # scratch | resume (the latest checkpoint in out_dir) | a checkpoint directory
    seq_len: int = 0  # tokens per sequence; 0 = the model's context length
    # MLM: share of tokens chosen for prediction. 50%, not BERT's 15% (Wettig et al. 2022): at the default
    # CPU budget 15% ends above the unigram entropy (7.40 vs 7.25 nats); more masked tokens, more signal per
    # step. Under eval.py's fixed 15% masks, prose: 30% 6.82, 40% 6.73, 50% 6.66 nats (README, stage 3-4)
    mask_prob: float = 0.5
    # copying random tokens trains induction heads, which natural text alone did not grow at a CPU budget (README)
    copy_rows: float = 0.0  # clm: share of training rows replaced by random ordinary tokens repeated (the induction task)
    replay_dir: str = ""  # continued pretraining: old data (same tokenizer) mixed into every batch
    replay_ratio: float = 0.0  # share of each batch's rows taken from --replay_dir, in [0, 1)
    eval_dirs: list[str] = field(default_factory=list)  # more data dirs whose val split is evaluated too (old domains)
    # model overrides (none = the preset's value)
    n_layer: Optional[int] = None  # Transformer blocks
    n_head: Optional[int] = None  # attention heads
    n_embd: Optional[int] = None  # width
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention; = n_head for none)
    tie_embeddings: Optional[bool] = None  # share the input embedding and the output head
    block_size: Optional[int] = None  # context length
    dropout: Optional[float] = None  # dropout probability

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("clm", "mlm"):
            raise ConfigError(f"--objective must be clm or mlm, got {self.objective!r}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"--mask_prob must be between 0 and 1, got {self.mask_prob}")
        if not 0 <= self.copy_rows < 1:
            raise ConfigError(f"--copy_rows must be in [0, 1), got {self.copy_rows}")
        if not 0 <= self.replay_ratio < 1:
            raise ConfigError(f"--replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_ratio > 0 and not self.replay_dir:
            raise ConfigError("--replay_ratio needs --replay_dir (the old data to replay)")
        if self.seq_len < 0:
            raise ConfigError(f"--seq_len must be >= 0 (0 = the model's context), got {self.seq_len}")
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.replay_ratio > 0 and round(self.replay_ratio * self.batch_size) in (0, self.batch_size):
            raise ConfigError(f"--replay_ratio {self.replay_ratio} x --batch_size {self.batch_size} must leave at least "
                              f"one row for each of the new and the replayed data")


def ensure_data(cfg: PretrainConfig, master: bool) -> None:
    """The built-in corpus is (re)built on use: data/prepare.py skips its finished steps in a fraction
    of a second, and refuses a data/default made with older settings (a tokenizer from before
    split_digits) with the fix in its message. Any other data dir is the user's to make."""
    data_dir = Path(cfg.data_dir)
    if data_dir.resolve() != (ROOT / "data" / "default").resolve():
        if not ((data_dir / "tokenizer.json").exists() and list(data_dir.glob("train_*.bin"))):
            raise ShardError(f"{data_dir} holds no tokenizer and shards; make them with: python data/prepare.py --out {data_dir} ...")
        return
    if master:
        if not (data_dir / "tokenizer.json").exists():
            print(f"{data_dir} is missing: preparing the built-in corpus first (python data/prepare.py)")
        done = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py")], stdout=subprocess.DEVNULL
                              if (data_dir / "tokenizer.json").exists() else None)
        if done.returncode != 0:
            raise ShardError(f"data/prepare.py could not bring {data_dir} up to date (its error is above)")


def build_model(cfg: PretrainConfig, tokenizer: Tokenizer, device_type: str) -> tuple[Transformer, dict | None, str | None]:
    """(model, meta of the checkpoint it starts from or None, that checkpoint's path or None)"""
    overrides = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                     block_size=cfg.block_size, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)
    if cfg.init_from == "scratch":
        preset = cfg.preset if cfg.preset != "auto" else ("gpt2" if device_type == "cuda" else "tiny")
        if cfg.objective == "mlm":
            overrides["causal"] = False
        elif preset == "bert-base":
            raise ConfigError("the bert-base preset is bidirectional: use it with --objective=mlm")
        return Transformer(ModelConfig.preset(preset, vocab_size=padded_vocab(tokenizer.vocab_size), **overrides)), None, None
    # a checkpoint, the latest of out_dir, or a Hugging Face GPT-2 / Llama / BERT directory
    model, meta, source = load_for_training(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from, tokenizer)
    if model.cfg.causal != (cfg.objective == "clm"):
        raise ConfigError(f"{source} is a {'causal' if model.cfg.causal else 'bidirectional'} model; "
                          f"it cannot be trained with --objective={cfg.objective}")
    asked = {k: v for k, v in overrides.items() if v is not None and k != "dropout"}
    differs = {k: (getattr(model.cfg, k), v) for k, v in asked.items() if getattr(model.cfg, k) != v}
    if differs:
        raise CheckpointError(f"{source} has a different shape than asked: "
                              + ", ".join(f"{k}={a} (asked {b})" for k, (a, b) in differs.items()))
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    return model, meta, str(source)


def check_data_tokenizers(cfg: PretrainConfig, tokenizer: Tokenizer) -> None:
    """Every data source must share one tokenizer: ids mean nothing across two. (The starting
    checkpoint's is checked when it is loaded.)"""
    for other in ([cfg.replay_dir] if cfg.replay_dir else []) + list(cfg.eval_dirs):
        if not Tokenizer.load(other).same_as(tokenizer):
            raise TokenizerError(f"{other} and {cfg.data_dir} use different tokenizers; prepare one with the other's: "
                                 f"python data/prepare.py --tokenizer {cfg.data_dir}/tokenizer.json --out {other} ...")


class LanguageModeling:
    """The pretraining objective: next-token (clm) or masked-token (mlm) cross-entropy; evaluated
    as validation loss and bits per byte on the data dir and on each extra one (old domains)."""

    def __init__(self, cfg: PretrainConfig, ctx, tokenizer: Tokenizer, raw_model: Transformer, seq_len: int):
        self.cfg, self.ctx, self.tokenizer, self.seq_len = cfg, ctx, tokenizer, seq_len
        self.raw_model, self.model_cfg = raw_model, raw_model.cfg  # the plain model (not compiled or DDP) for probes
        try:  # validation documents for the text copying score
            self.val_documents = val_docs(cfg.data_dir) if raw_model.cfg.causal else []
        except TaskError:  # shards without curated.jsonl (made elsewhere): the random-token score alone
            self.val_documents = []
        self.specials = sorted(tokenizer.special_tokens.values())
        self.token_bytes = token_byte_lengths(tokenizer, ctx.device)
        extra = dict.fromkeys(([cfg.replay_dir] if cfg.replay_dir else []) + list(cfg.eval_dirs))
        self.val_dirs = {"": cfg.data_dir, **{Path(d).name: d for d in extra}}
        for data_dir in self.val_dirs.values():  # fail now, not at the first evaluation
            self.val_loader(data_dir)

    def val_loader(self, data_dir):  # a small validation split may not hold a full step: evaluate on fewer rows
        ctx = self.ctx
        val_tokens = sum(read_header(p)["tokens"] for p in shard_paths(data_dir, "val"))
        rows = max(1, min(self.cfg.batch_size, (val_tokens - 1) // (ctx.world_size * self.seq_len)))
        return TokenLoader(data_dir, "val", rows, self.seq_len, ctx.rank, ctx.world_size, ctx.device)

    def _inputs(self, batch, step):
        x, y = batch
        if self.cfg.objective == "mlm":  # a generator per (step, rank): the same masks after a resume
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + self.ctx.rank)
            x, y = mask_tokens(x, self.model_cfg.vocab_size, self.tokenizer.mask_id, self.specials, self.cfg.mask_prob,
                               generator)
        return x, y

    def loss(self, model, batch, step):
        x, y = self._inputs(batch, step)
        if self.cfg.objective == "clm" and self.cfg.copy_rows > 0:  # training rows only: validation is plain text
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + self.ctx.rank + 7)
            x, y = copy_rows(x, y, self.cfg.copy_rows, min(self.specials), generator)
        _, loss = model(x, y)
        return loss, (y != -100).sum(), {}

    def _nll_sum(self, model, batch, step):
        x, y = self._inputs(batch, step)
        _, loss = model(x, y)
        count = int((y != -100).sum())
        return loss * count, count, y

    def evaluate(self, model) -> dict:
        results = {}
        for name, data_dir in self.val_dirs.items():
            r = evaluate_nll(model, self._nll_sum, lambda d=data_dir: self.val_loader(d), self.cfg.eval_iters, self.ctx,
                             self.token_bytes)
            suffix = f"_{name}" if name else ""
            results[f"val_loss{suffix}"], results[f"val_bpb{suffix}"] = r["loss"], r["bpb"]
        # the copying score (eval.py's induction task): its jump is the induction-head phase change. FSDP: every
        # rank runs the forward
        if self.model_cfg.causal and (self.ctx.master or self.ctx.fsdp):
            copying = induction_task(self.raw_model, self.tokenizer, docs=self.val_documents)
            results["induction_score"] = copying["copying_score"]  # random tokens repeated
            if "text_copying_score" in copying:  # spans of validation text repeated
                results["text_induction_score"] = copying["text_copying_score"]
            self.raw_model.train()
        return results

    def sample(self, model) -> str | None:
        if not self.model_cfg.causal:
            return None
        # the shared engine; a fixed seed gives it its own generator, so the global RNG (and resume) is untouched
        params = SamplingParams(max_tokens=min(self.cfg.sample_tokens, self.model_cfg.block_size - 1), temperature=0.8,
                                top_k=50, seed=self.cfg.seed)
        return Engine(model, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype).generate(
            [[self.tokenizer.bos_id]], params)[0].text


def main(argv=None) -> dict:
    cfg = parse_config(PretrainConfig, argv, description=__doc__.split("\n\n")[0])
    ctx = setup(cfg)
    ensure_data(cfg, ctx.master)
    if ctx.ddp:
        torch.distributed.barrier()  # the other ranks wait for the data
    tokenizer = Tokenizer.load(cfg.data_dir)
    model, parent_meta, parent = build_model(cfg, tokenizer, ctx.device_type)
    check_data_tokenizers(cfg, tokenizer)
    for data_dir in [cfg.data_dir, cfg.replay_dir, *cfg.eval_dirs]:  # a corrupt shard fails now, naming its file
        if data_dir:
            check_token_ids(data_dir, tokenizer.vocab_size)
    mcfg = model.cfg
    seq_len = cfg.seq_len or mcfg.block_size
    if seq_len > mcfg.block_size:
        raise ConfigError(f"--seq_len {seq_len} is longer than the model's context ({mcfg.block_size})")
    if not cfg.lr:  # small models learn faster with a larger step; GPT-2-sized ones need 6e-4
        cfg.lr = 2e-3 if model.num_params() < 50e6 else 6e-4
    models = wrap_model(model, cfg, ctx)

    def train_rows(data_dir, rows):
        return TokenLoader(data_dir, "train", rows, seq_len, ctx.rank, ctx.world_size, ctx.device)

    if cfg.replay_ratio > 0:  # some rows of every batch from the old data
        replay_rows = round(cfg.replay_ratio * cfg.batch_size)
        train_loader = MixedLoader(train_rows(cfg.data_dir, cfg.batch_size - replay_rows),
                                   train_rows(cfg.replay_dir, replay_rows))
    else:
        train_loader = train_rows(cfg.data_dir, cfg.batch_size)
    objective = LanguageModeling(cfg, ctx, tokenizer, models.raw, seq_len)

    meta = make_meta(stage="pretrain", objective=cfg.objective, model=mcfg, config=config_to_dict(cfg),
                     tokenizer=tokenizer.name, data_dir=str(cfg.data_dir), parent=parent, parent_meta=parent_meta)
    run = Run(Path(cfg.out_dir), meta, tokenizer_path=Path(cfg.data_dir) / "tokenizer.json",
              resume_from=Path(parent) if cfg.init_from == "resume" else None)
    if ctx.master:
        tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * ctx.world_size
        print(f"model: {models.raw.num_params(non_embedding=False) / 1e6:.2f}M parameters, "
              f"{'causal' if mcfg.causal else 'bidirectional'}, {mcfg.n_layer} layers x {mcfg.n_embd} wide, context {mcfg.block_size}; "
              f"device {ctx.device} x {ctx.world_size}, {str(ctx.dtype).replace('torch.', '')}; "
              f"{tokens_per_step:,} tokens per step")
    result = train(cfg, ctx, models, objective, train_loader, run)
    if ctx.master:
        entropy = unigram_entropy(cfg.data_dir)
        result["unigram_entropy"] = entropy
        print(f"done: validation loss {result.get('val_loss', float('nan')):.4f} nats/token "
              f"(unigram entropy of the data: {entropy:.4f}); checkpoint {result['checkpoint']}")
    teardown(ctx)
    return result


if __name__ == "__main__":
    run_cli(main)
