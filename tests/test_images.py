"""Image data: safe decoding, curation (every removal counted, nothing on disk touched), the
near-duplicate search against brute force, splits, the built-in sets and data URLs."""

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from nanofm import images
from nanofm.images import ImageError


def smooth(seed, size=64):
    """A photo-like image: smooth random brightness (a 16x16 noise field, enlarged)."""
    return images.resize(np.random.default_rng(seed).random((16, 16)).astype(np.float32), size, size)


def png_header_only(width, height):
    """A PNG of a few bytes whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def jpeg(image, quality=60):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_decode_round_trips_and_converts_colour_to_grey():
    from PIL import Image
    image = smooth(0, 20)
    assert np.abs(images.decode(images.encode_png(image)) - image).max() <= 0.5 / 255 + 1e-6
    rgb = np.zeros((4, 9, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: luma 0.299
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    grey = images.decode(buffer.getvalue())
    assert grey.shape == (4, 9) and grey == pytest.approx(np.full((4, 9), 76 / 255), abs=1e-6)


@pytest.mark.parametrize("data, problem", [
    (b"", "is empty"),
    (b"hello, not an image at all", "not an image"),
    (images.encode_png(smooth(1))[:300], "truncated or corrupt"),
    (png_header_only(5000, 5000), "5000x5000 pixels; the limit"),
    (png_header_only(100_000, 100_000), "claims more pixels than PIL allows"),
    (png_header_only(0, 5), "zero width or height"),
])
def test_bad_images_are_clear_errors(data, problem):
    with pytest.raises(ImageError, match=problem):
        images.decode(data)


def test_data_urls():
    image = smooth(2, 12)
    url = images.data_url(image)
    assert url.startswith("data:image/png;base64,")
    assert np.abs(images.decode(images.from_data_url(url)) - image).max() < 1 / 255
    for bad, problem in [("https://example.com/cat.png", "remote URLs are not fetched"),
                         ("data:text/plain;base64,aGk=", "data:image/<type>;base64"),
                         ("data:image/png;base64,@@@", "malformed")]:
        with pytest.raises(ImageError, match=problem):
            images.from_data_url(bad)


def test_dhash_survives_reencoding_and_tells_images_apart():
    a = smooth(3)
    same = [images.decode(jpeg(a)), np.clip(a + 0.05, 0, 1), images.resize(images.resize(a, 48, 48), 64, 64)]
    for copy in same:
        assert bin(images.dhash(a) ^ images.dhash(copy)).count("1") <= 4
    others = [bin(images.dhash(a) ^ images.dhash(smooth(s))).count("1") for s in range(10, 20)]
    assert min(others) >= 16


def test_banded_near_duplicate_search_finds_what_brute_force_finds():
    rng = random.Random(0)
    for near_bits in (0, 2, 4, 7):
        codes = []
        for _ in range(400):  # random hashes, many of them a few flipped bits from an earlier one
            if codes and rng.random() < 0.5:
                code = rng.choice(codes)
                for bit in rng.sample(range(64), rng.randint(0, near_bits + 2)):
                    code ^= 1 << bit
            else:
                code = rng.getrandbits(64)
            codes.append(code)
        kept_banded, bands, hashes = [], [dict() for _ in range(near_bits + 1)], []
        for i, code in enumerate(codes):
            if not images._near_duplicate(code, bands, hashes, near_bits):
                images._index(code, len(hashes), bands, near_bits)
                hashes.append(code)
                kept_banded.append(i)
        kept_brute = []
        for i, code in enumerate(codes):
            if all(bin(code ^ codes[j]).count("1") > near_bits for j in kept_brute):
                kept_brute.append(i)
        assert kept_banded == kept_brute
        assert len(kept_brute) < len(codes)  # the planted near-duplicates were found


def test_curating_a_folder_counts_every_removal_and_touches_nothing(tmp_path):
    from PIL import Image
    cats, dogs = tmp_path / "cats", tmp_path / "dogs"
    cats.mkdir()
    dogs.mkdir()
    for i in range(3):
        (cats / f"{i}.png").write_bytes(images.encode_png(smooth(100 + i)))
    for i in range(2):
        (dogs / f"{i}.png").write_bytes(images.encode_png(smooth(200 + i)))
    (dogs / "copy.png").write_bytes(images.encode_png(smooth(200)))  # an exact copy of dogs/0.png
    (dogs / "reencoded.jpg").write_bytes(jpeg(smooth(201)))  # a near-duplicate of dogs/1.png
    (cats / "truncated.png").write_bytes(images.encode_png(smooth(5))[:200])
    (cats / "empty.png").write_bytes(b"")
    (cats / "notes.png").write_bytes(b"this is text, not an image")
    (cats / "tiny.png").write_bytes(images.encode_png(smooth(6, 4)))
    Image.fromarray(np.zeros((8, 60), dtype=np.uint8)).save(cats / "banner.png")
    (tmp_path / "readme.txt").write_text("not read")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    kept, report = images.curate(images.load_folder(tmp_path))
    assert report["removed"] == {"undecodable": 3, "too_small": 1, "aspect": 1, "exact_duplicate": 1, "near_duplicate": 1}
    assert report["images_in"] == 12 and report["images_kept"] == 5 and len(report["errors"]) == 3
    assert any("empty" in e for e in report["errors"]) and any("not an image" in e for e in report["errors"])
    assert report["classes_in"] == {"cats": 8, "dogs": 4} and report["classes_kept"] == {"cats": 3, "dogs": 2}
    assert sorted(item["id"] for item in kept) == ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png"]
    assert all("bytes" not in item and item["image"].shape == (64, 64) for item in kept)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing on disk changed


def test_captions_file_and_folder_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(images.encode_png(smooth(7, 16)))
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "a smooth blur", "label": "blur"}\n')
    [item] = images.load_folder(tmp_path)
    assert (item["caption"], item["label"]) == ("a smooth blur", "blur")
    kept, _ = images.curate([item])
    asked = images.chats(kept)  # a user's labels and captions become image chats too
    assert [(c["family"], c["answer"]) for c in asked] == [("image_label", "blur"), ("image_caption", "a smooth blur")]
    report = images.main(["--folder", str(tmp_path)])  # python -m nanofm.images --folder DIR
    assert report["images_kept"] == 1 and report["classes_kept"] == {"blur": 1}
    (tmp_path / "captions.jsonl").write_text('{"caption": "no file"}\n')
    with pytest.raises(ImageError, match="captions.jsonl line 1"):
        images.load_folder(tmp_path)
    with pytest.raises(ImageError, match="no image folder"):
        images.load_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no"):
        images.load_folder(tmp_path / "empty")


def test_digits_shapes_and_their_chats():
    from scipy import ndimage
    digits = images.digits()
    assert len(digits) == 1797 and {d["label"] for d in digits} == {str(i) for i in range(10)}
    assert all(d["image"].shape == (8, 8) and 0 <= d["image"].min() and d["image"].max() <= 1 for d in digits)
    scenes = images.shapes(200, seed=3)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(scenes, images.shapes(200, seed=3)))  # seeded
    for scene in scenes:  # what the caption says is what is drawn: that many separate blobs
        assert ndimage.label(scene["image"] > 0.25)[1] == scene["count"], scene["caption"]
    assert {s["count"] for s in scenes} == {1, 2, 3, 4} and {s["kind"] for s in scenes} == set(images.SHAPE_KINDS)
    conversations = images.chats(digits[:5] + scenes[:5])
    assert [c["family"] for c in conversations] == ["image_digit"] * 5 + ["image_count", "image_shape"] * 5
    first = conversations[0]["messages"]
    assert first[0]["content"][0]["image"] is digits[0]["image"] and first[1]["content"] == digits[0]["label"]


def test_split_follows_the_pixels():
    items = images.digits()[:300]
    train, test = images.split(items, test=0.25)
    assert len(train) + len(test) == 300 and 40 < len(test) < 110
    more_train, more_test = images.split(items + images.digits()[300:400], test=0.25)
    assert {i["id"] for i in test} <= {i["id"] for i in more_test}  # adding images moves none
    copy = dict(test[0], id="copy")
    assert images.split([copy], test=0.25)[1] == [copy]  # an exact copy lands on the same side


def test_to_tensor_and_perturb():
    x = images.to_tensor(images.digits()[:4], 16)
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32
    moved = images.perturb(x, shift=2)
    assert torch.equal(moved[..., 2:, 2:], x[..., :-2, :-2]) and moved[..., :2, :].abs().sum() == 0
    noisy = images.perturb(torch.full((1, 1, 64, 64), 0.5), noise=0.1, generator=torch.Generator().manual_seed(0))
    assert (noisy - 0.5).std().item() == pytest.approx(0.1, rel=0.1)
