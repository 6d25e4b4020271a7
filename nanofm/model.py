"""One Transformer for GPT-style (causal) and BERT-style (bidirectional) models, with a KV cache.

    cfg = ModelConfig.preset("tiny", vocab_size=8192)
    model = Transformer(cfg)
    logits, loss = model(idx, targets)                  # idx [B, T] token ids
    token_logprobs(logits, targets)                     # log p(target) per position, differentiable
    out = model.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=50)
    python -m nanofm.model --preset gpt2                # parameters and FLOPs of a preset
    python -m nanofm.sizing --budget_gpu_hours 100      # a shape and token count for a budget

Design decisions:
- Names follow GPT-2's checkpoint (transformer.wte, .wpe, .h[i].attn.c_attn, .mlp.c_fc, .ln_f,
  lm_head), so weights map onto other implementations by name.
- One block serves every layout the dataclass can describe: LayerNorm or RMSNorm, pre-norm
  (GPT-2, Llama) or post-norm with a norm after the embeddings (BERT), learned positions or RoPE,
  GELU (tanh or exact) or SwiGLU MLP, grouped-query attention (n_kv_head < n_head), biases,
  dropout, tied or untied embeddings. Presets pick the layouts people know (GPT-2, BERT, and a
  Llama-style `tiny` that trains on a laptop), so each exports to its `transformers` class.
- No token-type (segment) embeddings: BERT adds type 0 to every position when no types are
  given, so importing folds that row into the position table, and exporting writes zeros.
- Attention is F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU). Causal
  models use is_causal; BERT models take a padding mask instead.
- Heads: `lm` (next-token logits), `mlm` (BERT's transform: dense, GELU, norm, then the tied
  decoder) and, with n_classes > 0, a classification head on the last real token (causal) or
  the first token (bidirectional). Later stages read `hidden_states` for value and reward heads.
- Batches of unequal prompts are left-padded: each row gets its own positions, and the cache
  remembers which positions are padding, so a row computes what it would compute alone (tested).
- The KV cache holds keys/values per layer for the positions seen so far; generation with it
  must give exactly the tokens of the naive path that recomputes the whole sequence (tested).
- FLOPs per token = 6N + 12 L H Q T (PaLM, appendix B), N without the embedding lookup tables.
- token_logprobs(logits, targets) is the one log-probability computation: evaluation scores,
  the engine's token log-probabilities, and the policies of SFT, DPO and PPO all use it. The
  training loss stays F.cross_entropy (or the fused kernel on CUDA), its mean over the same values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanofm.common import ConfigError
from nanofm import kernels

PRESETS = {
    # a Llama-style model that learns text in minutes on a laptop CPU; untied embeddings, so the
    # input embeddings can take a larger learning rate (TrainConfig.embedding_lr_mult)
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=192, block_size=256, norm="rmsnorm", pos="rope",
                 mlp="swiglu", bias=False, tie_embeddings=False),
    "small": dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=512, norm="rmsnorm", pos="rope",
                  mlp="swiglu", bias=False, tie_embeddings=True),
    # GPT-2 (Radford et al. 2019), vocab padded from 50257 to 50304 (a multiple of 64) for speed
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304),
    # BERT-base (Devlin et al. 2018): bidirectional, post-norm with a norm after the embeddings, exact
    # GELU, an MLM head with a bias; exports to BertForMaskedLM
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, causal=False, vocab_size=30522,
                      norm_position="post", mlp="gelu_exact", head_bias=True, norm_eps=1e-12),
}

def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n_tokens: rounded up to a multiple of 64 for fast matmuls."""
    return multiple * -(-n_tokens // multiple)



@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    block_size: int = 1024  # context length
    causal: bool = True  # GPT (True) or BERT (False)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre (GPT-2, Llama: norm inside the residual branch) | post (BERT: after the sum)
    pos: str = "learned"  # learned | rope
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT) | swiglu
    mlp_hidden: int | None = None  # default 4 d for gelu, 8/3 d (rounded to 64) for swiglu
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    head_bias: bool = False  # a bias on the output head (BERT's MLM decoder has one)
    n_classes: int = 0  # > 0 adds a classification head (fine-tuned classifiers)
    pool: str = "auto"  # what the classification head reads: auto (last real token if causal, first if not) | first | last | mean
    value_head: bool = False  # a scalar value per position beside the LM head (PPO's critic shares the body)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    vision: dict | None = None  # a VisionConfig (nanofm/vision.py) as a dict: the model also reads images
    image_token_id: int = -1  # the token whose positions take the image encoder's outputs (with vision)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            problems.append("RoPE needs an even head size")
        for name, value, allowed in (("norm", self.norm, ("layernorm", "rmsnorm")), ("pos", self.pos, ("learned", "rope")),
                                     ("mlp", self.mlp, ("gelu", "gelu_exact", "swiglu")),
                                     ("norm_position", self.norm_position, ("pre", "post")),
                                     ("pool", self.pool, ("auto", "first", "last", "mean"))):
            if value not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {value!r}")
        if self.vision is not None:
            from nanofm.vision import VisionConfig
            VisionConfig(**self.vision)  # validates
            if not 0 <= self.image_token_id < self.vocab_size:
                problems.append(f"image_token_id ({self.image_token_id}) must be a vocabulary id below {self.vocab_size}")
        if problems:
            raise ConfigError("bad model config: " + "; ".join(problems))
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)  # Triton on CUDA, F.rms_norm elsewhere


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # [T, head_dim / 2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    # tables [T, D/2] are shared by the batch; [B, T, D/2] (per-row positions) broadcast over heads only
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for the positions processed so far, and which of those
    positions are real tokens (False for the left padding of a batch of unequal prompts).
    One tensor per layer (not one for all): a compiled decode step then updates each in place,
    where views of one shared tensor would make torch.compile copy the whole cache every step."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos, self.max_len, self.padded, self.dtype = 0, max_len, False, dtype
        self.start = 0  # attention reads columns start..pos (continuous batching skips the columns no row uses)
        self.column: torch.Tensor | None = None  # decode_step writes this column (a tensor: no retrace per step)
        self.end: int | None = None  # decode_step reads columns start..end (None: to the right edge)
        self.rows: int | None = None  # decode_step runs the first `rows` rows (None: all)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.column is not None:  # decode_step: one new column; attention reads start..end
            keys, values = self.k[layer][:self.rows], self.v[layer][:self.rows]
            keys.index_copy_(2, self.column, k.to(self.dtype))  # autocast may hand bf16 to an fp32 cache
            values.index_copy_(2, self.column, v.to(self.dtype))
            return keys[:, :, self.start:self.end], values[:, :, self.start:self.end]
        t = k.size(2)
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        return self.k[layer][:, :, self.start:self.pos + t], self.v[layer][:, :, self.start:self.pos + t]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project(self, x, rope=None):
        """Queries [B, n_head, T, head_dim], keys and values [B, n_kv_head, T, head_dim], rotated by RoPE."""
        cfg, (B, T, C) = self.cfg, x.shape
        q, k, v = self.c_attn(x).split([C, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim], dim=2)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, attn_mask=None, cache: KVCache | None = None):
        cfg, (B, T, C) = self.cfg, x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # causal without a cache (or a cache starting empty): the fused causal path; with cached
        # positions and several new queries, an explicit mask (query i sees keys <= pos + i)
        is_causal = cfg.causal and attn_mask is None and (cache is None or cache.pos == 0) and T > 1
        if cfg.causal and attn_mask is None and cache is not None and cache.pos > 0 and T > 1:
            attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=cache.pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=cfg.dropout if self.training else 0.0,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu, self.gelu_approximate = cfg.mlp == "swiglu", "tanh" if cfg.mlp == "gelu" else "none"
        # SwiGLU: one matmul makes both the gate and the value, split in half
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)  # GPT-2's tanh approximation, or BERT's exact erf
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None, attn_mask=None, cache=None):
        if self.post_norm:  # BERT / the original Transformer: normalise after each residual sum
            x = self.ln_1(x + self.attn(x, rope, attn_mask, cache))
            return self.ln_2(x + self.mlp(x))
        # pre-norm (GPT-2, Llama): the residual stream is never normalised, which trains stably deep
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


# ------------------------------------------------------------------ the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            # pre-norm needs a final norm; post-norm already ends on one and instead normalises the embeddings
            ln_f=make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity(),
        ))
        if cfg.norm_position == "post":
            self.transformer["ln_emb"] = make_norm(cfg)
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if cfg.n_classes:  # reads one position: the last real token (causal) or the first (bidirectional, CLS-style)
            self.cls_head = nn.Linear(cfg.n_embd, cfg.n_classes)
        if cfg.value_head:  # PPO: the value of each prefix, read off the same hidden states as the next-token logits
            self.value_head = nn.Linear(cfg.n_embd, 1)
        if cfg.vision is not None:  # images become tokens in place of <|image|> (nanofm/vision.py)
            from nanofm.vision import ImageEncoder, VisionConfig
            self.vision = ImageEncoder(VisionConfig(**cfg.vision), cfg.n_embd)
        if not cfg.causal:  # BERT's MLM transform before the (tied) decoder
            self.mlm_transform = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd), nn.GELU(), make_norm(cfg))
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float type the weights hold (the KV cache's): that of the first float tensor, since an
        int8 export (nanofm.quantize) keeps its matrices as int8 and only norms etc. as floats."""
        return next(t.dtype for t in [*self.parameters(), *self.buffers()] if t.is_floating_point())

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (shared ones once). non_embedding leaves out the lookup tables that cost no
        matmul FLOPs: position embeddings, and the input embeddings when they are not tied to the
        output head (tied, they are the head's matrix and count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability of a built model (continued training with other dropout)."""
        self.cfg.dropout = p  # attention reads it from the shared config
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def resized_vocab(self, vocab_size: int) -> "Transformer":
        """A copy with more vocabulary rows (new rows initialised like the others): room for
        special tokens a pretrained model never had."""
        if vocab_size < self.cfg.vocab_size:
            raise ConfigError(f"cannot shrink the vocabulary from {self.cfg.vocab_size} to {vocab_size}")
        bigger = Transformer(replace(self.cfg, vocab_size=vocab_size))
        state = bigger.state_dict()
        for name, value in self.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight", "lm_head.bias"):
                state[name][:value.size(0)] = value
            else:
                state[name] = value
        bigger.load_state_dict(state)
        return bigger

    def hidden_states(self, idx, attention_mask=None, cache: KVCache | None = None, positions=None, images=None):
        """Final-norm hidden states [B, T, C]. attention_mask [B, T] marks real tokens (1) vs
        padding (0); with a cache it is remembered, so later steps keep ignoring the padding.
        positions [B, T] gives each row its own positions (left-padded prompts); by default they
        count on from the cached ones. images [N, C, S, S]: the images of the <|image|> runs in
        idx, in reading order (row 0's first), for a model built with vision."""
        cfg, T = self.cfg, idx.size(1)
        start = cache.pos if cache is not None else 0
        if positions is None:
            if start + T > cfg.block_size:
                raise ConfigError(f"sequence of {start + T} tokens is longer than the context of {cfg.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)
        elif int(positions.max()) >= cfg.block_size:
            raise ConfigError(f"position {int(positions.max())} is beyond the context of {cfg.block_size}")
        slots = self._image_slots(idx, images) if images is not None or self.cfg.vision is not None else None
        x, rope = self._embed(idx, positions, images, slots)
        x = self.transformer.drop(x)
        attn_mask = None
        if cache is not None and attention_mask is not None:
            cache.valid[:, start:start + T] = attention_mask.bool()
            cache.padded = cache.padded or not bool(attention_mask.bool().all())
        if cache is not None and cache.padded:  # padding somewhere in the cache: an explicit [B, 1, T, keys] mask
            query_pos = torch.arange(start, start + T, device=idx.device)[:, None]
            key_pos = torch.arange(cache.start, start + T, device=idx.device)[None, :]
            allowed = key_pos <= query_pos if cfg.causal else torch.ones_like(key_pos, dtype=torch.bool)
            # a padding query still sees itself, so no row is all -inf (that would make NaNs)
            attn_mask = (cache.valid[:, None, None, cache.start:start + T] & allowed) | (key_pos == query_pos)
        elif attention_mask is not None and cache is None:  # keys that are padding are hidden from every query
            keys = attention_mask.bool()[:, None, None, :]
            if cfg.causal:
                keys = keys & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            # a padding query still sees itself, so no row is all -inf (that would make NaNs)
            attn_mask = keys | torch.eye(T, dtype=torch.bool, device=idx.device)
        for block in self.transformer.h:
            x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def _embed(self, idx, positions, images=None, slots=None):
        """Token embeddings (+ learned positions, or the RoPE tables for these positions), with the
        image encoder's tokens in place of the <|image|> tokens (slots: where they are)."""
        x, rope = self.transformer.wte(idx), None
        if images is not None:
            features = self.vision(images).to(x.dtype).reshape(-1, x.size(-1))
            x = x.masked_scatter(slots[..., None], features)  # fills the slots in reading order
        if self.cfg.pos == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        if "ln_emb" in self.transformer:
            x = self.transformer.ln_emb(x)
        return x, rope

    def _image_slots(self, idx, images):
        """Where the images go (idx == <|image|>), checked to hold image_tokens per image. Reading
        the count back is one device sync per forward of a model that reads images: the price of
        a clear error instead of masked_scatter silently misplacing an image."""
        if self.cfg.vision is None:
            raise ConfigError("this model reads no images (it was built without vision: with_vision())")
        slots, n_tokens = idx == self.cfg.image_token_id, self.vision.cfg.n_tokens
        have, count = (0 if images is None else images.size(0)), int(slots.sum())
        if count != have * n_tokens:
            raise ConfigError(f"the ids hold {count} image tokens, but {have} images make "
                              f"{have * n_tokens} ({n_tokens} each): render each image with the chat format "
                              f"(chat.render(..., image_tokens={n_tokens})) and pass one image per image part")
        return slots

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, vocab] of one new token per row (tokens, positions [B, 1]; B = cache.rows
        when set: the first rows of the cache), written to the cache column `cache.column` (a
        tensor), attending to the columns `cache.valid` marks from cache.start to cache.end.
        The continuous batch's decode step. Compiled, no Python int changes from step to step
        (the column is a tensor; start 0 and end None: every column), so torch.compile traces it
        once and, on CUDA, can replay it as a CUDA graph; eager, it reads only the columns in
        use. The caller keeps positions inside the context."""
        x, rope = self._embed(tokens, positions)
        mask = cache.valid[:cache.rows, None, None, cache.start:cache.end]  # a row's own keys, the new one too
        for block in self.transformer.h:
            x = block(x, rope, mask, cache)
        return self.lm_head(self.transformer.ln_f(x))

    def forward(self, idx, targets=None, attention_mask=None, cache: KVCache | None = None, positions=None,
                head: str = "lm", images=None):
        """Logits [B, T, V] and, given targets (-100 = ignore), the mean cross-entropy loss. With
        targets on CUDA the fused kernel computes the loss and logits is None. head="classify"
        returns (class logits [B, n_classes], None) instead: through forward, so DDP, FSDP and
        torch.compile see a classifier's training step as the forward it is. head="values" returns
        (logits, values [B, T]) from one pass through the body (a model built with value_head).
        images: the images of the <|image|> tokens in idx (see hidden_states)."""
        if head == "classify":
            return self.classify(idx, attention_mask, images), None
        h = self.hidden_states(idx, attention_mask, cache, positions, images)
        if head == "values":
            if not self.cfg.value_head:
                raise ConfigError("this model has no value head (build it with value_head=True: with_value_head())")
            return self.lm_head(h), self.value_head(h)[..., 0].float()
        if not self.cfg.causal:
            h = self.mlm_transform(h)
        if targets is not None and type(self.lm_head) is nn.Linear and self.lm_head.bias is None and kernels.use_kernels(h):
            # fused head + loss: the [tokens, vocab] logits are never materialised, so none are returned
            loss = kernels.linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1))
            return None, loss
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        # reshape, not view: targets may be a non-contiguous slice such as x[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def classify(self, idx, attention_mask=None, images=None):
        """Class logits [B, n_classes] from the classification head, reading (cfg.pool) the last real
        token (a causal model's default: the only one that has seen the whole text), the first (a
        bidirectional model's, BERT's [CLS] place) or the mean of the real tokens. Padding may be on
        either side: positions come from the mask, not from the row's length."""
        if not self.cfg.n_classes:
            raise ConfigError("this model has no classification head (n_classes is 0)")
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(idx, dtype=torch.bool)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # each row counts from its first real token
        h = self.hidden_states(idx, attention_mask, positions=positions, images=images)
        pool = self.cfg.pool if self.cfg.pool != "auto" else ("last" if self.cfg.causal else "first")
        rows = torch.arange(idx.size(0), device=idx.device)
        if pool == "mean":
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif pool == "last":
            pooled = h[rows, mask.size(1) - 1 - mask.flip(1).long().argmax(1)]
        else:
            pooled = h[rows, mask.long().argmax(1)]
        return self.cls_head(pooled)

    def with_classifier(self, n_classes: int, pool: str = "auto") -> "Transformer":
        """A copy with a new classification head of n_classes (initialised like the other
        layers), every other weight kept: how a pretrained body becomes a classifier."""
        model = Transformer(replace(self.cfg, n_classes=n_classes, pool=pool))
        state = model.state_dict()
        state.update({k: v for k, v in self.state_dict().items() if not k.startswith("cls_head")})
        model.load_state_dict(state)
        return model

    def with_vision(self, vision, image_token_id: int, vocab_size: int | None = None) -> "Transformer":
        """A copy that also reads images (a new image encoder from a VisionConfig, initialised like
        the other layers), every other weight kept; vocab_size grows the vocabulary (room for a new
        <|image|> token). Load a pretrained stem into .vision afterwards."""
        bigger = self.resized_vocab(vocab_size) if vocab_size and vocab_size > self.cfg.vocab_size else self
        vision = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
        model = Transformer(replace(bigger.cfg, vision=vision, image_token_id=image_token_id))
        state = model.state_dict()
        state.update({k: v for k, v in bigger.state_dict().items() if not k.startswith("vision.")})
        model.load_state_dict(state)
        return model

    def with_value_head(self, value_head: bool = True) -> "Transformer":
        """A copy with a new value head (PPO's critic, initialised like the other layers), or
        without it (value_head=False: the policy alone, for serving and export); the rest is kept."""
        model = Transformer(replace(self.cfg, value_head=value_head))
        state = model.state_dict()
        state.update({k: v for k, v in self.state_dict().items() if k in state and not k.startswith("value_head")})
        model.load_state_dict(state)
        return model

    # ---------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 stop_token: int | None = None, vocab_limit: int | None = None):
        """Sample continuations of idx [B, T]; temperature 0 is greedy. vocab_limit keeps the
        padding rows of the vocabulary (ids the tokenizer does not have) from being sampled."""
        if not self.cfg.causal:
            raise ConfigError("generation needs a causal (GPT-style) model")
        total = idx.size(1) + max_new_tokens
        if total > self.cfg.block_size:
            raise ConfigError(f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds the context of {self.cfg.block_size}")
        cache = KVCache(self.cfg, idx.size(0), total, idx.device, self.compute_dtype) if use_cache else None
        out, step_input = idx, idx
        was_training = self.training
        self.eval()  # no dropout while sampling (and no draws from the global RNG)
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(step_input if use_cache else out, cache=cache)
                next_token = sample_next(logits[:, -1, :vocab_limit], temperature, top_k, top_p, generator)
                out = torch.cat([out, next_token], dim=1)
                step_input = next_token
                if stop_token is not None and bool((next_token == stop_token).all()):
                    break
        finally:
            self.train(was_training)
        return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_limit: int | None = None) -> torch.Tensor:
    """log p(target) at every position: logits [..., V], targets [...] -> [...], in fp32 (or fp64), 0 where
    the target is -100 (ignored). Differentiable, so the same function scores continuations
    (evaluation), gives a policy's log-probabilities (SFT, DPO, PPO) and the engine's token
    log-probabilities. vocab_limit normalises over the tokenizer's ids only, leaving out the
    padding rows of the embedding table (as sampling does)."""
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    flat = logits.reshape(-1, logits.size(-1))
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="none")
    return -nll.view(targets.shape)


def attention_maps(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [layers, heads, T, T] of one sequence (idx [1, T]), for plots. The
    forward pass uses a fused kernel that never forms them, so each layer's are recomputed from
    its queries and keys (softmax(q k^T / sqrt(d)), the causal mask applied) on the way through."""
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ConfigError(f"attention_maps takes one sequence, ids of shape [1, T]; got {tuple(idx.shape)}")
    maps = []

    def record(attn, args):  # a pre-hook: args are (x, rope, attn_mask, cache) as Block passes them
        q, k, _ = attn.project(args[0], args[1] if len(args) > 1 else None)
        k = k.repeat_interleave(attn.cfg.n_head // attn.cfg.n_kv_head, dim=1)  # grouped-query: shared keys
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.cfg.head_dim)
        if attn.cfg.causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        maps.append(scores.softmax(-1)[0])

    hooks = [block.attn.register_forward_pre_hook(record) for block in model.transformer.h]
    try:
        with torch.no_grad():
            model.hidden_states(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(maps).cpu()


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else top-k and nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


# ------------------------------------------------------------------ accounting

def param_count_formula(cfg: ModelConfig) -> int:
    """Closed-form parameter count of the GPT-2 layout (LayerNorm, GELU, biases, learned positions,
    tied embeddings): V d + T d + L (12 d^2 + 13 d) + 2 d."""
    d = cfg.n_embd
    return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    with torch.device("meta"):  # no memory is allocated for the weights
        model = Transformer(cfg)
    return {"params": model.num_params(non_embedding=False), "params_non_embedding": model.num_params(),
            "flops_per_token": model.flops_per_token(seq_len)}


def list_presets(argv=None) -> None:
    from nanofm.config import ArgumentParser

    parser = ArgumentParser(description="parameters and FLOPs per token of the model presets")
    parser.add_argument("--preset", default=None, choices=list(PRESETS))
    parser.add_argument("--vocab_size", type=int, default=None, help="vocabulary (default: the preset's, else 50304)")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        parser.error(f"--vocab_size must be at least 1, got {args.vocab_size}")
    for name in [args.preset] if args.preset else PRESETS:
        cfg = ModelConfig.preset(name, vocab_size=args.vocab_size)
        info = describe(cfg)
        print(f"{name:12s} {cfg.n_layer:3d} layers x {cfg.n_embd:5d} wide, context {cfg.block_size:5d}, "
              f"vocab {cfg.vocab_size:6d}: {info['params'] / 1e6:8.1f}M params, "
              f"{info['flops_per_token'] / 1e9:6.2f} GFLOP/token")


if __name__ == "__main__":  # model sizing for a budget is python -m nanofm.sizing
    from nanofm.common import run_cli
    run_cli(list_presets)
