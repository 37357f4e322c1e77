"""Training tokenizers with the field's engines: HF `tokenizers` (byte-level BPE, WordPiece) and
`sentencepiece` (BPE and unigram, lossless for code and whitespace). Used by Tokenizer.train."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterator

from lmlab.chat import DEFAULT_SPECIAL_TOKENS as CHAT_TOKENS
from lmlab.chat import DEFAULT_TEMPLATE
from lmlab.tokenizer import DEFAULT_SPECIAL, GPT4_SPLIT, SPECIAL_KEYS, TokenizerError

KINDS = ("bpe", "sp-bpe", "unigram", "wordpiece")
SP_PIECES = ("unk_token", "bos_token", "eos_token", "pad_token")  # sentencepiece's own ids 0..3


def iter_texts(data) -> Iterator[str]:
    """Lines of text from paths (files; invalid UTF-8 is replaced and counted) or an iterable of strings."""
    if isinstance(data, (str, Path)):
        data = [data]
    items = list(data) if not isinstance(data, Iterator) else data
    bad = 0
    for item in items:
        # a Path, or a string naming an existing file, is read; any other string is text itself
        if isinstance(item, Path) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item)):
            with open(item, "rb") as f:
                for raw in f:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        line, bad = raw.decode("utf-8", errors="replace"), bad + 1
                    yield line
        else:
            yield item
    if bad:
        warnings.warn(f"{bad} lines of the training data were not valid UTF-8; invalid bytes were replaced by U+FFFD")


def wordpiece_pipeline(vocab: dict[str, int], special: dict, lowercase=True, chinese=True, strip_accents=None):
    """A BERT WordPiece tokenizer (as transformers' BertTokenizer): normalise, split on whitespace and
    punctuation, WordPiece with ## continuations, [CLS] text [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(vocab, unk_token=special["unk_token"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = special["cls_token"], special["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values() if t in vocab])
    return tok


def train(cls, data, vocab_size: int, kind: str, special_tokens, show_progress: bool, special_roles=None):
    tok = _train(cls, data, vocab_size, kind, special_tokens, show_progress, special_roles)
    if all(tok.token_to_id(t) is not None for t in CHAT_TOKENS):
        tok.chat_template = DEFAULT_TEMPLATE  # lmlab's own template, whose tokens are in this vocabulary
    return tok


def _train(cls, data, vocab_size: int, kind: str, special_tokens, show_progress: bool, special_roles=None):
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    special = dict(DEFAULT_SPECIAL[kind])
    for key, token in (special_roles or {}).items():
        if key not in SPECIAL_KEYS or not isinstance(token, str) or not token:
            raise TokenizerError(f"special_roles: {key}={token!r}; keys are {SPECIAL_KEYS}, values non-empty strings")
        special[key] = token
    extra = list(CHAT_TOKENS if special_tokens is None else special_tokens)
    if kind in ("sp-bpe", "unigram"):  # roles beyond sentencepiece's own unk/bos/eos/pad pieces are added symbols
        own = {special[k] for k in SP_PIECES}
        extra += [t for t in dict.fromkeys(special.values()) if t not in own and t not in extra]
    all_special = list(dict.fromkeys([*special.values(), *extra]))
    texts = iter_texts(data)
    first = next((t for t in texts if t.strip()), None)
    if first is None:
        raise TokenizerError("the training corpus is empty (no non-blank text)")
    texts = _chain([first], texts)
    if show_progress:
        from tqdm import tqdm
        texts = tqdm(texts, desc=f"training {kind} tokenizer", unit=" lines", mininterval=0.5)
    if kind in ("sp-bpe", "unigram"):
        return _train_sentencepiece(cls, texts, vocab_size, kind, special, extra)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(all_special):
            raise TokenizerError(f"vocab_size {vocab_size} is below the byte alphabet ({len(alphabet)}) plus "
                                 f"{len(all_special)} special tokens")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=all_special, initial_alphabet=alphabet,
                                      show_progress=show_progress, min_frequency=2)
    else:  # wordpiece
        tok = wordpiece_pipeline({t: i for i, t in enumerate(special.values())}, special)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=all_special,
                                            show_progress=show_progress, continuing_subword_prefix="##")
    tok.train_from_iterator(_batched(texts, 1000), trainer=trainer)  # lists: less per-line Python overhead
    if kind == "wordpiece":
        if tok.get_vocab_size() > vocab_size:  # the trainer keeps every character it saw
            raise TokenizerError(f"vocab_size {vocab_size} is below the corpus alphabet plus {len(all_special)} "
                                 f"special tokens ({tok.get_vocab_size()} needed)")
        tok = wordpiece_pipeline(tok.get_vocab(), special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in all_special])
    return cls(hf=tok, special=special, config={"model_max_length": 1_000_000})


def _train_sentencepiece(cls, texts, vocab_size, kind, special, extra):
    import sentencepiece as spm

    floor = 256 + len({*special.values(), *extra})  # byte-fallback pieces + special pieces
    if vocab_size < floor:
        raise TokenizerError(f"vocab_size {vocab_size} is below the 256 byte pieces plus {floor - 256} special tokens")

    model = io.BytesIO()
    # lossless settings: no normalisation, keep every whitespace run, bytes for unseen characters
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t.rstrip("\n") for t in texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe" if kind == "sp-bpe" else "unigram", byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, split_by_whitespace=True, max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=special["unk_token"], bos_piece=special["bos_token"],
            eos_piece=special["eos_token"], pad_piece=special["pad_token"], user_defined_symbols=extra,
            minloglevel=2, hard_vocab_limit=False, num_threads=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed for vocab_size {vocab_size}: {e}") from None
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    added = {t: sp.piece_to_id(t) for t in extra}
    return cls(sp=sp, sp_model=data, special=special, config={"add_bos_token": True, "add_eos_token": False},
               added=added)


def _batched(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _chain(head, tail):
    yield from head
    yield from tail
