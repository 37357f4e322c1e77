"""GGUF tensors and metadata for the encoder families: BERT (llama.cpp's "bert") and T5 ("t5").

llama.cpp runs BERT as a sentence-embedding model: token + position + token-type embeddings, post-norm
blocks, then pooling (mean for sentence-transformers models, or [CLS]). The MLM head and the pooler's dense
layer have no place in it and are left out. T5 runs as an encoder (llama_encode) plus a decoder with
cross-attention; both stacks read the relative position bias of their first block. A tied T5 (v1.0) scales
the decoder output by d_model^-0.5 before the shared embedding, which llama.cpp does not do: the scale is
folded into an explicit `output.weight` instead.
"""
from __future__ import annotations

import json

import torch

from lmlab.interop.gguf import GGUFError, shape_metadata

BERT = {
    "embed.weight": "token_embd.weight",
    "pos_embed.weight": "position_embd.weight",
    "type_embed.weight": "token_types.weight",
    "embed_norm.weight": "token_embd_norm.weight",
    "embed_norm.bias": "token_embd_norm.bias",
    **{f"layers.{{i}}.attn.{p}_proj.{k}": f"blk.{{i}}.attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
    **{f"layers.{{i}}.attn.o_proj.{k}": f"blk.{{i}}.attn_output.{k}" for k in ("weight", "bias")},
    **{f"layers.{{i}}.attn_norm.{k}": f"blk.{{i}}.attn_output_norm.{k}" for k in ("weight", "bias")},
    **{f"layers.{{i}}.mlp.{p}_proj.{k}": f"blk.{{i}}.ffn_{p}.{k}" for p in ("up", "down") for k in ("weight", "bias")},
    **{f"layers.{{i}}.mlp_norm.{k}": f"blk.{{i}}.layer_output_norm.{k}" for k in ("weight", "bias")},
}
LEFT_OUT = ("mlm.", "pooler.")  # heads llama.cpp's embedding model does not have
_T5_BLOCK = {"attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
             **{f"attn.{x}.weight": f"attn_{x}.weight" for x in "qkvo"},
             **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
T5 = {"embed.weight": "token_embd.weight", "lm_head.weight": "output.weight",
      "encoder.norm.weight": "enc.output_norm.weight", "decoder.norm.weight": "dec.output_norm.weight",
      "encoder.rel_bias.weight": "enc.blk.0.attn_rel_b.weight", "decoder.rel_bias.weight": "dec.blk.0.attn_rel_b.weight",
      **{f"encoder.layers.{{i}}.{k}": f"enc.blk.{{i}}.{v}" for k, v in _T5_BLOCK.items()},
      **{f"decoder.layers.{{i}}.{k}": f"dec.blk.{{i}}.{v}" for k, v in _T5_BLOCK.items()},
      "decoder.layers.{i}.cross_norm.weight": "dec.blk.{i}.cross_attn_norm.weight",
      **{f"decoder.layers.{{i}}.cross.{x}.weight": f"dec.blk.{{i}}.cross_attn_{x}.weight" for x in "qkvo"}}
T5_MAX_DISTANCE = 128  # llama.cpp's T5 buckets relative positions with this maximum distance, fixed


def _t5_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    if cfg.relative_attention_max_distance != T5_MAX_DISTANCE:
        raise GGUFError(f"relative_attention_max_distance={cfg.relative_attention_max_distance}: llama.cpp's T5 "
                        f"uses {T5_MAX_DISTANCE}")
    gated = cfg.mlp == "gated"
    if cfg.hidden_act != ("gelu_tanh" if gated else "relu"):
        raise GGUFError(f"a T5 with {'gated' if gated else 'plain'} {cfg.hidden_act} MLP: llama.cpp's T5 runs "
                        "ReLU (v1.0) or gated tanh-GELU (v1.1)")
    out = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.split(".")
        key = ".".join([*parts[:2], "{i}", *parts[3:]]) if len(parts) > 2 and parts[1] == "layers" else name
        if key not in T5:
            raise GGUFError(f"no GGUF name for tensor {name!r} of a T5 model")
        out[T5[key].format(i=parts[2] if "{i}" in key else "")] = p.detach().float()
    if cfg.tie_word_embeddings:  # fold T5's d_model^-0.5 output scale into an explicit output matrix
        out["output.weight"] = out["token_embd.weight"] * cfg.hidden_size ** -0.5
    return out


def tensors(model, arch: str) -> dict[str, torch.Tensor]:
    cfg = model.config
    if arch == "t5":
        return _t5_tensors(model)
    if cfg.model_type != "bert":
        raise GGUFError(f"GGUF export of {cfg.model_type!r} encoders is not supported (BERT and T5 are)")
    if type(model).__name__ != "Encoder":
        raise GGUFError(f"a {type(model).__name__} (task head) has no llama.cpp equivalent; export the base encoder")
    if cfg.hidden_act not in ("gelu", "gelu_tanh"):
        raise GGUFError(f"hidden_act={cfg.hidden_act}: llama.cpp's BERT uses GELU")
    out = {}
    for name, p in model.named_parameters():
        if name.startswith(LEFT_OUT):
            continue
        parts = name.split(".")
        key = ".".join(["layers", "{i}", *parts[2:]]) if parts[0] == "layers" else name
        if key not in BERT:
            raise GGUFError(f"no GGUF name for tensor {name!r} of a BERT model")
        out[BERT[key].format(i=parts[1] if parts[0] == "layers" else "")] = p.detach().float()
    return out


def pooling(model_dir) -> int:
    """llama.cpp pooling type: 1 mean (sentence-transformers' usual, and lmlab.embed's), 2 [CLS]."""
    cfg_path = next(iter(sorted(model_dir.glob("*_Pooling/config.json"))), None)
    if cfg_path is None:
        return 1
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return 2
    if not cfg.get("pooling_mode_mean_tokens", True):
        raise GGUFError(f"{cfg_path}: only mean or [CLS] pooling has a llama.cpp equivalent")
    return 1


def metadata(w, cfg, arch: str, model_dir) -> None:
    import gguf
    shape_metadata(w, cfg)
    if arch == "t5":
        if cfg.num_decoder_layers not in (None, cfg.num_hidden_layers):
            w.add_decoder_block_count(cfg.num_decoder_layers)
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
        return
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling(model_dir)))
    w.add_token_type_count(max(cfg.type_vocab_size, 1))
