"""Alignment: preference pairs (built-in, user formats, bad input) and the formulas of nanofm/rlhf.py
checked against hand computations."""

import json
import math

import pytest
import torch

from nanofm import chat, instructions, preferences, rlhf
from test_sft import corpus  # noqa: F401  (the small curated corpus fixture)


def test_builtin_pairs_prefer_the_checkable_answer_and_hold_out_prompts(corpus):  # noqa: F811
    pairs = preferences.builtin(corpus, "train", per_family=30)
    assert pairs == preferences.builtin(corpus, "train", per_family=30)  # deterministic
    assert {p["family"] for p in pairs} == set(instructions.FAMILIES)
    for p in pairs:
        assert p["chosen"] != p["rejected"] and p["prompt"][-1]["role"] == "user"
        question = p["prompt"][-1]["content"]
        if p["family"] == "arithmetic":
            x, op, y = question[len("What is "):-1].split()
            right = int(x) + int(y) if op == "+" else int(x) - int(y)
            assert int(p["chosen"]) == right and int(p["rejected"]) != right
        if p["family"] in ("reverse", "sort", "upper"):
            assert sorted(p["rejected"].lower().split()) == sorted(p["chosen"].lower().split())  # the same words, wrong
        if p["family"] == "chat":  # a reply on another topic, never one that answers a twin question
            assert not preferences.topic_words(question + " " + p["chosen"]) & preferences.topic_words(p["rejected"])
    held = preferences.builtin(corpus, "val", per_family=10)
    train_prompts = {json.dumps(p["prompt"]) for p in preferences.builtin(corpus, "train", per_family=10_000)}
    assert held and {json.dumps(p["prompt"]) for p in held}.isdisjoint(train_prompts)


def test_a_chat_pairs_rejected_reply_cannot_be_a_right_answer():
    turns = [("What kind of computer", "I work on all kinds of computers."),
             ("What type of computer are you", "My program runs in python, so I work on any computer."),
             ("What is your favorite programming language", "Python is the best language."),
             ("What kind of computer", "Any computer at all."),
             ("Robots laugh", "Of course we laugh.")]
    # the twin question's reply, the same question's other reply, and a reply that names python are out
    assert preferences.off_topic_replies("What kind of computer", "I work on all kinds of computers.", turns) == [
        "Python is the best language.", "Of course we laugh."]
    assert preferences.off_topic_replies("Do you write python?", "Yes.", turns) == [
        "I work on all kinds of computers.", "Any computer at all.", "Of course we laugh."]
    assert preferences.topic_words("What is your favorite Programming language?") == {"favorite", "programming", "language"}


def test_user_formats_read_into_one_shape(tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    transcript = "\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Well?\n\nAssistant: "
    (tmp_path / "hh.jsonl").write_text(json.dumps({"chosen": transcript + "4", "rejected": transcript + "5"}) + "\n")
    conversation = [{"role": "user", "content": "Name a colour."}]
    (tmp_path / "uf.jsonl").write_text(json.dumps({
        "prompt": "Name a colour.", "chosen": conversation + [{"role": "assistant", "content": "Blue."}],
        "rejected": conversation + [{"role": "assistant", "content": "Seven."}], "score_chosen": 9, "score_rejected": 2}) + "\n")
    mine = preferences.load(str(tmp_path / "mine.jsonl"))
    hh = preferences.load(f"hh:{tmp_path / 'hh.jsonl'}")
    uf = preferences.load(f"ultrafeedback:{tmp_path / 'uf.jsonl'}")
    assert mine[0]["prompt"] == [{"role": "user", "content": "Hi?"}] and mine[0]["chosen"] == "Hello!"
    assert hh[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Let me think."},
                               {"role": "user", "content": "Well?"}]
    assert (hh[0]["chosen"], hh[0]["rejected"]) == ("4", "5")
    assert uf[0]["prompt"] == conversation and (uf[0]["chosen"], uf[0]["rejected"]) == ("Blue.", "Seven.")


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Q?", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same reply"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt has an empty message"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "must end with a user turn"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
    ({"prompt": "Q?", "chosen": "", "rejected": "b"}, "'chosen' must be a non-empty reply"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path, row, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(preferences.PreferenceError, match=f"bad.jsonl line 2: .*{problem}"):
        preferences.load(str(path))


def test_hh_transcripts_that_differ_before_the_last_reply_are_refused(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}) + "\n")
    with pytest.raises(preferences.PreferenceError, match="line 1: the chosen and rejected transcripts differ"):
        preferences.load(f"hh:{path}")


def test_render_completion_masks_the_last_reply_only():
    from nanofm.tokenizer import Tokenizer, train_bpe
    tok = Tokenizer.from_merges(train_bpe(["hello there, how are you? fine thanks"] * 3, 300, progress=False))
    prompt = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"},
              {"role": "user", "content": "how are you?"}]
    ids, mask = chat.render_completion(tok, prompt, "fine thanks")
    full, _ = chat.render(tok, prompt + [{"role": "assistant", "content": "fine thanks"}])
    assert ids == full
    reply = tok.encode("fine thanks") + [tok.special_tokens["<|end|>"]]
    assert [t for t, m in zip(ids, mask) if m] == reply  # not "there", the earlier assistant turn


def test_dpo_loss_is_ln2_at_the_start_and_follows_the_margin():
    torch.manual_seed(0)
    pc, pr = torch.randn(8), torch.randn(8)
    loss, stats = rlhf.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and stats["margin"] == 0
    loss, stats = rlhf.dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
    margin = 0.5 * ((-1 + 2) - (-5 + 3))  # 1.5
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))))
    assert stats["chosen_reward"] == pytest.approx(0.5) and stats["rejected_reward"] == pytest.approx(-1.0)
    assert stats["accuracy"] == 1.0
    assert rlhf.reward_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_gae_equals_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 + gamma * 0 - 0.4
    d1 = 0.0 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = rlhf.gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])
    left = rlhf.gae(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[9.0, 0.5, 0.2, 0.4]]),
                    torch.tensor([[0.0, 1.0, 1.0, 1.0]]), gamma, lam)[0]  # left padding: the same episode
    assert left[0].tolist() == pytest.approx([0.0, a0, a1, a2])


def test_ppo_first_minibatch_has_ratio_one_and_no_kl():
    torch.manual_seed(0)
    logp = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[:, -2:] = 0
    advantages = rlhf.whiten(torch.randn(4, 6), mask)
    assert rlhf.masked_mean(advantages, mask).item() == pytest.approx(0, abs=1e-6)
    assert rlhf.masked_mean(advantages ** 2, mask).item() == pytest.approx(1, abs=1e-4)
    loss, stats = rlhf.ppo_policy_loss(logp, logp.clone(), advantages, mask)
    assert stats["ratio"] == pytest.approx(1) and stats["approx_kl"] == pytest.approx(0) and stats["clip_fraction"] == 0
    assert loss.item() == pytest.approx(-rlhf.masked_mean(advantages, mask).item(), abs=1e-6)
    _, stats = rlhf.ppo_policy_loss(logp + 0.5, logp, torch.ones(4, 6), mask, clip=0.2)
    assert stats["clip_fraction"] == 1.0  # ratio e^0.5 > 1.2 with a positive advantage: every token clipped
    # clip-higher: ratio 1.25 is clipped at 1.2 but not at 1.28 when the advantage is positive; the lower
    # bound stays 0.8 for a falling ratio with a negative advantage
    up, down = torch.full((4, 6), math.log(1.25)), torch.full((4, 6), math.log(0.75))
    for log_ratio, adv, clip_high, clipped in ((up, 1.0, None, 1.0), (up, 1.0, 0.28, 0.0), (down, -1.0, 0.28, 1.0)):
        loss, stats = rlhf.ppo_policy_loss(logp + log_ratio, logp, torch.full((4, 6), adv), mask, clip=0.2, clip_high=clip_high)
        assert stats["clip_fraction"] == clipped, (log_ratio[0, 0].item(), clip_high)
    assert loss.item() == pytest.approx(0.8)  # -A x clip(0.75, 0.8, 1.28) with A = -1: the clipped (larger) loss
    values = torch.tensor([[1.0, 2.0]])
    assert rlhf.ppo_value_loss(values, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2)).item() == pytest.approx(
        0.5 * (1 + 4) / 2)  # the unclipped error is the larger


def test_kl_estimators_and_group_advantages():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert rlhf.kl_k1(logp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    k3 = rlhf.kl_k3(logp, ref)
    assert (k3 >= 0).all() and k3[2].item() == 0
    assert k3[0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = rlhf.group_advantages(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert adv[0].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert adv[1].abs().max().item() == 0  # a group that all agrees teaches nothing


def test_sequence_logprobs_sum_the_completion_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert rlhf.sequence_logprobs(logits, targets, mask).tolist() == pytest.approx((logp * mask).sum(-1).tolist(), abs=1e-6)


# ------------------------------------------------------------------ train_rlhf.py

from test_sft import COMMON, base, sft  # noqa: E402,F401  (a tiny causal model with a BPE, and the SFT runner)


def rlhf_run(*args):
    import train_rlhf
    return train_rlhf.main([*map(str, args)])


@pytest.fixture(scope="module")
def chat_model(base, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("chat")
    sft("--init_from", base, "--out_dir", out / "sft", "--max_iters=40", "--eval_interval=100", *COMMON)
    return out / "sft"


RLHF_COMMON = ["--per_family=20", "--val_pairs=6", "--batch_size=8", "--seq_len=96", "--eval_iters=1", "--log_interval=5"]


def test_dpo_starts_at_ln2_learns_the_pairs_and_records_its_reference(chat_model, tmp_path):
    result = rlhf_run("--algo=dpo", "--init_from", chat_model, "--out_dir", tmp_path / "dpo", "--max_iters=40",
                      "--eval_interval=40", "--lr=1e-3", "--sft_coef=0", *RLHF_COMMON)  # plain DPO
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "val_loss" in r)
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert result["val_loss"] < math.log(2) - 0.05 and result["val_reward_accuracy"] > 0.6
    from nanofm import checkpoint
    meta = checkpoint.read_meta(tmp_path / "dpo")
    assert meta["algorithm"] == "dpo" and meta["stage"] == "rlhf" and meta["chat_format"] == chat.CHAT_FORMAT
    assert meta["reference"] == meta["parent"] and "sft" in meta["parent"]


def test_dpo_with_an_sft_term_adds_the_chosen_replies_nll(chat_model, tmp_path):
    rlhf_run("--algo=dpo", "--init_from", chat_model, "--out_dir", tmp_path / "rpo", "--max_iters=1", "--sft_coef=0.5",
             "--eval_interval=100", *RLHF_COMMON, "--log_interval=1")
    first = next(r for r in read_records(tmp_path / "rpo") if "train_loss" in r)
    assert first["chosen_nll"] > 0.1  # the chosen replies are far from certain under the tiny model
    assert first["train_loss"] == pytest.approx(math.log(2) + 0.5 * first["chosen_nll"], abs=1e-4)
    with pytest.raises(Exception, match="--sft_coef must be in"):
        rlhf_run("--sft_coef=-1")


def test_dpo_resume_is_exact(chat_model, tmp_path):
    from nanofm import checkpoint
    args = ["--algo=dpo", "--max_iters=6", "--eval_interval=100", "--lr=1e-3", *RLHF_COMMON]
    rlhf_run("--init_from", chat_model, *args, "--out_dir", tmp_path / "straight")
    rlhf_run("--init_from", chat_model, *args, "--out_dir", tmp_path / "split", "--stop_step=2")
    rlhf_run("--init_from=resume", *args, "--out_dir", tmp_path / "split")
    a = torch.load(checkpoint.resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_reward_model_learns_to_prefer_the_right_answer(chat_model, tmp_path):
    result = rlhf_run("--algo=rm", "--init_from", chat_model, "--out_dir", tmp_path / "rm", "--max_iters=60",
                      "--eval_interval=60", "--lr=3e-3", "--families=domain", *RLHF_COMMON)
    assert result["val_pair_accuracy"] > 0.6 > 0.5  # chance is 0.5
    from nanofm import checkpoint
    model, meta = checkpoint.load_model(tmp_path / "rm")
    assert model.cfg.n_classes == 1 and meta["objective"] == "reward_model"


def test_bad_input(base, chat_model, tmp_path):  # noqa: F811
    from nanofm.common import ConfigError
    with pytest.raises(ConfigError, match="not chat-tuned .* run python train_sft.py"):
        rlhf_run("--algo=dpo", "--init_from", base, "--out_dir", tmp_path / "o", *RLHF_COMMON)
    with pytest.raises(ConfigError, match="--beta must be in"):
        rlhf_run("--beta=0")
    with pytest.raises(ConfigError, match="--algo must be one of"):
        rlhf_run("--algo=reinforce")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(preferences.PreferenceError, match="line 1: chosen and rejected are the same"):
        rlhf_run("--algo=dpo", "--init_from", chat_model, "--out_dir", tmp_path / "o", "--data", bad, *RLHF_COMMON)
    assert not (tmp_path / "o").exists()  # nothing written


def test_preference_loader_pairs_rows_and_drops_prompts_that_fill_the_context():
    from nanofm.data import PreferenceLoader
    from nanofm.tokenizer import Tokenizer, train_bpe
    tok = Tokenizer.from_merges(train_bpe(["one two three four five six seven"] * 3, 300, progress=False))
    pairs = [{"family": "f", "prompt": [{"role": "user", "content": f"one two {i}"}], "chosen": "three", "rejected": "four five"}
             for i in range(4)]
    pairs.append({"family": "f", "prompt": [{"role": "user", "content": "one two " * 40}], "chosen": "a", "rejected": "b"})
    loader = PreferenceLoader(pairs, tok, batch_size=2, max_len=24)
    assert loader.dropped == 1 and len(loader.rows) == 4
    x, y, attention, index = loader.next_batch()
    assert x.shape[0] == 4 and attention[:, 0].all()
    for row, pair_index in enumerate(index.tolist() * 2):  # chosen rows first, then the rejected rows in the same order
        reply = pairs[pair_index]["chosen" if row < 2 else "rejected"]
        assert [t for t in y[row].tolist() if t != -100] == tok.encode(reply) + [tok.special_tokens["<|end|>"]]
    assert sorted(i for batch in loader.in_order(3) for i in batch[3].tolist()) == [0, 1, 2, 3]


def test_settings_left_out_take_the_algorithms_defaults():
    import train_rlhf
    from nanofm.config import parse_config
    rm = parse_config(train_rlhf.RLHFConfig, ["--algo=rm"])
    dpo = parse_config(train_rlhf.RLHFConfig, [])
    mine = parse_config(train_rlhf.RLHFConfig, ["--algo=rm", "--lr=0.01", "--max_iters=3", "--out_dir=x"])
    assert (rm.max_iters, rm.lr, rm.out_dir) == (500, 1e-3, "out/rm")
    assert (dpo.algo, dpo.max_iters, dpo.lr, dpo.out_dir) == ("dpo", 300, 1e-4, "out/dpo")
    assert (mine.max_iters, mine.lr, mine.out_dir) == (3, 0.01, "x")
    ppo = parse_config(train_rlhf.RLHFConfig, ["--algo=ppo"])
    grpo = parse_config(train_rlhf.RLHFConfig, ["--algo=grpo", "--kl_coef=0.01"])
    assert (ppo.ppo_epochs, ppo.minibatches, ppo.kl_coef, ppo.out_dir) == (4, 2, 0.05, "out/ppo")
    assert (grpo.ppo_epochs, grpo.kl_coef, grpo.lr) == (2, 0.01, 3e-4)


def test_tone_and_safety_pairs_join_the_builtin_pairs_repeated(corpus):  # noqa: F811
    import train_rlhf
    from nanofm import safety
    from nanofm.common import ConfigError
    from nanofm.config import parse_config

    def pairs(*flags):
        return train_rlhf.preference_pairs(parse_config(train_rlhf.RLHFConfig, ["--per_family=5", *flags]), str(corpus))
    plain, held = pairs("--safety_pairs=false")
    once, held_once = pairs("--safety_repeat=1")
    assert pairs()[0] == plain + safety.pairs("train", 1337) * 4  # the default: each 4 times
    thrice, held_thrice = pairs("--safety_repeat=3")
    train_safety = safety.pairs("train", 1337)
    assert once == plain + train_safety and thrice == plain + train_safety * 3
    assert held_once == held_thrice == held + safety.pairs("val", 1337)  # the held-out side is never repeated
    with pytest.raises(ConfigError, match="--safety_repeat"):
        parse_config(train_rlhf.RLHFConfig, ["--safety_repeat=0"])


def test_ddp_dpo_two_processes_equal_one_with_double_accumulation(chat_model, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    from nanofm import checkpoint
    script = Path(__file__).resolve().parents[1] / "train_rlhf.py"
    common = [str(script), "--algo=dpo", "--init_from", str(chat_model), "--max_iters=3", "--eval_interval=100",
              "--lr=1e-3", *RLHF_COMMON, "--batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, *common, "--grad_accum=2"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common]}
    for name, command in runs.items():
        done = subprocess.run(command + ["--out_dir", str(tmp_path / name)], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a = torch.load(checkpoint.resolve(tmp_path / "one") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "two") / "model.pt", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_grpo_rolls_out_scores_and_resumes_exactly(chat_model, tmp_path):
    from nanofm import checkpoint
    args = ["--algo=grpo", "--families=domain", "--group_size=4", "--batch_size=4", "--max_new_tokens=6", "--max_iters=4",
            "--eval_interval=100", "--lr=1e-3", "--per_family=20", "--val_pairs=4", "--log_interval=1", "--temperature=1.5",
            "--skip_equal_groups=false"]  # this model is never right: every group would be left out of the loss
    rlhf_run("--init_from", chat_model, *args, "--out_dir", tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 4 and all(0 <= r["reward"] <= 1 and 1 <= r["response_length"] <= 6 for r in steps)
    assert all(r["ratio"] == pytest.approx(1) and r["approx_kl"] == pytest.approx(0) for r in steps)  # one update per rollout
    rlhf_run("--init_from", chat_model, *args, "--out_dir", tmp_path / "split", "--stop_step=1")
    rlhf_run("--init_from=resume", *args, "--out_dir", tmp_path / "split")
    a = torch.load(checkpoint.resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same rollouts after the resume
    meta = checkpoint.read_meta(tmp_path / "straight")
    assert meta["algorithm"] == "grpo" and meta["reference"] == meta["parent"]


def read_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


PPO_ARGS = ["--algo=ppo", "--families=domain", "--batch_size=4", "--minibatches=2", "--ppo_epochs=2", "--max_new_tokens=6",
            "--eval_interval=100", "--lr=1e-3", "--per_family=20", "--val_pairs=4", "--log_interval=1", "--seq_len=96"]


def test_ppo_first_minibatch_has_ratio_one_logs_its_stats_and_resumes_exactly(chat_model, tmp_path):
    from nanofm import checkpoint
    # no KL early stop here, so every rollout is 4 steps and steps 0 and 4 are first minibatches (the stop has its own test)
    rlhf_run("--init_from", chat_model, *PPO_ARGS, "--max_iters=8", "--target_kl=0", "--out_dir", tmp_path / "straight")
    steps = [r for r in read_records(tmp_path / "straight") if "train_loss" in r]
    assert len(steps) == 8
    for r in steps:
        assert {"reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "approx_kl"} <= set(r)
        assert 0 <= r["reward"] <= 1 and 1 <= r["response_length"] <= 6 and r["entropy"] > 0
    # each rollout's first minibatch is scored by the policy that sampled it: ratio 1, no KL, nothing clipped
    for first in (steps[0], steps[4]):  # 2 minibatches x 2 epochs = 4 steps per rollout
        assert first["ratio"] == pytest.approx(1, abs=1e-5) and first["approx_kl"] == pytest.approx(0, abs=1e-6)
        assert first["clip_fraction"] == 0
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6)  # the policy is the reference before its first update
    assert max(r["approx_kl"] for r in steps) > 0 and steps[4]["kl"] != 0  # ...and it moves
    rlhf_run("--init_from", chat_model, *PPO_ARGS, "--max_iters=8", "--target_kl=0", "--out_dir", tmp_path / "split",
             "--stop_step=2")
    rlhf_run("--init_from=resume", *PPO_ARGS, "--max_iters=8", "--target_kl=0", "--out_dir", tmp_path / "split")  # mid-rollout
    a = torch.load(checkpoint.resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(checkpoint.resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert "value_head.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    meta = checkpoint.read_meta(tmp_path / "straight")
    assert meta["algorithm"] == "ppo" and meta["reference"] == meta["parent"] and meta["reward"] == "exact_match"
    model, _ = checkpoint.load_model(tmp_path / "straight")
    assert model.cfg.value_head and model.cfg.n_classes == 0  # evaluated and served as a language model


def test_ppo_stops_a_rollouts_epochs_at_the_kl_target(chat_model, tmp_path):
    rlhf_run("--init_from", chat_model, *PPO_ARGS, "--max_iters=6", "--ppo_epochs=4", "--target_kl=1e-6",
             "--out_dir", tmp_path / "ppo")
    steps = [r for r in read_records(tmp_path / "ppo") if "train_loss" in r]
    # the first minibatch (ratio 1) never stops; the second has moved, stops, and the next step rolls out anew
    assert steps[0]["early_stop"] == 0 and steps[1]["early_stop"] == 1
    assert steps[2]["approx_kl"] == pytest.approx(0, abs=1e-6) and steps[2]["ratio"] == pytest.approx(1, abs=1e-5)


def test_ppo_with_a_reward_model_reads_its_score_at_the_last_real_token(chat_model, base, tmp_path):  # noqa: F811
    import train_rlhf
    from nanofm.common import ConfigError
    from nanofm.data import pad_batch
    from nanofm.tokenizer import Tokenizer
    rlhf_run("--algo=rm", "--init_from", chat_model, "--out_dir", tmp_path / "rm", "--max_iters=4", "--eval_interval=100",
             *RLHF_COMMON)
    tokenizer = Tokenizer.load(tmp_path / "rm" / "ckpt_0000003")
    ctx = train_rlhf.setup(train_rlhf.RLHFConfig(algo="ppo", device="cpu"))
    reward = train_rlhf.LearnedReward(str(tmp_path / "rm"), tokenizer, ctx)
    rows = [tokenizer.encode("one two three", bos=True), tokenizer.encode("four", bos=True)]
    alone = torch.cat([reward([{}], [""], torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    for left in (False, True):
        x, attention = pad_batch(rows, value=tokenizer.pad_id, left=left)
        assert torch.allclose(reward([{}] * 2, [""] * 2, x, attention), alone, atol=1e-5)
    result = rlhf_run("--init_from", chat_model, *PPO_ARGS, "--families=chat", "--max_iters=2",
                      "--reward_model", tmp_path / "rm", "--out_dir", tmp_path / "ppo")
    assert -50 < result["val_reward"] < 50 and 0 <= result["val_exact_match"] <= 1
    with pytest.raises(ConfigError, match="is not a reward model"):
        rlhf_run("--init_from", chat_model, *PPO_ARGS, "--reward_model", chat_model, "--out_dir", tmp_path / "o")
    other = tmp_path / "other"
    other.mkdir()
    import shutil
    shutil.copytree(tmp_path / "rm" / "ckpt_0000003", other / "ckpt_0000003")
    (other / "latest").write_text("ckpt_0000003")
    from nanofm.tokenizer import train_bpe
    Tokenizer.from_merges(train_bpe(["a different corpus of words"] * 3, 280, progress=False)).save(
        other / "ckpt_0000003" / "tokenizer.json")
    with pytest.raises(ConfigError, match="another tokenizer than the policy"):
        rlhf_run("--init_from", chat_model, *PPO_ARGS, "--reward_model", other, "--out_dir", tmp_path / "o")
    with pytest.raises(ConfigError, match="--kl_coef must be in"):
        rlhf_run("--algo=ppo", "--kl_coef=-1")
    with pytest.raises(ConfigError, match="no question leaves room for --max_new_tokens=6 in --seq_len=12"):
        rlhf_run("--init_from", chat_model, *PPO_ARGS, "--seq_len=12", "--out_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def domain_model(base, tmp_path_factory):  # noqa: F811
    """A chat model that answers the domain question right some of the time (greedy: always; sampled: ~15%)."""
    out = tmp_path_factory.mktemp("domain") / "sft"
    sft("--init_from", base, "--out_dir", out, "--families=domain", "--max_iters=60", "--eval_interval=1000", *COMMON,
        "--sample_tokens=0")
    return out


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_tiny_run_raises_the_programmatic_reward(domain_model, tmp_path, algo):
    common = ["--families=domain", "--max_new_tokens=6", "--eval_interval=100", "--lr=3e-3", "--per_family=20",
              "--val_pairs=4", "--log_interval=1", "--seq_len=96", "--max_iters=80"]
    # ppo without the KL early stop: on this model (the digit-split BPE's) it ended most rollouts after the first update,
    # and 80 steps then took the reward from 0.26 to 0.34 only (0.31 -> 0.73 without it, held out 0.31 -> 0.88)
    args = {"ppo": ["--batch_size=8", "--minibatches=2", "--ppo_epochs=2", "--target_kl=0"],
            "grpo": ["--group_size=8", "--batch_size=4"]}
    rlhf_run(f"--algo={algo}", "--init_from", domain_model, *common, *args[algo], "--out_dir", tmp_path / algo)
    records = [r for r in read_records(tmp_path / algo) if "train_loss" in r]
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-20:]) / 20 > sum(rewards[:20]) / 20 + 0.2  # measured: ppo 0.31 -> 0.73 (no KL stop)
    held = [r for r in read_records(tmp_path / algo) if "val_reward" in r]
    assert held[-1]["val_reward"] > held[0]["val_reward"]  # on held-out questions too
    assert held[-1]["val_pass@1"] == pytest.approx(held[-1]["val_reward"])  # 0/1 rewards: pass@1 is the mean
    assert all(r["val_pass@1"] <= r["val_pass@4"] <= 1 for r in held) and held[-1]["val_pass@4"] > held[0]["val_pass@1"]
    if algo == "ppo":
        assert 0 < records[-1]["kl"] < 5  # it moved from the reference, and the KL penalty keeps it near


def test_users_own_prompts_and_reward_function(domain_model, tmp_path):
    """GRPO on a task the test makes: the built-in domain questions as a prompts file, and a reward
    file that pays for naming the item's own target ("code"), whatever the snippet is."""
    from nanofm import checkpoint
    data_dir = checkpoint.read_meta(domain_model)["data_dir"]
    questions = instructions.builtin(data_dir, "train", per_family=40, seed=0, families=("domain",))
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q["messages"][-2]["content"], "target": "code"}) + "\n"
                               for q in questions))
    (tmp_path / "my_reward.py").write_text("def score(prompt, reply, item):\n"
                                           "    assert isinstance(prompt, str) and prompt\n"
                                           "    return float(item['target'] in reply)\n")
    common = ["--algo=grpo", "--init_from", domain_model, "--prompts", prompts, "--max_new_tokens=6", "--group_size=8",
              "--batch_size=4", "--lr=3e-3", "--log_interval=1", "--seq_len=96", "--eval_interval=100"]
    result = rlhf_run(*common, "--reward", f"{tmp_path / 'my_reward.py'}:score", "--max_iters=60", "--out_dir", tmp_path / "g")
    rewards = [r["reward"] for r in read_records(tmp_path / "g") if "train_loss" in r]
    assert sum(rewards[-15:]) / 15 > sum(rewards[:15]) / 15 + 0.2, rewards  # it learns to say "code"
    assert result["val_reward"] > 0.5 and "val_exact_match" not in result  # held-out prompts have no answers
    meta = checkpoint.read_meta(tmp_path / "g")
    assert meta["reward"].startswith("function:") and meta["data"] == [str(prompts)]

    def fails(reward_source, match, **row):
        bad = tmp_path / "bad.py"
        bad.write_text(reward_source)
        file = prompts if not row else tmp_path / "rows.jsonl"
        if row:
            file.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(Exception, match=match):
            rlhf_run(*[a if a != prompts else file for a in common], "--reward", f"{bad}:score", "--max_iters=1",
                     "--out_dir", tmp_path / "bad_run")
    fails("def score(prompt, reply, item):\n    return {}['missing']\n", r"raised KeyError: 'missing' \(on .*tasks.jsonl line \d+")
    fails("def score(prompt, reply, item):\n    return 'good'\n", r"returned 'good' on .*line \d+: a reward must be a finite number")
    fails("def score(prompt, reply, item):\n    return float('nan')\n", "returned nan")
    fails("import not_a_module_anywhere\n", "failed to load: ModuleNotFoundError")
    fails("def other(prompt, reply, item):\n    return 1.0\n", "has no function 'score'; its functions: other")
    fails("def score(prompt, reply, item):\n    return 1\n", "rows.jsonl line 1: the prompt must end with a user turn",
          messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(Exception, match="cannot import 'no_such_module_xyz'"):
        rlhf_run(*common, "--reward", "no_such_module_xyz:score", "--max_iters=1", "--out_dir", tmp_path / "bad_run")
    with pytest.raises(Exception, match="has no 'answer', and without --reward"):
        rlhf_run(*common, "--max_iters=1", "--out_dir", tmp_path / "bad_run")
    with pytest.raises(Exception, match="--prompts and --reward are for --algo=ppo or grpo"):
        rlhf_run("--algo=dpo", "--prompts", prompts)
    assert not (tmp_path / "bad_run").exists() or not list((tmp_path / "bad_run").glob("ckpt_*"))


def test_partial_credit_counts_words_in_place_and_exact_answers_win():
    assert instructions.partial_credit("reverse", "c b a", "c b a") == 1.0
    assert instructions.partial_credit("reverse", "c a b", "c b a") == pytest.approx(1 / 3)
    assert instructions.partial_credit("sort", "a b c d", "a b c") == pytest.approx(3 / 4)  # an extra word costs
    assert instructions.partial_credit("upper", "", "A B") == 0.0
    assert instructions.partial_credit("arithmetic", "57", "58") == 0.0  # a sum is right or wrong
    import train_rlhf
    reward = train_rlhf.ExactAnswer(partial=0.5)
    items = [{"family": "reverse", "messages": instructions.conversation("Reverse the word order: a b c", "c b a")}] * 3
    assert reward(items, ["c b a", "c a b", "x y z"], None, None).tolist() == pytest.approx([1.0, 0.5 / 3, 0.0])
    assert train_rlhf.ExactAnswer()(items, ["c b a", "c a b"], None, None).tolist() == [1.0, 0.0]  # off by default


def test_grpo_leaves_groups_with_one_reward_out_of_the_loss(domain_model, tmp_path):
    """Every reply gets the same reward: no group carries a signal, so no token counts and nothing moves."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in ["rain", "sun", "snow"] * 4))
    (tmp_path / "flat.py").write_text("def reward(prompt, reply, item):\n    return 0.5\n")
    args = ["--algo=grpo", "--init_from", domain_model, "--prompts", prompts, "--reward", tmp_path / "flat.py",
            "--group_size=4", "--batch_size=2", "--minibatches=1", "--ppo_epochs=1", "--max_new_tokens=4", "--max_iters=2",
            "--log_interval=1", "--seq_len=96", "--eval_interval=100", "--lr=1e-2"]
    rlhf_run(*args, "--out_dir", tmp_path / "skip")
    records = [r for r in read_records(tmp_path / "skip") if "train_loss" in r]
    assert all(r["informative_groups"] == 0.0 and r["train_loss"] == 0.0 for r in records)
    assert records[-1]["tokens_seen"] == 0  # no reply token counted in the loss
    rlhf_run(*args, "--skip_equal_groups=false", "--out_dir", tmp_path / "keep")
    assert [r for r in read_records(tmp_path / "keep") if "train_loss" in r][-1]["tokens_seen"] > 0
    from nanofm.checkpoint import load_model
    before, after = load_model(domain_model)[0].state_dict(), load_model(tmp_path / "skip")[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero loss, zero gradient: unchanged weights
