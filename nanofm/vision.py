"""Vision stems: how an image becomes tokens of the same Transformer that reads text.

    vcfg = VisionConfig(stem="vit", image_size=16, patch=4, width=64)
    encoder = ImageEncoder(vcfg, n_embd=192)       # [N, 1, 16, 16] -> [N, 16, 192]: 16 image tokens
    classifier = image_classifier(vcfg, n_classes=10)   # a Transformer whose only tokens are image tokens
    vlm = model.with_vision(vcfg, image_token_id)  # a text model that also reads images (nanofm/model.py)

Two stems, side by side, written from scratch:
- "vit": the ViT patch embedding (Dosovitskiy et al. 2020): cut the image into patch x patch
  squares and map each one linearly to `width` numbers (a convolution whose kernel and stride are
  the patch size is exactly that). Nothing is shared between patches before the Transformer.
- "cnn": a small convolutional stem: a 3x3 convolution, then log2(patch) 3x3 convolutions of
  stride 2, GELU between; each output position sees a neighbourhood larger than a patch, and
  the weights are shared across the image (a CNN's built-in assumption that a stroke is a stroke
  wherever it is). The hybrid of the ViT paper, and what early vision-language models used.
Both give (image_size / patch)^2 tokens of `width` numbers, plus a learned position embedding
(the Transformer's own positions count along the sequence; these tell a token where in the
2-D grid it sits), then the projector: Linear -> GELU -> Linear into the Transformer's width
(LLaVA-1.5's two-layer MLP; nanoVLM's modality projector does the same job).

How image tokens enter the Transformer: the chat format writes an image as image_tokens copies of
the tokenizer's <|image|> token; the model embeds the text tokens as usual and puts the
encoder's outputs in place of the <|image|> positions, in order (model.Transformer._embed).
Everything after that (attention, the KV cache, the heads) is the text model's, unchanged.

Design decisions:
- Pixels are mapped from [0, 1] to [-1, 1] inside the encoder, so callers hand in plain images.
- No normalisation layers in the stems: they are two to three layers deep, and batch norm
  would make a prediction depend on the other images in the batch (and on train/eval mode).
- A classifier is a Transformer too (bidirectional, mean-pooled, a vocabulary of one token: the
  image token), so CNN and ViT differ only in the stem, and the vision checkpoint has the one
  checkpoint schema. Its stem and projector are what the vision-language model starts from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanofm.common import ConfigError

STEMS = ("cnn", "vit")


@dataclass
class VisionConfig:
    stem: str = "cnn"  # cnn (a small convolutional stem) | vit (the ViT patch embedding)
    image_size: int = 16  # images are resized to image_size x image_size
    channels: int = 1  # 1 = grey (nanofm.images decodes to grey)
    patch: int = 4  # pixels per token side: a vit patch, or the cnn stem's total stride (a power of 2)
    width: int = 64  # channels of the stem's output, before the projector

    def __post_init__(self):
        problems = []
        if self.stem not in STEMS:
            problems.append(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.image_size < 1 or self.patch < 1 or self.image_size % self.patch:
            problems.append(f"image_size ({self.image_size}) must be a positive multiple of patch ({self.patch})")
        if self.stem == "cnn" and self.patch & (self.patch - 1):
            problems.append(f"the cnn stem's stride (patch) must be a power of 2, got {self.patch}")
        if self.channels < 1 or self.width < 1:
            problems.append(f"channels and width must be at least 1, got {self.channels} and {self.width}")
        if problems:
            raise ConfigError("bad vision config: " + "; ".join(problems))

    @property
    def n_tokens(self) -> int:
        """Image tokens per image: one per patch (vit) or per output position of the stem (cnn)."""
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """3x3 convolutions: one at stride 1, then log2(patch) at stride 2, GELU between."""
    layers, channels = [nn.Conv2d(cfg.channels, cfg.width // 2, 3, padding=1), nn.GELU()], cfg.width // 2
    for i in range(int(math.log2(cfg.patch))):
        last = i == int(math.log2(cfg.patch)) - 1
        layers += [nn.Conv2d(channels, cfg.width, 3, stride=2, padding=1)] + ([] if last else [nn.GELU()])
        channels = cfg.width
    if cfg.patch == 1:  # no downsampling: one more 3x3 convolution to reach `width` channels
        layers.append(nn.Conv2d(channels, cfg.width, 3, padding=1))
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """Images [N, C, S, S] in [0, 1] -> image tokens [N, n_tokens, n_embd]: stem, grid positions, projector."""

    def __init__(self, cfg: VisionConfig, n_embd: int):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "vit":  # a linear map of each patch: a convolution with kernel = stride = patch
            self.stem = nn.Conv2d(cfg.channels, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        else:
            self.stem = conv_stem(cfg)
        self.positions = nn.Parameter(torch.randn(cfg.n_tokens, cfg.width) * 0.02)
        self.projector = nn.Sequential(nn.Linear(cfg.width, n_embd), nn.GELU(), nn.Linear(n_embd, n_embd))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ConfigError(f"images must be [N, {cfg.channels}, {cfg.image_size}, {cfg.image_size}], "
                              f"got {tuple(images.shape)}")
        x = self.stem(images.to(self.positions.dtype) * 2 - 1)  # [N, width, S/patch, S/patch]
        x = x.flatten(2).transpose(1, 2) + self.positions  # [N, tokens, width], row by row
        return self.projector(x)


def image_classifier(vcfg: VisionConfig, n_classes: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                     dropout: float = 0.0):
    """A Transformer that classifies images: the stem's tokens are its whole input (its vocabulary
    is one token, <image>, id 0), read bidirectionally and mean-pooled into the head."""
    from nanofm.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=1, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=vcfg.n_tokens,
                      causal=False, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False,
                      n_classes=n_classes, pool="mean", dropout=dropout, vision=vcfg.to_dict(), image_token_id=0)
    model = Transformer(cfg)
    # the one-token embedding is always replaced, and the LM and MLM heads are never read: frozen, so
    # DDP (which wants a gradient for every trained parameter) and the optimizer leave them alone
    for module in (model.transformer.wte, model.lm_head, model.mlm_transform):
        module.requires_grad_(False)
    return model


def classifier_input(model, n_images: int, device=None) -> torch.Tensor:
    """The token ids an image classifier reads: n_tokens image tokens per image."""
    return torch.full((n_images, model.vision.cfg.n_tokens), model.cfg.image_token_id, dtype=torch.long, device=device)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities [N, n_classes] of an image classifier, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [F.softmax(model.classify(classifier_input(model, len(chunk), device), images=chunk.to(device)).float(), -1)
               for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).cpu()
