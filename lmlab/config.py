"""Configuration: one dataclass for every decoder family (HF field names) and presets; run configs
(model.*, train.*, data.*) with YAML load/save and `--set section.key=value` overrides.

Field names follow Hugging Face's config.json (LlamaConfig) so that `--set model.hidden_size=256`
means what a transformers user expects. Families differ only in a few switches (`norm`, `mlp`,
`position`, biases, experts), which `lmlab.interop.hf` fills in from a config.json's model_type.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError

ENCODER_FAMILIES = {"bert": "encoder", "roberta": "encoder", "t5": "encoder-decoder", "bart": "encoder-decoder"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama|mistral|mixtral|qwen2|gpt2|gpt_neox|falcon|cohere (decoders)|bert|roberta|t5
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
    position: str = "rope"  # rope | learned (GPT-2, BERT) | relative (T5's bucketed position bias)
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm's bias (PaLM and Cohere have none; RMSNorm never has one)
    tie_word_embeddings: bool = False
    # parallel block (GPT-J, GPT-NeoX, Falcon, PaLM): x + attn(norm1(x)) + mlp(norm2(x)), one residual step
    parallel_residual: bool = False
    shared_norm: bool = False  # parallel block with one norm for both branches (Falcon-7B, PaLM, Cohere)
    # GPT-2 divides attention scores by (layer_idx + 1) when this is set
    scale_attn_by_inverse_layer_idx: bool = False
    # RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", ...}
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * factor) dims of each head (GPT-NeoX)
    # sliding-window attention (Mistral; Qwen2 per layer via layer_types)
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    # Mixture of Experts (Mixtral); 0 experts means a dense MLP
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    # encoder families: BERT's token types (0 = none); T5's decoder depth and relative position buckets
    type_vocab_size: int = 0
    num_decoder_layers: int | None = None  # T5: None -> num_hidden_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    decoder_start_token_id: int | None = None  # T5: the first decoder input (the pad id, 0); BART: eos
    scale_embedding: bool = False  # BART: token embeddings times sqrt(hidden_size)
    # BART: generation forces the first new token / the one that reaches max_new_tokens (transformers' forced_*)
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
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
        need(self.position in ("rope", "learned", "relative"),
             f"position must be rope|learned|relative, got {self.position!r}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        need(self.position != "rope" or self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        rd = self.rotary_dim
        need(0 < self.partial_rotary_factor <= 1 and (self.position != "rope" or (rd > 0 and rd % 2 == 0)),
             f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and give an even rotary_dim "
             f"(head_dim {self.head_dim} -> {rd})")
        need(self.parallel_residual or not self.shared_norm, "shared_norm needs parallel_residual")
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

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def family(self) -> str:
        """decoder | encoder | encoder-decoder, from model_type."""
        return ENCODER_FAMILIES.get(self.model_type, "decoder")

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
        d = dataclasses.asdict(self)
        # derived values are left out (recomputed on load), so `--set model.hidden_size=...` or
        # `model.num_attention_heads=...` keeps them in step
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            del d["head_dim"]
        if self.num_key_value_heads == self.num_attention_heads:
            del d["num_key_value_heads"]
        return d

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


# Presets. `tiny` is the model of DESIGN.md's calibration run (4.6M parameters: learns the built-in world
# on a 2-core CPU in minutes); `small` ~25M; `llama-50m` the benchmark model of the foundation issue;
# `gpt2-124m` and `llama-1b` are GPU-sized. Vocabulary sizes follow the tokenizer at training time.
def _bert(**kw) -> ModelConfig:
    base = dict(model_type="bert", norm="layernorm", norm_eps=1e-12, mlp="plain", hidden_act="gelu",
                position="learned", attention_bias=True, attention_out_bias=True, mlp_bias=True,
                tie_word_embeddings=True, type_vocab_size=2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return ModelConfig(**(base | kw))


def _t5(**kw) -> ModelConfig:
    """T5 v1.0 (t5-small's shape): ReLU MLP, tied embeddings, relative position buckets, no biases."""
    base = dict(model_type="t5", norm="rmsnorm", norm_eps=1e-6, mlp="plain", hidden_act="relu", position="relative",
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                decoder_start_token_id=0)
    return ModelConfig(**(base | kw))


def _bart(**kw) -> ModelConfig:
    """BART (facebook/bart-base's layout): post-norm LayerNorm blocks with biases, GELU, learned positions, tied
    embeddings; decoding starts from eos and the last allowed token is forced to eos, as transformers' BartConfig."""
    base = dict(model_type="bart", norm="layernorm", norm_eps=1e-5, mlp="plain", hidden_act="gelu", position="learned",
                attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True, bos_token_id=0,
                pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    return ModelConfig(**(base | kw))


PRESETS: dict[str, callable] = {
    "tiny": lambda: ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                tie_word_embeddings=True),
    "small": lambda: ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                 tie_word_embeddings=True),
    "llama-50m": lambda: ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-1b": lambda: ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                    rope_theta=500000.0, tie_word_embeddings=True),
    "mixtral-tiny": lambda: ModelConfig(model_type="mixtral", vocab_size=2048, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512),
    # PaLM's block (Chowdhery et al. 2022) at `tiny` scale (4.3M parameters): attention and a SwiGLU MLP in parallel
    # from one shared LayerNorm, multi-query attention (1 kv head), RoPE, no biases (LayerNorms included), tied
    # embeddings. Saves as CohereForCausalLM, whose decoder is exactly this block (logit_scale 1.0; Cohere's
    # interleaved RoPE pairs are a fixed reordering of the q/k rows, done on save and load).
    "palm-tiny": lambda: ModelConfig(model_type="cohere", vocab_size=2048, hidden_size=256, intermediate_size=1024,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                                     norm="layernorm", norm_bias=False, parallel_residual=True, shared_norm=True,
                                     max_position_embeddings=1024, tie_word_embeddings=True),
    "gpt2-tiny": lambda: _gpt2(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=0),
    "gpt2-124m": lambda: _gpt2(vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, max_position_embeddings=1024),
    # encoder-only (BERT) and encoder-decoder (T5); `--family encoder --preset tiny` means bert-tiny
    "bert-tiny": lambda: _bert(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, max_position_embeddings=512),
    "bert-base": lambda: _bert(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, max_position_embeddings=512),
    "t5-tiny": lambda: _t5(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                           num_decoder_layers=3, num_attention_heads=4, max_position_embeddings=512),
    "t5-small": lambda: _t5(vocab_size=32128, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                            num_attention_heads=8, head_dim=64, max_position_embeddings=512),
    "bart-tiny": lambda: _bart(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                               num_decoder_layers=3, num_attention_heads=4, max_position_embeddings=512),
}
FAMILY_PREFIX = {"encoder": "bert-", "encoder-decoder": "t5-"}  # `--arch bart` picks bart-NAME instead
# pre-training defaults that differ by family (beneath --config and --set). Post-LN BERT sits on a unigram
# plateau for hundreds of steps at the decoder's lr 2e-3; lr 5e-4 with a longer warmup and 30% masking
# (Wettig et al. 2022, "Should You Mask 15% in Masked Language Modeling?") leave it within CPU minutes.
FAMILY_DEFAULTS = {"encoder": {"train": {"lr": 5e-4, "warmup_steps": 100}, "data": {"mlm_probability": 0.3}}}


def preset(name: str, family: str | None = None, **overrides) -> ModelConfig:
    """A preset by name. With a family, a size name is looked up in that family first ("tiny" with
    family="encoder" is bert-tiny), and a preset of another family is refused."""
    if family in FAMILY_PREFIX and FAMILY_PREFIX[family] + name in PRESETS:
        name = FAMILY_PREFIX[family] + name
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    if family is not None and cfg.family != family:
        raise ConfigError(f"preset {name!r} is a {cfg.family} model, not {family}; "
                          f"{family} presets: {sorted(k for k in PRESETS if PRESETS[k]().family == family)}")
    return ModelConfig.from_dict(cfg.to_dict() | overrides) if overrides else cfg


def load_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


# ------------------------------------------------------------------------------------------ run configs
@dataclass
class TrainConfig:
    """The one training loop's settings (train.* keys). batch_size is the GLOBAL batch: sequences per
    optimizer step, summed over ranks and accumulation steps, so losses do not depend on the world size."""
    max_steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 20  # validation batches per evaluation (DPO: of 16 held-out pairs); 0 = all
    save_every: int = 100  # 0 = only at the end
    keep_last: int = 2
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast; weights and optimizer stay fp32)
    compile: bool = False  # torch.compile the model and the loss as one graph
    max_minutes: float = 0.0  # time budget; 0 = none
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"train config: {msg}")
        for k in ("max_steps", "batch_size", "seq_len", "grad_accum"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) > 0, f"{k} must be a positive integer")
        need(self.lr > 0, "lr must be > 0")
        need(isinstance(self.eval_batches, int) and self.eval_batches >= 0, "eval_batches must be >= 0 (0 = all)")
        need(self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine|linear|constant")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32|bfloat16, got {self.dtype!r}")
        need(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp|fsdp, got {self.distributed!r}")


@dataclass
class DataConfig:
    """data.* keys: where text comes from and how it is tokenized."""
    source: str = "world"  # world | a path, folder or glob of .txt/.jsonl/.parquet
    field: str = "text"  # jsonl/parquet field holding the text
    tokenizer: str = "train"  # train | a tokenizer or model directory
    tokenizer_kind: str = "auto"  # auto (bpe for decoders, wordpiece for BERT, unigram for T5) | bpe | sp-bpe | unigram | wordpiece
    vocab_size: int = 2048
    val_fraction: float = 0.02
    world_seed: int = 0
    world_people: int = 100
    world_mix_qa: bool = True  # pre-training on the world: mix the SFT people's QA (chat format) into the bios
    packing: bool = True  # SFT: pack short conversations into train.seq_len rows
    world_eval_limit: int = 0  # post-training on the world: questions per split in the final scoring (0 = all)
    # the encoder families' pre-training objectives (pretrain --family encoder | encoder-decoder)
    mlm_probability: float = 0.15  # BERT: fraction of tokens selected (80% [MASK], 10% random, 10% kept)
    whole_word_mask: bool = False  # BERT: select whole words, never part of one
    noise_density: float = 0.15  # T5 span corruption: fraction of tokens corrupted
    mean_noise_span_length: float = 3.0  # T5: mean corrupted span length
    # T5: spans (T5's targets: each sentinel + the tokens it replaced) | text (the whole original text, so the
    # decoder must copy the kept words from the encoder: a tiny T5 then reads; see docs/encoders.md)
    span_targets: str = "spans"
    mask_ratio: float = 0.3  # BART text infilling: fraction of tokens in masked spans
    poisson_lambda: float = 3.0  # BART: mean masked span length (Poisson; 0-length spans insert a <mask>)
    permute_sentences: float = 1.0  # BART: fraction of the sentences shuffled among themselves

    def validate(self):
        if self.span_targets not in ("spans", "text"):
            raise ConfigError(f"config: data.span_targets must be spans|text, got {self.span_targets!r}")


@dataclass
class LoRAConfig:
    """lora.* keys. r = 0 trains every weight (full fine-tuning); r > 0 trains rank-r adapters only."""
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # module names (last path part) or one regex over the full module path
    targets: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])


@dataclass
class RewardConfig:
    """reward.* keys: Bradley-Terry on (chosen, rejected) pairs; a K-way ranking gives all its pairs."""
    margin: float = 0.0  # loss -log sigmoid(r_c - r_r - margin * rank gap) (a pair's own "margin" field wins)


@dataclass
class DPOConfig:
    """dpo.* keys."""
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped labels (sigmoid loss only)


@dataclass
class PPOConfig:
    """ppo.* keys. train.batch_size is the PPO minibatch; each rollout of `rollout_batch` prompts is reused for
    `epochs` passes, so one rollout makes epochs * rollout_batch / batch_size optimizer steps."""
    reward_model: str = ""  # a reward model directory (lmlab reward); required
    rollout_batch: int = 32
    epochs: int = 2
    max_new_tokens: int = 48
    # sampling temperature of the rollouts (log-probs use logits / temperature); at 1.0 the speedrun's 4.5M policy
    # samples its refusals garbled (docs/speedrun.md)
    temperature: float = 0.7
    top_k: int = 0
    kl_coef: float = 0.1  # per-token penalty beta * (log pi - log pi_ref) in the reward (0.05: unstable, docs)
    adaptive_kl: bool = False  # Ziegler et al.: move kl_coef so the rollout KL tracks target_kl
    # + kl_loss_coef * the exact KL(pi || ref) over the vocabulary at each response position, in the loss (0: off)
    kl_loss_coef: float = 1.0
    target_kl: float = 4.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # policy ratio clip
    clip_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response cut off before end-of-turn
    value_init: str = "reward"  # reward | policy: the value model's starting backbone
    # PPO-ptx (InstructGPT): + ptx_coef * the LM loss on ptx_batch rows of train.seq_len tokens of ptx_data (a shard
    # folder, as `lmlab pretrain` writes under its out dir: data/) in each micro-batch, so the policy keeps what it knew
    ptx_coef: float = 0.0
    ptx_data: str = ""
    ptx_batch: int = 2


@dataclass
class RunConfig:
    """A whole run: model.*, train.*, data.* (HF names under model) and the post-training sections."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict:
        return {f.name: (self.model.to_dict() if f.name == "model" else dataclasses.asdict(getattr(self, f.name)))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        sections = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "lora": LoRAConfig,
                    "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
        parts = {}
        for name, klass in sections.items():
            values = d.get(name) or {}
            names = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - names)
            if bad:
                raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}; known: {sorted(names)}")
            parts[name] = klass(**_coerce(klass, name, values))
        parts["train"].validate()
        parts["data"].validate()
        rc = cls(**parts)
        rc.validate_posttraining()
        return rc

    def validate_posttraining(self):
        checks = [(self.lora.r >= 0, "lora.r must be >= 0 (0 = full fine-tuning)"),
                  (self.dpo.loss in ("sigmoid", "ipo"), f"dpo.loss must be sigmoid|ipo, got {self.dpo.loss!r}"),
                  (self.dpo.beta > 0, "dpo.beta must be > 0"),
                  (self.ppo.value_init in ("reward", "policy"), "ppo.value_init must be reward|policy"),
                  (self.ppo.epochs >= 1 and self.ppo.rollout_batch >= 1, "ppo.epochs and ppo.rollout_batch must be >= 1"),
                  (self.ppo.kl_coef >= 0 and self.ppo.kl_loss_coef >= 0, "ppo.kl_coef and ppo.kl_loss_coef must be >= 0"),
                  (self.ppo.ptx_coef == 0 or self.ppo.ptx_data and self.ppo.ptx_batch >= 1,
                   "ppo.ptx_coef > 0 needs ppo.ptx_data (a shard folder, e.g. runs/pretrain/data) and ppo.ptx_batch >= 1")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"config: {msg}")

    def save_yaml(self, path) -> None:
        import yaml
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path) -> "RunConfig":
        import yaml
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None


def _coerce(klass, section: str, values: dict) -> dict:
    """YAML reads 1e-3 as a string; numbers given for float fields become floats, and so on."""
    out = dict(values)
    for f in dataclasses.fields(klass):
        if f.name not in out or f.default is dataclasses.MISSING or out[f.name] is None:
            continue
        v, want = out[f.name], type(f.default)
        if want in (int, float) and not isinstance(v, bool) and isinstance(v, (int, float, str)):
            try:
                out[f.name] = want(v) if want is float or float(v).is_integer() else v
            except ValueError:
                raise ConfigError(f"{section}.{f.name} must be a number, got {v!r}") from None
    return out


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`--set train.lr=1e-3 model.hidden_size=256`: dotted keys, values parsed as YAML scalars."""
    import yaml
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set key {key!r} must be section.name (e.g. train.lr)")
        try:
            value = json.loads(raw)  # numbers (1e-3 too), true/false, null, lists
        except json.JSONDecodeError:
            value = yaml.safe_load(raw)  # bare strings
        d.setdefault(parts[0], {})[parts[1]] = value
    return d
