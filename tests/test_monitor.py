"""nanofm/monitoring.py (windows, summaries, the drift status) on synthetic interaction rows, and
monitor.py's commands on a real log."""

import numpy as np
import pytest

from nanofm.monitoring import DriftConfig, MonitorError, check_drift, is_down, split_windows, summarize

PROSE = ("the river runs past the old mill and the children walk along the bank in the morning light while "
         "their mother sings of the king and his daughter").split()
CODE = "def return for in range if else x y i len list print self import class while None True".split()


def rows(rng, n, code_share=0.0, down=0.2, long_replies=False, start=0.0):
    """Synthetic interaction rows: prompts of prose or code words, replies of lognormal length that
    mostly end on their own, and a rating on half of them."""
    out = []
    for i in range(n):
        words = CODE if rng.random() < code_share else PROSE
        prompt = " ".join(rng.choice(words, int(rng.integers(5, 25))))
        reply = int(rng.lognormal(3.5 if long_replies else 2.5, 0.5))
        rated = rng.random() < 0.5
        out.append({"id": f"r{start + i}", "created": start + i, "prompt": [{"role": "user", "content": prompt}],
                    "output": ["..."], "prompt_tokens": len(prompt.split()) + 4, "completion_tokens": min(reply, 64),
                    "finish_reason": "length" if reply >= 64 or (long_replies and rng.random() < 0.5) else "stop",
                    "latency_ms": float(rng.lognormal(4, 0.3)),
                    "rating": (-1 if rng.random() < down else 1) if rated else None,
                    "rating_scale": "thumbs" if rated else None})
    return out


def test_windows_and_summaries_by_hand():
    data = [{"id": str(i), "created": 10.0 * i, "latency_ms": float(i), "prompt_tokens": 2, "completion_tokens": i,
             "finish_reason": "stop" if i % 2 else "length", "rating": [None, 1, -1, 4, 2][i],
             "rating_scale": [None, "thumbs", "thumbs", "stars", "stars"][i]} for i in range(5)]
    assert [len(w) for w in split_windows(data, requests=2)] == [2, 2, 1]
    assert [[r["id"] for r in w] for w in split_windows(data, seconds=25)] == [["0", "1", "2"], ["3", "4"]]
    s = summarize(data)
    assert s["requests"] == 5 and s["latency_p50_ms"] == 2.0 and s["completion_tokens_mean"] == 2.0
    assert s["end_of_turn_rate"] == 0.4 and s["rated"] == 4 and s["down"] == 2 and s["down_share"] == 0.5
    assert [is_down(r) for r in data] == [False, False, True, False, True]  # a thumbs-up is not one star
    with pytest.raises(MonitorError, match="window size"):
        split_windows(data)


def test_false_alarms_on_identical_traffic_stay_under_five_percent():
    alarms = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        alarms += check_drift(rows(rng, 100), rows(rng, 100))["drift"]
    assert alarms <= 10, alarms  # <= 5% of 200 windows


def test_each_kind_of_shift_raises_its_groups_alarm():
    rng = np.random.default_rng(2)  # (with seed 1 the code window's ratings also alarm, by a 2.5% chance)
    reference = rows(rng, 100)
    code = check_drift(reference, rows(rng, 100, code_share=1.0))
    assert code["drift"] and code["groups"]["input"]["alarm"] and not code["groups"]["quality"]["alarm"]
    words = next(c for c in code["checks"] if c["check"] == "prompt_words")
    assert set(words["moved_words"][:4]) <= set(CODE) | set(PROSE) and words["value"] > 0.5
    worse = check_drift(reference, rows(rng, 100, down=0.6))
    assert worse["drift"] and worse["groups"]["quality"]["alarm"] and not worse["groups"]["input"]["alarm"]
    longer = check_drift(reference, rows(rng, 100, long_replies=True))
    assert longer["drift"] and longer["groups"]["output"]["alarm"] and not longer["groups"]["input"]["alarm"]
    with pytest.raises(MonitorError, match="too few requests"):
        check_drift(reference[:5], reference)


def test_a_shift_to_code_is_detected_within_forty_requests():
    """Windows of the first n requests after traffic turns to code, against 100 earlier ones:
    the smallest n that alarms, over 20 seeds."""
    detected_at = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        reference, after = rows(rng, 100), rows(rng, 100, code_share=1.0)
        detected_at.append(next(n for n in range(20, 101, 10) if check_drift(reference, after[:n])["drift"]))
    assert max(detected_at) <= 40, detected_at


def test_thresholds_are_configurable():
    rng = np.random.default_rng(3)
    reference, current = rows(rng, 100), rows(rng, 100, code_share=0.3)
    strict = check_drift(reference, current, DriftConfig(js_threshold=0.01, min_drifted=1, drift_share=0.25))
    lenient = check_drift(reference, current, DriftConfig(js_threshold=0.9, auc_threshold=0.99))
    assert strict["groups"]["input"]["alarm"] and not lenient["groups"]["input"]["alarm"]
