"""Encoder-only Transformer: BERT and RoBERTa, with masked-LM, pooler, classification and embedding heads.

BERT:    word + learned position (0..T-1) + token-type embeddings, LayerNorm; post-norm blocks
         x = LN(x + attn(x)); x = LN(x + mlp(x)); MLM head dense -> act -> LN -> tied decoder + bias.
RoBERTa: the same blocks; positions start at pad_token_id + 1 and skip padding tokens; the MLM head
         always uses exact GELU; sequence classification reads <s> through dense -> tanh -> out_proj.

Shapes: B batch, T tokens, H hidden, V vocab, L labels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models.layers import ACT, MLP, Attention, ModelBase, make_norm


class Block(nn.Module):
    """Post-norm residual block: x = LN(x + attn(x)), then x = LN(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = Attention(cfg, layer_idx, causal=False)
        self.attn_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.mlp_norm = make_norm(cfg)

    def forward(self, x, mask):
        x = self.attn_norm(x + self.attn(x, None, mask, None))
        return self.mlp_norm(x + self.mlp(x))


class MLMHead(nn.Module):
    """dense -> act -> LayerNorm -> decoder, whose weight is the word embedding (tied) and bias its own."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act if cfg.model_type == "bert" else "gelu"]  # RoBERTa's head: exact GELU always
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x):  # (B, T, H) -> (B, T, V)
        return self.decoder(self.norm(self.act(self.dense(x))))


class Pooler(nn.Module):
    """BERT's pooled output: tanh(dense(hidden state of the first token))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h):  # (B, T, H) -> (B, H)
        return torch.tanh(self.dense(h[:, 0]))


def _init(module: nn.Module, std: float):
    """transformers' BERT init: normal(0, std) weights, zero biases, unit LayerNorms, zero padding rows."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
        if isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    for m in module.modules():  # after all weights: a tied decoder shares the word embedding
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()


class _Saveable(ModelBase):
    """Shared by Encoder and EncoderClassifier."""

    def save_pretrained(self, out_dir, dtype=None, **kw):
        """A transformers directory: Bert/Roberta Model, ForMaskedLM, ForSequenceClassification or
        ForTokenClassification, by the heads this model has."""
        from lmlab.interop.hf_encoder import save_pretrained
        save_pretrained(self, out_dir, dtype=dtype, **kw)


class Encoder(_Saveable):
    """BERT / RoBERTa backbone with an optional masked-LM head and pooler (names mirror the decoder's)."""

    family = "encoder"

    def __init__(self, cfg: ModelConfig, mlm_head: bool = True, pooler: bool = False):
        super().__init__()
        self.config = cfg
        H, pad = cfg.hidden_size, cfg.pad_token_id
        self.is_roberta = cfg.model_type == "roberta"
        if self.is_roberta and pad is None:
            raise ValueError("a RoBERTa model needs pad_token_id: its positions count from pad_token_id + 1")
        pad_row = pad if pad is not None and 0 <= pad < cfg.vocab_size else None  # no gradient, as in transformers
        self.embed = nn.Embedding(cfg.vocab_size, H, padding_idx=pad_row)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, H, padding_idx=pad if self.is_roberta else None)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, H) if cfg.type_vocab_size > 0 else None
        self.embed_norm = make_norm(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.pooler = Pooler(cfg) if pooler else None
        self.mlm = MLMHead(cfg) if mlm_head else None
        self.max_seq_length = None  # sentence-transformers' limit, when the loaded directory names one
        self.reset_parameters()

    def tie_weights(self):
        if self.mlm is not None:
            self.mlm.decoder.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        _init(self, self.config.initializer_range)
        self.tie_weights()

    @property
    def max_positions(self) -> int:
        """The longest sequence the position table holds (RoBERTa's positions start after pad_token_id)."""
        offset = self.config.pad_token_id + 1 if self.is_roberta else 0
        return self.config.max_position_embeddings - offset

    def position_ids(self, input_ids):
        """(B, T). BERT: 0..T-1. RoBERTa: pad + 1, pad + 2, ... over non-pad tokens, pad on padding
        (transformers' create_position_ids_from_input_ids: it looks at the ids, not the attention mask)."""
        if not self.is_roberta:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        pad = self.config.pad_token_id
        real = input_ids.ne(pad).long()  # (B, T)
        return real.cumsum(-1) * real + pad

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> last hidden states (B, T, H).

        attention_mask (B, T): 1 for real tokens, 0 for padding (right padding, as tokenizers pad encoders).
        token_type_ids (B, T): segment ids (BERT's sentence A/B), zeros by default.
        """
        pos = self.position_ids(input_ids)
        if int(pos.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than this model's "
                             f"{self.max_positions} positions (max_position_embeddings)")
        x = self.embed(input_ids) + self.pos_embed(pos)  # (B, T, H)
        if self.type_embed is not None:
            x = x + self.type_embed(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        x = self.embed_norm(x)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys a query may see
        for block in self.layers:
            x = block(x, mask)
        return x

    def pool(self, h):
        """(B, T, H) -> (B, H) through the pooler (BERT's next-sentence / classification input)."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (build it with Encoder(cfg, pooler=True))")
        return self.pooler(h)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> masked-LM logits (B, T, V) when the model has the MLM head, else hidden states (B, T, H)."""
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return self.mlm(h) if self.mlm is not None else h


class ClassificationHead(nn.Module):
    """RoBERTa's sequence head: out_proj(tanh(dense(x)))."""

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, x):  # (B, H) -> (B, L)
        return self.out_proj(torch.tanh(self.dense(x)))


class EncoderClassifier(_Saveable):
    """An encoder with a classification head, as transformers' *ForSequenceClassification / *ForTokenClassification.

    kind="sequence": BERT: classifier(pooler(h)); RoBERTa: classifier.out_proj(tanh(classifier.dense(h[:, 0]))).
    kind="token": classifier(h) at every position.
    `backbone` (an Encoder, e.g. after MLM pre-training) is used in place of a fresh one; its MLM head is dropped.
    """

    family = "encoder"

    def __init__(self, cfg: ModelConfig, num_labels: int = 2, kind: str = "sequence",
                 id2label: dict | None = None, backbone: Encoder | None = None):
        super().__init__()
        if kind not in ("sequence", "token"):
            raise ValueError(f"kind must be sequence|token, got {kind!r}")
        self.config, self.kind, self.num_labels = cfg, kind, num_labels
        self.id2label = {int(k): v for k, v in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
        if len(self.id2label) != num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries for {num_labels} labels")
        self.uses_pooler = uses_pooler = kind == "sequence" and cfg.model_type == "bert"
        if backbone is None:
            backbone = Encoder(cfg, mlm_head=False, pooler=uses_pooler)
        else:
            backbone.mlm = None
            if uses_pooler and backbone.pooler is None:
                backbone.pooler = Pooler(cfg).to(backbone.device, backbone.dtype)
                with torch.no_grad():
                    _init(backbone.pooler, cfg.initializer_range)
        self.backbone = backbone
        H = cfg.hidden_size
        roberta_seq = kind == "sequence" and cfg.model_type == "roberta"
        self.classifier = ClassificationHead(cfg, num_labels) if roberta_seq else nn.Linear(H, num_labels)
        self.classifier.to(backbone.device, backbone.dtype)
        with torch.no_grad():
            _init(self.classifier, cfg.initializer_range)

    def tie_weights(self):
        self.backbone.tie_weights()

    @torch.no_grad()
    def reset_parameters(self):
        self.backbone.reset_parameters()
        _init(self.classifier, self.config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """-> logits (B, L) for kind="sequence", (B, T, L) for kind="token"."""
        h = self.backbone.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        if self.kind == "token":
            return self.classifier(h)
        if self.uses_pooler:  # BERT
            return self.classifier(self.backbone.pool(h))
        return self.classifier(h[:, 0])  # RoBERTa: the <s> token


# ----------------------------------------------------------------------------------------- embeddings
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers' mean pooling): (B, T, H), (B, T) -> (B, H)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _special_counts(tok) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text ([CLS] ... [SEP]: (1, 1))."""
    full, plain = tok.encode("a"), tok.encode("a", add_special_tokens=False)
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return i, len(full) - i - len(plain)
    return 0, 0


@torch.no_grad()
def embed(model, tok, texts, normalize: bool = True, batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Sentence embeddings (N, H), float32 on the CPU: mean of the last hidden states over real tokens,
    L2-normalised (as sentence-transformers' Transformer -> Pooling(mean) -> Normalize).

    Texts longer than max_length tokens (default: the loaded directory's sentence_bert_config.json
    max_seq_length, else the model's position limit) lose their end, keeping the closing special token.
    """
    encoder = getattr(model, "backbone", model)
    if getattr(encoder, "family", None) != "encoder" or not hasattr(encoder, "hidden_states"):
        raise ValueError("embed needs an encoder model (BERT, RoBERTa)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    limit = min(max_length or encoder.max_seq_length or encoder.max_positions, encoder.max_positions)
    _, back = _special_counts(tok)
    seqs = []
    for t in texts:
        ids = tok.encode(t)
        if len(ids) > limit:
            ids = ids[:limit - back] + ids[len(ids) - back:]
        seqs.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (encoder.config.pad_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    out = torch.empty(len(seqs), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in rows], device=encoder.device)
        mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in rows], device=encoder.device)
        pooled = mean_pool(encoder.hidden_states(ids, mask).float(), mask)  # (b, H)
        if normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        out[rows] = pooled.cpu()
    return out
