"""nanofm/monitoring.py (windows, summaries, the drift status) on synthetic interaction rows, and
monitor.py's commands on a real log."""

import numpy as np
import pytest

from nanofm.common import ConfigError, NanofmError
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


# ------------------------------------------------------------------ monitor.py on a real log

def fill_log(path, data):
    from nanofm.interactions import InteractionLog
    log = InteractionLog(path)
    for r in data:
        log.record_request({k: r[k] for k in ("id", "created", "prompt", "output", "prompt_tokens", "completion_tokens",
                                              "finish_reason", "latency_ms")} | {"model": "m", "endpoint": "chat",
                                                                                 "settings": {}})
        if r["rating"] is not None:
            log.record_feedback(r["id"], r["rating"], scale=r["rating_scale"])
    log.close()
    return str(path)


def test_report_finds_the_window_where_traffic_turned(tmp_path):
    import json
    import monitor
    rng = np.random.default_rng(5)
    db = fill_log(tmp_path / "log.db", rows(rng, 200) + rows(rng, 100, code_share=1.0, start=200))
    result = monitor.main(["report", "--db", db, "--window_requests", "50", "--out_dir", str(tmp_path / "report")])
    alarms = [w["window"] for w in result["windows"] if isinstance(w["drift"], dict) and w["drift"]["drift"]]
    assert alarms == [4, 5]  # the two windows after request 200, none before
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["windows"][0]["drift"] == "reference" and saved["requests"] == 300
    assert "window 4: drifted: prompt_words" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_check_exit_codes_and_bad_logs(tmp_path, capsys):
    import json
    import monitor
    rng = np.random.default_rng(6)
    same = fill_log(tmp_path / "same.db", rows(rng, 200))
    assert monitor.main(["check", "--db", same, "--out", str(tmp_path / "status.json")])["drift"] is False
    assert json.loads((tmp_path / "status.json").read_text())["groups"]["input"]["alarm"] is False
    turned = fill_log(tmp_path / "turned.db", rows(rng, 100) + rows(rng, 100, code_share=1.0, start=100))
    capsys.readouterr()
    with pytest.raises(monitor.ExitCode, match="2"):
        monitor.main(["check", "--db", turned])
    printed = json.loads(capsys.readouterr().out)  # the status, for a scheduler to read
    assert printed["drift"] is True and printed["groups"]["input"]["alarm"] is True
    # the training data as the reference: chat-like prose prompts against code
    with pytest.raises(monitor.ExitCode):
        monitor.main(["check", "--db", turned, "--reference_data", str(make_data_dir(tmp_path)), "--window_requests", "50"])
    with pytest.raises(ConfigError, match="no interaction log"):
        monitor.main(["check", "--db", str(tmp_path / "missing.db")])
    from nanofm.interactions import InteractionLog
    InteractionLog(tmp_path / "empty.db").close()
    with pytest.raises(MonitorError, match="no requests"):
        monitor.main(["report", "--db", str(tmp_path / "empty.db")])
    with pytest.raises(MonitorError, match="overlaps the reference"):
        monitor.main(["check", "--db", fill_log(tmp_path / "short.db", rows(rng, 120))])
    (tmp_path / "corrupt.db").write_bytes(b"not a database" * 50)
    with pytest.raises(NanofmError, match="cannot open"):
        monitor.main(["check", "--db", str(tmp_path / "corrupt.db")])
    assert (tmp_path / "corrupt.db").read_bytes() == b"not a database" * 50


def make_data_dir(tmp_path):
    import json
    rng = np.random.default_rng(9)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    docs = [" ".join(rng.choice(PROSE, 30)) + "\n" + " ".join(rng.choice(PROSE, 30)) for _ in range(50)]
    (data / "curated.jsonl").write_text("".join(json.dumps({"text": d, "domain": "prose"}) + "\n" for d in docs))
    return data


def test_export_makes_files_that_sft_and_rlhf_read(tmp_path):
    import monitor
    from nanofm import instructions, preferences
    from nanofm.interactions import InteractionLog
    db = tmp_path / "log.db"
    log = InteractionLog(db)
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    for rid, reply, rating, scale in [("a", "5", 1, "thumbs"), ("b", "6", -1, "thumbs"), ("c", "5.", 5, "stars"),
                                      ("d", "I do not know", 2, "stars"), ("e", "Paris", None, None)]:
        prompt = ask if rid != "e" else [{"role": "user", "content": "Capital of France? Call me at 555-123-4567"}]
        log.record_request({"id": rid, "model": "m", "endpoint": "chat", "prompt": prompt, "output": [reply],
                            "settings": {}, "finish_reason": "stop"})
        if rating is not None:
            log.record_feedback(rid, rating, scale=scale)
    # a chat with an image, logged as serve.py logs it (a hash, no pixels): it cannot become training data
    seen = [{"role": "user", "content": [{"type": "image", "hash": "0123abcd", "width": 8, "height": 8},
                                         {"type": "text", "text": "What digit is this?"}]}]
    log.record_request({"id": "f", "model": "m", "endpoint": "chat", "prompt": seen, "output": ["7"], "settings": {},
                        "finish_reason": "stop"})
    log.record_feedback("f", 1, scale="thumbs")
    log.close()
    counts = monitor.main(["export", "--db", str(db), "--out_dir", str(tmp_path / "feedback")])
    assert counts == {"requests": 5, "sft": 2, "pairs": 2, "corpus_documents": 2, "skipped_with_images": 1}
    from nanofm.monitoring import prompt_text
    assert prompt_text({"prompt": seen}) == "What digit is this?"  # what drift statistics read of an image chat
    sft = instructions.read_conversations(tmp_path / "feedback" / "sft.jsonl")  # what train_sft.py --data reads
    assert [c["messages"][-1]["content"] for c in sft] == ["5", "5."]
    pairs = preferences.load(str(tmp_path / "feedback" / "pairs.jsonl"))  # what train_rlhf.py --data reads
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("5", "6"), ("5", "I do not know")}


def test_export_prepare_curates_masks_pii_and_keeps_the_models_tokenizer(tmp_path):
    import json
    import monitor
    from nanofm.interactions import InteractionLog
    from nanofm.tokenizer import Tokenizer, train_bpe
    ckpt = tmp_path / "ckpt"  # what --prepare needs of the serving checkpoint: its tokenizer
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"unused")
    Tokenizer.from_merges(train_bpe([" ".join(PROSE)] * 20, vocab_size=300, progress=False)).save(ckpt / "tokenizer.json")
    log = InteractionLog(tmp_path / "log.db")
    rng = np.random.default_rng(0)
    for i in range(40):
        text = (" ".join(rng.choice(PROSE, 60)) + f". Write to me at person{i}@example.com if the river rises, "
                "and tell the children.")
        log.record_request({"id": str(i), "model": "m", "endpoint": "completions", "prompt": text, "output": ["ok"],
                            "settings": {}})
    log.close()
    monitor.main(["export", "--db", str(tmp_path / "log.db"), "--out_dir", str(tmp_path / "feedback"), "--prepare",
                  "--data_out", str(tmp_path / "data"), "--ckpt", str(ckpt)])
    curated = [json.loads(line)["text"] for line in (tmp_path / "data" / "curated.jsonl").open()]
    assert curated and all("@example.com" not in t and "<EMAIL>" in t for t in curated)
    assert (tmp_path / "data" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert list((tmp_path / "data").glob("train_*.bin"))


from test_rlhf import chat_model  # noqa: E402,F401  (a tiny chat-tuned checkpoint)
from test_sft import base, corpus  # noqa: E402,F401

TINY_TRAIN = ["--train_flags=--batch_size=4", "--train_flags=--seq_len=96", "--train_flags=--per_family=10",
              "--train_flags=--per_synthetic=10", "--train_flags=--eval_interval=100", "--train_flags=--eval_iters=1",
              "--train_flags=--val_per_family=2", "--train_flags=--sample_tokens=0"]


def test_retrain_gates_promotes_keeps_the_old_model_on_failure_and_cools_down(chat_model, tmp_path):  # noqa: F811
    import json
    import shutil
    import monitor
    from nanofm.checkpoint import load_model, resolve
    from nanofm.interactions import InteractionLog
    serving = tmp_path / "serving"
    shutil.copytree(chat_model, serving)
    first = resolve(serving)
    log = InteractionLog(tmp_path / "log.db")
    for i in range(12):
        log.record_request({"id": str(i), "model": "m", "endpoint": "chat", "settings": {},
                            "prompt": [{"role": "user", "content": f"Say the number {i}."}], "output": [f"{i}"]})
        log.record_feedback(str(i), 1)
    log.close()
    common = ["retrain", "--db", str(tmp_path / "log.db"), "--serving", str(serving), "--out_dir", str(tmp_path / "rt"),
              "--stage", "sft", "--max_iters", "2", "--min_examples", "5", "--gate_items", "2", *TINY_TRAIN]
    rejected = monitor.main([*common, "--trigger", "force", "--gate_margin", "1.0"])  # no candidate can pass
    assert rejected["action"] == "rejected" and "serving model kept" in rejected["reason"]
    assert resolve(serving) == first and set(rejected["gate"]["metrics"]) == {"mean_exact_match", "chat_bleu"}
    assert any(m["candidate"] < m["serving"] + 1.0 for m in rejected["gate"]["metrics"].values())
    failed = monitor.main([*common, "--trigger", "force", "--train_flags=--lr=-1"])  # the trainer refuses it
    assert failed["action"] == "failed" and resolve(serving) == first
    promoted = monitor.main([*common, "--trigger", "force", "--gate_margin=-1"])  # every candidate passes
    assert promoted["action"] == "promoted" and resolve(serving) == Path(promoted["promoted"]) != first
    model, meta = load_model(serving)  # the promoted checkpoint loads, and knows where it came from
    assert meta["stage"] == "sft" and str(first) in json.dumps(meta)
    cooled = monitor.main([*common, "--trigger", "schedule"])
    assert cooled["action"] == "skipped" and "cooldown" in cooled["reason"]
    decisions = [json.loads(line) for line in (tmp_path / "rt" / "decisions.jsonl").read_text().splitlines()]
    assert [d["action"] for d in decisions] == ["rejected", "failed", "promoted", "skipped"]
    assert all(d["reason"] for d in decisions)
    with pytest.raises(ConfigError, match="--trigger"):
        monitor.main([*common, "--trigger", "sometimes"])
    with pytest.raises(ConfigError, match="not among the numbers of instructions"):  # before any training
        monitor.main([*common, "--trigger", "force", "--gate_metric", "happiness"])
    assert len((tmp_path / "rt" / "decisions.jsonl").read_text().splitlines()) == 4


from pathlib import Path  # noqa: E402


def test_retrain_on_its_own_triggers(chat_model, tmp_path):  # noqa: F811
    import monitor
    rng = np.random.default_rng(11)
    common = ["retrain", "--serving", str(chat_model), "--out_dir", str(tmp_path / "rt")]
    quiet = fill_log(tmp_path / "quiet.db", rows(rng, 200))
    assert monitor.main([*common, "--db", quiet])["reason"] == "no drift or quality alarm"
    short = fill_log(tmp_path / "short.db", rows(rng, 50))
    assert "too little traffic" in monitor.main([*common, "--db", short])["reason"]
    turned = fill_log(tmp_path / "turned.db", rows(rng, 100) + rows(rng, 100, code_share=1.0, start=100))
    decision = monitor.main([*common, "--db", turned, "--min_examples", "100000"])
    assert decision["action"] == "skipped" and decision["stage"] == "pretrain"  # input drift: learn the new text
    assert decision["reason"].startswith("alarm in input") and "not enough feedback" in decision["reason"]


def test_eval_regression_by_hand():
    from nanofm.monitoring import eval_regression
    base = {"instructions.mean_exact_match": 0.40, "fairness.mean_abs_gap[x]": 0.10, "perplexity.perplexity": 20.0}
    same = eval_regression(base, {**base, "instructions.mean_exact_match": 0.37}, 0.05)
    assert not same["drifted"] and same["compared"] == 3
    worse = eval_regression(base, {**base, "instructions.mean_exact_match": 0.30, "fairness.mean_abs_gap[x]": 0.2}, 0.05)
    assert worse["drifted"] and set(worse["worse"]) == {"instructions.mean_exact_match", "fairness.mean_abs_gap[x]"}
    better = eval_regression(base, {**base, "fairness.mean_abs_gap[x]": 0.0, "perplexity.perplexity": 10.0}, 0.05)
    assert not better["drifted"]  # a smaller gap and a lower perplexity are improvements


def test_check_reruns_the_evaluation_against_its_baseline(chat_model, tmp_path, capsys):  # noqa: F811
    import json
    import monitor
    rng = np.random.default_rng(12)
    db = fill_log(tmp_path / "log.db", rows(rng, 200))
    args = ["check", "--db", db, "--ckpt", str(chat_model), "--eval_tasks", "instructions", "--eval_items", "2",
            "--eval_baseline", str(tmp_path / "baseline.json")]
    first = monitor.main(args)  # records the baseline
    assert not first["drift"] and "eval_regression" not in [c["check"] for c in first["checks"]]
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    assert "instructions.mean_exact_match" in baseline["numbers"]
    assert not monitor.main(args)["drift"]  # the same model, the same items: no regression
    baseline["numbers"] = {k: v + 0.5 for k, v in baseline["numbers"].items()}  # as if it used to be much better
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    capsys.readouterr()
    with pytest.raises(monitor.ExitCode):
        monitor.main(args)
    status = json.loads(capsys.readouterr().out)
    assert status["groups"]["quality"]["alarm"] and "instructions.mean_exact_match" in status["checks"][-1]["worse"]


def test_monitor_reads_a_postgresql_log(postgres_url, tmp_path):
    import monitor
    from test_interactions import fresh_database
    rng = np.random.default_rng(13)
    url = fresh_database(postgres_url["url"])
    fill_log(url, rows(rng, 100) + rows(rng, 100, code_share=1.0, start=100))
    with pytest.raises(monitor.ExitCode):
        monitor.main(["check", "--db", url])
    result = monitor.main(["report", "--db", url, "--window_requests", "50", "--out_dir", str(tmp_path / "r")])
    assert result["db"].startswith("PostgreSQL at 127.0.0.1") and result["requests"] == 200
    with pytest.raises(NanofmError, match="PostgreSQL at 127.0.0.1:1"):
        monitor.main(["check", "--db", "postgresql://nanofm@127.0.0.1:1/postgres"])


def test_an_interrupted_retrain_is_recorded_and_changes_nothing(chat_model, tmp_path, monkeypatch):  # noqa: F811
    import json
    import shutil
    import subprocess
    import monitor
    from nanofm.checkpoint import resolve
    serving = tmp_path / "serving"
    shutil.copytree(chat_model, serving)
    first = resolve(serving)
    rng = np.random.default_rng(14)
    db = fill_log(tmp_path / "log.db", rows(rng, 60, down=0.0))  # about 30 thumbs up

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the candidate trains
    monkeypatch.setattr(subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        monitor.main(["retrain", "--db", db, "--serving", str(serving), "--out_dir", str(tmp_path / "rt"),
                      "--trigger", "force", "--stage", "sft", "--min_examples", "5"])
    assert resolve(serving) == first and sorted(p.name for p in serving.iterdir()) == sorted(
        p.name for p in Path(chat_model).iterdir())
    decision = json.loads((tmp_path / "rt" / "decisions.jsonl").read_text())
    assert decision["action"] == "failed" and "interrupted" in decision["reason"]


def test_simulate_sends_drifting_traffic_to_a_real_server(chat_model, corpus, tmp_path):  # noqa: F811
    pytest.importorskip("uvicorn", reason="serve.py needs uvicorn and fastapi (requirements.txt)")
    import monitor
    import serve
    from nanofm import chat
    from nanofm.checkpoint import load_for_inference
    from nanofm.engine import Engine
    from nanofm.interactions import InteractionLog
    from nanofm.instructions import exact_match
    from test_serve import start
    model, meta, tokenizer = load_for_inference(chat_model)
    log = InteractionLog(tmp_path / "log.db")
    url, server = start(serve.make_app(Engine(model, tokenizer), "chat", chat.CHAT_FORMAT, slots=4, log=log))
    try:
        counts = monitor.main(["simulate", "--url", url, "--requests", "24", "--shift_at", "12", "--before", "tasks",
                               "--after", "code", "--data_dir", str(corpus), "--rate_share", "1", "--max_tokens", "6",
                               "--concurrency", "3"])
    finally:
        server.should_exit = True
    assert counts == {"sent": 24, "errors": 0, "rated": 24}
    answers = dict(monitor.task_prompts(str(corpus)))
    code = set(monitor.domain_prompts(str(corpus), "code"))
    logged = log.requests()
    assert len(logged) == 24 and all(r["rating"] in (-1, 1) and r["rating_scale"] == "thumbs" for r in logged)
    asked = [r["prompt"][0]["content"] for r in logged]
    assert sum(q in answers for q in asked) == 12 and sum(q in code for q in asked) == 12
    for r, question in zip(logged, asked):  # a task question is rated by its answer
        if question in answers:
            assert (r["rating"] == 1) == exact_match(r["output"][0], answers[question])


def test_retrain_after_input_drift_pretrains_then_restores_the_chat_format(chat_model, tmp_path):  # noqa: F811
    import json
    import shutil
    import monitor
    from nanofm.checkpoint import load_model, resolve
    from nanofm.interactions import InteractionLog
    serving = tmp_path / "serving"
    shutil.copytree(chat_model, serving)
    log = InteractionLog(tmp_path / "log.db")
    rng = np.random.default_rng(15)
    for i in range(40):  # prompts long enough to survive curation (the corpus)...
        text = " ".join(rng.choice(PROSE, 70)) + ", said the old man to the children by the river."
        log.record_request({"id": str(i), "model": "m", "endpoint": "chat", "settings": {},
                            "prompt": [{"role": "user", "content": text}], "output": ["Yes."]})
    for i in range(10):  # ...and short ones rated up (SFT data for the second step)
        log.record_request({"id": f"s{i}", "model": "m", "endpoint": "chat", "settings": {},
                            "prompt": [{"role": "user", "content": f"Say {i}."}], "output": [str(i)]})
        log.record_feedback(f"s{i}", 1)
    log.close()
    tiny = ["--pretrain_flags=--batch_size=2", "--pretrain_flags=--seq_len=32", "--pretrain_flags=--eval_iters=1",
            "--pretrain_flags=--eval_interval=100", "--pretrain_flags=--sample_tokens=0"]
    decision = monitor.main(["retrain", "--db", str(tmp_path / "log.db"), "--serving", str(serving), "--out_dir",
                             str(tmp_path / "rt"), "--trigger", "force", "--stage", "pretrain", "--max_iters", "2",
                             "--min_examples", "5", "--gate_items", "2", "--gate_margin=-1", *tiny, *TINY_TRAIN])
    assert decision["action"] == "promoted", decision["reason"]
    assert [c[0] for c in decision["commands"]] == ["train_pretrain.py", "train_sft.py"]
    model, meta = load_model(serving)
    assert meta["stage"] == "sft" and meta.get("chat_format")  # the promoted model chats again
    serving_data = json.loads((resolve(chat_model) / "meta.json").read_text())["data_dir"]
    assert meta["data_dir"] == serving_data == decision["gate"]["data_dir"]  # the gate and SFT: the old corpus's tasks
    assert "adapted" in json.dumps(meta["lineage"]) and resolve(serving) == Path(decision["promoted"])  # SFT on the pretrained


def test_help_lists_the_commands_and_a_wrong_command_is_named():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "monitor.py", "--help"], cwd=root, capture_output=True, text=True)
    assert shown.returncode == 0 and not shown.stderr
    assert all(f"python monitor.py {name}" in shown.stdout for name in ("report", "check", "export", "retrain", "simulate"))
    wrong = subprocess.run([sys.executable, "monitor.py", "chek"], cwd=root, capture_output=True, text=True)
    assert wrong.returncode == 1 and "unknown command 'chek'; did you mean check?" in wrong.stderr
