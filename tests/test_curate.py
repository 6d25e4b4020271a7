"""The curation pipeline end to end on hand-made documents: counts, reasons, mixing, report."""

import json

import pytest

from nanofm.curate import CurateConfig, curate, plot_report
from textgen import prose

def doc(i, text, domain="prose", raw=None):
    d = {"id": f"d{i}", "text": text, "source": "test", "domain": domain, "meta": {"licence": "test"}}
    if raw is not None:
        d["raw"], d["text"] = raw, None
    return d


def corpus():
    near = prose(2).split("\n")
    near[3] = "A completely different sentence stands in this one place, and that is all."
    code = "def f(x):\n    return x * 2\n\n\nclass A:\n    pass\n"
    return [doc(0, prose(0)), doc(1, prose(1)), doc(2, prose(2)),
            doc(3, prose(0).upper().replace("\n", "  \n")),  # exact duplicate of d0 once normalised
            doc(4, "\n".join(near)),  # near duplicate of d2
            doc(5, None, "code", raw=b"\x00\x01binary"), doc(6, code, "code"),
            doc(7, "User: hello there, how are you today?\nBot: very well, thank you.", "chat"),
            doc(8, prose(8) + "\n" + " ".join(f"mail user{i}@example.com." for i in range(6))),
            doc(9, "   \n\t  ")]


def cfg(**overrides):
    return CurateConfig(**{"languages": "", "num_workers": 1, "mix": "prose:1,code:1,chat:2", **overrides})


def test_pipeline_counts_and_reasons():
    kept, report = curate(corpus(), cfg(), progress=False)
    ids = [d["id"] for d in kept]
    assert ids == ["d0", "d1", "d2", "d6", "d7", "d7#repeat1"]
    assert kept[-1]["meta"]["root_id"] == "d7" and kept[-1]["text"] == kept[-2]["text"]
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["decode"]["removed"] == {"decode:binary": 1}
    assert steps["normalise"]["removed"] == {"normalise:empty": 1}
    assert steps["pii"]["removed"] == {"pii:too_many_matches": 1}
    assert steps["exact_dedup"]["removed"] == {"exact_dedup:duplicate": 1}
    assert steps["near_dedup"]["removed"] == {"near_dedup:duplicate": 1}
    assert steps["mix"]["docs_in"] == 5 and steps["mix"]["docs_out"] == 6
    assert report["input"]["docs"] == 10 and report["output"]["docs"] == 6
    # the removed exact duplicate is d0's text in capitals: its words leave the count
    assert steps["exact_dedup"]["words_in"] - steps["exact_dedup"]["words_out"] == len(prose(0).split())
    prose_step = steps["near_dedup"]["per_domain"]["prose"]
    assert (prose_step["docs_in"], prose_step["docs_out"]) == (4, 3)
    assert prose_step["chars_out"] == sum(len(d["text"]) for d in kept if d["domain"] == "prose")
    assert report["removed_examples"]["near_dedup:duplicate"][0]["excerpt"].startswith("[near-duplicate of d2]")
    assert report["output"]["domain_share_chars"]["prose"] > 0.9
    assert report["language_id"] == "disabled"
    json.dumps({k: v for k, v in report.items()})  # the report is plain JSON


def test_every_signal_is_recorded():
    kept, _ = curate(corpus(), cfg(), progress=False)
    signals = kept[0]["meta"]["signals"]
    for name in ("words", "stop_words", "dup_line_share", "top_2gram_share", "dup_5gram_share", "line_punct_share"):
        assert name in signals
    assert "max_line_length" in kept[3]["meta"]["signals"]  # code signals on code


def test_parallel_workers_give_the_same_result():
    one, _ = curate(corpus() * 3, cfg(), progress=False)
    two, _ = curate(corpus() * 3, cfg(num_workers=2), progress=False)
    assert [d["id"] for d in one] == [d["id"] for d in two] and [d["text"] for d in one] == [d["text"] for d in two]


def test_mixing_weights():
    docs = [doc(i, prose(100 + i)) for i in range(200)]
    kept, _ = curate(docs, CurateConfig(languages="", num_workers=1, mix="prose:0.5"), progress=False)
    assert 70 < len(kept) < 130
    kept, _ = curate(docs, CurateConfig(languages="", num_workers=1, mix="prose:1.5"), progress=False)
    assert 270 < len(kept) < 330
    with pytest.raises(ValueError, match="domain:weight"):
        CurateConfig(mix="prose=1")
    with pytest.raises(ValueError, match="rank must be"):
        CurateConfig(rank=2, world_size=2)


def test_dedup_can_be_switched_off():
    kept, report = curate(corpus(), cfg(exact_dedup=False, near_dedup=False), progress=False)
    assert {"d3", "d4"} <= {d["id"] for d in kept}
    assert "near_dedup" not in {s["step"] for s in report["steps"]}


def test_report_png(tmp_path):
    _, report = curate(corpus(), cfg(), progress=False)
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_representation_counts():
    docs = [doc(0, prose(0) + "\nShe said that he and she would go with her and him, and they agreed.")]
    _, report = curate(docs, cfg(), progress=False)
    counts = report["representation"]["group_term_counts"]
    assert counts == {"male": 2, "female": 3, "neutral": 1}
