"""GPT-NeoX, Falcon and Cohere checkpoints <-> lmlab's Decoder with parallel blocks: config.json and tensor maps.

The three put attention and MLP side by side on one residual step (PaLM's parallel block; GPT-NeoX optionally
not) and store some tensors in layouts lmlab's Attention does not use, which `Rows` specs reorder:

- GPT-NeoX: attention.query_key_value (3 * H, H) holds per head its [q, k, v] rows: (nh, 3, hd) rows.
- Falcon:   self_attention.query_key_value holds per kv group its queries, then its key and value rows:
            (nkv, nh / nkv + 2, hd) (new_decoder_architecture). The old multi-query layout [q (nh * hd), k, v]
            is the nkv = 1 case of it, the old multi-head one (nh, 3, hd) the nkv = nh case.
- Cohere:   q_proj / k_proj feed RoPE that rotates interleaved pairs (2j, 2j + 1) of a head, where lmlab rotates
            (j, j + hd / 2). lmlab's head dim j is the stored dim 2j and j + hd / 2 is 2j + 1; the same reordering
            of q and k leaves every score q . k unchanged, so it is exact. Cohere scales the logits by
            logit_scale; its final LayerNorm has no bias, so the scale is folded into that norm's weight on load
            (and 1.0 is written on save).
"""
from __future__ import annotations

from functools import partial

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.interop.hf import _ACTS, Rows, load_decoder, required, rope_from_hf

ARCHS = {"gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM", "cohere": "CohereForCausalLM"}
_ACT_NAMES = {"silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh"}


# -------------------------------------------------------------------------------------------- configs
def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """A gpt_neox / falcon / cohere config.json (transformers v4 or v5 keys) -> ModelConfig."""
    mt = d["model_type"]

    req = partial(required, d, source)
    act = d.get("activation" if mt == "falcon" else "hidden_act", "silu" if mt == "cohere" else "gelu")
    if act not in _ACTS:
        raise CheckpointError(f"{source}: activation {act!r} is not supported; supported: {sorted(_ACTS)}")
    h, nh = req("hidden_size", "n_embed"), req("num_attention_heads", "n_head")
    kw = dict(model_type=mt, hidden_act=_ACTS[act], bos_token_id=d.get("bos_token_id"),
              eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
              initializer_range=d.get("initializer_range", 0.02), vocab_size=req("vocab_size"), hidden_size=h,
              num_hidden_layers=req("num_hidden_layers", "n_layer"), num_attention_heads=nh, head_dim=h // nh,
              max_position_embeddings=d.get("max_position_embeddings", 2048), norm="layernorm", position="rope")
    if mt == "gpt_neox":  # v4 keys rotary_pct / rotary_emb_base; both versions default to a quarter of each head
        theta, scaling, rotary = rope_from_hf({"partial_rotary_factor": d.get("rotary_pct", 0.25),
                                                "rope_theta": d.get("rotary_emb_base", 1e4)} | d)
        bias = d.get("attention_bias", True)
        kw |= dict(intermediate_size=req("intermediate_size"), norm_eps=d.get("layer_norm_eps", 1e-5), mlp="plain",
                   attention_bias=bias, attention_out_bias=bias, mlp_bias=True, partial_rotary_factor=rotary,
                   parallel_residual=d.get("use_parallel_residual", True),
                   tie_word_embeddings=d.get("tie_word_embeddings", False))
    elif mt == "falcon":
        theta, scaling, _ = rope_from_hf(d)  # Falcon rotates whole heads
        kw |= dict(_falcon_block(d, nh, source), intermediate_size=d.get("ffn_hidden_size") or 4 * h, mlp="plain",
                   norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=d.get("tie_word_embeddings", True),
                   **dict.fromkeys(("attention_bias", "attention_out_bias", "mlp_bias"), d.get("bias", False)))
    else:  # cohere
        if d.get("use_qk_norm"):
            raise CheckpointError(f"{source}: Cohere with use_qk_norm (per-head q/k LayerNorms) is not supported")
        theta, scaling, _ = rope_from_hf(d)
        bias = d.get("attention_bias", False)
        kw |= dict(intermediate_size=req("intermediate_size"), norm_eps=d.get("layer_norm_eps", 1e-5), mlp="gated",
                   norm_bias=False, parallel_residual=True, shared_norm=True, attention_bias=bias,
                   attention_out_bias=bias, num_key_value_heads=d.get("num_key_value_heads"),
                   tie_word_embeddings=d.get("tie_word_embeddings", True))
    try:
        return ModelConfig(**kw, rope_theta=theta, rope_scaling=scaling)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _falcon_block(d: dict, nh: int, source: str) -> dict:
    """Falcon's block switches -> kv heads and lmlab's parallel_residual / shared_norm."""
    if d.get("alibi"):
        raise CheckpointError(f"{source}: Falcon with alibi=True (ALiBi position biases, Falcon-RW) is not supported; "
                              f"lmlab runs Falcon's RoPE form (alibi=False)")
    n_ln = d.get("num_ln_in_parallel_attn")
    if d.get("new_decoder_architecture"):
        if not d.get("parallel_attn", True):  # transformers' layer has no norms for this combination
            raise CheckpointError(f"{source}: new_decoder_architecture with parallel_attn=False cannot run")
        return dict(num_key_value_heads=d.get("num_kv_heads") or d.get("n_head_kv") or nh, parallel_residual=True,
                    shared_norm=(n_ln or 2) == 1)
    parallel = d.get("parallel_attn", True)
    if parallel and n_ln == 2:
        raise CheckpointError(f"{source}: num_ln_in_parallel_attn=2 needs new_decoder_architecture")
    return dict(num_key_value_heads=1 if d.get("multi_query", True) else nh, parallel_residual=parallel,
                shared_norm=parallel)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers (v5; v4 reads the keys it knows) loads as the same model."""
    mt = cfg.model_type
    _check_representable(cfg)
    dt = str(dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d = {"architectures": [ARCHS[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
         "num_attention_heads": cfg.num_attention_heads, "max_position_embeddings": cfg.max_position_embeddings,
         "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
         "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
         "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rope_parameters": rope,
         "dtype": dt, "torch_dtype": dt, "use_cache": True}
    act = _ACT_NAMES[cfg.hidden_act]
    if mt == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
        return d | {"intermediate_size": cfg.intermediate_size, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
                    "use_parallel_residual": cfg.parallel_residual, "attention_bias": cfg.attention_bias,
                    "rotary_pct": cfg.partial_rotary_factor, "rotary_emb_base": cfg.rope_theta,
                    "attention_dropout": 0.0, "hidden_dropout": 0.0}
    if mt == "cohere":
        return d | {"intermediate_size": cfg.intermediate_size, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
                    "num_key_value_heads": cfg.num_key_value_heads, "attention_bias": cfg.attention_bias,
                    "logit_scale": 1.0, "use_qk_norm": False, "attention_dropout": 0.0}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    # the old architecture where it can express the block (sequential, or one norm with 1 or nh kv heads)
    new = cfg.parallel_residual and not (cfg.shared_norm and nkv in (1, nh))
    return d | {"ffn_hidden_size": cfg.intermediate_size, "activation": act, "layer_norm_epsilon": cfg.norm_eps,
                "bias": cfg.attention_bias, "alibi": False, "new_decoder_architecture": new,
                "multi_query": nkv == 1, "num_kv_heads": nkv, "parallel_attn": cfg.parallel_residual,
                "num_ln_in_parallel_attn": (1 if cfg.shared_norm else 2) if new else None,
                "attention_dropout": 0.0, "hidden_dropout": 0.0}


def _check_representable(cfg: ModelConfig):
    """Refuse to write a config.json that transformers would read as a different model."""
    mt = cfg.model_type
    want = dict(norm="layernorm", position="rope", head_dim=cfg.hidden_size // cfg.num_attention_heads,
                num_local_experts=0, sliding_window=None, attention_out_bias=cfg.attention_bias)
    if mt == "gpt_neox":
        want |= dict(mlp="plain", mlp_bias=True, norm_bias=True, shared_norm=False,
                     num_key_value_heads=cfg.num_attention_heads)
    elif mt == "falcon":
        want |= dict(mlp="plain", mlp_bias=cfg.attention_bias, norm_bias=True, partial_rotary_factor=1.0)
        if not cfg.parallel_residual:
            want["num_key_value_heads"] = 1 if cfg.num_key_value_heads == 1 else cfg.num_attention_heads
    else:
        want |= dict(mlp="gated", mlp_bias=False, norm_bias=False, parallel_residual=True, shared_norm=True,
                     partial_rotary_factor=1.0)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ConfigError(f"a {mt} checkpoint cannot express {bad}; a {mt} has {({k: want[k] for k in bad})}")


# ------------------------------------------------------------------------------------------ tensor maps
def _fused_qkv(cfg: ModelConfig, name: str) -> dict:
    """lmlab q/k/v weight and bias -> Rows of a fused (nkv * (g + 2) * hd, H) tensor, g = nh / nkv queries per
    kv head: each group stores its g query heads, then its key head, then its value head."""
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // nkv
    slots = torch.arange(nkv * (g + 2) * hd).view(nkv, g + 2, hd)  # stored row of (group, slot, dim)
    rows = {"q": slots[:, :g], "k": slots[:, g], "v": slots[:, g + 1]}
    return {f"layers.{{i}}.attn.{p}_proj.{kind}": Rows(f"{name}.{kind}", r.reshape(-1), slots.numel())
            for p, r in rows.items() for kind in ("weight", "bias")}


def _interleaved(name: str, heads: int, hd: int) -> Rows:
    """Rows of a q/k projection whose RoPE pairs are (2j, 2j + 1): lmlab's dims [0, 2, 4, ..., 1, 3, 5, ...]."""
    order = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))  # (hd,)
    return Rows(name, (torch.arange(heads)[:, None] * hd + order).reshape(-1), heads * hd)


def _linear(lmlab: str, hf: str) -> dict:
    return {f"{lmlab}.{k}": f"{hf}.{k}" for k in ("weight", "bias")}


def tensor_map(cfg: ModelConfig) -> dict:
    """lmlab parameter name template -> HF name spec for this config (the layouts depend on the heads)."""
    mt = cfg.model_type
    if mt == "gpt_neox":
        L = "gpt_neox.layers.{i}"
        return {"embed.weight": "gpt_neox.embed_in.weight", "lm_head.weight": "embed_out.weight",
                **_linear("norm", "gpt_neox.final_layer_norm"), **_linear("layers.{i}.attn_norm", f"{L}.input_layernorm"),
                **_linear("layers.{i}.mlp_norm", f"{L}.post_attention_layernorm"),
                **_fused_qkv(cfg, f"{L}.attention.query_key_value"),
                **_linear("layers.{i}.attn.o_proj", f"{L}.attention.dense"),
                **_linear("layers.{i}.mlp.up_proj", f"{L}.mlp.dense_h_to_4h"),
                **_linear("layers.{i}.mlp.down_proj", f"{L}.mlp.dense_4h_to_h")}
    if mt == "falcon":
        L = "transformer.h.{i}"
        two = cfg.parallel_residual and not cfg.shared_norm  # new_decoder_architecture's ln_attn and ln_mlp
        return {"embed.weight": "transformer.word_embeddings.weight", "lm_head.weight": "lm_head.weight",
                **_linear("norm", "transformer.ln_f"),
                **_linear("layers.{i}.attn_norm", f"{L}.ln_attn" if two else f"{L}.input_layernorm"),
                **_linear("layers.{i}.mlp_norm", f"{L}.ln_mlp" if two else f"{L}.post_attention_layernorm"),
                **_fused_qkv(cfg, f"{L}.self_attention.query_key_value"),
                **_linear("layers.{i}.attn.o_proj", f"{L}.self_attention.dense"),
                **_linear("layers.{i}.mlp.up_proj", f"{L}.mlp.dense_h_to_4h"),
                **_linear("layers.{i}.mlp.down_proj", f"{L}.mlp.dense_4h_to_h")}
    L, hd = "model.layers.{i}", cfg.head_dim
    m = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
         "norm.weight": "model.norm.weight", "layers.{i}.attn_norm.weight": f"{L}.input_layernorm.weight",
         **_linear("layers.{i}.attn.v_proj", f"{L}.self_attn.v_proj"),
         **_linear("layers.{i}.attn.o_proj", f"{L}.self_attn.o_proj"),
         **{f"layers.{{i}}.mlp.{p}.weight": f"{L}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}}
    for p, heads in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads)):
        for kind in ("weight", "bias"):
            m[f"layers.{{i}}.attn.{p}_proj.{kind}"] = _interleaved(f"{L}.self_attn.{p}_proj.{kind}", heads, hd)
    return m


# ------------------------------------------------------------------------------------------------- load
def load_model(path, raw: dict, cfg: ModelConfig, device="cpu", dtype=None):
    """hf.load_model's loader for these types: a Decoder, with Cohere's logit_scale folded into the final norm."""
    from lmlab.models.decoder import Decoder

    model = load_decoder(path, raw, cfg, device)
    scale = raw.get("logit_scale", 1.0) if cfg.model_type == "cohere" else 1.0
    if scale != 1.0 and isinstance(model, Decoder):  # logits * s = lm_head(s * norm(x)): a reward head has no scale
        with torch.no_grad():
            model.norm.weight.mul_(scale)
    return model.to(dtype) if dtype is not None else model
