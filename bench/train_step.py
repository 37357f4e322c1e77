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
import copy
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

    def __init__(self, model, is_hf, autocast_dtype, compile: bool = False):
        self.model, self.logits = model, logits_fn(model, is_hf)
        self.device = next(model.parameters()).device
        self.opt, self.opt_kind = make_optimizer(model)
        self.autocast_dtype = autocast_dtype
        self.loss = torch.compile(self._loss) if compile else self._loss  # as train.compile: model and loss

    def _loss(self, inputs, targets):
        return F.cross_entropy(self.logits(inputs).float().flatten(0, 1), targets.flatten())

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, inputs, targets) -> tuple[float, float]:
        """-> (seconds, loss)"""
        self.model.train()
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss(inputs, targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()  # on a GPU: waits for the step's kernels
        return time.perf_counter() - t0, value

    def prefill(self, ids) -> float:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            t0 = time.perf_counter()
            self.logits(ids)
            common.sync(self.device)
            return time.perf_counter() - t0


def interleaved(fns: list, warmup: int, steps: int) -> list[list]:
    """Run the fns in turn; drop `warmup` rounds; return each fn's results of the other rounds."""
    out = [[] for _ in fns]
    for i in range(warmup + steps):
        for r, fn in zip(out, fns):
            x = fn()
            if i >= warmup:
                r.append(x)
    return out


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
    ap.add_argument("--compile", action="store_true", help="also time lmlab with train.compile (model + loss compiled)")
    args = ap.parse_args()

    common.setup(args.threads)
    ac = torch.bfloat16 if args.dtype == "bfloat16" else None
    if ac is not None:
        common.skip_without_native_bf16(f"train_step --preset {args.preset} --dtype bfloat16")
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
    trainers = {"lmlab": lm, "transformers": tf}
    if args.compile:  # train.compile: model and loss compiled together, on a copy of the same weights
        trainers["lmlab_compiled"] = Trainer(copy.deepcopy(model), False, ac, compile=True)

    # prefill (batch 1, forward only, logits for every position in both)
    ids = torch.randint(0, V, (1, args.prefill_len))
    pa, pb = interleaved([lambda: lm.prefill(ids), lambda: tf.prefill(ids)], 1, args.steps)
    # training
    data = torch.randint(0, V, (args.batch, args.seq + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    loss0 = {k: t.train_step(inputs, targets)[1] for k, t in trainers.items()}  # same weights: same loss
    times = interleaved([lambda t=t: t.train_step(inputs, targets)[0] for t in trainers.values()],
                        max(args.warmup - 1, 0), args.steps)
    train_times = dict(zip(trainers, times))

    tokens = args.batch * args.seq
    res = {}
    for who, train in train_times.items():
        t = common.median(train)
        res[who] = {"train_s_per_step": t, "train_tokens_per_s": tokens / t, "train_mfu": 6 * n * tokens / t / peak_flops,
                    "train_step_times_s": train}
    for who, pre in (("lmlab", pa), ("transformers", pb)):
        p = common.median(pre)
        res[who] |= {"prefill_s": p, "prefill_tokens_per_s": args.prefill_len / p,
                     "prefill_mfu": 2 * n * args.prefill_len / p / peak_flops, "prefill_times_s": pre}
    a, b = res["lmlab"], res["transformers"]
    ratio = {k: a[k] / b[k] for k in ("train_tokens_per_s", "prefill_tokens_per_s")}
    c = res.get("lmlab_compiled")
    if c:
        ratio["compiled_train_tokens_per_s"] = c["train_tokens_per_s"] / b["train_tokens_per_s"]

    def row(label, key, fmt=None, ratio_key=None):
        vals = [a.get(key), b.get(key)] + ([c.get(key)] if c else [])
        vals = ["" if v is None else fmt(v) if fmt else v for v in vals]
        rat = [f"{ratio[ratio_key]:.2f}" if ratio_key else ""]
        if c:
            rat.append(f"{ratio['compiled_train_tokens_per_s']:.2f}" if ratio_key == "train_tokens_per_s" else "")
        return [label, *vals, *rat]
    pct = "{:.0%}".format
    rows = [
        row(f"train tokens/s ({args.batch} x {args.seq})", "train_tokens_per_s", ratio_key="train_tokens_per_s"),
        row("train ms/step", "train_s_per_step", lambda v: v * 1e3),
        row(f"train MFU (vs {args.dtype} matmul peak)", "train_mfu", pct),
        row(f"prefill tokens/s (1 x {args.prefill_len})", "prefill_tokens_per_s", ratio_key="prefill_tokens_per_s"),
        row("prefill ms", "prefill_s", lambda v: v * 1e3),
        row(f"prefill MFU (vs {args.dtype} matmul peak)", "prefill_mfu", pct),
    ]
    table = common.md_table(["metric", "lmlab", "transformers"] + (["lmlab train.compile"] if c else [])
                            + ["lmlab / transformers"] + (["compiled / transformers"] if c else []), rows)
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
    mode = "fp32" if ac is None else "bf16 autocast (fp32 weights)"
    name = "train_step" + ("" if args.preset == "llama-50m" else f"_{args.preset}") + ("" if ac is None else "_bf16")
    body = "\n\n".join([
        f"## Training step and prefill: `{args.preset}`, {mode}",
        f"`{' '.join(['python bench/train_step.py', *sys.argv[1:]])}`: "
        f"{counts['params'] / 1e6:.1f}M parameters ({n / 1e6:.1f}M in matmuls: all but lookup tables), "
        f"AdamW ({lm.opt_kind}), median of {args.steps} steps after {args.warmup} warmup, the models "
        f"interleaved{'; train.compile compiles the model and the loss as one graph' if c else ''}. Measured "
        f"matmul peak (2048^3): {peaks}. First-step loss: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in loss0.items()) + ".",
        table, common.machine_line(info)])
    print(body)

    result = {"name": name, "args": vars(args), "machine": info, "peak_gflops": peak, **counts,
              "optimizer": lm.opt_kind, "first_loss": loss0,
              "results": res, "ratio_lmlab_over_transformers": ratio}
    common.publish(name, result, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
