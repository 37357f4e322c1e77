"""The tokenizer part of a GGUF file: the `tokenizer.ggml.*` keys llama.cpp reads, from an lmlab Tokenizer.

Four tokenizer models, as llama.cpp names them:
- "gpt2": byte-level BPE (tokenizer.json): tokens, merges and a pre-tokenizer name (`tokenizer.ggml.pre`)
  whose regex llama.cpp knows. The name is chosen by comparing the tokenizer's split regex with the ones
  llama.cpp implements (PRE_TOKENIZERS); lmlab's own BPE uses the Llama 3 regex without ignore_merges, which
  llama.cpp has under "smaug-bpe" (same regex as "llama-bpe", which also skips merges for whole-word tokens).
- "llama": SentencePiece BPE (tokenizer.model): pieces, scores and types, copied from the model proto.
- "t5": SentencePiece unigram: the same, scored by llama.cpp's unigram (Viterbi) tokenizer.
- "bert": WordPiece: llama.cpp marks word starts instead of continuations ("##ing" -> "ing", "play" -> "▁play").
Token types follow SentencePiece's numbers (normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6);
rows of the embedding beyond the vocabulary are padded with unused "[PAD{i}]" tokens.
"""
from __future__ import annotations

import json
import re

from lmlab.interop.gguf import GGUFError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# (split regex, NFC normalizer, ignore_merges) -> llama.cpp pre-tokenizer name; GPT-2's regex is also what a
# bare ByteLevel(use_regex=True) pre-tokenizer applies.
PRE_TOKENIZERS = {
    (GPT2_REGEX, False, False): "gpt-2",
    (LLAMA3_REGEX, False, True): "llama-bpe",
    (LLAMA3_REGEX, False, False): "smaug-bpe",
    (QWEN2_REGEX, True, False): "qwen2",
}


def _pad(tokens: list, types: list, scores: list | None, n_rows: int, what: str) -> None:
    if len(tokens) > n_rows:
        raise GGUFError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_rows} rows ({what}); "
                        "resize the model's embedding or use the tokenizer it was trained with")
    for i in range(len(tokens), n_rows):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _bpe_pre(tj: dict) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json, or a GGUFError naming what differs."""
    pre, norm, model = tj.get("pre_tokenizer") or {}, tj.get("normalizer"), tj["model"]
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    for s in steps:
        if s.get("type") == "Split":
            regex = s["pattern"].get("Regex") or s["pattern"].get("String")
        elif s.get("type") == "ByteLevel" and s.get("use_regex", True):
            regex = GPT2_REGEX if regex is None else None
        elif s.get("type") != "ByteLevel":
            raise GGUFError(f"pre-tokenizer step {s.get('type')!r} has no llama.cpp equivalent")
    nfc = (norm or {}).get("type") == "NFC"
    if norm and not nfc:
        raise GGUFError(f"normalizer {norm.get('type')!r} has no llama.cpp equivalent for a BPE tokenizer")
    key = (regex, nfc, bool(model.get("ignore_merges", False)))
    if key not in PRE_TOKENIZERS:
        raise GGUFError(f"no llama.cpp pre-tokenizer splits like this tokenizer (regex {regex!r}, NFC {nfc}, "
                        f"ignore_merges {key[2]}); llama.cpp would tokenize differently")
    return PRE_TOKENIZERS[key]


def _hf_vocab(tok, n_rows: int) -> dict:
    """tokenizer.json (BPE or WordPiece) -> GGUF keys."""
    tj = json.loads(tok._hf.to_str())
    model = tj["model"]
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    vocab = {**model["vocab"], **{a["content"]: i for i, a in added.items()}}
    size = max(vocab.values()) + 1
    tokens, types = [None] * size, [UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = (CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    if model["type"] == "BPE":
        if model.get("byte_fallback") or model.get("unk_token"):
            raise GGUFError("a SentencePiece-style BPE tokenizer.json (byte fallback, unk) is not supported; "
                            "save the model with its tokenizer.model")
        out = {"model": "gpt2", "pre": _bpe_pre(tj),
               "merges": [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]}
    elif model["type"] == "WordPiece":
        # llama.cpp's WordPiece marks word starts with "▁" instead of continuations with "##"
        prefix = model.get("continuing_subword_prefix", "##")
        tokens = [t if types[i] != NORMAL or (t.startswith("[") and t.endswith("]")) else
                  t[len(prefix):] if t.startswith(prefix) else "\u2581" + t for i, t in enumerate(tokens)]
        types = [CONTROL if t.startswith("[") and t.endswith("]") and types[i] == CONTROL else ty
                 for i, (t, ty) in enumerate(zip(tokens, types))]
        out = {"model": "bert", "pre": "default"}
    else:
        raise GGUFError(f"tokenizer.json model {model['type']!r} has no GGUF representation here")
    _pad(tokens, types, None, n_rows, "tokenizer.json")
    return out | {"tokens": tokens, "token_type": types}


def _sp_vocab(tok, n_rows: int) -> dict:
    """tokenizer.model (+ added tokens past its pieces) -> GGUF keys."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok._sp_model)
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for t, i in sorted(tok.added.items(), key=lambda ti: ti[1]):
        if i >= len(tokens):  # an added token beyond the model's pieces (tokenizer_config added_tokens_decoder)
            while len(tokens) < i:
                tokens.append(f"[PAD{len(tokens)}]")
                scores.append(-1000.0)
                types.append(UNUSED)
            tokens.append(t)
            scores.append(0.0)
            types.append(USER_DEFINED if t in tok._nonspecial else CONTROL)
    unigram = proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    _pad(tokens, types, scores, n_rows, "tokenizer.model")
    ns = proto.normalizer_spec
    if ns.name not in ("identity", "") and ns.precompiled_charsmap and not unigram:
        raise GGUFError(f"tokenizer.model normalizes with {ns.name!r}, which llama.cpp's SentencePiece BPE skips")
    out = {"model": "t5" if unigram else "llama", "tokens": tokens, "scores": scores, "token_type": types,
           "add_space_prefix": bool(ns.add_dummy_prefix),
           "remove_extra_whitespaces": bool(ns.remove_extra_whitespaces)}
    if unigram and ns.precompiled_charsmap:
        out["precompiled_charsmap"] = bytes(ns.precompiled_charsmap)
    return out


def add_vocab(w, tok, cfg, arch: str) -> None:
    """Write tok's vocabulary, special ids, BOS/EOS policy and chat template into the GGUFWriter `w`."""
    import numpy as np

    n_rows = cfg.vocab_size
    v = _sp_vocab(tok, n_rows) if tok.backend == "sentencepiece" else _hf_vocab(tok, n_rows)
    w.add_tokenizer_model(v["model"])
    if "pre" in v:
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["token_type"])
    if "scores" in v:
        w.add_token_scores(v["scores"])
    if "merges" in v:
        w.add_token_merges(v["merges"])
    for key in ("add_space_prefix", "remove_extra_whitespaces"):
        if key in v:
            getattr(w, f"add_{key}")(v[key])
    if "precompiled_charsmap" in v:
        w.add_precompiled_charsmap(np.frombuffer(v["precompiled_charsmap"], dtype=np.uint8))
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id,
           "sep": tok.sep_token_id, "mask": tok.mask_token_id}
    if v["model"] == "bert":  # llama.cpp's BOS for WordPiece is [CLS]
        ids["bos"] = tok.cls_token_id
    if arch == "t5" and cfg.decoder_start_token_id is not None:
        w.add_decoder_start_token_id(cfg.decoder_start_token_id)
    for role, i in ids.items():
        if i is not None:
            getattr(w, f"add_{role}_token_id")(i)
    if v["model"] != "bert":  # llama.cpp's WordPiece always wraps in [CLS] ... [SEP]
        w.add_add_bos_token(bool(tok.add_bos_token))
        w.add_add_eos_token(bool(tok.add_eos_token))
    if tok.chat_template:  # without transformers' {% generation %} markers, which other Jinja engines reject
        w.add_chat_template(re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", tok.chat_template))
