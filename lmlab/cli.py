"""The `lmlab` command: one subcommand per verb; each is thin and calls into the package."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    import torch

    import lmlab

    model = lmlab.load_model(args.model, dtype=getattr(torch, args.dtype))
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, compile=args.compile)
    if args.ids is not None:
        ids = [int(t) for t in args.ids.split(",") if t.strip()]
        for tok in lmlab.stream(model, ids, **kw):
            print(tok, end=" ", flush=True)
    else:
        tok = lmlab.load_tokenizer(args.tokenizer or args.model)
        if args.chat:
            kw["messages"] = [{"role": "user", "content": args.prompt}]
        else:
            kw["prompt"] = args.prompt
        for piece in lmlab.stream(model, tok, **kw):
            print(piece, end="", flush=True)
    print()
    return 0


def _tokenizer(args) -> int:
    import lmlab
    from lmlab.tokenizer import Tokenizer

    if args.action == "train":
        tok = Tokenizer.train(args.data, args.vocab_size, kind=args.kind, special_tokens=args.special_tokens)
        tok.save_pretrained(args.out)
        print(f"trained a {args.kind} tokenizer with {tok.vocab_size} tokens -> {args.out}")
        return 0
    tok = lmlab.load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, add_special_tokens=not args.no_special)
    print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0


def _info(args) -> int:
    import lmlab

    model = lmlab.load_model(args.model)
    print(json.dumps({"params": model.num_params(), **model.config.to_dict()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab", description="Build, train, align and serve language models.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser("generate", help="continue a prompt with a model directory", formatter_class=fmt)
    g.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the model directory's tokenizer)")
    src.add_argument("--ids", help="prompt token ids, comma-separated (prints new ids)")
    g.add_argument("--chat", action="store_true", help="treat --prompt as a user message and apply the chat template")
    g.add_argument("--tokenizer", help="tokenizer directory, if not the model directory")
    g.add_argument("--compile", action="store_true", help="compile the decode step (faster after ~20-60 s)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    g.set_defaults(func=_generate)

    t = sub.add_parser("tokenizer", help="train a tokenizer or encode text", formatter_class=fmt)
    tsub = t.add_subparsers(dest="action", metavar="ACTION", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer on text files", formatter_class=fmt)
    tt.add_argument("--data", nargs="+", required=True, help="text files (.txt, one document or line per line)")
    tt.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    tt.add_argument("--kind", default="bpe", choices=["bpe", "sp-bpe", "unigram", "wordpiece"],
                    help="bpe: byte-level BPE; sp-bpe/unigram: SentencePiece; wordpiece: BERT")
    tt.add_argument("--special-tokens", nargs="*", default=None,
                    help="extra special tokens (default: the chat tokens of lmlab's template)")
    tt.add_argument("--out", required=True, help="output directory")
    te = tsub.add_parser("encode", help="print the ids and tokens of a text", formatter_class=fmt)
    te.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    te.add_argument("--no-special", action="store_true", help="do not add bos/eos or [CLS]/[SEP]")
    te.add_argument("text", help="the text to encode")
    t.set_defaults(func=_tokenizer)

    i = sub.add_parser("info", help="print a model directory's config and parameter count", formatter_class=fmt)
    i.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    from lmlab.errors import LmlabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (LmlabError, ValueError, FileNotFoundError) as e:
        print(f"lmlab {args.verb}: error: {e}", file=sys.stderr)
        return 2
