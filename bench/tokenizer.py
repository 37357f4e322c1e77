"""Tokenizer training and encoding throughput: lmlab's Tokenizer vs the raw engines it wraps, in one process.

Text: this interpreter's stdlib .py sources (sorted, site-packages excluded) up to --mb MB (10^6 bytes).
Training on it (a temp file): lmlab `Tokenizer.train([file])` vs the pipeline and settings of
lmlab/tokenizer_train.py in the raw library on the same file. Encoding ~--chunk-kb KB documents with
lmlab's trained tokenizer: `tok.encode(doc)` vs `tok._hf.encode(doc).ids` / `tok._sp.encode(doc)`, and
`tok.encode_batch(docs)` vs the engine's batch call giving the same padded output. Outputs compared.

    python bench/tokenizer.py [--kinds bpe,sp-bpe,wordpiece] [--mb 30]
"""
from __future__ import annotations

import io
import re
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from lmlab import tokenizer_train  # noqa: E402
from lmlab.tokenizer import DEFAULT_SPECIAL, GPT4_SPLIT, Tokenizer  # noqa: E402

CHAT_TOKENS = list(tokenizer_train.CHAT_TOKENS)  # the extra special tokens lmlab's train() adds by default


def stdlib_text(mb: float) -> str:
    """The stdlib's .py files, concatenated in sorted order and cut at a line end at `mb` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size, limit = [], 0, int(mb * 1e6)
    for f in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()):
        if size < limit:
            t = f.read_bytes().decode("utf-8", errors="replace")
            parts.append(t.encode() + b"\n" * (not t.endswith("\n")))
            size += len(parts[-1])
    data = b"".join(parts)[:limit]
    return data[:data.rfind(b"\n") + 1].decode("utf-8", errors="ignore")


def chunks_of(text: str, size: int) -> list[str]:
    """Documents of at least `size` characters (but the last) that end at the first newline after that."""
    return re.findall(rf"(?s).{{{size},}}?\n|.+", text)


def raw_train(kind: str, path: str, vocab: int):
    """The training lmlab does, with the raw library on the file directly."""
    special = list(dict.fromkeys([*DEFAULT_SPECIAL[kind].values(), *CHAT_TOKENS]))
    if kind == "sp-bpe":
        import sentencepiece as spm
        model, pieces = io.BytesIO(), {k.replace("token", "piece"): v for k, v in DEFAULT_SPECIAL[kind].items()}
        spm.SentencePieceTrainer.train(
            input=path, model_writer=model, vocab_size=vocab, model_type="bpe", byte_fallback=True,
            character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, split_by_whitespace=True, max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, **pieces, user_defined_symbols=CHAT_TOKENS, minloglevel=2,
            hard_vocab_limit=False, num_threads=2)
        return spm.SentencePieceProcessor(model_proto=model.getvalue())
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    if kind == "bpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    else:  # wordpiece: lmlab's BERT pipeline, the WordPiece trainer on it
        tok = tokenizer_train.wordpiece_pipeline({t: i for i, t in enumerate(DEFAULT_SPECIAL[kind].values())},
                                                 DEFAULT_SPECIAL[kind])
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                            continuing_subword_prefix="##")
    tok.train([path], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def vocab_of(e) -> dict:
    return e.get_vocab(True) if hasattr(e, "get_vocab") else {e.id_to_piece(i): i for i in range(e.get_piece_size())}


def raw_batch(tok: Tokenizer):
    """The engine's own batch call, right-padded with lmlab's pad id (the output of tok.encode_batch)."""
    if tok._sp is None:
        hf = type(tok._hf).from_str(tok._hf.to_str())  # a copy, with padding
        hf.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)
        return lambda docs: tuple(map(list, zip(*((e.ids, e.attention_mask) for e in hf.encode_batch(docs)))))
    sp, bos, pad = tok._sp, [tok.bos_token_id] * tok.add_bos_token, tok.pad_token_id

    def run(docs):
        seqs = [bos + s for s in sp.encode(docs, num_threads=2)]
        w = max(map(len, seqs))
        return [s + [pad] * (w - len(s)) for s in seqs], [[1] * len(s) + [0] * (w - len(s)) for s in seqs]
    return run


def interleaved(fns: dict, repeats: int, keep: bool = False) -> tuple[dict, dict]:
    """Best time of each fn over `repeats` rounds (the fns alternate within a round) and, with keep, its last
    output; else outputs are freed within the timing (big live outputs slowed whichever call ran next)."""
    best, out = {k: float("inf") for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn() if keep else len(fn())
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def bench_kind(kind: str, path: str, docs: list[str], batches: list[list[str]], args):
    """Training and encoding speeds (MB/s) of lmlab and the raw library, and whether their outputs agree."""
    t_tr, tr = interleaved({"raw": lambda: raw_train(kind, path, args.vocab),
                            "lmlab": lambda: Tokenizer.train([path], vocab_size=args.vocab, kind=kind,
                                                             show_progress=False)}, args.repeats, keep=True)
    tok = tr["lmlab"]
    # WordPiece training is not deterministic from run to run, so its vocabularies are not compared
    same_vocab = None if kind == "wordpiece" else vocab_of(tr["raw"]) == vocab_of(tok._sp or tok._hf)
    bos = [tok.bos_token_id] * tok.add_bos_token  # lmlab adds bos to sentencepiece's ids
    raw_enc = (lambda: [bos + tok._sp.encode(c) for c in docs]) if tok._sp is not None else \
        (lambda: [tok._hf.encode(c).ids for c in docs])
    rb = raw_batch(tok)
    enc = {"raw": raw_enc, "lmlab": lambda: [tok.encode(c) for c in docs]}
    bat = {"raw": lambda: [rb(b) for b in batches], "lmlab": lambda: [tok.encode_batch(b) for b in batches]}
    diff = {name: sum(a != b for a, b in zip(fns["lmlab"](), fns["raw"]()))  # one untimed call per side, compared
            for name, fns in (("encode", enc), ("encode_batch", bat))}
    secs = {"train": t_tr, **{k: interleaved(f, args.repeats)[0] for k, f in (("encode", enc), ("encode_batch", bat))}}
    print(f"{kind}: seconds {secs}, same vocab {same_vocab}, differing outputs {diff}", flush=True)
    size = {"train": Path(path).stat().st_size / 1e6, "encode": sum(len(c.encode()) for c in docs) / 1e6}
    speeds = {k: {s: size.get(k, size["encode"]) / t[s] for s in ("lmlab", "raw")} for k, t in secs.items()}
    return {"seconds": secs, "mb_per_s": speeds, "ratio_lmlab_over_raw": {k: v["lmlab"] / v["raw"] for k, v in
            speeds.items()}, "same_vocab": same_vocab, "outputs_differing": diff}


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--kinds", default="bpe,sp-bpe", help="of bpe, sp-bpe, wordpiece (default: bpe,sp-bpe)")
    ap.add_argument("--mb", type=float, default=30, help="MB of stdlib source to encode (default: 30)")
    ap.add_argument("--train-mb", type=float, help="MB of it to train on (default: all of it)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: 8192)")
    ap.add_argument("--chunk-kb", type=float, default=2, help="document size for encoding, KB (default: 2)")
    ap.add_argument("--batch", type=int, default=64, help="documents per encode_batch call (default: 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement, best counts (default: 3)")
    args, t_start = ap.parse_args(), time.perf_counter()
    kinds = args.kinds.split(",")
    if bad := [k for k in kinds if k not in ("bpe", "sp-bpe", "wordpiece")]:
        ap.error(f"unknown kinds {bad}")
    common.setup(args.threads)  # torch threads, for the machine line (the tokenizer engines use their own)
    info = {**common.machine_info(), **{p: version(p) for p in ("tokenizers", "sentencepiece")}}

    text = stdlib_text(args.mb)
    train_text = text if args.train_mb is None else stdlib_text(min(args.train_mb, args.mb))
    mb, train_mb = (len(t.encode()) / 1e6 for t in (text, train_text))
    docs = chunks_of(text, int(args.chunk_kb * 1000))
    batches = [docs[i:i + args.batch] for i in range(0, len(docs), args.batch)]

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as d:
        (path := Path(d) / "train.txt").write_text(train_text, encoding="utf-8")
        for kind in kinds:
            r = results[kind] = bench_kind(kind, str(path), docs, batches, args)
            n = r["outputs_differing"]
            bad = {"train": " (vocab differs)" * (r["same_vocab"] is False),
                   "encode": f" ({n['encode']} docs differ)" * bool(n["encode"]),
                   "encode_batch": f" ({n['encode_batch']} batches differ)" * bool(n["encode_batch"])}
            x = r["ratio_lmlab_over_raw"]
            rows += [[kind, f"{k} MB/s{bad[k]}", v["lmlab"], v["raw"], f"{x[k]:.2f}",
                      "yes" if x[k] >= 0.9 else "**no**"] for k, v in r["mb_per_s"].items()]

    total = time.perf_counter() - t_start
    table = common.md_table(["kind", "metric", "lmlab", "raw library", "lmlab / raw", ">= 0.90"], rows)
    body = "\n\n".join([
        "## Tokenizer: lmlab wrapper vs raw `tokenizers` / `sentencepiece`",
        (f"`{' '.join(['python bench/tokenizer.py', *sys.argv[1:]])}`: {mb:.1f} MB of this Python's stdlib "
         f".py sources (sorted, concatenated), cut into {len(docs)} documents of ~{args.chunk_kb:g} KB; vocab "
         f"{args.vocab}. Training on {train_mb:.1f} MB: `Tokenizer.train([file])` vs the same pipeline and settings "
         f"in the raw library on the file (`train([file])`, `SentencePieceTrainer.train(input=file)`). Encoding with "
         f"lmlab's trained tokenizer: `tok.encode(doc)` vs `tok._hf.encode(doc).ids` / `tok._sp.encode(doc)`; "
         f"encode_batch: lmlab's (padded ids + mask; it encodes one document at a time) vs the engine's batch call "
         f"giving the same padded output, {args.batch} documents per call. One untimed encoding call per side "
         f"(outputs compared), then best of {args.repeats} rounds per measurement, sides alternating. Target: "
         f"lmlab / raw >= 0.90. Whole run {total:.0f} s. Special-token strings in the text (`<s>`, `</s>`, `<unk>` "
         f"occur in the stdlib) are special tokens to lmlab, as to transformers, and text to raw sentencepiece."),
        table, f"{common.machine_line(info)} tokenizers {info['tokenizers']}, sentencepiece {info['sentencepiece']}."])
    print(body)
    result = {"name": "tokenizer", "args": vars(args), "machine": info, "text_mb": mb, "train_mb": train_mb,
              "documents": len(docs), "total_seconds": total, "kinds": results}
    common.publish("tokenizer", result, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
