"""BART (BartForConditionalGeneration): a post-norm encoder-decoder with learned absolute positions.

Where it differs from T5 (encoder_decoder.py, whose Seq2SeqModel gives it the decoder cache, label shifting,
cache bookkeeping and forward): token embeddings optionally scaled by sqrt(H) (scale_embedding); learned
positions stored with BART's offset of 2 (position p reads row p + 2 of the table, a fairseq leftover); a
LayerNorm right after the embeddings of each stack (layernorm_embedding); post-norm blocks x = norm(x + f(x))
with biases everywhere and exact GELU; attention scaled by 1/sqrt(hd) (layers.Attention); no final norm;
the head tied to the embeddings plus a fixed final_logits_bias (a buffer in transformers too).

Positions are absolute, so prompts are padded on the right (as transformers' BART tokenizer does).

Shapes: B batch, S encoder tokens, T new decoder tokens, K decoder keys (cached + new), H hidden, V vocab,
nh heads, hd head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.encoder_decoder import Seq2SeqCache, Seq2SeqModel, cross_bias, cross_kv, hidden_keys, hide
from lmlab.models.layers import MLP, Attention, make_norm

POS_OFFSET = 2  # BartLearnedPositionalEmbedding: rows 0 and 1 of the position table are never read


def check_config(cfg: ModelConfig):
    """Refuse the switches BART has no place for, rather than silently ignoring them."""
    want = dict(norm="layernorm", norm_eps=1e-5, mlp="plain", position="learned", attention_bias=True,
                attention_out_bias=True, mlp_bias=True, num_local_experts=0, sliding_window=None,
                num_key_value_heads=cfg.num_attention_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads)
    want |= {k: v for k, v in (("norm_bias", True), ("parallel_residual", False)) if hasattr(cfg, k)}
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ConfigError(f"model config: a BART model cannot have {bad}; BART has {({k: want[k] for k in bad})}")


class CrossAttention(Attention):
    """Decoder attention over the encoder output: queries from x (B, T, H), keys/values from source (B, S, H),
    projected once per generation and kept in the cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, causal=False)

    def heads(self, x):  # (B, T, nh * hd) -> (B, nh, T, hd)
        return x.view(x.shape[0], x.shape[1], self.nh, self.hd).transpose(1, 2)

    def forward(self, x, source, mask, cache: Seq2SeqCache | None):
        B, T, _ = x.shape
        q = self.heads(self.q_proj(x))  # (B, nh, T, hd)
        k, v = cross_kv(cache, self.layer_idx, lambda: (self.heads(self.k_proj(source)), self.heads(self.v_proj(source))))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Block(nn.Module):
    """Post-norm: x = norm(x + attn(x)), [decoder: x = norm(x + cross(x, encoder output))], x = norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, decoder: bool):
        super().__init__()
        self.attn = Attention(cfg, layer_idx, causal=decoder)  # HF: self_attn (out_proj is our o_proj)
        self.attn_norm = make_norm(cfg)
        if decoder:
            self.cross = CrossAttention(cfg, layer_idx)  # HF: encoder_attn
            self.cross_norm = make_norm(cfg)
        self.mlp = MLP(cfg)  # fc2(gelu(fc1 x))
        self.mlp_norm = make_norm(cfg)  # HF: final_layer_norm

    def forward(self, x, mask, cache=None, source=None, cross_mask=None):
        x = self.attn_norm(x + self.attn(x, None, mask, cache))
        if source is not None:
            x = self.cross_norm(x + self.cross(x, source, cross_mask, cache))
        return self.mlp_norm(x + self.mlp(x))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): positions, embedding norm,
    blocks."""

    def __init__(self, cfg: ModelConfig, n_layers: int, decoder: bool):
        super().__init__()
        self.max_pos = cfg.max_position_embeddings
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings + POS_OFFSET, cfg.hidden_size)
        self.embed_norm = make_norm(cfg)  # HF: layernorm_embedding
        self.layers = nn.ModuleList(Block(cfg, i, decoder) for i in range(n_layers))

    def forward(self, x, offset: int, mask, cache=None, source=None, cross_mask=None):
        """x (B, T, H): token embeddings of positions offset..offset+T-1 -> hidden states (B, T, H)."""
        T = x.shape[1]
        if offset + T > self.max_pos:
            raise ValueError(f"BART has {self.max_pos} positions; position {offset + T - 1} was asked for")
        pos = torch.arange(offset + POS_OFFSET, offset + T + POS_OFFSET, device=x.device)  # (T,)
        x = self.embed_norm(x + self.pos_embed(pos))
        for block in self.layers:
            x = block(x, mask, cache, source, cross_mask)
        return x


class Bart(Seq2SeqModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # HF: model.shared (both stacks and the head)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        self.encoder = Stack(cfg, cfg.num_hidden_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.num_decoder_layers or cfg.num_hidden_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # added to the logits and never trained (transformers registers it as a buffer too)
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))  # (1, V)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """transformers' BART init: weights N(0, init_std), biases 0, norms 1, the pad embedding 0."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0, std)
        if self.config.pad_token_id is not None:
            self.embed.weight[self.config.pad_token_id].zero_()
        self.final_logits_bias.zero_()
        self.tie_weights()

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) 1 = token, 0 = padding (on the right) -> (B, S, H)."""
        S = input_ids.shape[1]
        x = self.embed(input_ids) * self.embed_scale  # (B, S, H)
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        mask = hide(hidden_keys(S, S, 0, key_mask, False, x.device), x.dtype)  # (B, 1, 1|S, S) or None
        return self.encoder(x, 0, mask)

    def decode(self, decoder_input_ids, encoder_out, encoder_mask=None, cache: Seq2SeqCache | None = None,
               decoder_attention_mask=None) -> torch.Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, V), attending to encoder_out (B, S, H); the arguments are
        T5.decode's (encoder_mask (B, S); a Seq2SeqCache that advances by T; decoder_attention_mask (B, K))."""
        T = decoder_input_ids.shape[1]
        offset, K, key_mask = self.decoder_keys(T, cache, decoder_attention_mask, decoder_input_ids.device)
        x = self.embed(decoder_input_ids) * self.embed_scale  # (B, T, H)
        mask = None  # plain causal attention (SDPA's is_causal) when no key is padding and no chunk follows a cache
        if key_mask is not None or T not in (1, K):
            mask = hide(hidden_keys(T, K, offset, key_mask, True, x.device), x.dtype)  # (B|1, 1, T, K)
        h = self.decoder(x, offset, mask, cache, encoder_out, cross_bias(encoder_mask, x.dtype))  # (B, T, H)
        if cache is not None:
            cache.length = K
        return self.lm_head(h) + self.final_logits_bias.to(h.dtype)

    def save_pretrained(self, out_dir, dtype=None, **kw):
        """A BartForConditionalGeneration directory that transformers loads (final_logits_bias included)."""
        from lmlab.interop.hf_bart import save_pretrained
        save_pretrained(self, out_dir, dtype=dtype, **kw)
