"""The GPU path in one script: bf16 autocast, SDPA's flash kernel, torch.compile and the training MFU of
`gpt2-124m` against transformers on the same weights, plus KV-cache decoding, on a CUDA machine.

This is what a session lent a GPU runs (one prepared script, a few minutes of device time). Each check holds
or the script names the one that did not and exits 1; the numbers go to the `gpu` section of docs/benchmarks.md.

Checks:
- parity: fp32 logits of lmlab and transformers on the device agree (max abs difference <= 1e-3);
- flash: lmlab's training steps, eager and compiled, run under sdpa_kernel(FLASH_ATTENTION) (SDPA raises where
  the flash kernel cannot take a call) and the profiler finds a flash-attention kernel among their kernels;
- bf16 and compile: the first-step losses of lmlab, lmlab with train.compile and transformers agree within 2e-2.
Measured: the matmul peak in the training dtype (best of 8192^3 GEMMs), training tokens/s and MFU against it (6 x matmul
parameters per token, as in bench/train_step.py, and with attention's products counted as nanoGPT does:
+ 12 x layers x hidden x T), the peak memory of a step, and greedy decode tokens/s (fp32, batch 1 and 16) with
the ids compared to transformers' generate.

    python bench/gpu.py                     # CUDA: gpt2-124m, bf16, batch 16 x 1024
    python bench/gpu.py --device cpu --preset tiny --batch 2 --seq 64 --new-tokens 8 --no-docs   # on a CPU
"""
from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402
from decode import left_pad, make_prompts  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from train_step import Trainer, interleaved  # noqa: E402

import lmlab  # noqa: E402


def has_flash_kernel(trainer: Trainer, inputs, targets) -> bool:
    """Whether the profiler records a flash-attention kernel in one training step on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.train_step(inputs, targets)
    return any("flash" in e.name.lower() for e in prof.events())


def decode_check(model, hf, batch: int, new_tokens: int, device) -> dict:
    """Greedy decode (fp32, KV cache) of lmlab and transformers' generate: tokens/s (best of 3 after a warm-up
    call) and whether the ids agree (else the first step where they differ)."""
    prompts = make_prompts(batch, 16, model.config.vocab_size)
    ids, mask = (t.to(device) for t in left_pad(prompts))

    def run_lmlab():
        out = lmlab.generate(model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])
        common.sync(device)
        return out

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        common.sync(device)
        return out[:, ids.shape[1]:].tolist()

    secs, outs = common.best_interleaved({"lmlab": run_lmlab, "transformers": run_hf}, 3)
    diffs = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
             for a, b in zip(outs["lmlab"], outs["transformers"])]
    first = min((d for d in diffs if d is not None), default=None)
    return {"batch": batch, "tokens_per_s": {k: batch * new_tokens / s for k, s in secs.items()},
            "same_ids": first is None, "first_diff_step": first}


def run(argv=None) -> dict:
    ap = common.parser(__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    ap.add_argument("--preset", default="gpt2-124m", help="lmlab model preset (default: gpt2-124m)")
    ap.add_argument("--batch", type=int, default=16, help="training batch size (default: 16)")
    ap.add_argument("--seq", type=int, default=1024, help="training sequence length (default: 1024)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps, median reported (default: 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included (default: 3)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode call (default: 128)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="training compute dtype (default: bfloat16 autocast; float32 for a CPU without native bf16)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                 "--device cpu runs the script itself on a CPU")
    common.setup(args.threads)
    info = common.machine_info() | ({"gpu": torch.cuda.get_device_name(device)} if cuda else {})
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity and decode compare true fp32
    dtype = getattr(torch, args.dtype)
    peak = common.matmul_peak_gflops(dtype, 8192 if cuda else 2048, device=device) / 1e3  # TFLOP/s
    failures = []

    model, hf = common.model_pair(args.preset)
    model, hf = model.to(device).eval(), hf.to(device).eval()
    cfg = model.config
    V, T = cfg.vocab_size, args.seq

    # fp32 parity and decoding first, while both models hold the same weights
    x = torch.randint(0, V, (2, min(T, 128)), device=device)
    with torch.inference_mode():
        parity = (model(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    if not parity <= 1e-3:
        failures.append(f"fp32 logits differ from transformers by {parity:.2e} (> 1e-3)")
    decode = [decode_check(model, hf, b, args.new_tokens, device) for b in (1, 16)]

    # training: bf16 autocast, fused AdamW; lmlab eager and compiled under flash-only SDPA
    ac = dtype if dtype == torch.bfloat16 else None
    trainers = {"lmlab": Trainer(model, False, ac), "lmlab_compiled": Trainer(copy.deepcopy(model), False, ac,
                                                                             compile=True),
                "transformers": Trainer(hf, True, ac)}
    flash_only = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if cuda else contextlib.nullcontext

    def step(who, inputs, targets):
        with flash_only() if who != "transformers" else contextlib.nullcontext():
            return trainers[who].train_step(inputs, targets)

    data = torch.randint(0, V, (args.batch, T + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]
    loss0, peak_mem, t_first = {}, {}, {}
    for who in trainers:  # one step each, alone: first loss, compile time, peak memory
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t_first[who], loss0[who] = step(who, inputs, targets)
        peak_mem[who] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    spread = max(loss0.values()) - min(loss0.values())
    if not spread <= (2e-2 if ac else 1e-4):
        failures.append(f"first-step losses disagree by {spread:.3g}: {loss0}")
    flash = {}
    if cuda:
        for who in ("lmlab", "lmlab_compiled"):
            with flash_only():
                flash[who] = has_flash_kernel(trainers[who], inputs, targets)
            if not flash[who]:
                failures.append(f"{who}: no flash-attention kernel among the step's CUDA kernels")
    times = interleaved([lambda w=w: step(w, inputs, targets)[0] for w in trainers], max(args.warmup - 1, 0),
                        args.steps)
    n = common.weight_counts(model)["params_no_embed"]
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * T  # nanoGPT's attention FLOPs per token (fwd + bwd)
    res = {}
    for who, ts in zip(trainers, times):
        tps = args.batch * T / common.median(ts)
        res[who] = {"tokens_per_s": tps, "ms_per_step": 1e3 * common.median(ts), "mfu_6n": 6 * n * tps / (peak * 1e12),
                    "mfu_with_attention": (6 * n + attn) * tps / (peak * 1e12), "first_step_s": t_first[who],
                    "peak_memory_gib": peak_mem[who], "first_loss": loss0[who], "flash": flash.get(who)}

    a, c, b = res["lmlab"], res["lmlab_compiled"], res["transformers"]
    pct, yn = "{:.0%}".format, (lambda v: "" if v is None else "yes" if v else "NO")
    rows = [[f"train tokens/s ({args.batch} x {T})", a["tokens_per_s"], c["tokens_per_s"], b["tokens_per_s"],
             f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}", f"{c['tokens_per_s'] / b['tokens_per_s']:.2f}"],
            ["train ms/step", a["ms_per_step"], c["ms_per_step"], b["ms_per_step"], "", ""],
            ["MFU (6 x matmul parameters)", *(pct(r["mfu_6n"]) for r in (a, c, b)), "", ""],
            ["MFU (+ attention, nanoGPT's count)", *(pct(r["mfu_with_attention"]) for r in (a, c, b)), "", ""],
            ["first step, s (compilation included)", a["first_step_s"], c["first_step_s"], b["first_step_s"], "", ""],
            ["peak memory of a step, GiB", *("" if r["peak_memory_gib"] is None else r["peak_memory_gib"]
                                             for r in (a, c, b)), "", ""],
            ["flash-attention kernel in the step", yn(a["flash"]), yn(c["flash"]), "", "", ""]]
    table = common.md_table(["metric", "lmlab", "lmlab train.compile", "transformers", "lmlab / transformers",
                             "compiled / transformers"], rows)
    drows = [[f"batch {d['batch']}", d["tokens_per_s"]["lmlab"], d["tokens_per_s"]["transformers"],
              f"{d['tokens_per_s']['lmlab'] / d['tokens_per_s']['transformers']:.2f}",
              "yes" if d["same_ids"] else f"from step 0 to {d['first_diff_step']}"] for d in decode]
    dtable = common.md_table(["greedy decode, fp32, tokens/s", "lmlab", "transformers", "lmlab / transformers",
                              "same ids"], drows)
    where = info.get("gpu", info["cpu"])
    body = "\n\n".join([
        f"## GPU path: `{args.preset}` on {where}",
        f"`{' '.join(['python bench/gpu.py', *(argv if argv is not None else sys.argv[1:])])}`: "
        f"{'bf16 autocast (fp32 weights)' if ac else 'fp32'}, fused AdamW, median of {args.steps} interleaved "
        f"steps after {args.warmup}{'; lmlab under flash-only SDPA' if cuda else ''}. Measured {args.dtype} matmul peak: "
        f"{peak:.1f} TFLOP/s. fp32 logits vs transformers: max abs difference {parity:.1e}. First-step losses: "
        + ", ".join(f"{k} {v:.4f}" for k, v in loss0.items())
        + f". Checks: {'all passed' if not failures else 'FAILED: ' + '; '.join(failures)}.",
        table, dtable, common.machine_line(info) + (f" GPU: {info['gpu']}." if cuda else "")])
    print(body)
    result = {"name": "gpu", "args": vars(args), "machine": info, "peak_tflops": peak, "parity_max_abs": parity,
              "train": res, "decode": decode, "failures": failures}
    common.publish("gpu", result, body, docs=not args.no_docs)
    return result


if __name__ == "__main__":
    sys.exit(1 if run()["failures"] else 0)
