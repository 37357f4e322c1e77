"""GGUF export: any model directory lmlab loads -> one file that llama.cpp (Ollama, LM Studio) runs.

    lmlab.export_gguf("runs/sft/final", "model.gguf", dtype="q8_0")
    lmlab export gguf --model runs/sft/final --out model.gguf --dtype f16

Written with the `gguf` package (llama.cpp's own Python writer). What llama.cpp needs and a plain copy of
the Hugging Face tensors would get wrong:
- names: llama.cpp's (`blk.N.attn_q.weight`, ...), from the declarative maps below (lmlab name -> GGUF name);
- RoPE layout: HF checkpoints rotate halves of each head (x[:hd/2], x[hd/2:]), llama.cpp's "llama"
  architecture rotates adjacent pairs (x[2i], x[2i+1]), so q/k rows are permuted per head (k with the kv-head
  count); Qwen2 uses the half layout in llama.cpp too (NEOX rope) and is copied as is;
- GPT-2's and GPT-NeoX's and Falcon's q/k/v are one fused `attn_qkv` [q; k; v] (llama.cpp's order, not
  the per-head interleaving of the HF files); Cohere runs as "command-r", whose RoPE rotates adjacent pairs;
  Mixtral's experts are stacked (E, ff, d) tensors and the router
  stays f32; Llama 3 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors;
- dtypes: 1-D tensors (norms, biases) are always f32; q8_0 quantises 2-D/3-D weights whose rows are a
  multiple of 32 (one scale per 32 values), the rest fall back to f16.
The tokenizer, special ids and chat template go in through lmlab/interop/gguf_vocab.py.
`read_gguf` reads a file back (metadata + numpy tensors) for checks.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError

DTYPES = ("f32", "f16", "q8_0")
# lmlab model_type -> llama.cpp architecture (llama.cpp runs Mistral and Mixtral as "llama")
ARCHS = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "bert": "bert",
         "t5": "t5", "gpt_neox": "gptneox", "falcon": "falcon", "cohere": "command-r"}
ROPE_PAIRS = {"llama", "command-r"}  # architectures whose RoPE rotates adjacent pairs: q/k need the permutation


class GGUFError(LmlabError, ValueError):
    """The model or tokenizer cannot be written as GGUF (names what and why)."""


# ------------------------------------------------------------------------------------ tensor-name maps
# lmlab parameter name (with {i} for the layer) -> GGUF name. A tuple of names is fused by concatenation
# along rows (GPT-2's qkv). The permutation of q/k and the f32 rules are applied by name afterwards.
def _attn(prefix: str, out: str = "attn_output") -> dict:
    m = {}
    for p, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", out)):
        for kind in ("weight", "bias"):
            m[f"{prefix}.{p}.{kind}"] = f"blk.{{i}}.{g}.{kind}"
    return m


LLAMA = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.mlp_norm.weight": "blk.{i}.ffn_norm.weight",
    **_attn("layers.{i}.attn"),
    **{f"layers.{{i}}.mlp.{p}_proj.{k}": f"blk.{{i}}.ffn_{p}.{k}" for p in ("gate", "up", "down")
       for k in ("weight", "bias")},
    # Mixtral: lmlab already keeps experts stacked, (E, ff, d) and (E, d, ff), as llama.cpp wants them
    "layers.{i}.mlp.router.weight": "blk.{i}.ffn_gate_inp.weight",
    "layers.{i}.mlp.w_gate": "blk.{i}.ffn_gate_exps.weight",
    "layers.{i}.mlp.w_up": "blk.{i}.ffn_up_exps.weight",
    "layers.{i}.mlp.w_down": "blk.{i}.ffn_down_exps.weight",
}
GPT2 = {
    "embed.weight": "token_embd.weight",
    "pos_embed.weight": "position_embd.weight",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    **{f"layers.{{i}}.{a}.{k}": f"blk.{{i}}.{g}.{k}" for a, g in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm"))
       for k in ("weight", "bias")},
    **{f"blk.{{i}}.attn_qkv.{k}": tuple(f"layers.{{i}}.attn.{p}.{k}" for p in ("q_proj", "k_proj", "v_proj"))
       for k in ("weight", "bias")},
    **{f"layers.{{i}}.attn.o_proj.{k}": f"blk.{{i}}.attn_output.{k}" for k in ("weight", "bias")},
    **{f"layers.{{i}}.mlp.{p}_proj.{k}": f"blk.{{i}}.ffn_{p}.{k}" for p in ("up", "down") for k in ("weight", "bias")},
}
# Falcon with two norms (ln_attn, ln_mlp): llama.cpp feeds attention from attn_norm_2 and the MLP from attn_norm
FALCON_TWO_NORMS = GPT2 | {f"layers.{{i}}.{a}.{k}": f"blk.{{i}}.{g}.{k}" for a, g in (("attn_norm", "attn_norm_2"),
                                                                                    ("mlp_norm", "attn_norm"))
                           for k in ("weight", "bias")}
F32_ALWAYS = ("ffn_gate_inp", "rope_freqs", "attn_rel_b", "token_types")  # small tensors llama.cpp reads as f32


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k weight (n_head*hd, d) or bias (n_head*hd,): per head, the HF half layout [x0..x(h-1),
    y0..y(h-1)] -> llama.cpp's pairs [x0, y0, x1, y1, ...] (h = hd/2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> torch.Tensor:
    """(hd/2,) divisors of the base frequencies for Llama 3 scaling, as llama.cpp's converter computes them:
    1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    sc = cfg.rope_scaling
    factor, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], \
        sc["original_max_position_embeddings"]
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def decoder_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> fp32 tensor for a decoder (GPT-2, Llama, Mistral, Mixtral, Qwen2, GPT-NeoX, Falcon, Cohere)."""
    cfg = model.config
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    mapping = GPT2 if arch in ("gpt2", "gptneox", "falcon") else LLAMA  # the GPT-2 map: LayerNorms, fused qkv
    if arch == "falcon" and not cfg.shared_norm:
        mapping = FALCON_TWO_NORMS
    out = {}
    for i in range(cfg.num_hidden_layers):
        for src, dst in mapping.items():
            if isinstance(dst, tuple):  # fused: dst names the lmlab parts, src the GGUF tensor
                parts = [params.pop(p.format(i=i), None) for p in dst]
                if all(p is not None for p in parts):
                    out[src.format(i=i)] = torch.cat(parts, dim=0)
            elif "{i}" in src and src.format(i=i) in params:
                out[dst.format(i=i)] = params.pop(src.format(i=i))
    for src, dst in mapping.items():
        if "{i}" not in src and src in params:
            out[dst] = params.pop(src)
    if cfg.tie_word_embeddings:
        out.pop("output.weight", None)  # llama.cpp falls back to token_embd
    if arch == "gptneox":  # llama.cpp's gptneox requires the output matrix and the attention biases
        out.setdefault("output.weight", out["token_embd.weight"])
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            out.setdefault(f"blk.{i}.attn_qkv.bias", torch.zeros(qkv))
            out.setdefault(f"blk.{i}.attn_output.bias", torch.zeros(cfg.hidden_size))
    if params:
        raise GGUFError(f"no GGUF name for tensors {sorted(params)[:5]} of a {cfg.model_type} model")
    if arch in ROPE_PAIRS:
        for name in list(out):
            if ".attn_q." in name or ".attn_k." in name:
                n = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
                out[name] = _rope_permute(out[name], n)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return out


# ------------------------------------------------------------------------------------------ metadata
def _check_decoder(cfg, arch: str) -> None:
    def need(ok: bool, what: str):
        if not ok:
            raise GGUFError(f"{cfg.model_type} model with {what}: llama.cpp's {arch!r} architecture cannot run it")
    if arch == "gpt2":
        need(cfg.norm == "layernorm" and cfg.position == "learned" and cfg.mlp == "plain", "a non-GPT-2 block")
        need(cfg.hidden_act in ("gelu", "gelu_tanh"), f"hidden_act={cfg.hidden_act}")
        need(not cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx")
    elif arch in ("gptneox", "falcon", "command-r"):
        need(cfg.hidden_act == "silu" if arch == "command-r" else cfg.hidden_act in ("gelu", "gelu_tanh"),
             f"hidden_act={cfg.hidden_act}")
        need(arch != "falcon" or cfg.parallel_residual, "sequential blocks (parallel_attn=False)")
        need(arch == "gptneox" or not (cfg.attention_bias or cfg.mlp_bias), "linear biases")
        need(arch != "command-r" or cfg.tie_word_embeddings, "an untied output matrix")
        kind = (cfg.rope_scaling or {}).get("rope_type", "default")
        need(kind in ("default", "linear"), f"rope scaling {kind!r}")
    else:
        need(cfg.norm == "rmsnorm" and cfg.position == "rope", f"norm={cfg.norm}, position={cfg.position}")
        need(cfg.hidden_act == "silu" and (cfg.mlp == "gated" or cfg.num_local_experts), "a non-SwiGLU MLP")
        kind = (cfg.rope_scaling or {}).get("rope_type", "default")
        need(kind in ("default", "linear", "llama3", "yarn"), f"rope scaling {kind!r} (llama.cpp has no equivalent)")
        if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
            warnings.warn(f"sliding_window={cfg.sliding_window}: llama.cpp's {arch!r} architecture attends to the "
                          "whole context, so outputs differ from lmlab's once a sequence is longer than the window",
                          stacklevel=3)


def shape_metadata(w, cfg) -> None:
    """The `{arch}.*` sizes every architecture has."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)


def decoder_metadata(w, cfg, arch: str) -> None:
    shape_metadata(w, cfg)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.norm == "layernorm":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch == "gptneox":
        w.add_parallel_residual(cfg.parallel_residual)
    if arch == "command-r":
        w.add_logit_scale(1.0)  # lmlab folds a Cohere checkpoint's logit_scale into the final norm on load
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(sc["factor"])
    elif kind == "yarn":
        import gguf
        orig = sc.get("original_max_position_embeddings") or cfg.max_position_embeddings
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(sc.get("factor") or cfg.max_position_embeddings / orig)
        w.add_rope_scaling_orig_ctx_len(orig)
        for key, setter in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                            ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if sc.get(key):
                setter(float(sc[key]))
    if cfg.num_local_experts:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)


# ---------------------------------------------------------------------------------------------- write
def _encode(name: str, t: torch.Tensor, dtype: str):
    """(array, raw_dtype or None) for the writer: f32 for 1-D and F32_ALWAYS, else f16 or q8_0."""
    import gguf
    a = t.detach().float().cpu().numpy()
    if dtype == "f32" or a.ndim == 1 or any(k in name for k in F32_ALWAYS):
        return a.astype(np.float32), None
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def export_gguf(model_dir, out_path, dtype: str = "f32", name: str | None = None) -> Path:
    """Write `model_dir` (a model directory lmlab loads, with its tokenizer) to `out_path` as GGUF.
    dtype: f32 | f16 | q8_0. The file is written beside `out_path` and renamed into place when complete."""
    import gguf

    from lmlab.interop import gguf_vocab
    from lmlab.interop.hf import load_model
    from lmlab.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise GGUFError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    model = load_model(model_dir)
    if not hasattr(model, "lm_head") and model.config.model_type not in ("bert", "t5"):
        raise GGUFError(f"{model_dir}: a {type(model).__name__} (e.g. a reward model) has no llama.cpp equivalent")
    cfg = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise GGUFError(f"{model_dir}: model_type {cfg.model_type!r} has no GGUF export; supported: {sorted(ARCHS)}")
    if arch in ("bert", "t5"):
        from lmlab.interop import gguf_encoders
        tensors = gguf_encoders.tensors(model, arch)
    else:
        _check_decoder(cfg, arch)
        tensors = decoder_tensors(model, arch)
    tok = load_tokenizer(model_dir)

    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        run_dir = model_dir.resolve().parent if model_dir.name == "final" else model_dir.resolve()
        w.add_name(name or run_dir.name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch in ("bert", "t5"):
            gguf_encoders.metadata(w, cfg, arch, model_dir)
        else:
            decoder_metadata(w, cfg, arch)
        gguf_vocab.add_vocab(w, tok, cfg, arch)
        for tname, t in tensors.items():
            data, raw = _encode(tname, t, dtype)
            w.add_tensor(tname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------- read
def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata {key: value}, tensors {name: float32 array in PyTorch's (rows, cols) order}); quantised
    tensors are dequantised. For tests and checks, not for running the model."""
    import gguf
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else np.asarray(t.data)
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return meta, tensors


def llamacpp_chat(path, questions: list[str], max_tokens: int = 64, n_threads: int | None = None) -> list[str]:
    """Ask llama.cpp (llama-cpp-python, an optional dependency) each question as a one-turn chat with the GGUF
    file's own chat template, greedy -> the replies. How `lmlab speedrun` checks the file it exported."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=n_threads or min(4, os.cpu_count() or 1))
    out = []
    for q in questions:
        reply = llm.create_chat_completion([{"role": "user", "content": q}], temperature=0.0, max_tokens=max_tokens)
        out.append(reply["choices"][0]["message"]["content"] or "")
    return out
