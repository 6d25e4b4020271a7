"""data/prepare.py end to end: outputs, idempotence, refusals, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanofm.data import TokenLoader, open_shard
from nanofm.tokenizer import Tokenizer
from textgen import prose

ROOT = Path(__file__).resolve().parents[1]


def prepare(*args):
    """Run the script; mixing weights of 1 keep the counts independent of the random draw."""
    result = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--progress=false", "--num_workers=1",
                             "--mix=prose:1,code:1,chat:1", *map(str, args)], capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"essay{i}.txt").write_text(prose(i, sentences=30))
    (src / "tool.py").write_text("import sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg.upper())\n"
                                 "    return 0\n\n\nif __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n")
    (src / "rows.jsonl").write_text(json.dumps({"text": prose(99, 30), "domain": "prose"}) + "\nbroken line\n")
    return src


def mtimes(path):
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def test_end_to_end_on_a_small_folder(folder, tmp_path):
    out = tmp_path / "out"
    code, log = prepare("--input", folder, "--out", out, "--vocab_size", 520, "--val_fraction", 0.1, "--languages=")
    assert code == 0, log
    assert {"curated.jsonl", "report.json", "report.png", "tokenizer.json", "prepare.json",
            "train_000000.bin", "val_000000.bin"} <= set(p.name for p in out.iterdir())
    docs = [json.loads(line) for line in (out / "curated.jsonl").read_text().splitlines()]
    assert len(docs) == 42 and set(docs[0]) == {"id", "text", "source", "domain", "meta"}
    assert {d["domain"] for d in docs} == {"prose", "code"}
    report = json.loads((out / "report.json").read_text())
    assert report["source_stats"]["jsonl_bad_lines"] == 1
    assert report["tokens"]["vocab_size"] == 520 and report["tokens"]["bytes_per_token_val"] > 1.5
    tok = Tokenizer.load(out)
    train, val = open_shard(out / "train_000000.bin"), open_shard(out / "val_000000.bin")
    assert train.dtype == np.uint16 and (train == tok.bos_id).sum() + (val == tok.bos_id).sum() == 42
    assert report["tokens"]["per_split"]["train"]["tokens"] + report["tokens"]["per_split"]["val"]["tokens"] == len(train) + len(val)
    first_doc = tok.decode(list(train[1:np.flatnonzero(train == tok.bos_id)[1]]))
    assert first_doc in {d["text"] for d in docs}
    x, y = TokenLoader(out, "train", batch_size=2, seq_len=32).next_batch()
    assert x.shape == (2, 32) and int(x.max()) < 520

    # a second run skips every step and touches nothing
    before = mtimes(out)
    code, log = prepare("--input", folder, "--out", out, "--vocab_size", 520, "--val_fraction", 0.1, "--languages=")
    assert code == 0 and log.count("done already") == 3 and mtimes(out) == before

    # other settings: refused without --force, nothing changed
    code, log = prepare("--input", folder, "--out", out, "--vocab_size", 530, "--val_fraction", 0.1, "--languages=")
    assert code == 1 and "other settings (vocab_size: 520 -> 530)" in log and "--force" in log
    assert mtimes(out) == before
    # with --force only the tokenizer and the shards are rebuilt; curation is still valid
    code, log = prepare("--input", folder, "--out", out, "--vocab_size", 530, "--val_fraction", 0.1, "--languages=", "--force")
    assert code == 0, log
    assert Tokenizer.load(out).vocab_size == 530


def test_a_missing_output_is_rebuilt(folder, tmp_path):
    out = tmp_path / "out"
    args = ("--input", folder, "--out", out, "--vocab_size", 520, "--languages=")
    assert prepare(*args)[0] == 0
    (out / "train_000000.bin").unlink()
    code, log = prepare(*args)
    assert code == 0 and "shards: train" in log and (out / "train_000000.bin").exists()


def test_gpt2_tokenizer(folder, tmp_path):
    code, log = prepare("--input", folder, "--out", tmp_path / "g", "--tokenizer", "gpt2", "--languages=")
    assert code == 0, log
    tok = Tokenizer.load(tmp_path / "g")
    assert tok.name == "gpt2" and tok.encode("Hello world") == [15496, 995]
    assert open_shard(tmp_path / "g" / "train_000000.bin")[0] == 50256


def test_refuses_a_directory_it_did_not_make(folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        code, log = prepare("--input", folder, "--out", out, *extra)
        assert code == 1 and "did not make" in log
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "picture.png").write_bytes(b"\x89PNG")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("too short")
    (junk / "b.bin.txt").write_bytes(b"\x00\x01\x02 binary")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text("{oops\n")
    cases = [
        (["--input", tmp_path / "nope", "--out", tmp_path / "o1"], "does not exist"),
        (["--input", empty, "--out", tmp_path / "o2"], "hold no documents"),
        (["--input", junk, "--out", tmp_path / "o3"], "curation removed all 2 documents"),
        (["--input", bad_jsonl, "--out", tmp_path / "o4"], "none of its 1 lines"),
        (["--input", empty], "--out is required"),
        (["--vocab_size=100", "--out", tmp_path / "o5"], "at least 512"),
        (["--tokenizer", tmp_path / "none.json", "--out", tmp_path / "o6"], "--tokenizer must be"),
        (["--vocab-size=600"], "did you mean --vocab_size"),
    ]
    for args, message in cases:
        code, log = prepare(*args)
        assert code != 0 and message in log, (args, log)
        assert "Traceback" not in log
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing half-written


def test_sharded_curation_across_machines(folder, tmp_path):
    out = tmp_path / "parts"
    for rank in range(2):
        code, log = prepare("--input", folder, "--out", out, "--rank", rank, "--world_size", 2, "--languages=",
                            "--mix=prose:2,code:1")
        assert code == 0, log
    parts = sorted(out.glob("curated-*-of-00002.jsonl"))
    assert len(parts) == 2
    n = [len(p.read_text().splitlines()) for p in parts]
    assert sum(n) == 42 and min(n) > 0  # every document in one part; no mixing yet
    # the final pass reads the folder of parts: dedup across shards, mixing, tokenizer, shards
    code, log = prepare("--input", out, "--out", tmp_path / "final", "--vocab_size", 520, "--languages=",
                        "--mix=prose:2,code:1")
    assert code == 0, log
    assert len((tmp_path / "final" / "curated.jsonl").read_text().splitlines()) == 41 * 2 + 1


def test_a_users_report_and_tokenizer_are_never_overwritten(folder, tmp_path):
    """A folder with another run's record (prepare-*-of-*.json) and the user's own report.json and
    tokenizer.json: refused, nothing touched."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "prepare-00000-of-00002.json").write_text("{}")
    (out / "report.json").write_text("my report")
    (out / "tokenizer.json").write_text("my tokenizer")
    code, log = prepare("--input", folder, "--out", out, "--vocab_size=520", "--languages=")
    assert code == 1 and "already holds report.json" in log and "no record of making" in log
    assert (out / "report.json").read_text() == "my report" and (out / "tokenizer.json").read_text() == "my tokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["prepare-00000-of-00002.json", "report.json", "tokenizer.json"]


@pytest.mark.parametrize("mix, message", [("Prose:0.1", "did you mean 'prose'"), ("prose:1,cod:0", "did you mean 'code'"),
                                          ("prose:nan", "finite weights"), ("code:inf", "finite weights"),
                                          ("legal:1", "neither nanofm nor the inputs have")])
def test_mix_typos_and_bad_weights_are_refused_before_curation(folder, tmp_path, mix, message):
    code, log = prepare("--input", folder, "--out", tmp_path / "o", "--vocab_size=520", "--languages=", f"--mix={mix}")
    assert code == 1 and message in log and "Traceback" not in log
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_builtin_corpus(tmp_path):
    out = tmp_path / "default"
    code, log = prepare("--out", out, "--num_workers=2")
    assert code == 0, log
    report = json.loads((out / "report.json").read_text())
    assert set(report["output"]["per_domain"]) == {"prose", "code", "chat"}
    assert report["tokens"]["vocab_size"] == 8192 and report["tokens"]["bytes_per_token_val"] > 3.0
    assert report["output"]["docs"] > 2000 and report["tokens"]["per_split"]["train"]["tokens"] > 1_500_000
