"""T5 (v1.0 and v1.1) Hugging Face directories: config.json <-> ModelConfig and the tensor-name map.

transformers (v4 and v5) read the MLP from `feed_forward_proj` ("relu", "gated-gelu", "gated-silu", ...; "gated-gelu"
means the tanh GELU), but a `dense_act_fn` / `is_gated_act` written beside it wins. The tied LM head is applied to
the decoder output scaled by d_model**-0.5. transformers v5 always ties the head to the embeddings unless the file
holds a different `lm_head.weight`, and records the scaling as `scale_decoder_outputs`: a v1.1 model saved by v5
can be tied without the scaling, which lmlab loads as an untied head holding a copy of the embeddings.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.interop.hf import _ACTS, WeightFiles, load_weights, required

_T5_ACTS = _ACTS | {"gelu_python": "gelu"}
# lmlab activation -> T5 feed_forward_proj, for plain and gated MLPs ("gated-gelu" is tanh GELU in transformers)
_PROJ = {"plain": {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"},
         "gated": {"relu": "gated-relu", "gelu": "gated-gelu_python", "gelu_tanh": "gated-gelu", "silu": "gated-silu"}}
# tensors some checkpoints carry that transformers ignores too (copies of shared.weight; an unused bias table)
_UNUSED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# (lmlab sublayer, HF layer index, HF module) for the blocks of each stack
_SUBLAYERS = {"encoder": [("attn", 0, "SelfAttention"), ("mlp", 1, "DenseReluDense")],
              "decoder": [("attn", 0, "SelfAttention"), ("cross", 1, "EncDecAttention"), ("mlp", 2, "DenseReluDense")]}
_MLP = {"gated": {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"},
        "plain": {"up_proj": "wi", "down_proj": "wo"}}
_ATTN = {p: p for p in "qkvo"}


def tensor_map(cfg: ModelConfig) -> dict:
    """lmlab parameter name ({i} = layer) -> HF tensor name, e.g.
    encoder.layers.{i}.attn.q.weight -> encoder.block.{i}.layer.0.SelfAttention.q.weight
    decoder.layers.{i}.cross_norm.weight -> decoder.block.{i}.layer.1.layer_norm.weight
    decoder.layers.{i}.mlp.gate_proj.weight -> decoder.block.{i}.layer.2.DenseReluDense.wi_0.weight"""
    m = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack, sublayers in _SUBLAYERS.items():
        ours, theirs = f"{stack}.layers.{{i}}", f"{stack}.block.{{i}}.layer"
        for name, n, module in sublayers:
            m[f"{ours}.{name}_norm.weight"] = f"{theirs}.{n}.layer_norm.weight"
            for p, hf in (_MLP[cfg.mlp] if name == "mlp" else _ATTN).items():
                m[f"{ours}.{name}.{p}.weight"] = f"{theirs}.{n}.{module}.{hf}.weight"
        # the relative position bias lives in the first block and serves the whole stack
        m[f"{stack}.rel_bias.weight"] = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        m[f"{stack}.norm.weight"] = f"{stack}.final_layer_norm.weight"
    return m


def _head_is_scaled(d: dict) -> tuple[bool, bool]:
    """(tie_word_embeddings, scale_decoder_outputs) as transformers reads them (both default to True)."""
    tie = d.get("tie_word_embeddings") is not False
    return tie, d.get("scale_decoder_outputs", tie)


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    req = partial(required, d, source)
    proj = d.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    act, gated = d.get("dense_act_fn", act), d.get("is_gated_act", parts[0] == "gated")
    if act not in _T5_ACTS:
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} (activation {act!r}) is not supported; "
                              f"supported activations: {sorted(_T5_ACTS)}")
    tie, scaled = _head_is_scaled(d)
    if scaled and not tie:
        raise CheckpointError(f"{source}: scale_decoder_outputs=true with tie_word_embeddings=false is not supported")
    if d.get("is_encoder_decoder") is False or d.get("is_decoder"):
        raise CheckpointError(f"{source}: only the full encoder-decoder T5 is supported (is_encoder_decoder="
                              f"{d.get('is_encoder_decoder')}, is_decoder={d.get('is_decoder')})")
    pad = d.get("pad_token_id", 0)
    try:
        return ModelConfig(
            model_type="t5", vocab_size=req("vocab_size"), hidden_size=req("d_model"), intermediate_size=req("d_ff"),
            num_hidden_layers=req("num_layers"), num_decoder_layers=d.get("num_decoder_layers") or req("num_layers"),
            num_attention_heads=req("num_heads"), head_dim=req("d_kv"),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            max_position_embeddings=d.get("n_positions") or 512,  # unused: relative positions have no limit
            norm="rmsnorm", norm_eps=d.get("layer_norm_epsilon", 1e-6), mlp="gated" if gated else "plain",
            hidden_act=_T5_ACTS[act], position="relative", tie_word_embeddings=scaled,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id", 1), pad_token_id=pad,
            # T5 starts decoding from the pad token
            decoder_start_token_id=d.get("decoder_start_token_id", pad))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers v4 and v5 load as T5ForConditionalGeneration with the same outputs."""
    from lmlab.models.encoder_decoder import check_config
    check_config(cfg)
    dt = str(dtype).removeprefix("torch.")
    d = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
         "d_model": cfg.hidden_size, "d_kv": cfg.head_dim, "d_ff": cfg.intermediate_size,
         "num_layers": cfg.num_hidden_layers, "num_decoder_layers": cfg.num_decoder_layers or cfg.num_hidden_layers,
         "num_heads": cfg.num_attention_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
         "relative_attention_max_distance": cfg.relative_attention_max_distance,
         "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_eps,
         "feed_forward_proj": _PROJ[cfg.mlp][cfg.hidden_act], "initializer_factor": 1.0, "dropout_rate": 0.0,
         "is_encoder_decoder": True, "tie_word_embeddings": cfg.tie_word_embeddings,
         "scale_decoder_outputs": cfg.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
         "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
         "dtype": dt, "torch_dtype": dt, "use_cache": True}
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    return d


def load_model(path, raw: dict, cfg: ModelConfig, device="cpu", dtype=None):
    """A T5ForConditionalGeneration directory -> lmlab T5 (float32 unless `dtype` is given)."""
    from lmlab.models.encoder_decoder import T5

    path = Path(path)
    with torch.device("meta"):
        model = T5(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    mapping = tensor_map(cfg)
    tie, scaled = _head_is_scaled(raw)
    if tie and not scaled and "lm_head.weight" not in WeightFiles(path).names():
        mapping["lm_head.weight"] = "shared.weight"  # tied without scaling (v5): an untied copy does the same
    load_weights(model, path, expected_unused=_UNUSED, mapping=mapping)
    model.eval()
    return model.to(dtype) if dtype is not None else model
