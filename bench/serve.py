"""Serving throughput: `lmlab serve` under 32 concurrent streaming clients vs the same requests one at a time.

The server runs in its own process (`lmlab serve`, loopback) on a random model of the `tiny` preset with a
tokenizer trained on the world; the clients are threads of this process using the official `openai` client.
Every request streams up to `--tokens` new tokens at temperature 0 (a random model may end a reply early, so
the streamed chunks, one per token, are counted). Target: continuous batching gives >= 5x the aggregate
tokens/s of serving the requests one at a time.

    python bench/serve.py [--clients 32] [--requests 4] [--tokens 32]
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


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    args = ap.parse_args()
    common.setup(args.threads)
    import httpx
    import openai

    tmp = Path(tempfile.mkdtemp())
    build_model(tmp / "model", args.preset)
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
                max_tokens=args.tokens, temperature=0, stream=True)
            return sum(1 for ch in stream if ch.choices and ch.choices[0].delta.content)

        one(0)  # warm-up
        n = args.clients * args.requests
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            chunks = sum(pool.map(lambda j: sum(one(j * args.requests + i) for i in range(args.requests)),
                                  range(args.clients)))
        concurrent = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = sum(one(k) for k in range(args.clients))  # one request at a time (a sample of clients)
        sequential = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tps_c, tps_s = chunks / concurrent, single / sequential
    ratio = tps_c / tps_s
    info = common.machine_info()
    rows = [[f"{args.clients} clients x {args.requests} requests (continuous batching)", n, chunks, tps_c, ""],
            [f"one at a time ({args.clients} requests)", args.clients, single, tps_s, ""],
            ["speedup", "", "", ratio, f">= {TARGET:g}x: {'met' if ratio >= TARGET else 'NOT met'}"]]
    table = common.md_table(["case", "requests", "streamed chunks", "tokens/s", "target"], rows)
    print(table)
    body = "\n\n".join([f"## Serving (`bench/serve.py`, `{args.preset}` preset, {args.tokens} tokens per request)",
                        table, common.machine_line(info)])
    common.publish("serve", {"machine": info, "concurrent_tok_s": tps_c, "sequential_tok_s": tps_s,
                             "speedup": ratio, "args": vars(args)}, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
