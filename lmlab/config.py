"""Model configuration: one dataclass for every decoder family, HF field names, and presets.

Field names follow Hugging Face's config.json (LlamaConfig) so that `--set model.hidden_size=256`
means what a transformers user expects. Families differ only in a few switches (`norm`, `mlp`,
`position`, biases, experts), which `lmlab.interop.hf` fills in from a config.json's model_type.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama | mistral | mixtral | qwen2 | gpt2
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    # block switches
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "gated"  # gated (SwiGLU: down(act(gate(x)) * up(x))) | plain (down(act(up(x))))
    hidden_act: str = "silu"  # silu | gelu | gelu_tanh | relu
    position: str = "rope"  # rope | learned (GPT-2)
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # GPT-2 divides attention scores by (layer_idx + 1) when this is set
    scale_attn_by_inverse_layer_idx: bool = False
    # RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", ...}
    # sliding-window attention (Mistral; Qwen2 per layer via layer_types)
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    # Mixture of Experts (Mixtral); 0 experts means a dense MLP
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    # special tokens and init
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"model config: {msg}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm must be rmsnorm|layernorm, got {self.norm!r}")
        need(self.mlp in ("gated", "plain"), f"mlp must be gated|plain, got {self.mlp!r}")
        need(self.position in ("rope", "learned"), f"position must be rope|learned, got {self.position!r}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        need(self.position != "rope" or self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        if self.rope_scaling is not None:
            t = self.rope_scaling.get("rope_type")
            need(t in ROPE_TYPES, f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {t!r}")
            if t != "default":
                need("factor" in self.rope_scaling or t == "yarn", f"rope_scaling ({t}) needs 'factor'")
            if t == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    need(k in self.rope_scaling, f"rope_scaling (llama3) needs {k!r}")
        if self.layer_types is not None:
            need(len(self.layer_types) == self.num_hidden_layers,
                 f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            need(set(self.layer_types) <= {"full_attention", "sliding_attention"},
                 f"layer_types entries must be full_attention|sliding_attention, got {set(self.layer_types)}")
        if self.num_local_experts:
            need(0 < self.num_experts_per_tok <= self.num_local_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_local_experts "
                 f"({self.num_local_experts})")

    def window(self, layer_idx: int) -> int | None:
        """Sliding-window length for a layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _gpt2(**kw) -> ModelConfig:
    base = dict(model_type="gpt2", norm="layernorm", mlp="plain", hidden_act="gelu_tanh", position="learned",
                attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                norm_eps=1e-5, bos_token_id=50256, eos_token_id=50256)
    base.update(kw)
    return ModelConfig(**base)


# Presets: small enough for a 2-core CPU. `llama-50m` is the benchmark model of the foundation issue.
PRESETS: dict[str, callable] = {
    "tiny": lambda: ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True),
    "small": lambda: ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=1024, tie_word_embeddings=True),
    "llama-50m": lambda: ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    "mixtral-tiny": lambda: ModelConfig(model_type="mixtral", vocab_size=2048, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512),
    "gpt2-tiny": lambda: _gpt2(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=0),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


def load_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
