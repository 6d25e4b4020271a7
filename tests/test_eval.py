"""eval.py and nanofm/tasks.py: built-in tasks equal direct computations, dataset loaders read the
real formats, probes behave, reports are written whole, and bad input is a clear error."""

import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanofm import metrics, tasks
from nanofm.checkpoint import CheckpointError, save_checkpoint
from nanofm.engine import Engine, SamplingParams
from nanofm.model import ModelConfig, Transformer
from nanofm.tokenizer import Tokenizer
from textgen import domain_docs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
        "--eval_iters=2", "--sample_tokens=0", "--lr=3e-3", "--warmup_iters=5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    with open(base / "docs.jsonl", "w") as f:
        for doc in domain_docs():
            f.write(json.dumps(doc) + "\n")
    out = base / "data"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(base / "docs.jsonl"),
                             "--out", str(out), "--vocab_size=520", "--val_fraction=0.2", "--languages=",
                             "--progress=false", "--num_workers=1", "--near_dedup=false"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """(untrained checkpoint, trained checkpoint) of the same shape on the same data."""
    import train_pretrain
    from nanofm.checkpoint import read_meta
    out = tmp_path_factory.mktemp("runs")
    train_pretrain.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={out / 'trained'}", "--max_iters=150"])
    meta = read_meta(out / "trained")
    torch.manual_seed(0)
    start = Transformer(ModelConfig(**meta["model"]))
    save_checkpoint(out / "start", 0, start, {"model": meta["model"], "data_dir": str(data_dir), "stage": "pretrain"},
                    tokenizer_path=data_dir / "tokenizer.json")
    return out / "start", out / "trained"


def small_lm(tok, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=32, block_size=64, norm="rmsnorm",
                                   pos="rope", mlp="swiglu", bias=False, **kw)).eval()


def test_val_docs_are_prepares_validation_split(data_dir):
    docs = tasks.val_docs(data_dir)
    report = json.loads((data_dir / "report.json").read_text())
    assert len(docs) == report["tokens"]["per_split"]["val"]["docs"]
    assert {d["domain"] for d in docs} == {"prose", "chat", "code"}
    with pytest.raises(tasks.TaskError, match="python data/prepare.py"):
        tasks.val_docs(data_dir / "missing")


def test_choice_items_and_scores(data_dir):
    docs = tasks.val_docs(data_dir)
    items = tasks.choice_items(docs, n=30, seed=1)
    assert items == tasks.choice_items(docs, n=30, seed=1) and len(items) >= 20
    texts = {d["text"] for d in docs}
    for item in items:
        true = item["endings"][item["label"]]
        assert any(item["ctx"] + true in t for t in texts)  # the real continuation
        assert len(set(item["endings"])) == 4
    tok = Tokenizer.load(data_dir)
    model = small_lm(tok)
    result = tasks.choice_task(Engine(model, tok), items)
    hits = 0
    with torch.no_grad():  # the same scores by hand: one forward per option
        for item in items:
            ctx = tok.encode(item["ctx"], bos=True)
            scores = []
            for ending in item["endings"]:
                ids = tok.encode(ending)
                logp = F.log_softmax(model(torch.tensor([ctx + ids]))[0][0, :, :tok.vocab_size], dim=-1)
                scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(ids)))
            hits += max(range(4), key=scores.__getitem__) == item["label"]
    assert result["acc"] == pytest.approx(hits / len(items)) and result["n"] == len(items)
    robust = tasks.robustness_choice(Engine(model, tok), items, result)
    assert robust["reorder"] == {"acc": result["acc"], "drop": 0.0, "changed": 0.0}  # options are scored one by one
    assert robust["casing"]["changed"] > 0 and robust["casing"]["drop"] == result["acc"] - robust["casing"]["acc"]
    assert set(result["by_domain"]) == {item["domain"] for item in items}


def test_hellaswag_and_lambada_loaders_read_their_formats(tmp_path, data_dir):
    rows = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
             "ctx_b": "then", "ctx": "...", "endings": [", the man adds wax.", ", the man continues [title] removing.",
                                                        " the man walks.", " he stops."], "label": 3, "split": "val"},
            {"ind": 5, "activity_label": "Baking", "ctx_a": "A woman mixes flour.", "ctx_b": "she", "endings":
             ["bakes.", "sings.", "runs.", "sleeps."], "label": "0", "split": "val"}]
    (tmp_path / "hs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = tasks.load_hellaswag(str(tmp_path / "hs.jsonl"))
    assert items[0]["ctx"] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert items[0]["endings"][1] == " , the man continues. removing." and [i["label"] for i in items] == [3, 0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(tasks.TaskError, match="HellaSwag's format"):
        tasks.load_hellaswag(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(tasks.TaskError, match="no HellaSwag items"):
        tasks.load_hellaswag(str(tmp_path / "empty.jsonl"))
    (tmp_path / "lambada.jsonl").write_text(json.dumps({"text": "the river keeps the river keeps the river"}) + "\n")
    lam = tasks.load_lambada(str(tmp_path / "lambada.jsonl"))
    assert lam == [{"context": "the river keeps the river keeps the", "target": " river"}]
    tok = Tokenizer.load(data_dir)
    model = small_lm(tok)
    result = tasks.lambada_task(Engine(model, tok), lam)
    ctx, target = tok.encode(lam[0]["context"], bos=True), tok.encode(" river")
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + target]))[0][0, :, :tok.vocab_size], dim=-1)
    greedy = all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(target))
    nll = -sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(target))
    assert result["acc"] == float(greedy) and result["perplexity"] == pytest.approx(metrics.perplexity(nll, len(target)), rel=1e-4)
    assert all(item["target"].startswith(" ") for item in tasks.lambada_items(tasks.val_docs(data_dir)))


def test_generation_task_scores_the_engines_replies(data_dir):
    docs = tasks.val_docs(data_dir)
    items = tasks.generation_items(docs)
    assert all(item["prompt"].endswith("\nBot:") and item["references"] for item in items)
    tok = Tokenizer.load(data_dir)
    engine = Engine(small_lm(tok), tok)
    result = tasks.generation_task(engine, items[:6], max_tokens=10)
    replies = [o.text.strip() for o in engine.generate([i["prompt"] for i in items[:6]],
                                                          SamplingParams(max_tokens=10, temperature=0, stop=["\n"]))]
    refs = [i["references"] for i in items[:6]]
    assert result["exact_match"] == metrics.exact_match(replies, refs)
    assert result["rougeL"] == pytest.approx(sum(max(metrics.rouge(r, p)["rougeL"]["fmeasure"] for r in rs)
                                                 for p, rs in zip(replies, refs)) / 6)
    with pytest.raises(tasks.TaskError, match="no chat conversations"):
        tasks.generation_items([d for d in docs if d["domain"] != "chat"])


def test_perturbations_and_counterfactual_swaps():
    rng = random.Random(0)
    text = "The quick brown fox jumps over the lazy sleeping dog tonight"
    typo = tasks.perturb(text, "typos", rng, rate=1.0)
    assert typo != text and [sorted(w) for w in typo.split()] == [sorted(w) for w in text.split()]
    assert tasks.perturb(text, "casing", rng) == text.upper()
    assert tasks.perturb(text, "whitespace", rng).split() == text.split()
    assert tasks.swap_groups("He gave his book to the woman and her son.") == "She gave her book to the man and his daughter."
    assert tasks.swap_groups("John met Mary.", "names") == "Mary met John."
    assert tasks.swap_groups("The rivers flow.") == "The rivers flow."


def test_fairness_gaps_are_log_likelihood_differences(data_dir):
    tok = Tokenizer.load(data_dir)
    model = small_lm(tok)
    result = tasks.fairness_lm(Engine(model, tok))
    first = tasks.TEMPLATES[0]
    a, b = first.format(X="He"), first.format(X="She")
    with torch.no_grad():
        def loglik(s):
            ids = [tok.bos_id] + tok.encode(s)
            logp = F.log_softmax(model(torch.tensor([ids]))[0][0, :, :tok.vocab_size], dim=-1)
            return sum(float(logp[i, t]) for i, t in enumerate(ids[1:]))
        gap = loglik(a) - loglik(b)
    gaps = [ex["gap"] for ex in result["gender"]["largest"]]
    assert result["gender"]["pairs"] == len(tasks.TEMPLATES) * len(tasks.SUBJECTS["gender"])
    assert result["gender"]["mean_abs_gap"] >= abs(gap) - 1e-9 or abs(gap) <= max(map(abs, gaps))
    assert 0 <= result["gender"]["share_A_preferred"] <= 1 and set(result["gender"]["pronoun_share_he"]) == set(tasks.OCCUPATIONS)


def test_attributions_match_finite_differences_and_occlusion(data_dir):
    tok = Tokenizer.load(data_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=32, block_size=64, n_classes=3)).double().eval()
    ids = tok.encode("The capital of Peru is Lima.", bos=True)
    out = tasks.attributions(model, ids, "class", occlusion_id=tok.pad_id)
    with torch.no_grad():
        base = float(model.classify(torch.tensor([ids]))[0, out["target"]])
    assert out["score"] == base
    for i in (1, 3):
        eps = 1e-6  # scaling token i's embedding by (1 + eps) moves the score by eps * (grad . embedding)
        scale = torch.ones(1, len(ids), 1, dtype=torch.float64)
        scale[0, i] += eps
        hook = model.transformer.wte.register_forward_hook(lambda m, inp, o: o * scale)
        with torch.no_grad():
            moved = float(model.classify(torch.tensor([ids]))[0, out["target"]])
        hook.remove()
        assert (moved - base) / eps == pytest.approx(out["grad_x_input"][i], rel=1e-3, abs=1e-7)
        occluded = list(ids)
        occluded[i] = tok.pad_id
        with torch.no_grad():
            assert out["occlusion"][i] == pytest.approx(base - float(model.classify(torch.tensor([occluded]))[0, out["target"]]))
    assert out["occlusion"][0] == 0.0 and len(out["grad_x_input"]) == len(ids)


def test_eval_compares_checkpoints_and_writes_a_whole_report(trained, data_dir, tmp_path, capsys):
    import eval as evaluate
    start, done = trained
    report = evaluate.main(["--ckpt", str(start), "--ckpt", str(done), "--out_dir", str(tmp_path / "ev"),
                            "--max_items=40", "--progress=false"])
    a, b = report["checkpoints"]["start"], report["checkpoints"]["trained"]
    for domain in ("prose", "chat", "code"):  # training lowered bits per byte in every domain
        assert b["results"]["perplexity"][domain]["bits_per_byte"] < a["results"]["perplexity"][domain]["bits_per_byte"] - 0.3
    assert b["results"]["lambada"]["perplexity"] < a["results"]["lambada"]["perplexity"] / 10  # last words: learned
    assert set(a["skipped"]) == {"mlm", "classification", "safety", "images"} and "needs a mlm checkpoint" in a["skipped"]["mlm"]
    assert "it needs a checkpoint that reads them" in a["skipped"]["images"]  # a text model is shown no images
    assert "needs a chat-tuned checkpoint" in a["skipped"]["safety"]  # a base model is not asked chat prompts
    named = evaluate.main(["--ckpt", str(start), "--tasks", "safety", "--out_dir", str(tmp_path / "named"),
                           "--progress=false"])  # named too: skipped and said, so a base can sit beside chat models
    assert "needs a chat-tuned checkpoint" in named["checkpoints"]["start"]["skipped"]["safety"]
    files = {p.name for p in (tmp_path / "ev").iterdir()}
    assert {"report.json", "report.md", "bits_per_byte.png", "robustness.png", "explain_trained.png"} <= files
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| task | metric | start | trained |" in md and "bits_per_byte[prose]" in md
    printed = capsys.readouterr().out
    assert "bits_per_byte[chat]" in printed and "trained" in printed
    # the perplexity in the report is the metric computed directly
    from nanofm.checkpoint import load_model
    model, _ = load_model(done)
    tok = Tokenizer.load(done)
    prose = [d for d in tasks.val_docs(data_dir) if d["domain"] == "prose"]
    nll, n, _ = metrics.sliding_window_nll(model, [tok.encode(d["text"], bos=True) for d in prose])
    assert b["results"]["perplexity"]["prose"]["perplexity"] == pytest.approx(metrics.perplexity(nll, n), rel=1e-5)
    # a failing run leaves the previous report as it was
    before = (tmp_path / "ev" / "report.json").read_text()
    with pytest.raises(tasks.TaskError, match="no curated.jsonl"):
        evaluate.main(["--ckpt", str(done), "--out_dir", str(tmp_path / "ev"), "--tasks", "perplexity", "--tasks",
                       "generation", "--data_dir", str(tmp_path / "nodata"), "--progress=false"])
    assert (tmp_path / "ev" / "report.json").read_text() == before and not list(tmp_path.glob(".tmp-*"))


def test_prompt_samples_are_seeded(trained, capsys):
    import eval as evaluate
    _, done = trained
    args = ["--ckpt", str(done), "--prompt", "User: What is the capital of Peru?\nBot:", "--max_tokens=12", "--seed=3"]
    evaluate.main(args)
    first = capsys.readouterr().out
    evaluate.main(args)
    assert capsys.readouterr().out == first and "sample 1" in first
    with pytest.raises(ValueError, match="the context is 64"):
        evaluate.main(["--ckpt", str(done), "--prompt", "word " * 100])


def test_classifier_and_mlm_checkpoints_get_their_tasks(data_dir, tmp_path):
    """A classifier trained here on the domain labels, and a masked LM: each gets its own tasks."""
    import eval as evaluate
    tok = Tokenizer.load(data_dir)
    labels = ["chat", "code", "prose"]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=64, block_size=64, n_classes=3))
    train_docs = [json.loads(line) for line in (data_dir / "curated.jsonl").read_text().splitlines()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = random.Random(step).sample(train_docs, 16)
        ids = [tasks.classifier_input(tok, d["text"], 64) for d in batch]
        T = max(map(len, ids))
        idx = torch.tensor([row + [0] * (T - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in ids])
        loss = F.cross_entropy(model.classify(idx, mask), torch.tensor([labels.index(d["domain"]) for d in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(tmp_path / "clf", 40, model, {"model": model.cfg.to_dict(), "stage": "classifier", "labels": labels,
                                                  "data_dir": str(data_dir)}, tokenizer_path=data_dir / "tokenizer.json")
    bert = Transformer(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=32, block_size=64, causal=False))
    save_checkpoint(tmp_path / "mlm", 1, bert, {"model": bert.cfg.to_dict(), "data_dir": str(data_dir)},
                    tokenizer_path=data_dir / "tokenizer.json")
    report = evaluate.main(["--ckpt", str(tmp_path / "clf"), "--ckpt", str(tmp_path / "mlm"), "--out_dir",
                            str(tmp_path / "ev"), "--progress=false"])
    clf, mlm = report["checkpoints"]["clf"]["results"], report["checkpoints"]["mlm"]["results"]
    assert set(clf) == {"classification", "robustness", "fairness", "explain"} and set(mlm) == {"mlm"}
    assert clf["classification"]["accuracy"] >= 0.8  # the domains are easy to tell apart
    probs = tasks.classify(model.eval(), tok, [d["text"] for d in tasks.val_docs(data_dir)])
    truth = [d["domain"] for d in tasks.val_docs(data_dir)]
    direct = metrics.classification_report(truth, [labels[i] for i in probs.argmax(-1).tolist()])
    assert clf["classification"]["f1_macro"] == pytest.approx(direct["f1_macro"])
    assert set(clf["robustness"]) == {"typos", "casing", "whitespace"}
    assert 0 <= mlm["mlm"]["prose"]["masked_accuracy"] <= 1 and mlm["mlm"]["prose"]["masked_tokens"] > 0
    assert (tmp_path / "ev" / "confusion_clf.png").exists() and (tmp_path / "ev" / "explain_clf.png").exists()


def test_no_ckpt_evaluates_the_newest_run_in_out(tmp_path, data_dir, monkeypatch):
    import eval as evaluate
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint under out/: train one first"):
        evaluate.main([])
    model = Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=32, block_size=80))
    for run in ("pretrain", "sft", "rm"):  # written in this order
        save_checkpoint(tmp_path / "out" / run, 1, model, {"model": model.cfg.to_dict(), "data_dir": str(data_dir)},
                        tokenizer_path=data_dir / "tokenizer.json")
        time.sleep(0.02)  # distinct modification times
    shutil.rmtree(tmp_path / "out" / "rm" / "ckpt_0000001")  # a run directory without a complete checkpoint is skipped
    report = evaluate.main(["--tasks", "induction", "--progress=false"])
    assert list(report["checkpoints"]) == ["sft"] and Path(report["checkpoints"]["sft"]["path"]).parent.name == "sft"


def test_bad_input(tmp_path, data_dir):
    import eval as evaluate
    with pytest.raises(ValueError, match="unknown task 'perplexty'; did you mean perplexity"):
        evaluate.main(["--ckpt", "x", "--tasks", "perplexty"])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        evaluate.main(["--ckpt", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "ev")])
    model = Transformer(ModelConfig(vocab_size=576, n_layer=1, n_head=2, n_embd=32, block_size=64))
    save_checkpoint(tmp_path / "notok", 1, model, {"model": model.cfg.to_dict()})
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        evaluate.main(["--ckpt", str(tmp_path / "notok"), "--out_dir", str(tmp_path / "ev")])
    other = Transformer(ModelConfig(vocab_size=576, n_layer=2, n_head=2, n_embd=32, block_size=64))
    save_checkpoint(tmp_path / "mismatch", 1, other, {"model": model.cfg.to_dict()}, tokenizer_path=data_dir / "tokenizer.json")
    with pytest.raises(CheckpointError, match="do not fit this model"):  # weights of another shape than meta.json says
        evaluate.main(["--ckpt", str(tmp_path / "mismatch"), "--out_dir", str(tmp_path / "ev")])
    assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".tmp-*"))


def test_out_dir_is_never_a_users_folder(trained, tmp_path):
    """Only a directory eval.py wrote (or an empty one) is replaced; a user's folder or a file is refused
    before any work, and left as it was."""
    import eval as evaluate
    from nanofm.evaluate import ReportError
    _, done = trained
    users = tmp_path / "out"
    (users / "pretrain").mkdir(parents=True)
    (users / "pretrain" / "precious.pt").write_text("weights")
    args = ["--ckpt", str(done), "--tasks", "perplexity", "--max_items=5", "--progress=false"]
    with pytest.raises(ReportError, match="did not write"):
        evaluate.main(args + ["--out_dir", str(users)])
    assert (users / "pretrain" / "precious.pt").read_text() == "weights"
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ReportError, match="is a file"):
        evaluate.main(args + ["--out_dir", str(tmp_path / "afile")])
    assert (tmp_path / "afile").read_text() == "mine" and not list(tmp_path.glob(".*afile*"))
    (tmp_path / "empty").mkdir()
    evaluate.main(args + ["--out_dir", str(tmp_path / "empty")])  # empty: fine, and now it is eval's
    evaluate.main(args + ["--out_dir", str(tmp_path / "empty")])  # eval's own: replaced
    assert (tmp_path / "empty" / ".nanofm-eval").is_file() and (tmp_path / "empty" / "report.json").is_file()


@pytest.mark.parametrize("flag, message", [("--num_samples=0", "--num_samples must be at least 1"),
                                           ("--top_p=2", "--top_p must be in"), ("--temperature=nan", "--temperature must be"),
                                           ("--max_items=0", "--max_items must be"), ("--device=cpuu", "unknown device")])
def test_bad_sampling_flags_are_clear_errors(flag, message):
    import eval as evaluate
    from nanofm.common import ConfigError
    with pytest.raises(ConfigError, match=message):
        evaluate.main(["--ckpt", "x", "--prompt", "hi", flag])


def test_chat_tuned_checkpoints_are_asked_in_their_chat_format(data_dir):
    """A checkpoint whose meta names a chat format gets the question as a user turn ending with the
    assistant tag; a base model keeps the plain-text prompt."""
    from nanofm import chat
    tok = Tokenizer.load(data_dir)
    item = tasks.generation_items(tasks.val_docs(data_dir))[0]
    question = item["question"]
    assert item["prompt"] == f"User: {question}\nBot:"
    sp = tok.special_tokens
    assert tasks.prompt_ids(tok, item, chat.CHAT_FORMAT) == (
        [tok.bos_id, sp["<|user|>"]] + tok.encode(question) + [sp["<|end|>"], sp["<|assistant|>"]])
    assert tasks.prompt_ids(tok, item, None) == tok.encode(f"User: {question}\nBot:", bos=True)
    with pytest.raises(tasks.TaskError, match="unknown chat format"):
        tasks.prompt_ids(tok, item, "chatml")
    # the library runs the chat-format prompts through the model (an in-memory subject, no checkpoint)
    from nanofm.evaluate import Settings, Subject, run_tasks
    model = small_lm(tok)
    seen = []
    subject = Subject(model, tok, {"chat_format": chat.CHAT_FORMAT, "data_dir": str(data_dir)}, name="chatty")
    real_generate = subject.engine.generate
    subject.engine.generate = lambda prompts, *a, **k: seen.extend(prompts) or real_generate(prompts, *a, **k)
    out = run_tasks(subject, ["generation", "choice"], Settings(max_items=5))
    assert seen and all(p[1] == sp["<|user|>"] and p[-1] == sp["<|assistant|>"] for p in seen)
    assert 0 <= out["results"]["choice"]["acc"] <= 1 and out["results"]["generation"]["n"] == 5
    base = run_tasks(Subject(model, tok, {"data_dir": str(data_dir)}), ["choice"], Settings(max_items=5))
    assert base["results"]["choice"]["n"] == out["results"]["choice"]["n"]


def test_later_checkpoints_get_a_paired_difference_against_the_first():
    """eval.py pairs each later checkpoint with the first on the questions both answered, per family,
    and the table shows the difference with its standard error."""
    from nanofm.evaluate import paired, table

    def entry(scored):
        return {"results": {"instructions": {"mean_exact_match": 0.0, "exact_match": {}, "scored": scored}}, "skipped": {}}
    base = [["sort", "q1", 0], ["sort", "q2", 1], ["count", "q3", 0]]
    tuned = [["sort", "q1", 1], ["sort", "q2", 1], ["count", "q3", 1], ["count", "only here", 1]]
    report = {"checkpoints": {"sft": entry(base), "grpo": entry(tuned), "other": {"results": {}, "skipped": {}}}}
    gains = paired(report)
    assert list(gains) == ["grpo"] and gains["grpo"]["against"] == "sft"
    # sort: +1, 0 -> 0.5; count: +1 -> the mean over families 0.75; the unshared question is left out
    assert gains["grpo"]["difference"] == pytest.approx(0.75) and gains["grpo"]["n"] == 3
    report["paired"] = gains
    last = table(report)[-1]
    assert last[1] == "mean_exact_match - sft (paired, se)" and last[2:] == ["-", f"+0.750 ({gains['grpo']['se']:.3f})", "-"]
    assert paired({"checkpoints": {"sft": entry(base)}}) == {}


class _Copier(torch.nn.Module):
    """An ideal induction head for sequences repeated with period `period`: at every position it
    predicts the token `period` back from the next one (certain), and knows nothing before."""

    def __init__(self, vocab: int, period: int, certain: bool = True):
        super().__init__()
        from types import SimpleNamespace
        self.cfg, self.vocab, self.period, self.certain = SimpleNamespace(block_size=2 * period + 1), vocab, period, certain
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        if self.certain:
            for t in range(self.period, x.size(1)):  # position t predicts x[t + 1] = x[t + 1 - period]
                logits[torch.arange(x.size(0)), t, x[:, t + 1 - self.period]] = 30.0
        return logits, None


def test_induction_task_scores_copying_from_context(data_dir):
    tok = Tokenizer.load(data_dir)
    copier = tasks.induction_task(_Copier(tok.vocab_size, 16), tok, n=8, length=16)
    blind = tasks.induction_task(_Copier(tok.vocab_size, 16, certain=False), tok, n=8, length=16)
    assert copier["second_copy_loss"] < 1e-6 and copier["second_copy_accuracy"] == 1.0
    assert copier["first_copy_loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-4)  # uniform: nothing to copy yet
    assert copier["copying_score"] == pytest.approx(math.log(tok.vocab_size), rel=1e-4)
    assert blind["copying_score"] == pytest.approx(0, abs=1e-5) and blind["second_copy_accuracy"] < 0.05
    model = small_lm(tok)  # a real (untrained) model: no copying to speak of
    real = tasks.induction_task(model, tok, n=8, length=16)
    assert abs(real["copying_score"]) < 0.5 and real["length"] == 16 and "text_copying_score" not in real
    docs = tasks.val_docs(data_dir)  # spans of real text, repeated: the copier gets those exactly too
    text = tasks.induction_task(_Copier(tok.vocab_size, 16), tok, n=8, length=16, docs=docs)
    assert text["text_second_copy_accuracy"] == 1.0 and text["text_copying_score"] == pytest.approx(math.log(tok.vocab_size), rel=1e-4)
    blind_text = tasks.induction_task(_Copier(tok.vocab_size, 16, certain=False), tok, n=8, length=16, docs=docs)
    assert blind_text["text_copying_score"] == pytest.approx(0, abs=1e-5)
