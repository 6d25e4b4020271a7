"""Images through the model: the two stems, image tokens in place of <|image|>, the KV-cache engine
with images, the chat format's image parts, the loaders, checkpoints, train_vision.py end to end,
eval's images task and serving OpenAI image_url parts (the server and the chat page)."""

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from nanofm import chat, images, vision
from nanofm.common import ConfigError
from nanofm.engine import Engine, SamplingParams
from nanofm.vision import VisionConfig
from test_engine import make_model, tok  # noqa: F401  (the engine tests' tokenizer fixture)

VCFG = VisionConfig(stem="cnn", image_size=8, patch=4, width=16)  # 4 image tokens per image


@pytest.fixture(scope="module")
def itok(tok):  # noqa: F811
    return tok.with_special_tokens([chat.IMAGE])


def vlm(itok, stem="cnn"):
    torch.manual_seed(1)
    base = make_model(itok)
    return base.with_vision(VisionConfig(stem, 8, 1, 4, 16), chat.image_id(itok)).eval()


def pictures(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_vision_config_checks():
    for bad, problem in [(dict(stem="resnet"), "stem must be one of"), (dict(image_size=10, patch=4), "multiple of patch"),
                         (dict(stem="cnn", patch=3, image_size=12), "power of 2")]:
        with pytest.raises(ConfigError, match=problem):
            VisionConfig(**bad)
    assert VisionConfig(image_size=16, patch=4).n_tokens == 16


def test_a_patch_is_a_token_for_the_vit_and_a_neighbourhood_for_the_cnn():
    """Change one pixel of the top-left patch: the ViT stem changes that token alone; the CNN's
    overlapping 3x3 windows carry it into the neighbouring tokens too (its larger receptive field)."""
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 0, 3, 3] += 0.5  # the corner of patch (0, 0) that touches patches (0, 1), (1, 0) and (1, 1)
    for stem, changed in (("vit", {0}), ("cnn", {0, 1, 4, 5})):
        torch.manual_seed(0)
        encoder = vision.ImageEncoder(VisionConfig(stem, 16, 1, 4, 32), n_embd=24)
        with torch.no_grad():
            a, b = encoder(x), encoder(y)
        assert a.shape == (1, 16, 24)
        moved = {i for i in range(16) if not torch.allclose(a[0, i], b[0, i], atol=1e-6)}
        assert moved == changed, stem


def test_tokenizer_gains_image_without_moving_any_id(tok, itok, tmp_path):  # noqa: F811
    assert itok.special_tokens[chat.IMAGE] == tok.vocab_size and itok.vocab_size == tok.vocab_size + 1
    text = "Quiet and early the river <|user|> 東京"
    assert itok.encode(text) == tok.encode(text)
    assert all(itok.special_tokens[k] == v for k, v in tok.special_tokens.items())
    itok.save(tmp_path / "tokenizer.json")
    from nanofm.tokenizer import Tokenizer
    assert Tokenizer.load(tmp_path).same_as(itok) and not itok.same_as(tok)
    assert itok.with_special_tokens([chat.IMAGE]) is itok


def test_chat_format_writes_images_as_image_tokens(itok):
    image = np.zeros((8, 8), dtype=np.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What digit?"}]},
                {"role": "assistant", "content": "7"}]
    ids, mask = chat.render(itok, messages, image_tokens=4)
    image_id = chat.image_id(itok)
    user = ids.index(itok.special_tokens["<|user|>"])
    assert ids[user + 1:user + 5] == [image_id] * 4 and ids.count(image_id) == 4
    assert all(m == 0 for i, m in zip(ids, mask) if i == image_id)  # never a target
    assert chat.parse(itok, ids) == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
                                     {"role": "assistant", "content": "7"}]
    assert chat.images_of(messages) == [image]
    with pytest.raises(chat.ChatError, match="reads no images"):
        chat.render(itok, messages)
    with pytest.raises(chat.ChatError, match="part 0 must be"):
        chat.render(itok, [{"role": "user", "content": [{"type": "image_url"}]}], image_tokens=4)
    assert chat.as_prompt(messages[:1]) == messages[:1]  # an image with no text is still a prompt


def test_image_tokens_take_the_encoders_outputs_and_text_is_unchanged(itok):
    model = vlm(itok)
    text_model = make_model(itok)  # the same weights, without vision (make_model seeds them)
    image_id = chat.image_id(itok)
    text = torch.tensor([itok.encode("The river runs", bos=True)])
    with torch.no_grad():
        assert torch.allclose(model(text)[0], text_model(text)[0], atol=1e-6)  # with_vision keeps the text model
        ids = torch.tensor([[itok.bos_id] + [image_id] * 4 + itok.encode(" what is it")])
        x = pictures(1)
        with_image = model.hidden_states(ids, images=x)
        model.transformer.wte.weight[image_id] += 5.0  # the <|image|> row is never read: the image replaces it
        assert torch.allclose(model.hidden_states(ids, images=x), with_image, atol=1e-5)
        assert not torch.allclose(model.hidden_states(ids, images=pictures(1, seed=1)), with_image, atol=1e-3)
    for given, problem in [(None, "4 image tokens, but 0 images"), (pictures(2), "2 images make 8")]:
        with pytest.raises(ConfigError, match=problem):
            model(ids, images=given)
    with pytest.raises(ConfigError, match="reads no images"):
        text_model(ids, images=x)


def test_a_batch_of_rows_with_their_own_images_equals_each_row_alone(itok):
    model = vlm(itok, stem="vit")
    image_id = chat.image_id(itok)
    rows = [[itok.bos_id] + [image_id] * 4 + itok.encode(" one"),
            [itok.bos_id] + itok.encode(" no image here at all"),
            [itok.bos_id] + [image_id] * 4 + itok.encode(" and") + [image_id] * 4]
    per_row = [pictures(1, 0), None, pictures(2, 5)]
    from nanofm.data import pad_batch
    ids, mask = pad_batch(rows, value=itok.pad_id)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, images=torch.cat([p for p in per_row if p is not None]))[0]
        for b, (row, picture) in enumerate(zip(rows, per_row)):
            alone = model(torch.tensor([row]), images=picture)[0]
            assert torch.allclose(batched[b, :len(row)], alone[0], atol=1e-5)


def test_the_engine_with_images_equals_recomputing_everything(itok):
    """Greedy replies through the KV cache and continuous batching (rows with and without images,
    more rows than slots) are the tokens of a loop that recomputes the whole sequence each step."""
    model = vlm(itok)
    image_id = chat.image_id(itok)
    prompts = [[itok.bos_id] + [image_id] * 4 + itok.encode(" The"), [itok.bos_id] + itok.encode(" Quiet and"),
               [itok.bos_id] + itok.encode(" A") + [image_id] * 4, [itok.bos_id] + [image_id] * 4]
    given = [pictures(1, 2), None, pictures(1, 3), pictures(1, 4)]
    engine = Engine(model, itok, batch_size=2)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[]), images=given)
    for prompt, picture, out in zip(prompts, given, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                logits = model(torch.tensor([ids]), images=picture)[0]
                ids.append(int(logits[0, -1, :itok.vocab_size].argmax()))
        assert out.token_ids == ids[len(prompt):]
    with pytest.raises(ConfigError, match="4 image tokens for 0 images"):
        engine.generate([prompts[0]], SamplingParams(max_tokens=2))
    with pytest.raises(ConfigError, match="reads no images"):
        Engine(make_model(itok), itok).generate([prompts[1]], SamplingParams(max_tokens=2), images=[pictures(1)])


def test_loaders_keep_images_with_their_rows_and_resume(itok):
    from nanofm.data import ImageChatLoader, ImageLoader
    items = []
    for i in range(6):  # image i is filled with i / 10 and answered with the word for i
        content = [{"type": "image", "image": np.full((8, 8), i / 10, dtype=np.float32)}, {"type": "text", "text": "which?"}]
        items.append({"messages": [{"role": "user", "content": content},
                                   {"role": "assistant", "content": images.DIGIT_NAMES[i]}]})
    items.append({"messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "fine"}]})
    loader = ImageChatLoader(items, itok, batch_size=7, max_len=32, image_tokens=4, image_size=8)
    x, y, given = loader.next_batch()
    assert int((x == chat.image_id(itok)).sum()) == 4 * len(given) == 24
    answers = [itok.decode([t for t in row.tolist() if t != -100][:-1]) for row in y]
    with_image = [a for a in answers if a != "fine"]
    assert [round(float(g.mean()) * 10) for g in given] == [images.DIGIT_NAMES.index(a) for a in with_image]
    with pytest.raises(Exception, match="longer than --seq_len"):
        ImageChatLoader(items, itok, batch_size=2, max_len=5, image_tokens=4, image_size=8)

    x_all, y_all = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    first = ImageLoader(x_all, y_all, batch_size=8, seed=3, shift=1)
    first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(6)]  # crosses an epoch
    resumed = ImageLoader(x_all, y_all, batch_size=8, seed=3, shift=1)
    resumed.load_state_dict(state)
    for (a, la), (b, lb) in zip(expected, [resumed.next_batch() for _ in range(6)]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(expected[0][0], x_all[:8])  # the shift moved them


def test_vlm_checkpoints_round_trip(itok, tmp_path):
    from nanofm.checkpoint import load_for_inference, make_meta, save_checkpoint
    model = vlm(itok)
    itok.save(tmp_path / "tokenizer.json")
    meta = make_meta(stage="sft", model=model.cfg, config={}, tokenizer=itok.name, chat_format=chat.CHAT_FORMAT)
    save_checkpoint(tmp_path / "run", 0, model, meta, tokenizer_path=tmp_path / "tokenizer.json")
    loaded, meta2, tok2 = load_for_inference(tmp_path / "run")
    ids = torch.tensor([[itok.bos_id] + [chat.image_id(itok)] * 4 + itok.encode(" x")])
    with torch.no_grad():
        assert torch.equal(loaded(ids, images=pictures(1))[0], model(ids, images=pictures(1))[0])
    assert tok2.same_as(itok) and meta2["model"]["vision"]["stem"] == "cnn"


# ------------------------------------------------------------------ train_vision.py end to end

def train_vision(*args):
    import train_vision
    return train_vision.main([*map(str, args)])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "cnn"
    result = train_vision("--out_dir", out, "--max_iters=300", "--eval_interval=300", "--log_interval=50")
    return out, result


def test_a_short_classifier_run_learns_the_digits_and_reports(classifier):
    out, result = classifier
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] > 0.85 and result["val_accuracy"] == report["accuracy"]  # chance is 0.1
    assert report["sklearn"]["svm_rbf"]["accuracy"] > 0.95  # the reference, on the same split
    assert len(report["confusion_matrix"]) == 10 and sum(map(sum, report["confusion_matrix"])) == report["n"]
    assert report["robustness"]["noise_0.3"]["accuracy"] < report["accuracy"]  # noise hurts
    assert (out / "confusion.png").stat().st_size > 10_000
    assert report["curation"]["images_in"] == 1797 and sum(report["curation"]["classes_kept"].values()) == 1797


def test_a_stopped_run_resumes_exactly(tmp_path):
    args = ["--max_iters=8", "--eval_interval=4", "--batch_size=16", "--n_embd=32", "--width=16", "--n_head=2"]
    train_vision(*args, "--out_dir", tmp_path / "straight")
    train_vision(*args, "--out_dir", tmp_path / "split", "--stop_step=3")
    train_vision(*args, "--out_dir", tmp_path / "split", "--resume")
    from nanofm.checkpoint import resolve
    a = torch.load(resolve(tmp_path / "straight") / "model.pt", weights_only=True)
    b = torch.load(resolve(tmp_path / "split") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the shifted batches and the optimizer state came back too


def test_bad_settings_are_clear_errors(tmp_path):
    for args, problem in [(["--task=vqa"], "--task must be classify or chat"),
                          (["--data=digits", "--data=shapes"], "one label set"),
                          (["--data=cats"], "give digits, shapes or folder:PATH"),
                          (["--stem=cnn", "--patch=3", "--image_size=12"], "power of 2"),
                          (["--data=folder:" + str(tmp_path / "none")], "no image folder"),
                          (["--task=chat", "--init_from", tmp_path / "missing"], "no chat checkpoint"),
                          (["--resume", "--out_dir", tmp_path / "nothing"], "no checkpoint|does not exist|missing")]:
        with pytest.raises(Exception, match=problem):
            train_vision("--out_dir", tmp_path / "o", "--max_iters=1", *args)


@pytest.fixture(scope="module")
def chat_model(tok, tmp_path_factory):  # noqa: F811
    """A tiny chat checkpoint (random weights, a tokenizer without <|image|>) for the vision-language run."""
    from nanofm.checkpoint import make_meta, save_checkpoint
    out = tmp_path_factory.mktemp("chat")
    tok.save(out / "tokenizer.json")
    model = make_model(tok)
    meta = make_meta(stage="sft", model=model.cfg, config={}, tokenizer=tok.name, chat_format=chat.CHAT_FORMAT)
    return save_checkpoint(out / "run", 0, model, meta, tokenizer_path=out / "tokenizer.json")


@pytest.fixture(scope="module")
def vlm_run(classifier, chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "run"
    result = train_vision("--task=chat", "--init_from", chat_model, "--vision_from", classifier[0], "--out_dir", out,
                          "--data=digits", "--text_ratio=0", "--max_iters=300", "--eval_interval=300", "--log_interval=100",
                          "--lr=3e-3", "--batch_size=32", "--seq_len=48", "--eval_questions=100", "--freeze_stem")
    return out, result


def test_a_chat_model_learns_to_say_which_digit(vlm_run, classifier):
    from nanofm.checkpoint import load_for_inference, read_meta
    out, result = vlm_run
    report = json.loads((out / "report.json").read_text())
    assert report["exact_match"]["image_digit"] > 0.6, report["examples"]  # chance is 0.1 (not freezing the stem: 0.35)
    model, meta, tokenizer = load_for_inference(out)
    assert meta["chat_format"] == chat.CHAT_FORMAT and meta["vision_from"] == str(classifier[0])
    assert chat.IMAGE in tokenizer.special_tokens
    assert model.cfg.vision == read_meta(classifier[0])["model"]["vision"]  # the stem's own settings came along


def test_eval_images_task_pairs_two_classifiers_and_skips_text_models(classifier, vlm_run, chat_model, tmp_path):
    import eval as eval_script
    other = tmp_path / "vit"
    train_vision("--out_dir", other, "--stem=vit", "--max_iters=60", "--eval_interval=60", "--batch_size=32",
                 "--n_embd=64", "--width=32")
    out = tmp_path / "eval"
    eval_script.main(["--ckpt", str(classifier[0]), "--ckpt", str(other), "--ckpt", str(vlm_run[0]), "--ckpt", str(chat_model),
                      "--tasks", "images", "--out_dir", str(out), "--max_items=50"])
    report = json.loads((out / "report.json").read_text())
    entries = report["checkpoints"]
    cnn = entries["cnn"]["results"]["images"]
    assert entries["cnn"]["kind"] == "image_classifier" and cnn["accuracy"] > 0.85 and "noise_0.1" in cnn["robustness"]
    assert entries["run"]["results"]["images"]["exact_match"]["image_digit"] > 0.6
    assert "reads them" in entries[list(entries)[-1]]["skipped"]["images"]
    gain = report["paired_images"]["vit"]
    assert gain["against"] == "cnn" and gain["n"] == cnn["n"]  # the same held-out images, paired
    assert (out / "confusion_cnn.png").exists()


# ------------------------------------------------------------------ serving

def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serving_reads_image_url_parts_and_logs_a_hash_not_the_bytes(itok, tmp_path):
    import serve
    from nanofm.interactions import InteractionLog
    from test_serve import start
    openai = pytest.importorskip("openai")
    model = vlm(itok)
    log = InteractionLog(tmp_path / "log.db")
    url, server = start(serve.make_app(Engine(model, itok, batch_size=2), "tiny-vlm", chat.CHAT_FORMAT, slots=2, log=log))
    text_url, text_server = start(serve.make_app(Engine(make_model(itok), itok), "tiny", chat.CHAT_FORMAT, slots=2))
    try:
        picture = np.random.default_rng(0).random((8, 8)).astype(np.float32)
        data_url = images.data_url(picture)
        client = openai.OpenAI(base_url=url + "/v1", api_key="-")
        content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "What digit is this?"}]
        reply = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": content}],
                                               max_tokens=5, temperature=0)
        # the served reply is the engine's own greedy reply to the same prompt and image
        decoded = images.to_tensor([{"image": images.decode(images.from_data_url(data_url))}], 8)
        prompt = chat.render_prompt(itok, [{"role": "user", "content": [{"type": "image", "image": picture},
                                                                         {"type": "text", "text": "What digit is this?"}]}],
                                    image_tokens=4)
        expected = Engine(model, itok).generate([prompt], SamplingParams(max_tokens=5, temperature=0), images=[decoded])[0]
        assert reply.choices[0].message.content == expected.text
        [row] = log.requests()
        logged = row["prompt"][0]["content"]
        assert logged[0] == {"type": "image", "hash": images.pixel_hash(images.decode(images.from_data_url(data_url))),
                             "width": 8, "height": 8}
        assert data_url.split(",")[1][:40] not in json.dumps(row)  # the bytes are not in the log
        truncated = "data:image/png;base64," + base64.b64encode(images.encode_png(picture)[:60]).decode()
        for bad, problem in [("https://example.com/x.png", "remote URLs"), (truncated, "truncated or corrupt"),
                             ("data:image/png;base64,", "is empty")]:
            code, answer = post(url + "/v1/chat/completions", {"model": "tiny-vlm", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}]})
            assert code == 400 and problem in answer["error"]["message"], answer
        code, answer = post(text_url + "/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": content}]})
        assert code == 400 and "reads no images" in answer["error"]["message"]
        code, answer = post(text_url + "/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "The river"}]}]})
        assert code == 200  # a list of text parts is plain text to any chat model
    finally:
        server.should_exit = text_server.should_exit = True


def test_the_chat_page_attaches_an_image(itok, tmp_path):
    """In a real headless Chromium: choose a PNG with the page's file input, send a question; the
    request carries the image as a data URL (the log has its hash), the bubble shows it, and the
    reply is the model's reply to that image."""
    import serve
    from nanofm.interactions import InteractionLog
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import headless_chromium, start
    browser = headless_chromium(tmp_path)
    model = vlm(itok)
    log = InteractionLog(tmp_path / "log.db")
    url, server = start(serve.make_app(Engine(model, itok, batch_size=2), "tiny-vlm", chat.CHAT_FORMAT, slots=2, log=log))
    picture = np.random.default_rng(3).random((8, 8)).astype(np.float32)
    (tmp_path / "digit.png").write_bytes(images.encode_png(picture))
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny-vlm")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("5")
        browser.find_element(By.ID, "image").send_keys(str(tmp_path / "digit.png"))
        wait.until(lambda b: "digit.png" in b.find_element(By.ID, "attached").text)
        browser.find_element(By.ID, "input").send_keys("What digit is this?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        assert browser.find_element(By.CSS_SELECTOR, ".user img").get_attribute("src").startswith("data:image/png;base64,")
        [row] = log.requests()
        stored = images.decode(images.encode_png(picture))
        assert row["prompt"][0]["content"][0] == {"type": "image", "hash": images.pixel_hash(stored), "width": 8, "height": 8}
        prompt = chat.render_prompt(itok, [{"role": "user", "content": [{"type": "image", "image": stored},
                                                                         {"type": "text", "text": "What digit is this?"}]}],
                                    image_tokens=4)
        expected = Engine(model, itok).generate([prompt], SamplingParams(max_tokens=5, temperature=0),
                                                images=[images.to_tensor([{"image": stored}], 8)])[0]
        assert row["output"][0] == expected.text
        assert browser.find_element(By.CSS_SELECTOR, ".assistant .text").text == expected.text.strip()
        assert browser.find_element(By.ID, "attached").text == ""  # the image went with that message only
    finally:
        browser.quit()
        server.should_exit = True
