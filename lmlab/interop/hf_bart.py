"""BART Hugging Face directories (BartForConditionalGeneration): config.json <-> ModelConfig, the tensor-name map,
load and save.

transformers 5 writes only `model.shared.weight` for the embeddings of a tied BART (the stacks' embed_tokens and
the head are the same tensor); older files also carry the copies, which are skipped. An untied BART (separate
lm_head) shares one embedding between the stacks in transformers 4, while transformers 5 unties the stacks'
embed_tokens from `shared` too: lmlab writes them as copies of its one embedding, so both read the same model,
and refuses a file whose stacks have embeddings of their own. `final_logits_bias` (1, V) is
a buffer: read when present (zeros otherwise, as transformers does), always written. The generation settings
transformers' generate uses (decoder_start_token_id, forced_bos_token_id, forced_eos_token_id) are read from
generation_config.json when the directory has one, else from config.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import ModelConfig, load_json
from lmlab.errors import CheckpointError, ConfigError
from lmlab.interop.hf import _ACTS, WeightFiles, hf_state_dict, load_weights, write_model_dir

# tensors some checkpoints carry that transformers ignores or ties (copies of model.shared.weight)
_EMBED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
_UNUSED = (*_EMBED_COPIES, "final_logits_bias", "model.encoder.version", "model.decoder.version")
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# transformers' BartConfig defaults, for fields a config.json leaves out
DEFAULTS = dict(vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                encoder_attention_heads=16, d_model=1024, activation_function="gelu", pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, init_std=0.02)
_BART_LAYOUT = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True}
_GENERATION = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")

# lmlab module -> HF module in each block, and the four projections
_SUBLAYERS = {"attn": "self_attn", "attn_norm": "self_attn_layer_norm", "cross": "encoder_attn",
              "cross_norm": "encoder_attn_layer_norm", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2",
              "mlp_norm": "final_layer_norm"}
_PROJ = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}


def tensor_map(cfg: ModelConfig) -> dict:
    """lmlab parameter name ({i} = layer) -> HF tensor name, e.g.
    encoder.layers.{i}.attn.o_proj.weight -> model.encoder.layers.{i}.self_attn.out_proj.weight
    decoder.layers.{i}.cross_norm.bias -> model.decoder.layers.{i}.encoder_attn_layer_norm.bias
    decoder.pos_embed.weight -> model.decoder.embed_positions.weight"""
    m = {"embed.weight": "model.shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack in ("encoder", "decoder"):
        ours, theirs = f"{stack}.layers.{{i}}", f"model.{stack}.layers.{{i}}"
        m[f"{stack}.pos_embed.weight"] = f"model.{stack}.embed_positions.weight"
        for kind in ("weight", "bias"):
            m[f"{stack}.embed_norm.{kind}"] = f"model.{stack}.layernorm_embedding.{kind}"
            for name, hf in _SUBLAYERS.items():
                if name in ("attn", "cross"):
                    for p, hp in _PROJ.items():
                        m[f"{ours}.{name}.{p}.{kind}"] = f"{theirs}.{hf}.{hp}.{kind}"
                else:
                    m[f"{ours}.{name}.{kind}"] = f"{theirs}.{hf}.{kind}"
    return m


def _token_id(d: dict, key: str, source: str):
    v = d.get(key, DEFAULTS.get(key))
    if isinstance(v, list):  # transformers allows a list; every BART checkpoint has one id
        if len(v) != 1:
            raise CheckpointError(f"{source}: {key}={v}: only a single token id is supported")
        v = v[0]
    return v


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    def get(name):
        return d.get(name, DEFAULTS.get(name))

    for enc, dec in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if d.get(dec, get(enc)) != get(enc):
            raise CheckpointError(f"{source}: {enc}={get(enc)} and {dec}={d[dec]} differ; lmlab's BART has one value")
    for key, ok in _BART_LAYOUT.items():  # switches of BART's relatives (mBART, fairseq) that BART itself lacks
        if d.get(key, ok) != ok:
            raise CheckpointError(f"{source}: {key}={d[key]} is not supported (BART is post-norm with an embedding norm)")
    if d.get("is_encoder_decoder") is False or d.get("is_decoder"):
        raise CheckpointError(f"{source}: only the full encoder-decoder BART is supported")
    act = get("activation_function")
    if act not in _ACTS:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported; supported: {sorted(_ACTS)}")
    try:
        return ModelConfig(
            model_type="bart", vocab_size=get("vocab_size"), hidden_size=get("d_model"),
            intermediate_size=get("encoder_ffn_dim"), num_hidden_layers=get("encoder_layers"),
            num_decoder_layers=d.get("decoder_layers", get("encoder_layers")),
            num_attention_heads=get("encoder_attention_heads"), max_position_embeddings=get("max_position_embeddings"),
            norm="layernorm", norm_eps=1e-5, mlp="plain", hidden_act=_ACTS[act], position="learned",
            attention_bias=True, attention_out_bias=True, mlp_bias=True,
            tie_word_embeddings=d.get("tie_word_embeddings", True), scale_embedding=bool(d.get("scale_embedding")),
            initializer_range=get("init_std"),
            **{k: _token_id(d, k, source) for k in ("bos_token_id", "eos_token_id", "pad_token_id", *_GENERATION)})
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers (v4 and v5) loads as BartForConditionalGeneration with the same outputs."""
    from lmlab.models.bart import check_config
    check_config(cfg)
    dt = str(dtype).removeprefix("torch.")
    n_dec = cfg.num_decoder_layers or cfg.num_hidden_layers
    d = {"architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": cfg.vocab_size,
         "d_model": cfg.hidden_size, "encoder_layers": cfg.num_hidden_layers, "decoder_layers": n_dec,
         "encoder_ffn_dim": cfg.intermediate_size, "decoder_ffn_dim": cfg.intermediate_size,
         "encoder_attention_heads": cfg.num_attention_heads, "decoder_attention_heads": cfg.num_attention_heads,
         "max_position_embeddings": cfg.max_position_embeddings, "activation_function": _ACT_TO_HF[cfg.hidden_act],
         "scale_embedding": cfg.scale_embedding, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
         "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": cfg.initializer_range,
         "is_encoder_decoder": True, "tie_word_embeddings": cfg.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
         "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "dtype": dt, "torch_dtype": dt,
         "use_cache": True}
    return d | {k: getattr(cfg, k) for k in _GENERATION if getattr(cfg, k) is not None}


def load_model(path, raw: dict, cfg: ModelConfig, device="cpu", dtype=None):
    """A BartForConditionalGeneration (or BartModel) directory -> lmlab Bart (float32 unless `dtype` is given)."""
    from lmlab.models.bart import Bart

    path = Path(path)
    if (path / "generation_config.json").exists():  # what transformers' generate uses
        gen = load_json(path / "generation_config.json")
        cfg = cfg.replace(**{k: _token_id(gen, k, str(path / "generation_config.json")) for k in _GENERATION
                             if k in gen})
    with torch.device("meta"):
        model = Bart(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, path, expected_unused=_UNUSED, mapping=tensor_map(cfg))
    with torch.no_grad():
        files = WeightFiles(path)
        for name in _EMBED_COPIES:
            if not cfg.tie_word_embeddings and name in files.names() and \
                    not torch.equal(files.get(name).to(model.embed.weight), model.embed.weight):
                raise CheckpointError(f"{path}: {name} differs from model.shared.weight; separate encoder and decoder "
                                      f"embeddings (transformers 5, tie_word_embeddings=false) are not supported")
        if "final_logits_bias" in files.names():
            bias = files.get("final_logits_bias")
            if bias.shape != model.final_logits_bias.shape:
                raise CheckpointError(f"{path}: final_logits_bias has shape {tuple(bias.shape)}, expected "
                                      f"{tuple(model.final_logits_bias.shape)} from config.json")
            model.final_logits_bias.copy_(bias)
        else:
            model.final_logits_bias.zero_()
    model.eval()
    return model.to(dtype) if dtype is not None else model


def save_pretrained(model, out_dir, dtype=None, max_shard_bytes: int = 5 * 2**30):
    """config.json, generation_config.json and model.safetensors that transformers loads as
    BartForConditionalGeneration."""
    dtype = dtype or model.dtype
    config = config_to_hf(model.config, dtype)  # first: refuses configs transformers cannot express
    tensors = hf_state_dict(model, tensor_map(model.config)) | {"final_logits_bias": model.final_logits_bias}
    if not model.config.tie_word_embeddings:  # transformers 5 reads each stack's embedding from its own copy
        tensors |= {name: model.embed.weight.detach().clone() for name in _EMBED_COPIES}
    write_model_dir(out_dir, tensors, config, model.config, dtype, max_shard_bytes)
