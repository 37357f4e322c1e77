"""Hugging Face model directories, both ways: config.json <-> ModelConfig, and declarative tensor-name maps.

A map is one dict per family from lmlab's parameter names (with `{i}` for the layer) to the name
in the HF file. A plain string is the same tensor; `T(name)` is stored transposed (GPT-2's Conv1D);
`Part(name, k, n)` is the k-th of n equal slices of a fused tensor (GPT-2's c_attn holds q, k, v);
`Experts(name)` is a stack over experts stored as one tensor per expert (`{e}` in the name);
`Rows(name, index, rows)` is the rows `index` of a stored tensor with `rows` rows (fused q/k/v in a per-head
layout, or head dims stored in another order: lmlab/interop/hf_parallel.py).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lmlab.config import ModelConfig, load_json
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write, write_json


@dataclass(frozen=True)
class T:
    name: str  # stored transposed: (in, out) on disk, (out, in) here


@dataclass(frozen=True)
class Part:
    name: str
    index: int
    parts: int
    transpose: bool = False


@dataclass(frozen=True)
class Experts:
    name: str  # contains {e}


@dataclass(frozen=True, eq=False)
class Rows:
    name: str
    index: torch.Tensor  # (n,) rows of the stored tensor, in lmlab's row order
    rows: int  # rows of the stored tensor (the Rows of one name together cover each once)


def _llama_like(mlp: dict) -> dict:
    m = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    }
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for kind in ("weight", "bias"):
            m[f"layers.{{i}}.attn.{p}.{kind}"] = f"model.layers.{{i}}.self_attn.{p}.{kind}"
    return m | mlp


_DENSE_MLP = {f"layers.{{i}}.mlp.{p}.{kind}": f"model.layers.{{i}}.mlp.{p}.{kind}"
              for p in ("gate_proj", "up_proj", "down_proj") for kind in ("weight", "bias")}
_MOE = "model.layers.{i}.block_sparse_moe"

LLAMA_MAP = _llama_like(_DENSE_MLP)
MIXTRAL_MAP = _llama_like({
    "layers.{i}.mlp.router.weight": f"{_MOE}.gate.weight",
    "layers.{i}.mlp.w_gate": Experts(f"{_MOE}.experts.{{e}}.w1.weight"),
    "layers.{i}.mlp.w_down": Experts(f"{_MOE}.experts.{{e}}.w2.weight"),
    "layers.{i}.mlp.w_up": Experts(f"{_MOE}.experts.{{e}}.w3.weight"),
})
_H = "transformer.h.{i}"
GPT2_MAP = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": f"{_H}.ln_1.weight",
    "layers.{i}.attn_norm.bias": f"{_H}.ln_1.bias",
    "layers.{i}.attn.q_proj.weight": Part(f"{_H}.attn.c_attn.weight", 0, 3, transpose=True),
    "layers.{i}.attn.k_proj.weight": Part(f"{_H}.attn.c_attn.weight", 1, 3, transpose=True),
    "layers.{i}.attn.v_proj.weight": Part(f"{_H}.attn.c_attn.weight", 2, 3, transpose=True),
    "layers.{i}.attn.q_proj.bias": Part(f"{_H}.attn.c_attn.bias", 0, 3),
    "layers.{i}.attn.k_proj.bias": Part(f"{_H}.attn.c_attn.bias", 1, 3),
    "layers.{i}.attn.v_proj.bias": Part(f"{_H}.attn.c_attn.bias", 2, 3),
    "layers.{i}.attn.o_proj.weight": T(f"{_H}.attn.c_proj.weight"),
    "layers.{i}.attn.o_proj.bias": f"{_H}.attn.c_proj.bias",
    "layers.{i}.mlp_norm.weight": f"{_H}.ln_2.weight",
    "layers.{i}.mlp_norm.bias": f"{_H}.ln_2.bias",
    "layers.{i}.mlp.up_proj.weight": T(f"{_H}.mlp.c_fc.weight"),
    "layers.{i}.mlp.up_proj.bias": f"{_H}.mlp.c_fc.bias",
    "layers.{i}.mlp.down_proj.weight": T(f"{_H}.mlp.c_proj.weight"),
    "layers.{i}.mlp.down_proj.bias": f"{_H}.mlp.c_proj.bias",
}

# model_type -> (HF architecture class, tensor map)
ARCHS = {
    "llama": ("LlamaForCausalLM", LLAMA_MAP),
    "mistral": ("MistralForCausalLM", LLAMA_MAP),
    "qwen2": ("Qwen2ForCausalLM", LLAMA_MAP),
    "mixtral": ("MixtralForCausalLM", MIXTRAL_MAP),
    "gpt2": ("GPT2LMHeadModel", GPT2_MAP),
}
# buffers some checkpoints carry that are not weights
_IGNORED = re.compile(r"(\.(attn|attention)\.(bias|masked_bias)|rotary_emb\.inv_freq)$")
_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


# -------------------------------------------------------------------------------------------- configs
# the encoder families keep their configs and name maps beside this file (model_type -> module)
FAMILY_MODULES = {"bert": "lmlab.interop.hf_encoder", "roberta": "lmlab.interop.hf_encoder",
                  "t5": "lmlab.interop.hf_t5", "bart": "lmlab.interop.hf_bart"}
# decoders with parallel blocks and fused or reordered tensors (lmlab's Decoder, their own config keys)
FAMILY_MODULES |= dict.fromkeys(("gpt_neox", "falcon", "cohere"), "lmlab.interop.hf_parallel")


def family_module(model_type: str):
    import importlib
    return importlib.import_module(FAMILY_MODULES[model_type])


def required(d: dict, source: str, *names):
    """The value of the first of `names` (old and new spellings of one field) that config.json `d` sets."""
    for n in names:
        if d.get(n) is not None:
            return d[n]
    raise CheckpointError(f"{source}: required field {names[0]!r} is missing")


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json (v4 or v5 keys) into a ModelConfig."""
    mt = d.get("model_type")
    if mt in FAMILY_MODULES:
        return family_module(mt).config_from_hf(d, source)
    if mt not in ARCHS:
        raise CheckpointError(f"{source}: model_type {mt!r} (architectures {d.get('architectures')}) is not "
                              f"supported; supported: {sorted(ARCHS | FAMILY_MODULES)}")

    req = partial(required, d, source)
    act = d.get("activation_function" if mt == "gpt2" else "hidden_act", "gelu_new" if mt == "gpt2" else "silu")
    if act not in _ACTS:
        raise CheckpointError(f"{source}: activation {act!r} is not supported; supported: {sorted(_ACTS)}")
    common = dict(model_type=mt, hidden_act=_ACTS[act], bos_token_id=d.get("bos_token_id"),
                  eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
                  initializer_range=d.get("initializer_range", 0.02))
    if mt == "gpt2":
        h = req("n_embd", "hidden_size")
        return ModelConfig(
            **common, vocab_size=req("vocab_size"), hidden_size=h, num_hidden_layers=req("n_layer", "num_hidden_layers"),
            num_attention_heads=req("n_head", "num_attention_heads"), intermediate_size=d.get("n_inner") or 4 * h,
            max_position_embeddings=req("n_positions", "n_ctx", "max_position_embeddings"),
            norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="plain", position="learned",
            attention_bias=True, attention_out_bias=True, mlp_bias=True,
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False))
    n_layers = req("num_hidden_layers")
    theta, rope_scaling, _ = rope_from_hf(d, 1e6 if mt == "mixtral" else 1e4)
    bias = d.get("attention_bias", mt == "qwen2")
    window, layer_types = d.get("sliding_window"), d.get("layer_types")
    if mt == "qwen2":
        if not d.get("use_sliding_window", False):
            window, layer_types = None, None
        elif layer_types is None:
            mwl = d.get("max_window_layers", n_layers)
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
    elif mt == "llama":
        window, layer_types = None, None
    else:
        layer_types = None
    moe = {}
    if mt == "mixtral":
        moe = dict(num_local_experts=req("num_local_experts"), num_experts_per_tok=d.get("num_experts_per_tok", 2),
                   router_aux_loss_coef=d.get("router_aux_loss_coef", 0.02))
    try:
        return ModelConfig(
            **common, **moe, vocab_size=req("vocab_size"), hidden_size=req("hidden_size"),
            intermediate_size=req("intermediate_size"), num_hidden_layers=n_layers,
            num_attention_heads=req("num_attention_heads"), num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"), max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), mlp="gated", position="rope",
            attention_bias=bias, attention_out_bias=bias and mt == "llama", mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False), rope_theta=float(theta),
            rope_scaling=rope_scaling, sliding_window=window, layer_types=layer_types)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def rope_from_hf(d: dict, default_theta: float = 1e4) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from v5 `rope_parameters` or v4 `rope_scaling` +
    `rope_theta` (+ `partial_rotary_factor`)."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or default_theta
    partial = rope.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope_scaling = None if kind == "default" else {"rope_type": kind, **rope}
    if kind in ("llama3", "yarn"):  # transformers falls back to max_position_embeddings
        rope_scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return float(theta), rope_scaling, float(partial)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json that transformers (v5, and v4 for the keys it knows) loads as the same model."""
    mt = cfg.model_type
    if mt in FAMILY_MODULES:
        return family_module(mt).config_to_hf(cfg, dtype)
    if mt not in ARCHS:
        raise ConfigError(f"cannot save model_type {mt!r} as a Hugging Face checkpoint; supported: {sorted(ARCHS)}")
    _check_representable(cfg)
    act = {"silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new" if mt == "gpt2" else "gelu_pytorch_tanh"}
    dt = str(dtype).removeprefix("torch.")
    d = {"architectures": [ARCHS[mt][0]], "model_type": mt, "vocab_size": cfg.vocab_size,
         "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
         "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
         "dtype": dt, "torch_dtype": dt, "use_cache": True}
    if mt == "gpt2":
        return d | {"n_embd": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "n_head": cfg.num_attention_heads,
                    "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
                    "n_ctx": cfg.max_position_embeddings, "activation_function": act[cfg.hidden_act],
                    "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
                    "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d |= {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
          "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": act[cfg.hidden_act],
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
          "rope_scaling": cfg.rope_scaling, "attention_dropout": 0.0}
    if mt == "llama":
        d |= {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    elif mt == "qwen2":
        sliding = cfg.sliding_window is not None
        types = cfg.layer_types or ["sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers
        d |= {"use_sliding_window": sliding, "sliding_window": cfg.sliding_window, "layer_types": types,
              "max_window_layers": types.index("sliding_attention") if "sliding_attention" in types else cfg.num_hidden_layers}
    else:  # mistral, mixtral
        d |= {"sliding_window": cfg.sliding_window}
    if mt == "mixtral":
        d |= {"num_local_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
              "router_aux_loss_coef": cfg.router_aux_loss_coef, "router_jitter_noise": 0.0}
    return d


def _check_representable(cfg: ModelConfig):
    """Refuse to write a config.json that transformers would read as a different model."""
    mt, gpt2 = cfg.model_type, cfg.model_type == "gpt2"
    want = dict(norm="layernorm" if gpt2 else "rmsnorm", mlp="plain" if gpt2 else "gated",
                position="learned" if gpt2 else "rope", parallel_residual=False, partial_rotary_factor=1.0,
                norm_bias=True)
    if gpt2:
        want |= dict(attention_bias=True, attention_out_bias=True, mlp_bias=True, sliding_window=None)
    elif mt == "llama":  # one attention_bias flag covers q, k, v and o
        want |= dict(attention_out_bias=cfg.attention_bias, sliding_window=None)
    else:
        want |= dict(attention_bias=mt == "qwen2", attention_out_bias=False, mlp_bias=False)
    if mt != "mixtral":
        want["num_local_experts"] = 0
    elif not cfg.num_local_experts:
        want["num_local_experts"] = "> 0"
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ConfigError(f"a {mt} checkpoint cannot express {bad}; a {mt} has {({k: want[k] for k in bad})}")


# -------------------------------------------------------------------------------------- weight files
class WeightFiles:
    """Lazy read access to the tensors of a model directory (safetensors, sharded or not; .bin safely)."""

    def __init__(self, path: Path):
        self.path, self.where, self.handles = path, {}, {}
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).exists():
                weight_map = load_json(path / index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{path / index}: no 'weight_map'")
                self.where = {k: path / f for k, f in weight_map.items()}
                break
        else:
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).exists():
                    self.where = {k: path / name for k in self._open(path / name).keys()}
                    break
            else:
                raise CheckpointError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")

    def _open(self, file: Path):
        if file not in self.handles:
            if not file.exists():
                raise CheckpointError(f"{file}: weight file named in the index is missing")
            try:
                if file.suffix == ".safetensors":
                    from safetensors import safe_open
                    self.handles[file] = safe_open(str(file), framework="pt")
                else:  # never unpickle arbitrary objects
                    self.handles[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
                raise CheckpointError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None
        return self.handles[file]

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        h = self._open(file)
        try:
            return h.get_tensor(name) if file.suffix == ".safetensors" else h[name]
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({type(e).__name__}: {e})") from None


def _template(name: str) -> tuple[str, int | None]:
    """"layers.3.attn.q_proj.weight" -> ("layers.{i}.attn.q_proj.weight", 3); also under a prefix
    ("encoder.layers.3..." for T5)."""
    m = re.match(r"(.*?\blayers)\.(\d+)\.(.*)", name)
    return (f"{m.group(1)}.{{i}}.{m.group(3)}", int(m.group(2))) if m else (name, None)


def tensor_map(cfg: ModelConfig) -> dict:
    """lmlab parameter name template -> HF name spec, for this config's family."""
    if cfg.model_type in FAMILY_MODULES:
        return family_module(cfg.model_type).tensor_map(cfg)
    return ARCHS[cfg.model_type][1]


def load_weights(model, path: Path, expected_unused: tuple[str, ...] = (), mapping: dict | None = None):
    """Fill `model`'s parameters from the HF files in `path`, checking every name and shape. Tensors in the
    files that fill nothing raise a warning, except those named in `expected_unused` (a head loaded apart).
    `mapping` defaults to the family's tensor map (tensor_map)."""
    cfg = model.config
    files = WeightFiles(path)
    available, used = set(files.names()), set()

    def get(hf_name: str) -> torch.Tensor:
        # some checkpoints (the original GPT-2 files) were saved from the base model, without the prefix
        for candidate in (hf_name, hf_name.split(".", 1)[1]):
            if candidate in available:
                used.add(candidate)
                return files.get(candidate)
        raise CheckpointError(f"{path}: tensor {hf_name!r} is missing from the checkpoint")

    def fetch(spec, i) -> torch.Tensor:
        if isinstance(spec, str):
            return get(spec.format(i=i))
        if isinstance(spec, T):
            return get(spec.name.format(i=i)).t()
        if isinstance(spec, Part):
            full = get(spec.name.format(i=i))
            full = full.t() if spec.transpose else full
            if full.shape[0] % spec.parts:
                raise CheckpointError(f"{path}: {spec.name.format(i=i)} has shape {tuple(full.shape)}, not "
                                      f"divisible into {spec.parts} parts")
            return full.chunk(spec.parts, dim=0)[spec.index]
        if isinstance(spec, Rows):
            full = get(spec.name.format(i=i))
            if full.shape[0] != spec.rows:
                raise CheckpointError(f"{path}: {spec.name.format(i=i)} has {full.shape[0]} rows, expected "
                                      f"{spec.rows} from config.json")
            return full[spec.index]
        return torch.stack([get(spec.name.format(i=i, e=e)) for e in range(cfg.num_local_experts)])

    mapping = mapping or tensor_map(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is listed once, as embed.weight
            key, i = _template(name)
            spec = mapping[key]
            tensor = fetch(spec, i)
            if tensor.shape != param.shape:
                stored = spec if isinstance(spec, str) else spec.name
                raise CheckpointError(f"{path}: tensor {stored.format(i=i, e='N')!r} (lmlab {name!r}) has shape "
                                      f"{tuple(tensor.shape)}, expected {tuple(param.shape)} from config.json")
            param.copy_(tensor)
    unused = sorted(n for n in available - used - set(expected_unused) if not _IGNORED.search(n)
                    and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensors in the checkpoint were not used, e.g. {unused[:5]}")


def hf_state_dict(model, mapping: dict | None = None) -> dict[str, torch.Tensor]:
    """lmlab parameters -> tensors under their HF names (the inverse of load_weights)."""
    cfg = model.config
    mapping = mapping or tensor_map(cfg)
    out, parts = {}, {}
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key, i = _template(name)
        spec, t = mapping[key], param.detach()
        if isinstance(spec, str):
            out[spec.format(i=i)] = t
        elif isinstance(spec, T):
            out[spec.name.format(i=i)] = t.t()
        elif isinstance(spec, Part):
            parts.setdefault((spec.name.format(i=i), spec.transpose), {})[spec.index] = t
        elif isinstance(spec, Rows):  # scatter into the stored layout
            hf_name = spec.name.format(i=i)
            if hf_name not in out:
                out[hf_name] = t.new_empty((spec.rows, *t.shape[1:]))
            out[hf_name][spec.index] = t
        else:
            for e in range(cfg.num_local_experts):
                out[spec.name.format(i=i, e=e)] = t[e]
    for (hf_name, transpose), pieces in parts.items():
        full = torch.cat([pieces[k] for k in sorted(pieces)], dim=0)
        out[hf_name] = full.t() if transpose else full
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------- load / save
def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return load_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path, device="cpu", dtype=None):
    """Load a HF (or lmlab-saved) model directory into an lmlab model (float32 unless `dtype` is given)."""
    path = Path(path)
    raw = read_config(path)
    cfg = config_from_hf(raw, source=str(path / "config.json"))
    if cfg.model_type in FAMILY_MODULES:  # BERT, RoBERTa, T5: heads and layouts of their own
        return family_module(cfg.model_type).load_model(path, raw, cfg, device, dtype)
    return load_decoder(path, raw, cfg, device, dtype)


def load_decoder(path: Path, raw: dict, cfg: ModelConfig, device="cpu", dtype=None):
    """A Decoder (or, for a `*ForSequenceClassification` directory, a reward model) with the weights of `path`."""
    from lmlab.models.decoder import Decoder

    with torch.device("meta"):
        model = Decoder(cfg)
    if any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or []):
        from lmlab.models.heads import load_scalar_model  # a reward model (lmlab reward, TRL)
        return load_scalar_model(model, path, raw, device, dtype)
    model.to_empty(device=device)
    if model.rotary is not None:
        model.rotary.reset()
    model.tie_weights()
    load_weights(model, path)
    model.eval()
    return model.to(dtype) if dtype is not None else model


def save_pretrained(model, out_dir, dtype=None, max_shard_bytes: int = 5 * 2**30):
    """Write config.json, generation_config.json and model.safetensors (sharded with an index past
    max_shard_bytes), each atomically, so that transformers.AutoModelForCausalLM loads the directory."""
    dtype = dtype or model.dtype
    config = config_to_hf(model.config, dtype)  # first: refuses configs transformers cannot express
    write_model_dir(out_dir, hf_state_dict(model), config, model.config, dtype, max_shard_bytes)


def write_model_dir(out_dir, tensors: dict, config: dict, cfg: ModelConfig, dtype, max_shard_bytes: int = 5 * 2**30):
    """HF tensors + config.json dict -> a model directory (weights first, config.json last, each atomic)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / "model.safetensors", lambda p: save_file(shards[0], p, metadata=meta))
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(out / fname, lambda p, s=shard: save_file(s, p, metadata=meta))
            weight_map |= {k: fname for k in shard}
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": weight_map}
        write_json(out / "model.safetensors.index.json", index)
    write_json(out / "config.json", config)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    if cfg.decoder_start_token_id is not None:  # encoder-decoder (T5): transformers' generate needs it here
        gen["decoder_start_token_id"] = cfg.decoder_start_token_id
    for key in ("forced_bos_token_id", "forced_eos_token_id"):  # BART: its generate forces these tokens
        if getattr(cfg, key, None) is not None:
            gen[key] = getattr(cfg, key)
    write_json(out / "generation_config.json", gen)
