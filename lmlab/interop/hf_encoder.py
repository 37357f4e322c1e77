"""BERT and RoBERTa Hugging Face directories, both ways: config.json <-> ModelConfig, tensor maps, load, save.

One map per architecture, from lmlab parameter names (`layers.{i}` templated) to the names in the file.
The backbone sits under `bert.` / `roberta.` in the *For* models and at the top level in BertModel /
RobertaModel files (sentence-transformers writes those); a classifier keeps its backbone under `backbone.`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config import ModelConfig, load_json
from lmlab.errors import CheckpointError, ConfigError
from lmlab.interop.hf import _ACTS, WeightFiles, hf_state_dict, load_weights, write_model_dir

BASE = {"bert": "Bert", "roberta": "Roberta"}  # model_type -> architecture name prefix
HEADS = ("Model", "ForMaskedLM", "ForPreTraining", "ForSequenceClassification", "ForTokenClassification")

# lmlab module -> HF module inside the backbone; each has .weight and (not the embeddings) .bias
_L = "encoder.layer.{i}"
BACKBONE = {
    "embed": "embeddings.word_embeddings",
    "pos_embed": "embeddings.position_embeddings",
    "type_embed": "embeddings.token_type_embeddings",
    "embed_norm": "embeddings.LayerNorm",
    "layers.{i}.attn.q_proj": f"{_L}.attention.self.query",
    "layers.{i}.attn.k_proj": f"{_L}.attention.self.key",
    "layers.{i}.attn.v_proj": f"{_L}.attention.self.value",
    "layers.{i}.attn.o_proj": f"{_L}.attention.output.dense",
    "layers.{i}.attn_norm": f"{_L}.attention.output.LayerNorm",
    "layers.{i}.mlp.up_proj": f"{_L}.intermediate.dense",
    "layers.{i}.mlp.down_proj": f"{_L}.output.dense",
    "layers.{i}.mlp_norm": f"{_L}.output.LayerNorm",
    "pooler.dense": "pooler.dense",
}
# heads (top level in the file); the MLM decoder's weight is the word embedding, its bias the head's `bias`
MLM_HEAD = {
    "bert": {"mlm.dense": "cls.predictions.transform.dense", "mlm.norm": "cls.predictions.transform.LayerNorm",
             "mlm.decoder.bias": "cls.predictions.bias"},
    "roberta": {"mlm.dense": "lm_head.dense", "mlm.norm": "lm_head.layer_norm", "mlm.decoder.bias": "lm_head.bias"},
}
CLASSIFIER = {"linear": {"classifier": "classifier"},  # BERT sequence (on the pooler), every token classifier
              "roberta-sequence": {"classifier.dense": "classifier.dense", "classifier.out_proj": "classifier.out_proj"}}
# tensors some files carry that are not weights, or are tied copies of the word embedding / head bias
_NOT_WEIGHTS = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight",
                "cls.predictions.decoder.bias", "lm_head.decoder.weight", "lm_head.decoder.bias")

# transformers' BertConfig / RobertaConfig defaults, for fields a config.json leaves out
DEFAULTS = {
    "bert": dict(vocab_size=30522, pad_token_id=0, bos_token_id=None, eos_token_id=None),
    "roberta": dict(vocab_size=50265, pad_token_id=1, bos_token_id=0, eos_token_id=2),
}
_COMMON_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
                        layer_norm_eps=1e-12, tie_word_embeddings=True)
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _expand(modules: dict, prefix: str = "", under: str = "") -> dict:
    """{lmlab module: HF module} -> {lmlab parameter: HF tensor} for weights and biases."""
    out = {}
    for ours, theirs in modules.items():
        if ours.endswith((".weight", ".bias")):
            out[under + ours] = prefix + theirs
        else:
            out |= {f"{under}{ours}.{k}": f"{prefix}{theirs}.{k}" for k in ("weight", "bias")}
    return out


def tensor_map(cfg: ModelConfig, arch: str | None = None, prefix: str | None = None) -> dict:
    """lmlab name -> HF name for one architecture (default: <Base>ForMaskedLM, what build(cfg) gives).

    `prefix` is where the backbone sits in the file: default `bert.`/`roberta.` for the *For* models
    and none for BertModel / RobertaModel."""
    mt = cfg.model_type
    head = (arch or f"{BASE[mt]}ForMaskedLM").removeprefix(BASE[mt])
    if head not in HEADS:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {[BASE[mt] + h for h in HEADS]}")
    if prefix is None:
        prefix = "" if head == "Model" else f"{mt}."
    if head == "Model":
        return _expand(BACKBONE, prefix)
    if head in ("ForMaskedLM", "ForPreTraining"):
        return _expand(BACKBONE, prefix) | _expand(MLM_HEAD[mt])
    classifier = CLASSIFIER["roberta-sequence" if mt == "roberta" and head == "ForSequenceClassification" else "linear"]
    return _expand(BACKBONE, prefix, under="backbone.") | _expand(classifier)


# -------------------------------------------------------------------------------------------- configs
def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """A BertConfig / RobertaConfig config.json -> ModelConfig (missing fields take transformers' defaults)."""
    mt = d["model_type"]
    defaults = _COMMON_DEFAULTS | DEFAULTS[mt]

    def get(k):
        if k.endswith("token_id"):  # null is a value here (BERT has no bos/eos)
            return d.get(k, defaults[k])
        return d[k] if d.get(k) is not None else defaults[k]

    pos = d.get("position_embedding_type") or "absolute"
    if pos != "absolute":
        raise CheckpointError(f"{source}: position_embedding_type {pos!r} is not supported; lmlab's {mt} has "
                              f"absolute (learned) positions only")
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise CheckpointError(f"{source}: a {mt} used as a decoder (is_decoder / add_cross_attention) is not supported")
    act = get("hidden_act")
    if act not in _ACTS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; supported: {sorted(_ACTS)}")
    if mt == "roberta" and get("pad_token_id") is None:
        raise CheckpointError(f"{source}: a roberta config needs pad_token_id (positions start after it)")
    try:
        return ModelConfig(
            model_type=mt, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"), max_position_embeddings=get("max_position_embeddings"),
            type_vocab_size=get("type_vocab_size"), norm="layernorm", norm_eps=get("layer_norm_eps"), mlp="plain",
            hidden_act=_ACTS[act], position="learned", attention_bias=True, attention_out_bias=True, mlp_bias=True,
            tie_word_embeddings=get("tie_word_embeddings"), pad_token_id=get("pad_token_id"),
            bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
            initializer_range=get("initializer_range"))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _check_representable(cfg: ModelConfig):
    """Refuse to write a config.json that transformers would read as a different model."""
    want = dict(norm="layernorm", mlp="plain", position="learned", attention_bias=True, attention_out_bias=True,
                mlp_bias=True, tie_word_embeddings=True, num_key_value_heads=cfg.num_attention_heads,
                head_dim=cfg.hidden_size // cfg.num_attention_heads, num_local_experts=0, sliding_window=None,
                scale_attn_by_inverse_layer_idx=False)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if cfg.type_vocab_size < 1:
        bad["type_vocab_size"] = cfg.type_vocab_size
        want["type_vocab_size"] = ">= 1"
    if bad:
        raise ConfigError(f"a {cfg.model_type} checkpoint cannot express {bad}; a {cfg.model_type} has "
                          f"{({k: want[k] for k in bad})}")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers loads as the same model (architectures: <Base>ForMaskedLM)."""
    _check_representable(cfg)
    dt = str(dtype).removeprefix("torch.")
    return {"architectures": [f"{BASE[cfg.model_type]}ForMaskedLM"], "model_type": cfg.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
            "hidden_act": _ACT_TO_HF[cfg.hidden_act], "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
            "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute", "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": True, "classifier_dropout": None,
            "use_cache": True, "dtype": dt, "torch_dtype": dt}


def architecture(model) -> str:
    """The transformers class an lmlab encoder model is saved as."""
    from lmlab.models.encoder import EncoderClassifier

    base = BASE[model.config.model_type]
    if isinstance(model, EncoderClassifier):
        return f"{base}For{model.kind.title()}Classification"
    return f"{base}ForMaskedLM" if model.mlm is not None else f"{base}Model"


def save_pretrained(model, out_dir, dtype=None, **kw):
    """config.json + model.safetensors that transformers.AutoModel* loads with the same outputs."""
    dtype = dtype or model.dtype
    arch = architecture(model)
    config = config_to_hf(model.config, dtype) | {"architectures": [arch]}
    if hasattr(model, "id2label"):
        config |= {"id2label": {str(i): v for i, v in model.id2label.items()},
                   "label2id": {v: i for i, v in model.id2label.items()}}
    tensors = hf_state_dict(model, tensor_map(model.config, arch))
    write_model_dir(out_dir, tensors, config, model.config, dtype, **kw)


# ----------------------------------------------------------------------------------------------- load
def load_model(path: Path, raw: dict, cfg: ModelConfig, device="cpu", dtype=None):
    """By `architectures`: *ForMaskedLM (and *ForPreTraining, its next-sentence head unused) -> Encoder with
    the MLM head; <Base>Model or none -> Encoder without it (with the pooler when the file has one);
    *ForSequenceClassification / *ForTokenClassification -> EncoderClassifier."""
    from lmlab.models.encoder import Encoder, EncoderClassifier

    mt, cfg_file = cfg.model_type, path / "config.json"
    arch = (raw.get("architectures") or [f"{BASE[mt]}Model"])[0]
    head = arch.removeprefix(BASE[mt])
    if head not in HEADS:
        raise CheckpointError(f"{cfg_file}: architecture {arch!r} is not supported; supported: "
                              f"{[BASE[mt] + h for h in HEADS]}")
    names = set(WeightFiles(path).names())
    prefix = f"{mt}." if f"{mt}.embeddings.word_embeddings.weight" in names else ""
    with torch.device("meta"):
        if head in ("ForMaskedLM", "ForPreTraining"):
            if not cfg.tie_word_embeddings:
                raise CheckpointError(f"{cfg_file}: tie_word_embeddings is false; lmlab's masked-LM head is tied "
                                      f"to the word embeddings")
            model = Encoder(cfg, mlm_head=True)
        elif head == "Model":
            model = Encoder(cfg, mlm_head=False, pooler=f"{prefix}pooler.dense.weight" in names)
        else:
            id2label = raw.get("id2label") or {}
            num_labels = raw.get("num_labels") or len(id2label) or 2
            model = EncoderClassifier(cfg, num_labels, kind="token" if head == "ForTokenClassification" else "sequence",
                                      id2label=id2label or None)
    model.to_empty(device=device)
    model.tie_weights()
    mapping = tensor_map(cfg, arch, prefix)
    if any(n.endswith("LayerNorm.gamma") for n in names):  # files from the original TensorFlow conversion
        mapping = {k: v.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                   for k, v in mapping.items()}
    load_weights(model, path, expected_unused=tuple(n for n in names if n.endswith(_NOT_WEIGHTS)), mapping=mapping)
    if isinstance(model, Encoder) and (path / "sentence_bert_config.json").exists():
        model.max_seq_length = load_json(path / "sentence_bert_config.json").get("max_seq_length")
    model.eval()
    return model.to(dtype) if dtype is not None else model
