"""Stages 1-2: collect -> curate -> train the tokenizer -> write token shards.

    python data/prepare.py                          # the built-in corpus -> data/default/
    python data/prepare.py --input notes/ --input https://example.org/page.html --out data/mine
    python data/prepare.py --input hf:roneneldan/TinyStories --hub_max_docs 20000 --out data/stories
    python data/prepare.py --tokenizer gpt2          # GPT-2's encoding instead of training a BPE
    python data/prepare.py --help                    # every setting, curation thresholds included

Writes into --out:
    curated.jsonl   one document per line: id, text, source, domain, meta (licence, signals, ...)
    report.json     what came in, what each step removed and why, the mix, diversity, tokens
    report.png      length histograms, removals per step, domain mix, top removal reasons
    tokenizer.json  the BPE (readable: one merge per line)
    train_*.bin, val_*.bin   token shards (format in nanofm/data.py)
    prepare.json    the settings and the finished steps

Re-running is cheap: finished steps are skipped. Other settings on an existing --out are refused
unless --force, which rebuilds this script's own files and never touches anything else.
Across machines: run with --rank/--world_size to curate one shard of the sources per machine
(writes curated-RANK-of-WORLD.jsonl and stops, without mixing), then run once more with --input
on the folder of those files to dedup across shards, mix, train the tokenizer and write shards.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanofm.common import ConfigError, NanofmError, atomic_write_text, run_cli  # noqa: E402
from nanofm.config import config_to_dict, parse_config  # noqa: E402
from nanofm.curate import CurateConfig, curate, plot_report  # noqa: E402


@dataclass
class PrepareConfig(CurateConfig):
    """Collect, curate, tokenize. The curation thresholds (inherited) are listed by --help."""
    input: list[str] = field(default_factory=list)  # paths, URLs, .urls files, hf:NAME[:SPLIT], or builtin (the default)
    out: str = ""  # output directory (default: data/default for the built-in corpus, else required)
    tokenizer: str = "bpe"  # bpe (train one here), gpt2, or the path of a tokenizer.json
    vocab_size: int = 8192  # BPE vocabulary size, special tokens included (for --tokenizer=bpe)
    split_digits: bool = True  # BPE: every digit its own token (learnable arithmetic); false = GPT-4's 1-3 digit chunks
    tokenizer_max_chars: int = 50_000_000  # train the BPE on at most this many characters
    val_fraction: float = 0.02  # share of documents held out for validation
    shard_tokens: int = 50_000_000  # tokens per shard file
    hub_text_field: str = "text"  # the text field of hub datasets
    hub_max_docs: Optional[int] = None  # stop streaming a hub dataset after this many documents
    url_timeout: float = 10.0  # seconds per HTTP request (3 retries)
    force: bool = False  # rebuild finished steps, and allow other settings on an existing --out
    progress: bool = True  # progress bars

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.tokenizer == "bpe" and self.vocab_size < 512:
            raise ConfigError(f"--vocab_size must be at least 512 for a BPE, got {self.vocab_size}")


# Settings that change each step's output. A change invalidates that step and those after it.
STEP_SETTINGS = {
    "curate": [f for f in CurateConfig.__dataclass_fields__ if f not in ("num_workers", "examples_per_reason")]
              + ["input", "hub_text_field", "hub_max_docs"],
    "tokenizer": ["tokenizer", "vocab_size", "split_digits", "tokenizer_max_chars", "val_fraction"],
    "shards": ["shard_tokens"],
}
MANIFEST = "prepare.json"
# what a setting added later meant for directories made before it: such a directory is then read as
# made with that value (a data/default from before split_digits has GPT-4's digit chunks, so it is rebuilt)
SETTINGS_BEFORE = {"split_digits": False}


class PrepareError(NanofmError):
    pass


def manifest_name(cfg: PrepareConfig) -> str:
    # ranks of a sharded run may share one directory: each keeps its own record
    return f"prepare-{cfg.rank:05d}-of-{cfg.world_size:05d}.json" if cfg.world_size > 1 else MANIFEST


def output_names(cfg: PrepareConfig) -> list[str]:
    """The files this run writes (shards aside)."""
    if cfg.world_size > 1:
        part = f"{cfg.rank:05d}-of-{cfg.world_size:05d}"
        return [f"curated-{part}.jsonl", f"report-{part}.json", f"report-{part}.png", manifest_name(cfg)]
    return ["curated.jsonl", "report.json", "report.png", "tokenizer.json", MANIFEST]


def load_manifest(out: Path, cfg: PrepareConfig) -> dict:
    """The record of finished steps; refuse a directory we did not make or made with other settings."""
    path = out / manifest_name(cfg)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a directory")
    if not path.exists():
        if out.exists() and any(out.iterdir()) and not any(out.glob("prepare*.json")):
            raise PrepareError(f"--out {out} already holds files that data/prepare.py did not make; "
                               f"choose a new or empty directory (user files are never overwritten)")
        # another rank's record (prepare-*-of-*.json) does not make this run's outputs ours
        taken = [name for name in output_names(cfg) if (out / name).exists()] + [p.name for p in out.glob("train_*.bin")] \
            + [p.name for p in out.glob("val_*.bin")]
        if taken:
            raise PrepareError(f"--out {out} already holds {', '.join(taken[:3])}, which this run would write but "
                               f"data/prepare.py has no record of making; choose a new or empty directory "
                               f"(user files are never overwritten)")
        return {"settings": {}, "steps": {}}
    manifest = json.loads(path.read_text())
    settings = config_to_dict(cfg)
    made_with = {**{k: v for k, v in SETTINGS_BEFORE.items() if manifest["steps"]}, **manifest["settings"]}
    changed = [k for keys in STEP_SETTINGS.values() for k in keys if k in made_with and made_with[k] != settings[k]]
    if changed and not cfg.force:
        details = ", ".join(f"{k}: {made_with[k]!r} -> {settings[k]!r}" for k in changed[:4])
        raise PrepareError(f"{out} was made with other settings ({details}); add --force to rebuild it, "
                           f"or choose another --out")
    return manifest


def step_done(manifest: dict, step: str, out: Path, cfg: PrepareConfig) -> bool:
    entry = manifest["steps"].get(step)
    if cfg.force or not entry:
        return False
    settings = config_to_dict(cfg)
    made_with = {**SETTINGS_BEFORE, **manifest["settings"]}
    if any(made_with.get(k) != settings[k] for k in STEP_SETTINGS[step]):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in entry["outputs"].items())


def finish_step(manifest: dict, step: str, out: Path, cfg: PrepareConfig, outputs: list[str], **info) -> None:
    manifest["settings"].update({k: config_to_dict(cfg)[k] for k in STEP_SETTINGS[step]})
    manifest["steps"][step] = {"outputs": {n: (out / n).stat().st_size for n in outputs}, **info}
    for later in list(STEP_SETTINGS)[list(STEP_SETTINGS).index(step) + 1:]:
        manifest["steps"].pop(later, None)  # everything after a rebuilt step is stale
    atomic_write_text(out / manifest_name(cfg), json.dumps(manifest, indent=1))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def main(argv=None) -> int:
    cfg = parse_config(PrepareConfig, argv, description=__doc__.split("\n\n")[0])
    from nanofm import data as shards
    from nanofm.sources import check_inputs, iter_inputs
    from nanofm.tokenizer import GPT4_SPLIT_PATTERN, SPLIT_PATTERN, Tokenizer, train_bpe

    inputs = cfg.input or ["builtin"]
    if not cfg.out:
        if inputs != ["builtin"]:
            raise PrepareError("--out is required when --input is given (the default data/default is the built-in corpus)")
        cfg.out = str(ROOT / "data" / "default")
    out = Path(cfg.out)
    check_inputs(inputs)
    if cfg.tokenizer not in ("bpe", "gpt2") and not Path(cfg.tokenizer).exists():
        raise PrepareError(f"--tokenizer must be bpe, gpt2 or the path of a tokenizer.json; {cfg.tokenizer} does not exist")
    manifest = load_manifest(out, cfg)
    t0 = time.time()
    sharded = cfg.world_size > 1
    curated_name = f"curated-{cfg.rank:05d}-of-{cfg.world_size:05d}.jsonl" if sharded else "curated.jsonl"
    report_name = f"report-{cfg.rank:05d}-of-{cfg.world_size:05d}" if sharded else "report"

    # ---- 1-2. collect and curate
    if step_done(manifest, "curate", out, cfg):
        print(f"curate: done already ({out / curated_name}); --force rebuilds it")
        docs = read_jsonl(out / curated_name)
        report = json.loads((out / f"{report_name}.json").read_text())
    else:
        source_stats: dict = {}
        # a sharded pass does not mix: the final pass over all shards does, once
        curate_cfg = dataclasses.replace(cfg, mix="") if sharded else cfg
        docs, report = curate(iter_inputs(inputs, source_stats, cfg.rank, cfg.world_size, cfg.hub_max_docs,
                                          cfg.hub_text_field, cfg.url_timeout), curate_cfg, progress=cfg.progress)
        if report["input"]["docs"] == 0:
            raise PrepareError(f"the inputs {inputs} hold no documents (supported: .txt .md .rst, code files, .jsonl "
                               f"with a 'text' field, .urls, URLs, hf:NAME); skipped: {source_stats or 'nothing'}")
        if not docs:
            reasons = {}
            for step in report["steps"]:
                reasons.update(step["removed"])
            top = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:6])
            raise PrepareError(f"curation removed all {report['input']['docs']} documents ({top}); "
                               f"loosen the thresholds (see --help) or check the inputs")
        report["source_stats"] = source_stats
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({k: d[k] for k in ("id", "text", "source", "domain", "meta")}, ensure_ascii=False) + "\n"
                        for d in docs)
        atomic_write_text(out / curated_name, lines)
        plot_report(report, out / f"{report_name}.png")
        atomic_write_text(out / f"{report_name}.json", json.dumps({k: v for k, v in report.items() if k != "_lengths"}, indent=1))
        finish_step(manifest, "curate", out, cfg, [curated_name, f"{report_name}.json", f"{report_name}.png"])
    print(f"curate: {report['input']['docs']:,} documents in, {len(docs):,} out "
          f"({report['output']['chars'] / 1e6:.1f}M characters; {report.get('seconds', 0)}s)")
    if sharded:
        print(f"rank {cfg.rank} of {cfg.world_size}: wrote {out / curated_name}. When every rank is done, finish with "
              f"data/prepare.py --input {out} --out DIR (dedup across shards, mixing, tokenizer, shards).")
        return 0

    # ---- 3. the tokenizer (trained on the train split only)
    splits = {"train": [], "val": []}
    for doc in docs:
        splits[shards.split_of(doc, cfg.val_fraction, cfg.seed)].append(doc)
    if not splits["val"]:
        if len(docs) < 2:
            raise PrepareError("need at least 2 documents after curation (one for validation)")
        splits["val"].append(splits["train"].pop())
    if step_done(manifest, "tokenizer", out, cfg):
        tokenizer = Tokenizer.load(out / "tokenizer.json")
        print(f"tokenizer: done already ({tokenizer.name})")
    else:
        start = time.time()
        if cfg.tokenizer == "bpe":
            texts, budget = [], cfg.tokenizer_max_chars
            for doc in splits["train"]:
                if budget <= 0:
                    break
                texts.append(doc["text"][:budget])
                budget -= len(texts[-1])
            pattern = SPLIT_PATTERN if cfg.split_digits else GPT4_SPLIT_PATTERN
            merges = train_bpe(texts, cfg.vocab_size, pattern=pattern, progress=cfg.progress)
            tokenizer = Tokenizer.from_merges(merges, pattern=pattern)
            if tokenizer.vocab_size < cfg.vocab_size:
                print(f"warning: the corpus ran out of pairs to merge at {tokenizer.vocab_size} tokens (asked {cfg.vocab_size})")
        else:
            tokenizer = Tokenizer.load(cfg.tokenizer)
        tokenizer.save(out / "tokenizer.json")
        finish_step(manifest, "tokenizer", out, cfg, ["tokenizer.json"], seconds=round(time.time() - start, 2),
                    name=tokenizer.name, vocab_size=tokenizer.vocab_size)
        print(f"tokenizer: {tokenizer.name}, {tokenizer.vocab_size} tokens ({time.time() - start:.1f}s)")

    # ---- 4. token shards
    if step_done(manifest, "shards", out, cfg):
        print("shards: done already")
    else:
        from tqdm import tqdm

        for old in manifest["steps"].get("shards", {}).get("outputs", {}):
            (out / old).unlink(missing_ok=True)  # only our own earlier shards
        written, token_stats = [], {"per_split": {}, "per_domain": {}}
        for split, split_docs in splits.items():
            split_docs = shards.shuffled(split_docs, cfg.seed)
            token_lists = []
            for i in tqdm(range(0, len(split_docs), 256), desc=f"tokenize {split}", disable=not cfg.progress):
                batch = split_docs[i:i + 256]
                for doc, ids in zip(batch, tokenizer.encode_batch([d["text"] for d in batch], bos=True)):
                    token_lists.append(ids)
                    per = token_stats["per_domain"].setdefault(doc["domain"], {"train": 0, "val": 0})
                    per[split] += len(ids)
            files = shards.write_shards(token_lists, out, split, tokenizer.vocab_size, cfg.shard_tokens)
            written += [f["path"] for f in files]
            n_bytes = sum(len(d["text"].encode("utf-8")) for d in split_docs)
            n_tokens = sum(f["tokens"] for f in files) - len(split_docs)  # bos tokens are not text
            token_stats["per_split"][split] = {"docs": len(split_docs), "tokens": sum(f["tokens"] for f in files),
                                               "shards": len(files), "bytes_per_token": round(n_bytes / max(1, n_tokens), 3)}
        report["tokens"] = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, **token_stats,
                            "bytes_per_token_val": token_stats["per_split"]["val"]["bytes_per_token"]}
        atomic_write_text(out / "report.json", json.dumps({k: v for k, v in report.items() if k != "_lengths"}, indent=1))
        finish_step(manifest, "shards", out, cfg, written)
        manifest["steps"]["curate"]["outputs"]["report.json"] = (out / "report.json").stat().st_size
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        for split, s in token_stats["per_split"].items():
            print(f"shards: {split}: {s['docs']:,} documents, {s['tokens']:,} tokens in {s['shards']} shard(s), "
                  f"{s['bytes_per_token']} bytes/token")
    print(f"done in {time.time() - t0:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
