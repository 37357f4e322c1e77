"""Serving throughput: `lmlab serve` under 32 concurrent streaming clients vs the same requests one at a time.

The server runs in its own process (`lmlab serve`, loopback) on a random model of each preset with a
tokenizer trained on the world; the clients are threads of this process using the official `openai` client.
Every request streams up to `--tokens` new tokens at temperature 0; the tokens counted are the usage counts of
the stream's last chunk (`stream_options={"include_usage": true}`), as a random model may end a reply early.
Target: continuous batching gives >= 5x the aggregate tokens/s of serving the requests one at a time.

    python bench/serve.py [--presets tiny,small] [--clients 32] [--requests 4] [--tokens 32]
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

TARGET = 5.0


def build_model(out: Path, preset: str) -> None:
    import lmlab
    from lmlab.data.world import make_world
    from lmlab.tokenizer import Tokenizer
    tok = Tokenizer.train(make_world(seed=0, n_people=20).pretrain_docs(), vocab_size=600, kind="bpe",
                          show_progress=False)
    model = lmlab.build(lmlab.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def measure(preset: str, args) -> tuple[int, float, int, float]:
    """Serve a random `preset` model; (tokens, seconds) for the concurrent clients and for one at a time."""
    import httpx
    import openai

    tmp = Path(tempfile.mkdtemp())
    build_model(tmp / "model", preset)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", "--model", str(tmp / "model"), "--port",
                             str(port), "--log-level", "warning", "--max-batch", str(args.clients)],
                            env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

        def one(k: int) -> int:
            stream = client.chat.completions.create(
                model="model", messages=[{"role": "user", "content": f"Tell me about person {k}."}],
                max_tokens=args.tokens, temperature=0, stream=True, stream_options={"include_usage": True})
            return sum(ch.usage.completion_tokens for ch in stream if ch.usage)

        one(0)  # warm-up
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            tokens = sum(pool.map(lambda j: sum(one(j * args.requests + i) for i in range(args.requests)),
                                  range(args.clients)))
        concurrent = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = sum(one(k) for k in range(args.clients))  # one request at a time (a sample of clients)
        sequential = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return tokens, concurrent, single, sequential


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default: tiny,small)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    args = ap.parse_args()
    common.setup(args.threads)
    rows, results = [], {}
    for preset in args.presets.split(","):
        tokens, concurrent, single, sequential = measure(preset, args)
        tps_c, tps_s = tokens / concurrent, single / sequential
        ratio = tps_c / tps_s
        results[preset] = {"concurrent_tok_s": tps_c, "sequential_tok_s": tps_s, "speedup": ratio}
        rows.append([f"`{preset}`", tps_c, tps_s, ratio, f">= {TARGET:g}x: {'met' if ratio >= TARGET else 'NOT met'}"])
    table = common.md_table(["model", f"{args.clients} clients x {args.requests} requests, tokens/s",
                             "one request at a time, tokens/s", "speedup", "target"], rows)
    print(table)
    info = common.machine_info()
    body = "\n\n".join([f"## Serving: continuous batching under {args.clients} streaming clients",
                        f"`python bench/serve.py`: `lmlab serve` in its own process ({args.threads} torch threads) on "
                        f"a random model, {args.clients} client threads with the official `openai` client, "
                        f"{args.requests} chat requests each, {args.tokens} new tokens per request at temperature 0 "
                        f"(counted from the stream's usage chunk); then {args.clients} of the same requests one at a "
                        "time. Clients and server share the machine's cores.", table, common.machine_line(info)])
    common.publish("serve", {"machine": info, "results": results, "args": vars(args)}, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
