"""Checks shared by the encoder-decoder parity tests (T5, BART): logits on padded batches, cached decoding against
a full forward, transformers' generate on right-padded prompts."""
import torch

from lmlab.inference.seq2seq import pad_right


def padded_batch(seed: int, vocab: int, low: int, left_pad_encoder: bool):
    """Encoder ids (3, 30) in [low, vocab): row 0 padded on the right, row 1 on the left (left_pad_encoder: T5, whose
    positions are relative) or on the right (BART, whose positions are absolute), row 2 not at all; decoder ids
    (3, 22): row 0 padded on the right, row 1 on the left, row 2 not at all. -> (ids, mask, dec, dec_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(low, vocab, (3, 30), generator=g), torch.randint(0, vocab, (3, 22), generator=g)
    mask, dec_mask = torch.ones_like(ids), torch.ones_like(dec)
    mask[0, 21:] = 0
    if left_pad_encoder:
        mask[1, :9] = 0
    else:
        mask[1, 12:] = 0
    dec_mask[0, 15:] = 0
    dec_mask[1, :5] = 0
    return ids, mask, dec, dec_mask


def max_logit_diff(hf, ours, batch) -> float:
    """Max abs logit difference on every real decoder position of a padded batch (ids, mask, dec, dec_mask) whose
    decoder row 0 is padded on the right (its padded queries still see the real tokens before them, so they are
    compared too); padded decoder queries on the left see no key at all: what they compute is arbitrary."""
    ids, mask, dec, dec_mask = batch
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert torch.isfinite(got).all()
    real = dec_mask.bool()
    real[0] = True
    return (ref[real] - got[real]).abs().max().item()


def cached_decode_diff(model, ids, mask, dec) -> float:
    """Max abs difference between decoding dec (B, T) from a cache, in a prefill chunk, single steps and another
    chunk, and one full decoder forward."""
    with torch.no_grad():
        enc = model.encode(ids, mask)
        full = model.decode(dec, enc, mask)
        cache = model.new_cache(dec.shape[0], dec.shape[1])
        steps, t = [], 0
        for n in [4, 1, 1, 3, 1] + [1] * (dec.shape[1] - 10):
            steps.append(model.decode(dec[:, t: t + n], enc, mask, cache))
            t += n
    assert cache.length == dec.shape[1]
    return (torch.cat(steps, dim=1) - full).abs().max().item()


def hf_generate(hf, prompts, pad_id, max_new, **kw) -> list[list[int]]:
    """transformers' deterministic generate on right-padded prompts -> new tokens per row (no start token)."""
    ids, mask = pad_right(prompts, pad_id)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, **kw)
    return [row[1:] for row in out.tolist()]


def same_as_hf(ours_rows, hf_rows, fill_ids) -> bool:
    """Equal rows, where transformers fills a row that stopped with one of fill_ids."""
    return all(h[: len(o)] == o and set(h[len(o):]) <= set(fill_ids) for o, h in zip(ours_rows, hf_rows))
