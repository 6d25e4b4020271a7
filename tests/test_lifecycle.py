"""The lifecycle in one command (lifecycle.py): the smoke scale end to end, interrupted and
resumed; the speedrun's own commands at toy size under torchrun; the speedrun's estimate; bad
settings; and every notebook in notebooks/, executed cell by cell against the smoke run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
pytestmark = pytest.mark.slow


def lifecycle(*args, timeout=1800):
    return subprocess.run([sys.executable, str(ROOT / "lifecycle.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def ok(done):
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke lifecycle, stopped after SFT (as if interrupted there), then run again to the end."""
    out = tmp_path_factory.mktemp("lifecycle") / "smoke"
    first = ok(lifecycle("--scale=smoke", "--out", out, "--until=sft"))
    partial = json.loads((out / "lifecycle.json").read_text())
    rest = ok(lifecycle("--scale=smoke", "--out", out))
    return {"out": out, "partial": partial, "state": json.loads((out / "lifecycle.json").read_text()),
            "first": first, "rest": rest}


def test_the_smoke_lifecycle_runs_every_stage_and_each_moves_its_number(smoke_run):
    import lifecycle as lc
    out, stages = smoke_run["out"], smoke_run["state"]["stages"]
    assert list(stages) == list(lc.STAGE_NAMES)
    m = {name: stage["measured"] for name, stage in stages.items()}
    assert m["prepare"]["after"] < m["prepare"]["before"]  # curation removed documents
    assert m["pretrain"]["after"] < m["pretrain"]["before"] - 0.5  # bits per byte fell
    assert m["continue"]["after"] < m["continue"]["before"]  # the new domain's loss fell
    assert m["sft"]["val_loss"][1] < m["sft"]["val_loss"][0]
    assert m["dpo"]["val_loss"][1] < m["dpo"]["val_loss"][0]  # from ln 2 down on held-out pairs
    assert m["grpo"]["kl"] > 0  # the policy moved from the SFT model
    assert set(m["eval"]["scores"]) == {"sft", "dpo", "grpo", "pretrain", "vlm"}
    assert set(m["eval"]["paired"]) == {"dpo", "grpo", "pretrain", "vlm"}  # each against sft, on the same questions
    assert m["vision"]["after"] > 0.5 and m["vision"]["vit"] > 0.2 and m["vision"]["se"] > 0  # chance is 0.1
    assert m["vision"]["sklearn_svm"] > 0.95
    assert m["vlm"]["after"] > m["vlm"]["before"]  # "what digit is this?" from 0: the chat model reads images
    assert set(m["eval"]["images"]) == {"vlm"}  # the text models are skipped, said so
    # the simulated requests answered and logged (a few task questions are longer than the toy model's context: 400)
    assert 50 <= m["serve"]["after"] <= 60 and m["serve"]["rated"] > 0
    assert m["retrain"]["action"] in ("promoted", "rejected")  # a candidate was trained and gated
    assert len(m["chat"]["turns"]) == 4 and all(t["assistant"].strip() for t in m["chat"]["turns"])
    for name in ("data", "pretrain", "continue", "sft", "dpo", "grpo", "vision_cnn", "vision_vit", "eval_images", "vlm", "eval",
                 "serving", "monitor", "retrain"):
        assert (out / name).is_dir(), name
    report = (out / "report.md").read_text()
    assert "| 3-4 pretraining |" in report and "## A short chat with the served model" in report
    assert "![pretrain/loss.png](pretrain/loss.png)" in report
    for line in ("$ python train_pretrain.py --data_dir", "$ python monitor.py simulate --url http://127.0.0.1:"):
        assert line in smoke_run["rest"] + smoke_run["first"]  # every command is printed as a user would type it


def test_an_interrupted_lifecycle_goes_on_from_the_stage_it_stopped_in(smoke_run):
    partial, state = smoke_run["partial"]["stages"], smoke_run["state"]["stages"]
    assert list(partial) == ["prepare", "pretrain", "continue", "sft"]
    for name in partial:  # not run again: the same record, and said so
        assert state[name] == partial[name]
        assert f"[{name}] done before" in smoke_run["rest"]
    assert "===== 6 alignment: DPO (dpo) =====" in smoke_run["rest"]
    assert "===== 5 fine-tuning (sft) =====" not in smoke_run["rest"]


def test_a_dry_run_leaves_the_state_alone_and_a_corrupt_state_is_a_clear_error(tmp_path):
    state = {"stages": {"prepare": {"title": "1-2 data", "commands": ["python data/prepare.py --old"], "seconds": 1,
                                    "measured": {"what": "x", "before": 2, "after": 1}}}}
    (tmp_path / "lifecycle.json").write_text(json.dumps(state))
    done = lifecycle("--scale=smoke", "--out", tmp_path, "--dry_run")  # a dry run leaves the state alone
    assert "python data/prepare.py --out" in ok(done)
    assert json.loads((tmp_path / "lifecycle.json").read_text()) == state
    (tmp_path / "lifecycle.json").write_text("{not json")
    bad = lifecycle("--scale=smoke", "--out", tmp_path)
    assert bad.returncode == 1 and "lifecycle.json is not valid JSON" in bad.stderr


def test_the_speedrun_runs_end_to_end_at_toy_size_under_torchrun(tmp_path):
    out = ok(lifecycle("--scale=speedrun", "--tiny", "--out", tmp_path / "run"))
    assert "torchrun --standalone --nproc_per_node=2 train_pretrain.py" in out
    assert "torchrun --standalone --nproc_per_node=2 train_sft.py" in out
    state = json.loads((tmp_path / "run" / "lifecycle.json").read_text())
    assert len(state["stages"]) == 13 and state["stages"]["serve"]["measured"]["after"] >= 50
    assert "torchrun --standalone --nproc_per_node=2 train_vision.py --task=chat" in out
    assert "torchrun --standalone --nproc_per_node=2 train_rlhf.py --algo=dpo" in out
    # the task families' corpus, encoded with the pretraining tokenizer (the web data has no plays or code)
    assert (tmp_path / "run" / "data_tasks" / "curated.jsonl").exists()
    assert "speedrun estimate (nanofm/sizing.py; not measured)" in out  # of the full-size run, printed first


def test_the_speedrun_estimate_is_nanofm_sizings_arithmetic():
    from nanofm import sizing
    from nanofm.model import ModelConfig, describe
    out = ok(lifecycle("--scale=speedrun", "--gpus=8", "--dry_run", timeout=120))
    minutes = float(re.search(r"pretraining (\d+) min", out).group(1))
    tokens = 16 * 1024 * 2 * 8 * 9500  # batch x context x accumulation x GPUs x steps
    flops = describe(ModelConfig.preset("gpt2", vocab_size=32768))["flops_per_token"] * tokens
    assert abs(minutes - sizing.wall_time_hours(flops, 8, "H100", 0.4) * 60) < 1
    assert "torchrun --standalone --nproc_per_node=8 train_pretrain.py" in out and "--grad_accum=2" in out
    assert "hf:HuggingFaceFW/fineweb-edu:train" in out and "not measured" in out


@pytest.mark.parametrize("flags, message", [
    (["--scale=gpu"], "--scale must be one of cpu, smoke, speedrun"),
    (["--tiny"], "--tiny is the speedrun's toy size"),
    (["--until=deploy"], "--until must be one of prepare"),
])
def test_bad_settings_are_clear_errors(flags, message):
    done = lifecycle(*flags, "--dry_run", timeout=120)
    assert done.returncode == 1 and message in done.stderr


def test_every_stage_has_a_notebook():
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 12)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_every_cell(path, smoke_run, monkeypatch):
    """Each notebook, as Jupyter runs it (from notebooks/), on the shared smoke run; the
    notebooks end with checks of their own, so a wrong number fails here too."""
    import jupytext
    from nbclient import NotebookClient
    monkeypatch.setenv("NANOFM_LIFECYCLE_OUT", str(smoke_run["out"]))
    notebook = jupytext.read(path)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code)  # every cell ran
    assert os.environ["NANOFM_LIFECYCLE_OUT"] == str(smoke_run["out"])
