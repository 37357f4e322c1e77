"""BART against transformers: logits both ways with padded encoder and decoder batches, final_logits_bias and
scale_embedding, cached decoding, greedy and beam-search generation (forced bos/eos included), and checkpoint
errors. Tiny random models, nothing downloaded."""
import json
import shutil
import warnings

import pytest
import seq2seq_checks
import torch
import transformers
from safetensors.torch import load_file, save_file
from seq2seq_checks import cached_decode_diff, hf_generate, max_logit_diff, same_as_hf
from transformers.models.bart.modeling_bart import shift_tokens_right

import lmlab
from lmlab.errors import CheckpointError
from lmlab.inference.seq2seq import generate_seq2seq
from lmlab.interop.hf import config_from_hf, read_config

transformers.utils.logging.disable_progress_bar()
TOL = 1e-4
# a padded batch and a lone row multiply matrices of different shapes, whose sums the BLAS orders differently:
# on an AVX2 CPU their logits differ by up to ~1.1e-4 (a padding bug moves them by > 0.01: the shifted check below)
PAD_TOL = 3e-4
V, BOS, PAD, EOS = 64, 0, 1, 2
_BASE = dict(vocab_size=V, d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_attention_heads=4,
             decoder_attention_heads=4, max_position_embeddings=40, dropout=0.0)
# case -> (BartConfig kwargs, generation_config changes, std of the query and key weights)
CASES = {
    "base": (dict(_BASE, encoder_layers=2, decoder_layers=2), {}, 0.8),  # tied, exact GELU, forced eos (the default)
    "scaled-relu-deep": (dict(_BASE, encoder_layers=1, decoder_layers=3, scale_embedding=True,
                              activation_function="relu"), {}, 0.5),
    # as facebook/bart-large's generation config. (transformers' gelu_new formula rounds apart from torch's tanh
    # GELU: sharper attention (query/key std 0.8) amplifies that to 9e-5 here, 0.5 keeps it at 3e-5)
    "forced-bos-gelu-new": (dict(_BASE, encoder_layers=2, decoder_layers=2, activation_function="gelu_new"),
                            {"forced_bos_token_id": BOS}, 0.5),
}


def hf_model(case, seed):
    """A random BartForConditionalGeneration with weights spread enough that differences show (norm weights
    around 1, a final_logits_bias far from 0). Queries and keys are spread more, so that attention picks tokens
    rather than averaging them (else the tied embeddings make a random post-norm BART repeat one token whatever
    the prompt), and eos is pushed up so that generation sometimes stops early."""
    kw, gen, qk = CASES[case]
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = (qk if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.3) if p.dim() > 1 else 0.1
            p.normal_(0, std).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        model.final_logits_bias.normal_(0, 0.5)
        model.final_logits_bias[0, EOS] += 1.0
    for k, v in gen.items():
        setattr(model.generation_config, k, v)
    return model


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp("bart") / case
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf_model(case, seed=list(CASES).index(case)).save_pretrained(d)
            cache[case] = d
        return cache[case]
    return get


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BartForConditionalGeneration.from_pretrained(path).eval()


def padded_batch(seed):
    """Encoder ids (3, 30) padded on the right (rows 0 and 1: BART's positions are absolute, so prompts are padded
    on the right) and not at all; decoder ids (3, 22) padded on the right (row 0), on the left (row 1: shifted
    positions, the same in both) and not at all."""
    return seq2seq_checks.padded_batch(seed, V, 3, left_pad_encoder=False)


def compare(hf, ours, seed=0):
    return max_logit_diff(hf, ours, padded_batch(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_lmlab_logits(case, bart_dir):
    hf, ours = load_hf(bart_dir(case)), lmlab.load_model(bart_dir(case))
    assert type(ours).__name__ == "Bart" and ours.config.family == "encoder-decoder"
    assert torch.equal(ours.final_logits_bias, hf.final_logits_bias) and ours.final_logits_bias.abs().max() > 0.5
    assert ours.embed_scale == (32 ** 0.5 if case == "scaled-relu-deep" else 1.0)
    assert ours.config.forced_bos_token_id == CASES[case][1].get("forced_bos_token_id")
    diff = compare(hf, ours)
    print(f"{case}: HF -> lmlab max abs logit diff {diff:.2e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"


def test_right_padding_does_not_change_rows(bart_dir):
    """Right padding of the encoder or the decoder leaves each row's real positions as they are alone."""
    ours = lmlab.load_model(bart_dir("base"))
    ids, mask, dec, dec_mask = padded_batch(1)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        row0 = ours(ids[0:1, :21], decoder_input_ids=dec[0:1, :15])
        row1 = ours(ids[1:2, :12], decoder_input_ids=dec[1:2])
    assert (got[0, :15] - row0[0]).abs().max() <= PAD_TOL
    assert (got[1, 5:] - row1[0, 5:]).abs().max() > 0.01  # (row 1's decoder is left-padded: positions shift)
    with torch.no_grad():
        row1 = ours(ids[1:2, :12], decoder_input_ids=dec[1:2], decoder_attention_mask=dec_mask[1:2])
    assert (got[1, 5:] - row1[0, 5:]).abs().max() <= PAD_TOL


def test_labels_are_shifted_like_hf(bart_dir):
    """Teacher forcing from labels: [decoder_start = eos] + labels[:-1], -100 read as pad, as transformers."""
    hf, ours = load_hf(bart_dir("base")), lmlab.load_model(bart_dir("base"))
    ids, labels = torch.randint(3, V, (2, 10)), torch.randint(3, V, (2, 7))
    labels[1, 5:] = -100
    assert torch.equal(ours.shift_right(labels), shift_tokens_right(labels, PAD, EOS))
    with torch.no_grad():
        assert (hf(input_ids=ids, labels=labels).logits - ours(ids, labels=labels)).abs().max() <= TOL


LMLAB_CASES = {  # lmlab ModelConfig fields -> saved for transformers
    "tied": dict(tie_word_embeddings=True, num_decoder_layers=2, hidden_act="gelu"),
    "untied-scaled": dict(tie_word_embeddings=False, num_decoder_layers=3, hidden_act="gelu_tanh",
                          scale_embedding=True, forced_bos_token_id=BOS),
}


@pytest.mark.parametrize("case", list(LMLAB_CASES))
def test_lmlab_to_hf_logits(case, tmp_path):
    """A random lmlab BART saved with save_pretrained loads in transformers, and back in lmlab, with equal logits
    and generation settings."""
    cfg = lmlab.preset("bart-tiny").replace(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, head_dim=8, max_position_embeddings=40,
                                            **LMLAB_CASES[case])
    torch.manual_seed(3)
    ours = lmlab.build(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norms away from 1, biases away from 0
        ours.final_logits_bias.normal_(0, 0.5)
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert (hf.lm_head.weight is hf.model.shared.weight) == cfg.tie_word_embeddings
    assert torch.equal(hf.final_logits_bias, ours.final_logits_bias)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == EOS and gen["forced_eos_token_id"] == EOS
    assert gen.get("forced_bos_token_id") == cfg.forced_bos_token_id
    diff = compare(hf, ours, seed=4)
    print(f"{case}: lmlab -> HF max abs logit diff {diff:.2e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"
    again = lmlab.load_model(tmp_path)
    assert again.config == ours.config
    assert compare(hf, again, seed=4) <= TOL


def test_cached_decoding_matches_full_forward(bart_dir):
    """In float64, so that the check is of the cache's bookkeeping: these spread random weights make fp32 results
    move by ~1e-3 when only the order of operations changes (float32 vs float64 forward: 1.5e-3 on this case)."""
    ours = lmlab.load_model(bart_dir("scaled-relu-deep"), dtype=torch.float64)
    ids, mask, dec, _ = padded_batch(5)
    diff = cached_decode_diff(ours, ids, mask, dec)
    print(f"cached vs full decode max abs diff {diff:.2e}")
    assert diff <= 1e-9


PROMPTS = [[BOS, 5, 6, 7, 8, 9, 10, EOS], [BOS, 11, 12, 13, EOS], [BOS, *range(20, 31), EOS],
           [BOS, 40, 3, 41, 3, 42, EOS]]




@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf(case, penalty, bart_dir):
    hf, ours = load_hf(bart_dir(case)), lmlab.load_model(bart_dir(case))
    ref = hf_generate(hf, PROMPTS, PAD, 12, repetition_penalty=penalty)
    got = lmlab.generate(ours, PROMPTS, max_new_tokens=12, repetition_penalty=penalty)
    assert same_as_hf(got, ref, [PAD]), (got, ref)  # transformers fills a stopped row with pad
    assert all(o[-1] == EOS for o in got)  # a stop token, or the forced eos at max_new_tokens
    if case == "forced-bos-gelu-new":
        assert all(o[0] == BOS for o in got)
    assert lmlab.generate(ours, PROMPTS[0], max_new_tokens=12, repetition_penalty=penalty) == got[0]


BEAMS = [("base", 3, 1.0, False, 1.0), ("scaled-relu-deep", 2, 2.0, "never", 1.3),
         ("forced-bos-gelu-new", 4, 0.5, True, 1.0)]


@pytest.mark.parametrize("case,k,length_penalty,early_stopping,penalty", BEAMS)
def test_beam_search_matches_hf(case, k, length_penalty, early_stopping, penalty, bart_dir):
    hf, ours = load_hf(bart_dir(case)), lmlab.load_model(bart_dir(case))
    kw = dict(num_beams=k, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = hf_generate(hf, PROMPTS, PAD, 14, repetition_penalty=penalty, **kw)
    got = generate_seq2seq(ours, PROMPTS, max_new_tokens=14, repetition_penalty=penalty, **kw)
    assert same_as_hf(got, ref, [PAD]), (got, ref)  # transformers fills a stopped row with pad


def test_generation_is_not_trivial(bart_dir):
    """The cases above exercise rows that stop early, rows that vary (not one token repeated) and answers that
    depend on the prompt."""
    ours = lmlab.load_model(bart_dir("base"))
    for penalty in (1.0, 1.3):
        greedy = generate_seq2seq(ours, PROMPTS, max_new_tokens=12, repetition_penalty=penalty)
        assert any(len(r) < 12 for r in greedy) and any(len(set(r)) > 3 for r in greedy), greedy
        assert len({r[0] for r in greedy}) > 2, greedy


def test_old_checkpoint_layout(bart_dir, tmp_path):
    """Files as the hub's BART checkpoints are (embed_tokens copies, lm_head, no final_logits_bias) load without
    warnings: the copies are skipped, the bias is zero."""
    src = bart_dir("base")
    shutil.copytree(src, tmp_path / "old")
    tensors = load_file(src / "model.safetensors")
    shared = tensors["model.shared.weight"]
    tensors |= {"model.encoder.embed_tokens.weight": shared.clone(), "model.decoder.embed_tokens.weight": shared.clone(),
                "lm_head.weight": shared.clone()}
    del tensors["final_logits_bias"]
    save_file(tensors, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = lmlab.load_model(tmp_path / "old")
    assert not ours.final_logits_bias.any()
    hf = load_hf(tmp_path / "old")
    assert compare(hf, ours) <= TOL


def test_checkpoint_errors(bart_dir, tmp_path):
    raw = read_config(bart_dir("base"))
    with pytest.raises(CheckpointError, match="decoder_ffn_dim"):
        config_from_hf(raw | {"decoder_ffn_dim": 64}, "x/config.json")
    with pytest.raises(CheckpointError, match="normalize_before"):
        config_from_hf(raw | {"normalize_before": True}, "x/config.json")
    with pytest.raises(CheckpointError, match="quick_gelu"):
        config_from_hf(raw | {"activation_function": "quick_gelu"}, "x/config.json")
    cfg = config_from_hf(raw)
    assert (cfg.model_type, cfg.decoder_start_token_id, cfg.forced_eos_token_id, cfg.pad_token_id) == \
        ("bart", EOS, EOS, PAD)
    with pytest.raises(lmlab.ConfigError, match="BART"):
        lmlab.build(cfg.replace(norm="rmsnorm"))
    # an untied file whose stacks have embeddings of their own (transformers 5 allows it) is refused
    shutil.copytree(bart_dir("base"), tmp_path / "untied")
    tensors = load_file(tmp_path / "untied" / "model.safetensors")
    tensors |= {"lm_head.weight": tensors["model.shared.weight"].clone(),
                "model.encoder.embed_tokens.weight": torch.zeros(V, 32)}
    save_file(tensors, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "untied" / "config.json").write_text(json.dumps(raw | {"tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="model.encoder.embed_tokens.weight differs"):
        lmlab.load_model(tmp_path / "untied")
    # positions past max_position_embeddings are an error, not an index out of range
    with pytest.raises(ValueError, match="40 positions"):
        lmlab.load_model(bart_dir("base"))(torch.ones(1, 41, dtype=torch.long), decoder_input_ids=torch.ones(1, 2,
                                                                                                           dtype=torch.long))
