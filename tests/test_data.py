"""Token shards: round trip, header checks, and the distributed, resumable loader."""

import numpy as np
import pytest
import torch

from nanofm import data
from nanofm.data import HEADER, ShardError, TokenLoader


def test_shard_round_trip_uint16_and_uint32(tmp_path):
    small = np.arange(1000, dtype=np.uint16)
    data.write_shard(tmp_path / "a.bin", small, n_docs=3)
    assert data.read_header(tmp_path / "a.bin") == {"tokens": 1000, "docs": 3, "dtype": np.dtype(np.uint16)}
    assert np.array_equal(data.open_shard(tmp_path / "a.bin"), small)
    big = np.array([0, 70000, 2**32 - 1], dtype=np.uint32)
    data.write_shard(tmp_path / "b.bin", big, n_docs=1)
    assert np.array_equal(data.open_shard(tmp_path / "b.bin"), big)
    assert (tmp_path / "a.bin").stat().st_size == HEADER.size + 2000
    assert data.dtype_for_vocab(65536) == np.uint16 and data.dtype_for_vocab(65537) == np.uint32


def test_corrupt_headers_fail_clearly(tmp_path):
    path = tmp_path / "s.bin"
    data.write_shard(path, np.arange(100, dtype=np.uint16), n_docs=1)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ShardError, match="truncated"):
        data.open_shard(path)
    path.write_bytes(b"GARBAGE!" + raw[8:])
    with pytest.raises(ShardError, match="magic"):
        data.open_shard(path)
    path.write_bytes(raw[:8] + (7).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ShardError, match="version 7"):
        data.open_shard(path)
    path.write_bytes(raw[:12] + (3).to_bytes(4, "little") + raw[16:])
    with pytest.raises(ShardError, match="bytes per token"):
        data.open_shard(path)
    path.write_bytes(raw[:20])
    with pytest.raises(ShardError, match="shorter than the 32-byte header"):
        data.open_shard(path)
    with pytest.raises(ShardError, match="does not exist"):
        data.open_shard(tmp_path / "nope.bin")


def test_write_shards_splits_and_counts(tmp_path):
    docs = [[1] + list(range(10, 10 + n)) for n in (5, 7, 3, 9)]
    written = data.write_shards(docs, tmp_path, "train", vocab_size=100, shard_tokens=15)
    # documents of 6, 8, 4, 10 tokens: 6+8 fit in 15, 4+10 fit in the next
    assert [w["tokens"] for w in written] == [14, 14] and [w["docs"] for w in written] == [2, 2]
    joined = np.concatenate([data.open_shard(tmp_path / w["path"]) for w in written])
    assert joined.tolist() == [t for d in docs for t in d]
    with pytest.raises(ShardError, match="outside the vocabulary"):
        data.write_shards([[5, 100]], tmp_path, "bad", vocab_size=100)


def make_data(tmp_path, n=10_000, shards=2):
    per = n // shards
    for i in range(shards):
        data.write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(i * per, (i + 1) * per, dtype=np.uint16) % 60000, 1)
    return tmp_path


def test_loader_shifts_targets(tmp_path):
    loader = TokenLoader(make_data(tmp_path), "train", batch_size=2, seq_len=8)
    x, y = loader.next_batch()
    assert x.shape == (2, 8) and x.dtype == torch.int64
    assert x.flatten().tolist() == list(range(16)) and y.flatten().tolist() == list(range(1, 17))
    x2, _ = loader.next_batch()
    assert x2[0, 0].item() == 16


def test_ranks_split_what_one_process_reads(tmp_path):
    make_data(tmp_path)
    single = TokenLoader(tmp_path, "train", batch_size=4, seq_len=16)
    ranks = [TokenLoader(tmp_path, "train", batch_size=2, seq_len=16, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_resume_continues_exactly_across_shards_and_epochs(tmp_path):
    make_data(tmp_path, n=2000, shards=2)
    straight = TokenLoader(tmp_path, "train", batch_size=3, seq_len=50)
    batches = [straight.next_batch()[0] for _ in range(30)]  # wraps around both shards
    assert straight.epoch >= 1
    first = TokenLoader(tmp_path, "train", batch_size=3, seq_len=50)
    for _ in range(13):
        first.next_batch()
    resumed = TokenLoader(tmp_path, "train", batch_size=3, seq_len=50)
    resumed.load_state_dict(first.state_dict())
    for expected in batches[13:]:
        assert torch.equal(resumed.next_batch()[0], expected)


def test_loader_errors(tmp_path):
    with pytest.raises(ShardError, match="run data/prepare.py"):
        TokenLoader(tmp_path, "train", 2, 8)
    make_data(tmp_path, n=100, shards=1)
    with pytest.raises(ShardError, match="too small for one step"):
        TokenLoader(tmp_path, "train", batch_size=4, seq_len=64)
    loader = TokenLoader(tmp_path, "train", 2, 8)
    with pytest.raises(ShardError, match="same data"):
        loader.load_state_dict({"shard": 0, "position": 0, "epoch": 0, "files": ["other.bin"]})


def test_split_is_stable_and_keeps_repeats_together():
    doc = {"id": "a", "meta": {}}
    repeat = {"id": "a#repeat1", "meta": {"root_id": "a"}}
    assert data.split_of(doc, 0.5) == data.split_of(repeat, 0.5)
    splits = [data.split_of({"id": f"d{i}", "meta": {}}, 0.1) for i in range(5000)]
    assert 0.08 < splits.count("val") / 5000 < 0.12


def test_unigram_entropy(tmp_path):
    import math
    data.write_shard(tmp_path / "train_000000.bin", np.array([0, 0, 1, 1], dtype=np.uint16), 1)
    data.write_shard(tmp_path / "train_000001.bin", np.array([3, 3, 3, 3], dtype=np.uint16), 1)
    # p = (1/4, 1/4, 1/2): H = 1.5 ln 2
    assert data.unigram_entropy(tmp_path) == pytest.approx(1.5 * math.log(2))


def test_copy_rows_repeat_random_ordinary_tokens():
    from nanofm.data import copy_rows
    window = torch.arange(64 * 257).view(64, 257) % 50_000 + 100_000  # text: ids no copy row can draw
    x, y = window[:, :-1], window[:, 1:]
    same_x, same_y = copy_rows(x, y, 0.0, 500, torch.Generator().manual_seed(0))
    assert torch.equal(same_x, x) and torch.equal(same_y, y)
    new_x, new_y = copy_rows(x, y, 0.5, 500, torch.Generator().manual_seed(0))
    again_x, _ = copy_rows(x, y, 0.5, 500, torch.Generator().manual_seed(0))
    assert torch.equal(new_x, again_x) and torch.equal(new_x[:, 1:], new_y[:, :-1])  # seeded; y is still x shifted
    rows = torch.cat([new_x, new_y[:, -1:]], 1)
    copied = [r for r, orig in zip(rows.tolist(), window.tolist()) if r != orig]
    assert 20 <= len(copied) <= 44  # about half
    periods = set()
    for row in copied:
        assert max(row) < 500  # ordinary tokens only (below the first special id)
        period = next(p for p in range(8, 65) if row[p:] == row[:-p])  # the row is one sequence, repeated
        assert len(set(row[:period])) > period // 2  # of random tokens
        periods.add(period)
    assert len(periods) > 8  # each row its own length
