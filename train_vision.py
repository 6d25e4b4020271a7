"""Images, stages 4-5: train an image classifier (a CNN or a ViT stem), then teach a chat model to read images.

    python train_vision.py                                   # a CNN-stem classifier on the digits -> out/vision_cnn
    python train_vision.py --stem=vit                        # the ViT patch embedding instead -> out/vision_vit
    python train_vision.py --data=folder:my_images/          # your images: class sub-folders (or captions.jsonl)
    python train_vision.py --task=chat                       # out/sft + out/vision_cnn's stem -> out/vlm
    python train_vision.py --resume --stem=vit               # continue a stopped run exactly (the same settings)
    python train_vision.py --help                            # every setting

What it does, top to bottom: gather the images (scikit-learn's digits, drawn shapes, your
folders), curate them (nanofm/images.py: files that do not decode, too small, too elongated,
exact and near duplicates, each removal counted, per-class counts in the report) and split them
by a hash of their pixels. Then:
- classify: a small Transformer whose input is the stem's image tokens (nanofm/vision.py: the
  CNN stem or the ViT patch embedding, side by side), trained with the shared loop
  (nanofm/train.py); at the end the held-out accuracy, macro F1, confusion matrix and
  robustness to noise and shifts (report.json, confusion.png), beside scikit-learn's own
  classifiers on the same digits split as a reference.
- chat: a chat checkpoint (out/sft) gains the <|image|> token and an image encoder whose stem
  comes from the classifier (--vision_from) with a new projector, and is fine-tuned on image
  chats ("what digit is this?", "how many shapes?"), mixed with the text SFT conversations so it
  keeps its text skills; evaluated by exact match on questions about held-out images.

Design decisions:
- One checkpoint schema: the classifier and the vision-language model are both Transformers
  (meta.json's model section carries the vision config), so eval.py and serve.py load them like
  any checkpoint.
- Settings left out take the task's defaults (TASK_DEFAULTS, measured: the README's images section).
- The digits split is by content hash, not sklearn's order, so an exact copy can never sit on
  both sides; scikit-learn's reference classifiers are fit on the very same split.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from nanofm import chat, images, instructions, metrics, tasks, vision  # noqa: E402
from nanofm.checkpoint import (CheckpointError, load_for_training, load_model, load_weights, make_meta, read_meta,  # noqa: E402
                               resolve)
from nanofm.common import ConfigError, atomic_write_text, run_cli  # noqa: E402
from nanofm.config import config_to_dict, fill_unset, parse_config  # noqa: E402
from nanofm.data import ImageChatLoader, ImageLoader  # noqa: E402
from nanofm.engine import Engine, SamplingParams  # noqa: E402
from nanofm.evaluate import plot_confusion  # noqa: E402
from nanofm.model import padded_vocab  # noqa: E402
from nanofm.tokenizer import Tokenizer  # noqa: E402
from nanofm.train import Run, TrainConfig, setup, teardown, train, wrap_model  # noqa: E402

# what a setting left out means for each task (measured: README, images)
TASK_DEFAULTS = {"classify": {"max_iters": 1000, "lr": 2e-3, "batch_size": 64, "eval_interval": 250,
                              "warmup_iters": 50, "data": ["digits"]},
                 "chat": {"max_iters": 1500, "lr": 1e-3, "batch_size": 32, "eval_interval": 500,
                          "data": ["digits", "shapes"]}}


@dataclass
class VisionTrainConfig(TrainConfig):
    """Train an image classifier (CNN or ViT stem), or fine-tune a chat model on image chats."""
    task: str = "classify"  # classify (an image classifier from scratch) | chat (a chat model learns to read images)
    data: Optional[list[str]] = None  # repeatable: digits | shapes | folder:PATH (classify: digits; chat: digits and shapes)
    out_dir: str = ""  # "" = out/vision_<stem> (classify) or out/vlm (chat)
    resume: bool = False  # continue the run in out_dir exactly (give the settings it was started with)
    # curation (nanofm/images.py)
    n_shapes: int = 3000  # drawn shape scenes for --data=shapes
    min_side: int = 8  # smaller images are removed
    max_aspect: float = 4.0  # images more elongated than this are removed
    near_bits: int = 4  # near-duplicates: dHash within this many bits (-1: off); among images >= 32 pixels a side
    test_fraction: float = 0.2  # held out, by a hash of each image's pixels
    # the vision stem (nanofm/vision.py)
    stem: str = "cnn"  # cnn | vit
    image_size: int = 16  # images are resized to this square
    patch: int = 4  # pixels per token side (vit) or the cnn stem's stride: (image_size / patch)^2 image tokens
    width: int = 64  # the stem's output channels
    # the classifier (--task=classify)
    n_layer: int = 2  # Transformer blocks over the image tokens
    n_embd: int = 128  # their width
    n_head: int = 4
    dropout: float = 0.0
    shift: int = 1  # augmentation: move each training image up to this many pixels (0: off)
    # the vision-language model (--task=chat)
    init_from: str = "out/sft"  # the chat checkpoint that learns to read images
    vision_from: str = "out/vision_cnn"  # a classifier checkpoint whose stem (and its settings) it starts from; "" = a new stem
    freeze_stem: bool = False  # keep the pretrained stem fixed (the projector and the Transformer train)
    text_ratio: float = 1.0  # text SFT conversations per image conversation, so text skills are kept (0: images only; 0.25 lost 0.058 exact match)
    per_image: int = 1  # questions per training image (different wordings)
    seq_len: int = 256  # tokens per conversation (text ones are cut to it)
    eval_questions: int = 300  # held-out image questions scored at each evaluation (all of them at the end)
    max_iters: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    eval_interval: Optional[int] = None
    warmup_iters: Optional[int] = None

    def __post_init__(self):
        if self.task not in TASK_DEFAULTS:
            raise ConfigError(f"--task must be classify or chat, got {self.task!r}")
        fill_unset(self, TASK_DEFAULTS[self.task])
        if self.warmup_iters is None:
            self.warmup_iters = TrainConfig.warmup_iters
        self.out_dir = self.out_dir or (f"out/vision_{self.stem}" if self.task == "classify" else "out/vlm")
        super().__post_init__()
        for spec in self.data:
            if spec not in ("digits", "shapes") and not spec.startswith("folder:"):
                raise ConfigError(f"--data {spec!r}: give digits, shapes or folder:PATH")
        if self.task == "classify" and {"digits", "shapes"} <= set(self.data):
            raise ConfigError("--task=classify trains one label set: give digits or shapes, not both")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("n_shapes", "n_layer", "n_embd", "n_head", "per_image", "eval_questions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.shift < 0 or self.text_ratio < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("--shift and --text_ratio must be >= 0 and --dropout in [0, 1)")
        vision.VisionConfig(self.stem, self.image_size, 1, self.patch, self.width)  # validates


# ------------------------------------------------------------------ data

def label_names(items: list[dict]) -> list[str]:
    names = sorted({item["label"] for item in items if item.get("label") is not None})
    return sorted(names, key=int) if all(n.isdigit() for n in names) else names


def sklearn_reference(train_items: list[dict], test_items: list[dict]) -> dict:
    """Held-out accuracy of scikit-learn's classifiers on the same split, on the images' own pixels
    (8x8 for the digits): an SVM with an RBF kernel (gamma 0.001, as in scikit-learn's digits
    example) and multinomial logistic regression."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    shape = train_items[0]["image"].shape
    if any(item["image"].shape != shape for item in train_items + test_items):
        return {}
    x_train = np.stack([item["image"].ravel() * 16 for item in train_items])  # the digits' 0..16 scale
    x_test = np.stack([item["image"].ravel() * 16 for item in test_items])
    y_train, y_test = [item["label"] for item in train_items], [item["label"] for item in test_items]
    out = {}
    for name, model in (("svm_rbf", SVC(gamma=0.001)), ("logistic", LogisticRegression(max_iter=2000))):
        start = time.perf_counter()
        predicted = model.fit(x_train, y_train).predict(x_test)
        out[name] = {"accuracy": float((predicted == np.array(y_test)).mean()), "seconds": time.perf_counter() - start}
    return out


# ------------------------------------------------------------------ objectives

class ClassifyImages:
    """Cross-entropy of the class logits; evaluated as held-out accuracy and macro F1."""

    def __init__(self, test_images: torch.Tensor, test_labels: list[str], names: list[str]):
        self.test_images, self.test_labels, self.names = test_images, test_labels, names

    def loss(self, model, batch, step):
        x, y = batch
        ids = vision.classifier_input(getattr(model, "module", model), len(x), x.device)
        logits, _ = model(ids, images=x, head="classify")
        return F.cross_entropy(logits.float(), y), y.numel(), {}

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        raw = getattr(raw, "_orig_mod", raw)
        predicted = [self.names[i] for i in vision.predict(raw, self.test_images).argmax(-1).tolist()]
        report = metrics.classification_report(self.test_labels, predicted)
        return {"val_accuracy": report["accuracy"], "val_f1_macro": report["f1_macro"]}


class ImageChatSFT:
    """Cross-entropy on the assistant's tokens of chats with images; evaluated as exact match on
    questions about held-out images (every family alike)."""

    def __init__(self, cfg: VisionTrainConfig, ctx, tokenizer: Tokenizer, questions: list[dict]):
        self.cfg, self.ctx, self.tokenizer = cfg, ctx, tokenizer
        self.questions = questions

    def loss(self, model, batch, step):
        x, y, pictures = batch
        _, loss = model(x, y, images=pictures)
        return loss, (y != -100).sum(), {}

    def evaluate(self, model) -> dict:
        raw = getattr(model, "module", model)
        raw = getattr(raw, "_orig_mod", raw)
        if not self.ctx.master:
            return {}
        engine = Engine(raw, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype, batch_size=64)
        result = tasks.image_chat_task(engine, self.questions[:self.cfg.eval_questions])
        raw.train()
        return {"val_exact_match": result["mean_exact_match"],
                **{f"val_{family}": score for family, score in result["exact_match"].items()}}

    def sample(self, model) -> str:
        item = self.questions[0]
        engine = Engine(model, self.tokenizer, device=self.ctx.device, dtype=self.ctx.dtype)
        n = model.vision.cfg.n_tokens
        prompt = chat.render_prompt(self.tokenizer, item["messages"][:-1], image_tokens=n)
        picture = images.to_tensor([{"image": chat.images_of(item["messages"])[0]}], model.vision.cfg.image_size)
        reply = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0), images=[picture])[0]
        return f"[image: {item['answer']}] {item['messages'][0]['content'][-1]['text']}\n--> {reply.text}"


# ------------------------------------------------------------------ the two tasks

def build_classifier(cfg: VisionTrainConfig, ctx, train_items, test_items, report):
    names = label_names(train_items + test_items)
    if len(names) < 2:
        raise ConfigError(f"classification needs at least 2 labels; the data has {names}")
    index = {n: i for i, n in enumerate(names)}
    train_items = [item for item in train_items if item.get("label") is not None]
    x_train = images.to_tensor(train_items, cfg.image_size)
    y_train = torch.tensor([index[item["label"]] for item in train_items])
    x_test, y_test = images.to_tensor(test_items, cfg.image_size), [item["label"] for item in test_items]
    vcfg = vision.VisionConfig(cfg.stem, cfg.image_size, 1, cfg.patch, cfg.width)
    model = vision.image_classifier(vcfg, len(names), cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.dropout)
    loader = ImageLoader(x_train, y_train, cfg.batch_size, ctx.rank, ctx.world_size, ctx.device, cfg.seed, cfg.shift)
    objective = ClassifyImages(x_test, y_test, names)
    meta = make_meta(stage="vision", objective="classify", model=model.cfg, config=config_to_dict(cfg),
                     tokenizer=None, labels=names, data=cfg.data, curation=report)
    return model, loader, objective, meta, None


def image_tokenizer(source: Path) -> Tokenizer:
    """The chat checkpoint's tokenizer with <|image|> at the next free id (every text id unchanged)."""
    if not (source / "tokenizer.json").exists():
        raise CheckpointError(f"{source} has no tokenizer.json")
    return Tokenizer.load(source).with_special_tokens([chat.IMAGE])


def build_vlm(cfg: VisionTrainConfig, ctx, train_items, test_items, report):
    source = Path(cfg.init_from)
    if not source.exists():
        hint = " (make one with: python train_sft.py)" if cfg.init_from == "out/sft" else ""
        raise CheckpointError(f"no chat checkpoint at {source}{hint}")
    ckpt = resolve(source)
    parent_meta = read_meta(ckpt)
    if not parent_meta.get("chat_format"):
        raise ConfigError(f"{ckpt} is not a chat model (no chat_format in its meta.json); image chat SFT starts from one "
                          f"(python train_sft.py)")
    text_tokenizer = Tokenizer.load(ckpt)
    model, _, parent = load_for_training(ckpt, text_tokenizer)
    tokenizer = text_tokenizer.with_special_tokens([chat.IMAGE])
    vcfg = vision.VisionConfig(cfg.stem, cfg.image_size, 1, cfg.patch, cfg.width)
    stem_state = None
    if cfg.vision_from:
        classifier, classifier_meta = load_model(cfg.vision_from)
        if classifier.cfg.vision is None:
            raise CheckpointError(f"{cfg.vision_from} has no image encoder; give a train_vision.py classifier")
        vcfg = vision.VisionConfig(**classifier.cfg.vision)  # the stem's own settings
        stem_state = {k: v for k, v in classifier.vision.state_dict().items() if not k.startswith("projector.")}
    model = model.with_vision(vcfg, chat.image_id(tokenizer), vocab_size=padded_vocab(tokenizer.vocab_size))
    if stem_state is not None:
        model.vision.load_state_dict({**model.vision.state_dict(), **stem_state})
    if cfg.freeze_stem:
        for name, p in model.vision.named_parameters():
            p.requires_grad_(name.startswith("projector."))
    conversations = images.chats(train_items, cfg.seed, cfg.per_image)
    n_text = int(round(cfg.text_ratio * len(conversations)))
    if n_text:
        data_dir = parent_meta.get("data_dir") or str(ROOT / "data" / "default")
        per_family = max(1, n_text // len(instructions.FAMILIES) + 1)
        text = instructions.builtin(data_dir, "train", per_family=min(per_family, instructions.MAX_PER_FAMILY), seed=cfg.seed)
        conversations += random.Random(cfg.seed).sample(text, min(n_text, len(text)))
    questions = images.chats(test_items, cfg.seed + 1)
    random.Random(cfg.seed).shuffle(questions)  # every family in the first eval_questions
    loader = ImageChatLoader(conversations, tokenizer, cfg.batch_size, min(cfg.seq_len, model.cfg.block_size - 1),
                             vcfg.n_tokens, vcfg.image_size, ctx.rank, ctx.world_size, ctx.device, cfg.seed)
    objective = ImageChatSFT(cfg, ctx, tokenizer, questions)
    meta = make_meta(stage="sft", objective="image_chat", model=model.cfg, config=config_to_dict(cfg),
                     tokenizer=tokenizer.name, data_dir=parent_meta.get("data_dir"), parent=parent,
                     parent_meta=parent_meta, chat_format=chat.CHAT_FORMAT, data=cfg.data, curation=report,
                     vision_from=cfg.vision_from or None)
    if ctx.master:
        print(f"vision: {len(conversations):,} conversations ({n_text:,} text only), {len(questions):,} held-out "
              f"questions; {vcfg.stem} stem{' from ' + cfg.vision_from if cfg.vision_from else ' (new)'}, "
              f"{vcfg.n_tokens} image tokens per image; from {parent}")
    return model, loader, objective, meta, tokenizer


def final_report(cfg: VisionTrainConfig, model, objective, train_items, test_items, report: dict) -> dict:
    """The held-out report of the trained model (report.json, and confusion.png for a classifier)."""
    out = Path(cfg.out_dir)
    model.eval()
    if cfg.task == "classify":
        result = tasks.image_classification_task(model, objective.test_images, objective.test_labels, objective.names)
        result.pop("scored")
        if "digits" in cfg.data and len(cfg.data) == 1:
            result["sklearn"] = sklearn_reference(train_items, test_items)
        plot_confusion(result, out / "confusion.png", f"{cfg.stem} stem, held out")
    else:
        engine = Engine(model, objective.tokenizer, batch_size=64)
        result = tasks.image_chat_task(engine, objective.questions, progress=True)
        result.pop("scored")
    result["curation"] = report
    atomic_write_text(out / "report.json", json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> dict:
    cfg = parse_config(VisionTrainConfig, argv, description=__doc__.split("\n\n")[0])
    ctx = setup(cfg)
    train_items, test_items, report = images.gather(images.ImageData.of(config_to_dict(cfg)), progress=ctx.master)
    if ctx.master:
        removed = ", ".join(f"{k} {v}" for k, v in report["removed"].items()) or "none"
        print(f"vision: {report['images_in']:,} images, {report['images_kept']:,} kept (removed: {removed}); "
              f"{report['train']:,} train, {report['test']:,} held out")
    build = build_classifier if cfg.task == "classify" else build_vlm
    model, loader, objective, meta, tokenizer = build(cfg, ctx, train_items, test_items, report)
    resume_from = None
    if cfg.resume:  # the same model built again, then the run's newest weights; the loop restores the rest
        resume_from = resolve(cfg.out_dir)
        load_weights(model, torch.load(resume_from / "model.pt", map_location="cpu", weights_only=True), resume_from)
    models = wrap_model(model, cfg, ctx)
    trainable = sum(p.numel() for p in models.raw.parameters() if p.requires_grad)
    if ctx.master:
        print(f"vision: {trainable / 1e6:.2f}M of {models.raw.num_params(non_embedding=False) / 1e6:.2f}M parameters trained")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_path = None
        if tokenizer is not None:  # every checkpoint gets the tokenizer with <|image|>
            tokenizer.save(Path(scratch) / "tokenizer.json")
            tokenizer_path = Path(scratch) / "tokenizer.json"
        run = Run(Path(cfg.out_dir), meta, tokenizer_path=tokenizer_path, resume_from=resume_from)
        result = train(cfg, ctx, models, objective, loader, run)
    if ctx.master:
        result["report"] = final_report(cfg, models.raw, objective, train_items, test_items, report)
        summarise(cfg, result["report"])
    teardown(ctx)
    return result


def summarise(cfg: VisionTrainConfig, report: dict) -> None:
    if cfg.task == "classify":
        print(f"held out: accuracy {report['accuracy']:.4f}, macro F1 {report['f1_macro']:.4f} ({report['n']} images)")
        for name, r in report.get("sklearn", {}).items():
            print(f"  scikit-learn {name}: accuracy {r['accuracy']:.4f} (same split)")
        print("  robustness: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in report["robustness"].items()))
        print(f"confusion matrix: {cfg.out_dir}/confusion.png; report: {cfg.out_dir}/report.json")
    else:
        print("held-out image questions, exact match: "
              + ", ".join(f"{k} {v:.3f} (n={report['n'][k]})" for k, v in report["exact_match"].items()))


if __name__ == "__main__":
    run_cli(main)
