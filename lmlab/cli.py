"""The `lmlab` command: one subcommand per verb; each is thin and calls into the package."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    import torch

    import lmlab

    model = lmlab.load_model(args.model, dtype=getattr(torch, args.dtype))
    ids = [int(t) for t in args.ids.split(",") if t.strip()]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    for tok in lmlab.stream(model, ids, **kw):
        print(tok, end=" ", flush=True)
    print()
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
    g.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    g.set_defaults(func=_generate)

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
