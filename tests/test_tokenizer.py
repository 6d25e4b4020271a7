"""BPE: our encoder == tiktoken, round trips, save/load, GPT-2 offline, special tokens."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofm.tokenizer import (GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError, count_chunks,
                              encode_reference, gpt2_tokenizer, merges_to_ranks, train_bpe)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 10,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 10,
    "Unicode: naïve café, 東京, Ελληνικά, emoji 🙂🙂 and numbers 1234567 3.14159\n" * 10,
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_merges(train_bpe(CORPUS, vocab_size=400, progress=False))


def test_vocab_size_and_special_tokens(tok):
    assert tok.vocab_size == 400
    assert [tok.special_tokens[t] for t in SPECIAL_TOKENS] == list(range(390, 400))
    assert tok.bos_id == 390 and tok.eos_id == 391 and tok.pad_id == 392 and tok.mask_id == 393
    assert tok.encode("hi", bos=True, eos=True)[0] == tok.bos_id and tok.encode("hi", eos=True)[-1] == tok.eos_id


def test_special_token_text_in_data_is_plain_text(tok):
    ids = tok.encode("<|bos|> is not a control token here")
    assert tok.bos_id not in ids and tok.decode(ids) == "<|bos|> is not a control token here"


def test_first_merges_are_the_most_frequent_pairs():
    merges = train_bpe(["aaab aaab aaab"], vocab_size=256 + 10 + 2, progress=False)
    ranks = merges_to_ranks(merges)
    # 'aa' is the most frequent pair (6 times), then 'aa'+'a' / ' a' ...
    assert merges[0] == (97, 97) and ranks[b"aa"] == 256


def test_merges_are_unique_byte_strings(tok):
    ranks = merges_to_ranks(tok.merges)
    assert len(ranks) == 256 + len(tok.merges)  # no two merges make the same bytes


def test_our_encoder_equals_tiktoken(tok):
    ranks = merges_to_ranks(tok.merges)
    texts = CORPUS + ["unseen words: zebra xylophone", "  leading spaces\n\n\ttabs\r\n", "1234567890", "",
                      "'s 're 've 'LL contractions", "mixed東京text🙂"]
    for text in texts:
        assert encode_reference(text, ranks) == tok.encode(text), text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(text):
    tok = _shared_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert encode_reference(text, merges_to_ranks(tok.merges)) == ids


_TOK = []


def _shared_tokenizer():
    if not _TOK:
        _TOK.append(Tokenizer.from_merges(train_bpe(CORPUS, vocab_size=400, progress=False)))
    return _TOK[0]


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = json.loads(path.read_text())
    assert data["vocab_size"] == 400 and len(data["merges"]) == 400 - 256 - len(SPECIAL_TOKENS)
    assert data["merges"][0][2] == tok.id_to_bytes(256).decode("utf-8", "backslashreplace")  # readable
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert Tokenizer.load(tmp_path).encode(CORPUS[3]) == tok.encode(CORPUS[3])  # a directory works too
    run = tmp_path / "run"
    (run / "ckpt_0000001").mkdir(parents=True)
    tok.save(run / "ckpt_0000001" / "tokenizer.json")
    (run / "latest").write_text("ckpt_0000001")
    assert Tokenizer.load(run).merges == tok.merges  # and a training run, through its latest checkpoint
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(TokenizerError, match="not a nanofm tokenizer"):
        Tokenizer.load(bad)
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        Tokenizer.load(bad)
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(CORPUS, vocab_size=200)


def test_gpt2_offline_known_ids(tmp_path):
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.bos_id == tok.eos_id == 50256 and tok.vocab_size == 50257 + len(SPECIAL_TOKENS) - 2
    text = "GPT-2's encoding, built offline: naïve 東京 🙂"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tokenizer.json")  # saved as a pointer to the name
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode("Hello world") == [15496, 995]


def test_same_compression_as_rustbpe():
    rustbpe = pytest.importorskip("rustbpe")
    ours = Tokenizer.from_merges(train_bpe(CORPUS, vocab_size=512 + len(SPECIAL_TOKENS), progress=False))
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(CORPUS), 512, pattern=SPLIT_PATTERN)
    n_ours = sum(len(ours.encode(t)) for t in CORPUS)
    n_theirs = sum(len(theirs.encode(t)) for t in CORPUS)
    assert abs(n_ours - n_theirs) / n_theirs < 0.02, (n_ours, n_theirs)


def test_count_chunks_uses_the_gpt4_split_with_single_digits():
    counts = count_chunks(["Hello world's 12345 end!!\n"])
    assert list(counts) == ["Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " end", "!!\n"]
    assert list(count_chunks(["12345"], GPT4_SPLIT_PATTERN)) == ["123", "45"]  # GPT-4's own: up to 3 digits


def test_a_trained_bpe_never_merges_digits():
    text = ["in 1999 and 2024 we paid 1,250 for 33 books; 1999 again and 1999."] * 30
    tok = Tokenizer.from_merges(train_bpe(text, vocab_size=300 + len(SPECIAL_TOKENS), progress=False))
    assert [tok.decode([i]) for i in tok.encode("1999 + 20245")][:4] == ["1", "9", "9", "9"]
    assert all(not any(c.isdigit() for c in tok.decode([i])) or len(tok.decode([i])) == 1
               for i in tok.encode(text[0])), "a token holds more than one digit"
