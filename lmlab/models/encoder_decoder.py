"""Encoder-decoder Transformer: T5 v1.0 and v1.1 from one config.

T5 v1.0: ReLU MLP, embeddings tied to the LM head, decoder output scaled by d_model**-0.5 before the head.
T5 v1.1: gated-GELU(tanh) MLP, separate LM head, no scaling.
Both: pre-norm RMSNorm blocks without biases, attention without the 1/sqrt(hd) scaling, and a learned
relative position bias (bucketed key - query distances) computed by the first layer of each stack and
added in every layer of it. Decoder blocks add cross-attention over the encoder output.
Seq2SeqModel and the mask helpers here serve BART too (bart.py).

Shapes: B batch, S encoder tokens, T new decoder tokens, K decoder keys (cached + new), H hidden,
nh heads, hd head dim (T5's d_kv, which need not be H / nh).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.layers import MLP, KVCache, ModelBase, RMSNorm


def check_config(cfg: ModelConfig):
    """Refuse the switches T5 has no place for, rather than silently ignoring them."""
    want = dict(norm="rmsnorm", position="relative", attention_bias=False, attention_out_bias=False,
                mlp_bias=False, num_local_experts=0, sliding_window=None, num_key_value_heads=cfg.num_attention_heads)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ConfigError(f"model config: a T5 model cannot have {bad}; T5 has {({k: want[k] for k in bad})}")


def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket for each relative position rel = key - query: one bucket per distance below
    num_buckets / 2 (a quarter when bidirectional), log-spaced buckets up to max_distance, one beyond.
    Bidirectional (encoder): half the buckets are for keys after the query. Causal (decoder): keys after the
    query all fall in bucket 0 (the causal mask hides them)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # (the clamp only touches small distances, which take the exact branch)
    log_ratio = torch.log(dist.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


def hidden_keys(T: int, K: int, offset: int, key_mask: torch.Tensor | None, causal: bool, device):
    """Bool (B|1, 1, T, K), True = hidden, for queries at offset..offset+T-1 over keys 0..K-1: later keys when
    causal, padding (key_mask (B, >=K), 0 = padding) always; None when nothing is hidden."""
    q = torch.arange(offset, offset + T, device=device)[:, None]
    hidden = (torch.arange(K, device=device)[None, :] > q)[None, None] if causal else None  # (1, 1, T, K)
    if key_mask is not None:
        pad = ~key_mask[:, None, None, :K].bool()  # (B, 1, 1, K)
        hidden = pad if hidden is None else hidden | pad
    return hidden


def hide(hidden: torch.Tensor | None, dtype, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """An additive attention bias: `bias` (or zeros) with hidden keys at the most negative number rather than
    -inf, so that a query with no visible key (a padded one) averages the values instead of giving NaN."""
    if hidden is None:
        return bias
    if bias is None:
        bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    return bias.masked_fill(hidden, torch.finfo(dtype).min)


def cross_bias(encoder_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """Cross-attention's bias (B, 1, 1, S) hiding the encoder's padding (encoder_mask (B, S), 0 = padding)."""
    if encoder_mask is None or bool(encoder_mask.all()):
        return None
    return hide(~encoder_mask.bool()[:, None, None], dtype)


def cross_kv(cache, layer: int, project):
    """Cross-attention keys/values: project() -> (k, v) (B, nh, S, hd) of the encoder output, computed once and
    kept in the cache while decoding (the encoder output does not change)."""
    if cache is not None and cache.cross[layer] is not None:
        return cache.cross[layer]
    kv = project()
    if cache is not None:
        cache.cross[layer] = kv
    return kv


class Seq2SeqCache(KVCache):
    """Decoder self-attention keys/values, preallocated (B, nh, max_len, hd) per decoder layer (see KVCache), and
    the cross-attention keys/values of the encoder output (B, nh, S, hd), computed by the first decode call."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        dec = cfg.replace(num_hidden_layers=cfg.num_decoder_layers or cfg.num_hidden_layers)
        super().__init__(dec, batch_size, max_len, dtype, device)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * dec.num_hidden_layers

    def reorder(self, index: torch.Tensor):
        """Beam search: row b continues the hypothesis held in row index[b]."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.key_mask = self.key_mask.index_select(0, index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]


class T5Attention(nn.Module):
    """Multi-head attention with an additive bias and no 1/sqrt(hd) scaling (T5 folds it into the init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.hd = cfg.num_attention_heads, cfg.head_dim
        h, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.q = nn.Linear(h, inner, bias=False)
        self.k = nn.Linear(h, inner, bias=False)
        self.v = nn.Linear(h, inner, bias=False)
        self.o = nn.Linear(inner, h, bias=False)

    def heads(self, x):  # (B, T, nh * hd) -> (B, nh, T, hd)
        return x.view(x.shape[0], x.shape[1], self.nh, self.hd).transpose(1, 2)

    def forward(self, x, bias, layer: int = 0, cache: Seq2SeqCache | None = None, source=None):
        """x (B, T, H); bias (B|1, nh|1, T, keys): position bias and -big for hidden keys. source: the encoder
        output (B, S, H) for cross-attention, None for self-attention."""
        B, T, _ = x.shape
        q = self.heads(self.q(x))  # (B, nh, T, hd)
        if source is None:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nh, K, hd)
        else:  # (B, nh, S, hd)
            k, v = cross_kv(cache, layer, lambda: (self.heads(self.k(source)), self.heads(self.v(source))))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Block(nn.Module):
    """x + attn(norm(x)), [decoder: x + cross(norm(x), encoder output)], x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        if cross:
            self.cross_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.cross = T5Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)  # gated: wo(act(wi_0 x) * wi_1 x) (v1.1); plain: wo(act(wi x)) (v1.0)

    def forward(self, x, bias, layer, cache=None, source=None, cross_bias=None):
        x = x + self.attn(self.attn_norm(x), bias, layer, cache)
        if source is not None:
            x = x + self.cross(self.cross_norm(x), cross_bias, layer, cache, source)
        return x + self.mlp(self.mlp_norm(x))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) and its final norm."""

    def __init__(self, cfg: ModelConfig, n_layers: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.rel_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)
        self.layers = nn.ModuleList(Block(cfg, cross=decoder) for _ in range(n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def bias(self, T: int, K: int, offset: int, key_mask: torch.Tensor | None, dtype) -> torch.Tensor:
        """Position bias plus mask, (B|1, nh, T, K), for queries at offset..offset+T-1 over keys 0..K-1; hidden keys
        (padding; later tokens in the decoder) at the most negative number (see hide)."""
        device = self.rel_bias.weight.device
        q = torch.arange(offset, offset + T, device=device)[:, None]
        k = torch.arange(K, device=device)[None, :]
        buckets = relative_bucket(k - q, not self.decoder, self.cfg.relative_attention_num_buckets,
                                  self.cfg.relative_attention_max_distance)  # (T, K)
        bias = self.rel_bias(buckets).permute(2, 0, 1)[None].to(dtype)  # (1, nh, T, K)
        return hide(hidden_keys(T, K, offset, key_mask, self.decoder, device), dtype, bias)

    def forward(self, x, bias, cache=None, source=None, cross_bias=None):
        for i, block in enumerate(self.layers):
            x = block(x, bias, i, cache, source, cross_bias)
        return self.norm(x)


class Seq2SeqModel(ModelBase):
    """What T5 and BART (bart.py) share: the decoder cache, teacher forcing from labels, the decoder's cache and
    padding bookkeeping, forward. A subclass gives encode(input_ids, attention_mask) -> (B, S, H) and
    decode(decoder_input_ids, encoder_out, encoder_mask, cache, decoder_attention_mask) -> (B, T, vocab)."""

    family = "encoder-decoder"

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch_size: int, max_len: int) -> Seq2SeqCache:
        """A cache for decoding up to max_len decoder positions (the start token counts)."""
        return Seq2SeqCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: decoder inputs = [decoder_start] + labels[:-1], with -100 (ignored) as the pad id."""
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None or pad is None:
            raise ConfigError("model config: shifting labels needs decoder_start_token_id and pad_token_id")
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, pad)

    @staticmethod
    def decoder_keys(T: int, cache: Seq2SeqCache | None, decoder_attention_mask, device):
        """(offset, K, key_mask) of a decode call over T new tokens: the first new position, the keys attended
        (cached + new) and the decoder padding (B, >=K) or None. With a cache, padding is remembered for later
        steps and the cache's write slots are set (its length advances after the layers ran)."""
        offset = cache.length if cache is not None else 0
        K = offset + T
        key_mask = decoder_attention_mask
        if cache is not None:
            if K > cache.max_len:
                raise ValueError(f"decoder cache holds {cache.max_len} positions; {K} needed")
            if decoder_attention_mask is not None:  # remember padding for later steps
                cache.key_mask[:, : decoder_attention_mask.shape[1]] = decoder_attention_mask.bool()
                cache.has_padding = cache.has_padding or not bool(decoder_attention_mask.all())
            key_mask = cache.key_mask if cache.has_padding else None
            cache.index, cache.visible = torch.arange(offset, K, device=device), K
        elif key_mask is not None and bool(key_mask.all()):
            key_mask = None
        return offset, K, key_mask

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, T, vocab) for decoder_input_ids (B, T), or for the labels shifted right."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError(f"{type(self).__name__} needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_out, attention_mask, None, decoder_attention_mask)

    def save_pretrained(self, out_dir, dtype=None, **kw):
        """A *ForConditionalGeneration directory that transformers loads."""
        from lmlab.interop.hf import save_pretrained
        save_pretrained(self, out_dir, dtype=dtype, **kw)


class T5(Seq2SeqModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # HF: shared (both stacks and, tied, the head)
        self.encoder = Stack(cfg, cfg.num_hidden_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.num_decoder_layers or cfg.num_hidden_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """T5's init (Mesh TensorFlow, initializer_factor 1): each matrix has std 1/sqrt(fan-in), the query also
        carries the missing 1/sqrt(hd) attention scaling, embeddings std 1, norms 1. (An untied head also gets
        1/sqrt(H), where transformers uses 1, so that both variants start with logits of unit scale.)"""
        cfg = self.config
        h, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms (T5 has no biases)
            elif name == "embed.weight":
                p.normal_(0, 1.0)
            elif name.endswith(".q.weight"):
                p.normal_(0, (h * cfg.head_dim) ** -0.5)
            elif name.endswith(".o.weight"):
                p.normal_(0, inner ** -0.5)
            elif name.endswith("down_proj.weight"):
                p.normal_(0, cfg.intermediate_size ** -0.5)
            else:  # k, v, wi, rel_bias, untied lm_head
                p.normal_(0, h ** -0.5)
        self.tie_weights()

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) 1 = token, 0 = padding (either side) -> (B, S, H)."""
        S = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, S, H)
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        return self.encoder(x, self.encoder.bias(S, S, 0, key_mask, x.dtype))

    def decode(self, decoder_input_ids, encoder_out, encoder_mask=None, cache: Seq2SeqCache | None = None,
               decoder_attention_mask=None) -> torch.Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, vocab), attending to encoder_out (B, S, H).

        encoder_mask (B, S): the encoder's attention_mask (cross-attention skips padding).
        cache: a Seq2SeqCache; the new tokens follow the cached ones and its length advances by T (the
        cross-attention keys/values are computed on the first call and reused).
        decoder_attention_mask (B, K): 1 for real decoder tokens, covering cached and new ones.
        """
        T = decoder_input_ids.shape[1]
        offset, K, key_mask = self.decoder_keys(T, cache, decoder_attention_mask, decoder_input_ids.device)
        x = self.embed(decoder_input_ids)  # (B, T, H)
        bias = self.decoder.bias(T, K, offset, key_mask, x.dtype)  # (B|1, nh, T, K)
        # cross-attention has no position bias, only the encoder's padding
        h = self.decoder(x, bias, cache, encoder_out, cross_bias(encoder_mask, x.dtype))  # (B, T, H)
        if cache is not None:
            cache.length = K
        if self.config.tie_word_embeddings:  # v1.0: the tied head sees the output scaled by 1/sqrt(H)
            h = h * self.config.hidden_size ** -0.5
        return self.lm_head(h)
