"""lmlab's tokenizer against llama.cpp's own tokenizer test vectors (models/ggml-vocab-*.gguf.{inp,out}).

Each vocab's GGUF is converted once per session into the Hugging Face dir its model shipped (see
tests/llamacpp_vocab.py), then every test string must encode to exactly the ids llama.cpp expects. The vectors
hold no BOS/EOS (llama.cpp's test-tokenizer-0 and the script that wrote them both tokenize without special
tokens), so `add_special_tokens=False` throughout; test_bos checks the special tokens separately.

The same assertions run against transformers.AutoTokenizer and the raw `tokenizers` / `sentencepiece` backends
as cross-checks of the converted dirs. Files: `bash tests/fetch_llamacpp_vocab.sh` or $LMLAB_LLAMACPP_VOCAB.
"""
import unicodedata

import pytest
from llamacpp_vocab import HOW_TO_GET, build_dir, read_cases, vocab_dir

# gpt-2: GPT-2 byte-level BPE; llama-spm: Llama 2 SentencePiece BPE; llama-bpe: Llama 3 (regex pre-tokenizer,
# ignore_merges); qwen2: Qwen2 (its own regex, NFC normalizer).
VOCABS = ["gpt-2", "llama-spm", "llama-bpe", "qwen2"]
VDIR = vocab_dir()
BOS = {"gpt-2": None, "llama-spm": 1, "llama-bpe": 128000, "qwen2": None}  # BOS that add_special_tokens prepends


def _params():
    if VDIR is None:
        return [pytest.param("", "", [], id="missing", marks=pytest.mark.skip(reason=HOW_TO_GET))]
    return [pytest.param(name, text, ids, id=f"{name}-{i:02d}")
            for name in VOCABS for i, (text, ids) in enumerate(read_cases(name))]


CASES = _params()
NAMES = [pytest.param(n, marks=pytest.mark.skipif(VDIR is None, reason=HOW_TO_GET)) for n in VOCABS]


def lossless(name: str, text: str) -> bool:
    """Whether decode(encode(text)) must give text back. Byte-level BPE and byte-fallback SentencePiece keep every
    byte; only Qwen2's NFC normalizer changes text that is not already NFC (all of llama.cpp's strings are)."""
    return not (name == "qwen2" and unicodedata.normalize("NFC", text) != text)


def _cached(build):
    """A session-wide memo name -> build(name): each vocab is converted and loaded once."""
    cache = {}
    return lambda name: cache[name] if name in cache else cache.setdefault(name, build(name))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    pytest.importorskip("gguf", reason="pip install gguf (test extra) to read the GGUF vocab files")
    pytest.importorskip("google.protobuf", reason="pip install protobuf (test extra) to write tokenizer.model")
    return _cached(lambda name: build_dir(name, tmp_path_factory.mktemp(f"ggml-vocab-{name}")))


@pytest.fixture(scope="session")
def lmlab_tok(hf_dir):
    import lmlab
    if not hasattr(lmlab, "load_tokenizer"):  # imported lazily: lmlab/tokenizer.py is being written
        pytest.skip("lmlab.load_tokenizer does not exist yet")
    return _cached(lambda name: lmlab.load_tokenizer(hf_dir(name)))


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return _cached(lambda name: transformers.AutoTokenizer.from_pretrained(hf_dir(name)))


# ---- lmlab: the point of this file ----

@pytest.mark.parametrize("name,text,ids", CASES)
def test_lmlab_matches_llamacpp(lmlab_tok, name, text, ids):
    tok = lmlab_tok(name)
    assert tok.encode(text, add_special_tokens=False) == ids
    if lossless(name, text):
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", NAMES)
def test_lmlab_bos(lmlab_tok, name):
    """add_special_tokens=True prepends BOS for Llama 2 (add_bos_token) and Llama 3 (its post-processor) only."""
    text, ids = read_cases(name)[11]  # "Hello world"
    with_bos = ([BOS[name]] if BOS[name] is not None else []) + ids
    assert lmlab_tok(name).encode(text) == with_bos
    assert lmlab_tok(name).decode(with_bos, skip_special_tokens=True) == text


# ---- cross-checks of the converted dirs ----

@pytest.mark.parametrize("name,text,ids", CASES)
def test_transformers_matches_llamacpp(hf_tok, name, text, ids):
    if name == "llama-spm" and text.startswith(" "):
        # transformers 5 rebuilds LlamaTokenizer as Metaspace(prepend_scheme="first"), which adds no dummy prefix
        # to text that already starts with a space (" Hello" -> [15043], not [29871, 15043]); sentencepiece,
        # llama.cpp and transformers 4 (which wrote these vectors) do add it. lmlab must follow sentencepiece.
        pytest.xfail("transformers 5 LlamaTokenizer drops the dummy prefix before a leading space")
    tok = hf_tok(name)
    assert tok.encode(text, add_special_tokens=False) == ids
    if lossless(name, text):
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", NAMES)
def test_transformers_bos(hf_tok, name):
    text, ids = read_cases(name)[11]
    assert hf_tok(name).encode(text) == ([BOS[name]] if BOS[name] is not None else []) + ids


@pytest.fixture(scope="session")
def raw_tok(hf_dir):
    """The files themselves, read by the library that defines them, as (encode, decode) functions."""
    def load(name):
        d = hf_dir(name)
        if (d / "tokenizer.model").exists():  # SentencePiece: no special tokens are ever added by encode()
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            return sp.encode, sp.decode
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        return (lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(ids, skip_special_tokens=False))
    return _cached(load)


@pytest.mark.parametrize("name,text,ids", CASES)
def test_raw_backend_matches_llamacpp(raw_tok, name, text, ids):
    encode, decode = raw_tok(name)
    assert encode(text) == ids
    if lossless(name, text):
        assert decode(ids) == text
