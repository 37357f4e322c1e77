"""Building blocks shared by every family: norms, RoPE (+ scaling), attention with a KV cache, MLPs, MoE.

Shapes: B batch, T new tokens, S keys (cached + new), H hidden, nh/nkv query/key-value heads, hd head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig


class ModelBase(nn.Module):
    """What every lmlab model answers: its device and dtype (those of its first weight) and its parameter count
    (tied weights counted once)."""

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


# ----------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # low precision: normalise in fp32, cast back, then scale (the order transformers uses)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


# ------------------------------------------------------------------------------------------------ RoPE
def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rd/2,) and the cos/sin scale, for every RoPE scaling type transformers has.

    rd = cfg.rotary_dim (head_dim, or its first part with a partial_rotary_factor, as transformers computes it).
    `seq_len` matters only for dynamic NTK, which stretches the base once a sequence is longer than
    max_position_embeddings (recomputed per forward, as transformers does).
    """
    dim, base = cfg.rotary_dim, cfg.rope_theta
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (rd/2,)
    if kind == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = sc["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        return inv_freq / sc["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, sc, dim, base)
    return inv_freq, 1.0


def _yarn(cfg, sc, dim, base):
    orig = sc.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = sc.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = sc.get("attention_factor")
    if attn_factor is None:
        if sc.get("mscale") and sc.get("mscale_all_dim"):
            attn_factor = mscale(factor, sc["mscale"]) / mscale(factor, sc["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns in `orig` tokens
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


class Rotary(nn.Module):
    """cos/sin tables for given positions, in the rotate-half layout of Hugging Face checkpoints.

    The frequencies stay fp32 when the model is cast (`model.to(torch.bfloat16)`, `load_model(dtype=...)`), as in
    transformers' `from_pretrained(dtype=...)`: rounded to bf16 they turn the rotation at position 1000 by up to
    0.4 rad."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset(self):
        """Recompute the frequencies (after the model was built on the meta device and materialised, or cast)."""
        self.inv_freq = rope_inv_freq(self.cfg)[0].to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):  # a cast rounded them
            self.reset()
        return self

    def forward(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq = rope_inv_freq(self.cfg, seq_len)[0].to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, rd): broadcast over heads


def apply_rope(x, cos, sin):
    """x: (B, n_heads, T, hd), cos/sin (B, 1, T, rd). Rotate pairs (i, i + rd/2) of the first rd dims; with
    partial rotary (rd < hd, GPT-NeoX) the other dims pass through unrotated."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    h = rd // 2  # cos/sin repeat their first half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2, c, s = x[..., :h], x[..., h:], cos[..., :h], sin[..., :h]
    # on the halves rather than x * cos + cat(-x2, x1) * sin: bit-identical, and the kernels Inductor makes of it
    # take half the time (RoPE ~50 -> ~25 ms of a 1.1 s compiled `small` bf16 step; eager steps 1.01x too)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# -------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys/values for every layer: (B, nkv, max_len, hd) each, written in place.

    `length` counts the positions filled so far (shared by the batch: prompts of different lengths
    are left-padded and `key_mask` marks the padding). Before its layers run, the model sets `index`
    (the slots being written) and `visible` (how many slots attention reads); it advances `length`
    after. Eager calls read only the filled slots; a compiled decode step reads all max_len slots
    (the causal mask hides those not written yet), so its shapes never change and it compiles once.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # False = padding
        self.has_padding = False
        self.length = 0
        self.max_len = max_len
        self.index = None  # (T,) slots written by the current forward
        self.visible = 0  # slots attention reads in the current forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nkv, T, hd) at `index`; return the visible keys/values (B, nkv, visible, hd)."""
        self.k[layer].index_copy_(2, self.index, k)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer][:, :, : self.visible], self.v[layer][:, :, : self.visible]


# ------------------------------------------------------------------------------------------- attention
def attention_mask(q_pos: torch.Tensor, k_len: int, key_mask: torch.Tensor | None,
                   window: int | None, static: bool = False) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, q_len, k_len), True = may attend; None when plain causal SDPA suffices.

    q_pos (q_len,): the key index of each query (its cache slot; arange(q_len) without a cache), a tensor so that
    a compiled decode step can take a new position each step without recompiling. Causal (which also hides cache
    slots not written yet), optionally limited to the last `window` keys (Mistral: key j is visible when
    q - window < j <= q), and padded keys hidden. A padded query would see no key at all (SDPA returns NaN), so
    every query may always see itself.
    """
    q_len = q_pos.shape[0]
    if key_mask is None and (window is None or k_len <= window):
        if q_len == k_len:
            return None  # is_causal fast path
        if q_len == 1 and not static:  # (a static cache also holds slots not written yet)
            return None  # one new token that sees every key
    q_pos = q_pos[:, None]
    k_pos = torch.arange(k_len, device=q_pos.device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None]  # (1, 1, q, k)
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, None, :k_len]) | (k_pos == q_pos)
    return allowed


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """One query per row: q (B, nh, 1, hd), k/v (B, nkv, S, hd), mask (B|1, 1, 1, S) bool or None -> (B, nh, 1, hd).
    The query heads of a kv head are grouped as rows of one product (GQA without repeating k/v). Used inside a
    compiled decode step, where it fuses into a few small loops; SDPA's CPU kernel costs more in setup than in
    work at this size."""
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    s = (q.view(B, nkv, nh // nkv, hd) @ k.transpose(-1, -2)).float() * scale  # (B, nkv, g, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).to(v.dtype)
    return (p @ v).view(B, nh, 1, hd)


def causal_attention_blocks(q, k, v, scale: float, block: int = 64) -> torch.Tensor:
    """Causal self-attention as plain math in blocks of queries: q (B, nh, T, hd), k/v (B, nkv, T, hd) ->
    (B, nh, T, hd). Used in compiled training on a CPU, where it beats SDPA's CPU kernel (docs/benchmarks.md):
    the queries of a block multiply only the keys up to the block's end (at T=256 and 64-row blocks 5/8 of the
    square), the query heads of a kv head are rows of one product (GQA without repeating k/v), and Inductor
    fuses the mask, softmax and casts. Scores are products and softmax in fp32, as in SDPA's kernels (rounded to
    bf16 they carry twice the error at a trained model's scores of +-10); the probabilities take v's dtype."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        n = end - start
        qb = q[:, :, start:end].reshape(B, nkv, g * n, hd)  # rows: the g query heads of each kv head
        with torch.autocast(q.device.type, enabled=False):
            s = (qb.float() @ k[:, :, :end].float().transpose(-1, -2)) * scale  # (B, nkv, g*n, end)
        allowed = torch.arange(end, device=q.device) <= torch.arange(start, end, device=q.device)[:, None]  # (n, end)
        s = s.view(B, nkv, g, n, end).masked_fill(~allowed, float("-inf"))
        p = s.softmax(-1).to(v.dtype).view(B, nkv, g * n, end)
        out.append((p @ v[:, :, :end]).view(B, nh, n, hd))
    return torch.cat(out, 2)


class Attention(nn.Module):
    """Self-attention. causal=False (encoders) lets every token see every other unpadded token."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool = True):
        super().__init__()
        self.layer_idx, self.causal = layer_idx, causal
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=cfg.attention_out_bias)
        self.scale = self.hd ** -0.5 / ((layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)

    def forward(self, x, rope, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, visible, hd), masked by `mask`
        if T == 1 and torch.compiler.is_compiling():  # a compiled decode step: plain math that Inductor fuses
            y = decode_attention(q, k, v, mask, self.scale)
        elif (self.causal and mask is None and cache is None and q.device.type == "cpu"
              and torch.compiler.is_compiling()):  # compiled training on a CPU
            y = causal_attention_blocks(q, k, v, self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1,
                                               scale=self.scale, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


# ------------------------------------------------------------------------------------------------ MLPs
class MLP(nn.Module):
    """gated: down(act(gate(x)) * up(x)) (SwiGLU); plain: down(act(up(x))) (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated = cfg.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """Sparse Mixture of Experts (Mixtral): softmax router, top-k, weights renormalised over the k.

    Experts are stacked tensors. Tokens are dispatched by sorting their (token, expert) assignments
    by expert, so each expert that received tokens runs one matmul over a contiguous slice; experts
    with no token cost nothing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.top_k, self.num_experts = cfg.num_experts_per_tok, E
        self.router = nn.Linear(h, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, i, h))  # per expert, nn.Linear layout (out, in)
        self.w_up = nn.Parameter(torch.empty(E, i, h))
        self.w_down = nn.Parameter(torch.empty(E, h, i))
        self.act = ACT[cfg.hidden_act]
        self.router_logits = None  # (N, E) from the last forward, for the load-balancing loss

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)  # (N, H)
        logits = self.router(x)  # (N, E)
        self.router_logits = logits
        probs = logits.float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        flat_expert = experts.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)
        token = order // self.top_k  # token index of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        xs = x[token]  # (N*k, H), grouped by expert
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[start:start + n]
            h = self.act(h @ self.w_gate[e].t()) * (h @ self.w_up[e].t())
            outs.append(h @ self.w_down[e].t())
            start += n
        ys = torch.cat(outs) * weights.reshape(-1)[order, None]  # (N*k, H)
        out = torch.zeros_like(x).index_add_(0, token, ys)
        return out.view(B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, as transformers computes it: E * sum_e f_e * P_e, where f_e is
    the fraction of top-k assignments that go to expert e and P_e its mean router probability."""
    logits = torch.cat(router_logits).float()  # (layers * N, E)
    E = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).float()  # (M, k, E)
    tokens_per_expert = chosen.mean(dim=0)  # (k, E)
    return E * (tokens_per_expert * probs.mean(dim=0)).sum()
