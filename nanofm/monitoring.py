"""What monitor.py measures on the interaction log: windows of traffic, their summaries, and drift
checks of a window against a reference (an early window of traffic, or the training data).

    rows = InteractionLog(db).requests()
    for window in split_windows(rows, requests=100): summarize(window)   # traffic, latency, tokens, ratings
    status = check_drift(reference_rows, current_rows, DriftConfig())    # {"drift": bool, "groups": ..., "checks": [...]}

Design decisions:
- Three groups of checks, as the field names them:
  input   what users ask: word-distribution Jensen-Shannon distance, prompt length (PSI with
          KS/Wasserstein), a domain classifier (reference vs current) and its AUC;
  output  what the model answers: reply length, the share of replies that ended on their own
          (end of turn) rather than at max_tokens, and, given the serving model, the perplexity of
          its replies under it (replies it finds unlikely are out of its habits);
  quality what users think: the share of thumbs down among rated replies; and, given the serving
          model, a periodic re-run of evaluation tasks against a recorded baseline (accuracy, or a
          fairness gap, that got worse by more than --eval_drop).
  Each check is Evidently's default test with its default threshold (nanofm/drift.py), one
  check per column. The word distribution also needs a permutation p-value under 0.05: 50 short
  chat prompts are about 0.55 apart (JS) from 50 others of the same kind, far over the 0.1 that
  Evidently's default assumes for large samples (measured on the simulator's traffic). Prompt length takes PSI >= 0.1 for the size of the move and the column's
  KS test for whether it is more than chance: on 100 vs 100 requests, noise alone gives PSI >= 0.1
  in 85% of windows (measured), because its rule of thumb assumes thousands of rows.
- A group alarms when at least half of its checks drift and at least `min_drifted` (2) do:
  Evidently's dataset-drift rule (share >= 0.5) with a floor, so that one check at its 5% level
  cannot raise the alarm alone. Measured: with identical distributions the whole status alarms
  in fewer than 5% of windows (tests/test_monitor.py). The quality group has one check, so it
  alarms on its own terms: significant (chi-square p < 0.05) and large (the down share rises by
  at least `rating_drop`, 0.1).
- Words, not model tokens, for the input distribution: the monitor needs no model or tokenizer to
  read a log, and a reader can see which words moved (the report lists them).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from nanofm import drift
from nanofm.common import NanofmError


@dataclass
class DriftConfig:
    drift_share: float = 0.5  # a group alarms when this share of its checks drift...
    min_drifted: int = 2  # ...and at least this many do
    js_threshold: float = 0.1  # Jensen-Shannon distance of the prompts' words (Evidently: 0.1)
    psi_threshold: float = 0.1  # PSI of prompt lengths (0.1 drift, 0.25 large)
    auc_threshold: float = 0.55  # the domain classifier's ROC AUC (Evidently: 0.55)
    p_value: float = 0.05  # KS / chi-square significance (Evidently: 0.05)
    rating_drop: float = 0.1  # the rise in the share of thumbs down that counts as a quality drop
    min_rated: int = 10  # rated replies needed on each side before ratings are compared
    min_rows: int = 20  # requests needed on each side before anything is compared


class MonitorError(NanofmError, ValueError):
    pass


def prompt_text(row: dict) -> str:
    """What the user wrote: a completion's prompt, or a chat's user turns."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n".join(_text(m.get("content", "")) for m in prompt if m.get("role") == "user")
    return str(prompt)


def _text(content) -> str:
    """A message's text: a string, or the text parts of a list of parts (images are logged as hashes)."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def reply_text(row: dict) -> str:
    output = row.get("output") or [""]
    return output[0] if isinstance(output, list) else str(output)


def _on_stars(row: dict) -> bool:
    """Whether a row's rating is on the 1..5 stars scale (a log from before scales: -1 and 1 are
    thumbs, 2..5 stars)."""
    scale = row.get("rating_scale")
    return scale == "stars" or (scale is None and row["rating"] > 1)


def is_down(row: dict) -> bool:
    """A thumbs down, or 1-2 stars."""
    if row.get("rating") is None:
        return False
    return row["rating"] <= 2 if _on_stars(row) else row["rating"] < 0


def is_good(row: dict, min_stars: int = 4) -> bool:
    """A thumbs up, or at least `min_stars` stars."""
    if row.get("rating") is None:
        return False
    return row["rating"] >= min_stars if _on_stars(row) else row["rating"] > 0


def latest_window(rows: list[dict], requests: int = 0, seconds: float = 0.0) -> list[dict]:
    """The last `requests` rows, or, when seconds > 0, those of the last `seconds`."""
    if seconds > 0:
        return [r for r in rows if r["created"] >= rows[-1]["created"] - seconds]
    return rows[-requests:]


def reference_and_current(rows: list[dict], reference_requests: int, window_requests: int = 0,
                          window_seconds: float = 0.0) -> tuple[list[dict], list[dict]]:
    """The first `reference_requests` rows, and the latest window; an error when they would overlap."""
    current, reference = latest_window(rows, window_requests, window_seconds), rows[:reference_requests]
    if not reference or not current or current[0]["created"] <= reference[-1]["created"]:
        raise MonitorError(f"too little traffic to judge: the latest window overlaps the reference (the log has "
                           f"{len(rows)} requests; --reference_requests {reference_requests}, --window_requests "
                           f"{window_requests})")
    return reference, current


def word_counts(texts: list[str]) -> Counter:
    counts = Counter()
    for text in texts:
        counts.update(drift.WORD.findall(text.lower()))
    return counts


def split_windows(rows: list[dict], requests: int = 0, seconds: float = 0) -> list[list[dict]]:
    """Consecutive windows of `requests` rows, or of `seconds` of arrival time (rows oldest first)."""
    if requests > 0:
        return [rows[i:i + requests] for i in range(0, len(rows), requests)]
    if seconds > 0:
        if not rows:
            return []
        start, windows = rows[0]["created"], {}
        for row in rows:
            windows.setdefault(int((row["created"] - start) // seconds), []).append(row)
        return [windows[k] for k in sorted(windows)]
    raise MonitorError("give a window size: requests or seconds")


def summarize(rows: list[dict]) -> dict:
    """Traffic, latency, token counts and ratings of one window."""
    if not rows:
        return {"requests": 0}
    latency = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    rated = [r for r in rows if r["rating"] is not None]
    downs = sum(is_down(r) for r in rated)
    return {"requests": len(rows), "start": rows[0]["created"], "end": rows[-1]["created"],
            "latency_p50_ms": float(np.percentile(latency, 50)) if latency else None,
            "latency_p95_ms": float(np.percentile(latency, 95)) if latency else None,
            "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] or 0 for r in rows])),
            "completion_tokens_mean": float(np.mean([r["completion_tokens"] or 0 for r in rows])),
            "end_of_turn_rate": sum(r["finish_reason"] == "stop" for r in rows) / len(rows),
            "rated": len(rated), "down": downs, "down_share": downs / len(rated) if rated else None}


def _check(group: str, name: str, result: dict) -> dict:
    return {"group": group, "check": name, **result}


def check_drift(reference: list[dict], current: list[dict], cfg: DriftConfig | None = None,
                perplexity=None, extra: list[dict] | None = None) -> dict:
    """Compare a window of requests with a reference. perplexity(rows) -> one float per row (the
    serving model's perplexity of each reply), optional; extra: more checks (e.g. eval_regression)
    to group with these. Returns the machine-readable status."""
    cfg = cfg or DriftConfig()
    if len(reference) < cfg.min_rows or len(current) < cfg.min_rows:
        raise MonitorError(f"too few requests to compare: {len(reference)} in the reference and {len(current)} in the "
                           f"current window, at least {cfg.min_rows} each (--min_rows)")
    checks = []
    ref_prompts, cur_prompts = [prompt_text(r) for r in reference], [prompt_text(r) for r in current]
    ref_docs, cur_docs = [word_counts([p]) for p in ref_prompts], [word_counts([p]) for p in cur_prompts]
    ref_words, cur_words = sum(ref_docs, Counter()), sum(cur_docs, Counter())
    if ref_words and cur_words:
        js = drift.js_distance(ref_words, cur_words)
        p = drift.js_permutation_p_value(ref_docs, cur_docs)
        moved = sorted(set(ref_words) | set(cur_words), key=lambda w: -abs(
            cur_words[w] / sum(cur_words.values()) - ref_words[w] / sum(ref_words.values())))[:8]
        checks.append(_check("input", "prompt_words", {
            "method": "jensen_shannon", "value": js, "threshold": cfg.js_threshold, "p_value": p,
            "drifted": js >= cfg.js_threshold and p < cfg.p_value, "moved_words": moved}))
    ref_len = [r["prompt_tokens"] or len(p) for r, p in zip(reference, ref_prompts)]
    cur_len = [r["prompt_tokens"] or len(p) for r, p in zip(current, cur_prompts)]
    # one check per column: PSI says how much the lengths moved, the column's default test (KS or
    # Wasserstein) whether that is more than chance; both must agree
    value, test = drift.psi(ref_len, cur_len), drift.column_drift(ref_len, cur_len, "num", _p(cfg, ref_len))
    checks.append(_check("input", "prompt_length", {
        "method": f"psi and {test['method']}", "value": value, "threshold": cfg.psi_threshold, "test": test,
        "drifted": value >= cfg.psi_threshold and test["drifted"]}))
    domain = drift.domain_classifier_auc(ref_prompts, cur_prompts)
    checks.append(_check("input", "domain_classifier", {
        "method": "roc_auc", "value": domain["auc"], "threshold": cfg.auc_threshold, "p_value": domain["p_value"],
        "drifted": domain["auc"] > cfg.auc_threshold and domain["p_value"] < cfg.p_value}))

    ref_out = [r["completion_tokens"] or 0 for r in reference]
    cur_out = [r["completion_tokens"] or 0 for r in current]
    checks.append(_check("output", "reply_length", drift.column_drift(ref_out, cur_out, "num", _p(cfg, ref_out))))
    checks.append(_check("output", "end_of_turn", drift.column_drift(
        [r["finish_reason"] == "stop" for r in reference], [r["finish_reason"] == "stop" for r in current], "cat",
        _p(cfg, reference))))
    if perplexity is not None:
        checks.append(_check("output", "reply_perplexity", drift.column_drift(
            perplexity(reference), perplexity(current), "num", _p(cfg, reference))))

    quality = _rating_check(reference, current, cfg)
    if quality is not None:
        checks.append(quality)
    checks += extra or []

    groups = {}
    for group in ("input", "output", "quality"):
        members = [c for c in checks if c["group"] == group]
        if not members:
            continue
        drifted = sum(c["drifted"] for c in members)
        alarm = drifted >= 1 if group == "quality" else (
            drifted / len(members) >= cfg.drift_share and drifted >= min(cfg.min_drifted, len(members)))
        groups[group] = {"checks": len(members), "drifted": drifted, "alarm": bool(alarm)}
    return {"drift": any(g["alarm"] for g in groups.values()), "groups": groups, "checks": checks,
            "reference_rows": len(reference), "current_rows": len(current), "config": asdict(cfg)}


def _p(cfg: DriftConfig, reference: list) -> float | None:
    """The configured significance for the small-sample tests; None keeps the large-sample default."""
    return cfg.p_value if len(reference) <= 1000 else None


def _rating_check(reference: list[dict], current: list[dict], cfg: DriftConfig) -> dict | None:
    ref = [is_down(r) for r in reference if r["rating"] is not None]
    cur = [is_down(r) for r in current if r["rating"] is not None]
    if len(ref) < cfg.min_rated or len(cur) < cfg.min_rated:
        return None
    _, p, _ = drift.chi2_homogeneity(Counter(ref), Counter(cur))
    rise = sum(cur) / len(cur) - sum(ref) / len(ref)
    return {"group": "quality", "check": "down_share", "method": "chi2_p_value and rise", "value": rise,
            "p_value": p, "threshold": cfg.rating_drop, "drifted": bool(p < cfg.p_value and rise >= cfg.rating_drop),
            "reference_down_share": sum(ref) / len(ref), "current_down_share": sum(cur) / len(cur)}


LOWER_IS_BETTER = ("gap", "spread", "flip_rate", "perplexity", "bits_per_byte", "loss", "drop[", "changed[")


def eval_regression(baseline: dict, now: dict, max_drop: float) -> dict:
    """The quality check of a periodic evaluation: every headline number against its baseline,
    worse by more than max_drop (absolute; for gaps, perplexities and losses a rise is worse)."""
    worse = {}
    for key in sorted(set(baseline) & set(now)):
        sign = -1 if any(marker in key for marker in LOWER_IS_BETTER) else 1
        change = sign * (now[key] - baseline[key])  # < 0: worse
        if change < -max_drop:
            worse[key] = {"baseline": baseline[key], "now": now[key]}
    largest = max((abs(v["now"] - v["baseline"]) for v in worse.values()), default=0.0)
    return {"group": "quality", "check": "eval_regression", "method": "headline numbers vs baseline",
            "value": largest, "threshold": max_drop, "drifted": bool(worse), "worse": worse,
            "compared": len(set(baseline) & set(now))}


def finite(x):
    """JSON-safe numbers (NaN and inf become None)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x
