"""Token shards: documents -> tokenized .bin shards + index.json, and a deterministic, resumable batch loader.

    info = build_shards(iter_documents("corpus/"), tok, "shards/", val_fraction=0.01, seed=0)
    loader = TokenLoader("shards/", "train", batch_size=8, seq_len=256, seed=0, rank=r, world_size=w)
    x, y = next(loader)                       # (B, T) int64 each; y[:, :-1] == x[:, 1:]
    state = loader.state_dict(); ...; loader.load_state_dict(state)   # the same next batches
    for x, y in TokenLoader("shards/", "val", 8, 256).iter_eval(max_batches=50): ...

The shard folder:
  train_000.bin, train_001.bin, ...  raw token ids, little-endian uint16 (vocab_size <= 65536) or uint32;
  val_000.bin, ...                   the split's documents concatenated in corpus order, each wrapped in
                                     its boundary tokens; a shard holds shard_tokens tokens (the last
                                     fewer) and documents may span shards.
  train_docs.npy, val_docs.npy       int64 (n_docs, 3): [document index in the input, first token offset
                                     in the split's stream, number of tokens incl. boundary tokens]
  tokenizer/                         a copy of the tokenizer (save_pretrained), so the folder stands alone
  index.json                         written last: its presence means the folder is complete, e.g.
    {"format": "lmlab-shards", "version": 1, "dtype": "uint16", "vocab_size": 2048,
     "tokenizer": {"name", "path", "dir": "tokenizer", "sha256", "bos_token_id", "eos_token_id"},
     "boundary": {"kind": "bos+eos" | "separator" | "bos" | "eos" | "cls+sep" | "none",
                  "prefix": [ids before each document], "suffix": [ids after it]},
     "seed": 0, "val_fraction": 0.01, "val_docs": null, "shard_tokens": 100000000,
     "docs": 1000, "skipped_empty": 0, "doc_table_columns": ["doc", "offset", "tokens"],
     "splits": {"train": {"shards": [{"file": "train_000.bin", "tokens": 123456}], "tokens": 123456,
                          "docs": 990, "text_bytes": 512345, "doc_table": "train_docs.npy"},
                "val": {...}}}
  text_bytes is the number of UTF-8 bytes of the split's documents (boundary tokens have none): bits per
  byte = summed next-token loss in nats / ln(2) / text_bytes over the whole split.

Boundaries: BOS before and EOS after each document when the tokenizer has both; when BOS == EOS (GPT-2's
<|endoftext|>) that one token goes once before each document, as a separator; a tokenizer with only one
of them gets that one; a BERT-style tokenizer without either gets [CLS] ... [SEP]; with none, documents are
concatenated as they are (with a warning).

Validation split: exactly val_docs documents, or round(val_fraction * n_docs) (at least 1 when
val_fraction > 0 and there are 2+ documents), drawn by a seeded permutation of the document positions:
the same documents and seed give the same split, and no document is in both.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from array import array
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lmlab.data.text import DataError
from lmlab.fileio import write_json

FORMAT, VERSION = "lmlab-shards", 1
INDEX = "index.json"
SPLITS = ("train", "val")
DOC_COLUMNS = ["doc", "offset", "tokens"]
_CHUNK = 1 << 24  # tokens copied at a time when writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so vocabularies of up to 65536 tokens; larger ones need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def boundary_tokens(tok) -> tuple[list[int], list[int], str]:
    """(ids before each document, ids after it, kind); see the module docstring."""
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    if bos is not None and eos is not None:
        return ([bos], [], "separator") if bos == eos else ([bos], [eos], "bos+eos")
    if bos is not None:
        return [bos], [], "bos"
    if eos is not None:
        return [], [eos], "eos"
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    if cls is not None and sep is not None:
        return [cls], [sep], "cls+sep"
    warnings.warn("the tokenizer has no bos/eos token: documents are concatenated without boundaries")
    return [], [], "none"


def _encoder(tok):
    """texts -> lists of ids without special tokens, batched in the tokenizer engine's own threads."""
    backend = getattr(tok, "backend", None)
    if backend == "tokenizers":  # HF tokenizers: encode_batch runs on Rust threads
        hf = tok._hf
        fn = getattr(hf, "encode_batch_fast", hf.encode_batch)
        return lambda texts: [e.ids for e in fn(texts, add_special_tokens=False)]
    if backend == "sentencepiece":
        # sentencepiece encodes a list on C++ threads; texts containing added tokens (rare in raw text)
        # take Tokenizer.encode, which splits those tokens out first
        split, threads = getattr(tok, "_split", None), os.cpu_count() or 1

        def enc(texts):
            out = [None] * len(texts)
            plain = [i for i, t in enumerate(texts) if split is None or not split.search(t)]
            for i, ids in zip(plain, tok._sp.encode([texts[i] for i in plain], num_threads=threads)):
                out[i] = ids
            for i, t in enumerate(texts):
                if out[i] is None:
                    out[i] = tok.encode(t, add_special_tokens=False)
            return out
        return enc
    return lambda texts: [tok.encode(t, add_special_tokens=False) for t in texts]


def _num_val(n: int, val_fraction: float, val_docs: int | None) -> int:
    if val_docs is not None:
        if not 0 <= val_docs < n:
            raise DataError(f"val_docs={val_docs} must be at least 0 and below the number of documents ({n})")
        return int(val_docs)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    k = round(val_fraction * n)
    return min(max(k, 1 if val_fraction > 0 and n >= 2 else 0), n - 1)


class _ShardWriter:
    """Appends tokens to {split}_NNN.bin files of shard_tokens tokens each, under temporary names."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, tag: str):
        self.out, self.split, self.dtype, self.cap, self.tag = out, split, dtype, shard_tokens, tag
        self.files: list[list] = []  # [tmp path, final name, tokens]
        self._f = None

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self._f is None or self.files[-1][2] == self.cap:
                self._open()
            take = min(self.cap - self.files[-1][2], len(tokens) - pos, _CHUNK)
            np.ascontiguousarray(tokens[pos:pos + take], dtype=self.dtype).tofile(self._f)
            self.files[-1][2] += take
            pos += take

    def _open(self):
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.files):03d}.bin"
        tmp = self.out / f".{name}.{self.tag}.tmp"
        self._f = open(tmp, "wb")
        self.files.append([tmp, name, 0])

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def _save_npy(path: Path, arr: np.ndarray, tag: str) -> Path:
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    return tmp


def build_shards(documents: Iterable[str], tokenizer, out_dir, shard_tokens: int = 100_000_000,
                 val_fraction: float = 0.01, val_docs: int | None = None, seed: int = 0,
                 batch_docs: int = 1024, show_progress: bool = True, tokenizer_name: str | None = None) -> dict:
    """Tokenize documents into train/val shards in out_dir; returns the index (also written to index.json).

    tokenizer: an lmlab Tokenizer (or any object with encode/vocab_size/bos_token_id/eos_token_id) or the
    path of a tokenizer directory. Documents are tokenized in batches of batch_docs on the tokenizer
    engine's threads; empty documents are skipped. Everything is first written under temporary names and
    renamed into place, index.json last, so a crash never leaves a folder that looks complete.
    """
    from tqdm.auto import tqdm

    from lmlab.tokenizer import load_tokenizer

    tok_path = None
    if isinstance(tokenizer, (str, os.PathLike)):
        tok_path, tokenizer = str(tokenizer), load_tokenizer(tokenizer)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    prefix, suffix, kind = boundary_tokens(tokenizer)
    encode = _encoder(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    stream_path = out / f".all.{tag}.tmp"  # every document's tokens in input order, split afterwards
    lengths, sources, nbytes = array("q"), array("q"), array("q")
    skipped = 0
    total = len(documents) if hasattr(documents, "__len__") else None
    bar = tqdm(total=total, desc="tokenizing", unit=" docs", disable=not show_progress, mininterval=0.5)
    temps: list[Path] = [stream_path]
    try:
        with open(stream_path, "wb") as f:
            it, n_in, n_tokens = iter(documents), 0, 0
            while batch := list(islice(it, batch_docs)):
                texts = []
                for i, text in enumerate(batch, n_in):
                    if not isinstance(text, str):
                        raise DataError(f"document {i} is a {type(text).__name__}, not a string")
                    if text:
                        texts.append(text)
                        sources.append(i)
                        nbytes.append(len(text.encode("utf-8", errors="surrogatepass")))
                    else:
                        skipped += 1
                n_in += len(batch)
                seqs = [prefix + list(ids) + suffix for ids in encode(texts)] if texts else []
                count = sum(map(len, seqs))
                ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=count)
                if count and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise DataError(f"the tokenizer produced id {int(ids.max())}, outside its vocabulary "
                                    f"of {vocab_size}")
                ids.astype(dtype).tofile(f)
                lengths.extend(map(len, seqs))
                n_tokens += count
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        bar.close()
        n = len(lengths)
        if n == 0:
            raise DataError("no documents to shard (the input is empty or every document is empty)")
        n_val = _num_val(n, val_fraction, val_docs)
        is_val = np.zeros(n, dtype=bool)
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
        lens = np.frombuffer(lengths, dtype=np.int64)
        src = np.frombuffer(sources, dtype=np.int64)
        byt = np.frombuffer(nbytes, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        stream = np.memmap(stream_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        splits, renames = {}, []
        for split, mask in (("train", ~is_val), ("val", is_val)):
            idx = np.flatnonzero(mask)
            writer = _ShardWriter(out, split, dtype, shard_tokens, tag)
            try:
                # consecutive documents of one split are one contiguous run of the stream: copy runs
                cuts = np.flatnonzero(np.diff(idx) != 1) + 1
                for run in np.split(idx, cuts) if len(idx) else []:
                    writer.write(stream[offsets[run[0]]:offsets[run[-1] + 1]])
            finally:
                writer.close()
                temps += [w[0] for w in writer.files]
            table = np.stack([src[idx], np.concatenate([[0], np.cumsum(lens[idx])[:-1]]).astype(np.int64)
                              if len(idx) else np.zeros(0, np.int64), lens[idx]], axis=1)
            tmp_table = _save_npy(out / f"{split}_docs.npy", table, tag)
            temps.append(tmp_table)
            renames += [(w[0], out / w[1]) for w in writer.files] + [(tmp_table, out / f"{split}_docs.npy")]
            splits[split] = {"shards": [{"file": w[1], "tokens": int(w[2])} for w in writer.files],
                             "tokens": int(lens[idx].sum()), "docs": len(idx),
                             "text_bytes": int(byt[idx].sum()), "doc_table": f"{split}_docs.npy"}
        del stream
        tok_info = {"name": tokenizer_name or tok_path or getattr(tokenizer, "name_or_path", None)
                    or type(tokenizer).__name__, "path": tok_path, "dir": None, "sha256": None,
                    "bos_token_id": getattr(tokenizer, "bos_token_id", None),
                    "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
        tok_tmp = None
        if hasattr(tokenizer, "save_pretrained"):
            tok_tmp = out / f".tokenizer.{tag}.tmp"
            temps.append(tok_tmp)
            tokenizer.save_pretrained(tok_tmp)
            digest = hashlib.sha256()
            for p in sorted(tok_tmp.iterdir()):
                digest.update(p.name.encode() + b"\0" + p.read_bytes())
            tok_info.update(dir="tokenizer", sha256=digest.hexdigest())
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": vocab_size,
                 "tokenizer": tok_info, "boundary": {"kind": kind, "prefix": prefix, "suffix": suffix},
                 "seed": seed, "val_fraction": val_fraction, "val_docs": val_docs, "shard_tokens": shard_tokens,
                 "docs": n, "skipped_empty": skipped, "doc_table_columns": DOC_COLUMNS, "splits": splits}
        # commit: drop the old index first (the folder is incomplete until the new one lands), then
        # stale shards of an earlier build, then rename everything into place
        (out / INDEX).unlink(missing_ok=True)
        keep = {dst.name for _, dst in renames}
        for p in out.iterdir():
            if re.fullmatch(r"(train|val)_(\d{3,}\.bin|docs\.npy)", p.name) and p.name not in keep:
                p.unlink()
        for src_path, dst in renames:
            os.replace(src_path, dst)
        if tok_tmp is not None:
            shutil.rmtree(out / "tokenizer", ignore_errors=True)
            os.replace(tok_tmp, out / "tokenizer")
        write_json(out / INDEX, index)
        return index
    finally:
        bar.close()
        for p in temps:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def load_index(shard_dir) -> dict:
    """The index.json of a shard folder, checked."""
    path = Path(shard_dir) / INDEX
    if not path.exists():
        raise DataError(f"{shard_dir}: not a complete shard folder (no {INDEX}); build one with build_shards")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path}: not an {FORMAT} v{VERSION} index "
                        f"(format={index.get('format')!r}, version={index.get('version')!r})")
    return index


def count_tokens(shard_dir, split: str | None = "train") -> int:
    """Tokens in one split of a shard folder (split=None: all splits together), boundary tokens included."""
    splits = load_index(shard_dir)["splits"]
    if split is None:
        return sum(s["tokens"] for s in splits.values())
    if split not in splits:
        raise DataError(f"{shard_dir}: no split {split!r} (splits: {', '.join(splits)})")
    return int(splits[split]["tokens"])


def load_doc_table(shard_dir, split: str) -> np.ndarray:
    """int64 (n_docs, 3): [document index in the input, offset in the split's stream, tokens]."""
    return np.load(Path(shard_dir) / load_index(shard_dir)["splits"][split]["doc_table"])


class TokenLoader:
    """(x, y) batches of shape (batch_size, seq_len) from a split of a shard folder, deterministic for a seed.

    The split's shards are memory-mapped as one stream of N tokens and cut into W = (N - 1) // seq_len
    non-overlapping windows: window w is tokens [w*T, w*T + T + 1), x its first T tokens, y its last T.
    Epoch e visits the windows in the order of a permutation seeded by (seed, e); the epochs follow each
    other as one endless sequence of windows (a batch may straddle two epochs, so no window is dropped).

    batch_size is PER RANK. Each call takes the next global batch of batch_size * world_size windows of that
    sequence, and rank r keeps the contiguous block of rows [r*batch_size, (r+1)*batch_size): concatenating
    the ranks' batches in rank order (torch.cat along dim 0) gives exactly the batch of a single-rank
    loader with batch_size * world_size and the same seed. All ranks hold the same position, so the state
    of any rank restores every rank, even under a different world_size with the same global batch.
    """

    def __init__(self, shard_dir, split: str = "train", batch_size: int = 8, seq_len: int = 256, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.dir, self.split = Path(shard_dir), split
        self.shard_index = load_index(shard_dir)
        if split not in self.shard_index["splits"]:
            raise DataError(f"{shard_dir}: no split {split!r} (splits: {', '.join(self.shard_index['splits'])})")
        info = self.shard_index["splits"][split]
        self.dtype = np.dtype(self.shard_index["dtype"])
        self._shards = []
        for s in info["shards"]:
            path = self.dir / s["file"]
            if not path.exists() or path.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not {s['tokens']} {self.dtype.name} tokens as {INDEX} says")
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self._ends = np.cumsum([len(s) for s in self._shards], dtype=np.int64)
        self.tokens = int(self._ends[-1]) if len(self._ends) else 0
        self.text_bytes = int(info.get("text_bytes", 0))
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = max(self.tokens - 1, 0) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{shard_dir}: the {split} split has {self.tokens} tokens, fewer than one window "
                            f"of seq_len + 1 = {seq_len + 1}")
        self.epoch, self.position = 0, 0  # the next window is number `position` of epoch `epoch`'s order
        self._perms: dict[int, np.ndarray] = {}

    # ---------------------------------------------------------------------------------------- reading
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the split's windows (a fraction when it does not divide)."""
        return self.n_windows / self.global_batch

    def _read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's stream, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        k, filled = int(np.searchsorted(self._ends, start, side="right")), 0
        while filled < n:
            lo = start + filled - (self._ends[k - 1] if k else 0)
            take = min(n - filled, len(self._shards[k]) - lo)
            out[filled:filled + take] = self._shards[k][lo:lo + take]
            filled, k = filled + take, k + 1
        return out

    def _batch(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self._read(int(w) * T, T + 1) for w in windows])  # (B, T + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch touches at most two epochs (more only for tiny splits)
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def _windows(self, epoch: int, position: int, count: int) -> list[int]:
        out = []
        for g in range(position, position + count):
            e, p = epoch + g // self.n_windows, g % self.n_windows
            out.append(int(self._perm(e)[p]))
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        windows = self._windows(self.epoch, self.position + self.rank * B, B)
        pos = self.position + self.global_batch
        self.epoch, self.position = self.epoch + pos // self.n_windows, pos % self.n_windows
        return self._batch(windows)

    def iter_eval(self, max_batches: int | None = None, drop_last: bool = False):
        """Sequential windows 0, 1, 2, ... in global batches, this rank's block of each (as in training);
        independent of and not moving the training position. The last global batch may be partial, giving
        some ranks a smaller batch or one batch fewer (drop_last=True yields full global batches only).
        The split's last (N - 1) % seq_len tokens are not predicted."""
        B, G = self.batch_size, self.global_batch
        n_batches = self.n_windows // G if drop_last else math.ceil(self.n_windows / G)
        if max_batches:  # None or 0 (train.eval_batches=0): the whole split
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            lo = b * G + self.rank * B
            windows = range(lo, min(lo + B, self.n_windows))
            if len(windows):
                yield self._batch(windows)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """{"epoch", "index"}: the next window is number `index` of epoch `epoch`'s order (the same on every
        rank), plus seed/seq_len/n_windows/split, checked on load."""
        return {"epoch": self.epoch, "index": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}: "
                                "resume with the same data, seq_len and seed")
        self.epoch, self.position = int(state["epoch"]), int(state["index"])
        if not 0 <= self.position < self.n_windows:
            raise DataError(f"loader state position {self.position} is outside 0..{self.n_windows - 1}")
