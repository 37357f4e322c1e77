"""Decoder-only Transformer: GPT-2, Llama, Mistral, Mixtral, Qwen2, GPT-NeoX, Falcon and Cohere from one config.

GPT-2:   learned positions, LayerNorm, GELU(tanh) MLP, biases everywhere, tied head.
Llama:   RoPE, RMSNorm, SwiGLU, grouped-query attention.   Mistral: + sliding window.
Mixtral: Mistral with a sparse MoE in place of the MLP.     Qwen2:   Llama + bias on q/k/v.
PaLM-style parallel blocks (attention and MLP from the same input, one residual step):
GPT-NeoX: two LayerNorms, GELU MLP, biases, partial RoPE.   Falcon: one or two LayerNorms, multi-query or GQA.
Cohere:   one bias-free LayerNorm, SwiGLU, GQA, tied head (the palm-tiny preset's checkpoint form).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.models.layers import MLP, Attention, KVCache, ModelBase, MoE, Rotary, load_balancing_loss, make_norm
from lmlab.models.layers import attention_mask as build_mask


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    parallel_residual: x + attn(attn_norm(x)) + mlp(mlp_norm(x)), both branches read the same x; with
    shared_norm there is no mlp_norm and the MLP reads attn_norm(x) too.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.window = cfg.window(layer_idx)
        self.parallel = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = None if cfg.shared_norm else make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.num_local_experts else MLP(cfg)

    def forward(self, x, rope, masks, cache):
        h = self.attn_norm(x)  # (B, T, H)
        a = self.attn(h, rope, masks[self.window], cache)
        if self.parallel:
            return x + a + self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class Decoder(ModelBase):
    family = "decoder"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position == "learned" else None
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.windows = {b.window for b in self.layers}  # one mask per distinct window size, shared by its layers
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, initializer_range) weights; residual output projections scaled by 1/sqrt(2 * layers)
        (GPT-2), zero biases, unit norms."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.zero_())
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.normal_(0, std / (2 * self.config.num_hidden_layers) ** 0.5)
            else:
                p.normal_(0, std)
        self.tie_weights()

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Final normalised hidden states (B, T, H). Arguments as in `forward`."""
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            return self._packed(input_ids, attention_mask, position_ids, cache)
        offset = cache.length if cache is not None else 0
        key_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if cache is not None:  # remember padding for later decode steps
                cache.key_mask[:, : attention_mask.shape[1]] = attention_mask
                cache.has_padding = cache.has_padding or not bool(attention_mask.all())
            elif not bool(attention_mask.all()):
                key_mask = attention_mask
        if cache is not None and cache.has_padding:
            key_mask = cache.key_mask
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        if cache is not None and offset + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {offset + T} needed")
        self._check_positions(position_ids)
        x, rope = self.embed_tokens(input_ids, position_ids)
        if cache is None:
            masks = {w: build_mask(torch.arange(T, device=x.device), T, key_mask, w) for w in self.windows}
            return self.run_layers(x, rope, masks, None)
        cache.index = torch.arange(offset, offset + T, device=x.device)
        cache.visible = offset + T
        masks = {w: build_mask(cache.index, cache.visible, key_mask, w) for w in self.windows}
        x = self.run_layers(x, rope, masks, cache)
        cache.length += T
        return x

    def _packed(self, input_ids, mask, position_ids, cache):
        """Packed sequences (posttrain.pack_sequences): mask (B, 1, T, T) bool, True = may attend, with the
        position_ids of each token in its own sequence; sliding windows apply to those positions."""
        if position_ids is None or cache is not None or mask.dtype != torch.bool:
            raise ValueError("a 4-D attention_mask (packed sequences) must be bool and comes with position_ids, "
                             "without a KV cache")
        self._check_positions(position_ids)
        x, rope = self.embed_tokens(input_ids, position_ids)
        masks = {}
        for w in self.windows:  # Mistral: key j is visible when pos(q) - window < pos(j)
            near = position_ids[:, None, :, None] - position_ids[:, None, None, :] < w if w is not None else True
            masks[w] = mask & near
        return self.run_layers(x, rope, masks, None)

    def _check_positions(self, position_ids):
        if self.pos_embed is not None and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_position_embeddings "
                             f"({self.config.max_position_embeddings}) of this learned-position model")

    def embed_tokens(self, input_ids, position_ids):
        """input_ids, position_ids (B, T) -> token (+ learned position) embeddings (B, T, H), RoPE cos/sin or None."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        return x, rope

    def decode_step(self, input_ids, position_ids, cache: KVCache, head: bool = True):
        """One new token per row: input_ids, position_ids (B, 1) -> logits (B, vocab), or the final hidden states
        (B, H) with head=False; the body of the compiled decode step (lmlab.inference.kernels). Attention reads all
        max_len cache slots, the mask hiding those not written yet, so the shapes never change and one graph serves
        every step. The caller has set cache.index (the slot written, a tensor) and cache.visible = cache.max_len,
        and advances cache.length after."""
        x, rope = self.embed_tokens(input_ids, position_ids)
        key_mask = cache.key_mask if cache.has_padding else None
        masks = {w: build_mask(cache.index, cache.max_len, key_mask, w, static=True) for w in self.windows}
        h = self.run_layers(x, rope, masks, cache)[:, -1]
        return self.lm_head(h) if head else h

    def run_layers(self, x, rope, masks, cache):
        """The blocks and the final norm: (B, T, H) -> (B, T, H)."""
        for block in self.layers:
            x = block(x, rope, masks, cache)
        return self.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """input_ids (B, T) -> logits (B, T, vocab).

        attention_mask (B, S): 1 for real tokens, 0 for (left) padding, covering cached and new tokens; or a
            bool (B, 1, T, T) mask of packed sequences (True = may attend) with their position_ids.
        position_ids (B, T): default counts real tokens (so a left-padded row matches its unpadded self).
        cache: a KVCache; the new keys/values are appended to it and its length advances by T.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def aux_loss(self) -> torch.Tensor:
        """Mixtral's load-balancing loss over the router logits of the last forward (0 for dense models)."""
        logits = [b.mlp.router_logits for b in self.layers if isinstance(b.mlp, MoE)]
        if not logits:
            return torch.zeros((), device=self.device)
        return load_balancing_loss(logits, self.config.num_experts_per_tok)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def save_pretrained(self, out_dir, **kw):
        from lmlab.interop.hf import save_pretrained
        save_pretrained(self, out_dir, **kw)


