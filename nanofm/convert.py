"""Hugging Face interop: nanofm checkpoints <-> `transformers` models.

    python -m nanofm.convert --export out/pretrain --out hf/mymodel      # GPT2LMHeadModel or LlamaForCausalLM
    python -m nanofm.convert --import hf/mymodel --out out/imported      # back to a nanofm checkpoint

Which architecture holds which layout:
- GPT-2 layout (LayerNorm, learned positions, GELU, biases, tied embeddings, full attention
  heads) <-> GPT2LMHeadModel. GPT-2 stores its linear layers as Conv1D, i.e. transposed.
- Llama layout (RMSNorm, RoPE, SwiGLU, no biases; grouped-query attention allowed) <->
  LlamaForCausalLM. Our fused q|k|v and gate|value matrices are split into HF's separate ones;
  both use the same RoPE convention (rotate the two halves of each head).
- Anything else (BERT-style models: our blocks are pre-norm, BERT's post-norm) is refused with a
  clear error rather than converted into a model that computes something else.

transformers is optional at run time (pip install transformers); the tests check that the
converted models give the same logits as ours (fp32, 1e-4) on randomly initialised weights.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from nanofm.checkpoint import load_model, save_checkpoint
from nanofm.model import ModelConfig, Transformer


class ConversionError(ValueError):
    pass


_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")  # GPT-2's causal-mask buffers, not weights


def _require_transformers():
    try:
        import transformers
        return transformers
    except ImportError:
        raise ConversionError("converting needs the optional package transformers: pip install transformers") from None


def architecture(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama', or a ConversionError naming what does not fit either."""
    if not cfg.causal:
        raise ConversionError("bidirectional (BERT-style) models cannot be exported: nanofm's blocks are pre-norm and "
                              "BertForMaskedLM is post-norm, so the weights would compute something else")
    gpt2 = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True)
    llama = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()):
        return "llama"
    raise ConversionError(f"this layout (norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, bias={cfg.bias}, "
                          f"tied={cfg.tie_embeddings}, kv heads {cfg.n_kv_head}/{cfg.n_head}) is neither GPT-2's "
                          f"(layernorm, learned, gelu, biases, tied, full heads) nor Llama's (rmsnorm, rope, swiglu, no biases)")


def to_hf(model: Transformer):
    """A transformers model with our weights."""
    transformers = _require_transformers()
    cfg, ours = model.cfg, model.state_dict()
    kind = architecture(cfg)
    if kind == "gpt2":
        hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                                         activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        state = {}
        for name, value in ours.items():
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            state[name] = value.t().contiguous() if conv1d else value
    else:
        hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                          intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                                          num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                          max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                                          rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                                          attention_bias=False, mlp_bias=False, hidden_act="silu")
        hf = transformers.LlamaForCausalLM(hf_cfg)
        kv = cfg.n_kv_head * cfg.head_dim
        state = {"model.embed_tokens.weight": ours["transformer.wte.weight"], "model.norm.weight": ours["transformer.ln_f.weight"],
                 "lm_head.weight": ours["lm_head.weight"]}
        for i in range(cfg.n_layer):
            p, h = f"transformer.h.{i}.", f"model.layers.{i}."
            q, k, v = ours[p + "attn.c_attn.weight"].split([cfg.n_embd, kv, kv])
            gate, up = ours[p + "mlp.c_fc.weight"].chunk(2)
            state.update({h + "input_layernorm.weight": ours[p + "ln_1.weight"],
                          h + "post_attention_layernorm.weight": ours[p + "ln_2.weight"],
                          h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                          h + "self_attn.o_proj.weight": ours[p + "attn.c_proj.weight"],
                          h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                          h + "mlp.down_proj.weight": ours[p + "mlp.c_proj.weight"]})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (_MASK_BUFFER.search(m) or m == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"weights did not map onto {type(hf).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hf_cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def from_hf(hf) -> Transformer:
    """Our model with the weights of a GPT2LMHeadModel or LlamaForCausalLM."""
    c, theirs = hf.config, hf.state_dict()
    if c.model_type == "gpt2":
        cfg = ModelConfig(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                          block_size=c.n_positions, mlp_hidden=c.n_inner or 4 * c.n_embd, norm_eps=c.layer_norm_epsilon)
        state = {}
        for name, value in theirs.items():
            if _MASK_BUFFER.search(name):
                continue
            conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            state[name] = value.t().contiguous() if conv1d else value
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif c.model_type == "llama":
        rope = getattr(c, "rope_parameters", None) or {}
        cfg = ModelConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                          n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size, block_size=c.max_position_embeddings,
                          norm="rmsnorm", pos="rope", mlp="swiglu", mlp_hidden=c.intermediate_size, bias=False,
                          tie_embeddings=bool(c.tie_word_embeddings), norm_eps=c.rms_norm_eps,
                          rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
        state = {"transformer.wte.weight": theirs["model.embed_tokens.weight"], "transformer.ln_f.weight": theirs["model.norm.weight"],
                 "lm_head.weight": theirs.get("lm_head.weight", theirs["model.embed_tokens.weight"])}
        for i in range(cfg.n_layer):
            p, h = f"transformer.h.{i}.", f"model.layers.{i}."
            state.update({p + "ln_1.weight": theirs[h + "input_layernorm.weight"],
                          p + "ln_2.weight": theirs[h + "post_attention_layernorm.weight"],
                          p + "attn.c_attn.weight": torch.cat([theirs[h + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                          p + "attn.c_proj.weight": theirs[h + "self_attn.o_proj.weight"],
                          p + "mlp.c_fc.weight": torch.cat([theirs[h + "mlp.gate_proj.weight"], theirs[h + "mlp.up_proj.weight"]]),
                          p + "mlp.c_proj.weight": theirs[h + "mlp.down_proj.weight"]})
    else:
        raise ConversionError(f"cannot import a {c.model_type!r} model: nanofm reads gpt2 and llama")
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="convert between nanofm checkpoints and Hugging Face models")
    parser.add_argument("--export", dest="export_from", metavar="CKPT", help="a nanofm checkpoint or run directory")
    parser.add_argument("--import", dest="import_from", metavar="HF_DIR", help="a saved GPT2LMHeadModel/LlamaForCausalLM")
    parser.add_argument("--out", required=True, help="where to write (must not exist yet)")
    args = parser.parse_args(argv)
    if bool(args.export_from) == bool(args.import_from):
        parser.error("give exactly one of --export CKPT or --import HF_DIR")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} already exists; choose a new directory (nothing is overwritten)")
    try:
        if args.export_from:
            model, _ = load_model(args.export_from)
            hf = to_hf(model)  # fails before anything is written
            hf.save_pretrained(out)
            print(f"wrote {type(hf).__name__} to {out}")
        else:
            transformers = _require_transformers()
            hf = transformers.AutoModelForCausalLM.from_pretrained(args.import_from)
            model = from_hf(hf)
            save_checkpoint(out, 0, model, {"model": model.cfg.to_dict(), "stage": "imported", "parent": args.import_from})
            print(f"wrote a nanofm checkpoint to {out}")
    except (ConversionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
