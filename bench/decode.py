"""Greedy decode throughput: lmlab.generate vs transformers' generate (and, at batch 1, llama.cpp) on the same
weights, in one process.

Batch 1 (default): one 16-token prompt, 128 new tokens. --batch B: B prompts of 9..16 tokens
(left-padded into one batch for transformers), aggregate new tokens per second. The time of a
generate call includes its prefill. One untimed round, then --repeats rounds that run every side once in turn
(so that the machine's slow spells hit all alike); each side's best time counts.

The bound: decoding reads every weight once per step (all parameters but the input embedding table;
KV cache and activations are ignored), so a step takes at least weight bytes / memory bandwidth.
Bandwidth is measured with dst.copy_(src) on a 256 MB fp32 tensor and counted as bytes read + bytes
written per second.

    python bench/decode.py              # batch 1
    python bench/decode.py --batch 16   # batched decode
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402

import lmlab  # noqa: E402


def make_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` random prompts; at batch > 1 their lengths cycle through length-7 .. length."""
    g = torch.Generator().manual_seed(1234)
    lengths = [length] if batch == 1 else [length - (i % 8) for i in range(batch)]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    L = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def llamacpp_greedy(model, prompt: list[int], n_new: int, threads: int):
    """A function that decodes greedily in llama.cpp (llama-cpp-python) on lmlab's own f32 GGUF export of `model`,
    f32 KV cache, through llama.cpp's C API one token per llama_decode (argmax in numpy) -> the new ids."""
    import llama_cpp
    import numpy as np

    from lmlab.interop.gguf import export_gguf
    from lmlab.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        # the file needs a vocabulary; ids are what is decoded, so any small one will do (spare rows are padding)
        Tokenizer.train(["The cat sat on the mat."] * 8, 300, kind="bpe", show_progress=False).save_pretrained(d)
        path = export_gguf(d, Path(d) / "model.gguf", dtype="f32")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n_new + 8, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    ctx, vocab = llm._ctx.ctx, model.config.vocab_size

    def step(tokens: list[int]) -> int:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))))

    def run():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        out = [step(prompt)]
        while len(out) < n_new:
            out.append(step(out[-1:]))
        return out
    run.llm = llm  # `ctx` is a raw pointer into it: keep it alive as long as `run`
    return run


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--preset", default="llama-50m", help="lmlab model preset (default: llama-50m)")
    ap.add_argument("--batch", type=int, default=1, help="number of prompts decoded together (default: 1)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt length (the longest, at batch > 1; default: 16)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default: 128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, best counts (default: 5)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp column (batch 1 only)")
    args = ap.parse_args()
    if args.prompt_len < 8 and args.batch > 1:
        ap.error("--prompt-len must be at least 8 with --batch > 1")

    common.setup(args.threads)
    info = common.machine_info()
    bandwidth = common.copy_bandwidth_gbs()
    model, hf = common.model_pair(args.preset)
    model.eval()
    hf.eval()
    counts = common.weight_counts(model)
    weight_bytes = counts["params_no_embed"] * model.embed.weight.element_size()
    bound_step_s = weight_bytes / (bandwidth * 1e9)

    prompts = make_prompts(args.batch, args.prompt_len, model.config.vocab_size)
    ids, mask = left_pad(prompts)
    N = args.new_tokens

    def run_lmlab(compile=False):
        out = lmlab.generate(model, prompts if args.batch > 1 else prompts[0], max_new_tokens=N, stop_token_ids=[],
                             compile=compile)
        return out if args.batch > 1 else [out]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=N,
                              min_new_tokens=N, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    t0 = time.perf_counter()
    run_lmlab(compile=True)  # the first call compiles the decode step
    t_compile = time.perf_counter() - t0
    fns = {"lmlab": run_lmlab, "lmlab_compiled": lambda: run_lmlab(compile=True), "transformers": run_hf}
    if args.batch == 1 and not args.no_llamacpp:
        try:
            fns["llama.cpp"] = llamacpp_greedy(model, prompts[0], N, args.threads)
        except ImportError:
            print("llama-cpp-python is not installed (pip install -e '.[test]'): no llama.cpp column")
    secs, outs = common.best_interleaved(fns, args.repeats)
    t_lm, t_lmc, t_hf = secs["lmlab"], secs["lmlab_compiled"], secs["transformers"]
    out_lm, out_lmc, out_hf = outs["lmlab"], outs["lmlab_compiled"], outs["transformers"]
    cpp = None
    if "llama.cpp" in fns:
        cpp = {"seconds": secs["llama.cpp"], "same_ids": outs["llama.cpp"] == out_lm[0],
               "first_diff": next((j for j, (x, y) in enumerate(zip(outs["llama.cpp"], out_lm[0])) if x != y), None)}

    bad_rows = [i for i, (a, b) in enumerate(zip(out_lm, out_hf)) if a != b]
    first_diff = {i: next((j for j, (x, y) in enumerate(zip(out_lm[i], out_hf[i])) if x != y),
                          min(len(out_lm[i]), len(out_hf[i]))) for i in bad_rows}
    match = not bad_rows and len(out_lm) == len(out_hf) and out_lmc == out_lm
    tokens = args.batch * N
    tps = {"lmlab": tokens / t_lm, "lmlab_compiled": tokens / t_lmc, "transformers": tokens / t_hf}
    bound_tps = args.batch / bound_step_s  # new tokens/s at the bound (one weight read per step)
    ratio = tps["lmlab"] / tps["transformers"]
    ratio_c = tps["lmlab_compiled"] / tps["transformers"]

    cols = ["lmlab", "lmlab_compiled", "transformers"] + (["llama.cpp"] if cpp else [])
    if cpp:
        tps["llama.cpp"] = tokens / cpp["seconds"]
    ratios = [ratio, ratio_c] + ([tps["lmlab_compiled"] / tps["llama.cpp"]] if cpp else [])
    blank = [""] * len(ratios)
    rows = [[f"tokens/s (batch {args.batch}, {N} new)", *(tps[k] for k in cols), *(f"{r:.2f}" for r in ratios)],
            ["ms per step", *(tokens / tps[k] / N * 1e3 for k in cols), *blank],
            ["share of the bandwidth bound", *(f"{tps[k] / bound_tps:.0%}" for k in cols), *blank]]
    table = common.md_table(["metric", "lmlab", "lmlab compile=True", "transformers"]
                            + (["llama.cpp (f32 GGUF)"] if cpp else [])
                            + ["lmlab / transformers", "compiled / transformers"]
                            + (["compiled / llama.cpp"] if cpp else []), rows)
    match_line = ("Same token ids from lmlab and transformers: yes." if match else
                  f"Same token ids from lmlab and transformers: NO, {len(bad_rows)} of {args.batch} rows differ "
                  f"(first differing step per row: {first_diff}).")
    if cpp:
        match_line += (" llama.cpp (lmlab's f32 GGUF export of the same weights, f32 KV cache, one llama_decode per "
                       f"token through llama-cpp-python's C API, argmax in numpy): same ids "
                       f"{'yes' if cpp['same_ids'] else 'from step 0 to %s' % cpp['first_diff']}.")
    name = "decode" + ("" if args.preset == "llama-50m" else f"_{args.preset}") + \
        ("" if args.batch == 1 else f"_b{args.batch}")
    body = "\n\n".join([
        f"## Greedy decode: `{args.preset}`, fp32, batch {args.batch}",
        f"`{' '.join(['python bench/decode.py', *sys.argv[1:]])}`: prompt length "
        f"{'%d' % args.prompt_len if args.batch == 1 else f'{args.prompt_len - 7}..{args.prompt_len}'}, "
        f"{N} new tokens, time of the whole generate call (prefill included), best of {args.repeats} rounds "
        f"that call every side in turn, after a warm-up round. Bound: {weight_bytes / 1e6:.0f} MB of weights read per step (all but the input "
        f"embedding) at {bandwidth:.1f} GB/s copy bandwidth (bytes read + written per second, 256 MB fp32 "
        f"copy) = {bound_step_s * 1e3:.2f} ms/step, {bound_tps:,.0f} tokens/s. `compile=True` compiles the "
        f"decode step once ({t_compile:.0f} s in this run, included in no timing). {match_line}",
        table, common.machine_line(info)])
    print(body)

    result = {"name": name, "args": vars(args), "machine": info, **counts, "weight_bytes_per_step": weight_bytes,
              "copy_bandwidth_gbs_read_plus_write": bandwidth, "bound_tokens_per_s": bound_tps,
              "seconds": {"lmlab": t_lm, "lmlab_compiled": t_lmc, "transformers": t_hf, "compile": t_compile},
              "tokens_per_s": tps, "ratio_lmlab_over_transformers": ratio, "ratio_compiled_over_transformers": ratio_c,
              "tokens_match": match, "mismatched_rows": bad_rows, "first_diff_step": first_diff, "llama.cpp": cpp}
    common.publish(name, result, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
