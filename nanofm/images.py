"""Image data: the built-in sets, user folders, safe decoding, curation, and the tensors models read.

    from nanofm import images
    items = images.digits()                       # scikit-learn's 1,797 8x8 handwritten digits
    items = images.shapes(2000, seed=0)           # drawn scenes of 1-4 shapes, with counts and captions
    items = images.load_folder("my_images/")      # class sub-folders, or captions.jsonl beside the files
    kept, report = images.curate(items)           # decode errors, size, aspect, exact and near duplicates
    x = images.to_tensor(kept, size=16)           # [N, 1, 16, 16] floats in [0, 1]
    train, test = images.split(kept, test=0.2)    # a split that follows each image's content hash
    images.data_url(item["image"]) / images.from_data_url(url)   # what serving reads and writes
    python -m nanofm.images --folder my_images/   # curate a folder and print the report

An item is a dict: {"id", "image" (float32 [H, W] in [0, 1], grey), "label" (str or None),
"caption" (str or None), "count" (shapes: how many), "source"}. A user's file that has not been
decoded yet carries "bytes" instead of "image"; curation decodes it, and counts what fails.

Design decisions:
- Grey images only: digits are grey, drawn shapes need no colour, and one channel keeps the
  vision stems small. A colour file is converted (ITU-R 601 luma, PIL's "L"). Doubt: colour is
  the first thing a fork would add (VisionConfig.channels is already a setting).
- Decoding never trusts a file: the header's size is checked before pixels are decoded (a
  "decompression bomb" of a few KB can claim 100,000 x 100,000 pixels), a truncated file fails
  on its pixels, not later, and an empty file or one that is not an image is an ImageError that
  names the problem. Curation counts these removals, per reason; nothing is deleted on disk.
- Near-duplicates: a 64-bit difference hash (dHash: the image shrunk to 9x8, one bit per pair of
  neighbours, "is the left one brighter") changes little under resizing, re-encoding or slight
  brightness changes. Two images are near-duplicates when their hashes differ in at most
  `near_bits` bits. The search cuts each hash into near_bits + 1 bands of bits: by pigeonhole, two
  hashes within near_bits bits agree exactly on at least one band, so comparing only images that
  share a band finds every such pair (no misses), without comparing all pairs.
- The train/test split of the built-in digits is by a hash of each image's pixels, so an image
  (and an exact copy of it) always lands on the same side, whatever else is in the set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from nanofm.common import NanofmError

MAX_PIXELS = 4096 * 4096  # larger claims are refused before decoding (16.7 M pixels, 16.7 MB grey)
MAX_BYTES = 20 * 2**20  # a file or data URL larger than this is refused unread
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPE_KINDS = ("square", "circle", "triangle")


class ImageError(NanofmError, ValueError):
    pass


# ------------------------------------------------------------------ decoding and encoding

def decode(data: bytes, what: str = "the image") -> np.ndarray:
    """Grey pixels float32 [H, W] in [0, 1] from PNG/JPEG/... bytes; ImageError names the problem."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{what} is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{what} is {len(data) / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            if width == 0 or height == 0:
                raise ImageError(f"{what} has zero size ({width}x{height})")
            if width * height > MAX_PIXELS:
                raise ImageError(f"{what} is {width}x{height} pixels; the limit is {MAX_PIXELS:,} pixels")
            img.load()  # decodes every pixel now: a truncated file fails here
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image PIL can read (PNG, JPEG, BMP, GIF, WebP), or its header is "
                         f"invalid (such as a zero width or height)") from None
    except Image.DecompressionBombError:  # PIL's own check, at twice its default limit, fires first
        raise ImageError(f"{what} claims more pixels than PIL allows; the limit is {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} cannot be decoded ({exc}); the file is truncated or corrupt") from None
    return grey


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a grey image in [0, 1] (values outside are clipped)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: np.ndarray) -> str:
    """A data URL (RFC 2397) of the image as PNG: what an OpenAI-style image_url part carries."""
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def from_data_url(url: str) -> bytes:
    """The bytes of a base64 image data URL; ImageError for a remote URL or a malformed one."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ImageError("image_url must be a data URL (data:image/png;base64,...); remote URLs are not fetched")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise ImageError(f"the data URL must look like data:image/<type>;base64,<data>; got {header[:60]!r}")
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise ImageError(f"the image is larger than {MAX_BYTES // 2**20} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL's base64 payload is malformed") from None


def pixel_hash(image: np.ndarray) -> str:
    """A hash of the pixels (8-bit) and the shape: the key of exact duplicates, the split and the logs."""
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=8).hexdigest()


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaged (antialiased) resize with PIL, float in, float out."""
    from PIL import Image

    if image.shape == (height, width):
        return image.astype(np.float32)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BOX
                                                                          if image.shape[0] >= height else Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash: shrink to 9 wide x 8 high, one bit per horizontal neighbour pair."""
    small = resize(image, 8, 9)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


# ------------------------------------------------------------------ the built-in sets

def digits() -> list[dict]:
    """scikit-learn's handwritten digits (UCI ML optical digits test set: 1,797 images of 8x8, 16
    grey levels), shipped inside the scikit-learn package: no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImageError("the built-in digits ship with scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    return [{"id": f"digits/{i}", "image": (image / 16.0).astype(np.float32), "label": str(int(target)),
             "caption": f"the digit {int(target)}", "count": None, "source": "digits"}
            for i, (image, target) in enumerate(zip(data.images, data.target))]


def _draw(canvas: np.ndarray, kind: str, cy: float, cx: float, r: float) -> None:
    yy, xx = np.mgrid[0:canvas.shape[0], 0:canvas.shape[1]] + 0.5
    if kind == "square":
        inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)  # the same area as the circle, about
    elif kind == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:  # an upward triangle: apex at the top, base at the bottom, as wide as it is tall
        top, bottom = cy - r, cy + r
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= (yy - top) / 2)
    canvas[inside] = 1.0


def shapes(n: int, seed: int = 0, size: int = 16, max_count: int = 4, supersample: int = 4) -> list[dict]:
    """n drawn scenes of 1..max_count shapes of one kind (squares, circles or triangles) that do not
    touch, on a size x size canvas; label = the count, caption "3 circles". Drawn at supersample
    times the size and shrunk by averaging, so edges are grey (anti-aliased) and a small circle
    still looks round."""
    rng = random.Random(seed)
    items, big = [], size * supersample
    while len(items) < n:
        count, kind = rng.randint(1, max_count), rng.choice(SHAPE_KINDS)
        centres = []
        while len(centres) < count:  # place by rejection (a fresh start when stuck): a gap between shapes
            centres = [] if len(centres) and rng.random() < 0.01 else centres
            r = rng.uniform(0.11, 0.16) * size
            cy, cx = rng.uniform(r + 0.5, size - r - 0.5), rng.uniform(r + 0.5, size - r - 0.5)
            if all((cy - y) ** 2 + (cx - x) ** 2 > (r + s + 2.0) ** 2 for y, x, s in centres):
                centres.append((cy, cx, r))
        canvas = np.zeros((big, big), dtype=np.float32)
        for cy, cx, r in centres:
            _draw(canvas, kind, cy * supersample, cx * supersample, r * supersample)
        canvas = canvas.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
        noun = kind if count == 1 else kind + "s"
        items.append({"id": f"shapes/{seed}/{len(items)}", "image": canvas, "label": str(count),
                      "caption": f"{count} {noun}", "count": count, "kind": kind, "source": "shapes"})
    return items


# ------------------------------------------------------------------ user folders

def load_folder(path: str | Path) -> list[dict]:
    """A user's images, undecoded (curate() decodes them and counts the failures). Two layouts:
    class sub-folders (cats/1.png -> label "cats"), or files with a captions.jsonl of
    {"file": "1.png", "caption": "...", "label": optional} lines."""
    root = Path(path)
    if not root.is_dir():
        raise ImageError(f"no image folder at {root}")
    captions = {}
    if (root / "captions.jsonl").is_file():
        for n, line in enumerate((root / "captions.jsonl").read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ImageError(f"{root / 'captions.jsonl'} line {n} is not {{\"file\": ..., \"caption\": ...}}") from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ImageError(f"{root} holds no {', '.join(EXTENSIONS)} files")
    items = []
    for file in files:
        relative = file.relative_to(root).as_posix()
        row = captions.get(relative, {})
        label = row.get("label") or (file.parent.name if file.parent != root else None)
        if file.stat().st_size > MAX_BYTES:  # not read at all; curation counts it like an undecodable file
            items.append({"id": relative, "bytes": b"", "too_large": file.stat().st_size, "label": label,
                          "caption": row.get("caption"), "count": None, "source": str(root)})
            continue
        items.append({"id": relative, "bytes": file.read_bytes(), "label": label, "caption": row.get("caption"),
                      "count": None, "source": str(root)})
    return items


# ------------------------------------------------------------------ curation

def curate(items: list[dict], min_side: int = 8, max_aspect: float = 4.0, near_bits: int = 4,
           near_min_side: int = 32, progress: bool = False) -> tuple[list[dict], dict]:
    """(kept items, report). Removes, in order and counted per reason: files that do not decode
    (with the first few errors), images smaller than min_side, wider or taller than max_aspect,
    exact duplicates (same pixels) and near-duplicates (dHash within near_bits bits; -1 turns it
    off). The first of each group of duplicates is kept. The report has per-class counts before
    and after. Near-duplicates are looked for among images of at least near_min_side pixels a
    side only: the hash sees a 9x8 shrink, which for an image about that small is the image's
    coarse layout, not its identity. Measured on the 8x8 digits: even hashes that agree exactly
    would remove 35 of 1,797 images (different writers), and 4 bits 960."""
    from tqdm import tqdm

    removed, errors, kept = Counter(), [], []
    seen_exact, bands = set(), [dict() for _ in range(max(near_bits, 0) + 1)]
    hashes, checked = [], 0
    for item in tqdm(items, desc="curate images", disable=not progress):
        image = item.get("image")
        if image is None:
            try:
                if item.get("too_large"):
                    raise ImageError(f"{item['too_large'] / 2**20:.1f} MB; the limit is {MAX_BYTES // 2**20} MB")
                image = decode(item["bytes"], what=item["id"])
            except ImageError as exc:
                removed["undecodable"] += 1
                if len(errors) < 5:
                    errors.append(str(exc))
                continue
        h, w = image.shape
        if min(h, w) < min_side:
            removed["too_small"] += 1
            continue
        if max(h, w) / min(h, w) > max_aspect:
            removed["aspect"] += 1
            continue
        key = pixel_hash(image)
        if key in seen_exact:
            removed["exact_duplicate"] += 1
            continue
        seen_exact.add(key)
        if near_bits >= 0 and min(h, w) >= near_min_side:
            checked += 1
            code = dhash(image)
            if _near_duplicate(code, bands, hashes, near_bits):
                removed["near_duplicate"] += 1
                continue
            _index(code, len(hashes), bands, near_bits)
            hashes.append(code)
        kept.append({**{k: v for k, v in item.items() if k not in ("bytes", "too_large")}, "image": image, "hash": key})
    report = {"images_in": len(items), "images_kept": len(kept), "removed": dict(removed), "errors": errors,
              "min_side": min_side, "max_aspect": max_aspect, "near_bits": near_bits, "near_checked": checked,
              "classes_in": dict(sorted(Counter(str(i.get("label")) for i in items).items())),
              "classes_kept": dict(sorted(Counter(str(i.get("label")) for i in kept).items()))}
    return kept, report


def _band_keys(code: int, near_bits: int) -> list[tuple[int, int]]:
    """The hash cut into near_bits + 1 bands of bits: (band number, the band's bits)."""
    n = near_bits + 1
    edges = [64 * i // n for i in range(n + 1)]
    return [(b, (code >> edges[b]) & ((1 << (edges[b + 1] - edges[b])) - 1)) for b in range(n)]


def _near_duplicate(code: int, bands: list[dict], hashes: list[int], near_bits: int) -> bool:
    candidates = {j for b, key in _band_keys(code, near_bits) for j in bands[b].get(key, ())}
    return any(bin(code ^ hashes[j]).count("1") <= near_bits for j in candidates)


def _index(code: int, position: int, bands: list[dict], near_bits: int) -> None:
    for b, key in _band_keys(code, near_bits):
        bands[b].setdefault(key, []).append(position)


# ------------------------------------------------------------------ image chats

QUESTIONS = {
    "image_digit": ["What digit is this?", "Which digit is shown?", "What number is written here?"],
    "image_count": ["How many shapes are there?", "Count the shapes.", "How many shapes do you see?"],
    "image_shape": ["What shape is this?", "Which kind of shape is drawn?"],
}


def chats(items: list[dict], seed: int = 0, per_image: int = 1) -> list[dict]:
    """Image chats for SFT and evaluation: per_image questions about each image (a digit's value,
    a scene's count or kind of shape), the question after the image, a short answer to check by
    exact match. {"family", "messages", "answer", "image_hash"}."""
    rng = random.Random(seed)
    out = []
    for item in items:
        if item.get("source") == "digits":
            asks = [("image_digit", item["label"])]
        elif item.get("source") == "shapes":
            asks = [("image_count", str(item["count"])), ("image_shape", item["kind"])]
        else:
            asks = [("image_label", item["label"])] if item.get("label") else []
            asks += [("image_caption", item["caption"])] if item.get("caption") else []
        for family, answer in asks:
            questions = QUESTIONS.get(family, ["What is this?"] if family == "image_label" else ["Describe the image."])
            for question in rng.sample(questions, min(per_image, len(questions))):
                out.append({"family": family, "answer": answer, "image_hash": item.get("hash") or pixel_hash(item["image"]),
                            "messages": [{"role": "user", "content": [{"type": "image", "image": item["image"]},
                                                                      {"type": "text", "text": question}]},
                                         {"role": "assistant", "content": answer}]})
    return out


# ------------------------------------------------------------------ splits and tensors

def split(items: list[dict], test: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) by a hash of each image's pixels and the seed: stable whatever else is in the set."""
    def side(item):
        key = item.get("hash") or pixel_hash(item["image"])
        return int(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest(), 16) / 2**64 < test
    return [i for i in items if not side(i)], [i for i in items if side(i)]


def to_tensor(items: list[dict], size: int):
    """[N, 1, size, size] float32 in [0, 1]: every image resized to the model's input size."""
    import torch

    return torch.from_numpy(np.stack([resize(item["image"], size, size) for item in items]))[:, None]


def perturb(x, noise: float = 0.0, shift: int = 0, generator=None):
    """Images x [N, 1, H, W] with Gaussian noise of std `noise` added (clipped to [0, 1]) and moved
    `shift` pixels right and down (zeros come in): the robustness checks of evaluation."""
    import torch

    if shift:
        moved = torch.zeros_like(x)
        moved[..., shift:, shift:] = x[..., :-shift, :-shift]
        x = moved
    if noise:
        x = (x + noise * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    return x


# ------------------------------------------------------------------ a data set from settings

@dataclass
class ImageData:
    """Which images, curated how, split how: what train_vision.py records in its checkpoints'
    config, so that eval.py rebuilds the very same held-out images."""
    data: list = field(default_factory=lambda: ["digits"])  # digits | shapes | folder:PATH
    seed: int = 0  # draws the shapes and the split
    n_shapes: int = 3000
    image_size: int = 16  # shapes are drawn at max(16, image_size)
    min_side: int = 8
    max_aspect: float = 4.0
    near_bits: int = 4
    test_fraction: float = 0.2

    @classmethod
    def of(cls, config: dict) -> "ImageData":
        """The fields of a (checkpoint's) config that say which images; the rest is ignored."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})


def gather(spec: ImageData, progress: bool = False) -> tuple[list[dict], list[dict], dict]:
    """(train items, held-out items, curation report) of every source in spec.data, curated together."""
    items = []
    for source in spec.data:
        if source == "digits":
            items += digits()
        elif source == "shapes":
            items += shapes(spec.n_shapes, seed=spec.seed, size=max(spec.image_size, 16))
        elif source.startswith("folder:"):
            items += load_folder(source.split(":", 1)[1])
        else:
            raise ImageError(f"unknown image source {source!r}: give digits, shapes or folder:PATH")
    kept, report = curate(items, spec.min_side, spec.max_aspect, spec.near_bits, progress=progress)
    if not kept:
        raise ImageError(f"no image survived curation: {report['removed']} (first errors: {report['errors'][:2]})")
    train, test = split(kept, spec.test_fraction, spec.seed)
    report.update(train=len(train), test=len(test))
    return train, test, report


def main(argv=None) -> dict:
    from nanofm.config import ArgumentParser

    parser = ArgumentParser(description="curate images and print the report: a user folder, or the built-in sets")
    parser.add_argument("--folder", default="", help="class sub-folders, or files with a captions.jsonl")
    parser.add_argument("--near_bits", type=int, default=4, help="near-duplicate threshold in dHash bits (-1: off)")
    parser.add_argument("--near_min_side", type=int, default=32, help="look for near-duplicates among images this large")
    parser.add_argument("--min_side", type=int, default=8)
    parser.add_argument("--max_aspect", type=float, default=4.0)
    args = parser.parse_args(argv)
    items = load_folder(args.folder) if args.folder else digits() + shapes(2000)
    _, report = curate(items, args.min_side, args.max_aspect, args.near_bits, args.near_min_side, progress=True)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    from nanofm.common import run_cli
    run_cli(main)
