"""Token shards on disk and the loader that feeds pretraining batches from them.

Shard format (little-endian): a 32-byte header, then the tokens.

    offset  size  field
    0       8     magic  b"NANOFMTK"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, vocabularies up to 65536) or 4 (uint32)
    16      8     number of tokens
    24      8     number of documents
    32      ...   tokens; every document starts with the tokenizer's bos token

Design decisions:
- The split (train/val) is decided by a stable hash of a document's root id, so repeats made
  by domain mixing (nanofm/curate.py) never land on both sides, and the tokenizer is trained
  on the train side only.
- Documents are shuffled once (seeded) before sharding, so a sequential read mixes domains.
- Shards are written under a temporary name and renamed when complete.
- The loader reads sequentially: every step, rank r of W takes rows r*B .. r*B+B-1 of the next
  W*B rows of T+1 tokens. Its whole state is (shard, position, epoch), the same on every rank,
  so it goes into checkpoints and a resumed run continues exactly where it stopped.
- Every shard is checked when opened: wrong magic, unknown version or dtype, or fewer bytes than
  the header promises are errors that name the file; check_token_ids finds ids beyond the
  tokenizer's vocabulary (a corrupt shard, or another tokenizer's) before training starts.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
from nanofm.common import ConfigError, NanofmError, atomic_write_bytes

MAGIC = b"NANOFMTK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, tokens, documents
assert HEADER.size == 32


class ShardError(NanofmError, ValueError):
    pass


def split_of(doc: dict, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'val' for a document, from a stable hash of its root id."""
    from nanofm.sources import stable_hash

    root = doc.get("meta", {}).get("root_id", doc["id"])
    return "val" if (stable_hash(f"{seed}:{root}") % 1_000_000) < val_fraction * 1_000_000 else "train"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, n_docs: int) -> None:
    """Write one shard atomically."""
    path = Path(path)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ShardError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    atomic_write_bytes(path, HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, len(tokens), n_docs)
                       + tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


def read_header(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"token shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ShardError(f"{path} is not a nanofm token shard: {size} bytes is shorter than the 32-byte header")
    magic, version, itemsize, n_tokens, n_docs = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a nanofm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardError(f"{path} has shard format version {version}; this nanofm reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path} has a bad header: {itemsize} bytes per token (expected 2 or 4)")
    expected = HEADER.size + n_tokens * itemsize
    if size != expected:
        raise ShardError(f"{path} is truncated or corrupt: the header promises {n_tokens} tokens "
                         f"({expected} bytes) but the file has {size} bytes; re-run data/prepare.py --force")
    return {"tokens": n_tokens, "docs": n_docs, "dtype": np.dtype(np.uint16 if itemsize == 2 else np.uint32)}


def open_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only memmap (checked header)."""
    header = read_header(path)
    return np.memmap(path, dtype=header["dtype"].newbyteorder("<"), mode="r", offset=HEADER.size,
                     shape=(header["tokens"],))


def check_token_ids(data_dir: str | Path, vocab_size: int) -> None:
    """Every token id of the data dir's shards is below vocab_size (a shard from another
    tokenizer, or a corrupt one, would otherwise fail inside the embedding lookup)."""
    for split in ("train", "val"):
        for path in shard_paths(data_dir, split):
            tokens = open_shard(path)
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise ShardError(f"{path} holds token id {int(tokens.max())}, outside the tokenizer's {vocab_size} ids; "
                                 f"the shard is corrupt or from another tokenizer: re-run data/prepare.py --force")


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    paths = sorted(Path(data_dir).glob(f"{split}_*.bin"))
    if not paths:
        raise ShardError(f"no {split} shards ({split}_*.bin) in {data_dir}; run data/prepare.py first")
    return paths


def write_shards(token_lists, out_dir: str | Path, prefix: str, vocab_size: int,
                 shard_tokens: int = 100_000_000) -> list[dict]:
    """Concatenate documents (each already starting with bos) into shards of at most
    `shard_tokens` tokens (a document never spans two shards unless it alone is bigger)."""
    dtype = dtype_for_vocab(vocab_size)
    out_dir, written, buffer, n_buffered, docs = Path(out_dir), [], [], 0, 0

    def flush():
        nonlocal buffer, n_buffered, docs
        path = out_dir / f"{prefix}_{len(written):06d}.bin"
        tokens = np.concatenate(buffer).astype(dtype) if buffer else np.zeros(0, dtype)
        write_shard(path, tokens, docs)
        written.append({"path": path.name, "tokens": int(len(tokens)), "docs": docs})
        buffer, n_buffered, docs = [], 0, 0

    for ids in token_lists:
        array = np.asarray(ids, dtype=np.int64)
        if len(array) and array.max() >= vocab_size:
            raise ShardError(f"token id {array.max()} is outside the vocabulary of {vocab_size}")
        if n_buffered and n_buffered + len(array) > shard_tokens:
            flush()
        buffer.append(array)
        n_buffered += len(array)
        docs += 1
    if buffer or not written:
        flush()
    return written


def shuffled(docs: list, seed: int) -> list:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order]


class TokenLoader:
    """Causal-LM batches (x, y) of shape [B, T] from token shards; distributed-aware and resumable.

        loader = TokenLoader("data/default", "train", batch_size=8, seq_len=256, rank=0, world_size=1)
        x, y = loader.next_batch()           # y is x shifted left by one token
        state = loader.state_dict()          # into the checkpoint
        loader.load_state_dict(state)        # exact resume
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu"):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.paths = shard_paths(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.batch_size, self.seq_len, self.rank, self.world_size, self.device = batch_size, seq_len, rank, world_size, device
        self.step_tokens = world_size * batch_size * seq_len + 1  # one step of all ranks, + the last target
        usable = [len(s) for s in self.shards if len(s) >= self.step_tokens]
        if not usable:
            biggest = max(len(s) for s in self.shards)
            raise ShardError(f"the {split} shards in {data_dir} are too small for one step: the largest has {biggest} "
                             f"tokens, a step needs {self.step_tokens} (world_size x batch_size x seq_len + 1); "
                             f"use a smaller batch_size or seq_len, or more data")
        self.shard, self.position, self.epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"shard": self.shard, "position": self.position, "epoch": self.epoch,
                "files": [p.name for p in self.paths], "batch_size": self.batch_size, "seq_len": self.seq_len,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("files") and state["files"] != [p.name for p in self.paths]:
            raise ShardError(f"the loader state was saved for shards {state['files'][:3]}..., but the data "
                             f"directory holds {[p.name for p in self.paths][:3]}...; resume on the same data")
        self.shard, self.position, self.epoch = int(state["shard"]), int(state["position"]), int(state["epoch"])

    def next_batch(self):
        import torch

        while self.position + self.step_tokens > len(self.shards[self.shard]):
            self.shard, self.position = self.shard + 1, 0  # the tail of a shard is skipped
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
        rows = self.batch_size * self.seq_len
        start = self.position + self.rank * rows
        chunk = np.asarray(self.shards[self.shard][start:start + rows + 1], dtype=np.int64)
        self.position += self.world_size * rows
        buffer = torch.from_numpy(chunk)
        x = buffer[:-1].view(self.batch_size, self.seq_len)
        y = buffer[1:].view(self.batch_size, self.seq_len)
        if self.device != "cpu":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def mask_tokens(x, vocab_size: int, mask_id: int, special_ids: list[int], prob: float = 0.15,
                generator=None):
    """BERT masking: choose `prob` of the non-special tokens; of those, 80% become <|mask|>, 10% a
    random regular token, 10% stay. Returns (inputs, targets) with targets -100 where not chosen.

    Random tokens are drawn from the regular vocabulary (below the first special id), so the model
    is never fed a control token it has to predict around."""
    import torch

    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[torch.tensor(special_ids, dtype=torch.long)] = True
    special = special.to(x.device)
    draws = torch.rand(x.shape + (2,), generator=generator, device="cpu").to(x.device)
    chosen = (draws[..., 0] < prob) & ~special[x]
    targets = torch.where(chosen, x, torch.full_like(x, -100))
    inputs = x.clone()
    to_mask = chosen & (draws[..., 1] < 0.8)
    to_random = chosen & (draws[..., 1] >= 0.8) & (draws[..., 1] < 0.9)
    inputs[to_mask] = mask_id
    n_regular = min(special_ids) if special_ids else vocab_size
    random_tokens = torch.randint(0, n_regular, x.shape, generator=generator, device="cpu").to(x.device)
    inputs[to_random] = random_tokens[to_random]
    return inputs, targets


def copy_rows(x, y, prob: float, n_ordinary: int, generator=None):
    """The induction task as pretraining data (Olsson et al. 2022's repeated random tokens): with
    probability `prob` a row is replaced by a random sequence of ordinary tokens (ids below
    `n_ordinary`, the first special token) of 8 to 64 tokens, repeated until the row is full. After
    its first pass every token is predictable by looking back and copying, which is what trains
    induction heads; natural text, even with spans of it quoted again in the row, did not grow them
    within a CPU budget (README, stages 3-4). Each row draws its own length and tokens, so nothing
    but matching the content predicts the repeat.
    (x, y) are the rows' inputs and next-token targets; returns new ones of the same shape."""
    import torch

    window = torch.cat([x, y[:, -1:]], dim=1).clone()  # the T + 1 tokens each row was cut from
    n = window.shape[1]
    picks = torch.rand(x.shape[0], generator=generator) < prob
    lengths = torch.randint(8, 65, (x.shape[0],), generator=generator)
    tokens = torch.randint(0, n_ordinary, (x.shape[0], 64), generator=generator)
    for row in picks.nonzero().flatten().tolist():
        length = int(lengths[row])
        window[row] = tokens[row, :length].repeat(-(-n // length))[:n].to(window.device)
    return window[:, :-1], window[:, 1:]


def pad_batch(rows, value: int = 0, left: bool = False):
    """(ids [B, T], mask [B, T]) from token lists of unequal length, padded with `value` on the
    right (scoring, classifying) or on the left (generation: every prompt ends at the last column)."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, cols], mask[b, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def unigram_entropy(data_dir, split: str = "train") -> float:
    """Entropy (nats/token) of the token distribution: the loss of a model that ignores context."""
    counts = np.zeros(0, dtype=np.int64)
    for path in shard_paths(data_dir, split):
        shard_counts = np.bincount(open_shard(path))
        if len(shard_counts) > len(counts):
            counts = np.pad(counts, (0, len(shard_counts) - len(counts)))
        counts[:len(shard_counts)] += shard_counts
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class MixedLoader:
    """Batches that mix two token sources row-wise: `replay_rows` rows of every batch come from
    the old data (replay, against forgetting), the rest from the new. Both positions are saved."""

    def __init__(self, new: TokenLoader, old: TokenLoader):
        self.new, self.old = new, old

    def next_batch(self):
        import torch

        (x_new, y_new), (x_old, y_old) = self.new.next_batch(), self.old.next_batch()
        return torch.cat([x_new, x_old]), torch.cat([y_new, y_old])

    def state_dict(self) -> dict:
        return {"new": self.new.state_dict(), "old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "new" not in state:
            raise ShardError("the checkpoint's data position has no replay part: resume with the same --replay_ratio")
        self.new.load_state_dict(state["new"])
        self.old.load_state_dict(state["old"])


class RowLoader:
    """What the row loaders share: a seeded shuffle of `self.rows` per epoch, each step's rows for
    this rank (rank r of W takes rows r*B..r*B+B-1 of every W*B), and a resumable position."""

    what = "rows"

    def _init_rows(self, batch_size: int, rank: int, world_size: int, device: str, seed: int) -> None:
        self.batch_size, self.rank, self.world_size, self.device, self.seed = batch_size, rank, world_size, device, seed
        self.epoch, self.position = 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def _next_rows(self) -> list:
        step_rows = self.batch_size * self.world_size
        if self.position + step_rows > len(self.order):  # a new epoch, newly shuffled (the tail is skipped)
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._order()
        start = self.position + self.rank * self.batch_size
        self.position += step_rows
        return [self.rows[i] for i in self.order[start:start + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rows": len(self.rows), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows):
            raise ShardError(f"the loader state was saved for {state.get('rows')} {self.what}, but there are "
                             f"{len(self.rows)} now; resume on the same data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = self._order()


class ChatLoader(RowLoader):
    """Chat SFT batches (x, y) from conversations rendered with the chat format: y is x shifted by
    one, -100 (no loss) everywhere but the assistant's tokens and its end-of-turn, and on the
    padding. Rows are padded on the right with the tokenizer's pad token, never eos (a model
    trained to predict eos after every reply's padding would stop anywhere, or never).

        loader = ChatLoader(items, tokenizer, batch_size=16, max_len=256, rank=0, world_size=1)
        x, y = loader.next_batch()      # [B, T] with T the longest row of this batch
        loader.truncated                # conversations cut to max_len (counted, reported)

    The order is a seeded shuffle per epoch with rows of similar length grouped into one step (less
    padding); the state (epoch, position) goes into checkpoints,
    so a resumed run sees the same batches. With world_size W, rank r takes rows r*B..r*B+B-1 of
    every W*B, like TokenLoader.
    """

    def __init__(self, items: list[dict], tokenizer, batch_size: int, max_len: int, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0):
        from nanofm import chat

        if not items:
            raise ShardError("no conversations to train on")
        if len(items) < batch_size * world_size:
            raise ShardError(f"{len(items)} conversations are fewer than one step's {batch_size * world_size} rows; "
                             f"lower --batch_size")
        self.rows, self.truncated = [], 0
        for item in items:
            ids, mask = chat.render(tokenizer, item["messages"])
            if len(ids) > max_len + 1:
                ids, mask = ids[:max_len + 1], mask[:max_len + 1]
                self.truncated += 1
            self.rows.append((ids, mask))
        if not any(sum(mask[1:]) for _, mask in self.rows):
            raise ShardError(f"no assistant token survives truncation to {max_len} tokens; raise --seq_len")
        self.pad_id, self.what = tokenizer.pad_id, "conversations"
        self._init_rows(batch_size, rank, world_size, device, seed)

    def _order(self) -> list[int]:
        """A seeded shuffle, then rows of similar length grouped into the same step (within windows
        of 64 steps, whose order is shuffled again): much less padding, still a random order."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        step_rows = self.batch_size * self.world_size
        window = step_rows * 64
        steps = []
        for start in range(0, len(order) - step_rows + 1, window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.rows[i][0]))
            steps += [chunk[i:i + step_rows] for i in range(0, len(chunk) - step_rows + 1, step_rows)]
        rng.shuffle(steps)
        return [i for step in steps for i in step]

    def next_batch(self):
        chosen = self._next_rows()
        x, _ = pad_batch([ids[:-1] for ids, _ in chosen], value=self.pad_id)
        y, _ = pad_batch([[t if m else -100 for t, m in zip(ids[1:], mask[1:])] for ids, mask in chosen], value=-100)
        if self.device != "cpu":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


class ClassifyLoader(RowLoader):
    """Classification batches (idx, mask, labels): bos + the text's first tokens up to max_len,
    right-padded with the pad token; a seeded shuffle per epoch; resumable like ChatLoader."""

    def __init__(self, items: list[dict], labels: list[str], tokenizer, batch_size: int, max_len: int, rank: int = 0,
                 world_size: int = 1, device: str = "cpu", seed: int = 0):
        if len(items) < batch_size * world_size:
            raise ShardError(f"{len(items)} labelled texts are fewer than one step's {batch_size * world_size} rows")
        index = {label: i for i, label in enumerate(labels)}
        encoded = [(tokenizer.encode(item["text"], bos=True), index[item["label"]]) for item in items]
        self.truncated = sum(len(ids) > max_len for ids, _ in encoded)  # read only up to the context: counted
        self.rows = [(ids[:max_len], label) for ids, label in encoded]
        self.pad_id, self.what = tokenizer.pad_id, "labelled texts"
        self._init_rows(batch_size, rank, world_size, device, seed)

    def class_counts(self, n_classes: int) -> list[int]:
        counts = [0] * n_classes
        for _, label in self.rows:
            counts[label] += 1
        return counts

    def next_batch(self):
        import torch

        chosen = self._next_rows()
        idx, mask = pad_batch([ids for ids, _ in chosen], value=self.pad_id)
        y = torch.tensor([label for _, label in chosen])
        return idx.to(self.device), mask.to(self.device), y.to(self.device)


class ImageLoader(RowLoader):
    """Image classification batches (images [B, C, S, S], labels [B]) from image tensors and label
    ids; a seeded shuffle per epoch, resumable like ChatLoader. shift > 0 moves each training image
    by up to `shift` pixels in each direction (zeros come in), drawn from a generator seeded by
    the loader's position, so a resumed run sees the same batches: the one augmentation here,
    since a digit written a pixel to the left is the same digit (it mostly helps the ViT stem,
    which has no convolution's tolerance to small moves)."""

    what = "images"

    def __init__(self, images, labels, batch_size: int, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 seed: int = 0, shift: int = 0):
        if len(images) < batch_size * world_size:
            raise ShardError(f"{len(images)} images are fewer than one step's {batch_size * world_size} rows; "
                             f"lower --batch_size")
        self.images, self.labels, self.shift = images, labels, shift
        self.rows = list(range(len(images)))
        self._init_rows(batch_size, rank, world_size, device, seed)

    def next_batch(self):
        import torch

        position = (self.epoch, self.position)
        chosen = torch.tensor(self._next_rows())
        x, y = self.images[chosen], self.labels[chosen]
        if self.shift:
            seed = ((self.seed * 1_000_003 + self.rank) * 1_000_003 + position[0]) * 1_000_003 + position[1]
            x = random_shift(x, self.shift, torch.Generator().manual_seed(seed % 2**62))
        return x.to(self.device), y.to(self.device)


def random_shift(x, shift: int, generator):
    """Each image [C, H, W] of x moved by (dy, dx) in [-shift, shift], zeros filling in."""
    import torch

    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
    H, W = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets)])


class ImageChatLoader(ChatLoader):
    """Chat SFT batches (x, y, images) from conversations with image parts: x and y as
    ChatLoader's, images [N, C, S, S] the batch's images in reading order (row 0's first), each
    image written as image_tokens <|image|> ids. A conversation with images longer than max_len is
    an error, not cut: a cut could split an image's tokens from its pixels (text alone is cut)."""

    def __init__(self, items: list[dict], tokenizer, batch_size: int, max_len: int, image_tokens: int, image_size: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu", seed: int = 0):
        from nanofm import chat
        from nanofm.images import to_tensor

        if len(items) < batch_size * world_size:
            raise ShardError(f"{len(items)} conversations are fewer than one step's {batch_size * world_size} rows; "
                             f"lower --batch_size")
        self.rows, self.truncated = [], 0
        for item in items:
            ids, mask = chat.render(tokenizer, item["messages"], image_tokens=image_tokens)
            pixels = chat.images_of(item["messages"])
            if len(ids) > max_len + 1 and pixels:
                raise ShardError(f"a conversation with images is {len(ids)} tokens, longer than --seq_len {max_len}")
            if len(ids) > max_len + 1:  # text alone is cut, like ChatLoader's
                ids, mask = ids[:max_len + 1], mask[:max_len + 1]
                self.truncated += 1
            images = to_tensor([{"image": p} for p in pixels], image_size) if pixels else None
            self.rows.append((ids, mask, images))
        self.pad_id, self.what = tokenizer.pad_id, "conversations"
        self._init_rows(batch_size, rank, world_size, device, seed)

    def next_batch(self):
        import torch

        chosen = self._next_rows()
        x, _ = pad_batch([ids[:-1] for ids, _, _ in chosen], value=self.pad_id)
        y, _ = pad_batch([[t if m else -100 for t, m in zip(ids[1:], mask[1:])] for ids, mask, _ in chosen], value=-100)
        pictures = [images for _, _, images in chosen if images is not None]
        images = torch.cat(pictures).to(self.device) if pictures else None
        return x.to(self.device), y.to(self.device), images


class PreferenceLoader(RowLoader):
    """Preference batches from pairs {prompt, chosen, rejected}: each step's B pairs as 2B rows, the
    B chosen first, then their B rejected in the same order, rendered with the chat format
    (chat.render_completion: the loss mask on the reply and its <|end|> only).

        x, y, attention_mask, index = loader.next_batch()
        # x [2B, T] right-padded with the pad token; y = x shifted, -100 off the reply;
        # attention_mask 1 on real tokens (a reward model reads the last one); index: the pairs' numbers
        loader.truncated, loader.dropped   # replies cut to max_len; pairs whose prompt alone fills it (counted)
    """

    def __init__(self, pairs: list[dict], tokenizer, batch_size: int, max_len: int, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0):
        from nanofm import chat

        self.rows, self.truncated, self.dropped = [], 0, 0
        for i, pair in enumerate(pairs):
            sides = []
            for reply in (pair["chosen"], pair["rejected"]):
                ids, mask = chat.render_completion(tokenizer, pair["prompt"], reply)
                if len(ids) > max_len + 1:
                    ids, mask = ids[:max_len + 1], mask[:max_len + 1]
                    self.truncated += 1
                sides.append((ids, mask))
            if all(sum(mask[1:]) for _, mask in sides):
                self.rows.append((i, sides))
            else:  # the prompt alone fills max_len: nothing of a reply is left to compare (counted)
                self.dropped += 1
        if len(self.rows) < batch_size * world_size:
            raise ShardError(f"{len(self.rows)} of {len(pairs)} preference pairs fit {max_len} tokens with some of "
                             f"their replies, fewer than one step's {batch_size * world_size}; raise --seq_len")
        self.pad_id, self.what = tokenizer.pad_id, "preference pairs"
        self._init_rows(batch_size, rank, world_size, device, seed)

    def next_batch(self):
        return self._batch(self._next_rows())

    def in_order(self, size: int):
        """Every pair once, in the given order, `size` pairs a batch (scoring: reference
        log-probabilities, held-out accuracy); the training position is untouched."""
        for start in range(0, len(self.rows), size):
            yield self._batch(self.rows[start:start + size])

    def _batch(self, pairs: list):
        import torch

        rows = [sides[side] for side in (0, 1) for _, sides in pairs]  # every chosen row, then every rejected row
        x, attention = pad_batch([ids[:-1] for ids, _ in rows], value=self.pad_id)
        y, _ = pad_batch([[t if m else -100 for t, m in zip(ids[1:], mask[1:])] for ids, mask in rows], value=-100)
        index = torch.tensor([i for i, _ in pairs])
        return tuple(t.to(self.device) for t in (x, y, attention, index))
