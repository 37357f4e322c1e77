"""llama.cpp's tokenizer test vectors, and converters from its vocab-only GGUF files to Hugging Face dirs.

llama.cpp ships, in `models/`, `ggml-vocab-NAME.gguf` (a vocab-only GGUF), `ggml-vocab-NAME.gguf.inp` (test
strings, each followed by a line `__ggml_vocab_test__`) and `ggml-vocab-NAME.gguf.out` (one line of expected
ids per string). The `.out` lines were written by `convert_hf_to_gguf_update.py` with the original Hugging Face
tokenizer, `tokenizer.encode(text, add_special_tokens=False)`, and llama.cpp's `tests/test-tokenizer-0.cpp`
checks them with `add_special=false, parse_special=false`: no BOS/EOS is ever part of the expected ids.

The converters read the GGUF metadata with the `gguf` package's GGUFReader (not transformers' GGUF
integration) and write the files a Hugging Face checkpoint would hold. Get the files with
`bash tests/fetch_llamacpp_vocab.sh` (it fills `.venv/llamacpp-vocab/`), or point $LMLAB_LLAMACPP_VOCAB at
llama.cpp's `models/` folder.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEP = "\n__ggml_vocab_test__\n"  # the separator test-tokenizer-0.cpp splits the .inp file on
HOW_TO_GET = "llama.cpp vocab files missing: run `bash tests/fetch_llamacpp_vocab.sh` or set $LMLAB_LLAMACPP_VOCAB"

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type; SentencePiece uses the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of the original tokenizer.json files, keyed by GGUF `tokenizer.ggml.pre`.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre -> (split regex or None for GPT-2's built-in ByteLevel regex, NFC normalizer, ignore_merges, tokenizer_class)
BPE_PRE = {
    "gpt-2": (None, False, False, "GPT2Tokenizer"),
    "llama-bpe": (LLAMA3_REGEX, False, True, "PreTrainedTokenizerFast"),  # llama.cpp: ignore_merges, add_bos
    "qwen2": (QWEN2_REGEX, True, False, "Qwen2Tokenizer"),
}


def vocab_dir() -> Path | None:
    """The folder holding ggml-vocab-* files: $LMLAB_LLAMACPP_VOCAB or <repo>/.venv/llamacpp-vocab; None if absent."""
    d = Path(os.environ.get("LMLAB_LLAMACPP_VOCAB") or REPO / ".venv" / "llamacpp-vocab")
    return d if (d / "ggml-vocab-gpt-2.gguf").is_file() else None


def read_cases(name: str, folder: Path | None = None) -> list[tuple[str, list[int]]]:
    """[(text, expected ids)] for ggml-vocab-NAME, parsed exactly as llama.cpp's test-tokenizer-0.cpp does."""
    base = Path(folder or vocab_dir()) / f"ggml-vocab-{name}.gguf"
    raw = (base.parent / (base.name + ".inp")).read_bytes().decode("utf-8")  # bytes: keep any \r as is
    texts, pos = [], 0
    while pos < len(raw):  # split on SEP; a trailing SEP does not start an empty case
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = (base.parent / (base.name + ".out")).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # std::getline yields no line after the final newline
    if len(texts) != len(lines):
        raise ValueError(f"{base}: {len(texts)} inputs but {len(lines)} outputs")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@functools.lru_cache(maxsize=2)  # GGUFReader takes seconds on a 128k vocab: read each file once
def read_gguf_vocab(gguf_path) -> dict:
    """The tokenizer.ggml.* metadata of a GGUF file, as plain Python values, keys without the prefix."""
    from gguf import GGUFReader
    reader = GGUFReader(str(gguf_path))
    prefix = "tokenizer.ggml."
    return {k[len(prefix):]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gpt2_dir(gguf_path, out_dir) -> Path:
    """Write a byte-level BPE tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) from a GGUF
    whose tokenizer.ggml.model is "gpt2". The pre-tokenizer follows tokenizer.ggml.pre (see BPE_PRE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    v = read_gguf_vocab(str(gguf_path))
    assert v["model"] == "gpt2", v["model"]
    regex, nfc, ignore_merges, tok_class = BPE_PRE[v.get("pre", "gpt-2")]
    tokens, types = v["tokens"], v["token_type"]
    merges = [tuple(m.split(" ", 1)) for m in v["merges"]]  # byte-level pieces never hold a real space
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if regex is None:  # GPT-2: ByteLevel applies its own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens become special added tokens; user-defined ones plain added tokens (both matched in text).
    tok.add_tokens([AddedToken(t, special=(ty == CONTROL), normalized=False)
                    for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    name = lambda key: tokens[v[key]] if key in v else None  # noqa: E731
    bos, eos = name("bos_token_id"), name("eos_token_id")
    add_bos = bool(v.get("add_bos_token", v.get("pre") == "llama-bpe"))  # llama.cpp defaults LLAMA3 to BOS
    if add_bos:  # Llama 3 style: prepend BOS through a template post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, v["bos_token_id"])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": eos}
    if tok_class == "GPT2Tokenizer":
        special["unk_token"] = eos  # GPT-2's unk is <|endoftext|> too
    if "padding_token_id" in v:
        special["pad_token"] = name("padding_token_id")
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", dict(
        special, tokenizer_class=tok_class, add_prefix_space=False, clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000, **({"add_bos_token": True} if add_bos else {})))
    return out


def llama_spm_dir(gguf_path, out_dir) -> Path:
    """Write a SentencePiece BPE tokenizer.model (+ tokenizer_config.json) from a GGUF whose tokenizer.ggml.model
    is "llama", with Llama's normalizer: dummy prefix, no whitespace squeezing, identity rules, byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    v = read_gguf_vocab(str(gguf_path))
    assert v["model"] == "llama", v["model"]
    m = pb.ModelProto()
    for piece, score, ty in zip(v["tokens"], v["scores"], v["token_type"]):
        m.pieces.add(piece=piece, score=float(score), type=int(ty))  # GGUF and SentencePiece types coincide
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(m.pieces)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id = (int(v.get(k, d)) for k, d in
                                       (("unknown_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)))
    ts.pad_id = int(v.get("padding_token_id", -1))
    ts.unk_piece, ts.bos_piece, ts.eos_piece = (v["tokens"][i] for i in (ts.unk_id, ts.bos_id, ts.eos_id))
    ns = m.normalizer_spec
    ns.name = "identity"  # no NFKC / nmt rules, and no precompiled_charsmap
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    special = {"bos_token": ts.bos_piece, "eos_token": ts.eos_piece, "unk_token": ts.unk_piece}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", dict(
        special, tokenizer_class="LlamaTokenizer", add_bos_token=bool(v.get("add_bos_token", True)),
        add_eos_token=bool(v.get("add_eos_token", False)), legacy=False, clean_up_tokenization_spaces=False,
        pad_token=None, sp_model_kwargs={}, model_max_length=1_000_000_000))
    return out


def build_dir(name: str, out_dir, folder: Path | None = None) -> Path:
    """The HF dir for ggml-vocab-NAME.gguf, with the converter its tokenizer.ggml.model calls for."""
    path = Path(folder or vocab_dir()) / f"ggml-vocab-{name}.gguf"
    model = read_gguf_vocab(str(path))["model"]
    return (llama_spm_dir if model == "llama" else gpt2_dir)(path, out_dir)
