"""Pre-training objectives of the encoder families, as loaders and losses for the one training loop.

    BERT (masked LM):      window (B, T) -> inputs with 15% of tokens masked 80/10/10, labels (-100 elsewhere)
    T5 (span corruption):  window (B, R) -> inputs with spans replaced by sentinels, targets "<x0> span0 <x1> ..."
    BART (denoising):      window (B, T) -> inputs with sentences shuffled and spans infilled by <mask>, targets
                           the window itself

The masks are drawn from a generator seeded by (train.seed, rank, batches served), so a resumed run sees
exactly the masks it would have seen; validation masks are fixed per batch, so val_loss is comparable
across evaluations.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.objectives import (
    collate_span_corruption,
    denoise,
    mask_tokens,
    raw_length_for_inputs,
    sentence_end_ids,
    sentinel_ids,
    span_corruption,
    word_ids_from_tokens,
)
from lmlab.train import dist

IGNORE = -100


class CorruptingLoader:
    """Wraps a TokenLoader of raw windows; `corrupt(window (B, L), seed) -> batch` makes the objective's batch."""

    def __init__(self, inner, corrupt, seed: int):
        self.inner, self.corrupt, self.seed, self.served = inner, corrupt, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        x, y = next(self.inner)
        self.served += 1
        return self.corrupt(torch.cat([x, y[:, -1:]], dim=1), [self.seed, dist.rank(), self.served])

    def iter_eval(self, max_batches=None):
        for i, (x, y) in enumerate(self.inner.iter_eval(max_batches)):
            yield self.corrupt(torch.cat([x, y[:, -1:]], dim=1), [self.seed, 10**6 + dist.rank(), i])

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.served = int(state["served"])

    def __getattr__(self, name):  # tokens, text_bytes, steps_per_epoch ... of the wrapped loader
        return getattr(self.inner, name)


def window_len(family: str, seq_len: int, dc, model_type: str | None = None) -> int:
    """Raw tokens per training row: seq_len for BERT and BART (whose noised inputs are never longer than the
    window); for T5 the raw length whose corrupted inputs fill seq_len."""
    if family == "encoder-decoder" and model_type != "bart":
        return raw_length_for_inputs(seq_len, dc.noise_density, dc.mean_noise_span_length)
    return seq_len


def word_scheme(tok) -> str:
    """How a tokenizer marks words: SentencePiece's "▁", WordPiece's "##" continuations, or byte-level "Ġ"."""
    if tok.backend == "sentencepiece":
        return "metaspace"
    tokens = (tok.id_to_token(i) for i in range(tok.vocab_size))
    return "wordpiece" if any(t and t.startswith("##") for t in tokens) else "bytelevel"


def mlm_corrupter(tok, vocab_size: int, mlm_probability: float = 0.15, whole_word: bool = False):
    if tok.mask_token_id is None:
        raise ValueError("masked-LM pre-training needs a tokenizer with a mask token ([MASK] or <mask>)")
    special = sorted(tok.special_ids)
    scheme, special_tokens = word_scheme(tok), {tok.id_to_token(i) for i in special}

    def corrupt(window, seed):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        words = None
        if whole_word:  # (B, T) word index per token, -1 for specials
            words = torch.tensor([word_ids_from_tokens([tok.id_to_token(i) for i in row], scheme, special_tokens)
                                  for row in window.tolist()])
        return mask_tokens(window, mask_token_id=tok.mask_token_id, vocab_size=vocab_size, special_ids=special,
                           mlm_probability=mlm_probability, generator=g, word_ids=words)  # (inputs, labels)
    return corrupt


def span_corrupter(tok, noise_density: float = 0.15, mean_span: float = 3.0, targets: str = "spans"):
    sentinels, eos, pad = sentinel_ids(tok), tok.eos_token_id, tok.pad_token_id
    if eos is None or pad is None:
        raise ValueError("span corruption needs a tokenizer with eos and pad tokens")

    def corrupt(window, seed):
        rng = np.random.default_rng(seed)
        pairs = []
        for row in window.tolist():
            row = [t for t in row if t not in sentinel_set]  # a sentinel in raw text is not kept
            pairs.append(span_corruption(row, sentinel_ids=sentinels, eos_id=eos, noise_density=noise_density,
                                         mean_noise_span_length=mean_span, rng=rng, targets=targets))
        return collate_span_corruption(pairs, pad)  # input_ids (B, S), attention_mask (B, S), labels (B, L)
    sentinel_set = set(sentinels)
    return corrupt


def denoising_corrupter(tok, mask_ratio: float = 0.3, poisson_lambda: float = 3.0, permute_ratio: float = 1.0):
    mask, pad = tok.mask_token_id, tok.pad_token_id
    if mask is None or pad is None:
        raise ValueError("BART denoising needs a tokenizer with <mask> and pad tokens")
    ends = sentence_end_ids(tok)

    def corrupt(window, seed):
        rng = np.random.default_rng(seed)
        pairs = [denoise([t for t in row if t != mask], mask_id=mask, sentence_end_ids=ends, mask_ratio=mask_ratio,
                         poisson_lambda=poisson_lambda, permute_ratio=permute_ratio, rng=rng)
                 for row in window.tolist()]  # (a <mask> in raw text is not kept)
        return collate_span_corruption(pairs, pad)  # input_ids (B, S), attention_mask (B, S), labels (B, T)
    return corrupt


def seq2seq_loss(model):
    """Cross-entropy of the decoder on the targets: batch = (input_ids, attention_mask, labels (-100 = pad))."""
    def loss_fn(step_model, batch):
        ids, mask, labels = (t.to(model.device) for t in batch)
        logits = step_model(ids, attention_mask=mask, labels=labels)  # (B, L, V)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE), {}
    return loss_fn


def objective(family: str, model, tok, dc):
    """(corrupt, loss_fn) of a family's pre-training objective, with the data.* settings in `dc`. The MLM loss
    is SFT's: cross-entropy where the label is not -100 (here: the selected tokens)."""
    from lmlab.train.sft import masked_lm_loss

    if family == "encoder":
        return mlm_corrupter(tok, model.config.vocab_size, dc.mlm_probability, dc.whole_word_mask), masked_lm_loss(model)
    if model.config.model_type == "bart":
        return denoising_corrupter(tok, dc.mask_ratio, dc.poisson_lambda, dc.permute_sentences), seq2seq_loss(model)
    return span_corrupter(tok, dc.noise_density, dc.mean_noise_span_length, dc.span_targets), seq2seq_loss(model)


@torch.no_grad()
def evaluate_objective(model, loader: CorruptingLoader, loss_fn, max_batches=None) -> dict:
    """Mean loss over the validation split's fixed corruptions (all ranks together), per target token."""
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for batch in loader.iter_eval(max_batches):
        labels = batch[-1]
        n = int((labels != IGNORE).sum())
        total += float(loss_fn(model, batch)[0]) * n
        count += n
    total, count = dist.total(total), dist.total(count)
    loss = float(total / max(count, 1))
    return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50))), "val_tokens": int(count)}
