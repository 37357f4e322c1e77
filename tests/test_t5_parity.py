"""T5 (v1.0 and v1.1) against transformers: logits both ways with padded encoder and decoder batches, cached
decoding, greedy and beam-search generation, and checkpoint errors. Tiny random models, nothing downloaded."""
import json
import shutil
import warnings

import pytest
import seq2seq_checks
import torch
import transformers
from safetensors.torch import load_file, save_file
from seq2seq_checks import cached_decode_diff, hf_generate, max_logit_diff, same_as_hf

import lmlab
from lmlab.errors import CheckpointError
from lmlab.inference.seq2seq import generate_seq2seq
from lmlab.interop.hf import config_from_hf, read_config

transformers.utils.logging.disable_progress_bar()
TOL = 1e-4
V, EOS, PAD = 64, 1, 0
# few buckets and a short max distance, so 30-token inputs reach the log-spaced and the last bucket
_BASE = dict(vocab_size=V, d_model=32, d_kv=12, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=PAD, eos_token_id=EOS)
# case -> T5Config kwargs. d_kv * heads (48) != d_model (32) on purpose.
CASES = {
    "v1.0": dict(_BASE, num_layers=2, feed_forward_proj="relu"),  # tied head, output scaled by d_model**-0.5
    "v1.1-untied": dict(_BASE, num_layers=2, feed_forward_proj="gated-gelu"),  # config.json written by hand
    "v1.1-tied-v5": dict(_BASE, num_layers=2, feed_forward_proj="gated-gelu"),  # as transformers 5 saves it
    "v1.0-deep-decoder": dict(_BASE, num_layers=1, num_decoder_layers=3, feed_forward_proj="relu"),
}


def hf_model(kw, seed):
    """A random T5ForConditionalGeneration with weights spread enough that differences show, and the eos
    embedding pushed up so that generation sometimes stops early."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name else 0.0)
        model.shared.weight[EOS] += 0.7
    return model


def write_untied(model, out):
    """transformers 5 always ties T5's head, so write a T5 v1.1 file as Google's are: config.json with
    tie_word_embeddings false and a separate lm_head.weight."""
    tmp = out.parent / (out.name + "-tied")
    model.save_pretrained(tmp)
    tensors = load_file(tmp / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn(V, 32, generator=torch.Generator().manual_seed(7)) * 0.3
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    for k in ("scale_decoder_outputs", "dense_act_fn", "is_gated_act"):  # v5 additions, absent from Google's files
        config.pop(k, None)
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(tmp / "generation_config.json", out / "generation_config.json")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp("t5") / case
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = hf_model(CASES[case], seed=list(CASES).index(case))
                write_untied(model, d) if case == "v1.1-untied" else model.save_pretrained(d)
            cache[case] = d
        return cache[case]
    return get


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


def padded_batch(seed):
    """Encoder ids (3, 30) padded on the right, on the left and not at all; decoder ids (3, 22) padded on the right
    (row 0), on the left (row 1) and not at all."""
    return seq2seq_checks.padded_batch(seed, V, 2, left_pad_encoder=True)


def compare(hf, ours, seed=0):
    return max_logit_diff(hf, ours, padded_batch(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_lmlab_logits(case, t5_dir):
    hf, ours = load_hf(t5_dir(case)), lmlab.load_model(t5_dir(case))
    assert ours.family == "encoder-decoder" and ours.config.family == "encoder-decoder"
    diff = compare(hf, ours)
    print(f"{case}: HF -> lmlab max abs logit diff {diff:.2e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"


def test_untied_file_really_untied(t5_dir):
    """transformers uses the file's separate lm_head without scaling, and so does lmlab."""
    d = t5_dir("v1.1-untied")
    hf, ours = load_hf(d), lmlab.load_model(d)
    head = load_file(d / "model.safetensors")["lm_head.weight"]
    assert hf.lm_head.weight is not hf.shared.weight and torch.equal(hf.lm_head.weight, head)
    assert not ours.config.tie_word_embeddings and torch.equal(ours.lm_head.weight, head)
    ids, dec = torch.randint(2, V, (2, 9)), torch.randint(0, V, (2, 6))
    with torch.no_grad():
        h = hf.decoder(input_ids=dec, encoder_hidden_states=hf.encoder(input_ids=ids).last_hidden_state)[0]
        assert (hf(input_ids=ids, decoder_input_ids=dec).logits - h @ head.t()).abs().max() <= 1e-5
        assert (ours(ids, decoder_input_ids=dec) - h @ head.t()).abs().max() <= TOL


def test_padding_does_not_change_rows(t5_dir):
    """Padding on either side, of encoder or decoder, leaves each row's real positions as they are alone
    (positions are relative, so a left-padded row is only shifted)."""
    ours = lmlab.load_model(t5_dir("v1.1-untied"))
    ids, mask, dec, dec_mask = padded_batch(1)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        row0 = ours(ids[0:1, :21], decoder_input_ids=dec[0:1, :15])
        row1 = ours(ids[1:2, 9:], decoder_input_ids=dec[1:2, 5:])
    assert (got[0, :15] - row0[0]).abs().max() <= TOL
    assert (got[1, 5:] - row1[0]).abs().max() <= TOL


def test_labels_are_shifted_like_hf(t5_dir):
    hf, ours = load_hf(t5_dir("v1.0")), lmlab.load_model(t5_dir("v1.0"))
    ids, labels = torch.randint(2, V, (2, 10)), torch.randint(2, V, (2, 7))
    labels[1, 5:] = -100
    assert torch.equal(ours.shift_right(labels), hf._shift_right(labels))
    with torch.no_grad():
        assert (hf(input_ids=ids, labels=labels).logits - ours(ids, labels=labels)).abs().max() <= TOL


LMLAB_CASES = {  # lmlab ModelConfig fields -> saved for transformers
    "v1.0": dict(mlp="plain", hidden_act="relu", tie_word_embeddings=True, num_decoder_layers=2),
    "v1.1": dict(mlp="gated", hidden_act="gelu_tanh", tie_word_embeddings=False, num_decoder_layers=3),
    "gated-silu": dict(mlp="gated", hidden_act="silu", tie_word_embeddings=False, num_decoder_layers=2),
}


@pytest.mark.parametrize("case", list(LMLAB_CASES))
def test_lmlab_to_hf_logits(case, tmp_path):
    """A random lmlab T5 saved with save_pretrained loads in transformers, and back in lmlab, with equal logits."""
    cfg = lmlab.ModelConfig(model_type="t5", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, head_dim=12, norm="rmsnorm", norm_eps=1e-6, position="relative",
                            relative_attention_num_buckets=8, relative_attention_max_distance=20, bos_token_id=None,
                            eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=0, **LMLAB_CASES[case])
    torch.manual_seed(3)
    ours = lmlab.build(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert (hf.lm_head.weight is hf.shared.weight) == cfg.tie_word_embeddings
    diff = compare(hf, ours, seed=4)
    print(f"{case}: lmlab -> HF max abs logit diff {diff:.2e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"
    again = lmlab.load_model(tmp_path)
    assert again.config == ours.config
    assert compare(hf, again, seed=4) <= TOL


def test_cached_decoding_matches_full_forward(t5_dir):
    ours = lmlab.load_model(t5_dir("v1.1-untied"))
    ids, mask, dec, _ = padded_batch(5)
    diff = cached_decode_diff(ours, ids, mask, dec)
    print(f"cached vs full decode max abs diff {diff:.2e}")
    assert diff <= TOL


PROMPTS = [[5, 6, 7, 8, 9, 10, EOS], [11, 12, 13, EOS], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, EOS],
           [40, 3, 41, 3, 42, EOS]]


FILL = (PAD, EOS)  # transformers pads a row that stopped with the pad id, or the eos id in beam search (pad is 0)


@pytest.mark.parametrize("case", ["v1.0", "v1.1-untied"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf(case, penalty, t5_dir):
    hf, ours = load_hf(t5_dir(case)), lmlab.load_model(t5_dir(case))
    ref = hf_generate(hf, PROMPTS, PAD, 12, repetition_penalty=penalty)
    got = lmlab.generate(ours, PROMPTS, max_new_tokens=12, repetition_penalty=penalty)
    assert same_as_hf(got, ref, FILL), (got, ref)
    assert all(len(o) == 12 or o[-1] == EOS for o in got)
    assert lmlab.generate(ours, PROMPTS[0], max_new_tokens=12, repetition_penalty=penalty) == got[0]


# beam settings checked against transformers (a sweep of 486 settings: seeds, k 2-5, length_penalty 0.5-2,
# each early_stopping mode, all matched). The default early_stopping=False is transformers' default too.
BEAMS = [("v1.0", 3, 1.0, False, 1.0), ("v1.0", 4, 1.0, True, 1.0), ("v1.1-untied", 2, 2.0, "never", 1.0),
         ("v1.1-untied", 3, 0.5, False, 1.0), ("v1.0", 3, 1.0, False, 1.3)]


@pytest.mark.parametrize("case,k,length_penalty,early_stopping,penalty", BEAMS)
def test_beam_search_matches_hf(case, k, length_penalty, early_stopping, penalty, t5_dir):
    hf, ours = load_hf(t5_dir(case)), lmlab.load_model(t5_dir(case))
    kw = dict(num_beams=k, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = hf_generate(hf, PROMPTS, PAD, 14, repetition_penalty=penalty, **kw)
    got = generate_seq2seq(ours, PROMPTS, max_new_tokens=14, repetition_penalty=penalty, **kw)
    assert same_as_hf(got, ref, FILL), (got, ref)
    assert lmlab.generate(ours, PROMPTS, max_new_tokens=14, repetition_penalty=penalty, **kw) == got


def test_beams_finish_early_and_differ_from_greedy(t5_dir):
    """The beam cases above exercise finished hypotheses (eos before max_new_tokens) and real search."""
    ours = lmlab.load_model(t5_dir("v1.0"))
    beams = generate_seq2seq(ours, PROMPTS, max_new_tokens=14, num_beams=3)
    greedy = generate_seq2seq(ours, PROMPTS, max_new_tokens=14)
    assert any(len(b) < 14 and b[-1] == EOS for b in beams)
    assert beams != greedy


def test_sampling_is_seeded(t5_dir):
    ours = lmlab.load_model(t5_dir("v1.0"))
    a = lmlab.generate(ours, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
    b = lmlab.generate(ours, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
    assert a == b and all(0 < len(r) <= 10 and all(0 <= t < V for t in r) for r in a)
    with pytest.raises(ValueError, match="temperature"):
        generate_seq2seq(ours, PROMPTS, max_new_tokens=4, num_beams=2, temperature=1.0)


def test_wrong_shape_tensor_is_named(t5_dir, tmp_path):
    src = t5_dir("v1.0")
    shutil.copytree(src, tmp_path / "bad")
    tensors = load_file(src / "model.safetensors")
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    tensors[name] = torch.zeros(40, 32)
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        lmlab.load_model(tmp_path / "bad")


def test_config_errors(t5_dir):
    raw = read_config(t5_dir("v1.0"))
    for k in ("dense_act_fn", "is_gated_act"):  # transformers 5 writes these, and they win over feed_forward_proj
        raw.pop(k, None)
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        config_from_hf(raw | {"feed_forward_proj": "double-relu"}, "x/config.json")
    with pytest.raises(CheckpointError, match="quick_gelu"):
        config_from_hf(raw | {"feed_forward_proj": "gated-quick_gelu"}, "x/config.json")
    cfg = config_from_hf(raw)
    assert (cfg.mlp, cfg.hidden_act, cfg.tie_word_embeddings, cfg.head_dim, cfg.bos_token_id) == \
        ("plain", "relu", True, 12, None)
    with pytest.raises(lmlab.ConfigError, match="T5"):
        lmlab.build(cfg.replace(norm="layernorm"))
