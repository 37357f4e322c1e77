"""Training step and prefill throughput: lmlab vs transformers on the same weights, in one process.

A training step is forward + cross-entropy loss + backward + AdamW step (fused where the CPU build
supports it, else foreach), the same loss code and optimizer for both. Steps of the two models are
interleaved (one lmlab step, one transformers step, ...) so that machine noise hits both alike.

MFU counts 6 x (parameters except lookup tables: an untied input embedding, learned positions; a tied
head is multiplied with, so it counts) x tokens per training step and 2 x that per
forward (attention score/value products are left out), against a measured matmul peak in the
compute dtype (fp32, or bf16 under --dtype bfloat16).

    python bench/train_step.py                    # fp32, batch 4 x 256, 5 timed steps
    python bench/train_step.py --dtype bfloat16   # bf16 autocast (weights and optimizer stay fp32)
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True), "foreach"


def logits_fn(model, is_hf):
    if is_hf:
        return lambda ids: model(input_ids=ids, use_cache=False).logits
    return lambda ids: model(ids)


class Trainer:
    """One model, its optimizer, and a timed training step / prefill on fixed data."""

    def __init__(self, model, is_hf, autocast_dtype):
        self.model, self.logits = model, logits_fn(model, is_hf)
        self.opt, self.opt_kind = make_optimizer(model)
        self.autocast_dtype = autocast_dtype

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    def train_step(self, inputs, targets) -> tuple[float, float]:
        """-> (seconds, loss)"""
        self.model.train()
        t0 = time.perf_counter()
        with self.autocast():
            logits = self.logits(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    def prefill(self, ids) -> float:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            t0 = time.perf_counter()
            self.logits(ids)
            return time.perf_counter() - t0


def interleaved(fa, fb, warmup: int, steps: int) -> tuple[list, list]:
    """Run fa and fb alternately; drop `warmup` rounds; return the results of the other rounds."""
    ra, rb = [], []
    for i in range(warmup + steps):
        a, b = fa(), fb()
        if i >= warmup:
            ra.append(a)
            rb.append(b)
    return ra, rb


def main():
    ap = common.parser(__doc__)
    ap.add_argument("--preset", default="llama-50m", help="lmlab model preset (default: llama-50m)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype; bfloat16 uses torch.autocast on CPU (default: float32)")
    ap.add_argument("--batch", type=int, default=4, help="training batch size (default: 4)")
    ap.add_argument("--seq", type=int, default=256, help="training sequence length (default: 256)")
    ap.add_argument("--prefill-len", type=int, default=512, help="prefill length at batch 1 (default: 512)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, median reported (default: 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warmup steps (default: 2)")
    args = ap.parse_args()

    common.setup(args.threads)
    ac = torch.bfloat16 if args.dtype == "bfloat16" else None
    info = common.machine_info()
    peak = {"float32": common.matmul_peak_gflops(torch.float32)}
    if ac is not None:
        peak["bfloat16"] = common.matmul_peak_gflops(torch.bfloat16)
    peak_flops = peak[args.dtype] * 1e9

    model, hf = common.model_pair(args.preset)
    counts = common.weight_counts(model)
    n = counts["params_no_embed"]
    V = model.config.vocab_size
    lm, tf = Trainer(model, False, ac), Trainer(hf, True, ac)

    # prefill (batch 1, forward only, logits for every position in both)
    ids = torch.randint(0, V, (1, args.prefill_len))
    pa, pb = interleaved(lambda: lm.prefill(ids), lambda: tf.prefill(ids), 1, args.steps)
    # training
    data = torch.randint(0, V, (args.batch, args.seq + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    loss0 = (lm.train_step(inputs, targets)[1], tf.train_step(inputs, targets)[1])  # same weights: same loss
    ta, tb = interleaved(lambda: lm.train_step(inputs, targets)[0], lambda: tf.train_step(inputs, targets)[0],
                         max(args.warmup - 1, 0), args.steps)

    tokens = args.batch * args.seq
    res = {}
    for who, train, pre in (("lmlab", ta, pa), ("transformers", tb, pb)):
        t, p = common.median(train), common.median(pre)
        res[who] = {"train_s_per_step": t, "train_tokens_per_s": tokens / t, "train_mfu": 6 * n * tokens / t / peak_flops,
                    "prefill_s": p, "prefill_tokens_per_s": args.prefill_len / p,
                    "prefill_mfu": 2 * n * args.prefill_len / p / peak_flops, "train_step_times_s": train,
                    "prefill_times_s": pre}
    a, b = res["lmlab"], res["transformers"]
    ratio = {k: a[k] / b[k] for k in ("train_tokens_per_s", "prefill_tokens_per_s")}

    rows = [
        [f"train tokens/s ({args.batch} x {args.seq})", a["train_tokens_per_s"], b["train_tokens_per_s"],
         f"{ratio['train_tokens_per_s']:.2f}"],
        ["train ms/step", a["train_s_per_step"] * 1e3, b["train_s_per_step"] * 1e3, ""],
        [f"train MFU (vs {args.dtype} matmul peak)", f"{a['train_mfu']:.0%}", f"{b['train_mfu']:.0%}", ""],
        [f"prefill tokens/s (1 x {args.prefill_len})", a["prefill_tokens_per_s"], b["prefill_tokens_per_s"],
         f"{ratio['prefill_tokens_per_s']:.2f}"],
        ["prefill ms", a["prefill_s"] * 1e3, b["prefill_s"] * 1e3, ""],
        [f"prefill MFU (vs {args.dtype} matmul peak)", f"{a['prefill_mfu']:.0%}", f"{b['prefill_mfu']:.0%}", ""],
    ]
    table = common.md_table(["metric", "lmlab", "transformers", "lmlab / transformers"], rows)
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
    mode = "fp32" if ac is None else "bf16 autocast (fp32 weights)"
    name = "train_step" + ("" if args.preset == "llama-50m" else f"_{args.preset}") + ("" if ac is None else "_bf16")
    body = "\n\n".join([
        f"## Training step and prefill: `{args.preset}`, {mode}",
        f"`{' '.join(['python bench/train_step.py', *sys.argv[1:]])}`: "
        f"{counts['params'] / 1e6:.1f}M parameters ({n / 1e6:.1f}M in matmuls: all but lookup tables), "
        f"AdamW ({lm.opt_kind}), median of {args.steps} steps after {args.warmup} warmup, the two models "
        f"interleaved. Measured matmul peak (2048^3): {peaks}. First-step loss: lmlab {loss0[0]:.4f}, "
        f"transformers {loss0[1]:.4f}.",
        table, common.machine_line(info)])
    print(body)

    result = {"name": name, "args": vars(args), "machine": info, "peak_gflops": peak, **counts,
              "optimizer": lm.opt_kind, "first_loss": {"lmlab": loss0[0], "transformers": loss0[1]},
              "results": res, "ratio_lmlab_over_transformers": ratio}
    common.publish(name, result, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
