"""BART's denoising objective against its definition (text infilling with Poisson(3) spans, one <mask> per span,
0-length spans that insert, 30% of the tokens; sentence permutation; targets = the original; seeded), and
`lmlab pretrain --family encoder-decoder --arch bart` through the loop on the world, then text-to-text
fine-tuning of the result."""
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

import lmlab
from lmlab.cli import main as cli_main
from lmlab.config import RunConfig, apply_overrides
from lmlab.data import objectives as ob
from lmlab.train import tasks

M = 3  # the mask id in the pure-objective tests; ids below are >= 10
END = 99  # a sentence-end id


def poisson_pmf(k, lam=3.0):
    return math.exp(-lam) * lam ** k / math.factorial(k)


# ----------------------------------------------------------------------------------------- span lengths
def test_span_lengths_follow_poisson():
    """Over many draws, the span lengths (all but the last of each draw, which is cut to fit the budget) are
    Poisson(3): mean, variance and the frequency of each length 0..8 within 5 sigma; each draw covers exactly
    ceil(0.3 n) tokens. (Long sequences, ~500 spans a draw, so that stopping at the budget biases the rest by
    ~0.2%, far below the tolerance.)"""
    rng, spans = np.random.default_rng(0), []
    for _ in range(40):
        lengths = ob.poisson_span_lengths(5000, 0.3, 3.0, rng=rng)
        assert lengths.sum() == 1500 and (lengths >= 0).all() and lengths[-1] >= 1
        spans += lengths[:-1].tolist()
    n = len(spans)
    assert n > 15000
    assert abs(np.mean(spans) - 3.0) < 5 * (3.0 / n) ** 0.5, np.mean(spans)
    assert abs(np.var(spans) - 3.0) < 0.15, np.var(spans)  # Poisson: variance = mean
    counts = Counter(spans)
    for k in range(9):
        p = poisson_pmf(k)
        assert abs(counts[k] / n - p) < 5 * (p * (1 - p) / n) ** 0.5, (k, counts[k] / n, p)


def test_span_length_arguments():
    assert len(ob.poisson_span_lengths(3, 0.3, rng=np.random.default_rng(0))) >= 1  # ceil: 1 token of 3
    assert len(ob.poisson_span_lengths(100, 0.0, rng=np.random.default_rng(0))) == 0
    with pytest.raises(ValueError, match="poisson_lambda"):
        ob.poisson_span_lengths(100, 0.3, 0.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask_ratio"):
        ob.poisson_span_lengths(100, 1.0, rng=np.random.default_rng(0))


# ------------------------------------------------------------------------------------------ infilling
def check_spans(length, spans):
    """The definition of infilling_spans' output; -> (masked tokens, spans, inserts)."""
    assert spans == sorted(spans)
    real = [(s, n) for s, n in spans if n > 0]
    inserts = [s for s, n in spans if n == 0]
    for (s1, n1), (s2, _) in zip(real, real[1:]):
        assert s1 + n1 < s2, "spans touch or overlap: they would not be one mask each"
    assert all(0 <= s and s + n <= length for s, n in real)
    assert len(set(inserts)) == len(inserts) and all(0 <= p <= length for p in inserts)
    assert not any(s < p < s + n for p in inserts for s, n in real), "an insert inside a span"
    masked = sum(n for _, n in real)
    assert length - masked + len(spans) <= length or length == 0  # the inputs are never longer
    return masked, len(real), len(inserts)


def test_infilling_spans_masks_30_percent():
    """Each sequence has exactly ceil(0.3 n) tokens in its spans (the spans never overlap, unlike fairseq's);
    over many sequences ~5% of the spans (Poisson(3) at 0) are 0-length inserts."""
    rng = np.random.default_rng(1)
    masked_total = tokens = real_total = insert_total = 0
    for length in list(range(0, 40)) + [200] * 200:
        masked, real, inserts = check_spans(length, ob.infilling_spans(length, 0.3, 3.0, rng=rng))
        if length >= 2:
            assert masked == math.ceil(0.3 * length), (length, masked)
        masked_total, tokens = masked_total + masked, tokens + length
        real_total, insert_total = real_total + real, insert_total + inserts
    assert abs(masked_total / tokens - 0.3) < 0.01
    p0, n = poisson_pmf(0), real_total + insert_total
    assert abs(insert_total / n - p0) < 5 * (p0 * (1 - p0) / n) ** 0.5, insert_total / n


def test_each_span_becomes_one_mask():
    ids = list(range(10, 20))
    assert ob.infill(ids, [(2, 3), (7, 0)], M) == [10, 11, M, 15, 16, M, 17, 18, 19]
    assert ob.infill(ids, [(0, 1), (9, 1)], M) == [M, *range(11, 19), M]
    rng = np.random.default_rng(2)
    for _ in range(300):
        ids = rng.integers(10, 1000, rng.integers(1, 120)).tolist()
        spans = ob.infilling_spans(len(ids), rng=rng)
        out = ob.infill(ids, spans, M)
        assert out.count(M) == len(spans)
        assert len(out) == len(ids) - sum(n for _, n in spans) + len(spans)
        # replacing the k-th mask by the k-th span's tokens gives the text back
        pieces = iter([ids[s: s + n] for s, n in spans])
        assert [t for x in out for t in (next(pieces) if x == M else [x])] == ids


def test_zero_length_spans_insert():
    assert ob.infill([10, 11, 12], [(1, 0)], M) == [10, M, 11, 12]
    assert ob.infill([10, 11, 12], [(0, 0), (3, 0)], M) == [M, 10, 11, 12, M]
    assert ob.infill([10, 11, 12], [(1, 0), (1, 2)], M) == [10, M, M]  # an insert before a span that starts there
    seen, rng = 0, np.random.default_rng(3)
    for _ in range(100):
        ids = list(range(10, 110))
        spans = ob.infilling_spans(100, rng=rng)
        inserts = sum(n == 0 for _, n in spans)
        seen += inserts
        with_inserts, without = ob.infill(ids, spans, M), ob.infill(ids, [x for x in spans if x[1]], M)
        assert with_inserts.count(M) == without.count(M) + inserts  # one more mask each, no token removed
        assert [t for t in with_inserts if t != M] == [t for t in without if t != M]
        assert len(with_inserts) <= 100
    assert seen > 10


# -------------------------------------------------------------------------------------- permutation
def sentences_of(n_sentences, rng):
    ids, sentences = [], []
    for k in range(n_sentences):
        s = [100 * (k + 1) + j for j in range(int(rng.integers(1, 6)))] + [END]
        sentences.append(s)
        ids += s
    return ids, sentences


def test_split_sentences():
    assert ob.split_sentences([1, 2, END, 3, END, END, 4, 5], [END]) == [[1, 2, END], [3, END, END], [4, 5]]
    assert ob.split_sentences([END, 1], [END]) == [[END], [1]]
    assert ob.split_sentences([], [END]) == []


def test_sentence_permutation_keeps_the_sentences():
    rng = np.random.default_rng(4)
    moved = 0
    for _ in range(200):
        ids, sentences = sentences_of(int(rng.integers(1, 9)), rng)
        out = ob.permute_sentences(ids, [END], 1.0, rng=rng)
        got = ob.split_sentences(out, [END])
        assert sorted(map(tuple, got)) == sorted(map(tuple, sentences)) and len(out) == len(ids)
        moved += got != sentences
    assert moved > 150  # shuffled, not kept in order
    # a uniform shuffle: each order of 3 sentences ~1/6 of the time
    ids, sentences = sentences_of(3, rng)
    orders = Counter(tuple(map(tuple, ob.split_sentences(ob.permute_sentences(ids, [END], 1.0, rng=rng), [END])))
                     for _ in range(6000))
    assert len(orders) == 6 and all(abs(c / 6000 - 1 / 6) < 5 * (5 / 36 / 6000) ** 0.5 for c in orders.values())


def test_partial_permutation():
    """permute_ratio 0.5 moves at most ceil(n / 2) sentences; 0 moves none."""
    rng = np.random.default_rng(5)
    ids, sentences = sentences_of(7, rng)
    for _ in range(100):
        got = ob.split_sentences(ob.permute_sentences(ids, [END], 0.5, rng=rng), [END])
        assert sum(a != b for a, b in zip(got, sentences)) <= 4
    assert ob.permute_sentences(ids, [END], 0.0, rng=rng) == ids


# -------------------------------------------------------------------------------------------- denoise
def test_denoise_targets_original_and_seeded():
    rng = np.random.default_rng(6)
    ids, _ = sentences_of(6, rng)
    a = ob.denoise(ids, mask_id=M, sentence_end_ids=[END], rng=np.random.default_rng(7))
    assert a == ob.denoise(torch.tensor(ids), mask_id=M, sentence_end_ids=[END], rng=np.random.default_rng(7))
    assert a != ob.denoise(ids, mask_id=M, sentence_end_ids=[END], rng=np.random.default_rng(8))
    inputs, targets = a
    assert targets == ids and len(inputs) <= len(ids) and M in inputs
    assert not Counter(t for t in inputs if t != M) - Counter(ids)  # only tokens of the text, fewer of them
    # the definition, replayed with the same generator: permute the sentences, then infill
    g = np.random.default_rng(7)
    permuted = ob.permute_sentences(ids, [END], 1.0, rng=g)
    assert inputs == ob.infill(permuted, ob.infilling_spans(len(ids), 0.3, 3.0, rng=g), M)
    # no permutation without sentence ends
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    assert ob.denoise(ids, mask_id=M, rng=g1)[0] == ob.infill(ids, ob.infilling_spans(len(ids), rng=g2), M)
    with pytest.raises(ValueError, match="mask id"):
        ob.denoise([10, M, 11], mask_id=M, rng=rng)


# ------------------------------------------------------------------------------- pre-training (smoke)
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_decoder_layers=2", "model.num_attention_heads=2", "train.batch_size=8", "train.seq_len=64",
         "train.eval_every=20", "train.eval_batches=2", "train.save_every=0", "train.warmup_steps=5",
         "train.max_steps=40", "data.vocab_size=600", "data.world_people=20"]


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory):
    """`lmlab pretrain --family encoder-decoder --arch bart`: 40 steps of a 2+2-layer, hidden-64 BART on the
    world (measured: 15 s on 1 thread: the world, tokenizer training, shards, two evaluations, 40 steps in ~2 s)."""
    out = tmp_path_factory.mktemp("bart") / "run"
    assert cli_main(["pretrain", "--family", "encoder-decoder", "--arch", "bart", "--out", str(out),
                     "--set", *SMALL]) == 0
    return out


def test_pretrain_bart_loss_falls(bart_run):
    """The loop runs BART's denoising: the training loss falls (measured: 6.4 over the first 5 steps to ~4.9 over
    the last 5) and the validation loss ends below the uniform guess over the vocabulary."""
    rows = [json.loads(line) for line in (bart_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[:5]) - np.mean(losses[-5:]) > 0.8, losses
    report = json.loads((bart_run / "report.json").read_text())
    assert report["family"] == "encoder-decoder" and report["steps"] == 40
    tok = lmlab.load_tokenizer(bart_run / "final")
    assert report["val_loss"] < math.log(tok.vocab_size)


def test_pretrained_bart_loads_in_transformers(bart_run):
    """final/ is a BartForConditionalGeneration with lmlab's logits; its byte-level BPE tokenizer frames texts as
    "<s> text </s>" in lmlab and transformers alike; decoding starts from eos."""
    d = bart_run / "final"
    ours, tok = lmlab.load_model(d), lmlab.load_tokenizer(d)
    assert ours.config.model_type == "bart" and ours.config.decoder_start_token_id == tok.eos_token_id
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert type(hf).__name__ == "BartForConditionalGeneration"
    text = "Ada Lovelace was born in Paris. She studied <mask>!"
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"] and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.mask_token_id in ids and {tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token} == \
        {"<s>", "</s>", "<pad>", "<mask>"}
    x, dec = torch.tensor([ids]), torch.tensor([[ours.config.decoder_start_token_id, 5, 9, 7]])
    with torch.no_grad():
        assert (ours(x, decoder_input_ids=dec) - hf(input_ids=x, decoder_input_ids=dec).logits).abs().max() <= 1e-4
    got = lmlab.generate(ours, [ids], max_new_tokens=8)
    ref = hf.generate(input_ids=x, max_new_tokens=8, do_sample=False)[0, 1:].tolist()
    assert ref[: len(got[0])] == got[0]


def test_denoising_batches(bart_run):
    """The loader's batch: noised inputs (right-padded, never longer than the window), labels = the window."""
    from lmlab.train.objective_loaders import denoising_corrupter
    tok = lmlab.load_tokenizer(bart_run / "final")
    text = "Ada was born in Paris. She studied maths. Then she left! The end."
    window = torch.tensor([tok.encode(text)[:20], tok.encode(text)[-20:]])
    corrupt = denoising_corrupter(tok)
    ids, mask, labels = corrupt(window, [0, 0, 1])
    assert torch.equal(labels, window) and ids.shape[1] <= window.shape[1]
    assert (ids == tok.mask_token_id).any() and (ids[mask == 0] == tok.pad_token_id).all()
    assert all(torch.equal(a, b) for a, b in zip(corrupt(window, [0, 0, 1]), (ids, mask, labels)))
    assert not torch.equal(corrupt(window, [0, 0, 2])[0], ids)


def test_bart_seq2seq_finetune(bart_run, tmp_path):
    """`finetune --task seq2seq` on a BART: full (then lmlab.generate on text) and LoRA, whose default targets are
    BART's q/k/v/o and MLP projections; the merged final/ runs in transformers with lmlab's logits."""
    data = tmp_path / "s2s.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"copy: {w}", "target": w}) for w in ["red", "green", "blue"] * 8))
    for lora in (0, 4):
        d = {section: dict(v) for section, v in tasks.DEFAULTS["seq2seq"].items()}
        rc = RunConfig.from_dict(apply_overrides(d, ["train.max_steps=4", "train.batch_size=4", "train.eval_every=0",
                                                     "train.seq_len=64", f"data.source={data}", f"lora.r={lora}"]))
        if lora:
            model = tasks.task_model("seq2seq", bart_run / "final", rc, None)
            trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
        out = tmp_path / f"run{lora}"
        report = tasks.run(rc, bart_run / "final", out, "seq2seq")["report"]
        assert report["task"] == "seq2seq" and 0 <= report["exact_match"] <= 1
        ours, tok = lmlab.load_model(out / "final"), lmlab.load_tokenizer(out / "final")
        assert isinstance(lmlab.generate(ours, tok, "copy: red", max_new_tokens=6), str)
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
        x, dec = torch.tensor([tok.encode("copy: red")]), torch.tensor([[tok.eos_token_id, 9, 4]])
        with torch.no_grad():
            assert (ours(x, decoder_input_ids=dec) - hf(input_ids=x, decoder_input_ids=dec).logits).abs().max() <= 1e-4


def test_arch_option_errors():
    """--arch bart picks bart-NAME for --preset NAME, refuses a T5 preset and any other family."""
    from lmlab.cli import _preset
    assert _preset("tiny", "encoder-decoder", "bart").model_type == "bart"
    assert _preset("tiny", "encoder-decoder", "t5").model_type == "t5"
    with pytest.raises(lmlab.ConfigError, match="not --arch bart"):
        _preset("t5-small", "encoder-decoder", "bart")
    with pytest.raises(lmlab.ConfigError, match="--arch bart is for --family encoder-decoder"):
        _preset("tiny", "decoder", "bart")
