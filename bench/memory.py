"""Peak memory (RSS) of a training step: lmlab (eager and with train.compile) vs transformers on the same model,
each in a fresh process.

Each side runs in its own subprocess (`--side`), so that neither sees the other's freed-but-kept allocator
pages: build the model (the same random weights: lmlab builds them, transformers loads them from lmlab's
save_pretrained), an AdamW optimizer and one batch; one warm-up step (the optimizer state is allocated);
then the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`) and `--steps` more steps run.
Reported: resident memory before the measured steps, the peak during them, and the difference (activations,
gradients, temporaries: what a training step adds on top of the weights and optimizer state). The compiled side
(train.compile: model and loss as one graph) compiles in its warm-up step.

    python bench/memory.py [--preset small] [--dtype bfloat16]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

MB = 2**20


def rss(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_side(args) -> dict:
    import torch
    from train_step import Trainer

    import lmlab

    common.setup(args.threads)
    torch.manual_seed(0)
    model = lmlab.build(lmlab.preset(args.preset))
    if args.side == "transformers":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            del model
            model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    trainer = Trainer(model, args.side == "transformers", torch.bfloat16 if args.dtype == "bfloat16" else None,
                      compile=args.side == "lmlab_compiled")
    data = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = data[:, :-1], data[:, 1:]
    trainer.train_step(inputs, targets)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss("VmRSS")
    losses = [trainer.train_step(inputs, targets)[1] for _ in range(args.steps)]
    return {"side": args.side, "rss_before": before, "peak": rss("VmHWM"), "losses": losses}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--side", choices=["lmlab", "lmlab_compiled", "transformers"],
                    help="(internal) run one side and print its result")
    args = ap.parse_args()
    if args.dtype == "bfloat16":
        common.skip_without_native_bf16(f"memory --preset {args.preset} --dtype bfloat16")
    if args.side:
        print("RESULT " + json.dumps(one_side(args)))
        return
    res = {}
    for side in ("lmlab", "lmlab_compiled", "transformers"):
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            sys.exit(f"{side} side failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        res[side] = json.loads(line[7:])
    a, c, b = res["lmlab"], res["lmlab_compiled"], res["transformers"]
    added = {k: r["peak"] - r["rss_before"] for k, r in res.items()}
    rows = [["resident before the step, MB", a["rss_before"] / MB, c["rss_before"] / MB, b["rss_before"] / MB, "", ""],
            ["peak during training steps, MB", a["peak"] / MB, c["peak"] / MB, b["peak"] / MB,
             f"{a['peak'] / b['peak']:.2f}", f"{c['peak'] / b['peak']:.2f}"],
            ["added by a step (peak - before), MB", added["lmlab"] / MB, added["lmlab_compiled"] / MB,
             added["transformers"] / MB, f"{added['lmlab'] / added['transformers']:.2f}",
             f"{added['lmlab_compiled'] / added['transformers']:.2f}"]]
    table = common.md_table(["metric", "lmlab", "lmlab train.compile", "transformers", "lmlab / transformers",
                             "compiled / transformers"], rows)
    print(table)
    info = common.machine_info()
    mode = "fp32" if args.dtype == "float32" else "bf16 autocast (fp32 weights)"
    name = f"memory_{args.preset}" + ("" if args.dtype == "float32" else "_bf16")
    body = "\n\n".join([
        f"## Training-step peak memory: `{args.preset}`, {mode}, batch {args.batch} x {args.seq}",
        f"`{' '.join(['python bench/memory.py', *sys.argv[1:]])}`: each side in a fresh process; peak RSS over "
        f"{args.steps} AdamW steps after a warm-up step (the kernel's VmHWM, reset before them); the compiled "
        f"side compiles in its warm-up step. Losses: lmlab "
        f"{a['losses'][0]:.4f}, compiled {c['losses'][0]:.4f}, transformers {b['losses'][0]:.4f}. Target: peak <= "
        f"transformers' (eager: {'met' if a['peak'] <= b['peak'] else 'NOT met'}; compiled: "
        f"{'met' if c['peak'] <= b['peak'] else 'NOT met'}).", table,
        common.machine_line(info)])
    common.publish(name, {"machine": info, "args": vars(args), "results": res}, body, docs=not args.no_docs)


if __name__ == "__main__":
    main()
