"""One Tokenizer over the field's engines: Hugging Face `tokenizers` (tokenizer.json, vocab.txt) and
`sentencepiece` (tokenizer.model). Load any HF model directory, train, save what transformers loads.

Encoding rules follow transformers 5 so that ids match `AutoTokenizer` exactly:
- tokenizer.json: the file's own pipeline; `add_bos_token`/`add_eos_token` in tokenizer_config.json
  (when present) replace its post-processor with [bos] $A [eos], as transformers does.
- tokenizer.model: sentencepiece encodes plain text; added/special tokens are split out first, and
  only the first text segment gets sentencepiece's leading "▁" (transformers' legacy=False).
- vocab.txt: BERT WordPiece ([CLS] text [SEP]), lower-cased unless do_lower_case is false.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from lmlab.errors import LmlabError
from lmlab.fileio import write_json

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# GPT-4's pre-tokenizer: contractions, words with one leading non-letter, 1-3 digit numbers,
# punctuation runs, and newlines / spaces kept apart so code indentation tokenizes consistently.
GPT4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SPECIAL = {"bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
                   "sp-bpe": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
                   "unigram": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
                   "wordpiece": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                 "cls_token": "[CLS]", "mask_token": "[MASK]"}}


class TokenizerError(LmlabError, ValueError):
    """A tokenizer directory or training input is unusable; the message names the file or setting."""


def _content(tok) -> str | None:
    """Special tokens are written as strings or as serialized AddedToken dicts."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


class Tokenizer:
    """Text <-> ids. Build with `load_tokenizer(dir)` or `Tokenizer.train(...)`."""

    def __init__(self, *, hf=None, sp=None, sp_model: bytes | None = None, special: dict, config: dict | None = None,
                 chat_template: str | None = None, added: dict[str, int] | None = None,
                 nonspecial: set[str] = frozenset()):
        self._hf, self._sp, self._sp_model = hf, sp, sp_model
        self.config = dict(config or {})
        self.chat_template = chat_template
        for key in SPECIAL_KEYS:
            setattr(self, key, special.get(key))
        if sp is not None:
            self.added = dict(added or {})  # content -> id: split out of the text before sentencepiece
            self._nonspecial = set(nonspecial)  # added tokens that decode even with skip_special_tokens
            for tok in special.values():  # special pieces such as <s> are matched in text, as in transformers
                if tok is not None and tok not in self.added:
                    i = sp.piece_to_id(tok)
                    if i != sp.unk_id() or tok == sp.id_to_piece(i):
                        self.added[tok] = i
            self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")") \
                if self.added else None
            self._added_by_id = {i: t for t, i in self.added.items()}
            self._sp_inner = _without_dummy_prefix(sp_model)  # for text that follows an added token
            self.add_bos_token = bool(self.config.get("add_bos_token", True)) and self.bos_token is not None
            self.add_eos_token = bool(self.config.get("add_eos_token", False)) and self.eos_token is not None
        else:
            from tokenizers import AddedToken
            missing = [t for t in special.values() if t is not None and hf.token_to_id(t) is None]
            if missing:  # a special token named in the config but not in the vocabulary: added, as transformers does
                hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            for key in ("add_bos_token", "add_eos_token"):
                if key in self.config:
                    self._set_post_processor()
                    break
            probe = hf.encode("", add_special_tokens=True).ids
            self.add_bos_token = bool(probe) and probe[0] == self.bos_token_id and self.bos_token is not None
            self.add_eos_token = bool(probe) and probe[-1] == self.eos_token_id and self.eos_token is not None
        for key in SPECIAL_KEYS:
            tok = getattr(self, key)
            if tok is not None and self.token_to_id(tok) is None:
                raise TokenizerError(f"special token {key}={tok!r} is not in the vocabulary")

    def _set_post_processor(self):
        from tokenizers import processors

        bos = self.bos_token if self.config.get("add_bos_token", False) else None
        eos = self.eos_token if self.config.get("add_eos_token", False) else None
        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        specials = [(t, self._hf.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
        self._hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def set_framing(self, bos: bool, eos: bool) -> None:
        """Add bos before / eos after every encoded text (with add_special_tokens), kept when saved: T5's
        convention is "text </s>", BART's "<s> text </s>"."""
        bos, eos = bos and self.bos_token is not None, eos and self.eos_token is not None
        if self._sp is None:
            self.config.update(add_bos_token=bos, add_eos_token=eos)
            self._set_post_processor()
        self.add_bos_token, self.add_eos_token = bos, eos

    # ------------------------------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> str:
        return "sentencepiece" if self._sp is not None else "tokenizers"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what the embedding needs)."""
        if self._sp is not None:
            return max([self._sp.get_piece_size() - 1, *self.added.values()]) + 1
        return self._hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        if self._sp is not None:
            if token in self.added:
                return self.added[token]
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if self._sp is not None:
            return self._added_by_id.get(i) or (self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else None)
        return self._hf.id_to_token(i)

    def __getattr__(self, name):
        # bos_token_id, eos_token_id, ... follow the token strings
        if name.endswith("_token_id") and name[:-3] in SPECIAL_KEYS:
            tok = getattr(self, name[:-3])
            return None if tok is None else self.token_to_id(tok)
        raise AttributeError(name)

    @property
    def special_ids(self) -> set[int]:
        ids = {self.token_to_id(getattr(self, k)) for k in SPECIAL_KEYS if getattr(self, k) is not None}
        if self._sp is not None:
            ids |= {i for t, i in self.added.items() if t not in self._nonspecial}
        else:
            ids |= {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        return ids

    @property
    def special_tokens(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None}

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._sp is None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = []
        for first, seg in self._segments(text):
            # only the first text segment gets sentencepiece's leading "▁" (transformers' legacy=False)
            ids += [self.added[seg]] if seg in self.added else (self._sp if first else self._sp_inner).encode(seg)
        return self._bos_eos(ids) if add_special_tokens else ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False):
        """-> (ids, offsets): offsets[i] = (start, end) character span of token i in `text`."""
        if self._sp is None:
            enc = self._hf.encode(text, add_special_tokens=add_special_tokens)
            return enc.ids, enc.offsets
        ids, offsets, pos = [], [], 0
        for first, seg in self._segments(text):
            if seg in self.added:
                ids.append(self.added[seg])
                offsets.append((pos, pos + len(seg)))
            else:
                pieces = (self._sp if first else self._sp_inner).encode(seg, return_type="proto").pieces
                # sentencepiece's surface offsets count UTF-8 bytes; map them to characters of `text`
                char_at = [i for i, ch in enumerate(seg) for _ in ch.encode()] + [len(seg)]
                for p in pieces:
                    ids.append(p.id)
                    offsets.append((pos + char_at[p.begin], pos + char_at[p.end]))
            pos += len(seg)
        if add_special_tokens:
            n = len(ids)
            ids = self._bos_eos(ids)
            if self.add_bos_token:
                offsets = [(0, 0)] + offsets
            offsets += [(len(text), len(text))] * (len(ids) - n - self.add_bos_token)
        return ids, offsets

    def _segments(self, text: str):
        """(is_first, segment) of the text split around added tokens (sentencepiece backend)."""
        parts = self._split.split(text) if self._split else [text]
        return [(i == 0, seg) for i, seg in enumerate(p for p in parts if p)]

    def _bos_eos(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, padding_side: str = "right",
                     max_length: int | None = None):
        """-> (ids, attention_mask) as lists of equal-length lists, padded with pad (or eos) id."""
        # the libraries' own batch calls run on every core
        if self._sp is None:
            seqs = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=add_special_tokens)]
        else:
            plain = [i for i, t in enumerate(texts) if not (self._split and self._split.search(t))]
            seqs = [None] * len(texts)
            for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain])):
                seqs[i] = self._bos_eos(ids) if add_special_tokens else ids
            seqs = [s if s is not None else self.encode(t, add_special_tokens) for s, t in zip(seqs, texts)]
        seqs = [s[:max_length] for s in seqs]
        pad = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
        width = max((len(s) for s in seqs), default=0)
        ids, mask = [], []
        for s in seqs:
            fill = [pad] * (width - len(s))
            ids.append(s + fill if padding_side == "right" else fill + s)
            mask.append([1] * len(s) + [0] * len(fill) if padding_side == "right" else [0] * len(fill) + [1] * len(s))
        return ids, mask

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._sp is None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # as transformers decodes a SentencePiece model: pieces (added tokens as their text), "▁" -> " ",
        # <0xNN> byte pieces -> bytes, then one leading space dropped
        skip = self.special_ids if skip_special_tokens else set()
        out = bytearray()
        for i in ids:
            if i in skip:
                continue
            if i in self._added_by_id:
                out += self._added_by_id[i].encode()
                continue
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                out.append(int(piece[3:5], 16))
            else:
                out += piece.replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    # -------------------------------------------------------------------------------------------- save
    def save_pretrained(self, out_dir) -> None:
        """Write tokenizer files that transformers.AutoTokenizer loads and encodes identically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.config.items() if k not in ("added_tokens_decoder", "chat_template")}
        cfg.update(self.special_tokens)
        cfg.setdefault("model_max_length", 1_000_000)
        cfg.setdefault("clean_up_tokenization_spaces", False)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        if self._sp is not None:
            (out / "tokenizer.model").write_bytes(self._sp_model)
            cfg.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token, legacy=False)
            cfg["added_tokens_decoder"] = {str(i): {"content": t, "special": t not in self._nonspecial,
                                                    "normalized": False, "lstrip": False,
                                                    "rstrip": False, "single_word": False}
                                           for t, i in sorted(self.added.items(), key=lambda x: x[1])}
        else:
            self._hf.save(str(out / "tokenizer.json"))
            cfg.pop("add_bos_token", None)  # the post-processor in tokenizer.json is the truth
            cfg.pop("add_eos_token", None)
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(out / "tokenizer_config.json", cfg)
        write_json(out / "special_tokens_map.json", self.special_tokens)

    # ------------------------------------------------------------------------------------------- train
    @classmethod
    def train(cls, data, vocab_size: int, kind: str = "bpe", special_tokens: list[str] | None = None,
              show_progress: bool = True, special_roles: dict[str, str] | None = None) -> "Tokenizer":
        """Train a tokenizer on files (paths) or an iterator of strings.

        kind: "bpe" (byte-level BPE, GPT-4 pre-tokenizer), "sp-bpe" / "unigram" (SentencePiece, lossless
        for code and whitespace, byte fallback), "wordpiece" (BERT). special_tokens: extra tokens added
        to the vocabulary as special tokens (default: the chat tokens of lmlab's default template; a list
        replaces them, so pass [*lmlab.chat.DEFAULT_SPECIAL_TOKENS, ...] to keep them), e.g. T5's
        sentinels lmlab.data.objectives.sentinel_tokens(100). special_roles: named special tokens set on
        top of the kind's defaults (DEFAULT_SPECIAL), e.g. {"mask_token": "<mask>"} for masked-LM on a
        "bpe" tokenizer; each is added to the vocabulary as a special token and saved with its role.
        """
        from lmlab import tokenizer_train

        return tokenizer_train.train(cls, data, vocab_size, kind, special_tokens, show_progress, special_roles)


class TextStream:
    """Incremental decoding of generated ids: `add(id)` returns the text it completes, in O(1) tokens of work
    (decoding the whole reply again per token is quadratic). As transformers' streamers and vLLM do: decode a
    short window twice, with and without the new tokens, and return the difference; text ending in an
    incomplete UTF-8 character (U+FFFD) is held back until its last byte arrives."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.start = self.read = 0  # window ids[start:], of which ids[start:read] were already returned

    def _diff(self) -> str:
        before = self.tok.decode(self.ids[self.start:self.read], self.skip)
        after = self.tok.decode(self.ids[self.start:], self.skip)
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        new = self._diff()
        if not new or new.endswith("\ufffd"):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """What is held back at the end (an incomplete character comes out as U+FFFD)."""
        new = self._diff()
        self.start = self.read = len(self.ids)
        return new


def _without_dummy_prefix(model: bytes):
    """A second processor of the same model that adds no leading "▁" (for text after an added token)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# ------------------------------------------------------------------------------------------------- load
def load_tokenizer(path) -> Tokenizer:
    """Load the tokenizer of a HF model directory: tokenizer.json, tokenizer.model or vocab.txt."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a directory")
    cfg = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    special = {k: _content(cfg.get(k, special_map.get(k))) for k in SPECIAL_KEYS}
    chat = cfg.get("chat_template")
    if isinstance(chat, list):  # [{"name": "default", "template": ...}, ...]
        chat = next((t["template"] for t in chat if t.get("name") == "default"), chat[0]["template"] if chat else None)
    if (path / "chat_template.jinja").exists():
        chat = (path / "chat_template.jinja").read_text(encoding="utf-8")
    added_decoder = (cfg.get("added_tokens_decoder") or {}).items()
    added = {t["content"]: int(i) for i, t in added_decoder}
    nonspecial = {t["content"] for _, t in added_decoder if not t.get("special", True)}
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        hf.no_padding()  # some files carry padding/truncation settings; encode() applies neither, as transformers
        hf.no_truncation()
        return Tokenizer(hf=hf, special=special, config=cfg, chat_template=chat)
    if (path / "tokenizer.model").exists():
        import sentencepiece as spm
        data = (path / "tokenizer.model").read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:
            raise TokenizerError(f"{path / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
        special = {k: v for k, v in special.items() if v is not None} or {
            "bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
            "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
            "unk_token": sp.id_to_piece(sp.unk_id())}
        return Tokenizer(sp=sp, sp_model=data, special=special, config=cfg, chat_template=chat, added=added,
                         nonspecial=nonspecial)
    if (path / "vocab.txt").exists():
        from lmlab.tokenizer_train import wordpiece_pipeline
        vocab = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
        special = {k: v or DEFAULT_SPECIAL["wordpiece"].get(k) for k, v in special.items()}
        hf = wordpiece_pipeline({t: i for i, t in enumerate(vocab)}, special,
                                lowercase=cfg.get("do_lower_case", True),
                                chinese=cfg.get("tokenize_chinese_chars", True), strip_accents=cfg.get("strip_accents"))
        return Tokenizer(hf=hf, special=special, config=cfg, chat_template=chat)
    raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or vocab.txt")
