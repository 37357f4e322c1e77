"""Data pipeline: text readers, text -> token shards -> text round trips, and the deterministic batch loader."""
import gzip
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from lmlab.data.shards import (
    TokenLoader,
    boundary_tokens,
    build_shards,
    count_tokens,
    load_doc_table,
    load_index,
    token_dtype,
)
from lmlab.data.text import DataError, iter_documents, list_files
from lmlab.tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------------ readers
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_txt_modes(tmp_path):
    p = _write(tmp_path / "a.txt", "first line\r\n\n  \nsecond para\nstill second\n\n\nthird\n")
    assert list(iter_documents(p)) == ["first line\r\n\n  \nsecond para\nstill second\n\n\nthird\n"]  # as stored
    assert list(iter_documents(p, txt_mode="lines")) == ["first line", "second para", "still second", "third"]
    assert list(iter_documents(p, txt_mode="paragraphs")) == ["first line", "second para\nstill second", "third"]
    _write(tmp_path / "empty.txt", "")
    assert list(iter_documents(tmp_path / "empty.txt")) == []  # empty documents are never yielded
    with pytest.raises(DataError, match="txt_mode"):
        list(iter_documents(p, txt_mode="sentences"))


def test_jsonl_fields_and_gzip(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "héllo", "body": "b1"}, {"text": "", "body": "b2"},
                                      {"text": "world", "body": "b3"}])
    with open(p, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert list(iter_documents(p)) == ["héllo", "world"]
    assert list(iter_documents(p, field="body")) == ["b1", "b2", "b3"]
    gz = tmp_path / "z.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert list(iter_documents(gz)) == ["zipped"]


@pytest.mark.parametrize("line,msg", [
    ('{"text": "ok"', "invalid JSON"),
    ('{"content": "x"}', "no 'text' field"),
    ('{"text": 3}', "is int, not a string"),
    ('["text"]', "expected a JSON object"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, msg):
    p = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=msg) as e:
        list(iter_documents(p))
    assert f"{p}:3:" in str(e.value)


def test_folders_globs_and_lists_in_order(tmp_path):
    _write(tmp_path / "c" / "b.txt", "cb")
    _write(tmp_path / "c" / "a" / "z.txt", "caz")
    _jsonl(tmp_path / "c" / "a" / "y.jsonl", [{"text": "cay1"}, {"text": "cay2"}])
    _write(tmp_path / "c" / ".hidden.txt", "hidden")
    _write(tmp_path / "c" / ".git" / "x.txt", "hidden too")
    _write(tmp_path / "c" / "notes.csv", "ignored")
    _write(tmp_path / "top.txt", "top")
    # folders: recursive, sorted paths, hidden and unsupported files skipped
    assert list(iter_documents(tmp_path / "c")) == ["cay1", "cay2", "caz", "cb"]
    # globs: sorted matches; ** recurses
    assert list(iter_documents(str(tmp_path / "c" / "**" / "*.txt"))) == ["caz", "cb"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["top"]
    # lists: items in the order given; a file reached twice is read once
    with pytest.warns(UserWarning, match="more than once"):
        docs = list(iter_documents([tmp_path / "top.txt", tmp_path / "c", str(tmp_path / "c" / "b.txt")]))
    assert docs == ["top", "cay1", "cay2", "caz", "cb"]
    assert [p.name for p in list_files(tmp_path)] == ["y.jsonl", "z.txt", "b.txt", "top.txt"]


def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matches no"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(_write(tmp_path / "x.csv", "a,b")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files in this folder"):
        list(iter_documents(tmp_path / "empty"))


def test_invalid_utf8_is_replaced_with_warning(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff\xfe end")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        assert list(iter_documents(p)) == ["ok \ufffd\ufffd end"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow to read .parquet)")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "", "p3"], "n": [1, 2, 3]}), tmp_path / "a.parquet", row_group_size=2)
    assert list(iter_documents(tmp_path / "a.parquet")) == ["p1", "p3"]
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(tmp_path / "a.parquet", field="body"))
    with pytest.raises(DataError, match="not string"):
        list(iter_documents(tmp_path / "a.parquet", field="n"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="row 1"):
        list(iter_documents(tmp_path / "b.parquet"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = _write(tmp_path / "a.parquet", "not really parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(iter_documents(p))


# ---------------------------------------------------------------------------------------------- sharding
DOCS = [f"Person {i} was born in city {i % 7}.\nWorks at firm {i % 13}; ünïcödé ✓ 日本 {i * 31}"
        for i in range(60)]
DOCS += ["  leading and trailing spaces  ", "tabs\tand\n\nnewlines\n", "emoji 🙂🙃 and ∑ math", ""]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(DOCS, 400, kind="bpe", show_progress=False)  # byte-level BPE: lossless


class Wrapped:
    """A generic tokenizer object (no engine backend) with chosen special ids and vocabulary size."""

    def __init__(self, tok, bos=None, eos=None, vocab_size=None):
        self.tok, self.bos_token_id, self.eos_token_id = tok, bos, eos
        self.vocab_size = vocab_size or tok.vocab_size

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=False)


def _stream(d, split):
    index = load_index(d)
    parts = [np.fromfile(d / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_round_trip(d, tok, docs, prefix, suffix):
    """Every document decodes from its span of the shards, wrapped in exactly the boundary tokens."""
    index = load_index(d)
    seen = {}
    for split in ("train", "val"):
        stream, table = _stream(d, split), load_doc_table(d, split)
        info = index["splits"][split]
        assert len(stream) == info["tokens"] == count_tokens(d, split) == table[:, 2].sum()
        assert info["docs"] == len(table)
        assert info["text_bytes"] == sum(len(docs[i].encode()) for i in table[:, 0])
        assert (np.diff(table[:, 1]) == table[:-1, 2]).all()  # documents are contiguous, in input order
        for doc, off, n in table:
            span = stream[off:off + n].tolist()
            assert span[:len(prefix)] == prefix and span[len(span) - len(suffix):] == suffix
            body = span[len(prefix):len(span) - len(suffix)]
            assert body == tok.encode(docs[doc], add_special_tokens=False)
            assert tok.decode(body) == docs[doc]
            seen[int(doc)] = split
    assert sorted(seen) == [i for i, t in enumerate(docs) if t]  # every non-empty document, once
    return seen


def test_round_trip_with_separator_token(tmp_path, bpe):
    assert bpe.bos_token_id == bpe.eos_token_id  # <|endoftext|>: once before each document
    info = build_shards(DOCS, bpe, tmp_path, shard_tokens=500, val_fraction=0.1, seed=0, batch_docs=7,
                        show_progress=False)
    assert info == load_index(tmp_path)
    assert info["boundary"] == {"kind": "separator", "prefix": [bpe.bos_token_id], "suffix": []}
    assert info["dtype"] == "uint16" and info["vocab_size"] == bpe.vocab_size
    assert info["docs"] == len(DOCS) - 1 and info["skipped_empty"] == 1
    assert info["splits"]["val"]["docs"] == 6 and info["splits"]["train"]["docs"] == 57
    shards = info["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 500 for s in shards[:-1])  # documents span shards
    assert [s["file"] for s in shards] == [f"train_{k:03d}.bin" for k in range(len(shards))]
    for s in shards:
        assert (tmp_path / s["file"]).stat().st_size == 2 * s["tokens"]
    _check_round_trip(tmp_path, bpe, DOCS, [bpe.bos_token_id], [])
    # the folder stands alone: the saved tokenizer encodes the same
    from lmlab import load_tokenizer
    assert info["tokenizer"]["dir"] == "tokenizer" and len(info["tokenizer"]["sha256"]) == 64
    assert load_tokenizer(tmp_path / "tokenizer").encode(DOCS[0]) == bpe.encode(DOCS[0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def test_round_trip_with_bos_and_eos(tmp_path, bpe):
    pad = bpe.token_to_id("<|pad|>")
    tok = Wrapped(bpe, bos=pad, eos=bpe.eos_token_id)
    tok.decode = bpe.decode
    info = build_shards(iter(DOCS), tok, tmp_path, val_docs=5, seed=1, show_progress=False,
                        tokenizer_name="wrapped")
    assert info["boundary"]["kind"] == "bos+eos" and info["tokenizer"]["name"] == "wrapped"
    assert info["splits"]["val"]["docs"] == 5
    _check_round_trip(tmp_path, tok, DOCS, [pad], [bpe.eos_token_id])
    with pytest.warns(UserWarning, match="without boundaries"):
        assert boundary_tokens(Wrapped(bpe)) == ([], [], "none")


def test_sentencepiece_batch_path_equals_encode(tmp_path):
    sp = Tokenizer.train(DOCS, 400, kind="sp-bpe", show_progress=False)
    docs = DOCS[:20] + ["a chat token <|im_start|> inside the text"]
    info = build_shards(docs, sp, tmp_path, val_fraction=0.0, show_progress=False)
    assert info["boundary"]["kind"] == "bos+eos" and info["splits"]["val"]["docs"] == 0
    stream, table = _stream(tmp_path, "train"), load_doc_table(tmp_path, "train")
    for doc, off, n in table:
        assert stream[off:off + n].tolist() == [sp.bos_token_id, *sp.encode(docs[doc], False), sp.eos_token_id]


def test_validation_split_is_seeded_and_disjoint(tmp_path, bpe):
    def val_ids(seed, sub):
        build_shards(DOCS, bpe, tmp_path / sub, val_fraction=0.2, seed=seed, show_progress=False)
        train, val = (set(load_doc_table(tmp_path / sub, s)[:, 0].tolist()) for s in ("train", "val"))
        assert not train & val and len(train | val) == len(DOCS) - 1
        return val
    a, b, c = val_ids(0, "a"), val_ids(0, "b"), val_ids(1, "c")
    assert a == b and a != c and len(a) == round(0.2 * (len(DOCS) - 1))
    for name in ("train_000.bin", "val_000.bin", "index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a tiny corpus still gets one validation document
    info = build_shards(DOCS[:3], bpe, tmp_path / "d", val_fraction=0.01, show_progress=False)
    assert info["splits"]["val"]["docs"] == 1 and info["splits"]["train"]["docs"] == 2


def test_token_dtype_uint16_or_uint32(tmp_path, bpe):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    info = build_shards(DOCS, Wrapped(bpe, eos=0, vocab_size=100_000), tmp_path, val_fraction=0,
                        show_progress=False)
    assert info["dtype"] == "uint32"
    s = info["splits"]["train"]["shards"][0]
    assert (tmp_path / s["file"]).stat().st_size == 4 * s["tokens"]
    x, y = next(TokenLoader(tmp_path, "train", 1, 8).iter_eval())  # window 0, read back from uint32
    stream = _stream(tmp_path, "train").astype(np.int64)
    assert x.dtype == torch.int64 and x[0].tolist() == stream[:8].tolist() and y[0].tolist() == stream[1:9].tolist()


def test_rebuild_replaces_stale_shards_and_failed_build_keeps_old(tmp_path, bpe):
    build_shards(DOCS, bpe, tmp_path, shard_tokens=300, show_progress=False)
    assert (tmp_path / "train_003.bin").exists()
    before = (tmp_path / "index.json").read_text()
    with pytest.raises(DataError, match="document 3 is a int"):
        build_shards(DOCS[:3] + [7], bpe, tmp_path, show_progress=False)
    assert (tmp_path / "index.json").read_text() == before  # the previous folder is untouched
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    build_shards(DOCS, bpe, tmp_path, shard_tokens=10**6, show_progress=False)
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".bin")) == ["train_000.bin", "val_000.bin"]
    with pytest.raises(DataError, match="no documents"):
        build_shards(["", ""], bpe, tmp_path / "e", show_progress=False)


# ------------------------------------------------------------------------------------------------ loader
class Counting:
    """Tokenizer whose documents are space-separated ids, so the token stream is known exactly."""
    vocab_size, bos_token_id, eos_token_id = 70_000, None, None

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]


@pytest.fixture(scope="module")
def arange_dir(tmp_path_factory):
    """Shards whose train stream is 0, 1, ..., 1000 (three shards) and val stream 0..200."""
    d = tmp_path_factory.mktemp("arange")
    with warnings.catch_warnings():  # no boundary tokens (the warning is tested above)
        warnings.simplefilter("ignore")
        build_shards([" ".join(map(str, range(i, i + 7))) for i in range(0, 1001, 7)], Counting(), d,
                     shard_tokens=400, val_fraction=0, show_progress=False)
        build_shards([" ".join(map(str, range(201)))], Counting(), d / "v", val_fraction=0, show_progress=False)
    os.replace(d / "v" / "train_000.bin", d / "val_000.bin")
    index = load_index(d)
    index["splits"]["val"] = dict(load_index(d / "v")["splits"]["train"], shards=[{"file": "val_000.bin",
                                                                                    "tokens": 201}])
    (d / "index.json").write_text(json.dumps(index))
    assert np.array_equal(_stream(d, "train"), np.arange(1001)) and len(index["splits"]["train"]["shards"]) == 3
    return d


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_windows_targets_and_epochs(arange_dir):
    T = 16
    loader = TokenLoader(arange_dir, "train", batch_size=4, seq_len=T, seed=0)
    assert loader.n_windows == 1000 // T == 62 and loader.tokens == 1001
    starts = []
    for x, y in _take(loader, 31):  # 124 windows: two full epochs
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one (the stream counts up)
        assert (x[:, 0] % T == 0).all()  # non-overlapping window starts, also across shard boundaries
        assert torch.equal(x, x[:, :1] + torch.arange(T))
        starts += (x[:, 0] // T).tolist()
    first, second = starts[:62], starts[62:]
    assert sorted(first) == sorted(second) == list(range(62))  # each epoch visits every window once
    assert first != second and first != list(range(62))  # shuffled, differently per epoch
    assert loader.epoch == 2 and loader.position == 0


def test_same_seed_same_batches_different_seed_different(arange_dir):
    a, b, c = (TokenLoader(arange_dir, "train", 3, 8, seed=s) for s in (5, 5, 6))
    ba, bb, bc = _take(a, 10), _take(b, 10), _take(c, 10)
    assert _same(ba, bb) and not _same(ba, bc)


@pytest.mark.parametrize("k", [3, 20, 21, 41])  # 125 windows, 6 per batch: batch 20 straddles epochs 0 and 1
def test_state_restore_gives_the_same_next_batches(arange_dir, k):
    loader = TokenLoader(arange_dir, "train", batch_size=6, seq_len=8, seed=3)
    _take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON, as in a checkpoint
    expected = _take(loader, 25)
    fresh = TokenLoader(arange_dir, "train", batch_size=6, seq_len=8, seed=3)
    fresh.load_state_dict(state)
    assert _same(_take(fresh, 25), expected)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(arange_dir, "train", batch_size=6, seq_len=9, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TokenLoader(arange_dir, "train", batch_size=6, seq_len=8, seed=4).load_state_dict(state)


def test_ranks_split_the_global_batch(arange_dir):
    """batch_size is per rank; rank r takes rows [r*B, (r+1)*B) of each global batch of B*world_size rows."""
    B, W, T = 3, 2, 8
    single = TokenLoader(arange_dir, "train", batch_size=B * W, seq_len=T, seed=1)
    ranks = [TokenLoader(arange_dir, "train", batch_size=B, seq_len=T, seed=1, rank=r, world_size=W)
             for r in range(W)]
    for _ in range(30):  # 30 * 6 windows > one epoch of 125
        xs, (gx, gy) = [next(r) for r in ranks], next(single)
        assert not set(xs[0][0][:, 0].tolist()) & set(xs[1][0][:, 0].tolist())  # disjoint windows
        assert torch.equal(torch.cat([x for x, _ in xs]), gx) and torch.equal(torch.cat([y for _, y in xs]), gy)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    with pytest.raises(DataError, match="rank"):
        TokenLoader(arange_dir, "train", 2, 8, rank=2, world_size=2)


def test_iter_eval_is_sequential_and_leaves_training_position(arange_dir):
    T = 10
    val = TokenLoader(arange_dir, "val", batch_size=4, seq_len=T, seed=0)
    assert val.n_windows == 20 and val.text_bytes > 0
    batches = list(val.iter_eval())
    assert len(batches) == 5 and all(torch.equal(y, x + 1) for x, y in batches)
    assert torch.equal(torch.cat([x for x, _ in batches])[:, 0], torch.arange(20) * T)
    assert _same(list(val.iter_eval(max_batches=2)), batches[:2]) and val.state_dict()["index"] == 0
    ranks = [TokenLoader(arange_dir, "val", 3, T, rank=r, world_size=2) for r in range(2)]
    got = [list(r.iter_eval()) for r in ranks]  # 20 windows in global batches of 6: the last is partial
    assert [len(g) for g in got] == [4, 3] and [x.shape[0] for x, _ in got[0]] == [3, 3, 3, 2]
    allx = torch.cat([torch.cat([got[r][b][0] for r in range(2) if b < len(got[r])]) for b in range(4)])
    assert torch.equal(allx[:, 0], torch.arange(20) * T)
    assert sum(1 for _ in ranks[0].iter_eval(drop_last=True)) == 3


def test_loader_errors(arange_dir, tmp_path):
    with pytest.raises(DataError, match="fewer than one window"):
        TokenLoader(arange_dir, "val", 1, 500)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(arange_dir, "test", 1, 8)
    with pytest.raises(DataError, match="no index.json"):
        TokenLoader(tmp_path, "train", 1, 8)
    assert count_tokens(arange_dir, None) == 1001 + 201
