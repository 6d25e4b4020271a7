"""Hugging Face interop: nanofm checkpoints <-> `transformers` models.

    python -m nanofm.convert --export out/pretrain --out hf/mymodel   # model + tokenizer, from_pretrained-ready
    python -m nanofm.convert --import hf/mymodel --out out/imported   # back to a nanofm checkpoint

Which architecture holds which layout:
- GPT-2 layout (pre-norm LayerNorm, learned positions, tanh GELU, biases, tied embeddings, full
  attention heads) <-> GPT2LMHeadModel. GPT-2 stores its linear layers as Conv1D, i.e. transposed.
- Llama layout (RMSNorm, RoPE, SwiGLU, no biases; grouped-query attention allowed) <->
  LlamaForCausalLM. Our fused q|k|v and gate|value matrices are split into HF's separate ones;
  both use the same RoPE convention (rotate the two halves of each head).
- BERT layout (bidirectional, post-norm LayerNorm with a norm after the embeddings, learned
  positions, exact GELU, biases, an MLM head with a bias) <-> BertForMaskedLM. BERT's token-type
  embeddings have no counterpart: exported as zeros; imported, row 0 (what BERT adds when no
  types are given) is folded into the position embeddings, so logits stay the same.
- Anything else is refused with a clear error rather than converted into a model that computes
  something else; nothing is written.

The tokenizer goes along: exported as a Hugging Face tokenizer.json (the same regex, byte
alphabet and merges; identical ids, tested) with `AutoTokenizer` config files; imported back into
the checkpoint's tokenizer.json when the HF directory has a byte-level BPE tokenizer.

transformers is optional at run time (pip install transformers); the tests check that the
converted models give the same logits as ours (fp32, 1e-4) on randomly initialised weights.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from nanofm.common import NanofmError, run_cli
from nanofm.config import ArgumentParser
from nanofm.checkpoint import load_model, make_meta, resolve, save_checkpoint
from nanofm.model import ModelConfig, Transformer, padded_vocab
from nanofm.tokenizer import Tokenizer, TokenizerError


class ConversionError(NanofmError, ValueError):
    pass


_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")  # GPT-2's causal-mask buffers, not weights


def _require_transformers():
    try:
        import transformers
        return transformers
    except ImportError:
        raise ConversionError("converting needs the optional package transformers: pip install transformers") from None


LAYOUTS = {  # the settings each architecture can hold (anything not named here may vary)
    "gpt2": dict(causal=True, norm="layernorm", norm_position="pre", pos="learned", mlp="gelu", bias=True,
                 tie_embeddings=True, head_bias=False),
    "llama": dict(causal=True, norm="rmsnorm", norm_position="pre", pos="rope", mlp="swiglu", bias=False, head_bias=False),
    "bert": dict(causal=False, norm="layernorm", norm_position="post", pos="learned", mlp="gelu_exact", bias=True,
                 head_bias=True),
}


def architecture(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'bert', or a ConversionError naming how the layout differs from each."""
    for kind, layout in LAYOUTS.items():
        if all(getattr(cfg, k) == v for k, v in layout.items()) and (kind == "llama" or cfg.n_kv_head == cfg.n_head):
            return kind
    differences = []
    for kind, layout in LAYOUTS.items():
        off = [f"{k}={getattr(cfg, k)} (needs {v})" for k, v in layout.items() if getattr(cfg, k) != v]
        if kind != "llama" and cfg.n_kv_head != cfg.n_head:
            off.append(f"n_kv_head={cfg.n_kv_head} (needs {cfg.n_head})")
        differences.append(f"{kind}: " + ", ".join(off))
    raise ConversionError("this layout fits no transformers architecture; " + "; ".join(differences))


_BERT_NAMES = {"transformer.wte.weight": "embeddings.word_embeddings.weight",
               "transformer.wpe.weight": "embeddings.position_embeddings.weight",
               "transformer.ln_emb.weight": "embeddings.LayerNorm.weight", "transformer.ln_emb.bias": "embeddings.LayerNorm.bias"}
_BERT_LAYER_NAMES = {"attn.c_proj.weight": "attention.output.dense.weight", "attn.c_proj.bias": "attention.output.dense.bias",
                     "ln_1.weight": "attention.output.LayerNorm.weight", "ln_1.bias": "attention.output.LayerNorm.bias",
                     "mlp.c_fc.weight": "intermediate.dense.weight", "mlp.c_fc.bias": "intermediate.dense.bias",
                     "mlp.c_proj.weight": "output.dense.weight", "mlp.c_proj.bias": "output.dense.bias",
                     "ln_2.weight": "output.LayerNorm.weight", "ln_2.bias": "output.LayerNorm.bias"}


def to_hf(model: Transformer):
    """A transformers model with our weights."""
    transformers = _require_transformers()
    if model.cfg.value_head:  # a PPO checkpoint: the policy is exported, its critic is not
        model = model.with_value_head(False)
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
    elif kind == "bert":
        hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                                         num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_hidden,
                                         hidden_act="gelu", max_position_embeddings=cfg.block_size,
                                         layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, tie_word_embeddings=cfg.tie_embeddings)
        hf = transformers.BertForMaskedLM(hf_cfg)
        state = {f"bert.{theirs}": ours[mine] for mine, theirs in _BERT_NAMES.items()}
        state["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(hf_cfg.type_vocab_size, cfg.n_embd)
        state.update({"cls.predictions.transform.dense.weight": ours["mlm_transform.0.weight"],
                      "cls.predictions.transform.dense.bias": ours["mlm_transform.0.bias"],
                      "cls.predictions.transform.LayerNorm.weight": ours["mlm_transform.2.weight"],
                      "cls.predictions.transform.LayerNorm.bias": ours["mlm_transform.2.bias"],
                      "cls.predictions.decoder.weight": ours["lm_head.weight"],
                      "cls.predictions.decoder.bias": ours["lm_head.bias"], "cls.predictions.bias": ours["lm_head.bias"]})
        for i in range(cfg.n_layer):
            p, h = f"transformer.h.{i}.", f"bert.encoder.layer.{i}."
            for x, w in zip(("query", "key", "value"), ours[p + "attn.c_attn.weight"].chunk(3)):
                state[h + f"attention.self.{x}.weight"] = w
            for x, b in zip(("query", "key", "value"), ours[p + "attn.c_attn.bias"].chunk(3)):
                state[h + f"attention.self.{x}.bias"] = b
            state.update({h + theirs: ours[p + mine] for mine, theirs in _BERT_LAYER_NAMES.items()})
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
    missing = [m for m in missing if not (_MASK_BUFFER.search(m) or m in ("lm_head.weight", "cls.predictions.decoder.weight"))]
    if missing or unexpected:
        raise ConversionError(f"weights did not map onto {type(hf).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hf_cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def from_hf(hf) -> Transformer:
    """Our model with the weights of a GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM."""
    c, theirs = hf.config, hf.state_dict()
    problems = unsupported_settings(c)
    if problems:
        raise ConversionError(f"this {c.model_type} model uses settings nanofm cannot express: {'; '.join(problems)}")
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
    elif c.model_type == "bert":
        cfg = ModelConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                          n_embd=c.hidden_size, block_size=c.max_position_embeddings, mlp_hidden=c.intermediate_size,
                          norm_eps=c.layer_norm_eps, tie_embeddings=bool(c.tie_word_embeddings),
                          **{k: v for k, v in LAYOUTS["bert"].items()})
        state = {mine: theirs[f"bert.{name}"] for mine, name in _BERT_NAMES.items()}
        # no token types in nanofm: BERT adds type 0 everywhere when none are given, so fold it in
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"] + theirs["bert.embeddings.token_type_embeddings.weight"][0]
        state.update({"mlm_transform.0.weight": theirs["cls.predictions.transform.dense.weight"],
                      "mlm_transform.0.bias": theirs["cls.predictions.transform.dense.bias"],
                      "mlm_transform.2.weight": theirs["cls.predictions.transform.LayerNorm.weight"],
                      "mlm_transform.2.bias": theirs["cls.predictions.transform.LayerNorm.bias"],
                      "lm_head.weight": theirs.get("cls.predictions.decoder.weight", theirs["bert.embeddings.word_embeddings.weight"]),
                      "lm_head.bias": theirs["cls.predictions.bias"]})
        for i in range(cfg.n_layer):
            p, h = f"transformer.h.{i}.", f"bert.encoder.layer.{i}."
            state[p + "attn.c_attn.weight"] = torch.cat([theirs[h + f"attention.self.{x}.weight"] for x in ("query", "key", "value")])
            state[p + "attn.c_attn.bias"] = torch.cat([theirs[h + f"attention.self.{x}.bias"] for x in ("query", "key", "value")])
            state.update({p + mine: theirs[h + name] for mine, name in _BERT_LAYER_NAMES.items()})
    else:
        raise ConversionError(f"cannot import a {c.model_type!r} model: nanofm reads gpt2, llama and bert")
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval()


def unsupported_settings(c) -> list[str]:
    """The settings of a Hugging Face config that nanofm's Transformer cannot express (importing
    such a model would silently compute other logits)."""
    problems = []
    if c.model_type == "gpt2":
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function={c.activation_function!r} (nanofm's GPT-2 uses tanh-approximated GELU)")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(c, flag, False):
                problems.append(f"{flag}=True")
        if not getattr(c, "scale_attn_weights", True):
            problems.append("scale_attn_weights=False")
    elif c.model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(c, flag, False):
                problems.append(f"{flag}=True (nanofm's Llama layout has no biases)")
        # newer transformers fold rope_scaling into rope_parameters; either way only the plain type is ours
        for rope in (getattr(c, "rope_parameters", None), getattr(c, "rope_scaling", None)):
            kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
            if kind != "default":
                problems.append(f"rope scaling of type {kind!r} (nanofm's RoPE is unscaled)")
                break
        if c.hidden_act != "silu":
            problems.append(f"hidden_act={c.hidden_act!r} (nanofm's SwiGLU uses silu)")
        head_dim = getattr(c, "head_dim", None)
        if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
            problems.append(f"head_dim={head_dim} with {c.num_attention_heads} heads of a {c.hidden_size}-wide model")
    elif c.model_type == "bert":
        if c.hidden_act != "gelu":
            problems.append(f"hidden_act={c.hidden_act!r} (nanofm's BERT layout uses exact GELU)")
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type={c.position_embedding_type!r} (nanofm's BERT has absolute positions)")
        if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
            problems.append("a BERT decoder / cross-attention")
    return problems


def load_hf(path: str | Path):
    """A saved GPT-2 / Llama (causal LM) or BERT (masked LM) model directory. The architecture and
    every setting are checked from config.json before any weight is read."""
    transformers = _require_transformers()
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} has no config.json: expected a directory written by transformers' save_pretrained")
    try:
        kind = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConversionError(f"{config_file} is not a JSON object ({exc})") from None
    if kind not in LAYOUTS:
        raise ConversionError(f"{config_file}: cannot import a {kind!r} model: nanofm reads {', '.join(LAYOUTS)}")
    config = transformers.AutoConfig.from_pretrained(path)
    problems = unsupported_settings(config)
    if problems:
        raise ConversionError(f"{config_file}: this {kind} model uses settings nanofm's Transformer cannot express, so its "
                              f"logits would differ: {'; '.join(problems)}")
    auto = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
    try:
        return auto.from_pretrained(path)
    except OSError as exc:
        raise ConversionError(f"{path}: the weights could not be read ({str(exc).splitlines()[0]})") from None


def to_hf_tokenizer(tokenizer: Tokenizer):
    """A transformers PreTrainedTokenizerFast that gives the same ids as ours."""
    _require_transformers()
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    roles = {}
    for role, token in (("bos_token", "<|bos|>"), ("eos_token", "<|eos|>"), ("pad_token", "<|pad|>"),
                        ("mask_token", "<|mask|>"), ("cls_token", "<|cls|>"), ("sep_token", "<|sep|>")):
        try:
            roles[role] = tokenizer.id_to_bytes(tokenizer.special_id(token)).decode()
        except KeyError:
            pass  # this tokenizer has no such token
    backend = tokenizers.Tokenizer.from_str(json.dumps(tokenizer.to_hf_json()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def export(checkpoint: str | Path, out: Path) -> str:
    """Write the checkpoint's model and tokenizer to `out` as a transformers directory, all or nothing."""
    model, _ = load_model(checkpoint)
    hf = to_hf(model)  # fails before anything is written
    ckpt = resolve(checkpoint)
    tokenizer = Tokenizer.load(ckpt) if (ckpt / "tokenizer.json").exists() else None
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            to_hf_tokenizer(tokenizer).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return f"wrote {type(hf).__name__}{' and its tokenizer' if tokenizer else ' (the checkpoint has no tokenizer)'} to {out}"


def import_(hf_dir: str | Path, out: Path) -> str:
    """Write a nanofm checkpoint (and tokenizer.json, when the HF tokenizer is a byte-level BPE) to `out`."""
    model = from_hf(load_hf(hf_dir))
    tokenizer, note = None, ""
    if (Path(hf_dir) / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.load(hf_dir)
        except TokenizerError as exc:
            note = f"; its tokenizer was not imported ({exc})"
    if tokenizer is not None and model.cfg.vocab_size < tokenizer.vocab_size:
        model = model.resized_vocab(padded_vocab(tokenizer.vocab_size))  # room for our special tokens
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_file = None
        if tokenizer is not None:
            tokenizer_file = Path(scratch) / "tokenizer.json"
            tokenizer.save(tokenizer_file)
        meta = make_meta(stage="imported", model=model.cfg, config={"import": str(hf_dir)}, parent=str(hf_dir),
                         tokenizer=tokenizer.name if tokenizer else None)
        save_checkpoint(out, 0, model, meta, tokenizer_path=tokenizer_file)
    return f"wrote a nanofm checkpoint to {out}{' with its tokenizer' if tokenizer else ''}{note}"


def main(argv=None) -> int:
    parser = ArgumentParser(description="convert between nanofm checkpoints and Hugging Face models")
    parser.add_argument("--export", dest="export_from", metavar="CKPT", help="a nanofm checkpoint or run directory")
    parser.add_argument("--import", dest="import_from", metavar="HF_DIR",
                        help="a saved GPT2LMHeadModel / LlamaForCausalLM / BertForMaskedLM directory")
    parser.add_argument("--out", required=True, help="where to write (must not exist yet)")
    args = parser.parse_args(argv)
    if bool(args.export_from) == bool(args.import_from):
        parser.error("give exactly one of --export CKPT or --import HF_DIR")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} already exists; choose a new directory (nothing is overwritten)")
    print(export(args.export_from, out) if args.export_from else import_(args.import_from, out))
    return 0


if __name__ == "__main__":
    run_cli(main)
