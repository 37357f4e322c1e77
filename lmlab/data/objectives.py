"""Pre-training objectives of the three families: causal LM targets, BERT masked-LM masking, T5 span corruption,
BART denoising (text infilling + sentence permutation).

    x, y = causal_lm(window)                                   # (B, T+1) -> (B, T), (B, T)
    inputs, labels = mask_tokens(ids, mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                                 special_ids=tok.special_ids, generator=g)      # BERT / RoBERTa
    inputs, targets = span_corruption(ids, sentinel_ids=sentinel_ids(tok), eos_id=tok.eos_token_id, rng=rng)  # T5
    inputs, targets = denoise(ids, mask_id=tok.mask_token_id, sentence_end_ids=sentence_end_ids(tok), rng=rng)  # BART

A tokenizer carries the tokens these need when it is trained with them:
    Tokenizer.train(docs, 8000, kind="bpe", special_roles={"mask_token": "<mask>"})         # [MASK] for BERT
    Tokenizer.train(docs, 8000, kind="unigram", special_tokens=sentinel_tokens(100))        # T5's sentinels
("wordpiece" has [CLS] [SEP] [MASK] [PAD] already.)

Masked LM follows transformers' DataCollatorForLanguageModeling draw for draw, so the same torch.Generator
seed gives the same inputs and labels as `collator.torch_mask_tokens`. Span corruption follows T5's
`random_spans_noise_mask` and `noise_span_to_unique_sentinel` (t5/data/preprocessors.py). Denoising follows the
BART paper and fairseq's DenoisingDataset (mask 0.3, span-poisson lambda 3, replace length 1, permute sentences 1),
with spans placed apart (see infilling_spans).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # the label cross_entropy ignores


# -------------------------------------------------------------------------------------------- causal LM
def causal_lm(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) window -> inputs (B, T), targets (B, T): predict token t+1 from tokens 0..t."""
    return ids[:, :-1], ids[:, 1:]


# -------------------------------------------------------------------------------------------- masked LM
def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_ids: Iterable[int] = (),
                mlm_probability: float = 0.15, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                generator: torch.Generator | None = None, word_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a (B, T) batch -> (inputs, labels), both (B, T) int64.

    Each token whose id is not in special_ids is selected with probability mlm_probability. Of the
    selected tokens, mask_replace_prob become mask_token_id, random_replace_prob become a random id drawn
    uniformly from 0..vocab_size-1 (special ids included, as transformers does), and the rest keep their
    id. labels hold the original id at selected positions and -100 everywhere else.

    Whole-word masking (word_ids given: (B, T) word index of each token, -1 for special and padding
    tokens; a word's tokens are consecutive): each word is selected with probability mlm_probability
    (drawn at its first token) and all its tokens go together; the 80/10/10 choice is then made per token,
    as in Google's BERT create_pretraining_data.py and transformers 4's DataCollatorForWholeWordMask.
    (transformers 5's DataCollatorForLanguageModeling(whole_word_mask=True) replaces every selected token
    with [MASK]: pass mask_replace_prob=1.0, random_replace_prob=0.0 for exactly that.)

    The draws run on the CPU, in transformers' order, with `generator` (or torch's global generator);
    the results come back on the input's device.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"mask_tokens: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    for name, p in (("mlm_probability", mlm_probability), ("mask_replace_prob", mask_replace_prob),
                    ("random_replace_prob", random_replace_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mask_tokens: {name}={p} is not a probability")
    if mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError("mask_tokens: mask_replace_prob + random_replace_prob must not exceed 1")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_tokens: mask_token_id {mask_token_id} is outside the vocabulary (0..{vocab_size - 1})")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("mask_tokens: the draws run on the CPU; pass a CPU torch.Generator")
    device = input_ids.device
    inputs = input_ids.detach().to("cpu", torch.long, copy=True)  # (B, T)
    labels = inputs.clone()
    special = torch.isin(inputs, torch.tensor(sorted(set(special_ids)), dtype=torch.long))  # (B, T) never selected

    prob = torch.full(labels.shape, float(mlm_probability))  # (B, T)
    if word_ids is None:
        prob.masked_fill_(special, 0.0)
        selected = torch.bernoulli(prob, generator=generator).bool()
    else:
        in_word, starts, first = _word_starts(word_ids, special)
        prob.masked_fill_(~starts, 0.0)  # one draw per word, at its first token
        drawn = torch.bernoulli(prob, generator=generator).bool()  # (B, T)
        selected = drawn.gather(1, first) & in_word & ~special  # every token takes its word's draw
    labels[~selected] = IGNORE_INDEX

    replaced = torch.bernoulli(torch.full(labels.shape, float(mask_replace_prob)), generator=generator).bool()
    replaced &= selected
    inputs[replaced] = mask_token_id
    if mask_replace_prob == 1.0 or random_replace_prob == 0.0:
        return inputs.to(device), labels.to(device)
    # of the selected tokens not replaced by [MASK], this share becomes random: 0.1 / 0.2 = 0.5 by default
    scaled = random_replace_prob / (1.0 - mask_replace_prob)
    randomized = torch.bernoulli(torch.full(labels.shape, scaled), generator=generator).bool() & selected & ~replaced
    random_ids = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)  # (B, T)
    inputs[randomized] = random_ids[randomized]
    return inputs.to(device), labels.to(device)


def _word_starts(word_ids, special: torch.Tensor):
    """-> (in_word, starts, first): (B, T) bool tokens that belong to a word, (B, T) bool first token of each
    word, (B, T) int64 position of the first token of each token's word (0 outside words)."""
    w = torch.as_tensor(word_ids).to("cpu", torch.long)
    if w.shape != special.shape:
        raise ValueError(f"mask_tokens: word_ids has shape {tuple(w.shape)}, input_ids {tuple(special.shape)}")
    in_word = w >= 0
    prev_w = torch.nn.functional.pad(w[:, :-1], (1, 0), value=-1)  # (B, T) word id of the token before
    prev_in = torch.nn.functional.pad(in_word[:, :-1], (1, 0), value=False)
    starts = in_word & (~prev_in | (w != prev_w))
    keys = w[starts] + (int(w.max()) + 1 if w.numel() else 1) * torch.nonzero(starts)[:, 0]  # (row, word) per start
    if keys.unique().numel() != keys.numel():
        raise ValueError("mask_tokens: word_ids must give each word's tokens consecutively (a word id occurs in "
                         "two separate runs of a row)")
    pos = torch.arange(w.shape[1]).expand_as(w)
    first = torch.where(starts, pos, -1).cummax(dim=1).values.clamp(min=0)  # (B, T) latest start at or before t
    return in_word, starts, first


def mlm_collate(seqs: Sequence[Sequence[int]], *, pad_id: int, mask_token_id: int, vocab_size: int,
                special_ids: Iterable[int] = (), word_ids: Sequence[Sequence[int]] | None = None, **mask_kw):
    """Right-pad token lists and mask them -> (input_ids, attention_mask, labels), each (B, T) int64.

    Padding is never selected; word_ids (one list per sequence) are padded with -1. mask_kw goes to
    mask_tokens (mlm_probability, mask_replace_prob, random_replace_prob, generator)."""
    ids, attention_mask = pad_with_mask([list(s) for s in seqs], pad_id)
    words = None if word_ids is None else pad_with_mask([list(w) for w in word_ids], -1)[0]
    inputs, labels = mask_tokens(ids, mask_token_id=mask_token_id, vocab_size=vocab_size,
                                 special_ids={*special_ids, pad_id}, word_ids=words, **mask_kw)
    return inputs, attention_mask, labels


# ------------------------------------------------------------------------------------- words of tokens
# how whitespace is spelled inside tokens: byte-level BPE maps bytes to printable characters (GPT-2's
# bytes_to_unicode), SentencePiece writes "▁" for a space and <0xNN> pieces for bytes it has no piece for
_WHITESPACE = {"bytelevel": {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r", "ċ": "\v", "Č": "\f"},
               "metaspace": {"▁": " ", "<0x20>": " ", "<0x0A>": "\n", "<0x09>": "\t", "<0x0D>": "\r"}}


def word_ids_from_tokens(tokens: Sequence[str], scheme: str, special_tokens: Iterable[str] = ()) -> list[int]:
    """Word index of each token string (-1 for special tokens), for whole-word masking.

    scheme "wordpiece" (BERT): a token starting with "##" continues the word before it; any other token
    starts a word (so punctuation is a word of its own, as in Google's whole-word masking).
    scheme "bytelevel" (GPT-2 / RoBERTa / lmlab's "bpe": "Ġ" is a space, "Ċ" a newline) and "metaspace"
    (SentencePiece: "▁" is a space, <0x0A> a newline): a token starts a word when it begins with
    whitespace or follows a token that ends with whitespace after other text (".Ċ"); so "Hello" "," is
    one word, as in transformers' offset rule, and a whitespace-only token ("▁", "Ċ") joins the word after
    it. A token after a special token always starts a word.
    """
    if scheme not in ("wordpiece", "bytelevel", "metaspace"):
        raise ValueError(f"word_ids_from_tokens: unknown scheme {scheme!r}; use wordpiece, bytelevel or metaspace")
    special = set(special_tokens)
    out, word, boundary = [], -1, True  # boundary: the next token starts a word whatever it looks like
    for tok in tokens:
        if tok in special:
            out.append(-1)
            boundary = True
            continue
        if scheme == "wordpiece":
            new, boundary = boundary or not tok.startswith("##"), False
        else:
            space = _WHITESPACE[scheme]
            text = space[tok] if tok in space else "".join(space.get(ch, ch) for ch in tok)
            # a whitespace-only token ("▁", "Ċ") starts the word that follows it
            new, boundary = boundary or text[:1].isspace(), text[-1:].isspace() and not text.isspace()
        word += new
        out.append(word)
    return out


def encode_with_word_ids(tok, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """-> (ids, word_ids) of `text` with any lmlab Tokenizer, from its character offsets.

    transformers 5's rule: a token starts a new word when it does not touch the token before (a gap in
    the offsets) or follows a special token; in addition a token starts a word when it starts with
    whitespace or follows a token that ends with whitespace after other text (byte-level BPE and
    SentencePiece keep the space inside the token), as word_ids_from_tokens. Special tokens get -1."""
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=add_special_tokens)
    special = tok.special_ids
    out, word, prev, prev_special = [], -1, (0, 0), True
    for i, (start, end) in zip(ids, offsets):
        if i in special:
            out.append(-1)
            prev_special = True
            continue
        before = text[prev[0]:prev[1]]  # the previous token's text; whitespace-only joins the next word
        new = prev_special or start != prev[1] or text[start:start + 1].isspace() or \
            (before[-1:].isspace() and not before.isspace())
        word += new
        out.append(word)
        prev, prev_special = (start, end), False
    return ids, out


# ------------------------------------------------------------------------------------ T5 span corruption
def sentinel_tokens(n: int = 100) -> list[str]:
    """T5's sentinel strings "<extra_id_0>" .. "<extra_id_{n-1}>"; add them with Tokenizer.train(special_tokens=...)."""
    return [f"<extra_id_{k}>" for k in range(n)]


def sentinel_ids(tok) -> list[int]:
    """Ids of the tokenizer's sentinels <extra_id_0>, <extra_id_1>, ... (as many as it has, in order)."""
    out = []
    while (i := tok.token_to_id(f"<extra_id_{len(out)}>")) is not None:
        out.append(i)
    if not out:
        raise ValueError("the tokenizer has no <extra_id_0>: train it with special_tokens=sentinel_tokens(100)")
    return out


def noise_counts(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` tokens, T5's rule: round(length * density)
    noise tokens kept between 1 and length - 1, max(1, round(noise / mean_span)) spans. Below 2 tokens
    there is no noise (T5 computes for length 2 and truncates the mask). The spans are also kept at most
    the noise and non-noise counts so none is empty (only matters far from T5's settings)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"span corruption: noise_density={noise_density} must be in (0, 1)")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"span corruption: mean_noise_span_length={mean_noise_span_length} must be >= 1")
    if length < 2:
        return 0, 0
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(1, int(np.round(num_noise / mean_noise_span_length)))
    return num_noise, min(num_spans, num_noise, length - num_noise)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, *,
                            rng: np.random.Generator) -> np.ndarray:
    """(length,) bool noise mask as T5's random_spans_noise_mask: noise and non-noise tokens are each cut
    into num_spans random non-empty pieces, interleaved non-noise first (so the mask starts with non-noise
    and ends with noise)."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if num_spans == 0:
        return np.zeros(length, dtype=bool)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)  # (num_spans,)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)  # (num_spans,)
    lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * num_spans,) interleaved
    return np.repeat(np.tile([False, True], num_spans), lengths)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of num_items into num_segments positive lengths (T5's _random_segmentation)."""
    first_in_segment = np.zeros(num_items, dtype=bool)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)  # (num_items,) 0..num_segments-1
    return np.bincount(segment_id, minlength=num_segments)


def corrupt_spans(ids, noise_mask, *, sentinel_ids: Sequence[int], eos_id: int) -> tuple[list[int], list[int]]:
    """Apply a noise mask: inputs = the text with the k-th noise span replaced by sentinel k, + eos;
    targets = sentinel k followed by the tokens it replaced, for each span in order, + eos."""
    ids = [int(i) for i in ids]
    if len(noise_mask) != len(ids):
        raise ValueError(f"corrupt_spans: noise mask of length {len(noise_mask)} for {len(ids)} tokens")
    inputs, targets, k, prev = [], [], 0, False
    for i, noise in zip(ids, noise_mask):
        if noise and not prev:  # a span begins
            if k == len(sentinel_ids):
                raise ValueError(f"span corruption needs more than the {len(sentinel_ids)} sentinel ids given")
            inputs.append(sentinel_ids[k])
            targets.append(sentinel_ids[k])
            k += 1
        (targets if noise else inputs).append(i)
        prev = bool(noise)
    return inputs + [eos_id], targets + [eos_id]


def span_corruption(ids, *, sentinel_ids: Sequence[int], eos_id: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, rng: np.random.Generator,
                    targets: str = "spans") -> tuple[list[int], list[int]]:
    """T5's span corruption of one sequence (list of ids or 1-D tensor) -> (inputs, targets) lists:

        ids      a b c d e f g h
        inputs   a b <extra_id_0> e f <extra_id_1> h </s>
        targets  <extra_id_0> c d <extra_id_1> g </s>      (targets="spans", T5's)
                 a b c d e f g h </s>                      (targets="text": the whole original)

    The ids must not contain sentinels. A sequence shorter than 2 tokens is left whole: (ids + [eos], [eos]).
    """
    ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
    if set(ids) & set(sentinel_ids):
        raise ValueError("span_corruption: the ids already contain sentinel ids")
    if targets not in ("spans", "text"):
        raise ValueError(f"span_corruption: targets must be 'spans' or 'text', got {targets!r}")
    mask = random_spans_noise_mask(len(ids), noise_density, mean_noise_span_length, rng=rng)
    inputs, spans = corrupt_spans(ids, mask, sentinel_ids=sentinel_ids, eos_id=eos_id)
    return inputs, (spans if targets == "spans" else ids + [eos_id])


def reconstruct_spans(inputs: Sequence[int], targets: Sequence[int], *, sentinel_ids: Sequence[int],
                      eos_id: int) -> list[int]:
    """The original ids from span_corruption's (inputs, targets): each sentinel in inputs is replaced by the
    tokens that follow the same sentinel in targets."""
    inputs, targets = [int(i) for i in inputs], [int(i) for i in targets]
    if inputs[-1:] != [eos_id] or targets[-1:] != [eos_id]:
        raise ValueError("reconstruct_spans: inputs and targets must end with eos")
    sentinels = set(sentinel_ids)
    spans, current = {}, None
    for i in targets[:-1]:
        if i in sentinels:
            current = spans.setdefault(i, [])
        elif current is None:
            raise ValueError("reconstruct_spans: targets must start with a sentinel")
        else:
            current.append(i)
    out = []
    for i in inputs[:-1]:
        out.extend(spans[i] if i in sentinels else [i])
    return out


def span_corruption_lengths(length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(inputs length, targets length), eos included, that span_corruption makes of `length` tokens."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for_inputs(inputs_length: int, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0) -> int:
    """The longest raw window whose corrupted inputs fit in inputs_length tokens (T5's
    compute_input_and_target_lengths): cut windows of this length to fill the encoder exactly."""
    n = inputs_length
    while span_corruption_lengths(n + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        n += 1
    while n > 0 and span_corruption_lengths(n, noise_density, mean_noise_span_length)[0] > inputs_length:
        n -= 1
    return n


# ------------------------------------------------------------------------------------------ BART denoising
def sentence_end_ids(tok) -> list[int]:
    """Ids of the tokens that end a sentence: those whose text ends with . ! or ? (byte-level BPE merges "." with
    what follows, e.g. ".\n"), and eos (the end of a document)."""
    ends = {i for i in range(tok.vocab_size) if i not in tok.special_ids
            and tok.decode([i]).rstrip().endswith((".", "!", "?"))}
    return sorted(ends | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))


def split_sentences(ids: Sequence[int], end_ids) -> list[list[int]]:
    """Cut after each sentence-end token (a run of them, ". </s>", stays with its sentence); text after the last
    end is a sentence too."""
    ends, out, cur = set(end_ids), [], []
    for i, t in enumerate(ids):
        cur.append(t)
        if t in ends and (i + 1 == len(ids) or ids[i + 1] not in ends):
            out.append(cur)
            cur = []
    return out + [cur] if cur else out


def permute_sentences(ids: Sequence[int], end_ids, ratio: float = 1.0, *, rng: np.random.Generator) -> list[int]:
    """fairseq's permute_sentences: ceil(ratio * n) of the n sentences, chosen at random, are shuffled among their
    places (ratio 1: all of them); the others stay where they are."""
    sentences = split_sentences(list(ids), end_ids)
    n = len(sentences)
    chosen = rng.choice(n, math.ceil(n * ratio), replace=False)
    order = np.arange(n)
    order[chosen] = chosen[rng.permutation(len(chosen))]
    return [t for k in order for t in sentences[k]]


def poisson_span_lengths(num_tokens: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0, *,
                         rng: np.random.Generator) -> np.ndarray:
    """fairseq's span-poisson draw: Poisson(lambda) lengths until they cover ceil(num_tokens * mask_ratio) tokens,
    the last one cut so that they cover exactly that many. 0-length spans stay (each inserts a mask)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"text infilling: mask_ratio={mask_ratio} must be in [0, 1)")
    if poisson_lambda <= 0:
        raise ValueError(f"text infilling: poisson_lambda={poisson_lambda} must be > 0")
    budget = math.ceil(num_tokens * mask_ratio)
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = rng.poisson(poisson_lambda, size=budget)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=budget)])
    cum = np.cumsum(lengths)
    last = int(np.searchsorted(cum, budget))  # the first span that reaches the budget
    lengths = lengths[: last + 1]
    lengths[last] = budget - (cum[last - 1] if last else 0)
    return lengths


def infilling_spans(length: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0, *,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, n) of each noise span of a sequence of `length` tokens, by start: n tokens from `start` become one
    mask; n = 0 inserts a mask before token `start`. Lengths from poisson_span_lengths, in random order.

    The spans of n >= 1 are placed uniformly at random with at least one kept token between two of them, so every
    span is one mask of its own (fairseq draws starts independently and lets spans run into each other, which
    masks fewer tokens than asked). 0-length spans go to distinct random places outside the spans. Two further
    limits, which only bite on sequences of a few tokens: spans that do not fit apart are merged, and inserts
    never make the inputs longer than the sequence (BART's positions are finite)."""
    lengths = rng.permutation(poisson_span_lengths(length, mask_ratio, poisson_lambda, rng=rng))
    spans, n_insert = [int(n) for n in lengths if n > 0], int((lengths == 0).sum())
    kept = length - sum(spans)
    while len(spans) > kept + 1:  # not enough kept tokens to separate them
        spans[-2:] = [spans[-2] + spans[-1]]
    k = len(spans)
    # gaps before, between and after the spans: kept + (1 - k) tokens spread over k + 1 gaps, then 1 added inside
    free = kept - max(k - 1, 0)
    cuts = np.sort(rng.choice(free + k, k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    gaps = np.diff(np.concatenate([[-1], cuts, [free + k]])) - 1  # (k + 1,) >= 0
    gaps[1:k] += 1
    out, pos = [], 0
    for gap, n in zip(gaps, spans):
        pos += int(gap)
        out.append((pos, n))
        pos += n
    inside = {s + j for s, n in out for j in range(1, n)}  # places within a span, where nothing can be inserted
    places = [p for p in range(length + 1) if p not in inside]
    n_insert = min(n_insert, sum(spans) - k)
    out += [(int(p), 0) for p in rng.choice(places, n_insert, replace=n_insert > len(places))]
    return sorted(out)


def infill(ids: Sequence[int], spans: Sequence[tuple[int, int]], mask_id: int) -> list[int]:
    """Apply infilling_spans: each (start, n) puts one mask_id in place of ids[start:start + n]."""
    out, pos = [], 0
    for start, n in sorted(spans):
        out += [*ids[pos:start], mask_id]
        pos = start + n
    return out + list(ids[pos:])


def denoise(ids, *, mask_id: int, sentence_end_ids: Sequence[int] = (), mask_ratio: float = 0.3,
            poisson_lambda: float = 3.0, permute_ratio: float = 1.0,
            rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """BART's noising of one sequence (list of ids or 1-D tensor) -> (inputs, targets) lists: the sentences
    permuted (permute_ratio of them; none without sentence_end_ids), then text infilling; targets = the original.

        ids      A1 A2 A3 . B1 B2 B3 B4 . C1 C2 .
        inputs   B1 <mask> B4 . C1 C2 . A1 <mask> A2 A3 .
        targets  A1 A2 A3 . B1 B2 B3 B4 . C1 C2 .
    """
    ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
    if mask_id in ids:
        raise ValueError("denoise: the ids already contain the mask id")
    x = permute_sentences(ids, sentence_end_ids, permute_ratio, rng=rng) if permute_ratio and sentence_end_ids else ids
    return infill(x, infilling_spans(len(x), mask_ratio, poisson_lambda, rng=rng), mask_id), ids


def collate_span_corruption(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """[(inputs, targets), ...] -> input_ids (B, S), attention_mask (B, S), labels (B, L), int64, right-padded:
    inputs with pad_id, labels with -100 (the decoder's inputs are the labels shifted right, T5's model does it)."""
    input_ids, attention_mask = pad_with_mask([list(i) for i, _ in pairs], pad_id)
    labels, _ = pad_with_mask([list(t) for _, t in pairs], IGNORE_INDEX)
    return input_ids, attention_mask, labels


def pad_with_mask(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest -> (ids (B, T), attention_mask (B, T)) int64."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask
