"""Pre-training objectives: BERT masking (against its definition and transformers' collator), whole-word
masking, T5 span corruption (against T5's random_spans_noise_mask), and tokenizers that carry the specials."""
import warnings

import numpy as np
import pytest
import torch

import lmlab
from lmlab.chat import DEFAULT_SPECIAL_TOKENS
from lmlab.data import objectives as ob
from lmlab.tokenizer import Tokenizer, TokenizerError

V = 1000
SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, unk
MASK = 4


def sigma(p, n):
    return (p * (1 - p) / n) ** 0.5


def random_batch(b=256, t=256, seed=0):
    """(B, T) ids in [5, V) framed as [CLS] ... [SEP] [PAD]..., so specials occur at known places."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = 1, 2
        ids[row, n:] = 0
    return ids


def test_causal_lm_shift():
    w = torch.arange(12).view(2, 6)
    x, y = ob.causal_lm(w)
    assert x.shape == y.shape == (2, 5)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, w[:, 1:])


# ------------------------------------------------------------------------------------------ masked LM
def test_mask_rates_and_labels():
    ids = random_batch()
    inputs, labels = ob.mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_ids=SPECIAL,
                                    generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != -100
    assert not (selected & special).any(), "a special token was selected"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected]), "an unselected token changed"
    n = int((~special).sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.15) < 5 * sigma(0.15, n), rate

    k = int(selected.sum())
    got, orig = inputs[selected], ids[selected]
    masked = (got == MASK).float().mean().item()
    kept = (got == orig).float().mean().item()
    rand = ((got != MASK) & (got != orig)).float().mean().item()
    assert abs(masked - 0.8) < 5 * sigma(0.8, k), masked
    assert abs(kept - 0.1) < 5 * sigma(0.1, k), kept  # a random id equal to the original (p=1/V) looks kept
    assert abs(rand - 0.1) < 5 * sigma(0.1, k), rand


def test_random_replacement_is_uniform_over_the_vocabulary():
    """Random ids are drawn from the whole vocabulary, special ids included (as transformers does)."""
    vocab = 20
    ids = torch.full((400, 500), 10)
    inputs, labels = ob.mask_tokens(ids, mask_token_id=4, vocab_size=vocab, special_ids=[0], mlm_probability=1.0,
                                    mask_replace_prob=0.0, random_replace_prob=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert (labels == 10).all()
    counts = torch.bincount(inputs.flatten(), minlength=vocab).double()
    n = inputs.numel()
    assert counts.min() > 0
    assert ((counts / n - 1 / vocab).abs() < 5 * sigma(1 / vocab, n)).all(), counts


def test_mask_deterministic_and_leaves_input_alone():
    ids = random_batch(8, 64)
    before = ids.clone()
    kw = dict(mask_token_id=MASK, vocab_size=V, special_ids=SPECIAL)
    a = ob.mask_tokens(ids, generator=torch.Generator().manual_seed(5), **kw)
    b = ob.mask_tokens(ids, generator=torch.Generator().manual_seed(5), **kw)
    c = ob.mask_tokens(ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(ids, before)


def test_mask_rejects_bad_arguments():
    ids = random_batch(2, 8)
    with pytest.raises(ValueError, match="probability"):
        ob.mask_tokens(ids, mask_token_id=MASK, vocab_size=V, mlm_probability=1.5)
    with pytest.raises(ValueError, match="exceed 1"):
        ob.mask_tokens(ids, mask_token_id=MASK, vocab_size=V, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        ob.mask_tokens(ids[0], mask_token_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ob.mask_tokens(ids, mask_token_id=V, vocab_size=V)


def random_words(b=128, t=256, seed=0):
    """(B, T) word ids: [CLS] words of 1-4 tokens [SEP] then padding, -1 on specials."""
    rng = np.random.default_rng(seed)
    words = np.full((b, t), -1)
    for row in range(b):
        pos, w = 1, 0
        while True:
            n = int(rng.integers(1, 5))
            if pos + n >= t - 1 - int(rng.integers(0, 20)):
                break
            words[row, pos:pos + n] = w
            pos, w = pos + n, w + 1
    ids = torch.randint(5, V, (b, t), generator=torch.Generator().manual_seed(seed))
    ids[torch.from_numpy(words) < 0] = 0
    ids[:, 0] = 1
    return ids, torch.from_numpy(words)


def test_whole_word_masking_selects_whole_words():
    ids, words = random_words()
    inputs, labels = ob.mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_ids=SPECIAL, word_ids=words,
                                    generator=torch.Generator().manual_seed(3))
    selected = labels != -100
    assert not (selected & (words < 0)).any()
    n_words, n_sel = 0, 0
    for row in range(ids.shape[0]):
        for w in words[row].unique().tolist():
            if w < 0:
                continue
            s = selected[row][words[row] == w]
            assert s.all() or not s.any(), f"word {w} of row {row} partly selected: {s.tolist()}"
            n_words, n_sel = n_words + 1, n_sel + int(s.all())
    assert abs(n_sel / n_words - 0.15) < 5 * sigma(0.15, n_words)
    # the 80/10/10 choice is per token within the selected words
    got, orig = inputs[selected], ids[selected]
    k = got.numel()
    assert abs((got == MASK).float().mean().item() - 0.8) < 5 * sigma(0.8, k)
    assert abs((got == orig).float().mean().item() - 0.1) < 5 * sigma(0.1, k)
    assert torch.equal(inputs[~selected], ids[~selected]) and torch.equal(labels[selected], ids[selected])


def test_whole_word_ids_must_be_consecutive():
    ids = torch.tensor([[1, 7, 8, 9, 2]])
    with pytest.raises(ValueError, match="consecutive"):
        ob.mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_ids=SPECIAL,
                       word_ids=torch.tensor([[-1, 0, 1, 0, -1]]))


def test_matches_transformers_collator(trained):
    """Same generator seed -> the same inputs and labels as transformers' DataCollatorForLanguageModeling."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for the collator")
    tok, d = trained["wordpiece"]
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert len(hf) == tok.vocab_size and hf.mask_token_id == tok.mask_token_id
    ids = torch.randint(0, tok.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    specials = sorted(tok.special_ids)
    special_mask = torch.isin(ids, torch.tensor(specials)).long()

    coll = transformers.DataCollatorForLanguageModeling(hf, mlm_probability=0.15)
    coll.generator = torch.Generator().manual_seed(7)
    want = coll.torch_mask_tokens(ids.clone(), special_tokens_mask=special_mask)
    got = ob.mask_tokens(ids, mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size, special_ids=specials,
                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    # whole words: transformers 5 derives words from offsets and puts [MASK] on every selected token
    _, words = random_words(16, 128, seed=1)
    words[:, -1] = -1
    ids = torch.randint(max(specials) + 1, tok.vocab_size, (16, 128), generator=torch.Generator().manual_seed(1))
    ids[words < 0] = tok.pad_token_id
    ids[:, 0] = tok.cls_token_id
    special_mask = (words < 0).long()
    pos = torch.arange(128).expand(16, 128)
    start = pos + words  # a gap of one character before each new word, none inside a word
    offsets = torch.stack([start, start + 1], -1).masked_fill((words < 0)[..., None], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting mask_replace_prob to 1"
        coll = transformers.DataCollatorForLanguageModeling(hf, mlm_probability=0.15, whole_word_mask=True)
    coll.generator = torch.Generator().manual_seed(8)
    want = coll.torch_mask_tokens(ids.clone(), special_tokens_mask=special_mask, offset_mapping=offsets)
    got = ob.mask_tokens(ids, mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size, special_ids=specials,
                         word_ids=words, mask_replace_prob=1.0, random_replace_prob=0.0,
                         generator=torch.Generator().manual_seed(8))
    assert (got[1] != -100).any()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mlm_collate_pads_and_never_masks_padding():
    seqs = [[1, *range(5, 5 + n), 2] for n in (3, 40, 17)]
    inputs, attn, labels = ob.mlm_collate(seqs, pad_id=0, mask_token_id=MASK, vocab_size=V, special_ids=[1, 2],
                                          mlm_probability=1.0, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == attn.shape == labels.shape == (3, 42)
    assert attn.sum(1).tolist() == [len(s) for s in seqs]
    assert ((labels != -100) == (attn.bool() & ~torch.isin(inputs.new_tensor(
        [s + [0] * (42 - len(s)) for s in seqs]), torch.tensor([0, 1, 2])))).all()
    assert (inputs[attn == 0] == 0).all()


# ------------------------------------------------------------------------------------- words of tokens
def test_word_ids_from_tokens():
    wp = ["[CLS]", "un", "##aff", "##able", ",", "hello", "[SEP]", "x"]
    assert ob.word_ids_from_tokens(wp, "wordpiece", ["[CLS]", "[SEP]"]) == [-1, 0, 0, 0, 1, 2, -1, 3]
    bl = ["Hello", "Ġwor", "ld", ",", "Ċ", "Next", ".Ċ", "A", "ĠĠ", "Ġx", "<|endoftext|>", "y"]
    assert ob.word_ids_from_tokens(bl, "bytelevel", ["<|endoftext|>"]) == [0, 1, 1, 1, 2, 2, 2, 3, 4, 5, -1, 6]
    ms = ["<s>", "▁Hello", "▁wor", "ld", "<0x0A>", "Next", "▁", "x", "y"]
    assert ob.word_ids_from_tokens(ms, "metaspace", ["<s>"]) == [-1, 0, 1, 1, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="scheme"):
        ob.word_ids_from_tokens(bl, "bpe")


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "unbelievably", "river", "stone"]


def corpus(n=300):
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, 12)) + f", number {i}." for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tokenizers trained with the specials the objectives need, saved and loaded back."""
    out = {}
    extra = [*DEFAULT_SPECIAL_TOKENS, *ob.sentinel_tokens(10)]
    for kind in ("bpe", "wordpiece", "unigram"):
        roles = {"mask_token": "<mask>"} if kind != "wordpiece" else None
        tok = Tokenizer.train(corpus(), 400, kind=kind, special_tokens=extra, special_roles=roles,
                              show_progress=False)
        d = tmp_path_factory.mktemp(kind)
        tok.save_pretrained(d)
        out[kind] = (lmlab.load_tokenizer(d), d)
    return out


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_encode_with_word_ids(kind, trained):
    tok, _ = trained[kind]
    text = "the quick zyxwvut fox unbelievably stoneriver dog"
    ids, words = ob.encode_with_word_ids(tok, text)
    assert len(ids) == len(words)
    assert all(w == -1 for i, w in zip(ids, words) if i in tok.special_ids)
    assert all(w >= 0 for i, w in zip(ids, words) if i not in tok.special_ids)
    groups = {}
    for i, w in zip(ids, words):
        if w >= 0:
            groups.setdefault(w, []).append(i)
    assert [tok.decode(g).strip() for g in groups.values()] == text.split()
    assert any(len(g) > 1 for g in groups.values())  # the made-up words take several tokens


# --------------------------------------------------------------------------- tokenizers with the specials
@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizer_carries_mask_and_sentinels(kind, trained):
    tok, d = trained[kind]
    mask = "[MASK]" if kind == "wordpiece" else "<mask>"
    assert tok.mask_token == mask and tok.mask_token_id is not None
    sentinels = ob.sentinel_ids(tok)
    assert len(sentinels) == 10 and len(set(sentinels)) == 10
    assert {tok.mask_token_id, *sentinels} <= tok.special_ids
    for s, text in zip(sentinels, ob.sentinel_tokens(10)):
        assert tok.encode(text, add_special_tokens=False) == [s]
    assert tok.token_to_id("<|im_start|>") is not None and tok.chat_template  # the chat tokens stay
    transformers = pytest.importorskip("transformers", reason="checks the saved files in AutoTokenizer")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.mask_token == mask and hf.mask_token_id == tok.mask_token_id and len(hf) == tok.vocab_size
    text = "the fox <extra_id_3> jumps"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert "<extra_id_3>" not in hf.decode(tok.encode(text), skip_special_tokens=True)


def test_special_roles_validation_and_defaults():
    with pytest.raises(TokenizerError, match="special_roles"):
        Tokenizer.train(corpus(20), 400, kind="bpe", special_roles={"mask": "<mask>"}, show_progress=False)
    tok = Tokenizer.train(corpus(20), 400, kind="bpe", show_progress=False)
    assert tok.mask_token is None  # without roles a byte-level BPE tokenizer has no mask token, as before
    with pytest.raises(ValueError, match="extra_id_0"):
        ob.sentinel_ids(tok)


# -------------------------------------------------------------------------------------- span corruption
SENT = list(range(1000, 1100))  # sentinel k = 1000 + k
EOS = 1


def t5_reference_mask(length, density, mean, rng):
    """T5's random_spans_noise_mask (t5/data/preprocessors.py), transcribed op for op from TensorFlow."""
    orig_length, length = length, max(length, 2)
    num_noise = min(max(int(np.round(length * density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean)), 1)

    def random_segmentation(num_items, num_segments):
        first_in_segment = np.pad(rng.permutation((np.arange(num_items - 1) < num_segments - 1).astype(np.int32)),
                                  [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        return np.array([np.sum(segment_id == s) for s in range(segment_id.max() + 1)])  # segment_sum of ones

    noise = random_segmentation(num_noise, num_spans)
    nonnoise = random_segmentation(length - num_noise, num_spans)
    interleaved = np.stack([nonnoise, noise], axis=1).reshape(num_spans * 2)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    np.add.at(indicator, span_starts, 1)  # unsorted_segment_sum
    return (np.cumsum(indicator) % 2 == 1)[:orig_length]


def test_noise_mask_matches_t5():
    for length in [*range(1, 40), 100, 512, 568, 1000]:
        for seed in range(3):
            got = ob.random_spans_noise_mask(length, 0.15, 3.0, rng=np.random.default_rng(seed))
            want = t5_reference_mask(length, 0.15, 3.0, np.random.default_rng(seed))
            assert np.array_equal(got, want), (length, seed)


def test_corrupt_spans_format():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    mask = [0, 0, 1, 1, 0, 0, 1, 0]
    inputs, targets = ob.corrupt_spans(ids, mask, sentinel_ids=SENT, eos_id=EOS)
    assert inputs == [10, 11, 1000, 14, 15, 1001, 17, EOS]
    assert targets == [1000, 12, 13, 1001, 16, EOS]
    assert ob.reconstruct_spans(inputs, targets, sentinel_ids=SENT, eos_id=EOS) == ids


def check_pair(ids, inputs, targets):
    """T5's format, reconstruction, and counts for one corrupted sequence."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    in_sent = [i for i in inputs if i in SENT]
    tg_sent = [i for i in targets if i in SENT]
    assert in_sent == tg_sent == SENT[:len(in_sent)], "sentinels out of order"
    assert ob.reconstruct_spans(inputs, targets, sentinel_ids=SENT, eos_id=EOS) == list(ids)
    body = targets[:-1]
    starts = [j for j, i in enumerate(body) if i in SENT]
    spans = [e - s - 1 for s, e in zip(starts, starts[1:] + [len(body)])]
    assert all(n >= 1 for n in spans), "empty span"
    num_noise, num_spans = ob.noise_counts(len(ids))
    assert sum(spans) == num_noise and len(spans) == num_spans
    assert (len(inputs), len(targets)) == ob.span_corruption_lengths(len(ids))
    if spans:  # T5's mask starts with non-noise and ends with noise
        assert inputs[0] not in SENT and inputs[-2] in SENT
    return spans


def test_span_corruption_properties():
    rng = np.random.default_rng(0)
    all_spans = []
    for _ in range(400):
        length = int(rng.integers(2, 400))
        ids = rng.integers(2, 900, length).tolist()
        inputs, targets = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=rng)
        spans = check_pair(ids, inputs, targets)
        expected = min(max(round(length * 0.15), 1), length - 1)
        assert sum(spans) == expected
        if length >= 7:
            assert sum(spans) == round(length * 0.15)
        all_spans += spans
    assert abs(np.mean(all_spans) - 3.0) < 0.1, np.mean(all_spans)
    assert len(set(all_spans)) > 5  # lengths are random, not all 3


def test_span_corruption_is_random_and_deterministic():
    ids = torch.arange(2, 202)  # a 1-D tensor works too
    a = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(1))
    b = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(1))
    c = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(2))
    assert a == b and a != c
    # every position but the first can be noise; the last always is (T5 without random_roll)
    rng = np.random.default_rng(0)
    freq = np.mean([ob.random_spans_noise_mask(40, rng=rng) for _ in range(3000)], axis=0)
    assert freq[0] == 0 and freq[-1] == 1 and (freq[1:-1] > 0).all()
    assert abs(freq.mean() - 6 / 40) < 1e-9


@pytest.mark.parametrize("length", range(2, 11))
def test_span_corruption_short_sequences(length):
    """T5 keeps at least one noise and one non-noise token, however short the sequence."""
    ids = list(range(10, 10 + length))
    noise = []  # corrupted tokens per seed
    for seed in range(20):
        inputs, targets = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(seed))
        noise.append(sum(check_pair(ids, inputs, targets)))
    assert min(noise) >= 1 and max(noise) <= length - 1, noise


def test_span_corruption_single_token_is_left_whole():
    inputs, targets = ob.span_corruption([10], sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(0))
    assert (inputs, targets) == ([10, EOS], [EOS])


def test_span_corruption_whole_text_targets():
    """targets="text": the same corrupted inputs, and the whole original text (+ eos) to write out; a bad
    data.span_targets is refused by the config."""
    from lmlab.config import ConfigError, RunConfig
    ids = list(range(2, 120))
    spans = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(3))
    text = ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(3), targets="text")
    assert text[0] == spans[0] and set(text[0]) & set(SENT)  # inputs still have their sentinels
    assert text[1] == ids + [EOS] and spans[1] != text[1]
    with pytest.raises(ValueError, match="targets must be"):
        ob.span_corruption(ids, sentinel_ids=SENT, eos_id=EOS, rng=np.random.default_rng(3), targets="all")
    assert RunConfig.from_dict({"data": {"span_targets": "text"}}).data.span_targets == "text"
    with pytest.raises(ConfigError, match=r"data.span_targets must be spans\|text, got 'full'"):
        RunConfig.from_dict({"data": {"span_targets": "full"}})


def test_span_corruption_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="sentinel"):
        ob.span_corruption(list(range(2, 500)), sentinel_ids=SENT[:3], eos_id=EOS, rng=rng)
    with pytest.raises(ValueError, match="already contain"):
        ob.span_corruption([5, 1000, 6], sentinel_ids=SENT, eos_id=EOS, rng=rng)
    with pytest.raises(ValueError, match="noise_density"):
        ob.span_corruption([5, 6, 7], sentinel_ids=SENT, eos_id=EOS, noise_density=0.0, rng=rng)


def test_lengths_for_packing():
    # T5's compute_input_and_target_lengths: 568 raw tokens -> 512 inputs and 114 targets
    assert ob.raw_length_for_inputs(512) == 568
    assert ob.span_corruption_lengths(568) == (512, 114)
    for n in (8, 64, 100, 256):
        raw = ob.raw_length_for_inputs(n)
        assert ob.span_corruption_lengths(raw)[0] <= n < ob.span_corruption_lengths(raw + 1)[0]


def test_collate_span_corruption():
    rng = np.random.default_rng(0)
    pairs = [ob.span_corruption(list(range(2, 2 + n)), sentinel_ids=SENT, eos_id=EOS, rng=rng) for n in (5, 60, 23)]
    input_ids, attn, labels = ob.collate_span_corruption(pairs, pad_id=0)
    assert input_ids.shape == attn.shape == (3, max(len(i) for i, _ in pairs))
    assert labels.shape == (3, max(len(t) for _, t in pairs))
    for b, (i, t) in enumerate(pairs):
        assert input_ids[b, :len(i)].tolist() == i and (input_ids[b, len(i):] == 0).all()
        assert attn[b].tolist() == [1] * len(i) + [0] * (input_ids.shape[1] - len(i))
        assert labels[b, :len(t)].tolist() == t and (labels[b, len(t):] == -100).all()


def test_t5_tokenizer_round_trip(trained):
    """Span corruption on real text with a trained tokenizer's sentinels decodes back to the text."""
    tok, _ = trained["unigram"]
    text = "the quick brown fox jumps over the lazy dog near the river stone"
    ids = tok.encode(text, add_special_tokens=False)
    sentinels = ob.sentinel_ids(tok)
    inputs, targets = ob.span_corruption(ids, sentinel_ids=sentinels, eos_id=tok.eos_token_id,
                                         rng=np.random.default_rng(0))
    assert "<extra_id_0>" in tok.decode(inputs) and tok.decode(targets).startswith("<extra_id_0>")
    back = ob.reconstruct_spans(inputs, targets, sentinel_ids=sentinels, eos_id=tok.eos_token_id)
    assert tok.decode(back) == text
